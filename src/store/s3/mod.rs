//! The S3 backend: blobs, the shared indexes and build leases in a bucket
//! that several replicas use at once (AWS S3, SeaweedFS, MinIO, Ceph RGW,
//! Garage), through the `object_store` crate.
//!
//! Keys, under the prefix: `blobs/sha256/<hex>`, `index/<kind>/<key>`,
//! `leases/<name>`. Builds pack into the local blob store (staging, and a
//! cache of the blobs this replica built); [`Storage::put_file`] then
//! uploads, hashing the bytes as they go: a small blob in one conditional
//! `PUT` (`If-None-Match: *`), a large one as a multipart upload that is
//! completed only when the digest matched. Neither makes a partial object
//! visible, and two replicas writing the same blob write the same bytes.

pub mod bucket;
pub mod check;
pub mod gc;
pub mod lease;

pub use bucket::{Bucket, Listed, S3Settings};

use super::fs::BlobStore;
use super::{ByteStream, Description, Lease, LeaseState, Opened, RecordKind, Storage, StoreError};
use crate::digest::{Digest, HashingWriter};
use bucket::remote;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutMode, PutOptions, WriteMultipart};
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// Blobs up to this size go up in one request; larger ones in parts.
const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;
/// Multipart part size (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once per upload.
const PARTS_IN_FLIGHT: usize = 2;
/// How long a presigned URL stays valid.
const PRESIGNED_FOR: Duration = Duration::from_secs(15 * 60);

#[derive(Debug)]
pub struct S3Store {
    bucket: Bucket,
    staging: BlobStore,
    /// Names this process in lease objects.
    holder: String,
}

impl S3Store {
    /// The backend on `settings`' bucket, packing into `staging`.
    /// Credentials: see [`Bucket::open`].
    pub fn open(settings: S3Settings, staging: BlobStore) -> Result<S3Store, StoreError> {
        let bucket = Bucket::open(settings)?;
        let holder = lease::new_holder();
        Ok(S3Store {
            bucket,
            staging,
            holder,
        })
    }

    /// Uploads a large file in parts; completes only if its digest matched.
    async fn put_multipart(
        &self,
        path: &Path,
        key: &Key,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        tracing::info!(%digest, "uploading a blob in parts");
        let upload = self
            .bucket
            .client
            .put_multipart(key)
            .await
            .map_err(remote("starting upload of", key))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let file_err = |source| StoreError::Read {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(file_err)?;
        let mut state = (file, HashingWriter::new(std::io::sink()));
        let result: Result<Digest, StoreError> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(remote("uploading", key))?;
                let (next, chunk) = tokio::task::spawn_blocking(move || read_part(state))
                    .await?
                    .map_err(file_err)?;
                state = next;
                if chunk.is_empty() {
                    return Ok(state.1.finish().1);
                }
                writer.put(chunk.into());
            }
        }
        .await;
        match result {
            Ok(actual) if actual == *digest => {
                writer
                    .finish()
                    .await
                    .map_err(remote("completing upload of", key))?;
                Ok(())
            }
            Ok(actual) => {
                let _ = writer.abort().await;
                Err(StoreError::DigestMismatch {
                    expected: *digest,
                    actual,
                })
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }
}

#[async_trait::async_trait]
impl Storage for S3Store {
    fn describe(&self) -> Description {
        Description {
            backend: "s3",
            location: self.bucket.settings.location(),
        }
    }

    fn staging(&self) -> &BlobStore {
        &self.staging
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), StoreError> {
        let key = self.bucket.blob_key(digest);
        if self.stat(digest).await?.is_some() {
            return Ok(());
        }
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|source| StoreError::Read {
                path: path.display().to_string(),
                source,
            })?
            .len();
        if len > SINGLE_PUT_MAX {
            return self.put_multipart(path, &key, digest).await;
        }
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| StoreError::Read {
                path: path.display().to_string(),
                source,
            })?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.bucket.client.put_opts(&key, bytes.into(), opts).await {
            Ok(_) => Ok(()),
            // Another replica wrote it first: the same bytes, by its name.
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(remote("uploading", &key)(e)),
        }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.bucket.blob_size(digest).await
    }

    /// The bucket's copy: callers look on this replica's disk first (the
    /// registry sends a local blob from its file, the builder reads
    /// manifests from staging), so it is not looked at again here.
    async fn open(&self, digest: &Digest, redirect: bool) -> Result<Option<Opened>, StoreError> {
        let Some(size) = self.stat(digest).await? else {
            return Ok(None);
        };
        if redirect && self.bucket.settings.redirect {
            let key = self.bucket.blob_key(digest);
            let url = self
                .bucket
                .client
                .signed_url(http::Method::GET, &key, PRESIGNED_FOR)
                .await
                .map_err(remote("signing a URL for", &key))?;
            return Ok(Some(Opened::Redirect(url.to_string())));
        }
        Ok(Some(Opened::Remote { size }))
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        match self.bucket.blob_stream(digest, range).await {
            Ok(Some(stream)) => Ok(stream),
            Ok(None) => Err(StoreError::Remote {
                op: "reading",
                key: self.bucket.blob_key(digest).to_string(),
                cause: "no such object".into(),
            }),
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let blobs = self.bucket.blobs().await?;
        Ok(blobs.into_iter().map(|b| (b.digest, b.size)).collect())
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        self.bucket.delete_blob(digest).await?;
        Ok(true)
    }

    async fn get_record(&self, kind: RecordKind, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let bytes = self.bucket.get_record(kind, key).await?;
        Ok(bytes.map(|b| b.to_vec()))
    }

    async fn record_keys(&self, kind: RecordKind) -> Result<Vec<String>, StoreError> {
        self.bucket.record_keys(kind).await
    }

    async fn put_record(
        &self,
        kind: RecordKind,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        // One PUT replaces the whole object: readers see the old or the new.
        let key = self.bucket.record_key(kind, key);
        self.bucket
            .client
            .put(&key, bytes.into())
            .await
            .map_err(remote("writing", &key))?;
        Ok(())
    }

    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<LeaseState, StoreError> {
        self.bucket.try_lease(name, &self.holder, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        self.bucket.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.bucket.release(lease).await
    }
}

type PartState = (std::fs::File, HashingWriter<std::io::Sink>);

/// The next part of a file (empty at its end), hashed on the way.
fn read_part(state: PartState) -> std::io::Result<(PartState, Vec<u8>)> {
    let (mut file, mut hasher) = state;
    let mut buf = vec![0; PART_SIZE];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    std::io::Write::write_all(&mut hasher, &buf)?;
    Ok(((file, hasher), buf))
}
