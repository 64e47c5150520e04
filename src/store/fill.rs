//! A replica's disk as a cache of the bucket: a blob proxied from the
//! bucket is copied onto the local blob store in the background, checked
//! against its digest, so later pulls of it are sent from the file. The
//! local collector keeps the cache within `--max-storage`, evicting the
//! least recently pulled images first; without that limit nothing is
//! copied, so the cache is always bounded.

use crate::blocking::feed_blocking;
use crate::digest::Digest;
use crate::store::fs::BlobStore;
use crate::store::{Storage, StoreError};
use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Copies under way at once; more wait their turn.
const COPIES_AT_ONCE: usize = 2;
/// Copies under way or waiting; more are skipped (a later pull asks again).
const COPIES_PENDING: usize = 64;

pub struct Filler {
    staging: BlobStore,
    storage: Arc<dyn Storage>,
    copying: Mutex<HashSet<Digest>>,
    slots: Arc<Semaphore>,
}

impl Filler {
    pub fn new(staging: BlobStore, storage: Arc<dyn Storage>) -> Arc<Filler> {
        Arc::new(Filler {
            staging,
            storage,
            copying: Mutex::default(),
            slots: Arc::new(Semaphore::new(COPIES_AT_ONCE)),
        })
    }

    /// Starts copying `digest` to disk, unless it is being copied or too
    /// many copies are pending; `done` runs after a copy was stored.
    pub fn start(self: &Arc<Self>, digest: Digest, done: impl FnOnce() + Send + 'static) {
        let first = self
            .copying
            .lock()
            .map(|mut c| c.len() < COPIES_PENDING && c.insert(digest))
            .unwrap_or(false);
        if !first {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(slot) = Arc::clone(&this.slots).acquire_owned().await else {
                return;
            };
            match this.copy(&digest).await {
                Ok(()) => done(),
                Err(e) => tracing::warn!(%digest, error = %e, "could not cache a blob on disk"),
            }
            if let Ok(mut c) = this.copying.lock() {
                c.remove(&digest);
            }
            drop(slot);
        });
    }

    async fn copy(&self, digest: &Digest) -> Result<(), StoreError> {
        copy_to_disk(self.storage.as_ref(), &self.staging, digest).await
    }
}

/// Copies a blob from `storage` into the local blob store, checked against
/// its digest; a cut-off copy leaves nothing.
pub async fn copy_to_disk(
    storage: &dyn Storage,
    staging: &BlobStore,
    digest: &Digest,
) -> Result<(), StoreError> {
    let stream = storage.read(digest, None).await?;
    let (staging, expected) = (staging.clone(), *digest);
    feed_blocking(stream, move |next| {
        let mut writer = staging.writer()?;
        while let Some(chunk) = next() {
            writer
                .write_all(&chunk)
                .map_err(|e| StoreError::Task(format!("writing a copied blob: {e}")))?;
        }
        // A cut-off download does not match the digest, and its temp file
        // goes.
        writer.commit_expecting(&expected)?;
        Ok::<(), StoreError>(())
    })
    .await?
}
