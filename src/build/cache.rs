//! Failures answered from memory: "packages not found" for as long as the
//! package source cannot have changed, and any other failed build for a
//! short while, so that a name that does not resolve (or does not build)
//! does not run Nix again on every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures remembered at most; the oldest go first beyond it.
const CAPACITY: usize = 4096;

/// A remembered failure of type `E` per image cache key.
pub struct FailureCache<E> {
    entries: Mutex<HashMap<String, Entry<E>>>,
}

struct Entry<E> {
    error: Arc<E>,
    remembered_at: Instant,
    /// `None`: for good (a pinned source cannot change).
    expires: Option<Instant>,
}

impl<E> Default for FailureCache<E> {
    fn default() -> Self {
        FailureCache {
            entries: Mutex::default(),
        }
    }
}

impl<E> FailureCache<E> {
    /// The failure remembered for `key`, if it has not expired.
    pub fn get(&self, key: &str) -> Option<Arc<E>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key)?;
        if entry.expires.is_some_and(|t| t <= Instant::now()) {
            entries.remove(key);
            return None;
        }
        Some(Arc::clone(&entry.error))
    }

    /// Remembers `error` for `key` for `ttl` (`None`: for good).
    pub fn remember(&self, key: &str, error: Arc<E>, ttl: Option<Duration>) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY && !entries.contains_key(key) {
            entries.retain(|_, e| e.expires.is_none_or(|t| t > now));
            if entries.len() >= CAPACITY {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, e)| e.remembered_at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(
            key.to_owned(),
            Entry {
                error,
                remembered_at: now,
                expires: ttl.map(|t| now + t),
            },
        );
    }

    /// Forgets `key`'s failure (a build of it succeeded).
    pub fn forget(&self, key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_expire_or_stay() {
        let cache = FailureCache::<String>::default();
        cache.remember("moving", Arc::new("e1".into()), Some(Duration::ZERO));
        cache.remember("pinned", Arc::new("e2".into()), None);
        cache.remember(
            "short",
            Arc::new("e3".into()),
            Some(Duration::from_secs(60)),
        );
        assert!(cache.get("moving").is_none());
        assert_eq!(
            cache.get("pinned").as_deref().map(String::as_str),
            Some("e2")
        );
        assert_eq!(
            cache.get("short").as_deref().map(String::as_str),
            Some("e3")
        );
        cache.forget("short");
        assert!(cache.get("short").is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let cache = FailureCache::<u32>::default();
        for i in 0..(CAPACITY as u32 + 10) {
            cache.remember(&i.to_string(), Arc::new(i), None);
        }
        assert_eq!(cache.len(), CAPACITY);
        assert!(cache.get("0").is_none());
        assert!(cache.get(&(CAPACITY as u32 + 9).to_string()).is_some());
    }
}
