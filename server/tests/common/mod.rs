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

/// Serves a tiny model named `tiny` with `cfg` (port and threads overridden),
/// the aligner off.
pub fn start(mut cfg: Config) -> TestServer {
    cfg.aligner.enabled = false;
    start_with_aligner(cfg)
}

/// [`start`] with the aligner as `cfg` says.
pub fn start_with_aligner(mut cfg: Config) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let model = Arc::new(LoadedModel::load(&LoadOptions::new(dir.path())).unwrap());
    cfg.server.port = 0;
    cfg.server.model_name = "tiny".into();
    cfg.runtime.threads = 1;
    cfg.store.path = dir.path().join("store.sqlite3");
    cfg.adapters.dir = dir.path().join("adapters");
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

/// A client that answers every HTTP status instead of failing on errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs a JSON body; answers the status and the body as text (an SSE stream
/// whole).
pub fn post_text(s: &TestServer, path: &str, body: &str) -> (u16, String) {
    let mut r = agent()
        .post(&format!("{}{path}", s.base()))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap())
}

/// POSTs a JSON body; answers the status and the body as JSON (or as a JSON
/// string when it is not JSON).
pub fn post_json(s: &TestServer, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = post_text(s, path, body);
    (status, parse(text))
}

pub fn get_json(s: &TestServer, path: &str) -> (u16, serde_json::Value) {
    let mut r = agent().get(&format!("{}{path}", s.base())).call().unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, parse(text))
}

fn parse(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// What `model` generates for one user message with `adapter` applied,
/// outside the server: the reference a served response must equal.
pub fn direct_chat(
    model: &LoadedModel,
    adapter: Option<&attune_models::LoraAdapter>,
    user: &str,
    params: attune_models::SamplingParams,
    max_tokens: usize,
) -> String {
    let text = model
        .template
        .render(&[attune_models::ChatMessage::new("user", user)], true)
        .unwrap();
    let ids = model.tokenizer.encode(&text).unwrap();
    let stops = attune_models::StopConditions {
        max_tokens,
        stop: vec![],
        eos_ids: model.tokenizer.eos_ids.clone(),
        context: model.model.max_context(),
    };
    let out = attune_models::generate_batch_adapted(
        &model.model,
        &model.tokenizer,
        adapter,
        vec![(ids, params, stops)],
        |_, _| {},
    )
    .unwrap();
    out.into_iter().next().unwrap().text
}
