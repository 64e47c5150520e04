//! The database for async code: each call runs on tokio's blocking
//! threads, since a sled read can wait on the disk and a write on its log.

use super::{Db, DbError, LayerRecord, ManifestRecord, TagRecord, TagTree};
use crate::blocking::blocking;
use crate::digest::Digest;
use std::sync::Arc;

/// A [`Db`] whose calls are awaited; clones share one handle.
#[derive(Clone)]
pub struct AsyncDb(Arc<Db>);

impl AsyncDb {
    pub fn new(db: Db) -> Self {
        AsyncDb(Arc::new(db))
    }

    /// The blocking calls, for code already on a blocking thread.
    pub fn blocking(&self) -> &Db {
        &self.0
    }

    /// Runs several calls in one trip to a blocking thread.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let db = Arc::clone(&self.0);
        blocking(move || work(&db)).await
    }

    pub async fn manifest(&self, cache_key: &str) -> Result<Option<ManifestRecord>, DbError> {
        let key = cache_key.to_owned();
        self.run(move |db| db.manifest(&key)).await
    }

    pub async fn put_manifest(
        &self,
        cache_key: &str,
        record: &ManifestRecord,
    ) -> Result<(), DbError> {
        let (key, record) = (cache_key.to_owned(), record.clone());
        self.run(move |db| db.put_manifest(&key, &record)).await
    }

    pub async fn put_tag_record(
        &self,
        which: TagTree,
        name: &str,
        tag: &str,
        record: &TagRecord,
    ) -> Result<(), DbError> {
        let (name, tag, record) = (name.to_owned(), tag.to_owned(), record.clone());
        self.run(move |db| db.put_tag_record(which, &name, &tag, &record))
            .await
    }

    pub async fn add_manifest_digest(&self, digest: &Digest) -> Result<(), DbError> {
        let digest = *digest;
        self.run(move |db| db.add_manifest_digest(&digest)).await
    }

    pub async fn is_manifest(&self, digest: &Digest) -> Result<bool, DbError> {
        let digest = *digest;
        self.run(move |db| db.is_manifest(&digest)).await
    }

    pub async fn layer(&self, key: &str) -> Result<Option<LayerRecord>, DbError> {
        let key = key.to_owned();
        self.run(move |db| db.layer(&key)).await
    }

    pub async fn put_layer(&self, key: &str, record: &LayerRecord) -> Result<(), DbError> {
        let (key, record) = (key.to_owned(), *record);
        self.run(move |db| db.put_layer(&key, &record)).await
    }

    /// Makes everything written so far durable (sled flushes on its own
    /// threads).
    pub async fn flush(&self) -> Result<(), DbError> {
        self.0.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn awaited_calls_read_what_they_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let db = AsyncDb::new(Db::open(dir.path()).unwrap());
        let d = Digest::of(b"m");
        let manifest = ManifestRecord {
            digest: d,
            checked_at: 5,
            out_paths: vec!["/nix/store/x".into()],
            revision: None,
        };
        assert_eq!(db.manifest("k").await.unwrap(), None);
        db.put_manifest("k", &manifest).await.unwrap();
        assert_eq!(db.manifest("k").await.unwrap(), Some(manifest));
        assert!(db.is_manifest(&d).await.unwrap());

        let other = Digest::of(b"index");
        assert!(!db.is_manifest(&other).await.unwrap());
        db.add_manifest_digest(&other).await.unwrap();
        assert!(db.is_manifest(&other).await.unwrap());

        let layer = LayerRecord {
            digest: Digest::of(b"l"),
            diff_id: Digest::of(b"t"),
            size: 1,
        };
        db.put_layer("lk", &layer).await.unwrap();
        assert_eq!(db.layer("lk").await.unwrap(), Some(layer));

        let tag = TagRecord { digest: d, at: 7 };
        db.put_tag_record(TagTree::Pinned, "a", "v1", &tag)
            .await
            .unwrap();
        let read = db
            .run(|db| db.tag_record(TagTree::Pinned, "a", "v1"))
            .await
            .unwrap();
        assert_eq!(read, Some(tag));
        db.flush().await.unwrap();
    }
}
