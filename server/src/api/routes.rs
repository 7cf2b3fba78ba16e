//! Route handlers: `/v1/chat/completions` (JSON and SSE), `/v1/models`,
//! `/health`, `/ready`. Every completion served is logged to the preference
//! store before its response ends, so feedback can name it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use attune_aligner::store::{ChoiceRecord, CompletionRecord};
use attune_models::registry::fingerprint;
use attune_models::{FinishReason, TokenLogprob};
use futures_util::stream;
use serde_json::{json, Value};

use super::error::ApiError;
use super::validate::{chat_request, ValidChatRequest};
use super::AppState;
use crate::engine::{EngineEvent, GenerateRequest, SubmitError};
use crate::metrics::Metrics;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/models", web::get().to(models))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .configure(super::feedback::configure);
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !state.engine.status().alive.load(Ordering::Acquire) {
        return Err(ApiError::unavailable("The engine is not running"));
    }
    Ok(HttpResponse::Ok().json(json!({"status": "ready", "model": state.model_name})))
}

/// Prometheus text exposition of every metric.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let body = state.metrics.render(
        state.engine.status(),
        &state.registry,
        state.aligner.as_ref().map(|a| a.status()),
    );
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "attune"}],
    }))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 128 random bits: the id is the handle for feedback, so it must not be guessable.
fn completion_id() -> String {
    format!("chatcmpl-{:032x}", rand::random::<u128>())
}

fn logprob_json(state: &AppState, lp: &TokenLogprob) -> Value {
    let tok = |id: u32| {
        state
            .model
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
    };
    let entry = |id: u32, l: f32| {
        let t = tok(id);
        json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
    };
    let mut e = entry(lp.token, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
    e
}

struct Prepared {
    request: GenerateRequest,
    prompt_tokens: usize,
    /// The prompt as the chat template rendered it.
    prompt_text: String,
}

fn prepare(state: &AppState, req: &ValidChatRequest) -> Result<Prepared, ApiError> {
    let text = state
        .model
        .template
        .render(&req.messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = state
        .model
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let context = state.limits.context;
    let room = context.saturating_sub(prompt.len());
    let max_tokens = match req.max_tokens {
        Some(m) if prompt.len() + m > context => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "The prompt has {} tokens and `max_tokens` is {m}: together more than the model's context of {context} tokens",
                    prompt.len()
                ),
            ))
        }
        Some(m) => m,
        None if room == 0 => {
            return Err(ApiError::invalid(
                "messages",
                format!("The prompt has {} tokens, which fills the model's context of {context} tokens", prompt.len()),
            ))
        }
        None => room.min(state.limits.default_max_tokens),
    };
    Ok(Prepared {
        prompt_tokens: prompt.len(),
        prompt_text: text,
        request: GenerateRequest {
            prompt,
            params: req.params.clone(),
            max_tokens,
            stop: req.stop.clone(),
            n: req.n,
            // Pinned now: the request keeps this generation to its last token.
            generation: state.registry.active(),
        },
    })
}

