//! When each image was last pulled: kept in memory as manifests are served
//! and written to the database in batches, so a pull costs no disk write.

use crate::digest::Digest;
use crate::store::db::{Db, DbError, PullRecord};
use std::collections::HashMap;
use std::sync::Mutex;

/// Pulls not yet written to the database. Shared by the request path
/// (which only touches memory) and the flusher.
#[derive(Debug, Default)]
pub struct LastPulled {
    pending: Mutex<HashMap<Digest, PullRecord>>,
}

impl LastPulled {
    /// Notes a pull of `image` served with manifest `digest` at `at`
    /// (Unix seconds). Memory only.
    pub fn touch(&self, digest: Digest, image: &str, at: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(&digest) {
            Some(r) if r.image == image => r.at = r.at.max(at),
            _ => {
                pending.insert(
                    digest,
                    PullRecord {
                        at,
                        image: image.to_owned(),
                    },
                );
            }
        }
    }

    /// Writes the pending pulls in one batch (blocking: call it off the
    /// async workers). On failure they stay pending for the next flush.
    pub fn flush(&self, db: &Db) -> Result<usize, DbError> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = db.put_last_pulled(&batch) {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (digest, record) in batch {
                pending.entry(digest).or_insert(record);
            }
            return Err(e);
        }
        Ok(batch.len())
    }

    /// One image's last pull: pending, else the database's (a page reads
    /// only its own: reading every record would keep them all in sled's
    /// cache).
    pub fn get(&self, db: &Db, digest: &Digest) -> Result<Option<PullRecord>, DbError> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = pending.get(digest) {
            return Ok(Some(record.clone()));
        }
        drop(pending);
        db.last_pulled_of(digest)
    }

    /// Every image's last pull: the database's, overlaid with what is
    /// pending.
    pub fn all(&self, db: &Db) -> Result<HashMap<Digest, PullRecord>, DbError> {
        let mut all = db.last_pulled()?;
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (digest, record) in pending.iter() {
            all.insert(*digest, record.clone());
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_reach_the_database_only_when_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let pulls = LastPulled::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        pulls.touch(a, "shell/hello", 10);
        pulls.touch(a, "shell/hello", 12);
        pulls.touch(b, "bash", 11);
        assert!(db.last_pulled().unwrap().is_empty());
        assert_eq!(pulls.all(&db).unwrap()[&a].at, 12);
        assert_eq!(pulls.get(&db, &a).unwrap().map(|r| r.at), Some(12));
        assert_eq!(pulls.flush(&db).unwrap(), 2);
        assert_eq!(pulls.flush(&db).unwrap(), 0);
        let stored = db.last_pulled().unwrap();
        assert_eq!(stored[&a].at, 12);
        assert_eq!(stored[&b].image, "bash");
        assert_eq!(pulls.get(&db, &b).unwrap().map(|r| r.at), Some(11));
        assert_eq!(pulls.get(&db, &Digest::of(b"c")).unwrap(), None);
    }
}
