//! The one place errors become HTTP: OpenAI's error JSON
//! (`{"error": {"message", "type", "param", "code"}}`), as a response or, once a
//! stream has started, as a final SSE event.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use attune_aligner::store::{FeedbackError, StoreError};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ApiError {
    /// 400 about one request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn model_not_found(name: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{name}` does not exist"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn overloaded() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "The server is at capacity; retry shortly".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("payload_too_large"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn not_found(param: &str, message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some(code),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// The error as the last event of a stream that already started.
    pub fn sse_event(&self) -> String {
        format!("data: {}\n\n", self.body())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "The preference store is at capacity; retry shortly".into(),
                kind: "server_error",
                param: None,
                code: Some("store_busy"),
            },
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<FeedbackError> for ApiError {
    fn from(e: FeedbackError) -> Self {
        let message = e.to_string();
        match e {
            FeedbackError::UnknownCompletion { .. } => {
                ApiError::not_found("completion_id", message, "completion_not_found")
            }
            FeedbackError::IdempotencyConflict { .. } => Self {
                status: StatusCode::CONFLICT,
                message,
                kind: "invalid_request_error",
                param: Some("idempotency_key".into()),
                code: Some("idempotency_key_reused"),
            },
            FeedbackError::Store(s) => s.into(),
            FeedbackError::ChoiceOutOfRange { .. }
            | FeedbackError::DuplicateCandidate { .. }
            | FeedbackError::TooFewCandidates { .. }
            | FeedbackError::DifferentPrompts { .. } => ApiError::bad_request(message),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.insert_header(("Retry-After", "1"));
        }
        r.json(self.body())
    }
}
