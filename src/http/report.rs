//! Everything the admin page shows, gathered from the database, the blob
//! store and the builds in flight. `/api/status` serves it as JSON and `/`
//! renders it, so scripts and people see the same figures.

use crate::build::builder::Builder;
use crate::observe::status::{InFlight, Instance, StaleServe};
use crate::store::db::{BuildOutcome, BuildRecord, DbError, ErrorRecord, Levels};
use crate::store::fs::BlobError;
use serde::Serialize;

/// Entries in the "most pulled" and "most popular" lists.
const TOP: usize = 10;

/// Images per page of the image list.
pub const IMAGES_PER_PAGE: usize = 50;

/// Longest search text looked for (a name is at most 255 bytes).
const QUERY_MAX: usize = 255;

/// Which part of the image list to show: names containing `q`, page
/// `page` (from 1). What `/` and `/api/status` take as query parameters.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ImageQuery {
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub page: Option<usize>,
}

/// A page of the image names served.
#[derive(Debug, Clone, Serialize)]
pub struct ImageList {
    pub query: String,
    /// From 1.
    pub page: usize,
    pub pages: usize,
    /// Names that match.
    pub total: usize,
    pub images: Vec<ImageRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub tags: Vec<String>,
    pub pulls: u64,
}

impl ImageList {
    fn read(db: &crate::store::db::Db, query: &ImageQuery) -> Result<ImageList, DbError> {
        let q: String = query.q.trim().chars().take(QUERY_MAX).collect();
        let asked = query.page.unwrap_or(1).max(1);
        let offset = (asked - 1).saturating_mul(IMAGES_PER_PAGE);
        let (total, names) = db.image_names(&q, offset, IMAGES_PER_PAGE)?;
        let pages = total.div_ceil(IMAGES_PER_PAGE).max(1);
        let images = names
            .into_iter()
            .map(|(name, tags)| {
                Ok(ImageRow {
                    pulls: db.pull_count(&name)?,
                    name,
                    tags,
                })
            })
            .collect::<Result<_, DbError>>()?;
        Ok(ImageList {
            query: q,
            // Past the last page: empty, but numbered as asked.
            page: asked,
            pages,
            total,
            images,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    #[error("the report could not be encoded as JSON")]
    Encode,
    #[error("gathering the report failed: {0}")]
    Task(#[from] tokio::task::JoinError),
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
    /// The certificate served; `None` over plain HTTP.
    pub tls: Option<crate::tls::cert_info::TlsStatus>,
    /// The page's plots, as text: each line's latest value, min and max,
    /// and projections (`/api/history` has every point).
    pub plots: Vec<crate::http::plot::Plot>,
    /// A page of the image names served (`?q=` and `?page=`).
    pub images: ImageList,
    pub nix_cache: NixCacheView,
}

/// The Nix binary cache: on or off, its key, what it holds and served.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NixCacheView {
    pub on: bool,
    /// What clients list in `trusted-public-keys`.
    pub public_key: Option<String>,
    /// Store paths served, NARs made, their bytes.
    pub paths: u64,
    pub nars: u64,
    pub nar_bytes: u64,
    /// Since start: narinfos answered and not, NARs sent and their bytes.
    pub narinfo_hits: u64,
    pub narinfo_misses: u64,
    pub nars_served: u64,
    pub nar_bytes_served: u64,
}

impl NixCacheView {
    fn collect(builder: &Builder) -> Result<NixCacheView, DbError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(cache) = builder.nix_cache() else {
            return Ok(NixCacheView::default());
        };
        let held = builder.db().nix_cache_counts()?;
        let n = &cache.counters;
        Ok(NixCacheView {
            on: true,
            public_key: Some(cache.public_key()),
            paths: held.paths,
            nars: held.nars,
            nar_bytes: held.nar_bytes,
            narinfo_hits: n.narinfo_hits.load(Relaxed),
            narinfo_misses: n.narinfo_misses.load(Relaxed),
            nars_served: n.nars_served.load(Relaxed),
            nar_bytes_served: n.nar_bytes_served.load(Relaxed),
        })
    }
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
    /// Nix processes the build ran (0 for records from before they were
    /// counted).
    pub nix_processes: u32,
    /// Package names Nix evaluated; 0 when all came from the evaluation
    /// cache.
    pub evaluated: u32,
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
            nix_processes: r.nix_processes,
            evaluated: r.evaluated,
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

/// Build records as shown, with the home directory hidden in messages.
fn build_views(records: Vec<BuildRecord>, redact: &Redact) -> Vec<BuildView> {
    records
        .into_iter()
        .map(|b| {
            let mut view = BuildView::from(b);
            view.message = view.message.map(|m| redact.apply(&m));
            view
        })
        .collect()
}

/// The recent builds of one image name, newest first, as shown.
pub fn builds_of(builder: &Builder, image: &str) -> Result<Vec<BuildView>, DbError> {
    let mine = builder
        .db()
        .builds()?
        .into_iter()
        .filter(|b| b.image == image)
        .collect();
    Ok(build_views(mine, &Redact::from_env()))
}

fn top(counts: Vec<(String, u64)>) -> Vec<Count> {
    counts
        .into_iter()
        .take(TOP)
        .map(|(name, count)| Count { name, count })
        .collect()
}

/// The figures that are levels, not counts: storage used against the
/// limits, free disk and the queue. Blocking (it may wait for the blob
/// store's first count).
pub fn levels(builder: &Builder) -> Levels {
    let (_, storage_used) = builder.blobs().stats();
    let path = std::path::Path::new(&builder.status().instance().storage_path);
    let free_bytes = match crate::store::disk::free_bytes(path) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "could not read free disk space");
            None
        }
    };
    let policy = builder.collector().policy();
    Levels {
        storage_used,
        max_storage: policy.max_storage,
        free_bytes,
        min_free_space: policy.min_free_space,
        queued_builds: builder.queue_depth().0 as u64,
    }
}

/// Writes the counts kept in memory (totals and history) to the database,
/// with a sample of the levels. Blocking.
pub fn flush_counts(builder: &Builder) {
    let status = builder.status();
    status.flush_counts();
    let levels = levels(builder);
    if let Err(e) = status
        .history()
        .flush(builder.db(), levels, crate::clock::now_unix())
    {
        tracing::warn!(error = %e, "could not record the history");
    }
}

impl Report {
    /// Reads the database and walks the blob store: call off the async
    /// runtime.
    pub fn collect(builder: &Builder, query: &ImageQuery) -> Result<Report, ReportError> {
        let status = builder.status();
        // Counts still in memory first, so the page is up to date.
        flush_counts(builder);
        let db = builder.db();
        let (manifests, layers) = db.counts();
        let (blobs, blob_bytes) = builder.blobs().stats();
        let instance = status.instance().clone();
        let free_bytes = levels(builder).free_bytes;
        let redact = Redact::from_env();
        let (hits, misses) = db.lookups()?;
        let lookups = hits + misses;
        Ok(Report {
            plots: crate::http::trends::plots(db, crate::clock::now_unix())?,
            images: ImageList::read(db, query)?,
            in_flight: status.in_flight(),
            builds: build_views(db.builds()?, &redact),
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
            nix_cache: NixCacheView::collect(builder)?,
            instance,
            tls: None,
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
