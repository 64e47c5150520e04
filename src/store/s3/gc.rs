//! `nixery gc` on a bucket: with `--max-storage`, evict the images least
//! recently pulled at any replica (each notes pulls in the bucket, at most
//! every few hours per image), built or confirmed current; then delete
//! every blob no kept manifest names, and the records that lead to those
//! blobs (with an image's: its referrers, so its NARs, and its Nix
//! closure, so that no replica serves those paths after).
//!
//! It runs while replicas serve and build. What keeps it from deleting a
//! blob a build is about to use:
//! - blobs written, and images built or pulled, within `--gc-keep-recent`
//!   are kept (a build uploads its blobs before the records that name
//!   them; the collection cannot see the replicas' leases);
//! - layer records go before their blobs, and blobs are deleted only when
//!   no build lease is live after that, so a build either started before
//!   (and is seen: nothing is deleted this time) or finds no record to
//!   reuse;
//! - one collection at a time, by a lease of its own.
//!
//! Not covered: a build that starts after that last check and reuses an
//! orphan (a blob a crashed build uploaded but never recorded) while it is
//! being deleted. The image then misses that blob; `verify --repair` finds
//! it and the image is built again.
//!
//! A replica that still has an evicted image in its database finds its
//! manifest gone and builds it again.

use super::lease::new_holder;
use super::{Bucket, Listed};
use crate::clock::now_unix;
use crate::digest::Digest;
use crate::oci::manifest::MANIFEST_MAX_BYTES;
use crate::oci::{named_by, Named};
use crate::store::db::{
    ImportedRecord, LayerRecord, ManifestRecord, PulledRecord, ReferrersRecord,
};
use crate::store::gc::{evictions, keep_with_forms, with_referrers, Image, Policy, Report};
use crate::store::{LeaseState, RecordKind, StoreError};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// The collection's own lease.
const LEASE: &str = "gc";
const LEASE_TTL: Duration = Duration::from_secs(15 * 60);
/// Small objects read, or objects deleted, at once.
const AT_ONCE: usize = 16;
/// Lease objects expired this long ago are removed (their holders died).
const DEAD_LEASE_AGE: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum BucketGcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another collection is running on this bucket (its lease ends in {0} s)")]
    Running(u64),
    #[error("--min-free-space has no meaning for a bucket; use --max-storage")]
    FreeSpace,
}

/// Runs one collection on the bucket; in a dry run nothing is changed and
/// the report says what would have been.
pub async fn collect(
    bucket: &Bucket,
    policy: &Policy,
    dry_run: bool,
) -> Result<Report, BucketGcError> {
    if policy.min_free_space.is_some() {
        return Err(BucketGcError::FreeSpace);
    }
    let lease = match bucket.try_lease(LEASE, &new_holder(), LEASE_TTL).await? {
        LeaseState::Acquired(l) => l,
        LeaseState::Held(left) => return Err(BucketGcError::Running(left.as_secs())),
    };
    let result = collect_holding_lease(bucket, policy, dry_run).await;
    if let Err(e) = bucket.release(&lease).await {
        tracing::warn!(error = %e, "could not release the collection's lease");
    }
    result
}

/// What the bucket holds, as read at the start of a collection.
struct Contents {
    blobs: Vec<Listed>,
    /// Cache key -> record.
    builds: Vec<(String, ManifestRecord)>,
    /// Every digest recorded as a manifest.
    listed: Vec<Digest>,
    /// Imported manifests and their names: never evicted.
    imported: Vec<(Digest, Vec<String>)>,
    /// When a replica last noted a pull of each manifest.
    pulled: HashMap<Digest, u64>,
    /// What each stored manifest names.
    parts: HashMap<Digest, Named>,
    /// What refers to each subject manifest.
    referrers: HashMap<Digest, ReferrersRecord>,
    /// Images whose Nix closure is recorded.
    closures: Vec<Digest>,
}

