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

use super::fs::BlobStore;
use super::{ByteStream, Description, Lease, LeaseState, Opened, RecordKind, Storage, StoreError};
use crate::digest::{Digest, HashingWriter};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Blobs up to this size go up in one request; larger ones in parts.
const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;
/// Multipart part size (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once per upload.
const PARTS_IN_FLIGHT: usize = 2;
/// How long a presigned URL stays valid.
const PRESIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// The bucket and how to reach it. Credentials are not here: they come
/// from the standard AWS sources (see [`S3Store::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
    /// E.g. `http://127.0.0.1:8333`; None for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// `endpoint/bucket/key` rather than `bucket.endpoint/key`.
    pub force_path_style: bool,
    /// Answer blob requests with a redirect to a presigned URL.
    pub redirect: bool,
}

impl S3Settings {
    pub fn location(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" at {e}"));
        }
        s
    }
}

#[derive(Debug)]
pub struct S3Store {
    client: AmazonS3,
    settings: S3Settings,
    staging: BlobStore,
    /// Names this process in lease objects.
    holder: String,
}

fn remote<'a>(
    op: &'static str,
    key: &'a Key,
) -> impl FnOnce(object_store::Error) -> StoreError + 'a {
    move |e| StoreError::Remote {
        op,
        key: key.to_string(),
        source: Box::new(e),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a lease object holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    holder: String,
    expires_at: u64,
}

impl S3Store {
    /// A client for the bucket. Credentials: `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), else the profile in
    /// `~/.aws/credentials` (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`),
    /// else web identity, container or instance metadata credentials.
    pub fn open(settings: S3Settings, staging: BlobStore) -> Result<S3Store, StoreError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    // Whole requests, including proxied layers of a GB.
                    .with_timeout(Duration::from_secs(30 * 60))
                    .with_allow_http(true),
            );
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            if let Some((id, secret, token)) = profile_credentials() {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(t) = token {
                    builder = builder.with_token(t);
                }
            }
        }
        match &settings.endpoint {
            Some(endpoint) if settings.force_path_style => {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            Some(endpoint) => {
                // object_store wants the bucket in a virtual-hosted endpoint.
                let with_bucket = match endpoint.split_once("://") {
                    Some((scheme, host)) => format!("{scheme}://{}.{host}", settings.bucket),
                    None => format!("https://{}.{endpoint}", settings.bucket),
                };
                builder = builder
                    .with_endpoint(with_bucket)
                    .with_virtual_hosted_style_request(true);
            }
            None => {
                builder = builder.with_virtual_hosted_style_request(!settings.force_path_style);
            }
        }
        let client = builder.build().map_err(|e| StoreError::Remote {
            op: "configuring",
            key: settings.location(),
            source: Box::new(e),
        })?;
        // Unique per client, so two in one process are two holders too.
        static CLIENTS: AtomicU64 = AtomicU64::new(0);
        let holder = format!(
            "{}-{}-{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            std::process::id(),
            now_unix(),
            CLIENTS.fetch_add(1, Ordering::Relaxed)
        );
        Ok(S3Store {
            client,
            settings,
            staging,
            holder,
        })
    }

    fn key(&self, rest: &str) -> Key {
        if self.settings.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.settings.prefix))
        }
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        self.key(&format!("blobs/sha256/{}", digest.hex()))
    }

    fn record_key(&self, kind: RecordKind, key: &str) -> Key {
        self.key(&format!("index/{}/{key}", kind.dir()))
    }

    fn lease_key(&self, name: &str) -> Key {
        self.key(&format!("leases/{name}"))
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

    async fn read_lease(&self, key: &Key) -> Result<Option<LeaseBody>, StoreError> {
        match self.client.get(key).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(remote("reading", key))?;
                Ok(serde_json::from_slice(&bytes).ok())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("reading", key)(e)),
        }
    }

    fn lease_body(&self, ttl: Duration) -> PutPayload {
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_at: now_unix() + ttl.as_secs().max(1),
        };
        serde_json::to_vec(&body).unwrap_or_default().into()
    }
}

/// How long a new lease is left before it is read back (see `try_lease`).
const LEASE_SETTLE: Duration = Duration::from_millis(300);

#[async_trait::async_trait]
impl Storage for S3Store {
    fn describe(&self) -> Description {
        Description {
            backend: "s3",
            location: self.settings.location(),
        }
    }

