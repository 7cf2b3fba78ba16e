//! `/metrics`: the serving series move with traffic, the aligner's are there
//! with it on, every metric the Grafana dashboard queries is exported, and a
//! real Prometheus server scrapes them.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use attune_config::Config;
use common::{agent, post_json, post_text, start, start_with_aligner, TestServer};
use serde_json::{json, Value};

fn scrape(s: &TestServer) -> String {
    let mut r = agent()
        .get(&format!("{}/metrics", s.base()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.body_mut().read_to_string().unwrap()
}

/// Sample lines (`name{labels} value`) by their full series text.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Metric family names from the `# TYPE` lines.
fn families(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_string(), kind.to_string()))
        })
        .collect()
}

fn chat(s: &TestServer, n: usize, stream: bool) -> Value {
    let body = json!({
        "model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6, "n": n, "temperature": 0.8, "seed": 1, "stream": stream,
    });
    if stream {
        let (status, text) = post_text(s, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200);
        assert!(text.contains("[DONE]"));
        return Value::Null;
    }
    let (status, v) = post_json(s, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    v
}

/// Three completions (one streamed), one bad request and one ranking.
fn traffic(s: &TestServer) {
    let c = chat(s, 2, false);
    chat(s, 1, false);
    chat(s, 1, true);
    let (status, _) = post_json(s, "/v1/chat/completions", r#"{"model": "tiny"}"#);
    assert_eq!(status, 400);
    let (status, v) = post_json(
        s,
        "/v1/feedback",
        &json!({"completion_id": c["id"], "ranking": [1, 0]}).to_string(),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn serving_series_count_the_requests_tokens_latencies_and_feedback() {
    let s = start(Config::default());
    let before = samples(&scrape(&s));
    assert_eq!(before["attune_generated_tokens_total"], 0.0);
    assert_eq!(before["attune_kv_capacity_tokens"], 65536.0);
    traffic(&s);
    let text = scrape(&s);
    let m = samples(&text);
    // 2 + 1 + 1 choices of up to 6 tokens each.
    let generated = m["attune_generated_tokens_total"];
    assert!((4.0..=24.0).contains(&generated), "{generated}");
    assert!(m["attune_prompt_tokens_total"] > 0.0);
    assert_eq!(m["attune_time_to_first_token_seconds_count"], 3.0);
    assert_eq!(m["attune_request_duration_seconds_count"], 3.0);
    assert_eq!(m["attune_queue_time_seconds_count"], 3.0);
    assert!(m["attune_inter_token_latency_seconds_count"] > 0.0);
    assert!(m["attune_engine_step_seconds_count"] > 0.0);
    assert_eq!(
        m[r#"attune_http_requests_total{endpoint="/v1/chat/completions",status="200"}"#],
        3.0
    );
    assert_eq!(
        m[r#"attune_http_requests_total{endpoint="/v1/chat/completions",status="400"}"#],
        1.0
    );
    assert_eq!(m[r#"attune_feedback_records_total{kind="ranking"}"#], 1.0);
    assert_eq!(
        m[r#"attune_generation_feedback_total{generation="0"}"#],
        1.0
    );
    assert_eq!(
        m[r#"attune_generation_requests_total{generation="0"}"#],
        3.0
    );
    assert!(
        m["attune_store_commit_seconds_count"] >= 1.0,
        "commits are timed"
    );
    assert_eq!(m["attune_running_sequences"], 0.0);
    assert_eq!(m["attune_active_generation"], 0.0);
    // No aligner metrics without the aligner.
    assert!(!text.contains("attune_aligner_rounds_total"));
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let mut cfg = Config::default();
    cfg.aligner.enabled = true;
    cfg.aligner.interval_secs = 3600;
    cfg.aligner.min_new_records = 1_000_000;
    let s = start_with_aligner(cfg);
    traffic(&s);
    let text = scrape(&s);
    let exported = families(&text);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/grafana/attune.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 20, "the dashboard has its panels");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("attune_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    let mut missing = Vec::new();
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| exported.get(*base).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        if !exported.contains_key(family) {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    // The dashboard covers what operators watch.
    for wanted in [
        "attune_generated_tokens_total",
        "attune_time_to_first_token_seconds_bucket",
        "attune_kv_used_tokens",
        "attune_aligner_loss",
        "attune_aligner_pairs_filtered_total",
        "attune_aligner_heldout_accuracy",
        "attune_active_generation",
        "attune_generation_swap_seconds_bucket",
        "attune_feedback_records_total",
    ] {
        assert!(used.contains(wanted), "the dashboard queries {wanted}");
    }
}

/// A Prometheus server on loopback; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(binary: &str, target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    // The shipped scrape config, pointed at the test server, scraped every second.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/prometheus.yml"),
    )
    .unwrap()
    .replace("127.0.0.1:8080", &target.to_string())
    .replace("scrape_interval: 5s", "scrape_interval: 1s");
    std::fs::write(&config, shipped).unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Prometheus {
        child,
        port,
        _dir: dir,
    }
}

/// Prometheus's answer to an instant query, as (series labels, value).
fn query(p: &Prometheus, q: &str) -> Option<Vec<(Value, f64)>> {
    let url = format!("http://127.0.0.1:{}/api/v1/query", p.port);
    let mut r = agent().get(&url).query("query", q).call().ok()?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
    let result = v["data"]["result"].as_array()?;
    Some(
        result
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (s["metric"].clone(), value)
            })
            .collect(),
    )
}

#[test]
fn a_real_prometheus_scrapes_the_serving_series_with_nonzero_values() {
    let Some(binary) = prometheus_binary() else {
        assert!(
            std::env::var_os("ATTUNE_REQUIRE_PROMETHEUS").is_none(),
            "prometheus is not on PATH (Debian: apt-get install prometheus)"
        );
        eprintln!("skipped: no prometheus on PATH (Debian: apt-get install prometheus)");
        return;
    };
    let s = start(Config::default());
    traffic(&s);
    let prom = start_prometheus(&binary, s.addr);
    let wanted = [
        "attune_generated_tokens_total",
        "attune_prompt_tokens_total",
        "attune_time_to_first_token_seconds_count",
        "attune_request_duration_seconds_count",
        r#"attune_http_requests_total{endpoint="/v1/chat/completions",status="200"}"#,
        r#"attune_feedback_records_total{kind="ranking"}"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let last: Vec<_> = wanted
            .iter()
            .map(|q| (q, query(&prom, q).and_then(|r| r.first().map(|(_, v)| *v))))
            .collect();
        if last.iter().all(|(_, v)| v.is_some_and(|v| v > 0.0)) {
            eprintln!("Prometheus saw {last:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw them: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The scraped series carry the job of the shipped config, and Prometheus
    // lists attune's series among its metric names.
    let up = query(&prom, r#"up{job="attune"}"#).unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].1, 1.0);
    let url = format!(
        "http://127.0.0.1:{}/api/v1/label/__name__/values",
        prom.port
    );
    let names: Value = serde_json::from_str(
        &agent()
            .get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|n| n.starts_with("attune_"))
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    eprintln!("Prometheus scraped {} attune_ metric names", names.len());
}
