//! Garbage collection with a quota: evict the least recently pulled images
//! until the blobs fit in `max_storage` and the disk has `min_free_space`,
//! then delete every blob that no kept manifest references. An image's
//! blobs include those kept with it (its bills of materials, the NARs of
//! its store paths), so its eviction counts what they free. Blobs pinned by
//! a response or a build in flight are never deleted; images whose
//! manifest was just served are leased (see `leases`) and kept, unless the
//! free space is below `min_free_space`: then only pins hold, and an image
//! just built until its clients were answered and a grace after.
//!
//! Written against a few blob-store operations (list with sizes, stat,
//! delete unless pinned) so that other backends can provide them.

use crate::clock::now_unix;
use crate::digest::Digest;
use crate::oci::{named_by, Named};
use crate::store::db::{
    Db, DbError, ManifestRecord, PullRecord, ReferrerKind, ReferrersRecord, TagRecord, TagTree,
};
use crate::store::fs::{BlobError, BlobStore};
use crate::store::pulls::LastPulled;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// Attempts to delete unreferenced blobs while builds keep finishing.
const DELETE_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("cannot read the free space of {0}: {1}")]
    FreeSpace(String, std::io::Error),
    #[error("the collection task failed: {0}")]
    Task(String),
}

/// What the collector aims for; `None` limits are not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Most bytes of blobs kept.
    pub max_storage: Option<u64>,
    /// Least free bytes left on the storage path's file system.
    pub min_free_space: Option<u64>,
    /// How long serving a manifest keeps its image (each blob fetched
    /// renews it): the client is still fetching the blobs.
    pub lease: Duration,
    /// A bucket's collection only (it cannot see the replicas' leases):
    /// blobs written, and images pulled or built, within this are kept.
    pub keep_recent: Duration,
}

impl Policy {
    /// Whether there is any limit to enforce.
    pub fn is_active(&self) -> bool {
        self.max_storage.is_some() || self.min_free_space.is_some()
    }
}

/// An image the collector evicted (or would have, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evicted {
    pub manifest: String,
    /// The name it was last pulled by; `None` if never pulled.
    pub image: Option<String>,
    /// Unix seconds of its last pull (or build).
    pub last_used: u64,
}

/// What one collection did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Unix seconds when it ran.
    pub at: u64,
    pub dry_run: bool,
    /// Blob bytes stored before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub evicted: Vec<Evicted>,
    pub blobs_deleted: usize,
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because a response or build was using them.
    pub blobs_in_use: usize,
    /// Images kept because their manifest was just served (leased), or
    /// just built and not yet answered to its clients.
    pub leased: usize,
    /// The free space was below `min_free_space`: leases were not honoured
    /// (but for images just built, see [`crate::store::leases`]).
    pub emergency: bool,
    /// Still over a limit because of leases or blobs in use: seconds until
    /// the collection runs again.
    pub retry_in: Option<u64>,
}

/// An image as the collector sees it: its manifest, when it was last used
/// and every blob it needs.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub manifest: Digest,
    pub last_used: u64,
    pub image: Option<String>,
    pub blobs: Vec<Digest>,
    /// Imported: never rebuilt, so never evicted.
    pub pinned: bool,
    /// Its client may still be fetching it (leased, or for a bucket, used
    /// recently): not evicted.
    pub leased: bool,
}

/// What a stored manifest (its config and layers) or index (its
/// manifests) names; None if it cannot be read.
fn parts_of(blobs: &BlobStore, digest: &Digest) -> Option<Named> {
    let blob = blobs.get(digest).ok()??;
    named_by(blob.as_ref())
}

/// The manifest itself and the blobs it names; just the manifest if it
/// cannot be read.
fn blobs_of(blobs: &BlobStore, manifest: &Digest) -> Vec<Digest> {
    let mut out = vec![*manifest];
    if let Some(Named::Image(parts)) = parts_of(blobs, manifest) {
        out.extend(parts.into_iter().map(|(d, _)| d));
    }
    out.sort();
    out.dedup();
    out
}

/// Every blob to keep: those of the `kept` images, plus the forms served
/// besides their Docker manifests (an OCI manifest, an index over
/// platforms) whose every part is kept, plus whatever refers to a kept
/// manifest (`referrers`, followed transitively; a referrer that is a
/// manifest keeps what it names). The other forms and artifact manifests
/// come second: they are no longer served, and their blobs go.
/// `listed`: every digest recorded as a manifest; `parts_of`: what one
/// names.
pub(crate) fn keep_with_forms<'a>(
    listed: Vec<Digest>,
    parts_of: impl Fn(&Digest) -> Option<Named>,
    referrers: &HashMap<Digest, ReferrersRecord>,
    kept: impl Iterator<Item = &'a Image>,
) -> (BTreeSet<Digest>, Vec<Digest>) {
    let mut referenced = BTreeSet::new();
    let mut manifests = BTreeSet::new();
    for image in kept {
        manifests.insert(image.manifest);
        referenced.extend(image.blobs.iter().copied());
    }
    let (mut indexes, mut stale, mut artifacts) = (Vec::new(), Vec::new(), Vec::new());
    for digest in listed {
        if manifests.contains(&digest) {
            continue;
        }
        match parts_of(&digest) {
            Some(Named::Image(parts))
                if !parts.is_empty() && parts.iter().all(|(p, _)| referenced.contains(p)) =>
            {
                manifests.insert(digest);
            }
            Some(Named::Index(children)) => indexes.push((
                digest,
                children.into_iter().map(|(d, _)| d).collect::<Vec<_>>(),
            )),
            // Kept by the referrers record of its subject, below.
            Some(Named::Artifact { .. }) => artifacts.push(digest),
            _ => stale.push(digest),
        }
    }
    for (digest, children) in indexes {
        if !children.is_empty() && children.iter().all(|c| manifests.contains(c)) {
            manifests.insert(digest);
        } else {
            stale.push(digest);
        }
    }
    let subjects: Vec<Digest> = manifests.iter().copied().collect();
    referenced.extend(manifests);
    follow_referrers(subjects, referrers, &parts_of, &mut referenced);
    stale.extend(artifacts.into_iter().filter(|d| !referenced.contains(d)));
    (referenced, stale)
}

