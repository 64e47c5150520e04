//! Turns an image name into a manifest: cache lookup, then (at most once per
//! image at a time, and at most N at once) Nix, layering, packing and the
//! manifest, recording what each build did.

use crate::blocking::blocking;
use crate::build::archive::{self, ArchiveError, PackedLayer};
use crate::build::cache::FailureCache;
use crate::build::delivery::Hold;
use crate::build::eval_cache::{self, Known, Revision};
use crate::build::git::GitError;
use crate::build::hot::{HotManifests, Named};
use crate::build::image::{Arch, ImageSpec, SSL_CERT_FILE};
use crate::build::layering::{self, LayerError, Strategy};
use crate::build::manifest::{self, ImageConfig, LayerBlob, ManifestError};
use crate::build::nix::{Nix, NixError, Resolved, ResolvedPackage, Stage};
use crate::build::queue::{Abandoned, BuildQueue};
use crate::build::realise::Wanted;
use crate::build::singleflight::SingleFlight;
use crate::build::source::{Resolution, Source};
use crate::build::spare::Spare;
use crate::build::store_path::{self, PathInfo};
use crate::build::users;
use crate::clock::now_unix;
use crate::digest::Digest;
use crate::observe::status::{LiveBuild, Phase, Status};
use crate::store::collector::Collector;
use crate::store::db::{
    AsyncDb, BuildOutcome, BuildRecord, Db, DbError, LayerRecord, Lookup, ManifestRecord,
    TagRecord, TagTree,
};
use crate::store::fill::Filler;
use crate::store::fs::{BlobError, BlobStore, PinSet};
use crate::store::{Storage, StoreError};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::Instrument;

mod shared;

/// Bytes of Nix's stderr kept in a build record: all of it for any error
/// message, the end of it for a long build log (the log has everything).
const STDERR_KEPT_BYTES: usize = 64 * 1024;

/// The last `max` bytes of `text`, starting at a line (or at least a
/// character) boundary.
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    match cut.find('\n') {
        Some(i) if i + 1 < cut.len() => &cut[i + 1..],
        _ => cut,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("packages not found: {}", .0.join(", "))]
    NotFound(Vec<String>),
    /// The tag is not a valid ref, names none, or git failed.
    #[error(transparent)]
    Source(#[from] GitError),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Layers(#[from] LayerError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// An error of a task whose result several builds share.
    #[error(transparent)]
    Shared(Arc<BuildError>),
    #[error("cannot create a GC root directory: {0}")]
    GcRoot(std::io::Error),
    #[error("a background task failed: {0}")]
    Task(String),
    /// More builds wait for a slot than `--max-queued-builds` allows.
    #[error("{0} builds are queued already (--max-queued-builds); try again later")]
    QueueFull(usize),
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    #[error("this mirror has no package source and {0} was not imported or built here")]
    NoSource(String),
}

impl BuildError {
    /// Whether the storage ran out of space (or quota) somewhere below.
    pub fn is_storage_full(&self) -> bool {
        if let BuildError::Shared(inner) = self {
            return inner.is_storage_full();
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::StorageFull
                    || io.kind() == std::io::ErrorKind::QuotaExceeded
                    || io.raw_os_error() == Some(libc::ENOSPC)
                {
                    return true;
                }
            }
            if let Some(sled::Error::Io(io)) = e.downcast_ref::<sled::Error>() {
                if io.kind() == std::io::ErrorKind::StorageFull
                    || io.raw_os_error() == Some(libc::ENOSPC)
                {
                    return true;
                }
            }
            source = e.source();
        }
        false
    }

    /// The end of Nix's output, when Nix is what failed.
    pub fn stderr_tail(&self, lines: usize) -> Option<&str> {
        match self {
            BuildError::Nix(n) => n.stderr_tail(lines),
            BuildError::Shared(inner) => inner.stderr_tail(lines),
            _ => None,
        }
    }

    /// Whether the package source could not be reached (a tarball or git
    /// fetch failed to connect, or its lookup or evaluation timed out), as
    /// opposed to a build that ran and failed: only then is a stale image
    /// better than none.
    pub fn is_source_unreachable(&self) -> bool {
        match self {
            BuildError::Shared(inner) => inner.is_source_unreachable(),
            BuildError::Source(GitError::Timeout(_) | GitError::Failed(_)) => true,
            // Evaluation is where Nix fetches the source.
            BuildError::Nix(NixError::Timeout {
                stage: Stage::Resolve,
                ..
            }) => true,
            BuildError::Nix(NixError::Failed {
                stage: Stage::Resolve,
                stderr,
                ..
            }) => is_fetch_failure(stderr),
            _ => false,
        }
    }
}

/// Nix's words for a download or git fetch that could not connect.
fn is_fetch_failure(stderr: &str) -> bool {
    const SIGNS: [&str; 6] = [
        "unable to download",
        "Couldn't connect",
        "Could not resolve host",
        "Connection refused",
        "unable to access",
        "Failed to connect",
    ];
    SIGNS.iter().any(|s| stderr.contains(s))
}

/// What Nix prints when a git source lacks the commit it was asked for.
const MISSING_COMMIT: [&str; 4] = [
    "Cannot find Git revision",
    "not our ref",
    "unadvertised object",
    "bad object",
];

/// A commit tag that Nix cannot fetch because the repository lacks it is
/// the documented 404, not a failed build.
fn missing_commit(source: &Source, tag: &str, e: NixError) -> BuildError {
    let missing = matches!(source, Source::Git(_))
        && crate::build::source::is_commit(tag)
        && e.stderr_tail(usize::MAX)
            .is_some_and(|s| MISSING_COMMIT.iter().any(|m| s.contains(m)));
    if missing {
        BuildError::Source(GitError::UnknownCommit(tag.to_owned()))
    } else {
        e.into()
    }
}

/// A blocking task that panicked (or was cancelled at shutdown).
impl From<tokio::task::JoinError> for BuildError {
    fn from(e: tokio::task::JoinError) -> Self {
        BuildError::Task(e.to_string())
    }
}

pub type BuildResult = Result<Digest, Arc<BuildError>>;

/// What a pull by tag is answered with (see [`Builder::answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagAnswer {
    /// One Docker manifest.
    Manifest(Digest),
    /// Each platform's Docker manifest, the one a manifest-only client
    /// gets first.
    Index(Vec<(Arch, Digest)>),
}

impl TagAnswer {
    /// The Docker manifest a client that takes no index gets (an index
    /// always has one).
    pub fn first(&self) -> Option<Digest> {
        match self {
            TagAnswer::Manifest(d) => Some(*d),
            TagAnswer::Index(platforms) => platforms.first().map(|(_, d)| *d),
        }
    }
}