    fn staging(&self) -> &BlobStore {
        &self.staging
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), StoreError> {
        let key = self.blob_key(digest);
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
        match self.client.put_opts(&key, bytes.into(), opts).await {
            Ok(_) => Ok(()),
            // Another replica wrote it first: the same bytes, by its name.
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(remote("uploading", &key)(e)),
        }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = self.blob_key(digest);
        match self.client.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("looking up", &key)(e)),
        }
    }

    async fn open(&self, digest: &Digest, redirect: bool) -> Result<Option<Opened>, StoreError> {
        // Blobs this replica built are still on its disk: no round trip.
        let (staging, d) = (self.staging.clone(), *digest);
        let local = tokio::task::spawn_blocking(move || staging.get(&d)).await??;
        if let Some(blob) = local {
            return Ok(Some(Opened::Local(blob)));
        }
        let Some(size) = self.stat(digest).await? else {
            return Ok(None);
        };
        if redirect && self.settings.redirect {
            let key = self.blob_key(digest);
            let url = self
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
        let key = self.blob_key(digest);
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self
            .client
            .get_opts(&key, opts)
            .await
            .map_err(remote("reading", &key))?;
        let key_name = key.to_string();
        Ok(result
            .into_stream()
            .map_err(move |e| StoreError::Remote {
                op: "reading",
                key: key_name.clone(),
                source: Box::new(e),
            })
            .boxed())
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let prefix = self.key("blobs/sha256");
        let metas: Vec<_> = self
            .client
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(remote("listing", &prefix))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let hex = m.location.filename()?;
                let digest = format!("sha256:{hex}").parse().ok()?;
                Some((digest, m.size))
            })
            .collect())
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        let key = self.blob_key(digest);
        match self.client.delete(&key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote("deleting", &key)(e)),
        }
    }

    async fn get_record(&self, kind: RecordKind, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.record_key(kind, key);
        match self.client.get(&key).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(remote("reading", &key))?.to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("reading", &key)(e)),
        }
    }

    async fn put_record(
        &self,
        kind: RecordKind,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        // One PUT replaces the whole object: readers see the old or the new.
        let key = self.record_key(kind, key);
        self.client
            .put(&key, bytes.into())
            .await
            .map_err(remote("writing", &key))?;
        Ok(())
    }

    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<LeaseState, StoreError> {
        let key = self.lease_key(name);
        // Twice at most: once more after clearing an expired lease.
        for _ in 0..2 {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self.client.put_opts(&key, self.lease_body(ttl), opts).await {
                Ok(_) => {
                    // Defensive: S3-compatible stores differ in how strictly
                    // they make create-if-absent atomic under a race, so the
                    // lease is ours only if it reads back as ours once a
                    // racing write has had time to land (the last one wins).
                    tokio::time::sleep(LEASE_SETTLE).await;
                    let now = now_unix();
                    return Ok(match self.read_lease(&key).await? {
                        Some(body) if body.holder != self.holder => LeaseState::Held(
                            Duration::from_secs(body.expires_at.saturating_sub(now).max(1)),
                        ),
                        _ => LeaseState::Acquired(Lease {
                            name: name.to_owned(),
                            holder: self.holder.clone(),
                        }),
                    });
                }
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(remote("taking lease", &key)(e)),
            }
            let now = now_unix();
            match self.read_lease(&key).await? {
                Some(body) if body.expires_at > now => {
                    return Ok(LeaseState::Held(Duration::from_secs(body.expires_at - now)))
                }
                // Not visible yet (its creator's write is still landing):
                // never cleared, only waited for.
                None => return Ok(LeaseState::Held(Duration::from_secs(1))),
                // Expired (its holder died): clear it, try again.
                Some(_) => match self.client.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(remote("clearing lease", &key)(e)),
                },
            }
        }
        Ok(LeaseState::Held(Duration::from_secs(1)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let key = self.lease_key(&lease.name);
        self.client
            .put(&key, self.lease_body(ttl))
            .await
            .map_err(remote("renewing lease", &key))?;
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let key = self.lease_key(&lease.name);
        match self.read_lease(&key).await? {
            Some(body) if body.holder == lease.holder => match self.client.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(remote("releasing lease", &key)(e)),
            },
            _ => Ok(()),
        }
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

/// Keys of `AWS_PROFILE` (or `default`) in the shared credentials file,
/// which `object_store` does not read.
fn profile_credentials() -> Option<(String, String, Option<String>)> {
    let file = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(f) => std::path::PathBuf::from(f),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".aws/credentials"),
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
    parse_profile(&std::fs::read_to_string(file).ok()?, &profile)
}

fn parse_profile(text: &str, profile: &str) -> Option<(String, String, Option<String>)> {
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !in_profile {
            continue;
        }
        let v = v.trim().to_owned();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some((id?, secret?, token))
}

#[cfg(test)]
mod tests {
    use super::parse_profile;

    #[test]
    fn reads_the_named_profile_only() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    [other]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n";
        assert_eq!(
            parse_profile(text, "default"),
            Some(("A".into(), "B".into(), None))
        );
        assert_eq!(
            parse_profile(text, "other"),
            Some(("C".into(), "D".into(), Some("E".into())))
        );
        assert_eq!(parse_profile(text, "missing"), None);
    }
}
