//! The OpenAI-compatible HTTP API: routes, wire types, and the server's start
//! and graceful stop. Only this module knows the wire format.

pub mod error;
mod feedback;
mod routes;
pub mod validate;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use attune_aligner::{Store, StoreError};
use attune_config::Config;
use attune_models::{LoadedModel, Registry, RegistryError};

use crate::engine::EngineHandle;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub model: Arc<LoadedModel>,
    pub model_name: String,
    pub created: u64,
    pub limits: validate::Limits,
    pub max_body_bytes: usize,
    /// Completions served and feedback on them.
    pub store: Store,
    /// Adapter generations; new requests are served with the active one.
    pub registry: Arc<Registry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the engine thread: {0}")]
    Engine(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl AppState {
    /// Opens the store, starts the engine thread on `model` and gathers what
    /// handlers need.
    pub fn start(cfg: &Config, model: Arc<LoadedModel>) -> Result<Arc<Self>, StartError> {
        let store = Store::open(&cfg.store)?;
        let registry = Arc::new(Registry::open(
            &cfg.adapters.dir,
            model.model.config(),
            model.model.device(),
            cfg.adapters.keep,
            &model.name,
        )?);
        let (engine, _join) = crate::engine::Engine::spawn(
            model.clone(),
            cfg.engine.clone(),
            cfg.runtime.effective_threads(),
        )?;
        let model_name = if cfg.server.model_name.is_empty() {
            model.name.clone()
        } else {
            cfg.server.model_name.clone()
        };
        let limits = validate::Limits {
            model_name: model_name.clone(),
            max_n: cfg.server.max_n,
            default_max_tokens: cfg.engine.default_max_tokens,
            context: model.model.max_context(),
        };
        Ok(Arc::new(Self {
            engine,
            model,
            model_name,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            limits,
            max_body_bytes: cfg.server.max_body_bytes,
            store,
            registry,
        }))
    }
}

/// Binds the server; the returned `Server` runs when awaited and stops on
/// SIGTERM/Ctrl-C, giving in-flight requests `server.shutdown_grace_secs`.
pub fn bind(
    cfg: &Config,
    state: Arc<AppState>,
) -> std::io::Result<(actix_web::dev::Server, std::net::SocketAddr)> {
    let data = web::Data::from(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(routes::configure)
    })
    .shutdown_timeout(cfg.server.shutdown_grace_secs)
    .workers(2)
    .bind((cfg.server.host.as_str(), cfg.server.port))?;
    let addr = server.addrs()[0];
    Ok((server.run(), addr))
}
