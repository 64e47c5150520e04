//! A reserve file under the storage path: space set aside while the disk
//! has room, released when the database cannot open on a full disk (sled
//! writes when it opens), so cached images stay available exactly when the
//! disk is full.

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
    let path = path(storage);
    if fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return;
    }
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
    }
}
