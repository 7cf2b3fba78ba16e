//! The feedback API on the real in-process server: completions are logged,
//! rankings and pairs are stored and read back, bad requests get OpenAI error
//! JSON and leave the store's content unchanged.

mod common;

use attune_config::Config;
use common::{get_json, post_json, start, TestServer};
use serde_json::{json, Value};

fn complete(s: &TestServer, content: &str, n: usize, stream: bool) -> String {
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5, "n": n, "temperature": 1.0, "seed": 1, "stream": stream,
    });
    if stream {
        let (status, v) = post_json(s, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200);
        let text = v.as_str().unwrap();
        let first = text.lines().next().unwrap().strip_prefix("data: ").unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"));
        let chunk: Value = serde_json::from_str(first).unwrap();
        chunk["id"].as_str().unwrap().to_string()
    } else {
        let (status, v) = post_json(s, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    }
}

fn feedback(s: &TestServer, body: Value) -> (u16, Value) {
    post_json(s, "/v1/feedback", &body.to_string())
}

#[test]
fn served_completions_are_logged_and_rankings_and_pairs_refer_to_them() {
    let s = start(Config::default());
    let a = complete(&s, "tell me", 3, false);
    let b = complete(&s, "tell me", 1, true);

    // The completion log holds the prompt as rendered and each choice's tokens.
    let logged = s.state.store.completion(&a).unwrap().unwrap();
    assert_eq!(logged.choices.len(), 3);
    assert!(logged.prompt.contains("tell me"));
    assert!(logged
        .choices
        .iter()
        .all(|c| c.tokens.len() == 5 && c.finish_reason == "length"));
    assert_eq!(logged.params["n"], 3);
    let streamed = s.state.store.completion(&b).unwrap().unwrap();
    assert_eq!(streamed.choices[0].tokens.len(), 5);

    let (status, r) = feedback(&s, json!({"completion_id": a, "ranking": [2, 0, 1]}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (
            r["object"].as_str(),
            r["candidates"].as_u64(),
            r["pairs"].as_u64()
        ),
        (Some("feedback"), Some(3), Some(3))
    );
    let id = r["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("fb-"));
    let (status, rec) = get_json(&s, &format!("/v1/feedback/{id}"));
    assert_eq!(status, 200);
    assert_eq!(
        rec["candidates"][0]["text"].as_str().unwrap(),
        logged.choices[2].text
    );
    assert_eq!(rec["candidates"][0]["choice"], 2);
    assert_eq!(rec["candidates"][0]["generation"], 0);
    assert_eq!(rec["messages"][0]["content"], "tell me");

    let (status, r) = feedback(
        &s,
        json!({"chosen": {"completion_id": b, "choice": 0}, "rejected": {"completion_id": a, "choice": 1}}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["kind"], "pair");

    let (status, st) = get_json(&s, "/v1/feedback/stats");
    assert_eq!(status, 200);
    assert_eq!(
        (
            st["completions"].as_u64(),
            st["records"].as_u64(),
            st["pairs"].as_u64()
        ),
        (Some(2), Some(2), Some(4))
    );
    assert_eq!(st["by_kind"]["ranking"]["records"], 1);
    assert_eq!(st["by_kind"]["pair"]["pairs"], 1);
    assert_eq!(st["by_generation"]["0"]["records"], 2);
}

#[test]
fn bad_feedback_gets_openai_errors_and_leaves_the_store_unchanged() {
    let s = start(Config::default());
    let a = complete(&s, "tell me", 3, false);
    let other = complete(&s, "something else", 2, false);
    let (status, _) = feedback(
        &s,
        json!({"completion_id": a, "ranking": [0, 1], "idempotency_key": "k"}),
    );
    assert_eq!(status, 200);
    let before = s.state.store.content_digest().unwrap();
    let pair = |x: &str, i: usize, y: &str, j: usize| json!({"chosen": {"completion_id": x, "choice": i}, "rejected": {"completion_id": y, "choice": j}});
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (
            json!({"completion_id": "chatcmpl-nope", "ranking": [0, 1]}),
            404,
            Some("completion_id"),
        ),
        (pair(&a, 0, "chatcmpl-nope", 0), 404, Some("completion_id")),
        (json!({"completion_id": a, "ranking": [0, 3]}), 400, None),
        (
            json!({"completion_id": a, "ranking": [1, 1]}),
            400,
            Some("ranking"),
        ),
        (
            json!({"completion_id": a, "ranking": [1]}),
            400,
            Some("ranking"),
        ),
        (
            json!({"completion_id": a, "ranking": []}),
            400,
            Some("ranking"),
        ),
        (
            json!({"completion_id": a, "ranking": [0, -1]}),
            400,
            Some("ranking"),
        ),
        (
            json!({"completion_id": a, "ranking": "0,1"}),
            400,
            Some("ranking"),
        ),
        (json!({"completion_id": a}), 400, Some("ranking")),
        (json!({"ranking": [0, 1]}), 400, Some("completion_id")),
        (pair(&a, 0, &other, 0), 400, None),
        (pair(&a, 1, &a, 1), 400, Some("rejected")),
        (pair(&a, 5, &a, 1), 400, None),
        (
            json!({"chosen": {"completion_id": a}, "rejected": {"completion_id": a, "choice": 1}}),
            400,
            Some("chosen.choice"),
        ),
        (
            json!({"chosen": {"completion_id": a, "choice": 0}}),
            400,
            Some("rejected"),
        ),
        (
            json!({"completion_id": a, "ranking": [0, 1], "chosen": {}}),
            400,
            None,
        ),
        (json!({"hello": 1}), 400, None),
        (json!([1, 2]), 400, None),
        (
            json!({"completion_id": a, "ranking": [1, 0], "idempotency_key": "k"}),
            409,
            Some("idempotency_key"),
        ),
        (
            json!({"completion_id": a, "ranking": [1, 0], "idempotency_key": ""}),
            400,
            Some("idempotency_key"),
        ),
        (
            json!({"completion_id": a, "ranking": [1, 0], "idempotency_key": 7}),
            400,
            Some("idempotency_key"),
        ),
    ];
    for (body, want, param) in cases {
        let (status, e) = feedback(&s, body.clone());
        assert_eq!(status, want, "{body} → {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{e}"
        );
        assert!(e["error"]["type"].is_string(), "{e}");
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{body} → {e}");
        }
    }
    let (status, _) = post_json(&s, "/v1/feedback", "{not json");
    assert_eq!(status, 400);
    let (status, _) = get_json(&s, "/v1/feedback/fb-999");
    assert_eq!(status, 404);
    let (status, _) = get_json(&s, "/v1/feedback/banana");
    assert_eq!(status, 404);
    assert_eq!(s.state.store.content_digest().unwrap(), before);
}

#[test]
fn a_repeated_idempotency_key_is_acknowledged_with_the_same_id_and_stored_once() {
    let s = start(Config::default());
    let a = complete(&s, "tell me", 2, false);
    let body = json!({"completion_id": a, "ranking": [1, 0], "idempotency_key": "retry-1"});
    let (s1, r1) = feedback(&s, body.clone());
    let (s2, r2) = feedback(&s, body);
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r1["id"], r2["id"]);
    assert_eq!(
        (r1["replayed"].as_bool(), r2["replayed"].as_bool()),
        (Some(false), Some(true))
    );
    let (_, st) = get_json(&s, "/v1/feedback/stats");
    assert_eq!(st["records"], 1);
}
