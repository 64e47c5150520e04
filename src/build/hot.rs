//! Hot manifests in memory: which manifest an image's cache key names and
//! when that was checked, manifest bytes by digest, and which digest a
//! Docker manifest has in another form (OCI). A warm pull is answered from
//! here without touching the database or the disk.
//!
//! Both maps are bounded; past the bound an arbitrary entry makes room,
//! and the next request for it reads the database again.

use crate::digest::Digest;
use bytes::Bytes;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Entries per map: at a few KB per manifest, a few MB in all.
const MAX_ENTRIES: usize = 2048;

/// How long a key's manifest is served from memory before its blobs are
/// checked on disk again: damage from outside (a blob deleted or cut short)
/// is noticed within this, at one check per image per period.
pub const REVALIDATE_AFTER: Duration = Duration::from_secs(1);
/// Manifests larger than this are read from disk each time.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// The manifest a cache key named when it was last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named {
    pub digest: Digest,
    /// Unix seconds.
    pub checked_at: u64,
}

#[derive(Default)]
pub struct HotManifests {
    /// With when its blobs were last found whole on disk.
    keys: RwLock<HashMap<String, (Named, Instant)>>,
    bytes: RwLock<HashMap<Digest, Bytes>>,
    /// (Docker manifest, media type of the other form) -> that form's digest.
    forms: RwLock<HashMap<(Digest, &'static str), Digest>>,
}

/// The maps hold plain data: usable after a panic elsewhere.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn insert_bounded<K: Hash + Eq + Clone, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        if let Some(victim) = map.keys().next().cloned() {
            map.remove(&victim);
        }
    }
    map.insert(key, value);
}

impl HotManifests {
    /// The manifest `key` names, if its blobs were found whole within
    /// [`REVALIDATE_AFTER`].
    pub fn named(&self, key: &str) -> Option<Named> {
        read(&self.keys)
            .get(key)
            .filter(|(_, checked)| checked.elapsed() < REVALIDATE_AFTER)
            .map(|(named, _)| *named)
    }

    /// Remembers what `key` names, its blobs just found whole.
    pub fn remember(&self, key: &str, named: Named) {
        insert_bounded(
            &mut write(&self.keys),
            key.to_owned(),
            (named, Instant::now()),
        );
    }

    pub fn bytes(&self, digest: &Digest) -> Option<Bytes> {
        read(&self.bytes).get(digest).cloned()
    }

    /// Keeps a manifest's bytes, unless it is too large to be worth it.
    pub fn remember_bytes(&self, digest: Digest, bytes: Bytes) {
        if bytes.len() <= MAX_MANIFEST_BYTES {
            insert_bounded(&mut write(&self.bytes), digest, bytes);
        }
    }

    /// The digest of `docker` in the form of `media_type`, if known.
    pub fn form(&self, docker: &Digest, media_type: &'static str) -> Option<Digest> {
        read(&self.forms).get(&(*docker, media_type)).copied()
    }

    pub fn remember_form(&self, docker: Digest, media_type: &'static str, form: Digest) {
        insert_bounded(&mut write(&self.forms), (docker, media_type), form);
    }

    /// Drops everything: the next requests read the database and the disk.
    pub fn clear(&self) {
        write(&self.keys).clear();
        write(&self.bytes).clear();
        write(&self.forms).clear();
    }

    /// Drops a manifest and every key or form naming it, e.g. when its blob
    /// is deleted: the next request reads the database and the disk again.
    pub fn forget(&self, digest: &Digest) {
        write(&self.bytes).remove(digest);
        write(&self.keys).retain(|_, (n, _)| n.digest != *digest);
        write(&self.forms).retain(|(from, _), to| from != digest && to != digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_forgets_and_stays_bounded() {
        let hot = HotManifests::default();
        let d = Digest::of(b"manifest");
        let named = Named {
            digest: d,
            checked_at: 7,
        };
        hot.remember("k", named);
        hot.remember_bytes(d, Bytes::from_static(b"{}"));
        let oci = Digest::of(b"oci form");
        hot.remember_form(d, "oci", oci);
        assert_eq!(hot.named("k"), Some(named));
        assert_eq!(hot.bytes(&d).as_deref(), Some(&b"{}"[..]));
        assert_eq!(hot.form(&d, "oci"), Some(oci));
        assert_eq!(hot.form(&d, "other"), None);

        hot.forget(&d);
        assert_eq!(hot.named("k"), None);
        assert_eq!(hot.bytes(&d), None);
        assert_eq!(hot.form(&d, "oci"), None);

        hot.remember_bytes(d, Bytes::from(vec![0u8; MAX_MANIFEST_BYTES + 1]));
        assert_eq!(hot.bytes(&d), None);

        for i in 0..MAX_ENTRIES + 10 {
            hot.remember(&i.to_string(), named);
        }
        assert_eq!(read(&hot.keys).len(), MAX_ENTRIES);
    }
}
