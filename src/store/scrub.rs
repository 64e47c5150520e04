//! Scrubbing: every `--scrub-interval` the stored blobs are hashed again,
//! at most `--scrub-rate` bytes a second and never while a response or a
//! build holds a blob (it waits until they are done). A blob whose bytes do
//! not match its digest was damaged from outside: it is moved aside to
//! `quarantine/` (never served again), and the records that lead to it are
//! dropped as `verify --repair` drops them, so its images are built again
//! on their next pull; imported ones are reported broken.

use crate::clock::now_unix;
use crate::digest::Digest;
use crate::mirror::check::{findings_for, repair};
use crate::store::db::Db;
use crate::store::fs::{BlobError, BlobStore};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first pass starts this long after start at the latest: a server
/// restarted more often than the interval still scrubs.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(3600);
/// How long to wait, while clients hold blobs, before looking again.
const PAUSE: Duration = Duration::from_millis(250);
/// Quarantined blobs listed on the status (the count covers all).
const LISTED: usize = 50;

/// How often and how fast; `interval` None: never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Option<Duration>,
    /// Bytes hashed per second at most.
    pub rate: u64,
}

/// The metrics the scrubber adds to.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub bytes: Counter,
    pub quarantined: Counter,
}

/// A blob found damaged and moved aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    pub digest: String,
    /// Unix seconds.
    pub at: u64,
    /// Cached builds forgotten: built again on their next pull.
    pub rebuild: usize,
    /// Imported images that cannot be served any more: import them again.
    pub broken_imports: Vec<String>,
}

/// What the scrubber did since start, for the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubView {
    /// Seconds between passes; None: scrubbing is off.
    pub interval: Option<u64>,
    pub rate: u64,
    pub running: bool,
    pub passes: u64,
    /// Unix seconds when the last pass ended.
    pub last_pass: Option<u64>,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Times it waited for clients to finish.
    pub pauses: u64,
    pub quarantined_total: u64,
    /// Newest first, at most [`LISTED`].
    pub quarantined: Vec<Quarantined>,
}

pub struct Scrubber {
    settings: Settings,
    db: Db,
    blobs: BlobStore,
    counters: Counters,
    view: Mutex<ScrubView>,
}

impl Scrubber {
    pub fn new(settings: Settings, db: Db, blobs: BlobStore, counters: Counters) -> Scrubber {
        let view = ScrubView {
            interval: settings.interval.map(|i| i.as_secs()),
            rate: settings.rate,
            ..ScrubView::default()
        };
        Scrubber {
            settings,
            db,
            blobs,
            counters,
            view: Mutex::new(view),
        }
    }

    pub fn view(&self) -> ScrubView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ScrubView)) {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Passes every interval until the task is dropped; `quarantined` runs
    /// after blobs were moved aside (what was known stored may be gone).
    pub async fn run(&self, quarantined: impl Fn()) {
        let Some(interval) = self.settings.interval else {
            return;
        };
        tokio::time::sleep(interval.min(FIRST_PASS_AFTER)).await;
        loop {
            self.update(|v| v.running = true);
            self.pass(&quarantined).await;
            self.update(|v| {
                v.running = false;
                v.passes += 1;
                v.last_pass = Some(now_unix());
            });
            tokio::time::sleep(interval).await;
        }
    }

    /// One pass over every stored blob.
    async fn pass(&self, quarantined: &impl Fn()) {
        let blobs = self.blobs.clone();
        let list = move || Ok::<_, crate::store::StoreError>(blobs.list_blobs()?);
        let listed = match crate::blocking::blocking(list).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "scrub: cannot list the blobs");
                return;
            }
        };
        for (digest, _) in listed {
            let (blobs, rate) = (self.blobs.clone(), self.settings.rate);
            let checked = tokio::task::spawn_blocking(move || check_paced(&blobs, &digest, rate))
                .await
                .map_err(|e| BlobError::Io {
                    op: "scrubbing",
                    path: digest.to_string().into(),
                    source: std::io::Error::other(e.to_string()),
                });
            match checked.and_then(|r| r) {
                Ok(Checked {
                    whole,
                    bytes,
                    pauses,
                }) => {
                    self.counters.bytes.inc_by(bytes);
                    self.update(|v| {
                        v.blobs_checked += 1;
                        v.bytes_checked += bytes;
                        v.pauses += pauses;
                    });
                    if !whole {
                        self.quarantine(digest).await;
                        quarantined();
                    }
                }
                // Deleted since it was listed: no damage.
                Err(BlobError::NotFound(_)) => {}
                Err(e) => tracing::warn!(%digest, error = %e, "scrub: cannot check a blob"),
            }
        }
    }

    async fn quarantine(&self, digest: Digest) {
        let (blobs, db) = (self.blobs.clone(), self.db.clone());
        let done = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            blobs.quarantine(&digest)?;
            let findings = findings_for(&blobs, &db, BTreeSet::from([digest]))?;
            Ok(repair(&blobs, &db, &findings)?)
        })
        .await;
        let repaired = match done {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(%digest, error = %e, "scrub: could not quarantine a damaged blob");
                return;
            }
            Err(e) => {
                tracing::error!(%digest, error = %e, "scrub: quarantining failed");
                return;
            }
        };
        tracing::error!(%digest, rebuild = repaired.rebuild, broken_imports = ?repaired.lost,
            "scrub: a blob's bytes do not match its digest: moved to quarantine/, its images are built again on their next pull");
        self.counters.quarantined.inc();
        self.update(|v| {
            v.quarantined_total += 1;
            v.quarantined.insert(
                0,
                Quarantined {
                    digest: digest.to_string(),
                    at: now_unix(),
                    rebuild: repaired.rebuild,
                    broken_imports: repaired.lost,
                },
            );
            v.quarantined.truncate(LISTED);
        });
    }
}

struct Checked {
    whole: bool,
    bytes: u64,
    pauses: u64,
}

/// Hashes one blob at most `rate` bytes a second, waiting while clients
/// hold blobs. Blocking.
fn check_paced(blobs: &BlobStore, digest: &Digest, rate: u64) -> Result<Checked, BlobError> {
    let started = Instant::now();
    let (mut bytes, mut pauses) = (0u64, 0u64);
    let whole = blobs.verify_with(digest, |n| {
        bytes += n as u64;
        let due = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
        while blobs.in_use() {
            pauses += 1;
            std::thread::sleep(PAUSE);
        }
    })?;
    Ok(Checked {
        whole,
        bytes,
        pauses,
    })
}
