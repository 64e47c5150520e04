//! The pull side of the distribution API: `/v2/`, manifests, blobs, tags.

use super::accept::Accept;
use super::range::{self, RangeRequest};
use crate::build::builder::{BuildError, Builder};
use crate::build::forms::Served;
use crate::build::git::GitError;
use crate::build::image::{PathError, Reference, ReferenceError, RegistryPath};
use crate::build::manifest::{self, MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE};
use crate::build::nix::NixError;
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

const IMMUTABLE: &str = "max-age=31536000, immutable";

/// `GET/HEAD /v2/`: tells clients this is a registry (no auth needed).
pub async fn base(method: Method) -> Response {
    let body = if method == Method::HEAD { "" } else { "{}" };
    let mut r = (StatusCode::OK, body).into_response();
    set(&mut r, header::CONTENT_TYPE, "application/json");
    set(&mut r, header::CONTENT_LENGTH, "2");
    r
}

fn set(r: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

#[derive(Debug, Deserialize)]
pub struct TagsQuery {
    n: Option<String>,
    last: Option<String>,
}

/// Everything under `/v2/<name>/...`: one route, parsed from the end
/// because names contain slashes.
pub async fn dispatch(
    State(builder): State<Arc<Builder>>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return with_head(
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "this registry only serves pulls",
            )
            .into_response(),
            head,
        );
    }
    let result = match RegistryPath::parse(&rest) {
        Err(e) => Err(path_error(e)),
        Ok(RegistryPath::Manifest { name, reference }) => {
            manifest(
                &builder,
                &name,
                reference,
                &Accept::from_headers(&headers),
                head,
            )
            .await
        }
        Ok(RegistryPath::Referrers { .. }) => Ok(referrers(&query)),
        Ok(RegistryPath::Blob { digest, .. }) => blob(&builder, digest, &headers, head).await,
        Ok(RegistryPath::TagsList { name }) => {
            let q = TagsQuery {
                n: query.get("n").cloned(),
                last: query.get("last").cloned(),
            };
            tags(&builder, &name, q)
        }
    };
    match result {
        Ok(r) => r,
        Err(e) => with_head(e.into_response(), head),
    }
}

/// A HEAD answer keeps its status and headers and drops the body, with the
/// body's length in Content-Length.
fn with_head(response: Response, head: bool) -> Response {
    if !head {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    use http_body::Body as _;
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, Body::empty())
}

fn path_error(e: PathError) -> ApiError {
    match e {
        PathError::NotFound => ApiError::not_found_route(),
        PathError::Reference(ReferenceError::Name(_)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            e.to_string(),
        ),
        // Nothing is stored under a reference that is not a tag: unknown,
        // as the distribution spec's conformance suite expects.
        PathError::Reference(ReferenceError::Tag(_)) | PathError::UnknownManifest(_) => {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                e.to_string(),
            )
        }
        PathError::UnknownBlob(_) => {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, e.to_string())
        }
        PathError::Reference(ReferenceError::Digest(d)) => digest_error(d),
    }
}

fn digest_error(e: crate::digest::DigestError) -> ApiError {
    use crate::digest::DigestError;
    match e {
        DigestError::Unsupported(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::Unsupported,
            e.to_string(),
        ),
        DigestError::Invalid => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::DigestInvalid,
            e.to_string(),
        ),
    }
}

/// Maps every build error to what a client sees. Each variant is named so
/// that a new one forces a decision.
pub fn build_error(e: &BuildError) -> ApiError {
    match e {
        BuildError::NotFound(names) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            format!("packages not found: {}", names.join(", ")),
        )
        .with_detail(serde_json::json!({ "packages": names })),
        BuildError::Source(e @ GitError::InvalidRef(_)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::TagInvalid,
            e.to_string(),
        ),
        BuildError::Source(e @ (GitError::UnknownRef(_) | GitError::NoHead)) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            e.to_string(),
        ),
        BuildError::Source(_) => ApiError::internal("asking the package repository for the tag"),
        BuildError::Nix(NixError::Timeout { seconds, .. }) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            format!("Nix did not finish within {seconds} s (NIX_TIMEOUT); see the server log"),
        ),
        BuildError::Nix(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            "Nix failed to build the image; the build record has its output",
        ),
        BuildError::Shared(inner) => build_error(inner),
        BuildError::Layers(_) => ApiError::internal("grouping store paths into layers"),
        BuildError::Archive(_) => ApiError::internal("packing layers"),
        BuildError::Blob(_) => ApiError::internal("writing to the blob store"),
        BuildError::Manifest(_) => ApiError::internal("writing the manifest"),
        BuildError::Db(_) => ApiError::internal("using the database"),
        BuildError::GcRoot(_) => ApiError::internal("preparing the build"),
        BuildError::Task(_) => ApiError::internal("building the image"),
        BuildError::NoSource(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            e.to_string(),
        ),
    }
}

/// Headers for anything addressed by its digest.
fn content_response(bytes: Bytes, digest: &Digest, content_type: &str, head: bool) -> Response {
    let len = bytes.len();
    let mut r = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(bytes))
    };
    set(&mut r, header::CONTENT_TYPE, content_type);
    set(&mut r, header::CONTENT_LENGTH, &len.to_string());
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    set(&mut r, header::ETAG, &format!("\"{digest}\""));
    set(
        &mut r,
        header::HeaderName::from_static("docker-content-digest"),
        &digest.to_string(),
    );
    r
}

