//! One error type for the HTTP API with an exhaustive mapping to status codes, stable error codes
//! and RFC 9457 problem+json bodies. Internal errors are logged with a reference; clients get a
//! generic body that quotes the reference, never the cause.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tenon_core::api::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    /// A setting the schema refuses (unknown key, wrong type, server-managed).
    #[error(transparent)]
    Setting(#[from] tenon_core::schema::SchemaError),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    RequestTimeout(String),
    /// Answered with `Retry-After: retry_after_secs`.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after_secs: u64 },
    /// 503 with `Retry-After: retry_after_secs` (the server is starting).
    #[error("{detail}")]
    Unavailable { detail: String, retry_after_secs: u64 },
    /// 503 with `Retry-After`: the write queue is full or a batch did not commit.
    #[error("{detail}")]
    Busy { detail: String, retry_after_secs: u64 },
    /// 503 with `Retry-After`: the database cannot be reached now; nothing was written.
    #[error("the database cannot be reached now; nothing was changed. Retry in a few seconds (the server keeps answering check-ins meanwhile)")]
    DatabaseUnavailable,
    #[error("internal error")]
    Internal(anyhow::Error),
}

/// Seconds a client waits before retrying while the database is away.
const DATABASE_RETRY_SECS: u64 = 5;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::Setting(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } | Self::Busy { .. } | Self::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable codes clients switch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Gone(_) => "device_decommissioned",
            Self::Setting(e) => e.code(),
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::RequestTimeout(_) => "request_timeout",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::Unavailable { .. } => "starting",
            Self::Busy { .. } => "busy",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::store::is_unavailable(&e) {
            return Self::DatabaseUnavailable;
        }
        Self::Internal(e.into())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if e.chain().any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(crate::store::is_unavailable)) {
            return Self::DatabaseUnavailable;
        }
        Self::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            Self::TooManyRequests { retry_after_secs, .. }
            | Self::Unavailable { retry_after_secs, .. }
            | Self::Busy { retry_after_secs, .. } => Some(HeaderValue::from(*retry_after_secs)),
            Self::DatabaseUnavailable => Some(HeaderValue::from(DATABASE_RETRY_SECS)),
            _ => None,
        };
        let detail = match &self {
            Self::Internal(e) => {
                let reference = crate::secrets::short_id();
                tracing::error!(reference = %reference, error = format!("{e:#}"), "internal error");
                format!(
                    "the server failed to handle this request (reference {reference}); the server log has the cause"
                )
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("https://tenon.dev/problems/{}", self.code()),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail,
            code: self.code().to_string(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(v) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
