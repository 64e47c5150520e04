//! Per-request metrics: count and latency by route and status, and the
//! bytes of blob bodies handed to clients.

use crate::observe::metrics::Route;
use crate::observe::status::Status;
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;

pub async fn measure(State(status): State<Arc<Status>>, request: Request, next: Next) -> Response {
    let route = Route::of(request.uri().path());
    let get = request.method() == Method::GET;
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = status.metrics();
    metrics.request(route, response.status().as_u16(), started.elapsed());
    if route == Route::blobs && get && response.status().is_success() {
        // Blob bodies are memory maps of known length; this counts what is
        // handed to the connection, not what a client that hangs up read.
        if let Some(len) = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            status.blob_bytes_sent(len);
        }
    }
    response
}
