//! The builder's side of shared storage: records read through the local
//! database to the bucket's index, blobs published from staging, and the
//! lease that makes one replica build an image while the others wait.

use super::{now_unix, BuildError, Builder};
use crate::digest::Digest;
use crate::oci::{named_by, Named};
use crate::store::db::{self, ImportedRecord, LayerRecord, ManifestRecord, PulledRecord, Record};
use crate::store::fill::copy_to_disk;
use crate::store::{Lease, LeaseState, RecordKind, Storage};
use std::sync::Arc;
use std::time::Duration;

/// How often a waiting replica looks for the holder's result.
const LEASE_POLL: Duration = Duration::from_millis(500);
/// A replica tells the bucket that an image is still pulled at most this
/// often (seconds): enough for the bucket's collector, which evicts by
/// days, and one small write per image and replica.
const PULL_NOTE_EVERY: u64 = 6 * 3600;
/// Images whose last note a replica remembers; beyond, it starts afresh
/// (and notes each again once).
const PULL_NOTES_KEPT: usize = 100_000;

/// Whether to build, or what another replica built meanwhile.
pub(super) enum Claim {
    Build(Option<LeaseGuard>),
    BuiltElsewhere(Digest),
}

/// Renews a lease in the background until dropped, then releases it.
pub(super) struct LeaseGuard {
    renewing: tokio::task::JoinHandle<()>,
    storage: Arc<dyn Storage>,
    lease: Lease,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renewing.abort();
        let (storage, lease) = (Arc::clone(&self.storage), self.lease.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = storage.release(&lease).await {
                    tracing::warn!(error = %e, lease = lease.name, "could not release a build lease");
                }
            });
        }
    }
}

async fn shared_record<T: Record>(
    storage: &dyn Storage,
    kind: RecordKind,
    key: &str,
) -> Result<Option<T>, BuildError> {
    if !storage.is_shared() {
        return Ok(None);
    }
    let bytes = storage.get_record(kind, key).await?;
    Ok(bytes.and_then(|b| db::decode(&b)))
}

impl Builder {
    /// The blob is where the backend keeps content (or still on this
    /// replica's disk, from which it was published before its record).
    pub(super) async fn stored(&self, digest: &Digest) -> Result<bool, BuildError> {
        if self.on_disk(digest, None).await? {
            return Ok(true);
        }
        Ok(self.storage.stat(digest).await?.is_some())
    }

    /// Copies an image's manifest (or index) and every blob it names from
    /// the bucket to this replica's disk, where tools that write files
    /// (export) read them. Nothing to do on the filesystem backend.
    pub async fn bring_local(&self, manifest: &Digest) -> Result<(), BuildError> {
        if !self.storage.is_shared() {
            return Ok(());
        }
        let mut manifests = vec![*manifest];
        while let Some(digest) = manifests.pop() {
            self.copy_if_missing(&digest).await?;
            let Some(bytes) = self.manifest_bytes(&digest).await? else {
                continue;
            };
            match named_by(&bytes) {
                Some(Named::Image(parts)) | Some(Named::Artifact { blobs: parts, .. }) => {
                    for (part, _) in parts {
                        self.copy_if_missing(&part).await?;
                    }
                }
                Some(Named::Index(children)) => manifests.extend(children.iter().map(|(d, _)| *d)),
                None => {}
            }
        }
        Ok(())
    }

    async fn copy_if_missing(&self, digest: &Digest) -> Result<(), BuildError> {
        if !self.on_disk(digest, None).await? {
            copy_to_disk(self.storage.as_ref(), &self.blobs, digest).await?;
        }
        Ok(())
    }

    /// Makes a blob packed into staging durable in the backend.
    pub(crate) async fn publish(&self, digest: &Digest) -> Result<(), BuildError> {
        let path = self.blobs.path_of(digest);
        self.storage.put_file(&path, digest).await?;
        Ok(())
    }

    /// The newer of this replica's record and the bucket's.
    pub(super) async fn manifest_record(
        &self,
        key: &str,
    ) -> Result<Option<ManifestRecord>, BuildError> {
        let local = self.db.manifest(key).await?;
        let fresh_enough = local.as_ref().is_some_and(|r| {
            now_unix().saturating_sub(r.checked_at) < self.settings.cache_ttl.as_secs()
        });
        if fresh_enough {
            return Ok(local);
        }
        let shared: Option<ManifestRecord> =
            shared_record(self.storage.as_ref(), RecordKind::Manifest, key).await?;
        match (local, shared) {
            (Some(l), Some(s)) if s.checked_at > l.checked_at => {
                self.db.put_manifest(key, &s).await?;
                Ok(Some(s))
            }
            (None, Some(s)) => {
                self.db.put_manifest(key, &s).await?;
                Ok(Some(s))
            }
            (local, _) => Ok(local),
        }
    }

    pub(super) async fn put_manifest_record(
        &self,
        key: &str,
        record: &ManifestRecord,
    ) -> Result<(), BuildError> {
        self.db.put_manifest(key, record).await?;
        if self.storage.is_shared() {
            let bytes = db::encode(record)?;
            self.storage
                .put_record(RecordKind::Manifest, key, bytes)
                .await?;
        }
        self.mark_manifest(&record.digest).await
    }

