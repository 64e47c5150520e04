//! Runs at most one task per key: callers that ask for a key while its task
//! runs share that task's result. Tasks are spawned, so a client that hangs
//! up does not cancel a build that others (or later pulls) will use.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

type Pending<T> = Shared<BoxFuture<'static, Option<T>>>;

pub struct SingleFlight<T: Clone + Send + Sync + 'static> {
    pending: Arc<Mutex<HashMap<String, Pending<T>>>>,
}

/// Removes a key when its task ends, even by a panic.
struct Forget<T: Clone + Send + Sync + 'static> {
    map: Arc<Mutex<HashMap<String, Pending<T>>>>,
    key: String,
}

impl<T: Clone + Send + Sync + 'static> Drop for Forget<T> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl<T: Clone + Send + Sync + 'static> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight {
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// The result of the task running for `key`, starting `make()` if none
    /// runs. `None` means the task panicked (it is logged by tokio).
    pub async fn run<F>(&self, key: &str, make: impl FnOnce() -> F) -> Option<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let shared = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = pending.get(key) {
                existing.clone()
            } else {
                let map = Arc::clone(&self.pending);
                let owned_key = key.to_owned();
                let work = make();
                // The task forgets its key when done (we hold the lock until
                // it is inserted, so it cannot be removed before): later
                // callers start afresh and find its result in the cache.
                let task = tokio::spawn(async move {
                    let _forget = Forget {
                        map,
                        key: owned_key,
                    };
                    work.await
                });
                let fut = task.map(Result::ok).boxed().shared();
                pending.insert(key.to_owned(), fut.clone());
                fut
            }
        };
        shared.await
    }

    /// Whether a task for `key` runs now.
    pub fn is_running(&self, key: &str) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.contains_key(key)
    }

    /// Keys with a task running now.
    pub fn running(&self) -> Vec<String> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight = Arc::new(SingleFlight::<usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..8 {
            let flight = Arc::clone(&flight);
            let runs = Arc::clone(&runs);
            handles.push(tokio::spawn(async move {
                flight
                    .run("k", || async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 41
                    })
                    .await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), Some(41));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flight.running().is_empty());
    }

    #[tokio::test]
    async fn a_panicking_task_gives_none_and_is_forgotten() {
        let flight = SingleFlight::<u8>::default();
        let r = flight.run("k", || async { panic!("boom") }).await;
        assert_eq!(r, None);
        assert!(flight.running().is_empty());
        assert_eq!(flight.run("k", || async { 3 }).await, Some(3));
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_cancel_the_task() {
        let flight = Arc::new(SingleFlight::<u8>::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&done);
        let first = flight.run("k", || async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.fetch_add(1, Ordering::SeqCst);
            7
        });
        // Poll once so the task starts, then drop the caller.
        let _ = tokio::time::timeout(Duration::from_millis(1), first).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert!(flight.running().is_empty());
    }
}
