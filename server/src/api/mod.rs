//! The OpenAI-compatible HTTP API: routes, wire types, and the server's start
//! and graceful stop. Only this module knows the wire format.

mod admin;
pub mod error;
mod feedback;
mod routes;
pub mod validate;

use std::sync::Arc;

use actix_web::dev::Service;
use actix_web::{web, App, HttpServer};
use attune_aligner::online::{self, AlignerHandle, AlignerParts};
use attune_aligner::{Store, StoreError};
use attune_config::Config;
use attune_models::{LoadedModel, Registry, RegistryError};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;

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
    /// The aligner thread (`None` when `aligner.enabled` is off).
    pub aligner: Option<AlignerHandle>,
    /// The admin API's bearer token (`None`: the admin API is off).
    pub admin_token: Option<String>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the engine thread: {0}")]
    Engine(#[from] std::io::Error),
    #[error("cannot start the aligner thread: {0}")]
    Aligner(std::io::Error),
    #[error("cannot register the metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl AppState {
    /// [`AppState::start_with`] where the aligner trains on `model` itself
    /// (which then must have dense weights).
    pub fn start(cfg: &Config, model: Arc<LoadedModel>) -> Result<Arc<Self>, StartError> {
        Self::start_with(cfg, model.clone(), model)
    }

    /// Opens the store and the adapter registry, starts the engine thread on
    /// `model` and (with `aligner.enabled`) the aligner thread training on
    /// `trainee` (the same model with dense f32 weights), and gathers what
    /// handlers need.
    pub fn start_with(
        cfg: &Config,
        model: Arc<LoadedModel>,
        trainee: Arc<LoadedModel>,
    ) -> Result<Arc<Self>, StartError> {
        let store = Store::open(&cfg.store)?;
        let registry = Arc::new(Registry::open(
            &cfg.adapters.dir,
            model.model.config(),
            model.model.device(),
            cfg.adapters.keep,
            &model.name,
        )?);
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
        let aligner = if cfg.aligner.enabled {
            Some(
                online::spawn(AlignerParts {
                    store: store.clone(),
                    registry: registry.clone(),
                    model: trainee,
                    cfg: cfg.aligner.clone(),
                })
                .map_err(StartError::Aligner)?,
            )
        } else {
            None
        };
        let metrics = Arc::new(
            Metrics::new(
                cfg.server.metrics,
                cfg.engine.max_kv_tokens,
                &store,
                aligner.as_ref().map(|a| a.metrics()),
                &registry,
            )
            .map_err(|e| StartError::Metrics(e.to_string()))?,
        );
        let (engine, _join) = crate::engine::Engine::spawn(
            model.clone(),
            cfg.engine.clone(),
            cfg.runtime.effective_threads(),
            metrics.serving.clone(),
        )?;
        let admin_token = Some(cfg.server.admin_token.clone()).filter(|t| !t.is_empty());
        if admin_token.is_none() {
            tracing::info!("admin API off (no server.admin_token)");
        }
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
            aligner,
            admin_token,
            metrics,
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
            // Every request counted by route pattern and status (a pattern,
            // not the path, so the label set stays bounded).
            .wrap_fn(|req, srv| {
                let started = std::time::Instant::now();
                let endpoint = req.match_pattern();
                let metrics = req
                    .app_data::<web::Data<AppState>>()
                    .map(|d| d.metrics.clone());
                let response = srv.call(req);
                async move {
                    let response = response.await?;
                    if let Some(m) = metrics {
                        m.http_request(
                            endpoint.as_deref().unwrap_or("other"),
                            response.status(),
                            started.elapsed(),
                        );
                    }
                    Ok(response)
                }
            })
            .configure(routes::configure)
            .configure(admin::configure)
    })
    .shutdown_timeout(cfg.server.shutdown_grace_secs)
    .workers(2)
    .bind((cfg.server.host.as_str(), cfg.server.port))?;
    let addr = server.addrs()[0];
    Ok((server.run(), addr))
}
