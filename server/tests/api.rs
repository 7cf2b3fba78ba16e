//! The real HTTP server, started in-process on port 0 over a tiny random
//! model, driven by a real HTTP client.

mod common;

use std::sync::Arc;

use attune_config::Config;
use serde_json::{json, Value};

type Server = common::TestServer;
use common::start;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(s: &Server, body: &str) -> (u16, String) {
    let mut r = agent()
        .post(&format!("{}/v1/chat/completions", s.base()))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn chat(extra: Value) -> String {
    let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "the 42"}], "max_tokens": 6});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

#[test]
fn chat_completion_returns_choices_usage_and_an_unguessable_id() {
    let s = start(Config::default());
    let (status, body) = post(
        &s,
        &chat(json!({"n": 2, "temperature": 0.8, "seed": 3, "logprobs": true, "top_logprobs": 2})),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() >= 9 + 32, "{id}");
    let (_, again) = post(
        &s,
        &chat(json!({"n": 2, "temperature": 0.8, "seed": 3, "logprobs": true, "top_logprobs": 2})),
    );
    let w: Value = serde_json::from_str(&again).unwrap();
    assert_ne!(w["id"], v["id"]);
    assert_eq!(w["choices"], v["choices"], "same seed, same output");
}

#[test]
fn streaming_sends_chunks_usage_and_done() {
    let s = start(Config::default());
    let (status, body) = post(
        &s,
        &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, "length");
    // Streamed text equals the non-streamed text for the same greedy request.
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let (_, plain) = post(&s, &chat(json!({"temperature": 0})));
    let (_, streamed) = post(&s, &chat(json!({"temperature": 0, "stream": true})));
    let v: Value = serde_json::from_str(&plain).unwrap();
    let st: String = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), st);
    assert_eq!(text.is_empty(), st.is_empty() && text.is_empty());
}

#[test]
fn bad_requests_get_openai_error_json_with_the_right_status() {
    let mut cfg = Config::default();
    cfg.server.max_body_bytes = 4096;
    let s = start(cfg);
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        (chat(json!({"top_p": 2})), 400, Some("top_p")),
        (
            chat(json!({"temperature": "warm"})),
            400,
            Some("temperature"),
        ),
        (chat(json!({"n": 100})), 400, Some("n")),
        (chat(json!({"max_tokens": 250})), 400, Some("max_tokens")),
        (chat(json!({"model": "gpt-9"})), 404, Some("model")),
        ("[]".into(), 400, None),
        ("".into(), 400, None),
        (
            chat(json!({"messages": [{"role": "user"}]})),
            400,
            Some("messages[0].content"),
        ),
        (
            chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
            400,
            Some("messages[0].role"),
        ),
        (chat(json!({"n": 1e300})), 400, Some("n")),
        (chat(json!({"max_tokens": -5})), 400, Some("max_tokens")),
        (
            chat(json!({"stream_options": 5})),
            400,
            Some("stream_options"),
        ),
        (chat(json!({"top_k": -7})), 400, Some("top_k")),
        (
            chat(json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]})),
            413,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let (got, text) = post(&s, &body);
        assert_eq!(got, status, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{text}"
        );
        assert!(v["error"]["type"].is_string(), "{text}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{text}");
        }
    }
    // prompt + max_tokens over the context names both numbers
    let (_, text) = post(&s, &chat(json!({"max_tokens": 255})));
    assert!(text.contains("255") && text.contains("256"), "{text}");
    // unknown fields and odd-but-valid values are accepted
    assert_eq!(
        post(
            &s,
            &chat(json!({"logit_bias": {"1": 5}, "seed": -1, "stop": "x"}))
        )
        .0,
        200
    );
    // the server still works afterwards
    assert_eq!(post(&s, &chat(json!({}))).0, 200);
}

#[test]
fn health_ready_and_models() {
    let s = start(Config::default());
    let get = |p: &str| {
        let mut r = agent().get(&format!("{}{p}", s.base())).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(get("/health").0, 200);
    assert_eq!(get("/ready").0, 200);
    let (st, body) = get("/v1/models");
    assert_eq!(st, 200);
    assert!(body.contains("\"tiny\""), "{body}");
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_recovers() {
    let mut cfg = Config::default();
    cfg.engine.max_running = 1;
    cfg.engine.max_queue = 1;
    let s = Arc::new(start(cfg));
    let long = chat(json!({"max_tokens": 200, "stop": ["never-appears"]}));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (s, body) = (s.clone(), long.clone());
            std::thread::spawn(move || {
                let r = agent()
                    .post(&format!("{}/v1/chat/completions", s.base()))
                    .header("content-type", "application/json")
                    .send(&body)
                    .unwrap();
                let retry = r.headers().get("retry-after").is_some();
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let results: Vec<(u16, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().any(|r| r.0 == 200), "{results:?}");
    assert!(results.contains(&(429, true)), "{results:?}");
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 429),
        "{results:?}"
    );
    assert_eq!(
        post(&s, &chat(json!({}))).0,
        200,
        "recovers when load drops"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    use std::io::{BufRead, BufReader, Write};
    let s = start(Config::default());
    let addr = s.base().trim_start_matches("http://").to_string();
    let body = chat(
        json!({"max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    );
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the stream ended before its first event"
        );
    }
    let status = s.state.engine.status();
    assert_eq!(status.running.load(std::sync::atomic::Ordering::Relaxed), 1);
    drop(reader);
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    wait_until("the engine drops the cancelled sequence", || {
        status.running.load(std::sync::atomic::Ordering::Relaxed) == 0
    });
    assert_eq!(
        status.cancelled.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the sequence ended by cancellation, not by running out of tokens"
    );
}