    /// Makes a stored manifest (or index) answer by its digest, here and
    /// at every replica.
    pub(crate) async fn mark_manifest(&self, digest: &Digest) -> Result<(), BuildError> {
        self.db.add_manifest_digest(digest).await?;
        if self.storage.is_shared() {
            self.storage
                .put_record(RecordKind::ManifestDigest, &digest.hex(), Vec::new())
                .await?;
        }
        Ok(())
    }

    /// Notes a pull of `digest` in the bucket, unless this replica did so
    /// less than [`PULL_NOTE_EVERY`] ago. In the background: a pull never
    /// waits for it, and a failure only costs the note.
    pub(super) fn note_shared_pull(&self, digest: Digest, now: u64) {
        if !self.storage.is_shared() {
            return;
        }
        let due = match self.shared_pulls.lock() {
            Ok(mut noted) => {
                if noted.len() >= PULL_NOTES_KEPT {
                    noted.clear();
                }
                let due = noted
                    .get(&digest)
                    .is_none_or(|&at| now.saturating_sub(at) >= PULL_NOTE_EVERY);
                if due {
                    noted.insert(digest, now);
                }
                due
            }
            Err(_) => false,
        };
        if !due {
            return;
        }
        let storage = Arc::clone(&self.storage);
        tokio::spawn(async move {
            let written = match db::encode(&PulledRecord { at: now }) {
                Ok(bytes) => {
                    storage
                        .put_record(RecordKind::Pulled, &digest.hex(), bytes)
                        .await
                }
                Err(e) => Err(crate::store::StoreError::Task(e.to_string())),
            };
            if let Err(e) = written {
                tracing::warn!(%digest, error = %e, "could not note a pull in the bucket");
            }
        });
    }

    /// Notes in the bucket that an imported manifest is kept under
    /// `name:tag`, so that its collector keeps it.
    pub async fn record_import(&self, name_tag: String, digest: &Digest) -> Result<(), BuildError> {
        if !self.storage.is_shared() {
            return Ok(());
        }
        let key = digest.hex();
        let mut record: ImportedRecord =
            shared_record(self.storage.as_ref(), RecordKind::Imported, &key)
                .await?
                .unwrap_or_default();
        if !record.names.contains(&name_tag) {
            record.names.push(name_tag);
            let bytes = db::encode(&record)?;
            self.storage
                .put_record(RecordKind::Imported, &key, bytes)
                .await?;
        }
        Ok(())
    }

    pub(super) async fn layer_record(&self, key: &str) -> Result<Option<LayerRecord>, BuildError> {
        if let Some(r) = self.db.layer(key).await? {
            return Ok(Some(r));
        }
        let shared: Option<LayerRecord> =
            shared_record(self.storage.as_ref(), RecordKind::Layer, key).await?;
        if let Some(r) = &shared {
            self.db.put_layer(key, r).await?;
        }
        Ok(shared)
    }

    /// Takes the build lease for an image key, or waits while another
    /// replica holds it and returns what that replica built.
    pub(super) async fn claim(&self, key: &str, tag: &str) -> Result<Claim, BuildError> {
        if !self.storage.is_shared() {
            return Ok(Claim::Build(None));
        }
        let name = format!("build-{key}");
        let ttl = self.settings.lease_ttl;
        let mut waited = false;
        loop {
            match self.storage.try_lease(&name, ttl).await? {
                LeaseState::Acquired(lease) => {
                    // A holder may have finished (and let go) just before
                    // we got it, whether or not we saw it building.
                    if let Some(d) = self.fresh_cached(key, tag).await? {
                        let _ = self.storage.release(&lease).await;
                        return Ok(Claim::BuiltElsewhere(d));
                    }
                    let storage = Arc::clone(&self.storage);
                    let renewed = lease.clone();
                    let renewing = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(ttl / 3).await;
                            if let Err(e) = storage.renew(&renewed, ttl).await {
                                tracing::warn!(error = %e, "could not renew a build lease");
                            }
                        }
                    });
                    return Ok(Claim::Build(Some(LeaseGuard {
                        renewing,
                        storage: Arc::clone(&self.storage),
                        lease,
                    })));
                }
                LeaseState::Held(left) => {
                    if !waited {
                        tracing::info!(key, "another replica is building this image; waiting");
                    }
                    waited = true;
                    tokio::time::sleep(left.min(LEASE_POLL)).await;
                    if let Some(d) = self.fresh_cached(key, tag).await? {
                        return Ok(Claim::BuiltElsewhere(d));
                    }
                }
            }
        }
    }

    /// Whether a manifest digest belongs to an image built here or by
    /// another replica.
    pub async fn is_manifest(&self, digest: &Digest) -> Result<bool, BuildError> {
        if self.hot().bytes(digest).is_some() || self.db.is_manifest(digest).await? {
            return Ok(true);
        }
        if !self.storage.is_shared() {
            return Ok(false);
        }
        Ok(self
            .storage
            .get_record(RecordKind::ManifestDigest, &digest.hex())
            .await?
            .is_some())
    }
}
