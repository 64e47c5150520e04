//! The Nix binary cache's trees: which store paths the images stand on,
//! and the NAR made of each (see [`crate::nixcache`]).
//!
//! - `nix_closures`: manifest digest -> [`NixClosureRecord`] (the store
//!   paths of that image's runtime closure)
//! - `nix_paths`: store path hash part (32 characters) ->
//!   [`NixPathRecord`]: a path is served while some closure names it
//! - `nix_nars`: NAR file digest -> store path hash part
//! - `nix_users`: hash part (32 bytes) then manifest digest (32 bytes) ->
//!   (): which images stand on a path
//!
//! A NAR is kept by the model every stored kind follows: it is a `Blob`
//! referrer of each image whose closure has its path (`referrers`), so
//! the collector, verify and the bucket treat it like any other.
//!
//! New trees an older binary ignores: no layout version.

use super::{decode, encode, Db, DbError, Record};
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// The store paths of one image's runtime closure (absolute paths).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixClosureRecord {
    pub paths: Vec<String>,
}

impl Record for NixClosureRecord {
    const VERSION: u8 = 1;
}

/// A store path behind an image, and its NAR once made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixPathRecord {
    /// Absolute store path.
    pub path: String,
    /// Absolute store paths it refers to, sorted (may include itself).
    pub references: Vec<String>,
    /// The derivation that built it, when known.
    pub deriver: Option<String>,
    pub nar: Option<NarRecord>,
}

impl Record for NixPathRecord {
    const VERSION: u8 = 1;
}

/// How a NAR file is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NarCompression {
    Zstd,
}

/// A store path's NAR, stored as a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarRecord {
    /// sha256 of the uncompressed NAR.
    pub nar_hash: Digest,
    pub nar_size: u64,
    /// The blob: sha256 of the compressed file.
    pub file: Digest,
    pub file_size: u64,
    pub compression: NarCompression,
}

/// A path of an image's closure as the builder knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosurePath {
    pub path: String,
    pub references: Vec<String>,
    pub deriver: Option<String>,
}

/// An image's closure as the bucket keeps it (`index/nix-closures/`),
/// whole: every replica serves its paths from this alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedClosureRecord {
    pub paths: Vec<ClosurePath>,
}

impl Record for SharedClosureRecord {
    const VERSION: u8 = 1;
}

/// The 32-character hash part of an absolute store path.
pub fn hash_part(path: &str) -> Option<&str> {
    let base = path.strip_prefix("/nix/store/")?;
    let hash = base.get(..32)?;
    (base.as_bytes().get(32) == Some(&b'-')).then_some(hash)
}

#[derive(Clone)]
pub(super) struct NixTrees {
    closures: sled::Tree,
    paths: sled::Tree,
    nars: sled::Tree,
    users: sled::Tree,
}

impl NixTrees {
    pub(super) fn open(db: &sled::Db) -> Result<Self, DbError> {
        Ok(NixTrees {
            closures: db.open_tree("nix_closures")?,
            paths: db.open_tree("nix_paths")?,
            nars: db.open_tree("nix_nars")?,
            users: db.open_tree("nix_users")?,
        })
    }
}

/// What the cache holds, for the admin page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NixCacheCounts {
    pub paths: u64,
    pub nars: u64,
    pub nar_bytes: u64,
}

impl Db {
    /// Records the closure of the image whose manifest is `manifest`: its
    /// paths become servable. Paths already known keep their NARs.
    pub fn put_nix_closure(
        &self,
        manifest: &Digest,
        closure: &[ClosurePath],
    ) -> Result<(), DbError> {
        let mut paths = Vec::with_capacity(closure.len());
        for p in closure {
            let Some(hash) = hash_part(&p.path) else {
                continue;
            };
            paths.push(p.path.clone());
            let mut user = hash.as_bytes().to_vec();
            user.extend_from_slice(manifest.as_bytes());
            self.nix.users.insert(user, &[])?;
            if self.nix.paths.contains_key(hash)? {
                continue;
            }
            let mut references = p.references.clone();
            references.sort();
            references.dedup();
            let record = NixPathRecord {
                path: p.path.clone(),
                references,
                deriver: p.deriver.clone(),
                nar: None,
            };
            // Only if still absent: a NAR made meanwhile stays.
            let _ = self.nix.paths.compare_and_swap(
                hash,
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )?;
        }
        paths.sort();
        self.nix
            .closures
            .insert(manifest.as_bytes(), encode(&NixClosureRecord { paths })?)?;
        Ok(())
    }

    /// The closure recorded for an image, if any.
    pub fn nix_closure(&self, manifest: &Digest) -> Result<Option<NixClosureRecord>, DbError> {
        Ok(self
            .nix
            .closures
            .get(manifest.as_bytes())?
            .and_then(|v| self.decode("nix_closures", &v)))
    }

