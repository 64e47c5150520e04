//! `nixery verify` on a bucket: every blob re-hashed as it downloads, every
//! manifest the index names checked for its blobs and their sizes, every
//! layer record checked for its blob, every NAR of the Nix cache unpacked
//! and hashed against its NarHash, every closure record checked to name a
//! stored image. `repair` deletes corrupt blobs, the
//! manifests that cannot be served whole and the records that lead to
//! them, so the replicas build those images again.
//!
//! It reads (and repairs) only the bucket, never a replica's database, so
//! it runs while the replicas serve.

use super::Bucket;
use crate::blocking::{feed_blocking, ChunkReader};
use crate::digest::Digest;
use crate::oci::manifest::MANIFEST_MAX_BYTES;
use crate::oci::named_by;
use crate::store::db::nix::SharedClosureRecord;
use crate::store::db::{ImportedRecord, LayerRecord, ManifestRecord, Referrer, ReferrersRecord};
use crate::store::findings::{Findings, Holder, Repaired, StaleRecord};
use crate::store::{RecordKind, StoreError};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Blobs downloaded and hashed at once.
const HASHING_AT_ONCE: usize = 4;
/// Manifests read at once.
const READS_AT_ONCE: usize = 16;

/// Checks the whole bucket; `progress(done, total)` is called per blob.
pub async fn check(
    bucket: &Bucket,
    mut progress: impl FnMut(usize, usize),
) -> Result<Findings, StoreError> {
    let mut f = Findings::default();
    let listed = bucket.blobs().await?;
    let sizes: HashMap<Digest, u64> = listed.iter().map(|b| (b.digest, b.size)).collect();
    let total = listed.len();
    let mut hashed = futures::stream::iter(listed.iter().map(|b| async move {
        let got = bucket.hash_blob(&b.digest).await?;
        Ok::<_, StoreError>((b.digest, got))
    }))
    .buffer_unordered(HASHING_AT_ONCE);
    let mut corrupt = BTreeSet::new();
    let mut done = 0;
    while let Some((digest, got)) = hashed.try_next().await? {
        // A blob deleted meanwhile (by a collection) is no damage.
        if let Some((actual, len)) = got {
            if actual != digest {
                corrupt.insert(digest);
            }
            f.bytes += len;
        }
        done += 1;
        progress(done, total);
    }
    drop(hashed);
    f.blobs = total;

    let mut holders: BTreeMap<Digest, Vec<Holder>> = BTreeMap::new();
    for (key, record) in bucket
        .records::<ManifestRecord>(RecordKind::Manifest)
        .await?
    {
        match record {
            Some(r) => holders
                .entry(r.digest)
                .or_default()
                .push(Holder::Build(key)),
            None => f.stale_records.push(unreadable(RecordKind::Manifest, key)),
        }
    }
    for (key, record) in bucket
        .records::<ImportedRecord>(RecordKind::Imported)
        .await?
    {
        match (Digest::from_hex(&key), record) {
            (Ok(d), Some(r)) => holders
                .entry(d)
                .or_default()
                .extend(r.names.iter().map(|n| {
                    let (name, tag) = n.rsplit_once(':').unwrap_or((n, "latest"));
                    Holder::Pinned(name.to_owned(), tag.to_owned())
                })),
            _ => f.stale_records.push(unreadable(RecordKind::Imported, key)),
        }
    }
    for key in bucket.record_keys(RecordKind::ManifestDigest).await? {
        match Digest::from_hex(&key) {
            Ok(d) => holders.entry(d).or_default().push(Holder::Listed),
            Err(_) => f
                .stale_records
                .push(unreadable(RecordKind::ManifestDigest, key)),
        }
    }
    f.manifests = holders.len();
    let problems: Vec<_> = futures::stream::iter(holders.into_iter().map(|(digest, held)| {
        let (sizes, corrupt) = (&sizes, &corrupt);
        async move {
            let problem = manifest_problem(bucket, sizes, corrupt, &digest).await?;
            Ok::<_, StoreError>(problem.map(|p| (digest, p, held)))
        }
    }))
    .buffered(READS_AT_ONCE)
    .try_collect()
    .await?;
    f.broken = problems.into_iter().flatten().collect();

    for (key, record) in bucket.records::<LayerRecord>(RecordKind::Layer).await? {
        let why = match record {
            None => "the record cannot be read".to_owned(),
            Some(r) if corrupt.contains(&r.digest) => format!("blob {} is corrupt", r.digest),
            Some(r) if size_now(bucket, &sizes, &r.digest).await?.is_none() => {
                format!("blob {} is missing", r.digest)
            }
            Some(_) => continue,
        };
        f.stale_records.push(StaleRecord {
            kind: RecordKind::Layer,
            key,
            why,
        });
    }
    let referrers = bucket
        .records::<ReferrersRecord>(RecordKind::Referrers)
        .await?;
    // A NAR is also unpacked and hashed against its NarHash, once.
    let mut nars: BTreeMap<Digest, (Referrer, Digest)> = BTreeMap::new();
    for (key, record) in &referrers {
        let Some(record) = record else { continue };
        let Ok(subject) = Digest::from_hex(key) else {
            continue;
        };
        for r in &record.referrers {
            let whole = sizes.get(&r.digest) == Some(&r.size) && !corrupt.contains(&r.digest);
            if whole && crate::nixcache::nar_of_referrer(r).is_some() {
                nars.entry(r.digest).or_insert_with(|| (r.clone(), subject));
            }
        }
    }
    let unpacked: Vec<_> =
        futures::stream::iter(nars.into_values().map(|(r, subject)| async move {
            let problem = nar_problem(bucket, &r).await?;
            Ok::<_, StoreError>(problem.map(|p| (r.digest, p, vec![Holder::Referrer(subject)])))
        }))
        .buffer_unordered(HASHING_AT_ONCE)
        .try_collect()
        .await?;
    f.broken.extend(unpacked.into_iter().flatten());
    let closures = bucket
        .records::<SharedClosureRecord>(RecordKind::NixClosure)
        .await?;
    for (key, record) in closures {
        let why = match (Digest::from_hex(&key), record) {
            (Err(_), _) | (_, None) => "the record cannot be read".to_owned(),
            (Ok(d), Some(_)) if size_now(bucket, &sizes, &d).await?.is_none() => {
                format!("image {d} is not stored")
            }
            (Ok(_), Some(_)) => continue,
        };
        f.stale_records.push(StaleRecord {
            kind: RecordKind::NixClosure,
            key,
            why,
        });
    }
    for (key, record) in referrers {
        let why = match record {
            None => "the record cannot be read".to_owned(),
            Some(r) => match referrer_problem(bucket, &sizes, &corrupt, &r).await? {
                Some(why) => why,
                None => continue,
            },
        };
        f.stale_records.push(StaleRecord {
            kind: RecordKind::Referrers,
            key,
            why,
        });
    }
    f.corrupt = corrupt.into_iter().collect();
    Ok(f)
}

