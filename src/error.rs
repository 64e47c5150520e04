//! The registry's error envelope: every failed response is
//! `{"errors":[{"code","message","detail"}]}` with `application/json`.
//! Messages are written for clients: no server paths, no OS error text.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The distribution spec's error codes that this registry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    TagInvalid,
    Unauthorized,
    Unavailable,
    Unsupported,
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Debug, Clone, Serialize)]
struct ErrorEntry<'a> {
    code: ErrorCode,
    message: &'a str,
    detail: &'a serde_json::Value,
}

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub detail: serde_json::Value,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            // Messages may quote a setting (a source URL, the bucket).
            message: crate::redact::redact_owned(message.into()),
            detail: serde_json::Value::Null,
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn not_found_route() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
            "this registry does not serve that endpoint",
        )
    }

    pub fn method_not_allowed() -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "this registry only serves pulls (GET and HEAD)",
        )
    }

    /// An unexpected server-side failure; the cause goes to the log only.
    pub fn internal(context: &str) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            format!("internal error while {context}; see the server log"),
        )
    }

    /// The JSON body, also used for HEAD responses' Content-Length.
    pub fn body(&self) -> Vec<u8> {
        let body = ErrorBody {
            errors: [ErrorEntry {
                code: self.code,
                message: &self.message,
                detail: &self.detail,
            }],
        };
        // Serialising plain strings and JSON values cannot fail.
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"errors\":[]}".to_vec())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let e = ApiError::new(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "nope")
            .with_detail(serde_json::json!({"packages": ["a"]}));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope","detail":{"packages":["a"]}}]})
        );
    }
}
