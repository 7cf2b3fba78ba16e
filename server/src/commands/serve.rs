//! `attune serve`: load the model, start the engine thread and the HTTP server,
//! wait for SIGTERM/Ctrl-C, drain, exit.

use std::sync::Arc;

use anyhow::{Context, Result};
use attune_config::Config;
use attune_server::api::{self, AppState};

pub fn run(cfg: Config) -> Result<()> {
    let model = Arc::new(super::load_model(&cfg)?);
    // The aligner trains on dense f32 weights: the serving model itself when
    // it has them, else a dequantized copy.
    let trainee = if cfg.aligner.enabled && cfg.model.weights != "f32" {
        Arc::new(super::align::load_f32(cfg.clone())?)
    } else {
        model.clone()
    };
    let state = AppState::start_with(&cfg, model, trainee)?;
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let (server, addr) = api::bind(&cfg, state.clone())
            .with_context(|| format!("cannot listen on {}:{}", cfg.server.host, cfg.server.port))?;
        tracing::info!(%addr, model = %state.model_name, "serving");
        server.await.context("server failed")
    })?;
    tracing::info!("shut down cleanly");
    Ok(())
}
