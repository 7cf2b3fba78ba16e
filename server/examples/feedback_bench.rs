//! Feedback throughput and commit latency: acknowledged `POST /v1/feedback`
//! requests per second at a given concurrency against the real server (tiny
//! model, real SQLite store on disk), and the store alone, both with each
//! writer waiting on its own commit (concurrency 1, no group commit possible)
//! and with many at once (group commit). Every number comes from this run.
//!
//! cargo run --release -p attune-server --example feedback_bench -- [seconds] [concurrency] [store dir]

use std::sync::Arc;
use std::time::{Duration, Instant};

use attune_aligner::store::{ChoiceRecord, CompletionRecord, FeedbackRequest, NewFeedback};
use attune_aligner::Store;
use attune_config::Config;
use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{ChatMessage, LoadOptions, LoadedModel};
use attune_server::api::{self, AppState};
use serde_json::json;

struct Run {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn report(&mut self, name: &str) -> f64 {
        self.latencies.sort();
        let q = |p: f64| {
            let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1e3
        };
        let rate = self.requests as f64 / self.elapsed.as_secs_f64();
        println!(
            "{name:<34} {:>8.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} requests)",
            rate,
            q(0.50),
            q(0.99),
            self.requests
        );
        rate
    }
}

/// Runs `one` from `threads` threads for `secs`, timing each call.
fn drive(threads: usize, secs: f64, one: impl Fn(usize, usize) + Send + Sync + 'static) -> Run {
    let one = Arc::new(one);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let one = one.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    one(t, i);
                    lat.push(t0.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    Run {
        requests: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).map_or(5.0, |s| s.parse().expect("seconds"));
    let concurrency: usize = args.get(2).map_or(8, |s| s.parse().expect("concurrency"));
    let base = args
        .get(3)
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let tmp = tempfile::tempdir_in(base).unwrap();
    println!(
        "store on {} (synchronous=FULL, WAL); {secs}s per run",
        tmp.path().display()
    );

    // The store alone.
    let mut cfg = Config::default();
    cfg.store.path = tmp.path().join("direct.sqlite3");
    let store = Store::open(&cfg.store).unwrap();
    let record = CompletionRecord {
        id: "c".into(),
        created_ms: 0,
        model: "bench".into(),
        generation: 0,
        messages: vec![ChatMessage::new("user", "q")],
        prompt: "q".into(),
        params: json!({}),
        choices: (0..3)
            .map(|i| ChoiceRecord {
                text: format!("answer {i}"),
                tokens: vec![1, 2, 3],
                finish_reason: "stop".into(),
            })
            .collect(),
    };
    store
        .log_completion(record)
        .unwrap()
        .wait_blocking()
        .unwrap()
        .unwrap();
    let feedback = move |store: &Store| {
        store
            .submit_feedback(NewFeedback {
                request: FeedbackRequest::Ranking {
                    completion_id: "c".into(),
                    ranking: vec![2, 0, 1],
                },
                idempotency_key: None,
            })
            .unwrap()
            .wait_blocking()
            .unwrap()
            .unwrap();
    };
    let s1 = store.clone();
    let single = drive(1, secs, move |_, _| feedback(&s1)).report("store, 1 writer");
    let s8 = store.clone();
    let grouped = drive(concurrency, secs, move |_, _| feedback(&s8))
        .report(&format!("store, {concurrency} writers (group commit)"));
    println!("group commit speed-up: {:.1}x", grouped / single);

    // The whole HTTP path.
    let model_dir = tmp.path().join("model");
    TinyModel::new(TinySpec::default())
        .write_hf(&model_dir)
        .unwrap();
    let model = Arc::new(LoadedModel::load(&LoadOptions::new(&model_dir)).unwrap());
    cfg.store.path = tmp.path().join("server.sqlite3");
    cfg.server.port = 0;
    cfg.server.model_name = "tiny".into();
    cfg.runtime.threads = 1;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = AppState::start(&cfg, model).unwrap();
            let (server, addr) = api::bind(&cfg, state).unwrap();
            tx.send(addr).unwrap();
            server.await.unwrap();
        })
    });
    let addr = rx.recv().unwrap();
    let mut r = ureq::post(&format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "n": 3, "max_tokens": 4}).to_string())
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let url = format!("http://{addr}/v1/feedback");
    let agents: Vec<ureq::Agent> = (0..concurrency)
        .map(|_| ureq::Agent::new_with_defaults())
        .collect();
    let http = drive(concurrency, secs, move |t, i| {
        let body = json!({"completion_id": id, "ranking": [2, 0, 1], "idempotency_key": format!("{t}-{i}")});
        let r = agents[t]
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    })
    .report(&format!("HTTP, {concurrency} clients"));
    println!("HTTP / store alone: {:.2}", http / grouped);
}
