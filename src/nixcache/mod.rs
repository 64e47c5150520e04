//! The LAN's Nix binary cache: the store paths behind every image this
//! server built or imported, served as signed narinfos and NARs under
//! `/nix-cache/` (see `http::nix_cache`).
//!
//! Which paths are served is recorded per image (the runtime closure the
//! build saw: `db::nix`); nothing else of the host's store is reachable.
//! A path's NAR is made on the first narinfo request for it (once, however
//! many ask at the same time), stored as a blob, and reused after.

pub mod base32;
pub mod key;
pub mod nar;
pub mod narinfo;
pub mod produce;

use crate::build::singleflight::SingleFlight;
use crate::digest::Digest;
use crate::store::db::nix::{hash_part, NarRecord, NixPathRecord};
use crate::store::db::{AsyncDb, DbError};
use crate::store::Storage;
use key::SigningKey;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What `nix-cache-info` says. A priority below cache.nixos.org's 40: a
/// LAN is nearer.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

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
    db: AsyncDb,
    storage: Arc<dyn Storage>,
    making: SingleFlight<Result<Option<NarRecord>, CacheError>>,
    pub counters: Counters,
}

impl std::fmt::Debug for NixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixCache")
            .field("public_key", &self.key.public())
            .finish_non_exhaustive()
    }
}

impl NixCache {
    pub fn new(key: SigningKey, db: AsyncDb, storage: Arc<dyn Storage>) -> Self {
        NixCache {
            key,
            db,
            storage,
            making: SingleFlight::default(),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> String {
        self.key.public()
    }

    /// The signed narinfo of the served path with this hash part (already
    /// checked to be one); None if no image has it, or its NAR cannot be
    /// made (the host's store lost it).
    pub async fn narinfo(&self, hash: &str) -> Result<Option<String>, CacheError> {
        let owned = hash.to_owned();
        let Some(record) = self.db.run(move |db| db.nix_path(&owned)).await? else {
            self.counters.narinfo_misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let nar = match record.nar {
            Some(nar) if self.is_stored(&nar.file).await => Some(nar),
            _ => self.make(hash, &record).await?,
        };
        let Some(nar) = nar else {
            self.counters.narinfo_misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.counters.narinfo_hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(narinfo::render(&record, &nar, &self.key)))
    }

    async fn is_stored(&self, file: &Digest) -> bool {
        matches!(self.storage.stat(file).await, Ok(Some(_)))
    }

    /// Whether blob `file` is the NAR of a served path.
    pub async fn serves_nar(&self, file: &Digest) -> Result<bool, CacheError> {
        let file = *file;
        Ok(self.db.run(move |db| db.nar_owner(&file)).await?.is_some())
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
        hash: &str,
        record: &NixPathRecord,
    ) -> Result<Option<NarRecord>, CacheError> {
        let path = record.path.clone();
        let (db, storage, hash_owned) =
            (self.db.clone(), Arc::clone(&self.storage), hash.to_owned());
        let made = self
            .making
            .run(hash, move || make_nar(path, hash_owned, db, storage))
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

async fn make_nar(
    path: String,
    hash: String,
    db: AsyncDb,
    storage: Arc<dyn Storage>,
) -> Result<Option<NarRecord>, CacheError> {
    // Only a store path, never anything a record could point elsewhere.
    if hash_part(&path) != Some(hash.as_str()) || path.contains("/..") {
        return Ok(None);
    }
    let host = PathBuf::from(&path);
    // Pinned from its commit until recorded, so a collection in between
    // cannot take it.
    let pins = storage.staging().pin_set();
    let staging = storage.staging().pinning_into(&pins);
    let made = tokio::task::spawn_blocking(move || {
        if std::fs::symlink_metadata(&host).is_err() {
            return Ok(None);
        }
        produce::produce(&host, &staging).map(Some)
    })
    .await
    .map_err(|e| CacheError::Produce {
        path: path.clone(),
        reason: e.to_string(),
    })?
    .map_err(|e| CacheError::Produce {
        path: path.clone(),
        reason: e.to_string(),
    })?;
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
    let kept = db.run(move |db| db.set_nar(&hash, &nar)).await?;
    drop(pins);
    tracing::info!(
        path,
        nar_size = nar.nar_size,
        file_size = nar.file_size,
        "made a NAR for the Nix cache"
    );
    Ok(kept.then_some(nar))
}
