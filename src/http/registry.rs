//! The pull side of the distribution API: `/v2/`, manifests, blobs, tags.

use super::accept::Accept;
use super::file_body::Opened as OpenFile;
use super::range::{self, RangeRequest};
use super::sendfile::Sendfile;
use crate::build::builder::{BuildError, Builder, TagAnswer};
use crate::build::forms::Served;
use crate::build::git::GitError;
use crate::build::image::{PathError, Reference, ReferenceError, RegistryPath};
use crate::build::nix::NixError;
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use crate::oci::artifact::{referrers_index, ArtifactDescriptor};
use crate::oci::manifest;
use crate::oci::media::{MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE};
use crate::store::db::ReferrerKind;
use crate::store::{Opened, StoreError};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

const IMMUTABLE: &str = "max-age=31536000, immutable";

/// What a client that was refused for load is told to wait, in seconds.
const RETRY_AFTER_SECS: u64 = 10;

/// `GET/HEAD /v2/`: tells clients this is a registry (and, with
/// `--htpasswd`, whether their credentials are good).
pub async fn base(method: Method) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return ApiError::method_not_allowed().into_response();
    }
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
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    sendfile: Option<Extension<Sendfile>>,
    headers: HeaderMap,
) -> Response {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return ApiError::method_not_allowed().into_response();
    }
    let (Ok(Path(rest)), Ok(Query(query))) = (path, query) else {
        return with_head(
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                "the path or query is not valid UTF-8 text",
            )
            .into_response(),
            head,
        );
    };
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
        Ok(RegistryPath::Referrers { digest, .. }) => referrers(&builder, digest, &query).await,
        Ok(RegistryPath::Blob { name, digest }) => {
            let sendfile = sendfile.map(|Extension(s)| s);
            blob(&builder, &name, digest, &headers, head, sendfile).await
        }
        Ok(RegistryPath::TagsList { name }) => {
            let q = TagsQuery {
                n: query.get("n").cloned(),
                last: query.get("last").cloned(),
            };
            tags(&builder, name, q).await
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
    if e.is_storage_full() {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            "the registry's storage is full, so this image cannot be built now; \
             images already built are still served",
        )
        .with_retry_after(RETRY_AFTER_SECS);
    }
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
        BuildError::Source(
            e @ (GitError::UnknownRef(_) | GitError::UnknownCommit(_) | GitError::NoHead),
        ) => ApiError::new(
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
        BuildError::Manifest(_) | BuildError::Oci(_) => ApiError::internal("writing the manifest"),
        BuildError::Db(_) => ApiError::internal("using the database"),
        BuildError::Storage(e) => storage_error(e),
        BuildError::GcRoot(_) => ApiError::internal("preparing the build"),
        BuildError::Task(_) => ApiError::internal("building the image"),
        BuildError::QueueFull(n) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests,
            format!("{n} image builds are waiting already; try again later (images already built are served)"),
        )
        .with_retry_after(RETRY_AFTER_SECS),
        BuildError::Abandoned(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unknown,
            "the build was dropped while queued; try again",
        )
        .with_retry_after(1),
        BuildError::NoSource(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            e.to_string(),
        ),
    }
}

/// What a client sees when the storage backend fails: a 503 that says the
/// object storage is unreachable, or a 500.
fn storage_error(e: &StoreError) -> ApiError {
    tracing::error!(error = %e, "storage failed");
    if e.is_unavailable() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the object storage is unavailable; try again later",
        )
    } else {
        ApiError::internal("reading the blob store")
    }
}

/// Headers for anything addressed by its digest; `body` has `len` bytes.
fn content_response(
    body: Body,
    len: u64,
    digest: &Digest,
    content_type: &str,
    head: bool,
) -> Response {
    let body = if head { Body::empty() } else { body };
    digest_response(body, len, digest, content_type)
}

