//! Faults of the online loop, on a child `attune serve` over a tiny model:
//! SIGKILL between writing a generation and renaming it into place, a NaN
//! loss, a panic inside a round. Serving answers throughout and nothing
//! half-made is ever served.

#[path = "common/child.rs"]
mod child;

use std::path::Path;
use std::time::{Duration, Instant};

use attune_aligner::store::ImportRecord;
use attune_aligner::Store;
use attune_config::StoreConfig;
use attune_models::{
    ChatMessage, LoadOptions, LoadedModel, LoraAdapter, LoraConfig, LoraInit, Registry,
};
use child::{tiny_model, ChildServer};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token-0123456789";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(url: &str, body: Option<Value>) -> (u16, Value) {
    let req = agent()
        .post(url)
        .header("authorization", &format!("Bearer {TOKEN}"))
        .header("content-type", "application/json");
    let mut r = match body {
        Some(b) => req.send(b.to_string()),
        None => req.send_empty(),
    }
    .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(url: &str) -> Value {
    let mut r = agent()
        .get(url)
        .header("authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

fn store_config(dir: &Path) -> StoreConfig {
    StoreConfig {
        path: dir.join("store.sqlite3"),
        ..StoreConfig::default()
    }
}

/// Eight preference records in the child's store (before it starts).
fn seed_store(dir: &Path) {
    let store = Store::open(&store_config(dir)).unwrap();
    let records = (0..8)
        .map(|i| ImportRecord {
            messages: vec![ChatMessage::new("user", format!("question {i}?"))],
            responses: vec!["A careful, kind answer.".into(), "no".into()],
        })
        .collect();
    store.import_blocking(records, None).unwrap();
}

fn aligner_env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("ATTUNE_ALIGNER__ENABLED", "true"),
        ("ATTUNE_ADMIN_TOKEN", TOKEN),
        ("ATTUNE_ALIGNER__INTERVAL_SECS", "3600"),
        ("ATTUNE_ALIGNER__MIN_NEW_RECORDS", "1000000"),
        ("ATTUNE_ALIGNER__STEPS_PER_ROUND", "2"),
        ("ATTUNE_ALIGNER__HELD_OUT_PERCENT", "0"),
        ("ATTUNE_ALIGNER__MAX_KL", "1000"),
        ("ATTUNE_ALIGNER__BLOCK_SIZE", "64"),
    ];
    env.extend_from_slice(extra);
    env
}

/// A chat's status and `system_fingerprint`.
fn chat(server: &ChildServer) -> (u16, String) {
    let (status, v) = post(
        &server.url("/v1/chat/completions"),
        Some(json!({
            "model": server.model_name(),
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        })),
    );
    (
        status,
        v["system_fingerprint"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn generation_folders(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("adapters/generations"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_kill_between_writing_and_renaming_a_generation_serves_the_previous_one_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Generation 1, published before the server starts.
    let model = LoadedModel::load(&LoadOptions::new(tiny_model(dir.path()))).unwrap();
    let adapter = LoraAdapter::new(
        LoraConfig::default(),
        model.model.config(),
        LoraInit::Random,
        5,
        model.model.device(),
    )
    .unwrap();
    let g1 = Registry::open(
        &dir.path().join("adapters"),
        model.model.config(),
        model.model.device(),
        3,
        "model",
    )
    .unwrap()
    .publish(&adapter, None, json!({}), true)
    .unwrap()
    .fingerprint();
    seed_store(dir.path());

    let marker = dir.path().join("publishing");
    let mut server = ChildServer::start(
        dir.path(),
        &aligner_env(&[("ATTUNE_TEST_PUBLISH_STALL", marker.to_str().unwrap())]),
    );
    assert_eq!(chat(&server), (200, g1.clone()));
    let (status, v) = post(&server.url("/v1/admin/aligner/run"), None);
    assert_eq!(status, 202, "{v}");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the round never reached publishing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "2");
    assert!(generation_folders(dir.path()).contains(&".staging-2".to_string()));
    // Serving answers while the aligner is stuck in the middle of publishing.
    assert_eq!(chat(&server), (200, g1.clone()));
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(server);

    let server = ChildServer::start(dir.path(), &aligner_env(&[]));
    assert_eq!(
        chat(&server),
        (200, g1.clone()),
        "the previous generation is served"
    );
    assert_eq!(generation_folders(dir.path()), vec!["1".to_string()]);
    let list = get(&server.url("/v1/admin/generations"));
    assert_eq!(list["active"], 1, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    drop(server);

    let store = Store::open(&store_config(dir.path())).unwrap();
    store.integrity_check().unwrap();
    assert_eq!(store.preferences_after(0, usize::MAX).unwrap().len(), 8);
    assert_eq!(store.watermark().unwrap(), 0, "the watermark did not move");
}

fn injected_fault_publishes_nothing(fault: &'static str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    seed_store(dir.path());
    let server = ChildServer::start(dir.path(), &aligner_env(&[("ATTUNE_TEST_FAULT", fault)]));
    let (status, report) = post(&server.url("/v1/admin/aligner/run?wait=true"), None);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains(expect), "{reason}");
    assert_eq!(chat(&server), (200, "attune-base-model".to_string()));
    let list = get(&server.url("/v1/admin/generations"));
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    assert_eq!(list["aligner"]["failed"], 1, "{list}");
    // Serving still answers after the failure, and no generation exists.
    assert_eq!(chat(&server).0, 200);
    assert!(generation_folders(dir.path()).is_empty());
    drop(server);
    let store = Store::open(&store_config(dir.path())).unwrap();
    assert_eq!(store.watermark().unwrap(), 0);
}

#[test]
fn a_nan_loss_publishes_nothing_and_serving_answers() {
    injected_fault_publishes_nothing("nan", "NaN");
}

#[test]
fn a_panic_in_a_round_publishes_nothing_and_serving_answers() {
    injected_fault_publishes_nothing("panic", "panic");
}

#[test]
fn a_failed_publish_serves_the_current_generation_and_the_retry_publishes() {
    let dir = tempfile::tempdir().unwrap();
    seed_store(dir.path());
    let server = ChildServer::start(dir.path(), &aligner_env(&[]));
    // The generations folder becomes a file: every write under it fails, as
    // on a full or broken disk.
    let gens = dir.path().join("adapters/generations");
    std::fs::remove_dir_all(&gens).unwrap();
    std::fs::write(&gens, "not a folder").unwrap();
    let (status, report) = post(&server.url("/v1/admin/aligner/run?wait=true"), None);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(
        report["reason"].as_str().unwrap().starts_with("publishing"),
        "{report}"
    );
    assert_eq!(chat(&server), (200, "attune-base-model".to_string()));
    let metrics = agent()
        .get(&server.url("/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains(r#"attune_aligner_round_failures_total{reason="publish"} 1"#),
        "{metrics}"
    );
    drop(server);
    let store = Store::open(&store_config(dir.path())).unwrap();
    assert_eq!(
        store.watermark().unwrap(),
        0,
        "a failed round does not move the watermark"
    );
    drop(store);

    // With the disk back, the same records publish generation 1.
    std::fs::remove_file(&gens).unwrap();
    let server = ChildServer::start(dir.path(), &aligner_env(&[]));
    let (_, report) = post(&server.url("/v1/admin/aligner/run?wait=true"), None);
    assert_eq!(report["outcome"], "published", "{report}");
    assert_eq!(report["generation"], 1, "{report}");
    assert!(chat(&server).1.starts_with("attune-g1-"));
}
