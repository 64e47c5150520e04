//! A reserve file under the storage path: space set aside while the disk
//! has room, released when the database cannot open on a full disk (sled
//! writes when it opens), so cached images stay available exactly when the
//! disk is full. Blob writes count free space below its size as none (see
//! the blob store), so a released reserve stays free for the next start;
//! the collector sets it aside again once space was freed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Bytes set aside.
pub const RESERVE_BYTES: u64 = 16 * 1024 * 1024;

const NAME: &str = "reserve";

fn path(storage: &Path) -> PathBuf {
    storage.join(NAME)
}

/// Creates the reserve if it is missing and there is room; writes nothing
/// when it is already there. Best effort: a reserve that does not fit is
/// removed again and only logged.
pub fn ensure(storage: &Path) {
    if is_set_aside(storage) {
        return;
    }
    let path = path(storage);
    let written = (|| -> io::Result<()> {
        let mut f = File::create(&path)?;
        // Real blocks, not a sparse file: the point is to hold the space.
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / zeros.len() as u64 {
            f.write_all(&zeros)?;
        }
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        tracing::warn!(error = %e, "could not set aside the start-up reserve; a full disk may keep the server from starting");
    }
}

/// Sets the reserve aside if it is missing and there is room for it and
/// as much again (so that builds, which count free space below the
/// reserve as none, still have some); true if it did. Blocking.
pub fn restore(storage: &Path) -> bool {
    if is_set_aside(storage) {
        return false;
    }
    let room = crate::store::disk::free_bytes(storage).is_ok_and(|f| f >= 2 * RESERVE_BYTES);
    room && {
        ensure(storage);
        is_set_aside(storage)
    }
}

/// Whether the reserve is there, whole.
pub fn is_set_aside(storage: &Path) -> bool {
    fs::metadata(path(storage)).is_ok_and(|m| m.len() == RESERVE_BYTES)
}

/// Frees the reserve; false if there was none.
pub fn release(storage: &Path) -> io::Result<bool> {
    match fs::remove_file(path(storage)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_aside_once_and_released() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path());
        let meta = fs::metadata(path(dir.path())).unwrap();
        assert_eq!(meta.len(), RESERVE_BYTES);
        ensure(dir.path());
        let again = fs::metadata(path(dir.path())).unwrap();
        assert_eq!(
            again.modified().unwrap(),
            meta.modified().unwrap(),
            "not rewritten"
        );
        assert!(release(dir.path()).unwrap());
        assert!(!release(dir.path()).unwrap());
        assert!(restore(dir.path()), "set aside again");
        assert!(!restore(dir.path()), "already there");
        assert_eq!(fs::metadata(path(dir.path())).unwrap().len(), RESERVE_BYTES);
    }
}