/// What the builder needs from the configuration.
pub struct BuilderSettings {
    pub source: Source,
    pub nix: Nix,
    pub layer_budget: usize,
    pub layering: Strategy,
    pub cache_ttl: Duration,
    pub max_concurrent_builds: usize,
    /// Builds that may wait for a slot; a new build beyond them is refused.
    pub max_queued_builds: usize,
    /// How long a failed build is answered from memory.
    pub failed_build_ttl: Duration,
    /// Where each build keeps GC roots for its store paths while it runs.
    pub gc_roots: PathBuf,
    /// Counts from NIX_POPULARITY_URL, loaded once at start. Plans use
    /// these alone (not this server's own build counts), so the same
    /// closure is layered the same way however old the server is.
    pub popularity: Arc<HashMap<String, u64>>,
    /// How long a replica's build lease lasts unless renewed (s3 backend).
    pub lease_ttl: Duration,
    /// What a pull by tag is built for (the first when only one image is
    /// wanted); at least one.
    pub platforms: Vec<Arch>,
    /// Make bills of materials in the background after each build.
    pub sbom_after_build: bool,
}

/// `PATH` in every image: the usual directories, so `/bin` (where the
/// symlink layer puts each package's programs) is on it.
const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Builder {
    settings: BuilderSettings,
    /// Awaited from request paths: sled calls never run on async workers.
    db: AsyncDb,
    /// Where builds pack blobs (the backend's staging area).
    blobs: BlobStore,
    storage: Arc<dyn Storage>,
    /// With the pins of a build that succeeded, for its clients to hold
    /// until they are answered (see `delivery`).
    builds: SingleFlight<(BuildResult, Option<PinSet>)>,
    layers: SingleFlight<Result<LayerRecord, Arc<BuildError>>>,
    /// Bills of materials being made, by Docker manifest.
    sboms: SingleFlight<Result<(), Arc<BuildError>>>,
    /// Work started after a build that a shutdown waits for.
    background: std::sync::Mutex<tokio::task::JoinSet<()>>,
    permits: Semaphore,
    queue: BuildQueue,
    failures: FailureCache<BuildError>,
    status: Arc<Status>,
    collector: Arc<Collector>,
    /// Copies proxied blobs to disk (a replica with storage limits).
    filler: Option<Arc<Filler>>,
    /// Whether the database had imported names when it was opened.
    has_pinned: bool,
    /// When this replica last noted each image's pull in the bucket.
    shared_pulls: std::sync::Mutex<std::collections::HashMap<Digest, u64>>,
    hot: HotManifests,
    /// The collector's generation the hot manifests were checked against:
    /// a collection that deleted blobs makes them all suspect.
    hot_generation: AtomicU64,
    /// The Nix binary cache, when a signing key is configured.
    nix_cache: std::sync::OnceLock<Arc<crate::nixcache::NixCache>>,
    /// The next build's conversation with Nix, started ahead.
    spare: Arc<Spare>,
}