/// Reads the body, stopping with 413 as soon as it passes the limit.
pub(super) async fn read_body(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("Cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn chat_completions(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let body = read_body(payload, state.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    let req = chat_request(&value, &state.limits)?;
    let prepared = prepare(&state, &req)?;
    let prompt_tokens = prepared.prompt_tokens;
    let id = completion_id();
    let transcript = Transcript::new(&state, &req, &id, &prepared);
    let meta = Meta {
        id,
        created: unix_now(),
        model: state.model_name.clone(),
        fingerprint: fingerprint(prepared.request.generation.as_deref(), &state.model_name),
        prompt_tokens,
    };
    let clock = Clock::new(arrived, req.n, transcript.record.generation as u64);
    let events = state.engine.submit(prepared.request).map_err(|e| match e {
        SubmitError::QueueFull => {
            state.metrics.serving.rejected.inc();
            ApiError::overloaded()
        }
        SubmitError::Stopped => ApiError::unavailable("The engine has stopped"),
    })?;
    if req.stream {
        Ok(stream_response(
            state.into_inner(),
            req,
            meta,
            events,
            (transcript, clock),
        ))
    } else {
        collect_response(&state, &req, meta, events, (transcript, clock)).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    prompt_tokens: usize,
}

#[derive(Default, Clone)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<Value>,
    finish: Option<FinishReason>,
    tokens: usize,
}

async fn collect_response(
    state: &AppState,
    req: &ValidChatRequest,
    meta: Meta,
    mut events: tokio::sync::mpsc::Receiver<EngineEvent>,
    (mut transcript, mut clock): (Transcript, Clock),
) -> Result<HttpResponse, ApiError> {
    let mut choices = vec![ChoiceAcc::default(); req.n];
    while choices.iter().any(|c| c.finish.is_none()) {
        match events.recv().await {
            Some(EngineEvent::Token {
                choice,
                token,
                text,
                logprob,
            }) => {
                clock.token(&state.metrics, choice);
                transcript.token(choice, token, &text);
                let c = &mut choices[choice];
                c.text.push_str(&text);
                if let Some(lp) = logprob {
                    c.logprobs.push(logprob_json(state, &lp));
                }
            }
            Some(EngineEvent::Finished {
                choice,
                reason,
                completion_tokens,
            }) => {
                transcript.finish(choice, reason);
                choices[choice].finish = Some(reason);
                choices[choice].tokens = completion_tokens;
            }
            Some(EngineEvent::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("The engine dropped the request")),
        }
    }
    transcript.log(state).await;
    clock.done(&state.metrics);
    let completion_tokens: usize = choices.iter().map(|c| c.tokens).sum();
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": if req.logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                "finish_reason": c.finish.map(FinishReason::as_str),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": choices,
        "usage": {
            "prompt_tokens": meta.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": meta.prompt_tokens + completion_tokens,
        },
    })))
}

fn chunk_json(meta: &Meta, choices: Value) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": choices,
    })
}

/// One SSE event carrying a chunk.
fn chunk(meta: &Meta, choices: Value) -> String {
    format!("data: {}\n\n", chunk_json(meta, choices))
}

/// State of an SSE stream between events.
struct StreamState {
    app: std::sync::Arc<AppState>,
    events: tokio::sync::mpsc::Receiver<EngineEvent>,
    meta: Meta,
    started: Vec<bool>,
    finished: usize,
    n: usize,
    completion_tokens: usize,
    include_usage: bool,
    logprobs: bool,
    done: bool,
    transcript: Option<Transcript>,
    clock: Clock,
}