    /// The images whose closures are recorded here.
    pub fn nix_closure_manifests(&self) -> Result<Vec<Digest>, DbError> {
        let mut out = Vec::new();
        for k in self.nix.closures.iter().keys() {
            if let Ok(raw) = <[u8; 32]>::try_from(k?.as_ref()) {
                out.push(Digest::from_bytes(raw));
            }
        }
        Ok(out)
    }

    /// Forgets the closures of `gone` (images the bucket no longer has),
    /// then the paths no other closure names.
    pub fn forget_nix_closures(&self, gone: &HashSet<Digest>) -> Result<(), DbError> {
        if gone.is_empty() {
            return Ok(());
        }
        self.prune_nix_paths(|m| !gone.contains(m)).map(|_| ())
    }

    /// A served store path by its hash part.
    pub fn nix_path(&self, hash: &str) -> Result<Option<NixPathRecord>, DbError> {
        Ok(self
            .nix
            .paths
            .get(hash)?
            .and_then(|v| self.decode("nix_paths", &v)))
    }

    /// Notes the NAR made of a path; false (and nothing written) if the
    /// path stopped being served meanwhile.
    pub fn set_nar(&self, hash: &str, nar: &NarRecord) -> Result<bool, DbError> {
        let mut kept = false;
        self.nix.paths.fetch_and_update(hash, |old| {
            let mut record: NixPathRecord = decode(old?)?;
            record.nar = Some(*nar);
            kept = true;
            encode(&record).ok()
        })?;
        if kept {
            self.nix.nars.insert(nar.file.as_bytes(), hash)?;
        }
        Ok(kept)
    }

    /// The images whose closures have the path with this hash part.
    pub fn nix_path_users(&self, hash: &str) -> Result<Vec<Digest>, DbError> {
        let mut users = Vec::new();
        for kv in self.nix.users.scan_prefix(hash.as_bytes()) {
            let (k, _) = kv?;
            if let Ok(raw) = <[u8; 32]>::try_from(&k[k.len().saturating_sub(32)..]) {
                users.push(Digest::from_bytes(raw));
            }
        }
        Ok(users)
    }

    /// The paths of `paths` (absolute) whose NARs are made, with them.
    pub fn nars_made(&self, paths: &[String]) -> Result<Vec<NixPathRecord>, DbError> {
        let mut made = Vec::new();
        for path in paths {
            if let Some(record) = hash_part(path)
                .map(|h| self.nix_path(h))
                .transpose()?
                .flatten()
            {
                if record.nar.is_some() {
                    made.push(record);
                }
            }
        }
        Ok(made)
    }

    /// The served store path (hash part) whose NAR is the blob `file`.
    pub fn nar_owner(&self, file: &Digest) -> Result<Option<String>, DbError> {
        let Some(hash) = self.nix.nars.get(file.as_bytes())? else {
            return Ok(None);
        };
        let hash = String::from_utf8_lossy(&hash).into_owned();
        Ok(self.nix.paths.contains_key(&hash)?.then_some(hash))
    }

    /// Forgets an evicted image's closure (its paths go at the next prune).
    pub fn remove_nix_closure(&self, manifest: &Digest) -> Result<(), DbError> {
        self.nix.closures.remove(manifest.as_bytes())?;
        Ok(())
    }

    /// The paths named by the recorded closures that `keep` accepts; with
    /// `forget`, the others' records are removed.
    fn closure_hashes(
        &self,
        keep: impl Fn(&Digest) -> bool,
        forget: bool,
    ) -> Result<HashSet<String>, DbError> {
        let mut hashes = HashSet::new();
        for kv in self.nix.closures.iter() {
            let (k, v) = kv?;
            let kept =
                <[u8; 32]>::try_from(k.as_ref()).is_ok_and(|raw| keep(&Digest::from_bytes(raw)));
            if !kept {
                if forget {
                    self.nix.closures.remove(&k)?;
                }
                continue;
            }
            let Some(record) = self.decode::<NixClosureRecord>("nix_closures", &v) else {
                continue;
            };
            hashes.extend(
                record
                    .paths
                    .iter()
                    .filter_map(|p| hash_part(p))
                    .map(str::to_owned),
            );
        }
        Ok(hashes)
    }

