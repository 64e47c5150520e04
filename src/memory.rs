//! Giving freed heap memory back to the system. glibc's malloc keeps what
//! a burst freed (a build's packing threads, many connections at once) in
//! its arenas, one per thread that allocated, up to 8 per core by default:
//! after a busy minute the process kept tens of MB it no longer used. So
//! the server caps the arenas and trims them while it runs.

use std::time::Duration;

/// How often freed memory is handed back while serving.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Allocations at least this large get pages of their own from the
/// kernel, given back whole when freed. glibc raises its own threshold
/// (up to 32 MB) after each such block is freed, and then serves the next
/// ones from the heap, where they strand the small allocations that come
/// after them: with it fixed, idle RSS after the bench fell from 45 to
/// 27 MB anonymous.
const MMAP_AT_BYTES: i32 = 64 * 1024;

/// Caps malloc's arenas at two per core, before threads start: fewer
/// places for freed memory to linger, hardly more lock contention; and
/// fixes the size above which blocks are mapped ([`MMAP_AT_BYTES`]).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from(2 * cores).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes malloc settings.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_AT_BYTES);
        }
    }
}

/// Returns free heap pages of every arena to the system; blocking (it
/// walks the arenas' free lists).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] until aborted.
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tokio::task::spawn_blocking(trim).await.is_err() {
            return;
        }
    }
}
