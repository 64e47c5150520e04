//! Runs the garbage collector in the background: on a timer, and soon after
//! a build finished or the disk filled up (also from outside: the free
//! space is looked at every flush). Also flushes the last-pulled times, so
//! they reach the disk in batches.

use crate::digest::Digest;
use crate::oci::manifest::{named_by, Named};
use crate::store::db::Db;
use crate::store::fs::BlobStore;
use crate::store::gc::{self, Policy, Report};
use crate::store::pulls::LastPulled;
use crate::store::scrub::{self, ScrubView, Scrubber};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How often last-pulled times are written.
const FLUSH_EVERY: Duration = Duration::from_secs(30);
/// How often a collection runs without being asked.
const COLLECT_EVERY: Duration = Duration::from_secs(300);
/// How much lower than a collection left it the free space must be, below
/// `--min-free-space`, for the flush to collect again: something other
/// than the server's own small writes filled the disk.
const FELL_BY: u64 = 1 << 20;

pub struct Collector {
    db: Db,
    blobs: BlobStore,
    pulls: Arc<LastPulled>,
    storage_path: PathBuf,
    policy: Policy,
    wake: Notify,
    last: Mutex<Option<Report>>,
    /// One collection at a time.
    running: tokio::sync::Mutex<()>,
    /// See [`Collector::generation`].
    generation: std::sync::atomic::AtomicU64,
    scrubber: Scrubber,
    /// The disk caches a shared bucket (see [`gc::collect`]).
    shared: bool,
    /// Free bytes when the last collection ended (`u64::MAX` before one).
    free_after: std::sync::atomic::AtomicU64,
    /// The last [`Overview`], when it was made and at which generation.
    overview: Mutex<Option<(std::time::Instant, u64, Arc<Overview>)>>,
}

/// What image pages need to know of every stored image, kept small: the
/// list of images with every blob they name is ~1 KB per image, and
/// working it out anew for each page left tens of MB of freed memory
/// stranded (idle RSS after the bench 38 MB instead of 23).
#[derive(Debug, Default)]
pub struct Overview {
    /// Manifests a collection may evict, in the order it would, each with
    /// whether a lease holds it; empty without a storage limit (nothing
    /// is evicted, and reading every image record to rank them left sled
    /// holding ~6 MB of pages for good).
    pub eviction_order: Vec<(Digest, bool)>,
    /// How many stored images name each blob named by more than one.
    pub images_per_blob: HashMap<Digest, u32>,
    /// The first 8 bytes of every manifest digest listed, sorted: whether an
    /// image just built is in this overview yet.
    counted: Vec<[u8; 8]>,
}

impl Overview {
    /// Whether any of `manifests` was stored when this was made.
    fn knows(&self, manifests: &[Digest]) -> bool {
        manifests
            .iter()
            .any(|m| self.counted.binary_search(&prefix(m)).is_ok())
    }
}

fn prefix(digest: &Digest) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(&digest.as_bytes()[..8]);
    out
}

/// How long an [`Overview`] is shown before it is worked out again (at
/// once after a collection deleted something): pulls reorder the
/// eviction line all the time, and a page a few seconds behind is fine.
const OVERVIEW_FOR: Duration = Duration::from_secs(5);

impl Collector {
    pub fn new(
        db: Db,
        blobs: BlobStore,
        storage_path: PathBuf,
        policy: Policy,
        scrub: (scrub::Settings, scrub::Counters),
        shared: bool,
    ) -> Arc<Self> {
        let scrubber = Scrubber::new(scrub.0, db.clone(), blobs.clone(), scrub.1);
        Arc::new(Collector {
            scrubber,
            db,
            blobs,
            pulls: Arc::default(),
            storage_path,
            policy,
            wake: Notify::new(),
            last: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
            generation: Default::default(),
            shared,
            free_after: std::sync::atomic::AtomicU64::new(u64::MAX),
            overview: Mutex::new(None),
        })
    }

