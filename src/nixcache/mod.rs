//! The LAN's Nix binary cache: the store paths behind every image this
//! server built or imported, served as signed narinfos and NARs under
//! `/nix-cache/` (see `http::nix_cache`).
//!
//! Which paths are served is recorded per image (the runtime closure the
//! build saw: `db::nix`); nothing else of the host's store is reachable.
//! A path's NAR is made on the first narinfo request for it (once, however
//! many ask at the same time), stored as a blob, and recorded as a `Blob`
//! referrer of every image that has the path: the model all stored
//! content follows, so the collector keeps it exactly while such an image
//! is kept, verify checks it, and the bucket shares it. On s3 the closures
//! are in the bucket too, and every replica serves them (`shared`).

pub mod backfill;
pub mod base32;
pub mod carry;
pub mod key;
pub mod nar;
pub mod narinfo;
pub mod produce;
pub mod shared;

use crate::blocking::blocking;
use crate::build::builder::{BuildError, Builder};
use crate::build::singleflight::SingleFlight;
use crate::digest::Digest;
use crate::store::db::nix::{hash_part, ClosurePath, NarRecord, NixPathRecord};
use crate::store::db::{DbError, Referrer, ReferrerKind};
use key::SigningKey;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What `nix-cache-info` says. A priority below cache.nixos.org's 40: a
/// LAN is nearer.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// The `artifactType` of a NAR among an image's referrers.
pub const NAR_ARTIFACT_TYPE: &str = "application/vnd.nixos.nar.v1";
/// Annotations of a NAR referrer: what its narinfo says beyond the blob.
pub const STORE_PATH: &str = "org.nixos.store-path";
pub const NAR_HASH: &str = "org.nixos.nar-hash";
pub const NAR_SIZE: &str = "org.nixos.nar-size";

#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("database: {0}")]
    Db(String),
    #[error("making the NAR of {path}: {reason}")]
    Produce { path: String, reason: String },
    #[error("storing a NAR: {0}")]
    Store(String),
}

impl From<DbError> for CacheError {
    fn from(e: DbError) -> Self {
        CacheError::Db(e.to_string())
    }
}

impl From<BuildError> for CacheError {
    fn from(e: BuildError) -> Self {
        CacheError::Store(e.to_string())
    }
}

impl From<tokio::task::JoinError> for CacheError {
    fn from(e: tokio::task::JoinError) -> Self {
        CacheError::Db(e.to_string())
    }
}

/// Requests answered, for the admin page (since start).
#[derive(Debug, Default)]
pub struct Counters {
    pub narinfo_hits: AtomicU64,
    pub narinfo_misses: AtomicU64,
    pub nars_served: AtomicU64,
    pub nar_bytes_served: AtomicU64,
    pub nars_made: AtomicU64,
}

pub struct NixCache {
    key: SigningKey,
    making: SingleFlight<Result<Option<NarRecord>, CacheError>>,
    /// Signed narinfos answered before, while the collector has deleted
    /// nothing since (its generation): Nix asks for many, often again.
    answered: std::sync::Mutex<Answered>,
    /// On shared storage: this replica's view of the bucket's closures.
    follower: shared::Follower,
    pub counters: Counters,
}

/// Narinfos by hash part, good for one collector generation.
#[derive(Default)]
struct Answered {
    generation: u64,
    texts: std::collections::HashMap<String, Arc<str>>,
}

/// Narinfos remembered at most (about 1 KiB each); then forgotten at once.
const ANSWERED_MAX: usize = 16_384;

impl std::fmt::Debug for NixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixCache")
            .field("public_key", &self.key.public())
            .finish_non_exhaustive()
    }
}

/// A closure as Nix reports it, as the cache records it.
pub fn closure_paths(closure: &[crate::build::store_path::PathInfo]) -> Vec<ClosurePath> {
    closure
        .iter()
        .map(|p| ClosurePath {
            path: p.path.clone(),
            references: p.references.clone(),
            deriver: p.deriver.clone(),
        })
        .collect()
}

