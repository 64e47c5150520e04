//! Where content and records live: the blob store on disk (`fs`), the sled
//! database (`db`), the file system's free space (`disk`), when images were
//! last pulled (`pulls`), the short holds on images just served
//! (`leases`), the garbage collector that uses them (`gc`) and
//! its background runs (`collector`), the space set aside to start on a
//! full disk (`reserve`), the re-hashing of stored blobs that
//! quarantines damaged ones (`scrub`), the copying of proxied blobs to a replica's disk
//! (`fill`), and the [`Storage`] seam that the builder and the
//! registry use, which either backend implements: the local blob store
//! itself (`local`), or an S3 bucket shared by several replicas (`s3`).
//!
//! Blobs are always packed into the local blob store first (it is the
//! staging area); [`Storage::put_file`] then makes one durable where the
//! backend keeps its content.

pub mod collector;
pub mod db;
pub mod disk;
pub mod fill;
pub mod findings;
pub mod fs;
pub mod gc;
pub mod leases;
pub mod local;
pub mod pulls;
pub mod reserve;
pub mod s3;
pub mod scrub;

use crate::digest::Digest;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Blob(#[from] fs::BlobError),
    /// `cause` is text, not a `#[source]`: object_store's errors print
    /// part of their causes, which a chain would print again (see
    /// [`StoreError::remote`]).
    #[error("object storage: {op} {key}: {cause}")]
    Remote {
        op: &'static str,
        key: String,
        cause: String,
    },
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest} has {size} bytes, more than the {limit} expected")]
    TooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("a storage task failed: {0}")]
    Task(String),
}

/// A blocking task that panicked (or was cancelled at shutdown).
impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Task(e.to_string())
    }
}

impl StoreError {
    /// A failed call to the object storage: the error as it prints
    /// itself, and its root cause (a refused connection, a DNS failure)
    /// when that is not already in the text.
    pub fn remote(op: &'static str, key: String, error: &dyn std::error::Error) -> StoreError {
        let mut cause = error.to_string();
        let mut root = error;
        while let Some(next) = root.source() {
            root = next;
        }
        let root = root.to_string();
        if !cause.contains(&root) {
            cause = format!("{cause}: {root}");
        }
        // object_store's messages name the URL it asked, endpoint and all.
        StoreError::Remote {
            op,
            key: crate::redact::redact_owned(key),
            cause: crate::redact::redact_owned(cause),
        }
    }

    /// True when the backend could not be reached or answered with an
    /// error: worth a 503 rather than a 500.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Remote { .. })
    }
}

/// How a blob is handed to a client.
pub enum Opened {
    /// Memory-mapped from local disk.
    Local(fs::Blob),
    /// In remote storage; read it (or a part) with [`Storage::read`].
    Remote { size: u64 },
    /// A URL the client may fetch it from directly (presigned).
    Redirect(String),
}

/// What the admin page shows about where content lives (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub backend: &'static str,
    /// A directory, or `s3://bucket/prefix` (and the endpoint, if set).
    pub location: String,
}

/// The indexes the bucket shares between replicas, next to each replica's
/// own sled copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Layer key -> blob digest, diff_id and size.
    Layer,
    /// Image cache key -> manifest digest, revision, check time.
    Manifest,
    /// Manifest digest -> the image it belongs to (pulls by digest).
    ManifestDigest,
    /// Manifest digest -> the `name:tag`s it was imported as: kept by the
    /// bucket's collector like the build records.
    Imported,
    /// Manifest digest -> when a replica last noted a pull of it: the
    /// bucket's collector evicts the least recently pulled first.
    Pulled,
    /// Manifest digest -> what refers to it (`db::ReferrersRecord`): kept,
    /// verified and deleted with it.
    Referrers,
    /// Manifest digest -> the store paths of that image's closure
    /// (`db::nix::SharedClosureRecord`): what the Nix binary cache of
    /// every replica serves; deleted with the image.
    NixClosure,
}

impl RecordKind {
    pub fn dir(self) -> &'static str {
        match self {
            RecordKind::Layer => "layers",
            RecordKind::Manifest => "manifests",
            RecordKind::ManifestDigest => "manifest-digests",
            RecordKind::Imported => "imported",
            RecordKind::Pulled => "pulled",
            RecordKind::Referrers => "referrers",
            RecordKind::NixClosure => "nix-closures",
        }
    }
}

/// A claim on building something, taken by one replica at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Ours until it expires or is released; renew it while working.
    Acquired(Lease),
    /// Another holder's, valid for this much longer.
    Held(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
}

/// A stream of a blob's bytes.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// Where blobs, the shared indexes and build leases are kept.
#[async_trait::async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn describe(&self) -> Description;

    /// The local blob store that builds pack into (and that serves as a
    /// cache of blobs on disk).
    fn staging(&self) -> &fs::BlobStore;

    /// True when the indexes and leases are shared with other replicas.
    fn is_shared(&self) -> bool;

    /// Stores the file at `path` as blob `digest`, checking that its bytes
    /// have that digest before anything becomes visible. A blob already
    /// stored is left as it is.
    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), StoreError>;

    /// The size of a stored blob, or None.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// How to serve a blob; `redirect`: a presigned URL is acceptable.
    async fn open(&self, digest: &Digest, redirect: bool) -> Result<Option<Opened>, StoreError>;

    /// The bytes of a stored blob in `range` (all of it when None).
    async fn read(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError>;

    /// Every stored blob and its size.
    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError>;

    /// Removes a blob; false if there was none.
    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError>;

    /// A shared index record (None where nothing is shared).
    async fn get_record(&self, kind: RecordKind, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The keys of every shared index record of a kind (none where
    /// nothing is shared).
    async fn record_keys(&self, kind: RecordKind) -> Result<Vec<String>, StoreError>;

    /// Publishes a shared index record (a no-op where nothing is shared).
    async fn put_record(
        &self,
        kind: RecordKind,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError>;

    /// Tries to take the lease `name` for `ttl`.
    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<LeaseState, StoreError>;

    /// Extends a lease we hold by `ttl` from now.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), StoreError>;

    /// Gives a lease up, if it is still ours.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
}

/// Reads a whole (small) blob into memory, refusing more than `limit` bytes.
pub async fn read_all(
    storage: &dyn Storage,
    digest: &Digest,
    limit: u64,
) -> Result<Option<Bytes>, StoreError> {
    use futures::TryStreamExt;
    match storage.open(digest, false).await? {
        None => Ok(None),
        Some(Opened::Local(blob)) => Ok(Some(blob.into_bytes())),
        Some(Opened::Redirect(_)) | Some(Opened::Remote { .. }) => {
            let Some(size) = storage.stat(digest).await? else {
                return Ok(None);
            };
            if size > limit {
                return Err(StoreError::TooLarge {
                    digest: *digest,
                    size,
                    limit,
                });
            }
            let mut out = Vec::with_capacity(size as usize);
            let mut stream = storage.read(digest, None).await?;
            while let Some(chunk) = stream.try_next().await? {
                out.extend_from_slice(&chunk);
            }
            Ok(Some(Bytes::from(out)))
        }
    }
}