    /// Grows with every collection that deleted blobs: what was known to
    /// be stored before may be gone.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every stored image as a collection sees it, with what each
    /// manifest names read once per manifest (for the image pages).
    /// Blocking.
    fn stored_images(&self) -> Result<Vec<gc::Image>, crate::store::db::DbError> {
        let pulled = self.pulls.all(&self.db)?;
        let (leased, _) = self.blobs.leased();
        gc::stored_images(&self.db, &self.blobs, &pulled, &leased)
    }

    /// The [`Overview`] of the stored images, at most [`OVERVIEW_FOR`]
    /// old, and worked out anew if it has none of `expected` (an image
    /// just built). Blocking (it may read every stored manifest); one
    /// caller works it out while the others wait for it.
    pub fn overview(
        &self,
        expected: &[Digest],
    ) -> Result<Arc<Overview>, crate::store::db::DbError> {
        let mut cached = self.overview.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation();
        if let Some((at, made_in, overview)) = cached.as_ref() {
            let knows = expected.is_empty() || overview.knows(expected);
            if *made_in == generation && at.elapsed() < OVERVIEW_FOR && knows {
                return Ok(Arc::clone(overview));
            }
        }
        let eviction_order = if self.policy.is_active() {
            let images = self.stored_images()?;
            gc::eviction_order(&images)
                .into_iter()
                .map(|i| (images[i].manifest, images[i].leased))
                .collect()
        } else {
            Vec::new()
        };
        let overview = Arc::new(Overview {
            eviction_order,
            ..images_per_blob(&self.db, &self.blobs)?
        });
        *cached = Some((std::time::Instant::now(), generation, Arc::clone(&overview)));
        Ok(overview)
    }

    /// What the scrub did since start.
    pub fn scrub_view(&self) -> ScrubView {
        self.scrubber.view()
    }

