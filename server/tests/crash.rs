//! Durability: a child `attune serve` takes feedback from concurrent clients
//! and is killed with SIGKILL mid-stream; after a restart every acknowledged
//! record is present and intact, and the store opens cleanly.

#[path = "common/child.rs"]
mod child;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attune_aligner::Store;
use attune_config::StoreConfig;
use child::ChildServer;
use serde_json::{json, Value};

const CLIENTS: usize = 8;
const COMPLETIONS: usize = 6;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    let mut r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())?;
    let status = r.status().as_u16();
    let v = serde_json::from_str(&r.body_mut().read_to_string()?).unwrap_or(Value::Null);
    Ok((status, v))
}

/// An acknowledged feedback request: what was sent and the id it got.
#[derive(Debug, Clone)]
struct Ack {
    id: String,
    key: String,
    completion: String,
    ranking: Vec<usize>,
}

#[test]
fn every_acknowledged_record_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), &[]);
    let a = agent();
    let completions: Vec<String> = (0..COMPLETIONS)
        .map(|i| {
            let body = json!({
                "model": server.model_name(),
                "messages": [{"role": "user", "content": format!("question {i}")}],
                "max_tokens": 4, "n": 3, "temperature": 1.0,
            });
            let (status, v) = post(&a, &server.url("/v1/chat/completions"), &body).unwrap();
            assert_eq!(status, 200, "{v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();

    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acks, acked, stop) = (acks.clone(), acked.clone(), stop.clone());
            let completions = completions.clone();
            let url = server.url("/v1/feedback");
            std::thread::spawn(move || {
                let agent = agent();
                for i in 0usize.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let completion = completions[(c + i) % COMPLETIONS].clone();
                    let ranking = match (c + i) % 3 {
                        0 => vec![2, 0, 1],
                        1 => vec![0, 1],
                        _ => vec![1, 2, 0],
                    };
                    let key = format!("client{c}-{i}");
                    let body = json!({"completion_id": completion, "ranking": ranking, "idempotency_key": key});
                    match post(&agent, &url, &body) {
                        Ok((200, v)) => {
                            let id = v["id"].as_str().unwrap().to_string();
                            acks.lock().unwrap().push(Ack { id, key, completion, ranking });
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, v)) => panic!("feedback refused with {status}: {v}"),
                        // The server was killed under us.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();

    // Kill while requests are in flight, once a good number were acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = server;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() >= 300, "only {} acknowledged", acks.len());
    eprintln!(
        "{} feedback requests acknowledged before SIGKILL",
        acks.len()
    );

    // The store opens cleanly after the crash.
    {
        let store = Store::open(&StoreConfig {
            path: dir.path().join("store.sqlite3"),
            ..StoreConfig::default()
        })
        .unwrap();
        store.integrity_check().unwrap();
        assert!(store.stats().unwrap().records >= acks.len() as u64);
    }

    // Restarted, the server has every acknowledged record, intact.
    let server = ChildServer::start(dir.path(), &[]);
    let a = agent();
    for ack in &acks {
        let mut r = a
            .get(&server.url(&format!("/v1/feedback/{}", ack.id)))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{} lost", ack.id);
        let rec: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        let got: Vec<(String, usize)> = rec["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["completion_id"].as_str().unwrap().to_string(),
                    c["choice"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let want: Vec<(String, usize)> = ack
            .ranking
            .iter()
            .map(|&i| (ack.completion.clone(), i))
            .collect();
        assert_eq!(got, want, "{} changed", ack.id);
    }
    // Retrying an acknowledged request answers the stored record, not a new one.
    let last = acks.last().unwrap();
    let body = json!({"completion_id": last.completion, "ranking": last.ranking, "idempotency_key": last.key});
    let (status, v) = post(&a, &server.url("/v1/feedback"), &body).unwrap();
    assert_eq!(
        (status, v["id"].as_str(), v["replayed"].as_bool()),
        (200, Some(last.id.as_str()), Some(true))
    );
    // And it takes new feedback.
    let body = json!({"completion_id": completions[0], "ranking": [0, 2]});
    assert_eq!(post(&a, &server.url("/v1/feedback"), &body).unwrap().0, 200);
}