/// A response of `len` bytes of `body`, content addressed by `digest`.
fn digest_response(body: Body, len: u64, digest: &Digest, content_type: &str) -> Response {
    let mut r = Response::new(body);
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
    // Several platforms make an index, for a client that takes one. The
    // images just built for it stay out of the collector's reach until the
    // response is sent (`hold`).
    let (answer, hold) = builder
        .answer_held(name, &tag, accept.index_format().is_some())
        .await
        .map_err(|e| logged(&e))?;
    let served = match (answer, accept.index_format()) {
        (TagAnswer::Index(platforms), Some(format)) => builder
            .index_of(&platforms, format)
            .await
            .map_err(|e| logged(&e))?,
        (answer, _) => {
            let docker = answer.first().ok_or_else(|| manifest_unknown(name))?;
            builder
                .manifest_in(docker, accept.manifest_format())
                .await
                .map_err(|e| logged(&e))?
        }
    };
    let served: Served = match served {
        Some(served) => served,
        None => return Err(gone_meanwhile(builder, name).await),
    };
    if !head {
        let _ = builder
            .lease_served(name, &served.digest, &served.bytes)
            .await;
    }
    let len = served.bytes.len() as u64;
    Ok(content_response(
        Body::from(hold.attach(served.bytes)),
        len,
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
    let known = builder
        .is_manifest(&digest)
        .await
        .map_err(|e| build_error(&e))?;
    if !known {
        return Err(manifest_unknown(name));
    }
    let bytes = builder
        .manifest_bytes(&digest)
        .await
        .map_err(|e| build_error(&e))?
        .ok_or_else(|| manifest_unknown(name))?;
    if !head {
        let _ = builder.lease_served(name, &digest, &bytes).await;
    }
    let media_type = manifest::media_type_of(&bytes);
    let len = bytes.len() as u64;
    let mut r = content_response(
        Body::from(bytes),
        len,
        &digest,
        media_type.as_deref().unwrap_or(MANIFEST_MEDIA_TYPE),
        head,
    );
    set(&mut r, header::CACHE_CONTROL, IMMUTABLE);
    Ok(r)
}

/// `GET /v2/<name>/referrers/<digest>` (OCI distribution 1.1): an image
/// index of the artifact manifests whose subject is the digest (the
/// image's bills of materials), made on first request for an image cached
/// before they existed; empty for a digest nothing refers to. A filter by
/// `artifactType` keeps the matching ones and is reported as applied.
async fn referrers(
    builder: &Arc<Builder>,
    digest: Option<Digest>,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let listed = match digest {
        Some(d) => builder.referrers(d).await.map_err(|e| build_error(&e))?,
        // A digest of another algorithm: nothing here has such a name.
        None => Vec::new(),
    };
    // A `+` sent unencoded arrives as a space; no media type has one.
    let filter = query.get("artifactType").map(|t| t.replace(' ', "+"));
    let descriptors: Vec<ArtifactDescriptor> = listed
        .into_iter()
        .filter(|r| r.kind == ReferrerKind::Manifest)
        .filter(|r| filter.as_ref().is_none_or(|t| *t == r.artifact_type))
        .map(|r| ArtifactDescriptor {
            media_type: r.media_type,
            digest: r.digest,
            size: r.size,
            artifact_type: Some(r.artifact_type),
            annotations: r.annotations.into_iter().collect(),
        })
        .collect();
    let body =
        referrers_index(&descriptors).map_err(|_| ApiError::internal("listing the referrers"))?;
    let mut r = (StatusCode::OK, body).into_response();
    set(&mut r, header::CONTENT_TYPE, OCI_INDEX_MEDIA_TYPE);
    if filter.is_some() {
        set(
            &mut r,
            header::HeaderName::from_static("oci-filters-applied"),
            "artifactType",
        );
    }
    Ok(r)
}

/// A tag answered with a manifest that is not stored any more: evicted
/// between the answer and the read, which only an emergency collection
/// does to an image just built (or a bucket's collection on a replica).
/// Below the free-space floor that is said, not MANIFEST_UNKNOWN.
async fn gone_meanwhile(builder: &Builder, name: &str) -> ApiError {
    // The last collection's report comes at its end: below the floor now
    // also counts (the first collection after a start, one that failed).
    let collector = Arc::clone(builder.collector());
    let below_now = tokio::task::spawn_blocking(move || collector.below_the_floor())
        .await
        .unwrap_or(false);
    let emergency = below_now
        || builder
            .collector()
            .last_report()
            .is_some_and(|r| r.emergency);
    if !emergency {
        return manifest_unknown(name);
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!(
            "the registry's storage is below its free-space floor (--min-free-space), \
             and {name} was evicted before it could be served; try again later"
        ),
    )
    .with_retry_after(RETRY_AFTER_SECS)
}

fn manifest_unknown(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::ManifestUnknown,
        format!("no such manifest for {name}"),
    )
}

fn blob_unknown(digest: &Digest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::BlobUnknown,
        format!("no blob {digest}"),
    )
}