    /// Scrubs every `--scrub-interval` until the task is dropped; blobs it
    /// quarantines make what was known stored suspect, as a collection
    /// does.
    pub async fn scrub_in_background(self: Arc<Self>) {
        let bump = || {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        self.scrubber.run(bump).await;
    }

    /// Where pulls are noted (in memory).
    pub fn pulls(&self) -> &LastPulled {
        &self.pulls
    }

    /// The last collection's report, if one ran since start.
    pub fn last_report(&self) -> Option<Report> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks for a collection soon (after a build, or when a write found the
    /// disk full). Cheap; several requests make one run.
    pub fn wake(&self) {
        if self.policy.is_active() {
            self.wake.notify_one();
        }
    }

    /// Collects now, off the async workers.
    pub async fn collect(&self) -> Result<Report, gc::GcError> {
        let _one = self.running.lock().await;
        let (db, blobs, pulls) = (self.db.clone(), self.blobs.clone(), Arc::clone(&self.pulls));
        let (path, policy, shared) = (self.storage_path.clone(), self.policy, self.shared);
        let (report, free) = tokio::task::spawn_blocking(move || {
            let report = gc::collect(&db, &blobs, &pulls, &path, &policy, false, shared);
            restore_reserve(&path);
            (report, free_bytes(&path))
        })
        .await
        .map_err(|e| gc::GcError::Task(e.to_string()))?;
        let report = report?;
        self.free_after.store(
            free.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        if report.blobs_deleted > 0 && !report.dry_run {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// Writes pending last-pulled times, and sets the start-up reserve
    /// aside again if it was released and space was freed since; off the
    /// async workers. The free space after, if it could be read.
    pub async fn flush_pulls(&self) -> Option<u64> {
        let (db, pulls) = (self.db.clone(), Arc::clone(&self.pulls));
        let path = self.storage_path.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            restore_reserve(&path);
            (pulls.flush(&db), free_bytes(&path))
        });
        match flushed.await {
            Ok((Ok(_), free)) => return free,
            Ok((Err(e), _)) => tracing::warn!(error = %e, "could not record last pulls"),
            Err(e) => tracing::warn!(error = %e, "recording last pulls failed"),
        }
        None
    }

    /// Whether the free space is below `--min-free-space` now. Blocking
    /// (one `statvfs`).
    pub fn below_the_floor(&self) -> bool {
        self.is_below_the_floor(free_bytes(&self.storage_path))
    }

    /// Whether `free` (None: unknown) is below `--min-free-space`.
    fn is_below_the_floor(&self, free: Option<u64>) -> bool {
        matches!((self.policy.min_free_space, free), (Some(min), Some(free)) if free < min)
    }

    /// Whether `free` is below `--min-free-space` and well below what the
    /// last collection left: the disk filled from outside (builds and
    /// cache fills wake the collector themselves).
    fn filled_from_outside(&self, free: Option<u64>) -> bool {
        let after = self.free_after.load(std::sync::atomic::Ordering::Relaxed);
        self.is_below_the_floor(free) && free.is_some_and(|f| f.saturating_add(FELL_BY) < after)
    }

    /// Runs until the task is dropped: flushes pulls, and collects when
    /// woken, on the timer, or when a collection that left the store over
    /// a limit asked to run again (only if a limit is set).
    pub async fn run_in_background(self: Arc<Self>) {
        let mut since_collect = Duration::ZERO;
        let mut again = None;
        if self.policy.is_active() {
            again = self.run_logged().await;
        }
        loop {
            let wait = again.map_or(FLUSH_EVERY, |a: Duration| a.min(FLUSH_EVERY));
            let woken = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = self.wake.notified() => true,
            };
            since_collect += wait;
            again = again.map(|a| a.saturating_sub(wait));
            let free = self.flush_pulls().await;
            let due = again.is_some_and(|a| a.is_zero()) || self.filled_from_outside(free);
            if self.policy.is_active() && (woken || due || since_collect >= COLLECT_EVERY) {
                since_collect = Duration::ZERO;
                again = self.run_logged().await;
            }
        }
    }

    /// Collects; how long until it should run again, if it asked to.
    async fn run_logged(&self) -> Option<Duration> {
        match self.collect().await {
            Ok(report) => report.retry_in.map(Duration::from_secs),
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection failed");
                None
            }
        }
    }
}

/// How many stored images name each blob that several do, from every
/// manifest served (not from the image records: their pages would stay
/// in sled's cache), with the prefixes of the manifests listed. The
/// Docker and OCI forms of one image name the same config, so an image
/// counts once per config; indexes and artifacts name no layers of their
/// own. Blocking: reads every manifest. (No eviction line.)
fn images_per_blob(db: &Db, blobs: &BlobStore) -> Result<Overview, crate::store::db::DbError> {
    let manifests = db.manifest_digest_list()?;
    let mut configs = std::collections::HashSet::new();
    let mut per_blob: HashMap<Digest, u32> = HashMap::new();
    let mut counted = Vec::with_capacity(manifests.len());
    for manifest in &manifests {
        // Known even if not here (a replica's) or not an image: a page
        // asking for it must not work the overview out again each time.
        counted.push(prefix(manifest));
        let Ok(Some(bytes)) = blobs.get(manifest) else {
            continue;
        };
        let Some(Named::Image(parts)) = named_by(bytes.as_ref()) else {
            continue;
        };
        let Some(((config, _), layers)) = parts.split_first() else {
            continue;
        };
        if !configs.insert(*config) {
            continue;
        }
        for (layer, _) in layers {
            *per_blob.entry(*layer).or_default() += 1;
        }
    }
    // Only blobs shared by several images: a page shows others as 0.
    per_blob.retain(|_, n| *n > 1);
    per_blob.shrink_to_fit();
    counted.sort_unstable();
    Ok(Overview {
        eviction_order: Vec::new(),
        images_per_blob: per_blob,
        counted,
    })
}

/// Free bytes on the storage path's file system; None if unreadable.
/// Blocking.
fn free_bytes(storage: &std::path::Path) -> Option<u64> {
    crate::store::disk::free_bytes(storage).ok()
}

/// Sets the start-up reserve aside again once space allows. Blocking.
fn restore_reserve(storage: &std::path::Path) {
    if crate::store::reserve::restore(storage) {
        tracing::info!("space was freed: the start-up reserve is set aside again");
    }
}