async fn manifest(
    builder: &Arc<Builder>,
    name: &str,
    reference: Reference,
    accept: &Accept,
    head: bool,
) -> Result<Response, ApiError> {
    let tag = match reference {
        Reference::Digest(d) => return manifest_by_digest(builder, name, d, head).await,
        Reference::Tag(tag) => tag,
    };
    let logged = |e: &BuildError| {
        let api = build_error(e);
        if api.status.is_server_error() {
            tracing::error!(image = name, tag = %tag, error = %e, "build failed");
        }
        api
    };
    // Several platforms make an index, for a client that takes one.
    let index = accept
        .index_format()
        .filter(|_| builder.platforms_for(name).len() > 1);
    let served: Served = match index {
        Some(format) => builder
            .index_for(name, &tag, format)
            .await
            .map_err(|e| logged(&e))?,
        None => {
            let docker = builder
                .manifest_for(name, &tag)
                .await
                .map_err(|e| logged(&e))?;
            builder
                .manifest_in(docker, accept.manifest_format())
                .await
                .map_err(|e| logged(&e))?
                .ok_or_else(|| manifest_unknown(name))?
        }
    };
    Ok(content_response(
        served.bytes,
        &served.digest,
        served.media_type,
        head,
    ))
}

/// A manifest or index by digest, as stored, with the media type it
/// declares whatever the client accepts: a digest names exact bytes.
async fn manifest_by_digest(
    builder: &Arc<Builder>,
    name: &str,
    digest: Digest,
    head: bool,
) -> Result<Response, ApiError> {
    let known = builder.db().is_manifest(&digest).map_err(|e| {
        tracing::error!(error = %e, "manifest lookup failed");
        ApiError::internal("looking up the manifest")
    })?;
    if !known {
        return Err(manifest_unknown(name));
    }
    let bytes = read_blob(builder, &digest)
        .await?
        .ok_or_else(|| manifest_unknown(name))?;
    let media_type = manifest::media_type_of(&bytes);
    let mut r = content_response(
        bytes,
        &digest,
        media_type.as_deref().unwrap_or(MANIFEST_MEDIA_TYPE),
        head,
    );
    set(&mut r, header::CACHE_CONTROL, IMMUTABLE);
    Ok(r)
}

/// `GET /v2/<name>/referrers/<digest>`: this registry takes no pushes, so
/// nothing refers to anything: an empty index (OCI distribution 1.1). A
/// filter by `artifactType` is reported as applied; it has nothing to drop.
fn referrers(query: &HashMap<String, String>) -> Response {
    let mut r = (StatusCode::OK, manifest::empty_index()).into_response();
    set(&mut r, header::CONTENT_TYPE, OCI_INDEX_MEDIA_TYPE);
    if query.contains_key("artifactType") {
        set(
            &mut r,
            header::HeaderName::from_static("oci-filters-applied"),
            "artifactType",
        );
    }
    r
}

fn manifest_unknown(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::ManifestUnknown,
        format!("no such manifest for {name}"),
    )
}

/// Maps a blob without blocking the runtime on disk I/O.
async fn read_blob(builder: &Arc<Builder>, digest: &Digest) -> Result<Option<Bytes>, ApiError> {
    let blobs = builder.blobs().clone();
    let digest = *digest;
    tokio::task::spawn_blocking(move || blobs.get(&digest))
        .await
        .map_err(|_| ApiError::internal("reading a blob"))?
        .map(|b| b.map(|b| b.into_bytes()))
        .map_err(|e| {
            tracing::error!(error = %e, "blob read failed");
            ApiError::internal("reading a blob")
        })
}

async fn blob(
    builder: &Arc<Builder>,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let bytes = read_blob(builder, &digest).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUnknown,
            format!("no blob {digest}"),
        )
    })?;
    let total = bytes.len() as u64;
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut r = match range::parse(range_header, total) {
        RangeRequest::Full => content_response(bytes, &digest, "application/octet-stream", head),
        RangeRequest::Partial(span) => {
            let part = bytes.slice(span.start as usize..span.end as usize);
            let mut r = content_response(part, &digest, "application/octet-stream", head);
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            set(
                &mut r,
                header::CONTENT_RANGE,
                &format!("bytes {}-{}/{total}", span.start, span.end - 1),
            );
            r
        }
        RangeRequest::Unsatisfiable => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::Unsupported,
                format!("range not satisfiable for a blob of {total} bytes"),
            )
            .into_response();
            set(&mut r, header::CONTENT_RANGE, &format!("bytes */{total}"));
            return Ok(with_head(r, head));
        }
    };
    set(&mut r, header::CACHE_CONTROL, IMMUTABLE);
    Ok(r)
}

#[derive(serde::Serialize)]
struct TagList<'a> {
    name: &'a str,
    tags: Vec<String>,
}

/// The tags served for a name (`latest` always), paginated by `n`/`last`.
fn tags(builder: &Arc<Builder>, name: &str, query: TagsQuery) -> Result<Response, ApiError> {
    let mut all = builder.db().tags(name).map_err(|e| {
        tracing::error!(error = %e, "tag lookup failed");
        ApiError::internal("listing tags")
    })?;
    all.push("latest".to_owned());
    all.sort();
    all.dedup();
    if let Some(last) = &query.last {
        all.retain(|t| t.as_str() > last.as_str());
    }
    let limit = match query.n.as_deref().map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported,
                "query parameter n must be a whole number",
            ))
        }
    };
    let mut next = None;
    if let Some(n) = limit {
        if all.len() > n {
            all.truncate(n);
            next = all.last().cloned();
        }
    }
    let body = serde_json::to_vec(&TagList { name, tags: all })
        .map_err(|_| ApiError::internal("listing tags"))?;
    let mut r = (StatusCode::OK, body).into_response();
    set(&mut r, header::CONTENT_TYPE, "application/json");
    if let (Some(last), Some(n)) = (next, limit) {
        set(
            &mut r,
            header::LINK,
            &format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\""),
        );
    }
    Ok(r)
}
