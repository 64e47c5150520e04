//! Opening a damaged database: the server starts and says what it found.
//!
//! The database is a cache of what was built (blobs are kept apart), so
//! losing it costs rebuilds, never data. What can be repaired is:
//! - sled's `conf` file (three settings and a checksum; this build always
//!   uses sled's defaults): moved to `conf.damaged` and written again, the
//!   data kept;
//! - a database sled cannot open at all: moved to `<path>.damaged-<unix
//!   seconds>` for inspection, and an empty one started.
//!
//! sled itself drops a log whose entries fail their checksum (one flipped
//! byte): that comes back as an empty database, which `Db::open`'s caller
//! notices when blobs are stored (see [`super::Db::was_created`]).
//!
//! Errors that are not damage (permissions, another process holding the
//! lock) still stop the start.

use super::DbError;
use std::path::Path;

fn is_damage(e: &sled::Error) -> bool {
    matches!(
        e,
        sled::Error::Corruption { .. }
            | sled::Error::Unsupported(_)
            | sled::Error::ReportableBug(_)
    )
}

/// An error that is not damage: another process holding the lock is said
/// plainly, since `build`, `import` and `verify` meet it beside `serve`.
fn not_damage(path: &Path, e: sled::Error) -> DbError {
    match e {
        // sled holds an exclusive lock on its files while open.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            DbError::InUse(path.display().to_string())
        }
        e => DbError::Sled(e),
    }
}

fn moved(path: &Path, to: &Path) -> impl FnOnce(std::io::Error) -> DbError {
    let (path, to) = (path.to_owned(), to.to_owned());
    move |e| DbError::Recovery {
        path,
        message: format!("could not move it to {}: {e}", to.display()),
    }
}

/// sled's page cache. Its default, 1 GB, keeps every record read once:
/// reading 10,000 images' records (the image pages, a collection) left
/// 20 MB resident for good. Requests that must be fast are answered from
/// the server's own maps, so the cache can be small.
const CACHE_BYTES: u64 = 4 << 20;

fn sled_open(path: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .open()
}

/// Opens the sled database at `path`, repairing or setting aside damage.
pub fn open(path: &Path) -> Result<sled::Db, DbError> {
    let first = match sled_open(path) {
        Ok(db) => return Ok(db),
        Err(e) if is_damage(&e) => e,
        Err(e) => return Err(not_damage(path, e)),
    };
    let conf = path.join("conf");
    if conf.is_file() {
        let aside = path.join("conf.damaged");
        std::fs::rename(&conf, &aside).map_err(moved(&conf, &aside))?;
        match sled_open(path) {
            Ok(db) => {
                tracing::warn!(
                    path = %conf.display(),
                    error = %first,
                    moved_to = %aside.display(),
                    "the database's sled conf file could not be read; it was \
                     moved aside and written again, and the data was kept"
                );
                return Ok(db);
            }
            Err(e) if is_damage(&e) => {
                // Not (only) the conf: put it back with the rest.
                let _ = std::fs::rename(&aside, &conf);
            }
            Err(e) => return Err(not_damage(path, e)),
        }
    }
    Err(DbError::Recovery {
        path: path.to_owned(),
        message: format!(
            "sled cannot open it ({first}); move the directory aside to start \
             with an empty database (images are rebuilt on their next pull, \
             reusing stored layers)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Db, ManifestRecord};
    use crate::digest::Digest;
    use std::path::Path;

    fn record(i: u64) -> ManifestRecord {
        ManifestRecord {
            digest: Digest::of(&i.to_be_bytes()),
            checked_at: i,
            out_paths: vec![format!("/nix/store/{i}-x")],
            revision: None,
        }
    }

    fn fill(path: &Path) {
        let db = Db::open(path).unwrap();
        for i in 0..200 {
            db.put_manifest(&format!("k{i}"), &record(i)).unwrap();
        }
        db.db.flush().unwrap();
    }

    fn reopen(path: &Path) -> Db {
        super::super::open_when_free(path).unwrap()
    }

    #[test]
    fn a_damaged_conf_is_rewritten_and_the_data_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        fill(&path);
        let conf = path.join("conf");
        let mut bytes = std::fs::read(&conf).unwrap();
        bytes[3] ^= 0x55;
        bytes[10] = 0xff;
        std::fs::write(&conf, bytes).unwrap();
        assert!(sled::open(&path).is_err(), "sled refuses the damaged conf");

        let db = reopen(&path);
        assert_eq!(db.manifest("k7").unwrap(), Some(record(7)));
        assert!(!db.was_created());
        assert!(path.join("conf.damaged").is_file());
    }

    /// sled drops the log from the damaged entry on, without an error;
    /// what it keeps is intact. (`Server::start` reports the loss.)
    #[test]
    fn a_flipped_byte_in_the_log_loses_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        fill(&path);
        let log = path.join("db");
        let mut bytes = std::fs::read(&log).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&log, bytes).unwrap();

        let db = reopen(&path);
        let mut kept = 0;
        for i in 0..200 {
            if let Some(r) = db.manifest(&format!("k{i}")).unwrap() {
                assert_eq!(r, record(i));
                kept += 1;
            }
        }
        assert!(kept < 200, "the damaged entry and what follows are gone");
        db.put_manifest("after", &record(1)).unwrap();
        assert_eq!(db.manifest("after").unwrap(), Some(record(1)));
    }
}
