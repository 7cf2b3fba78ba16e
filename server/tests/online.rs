//! The online loop on a tiny model: feedback in the store, an aligner round
//! through the admin API, the served generation changes and moves towards the
//! preferred answers; hot-swaps under streaming load drop nothing and every
//! response is what its named generation produces.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use attune_aligner::data::{Example, Template};
use attune_aligner::eval::evaluate;
use attune_aligner::store::ImportRecord;
use attune_config::Config;
use attune_models::{ChatMessage, LoraAdapter, PromptResponse, SamplingParams};
use common::{agent, direct_chat, get_json, post_text, start_with_aligner, TestServer};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token-0123456789";
const PREFERRED: &str = "Certainly, here is a careful answer.";
const OTHER: &str = "no";

/// The prompts of feedback batch `batch`.
fn prompts(batch: usize) -> Vec<String> {
    (0..8).map(|i| format!("question {batch}-{i}?")).collect()
}

fn aligned_config() -> Config {
    let mut cfg = Config::default();
    cfg.server.admin_token = TOKEN.into();
    cfg.aligner.enabled = true;
    // Rounds only on demand.
    cfg.aligner.interval_secs = 3600;
    cfg.aligner.min_new_records = 1_000_000;
    cfg.aligner.steps_per_round = 12;
    cfg.aligner.batch = 4;
    cfg.aligner.lr = 5e-3;
    cfg.aligner.held_out_percent = 0.0;
    cfg.aligner.max_kl = 50.0;
    cfg.aligner.block_size = 64;
    cfg
}

/// An admin call: status and JSON body.
fn admin(s: &TestServer, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("{}/v1/admin/{path}", s.base());
    let a = agent();
    let mut r = match (method, token) {
        ("GET", Some(t)) => a
            .get(&url)
            .header("authorization", &format!("Bearer {t}"))
            .call(),
        ("GET", None) => a.get(&url).call(),
        (_, Some(t)) => a
            .post(&url)
            .header("authorization", &format!("Bearer {t}"))
            .send_empty(),
        (_, None) => a.post(&url).send_empty(),
    }
    .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn import_preferences(s: &TestServer, batch: usize) {
    let records = prompts(batch)
        .into_iter()
        .map(|p| ImportRecord {
            messages: vec![ChatMessage::new("user", p)],
            responses: vec![PREFERRED.into(), OTHER.into()],
        })
        .collect();
    s.state.store.import_blocking(records, None).unwrap();
}

/// Mean over the prompts of mean log-prob(preferred) − mean log-prob(other)
/// under `lora`.
fn margin(s: &TestServer, lora: Option<&LoraAdapter>) -> f64 {
    let model = &s.state.model;
    let data: Vec<Vec<PromptResponse>> = prompts(0)
        .into_iter()
        .map(|p| {
            Example {
                line: 0,
                messages: vec![ChatMessage::new("user", p)],
                responses: vec![PREFERRED.into(), OTHER.into()],
                raw: None,
            }
            .tokenize(model, Template::Chat)
            .unwrap()
        })
        .collect();
    evaluate(&model.model, lora, &data, 64, 4096, |_, _| {})
        .unwrap()
        .mean_margin()
}

fn fingerprint_of_chat(s: &TestServer) -> String {
    let (status, v) = common::post_json(
        s,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            .to_string(),
    );
    assert_eq!(status, 200, "{v}");
    v["system_fingerprint"].as_str().unwrap().to_string()
}

#[test]
fn a_round_on_feedback_changes_the_served_generation_towards_the_preferred_answers() {
    let s = start_with_aligner(aligned_config());
    import_preferences(&s, 0);
    assert_eq!(fingerprint_of_chat(&s), "attune-base-tiny");
    let before = margin(&s, None);

    // The admin API wants its token.
    assert_eq!(admin(&s, "POST", "aligner/run", None).0, 401);
    let (status, body) = admin(&s, "POST", "aligner/run", Some("wrong-token-wrong-token"));
    assert_eq!(status, 401);
    assert!(body["error"]["message"].is_string(), "{body}");

    let (status, report) = admin(&s, "POST", "aligner/run?wait=true", Some(TOKEN));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "published", "{report}");
    assert_eq!(report["generation"], 1);
    assert_eq!(report["new_records"], 8);
    assert_eq!(report["steps"], 12);

    let active = s.state.registry.active().expect("a generation is active");
    assert_eq!(fingerprint_of_chat(&s), active.fingerprint());
    let after = margin(&s, Some(&active.adapter));
    assert!(
        after > before + 0.05,
        "the preferred answers gained: margin {before:.4} -> {after:.4}"
    );
    // The watermark is durable; a second round has nothing new.
    assert_eq!(s.state.store.watermark().unwrap(), 8);
    let (_, again) = admin(&s, "POST", "aligner/run?wait=true", Some(TOKEN));
    assert_eq!(again["outcome"], "skipped", "{again}");

    // Listing, rollback to the base model, and back.
    let (status, list) = admin(&s, "GET", "generations", Some(TOKEN));
    assert_eq!(status, 200);
    assert_eq!(list["active"], 1);
    assert_eq!(list["data"][0]["metrics"]["outcome"], "published");
    assert_eq!(list["aligner"]["published"], 1);
    assert_eq!(
        admin(&s, "POST", "generations/0/activate", Some(TOKEN)).0,
        200
    );
    assert_eq!(fingerprint_of_chat(&s), "attune-base-tiny");
    let (status, missing) = admin(&s, "POST", "generations/99/activate", Some(TOKEN));
    assert_eq!(status, 404, "{missing}");
    let by_name = format!("generations/{}/activate", active.fingerprint());
    assert_eq!(admin(&s, "POST", &by_name, Some(TOKEN)).0, 200);
    assert_eq!(fingerprint_of_chat(&s), active.fingerprint());

    // Pause and resume answer the aligner's state.
    let (_, paused) = admin(&s, "POST", "aligner/pause", Some(TOKEN));
    assert_eq!(paused["paused"], true);
    let (_, resumed) = admin(&s, "POST", "aligner/resume", Some(TOKEN));
    assert_eq!(resumed["paused"], false);
}

