//! One suite for the `Storage` trait, run on each backend: the local
//! filesystem store and an S3 bucket on a real SeaweedFS.

mod common;

use common::seaweed::Seaweed;
use futures::TryStreamExt;
use nixery::digest::Digest;
use nixery::store::fs::BlobStore;
use nixery::store::{LeaseState, Opened, RecordKind, Storage, StoreError};
use std::path::Path;
use std::time::Duration;

async fn read(
    storage: &dyn Storage,
    digest: &Digest,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let stream = storage.read(digest, range).await.expect("read");
    let chunks: Vec<_> = stream.try_collect().await.expect("read stream");
    chunks.concat()
}

/// Writes `bytes` to a file outside the store, as a build's output would be.
fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What every backend must do. `other` is a second client of the same
/// storage, as another replica would hold.
async fn suite(storage: &dyn Storage, other: &dyn Storage, scratch: &Path) {
    // put_file: verified, idempotent, visible through stat/open/read/list.
    let small = b"hello, storage".to_vec();
    let small_digest = Digest::of(&small);
    let path = file_with(scratch, "small", &small);
    storage.put_file(&path, &small_digest).await.expect("put");
    storage
        .put_file(&path, &small_digest)
        .await
        .expect("put again");
    assert_eq!(
        storage.stat(&small_digest).await.unwrap(),
        Some(small.len() as u64)
    );
    assert_eq!(
        other.stat(&small_digest).await.unwrap(),
        Some(small.len() as u64)
    );
    assert_eq!(read(other, &small_digest, None).await, small);
    assert_eq!(read(other, &small_digest, Some(7..14)).await, b"storage");
    match other.open(&small_digest, false).await.unwrap() {
        Some(Opened::Local(blob)) => assert_eq!(blob.as_ref(), &small[..]),
        Some(Opened::Remote { size }) => assert_eq!(size, small.len() as u64),
        Some(Opened::Redirect(_)) => panic!("no redirect was asked for"),
        None => panic!("stored blob not found"),
    }

    // A file whose bytes are not its claimed digest is refused, and leaves nothing.
    let claimed = Digest::of(b"something else");
    let err = storage.put_file(&path, &claimed).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(other.stat(&claimed).await.unwrap(), None);

    // Large enough for a multipart upload, with a bad digest, then a good one.
    let large: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let large_digest = Digest::of(&large);
    let large_path = file_with(scratch, "large", &large);
    let err = storage.put_file(&large_path, &claimed).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(other.stat(&claimed).await.unwrap(), None);
    storage
        .put_file(&large_path, &large_digest)
        .await
        .expect("large put");
    assert_eq!(read(other, &large_digest, None).await, large);
    let tail_start = large.len() as u64 - 100;
    assert_eq!(
        read(other, &large_digest, Some(tail_start..large.len() as u64)).await,
        &large[tail_start as usize..]
    );

    let listed = other.list().await.unwrap();
    for d in [&small_digest, &large_digest] {
        assert!(listed.iter().any(|(l, _)| l == d), "{d} not listed");
    }
    assert!(!listed.iter().any(|(l, _)| *l == claimed));

    // Delete.
    assert!(storage.delete(&small_digest).await.unwrap());
    assert!(!storage.delete(&small_digest).await.unwrap());
    assert_eq!(other.stat(&small_digest).await.unwrap(), None);
    assert!(other.open(&small_digest, false).await.unwrap().is_none());

    // Shared records and leases: only where something is shared.
    if storage.is_shared() {
        storage
            .put_record(RecordKind::Layer, "k1", b"v1".to_vec())
            .await
            .unwrap();
        assert_eq!(
            other.get_record(RecordKind::Layer, "k1").await.unwrap(),
            Some(b"v1".to_vec())
        );
        assert_eq!(
            other.get_record(RecordKind::Manifest, "k1").await.unwrap(),
            None
        );

        let ttl = Duration::from_secs(3);
        let LeaseState::Acquired(lease) = storage.try_lease("l1", ttl).await.unwrap() else {
            panic!("a free lease is granted");
        };
        assert!(matches!(
            other.try_lease("l1", ttl).await.unwrap(),
            LeaseState::Held(_)
        ));
        storage.release(&lease).await.unwrap();
        let LeaseState::Acquired(theirs) = other.try_lease("l1", ttl).await.unwrap() else {
            panic!("a released lease is granted");
        };
        // Not renewed: it expires and another holder gets it.
        assert!(matches!(
            storage.try_lease("l1", ttl).await.unwrap(),
            LeaseState::Held(_)
        ));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(matches!(
            storage.try_lease("l1", ttl).await.unwrap(),
            LeaseState::Acquired(_)
        ));
        // Releasing a lease that is no longer ours leaves the new holder's.
        other.release(&theirs).await.unwrap();
        assert!(matches!(
            other.try_lease("l1", ttl).await.unwrap(),
            LeaseState::Held(_)
        ));
    } else {
        assert_eq!(
            other.get_record(RecordKind::Layer, "k1").await.unwrap(),
            None
        );
    }
}

#[tokio::test]
async fn filesystem_backend_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&dir.path().join("store")).unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    suite(&store, &store.clone(), &scratch).await;
}

#[tokio::test]
async fn s3_backend_passes_the_storage_suite() {
    let weed = Seaweed::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = weed.client("suite", &dir.path().join("a"));
    let b = weed.client("suite", &dir.path().join("b"));
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    suite(&a, &b, &scratch).await;
    assert_eq!(a.describe().backend, "s3");
}
