//! Bounds the builds waiting for a slot, and drops a waiting build whose
//! every requester has gone: a script cannot queue hours of Nix work.
//!
//! A request for an image that must be built registers as a requester of
//! its cache key for as long as it waits. A new build takes a place in the
//! queue (or is refused when it is full) and gives it back when it gets a
//! build slot. A build that has started is never cancelled: a later pull
//! can share it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Requesters per cache key, and what wakes a waiting build when the last
/// one leaves.
type Interest = Mutex<HashMap<String, (usize, Arc<Notify>)>>;

pub struct BuildQueue {
    limit: usize,
    waiting: Arc<AtomicUsize>,
    interest: Arc<Interest>,
}

/// A requester waiting for a key's build; dropping it (the client hung up,
/// or got its answer) withdraws the interest.
pub struct Requester {
    interest: Arc<Interest>,
    key: String,
}

impl Drop for Requester {
    fn drop(&mut self) {
        let mut map = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, gone)) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Stored if the build is not waiting yet: it sees it then.
                gone.notify_one();
                map.remove(&self.key);
            }
        }
    }
}

/// A place in the queue, given back when dropped.
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every requester of a queued build went away before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the build was dropped before it started: every client that asked for it went away")]
pub struct Abandoned;

impl BuildQueue {
    /// A queue of at most `limit` builds waiting for a slot.
    pub fn new(limit: usize) -> Self {
        BuildQueue {
            limit,
            waiting: Arc::default(),
            interest: Arc::default(),
        }
    }

    /// Builds waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts a requester of `key` until the guard is dropped.
    pub fn request(&self, key: &str) -> Requester {
        let mut map = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_owned())
            .or_insert_with(|| (0, Arc::new(Notify::new())))
            .0 += 1;
        Requester {
            interest: Arc::clone(&self.interest),
            key: key.to_owned(),
        }
    }

    /// A place for a new build, or None when the queue is full.
    pub fn try_enter(&self) -> Option<Place> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(Arc::clone(&self.waiting)))
    }

    /// Waits for a build slot for `key`, giving up the place when it gets
    /// one; fails when no requester of `key` is left before then.
    pub async fn wait_for_slot<'a>(
        &self,
        key: &str,
        place: Place,
        slots: &'a Semaphore,
    ) -> Result<SemaphorePermit<'a>, Abandoned> {
        loop {
            let gone = {
                let map = self.interest.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(key) {
                    Some((_, gone)) => Arc::clone(gone),
                    None => return Err(Abandoned),
                }
            };
            tokio::select! {
                permit = slots.acquire() => {
                    drop(place);
                    return permit.map_err(|_| Abandoned);
                }
                // The last requester left; one may have come since.
                _ = gone.notified() => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_queue_is_bounded() {
        let q = BuildQueue::new(2);
        let a = q.try_enter().unwrap();
        let _b = q.try_enter().unwrap();
        assert!(q.try_enter().is_none());
        drop(a);
        assert_eq!(q.waiting(), 1);
        assert!(q.try_enter().is_some());
    }

    #[tokio::test]
    async fn a_waiting_build_without_requesters_is_dropped() {
        let q = Arc::new(BuildQueue::new(4));
        let slots = Arc::new(Semaphore::new(0));
        let requester = q.request("k");
        let place = q.try_enter().unwrap();
        let (q2, s2) = (Arc::clone(&q), Arc::clone(&slots));
        let waiter =
            tokio::spawn(async move { q2.wait_for_slot("k", place, &s2).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(q.waiting(), 1);
        drop(requester);
        assert_eq!(waiter.await.unwrap(), Err(Abandoned));
        assert_eq!(q.waiting(), 0);
    }

    #[tokio::test]
    async fn a_build_with_a_requester_left_gets_its_slot() {
        let q = Arc::new(BuildQueue::new(4));
        let slots = Arc::new(Semaphore::new(0));
        let first = q.request("k");
        let second = q.request("k");
        let place = q.try_enter().unwrap();
        let (q2, s2) = (Arc::clone(&q), Arc::clone(&slots));
        let waiter =
            tokio::spawn(async move { q2.wait_for_slot("k", place, &s2).await.map(|_| ()) });
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        slots.add_permits(1);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(q.waiting(), 0);
        drop(second);
    }
}
