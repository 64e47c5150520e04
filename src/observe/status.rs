//! What the server is doing and has done, for the admin page and metrics:
//! builds in flight with their phase and progress, and the bookkeeping the
//! builder reports into when a build ends or a manifest is asked for.

use crate::clock::now_unix;
use crate::observe::history::History;
use crate::observe::metrics::{BuildResult, CacheResult, Metrics};
use crate::store::db::{BuildOutcome, BuildRecord, Db, ErrorRecord, Lookup};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Where a build in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Queued,
    Resolving,
    Building,
    Packing,
    WritingManifest,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Queued,
        Phase::Resolving,
        Phase::Building,
        Phase::Packing,
        Phase::WritingManifest,
    ];

    fn from_u8(n: u8) -> Phase {
        Phase::ALL
            .get(usize::from(n))
            .copied()
            .unwrap_or(Phase::Queued)
    }

    /// Stable name for scripts.
    pub fn id(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Resolving => "resolving",
            Phase::Building => "building",
            Phase::Packing => "packing",
            Phase::WritingManifest => "writing_manifest",
        }
    }

    /// What the page shows.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Queued => "waiting for a build slot",
            Phase::Resolving => "resolving packages",
            Phase::Building => "building with Nix",
            Phase::Packing => "packing layers",
            Phase::WritingManifest => "writing manifest",
        }
    }
}

struct LiveState {
    image: String,
    tag: String,
    started_at: u64,
    started: Instant,
    phase: AtomicU8,
    layers_total: AtomicU64,
    layers_done: AtomicU64,
    bytes: Arc<AtomicU64>,
}

type LiveMap = Arc<Mutex<BTreeMap<u64, Arc<LiveState>>>>;

/// A map stays usable after a panic elsewhere: its entries are plain data.
fn lock(map: &LiveMap) -> MutexGuard<'_, BTreeMap<u64, Arc<LiveState>>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A build in flight; dropping it (whatever the outcome) takes it off the
/// list.
pub struct LiveBuild {
    id: u64,
    state: Arc<LiveState>,
    live: LiveMap,
    metrics: Arc<Metrics>,
}

impl LiveBuild {
    pub fn enter(&self, phase: Phase) {
        self.state.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn set_layers_total(&self, n: u64) {
        self.state.layers_total.store(n, Ordering::Relaxed);
    }

    pub fn layers_total(&self) -> u64 {
        self.state.layers_total.load(Ordering::Relaxed)
    }

    pub fn layer_done(&self) {
        self.state.layers_done.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter the packers add written bytes to.
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.state.bytes)
    }
}

impl Drop for LiveBuild {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.id);
        self.metrics.build_ended();
    }
}

/// A build in flight as the page and `/api/status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub image: String,
    pub tag: String,
    pub phase: &'static str,
    pub phase_label: &'static str,
    pub started_at: u64,
    pub elapsed_ms: u64,
    pub layers_done: u64,
    pub layers_total: u64,
    pub bytes_written: u64,
}

/// What the operator configured, shown on the page as is.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub version: &'static str,
    pub source: String,
    pub storage_path: String,
    /// `filesystem` or `s3`.
    pub storage_backend: String,
    /// The directory, or the bucket, prefix and endpoint (no credentials).
    pub storage_location: String,
}

/// Manifest requests counted in memory since the last write to the
/// database, so that a warm pull writes nothing.
#[derive(Debug, Default)]
struct PendingCounts {
    hits: u64,
    misses: u64,
    pulls: HashMap<String, u64>,
}

/// An image served from cache because its source could not be reached.
#[derive(Debug, Clone, Serialize)]
pub struct StaleServe {
    pub image: String,
    pub tag: String,
    /// Unix seconds when it was served so.
    pub at: u64,
    /// Unix seconds of the build (or last check) that was served.
    pub built_at: u64,
    pub error: String,
}

/// Stale serves kept for the page: the newest per image and tag.
const STALE_KEPT: usize = 20;

pub struct Status {
    db: Db,
    stale: Mutex<Vec<StaleServe>>,
    metrics: Arc<Metrics>,
    instance: Instance,
    next_id: AtomicU64,
    live: LiveMap,
    pending: Mutex<PendingCounts>,
    history: History,
}