/// Adds to `kept` what refers to each of `subjects` and, for an artifact
/// manifest, what it names; transitively (a referrer may have referrers).
fn follow_referrers(
    mut subjects: Vec<Digest>,
    referrers: &HashMap<Digest, ReferrersRecord>,
    parts_of: &impl Fn(&Digest) -> Option<Named>,
    kept: &mut BTreeSet<Digest>,
) {
    while let Some(subject) = subjects.pop() {
        let Some(record) = referrers.get(&subject) else {
            continue;
        };
        for r in &record.referrers {
            if !kept.insert(r.digest) || r.kind != ReferrerKind::Manifest {
                continue;
            }
            if let Some(named) = parts_of(&r.digest) {
                kept.extend(named.blobs().iter().map(|(d, _)| *d));
            }
            subjects.push(r.digest);
        }
    }
}

/// An image's blobs (its manifest and what it names) with what refers to
/// its manifest, so that evicting it counts those bytes as freed.
pub(crate) fn with_referrers(
    blobs: Vec<Digest>,
    manifest: Digest,
    referrers: &HashMap<Digest, ReferrersRecord>,
    parts_of: &impl Fn(&Digest) -> Option<Named>,
) -> Vec<Digest> {
    let mut all: BTreeSet<Digest> = blobs.into_iter().collect();
    follow_referrers(vec![manifest], referrers, parts_of, &mut all);
    all.into_iter().collect()
}

/// What the database keeps images by: cached builds, last-built tags and
/// imported (pinned) tags with their platforms.
struct Records {
    manifests: Vec<(String, ManifestRecord)>,
    built: Vec<TagRecord>,
    pinned: Vec<TagRecord>,
}

impl Records {
    fn read(db: &Db) -> Result<Records, DbError> {
        let tags = |which| -> Result<Vec<TagRecord>, DbError> {
            Ok(db
                .tag_records(which)?
                .into_iter()
                .map(|(_, _, r)| r)
                .collect())
        };
        Ok(Records {
            manifests: db.manifests()?,
            built: tags(TagTree::Built)?,
            // Every platform of an image imported with several.
            pinned: tags(TagTree::Pinned)?
                .into_iter()
                .chain(db.all_pinned_platforms()?.into_iter().map(|(_, _, _, r)| r))
                .collect(),
        })
    }
}

/// The images the database keeps, one per manifest digest.
/// `leased`: blobs under a lease; an image is leased when its manifest is,
/// or every other blob it names (an OCI form of it was served).
fn images(
    records: &Records,
    pulls: &HashMap<Digest, PullRecord>,
    blobs: &BlobStore,
    referrers: &HashMap<Digest, ReferrersRecord>,
    leased: &HashSet<Digest>,
) -> Vec<Image> {
    images_with(
        records,
        pulls,
        leased,
        |d| blobs_of(blobs, d),
        |own, d| with_referrers(own, d, referrers, &|x| parts_of(blobs, x)),
    )
}

/// As [`images`], with what each manifest names from `own_blobs`, and
/// with what is kept with it (its referrers) added by `with_kept`.
fn images_with(
    records: &Records,
    pulls: &HashMap<Digest, PullRecord>,
    leased: &HashSet<Digest>,
    mut own_blobs: impl FnMut(&Digest) -> Vec<Digest>,
    with_kept: impl Fn(Vec<Digest>, Digest) -> Vec<Digest>,
) -> Vec<Image> {
    let mut by_digest: HashMap<Digest, (u64, bool)> = HashMap::new();
    let built = records
        .manifests
        .iter()
        .map(|(_, r)| (r.digest, r.checked_at));
    let tagged = records.built.iter().map(|r| (r.digest, r.at));
    for (digest, at) in built.chain(tagged) {
        let t = by_digest.entry(digest).or_insert((0, false));
        t.0 = t.0.max(at);
    }
    for r in &records.pinned {
        let t = by_digest.entry(r.digest).or_insert((0, true));
        t.0 = t.0.max(r.at);
        t.1 = true;
    }
    by_digest
        .into_iter()
        .map(|(manifest, (checked_at, pinned))| {
            let pull = pulls.get(&manifest);
            let own = own_blobs(&manifest);
            let mut parts = own.iter().filter(|b| **b != manifest).peekable();
            let leased = leased.contains(&manifest)
                || (parts.peek().is_some() && parts.all(|b| leased.contains(b)));
            Image {
                manifest,
                last_used: pull.map_or(checked_at, |p| p.at.max(checked_at)),
                image: pull.map(|p| p.image.clone()),
                blobs: with_kept(own, manifest),
                pinned,
                leased,
            }
        })
        .collect()
}