/// The referrer that keeps a NAR with an image.
pub fn nar_referrer(path: &str, nar: &NarRecord) -> Referrer {
    let mut annotations = vec![
        (NAR_HASH.to_owned(), narinfo::nix_hash(&nar.nar_hash)),
        (NAR_SIZE.to_owned(), nar.nar_size.to_string()),
        (STORE_PATH.to_owned(), path.to_owned()),
    ];
    annotations.sort();
    Referrer {
        kind: ReferrerKind::Blob,
        media_type: "application/zstd".to_owned(),
        artifact_type: NAR_ARTIFACT_TYPE.to_owned(),
        digest: nar.file,
        size: nar.file_size,
        annotations,
    }
}

fn annotation<'a>(r: &'a Referrer, name: &str) -> Option<&'a str> {
    r.annotations
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The store path and NAR a referrer made by [`nar_referrer`] keeps.
pub fn nar_of_referrer(r: &Referrer) -> Option<(String, NarRecord)> {
    if r.kind != ReferrerKind::Blob || r.artifact_type != NAR_ARTIFACT_TYPE {
        return None;
    }
    let annotation = |name: &str| annotation(r, name);
    let nar_hash = base32::decode::<32>(annotation(NAR_HASH)?.strip_prefix("sha256:")?)?;
    let nar = NarRecord {
        nar_hash: Digest::from_bytes(nar_hash),
        nar_size: annotation(NAR_SIZE)?.parse().ok()?,
        file: r.digest,
        file_size: r.size,
        compression: crate::store::db::nix::NarCompression::Zstd,
    };
    Some((annotation(STORE_PATH)?.to_owned(), nar))
}

/// Why a NAR kept with an image does not unpack to the NarHash and
/// NarSize its referrer records, if it does not (for `verify`). Blocking.
pub fn nar_problem(
    blobs: &crate::store::fs::BlobStore,
    r: &Referrer,
) -> Result<Option<String>, crate::store::fs::BlobError> {
    let Some(file) = blobs.get(&r.digest)? else {
        return Ok(Some(format!("NAR {} is missing", r.digest)));
    };
    Ok(unpack_problem(file.as_ref(), r))
}

/// Why the compressed NAR `compressed` does not unpack to the NarHash and
/// NarSize its referrer `r` records, if it does not. Blocking.
pub fn unpack_problem(compressed: impl std::io::Read, r: &Referrer) -> Option<String> {
    let annotation = |name: &str| annotation(r, name);
    let mut hashed = crate::digest::HashingWriter::new(std::io::sink());
    let unpacked = zstd::stream::copy_decode(compressed, &mut hashed);
    let (_, digest, size) = hashed.finish();
    let problem = match unpacked {
        Err(e) => Some(format!("NAR {} does not unpack: {e}", r.digest)),
        Ok(())
            if Some(narinfo::nix_hash(&digest).as_str()) != annotation(NAR_HASH)
                || Some(size.to_string().as_str()) != annotation(NAR_SIZE) =>
        {
            Some(format!(
                "NAR {} of {} does not unpack to its NarHash",
                r.digest,
                annotation(STORE_PATH).unwrap_or("?")
            ))
        }
        Ok(()) => None,
    };
    problem
}

/// Records the closure of a just-built (or imported) image: its paths
/// become servable, and the NARs already made of them are kept with it
/// too. On s3 it goes to the bucket first (see `shared`), and the NARs
/// not made yet are made now, in the background: another replica's host
/// may not have the paths to make them from.
pub async fn record_closure(
    builder: &Arc<Builder>,
    manifest: Digest,
    closure: Vec<ClosurePath>,
) -> Result<(), BuildError> {
    shared::publish(builder, &manifest, &closure).await?;
    let db = builder.db().clone();
    let paths: Vec<String> = closure.iter().map(|p| p.path.clone()).collect();
    let made = blocking(move || -> Result<_, DbError> {
        db.put_nix_closure(&manifest, &closure)?;
        db.nars_made(&paths)
    })
    .await?;
    if let Some(cache) = builder
        .nix_cache()
        .filter(|_| builder.storage().is_shared())
    {
        let (cache, b) = (Arc::clone(cache), Arc::clone(builder));
        builder.in_background(async move { cache.make_missing(&b, &manifest).await });
    }
    let referrers: Vec<Referrer> = made
        .iter()
        .filter_map(|r| Some(nar_referrer(&r.path, r.nar.as_ref()?)))
        .collect();
    if !referrers.is_empty() {
        builder.add_referrers(&manifest, referrers).await?;
    }
    Ok(())
}

