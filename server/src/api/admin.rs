//! The admin API under `/v1/admin/`, behind the bearer token of
//! `server.admin_token` (`ATTUNE_ADMIN_TOKEN`); with no token configured it is
//! off and every admin route answers 404.
//!
//! - `GET generations`: the kept generations with their metrics, and the
//!   aligner's state;
//! - `POST generations/{id}/activate`: serve generation `id` (a number, its
//!   fingerprint, or `0`/`base` for the base model) to new requests;
//! - `POST aligner/run[?wait=true]`: a round now (with `wait`, answers its
//!   report);
//! - `POST aligner/pause`, `POST aligner/resume`.

use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use attune_aligner::online::ControlError;
use attune_models::registry::fingerprint;
use attune_models::Generation;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/generations", web::get().to(generations))
        .route(
            "/v1/admin/generations/{id}/activate",
            web::post().to(activate),
        )
        .route("/v1/admin/aligner", web::get().to(aligner_status))
        .route("/v1/admin/aligner/run", web::post().to(run))
        .route("/v1/admin/aligner/pause", web::post().to(pause))
        .route("/v1/admin/aligner/resume", web::post().to(resume));
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
}

/// Equal strings compare in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Admits only requests with `Authorization: Bearer <admin token>`.
fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(token) = state.admin_token.as_deref() else {
        return Err(ApiError::not_found(
            "path",
            "The admin API is off: set server.admin_token (ATTUNE_ADMIN_TOKEN) to turn it on",
            "admin_api_off",
        ));
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("The admin API needs `Authorization: Bearer <admin token>`"))?;
    if !same(given.trim().as_bytes(), token.as_bytes()) {
        return Err(unauthorized("The admin token is not valid"));
    }
    Ok(())
}

fn describe(g: &Generation, active: Option<u64>) -> Value {
    json!({
        "id": g.number,
        "fingerprint": g.fingerprint(),
        "sha256": g.hash,
        "parent": g.parent,
        "created": g.created_ms / 1000,
        "active": active == Some(g.number),
        "metrics": g.metrics,
    })
}

fn aligner_json(state: &AppState) -> Value {
    let Some(a) = &state.aligner else {
        return json!({"enabled": false});
    };
    let s = a.status();
    json!({
        "enabled": true,
        "paused": s.paused.load(Ordering::SeqCst),
        "busy": s.busy.load(Ordering::SeqCst),
        "rounds": s.rounds.load(Ordering::SeqCst),
        "published": s.published.load(Ordering::SeqCst),
        "rejected": s.rejected.load(Ordering::SeqCst),
        "skipped": s.skipped.load(Ordering::SeqCst),
        "failed": s.failed.load(Ordering::SeqCst),
        "last_round": *s.last.lock(),
    })
}

async fn generations(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let active = state.registry.active().map(|g| g.number);
    let data: Vec<Value> = state
        .registry
        .list()
        .iter()
        .map(|g| describe(g, active))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "active": active.unwrap_or(0),
        "active_fingerprint": fingerprint(state.registry.active().as_deref(), &state.model_name),
        "data": data,
        "aligner": aligner_json(&state),
    })))
}

async fn activate(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = path.into_inner();
    let number = match id.as_str() {
        "0" | "base" => 0,
        other => other
            .parse::<u64>()
            .ok()
            .or_else(|| {
                state
                    .registry
                    .list()
                    .iter()
                    .find(|g| g.fingerprint() == other)
                    .map(|g| g.number)
            })
            .filter(|&n| state.registry.get(n).is_some())
            .ok_or_else(|| {
                ApiError::not_found(
                    "id",
                    format!("No kept generation `{other}`; GET /v1/admin/generations lists them"),
                    "generation_not_found",
                )
            })?,
    };
    let registry = state.registry.clone();
    web::block(move || registry.activate(number))
        .await
        .map_err(|e| ApiError::internal(format!("activation did not run: {e}")))?
        .map_err(|e| ApiError::internal(format!("cannot activate generation {number}: {e}")))?;
    Ok(HttpResponse::Ok().json(json!({
        "active": number,
        "active_fingerprint": fingerprint(state.registry.active().as_deref(), &state.model_name),
    })))
}

fn aligner(state: &AppState) -> Result<&attune_aligner::online::AlignerHandle, ApiError> {
    state.aligner.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::CONFLICT,
        message: "The aligner is off (aligner.enabled = false)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("aligner_off"),
    })
}

async fn aligner_status(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(aligner_json(&state)))
}

#[derive(serde::Deserialize)]
struct RunQuery {
    #[serde(default)]
    wait: bool,
}

async fn run(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<RunQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let reply = aligner(&state)?.run_now().map_err(|e| match e {
        ControlError::Busy => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("{e}; try again when a round has ended"),
            kind: "rate_limit_error",
            param: None,
            code: Some("aligner_busy"),
        },
        ControlError::Stopped => ApiError::unavailable(e.to_string()),
    })?;
    if !query.wait {
        return Ok(HttpResponse::Accepted().json(json!({"status": "queued"})));
    }
    let report = reply
        .await
        .map_err(|_| ApiError::unavailable("The aligner stopped before the round ended"))?;
    Ok(HttpResponse::Ok().json(report))
}

async fn pause(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    aligner(&state)?.pause();
    Ok(HttpResponse::Ok().json(aligner_json(&state)))
}

async fn resume(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    aligner(&state)?.resume();
    Ok(HttpResponse::Ok().json(aligner_json(&state)))
}
