//! Every error the public listener can answer, mapped to a status in one place. Clients get a short
//! `code` and a message; details stay in the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::event::BodyError;
use crate::metrics::HttpOutcome;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("token missing or not accepted")]
    Unauthorized,
    #[error(transparent)]
    BadBody(#[from] BodyError),
    #[error("body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body not received in time")]
    Timeout,
    #[error("body could not be read")]
    BodyRead,
    #[error("temporarily unavailable: {reason}")]
    Unavailable { reason: &'static str, retry_after_secs: u64 },
    #[error("request bodies being read hold the in-flight budget; retry later")]
    Overloaded { retry_after_secs: u64 },
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadBody(_) | ApiError::BodyRead => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable { .. } | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadBody(e) => e.code(),
            ApiError::TooLarge { .. } => "body_too_large",
            ApiError::Timeout => "body_timeout",
            ApiError::BodyRead => "body_unreadable",
            ApiError::Unavailable { reason, .. } => reason,
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The `outcome` label of `huggy_bridge_http_requests_total`.
    pub(crate) fn outcome(&self) -> HttpOutcome {
        match self {
            ApiError::Unauthorized => HttpOutcome::Unauthorized,
            ApiError::BadBody(_) | ApiError::BodyRead => HttpOutcome::BadRequest,
            ApiError::TooLarge { .. } => HttpOutcome::TooLarge,
            ApiError::Timeout => HttpOutcome::Timeout,
            ApiError::Unavailable { .. } => HttpOutcome::Unavailable,
            ApiError::Overloaded { .. } => HttpOutcome::Overloaded,
            ApiError::NotFound => HttpOutcome::NotFound,
            ApiError::MethodNotAllowed => HttpOutcome::MethodNotAllowed,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.to_string(), "code": self.code() }));
        let mut resp = (self.status(), body).into_response();
        if let ApiError::Unavailable { retry_after_secs, .. } | ApiError::Overloaded { retry_after_secs } = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if matches!(self, ApiError::Timeout | ApiError::TooLarge { .. } | ApiError::Overloaded { .. }) {
            // The rest of the body will not be read: do not keep the connection.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