/// Which images to evict (indexes into `images`) and how to report them;
/// none when nothing is `needed`.
pub(crate) fn evictions(
    images: &[Image],
    sizes: &HashMap<Digest, u64>,
    needed: u64,
) -> (BTreeSet<usize>, Vec<Evicted>) {
    if needed == 0 {
        return (BTreeSet::new(), Vec::new());
    }
    // Reported in the order chosen: least recently used first.
    let order = choose_evictions(images, sizes, needed);
    let chosen: BTreeSet<usize> = order.iter().copied().collect();
    let evicted = order
        .iter()
        .map(|&i| Evicted {
            manifest: images[i].manifest.to_string(),
            image: images[i].image.clone(),
            last_used: images[i].last_used,
        })
        .collect();
    (chosen, evicted)
}

/// Which images to evict, least recently used first, so that at least
/// `needed` bytes become unreferenced; never a pinned or leased one.
fn choose_evictions(images: &[Image], sizes: &HashMap<Digest, u64>, needed: u64) -> Vec<usize> {
    let mut refs: HashMap<Digest, usize> = HashMap::new();
    for image in images {
        for b in &image.blobs {
            *refs.entry(*b).or_insert(0) += 1;
        }
    }
    let mut freeable: u64 = sizes
        .iter()
        .filter(|(d, _)| !refs.contains_key(d))
        .map(|(_, n)| n)
        .sum();
    let mut evict = Vec::new();
    for i in eviction_order(images) {
        if freeable >= needed {
            break;
        }
        if images[i].leased {
            continue;
        }
        for b in &images[i].blobs {
            if let Some(n) = refs.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    freeable += sizes.get(b).copied().unwrap_or(0);
                }
            }
        }
        evict.push(i);
    }
    evict
}

/// The images a collection may evict (indexes into `images`), in the
/// order it would: least recently used first; imported ones never (and
/// leased ones are skipped while their lease lasts).
pub(crate) fn eviction_order(images: &[Image]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..images.len()).filter(|&i| !images[i].pinned).collect();
    order.sort_by_key(|&i| (images[i].last_used, images[i].manifest));
    order
}

/// Every image the database keeps, as a collection sees it: one per
/// manifest, with when it was last used and the blobs it names. Reads
/// each manifest: blocking.
pub(crate) fn stored_images(
    db: &Db,
    blobs: &BlobStore,
    pulls: &HashMap<Digest, PullRecord>,
    leased: &HashSet<Digest>,
) -> Result<Vec<Image>, DbError> {
    let referrers: HashMap<_, _> = db.all_referrers()?.into_iter().collect();
    Ok(images(
        &Records::read(db)?,
        pulls,
        blobs,
        &referrers,
        leased,
    ))
}

/// Seconds before a collection held back by transfers in flight looks
/// again.
const RETRY_WHILE_IN_USE: u64 = 10;

/// Runs one collection. Blocking: call it off the async workers. In a dry
/// run nothing is changed and the report says what would have been.
/// `shared`: the disk caches a bucket, whose closures this replica
/// follows (`nixcache::shared`); they are not this collection's to prune.
pub fn collect(
    db: &Db,
    blobs: &BlobStore,
    pulls: &LastPulled,
    storage_path: &Path,
    policy: &Policy,
    dry_run: bool,
    shared: bool,
) -> Result<Report, GcError> {
    let free = || {
        crate::store::disk::free_bytes(storage_path)
            .map_err(|e| GcError::FreeSpace(storage_path.display().to_string(), e))
    };
    collect_measuring(db, blobs, pulls, &free, policy, dry_run, shared)
}