/// Why a NAR in the bucket does not unpack to the NarHash its referrer
/// records, if it does not.
async fn nar_problem(bucket: &Bucket, r: &Referrer) -> Result<Option<String>, StoreError> {
    let Some(stream) = bucket.blob_stream(&r.digest, None).await? else {
        // Deleted meanwhile by a collection.
        return Ok(None);
    };
    let r = r.clone();
    feed_blocking(stream, move |next| {
        crate::nixcache::unpack_problem(ChunkReader::new(next), &r)
    })
    .await
}

/// A blob's size as listed or, when the listing predates it, as stored
/// now: replicas write while this check runs, and a record read after the
/// listing may name a blob written after it (blobs are always written
/// before the records that name them).
async fn size_now(
    bucket: &Bucket,
    sizes: &HashMap<Digest, u64>,
    digest: &Digest,
) -> Result<Option<u64>, StoreError> {
    match sizes.get(digest) {
        Some(&n) => Ok(Some(n)),
        None => bucket.blob_size(digest).await,
    }
}

/// Why a referrers record leads nowhere whole, if it does.
async fn referrer_problem(
    bucket: &Bucket,
    sizes: &HashMap<Digest, u64>,
    corrupt: &BTreeSet<Digest>,
    record: &ReferrersRecord,
) -> Result<Option<String>, StoreError> {
    for r in &record.referrers {
        let problem = match size_now(bucket, sizes, &r.digest).await? {
            _ if corrupt.contains(&r.digest) => "is corrupt",
            None => "is missing",
            Some(n) if n != r.size => "has another size",
            Some(_) => continue,
        };
        return Ok(Some(format!("referrer {} {problem}", r.digest)));
    }
    Ok(None)
}

