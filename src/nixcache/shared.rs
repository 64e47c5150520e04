//! The Nix cache of replicas that share a bucket. Each image's closure is
//! recorded in the bucket (`index/nix-closures/<manifest>`), written before
//! the replica's own database, next to its referrers record (which names
//! its NARs, blobs in the bucket). A replica follows that index into its
//! database at most every [`FOLLOW_EVERY`], when the cache is asked: it
//! takes the closures it lacks (with the NARs made so far) and forgets the
//! ones the bucket's collection deleted with their images. So every
//! replica serves every image's paths, and none serves an evicted image's.

use super::{nar_of_referrer, CacheError};
use crate::blocking::blocking;
use crate::build::builder::Builder;
use crate::digest::Digest;
use crate::store::db::nix::{hash_part, ClosurePath, NarRecord, SharedClosureRecord};
use crate::store::db::{self, DbError, ReferrersRecord};
use crate::store::RecordKind;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How stale a replica's view of the bucket's closures may be: a path of
/// an image another replica just built, or of one just evicted, is known
/// as such after at most this long.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(3);
/// Records read at once.
const READS_AT_ONCE: usize = 16;

#[derive(Debug)]
pub struct Follower {
    /// When this replica last followed the bucket; held while it does, so
    /// that requests arriving meanwhile wait for it rather than list again.
    last: tokio::sync::Mutex<Option<Instant>>,
    /// A permit once the closures this replica's database had at start
    /// are in the bucket (`backfill`): following before would forget them.
    started: tokio::sync::Semaphore,
}

impl Default for Follower {
    fn default() -> Self {
        Follower {
            last: Default::default(),
            started: tokio::sync::Semaphore::new(0),
        }
    }
}

/// Publishes an image's closure in the bucket (nothing on local storage).
pub async fn publish(
    builder: &Builder,
    manifest: &Digest,
    closure: &[ClosurePath],
) -> Result<(), crate::build::builder::BuildError> {
    if !builder.storage().is_shared() {
        return Ok(());
    }
    let record = SharedClosureRecord {
        paths: closure.to_vec(),
    };
    builder
        .storage()
        .put_record(
            RecordKind::NixClosure,
            &manifest.hex(),
            db::encode(&record)?,
        )
        .await?;
    Ok(())
}

/// The NARs the bucket's referrers record of `manifest` names, by the
/// hash part of their path.
pub async fn nars_in_bucket(
    builder: &Builder,
    manifest: &Digest,
) -> Result<Vec<(String, NarRecord)>, CacheError> {
    let bytes = builder
        .storage()
        .get_record(RecordKind::Referrers, &manifest.hex())
        .await
        .map_err(|e| CacheError::Store(e.to_string()))?;
    let Some(record) = bytes.and_then(|b| db::decode::<ReferrersRecord>(&b)) else {
        return Ok(Vec::new());
    };
    Ok(record
        .referrers
        .iter()
        .filter_map(nar_of_referrer)
        .filter_map(|(path, nar)| Some((hash_part(&path)?.to_owned(), nar)))
        .collect())
}

impl Follower {
    /// Brings this replica's closures in line with the bucket's, unless
    /// that was done within [`FOLLOW_EVERY`]. True if closures were
    /// forgotten (answers given before may be wrong now).
    pub async fn follow(&self, builder: &Builder) -> Result<bool, CacheError> {
        // Closed never: an error is as good as the permit.
        drop(self.started.acquire().await);
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < FOLLOW_EVERY) {
            return Ok(false);
        }
        // A failure is tried again by the next request (the one at start-up
        // may fail while the bucket is being written).
        let forgot = follow_now(builder).await?;
        *last = Some(Instant::now());
        Ok(forgot)
    }

    /// Lets [`follow`](Self::follow) run (once, after start-up publishing).
    pub fn start(&self) {
        if self.started.available_permits() == 0 {
            self.started.add_permits(1);
        }
    }
}

async fn follow_now(builder: &Builder) -> Result<bool, CacheError> {
    let store_err = |e: crate::store::StoreError| CacheError::Store(e.to_string());
    // What is here before the listing: a closure recorded here after it
    // started was published before, and is not taken for evicted.
    let db = builder.db().clone();
    let here: HashSet<Digest> = blocking(move || db.nix_closure_manifests())
        .await?
        .into_iter()
        .collect();
    let listed: HashSet<Digest> = builder
        .storage()
        .record_keys(RecordKind::NixClosure)
        .await
        .map_err(store_err)?
        .iter()
        .filter_map(|k| Digest::from_hex(k).ok())
        .collect();
    let new: Vec<Digest> = listed.difference(&here).copied().collect();
    futures::stream::iter(new.into_iter().map(|m| take(builder, m)))
        .buffer_unordered(READS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    let gone: HashSet<Digest> = here.difference(&listed).copied().collect();
    if gone.is_empty() {
        return Ok(false);
    }
    tracing::info!(
        images = gone.len(),
        "the bucket no longer has these images: their store paths are no longer served here"
    );
    let db = builder.db().clone();
    blocking(move || db.forget_nix_closures(&gone)).await?;
    Ok(true)
}

/// Records here the closure of `manifest` the bucket has, with the NARs
/// made of its paths so far.
pub async fn take(builder: &Builder, manifest: Digest) -> Result<(), CacheError> {
    let bytes = builder
        .storage()
        .get_record(RecordKind::NixClosure, &manifest.hex())
        .await
        .map_err(|e| CacheError::Store(e.to_string()))?;
    // Deleted meanwhile by a collection: nothing to serve.
    let Some(bytes) = bytes else {
        return Ok(());
    };
    let Some(record) = db::decode::<SharedClosureRecord>(&bytes) else {
        tracing::warn!(%manifest, "the bucket's closure record of an image cannot be read; `nixery verify` reports it");
        return Ok(());
    };
    let nars = nars_in_bucket(builder, &manifest).await?;
    let db = builder.db().clone();
    blocking(move || -> Result<(), DbError> {
        db.put_nix_closure(&manifest, &record.paths)?;
        for (hash, nar) in &nars {
            db.set_nar(hash, nar)?;
        }
        Ok(())
    })
    .await?;
    Ok(())
}
