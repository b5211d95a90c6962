//! The service's one error shape: every failure is JSON `{error, field, hint}` with an HTTP
//! status (400 malformed, 401/403 refused, 404 unknown id, 413 too large, 415 wrong type, 422
//! invalid value, 503 busy with `Retry-After`), never a plain-text body.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    /// The request field at fault (`prompt`, `images[1]`, …), when there is one.
    pub field: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
    /// Seconds for `Retry-After` (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
            hint: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }

    pub fn invalid(field: &str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, error).field(field)
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no {what} {id:?}"))
    }

    pub fn too_large(error: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, error)
    }

    pub fn unsupported(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, error)
    }

    pub fn busy(error: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, error);
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// An internal failure (a model error): 500 with the first line of the message.
    pub fn internal(e: &anyhow::Error) -> Self {
        let msg = format!("{e:#}");
        let first = msg.lines().next().unwrap_or("internal error").to_string();
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, first)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "field": self.field, "hint": self.hint});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