fn stream_response(
    app: std::sync::Arc<AppState>,
    req: ValidChatRequest,
    meta: Meta,
    events: tokio::sync::mpsc::Receiver<EngineEvent>,
    (transcript, clock): (Transcript, Clock),
) -> HttpResponse {
    let st = StreamState {
        app,
        events,
        meta,
        started: vec![false; req.n],
        finished: 0,
        n: req.n,
        completion_tokens: 0,
        include_usage: req.include_usage,
        logprobs: req.logprobs,
        done: false,
        transcript: Some(transcript),
        clock,
    };
    // Dropping this stream (client gone) drops the receiver: the engine cancels.
    let body = stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let out = match st.events.recv().await {
            Some(EngineEvent::Token {
                choice,
                token,
                text,
                logprob,
            }) => {
                st.clock.token(&st.app.metrics, choice);
                if let Some(t) = &mut st.transcript {
                    t.token(choice, token, &text);
                }
                let mut delta = json!({"content": text});
                if !st.started[choice] {
                    st.started[choice] = true;
                    delta["role"] = json!("assistant");
                }
                let lp = match (&logprob, st.logprobs) {
                    (Some(lp), true) => json!({"content": [logprob_json(&st.app, lp)]}),
                    _ => Value::Null,
                };
                chunk(
                    &st.meta,
                    json!([{"index": choice, "delta": delta, "logprobs": lp, "finish_reason": null}]),
                )
            }
            Some(EngineEvent::Finished {
                choice,
                reason,
                completion_tokens,
            }) => {
                st.finished += 1;
                st.completion_tokens += completion_tokens;
                if let Some(t) = &mut st.transcript {
                    t.finish(choice, reason);
                }
                let mut s = chunk(
                    &st.meta,
                    json!([{"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}]),
                );
                if st.finished == st.n {
                    // Logged before `[DONE]`: a client that saw the end can give feedback.
                    if let Some(t) = st.transcript.take() {
                        t.log(&st.app).await;
                    }
                    st.clock.done(&st.app.metrics);
                    if st.include_usage {
                        let mut usage = chunk_json(&st.meta, json!([]));
                        usage["usage"] = json!({
                            "prompt_tokens": st.meta.prompt_tokens,
                            "completion_tokens": st.completion_tokens,
                            "total_tokens": st.meta.prompt_tokens + st.completion_tokens,
                        });
                        s.push_str(&format!("data: {usage}\n\n"));
                    }
                    s.push_str("data: [DONE]\n\n");
                    st.done = true;
                }
                s
            }
            Some(EngineEvent::Failed { message }) => {
                st.done = true;
                ApiError::internal(message).sse_event()
            }
            None => {
                st.done = true;
                ApiError::internal("The engine dropped the request").sse_event()
            }
        };
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(out)), st))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// Latency of one request as the client sees it: arrival to first token,
/// between tokens of each choice, arrival to the end. One `Instant::now()`
/// and a few atomic adds per token.
struct Clock {
    arrived: Instant,
    first_seen: bool,
    last: Vec<Option<Instant>>,
    generation: u64,
}

impl Clock {
    fn new(arrived: Instant, n: usize, generation: u64) -> Self {
        Self {
            arrived,
            first_seen: false,
            last: vec![None; n],
            generation,
        }
    }

    fn token(&mut self, metrics: &Metrics, choice: usize) {
        let m = &metrics.serving;
        if !m.enabled {
            return;
        }
        let now = Instant::now();
        if !self.first_seen {
            self.first_seen = true;
            m.ttft.observe((now - self.arrived).as_secs_f64());
            metrics.first_token(self.generation);
        }
        if let Some(last) = self.last[choice] {
            m.itl.observe((now - last).as_secs_f64());
        }
        self.last[choice] = Some(now);
    }

    fn done(&self, metrics: &Metrics) {
        if metrics.serving.enabled {
            metrics
                .serving
                .e2e
                .observe(self.arrived.elapsed().as_secs_f64());
            metrics.served_by(self.generation);
        }
    }
}

/// The completion as served, collected for the completion log.
struct Transcript {
    record: CompletionRecord,
}

impl Transcript {
    fn new(state: &AppState, req: &ValidChatRequest, id: &str, prepared: &Prepared) -> Self {
        let p = &req.params;
        let params = json!({
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "min_p": p.min_p,
            "repetition_penalty": p.repetition_penalty,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "seed": p.seed,
            "max_tokens": prepared.request.max_tokens,
            "n": req.n,
            "stop": req.stop,
        });
        let choice = ChoiceRecord {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: String::new(),
        };
        Self {
            record: CompletionRecord {
                id: id.to_string(),
                created_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
                model: state.model_name.clone(),
                generation: prepared.request.generation.as_ref().map_or(0, |g| g.number),
                messages: req.messages.clone(),
                prompt: prepared.prompt_text.clone(),
                params,
                choices: vec![choice; req.n],
            },
        }
    }

    fn token(&mut self, choice: usize, token: u32, text: &str) {
        let c = &mut self.record.choices[choice];
        c.tokens.push(token);
        c.text.push_str(text);
    }

    fn finish(&mut self, choice: usize, reason: FinishReason) {
        self.record.choices[choice].finish_reason = reason.as_str().to_string();
    }

    /// Logs and waits for the commit. A failure is logged, not returned: the
    /// client still gets the completion, though feedback on it will be refused.
    async fn log(self, state: &AppState) {
        let id = self.record.id.clone();
        let result = match state.store.log_completion(self.record) {
            Ok(pending) => pending.wait().await.and_then(|r| r),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(completion = %id, error = %e, "completion not logged");
        }
    }
}
