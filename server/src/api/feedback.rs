//! The feedback API: `POST /v1/feedback` (a ranking of one completion's
//! choices, or a pair across completions of one prompt), `GET
//! /v1/feedback/stats`, `GET /v1/feedback/{id}`. A 200 means the record is
//! committed to disk.

use actix_web::{web, HttpRequest, HttpResponse};
use attune_aligner::store::{
    ChoiceRef, FeedbackRequest, NewFeedback, PreferenceRecord, StoreError, StoreStats,
};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::AppState;

/// Record ids on the wire: `fb-<n>`.
const ID_PREFIX: &str = "fb-";
const MAX_KEY_LEN: usize = 255;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/feedback", web::post().to(submit))
        .route("/v1/feedback/stats", web::get().to(stats))
        .route("/v1/feedback/{id}", web::get().to(get));
}

fn index(v: &Value, param: &str) -> Result<usize, ApiError> {
    v.as_u64().map(|i| i as usize).ok_or_else(|| {
        ApiError::invalid(
            param,
            format!("`{param}` must be a non-negative integer, got {v}"),
        )
    })
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str, param: &str) -> Result<&'a str, ApiError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(ApiError::invalid(
            param,
            format!("`{param}` must not be empty"),
        )),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a string, got {other}"),
        )),
        None => Err(ApiError::invalid(param, format!("`{param}` is required"))),
    }
}

fn choice_ref(obj: &Map<String, Value>, key: &str) -> Result<ChoiceRef, ApiError> {
    let inner = match obj.get(key) {
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ApiError::invalid(
                key,
                format!("`{key}` must be an object with `completion_id` and `choice`, got {other}"),
            ))
        }
        None => return Err(ApiError::invalid(key, format!("`{key}` is required"))),
    };
    let choice_param = format!("{key}.choice");
    let choice = match inner.get("choice") {
        Some(v) => index(v, &choice_param)?,
        None => {
            return Err(ApiError::invalid(
                &choice_param,
                format!("`{choice_param}` is required"),
            ))
        }
    };
    Ok(ChoiceRef {
        completion_id: string(inner, "completion_id", &format!("{key}.completion_id"))?.to_string(),
        choice,
    })
}

/// Raw feedback JSON → a request whose shape is valid. What only the store can
/// check (ids exist, choices in range, same prompt) it checks, atomically.
fn feedback_request(value: &Value, header_key: Option<&str>) -> Result<NewFeedback, ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object"))?;
    let is_ranking = obj.contains_key("ranking") || obj.contains_key("completion_id");
    let is_pair = obj.contains_key("chosen") || obj.contains_key("rejected");
    let request = match (is_ranking, is_pair) {
        (true, true) => {
            return Err(ApiError::bad_request(
                "Give either `completion_id` with `ranking`, or `chosen` with `rejected`, not both",
            ))
        }
        (false, false) => return Err(ApiError::bad_request(
            "Give either `completion_id` with `ranking` (best first), or `chosen` and `rejected`",
        )),
        (true, false) => {
            let completion_id = string(obj, "completion_id", "completion_id")?.to_string();
            let ranking = match obj.get("ranking") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| index(v, "ranking"))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "ranking",
                        format!("`ranking` must be an array of choice indices, got {other}"),
                    ))
                }
                None => return Err(ApiError::invalid("ranking", "`ranking` is required")),
            };
            if ranking.len() < 2 {
                return Err(ApiError::invalid(
                    "ranking",
                    format!(
                        "`ranking` must name at least two choices, got {}",
                        ranking.len()
                    ),
                ));
            }
            if let Some((i, c)) = ranking
                .iter()
                .enumerate()
                .find(|(i, c)| ranking[..*i].contains(c))
            {
                return Err(ApiError::invalid(
                    "ranking",
                    format!(
                        "`ranking` names choice {c} twice (at positions {} and {i})",
                        ranking.iter().position(|x| x == c).unwrap_or(0)
                    ),
                ));
            }
            FeedbackRequest::Ranking {
                completion_id,
                ranking,
            }
        }
        (false, true) => {
            let chosen = choice_ref(obj, "chosen")?;
            let rejected = choice_ref(obj, "rejected")?;
            if chosen == rejected {
                return Err(ApiError::invalid(
                    "rejected",
                    "`chosen` and `rejected` name the same choice",
                ));
            }
            FeedbackRequest::Pair { chosen, rejected }
        }
    };
    let body_key = match obj.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KEY_LEN => Some(k.as_str()),
        Some(other) => {
            return Err(ApiError::invalid(
                "idempotency_key",
                format!(
                    "`idempotency_key` must be a string of 1 to {MAX_KEY_LEN} bytes, got {other}"
                ),
            ))
        }
    };
    let idempotency_key = match (body_key, header_key) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::invalid(
                "idempotency_key",
                "`idempotency_key` and the Idempotency-Key header differ",
            ))
        }
        (b, h) => b.or(h).map(String::from),
    };
    Ok(NewFeedback {
        request,
        idempotency_key,
    })
}

