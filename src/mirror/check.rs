//! `nixery verify`: every blob re-hashed, every recorded manifest's config
//! and layers present with their sizes; `repair` removes corrupt blobs and
//! the records that lead to them, so those images are built again (or, in
//! a mirror, reported lost).

use super::layout::{LayoutError, Manifest};
use crate::digest::Digest;
use crate::store::db::{Db, DbError, ReferrerKind, TagTree};
use crate::store::findings::{Findings, Holder, Repaired};
use crate::store::fs::{BlobError, BlobStore};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Db(#[from] DbError),
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
    // What refers to a manifest: an artifact manifest is checked as one,
    // any other referrer as a blob of its recorded size.
    // A NAR is also unpacked and hashed against its NarHash, once.
    let mut nars: BTreeMap<Digest, Option<String>> = BTreeMap::new();
    for (subject, record) in db.all_referrers()? {
        for r in &record.referrers {
            let problem = match r.kind {
                ReferrerKind::Manifest => manifest_problem(blobs, &corrupt, &r.digest)?,
                ReferrerKind::Blob => match blob_problem(blobs, &corrupt, &r.digest, r.size)? {
                    None if r.artifact_type == crate::nixcache::NAR_ARTIFACT_TYPE => {
                        match nars.get(&r.digest) {
                            Some(known) => known.clone(),
                            None => {
                                let found = crate::nixcache::nar_problem(blobs, r)?;
                                nars.insert(r.digest, found.clone());
                                found
                            }
                        }
                    }
                    other => other,
                },
            };
            if let Some(problem) = problem {
                f.broken
                    .push((r.digest, problem, vec![Holder::Referrer(subject)]));
            }
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
        if let Some(problem) = blob_problem(blobs, corrupt, &r.digest, r.size)? {
            return Ok(Some(problem));
        }
    }
    Ok(None)
}

/// Why a blob a record names at `size` bytes cannot be served, if it
/// cannot.
fn blob_problem(
    blobs: &BlobStore,
    corrupt: &BTreeSet<Digest>,
    digest: &Digest,
    size: u64,
) -> Result<Option<String>, CheckError> {
    if corrupt.contains(digest) {
        return Ok(Some(format!("blob {digest} is corrupt")));
    }
    Ok(match blobs.stat_blob(digest)? {
        None => Some(format!("blob {digest} is missing")),
        Some(n) if n != size => Some(format!(
            "blob {digest} has {n} bytes, the record says {size}"
        )),
        Some(_) => None,
    })
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
                // Made again when next asked for.
                Holder::Referrer(subject) => db.remove_referrers(subject)?,
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
    fn a_damaged_referrer_is_found_and_its_record_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&dir.path().join("s")).unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let subject = Digest::of(b"subject");
        let kept = blobs.put(b"kept with the subject").unwrap();
        let config = blobs.put(b"{}").unwrap();
        let artifact = format!(
            r#"{{"schemaVersion":2,"mediaType":"m","config":{{"mediaType":"c","digest":"{config}","size":2}},"layers":[{{"mediaType":"l","digest":"{kept}","size":21}}],"subject":{{"mediaType":"m","digest":"{subject}","size":1}}}}"#
        );
        let a = blobs.put(artifact.as_bytes()).unwrap();
        let referrer = |kind, digest, size| crate::store::db::Referrer {
            kind,
            media_type: "m".into(),
            artifact_type: "t".into(),
            digest,
            size,
            annotations: vec![],
        };
        db.add_referrers(
            &subject,
            &[
                referrer(ReferrerKind::Manifest, a, artifact.len() as u64),
                referrer(ReferrerKind::Blob, kept, 21),
            ],
        )
        .unwrap();
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert!(f.is_clean(), "{f:?}");

        assert!(blobs.delete(&kept).unwrap());
        let f = check(&blobs, &db, |_, _| {}).unwrap();
        assert_eq!(f.broken.len(), 2, "{f:?}");
        assert!(f
            .broken
            .iter()
            .all(|(_, _, h)| h == &vec![Holder::Referrer(subject)]));
        repair(&blobs, &db, &f).unwrap();
        assert_eq!(db.referrers(&subject).unwrap(), None);
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
