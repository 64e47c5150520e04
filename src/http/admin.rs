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
use crate::error::ErrorCode;
use crate::http::image_report::ImageReport;
use crate::http::report::{ImageQuery, Report, ReportError};
use crate::observe::history::History;
use crate::redact::redact_owned;
use askama::Template;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use std::sync::Arc;

/// The pair the server presents, if it speaks HTTPS: what the page,
/// `/api/status`, `/metrics` and `/ca.crt` say about it.
#[derive(Clone)]
pub struct ServedTls(pub Option<Arc<crate::tls::Tls>>);

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
    /// `/ca.crt` offers the private CA.
    private_ca: bool,
}

/// The figures the pages' templates format, as methods since askama
/// hands template expressions to them by reference.
trait Figures {
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

impl Figures for AdminPage {}

impl AdminPage {
    fn trust_steps(&self) -> String {
        crate::tls::trust::client_steps(&self.host, "ca.crt")
    }
}

async fn collect(
    builder: Arc<Builder>,
    tls: &ServedTls,
    query: ImageQuery,
) -> Result<Report, ApiError> {
    let tls = tls.0.as_ref().map(|t| t.info().into());
    tokio::task::spawn_blocking(move || {
        Report::collect(&builder, &query).map(|r| Report { tls, ..r })
    })
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

/// A query string that does not parse shows the first page of all images.
fn query_or_default(query: Result<Query<ImageQuery>, QueryRejection>) -> ImageQuery {
    query.map(|Query(q)| q).unwrap_or_default()
}

/// `GET /`.
pub async fn page(
    State(builder): State<Arc<Builder>>,
    Extension(tls): Extension<ServedTls>,
    query: Result<Query<ImageQuery>, QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let report = match collect(builder, &tls, query_or_default(query)).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // HTTP/2 carries the host in the URI (`:authority`), not in `Host`.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost")
        .to_owned();
    let hit_rate = report
        .cache
        .hit_rate
        .map_or_else(|| "–".to_owned(), |r| format!("{:.0} %", r * 100.0));
    let latest_revision = report.builds.iter().find_map(|b| b.revision.clone());
    let private_ca = tls.0.as_ref().is_some_and(|t| t.ca_pem().is_some());
    let page = AdminPage {
        host,
        private_ca,
        refresh_seconds: if report.in_flight.is_empty() {
            REFRESH_IDLE
        } else {
            REFRESH_BUSY
        },
        hit_rate,
        latest_revision,
        report,
    };
    html(page.render())
}

/// A rendered page, redacted whole before it leaves.
fn html(rendered: askama::Result<String>) -> Response {
    match rendered {
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

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage {
    name: String,
    /// `None`: no such image.
    report: Option<ImageReport>,
}

impl Figures for ImagePage {}

/// The report on one image; `None` when the name is not valid or not
/// known.
async fn image_report(builder: Arc<Builder>, name: &str) -> Result<Option<ImageReport>, ApiError> {
    let failed = |e: ReportError| {
        tracing::error!(error = %e, "could not gather an image's report");
        ApiError::internal("gathering the image's report")
    };
    if crate::build::image::validate_name(name).is_err() {
        return Ok(None);
    }
    let found = crate::http::image_report::find(&builder, name)
        .await
        .map_err(failed)?;
    let name = name.to_owned();
    crate::blocking::blocking(move || ImageReport::collect(&builder, &name, found))
        .await
        .map_err(failed)
}

/// The name in an image page's path; one that is not UTF-8 is no image's
/// (empty, so it is answered like any unknown name).
fn path_name(name: Result<Path<String>, PathRejection>) -> String {
    name.map(|Path(n)| n).unwrap_or_default()
}

/// `GET /images/<name>`.
pub async fn image_page(
    State(builder): State<Arc<Builder>>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = path_name(name);
    let report = match image_report(builder, &name).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let status = if report.is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    let mut response = html(ImagePage { name, report }.render());
    if response.status() == StatusCode::OK {
        *response.status_mut() = status;
    }
    response
}

/// `GET /api/images/<name>`: the image's page as JSON.
pub async fn image_json(
    State(builder): State<Arc<Builder>>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = path_name(name);
    match image_report(builder, &name).await {
        Ok(Some(report)) => match serde_json::to_string(&report) {
            Ok(body) => with_type(redact_owned(body).into_response(), "application/json"),
            Err(_) => ApiError::internal("encoding the image's report").into_response(),
        },
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            "no image of this name is stored",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/status`: what the page shows, as JSON.
pub async fn status(
    State(builder): State<Arc<Builder>>,
    Extension(tls): Extension<ServedTls>,
    query: Result<Query<ImageQuery>, QueryRejection>,
) -> Response {
    let report = match collect(builder, &tls, query_or_default(query)).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match serde_json::to_string(&report) {
        Ok(body) => with_type(redact_owned(body).into_response(), "application/json"),
        Err(_) => ApiError::internal("encoding the status").into_response(),
    }
}

/// `GET /api/history`: the history rings, every slot.
pub async fn history(State(builder): State<Arc<Builder>>) -> Response {
    let read = tokio::task::spawn_blocking(move || {
        crate::http::report::flush_counts(&builder);
        let view = History::read(builder.db(), crate::clock::now_unix())?;
        serde_json::to_vec(&view).map_err(|_| ReportError::Encode)
    })
    .await;
    match read {
        Ok(Ok(body)) => with_type(body.into_response(), "application/json"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not read the history");
            ApiError::internal("reading the history").into_response()
        }
        Err(_) => ApiError::internal("reading the history").into_response(),
    }
}

/// `GET /metrics`.
pub async fn metrics(
    State(builder): State<Arc<Builder>>,
    Extension(tls): Extension<ServedTls>,
) -> Response {
    let metrics = builder.status().metrics();
    if let Some(tls) = &tls.0 {
        metrics.tls_seconds_left(tls.info().seconds_left());
    }
    match metrics.encode() {
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

/// `GET /ca.crt`: the private CA that signed the served certificate (as
/// `nixery tls init` writes the chain), for clients to trust; public even
/// with `--htpasswd`. 404 when the chain carries no CA of its own.
pub async fn ca_cert(Extension(tls): Extension<ServedTls>) -> Response {
    match tls.0.and_then(|t| t.ca_pem()) {
        Some(pem) => {
            let mut r = with_type(pem.into_response(), "application/x-pem-file");
            r.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"ca.crt\""),
            );
            r
        }
        None => ApiError::not_found_route().into_response(),
    }
}