async fn read_contents(bucket: &Bucket) -> Result<Contents, StoreError> {
    let blobs = bucket.blobs().await?;
    let builds: Vec<(String, ManifestRecord)> = bucket
        .records(RecordKind::Manifest)
        .await?
        .into_iter()
        .filter_map(|(key, r)| Some((key, r?)))
        .collect();
    let listed: Vec<Digest> = bucket
        .record_keys(RecordKind::ManifestDigest)
        .await?
        .into_iter()
        .filter_map(|hex| Digest::from_hex(&hex).ok())
        .collect();
    let imported: Vec<(Digest, Vec<String>)> = bucket
        .records(RecordKind::Imported)
        .await?
        .into_iter()
        .filter_map(|(hex, r): (String, Option<ImportedRecord>)| {
            Some((Digest::from_hex(&hex).ok()?, r?.names))
        })
        .collect();
    let pulled: HashMap<Digest, u64> = bucket
        .records(RecordKind::Pulled)
        .await?
        .into_iter()
        .filter_map(|(hex, r): (String, Option<PulledRecord>)| {
            Some((Digest::from_hex(&hex).ok()?, r?.at))
        })
        .collect();
    let referrers: HashMap<Digest, ReferrersRecord> = bucket
        .records(RecordKind::Referrers)
        .await?
        .into_iter()
        .filter_map(|(hex, r): (String, Option<ReferrersRecord>)| {
            Some((Digest::from_hex(&hex).ok()?, r?))
        })
        .collect();
    let closures: Vec<Digest> = bucket
        .record_keys(RecordKind::NixClosure)
        .await?
        .into_iter()
        .filter_map(|hex| Digest::from_hex(&hex).ok())
        .collect();
    let sizes: HashMap<Digest, u64> = blobs.iter().map(|b| (b.digest, b.size)).collect();
    let manifests: BTreeSet<Digest> = builds
        .iter()
        .map(|(_, r)| r.digest)
        .chain(listed.iter().copied())
        .chain(imported.iter().map(|(d, _)| *d))
        .filter(|d| sizes.get(d).is_some_and(|&n| n <= MANIFEST_MAX_BYTES))
        .collect();
    let parts = futures::stream::iter(manifests.into_iter().map(|digest| async move {
        let bytes = bucket.small_blob(&digest, MANIFEST_MAX_BYTES).await?;
        Ok::<_, StoreError>(bytes.and_then(|b| Some((digest, named_by(&b)?))))
    }))
    .buffer_unordered(AT_ONCE)
    .try_filter_map(|p| async move { Ok(p) })
    .try_collect()
    .await?;
    Ok(Contents {
        blobs,
        builds,
        listed,
        imported,
        pulled,
        parts,
        referrers,
        closures,
    })
}

/// The images the bucket's build and import records keep, one per
/// manifest digest; those used after `recent` count as leased.
fn images(c: &Contents, recent: u64) -> Vec<Image> {
    // Last pulled, made or confirmed current; what it is called; imported.
    let mut by_digest: BTreeMap<Digest, (u64, String, bool)> = BTreeMap::new();
    for (key, r) in &c.builds {
        let name = format!("cached build {}", &key[..key.len().min(12)]);
        let used = r
            .checked_at
            .max(c.pulled.get(&r.digest).copied().unwrap_or(0));
        let entry = by_digest
            .entry(r.digest)
            .or_insert((0, name.clone(), false));
        if used >= entry.0 {
            (entry.0, entry.1) = (used, name);
        }
    }
    for (digest, names) in &c.imported {
        let name = format!("imported {}", names.join(", "));
        by_digest.insert(*digest, (0, name, true));
    }
    by_digest
        .into_iter()
        .map(|(manifest, (last_used, name, pinned))| {
            let mut blobs = vec![manifest];
            if let Some(Named::Image(parts)) = c.parts.get(&manifest) {
                blobs.extend(parts.iter().map(|(d, _)| *d));
            }
            let blobs = with_referrers(blobs, manifest, &c.referrers, &|d| c.parts.get(d).cloned());
            Image {
                manifest,
                last_used,
                image: Some(name),
                blobs,
                pinned,
                leased: last_used > recent,
            }
        })
        .collect()
}