impl NixCache {
    pub fn new(key: SigningKey) -> Self {
        NixCache {
            key,
            making: SingleFlight::default(),
            answered: Default::default(),
            follower: Default::default(),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> String {
        self.key.public()
    }

    /// The signed narinfo of the served path with this hash part (already
    /// checked to be one); None if no image has it, or its NAR cannot be
    /// made (the host's store lost it).
    pub async fn narinfo(
        &self,
        builder: &Arc<Builder>,
        hash: &str,
    ) -> Result<Option<Arc<str>>, CacheError> {
        // What this replica knows still answers while the bucket is out of
        // reach.
        if let Err(e) = self.follow(builder).await {
            tracing::warn!(error = %e, "could not follow the bucket's Nix closures");
        }
        let generation = builder.collector().generation();
        if let Some(text) = self.remembered(generation, hash) {
            self.counters.narinfo_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(text));
        }
        let (db, owned) = (builder.db().clone(), hash.to_owned());
        let Some(record) = blocking(move || db.nix_path(&owned)).await? else {
            self.counters.narinfo_misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let nar = match record.nar {
            Some(nar) if matches!(builder.storage().stat(&nar.file).await, Ok(Some(_))) => {
                Some(nar)
            }
            _ => match self.made_elsewhere(builder, hash).await? {
                Some(nar) => Some(nar),
                None => self.make(builder, hash, &record).await?,
            },
        };
        let Some(nar) = nar else {
            self.counters.narinfo_misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.counters.narinfo_hits.fetch_add(1, Ordering::Relaxed);
        let text: Arc<str> = narinfo::render(&record, &nar, &self.key).into();
        self.remember(generation, hash, &text);
        Ok(Some(text))
    }

    fn forget_answers(&self) {
        let mut answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        answered.texts.clear();
    }

    /// On s3: the NAR of a path another replica made, as the bucket's
    /// referrers records of the images that have it name it.
    async fn made_elsewhere(
        &self,
        builder: &Builder,
        hash: &str,
    ) -> Result<Option<NarRecord>, CacheError> {
        if !builder.storage().is_shared() {
            return Ok(None);
        }
        let (db, owned) = (builder.db().clone(), hash.to_owned());
        for image in blocking(move || db.nix_path_users(&owned)).await? {
            let found = shared::nars_in_bucket(builder, &image)
                .await?
                .into_iter()
                .find(|(h, _)| h == hash);
            let Some((_, nar)) = found else {
                continue;
            };
            if !matches!(builder.storage().stat(&nar.file).await, Ok(Some(_))) {
                continue;
            }
            let (db, owned) = (builder.db().clone(), hash.to_owned());
            if blocking(move || db.set_nar(&owned, &nar)).await? {
                return Ok(Some(nar));
            }
        }
        Ok(None)
    }

    /// Makes the NARs of an image's paths that are not made yet (after a
    /// build on s3). Failures are logged: a narinfo request tries again.
    pub async fn make_missing(&self, builder: &Arc<Builder>, manifest: &Digest) {
        let (db, m) = (builder.db().clone(), *manifest);
        let paths = match blocking(move || db.nix_closure(&m)).await {
            Ok(Some(c)) => c.paths,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%manifest, error = %e, "could not read an image's closure");
                return;
            }
        };
        for path in paths {
            let Some(hash) = hash_part(&path) else {
                continue;
            };
            let (db, h) = (builder.db().clone(), hash.to_owned());
            let record = match blocking(move || db.nix_path(&h)).await {
                Ok(Some(r)) if r.nar.is_none() => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(path, error = %e, "could not read a store path's record");
                    continue;
                }
            };
            if let Err(e) = self.make(builder, hash, &record).await {
                tracing::warn!(path, error = %e, "could not make a NAR for the Nix cache");
            }
        }
    }

