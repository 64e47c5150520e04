//! A `nix-daemon --stdio` started and greeted before a build needs it, so
//! that a build does not wait for Nix to start (30-130 ms on a loaded
//! machine, most of a build whose packages are all known). Each process
//! still serves exactly one build: a process holds the temporary GC roots
//! of what it built until it exits, so one reused across builds would
//! keep every output it ever built from the Nix garbage collector.
//!
//! At most one waits at a time (a build that finds it still starting
//! waits for it rather than start another); one older than
//! [`SPARE_MAX_AGE`] is replaced (Nix reads its configuration when it
//! starts). Where builds
//! talk to a daemon's socket, which costs nothing to open, none is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::build::nix::{Nix, NixError};
use crate::build::realise::Session;
use tokio::sync::oneshot;

/// How long a started process may wait for a build.
pub const SPARE_MAX_AGE: Duration = Duration::from_secs(60);

/// Sessions opened ahead of the builds that use them.
#[derive(Default)]
pub struct Spare {
    /// When the next session was started, and where it comes (or came)
    /// out: a build that finds it still starting waits for it rather
    /// than start another.
    next: Mutex<Option<(Instant, oneshot::Receiver<Session>)>>,
    /// Builds talk to a daemon's socket: nothing to start ahead.
    direct: AtomicBool,
}

impl Spare {
    /// A session for a build: the one started ahead if it is young
    /// enough and started, else a new one. The caller starts the next
    /// with [`refill`](Self::refill) once its build is done, so that
    /// starting it takes no CPU from the build.
    pub async fn take(self: &Arc<Self>, nix: &Nix) -> Result<Session, NixError> {
        let next = self.lock().take();
        let ahead = match next {
            Some((since, started)) if since.elapsed() < SPARE_MAX_AGE => started.await.ok(),
            _ => None,
        };
        let session = match ahead {
            Some(session) => session,
            None => Session::open(nix).await?,
        };
        if !session.started_a_process() {
            self.direct.store(true, Ordering::Relaxed);
        }
        Ok(session)
    }

    /// Starts the next build's process in the background, unless one is
    /// there already.
    pub fn refill(self: &Arc<Self>, nix: &Nix) {
        if self.direct.load(Ordering::Relaxed) {
            return;
        }
        let mut next = self.lock();
        if next.is_some() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        *next = Some((Instant::now(), rx));
        let (this, nix) = (Arc::clone(self), nix.clone());
        tokio::spawn(async move {
            match Session::open(&nix).await {
                Ok(session) if session.started_a_process() => {
                    // Unwanted (the spare was dropped): it just stops.
                    let _ = tx.send(session);
                }
                Ok(_) => this.direct.store(true, Ordering::Relaxed),
                // The build that needs it opens its own and reports why.
                Err(err) => tracing::debug!(%err, "could not start a spare nix-daemon"),
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, oneshot::Receiver<Session>)>> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }
}
