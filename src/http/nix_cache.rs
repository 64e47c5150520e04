//! `/nix-cache/`: the Nix binary cache's HTTP side (`nix-cache-info`,
//! `<hash>.narinfo`, `nar/<file hash>.nar.zst`). Behind `--htpasswd` like
//! everything else; NARs are sent as blobs are (Range, s3 proxy or
//! redirect).

use crate::build::builder::Builder;
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use crate::nixcache::{base32, narinfo, CacheError, NixCache, CACHE_INFO};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

fn cache_of(builder: &Builder) -> Result<&Arc<NixCache>, ApiError> {
    builder.nix_cache().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
            "this server's Nix binary cache is off (start it with --nix-cache-key)",
        )
    })
}

fn reading(method: &Method) -> Result<bool, ApiError> {
    match *method {
        Method::GET => Ok(false),
        Method::HEAD => Ok(true),
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn text(body: String, content_type: &'static str, head: bool) -> Response {
    let len = body.len();
    let mut r = if head {
        ().into_response()
    } else {
        body.into_response()
    };
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(header::CONTENT_LENGTH, len.into());
    r
}

fn cache_error(e: CacheError) -> ApiError {
    tracing::error!(error = %e, "Nix cache");
    ApiError::internal("the Nix binary cache")
}

/// `GET/HEAD /nix-cache/nix-cache-info` and `/nix-cache/<hash>.narinfo`.
pub async fn file(
    State(builder): State<Arc<Builder>>,
    method: Method,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let head = reading(&method)?;
    let cache = cache_of(&builder)?;
    if name == "nix-cache-info" {
        return Ok(text(CACHE_INFO.to_owned(), "text/x-nix-cache-info", head));
    }
    let Some(hash) = name.strip_suffix(".narinfo") else {
        return Err(ApiError::not_found_route());
    };
    if !base32::is_store_hash(hash) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            format!("{name:?} is not a store path hash (32 characters of Nix's base-32) followed by .narinfo"),
        ));
    }
    match cache.narinfo(&builder, hash).await.map_err(cache_error)? {
        Some(info) => Ok(text(info.to_string(), "text/x-nix-narinfo", head)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!("no store path {hash} in this server's images"),
        )),
    }
}

/// `GET/HEAD /nix-cache/nar/<file hash>.nar.<ext>`.
pub async fn nar(
    State(builder): State<Arc<Builder>>,
    method: Method,
    headers: HeaderMap,
    sendfile: Option<axum::Extension<super::sendfile::Sendfile>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let head = reading(&method)?;
    let cache = cache_of(&builder)?;
    let file = name
        .split_once(".nar.")
        .filter(|(_, ext)| *ext == narinfo::extension(crate::store::db::nix::NarCompression::Zstd))
        .and_then(|(hash, _)| base32::decode::<32>(hash))
        .map(Digest::from_bytes)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
                format!("{name:?} is not a NAR name (a sha256 in Nix's base-32, then .nar.zst)"),
            )
        })?;
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUnknown,
            format!("no NAR {name} in this server's cache"),
        )
    };
    if !cache
        .serves_nar(&builder, &file)
        .await
        .map_err(cache_error)?
    {
        return Err(unknown());
    }
    // No image is served under this name: a NAR renews no image's lease.
    const NAR_LEASES: &str = "nix-cache";
    let response = crate::http::registry::blob(
        &builder,
        NAR_LEASES,
        file,
        &headers,
        head,
        sendfile.map(|axum::Extension(s)| s),
    )
    .await?;
    if !head && response.status().is_success() {
        let sent = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        cache.served(sent);
    }
    Ok(response)
}
