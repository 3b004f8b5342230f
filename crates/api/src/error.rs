//! The API's errors and how they look on the wire: a status code and
//! `{"error": {"code", "message", "param"?}}`, where `param` names the query parameter or field
//! at fault so a client can fix its request without reading server logs.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter (or body field) is invalid; `param` names it.
    #[error("{param}: {message}")]
    BadRequest { param: String, message: String },
    /// No usable bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The token is valid but may not do this (another tenant, a missing scope).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A dependency (PostgreSQL, NATS) cannot answer now; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// This token already uses its share of the database; retry after `retry_after` seconds.
    #[error("{message}")]
    TooBusy { retry_after: u32, message: String },
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            param: param.into(),
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TooBusy { .. } => "too_many_requests",
        }
    }
}

impl From<auditbridge_store::StoreError> for ApiError {
    fn from(e: auditbridge_store::StoreError) -> Self {
        // Logged here, once; the client gets a retryable answer without database internals.
        tracing::warn!(error = %e, message = "Query failed.");
        ApiError::Unavailable("the database cannot answer now; retry later".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": {"code": self.code(), "message": self.to_string()}
        });
        if let ApiError::BadRequest { param, message } = &self {
            body["error"]["param"] = param.clone().into();
            body["error"]["message"] = message.clone().into();
        }
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"auditbridge\""),
            );
        }
        if let ApiError::TooBusy { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}