    /// Forgets the closures of images `keep` refuses (a manifest no longer
    /// served), then the paths no closure names (with their NAR records);
    /// returns the NAR blobs still needed.
    pub fn prune_nix_paths(
        &self,
        keep: impl Fn(&Digest) -> bool,
    ) -> Result<BTreeSet<Digest>, DbError> {
        let hashes = self.closure_hashes(keep, true)?;
        for kv in self.nix.users.iter() {
            let (k, _) = kv?;
            let user =
                <[u8; 32]>::try_from(&k[k.len().saturating_sub(32)..]).map(Digest::from_bytes);
            let still = match user {
                Ok(d) => self.nix.closures.contains_key(d.as_bytes())?,
                Err(_) => false,
            };
            if !still {
                self.nix.users.remove(&k)?;
            }
        }
        let mut kept = BTreeSet::new();
        for kv in self.nix.paths.iter() {
            let (k, v) = kv?;
            let record = self.decode::<NixPathRecord>("nix_paths", &v);
            if hashes.contains(String::from_utf8_lossy(&k).as_ref()) {
                kept.extend(record.and_then(|r| r.nar).map(|n| n.file));
                continue;
            }
            self.nix.paths.remove(&k)?;
            if let Some(nar) = record.and_then(|r| r.nar) {
                self.nix.nars.remove(nar.file.as_bytes())?;
            }
        }
        Ok(kept)
    }

    /// Paths served, NARs made and their bytes.
    pub fn nix_cache_counts(&self) -> Result<NixCacheCounts, DbError> {
        let mut counts = NixCacheCounts::default();
        for kv in self.nix.paths.iter() {
            let (_, v) = kv?;
            counts.paths += 1;
            if let Some(nar) = self
                .decode::<NixPathRecord>("nix_paths", &v)
                .and_then(|r| r.nar)
            {
                counts.nars += 1;
                counts.nar_bytes += nar.file_size;
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(hash: char, name: &str, refs: &[&str]) -> ClosurePath {
        ClosurePath {
            path: format!("/nix/store/{}-{name}", hash.to_string().repeat(32)),
            references: refs.iter().map(|r| r.to_string()).collect(),
            deriver: None,
        }
    }

    fn nar(n: u8) -> NarRecord {
        NarRecord {
            nar_hash: Digest::of(&[n]),
            nar_size: 8,
            file: Digest::of(&[n, n]),
            file_size: 4,
            compression: NarCompression::Zstd,
        }
    }

    #[test]
    fn paths_are_served_while_an_image_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let glibc = path('1', "glibc", &[]);
        let hello = path('2', "hello", &[&glibc.path]);
        let curl = path('3', "curl", &[&glibc.path]);
        db.put_nix_closure(&a, &[glibc.clone(), hello.clone()])
            .unwrap();
        db.put_nix_closure(&b, &[glibc.clone(), curl.clone()])
            .unwrap();
        let g = hash_part(&glibc.path).unwrap();
        let h = hash_part(&hello.path).unwrap();
        assert!(db.set_nar(g, &nar(1)).unwrap());
        assert!(db.set_nar(h, &nar(2)).unwrap());
        assert!(!db.set_nar(&"9".repeat(32), &nar(9)).unwrap());
        assert_eq!(
            db.nix_path(h).unwrap().unwrap().references,
            vec![glibc.path.clone()]
        );
        assert_eq!(db.nar_owner(&nar(2).file).unwrap().as_deref(), Some(h));
        // A second record of the same closure keeps the NARs made.
        db.put_nix_closure(&a, &[glibc.clone(), hello.clone()])
            .unwrap();
        assert_eq!(db.nix_path(g).unwrap().unwrap().nar, Some(nar(1)));

        assert_eq!(db.nix_path_users(g).unwrap(), {
            let mut both = vec![a, b];
            both.sort();
            both
        });
        assert_eq!(db.nix_path_users(h).unwrap(), vec![a]);
        assert_eq!(
            db.nars_made(&[hello.path.clone(), curl.path.clone()])
                .unwrap()
                .len(),
            1
        );
        db.remove_image(&a).unwrap();
        db.remove_nix_closure(&a).unwrap();
        assert_eq!(db.prune_nix_paths(|_| true).unwrap(), [nar(1).file].into());
        assert!(db.nix_path(h).unwrap().is_none());
        assert!(db.nar_owner(&nar(2).file).unwrap().is_none());
        assert!(db.nix_path(g).unwrap().is_some());
        assert_eq!(db.nix_path_users(g).unwrap(), vec![b]);
        let counts = db.nix_cache_counts().unwrap();
        assert_eq!((counts.paths, counts.nars, counts.nar_bytes), (2, 1, 4));
        // An image no longer served (its manifest gone) loses its paths.
        assert!(db.prune_nix_paths(|d| *d != b).unwrap().is_empty());
        assert!(db.nix_path(g).unwrap().is_none());
        assert!(db.nix_closure(&b).unwrap().is_none());
    }

    #[test]
    fn hash_parts() {
        let p = format!("/nix/store/{}-x", "a".repeat(32));
        assert_eq!(hash_part(&p), Some("a".repeat(32).as_str()));
        assert_eq!(hash_part("/nix/store/short-x"), None);
        assert_eq!(hash_part("/elsewhere/x"), None);
    }
}