/// Opens a blob without blocking the runtime on disk I/O.
async fn open_blob(builder: &Arc<Builder>, digest: &Digest) -> Result<Option<OpenFile>, ApiError> {
    let blobs = builder.blobs().clone();
    let digest = *digest;
    tokio::task::spawn_blocking(
        move || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            match blobs.open_blob(&digest)? {
                Some(file) => Ok(Some(OpenFile::new(file)?)),
                None => Ok(None),
            }
        },
    )
    .await
    .map_err(|_| ApiError::internal("reading a blob"))?
    .map_err(|e| {
        tracing::error!(error = %e, "blob open failed");
        ApiError::internal("reading a blob")
    })
}

/// The part of a blob of `total` bytes that a request asks for (None: all
/// of it), or the `416` to answer.
fn requested_span(
    headers: &HeaderMap,
    total: u64,
    head: bool,
) -> Result<Option<std::ops::Range<u64>>, Box<Response>> {
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    match range::parse(range_header, total) {
        RangeRequest::Full => Ok(None),
        RangeRequest::Partial(span) => Ok(Some(span)),
        RangeRequest::Unsatisfiable => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::Unsupported,
                format!("range not satisfiable for a blob of {total} bytes"),
            )
            .into_response();
            set(&mut r, header::CONTENT_RANGE, &format!("bytes */{total}"));
            Err(Box::new(with_head(r, head)))
        }
    }
}

/// A blob (or the `span` of it) of `total` bytes.
fn blob_response(
    body: Body,
    span: Option<std::ops::Range<u64>>,
    total: u64,
    digest: &Digest,
    head: bool,
) -> Response {
    let len = span.as_ref().map_or(total, |s| s.end - s.start);
    let mut r = content_response(body, len, digest, "application/octet-stream", head);
    if let Some(span) = span {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {}-{}/{total}", span.start, span.end - 1),
        );
    }
    set(&mut r, header::CACHE_CONTROL, IMMUTABLE);
    r
}

pub(crate) async fn blob(
    builder: &Arc<Builder>,
    name: &str,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
    sendfile: Option<Sendfile>,
) -> Result<Response, ApiError> {
    if !head {
        builder.blobs().renew_lease(name, &digest);
    }
    // On this replica's disk: sent from the file, a slice at a time.
    if let Some(file) = open_blob(builder, &digest).await? {
        let total = file.len();
        let span = match requested_span(headers, total, head) {
            Ok(span) => span,
            Err(refused) => return Ok(*refused),
        };
        let body = file.body(span.clone().unwrap_or(0..total), sendfile);
        return Ok(blob_response(body, span, total, &digest, head));
    }
    let storage = builder.storage();
    if !storage.is_shared() {
        return Err(blob_unknown(&digest));
    }
    // In the bucket: proxied, or a redirect to a presigned URL.
    let opened = storage
        .open(&digest, !head)
        .await
        .map_err(|e| storage_error(&e))?
        .ok_or_else(|| blob_unknown(&digest))?;
    let (total, local) = match opened {
        Opened::Local(blob) => {
            let bytes = blob.into_bytes();
            (bytes.len() as u64, Some(bytes))
        }
        Opened::Remote { size } => {
            if !head {
                builder.cache_blob(digest);
            }
            (size, None)
        }
        Opened::Redirect(url) => {
            let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
            set(&mut r, header::LOCATION, &url);
            set(
                &mut r,
                header::HeaderName::from_static("docker-content-digest"),
                &digest.to_string(),
            );
            return Ok(r);
        }
    };
    let span = match requested_span(headers, total, head) {
        Ok(span) => span,
        Err(refused) => return Ok(*refused),
    };
    let body = match local {
        Some(bytes) => {
            let s = span.clone().unwrap_or(0..total);
            Body::from(bytes.slice(s.start as usize..s.end as usize))
        }
        None if head || span.as_ref().is_some_and(|s| s.is_empty()) => Body::empty(),
        None => Body::from_stream(
            storage
                .read(&digest, span.clone())
                .await
                .map_err(|e| storage_error(&e))?,
        ),
    };
    Ok(blob_response(body, span, total, &digest, head))
}

#[derive(serde::Serialize)]
struct TagList<'a> {
    name: &'a str,
    tags: Vec<String>,
}

/// The tags served for a name (`latest` always), paginated by `n`/`last`.
async fn tags(
    builder: &Arc<Builder>,
    name: String,
    query: TagsQuery,
) -> Result<Response, ApiError> {
    let db = builder.db().clone();
    let (all, name) = tokio::task::spawn_blocking(move || (db.tags(&name), name))
        .await
        .map_err(|_| ApiError::internal("listing tags"))?;
    let name = name.as_str();
    let mut all = all.map_err(|e| {
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
