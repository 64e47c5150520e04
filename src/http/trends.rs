//! The plots on the admin page, from the history rings: pulls and builds
//! over 24 hours and 30 days, the cache hit rate, build durations, and
//! storage against the quota and free disk against its floor, with when
//! each is reached at the current rate.

use super::format;
use super::plot::{plot, LineData, Plot, Unit};
use crate::observe::history::{coarsen, read_ring, HOURS, MINUTES};
use crate::store::db::{Db, DbError, HistoryRecord, Levels};

/// Minutes merged into one point of the 24-hour plots (288 points).
const DAY_STEP: usize = 5;

/// How far back the projections look for a rate.
const PROJECTION_WINDOW: u64 = 7 * 86_400;

fn hhmm(t: u64) -> String {
    let s = format::utc(t);
    s[11..16].to_owned()
}

/// A time's month and day (`MM-DD`), for axis labels.
pub(crate) fn date(t: u64) -> String {
    format::utc(t)[5..10].to_owned()
}

fn counts(slots: &[HistoryRecord], f: impl Fn(&HistoryRecord) -> u64) -> Vec<Option<f64>> {
    slots.iter().map(|s| Some(f(s) as f64)).collect()
}

fn levels(slots: &[HistoryRecord], f: impl Fn(&Levels) -> Option<u64>) -> Vec<Option<f64>> {
    slots
        .iter()
        .map(|s| s.levels.as_ref().and_then(&f).map(|v| v as f64))
        .collect()
}

/// How long until a level that moves at `rate` per second goes from
/// `now_value` to `target`; `None` when it is not moving toward it.
fn seconds_until(now_value: f64, target: f64, rate: f64) -> Option<f64> {
    let gap = target - now_value;
    (rate != 0.0 && gap.signum() == rate.signum()).then(|| gap / rate)
}

/// The level's rate per second over the samples of the last
/// [`PROJECTION_WINDOW`], from its first and last sample there; with the
/// time it spans. `None` with fewer than two samples an hour apart.
fn rate(starts: &[u64], values: &[Option<f64>], now: u64) -> Option<(f64, u64)> {
    let recent: Vec<(u64, f64)> = starts
        .iter()
        .zip(values)
        .filter(|(t, _)| **t + PROJECTION_WINDOW >= now)
        .filter_map(|(t, v)| v.map(|v| (*t, v)))
        .collect();
    let (first, last) = (recent.first()?, recent.last()?);
    let span = last.0.checked_sub(first.0).filter(|s| *s >= 3600)?;
    Some(((last.1 - first.1) / span as f64, span))
}

fn per_day(rate: f64) -> String {
    let day = rate * 86_400.0;
    let sign = if day < 0.0 { "-" } else { "+" };
    format!("{sign}{} a day", format::bytes(day.abs() as u64))
}

fn when(now: u64, seconds: f64) -> String {
    let days = seconds / 86_400.0;
    let ahead = if days >= 2.0 {
        format!("about {:.0} days", days)
    } else {
        format!("about {:.0} hours", (seconds / 3600.0).max(1.0))
    };
    let at = now.saturating_add(seconds.min(1e11) as u64);
    format!("{ahead} (around {})", &format::utc(at)[..10])
}

/// A sentence on when `values` reaches `limit` at the current rate;
/// `rising`: the limit is above (storage) rather than below (free disk).
fn projection(
    what: &str,
    limit_name: &str,
    rising: bool,
    starts: &[u64],
    values: &[Option<f64>],
    limit: Option<f64>,
    now: u64,
) -> Option<String> {
    let latest = values.iter().flatten().last().copied()?;
    let Some((rate, span)) = rate(starts, values, now) else {
        return Some(format!(
            "Not enough history yet to project {what} (samples an hour apart are needed)."
        ));
    };
    let over = format!(
        "{} over the last {:.0} hours",
        per_day(rate),
        span as f64 / 3600.0
    );
    let Some(limit) = limit else {
        return Some(format!("{what}: {over}; no {limit_name} is set."));
    };
    let reached = if rising {
        latest >= limit
    } else {
        latest <= limit
    };
    if reached {
        return Some(format!(
            "{what} has reached the {limit_name}: the collector evicts images ({over})."
        ));
    }
    Some(match seconds_until(latest, limit, rate) {
        Some(s) => format!(
            "At the current rate ({over}), {what} reaches the {limit_name} in {}.",
            when(now, s)
        ),
        None => format!("{what} is not moving toward the {limit_name} ({over})."),
    })
}

