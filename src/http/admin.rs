//! The admin page at `/`, its data as JSON at `/api/status`, and
//! Prometheus metrics at `/metrics`.
//!
//! The page is rendered by askama, which HTML-escapes every value; what
//! comes from requests (the Host header) or from Nix (error output) is only
//! ever a value. All three answers are redacted whole before they leave,
//! whatever setting or output they came to show.

use super::format;
use crate::build::builder::Builder;
use crate::error::ApiError;
use crate::http::report::Report;
use crate::redact::redact_owned;
use askama::Template;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Reload interval while builds run, and otherwise.
const REFRESH_BUSY: u32 = 2;
const REFRESH_IDLE: u32 = 30;

#[derive(Template)]
#[template(path = "admin.html")]
struct AdminPage {
    /// The host the browser used, for `docker pull` lines.
    host: String,
    report: Report,
    refresh_seconds: u32,
    hit_rate: String,
    latest_revision: Option<String>,
}

/// Askama hands template expressions to methods by reference.
impl AdminPage {
    fn bytes(&self, n: &u64) -> String {
        format::bytes(*n)
    }

    fn millis(&self, ms: &u64) -> String {
        format::millis(*ms)
    }

    fn utc(&self, unix: &u64) -> String {
        format::utc(*unix)
    }
}

async fn collect(builder: Arc<Builder>) -> Result<Report, ApiError> {
    tokio::task::spawn_blocking(move || Report::collect(&builder))
        .await
        .map_err(|_| ApiError::internal("gathering the status"))?
        .map_err(|e| {
            tracing::error!(error = %e, "could not gather the status");
            ApiError::internal("gathering the status")
        })
}

fn with_type(mut r: Response, content_type: &'static str) -> Response {
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /`.
pub async fn page(State(builder): State<Arc<Builder>>, headers: HeaderMap) -> Response {
    let report = match collect(builder).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let hit_rate = report
        .cache
        .hit_rate
        .map_or_else(|| "–".to_owned(), |r| format!("{:.0} %", r * 100.0));
    let latest_revision = report.builds.iter().find_map(|b| b.revision.clone());
    let page = AdminPage {
        host,
        refresh_seconds: if report.in_flight.is_empty() {
            REFRESH_IDLE
        } else {
            REFRESH_BUSY
        },
        hit_rate,
        latest_revision,
        report,
    };
    match page.render() {
        Ok(html) => with_type(
            redact_owned(html).into_response(),
            "text/html; charset=utf-8",
        ),
        Err(e) => {
            tracing::error!(error = %e, "could not render the admin page");
            ApiError::internal("rendering the admin page").into_response()
        }
    }
}

/// `GET /api/status`: what the page shows, as JSON.
pub async fn status(State(builder): State<Arc<Builder>>) -> Response {
    let report = match collect(builder).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match serde_json::to_string(&report) {
        Ok(body) => with_type(redact_owned(body).into_response(), "application/json"),
        Err(_) => ApiError::internal("encoding the status").into_response(),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(builder): State<Arc<Builder>>) -> Response {
    match builder.status().metrics().encode() {
        Ok(text) => with_type(
            redact_owned(text).into_response(),
            crate::observe::metrics::CONTENT_TYPE,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        )
            .into_response(),
    }
}
