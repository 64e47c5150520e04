//! What the server did over time, for the admin page's plots: per minute
//! for the last 24 hours and per hour for the last 30 days.
//!
//! Each ring is a fixed set of slots in the database's `history` tree
//! (slot = start of the minute or hour, modulo the ring's length), so the
//! database holds the same number of records however long the server
//! runs. Requests and builds only add to counts in memory; [`History::flush`]
//! writes them, with a sample of the levels (storage, free disk, queue),
//! in one batch every few seconds, never per request.

use crate::store::db::{Db, DbError, HistoryRecord, Levels};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// A ring of slots of equal width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    /// The key prefix of its slots.
    tag: u8,
    /// Seconds per slot.
    pub width: u64,
    /// Slots kept.
    pub slots: u64,
}

/// Per minute, 24 hours.
pub const MINUTES: Ring = Ring {
    tag: b'm',
    width: 60,
    slots: 24 * 60,
};

/// Per hour, 30 days.
pub const HOURS: Ring = Ring {
    tag: b'h',
    width: 3600,
    slots: 30 * 24,
};

impl Ring {
    /// The start of the slot that holds `at`.
    pub fn start_of(self, at: u64) -> u64 {
        at - at % self.width
    }

    fn key(self, start: u64) -> [u8; 3] {
        let slot = ((start / self.width) % self.slots) as u16;
        let [a, b] = slot.to_be_bytes();
        [self.tag, a, b]
    }

    /// The starts of the slots of the window ending with `now`'s, oldest
    /// first.
    fn window(self, now: u64) -> impl Iterator<Item = u64> {
        let last = self.start_of(now);
        (0..self.slots)
            .rev()
            .filter_map(move |back| last.checked_sub(back * self.width))
    }
}

/// Build durations are counted in bins [`DURATION_BASE_MS`] ×
/// [`DURATION_RATIO`]^i wide (bin 0: shorter than the base), so a slot
/// holds a fixed-size histogram and p50/p95 of merged slots stay
/// computable; a percentile is given as its bin's geometric middle
/// (within 15 %).
pub const DURATION_BINS: usize = 48;
const DURATION_BASE_MS: f64 = 100.0;
const DURATION_RATIO: f64 = 1.3;

fn duration_bin(ms: u64) -> usize {
    if (ms as f64) < DURATION_BASE_MS {
        return 0;
    }
    let i = ((ms as f64 / DURATION_BASE_MS).ln() / DURATION_RATIO.ln()).floor() as usize + 1;
    i.min(DURATION_BINS - 1)
}

/// The middle of a bin, in milliseconds.
fn bin_middle_ms(bin: usize) -> u64 {
    if bin == 0 {
        return (DURATION_BASE_MS / 2.0) as u64;
    }
    let low = DURATION_BASE_MS * DURATION_RATIO.powi(bin as i32 - 1);
    (low * DURATION_RATIO.sqrt()).round() as u64
}

/// The `q` quantile (0..1) of a duration histogram; `None` when empty.
pub(crate) fn quantile_ms(bins: &[u32], q: f64) -> Option<u64> {
    let total: u64 = bins.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, &n) in bins.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some(bin_middle_ms(i));
        }
    }
    None
}

fn empty_slot(start: u64) -> HistoryRecord {
    HistoryRecord {
        start,
        durations: vec![0; DURATION_BINS],
        ..HistoryRecord::default()
    }
}