/// Every plot of the page, as of `now`.
pub fn plots(db: &Db, now: u64) -> Result<Vec<Plot>, DbError> {
    let minutes = coarsen(&read_ring(db, MINUTES, now)?, DAY_STEP);
    let hours = read_ring(db, HOURS, now)?;
    let day_starts: Vec<u64> = minutes.iter().map(|s| s.start).collect();
    let month_starts: Vec<u64> = hours.iter().map(|s| s.start).collect();
    let day =
        |id, title: &str, unit, lines| plot(id, title.to_owned(), unit, &day_starts, lines, hhmm);
    let month =
        |id, title: &str, unit, lines| plot(id, title.to_owned(), unit, &month_starts, lines, date);
    let builds = |slots: &[HistoryRecord]| {
        vec![
            LineData {
                label: "started",
                class: "series-a",
                values: counts(slots, |s| s.builds_started),
            },
            LineData {
                label: "failed",
                class: "series-c",
                values: counts(slots, |s| s.builds_failed),
            },
        ]
    };
    let pulls = |slots: &[HistoryRecord]| {
        vec![LineData {
            label: "pulls",
            class: "series-a",
            values: counts(slots, |s| s.pulls),
        }]
    };
    let storage = levels(&hours, |l| Some(l.storage_used));
    let quota = levels(&hours, |l| l.max_storage);
    let free = levels(&hours, |l| l.free_bytes);
    let floor = levels(&hours, |l| l.min_free_space);
    let latest_limit = |v: &[Option<f64>]| v.iter().flatten().last().copied();
    let mut storage_plot = month(
        "storage",
        "Storage used and the quota, last 30 days",
        Unit::Bytes,
        vec![
            LineData {
                label: "storage used",
                class: "series-a",
                values: storage.clone(),
            },
            LineData {
                label: "quota",
                class: "series-limit",
                values: quota.clone(),
            },
        ],
    );
    storage_plot.note = projection(
        "storage used",
        "quota",
        true,
        &month_starts,
        &storage,
        latest_limit(&quota),
        now,
    );
    let mut free_plot = month(
        "free-disk",
        "Free disk and the free-space floor, last 30 days",
        Unit::Bytes,
        vec![
            LineData {
                label: "free disk",
                class: "series-b",
                values: free.clone(),
            },
            LineData {
                label: "free-space floor",
                class: "series-limit",
                values: floor.clone(),
            },
        ],
    );
    // With no floor set, the disk is full at zero.
    free_plot.note = projection(
        "free disk",
        "free-space floor",
        false,
        &month_starts,
        &free,
        Some(latest_limit(&floor).unwrap_or(0.0)),
        now,
    );
    let percentiles = |slots: &[HistoryRecord]| {
        let line = |label, class, q| LineData {
            label,
            class,
            values: slots
                .iter()
                .map(|s| crate::observe::history::quantile_ms(&s.durations, q).map(|v| v as f64))
                .collect(),
        };
        vec![line("p50", "series-a", 0.5), line("p95", "series-c", 0.95)]
    };
    let hit_rate = |slots: &[HistoryRecord]| {
        vec![LineData {
            label: "hit rate",
            class: "series-b",
            values: slots
                .iter()
                .map(crate::observe::history::hit_rate)
                .collect(),
        }]
    };
    Ok(vec![
        day(
            "pulls-day",
            "Pulls per 5 minutes, last 24 hours",
            Unit::Count,
            pulls(&minutes),
        ),
        month(
            "pulls-month",
            "Pulls per hour, last 30 days",
            Unit::Count,
            pulls(&hours),
        ),
        day(
            "builds-day",
            "Builds per 5 minutes, last 24 hours",
            Unit::Count,
            builds(&minutes),
        ),
        month(
            "builds-month",
            "Builds per hour, last 30 days",
            Unit::Count,
            builds(&hours),
        ),
        month(
            "hit-rate",
            "Manifest cache hit rate per hour, last 30 days",
            Unit::Ratio,
            hit_rate(&hours),
        ),
        month(
            "build-duration",
            "Build duration per hour (p50, p95), last 30 days",
            Unit::Millis,
            percentiles(&hours),
        ),
        storage_plot,
        free_plot,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_say_when_a_limit_is_reached() {
        let hour = 3600;
        let starts: Vec<u64> = (0..10).map(|i| 1_000_000 * hour + i * hour).collect();
        let now = *starts.last().unwrap();
        // One GiB more every hour, 10 GiB used of 34.
        let used: Vec<Option<f64>> = (1..=10u64).map(|i| Some((i << 30) as f64)).collect();
        let note = projection(
            "storage used",
            "quota",
            true,
            &starts,
            &used,
            Some((34u64 << 30) as f64),
            now,
        )
        .unwrap();
        assert!(note.contains("+24.0 GiB a day"), "{note}");
        assert!(note.contains("in about 24 hours"), "{note}");
        let shrinking: Vec<Option<f64>> = used.iter().rev().copied().collect();
        let note = projection(
            "storage used",
            "quota",
            true,
            &starts,
            &shrinking,
            Some(1e12),
            now,
        );
        assert!(note.unwrap().contains("not moving toward"));
        let one = [Some(1.0)];
        let note = projection(
            "free disk",
            "floor",
            false,
            &starts[..1],
            &one,
            Some(0.0),
            now,
        );
        assert!(note.unwrap().starts_with("Not enough history"));
        assert_eq!(projection("x", "y", true, &[], &[], None, now), None);
    }
}
