//! The sled database: its trees and their bincode-encoded values, all here.
//!
//! Trees:
//! - `manifests`: image cache key -> [`ManifestRecord`]
//! - `manifest_digests`: manifest digest -> () (which blobs are manifests)
//! - `layers`: layer key -> [`LayerRecord`]
//! - `popularity`: store path name -> count (u64, big-endian)
//! - `builds`: build id (u64, big-endian) -> [`BuildRecord`]
//! - `tags`: `<name>\0<tag>` -> ()
//! - `errors`: error id (u64, big-endian) -> [`ErrorRecord`]
//! - `pulls`: image name -> manifest pulls by tag (u64, big-endian)
//! - `lookups`: `hit` / `miss` -> manifest requests by tag answered from
//!   cache or not (u64, big-endian)
//!
//! Values are bincode with serde, which has no field names: adding a field
//! changes the encoding, and records written before cannot be read.
//!
//! Blobs are written before the records that point at them, so a crash can
//! leave an unreferenced blob but never a record without its blob.

use crate::digest::Digest;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

/// Build records kept for the admin page.
const BUILDS_KEPT: usize = 100;

/// Error records kept for the admin page (the original shows 15).
pub const ERRORS_KEPT: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("database record could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("database record could not be decoded: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

/// A built image: its manifest and what it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub digest: Digest,
    /// Unix seconds of the build (or of the last check that it is current).
    pub checked_at: u64,
    /// The top-level store paths the image was built from.
    pub out_paths: Vec<String>,
    /// What the package source resolved to: a git commit, or a NAR hash
    /// (`sha256-...`) of a tarball or flake; `None` for a local path.
    pub revision: Option<String>,
}

/// A packed layer, shared by every image with the same store paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildOutcome {
    Success {
        manifest: Digest,
    },
    PackagesNotFound(Vec<String>),
    Failed {
        message: String,
        stderr_tail: String,
    },
}

/// What one build did, for the admin page and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub image: String,
    pub tag: String,
    pub started_at: u64,
    /// Milliseconds per phase, in the order they ran.
    pub phases: Vec<(String, u64)>,
    pub layers_total: usize,
    pub layers_reused: usize,
    pub bytes_packed: u64,
    pub outcome: BuildOutcome,
    /// The package source's revision this build used, once known (see
    /// [`ManifestRecord::revision`]).
    pub revision: Option<String>,
}

/// A failed build, kept apart from the build records so that a run of
/// successful builds does not push errors off the admin page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub image: String,
    pub tag: String,
    /// Unix seconds when the build failed.
    pub at: u64,
    pub message: String,
    /// The end of Nix's stderr; empty when Nix was not what failed.
    pub stderr_tail: String,
}

/// Whether a manifest request by tag was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

impl Lookup {
    fn key(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
        }
    }
}