/// Adds `add`'s counts to `into` (levels: the later sample wins).
fn merge(into: &mut HistoryRecord, add: &HistoryRecord) {
    into.pulls += add.pulls;
    into.blob_bytes += add.blob_bytes;
    into.builds_started += add.builds_started;
    into.builds_succeeded += add.builds_succeeded;
    into.builds_failed += add.builds_failed;
    into.hits += add.hits;
    into.misses += add.misses;
    into.durations.resize(DURATION_BINS, 0);
    for (a, b) in into.durations.iter_mut().zip(&add.durations) {
        *a = a.saturating_add(*b);
    }
    if add.levels.is_some() {
        into.levels = add.levels;
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// Counts by the minute they happened in.
    minutes: BTreeMap<u64, HistoryRecord>,
    /// The minute whose levels were last written.
    levels_written: Option<u64>,
}

/// Counts in memory until the next flush. Shared by the request path and
/// the flusher.
#[derive(Debug, Default)]
pub struct History {
    pending: Mutex<Pending>,
    /// Held through a flush: two flushes must not read-modify-write the
    /// same slot at once.
    flushing: Mutex<()>,
}

/// One slot as `/api/history` serves it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Unix seconds the slot starts at.
    pub start: u64,
    pub pulls: u64,
    pub blob_bytes: u64,
    pub builds_started: u64,
    pub builds_succeeded: u64,
    pub builds_failed: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Hits over manifest requests by tag; `None` with none.
    pub hit_rate: Option<f64>,
    /// Builds finished in the slot, by duration (approximate: see
    /// [`DURATION_BINS`]).
    pub build_p50_ms: Option<u64>,
    pub build_p95_ms: Option<u64>,
    /// Levels: `None` when the server did not run in the slot.
    pub storage_used: Option<u64>,
    pub max_storage: Option<u64>,
    pub free_bytes: Option<u64>,
    pub min_free_space: Option<u64>,
    pub queued_builds: Option<u64>,
}

/// Hits over manifest requests by tag in a slot; `None` with none.
pub(crate) fn hit_rate(r: &HistoryRecord) -> Option<f64> {
    let lookups = r.hits + r.misses;
    (lookups > 0).then(|| r.hits as f64 / lookups as f64)
}

impl From<&HistoryRecord> for Point {
    fn from(r: &HistoryRecord) -> Point {
        let levels = r.levels;
        Point {
            start: r.start,
            pulls: r.pulls,
            blob_bytes: r.blob_bytes,
            builds_started: r.builds_started,
            builds_succeeded: r.builds_succeeded,
            builds_failed: r.builds_failed,
            cache_hits: r.hits,
            cache_misses: r.misses,
            hit_rate: hit_rate(r),
            build_p50_ms: quantile_ms(&r.durations, 0.5),
            build_p95_ms: quantile_ms(&r.durations, 0.95),
            storage_used: levels.map(|l| l.storage_used),
            max_storage: levels.and_then(|l| l.max_storage),
            free_bytes: levels.and_then(|l| l.free_bytes),
            min_free_space: levels.and_then(|l| l.min_free_space),
            queued_builds: levels.map(|l| l.queued_builds),
        }
    }
}

/// A ring read back: every slot of its window, oldest first, empty where
/// nothing was recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Seconds per point.
    pub width: u64,
    pub points: Vec<Point>,
}

/// Both rings, as `/api/history` serves them.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryView {
    /// Unix seconds when it was read.
    pub now: u64,
    /// Per minute, the last 24 hours.
    pub minutes: Series,
    /// Per hour, the last 30 days.
    pub hours: Series,
}

/// A ring's slots of the window ending at `now`, oldest first; slots not
/// written in that window are empty.
pub fn read_ring(db: &Db, ring: Ring, now: u64) -> Result<Vec<HistoryRecord>, DbError> {
    let starts: Vec<u64> = ring.window(now).collect();
    let keys: Vec<[u8; 3]> = starts.iter().map(|&s| ring.key(s)).collect();
    let stored = db.history_slots(&keys)?;
    Ok(starts
        .into_iter()
        .zip(stored)
        .map(|(start, slot)| match slot {
            Some(r) if r.start == start => r,
            _ => empty_slot(start),
        })
        .collect())
}