fn unreadable(kind: RecordKind, key: String) -> StaleRecord {
    StaleRecord {
        kind,
        key,
        why: "the record cannot be read".into(),
    }
}

/// Why a manifest (or index) cannot be served whole, if it cannot.
async fn manifest_problem(
    bucket: &Bucket,
    sizes: &HashMap<Digest, u64>,
    corrupt: &BTreeSet<Digest>,
    digest: &Digest,
) -> Result<Option<String>, StoreError> {
    if corrupt.contains(digest) {
        return Ok(Some("the manifest blob is corrupt".into()));
    }
    match size_now(bucket, sizes, digest).await? {
        None => return Ok(Some("the manifest blob is missing".into())),
        Some(n) if n > MANIFEST_MAX_BYTES => {
            return Ok(Some(format!(
                "the manifest blob has {n} bytes: not a manifest"
            )))
        }
        Some(_) => {}
    }
    let Some(bytes) = bucket.small_blob(digest, MANIFEST_MAX_BYTES).await? else {
        return Ok(Some("the manifest blob is missing".into()));
    };
    let Some(named) = named_by(&bytes) else {
        return Ok(Some("the manifest cannot be read".into()));
    };
    for (d, size) in named.blobs() {
        if corrupt.contains(d) {
            return Ok(Some(format!("blob {d} is corrupt")));
        }
        match size_now(bucket, sizes, d).await? {
            None => return Ok(Some(format!("blob {d} is missing"))),
            Some(n) if n != *size => {
                return Ok(Some(format!(
                    "blob {d} has {n} bytes, the manifest says {size}"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// Deletes corrupt blobs, every manifest that cannot be served whole (so
/// that replicas build it again rather than serve it) and the records that
/// lead to them.
pub async fn repair(bucket: &Bucket, f: &Findings) -> Result<Repaired, StoreError> {
    let mut done = Repaired::default();
    // Records first: no replica follows one to a blob about to go.
    for stale in &f.stale_records {
        bucket.delete_record(stale.kind, &stale.key).await?;
    }
    for (digest, _, held_by) in &f.broken {
        for holder in held_by {
            match holder {
                Holder::Build(key) => {
                    bucket.delete_record(RecordKind::Manifest, key).await?;
                    done.rebuild += 1;
                }
                Holder::Listed => {
                    bucket
                        .delete_record(RecordKind::ManifestDigest, &digest.hex())
                        .await?;
                }
                Holder::Pinned(name, tag) => {
                    bucket
                        .delete_record(RecordKind::Imported, &digest.hex())
                        .await?;
                    done.lost.push(format!("{name}:{tag}"));
                }
                // A NAR that does not unpack to its NarHash: deleted below
                // with the other broken blobs, and made again when asked.
                Holder::Referrer(_) => {}
                // Only a local database has these (a bucket records each
                // platform's manifest of an import as `Pinned`).
                Holder::Built(..) | Holder::PinnedPlatform(..) => {}
            }
        }
    }
    for (digest, _, _) in &f.broken {
        // An image that goes takes its Nix closure with it.
        bucket
            .delete_record(RecordKind::NixClosure, &digest.hex())
            .await?;
    }
    let broken = f.broken.iter().map(|(d, _, _)| d);
    let doomed: BTreeSet<&Digest> = f.corrupt.iter().chain(broken).collect();
    for digest in doomed {
        bucket.delete_blob(digest).await?;
        done.blobs_removed += 1;
    }
    Ok(done)
}