async fn submit(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = super::routes::read_body(payload, state.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    let header_key = match http.headers().get("Idempotency-Key") {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "idempotency_key",
                        format!("The Idempotency-Key header must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
                    )
                })?,
        ),
    };
    let feedback = feedback_request(&value, header_key)?;
    let kind = feedback.request.kind();
    let receipt = state.store.submit_feedback(feedback)?.wait().await??;
    if !receipt.replayed && state.metrics.serving.enabled {
        state
            .metrics
            .serving
            .feedback
            .with_label_values(&[kind.as_str()])
            .inc();
        for g in &receipt.generations {
            state.metrics.feedback_on(*g);
        }
    }
    Ok(HttpResponse::Ok().json(json!({
        "id": format!("{ID_PREFIX}{}", receipt.id),
        "object": "feedback",
        "created": receipt.created_ms / 1000,
        "kind": kind,
        "candidates": receipt.candidates,
        "pairs": receipt.candidates * (receipt.candidates - 1) / 2,
        "replayed": receipt.replayed,
    })))
}

fn record_json(r: &PreferenceRecord) -> Value {
    json!({
        "id": format!("{ID_PREFIX}{}", r.id),
        "object": "feedback",
        "kind": r.kind,
        "created": r.created_ms / 1000,
        "messages": r.messages,
        "candidates": r.candidates.iter().enumerate().map(|(rank, c)| json!({
            "rank": rank,
            "text": c.text,
            "completion_id": c.served.as_ref().map(|s| &s.completion_id),
            "choice": c.served.as_ref().map(|s| s.choice),
            "generation": c.generation,
        })).collect::<Vec<_>>(),
        "source": r.source,
    })
}

/// Runs a store read off the async workers.
async fn read<T: Send + 'static>(
    state: &web::Data<AppState>,
    f: impl FnOnce(&attune_aligner::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    web::block(move || f(&store))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::from)
}

async fn get(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let not_found = || {
        ApiError::not_found(
            "id",
            format!("No feedback record `{id}`"),
            "feedback_not_found",
        )
    };
    let n: i64 = id
        .strip_prefix(ID_PREFIX)
        .and_then(|n| n.parse().ok())
        .ok_or_else(not_found)?;
    match read(&state, move |s| s.feedback(n)).await? {
        Some(r) => Ok(HttpResponse::Ok().json(record_json(&r))),
        None => Err(not_found()),
    }
}

fn stats_json(s: &StoreStats) -> Value {
    let by_kind: Map<String, Value> = s
        .by_kind
        .iter()
        .map(|k| {
            (
                k.kind.as_str().to_string(),
                json!({"records": k.records, "pairs": k.pairs}),
            )
        })
        .collect();
    let by_generation: Map<String, Value> = s
        .by_generation
        .iter()
        .map(|g| {
            let name = g
                .generation
                .map_or("imported".to_string(), |g| g.to_string());
            (name, json!({"records": g.records}))
        })
        .collect();
    json!({
        "object": "feedback.stats",
        "completions": s.completions,
        "records": s.records,
        "pairs": s.pairs,
        "by_kind": by_kind,
        "by_generation": by_generation,
    })
}

async fn stats(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let s = read(&state, |s| s.stats()).await?;
    Ok(HttpResponse::Ok().json(stats_json(&s)))
}