/// Slots merged `n` at a time (the last group may be shorter), for plots
/// with fewer points than the ring.
pub fn coarsen(slots: &[HistoryRecord], n: usize) -> Vec<HistoryRecord> {
    slots
        .chunks(n.max(1))
        .map(|chunk| {
            let mut out = empty_slot(chunk[0].start);
            for s in chunk {
                merge(&mut out, s);
            }
            out
        })
        .collect()
}

impl History {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds to the counts of the minute of `at` (Unix seconds).
    fn count(&self, at: u64, f: impl FnOnce(&mut HistoryRecord)) {
        let minute = MINUTES.start_of(at);
        let mut pending = self.pending();
        f(pending
            .minutes
            .entry(minute)
            .or_insert_with(|| empty_slot(minute)));
    }

    /// A manifest request by tag: from the cache or not, served or not.
    pub fn manifest_requested(&self, at: u64, hit: bool, served: bool) {
        self.count(at, |s| {
            if hit {
                s.hits += 1;
            } else {
                s.misses += 1;
            }
            if served {
                s.pulls += 1;
            }
        });
    }

    pub fn blob_bytes(&self, at: u64, n: u64) {
        self.count(at, |s| s.blob_bytes += n);
    }

    pub fn build_started(&self, at: u64) {
        self.count(at, |s| s.builds_started += 1);
    }

    pub fn build_finished(&self, at: u64, succeeded: bool, duration_ms: u64) {
        self.count(at, |s| {
            if succeeded {
                s.builds_succeeded += 1;
            } else {
                s.builds_failed += 1;
            }
            s.durations[duration_bin(duration_ms)] += 1;
        });
    }