impl Status {
    pub fn new(db: Db, instance: Instance) -> Arc<Self> {
        Arc::new(Status {
            db,
            metrics: Arc::new(Metrics::new()),
            instance,
            next_id: AtomicU64::new(0),
            live: LiveMap::default(),
            pending: Mutex::default(),
            stale: Mutex::default(),
            history: History::default(),
        })
    }

    /// Counts over time, for the admin page's plots.
    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Notes that a cached image was served because its source could not
    /// be reached; the page shows the newest few.
    pub fn served_stale(&self, image: &str, tag: &str, error: &str, built_at: u64) {
        let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        stale.retain(|s| !(s.image == image && s.tag == tag));
        stale.insert(
            0,
            StaleServe {
                image: image.to_owned(),
                tag: tag.to_owned(),
                at: now_unix(),
                built_at,
                error: error.to_owned(),
            },
        );
        stale.truncate(STALE_KEPT);
    }

    /// Images served stale, newest first.
    pub fn stale(&self) -> Vec<StaleServe> {
        self.stale.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Lists a build as in flight (waiting for a slot) until the returned
    /// handle is dropped.
    pub fn build_started(&self, image: &str, tag: &str) -> LiveBuild {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LiveState {
            image: image.to_owned(),
            tag: tag.to_owned(),
            started_at: now_unix(),
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Queued as u8),
            layers_total: AtomicU64::new(0),
            layers_done: AtomicU64::new(0),
            bytes: Arc::new(AtomicU64::new(0)),
        });
        lock(&self.live).insert(id, Arc::clone(&state));
        self.metrics.build_started();
        self.history.build_started(state.started_at);
        LiveBuild {
            id,
            state,
            live: Arc::clone(&self.live),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// Builds in flight, oldest first.
    pub fn in_flight(&self) -> Vec<InFlight> {
        lock(&self.live)
            .values()
            .map(|s| {
                let phase = Phase::from_u8(s.phase.load(Ordering::Relaxed));
                InFlight {
                    image: s.image.clone(),
                    tag: s.tag.clone(),
                    phase: phase.id(),
                    phase_label: phase.label(),
                    started_at: s.started_at,
                    elapsed_ms: s.started.elapsed().as_millis() as u64,
                    layers_done: s.layers_done.load(Ordering::Relaxed),
                    layers_total: s.layers_total.load(Ordering::Relaxed),
                    bytes_written: s.bytes.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// A build ended: metrics, and an error record if it failed.
    pub fn build_finished(&self, record: &BuildRecord) {
        let error = match &record.outcome {
            BuildOutcome::Success { .. } => None,
            BuildOutcome::PackagesNotFound(names) => Some((
                BuildResult::not_found,
                format!("packages not found: {}", names.join(", ")),
                String::new(),
            )),
            BuildOutcome::Failed {
                message,
                stderr_tail,
            } => Some((BuildResult::failed, message.clone(), stderr_tail.clone())),
        };
        let reused = record.layers_reused as u64;
        let built = (record.layers_total as u64).saturating_sub(reused);
        let result = error.as_ref().map_or(BuildResult::success, |e| e.0);
        self.metrics
            .build_finished(result, &record.phases, reused, built);
        let duration_ms = record.phases.iter().map(|(_, ms)| ms).sum();
        self.history
            .build_finished(now_unix(), error.is_none(), duration_ms);
        if let Some((_, message, stderr_tail)) = error {
            let error = ErrorRecord {
                image: record.image.clone(),
                tag: record.tag.clone(),
                at: now_unix(),
                message,
                stderr_tail,
            };
            if let Err(e) = self.db.add_error(&error) {
                tracing::warn!(error = %e, "could not record a build error");
            }
        }
    }

    /// A manifest request by tag was answered from the cache (hit) or went
    /// to a build (miss); `served` when it got a manifest.
    pub fn manifest_requested(&self, image: &str, lookup: Lookup, served: bool) {
        self.metrics.manifest_lookup(match lookup {
            Lookup::Hit => CacheResult::hit,
            Lookup::Miss => CacheResult::miss,
        });
        self.history
            .manifest_requested(now_unix(), lookup == Lookup::Hit, served);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match lookup {
            Lookup::Hit => pending.hits += 1,
            Lookup::Miss => pending.misses += 1,
        }
        if served {
            match pending.pulls.get_mut(image) {
                Some(n) => *n += 1,
                None => {
                    pending.pulls.insert(image.to_owned(), 1);
                }
            }
        }
    }

    /// Bytes of a blob body handed to a client.
    pub fn blob_bytes_sent(&self, n: u64) {
        self.metrics.blob_bytes(n);
        self.history.blob_bytes(now_unix(), n);
    }

    /// Writes the manifest requests counted in memory to the database; the
    /// server calls it every few seconds, at shutdown and before reading
    /// the counts. Blocking.
    pub fn flush_counts(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = self
            .db
            .add_manifest_requests(pending.hits, pending.misses, &pending.pulls)
        {
            tracing::warn!(error = %e, "could not record manifest request counts");
        }
        let now = now_unix();
        if let Err(e) = self.db.add_image_pulls(&pending.pulls, now - now % 86_400) {
            tracing::warn!(error = %e, "could not record pulls per day");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn status(dir: &std::path::Path) -> Arc<Status> {
        let db = Db::open(dir).unwrap();
        Status::new(
            db,
            Instance {
                version: "0",
                source: "path:/p".into(),
                storage_path: "/s".into(),
                storage_backend: "filesystem".into(),
                storage_location: "/s".into(),
            },
        )
    }

    #[test]
    fn live_builds_show_progress_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = status(dir.path());
        let a = s.build_started("hello", "latest");
        let b = s.build_started("shell", "v1");
        a.enter(Phase::Packing);
        a.set_layers_total(3);
        a.layer_done();
        a.bytes_counter().fetch_add(42, Ordering::Relaxed);
        let live = s.in_flight();
        assert_eq!(live.len(), 2);
        assert_eq!(
            (live[0].image.as_str(), live[0].phase, live[0].layers_done),
            ("hello", "packing", 1)
        );
        assert_eq!((live[0].layers_total, live[0].bytes_written), (3, 42));
        assert_eq!(live[1].phase_label, "waiting for a build slot");
        drop(a);
        assert_eq!(s.in_flight().len(), 1);
        drop(b);
        assert!(s.in_flight().is_empty());
        assert!(s
            .metrics()
            .encode()
            .unwrap()
            .contains("nixery_builds_in_flight 0"));
    }

    #[test]
    fn failed_builds_become_error_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = status(dir.path());
        let record = |outcome| BuildRecord {
            image: "broken".into(),
            tag: "latest".into(),
            started_at: 1,
            phases: vec![("resolve".into(), 5)],
            layers_total: 0,
            layers_reused: 0,
            bytes_packed: 0,
            outcome,
            revision: None,
            nix_processes: 1,
            evaluated: 1,
        };
        s.build_finished(&record(BuildOutcome::Success {
            manifest: Digest::of(b"m"),
        }));
        s.build_finished(&record(BuildOutcome::PackagesNotFound(vec!["x".into()])));
        s.build_finished(&record(BuildOutcome::Failed {
            message: "nix realise failed".into(),
            stderr_tail: "boom".into(),
        }));
        let errors = s.db.errors().unwrap();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].stderr_tail, "boom");
        assert_eq!(errors[1].message, "packages not found: x");
        s.manifest_requested("hello", Lookup::Hit, true);
        s.manifest_requested("hello", Lookup::Miss, true);
        s.manifest_requested("hello", Lookup::Hit, true);
        s.manifest_requested("gone", Lookup::Miss, false);
        // Counted in memory: nothing written until the flush.
        assert_eq!(s.db.lookups().unwrap(), (0, 0));
        s.flush_counts();
        assert_eq!(s.db.lookups().unwrap(), (2, 2));
        assert_eq!(s.db.pulls().unwrap(), vec![("hello".into(), 3)]);
        s.flush_counts();
        assert_eq!(s.db.lookups().unwrap(), (2, 2));
        let text = s.metrics().encode().unwrap();
        assert!(text.contains("nixery_builds_total{result=\"failed\"} 1"));
        assert!(text.contains("nixery_manifest_cache_lookups_total{result=\"hit\"} 2"));
    }
}