#[test]
fn the_admin_api_is_off_without_a_token() {
    let s = common::start(Config::default());
    let (status, body) = get_json(&s, "/v1/admin/generations");
    assert_eq!(status, 404);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.admin_token"),
        "{body}"
    );
}

/// One streamed response: its fingerprint and text; panics on any failure.
fn stream(s: &TestServer, prompt: &str, seed: u64) -> (String, String) {
    let body = json!({
        "model": "tiny", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12, "temperature": 0.9, "seed": seed, "stream": true,
    });
    let (status, text) = post_text(s, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200);
    let mut fingerprint = None;
    let mut out = String::new();
    let mut done = false;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "a stream failed: {v}");
        let f = v["system_fingerprint"].as_str().unwrap().to_string();
        assert!(
            fingerprint.as_ref().is_none_or(|g| *g == f),
            "one generation per response"
        );
        fingerprint = Some(f);
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(t);
        }
    }
    assert!(done, "the stream ended with [DONE]");
    (fingerprint.unwrap(), out)
}

#[test]
fn hot_swaps_under_streaming_load_drop_nothing_and_serve_each_request_its_generation() {
    let s = Arc::new(start_with_aligner(aligned_config()));
    import_preferences(&s, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || i < 3 {
                    let prompt = format!("client {c} says hello {i}");
                    let seed = c * 1000 + i;
                    let (fingerprint, text) = stream(&s, &prompt, seed);
                    seen.push((prompt, seed, fingerprint, text));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    // Publish, roll back, publish again, roll forward, while clients stream.
    let (_, r1) = admin(&s, "POST", "aligner/run?wait=true", Some(TOKEN));
    assert_eq!(r1["outcome"], "published", "{r1}");
    assert_eq!(
        admin(&s, "POST", "generations/0/activate", Some(TOKEN)).0,
        200
    );
    import_preferences(&s, 1);
    let (_, r2) = admin(&s, "POST", "aligner/run?wait=true", Some(TOKEN));
    assert_eq!(r2["outcome"], "published", "{r2}");
    assert_eq!(
        admin(&s, "POST", "generations/1/activate", Some(TOKEN)).0,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        admin(&s, "POST", "generations/2/activate", Some(TOKEN)).0,
        200
    );
    stop.store(true, Ordering::SeqCst);
    let seen: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("no client failed"))
        .collect();

    // Every response equals generating with its named generation directly.
    let model = &s.state.model;
    let mut adapters: HashMap<String, Option<LoraAdapter>> = HashMap::new();
    adapters.insert("attune-base-tiny".into(), None);
    for g in s.state.registry.list() {
        adapters.insert(g.fingerprint(), Some(g.adapter.clone()));
    }
    let mut by_generation: HashMap<&str, usize> = HashMap::new();
    for (prompt, seed, fingerprint, text) in &seen {
        *by_generation.entry(fingerprint.as_str()).or_default() += 1;
        let adapter = adapters
            .get(fingerprint)
            .unwrap_or_else(|| panic!("unknown fingerprint {fingerprint}"));
        let params = SamplingParams {
            temperature: 0.9,
            seed: Some(*seed),
            ..SamplingParams::default()
        };
        let direct = direct_chat(model, adapter.as_ref(), prompt, params, 12);
        assert_eq!(*text, direct, "{fingerprint}, seed {seed}");
    }
    assert!(
        by_generation.len() >= 2,
        "responses came from several generations: {by_generation:?}"
    );
    eprintln!(
        "{} streamed responses by generation: {by_generation:?}",
        seen.len()
    );
}