    /// Writes the counts kept in memory, and `levels` as the sample of
    /// `now`'s minute and hour, in one batch; writes nothing when nothing
    /// was counted and this minute's levels are written. Blocking. On
    /// failure the counts stay in memory for the next flush.
    pub fn flush(&self, db: &Db, levels: Levels, now: u64) -> Result<(), DbError> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let minute = MINUTES.start_of(now);
        let mut counts = {
            let mut pending = self.pending();
            if pending.minutes.is_empty() && pending.levels_written == Some(minute) {
                return Ok(());
            }
            std::mem::take(&mut pending.minutes)
        };
        counts
            .entry(minute)
            .or_insert_with(|| empty_slot(minute))
            .levels = Some(levels);
        // Each minute's counts go to its slot in both rings.
        let mut slots: BTreeMap<[u8; 3], HistoryRecord> = BTreeMap::new();
        for (&start, add) in &counts {
            for ring in [MINUTES, HOURS] {
                let ring_start = ring.start_of(start);
                let slot = slots
                    .entry(ring.key(ring_start))
                    .or_insert_with(|| empty_slot(ring_start));
                // A later minute in the same slot of a ring that wrapped
                // around replaces the older start.
                if slot.start != ring_start {
                    *slot = empty_slot(ring_start);
                }
                merge(slot, add);
            }
        }
        let keys: Vec<[u8; 3]> = slots.keys().copied().collect();
        let result = db.history_slots(&keys).and_then(|stored| {
            let writes: Vec<([u8; 3], HistoryRecord)> = slots
                .into_iter()
                .zip(stored)
                .map(|((key, add), old)| {
                    let mut slot = match old {
                        Some(old) if old.start == add.start => old,
                        _ => empty_slot(add.start),
                    };
                    merge(&mut slot, &add);
                    (key, slot)
                })
                .collect();
            db.put_history_slots(&writes)
        });
        let mut pending = self.pending();
        match result {
            Ok(()) => pending.levels_written = Some(minute),
            Err(_) => {
                for (start, mut add) in counts {
                    add.levels = None;
                    let slot = pending
                        .minutes
                        .entry(start)
                        .or_insert_with(|| empty_slot(start));
                    merge(slot, &add);
                }
            }
        }
        result
    }

    /// Both rings as of `now`, from the database (flush first to include
    /// what is in memory).
    pub fn read(db: &Db, now: u64) -> Result<HistoryView, DbError> {
        let series = |ring: Ring| -> Result<Series, DbError> {
            Ok(Series {
                width: ring.width,
                points: read_ring(db, ring, now)?.iter().map(Point::from).collect(),
            })
        };
        Ok(HistoryView {
            now,
            minutes: series(MINUTES)?,
            hours: series(HOURS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000; // a whole hour

    fn levels(storage_used: u64) -> Levels {
        Levels {
            storage_used,
            max_storage: Some(1000),
            free_bytes: Some(5000),
            min_free_space: None,
            queued_builds: 1,
        }
    }

    fn point(view: &[Point], start: u64) -> &Point {
        view.iter().find(|p| p.start == start).unwrap()
    }

    #[test]
    fn duration_bins_hold_their_values() {
        for ms in [1u64, 99, 100, 250, 1000, 12_345, 600_000, 3_600_000] {
            let middle = bin_middle_ms(duration_bin(ms));
            let ratio = middle as f64 / ms.max(100) as f64;
            assert!((0.8..1.25).contains(&ratio) || ms < 100, "{ms}: {middle}");
        }
        assert_eq!(duration_bin(u64::MAX), DURATION_BINS - 1);
        let mut bins = vec![0; DURATION_BINS];
        for ms in [1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 60_000] {
            bins[duration_bin(ms)] += 1;
        }
        let p50 = quantile_ms(&bins, 0.5).unwrap();
        let p95 = quantile_ms(&bins, 0.95).unwrap();
        assert!((850..1150).contains(&p50), "{p50}");
        assert!((52_000..69_000).contains(&p95), "{p95}");
        assert_eq!(quantile_ms(&[0; DURATION_BINS], 0.5), None);
    }

    /// Builds, pulls, a failure and a collection over three minutes and
    /// two hours: each lands in its minute and hour, survives reopening,
    /// and old slots are not read as new.
    #[test]
    fn a_scripted_history_lands_in_its_buckets_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::default();
        {
            let db = Db::open(dir.path()).unwrap();
            // Minute 0: a build of 2 s, its pull and a warm pull with a layer.
            h.build_started(T0 + 1);
            h.build_finished(T0 + 3, true, 2_000);
            h.manifest_requested(T0 + 3, false, true);
            h.manifest_requested(T0 + 5, true, true);
            h.blob_bytes(T0 + 6, 700);
            h.flush(&db, levels(100), T0 + 10).unwrap();
            // Minute 1: a failing build, counted before the flush in minute 2.
            h.build_started(T0 + 61);
            h.build_finished(T0 + 62, false, 500);
            h.manifest_requested(T0 + 62, false, false);
            // Minute 2: a collection freed storage.
            h.flush(&db, levels(40), T0 + 125).unwrap();
            // An hour later: one pull.
            h.manifest_requested(T0 + 3600 + 30, true, true);
            h.flush(&db, levels(40), T0 + 3600 + 40).unwrap();
            db.flush_blocking().unwrap();
        }
        let db = crate::store::db::open_when_free(dir.path()).unwrap();
        let view = History::read(&db, T0 + 3600 + 50).unwrap();
        assert_eq!(view.minutes.points.len(), 1440);
        assert_eq!(view.hours.points.len(), 720);
        let m = &view.minutes.points;
        let m0 = point(m, T0);
        assert_eq!(
            (m0.pulls, m0.builds_started, m0.builds_succeeded),
            (2, 1, 1)
        );
        assert_eq!((m0.cache_hits, m0.cache_misses, m0.blob_bytes), (1, 1, 700));
        assert_eq!(m0.hit_rate, Some(0.5));
        assert_eq!(m0.storage_used, Some(100));
        let p50 = m0.build_p50_ms.unwrap();
        assert!((1700..2300).contains(&p50), "{p50}");
        let m1 = point(m, T0 + 60);
        assert_eq!((m1.pulls, m1.builds_started, m1.builds_failed), (0, 1, 1));
        assert_eq!(m1.hit_rate, Some(0.0));
        assert_eq!(m1.storage_used, None, "no sample in minute 1");
        let m2 = point(m, T0 + 120);
        assert_eq!((m2.pulls, m2.storage_used), (0, Some(40)));
        assert_eq!(m2.max_storage, Some(1000));
        assert_eq!(point(m, T0 + 3600).pulls, 1);
        assert_eq!(m.iter().map(|p| p.pulls).sum::<u64>(), 3);
        assert_eq!(m.iter().map(|p| p.builds_started).sum::<u64>(), 2);
        let hour0 = point(&view.hours.points, T0);
        assert_eq!((hour0.pulls, hour0.builds_started), (2, 2));
        assert_eq!((hour0.builds_succeeded, hour0.builds_failed), (1, 1));
        assert_eq!(hour0.storage_used, Some(40), "the hour's last sample");
        assert_eq!(point(&view.hours.points, T0 + 3600).pulls, 1);

        // A day and a half later the minutes are gone, the hours are not.
        let later = T0 + 36 * 3600;
        let view = History::read(&db, later).unwrap();
        assert!(view.minutes.points.iter().all(|p| p.pulls == 0));
        assert_eq!(view.hours.points.iter().map(|p| p.pulls).sum::<u64>(), 3);
        // A slot written anew after the ring wrapped starts from zero.
        h.manifest_requested(T0 + 24 * 3600, true, true);
        h.flush(&db, levels(40), T0 + 24 * 3600 + 1).unwrap();
        let view = History::read(&db, T0 + 24 * 3600 + 2).unwrap();
        assert_eq!(point(&view.minutes.points, T0 + 24 * 3600).pulls, 1);
        // Minute 0's two pulls are gone from that slot; the hour-later one stays.
        assert_eq!(view.minutes.points.iter().map(|p| p.pulls).sum::<u64>(), 2);
    }

    #[test]
    fn an_idle_minute_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let h = History::default();
        h.flush(&db, levels(1), T0).unwrap();
        assert_eq!(db.history_len(), 2);
        // Same minute, nothing counted: no write, so the level stays.
        h.flush(&db, levels(2), T0 + 30).unwrap();
        let view = History::read(&db, T0 + 31).unwrap();
        assert_eq!(point(&view.minutes.points, T0).storage_used, Some(1));
    }

    /// Five months of activity every half hour: the rings hold their
    /// fixed number of slots, and the bytes they hold do not grow (the
    /// counts in a slot are bounded by what one minute or hour sees).
    /// sled's own files are its business: its log reuses segments once it
    /// cleans them (a few MB in all; a heavier run of this test is in the
    /// README), and hammering it harder here risks sled's known deadlock
    /// under heavy writes (spacejam/sled#1412).
    #[test]
    fn the_rings_keep_the_database_size_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let h = History::default();
        let month = 31 * 24 * 2;
        let run = |from: u64| {
            for step in from..from + month {
                let at = T0 + step * 1800;
                h.manifest_requested(at, true, true);
                h.build_started(at);
                h.build_finished(at, step % 7 != 0, step * 37 % 100_000);
                h.flush(&db, levels(step), at).unwrap();
            }
        };
        run(0);
        let slots = db.history_len();
        // Every thirtieth minute's slot, and every hour's.
        assert_eq!(slots as u64, MINUTES.slots / 30 + HOURS.slots);
        let first = db.history_bytes().unwrap();
        for m in 1..5 {
            run(m * month);
            assert_eq!(db.history_len(), slots);
            let bytes = db.history_bytes().unwrap();
            assert!(
                bytes <= first + first / 10,
                "month {}: the rings grew from {first} to {bytes} bytes",
                m + 1
            );
        }
    }
}
