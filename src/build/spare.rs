//! A `nix-daemon --stdio` started and greeted before a build needs it, so
//! that a build does not wait for Nix to start (30-130 ms on a loaded
//! machine, most of a build whose packages are all known). Each process
//! still serves exactly one build: a process holds the temporary GC roots
//! of what it built until it exits, so one reused across builds would
//! keep every output it ever built from the Nix garbage collector.
//!
//! At most one waits at a time; one older than [`SPARE_MAX_AGE`] is
//! replaced (Nix reads its configuration when it starts). Where builds
//! talk to a daemon's socket, which costs nothing to open, none is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::build::nix::{Nix, NixError};
use crate::build::realise::Session;

/// How long a started process may wait for a build.
pub const SPARE_MAX_AGE: Duration = Duration::from_secs(60);

/// Sessions opened ahead of the builds that use them.
#[derive(Default)]
pub struct Spare {
    waiting: Mutex<Option<(Instant, Session)>>,
    /// Builds talk to a daemon's socket: nothing to start ahead.
    direct: AtomicBool,
    /// A process is being started for the next build.
    starting: AtomicBool,
}

impl Spare {
    /// A session for a build: the one waiting if it is young enough, else
    /// a new one; then the next is started in the background.
    pub async fn take(self: &Arc<Self>, nix: &Nix) -> Result<Session, NixError> {
        let waiting = self.lock().take();
        let session = match waiting {
            Some((since, session)) if since.elapsed() < SPARE_MAX_AGE => session,
            _ => Session::open(nix).await?,
        };
        if !session.started_a_process() {
            self.direct.store(true, Ordering::Relaxed);
        }
        self.refill(nix);
        Ok(session)
    }

    /// Starts the next build's process, unless one waits or is starting.
    fn refill(self: &Arc<Self>, nix: &Nix) {
        if self.direct.load(Ordering::Relaxed)
            || self.lock().is_some()
            || self.starting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (this, nix) = (Arc::clone(self), nix.clone());
        tokio::spawn(async move {
            match Session::open(&nix).await {
                Ok(session) if session.started_a_process() => {
                    *this.lock() = Some((Instant::now(), session));
                }
                Ok(_) => this.direct.store(true, Ordering::Relaxed),
                // The build that needs it opens its own and reports why.
                Err(err) => tracing::debug!(%err, "could not start a spare nix-daemon"),
            }
            this.starting.store(false, Ordering::Release);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Session)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}
