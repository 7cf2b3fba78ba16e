//! Adapter generations in serving: each request is pinned to the generation
//! active when it arrived, responses and the completion log name it, and what
//! it serves equals generating with that adapter directly.

mod common;

use attune_config::Config;
use attune_models::{LoraAdapter, LoraConfig, LoraInit, SamplingParams};
use common::{direct_chat, get_json, post_json, start};
use serde_json::json;

fn chat(s: &common::TestServer, n: usize) -> serde_json::Value {
    let body = json!({
        "model": "tiny", "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 8, "temperature": 0, "n": n, "logprobs": true,
    });
    let (status, v) = post_json(s, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn requests_are_served_by_the_active_generation_and_name_it() {
    let s = start(Config::default());
    let base = chat(&s, 1);
    assert_eq!(base["system_fingerprint"], "attune-base-tiny");

    let model = &s.state.model;
    let adapter = LoraAdapter::new(
        LoraConfig {
            alpha: 64.0,
            targets: attune_models::LoraTarget::ALL.to_vec(),
            ..LoraConfig::default()
        },
        model.model.config(),
        LoraInit::Random,
        3,
        model.model.device(),
    )
    .unwrap();
    let g = s
        .state
        .registry
        .publish(&adapter, None, json!({}), true)
        .unwrap();
    let adapted = chat(&s, 2);
    assert_eq!(adapted["system_fingerprint"], g.fingerprint());
    let text = adapted["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let first_logprob = |v: &serde_json::Value| {
        v["choices"][0]["logprobs"]["content"][0]["logprob"]
            .as_f64()
            .unwrap()
    };
    assert!(
        (first_logprob(&adapted) - first_logprob(&base)).abs() > 1e-3,
        "the adapter changes the output"
    );

    // The same tokens as generating with the generation's adapter directly.
    let direct = direct_chat(
        model,
        Some(&g.adapter),
        "tell me",
        SamplingParams::greedy(),
        8,
    );
    assert_eq!(text, direct);

    // The completion log and feedback stats name the generation.
    let id = adapted["id"].as_str().unwrap();
    assert_eq!(s.state.store.completion(id).unwrap().unwrap().generation, 1);
    let (status, _) = post_json(
        &s,
        "/v1/feedback",
        &json!({"completion_id": id, "ranking": [1, 0]}).to_string(),
    );
    assert_eq!(status, 200);
    let (_, stats) = get_json(&s, "/v1/feedback/stats");
    assert_eq!(stats["by_generation"]["1"]["records"], 1);

    // Rolling back to the base model serves the base model again.
    s.state.registry.activate(0).unwrap();
    let again = chat(&s, 1);
    assert_eq!(again["system_fingerprint"], "attune-base-tiny");
    assert_eq!(
        again["choices"][0]["message"]["content"],
        base["choices"][0]["message"]["content"]
    );
    assert!((first_logprob(&again) - first_logprob(&base)).abs() < 1e-6);
}
