//! One chat completion against an OpenAI-compatible server, timed: the time
//! to the first token, the gaps between tokens (streaming), the end-to-end
//! latency, and the completion tokens; optionally followed by attune's
//! preference feedback on its two choices.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What one request should look like.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// `…/v1/chat/completions`.
    pub url: String,
    pub model: String,
    pub prompt: String,
    pub max_tokens: usize,
    pub temperature: f64,
    pub stream: bool,
    /// Choices to ask for (`n`).
    pub n: usize,
    pub seed: Option<u64>,
    /// Fields merged into every request body (e.g. a server's own options).
    pub extra: serde_json::Map<String, Value>,
}

/// How a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The server answered with this HTTP status.
    Status(u16),
    /// No HTTP answer: connection refused or reset, a timeout.
    Transport(String),
    /// A 200 whose body was not what the API promises (or an error event
    /// inside a stream).
    Protocol(String),
}

impl Failure {
    /// A short key to group failures by in the report.
    pub fn key(&self) -> String {
        match self {
            Failure::Status(s) => s.to_string(),
            Failure::Transport(_) => "transport".into(),
            Failure::Protocol(_) => "protocol".into(),
        }
    }
}

/// The timings of one successful request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timing {
    /// Seconds from sending to the first content token (streaming only).
    pub ttft: Option<f64>,
    /// Seconds between consecutive content tokens (streaming only).
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    /// The completion's `id` (what feedback refers to).
    pub id: String,
    pub choices: usize,
}

pub fn agent(timeout: Duration, pool: usize) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_idle_connections(pool.max(1) * 2)
        .max_idle_connections_per_host(pool.max(1) * 2)
        .build()
        .into()
}

fn body(spec: &RequestSpec) -> Value {
    let mut b = json!({
        "model": spec.model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": spec.stream,
    });
    if spec.n > 1 {
        b["n"] = json!(spec.n);
    }
    if let Some(seed) = spec.seed {
        b["seed"] = json!(seed);
    }
    if spec.stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    for (k, v) in &spec.extra {
        b[k] = v.clone();
    }
    b
}

fn transport(e: impl std::fmt::Display) -> Failure {
    Failure::Transport(e.to_string())
}

/// Sends one chat completion and times it.
pub fn chat(agent: &ureq::Agent, spec: &RequestSpec) -> Result<Timing, Failure> {
    let start = Instant::now();
    let mut response = agent
        .post(&spec.url)
        .header("content-type", "application/json")
        .send(body(spec).to_string())
        .map_err(transport)?;
    let status = response.status().as_u16();
    if status != 200 {
        // Drain the body so the connection can be reused.
        let _ = response.body_mut().read_to_string();
        return Err(Failure::Status(status));
    }
    if !spec.stream {
        let text = response.body_mut().read_to_string().map_err(transport)?;
        let e2e = start.elapsed().as_secs_f64();
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Failure::Protocol(format!("the body is not JSON: {e}")))?;
        let choices = v["choices"].as_array().map_or(0, Vec::len);
        if choices == 0 {
            return Err(Failure::Protocol("no choices".into()));
        }
        return Ok(Timing {
            ttft: None,
            itl: Vec::new(),
            e2e,
            completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            id: v["id"].as_str().unwrap_or_default().to_string(),
            choices,
        });
    }
    let mut timing = Timing::default();
    let mut last_token: Option<Instant> = None;
    let mut tokens_seen = 0usize;
    let mut usage_tokens = None;
    let mut done = false;
    let mut choices = std::collections::BTreeSet::new();
    let reader = BufReader::new(response.body_mut().as_reader());
    for line in reader.lines() {
        let line = line.map_err(transport)?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Failure::Protocol(format!("an event is not JSON: {e}")))?;
        if let Some(err) = v.get("error") {
            return Err(Failure::Protocol(format!("error event: {err}")));
        }
        if timing.id.is_empty() {
            timing.id = v["id"].as_str().unwrap_or_default().to_string();
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            usage_tokens = u["completion_tokens"].as_u64().map(|t| t as usize);
            timing.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            choices.insert(c["index"].as_u64().unwrap_or(0));
            // Each chunk with content is one token (servers may stream empty
            // text for a token whose bytes are held back).
            if c["delta"]["content"].is_string() {
                let now = Instant::now();
                match last_token {
                    None => timing.ttft = Some((now - start).as_secs_f64()),
                    Some(t) => timing.itl.push((now - t).as_secs_f64()),
                }
                last_token = Some(now);
                tokens_seen += 1;
            }
        }
    }
    if !done {
        return Err(Failure::Protocol("the stream ended before [DONE]".into()));
    }
    timing.e2e = start.elapsed().as_secs_f64();
    timing.completion_tokens = usage_tokens.unwrap_or(tokens_seen);
    timing.choices = choices.len();
    Ok(timing)
}

/// attune's `POST /v1/feedback` ranking the choices of completion `id`;
/// answers the seconds it took.
pub fn feedback(
    agent: &ureq::Agent,
    base: &str,
    id: &str,
    ranking: &[usize],
) -> Result<f64, Failure> {
    let start = Instant::now();
    let mut r = agent
        .post(&format!("{base}/v1/feedback"))
        .header("content-type", "application/json")
        .send(json!({"completion_id": id, "ranking": ranking}).to_string())
        .map_err(transport)?;
    let status = r.status().as_u16();
    let _ = r.body_mut().read_to_string();
    if status != 200 {
        return Err(Failure::Status(status));
    }
    Ok(start.elapsed().as_secs_f64())
}
