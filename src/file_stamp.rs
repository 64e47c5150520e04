//! What identifies a version of a file on disk, for the files a server
//! rereads when they change (htpasswd, TLS certificate and key).

use std::path::Path;
use std::time::SystemTime;

/// Modification time, length and inode: a file replaced by rename (as
/// ACME clients and editors do) gets a new inode even within the same
/// second.
pub type Stamp = (SystemTime, u64, u64);

/// `None` when the file cannot be read (it is missing, for one).
pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Runs `check` on a blocking thread every `every` for as long as
/// `target` lives elsewhere: the loop behind reloading a changed file.
pub fn poll<T: Send + Sync + 'static>(
    target: &std::sync::Arc<T>,
    every: std::time::Duration,
    check: fn(&T),
) -> tokio::task::JoinHandle<()> {
    let weak = std::sync::Arc::downgrade(target);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(target) = weak.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || check(&target)).await;
        }
    })
}