    /// On s3: brings this replica's closures in line with the bucket's
    /// (at most every `shared::FOLLOW_EVERY`).
    pub async fn follow(&self, builder: &Builder) -> Result<(), CacheError> {
        if builder.storage().is_shared() && self.follower.follow(builder).await? {
            self.forget_answers();
        }
        Ok(())
    }

    /// Lets narinfo requests follow the bucket (after start-up
    /// publishing; until then they wait).
    pub fn start_following(&self) {
        self.follower.start();
    }

    fn remembered(&self, generation: u64, hash: &str) -> Option<Arc<str>> {
        let answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        (answered.generation == generation)
            .then(|| answered.texts.get(hash).cloned())
            .flatten()
    }

    fn remember(&self, generation: u64, hash: &str, text: &Arc<str>) {
        let mut answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if answered.generation != generation || answered.texts.len() >= ANSWERED_MAX {
            answered.texts.clear();
            answered.generation = generation;
        }
        answered.texts.insert(hash.to_owned(), Arc::clone(text));
    }

    /// Whether blob `file` is the NAR of a served path.
    pub async fn serves_nar(&self, builder: &Builder, file: &Digest) -> Result<bool, CacheError> {
        let (db, file) = (builder.db().clone(), *file);
        Ok(blocking(move || db.nar_owner(&file)).await?.is_some())
    }

    /// Notes a NAR sent (or its part).
    pub fn served(&self, bytes: u64) {
        self.counters.nars_served.fetch_add(1, Ordering::Relaxed);
        self.counters
            .nar_bytes_served
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Makes the NAR of `record`'s path, once however many ask.
    async fn make(
        &self,
        builder: &Arc<Builder>,
        hash: &str,
        record: &NixPathRecord,
    ) -> Result<Option<NarRecord>, CacheError> {
        let (path, builder_owned, hash_owned) =
            (record.path.clone(), Arc::clone(builder), hash.to_owned());
        let made = self
            .making
            .run(hash, move || make_nar(path, hash_owned, builder_owned))
            .await
            .unwrap_or_else(|| {
                Err(CacheError::Produce {
                    path: record.path.clone(),
                    reason: "the task failed".into(),
                })
            })?;
        if made.is_some() {
            self.counters.nars_made.fetch_add(1, Ordering::Relaxed);
        }
        Ok(made)
    }
}

pub(crate) async fn make_nar(
    path: String,
    hash: String,
    builder: Arc<Builder>,
) -> Result<Option<NarRecord>, CacheError> {
    // Only a store path, never anything a record could point elsewhere.
    if hash_part(&path) != Some(hash.as_str()) || path.contains("/..") {
        return Ok(None);
    }
    let host = PathBuf::from(&path);
    let storage = Arc::clone(builder.storage());
    // Pinned from its commit until recorded, so a collection in between
    // cannot take it.
    let pins = storage.staging().pin_set();
    let staging = storage.staging().pinning_into(&pins);
    let produce_error = |reason: String| CacheError::Produce {
        path: path.clone(),
        reason,
    };
    let made = tokio::task::spawn_blocking(move || {
        if std::fs::symlink_metadata(&host).is_err() {
            return Ok(None);
        }
        produce::produce(&host, &staging).map(Some)
    })
    .await
    .map_err(|e| produce_error(e.to_string()))?
    .map_err(|e| produce_error(e.to_string()))?;
    let Some(nar) = made else {
        tracing::warn!(
            path,
            "a store path of an image is not in the host's store: its narinfo is 404"
        );
        return Ok(None);
    };
    storage
        .put_file(&storage.staging().path_of(&nar.file), &nar.file)
        .await
        .map_err(|e| CacheError::Store(e.to_string()))?;
    let db = builder.db().clone();
    let users = blocking(move || -> Result<_, DbError> {
        db.set_nar(&hash, &nar)?
            .then(|| db.nix_path_users(&hash))
            .transpose()
    })
    .await?;
    let Some(users) = users else {
        return Ok(None);
    };
    for image in users {
        builder
            .add_referrers(&image, vec![nar_referrer(&path, &nar)])
            .await?;
    }
    drop(pins);
    tracing::info!(
        path,
        nar_size = nar.nar_size,
        file_size = nar.file_size,
        "made a NAR for the Nix cache"
    );
    Ok(Some(nar))
}
