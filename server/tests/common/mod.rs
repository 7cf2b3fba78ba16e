//! Starting the real server in-process on port 0 over a tiny random model.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use attune_config::Config;
use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{LoadOptions, LoadedModel};
use attune_server::api::{self, AppState};

/// A running in-process server; its model files live as long as it does.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves a tiny model named `tiny` with `cfg` (port and threads overridden).
pub fn start(mut cfg: Config) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let model = Arc::new(LoadedModel::load(&LoadOptions::new(dir.path())).unwrap());
    cfg.server.port = 0;
    cfg.server.model_name = "tiny".into();
    cfg.runtime.threads = 1;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = AppState::start(&cfg, model).unwrap();
            let (server, addr) = api::bind(&cfg, state.clone()).unwrap();
            tx.send((addr, state)).unwrap();
            server.await.unwrap();
        });
    });
    let (addr, state) = rx.recv().unwrap();
    TestServer {
        addr,
        state,
        _dir: dir,
    }
}