/// SHA-256 of the parts one after another, in hex.
fn hex_sha256(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Records phase durations as a build goes.
struct Phases {
    done: Vec<(String, u64)>,
    current: Instant,
}

impl Phases {
    fn new() -> Self {
        Phases {
            done: Vec::new(),
            current: Instant::now(),
        }
    }

    fn finish(&mut self, name: &str) {
        let ms = self.current.elapsed().as_millis() as u64;
        self.done.push((name.to_owned(), ms));
        self.current = Instant::now();
    }
}

/// What a build did besides its manifest, for the record, and its handle
/// on the admin page's list of builds in flight.
struct Counters {
    layers_reused: AtomicU64,
    bytes_packed: Arc<AtomicU64>,
    /// Nix processes run, and package names Nix evaluated.
    nix_processes: AtomicU32,
    evaluated: AtomicU32,
    live: LiveBuild,
}

impl Counters {
    fn new(live: LiveBuild) -> Self {
        Counters {
            layers_reused: AtomicU64::new(0),
            bytes_packed: live.bytes_counter(),
            nix_processes: AtomicU32::new(0),
            evaluated: AtomicU32::new(0),
            live,
        }
    }

    /// Counts a Nix process about to run.
    fn nix(&self) {
        self.nix_processes.fetch_add(1, Ordering::Relaxed);
    }
}

impl Builder {
    pub fn new(
        settings: BuilderSettings,
        db: Db,
        storage: Arc<dyn Storage>,
        status: Arc<Status>,
        collector: Arc<Collector>,
    ) -> Arc<Self> {
        let permits = Semaphore::new(settings.max_concurrent_builds);
        let queue = BuildQueue::new(settings.max_queued_builds);
        // Only `import` records pinned names, and it cannot run while this
        // process holds the database: with none now, pulls by tag need
        // not look.
        let has_pinned = db.has_tag_records(TagTree::Pinned);
        // A replica's disk caches the bucket only when a limit bounds it.
        let filler = (storage.is_shared() && collector.policy().is_active())
            .then(|| Filler::new(storage.staging().clone(), Arc::clone(&storage)));
        Arc::new(Builder {
            filler,
            has_pinned,
            shared_pulls: Default::default(),
            settings,
            db: AsyncDb::new(db),
            blobs: storage.staging().clone(),
            storage,
            builds: SingleFlight::default(),
            layers: SingleFlight::default(),
            sboms: SingleFlight::default(),
            background: Default::default(),
            permits,
            queue,
            failures: FailureCache::default(),
            status,
            collector,
            hot: HotManifests::default(),
            hot_generation: AtomicU64::new(0),
            nix_cache: std::sync::OnceLock::new(),
            spare: Arc::default(),
        })
    }

    /// Turns the Nix binary cache on (once; later calls are ignored).
    pub fn set_nix_cache(&self, cache: Arc<crate::nixcache::NixCache>) {
        let _ = self.nix_cache.set(cache);
    }

    /// The Nix binary cache, if on.
    pub fn nix_cache(&self) -> Option<&Arc<crate::nixcache::NixCache>> {
        self.nix_cache.get()
    }

    /// Copies a blob being proxied from the bucket onto this replica's
    /// disk in the background, if it caches; the collector is woken after,
    /// to keep the disk within its limits.
    pub fn cache_blob(&self, digest: Digest) {
        if let Some(filler) = &self.filler {
            let collector = Arc::clone(&self.collector);
            filler.start(digest, move || collector.wake());
        }
    }

    /// The garbage collector, and where pulls are noted for it.
    pub fn collector(&self) -> &Arc<Collector> {
        &self.collector
    }

    /// Builds waiting for a slot, and how many may.
    pub fn queue_depth(&self) -> (usize, usize) {
        (self.queue.waiting(), self.queue.limit())
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The database's blocking calls: for blocking threads and tools.
    pub fn db(&self) -> &Db {
        self.db.blocking()
    }

    /// The local blob store (staging, with the s3 backend).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(crate) fn sboms(&self) -> &SingleFlight<Result<(), Arc<BuildError>>> {
        &self.sboms
    }

    /// Runs `work` in the background, where [`finish_background`]
    /// (Self::finish_background) waits for it.
    pub(crate) fn in_background(
        &self,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let mut tasks = self.background.lock().unwrap_or_else(|e| e.into_inner());
        // Finished ones are dropped, so the set holds only what runs.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(work);
    }

    /// Waits for the background work started so far (at shutdown, so that
    /// nothing holds the database after it).
    pub async fn finish_background(&self) {
        let mut tasks =
            std::mem::take(&mut *self.background.lock().unwrap_or_else(|e| e.into_inner()));
        while tasks.join_next().await.is_some() {}
    }

    pub fn nix(&self) -> &Nix {
        &self.settings.nix
    }

    pub fn source(&self) -> &Source {
        &self.settings.source
    }

    /// The cache key of an image as pulled: the source, the tag if the
    /// source reads it, the system and the packages.
    fn cache_key(&self, spec: &ImageSpec) -> String {
        let source = &self.settings.source;
        hex_sha256(&[
            // v4: the symlink layer has the user database; the config has
            // HOME, LANG and, with `nonroot`, User. An upgraded server so
            // builds every image anew (its store path layers are reused).
            "image-v4",
            &source.describe(),
            source.cache_tag(&spec.tag),
            spec.arch.nix_system(),
            spec.user.key(),
            &spec.packages.join("\n"),
        ])
    }

    /// The key of an image built from an exact commit, whichever tag led
    /// there: its contents can never change, so it is reused for good.
    fn commit_key(&self, spec: &ImageSpec, commit: &str) -> String {
        hex_sha256(&[
            "image-commit-v3",
            &self.settings.source.describe(),
            commit,
            spec.arch.nix_system(),
            spec.user.key(),
            &spec.packages.join("\n"),
        ])
    }

    /// The manifest recorded for a name and tag in `which`, if its blob is
    /// stored.
    async fn tagged(
        &self,
        which: TagTree,
        name: &str,
        tag: &str,
    ) -> Result<Option<Digest>, DbError> {
        let (blobs, name, tag) = (self.blobs.clone(), name.to_owned(), tag.to_owned());
        self.db
            .run(move |db| {
                Ok(db
                    .tag_record(which, &name, &tag)?
                    .map(|r| r.digest)
                    .filter(|d| blobs.contains(d)))
            })
            .await
    }

    /// The cached build record for an image as
    /// [`manifest_for_arch`](Self::manifest_for_arch) builds it (for its
    /// store paths), if there is one.
    pub async fn cached_record(
        &self,
        name: &str,
        tag: &str,
        arch: Arch,
    ) -> Result<Option<ManifestRecord>, DbError> {
        let spec = ImageSpec::for_arch(name, tag, arch);
        self.db.manifest(&self.cache_key(&spec)).await
    }

    /// Whether a blob is in the local blob store (with `size`, if given),
    /// looked at off the async threads.
    async fn on_disk(&self, digest: &Digest, size: Option<u64>) -> Result<bool, BuildError> {
        let (blobs, digest) = (self.blobs.clone(), *digest);
        blocking(move || {
            Ok(match size {
                Some(size) => blobs.contains_whole(&digest, size),
                None => blobs.contains(&digest),
            })
        })
        .await
    }

    /// Whether a stored manifest and every blob it names are whole, so a
    /// client can complete a pull of it. `known`: the manifest's bytes when
    /// they are in memory, so its file is only checked for its size, not
    /// read. Blocking (it reads and stats).
    fn complete(blobs: &BlobStore, manifest: &Digest, known: Option<&[u8]>) -> bool {
        let names_whole = |bytes: &[u8]| {
            crate::oci::manifest::referenced_blobs(bytes).is_some_and(|named| {
                named
                    .iter()
                    .all(|(digest, size)| blobs.contains_whole(digest, *size))
            })
        };
        let whole = match known {
            Some(bytes) => blobs.contains_whole(manifest, bytes.len() as u64) && names_whole(bytes),
            None => blobs
                .get(manifest)
                .ok()
                .flatten()
                .is_some_and(|m| names_whole(m.as_ref())),
        };
        if !whole {
            tracing::warn!(%manifest, "a cached manifest names a missing or damaged blob; the image is rebuilt");
        }
        whole
    }

    /// Whether the image behind a stored manifest can be pulled whole. On
    /// local storage the manifest and every blob it names are there with
    /// their sizes (checked off the async threads, from the bytes in memory
    /// when the manifest is warm); in a shared bucket the manifest is
    /// stored (its blobs are published before it).
    async fn servable(&self, manifest: &Digest) -> Result<bool, BuildError> {
        if self.storage.is_shared() {
            return self.stored(manifest).await;
        }
        let known = self.hot().bytes(manifest);
        let (blobs, digest) = (self.blobs.clone(), *manifest);
        blocking(move || Ok(Self::complete(&blobs, &digest, known.as_deref()))).await
    }

    /// A cached manifest that may be served without asking Nix: from
    /// memory when it is hot, else from the database and the disk (which
    /// makes it hot).
    async fn fresh_cached(&self, key: &str, tag: &str) -> Result<Option<Digest>, BuildError> {
        let named = match self.hot().named(key) {
            Some(named) if self.hot().bytes(&named.digest).is_some() => named,
            _ => {
                let Some(named) = self.cached_on_disk(key).await? else {
                    return Ok(None);
                };
                self.hot().remember(key, named);
                named
            }
        };
        let age = now_unix().saturating_sub(named.checked_at);
        let fresh = self.settings.source.is_pinned(tag) || age < self.settings.cache_ttl.as_secs();
        Ok(fresh.then_some(named.digest))
    }

    /// The manifest the database names for `key`, if its blob is stored;
    /// its bytes are kept in memory on the way.
    async fn cached_on_disk(&self, key: &str) -> Result<Option<Named>, BuildError> {
        let Some(record) = self.manifest_record(key).await? else {
            return Ok(None);
        };
        if !self.servable(&record.digest).await? {
            return Ok(None);
        }
        if self.manifest_bytes(&record.digest).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(Named {
            digest: record.digest,
            checked_at: record.checked_at,
        }))
    }

    /// A stored manifest's bytes: from memory, or read from the blob store
    /// (off the async runtime) and kept in memory.
    pub async fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, BuildError> {
        if let Some(bytes) = self.hot().bytes(digest) {
            return Ok(Some(bytes));
        }
        let blobs = self.blobs.clone();
        let d = *digest;
        let blob = tokio::task::spawn_blocking(move || blobs.get(&d)).await??;
        // A copy, not the mapping: manifests are small, and a mapping kept
        // per manifest would cost a file descriptor's worth each.
        let blob_was_remote = blob.is_none();
        let bytes = match blob {
            Some(b) => Some(Bytes::copy_from_slice(b.as_ref())),
            // Another replica's, in the bucket.
            None if self.storage.is_shared() => {
                crate::store::read_all(
                    self.storage.as_ref(),
                    digest,
                    crate::oci::manifest::MANIFEST_MAX_BYTES,
                )
                .await?
            }
            None => None,
        };
        if let Some(bytes) = &bytes {
            self.hot().remember_bytes(*digest, bytes.clone());
            if blob_was_remote && self.filler.is_some() {
                // Cached with the layers it names, so that the collector
                // sees which of them the image keeps.
                let (blobs, d, copy) = (self.blobs.clone(), *digest, bytes.clone());
                blocking(move || -> Result<u64, BuildError> {
                    Ok(blobs.put_expecting(&mut copy.as_ref(), &d)?)
                })
                .await?;
            }
        }
        Ok(bytes)
    }

    /// Manifests held in memory; all dropped once a collection deleted
    /// blobs, since any of them may have gone.
    pub(crate) fn hot(&self) -> &HotManifests {
        let generation = self.collector.generation();
        if self.hot_generation.swap(generation, Ordering::Relaxed) != generation {
            self.hot.clear();
        }
        &self.hot
    }

    /// Forgets a manifest held in memory, for whoever deletes its blob.
    pub fn forget_manifest(&self, digest: &Digest) {
        self.hot().forget(digest);
    }

    /// The platforms a pull of `name` by tag is built for: the `arm64`
    /// meta-package fixes one, else the configured ones.
    pub fn platforms_for(&self, name: &str) -> Vec<Arch> {
        if ImageSpec::names_arch(name) {
            vec![Arch::Arm64]
        } else {
            self.settings.platforms.clone()
        }
    }

    /// What a pull of `name:tag` is answered with; `takes_index`: the
    /// client takes an index. An imported name is its imported manifest,
    /// or an index over the platforms it was imported with (on a mirror
    /// too), never built; a name built here is built for each of several
    /// platforms when the client takes an index (not on a mirror), else
    /// for the first.
    pub async fn answer(
        self: &Arc<Self>,
        name: &str,
        tag: &str,
        takes_index: bool,
    ) -> Result<TagAnswer, Arc<BuildError>> {
        self.answer_held(name, tag, takes_index)
            .await
            .map(|(answer, _)| answer)
    }

    /// As [`answer`](Self::answer), with the hold on the images just built
    /// for it: keep it until the answer has been sent.
    pub async fn answer_held(
        self: &Arc<Self>,
        name: &str,
        tag: &str,
        takes_index: bool,
    ) -> Result<(TagAnswer, Hold), Arc<BuildError>> {
        let db_error = |e: DbError| Arc::new(BuildError::from(e));
        // Imported images answer whatever the source. Only `import` writes
        // them, and it cannot run beside this process: with none at start,
        // there is nothing to look up.
        let pinned = match self.has_pinned {
            true => self
                .tagged(TagTree::Pinned, name, tag)
                .await
                .map_err(db_error)?,
            false => None,
        };
        if let Some(first) = pinned {
            self.status.manifest_requested(name, Lookup::Hit, true);
            if takes_index {
                let platforms = self
                    .imported_platforms(name, tag, first)
                    .await
                    .map_err(db_error)?;
                if platforms.len() > 1 {
                    return Ok((TagAnswer::Index(platforms), Hold::default()));
                }
            }
            return Ok((TagAnswer::Manifest(first), Hold::default()));
        }
        if self.settings.source.is_mirror() {
            let built = self
                .tagged(TagTree::Built, name, tag)
                .await
                .map_err(db_error)?;
            let lookup = if built.is_some() {
                Lookup::Hit
            } else {
                Lookup::Miss
            };
            self.status
                .manifest_requested(name, lookup, built.is_some());
            return built
                .map(|d| (TagAnswer::Manifest(d), Hold::default()))
                .ok_or_else(|| Arc::new(BuildError::NoSource(format!("{name}:{tag}"))));
        }
        let platforms = self.platforms_for(name);
        if takes_index && platforms.len() > 1 {
            let built = futures::future::try_join_all(
                platforms
                    .iter()
                    .map(|arch| self.manifest_for_arch(name, tag, *arch)),
            )
            .await?;
            let (digests, holds): (Vec<Digest>, Vec<Hold>) = built.into_iter().unzip();
            let hold = holds.into_iter().fold(Hold::default(), Hold::join);
            let index = platforms.into_iter().zip(digests);
            return Ok((TagAnswer::Index(index.collect()), hold));
        }
        let (digest, hold) = self.manifest_for_arch(name, tag, platforms[0]).await?;
        Ok((TagAnswer::Manifest(digest), hold))
    }

    /// The platforms recorded for the imported `name:tag` whose manifest
    /// is stored, the one the name stands for (`first`) first, as exported.
    async fn imported_platforms(
        &self,
        name: &str,
        tag: &str,
        first: Digest,
    ) -> Result<Vec<(Arch, Digest)>, DbError> {
        let (blobs, name, tag) = (self.blobs.clone(), name.to_owned(), tag.to_owned());
        self.db
            .run(move |db| {
                let mut platforms: Vec<(Arch, Digest)> = db
                    .pinned_platforms(&name, &tag)?
                    .into_iter()
                    .filter_map(|(arch, r)| Some((Arch::from_docker(&arch)?, r.digest)))
                    .filter(|(_, d)| blobs.contains(d))
                    .collect();
                platforms.sort_by_key(|(_, d)| *d != first);
                Ok(platforms)
            })
            .await
    }

    /// The Docker manifest digest for a validated image name and tag, for
    /// the first of its platforms, building the image if it is not cached.
    pub async fn manifest_for(self: &Arc<Self>, name: &str, tag: &str) -> BuildResult {
        let answer = self.answer(name, tag, false).await?;
        answer
            .first()
            .ok_or_else(|| Arc::new(BuildError::Task("an index of no platforms".into())))
    }

    /// As [`manifest_for`](Self::manifest_for), for `arch` (which the
    /// `arm64` meta-package overrides), with the hold on the image if it
    /// was just built.
    async fn manifest_for_arch(
        self: &Arc<Self>,
        name: &str,
        tag: &str,
        arch: Arch,
    ) -> Result<(Digest, Hold), Arc<BuildError>> {
        // A mirror serves one platform per name, through `manifest_for`.
        if self.settings.source.is_mirror() {
            let e = BuildError::NoSource(format!("{name}:{tag} for {}", arch.docker()));
            return Err(Arc::new(e));
        }
        // The registry grammar was checked; a git source also needs a ref.
        self.settings
            .source
            .check_tag(tag)
            .map_err(|e| Arc::new(e.into()))?;
        let spec = ImageSpec::for_arch(name, tag, arch);
        let key = self.cache_key(&spec);
        if let Some(digest) = self.fresh_cached(&key, tag).await.map_err(Arc::new)? {
            self.status.manifest_requested(name, Lookup::Hit, true);
            self.pulled(name, digest);
            return Ok((digest, Hold::default()));
        }
        if let Some(failure) = self.failures.get(&key) {
            self.status.manifest_requested(name, Lookup::Hit, false);
            return Err(failure);
        }
        // Counted while this request waits: a queued build that loses all
        // its requesters is dropped.
        let _requester = self.queue.request(&key);
        // A build of this key already in flight is joined, queue full or not.
        let place = if self.builds.is_running(&key) {
            None
        } else {
            match self.queue.try_enter() {
                Some(place) => Some(place),
                None => {
                    self.status.manifest_requested(name, Lookup::Miss, false);
                    return Err(Arc::new(BuildError::QueueFull(self.queue.limit())));
                }
            }
        };
        let this = Arc::clone(self);
        let image = name.to_owned();
        let task_key = key.clone();
        let (result, pins) = self
            .builds
            .run(&key, move || async move {
                // The build seen running ended before this one started:
                // this is a new build, and needs a place of its own.
                let place = match place.or_else(|| this.queue.try_enter()) {
                    Some(p) => p,
                    None => {
                        let full = BuildError::QueueFull(this.queue.limit());
                        return (Err(Arc::new(full)), None);
                    }
                };
                this.build(image, spec, task_key, place).await
            })
            .await
            .unwrap_or_else(|| {
                let panicked = BuildError::Task("image build panicked".into());
                (Err(Arc::new(panicked)), None)
            });
        let result = match result {
            Err(e) if e.is_source_unreachable() => self.stale(name, tag, &key, e).await,
            other => other,
        };
        // In memory: the counts reach the database in batches.
        self.status
            .manifest_requested(name, Lookup::Miss, result.is_ok());
        if let Ok(digest) = &result {
            self.pulled(name, *digest);
        }
        result.map(|digest| (digest, Hold::of(pins)))
    }

    /// Notes a pull for the garbage collector (in memory; written in
    /// batches by the collector).
    fn pulled(&self, name: &str, digest: Digest) {
        let now = now_unix();
        self.collector.pulls().touch(digest, name, now);
        self.note_shared_pull(digest, now);
    }

    /// The source could not be reached to refresh an image past its TTL:
    /// the cached manifest, if there is one, is better than an error.
    async fn stale(&self, name: &str, tag: &str, key: &str, error: Arc<BuildError>) -> BuildResult {
        let cached = match self.manifest_record(key).await {
            Ok(Some(r)) if matches!(self.servable(&r.digest).await, Ok(true)) => r,
            _ => return Err(error),
        };
        tracing::warn!(image = name, tag, error = %error, manifest = %cached.digest,
            "the package source cannot be reached: serving the cached image");
        self.status
            .served_stale(name, tag, &error.to_string(), cached.checked_at);
        Ok(cached.digest)
    }

    /// One build, recorded whatever its outcome.
    async fn build(
        self: Arc<Self>,
        image: String,
        spec: ImageSpec,
        key: String,
        place: crate::build::queue::Place,
    ) -> (BuildResult, Option<PinSet>) {
        // A build that finished just before this one was started leaves its
        // result in the cache.
        match self.fresh_cached(&key, &spec.tag).await {
            Ok(Some(digest)) => return (Ok(digest), None),
            Ok(None) => {}
            Err(e) => return (Err(Arc::new(e)), None),
        }
        // With shared storage, one replica builds while the others wait.
        let _lease = match self.claim(&key, &spec.tag).await {
            Ok(shared::Claim::Build(lease)) => lease,
            Ok(shared::Claim::BuiltElsewhere(digest)) => return (Ok(digest), None),
            Err(e) => return (Err(Arc::new(e)), None),
        };
        // Listed in flight (as queued) while it waits for a build slot.
        let counters = Counters::new(self.status.build_started(&image, &spec.tag));
        let _permit = match self.queue.wait_for_slot(&key, place, &self.permits).await {
            Ok(p) => p,
            Err(abandoned) => {
                tracing::info!(image = %image, tag = %spec.tag, "queued build dropped: its clients went away");
                return (Err(Arc::new(abandoned.into())), None);
            }
        };
        // Blobs this build writes or reuses stay out of the collector's
        // reach until its manifest is recorded, and on success until the
        // clients waiting for it were answered (they hold the set).
        let pins = self.blobs.pin_set();
        let started_at = now_unix();
        let mut phases = Phases::new();
        let mut revision = None;
        let span = tracing::info_span!("build", image = %image, tag = %spec.tag);
        let result = self
            .run_build(
                &image,
                &spec,
                &key,
                &mut phases,
                &counters,
                &mut revision,
                &pins,
            )
            .instrument(span)
            .await;
        // The next build's Nix, started now that this one's work is done.
        self.spare.refill(&self.settings.nix);
        // Its client fetches the blobs next: held by a lease from before
        // the pins go, so that no collection slips in between; below the
        // free-space floor, by the pins until the clients were answered,
        // then by the lease's delivery grace.
        let pins = match &result {
            Ok(digest) => {
                let leased = match self.manifest_bytes(digest).await {
                    Ok(Some(bytes)) => self.lease_served(&image, digest, &bytes).await,
                    _ => Vec::new(),
                };
                pins.delivering(*digest, &image, leased);
                Some(pins)
            }
            Err(_) => {
                drop(pins);
                None
            }
        };
        // The layers are packed (or the build failed): the store paths may go.
        let gc_root = self.gc_root_dir(&key);
        let removed = blocking(move || match std::fs::remove_dir_all(gc_root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BuildError::GcRoot(e)),
            _ => Ok(()),
        });
        if let Err(e) = removed.await {
            tracing::warn!(error = %e, "could not remove a build's GC roots");
        }
        let outcome = match &result {
            Ok(digest) => BuildOutcome::Success { manifest: *digest },
            Err(BuildError::NotFound(names)) => BuildOutcome::PackagesNotFound(names.clone()),
            Err(e) => BuildOutcome::Failed {
                message: e.to_string(),
                stderr_tail: tail(
                    e.stderr_tail(usize::MAX).unwrap_or_default(),
                    STDERR_KEPT_BYTES,
                )
                .to_owned(),
            },
        };
        match &result {
            Ok(d) => {
                tracing::info!(image = %image, tag = %spec.tag, manifest = %d, phases = ?phases.done, "image built")
            }
            Err(e) => {
                let stderr = e.stderr_tail(usize::MAX).unwrap_or_default();
                tracing::warn!(image = %image, tag = %spec.tag, error = %e, stderr, "image build failed")
            }
        }
        let record = BuildRecord {
            image,
            tag: spec.tag.clone(),
            started_at,
            phases: phases.done,
            layers_total: counters.live.layers_total() as usize,
            layers_reused: counters.layers_reused.load(Ordering::Relaxed) as usize,
            bytes_packed: counters.bytes_packed.load(Ordering::Relaxed),
            outcome,
            revision,
            nix_processes: counters.nix_processes.load(Ordering::Relaxed),
            evaluated: counters.evaluated.load(Ordering::Relaxed),
        };
        let status = Arc::clone(&self.status);
        let recorded = self.db.run(move |db| {
            let added = db.add_build(&record);
            // Writes an error record too, when the build failed.
            status.build_finished(&record);
            added
        });
        if let Err(e) = recorded.await {
            tracing::warn!(error = %e, "could not record build");
        }
        if let Err(e) = self.db.flush().await {
            tracing::warn!(error = %e, "could not flush database");
        }
        let result = result.map_err(Arc::new);
        self.remember_outcome(&key, &spec.tag, &result);
        (result, pins)
    }

    /// Keeps a failure to answer from memory, for as long as it can hold;
    /// wakes the collector after a build or a full disk.
    fn remember_outcome(&self, key: &str, tag: &str, result: &BuildResult) {
        let error = match result {
            Ok(_) => {
                self.failures.forget(key);
                self.collector.wake();
                return;
            }
            Err(e) => e,
        };
        if error.is_storage_full() {
            self.collector.wake();
            return;
        }
        let ttl = match error.as_ref() {
            // Until the source can have changed: never for a pinned one.
            BuildError::NotFound(_) if self.settings.source.is_pinned(tag) => None,
            BuildError::NotFound(_) => Some(self.settings.cache_ttl),
            BuildError::Nix(_) | BuildError::Source(_) | BuildError::Layers(_) => {
                Some(self.settings.failed_build_ttl)
            }
            _ => return,
        };
        if ttl.is_some_and(|t| t.is_zero()) {
            return;
        }
        self.failures.remember(key, Arc::clone(error), ttl);
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_build(
        self: &Arc<Self>,
        image: &str,
        spec: &ImageSpec,
        key: &str,
        phases: &mut Phases,
        counters: &Counters,
        revision: &mut Option<String>,
        pins: &PinSet,
    ) -> Result<Digest, BuildError> {
        let nix = &self.settings.nix;
        counters.live.enter(Phase::Resolving);
        let resolution = self
            .settings
            .source
            .resolve(&spec.tag, nix.timeout())
            .await?;
        let commit_key = resolution.commit.as_ref().map(|c| self.commit_key(spec, c));
        *revision = resolution.commit.clone();
        // A moving tag that now names a commit built before: no evaluation.
        if let Some(ck) = &commit_key {
            phases.finish("revision");
            if let Some(built) = self.manifest_record(ck).await? {
                if self.servable(&built.digest).await? {
                    return self.keep(image, spec, key, built).await;
                }
            }
        }
        let resolved = self.evaluate(spec, &resolution, counters).await?;
        if revision.is_none() {
            *revision = match (
                &resolved.source.rev,
                &resolved.source.nar_hash,
                &resolved.source.path,
            ) {
                (Some(rev), ..) => Some(rev.clone()),
                (None, Some(hash), _) => Some(hash.clone()),
                // A tarball: its NAR hash identifies what was evaluated.
                (None, None, Some(path)) => {
                    counters.nix();
                    Some(nix.nar_hash(path).await?)
                }
                (None, None, None) => None,
            };
        }
        phases.finish("resolve");
        if !resolved.not_found.is_empty() {
            return Err(BuildError::NotFound(resolved.not_found));
        }
        let wanted: Vec<Wanted> = resolved
            .found
            .values()
            .map(|p| Wanted {
                drv_path: p.drv_path.clone(),
                out_path: p.out_path.clone(),
            })
            .collect();
        // Sorted by package name, so the symlink layer's order is stable.
        let outs: Vec<String> = resolved
            .found
            .values()
            .map(|p| p.out_path.clone())
            .collect();
        counters.live.enter(Phase::Building);
        let gc_root = self.gc_root_dir(key);
        let dir = gc_root.clone();
        blocking(move || std::fs::create_dir_all(dir).map_err(BuildError::GcRoot)).await?;
        // Realising and the closure: one Nix process, or none where a
        // daemon's socket is reached directly (see `realise`).
        let session = self.spare.take(nix).await?;
        if session.started_a_process() {
            counters.nix();
        }
        let session = session.realise(nix, &wanted, &gc_root.join("out")).await?;
        phases.finish("nix build");
        let closure = session.closure(nix, &outs).await?;
        phases.finish("closure");
        let closure_paths = crate::nixcache::closure_paths(&closure);

        let sbom_closure = closure.clone();
        // A moving source that still yields the same store paths keeps its
        // manifest: only the check time and the revision move.
        let previous = match self.manifest_record(key).await? {
            Some(p) if self.servable(&p.digest).await? => Some(p),
            _ => None,
        };
        let record = match previous {
            Some(p) if p.out_paths == outs => ManifestRecord {
                revision: revision.clone(),
                ..p
            },
            _ => {
                counters.live.enter(Phase::Packing);
                let (closure, outs, plan) = self.plan_layers(closure, outs).await?;
                phases.finish("layering");
                let config = self.image_config(spec, &resolved.found, revision.as_deref());
                let digest = self
                    .pack_and_write(config, &closure, &outs, plan, counters, pins)
                    .await?;
                phases.finish("packing");
                ManifestRecord {
                    digest,
                    checked_at: now_unix(),
                    out_paths: outs,
                    revision: revision.clone(),
                }
            }
        };
        // Before the manifest record: the collector keeps the paths of
        // closures whose image it does not know yet (a build in flight).
        crate::nixcache::record_closure(self, record.digest, closure_paths).await?;
        if let Some(ck) = &commit_key {
            self.put_manifest_record(ck, &record).await?;
        }
        let digest = self.keep(image, spec, key, record).await?;
        if !self.settings.sbom_after_build {
            return Ok(digest);
        }
        self.attach_sboms_later(
            digest,
            crate::build::referrers::Sources {
                image: image.to_owned(),
                architecture: spec.arch.docker().to_owned(),
                revision: revision.clone(),
                closure: sbom_closure,
                roots: resolved
                    .found
                    .values()
                    .map(|p| crate::build::sbom::Root {
                        out_path: p.out_path.clone(),
                        licenses: p.licenses.clone(),
                        homepage: p.homepage.clone(),
                    })
                    .collect(),
            },
        );
        Ok(digest)
    }

    /// The packages of an image resolved to derivations: from the
    /// evaluation cache when the source's revision is fixed and each name
    /// is known there, the unknown ones evaluated together (and
    /// remembered).
    async fn evaluate(
        &self,
        spec: &ImageSpec,
        resolution: &Resolution,
        counters: &Counters,
    ) -> Result<Resolved, BuildError> {
        let system = spec.arch.nix_system();
        let revision = resolution.commit.as_ref().map(|commit| Revision {
            source: self.settings.source.describe(),
            commit: commit.clone(),
            system: system.to_owned(),
        });
        let known = match &revision {
            Some(revision) => {
                let (revision, names) = (revision.clone(), spec.packages.clone());
                self.db
                    .run(move |db| eval_cache::lookup(db, &revision, &names))
                    .await?
            }
            None => Known {
                found: BTreeMap::new(),
                unknown: spec.packages.clone(),
            },
        };
        if known.unknown.is_empty() {
            return Ok(Resolved {
                found: known.found,
                not_found: Vec::new(),
                source: Default::default(),
            });
        }
        let src = &resolution.nix;
        counters.nix();
        let names = u32::try_from(known.unknown.len()).unwrap_or(u32::MAX);
        counters.evaluated.fetch_add(names, Ordering::Relaxed);
        let mut resolved = self
            .settings
            .nix
            .resolve(src.src_type, &src.src_args, system, &known.unknown)
            .await
            .map_err(|e| missing_commit(&self.settings.source, &spec.tag, e))?;
        if let Some(revision) = revision {
            let found = resolved.found.clone();
            self.db
                .run(move |db| eval_cache::remember(db, &revision, &found))
                .await?;
        }
        resolved.found.extend(known.found);
        Ok(resolved)
    }

    /// Records a manifest as current for the pulled name and tag.
    async fn keep(
        &self,
        image: &str,
        spec: &ImageSpec,
        key: &str,
        record: ManifestRecord,
    ) -> Result<Digest, BuildError> {
        let record = ManifestRecord {
            checked_at: now_unix(),
            ..record
        };
        self.put_manifest_record(key, &record).await?;
        // What a mirror serves for the name: the platform a pull gets.
        let named = (self.platforms_for(image).first() == Some(&spec.arch)).then_some(TagRecord {
            digest: record.digest,
            at: record.checked_at,
        });
        let hot = Named {
            digest: record.digest,
            checked_at: record.checked_at,
        };
        if let Some(named) = named {
            self.db
                .put_tag_record(TagTree::Built, image, &spec.tag, &named)
                .await?;
        }
        self.hot().remember(key, hot);
        Ok(hot.digest)
    }

    /// The run settings and labels of an image (not its layers).
    fn image_config(
        &self,
        spec: &ImageSpec,
        found: &BTreeMap<String, ResolvedPackage>,
        revision: Option<&str>,
    ) -> ImageConfig {
        let mut labels = BTreeMap::from([(
            "org.opencontainers.image.source".to_owned(),
            self.settings.source.public_description(),
        )]);
        if let Some(rev) = revision {
            labels.insert("org.opencontainers.image.revision".into(), rev.to_owned());
        }
        ImageConfig {
            architecture: spec.arch.docker().to_owned(),
            env: vec![
                IMAGE_PATH.to_owned(),
                format!("HOME={}", spec.user.home()),
                format!("LANG={}", users::LANG),
                format!("SSL_CERT_FILE={SSL_CERT_FILE}"),
            ],
            user: spec.user.config_user(),
            cmd: spec.default_cmd(found),
            labels,
        }
    }

    /// Packs the layers and writes the config and manifest blobs.
    async fn pack_and_write(
        &self,
        config: ImageConfig,
        closure: &[PathInfo],
        outs: &[String],
        plan: Vec<layering::Layer>,
        counters: &Counters,
        pins: &PinSet,
    ) -> Result<Digest, BuildError> {
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut jobs: Vec<(String, Vec<PathBuf>, bool)> = plan
            .iter()
            .map(|l| {
                // The format in the key: layers packed another way are
                // never mixed with these.
                let key = format!("{}:{}", archive::LAYER_FORMAT, l.key());
                (key, l.paths.iter().map(PathBuf::from).collect(), false)
            })
            .collect();
        // v2: with the user database. The same for every image user.
        let symlink_key =
            hex_sha256(&["symlink-layer-v2", archive::LAYER_FORMAT, &outs.join("\n")]);
        jobs.push((symlink_key, outs.iter().map(PathBuf::from).collect(), true));
        counters.live.set_layers_total(jobs.len() as u64);
        // `buffered` keeps the plan's order while packing several at once.
        // After a failure no new layer starts, but those under way finish
        // (and remove their temp files) before the build reports it.
        let failed = AtomicBool::new(false);
        let results: Vec<Result<LayerRecord, BuildError>> = stream::iter(jobs)
            .map(|(layer_key, paths, symlinks)| {
                let failed = &failed;
                async move {
                    if failed.load(Ordering::Relaxed) {
                        return Err(BuildError::Task("not started: a layer failed".into()));
                    }
                    let result = self.layer(layer_key, paths, symlinks, counters, pins).await;
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                }
            })
            .buffered(parallel)
            .inspect_ok(|_| counters.live.layer_done())
            .collect()
            .await;
        // Layers start in plan order, so the first error in it is a real
        // failure, never a layer that was not started.
        let records = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let layer_blobs: Vec<LayerBlob> = records
            .iter()
            .map(|r| LayerBlob {
                digest: r.digest,
                diff_id: r.diff_id,
                size: r.size,
            })
            .collect();
        counters.live.enter(Phase::WritingManifest);
        let blobs = self.blobs.pinning_into(pins);
        let db = self.db.clone();
        let names: Vec<String> = closure
            .iter()
            .map(|p| store_path::name_of(&p.path).to_owned())
            .collect();
        let (config_digest, manifest_digest) = blocking(move || -> Result<_, BuildError> {
            let built = manifest::build(&config, &layer_blobs)?;
            let config_digest = blobs.put(&built.config.json)?;
            let manifest_digest = blobs.put(&built.manifest.json)?;
            db.blocking()
                .add_popularity(names.iter().map(String::as_str))?;
            Ok((config_digest, manifest_digest))
        })
        .await?;
        // The manifest last: whoever sees it finds everything it names.
        self.publish(&config_digest).await?;
        self.publish(&manifest_digest).await?;
        Ok(manifest_digest)
    }

    /// One layer: from the index if it was packed before, else packed now
    /// (once, however many builds ask for it at the same time).
    async fn layer(
        &self,
        key: String,
        paths: Vec<PathBuf>,
        symlinks: bool,
        counters: &Counters,
        pins: &PinSet,
    ) -> Result<LayerRecord, BuildError> {
        if let Some(record) = self.layer_record(&key).await? {
            // Pinned before the check, so it cannot go after it.
            pins.add(self.blobs.pin(&record.digest));
            let whole = if self.storage.is_shared() {
                self.stored(&record.digest).await?
            } else {
                self.on_disk(&record.digest, Some(record.size)).await?
            };
            if whole {
                counters.layers_reused.fetch_add(1, Ordering::Relaxed);
                return Ok(record);
            }
        }
        let progress = Arc::clone(&counters.bytes_packed);
        let db = self.db.clone();
        let blobs = self.blobs.pinning_into(pins);
        let staging = self.blobs.clone();
        let storage = Arc::clone(&self.storage);
        let task_key = key.clone();
        let result = self
            .layers
            .run(&key, move || async move {
                let packed =
                    tokio::task::spawn_blocking(move || -> Result<PackedLayer, ArchiveError> {
                        if symlinks {
                            archive::pack_symlink_layer(&blobs, &paths, &progress)
                        } else {
                            archive::pack_paths(&blobs, &paths, &progress)
                        }
                    })
                    .await
                    .map_err(|e| Arc::new(e.into()))?
                    .map_err(|e| Arc::new(BuildError::Archive(e)))?;
                let record = LayerRecord {
                    digest: packed.digest,
                    diff_id: packed.diff_id,
                    size: packed.size,
                };
                // Published before it is indexed: a record never names a
                // blob that is not there.
                let shared = |e: StoreError| Arc::new(BuildError::Storage(e));
                storage
                    .put_file(&staging.path_of(&record.digest), &record.digest)
                    .await
                    .map_err(shared)?;
                db.put_layer(&task_key, &record)
                    .await
                    .map_err(|e| Arc::new(BuildError::Db(e)))?;
                if storage.is_shared() {
                    let bytes = crate::store::db::encode(&record)
                        .map_err(|e| Arc::new(BuildError::Db(e)))?;
                    storage
                        .put_record(crate::store::RecordKind::Layer, &task_key, bytes)
                        .await
                        .map_err(shared)?;
                }
                Ok(record)
            })
            .await
            .unwrap_or_else(|| Err(Arc::new(BuildError::Task("layer packing panicked".into()))));
        let record = result.map_err(BuildError::Shared)?;
        // Another build may have packed it: hold it for this one too.
        pins.add(self.blobs.pin(&record.digest));
        if !self.on_disk(&record.digest, None).await? {
            return Err(BuildError::Task(
                "a shared layer was collected before this build used it".into(),
            ));
        }
        Ok(record)
    }

    /// The directory whose links keep a build's store paths alive; one build
    /// per key runs at a time, so the key names it.
    fn gc_root_dir(&self, key: &str) -> PathBuf {
        self.settings.gc_roots.join(key)
    }

    /// The layer plan, off the async workers (a large closure takes a
    /// noticeable fraction of a second); hands the inputs back.
    async fn plan_layers(
        &self,
        closure: Vec<PathInfo>,
        outs: Vec<String>,
    ) -> Result<(Vec<PathInfo>, Vec<String>, Vec<layering::Layer>), BuildError> {
        let popularity = Arc::clone(&self.settings.popularity);
        let (strategy, budget) = (self.settings.layering, self.settings.layer_budget);
        blocking(move || {
            let plan = layering::plan(strategy, &closure, &outs, &popularity, budget)?;
            Ok((closure, outs, plan))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::{is_fetch_failure, tail, BuildError, Builder, GitError, NixError, Stage};
    use crate::build::manifest::{self, ImageConfig, LayerBlob};
    use crate::digest::Digest;
    use crate::store::fs::BlobStore;

    /// A stored image of two layers: the store, its manifest's digest and
    /// bytes, and its layers' digests.
    fn stored_image(dir: &std::path::Path) -> (BlobStore, Digest, Vec<u8>, Vec<Digest>) {
        let blobs = BlobStore::open(dir).unwrap();
        let layers: Vec<LayerBlob> = [&b"layer one"[..], b"layer two"]
            .iter()
            .map(|bytes| LayerBlob {
                digest: blobs.put(bytes).unwrap(),
                diff_id: Digest::of(bytes),
                size: bytes.len() as u64,
            })
            .collect();
        let config = ImageConfig {
            architecture: "amd64".into(),
            env: Vec::new(),
            user: None,
            cmd: None,
            labels: Default::default(),
        };
        let built = manifest::build(&config, &layers).unwrap();
        blobs.put(&built.config.json).unwrap();
        let digest = blobs.put(&built.manifest.json).unwrap();
        let layers = layers.iter().map(|l| l.digest).collect();
        (blobs, digest, built.manifest.json, layers)
    }

    #[test]
    fn a_warm_recheck_uses_the_bytes_in_memory_and_finds_a_deleted_layer() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, digest, bytes, layers) = stored_image(dir.path());
        assert!(Builder::complete(&blobs, &digest, None));
        assert!(Builder::complete(&blobs, &digest, Some(&bytes)));

        blobs.delete(&layers[1]).unwrap();
        assert!(!Builder::complete(&blobs, &digest, None));
        assert!(!Builder::complete(&blobs, &digest, Some(&bytes)));
    }

    #[test]
    fn a_warm_recheck_still_wants_the_manifest_blob_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, digest, bytes, _) = stored_image(dir.path());
        // Bytes of another length than the file: the file is damaged.
        let mut longer = bytes.clone();
        longer.push(b' ');
        assert!(!Builder::complete(&blobs, &digest, Some(&longer)));

        blobs.delete(&digest).unwrap();
        assert!(!Builder::complete(&blobs, &digest, Some(&bytes)));
    }

    #[test]
    fn only_an_unreachable_source_is_worth_serving_stale() {
        let timeout = |stage| BuildError::Nix(NixError::Timeout { stage, seconds: 1 });
        assert!(timeout(Stage::Resolve).is_source_unreachable());
        assert!(!timeout(Stage::Realise).is_source_unreachable());
        assert!(BuildError::Source(GitError::Failed("x".into())).is_source_unreachable());
        assert!(!BuildError::Source(GitError::UnknownRef("v".into())).is_source_unreachable());
        assert!(!BuildError::NotFound(vec!["x".into()]).is_source_unreachable());
        let failed = |stage, stderr: &str| {
            BuildError::Nix(NixError::Failed {
                stage,
                status: Some(1),
                stderr: stderr.into(),
            })
        };
        let download = "error: unable to download 'http://x/n.tgz': Couldn't connect to server (7)";
        assert!(failed(Stage::Resolve, download).is_source_unreachable());
        assert!(!failed(Stage::Realise, download).is_source_unreachable());
    }

    #[test]
    fn fetch_failures_are_told_from_build_failures() {
        assert!(is_fetch_failure(
            "error: unable to download 'http://127.0.0.1:1/n.tgz': Couldn't connect to server (7)"
        ));
        assert!(is_fetch_failure(
            "fatal: unable to access 'https://x/': Could not resolve host: x"
        ));
        assert!(!is_fetch_failure(
            "error: builder for '/nix/store/x.drv' failed with exit code 1"
        ));
    }

    #[test]
    fn tail_cuts_at_a_line_within_the_limit() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("one\ntwo\nthree\n", 9), "three\n");
        // No newline in reach: cut at a character boundary.
        assert_eq!(tail("aaaaébbbb", 5), "bbbb");
        assert_eq!(tail("aaaaébbbb", 6), "ébbbb");
        assert!(tail(&"x\n".repeat(100_000), 1000).len() <= 1000);
    }
}