async fn collect_holding_lease(
    bucket: &Bucket,
    policy: &Policy,
    dry_run: bool,
) -> Result<Report, BucketGcError> {
    let at = now_unix();
    let c = read_contents(bucket).await?;
    let sizes: HashMap<Digest, u64> = c.blobs.iter().map(|b| (b.digest, b.size)).collect();
    let bytes_before: u64 = sizes.values().sum();
    let recent = at.saturating_sub(policy.keep_recent.as_secs());

    let kept = images(&c, recent);
    let needed = policy
        .max_storage
        .map_or(0, |max| bytes_before.saturating_sub(max));
    let (chosen, evicted) = evictions(&kept, &sizes, needed);
    let evicted_digests: BTreeSet<Digest> = chosen.iter().map(|&i| kept[i].manifest).collect();
    let staying = kept
        .iter()
        .enumerate()
        .filter(|(i, _)| !chosen.contains(i))
        .map(|(_, img)| img);
    let (referenced, stale) = keep_with_forms(
        c.listed.clone(),
        |d| c.parts.get(d).cloned(),
        &c.referrers,
        staying,
    );

    // Young blobs stay: a build may be about to record them.
    let (unreferenced, young): (Vec<&Listed>, Vec<&Listed>) = c
        .blobs
        .iter()
        .filter(|b| !referenced.contains(&b.digest))
        .partition(|b| b.modified <= recent);
    let doomed: BTreeSet<Digest> = unreferenced.iter().map(|b| b.digest).collect();
    let mut report = Report {
        at,
        dry_run,
        bytes_before,
        bytes_after: bytes_before,
        evicted,
        blobs_deleted: 0,
        bytes_freed: 0,
        blobs_in_use: young.len(),
        leased: kept.iter().filter(|img| img.leased).count(),
        emergency: false,
        retry_in: None,
    };
    if dry_run {
        report.blobs_deleted = unreferenced.len();
        report.bytes_freed = unreferenced.iter().map(|b| b.size).sum();
        report.bytes_after = bytes_before - report.bytes_freed;
        return Ok(report);
    }

    // Records first, so that no replica follows one to a blob about to go.
    let mut records_gone: Vec<(RecordKind, String)> = c
        .builds
        .iter()
        .filter(|(_, r)| evicted_digests.contains(&r.digest))
        .map(|(key, _)| (RecordKind::Manifest, key.clone()))
        .collect();
    let young_blobs: BTreeSet<Digest> = young.iter().map(|b| b.digest).collect();
    // A young form may be one a replica is still recording.
    let stale_forms = stale.iter().filter(|d| !young_blobs.contains(d));
    let forms_gone = stale_forms.chain(&evicted_digests);
    records_gone.extend(forms_gone.map(|d| (RecordKind::ManifestDigest, d.hex())));
    // Pull notes of what goes, or of manifests no longer stored.
    let notes_gone = c
        .pulled
        .keys()
        .filter(|d| evicted_digests.contains(d) || !sizes.contains_key(d));
    records_gone.extend(notes_gone.map(|d| (RecordKind::Pulled, d.hex())));
    // What referred to a manifest that goes (a young one may be a form a
    // replica is still recording), and so the image's Nix closure: no
    // replica serves its paths after (those another kept image has stay
    // with that image's closure).
    let goes = |d: &&Digest| !referenced.contains(*d) && !young_blobs.contains(*d);
    let referrers_gone = c.referrers.keys().filter(goes);
    records_gone.extend(referrers_gone.map(|d| (RecordKind::Referrers, d.hex())));
    let closures_gone = c.closures.iter().filter(goes);
    records_gone.extend(closures_gone.map(|d| (RecordKind::NixClosure, d.hex())));
    for (key, r) in bucket.records::<LayerRecord>(RecordKind::Layer).await? {
        match r {
            Some(r) if !doomed.contains(&r.digest) => {}
            // Names a blob about to go, or cannot be read.
            _ => records_gone.push((RecordKind::Layer, key)),
        }
    }
    delete_all(records_gone.iter(), |(kind, key)| {
        bucket.delete_record(*kind, key)
    })
    .await?;

    if builds_running(bucket, at).await? {
        tracing::info!("builds are running: unreferenced blobs are left for the next collection");
        report.blobs_in_use += unreferenced.len();
    } else {
        // Manifests first: a replica that checks one finds it gone and
        // builds again, rather than serve one whose layers are going.
        let mut order: Vec<&&Listed> = unreferenced.iter().collect();
        order.sort_by_key(|b| !c.parts.contains_key(&b.digest));
        delete_all(order.into_iter(), |b| bucket.delete_blob(&b.digest)).await?;
        report.blobs_deleted = unreferenced.len();
        report.bytes_freed = unreferenced.iter().map(|b| b.size).sum();
        report.bytes_after = bytes_before - report.bytes_freed;
    }
    remove_dead_leases(bucket, at).await?;
    Ok(report)
}

async fn delete_all<T, F, Fut>(items: impl Iterator<Item = T>, delete: F) -> Result<(), StoreError>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    futures::stream::iter(items.map(delete))
        .buffer_unordered(AT_ONCE)
        .try_collect()
        .await
}

/// Whether a replica holds a live build lease.
async fn builds_running(bucket: &Bucket, now: u64) -> Result<bool, StoreError> {
    for name in bucket.lease_names().await? {
        if !name.starts_with("build-") {
            continue;
        }
        if bucket
            .lease(&name)
            .await?
            .is_some_and(|l| l.expires_at > now)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes lease objects whose holders died long ago.
async fn remove_dead_leases(bucket: &Bucket, now: u64) -> Result<(), StoreError> {
    for name in bucket.lease_names().await? {
        if name == LEASE {
            continue;
        }
        let dead = match bucket.lease(&name).await? {
            Some(l) => l.expires_at + DEAD_LEASE_AGE < now,
            None => false,
        };
        if dead {
            bucket.delete_lease(&name).await?;
        }
    }
    Ok(())
}