/// As [`collect`], with the free space measured by `free`.
fn collect_measuring(
    db: &Db,
    blobs: &BlobStore,
    pulls: &LastPulled,
    free: &dyn Fn() -> Result<u64, GcError>,
    policy: &Policy,
    dry_run: bool,
    shared: bool,
) -> Result<Report, GcError> {
    let at = now_unix();
    if !dry_run {
        pulls.flush(db)?;
    }
    let stored = blobs.list_blobs()?;
    let sizes: HashMap<Digest, u64> = stored.iter().copied().collect();
    let bytes_before: u64 = sizes.values().sum();
    let free_missing = short_of_free(policy, free)?;
    let over_quota = policy
        .max_storage
        .map_or(0, |max| bytes_before.saturating_sub(max));
    let needed = over_quota.max(free_missing);
    // Below the free-space floor only transfers in flight and images just
    // delivered are spared.
    let emergency = free_missing > 0;
    let (leased_blobs, _) = blobs.leased_in(emergency);

    let mut kept = stored_images(db, blobs, &pulls.all(db)?, &leased_blobs)?;
    hold_deliveries(&mut kept, blobs, emergency);
    let (chosen, evicted) = evictions(&kept, &freeable_sizes(&sizes, blobs, emergency), needed);
    let leased = kept
        .iter()
        .enumerate()
        .filter(|(i, img)| img.leased && !chosen.contains(i))
        .count();
    if emergency && !dry_run {
        tracing::warn!(
            free_short_by = free_missing,
            evicting = evicted.len(),
            "free space is below --min-free-space: evicting the least recently pulled images, leased or not"
        );
    }

    if dry_run {
        let staying = kept
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen.contains(i))
            .map(|(_, img)| img);
        let referrers: HashMap<_, _> = db.all_referrers()?.into_iter().collect();
        let (referenced, _) = keep_with_forms(
            db.manifest_digest_list()?,
            |d| parts_of(blobs, d),
            &referrers,
            staying,
        );
        let unreferenced: Vec<(Digest, u64)> = stored
            .into_iter()
            .filter(|(d, _)| !referenced.contains(d))
            .collect();
        let bytes_freed = unreferenced.iter().map(|(_, n)| n).sum();
        return Ok(Report {
            at,
            dry_run,
            bytes_before,
            bytes_after: bytes_before - bytes_freed,
            evicted,
            blobs_deleted: unreferenced.len(),
            bytes_freed,
            blobs_in_use: 0,
            leased,
            emergency,
            retry_in: None,
        });
    }

    for &i in &chosen {
        db.remove_image(&kept[i].manifest)?;
        if !shared {
            db.remove_nix_closure(&kept[i].manifest)?;
        }
    }
    let mut deleted = Vec::new();
    let mut candidates = 0;
    for _ in 0..DELETE_ATTEMPTS {
        // Read what is referenced only after noting the pin sets released
        // so far: a build that records its manifest after this point
        // changes the count, and the deletion below then refuses.
        let released = blobs.pins_released();
        let referrers: HashMap<_, _> = db.all_referrers()?.into_iter().collect();
        let staying = images(
            &Records::read(db)?,
            &HashMap::new(),
            blobs,
            &referrers,
            &HashSet::new(),
        );
        let (mut referenced, stale) = keep_with_forms(
            db.manifest_digest_list()?,
            |d| parts_of(blobs, d),
            &referrers,
            staying.iter(),
        );
        // The Nix cache's index follows: a closure whose manifest is
        // neither kept nor stored (a build in flight has stored it) goes;
        // the NARs of a build in flight are kept. On a bucket the closures
        // follow the bucket's, and NARs here are copies like any blob.
        let nars = db.prune_nix_paths(|m| {
            shared || referenced.contains(m) || matches!(blobs.stat_blob(m), Ok(Some(_)))
        })?;
        if !shared {
            referenced.extend(nars);
        }
        for digest in &stale {
            db.forget_manifest_digest(digest)?;
        }
        // What referred to a manifest that goes goes with it.
        for subject in referrers.keys().filter(|s| !referenced.contains(s)) {
            db.remove_referrers(subject)?;
        }
        let unreferenced: Vec<Digest> = blobs
            .list_blobs()?
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| !referenced.contains(d))
            .collect();
        candidates = unreferenced.len();
        if let Some(done) = blobs.delete_unless_pinned(&unreferenced, released, emergency)? {
            deleted = done;
            break;
        }
    }
    let pruned = db.prune_layers(|d| matches!(blobs.stat_blob(d), Ok(Some(_))))?;
    let names_forgotten = forget_names_without_a_page(db, pulls, shared)?;
    let bytes_freed: u64 = deleted.iter().map(|(_, n)| n).sum();
    let bytes_after = blobs.stats().1;
    let in_use = candidates - deleted.len();
    let still_over =
        policy.max_storage.is_some_and(|max| bytes_after > max) || short_of_free(policy, free)? > 0;
    let report = Report {
        at,
        dry_run,
        bytes_before,
        bytes_after,
        evicted,
        blobs_deleted: deleted.len(),
        bytes_freed,
        blobs_in_use: in_use,
        leased,
        emergency,
        retry_in: still_over
            .then(|| retry_in(blobs, emergency, leased > 0, in_use > 0))
            .flatten(),
    };
    tracing::info!(
        evicted = report.evicted.len(),
        blobs_deleted = report.blobs_deleted,
        bytes_freed = report.bytes_freed,
        bytes_after = report.bytes_after,
        leased = report.leased,
        blobs_in_use = report.blobs_in_use,
        retry_in = report.retry_in,
        layer_records_pruned = pruned,
        names_forgotten,
        "garbage collection done"
    );
    Ok(report)
}

/// Marks as leased (kept) the images whose manifest a build still pins, its
/// clients not answered yet, or whose delivery grace runs: evicting one
/// frees nothing now, and answers a successful build with
/// MANIFEST_UNKNOWN. Read after the records, pins first: a build pins its
/// manifest before recording it, and sets the grace before unpinning.
fn hold_deliveries(images: &mut [Image], blobs: &BlobStore, emergency: bool) {
    let pinned = blobs.pinned();
    let (leased, _) = blobs.leased_in(emergency);
    for image in images {
        if pinned.contains(&image.manifest) || leased.contains(&image.manifest) {
            image.leased = true;
        }
    }
}

/// Forgets the names that have no page any more (no image stored or last
/// pulled under the name, no build among the recent ones): their tags, so
/// they leave the list on `/`, and their pulls, all and per day, which
/// would otherwise pile up with every name ever evicted; how many.
/// Last pulls count for a replica, which serves what others built.
fn forget_names_without_a_page(
    db: &Db,
    pulls: &LastPulled,
    shared: bool,
) -> Result<usize, DbError> {
    let mut named: HashSet<String> = pulls.all(db)?.into_values().map(|p| p.image).collect();
    for which in [TagTree::Built, TagTree::Pinned] {
        named.extend(db.tag_records(which)?.into_iter().map(|(name, _, _)| name));
    }
    named.extend(db.builds()?.into_iter().map(|b| b.image));
    // A replica's disk caches the bucket: an image evicted here is still
    // served, so its name stays listed (only its pulls are forgotten).
    db.forget_names(|name| named.contains(name), !shared)
}

