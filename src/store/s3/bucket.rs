//! The bucket itself: how the client is made (endpoint, addressing,
//! credentials), where each kind of object is kept under the prefix, and
//! the listings and reads that the backend, `verify` and `gc` share.

use super::super::db::{self, Record};
use super::super::{ByteStream, RecordKind, StoreError};
use crate::blocking::feed_blocking;
use crate::digest::{Digest, HashingWriter};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig};
use std::ops::Range;
use std::time::Duration;

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
            s.push_str(" at ");
            s.push_str(&crate::redact::redact(e));
        }
        s
    }
}

pub(super) fn remote<'a>(
    op: &'static str,
    key: &'a Key,
) -> impl FnOnce(object_store::Error) -> StoreError + 'a {
    move |e| StoreError::remote(op, key.to_string(), &e)
}

/// Index records read at once when listing a kind.
const RECORD_READS_AT_ONCE: usize = 16;

/// A client for one bucket and prefix.
#[derive(Debug)]
pub struct Bucket {
    pub(super) client: AmazonS3,
    pub(super) settings: S3Settings,
}

/// A blob as listed: its digest, size and when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub digest: Digest,
    pub size: u64,
    /// Unix seconds.
    pub modified: u64,
}

impl Bucket {
    /// A client for the bucket. Credentials: `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), else the profile in
    /// `~/.aws/credentials` (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`),
    /// else web identity, container or instance metadata credentials.
    pub fn open(settings: S3Settings) -> Result<Bucket, StoreError> {
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
        let client = builder
            .build()
            .map_err(|e| StoreError::remote("configuring", settings.location(), &e))?;
        Ok(Bucket { client, settings })
    }

    pub(super) fn key(&self, rest: &str) -> Key {
        if self.settings.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.settings.prefix))
        }
    }

    pub(super) fn blob_key(&self, digest: &Digest) -> Key {
        self.key(&format!("blobs/sha256/{}", digest.hex()))
    }

    pub(super) fn record_key(&self, kind: RecordKind, key: &str) -> Key {
        self.key(&format!("index/{}/{key}", kind.dir()))
    }

    pub(super) fn lease_key(&self, name: &str) -> Key {
        self.key(&format!("leases/{name}"))
    }

    /// Every object under `rest` (relative to the prefix).
    async fn list(&self, rest: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let prefix = self.key(rest);
        self.client
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(remote("listing", &prefix))
    }

    /// Every stored blob (objects under `blobs/` named otherwise are
    /// not ours and left out).
    pub async fn blobs(&self) -> Result<Vec<Listed>, StoreError> {
        Ok(self
            .list("blobs/sha256")
            .await?
            .into_iter()
            .filter_map(|m| {
                let digest = Digest::from_hex(m.location.filename()?).ok()?;
                let modified = u64::try_from(m.last_modified.timestamp()).unwrap_or(0);
                Some(Listed {
                    digest,
                    size: m.size,
                    modified,
                })
            })
            .collect())
    }

    /// The keys of every index record of a kind.
    pub async fn record_keys(&self, kind: RecordKind) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list(&format!("index/{}", kind.dir()))
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect())
    }

    /// Every record of a kind, decoded (None where it cannot be), read
    /// [`RECORD_READS_AT_ONCE`] at a time.
    pub async fn records<T: Record>(
        &self,
        kind: RecordKind,
    ) -> Result<Vec<(String, Option<T>)>, StoreError> {
        let keys = self.record_keys(kind).await?;
        futures::stream::iter(keys.into_iter().map(|key| async move {
            let bytes = self.get_record(kind, &key).await?;
            // Gone meanwhile: overwritten or deleted by another process.
            Ok::<_, StoreError>(bytes.map(|b| (key, db::decode::<T>(&b))))
        }))
        .buffered(RECORD_READS_AT_ONCE)
        .try_filter_map(|r| async move { Ok(r) })
        .try_collect()
        .await
    }

    /// The names of every lease object.
    pub async fn lease_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list("leases")
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect())
    }

    /// An object's bytes, or None if there is none.
    pub(super) async fn get(&self, key: &Key) -> Result<Option<Bytes>, StoreError> {
        match self.client.get(key).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(remote("reading", key))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("reading", key)(e)),
        }
    }

    /// Removes an object; gone already is no error.
    pub(super) async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        match self.client.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote("deleting", key)(e)),
        }
    }

    pub async fn get_record(
        &self,
        kind: RecordKind,
        key: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        self.get(&self.record_key(kind, key)).await
    }

    pub async fn delete_record(&self, kind: RecordKind, key: &str) -> Result<(), StoreError> {
        self.delete(&self.record_key(kind, key)).await
    }

    pub async fn delete_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        self.delete(&self.blob_key(digest)).await
    }

    /// A blob's size as stored now; None if it is not stored.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = self.blob_key(digest);
        match self.client.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("looking up", &key)(e)),
        }
    }

    /// A whole small blob (a manifest), refusing more than `limit` bytes.
    pub async fn small_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        let key = self.blob_key(digest);
        let bytes = self.get(&key).await?;
        match bytes {
            Some(b) if b.len() as u64 > limit => Err(StoreError::TooLarge {
                digest: *digest,
                size: b.len() as u64,
                limit,
            }),
            other => Ok(other),
        }
    }

    /// The bytes of a stored blob in `range` (all of it when None), or
    /// None if it is not stored.
    pub async fn blob_stream(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<ByteStream>, StoreError> {
        let key = self.blob_key(digest);
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = match self.client.get_opts(&key, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(remote("reading", &key)(e)),
        };
        let key_name = key.to_string();
        Ok(Some(
            result
                .into_stream()
                .map_err(move |e| StoreError::remote("reading", key_name.clone(), &e))
                .boxed(),
        ))
    }

    /// What a stored blob's bytes hash to, and how many there are; None if
    /// it is gone. The hashing runs off the async workers, fed by the
    /// download through a short queue.
    pub async fn hash_blob(&self, digest: &Digest) -> Result<Option<(Digest, u64)>, StoreError> {
        let Some(stream) = self.blob_stream(digest, None).await? else {
            return Ok(None);
        };
        let hashed = feed_blocking(stream, |next| {
            let mut hashing = HashingWriter::new(std::io::sink());
            while let Some(chunk) = next() {
                // Writing to a sink cannot fail.
                let _ = std::io::Write::write_all(&mut hashing, &chunk);
            }
            let (_, digest, len) = hashing.finish();
            (digest, len)
        })
        .await?;
        Ok(Some(hashed))
    }
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
