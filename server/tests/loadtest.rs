//! attune-loadtest against the real server in-process over a tiny model:
//! closed and open loop, streaming and not, feedback traffic that lands in
//! the store, and errors counted by status.

mod common;

use std::time::Duration;

use attune_config::Config;
use attune_loadtest::{run, LoadConfig, Mode};
use common::start;

fn load(base: String, mode: Mode, requests: usize) -> LoadConfig {
    LoadConfig {
        base,
        model: "tiny".into(),
        prompts: attune_loadtest::prompts::built_in(),
        mode,
        requests: Some(requests),
        duration: Some(Duration::from_secs(120)),
        max_tokens: 8,
        temperature: 0.8,
        stream: true,
        feedback_share: 0.0,
        seed: 7,
        extra: Default::default(),
        timeout: Duration::from_secs(60),
        progress: false,
    }
}

#[test]
fn a_closed_loop_with_feedback_measures_every_request_and_stores_the_feedback() {
    let s = start(Config::default());
    let mut cfg = load(s.base(), Mode::Closed { concurrency: 3 }, 12);
    cfg.feedback_share = 0.5;
    let r = run(&cfg);
    assert_eq!(r.requests_ok, 12, "{}", r.table());
    assert_eq!(r.requests_failed, 0, "{:?}", r.errors);
    assert!(r.generated_tokens >= 12, "{}", r.generated_tokens);
    let ttft = r.ttft.expect("streamed requests have a TTFT");
    assert_eq!(ttft.count, 12);
    let e2e = r.e2e.unwrap();
    assert!(e2e.p50 >= ttft.p50 && e2e.max >= e2e.p99 && e2e.p99 >= e2e.p50);
    assert!(r.itl.is_some());
    assert!(r.generated_tok_per_s > 0.0 && r.requests_per_s > 0.0);
    // Feedback went to about half of them, and every one was stored.
    assert!(
        r.feedback.sent > 0 && r.feedback.sent < 12,
        "{:?}",
        r.feedback
    );
    assert_eq!(r.feedback.ok, r.feedback.sent, "{:?}", r.feedback.errors);
    let stats = s.state.store.stats().unwrap();
    assert_eq!(stats.records as usize, r.feedback.ok);
    assert_eq!(stats.completions, 12);
    let table = r.table();
    assert!(
        table.contains("ttft") && table.contains("12 ok, 0 failed"),
        "{table}"
    );
}

#[test]
fn an_open_loop_without_streaming_and_a_wrong_model_report_status_counts() {
    let s = start(Config::default());
    let mut cfg = load(
        s.base(),
        Mode::Open {
            rate: 20.0,
            max_in_flight: 16,
        },
        6,
    );
    cfg.stream = false;
    let r = run(&cfg);
    assert_eq!(r.requests_ok, 6, "{:?}", r.errors);
    assert!(r.ttft.is_none(), "no TTFT without streaming");
    assert_eq!(r.e2e.unwrap().count, 6);

    cfg.model = "not-this-one".into();
    let r = run(&cfg);
    assert_eq!(r.requests_ok, 0);
    assert_eq!(r.errors.get("404"), Some(&6), "{:?}", r.errors);
    // The JSON report has the same numbers.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["errors"]["404"], 6);
}