/// The blob sizes an eviction plan counts as freed. Below the free-space
/// floor a pinned blob (being sent, or a build's in flight) frees nothing
/// now: counted, it let the plan evict only the image being downloaded,
/// free next to nothing, and evict nothing more at each retry while the
/// transfer lasted. Above the floor it counts: its image goes as the
/// least recently used and the blob after its transfer (see `retry_in`),
/// rather than every other image for the sake of a quota.
fn freeable_sizes<'a>(
    sizes: &'a HashMap<Digest, u64>,
    blobs: &BlobStore,
    emergency: bool,
) -> Cow<'a, HashMap<Digest, u64>> {
    if !emergency {
        return Cow::Borrowed(sizes);
    }
    let pinned = blobs.pinned();
    Cow::Owned(
        sizes
            .iter()
            .filter(|(d, _)| !pinned.contains(d))
            .map(|(d, n)| (*d, *n))
            .collect(),
    )
}

/// Bytes missing to reach `min_free_space` (0 without that limit).
fn short_of_free(policy: &Policy, free: &dyn Fn() -> Result<u64, GcError>) -> Result<u64, GcError> {
    let Some(min) = policy.min_free_space else {
        return Ok(0);
    };
    Ok(min.saturating_sub(free()?))
}

/// When a collection that left the store over a limit should run again:
/// soon while transfers hold blobs, else just after the first lease ends
/// (in an `emergency` only deliveries' graces count), at once if the
/// leases that kept images (`leased`) ended while it ran; None when
/// nothing held anything back (more collections would not help). What
/// kept images without a live lease while something is pinned (always, in
/// an emergency) is a build whose clients are not answered yet: soon, as
/// for transfers (it may wait for a build of another platform).
fn retry_in(blobs: &BlobStore, emergency: bool, leased: bool, in_use: bool) -> Option<u64> {
    let first_end = blobs.leased_in(emergency).1;
    let lease_end = match first_end {
        Some(end) => Some(end.as_secs() + 1),
        // Kept by a build not answered yet (see `hold_deliveries`): as
        // for a transfer, not every second while it waits.
        None if leased && (emergency || !blobs.pinned().is_empty()) => Some(RETRY_WHILE_IN_USE),
        None if leased => Some(1),
        None => None,
    };
    let transfers = in_use.then_some(RETRY_WHILE_IN_USE);
    match (lease_end, transfers) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a size such as `50G`, `512M`, `1.5T` or `1000` (bytes); the
/// units are binary (K = 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: unknown unit (use K, M, G or T)")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 50G"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(n: u8, last_used: u64, blobs: &[u8]) -> Image {
        Image {
            manifest: Digest::of(&[n]),
            last_used,
            image: None,
            blobs: blobs.iter().map(|b| Digest::of(&[*b])).collect(),
            pinned: false,
            leased: false,
        }
    }

    #[test]
    fn evicts_least_recently_used_until_enough_is_unreferenced() {
        // Blob 9 is shared by every image; 100+ are each image's own.
        let sizes: HashMap<Digest, u64> = [(9, 1000), (100, 10), (101, 20), (102, 30), (50, 5)]
            .into_iter()
            .map(|(b, n)| (Digest::of(&[b]), n))
            .collect();
        let images = vec![
            image(1, 300, &[9, 100]),
            image(2, 100, &[9, 101]),
            image(3, 200, &[9, 102]),
        ];
        // Blob 50 is an orphan: 5 bytes free already.
        assert!(choose_evictions(&images, &sizes, 5).is_empty());
        assert_eq!(choose_evictions(&images, &sizes, 6), vec![1]);
        assert_eq!(choose_evictions(&images, &sizes, 26), vec![1, 2]);
        // The shared blob frees only with the last image.
        assert_eq!(choose_evictions(&images, &sizes, 1000), vec![1, 2, 0]);
        // Leased images are kept whatever the need, older ones still go.
        let mut with_leased = images.clone();
        with_leased[2].leased = true;
        assert_eq!(choose_evictions(&with_leased, &sizes, 1000), vec![1, 0]);
        // Imported images are never evicted.
        let mut with_pinned = images.clone();
        with_pinned[1].pinned = true;
        assert_eq!(choose_evictions(&with_pinned, &sizes, 26), vec![2]);
        assert_eq!(choose_evictions(&with_pinned, &sizes, 36), vec![2, 0]);
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("50G"), Ok(50 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10 MB"), Ok(10 << 20));
        for bad in ["", "G", "12X", "-1G", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn collects_evicted_images_and_orphans_but_not_pinned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        let put_image = |name: &str, layer: &[u8], at: u64| {
            let layer = blobs.put(layer).unwrap();
            let config = blobs.put(name.as_bytes()).unwrap();
            let manifest = serde_json::json!({
                "config": {"digest": config.to_string(), "size": name.len()},
                "layers": [{"digest": layer.to_string(), "size": 4000}],
            });
            let m = blobs.put(manifest.to_string().as_bytes()).unwrap();
            db.put_manifest(
                name,
                &ManifestRecord {
                    digest: m,
                    checked_at: at,
                    out_paths: vec![],
                    revision: None,
                },
            )
            .unwrap();
            pulls.touch(m, name, at);
            (m, layer)
        };
        let (old, old_layer) = put_image("old", &[1u8; 4000], 10);
        let (new, new_layer) = put_image("new", &[2u8; 4000], 20);
        // Forms served besides the Docker manifests: an OCI manifest of
        // each image, and an index naming the new one's.
        let form_of = |m: &Digest| {
            let docker: serde_json::Value =
                serde_json::from_slice(blobs.get(m).unwrap().unwrap().as_ref()).unwrap();
            let mut oci = docker.clone();
            oci["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
            let d = blobs.put(oci.to_string().as_bytes()).unwrap();
            db.add_manifest_digest(&d).unwrap();
            d
        };
        let (old_form, new_form) = (form_of(&old), form_of(&new));
        let index = serde_json::json!({"manifests": [{"digest": new_form.to_string(), "size": 1}]});
        let index = blobs.put(index.to_string().as_bytes()).unwrap();
        db.add_manifest_digest(&index).unwrap();
        // An artifact (document + manifest) referring to each image, and
        // a blob kept with the new one.
        let refer = |subject: &Digest, text: &[u8]| {
            let doc = blobs.put(text).unwrap();
            blobs.put(crate::oci::artifact::EMPTY_CONFIG).unwrap();
            let artifact = crate::oci::artifact::artifact_manifest(
                "application/spdx+json",
                crate::oci::artifact::ArtifactDescriptor {
                    media_type: "application/spdx+json".into(),
                    digest: doc,
                    size: text.len() as u64,
                    artifact_type: None,
                    annotations: Default::default(),
                },
                &crate::oci::manifest::Descriptor {
                    media_type: "m".into(),
                    size: 1,
                    digest: *subject,
                },
                &Default::default(),
            )
            .unwrap();
            let a = blobs.put(&artifact.json).unwrap();
            let referrer = |kind, digest, size| crate::store::db::Referrer {
                kind,
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                artifact_type: "application/spdx+json".into(),
                digest,
                size,
                annotations: vec![],
            };
            let kept_blob = blobs.put(&[text, b" nar"].concat()).unwrap();
            db.add_referrers(
                subject,
                &[
                    referrer(ReferrerKind::Manifest, a, artifact.json.len() as u64),
                    referrer(ReferrerKind::Blob, kept_blob, text.len() as u64 + 4),
                ],
            )
            .unwrap();
            (doc, a, kept_blob)
        };
        let old_refs = refer(&old, b"old sbom");
        let new_refs = refer(&new_form, b"new sbom");
        let orphan = blobs.put(b"orphan").unwrap();
        let pinned_orphan = blobs.put(b"pinned orphan").unwrap();
        let pin = blobs.pin(&pinned_orphan);
        let policy = Policy {
            max_storage: Some(6000),
            min_free_space: None,
            lease: Duration::ZERO,
            keep_recent: Duration::ZERO,
        };

        let dry = collect(&db, &blobs, &pulls, dir.path(), &policy, true, false).unwrap();
        assert_eq!(dry.evicted.len(), 1);
        assert!(blobs.stat_blob(&old_layer).unwrap().is_some());

        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert_eq!(report.evicted[0].manifest, old.to_string());
        assert_eq!(report.evicted[0].image.as_deref(), Some("old"));
        assert_eq!(report.blobs_in_use, 1);
        for gone in [
            old, old_layer, orphan, old_form, old_refs.0, old_refs.1, old_refs.2,
        ] {
            assert_eq!(blobs.stat_blob(&gone).unwrap(), None);
        }
        let empty = Digest::of(crate::oci::artifact::EMPTY_CONFIG);
        for kept in [
            new,
            new_layer,
            pinned_orphan,
            new_form,
            index,
            new_refs.0,
            new_refs.1,
            new_refs.2,
            empty,
        ] {
            assert!(blobs.stat_blob(&kept).unwrap().is_some());
        }
        assert_eq!(db.referrers(&old).unwrap(), None);
        assert!(!db.is_manifest(&old_refs.1).unwrap());
        assert_eq!(db.referrers(&new_form).unwrap().unwrap().referrers.len(), 2);
        assert!(db.is_manifest(&new_refs.1).unwrap());
        assert!(!db.is_manifest(&old_form).unwrap());
        assert!(db.is_manifest(&new_form).unwrap());
        assert!(db.manifest("old").unwrap().is_none());
        assert!(!db.is_manifest(&old).unwrap());
        assert!(db.manifest("new").unwrap().is_some());
        drop(pin);
        let again = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert_eq!((again.evicted.len(), again.blobs_deleted), (0, 1));
        assert_eq!(blobs.stats().1, again.bytes_after);
    }

    #[test]
    fn every_platform_of_an_import_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let image = |arch: &str| {
            let layer = blobs.put(arch.repeat(1000).as_bytes()).unwrap();
            let config = blobs.put(arch.as_bytes()).unwrap();
            let manifest = serde_json::json!({
                "config": {"digest": config.to_string(), "size": arch.len()},
                "layers": [{"digest": layer.to_string(), "size": 5000}],
            });
            let digest = blobs.put(manifest.to_string().as_bytes()).unwrap();
            (arch.to_owned(), TagRecord { digest, at: 1 }, layer)
        };
        let (amd64, arm64) = (image("amd64"), image("arm64"));
        db.put_tag_record(TagTree::Pinned, "a", "v1", &amd64.1)
            .unwrap();
        db.put_pinned_platforms(
            "a",
            "v1",
            &[
                (amd64.0.clone(), amd64.1.clone()),
                (arm64.0.clone(), arm64.1.clone()),
            ],
        )
        .unwrap();
        let policy = Policy {
            max_storage: Some(1),
            min_free_space: None,
            lease: Duration::ZERO,
            keep_recent: Duration::ZERO,
        };
        let pulls = LastPulled::default();
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert!(report.evicted.is_empty());
        for kept in [amd64.1.digest, amd64.2, arm64.1.digest, arm64.2] {
            assert!(blobs.stat_blob(&kept).unwrap().is_some());
        }
        assert!(db.is_manifest(&arm64.1.digest).unwrap());
    }

    #[test]
    fn a_build_finishing_during_collection_keeps_its_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let pins = blobs.pin_set();
        let building = blobs.pinning_into(&pins);
        let layer = building.put(b"fresh layer").unwrap();
        let released = blobs.pins_released();
        // The build records its manifest and lets go of its pins after the
        // collector looked: the deletion must refuse.
        drop(building);
        drop(pins);
        assert_eq!(
            blobs
                .delete_unless_pinned(&[layer], released, false)
                .unwrap(),
            None
        );
        assert!(blobs.stat_blob(&layer).unwrap().is_some());
    }

    /// An image with one layer of `fill` bytes, recorded as built and
    /// pulled at `at`.
    fn stored_image(db: &Db, blobs: &BlobStore, name: &str, fill: u8, at: u64) -> [Digest; 3] {
        let layer = blobs.put(&[fill; 4000]).unwrap();
        let config = blobs.put(name.as_bytes()).unwrap();
        let manifest = serde_json::json!({
            "config": {"digest": config.to_string(), "size": name.len()},
            "layers": [{"digest": layer.to_string(), "size": 4000}],
        });
        let m = blobs.put(manifest.to_string().as_bytes()).unwrap();
        let record = ManifestRecord {
            digest: m,
            checked_at: at,
            out_paths: vec![],
            revision: None,
        };
        db.put_manifest(name, &record).unwrap();
        [m, config, layer]
    }

    #[test]
    fn a_leased_image_is_kept_and_the_collection_comes_back_when_the_lease_ends() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        let old = stored_image(&db, &blobs, "old", 1, 10);
        let served = stored_image(&db, &blobs, "served", 2, 5);
        // Served as an OCI form: the lease names its config and layer only.
        let lease = Duration::from_secs(30);
        blobs.lease(
            "served",
            Digest::of(b"an OCI form"),
            served[1..].to_vec(),
            lease,
        );
        let policy = Policy {
            max_storage: Some(1),
            min_free_space: None,
            lease,
            keep_recent: Duration::ZERO,
        };
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert_eq!(report.evicted.len(), 1, "{report:?}");
        assert_eq!(report.evicted[0].manifest, old[0].to_string());
        assert_eq!(report.leased, 1);
        assert!(!report.emergency);
        let retry = report.retry_in.expect("over the quota while leased");
        assert!((1..=31).contains(&retry), "{retry}");
        for kept in served {
            assert!(blobs.stat_blob(&kept).unwrap().is_some());
        }
        for gone in old {
            assert!(blobs.stat_blob(&gone).unwrap().is_none());
        }
    }

    #[test]
    fn below_the_free_space_floor_leases_give_way_but_transfers_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        let leased = stored_image(&db, &blobs, "leased", 1, 10);
        let sending = stored_image(&db, &blobs, "sending", 2, 5);
        blobs.lease(
            "leased",
            leased[0],
            leased[1..].to_vec(),
            Duration::from_secs(600),
        );
        let transfer = blobs.open_blob(&sending[2]).unwrap().unwrap();
        let policy = Policy {
            max_storage: None,
            min_free_space: Some(u64::MAX),
            lease: Duration::from_secs(600),
            keep_recent: Duration::ZERO,
        };
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert!(report.emergency);
        let mut evicted: Vec<&str> = report.evicted.iter().map(|e| e.manifest.as_str()).collect();
        evicted.sort();
        let mut expected = [leased[0].to_string(), sending[0].to_string()];
        expected.sort();
        assert_eq!(evicted, expected, "leased or not");
        for gone in leased.iter().chain(&sending[..2]) {
            assert!(blobs.stat_blob(gone).unwrap().is_none());
        }
        assert!(blobs.stat_blob(&sending[2]).unwrap().is_some(), "in flight");
        assert_eq!(report.retry_in, Some(RETRY_WHILE_IN_USE));
        drop(transfer);
    }

    #[test]
    fn below_the_floor_an_image_just_built_stays_until_answered_and_its_grace_ends() {
        use crate::store::leases::DELIVERY_GRACE;
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        // A build in flight: its blobs were written pinned, then recorded,
        // then leased before its client is answered.
        let pins = blobs.pin_set();
        let built = stored_image(&db, &blobs.pinning_into(&pins), "built", 1, 10);
        let lease = Duration::from_secs(600);
        blobs.lease("built", built[0], built[1..].to_vec(), lease);
        pins.delivering(built[0], "built", built[1..].to_vec());
        let policy = Policy {
            max_storage: None,
            min_free_space: Some(u64::MAX),
            lease,
            keep_recent: Duration::ZERO,
        };
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert!(report.emergency);
        assert!(report.evicted.is_empty(), "{report:?}");
        assert_eq!(report.leased, 1);
        assert_eq!(
            report.retry_in,
            Some(RETRY_WHILE_IN_USE),
            "as for a transfer"
        );
        assert!(db.is_manifest(&built[0]).unwrap());

        // Answered: the grace holds it, and the collection comes back
        // when the grace ends.
        drop(pins);
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert!(report.evicted.is_empty(), "{report:?}");
        let retry = report.retry_in.expect("below the floor");
        assert!(
            (1..=DELIVERY_GRACE.as_secs() + 1).contains(&retry),
            "{retry}"
        );
        for kept in built {
            assert!(blobs.stat_blob(&kept).unwrap().is_some());
        }
    }

    /// On a replica of a bucket, the closures are the bucket's (followed,
    /// not pruned here), and a NAR on disk is a copy like any blob.
    #[test]
    fn a_replica_of_a_bucket_keeps_its_closures_but_not_its_nar_copies() {
        use crate::store::db::nix::{hash_part, ClosurePath, NarCompression, NarRecord};
        for shared in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let blobs = BlobStore::open(dir.path()).unwrap();
            let db = Db::open(&dir.path().join("db")).unwrap();
            let pulls = LastPulled::default();
            let image = stored_image(&db, &blobs, "image", 1, 10);
            // Another replica's image: neither recorded nor stored here.
            let elsewhere = Digest::of(b"built elsewhere");
            let path = format!("/nix/store/{}-p", "1".repeat(32));
            let closure = [ClosurePath {
                path: path.clone(),
                references: vec![],
                deriver: None,
            }];
            db.put_nix_closure(&image[0], &closure).unwrap();
            db.put_nix_closure(&elsewhere, &closure).unwrap();
            let file = blobs.put(b"a NAR").unwrap();
            let nar = NarRecord {
                nar_hash: Digest::of(b"nar"),
                nar_size: 3,
                file,
                file_size: 5,
                compression: NarCompression::Zstd,
            };
            db.set_nar(hash_part(&path).unwrap(), &nar).unwrap();
            let policy = Policy {
                max_storage: Some(1),
                min_free_space: None,
                lease: Duration::ZERO,
                keep_recent: Duration::ZERO,
            };
            let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, shared).unwrap();
            assert_eq!(report.evicted.len(), 1);
            for m in [image[0], elsewhere] {
                assert_eq!(db.nix_closure(&m).unwrap().is_some(), shared, "{shared}");
            }
            assert_eq!(
                db.nix_path(hash_part(&path).unwrap()).unwrap().is_some(),
                shared
            );
            assert!(blobs.stat_blob(&file).unwrap().is_none(), "{shared}");
        }
    }

    #[test]
    fn below_the_free_space_floor_a_blob_being_sent_frees_nothing_until_it_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        let sending = stored_image(&db, &blobs, "sending", 1, 5);
        let older = stored_image(&db, &blobs, "older", 2, 10);
        let newest = stored_image(&db, &blobs, "newest", 3, 20);
        // The least recently used image's 4000-byte layer is being sent.
        let transfer = blobs.open_blob(&sending[2]).unwrap().unwrap();
        let free = 1 << 30;
        let policy = Policy {
            max_storage: None,
            min_free_space: Some(free + 1000),
            lease: Duration::from_secs(600),
            keep_recent: Duration::ZERO,
        };
        let report =
            collect_measuring(&db, &blobs, &pulls, &|| Ok(free), &policy, false, false).unwrap();
        assert!(report.emergency);
        let evicted: Vec<&str> = report.evicted.iter().map(|e| e.manifest.as_str()).collect();
        // Least recently used first, until 1000 bytes are freed at once:
        // the layer in flight does not count.
        assert_eq!(
            evicted,
            [sending[0].to_string(), older[0].to_string()],
            "{report:?}"
        );
        assert!(blobs.stat_blob(&sending[2]).unwrap().is_some(), "in flight");
        assert!(blobs.stat_blob(&older[2]).unwrap().is_none());
        assert!(blobs.stat_blob(&newest[2]).unwrap().is_some());
        drop(transfer);
    }

    #[test]
    fn a_name_leaves_the_list_with_its_pulls_after_its_last_image_and_build() {
        use crate::store::db::{BuildOutcome, BuildRecord, TagRecord};
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let pulls = LastPulled::default();
        let mut kept_bytes = 0;
        for (name, at) in [("gone", 5), ("built-again", 6), ("kept", 20)] {
            let image = stored_image(&db, &blobs, name, at as u8, at);
            let record = TagRecord {
                digest: image[0],
                at,
            };
            db.put_tag_record(TagTree::Built, name, "latest", &record)
                .unwrap();
            pulls.touch(image[0], name, at);
            if name == "kept" {
                kept_bytes = image
                    .iter()
                    .map(|b| blobs.stat_blob(b).unwrap().unwrap())
                    .sum();
            }
        }
        // Its image goes, but its page stays with a build's record.
        db.add_build(&BuildRecord {
            image: "built-again".into(),
            tag: "latest".into(),
            started_at: 30,
            phases: vec![],
            layers_total: 1,
            layers_reused: 0,
            bytes_packed: 1,
            outcome: BuildOutcome::Failed {
                message: "m".into(),
                stderr_tail: String::new(),
            },
            revision: None,
            nix_processes: 1,
            evaluated: 1,
        })
        .unwrap();
        let names = ["gone", "built-again", "kept", "never-stored"];
        let day: HashMap<String, u64> = names.iter().map(|n| (n.to_string(), 1)).collect();
        db.add_image_pulls(&day, 86_400).unwrap();
        db.add_manifest_requests(0, 0, &day).unwrap();
        let policy = Policy {
            max_storage: Some(kept_bytes),
            min_free_space: None,
            lease: Duration::ZERO,
            keep_recent: Duration::ZERO,
        };
        let report = collect(&db, &blobs, &pulls, dir.path(), &policy, false, false).unwrap();
        assert_eq!(report.evicted.len(), 2, "{report:?}");
        let days = |name| db.image_pulls(name).unwrap().days;
        assert_eq!(days("gone"), vec![]);
        assert_eq!(days("never-stored"), vec![]);
        assert_eq!(days("built-again"), vec![(86_400, 1)]);
        assert_eq!(days("kept"), vec![(86_400, 1)]);
        let (_, listed) = db.image_names("", 0, 10).unwrap();
        let listed: Vec<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(listed, ["built-again", "kept"]);
        let mut totals = db.pulls().unwrap();
        totals.sort();
        assert_eq!(totals, [("built-again".into(), 1), ("kept".into(), 1)]);
    }
}
