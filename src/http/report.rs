//! Everything the admin page shows, gathered from the database, the blob
//! store and the builds in flight. `/api/status` serves it as JSON and `/`
//! renders it, so scripts and people see the same figures.

use crate::build::builder::Builder;
use crate::observe::status::{InFlight, Instance, StaleServe};
use crate::store::db::{BuildOutcome, BuildRecord, DbError, ErrorRecord};
use crate::store::fs::BlobError;
use serde::Serialize;

/// Entries in the "most pulled" and "most popular" lists.
const TOP: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub instance: Instance,
    pub in_flight: Vec<InFlight>,
    /// Newest first.
    pub builds: Vec<BuildView>,
    /// Newest first.
    pub errors: Vec<ErrorRecord>,
    /// Images served from cache because their source could not be
    /// reached, newest first.
    pub stale: Vec<StaleServe>,
    pub cache: CacheView,
    pub limits: LimitsView,
}

/// The storage quota, the build queue, and what the last garbage
/// collection did.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsView {
    /// Bytes of blobs stored now.
    pub storage_used: u64,
    pub max_storage: Option<u64>,
    pub min_free_space: Option<u64>,
    pub queued_builds: usize,
    pub max_queued_builds: usize,
    /// `None` until a collection ran since the server started.
    pub last_gc: Option<crate::store::gc::Report>,
    /// What the scrub found since the server started.
    pub scrub: crate::store::scrub::ScrubView,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseView {
    pub name: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildView {
    pub image: String,
    pub tag: String,
    pub started_at: u64,
    /// `success`, `not_found` or `failed`.
    pub result: &'static str,
    pub manifest: Option<String>,
    pub message: Option<String>,
    /// The package set's revision the build used (a commit or NAR hash).
    pub revision: Option<String>,
    pub phases: Vec<PhaseView>,
    pub total_ms: u64,
    pub layers_total: usize,
    pub layers_reused: usize,
    pub layers_built: usize,
    pub bytes_packed: u64,
}

impl From<BuildRecord> for BuildView {
    fn from(r: BuildRecord) -> Self {
        let (result, manifest, message) = match r.outcome {
            BuildOutcome::Success { manifest } => ("success", Some(manifest.to_string()), None),
            BuildOutcome::PackagesNotFound(names) => (
                "not_found",
                None,
                Some(format!("packages not found: {}", names.join(", "))),
            ),
            BuildOutcome::Failed { message, .. } => ("failed", None, Some(message)),
        };
        BuildView {
            image: r.image,
            tag: r.tag,
            started_at: r.started_at,
            result,
            manifest,
            message,
            revision: r.revision,
            total_ms: r.phases.iter().map(|(_, ms)| ms).sum(),
            phases: r
                .phases
                .into_iter()
                .map(|(name, ms)| PhaseView { name, ms })
                .collect(),
            layers_total: r.layers_total,
            layers_reused: r.layers_reused,
            layers_built: r.layers_total.saturating_sub(r.layers_reused),
            bytes_packed: r.bytes_packed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Count {
    pub name: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheView {
    pub manifests: usize,
    pub layers: usize,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// `None` when the file system could not be asked.
    pub free_bytes: Option<u64>,
    /// Manifest requests by tag answered from the cache, and not.
    pub manifest_hits: u64,
    pub manifest_misses: u64,
    /// Hits over all manifest requests by tag; `None` before the first.
    pub hit_rate: Option<f64>,
    pub most_pulled: Vec<Count>,
    pub popular_packages: Vec<Count>,
}

/// Hides the server account's home directory in Nix's output and error
/// messages (Nix caches fetched sources there); the paths the operator
/// configured are shown as they are elsewhere on the page.
struct Redact(Option<String>);

impl Redact {
    fn from_env() -> Redact {
        Redact(
            std::env::var("HOME")
                .ok()
                .map(|h| h.trim_end_matches('/').to_owned())
                .filter(|h| h.starts_with('/') && h.len() > 1),
        )
    }

    fn apply(&self, text: &str) -> String {
        match &self.0 {
            Some(home) => text.replace(&format!("{home}/"), "~/"),
            None => text.to_owned(),
        }
    }
}

fn top(counts: Vec<(String, u64)>) -> Vec<Count> {
    counts
        .into_iter()
        .take(TOP)
        .map(|(name, count)| Count { name, count })
        .collect()
}

impl Report {
    /// Reads the database and walks the blob store: call off the async
    /// runtime.
    pub fn collect(builder: &Builder) -> Result<Report, ReportError> {
        let status = builder.status();
        // Counts still in memory first, so the page is up to date.
        status.flush_counts();
        let db = builder.db();
        let (manifests, layers) = db.counts();
        let (blobs, blob_bytes) = builder.blobs().stats();
        let instance = status.instance().clone();
        let free_bytes =
            match crate::store::disk::free_bytes(std::path::Path::new(&instance.storage_path)) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read free disk space");
                    None
                }
            };
        let redact = Redact::from_env();
        let (hits, misses) = db.lookups()?;
        let lookups = hits + misses;
        Ok(Report {
            in_flight: status.in_flight(),
            builds: db
                .builds()?
                .into_iter()
                .map(|b| {
                    let mut view = BuildView::from(b);
                    view.message = view.message.map(|m| redact.apply(&m));
                    view
                })
                .collect(),
            errors: db
                .errors()?
                .into_iter()
                .map(|e| ErrorRecord {
                    message: redact.apply(&e.message),
                    stderr_tail: redact.apply(&e.stderr_tail),
                    ..e
                })
                .collect(),
            stale: status
                .stale()
                .into_iter()
                .map(|s| StaleServe {
                    error: redact.apply(&s.error),
                    ..s
                })
                .collect(),
            cache: CacheView {
                manifests,
                layers,
                blobs,
                blob_bytes,
                free_bytes,
                manifest_hits: hits,
                manifest_misses: misses,
                hit_rate: (lookups > 0).then(|| hits as f64 / lookups as f64),
                most_pulled: top(db.pulls()?),
                popular_packages: top(db.popularity_desc()?),
            },
            limits: {
                let (queued_builds, max_queued_builds) = builder.queue_depth();
                let policy = builder.collector().policy();
                LimitsView {
                    storage_used: blob_bytes,
                    max_storage: policy.max_storage,
                    min_free_space: policy.min_free_space,
                    queued_builds,
                    max_queued_builds,
                    last_gc: builder.collector().last_report(),
                    scrub: builder.collector().scrub_view(),
                }
            },
            instance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_directory_is_hidden() {
        let r = Redact(Some("/home/op".into()));
        assert_eq!(
            r.apply("error: opening /home/op/.cache/nix/x: denied; /home/operator stays"),
            "error: opening ~/.cache/nix/x: denied; /home/operator stays"
        );
        assert_eq!(Redact(None).apply("/home/op/x"), "/home/op/x");
    }
}