#[derive(Clone)]
pub struct Db {
    db: sled::Db,
    manifests: sled::Tree,
    manifest_digests: sled::Tree,
    layers: sled::Tree,
    popularity: sled::Tree,
    builds: sled::Tree,
    tags: sled::Tree,
    errors: sled::Tree,
    pulls: sled::Tree,
    lookups: sled::Tree,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DbError> {
    Ok(bincode::serde::encode_to_vec(
        value,
        bincode::config::standard(),
    )?)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DbError> {
    Ok(bincode::serde::decode_from_slice(bytes, bincode::config::standard())?.0)
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn increment(tree: &sled::Tree, key: &[u8]) -> Result<(), DbError> {
    add(tree, key, 1)
}

fn add(tree: &sled::Tree, key: &[u8], n: u64) -> Result<(), DbError> {
    if n == 0 {
        return Ok(());
    }
    tree.update_and_fetch(key, |old| {
        Some(
            (old.map(be_u64).unwrap_or(0).saturating_add(n))
                .to_be_bytes()
                .to_vec(),
        )
    })?;
    Ok(())
}

/// Appends to a tree keyed by id, dropping the oldest beyond `keep`.
fn push_bounded(
    db: &sled::Db,
    tree: &sled::Tree,
    value: Vec<u8>,
    keep: usize,
) -> Result<(), DbError> {
    let id = db.generate_id()?;
    tree.insert(id.to_be_bytes(), value)?;
    while tree.len() > keep {
        if tree.pop_min()?.is_none() {
            break;
        }
    }
    Ok(())
}

/// Every key with its count, largest first.
fn counts_desc(tree: &sled::Tree) -> Result<Vec<(String, u64)>, DbError> {
    let mut all = tree
        .iter()
        .map(|kv| {
            let (k, v) = kv?;
            Ok((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)))
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(all)
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = sled::open(path)?;
        Ok(Db {
            manifests: db.open_tree("manifests")?,
            manifest_digests: db.open_tree("manifest_digests")?,
            layers: db.open_tree("layers")?,
            popularity: db.open_tree("popularity")?,
            builds: db.open_tree("builds")?,
            tags: db.open_tree("tags")?,
            errors: db.open_tree("errors")?,
            pulls: db.open_tree("pulls")?,
            lookups: db.open_tree("lookups")?,
            db,
        })
    }

    pub fn manifest(&self, cache_key: &str) -> Result<Option<ManifestRecord>, DbError> {
        self.manifests
            .get(cache_key)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn put_manifest(&self, cache_key: &str, record: &ManifestRecord) -> Result<(), DbError> {
        self.manifest_digests
            .insert(record.digest.as_bytes(), &[])?;
        self.manifests.insert(cache_key, encode(record)?)?;
        Ok(())
    }

    pub fn is_manifest(&self, digest: &Digest) -> Result<bool, DbError> {
        Ok(self.manifest_digests.contains_key(digest.as_bytes())?)
    }

    pub fn layer(&self, key: &str) -> Result<Option<LayerRecord>, DbError> {
        self.layers.get(key)?.map(|v| decode(&v)).transpose()
    }

    pub fn put_layer(&self, key: &str, record: &LayerRecord) -> Result<(), DbError> {
        self.layers.insert(key, encode(record)?)?;
        Ok(())
    }

    /// Counts one more image that contains each of these store path names.
    pub fn add_popularity<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), DbError> {
        for name in names {
            increment(&self.popularity, name.as_bytes())?;
        }
        Ok(())
    }

    pub fn popularity(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.popularity
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)))
            })
            .collect()
    }

    /// Records a build, keeping the newest [`BUILDS_KEPT`].
    pub fn add_build(&self, record: &BuildRecord) -> Result<(), DbError> {
        push_bounded(&self.db, &self.builds, encode(record)?, BUILDS_KEPT)
    }

    /// Build records, newest first.
    pub fn builds(&self) -> Result<Vec<BuildRecord>, DbError> {
        self.builds.iter().rev().map(|kv| decode(&kv?.1)).collect()
    }

    /// Records a failed build, keeping the newest [`ERRORS_KEPT`].
    pub fn add_error(&self, record: &ErrorRecord) -> Result<(), DbError> {
        push_bounded(&self.db, &self.errors, encode(record)?, ERRORS_KEPT)
    }

    /// Error records, newest first.
    pub fn errors(&self) -> Result<Vec<ErrorRecord>, DbError> {
        self.errors.iter().rev().map(|kv| decode(&kv?.1)).collect()
    }

    /// Counts a manifest request by tag: how it was answered, and, when it
    /// was answered with a manifest, one more pull of the image.
    pub fn count_manifest_request(
        &self,
        image: &str,
        lookup: Lookup,
        served: bool,
    ) -> Result<(), DbError> {
        increment(&self.lookups, lookup.key().as_bytes())?;
        if served {
            increment(&self.pulls, image.as_bytes())?;
        }
        Ok(())
    }

    /// Adds manifest requests counted in memory: answered from the cache
    /// (`hits`) and not, and pulls per image.
    pub fn add_manifest_requests(
        &self,
        hits: u64,
        misses: u64,
        pulls: &std::collections::HashMap<String, u64>,
    ) -> Result<(), DbError> {
        add(&self.lookups, Lookup::Hit.key().as_bytes(), hits)?;
        add(&self.lookups, Lookup::Miss.key().as_bytes(), misses)?;
        for (image, n) in pulls {
            add(&self.pulls, image.as_bytes(), *n)?;
        }
        Ok(())
    }

    /// Manifest requests by tag answered from the cache, and not.
    pub fn lookups(&self) -> Result<(u64, u64), DbError> {
        let get = |l: Lookup| -> Result<u64, DbError> {
            Ok(self.lookups.get(l.key())?.map_or(0, |v| be_u64(&v)))
        };
        Ok((get(Lookup::Hit)?, get(Lookup::Miss)?))
    }

    /// Pulls per image, most pulled first.
    pub fn pulls(&self) -> Result<Vec<(String, u64)>, DbError> {
        counts_desc(&self.pulls)
    }

    /// Popularity counts, most popular first.
    pub fn popularity_desc(&self) -> Result<Vec<(String, u64)>, DbError> {
        counts_desc(&self.popularity)
    }

    pub fn add_tag(&self, name: &str, tag: &str) -> Result<(), DbError> {
        self.tags.insert(format!("{name}\0{tag}"), &[])?;
        Ok(())
    }

    /// Tags served for a name, sorted.
    pub fn tags(&self, name: &str) -> Result<Vec<String>, DbError> {
        let prefix = format!("{name}\0");
        self.tags
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, _) = kv?;
                Ok(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            })
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.manifest_digests.len(), self.layers.len())
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"m");
        {
            let db = Db::open(dir.path()).unwrap();
            let rec = ManifestRecord {
                digest: d,
                checked_at: 5,
                out_paths: vec!["/nix/store/x".into()],
                revision: Some("sha256-x".into()),
            };
            db.put_manifest("k", &rec).unwrap();
            db.put_layer(
                "l",
                &LayerRecord {
                    digest: d,
                    diff_id: d,
                    size: 3,
                },
            )
            .unwrap();
            db.add_popularity(["a", "b", "a"]).unwrap();
            db.add_tag("shell/hello", "latest").unwrap();
            db.add_tag("shell/hello", "v1").unwrap();
            db.add_tag("shell/hello/x", "other").unwrap();
            for i in 0..(BUILDS_KEPT + 5) {
                db.add_build(&BuildRecord {
                    image: format!("img{i}"),
                    tag: "latest".into(),
                    started_at: i as u64,
                    phases: vec![("nix".into(), 1)],
                    layers_total: 1,
                    layers_reused: 0,
                    bytes_packed: 1,
                    outcome: BuildOutcome::Success { manifest: d },
                    revision: None,
                })
                .unwrap();
            }
            for i in 0..(ERRORS_KEPT + 2) {
                db.add_error(&ErrorRecord {
                    image: format!("err{i}"),
                    tag: "latest".into(),
                    at: i as u64,
                    message: "m".into(),
                    stderr_tail: "s".into(),
                })
                .unwrap();
            }
            db.count_manifest_request("a", Lookup::Miss, true).unwrap();
            db.count_manifest_request("a", Lookup::Hit, true).unwrap();
            db.count_manifest_request("b", Lookup::Hit, true).unwrap();
            db.count_manifest_request("c", Lookup::Miss, false).unwrap();
            db.db.flush().unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        let errors = db.errors().unwrap();
        assert_eq!(errors.len(), ERRORS_KEPT);
        assert_eq!(errors[0].image, format!("err{}", ERRORS_KEPT + 1));
        assert_eq!(db.lookups().unwrap(), (2, 2));
        assert_eq!(db.pulls().unwrap(), vec![("a".into(), 2), ("b".into(), 1)]);
        assert_eq!(db.popularity_desc().unwrap()[0], ("a".into(), 2));
        let m = db.manifest("k").unwrap().unwrap();
        assert_eq!((m.digest, m.revision.as_deref()), (d, Some("sha256-x")));
        assert!(db.manifest("other").unwrap().is_none());
        assert!(db.is_manifest(&d).unwrap());
        assert_eq!(db.layer("l").unwrap().unwrap().size, 3);
        assert_eq!(
            db.popularity().unwrap(),
            vec![("a".into(), 2), ("b".into(), 1)]
        );
        assert_eq!(db.tags("shell/hello").unwrap(), vec!["latest", "v1"]);
        let builds = db.builds().unwrap();
        assert_eq!(builds.len(), BUILDS_KEPT);
        assert_eq!(builds[0].image, format!("img{}", BUILDS_KEPT + 4));
    }
}
