//! `nixery verify`: every blob re-hashed, every recorded manifest's config
//! and layers present with their sizes; `repair` removes corrupt blobs and
//! the records that lead to them, so those images are built again (or, in
//! a mirror, reported lost).

use super::layout::{LayoutError, Manifest};
use crate::digest::Digest;
use crate::store::db::{Db, DbError, TagTree};
use crate::store::fs::{BlobError, BlobStore};
use crate::store::RecordKind;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A record that leads to a manifest, by what it is named.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A cached build, by cache key.
    Build(String),
    /// `name:tag`, imported.
    Pinned(String, String),
    /// One platform (its architecture) of `name:tag`, imported with several.
    PinnedPlatform(String, String, String),
    /// `name:tag`, as last built.
    Built(String, String),
    /// The bucket's record that the digest is a manifest (pulls by digest).
    Listed,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Build(key) => write!(f, "cached build {}", &key[..key.len().min(12)]),
            Holder::Pinned(n, t) => write!(f, "imported image {n}:{t}"),
            Holder::PinnedPlatform(n, t, a) => write!(f, "imported image {n}:{t} for {a}"),
            Holder::Built(n, t) => write!(f, "image {n}:{t}"),
            Holder::Listed => write!(f, "pulls by digest"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Findings {
    pub blobs: usize,
    pub bytes: u64,
    pub manifests: usize,
    /// Blobs whose content does not hash to their name.
    pub corrupt: Vec<Digest>,
    /// Manifests that cannot be served whole, why, and who records them.
    pub broken: Vec<(Digest, String, Vec<Holder>)>,
    /// Index records that cannot be read or name a missing or corrupt blob
    /// (a bucket's; the local database's are repaired with their blobs).
    pub stale_records: Vec<StaleRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRecord {
    pub kind: RecordKind,
    pub key: String,
    pub why: String,
}

impl Findings {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.broken.is_empty() && self.stale_records.is_empty()
    }
}

/// Checks everything; `progress(done, total)` is called per blob hashed.
pub fn check(
    blobs: &BlobStore,
    db: &Db,
    mut progress: impl FnMut(usize, usize),
) -> Result<Findings, CheckError> {
    let mut f = Findings::default();
    let all = blobs.list_blobs()?;
    let mut corrupt = BTreeSet::new();
    for (i, (digest, len)) in all.iter().enumerate() {
        // A blob removed meanwhile is no damage.
        match blobs.verify(digest) {
            Ok(true) => {}
            Ok(false) => {
                corrupt.insert(*digest);
            }
            Err(BlobError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        f.bytes += len;
        progress(i + 1, all.len());
    }
    f.blobs = all.len();
    let found = findings_for(blobs, db, corrupt)?;
    f.manifests = found.manifests;
    f.broken = found.broken;
    f.corrupt = found.corrupt;
    Ok(f)
}

/// The manifests that cannot be served whole, given the `corrupt` blobs,
/// and who records them (what [`repair`] needs, without hashing anything).
pub fn findings_for(
    blobs: &BlobStore,
    db: &Db,
    corrupt: BTreeSet<Digest>,
) -> Result<Findings, CheckError> {
    let mut f = Findings::default();
    let mut holders: BTreeMap<Digest, Vec<Holder>> = BTreeMap::new();
    for (key, r) in db.manifests()? {
        holders
            .entry(r.digest)
            .or_default()
            .push(Holder::Build(key));
    }
    for (which, make) in [
        (
            TagTree::Pinned,
            Holder::Pinned as fn(String, String) -> Holder,
        ),
        (TagTree::Built, Holder::Built),
    ] {
        for (name, tag, r) in db.tag_records(which)? {
            holders.entry(r.digest).or_default().push(make(name, tag));
        }
    }
    for (name, tag, arch, r) in db.all_pinned_platforms()? {
        holders
            .entry(r.digest)
            .or_default()
            .push(Holder::PinnedPlatform(name, tag, arch));
    }
    f.manifests = holders.len();
    for (digest, held_by) in holders {
        if let Some(problem) = manifest_problem(blobs, &corrupt, &digest)? {
            f.broken.push((digest, problem, held_by));
        }
    }
    f.corrupt = corrupt.into_iter().collect();
    Ok(f)
}

/// Why a manifest cannot be served whole, if it cannot.
fn manifest_problem(
    blobs: &BlobStore,
    corrupt: &BTreeSet<Digest>,
    digest: &Digest,
) -> Result<Option<String>, CheckError> {
    if corrupt.contains(digest) {
        return Ok(Some("the manifest blob is corrupt".into()));
    }
    let Some(blob) = blobs.get(digest)? else {
        return Ok(Some("the manifest blob is missing".into()));
    };
    let manifest = match Manifest::parse(digest, blob.as_ref()) {
        Ok(m) => m,
        Err(LayoutError::Manifest { source, .. }) => {
            return Ok(Some(format!("the manifest cannot be read: {source}")))
        }
        Err(e) => return Ok(Some(e.to_string())),
    };
    for r in manifest.references() {
        if corrupt.contains(&r.digest) {
            return Ok(Some(format!("blob {} is corrupt", r.digest)));
        }
        match blobs.stat_blob(&r.digest)? {
            None => return Ok(Some(format!("blob {} is missing", r.digest))),
            Some(n) if n != r.size => {
                return Ok(Some(format!(
                    "blob {} has {n} bytes, the manifest says {}",
                    r.digest, r.size
                )))
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// What a repair did.
#[derive(Debug, Default)]
pub struct Repaired {
    pub blobs_removed: usize,
    /// Cached builds forgotten: rebuilt on the next pull.
    pub rebuild: usize,
    /// Imported images forgotten: import them again.
    pub lost: Vec<String>,
}

/// Removes corrupt blobs and every record of a broken manifest.
pub fn repair(blobs: &BlobStore, db: &Db, f: &Findings) -> Result<Repaired, CheckError> {
    let mut done = Repaired::default();
    for digest in &f.corrupt {
        if blobs.delete(digest)? {
            done.blobs_removed += 1;
        }
    }
    let corrupt: BTreeSet<&Digest> = f.corrupt.iter().collect();
    // Layers packed before are reused by key: forget the damaged ones.
    for (key, layer) in db.layers()? {
        if corrupt.contains(&layer.digest) {
            db.remove_layer(&key)?;
        }
    }
    for (digest, _, held_by) in &f.broken {
        for holder in held_by {
            match holder {
                Holder::Build(key) => {
                    db.remove_manifest(key)?;
                    done.rebuild += 1;
                }
                // One broken platform loses the image as imported.
                Holder::Pinned(n, t) | Holder::PinnedPlatform(n, t, _) => {
                    db.remove_pinned(n, t)?;
                    let name = format!("{n}:{t}");
                    if !done.lost.contains(&name) {
                        done.lost.push(name);
                    }
                }
                Holder::Built(n, t) => db.remove_tag_record(TagTree::Built, n, t)?,
                Holder::Listed => {}
            }
        }
        db.forget_manifest_digest(digest)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::{ManifestRecord, TagRecord};

    #[test]
    fn a_changed_byte_is_found_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&dir.path().join("s")).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let layer = blobs.put(b"layer bytes").unwrap();
        let config = blobs.put(b"{}").unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"m","config":{{"mediaType":"c","digest":"{config}","size":2}},"layers":[{{"mediaType":"l","digest":"{layer}","size":11}}]}}"#
        );
        let m = blobs.put(manifest.as_bytes()).unwrap();
        db.put_manifest(
            "key",
            &ManifestRecord {
                digest: m,
                checked_at: 1,
                out_paths: vec![],
                revision: None,
            },
        )
        .unwrap();
        let pinned = TagRecord { digest: m, at: 1 };
        db.put_tag_record(TagTree::Pinned, "a", "v1", &pinned)
            .unwrap();
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert!(f.is_clean(), "{f:?}");
        assert_eq!((f.blobs, f.manifests), (3, 1));

        let path = dir
            .path()
            .join("s/blobs/sha256")
            .join(&layer.hex()[..2])
            .join(layer.hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert_eq!(f.corrupt, vec![layer]);
        assert_eq!(f.broken.len(), 1);
        let done = repair(&blobs, &db, &f).unwrap();
        assert_eq!((done.blobs_removed, done.rebuild), (1, 1));
        assert_eq!(done.lost, vec!["a:v1"]);
        assert!(db.manifest("key").unwrap().is_none());
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert!(f.is_clean(), "{f:?}");
    }

    #[test]
    fn a_broken_platform_of_an_import_loses_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&dir.path().join("s")).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let config = blobs.put(b"{}").unwrap();
        let manifest = |layer: &Digest| {
            let json = format!(
                r#"{{"schemaVersion":2,"mediaType":"m","config":{{"mediaType":"c","digest":"{config}","size":2}},"layers":[{{"mediaType":"l","digest":"{layer}","size":1}}]}}"#
            );
            TagRecord {
                digest: blobs.put(json.as_bytes()).unwrap(),
                at: 1,
            }
        };
        let amd64 = manifest(&blobs.put(b"x").unwrap());
        let arm64_layer = blobs.put(b"a").unwrap();
        let arm64 = manifest(&arm64_layer);
        db.put_tag_record(TagTree::Pinned, "a", "v1", &amd64)
            .unwrap();
        db.put_pinned_platforms(
            "a",
            "v1",
            &[
                ("amd64".into(), amd64.clone()),
                ("arm64".into(), arm64.clone()),
            ],
        )
        .unwrap();
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert!(f.is_clean(), "{f:?}");
        assert_eq!(f.manifests, 2, "each platform's manifest is checked");

        assert!(blobs.delete(&arm64_layer).unwrap());
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        let holders = vec![Holder::PinnedPlatform(
            "a".into(),
            "v1".into(),
            "arm64".into(),
        )];
        assert_eq!(f.broken.len(), 1, "{f:?}");
        assert_eq!((f.broken[0].0, &f.broken[0].2), (arm64.digest, &holders));
        let done = repair(&blobs, &db, &f).unwrap();
        assert_eq!(done.lost, vec!["a:v1"]);
        assert_eq!(db.tag_record(TagTree::Pinned, "a", "v1").unwrap(), None);
        assert!(db.all_pinned_platforms().unwrap().is_empty());
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert!(f.is_clean(), "{f:?}");
    }
}
