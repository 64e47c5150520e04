//! Fills a storage path with cached images, to measure start-up and idle
//! memory with a large cache (`scripts/bench`):
//!
//!     cargo run --release --example seed_cache -- STORAGE_PATH 10000
//!
//! Each image gets a manifest of 20 layers and a config in the blob store,
//! and a cache record and its name's tag record in the database, as a
//! build would leave them. The
//! layer digests are made up: these images can be looked up, not pulled.

use nixery::digest::Digest;
use nixery::store::db::{Db, ManifestRecord, TagRecord, TagTree};
use nixery::store::fs::BlobStore;
use std::path::PathBuf;

const LAYERS: usize = 20;

/// How long the database stays open after seeding (see `main`).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let storage = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: seed_cache STORAGE_PATH COUNT"))?,
    );
    let count: usize = args.next().unwrap_or_else(|| "10000".into()).parse()?;
    std::fs::create_dir_all(&storage)?;
    let blobs = BlobStore::open(&storage)?;
    let db = Db::open(&storage.join("db"))?;
    for i in 0..count {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"] },
            "rootfs": {
                "type": "layers",
                "diff_ids": (0..LAYERS).map(|l| Digest::of(format!("diff {i} {l}").as_bytes()).to_string()).collect::<Vec<_>>(),
            },
        });
        let config_digest = blobs.put(&serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 0,
                "digest": config_digest.to_string(),
            },
            "layers": (0..LAYERS).map(|l| serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": 1000 + l,
                "digest": Digest::of(format!("layer {i} {l}").as_bytes()).to_string(),
            })).collect::<Vec<_>>(),
        });
        let digest = blobs.put(&serde_json::to_vec(&manifest)?)?;
        let record = ManifestRecord {
            digest,
            checked_at: 0,
            out_paths: vec![format!("/nix/store/{:032x}-seeded-{i}", i)],
            revision: None,
        };
        db.put_manifest(
            &Digest::of(format!("seeded image {i}").as_bytes()).hex(),
            &record,
        )?;
        // What a build records for the name it was pulled by.
        let built = TagRecord { digest, at: 0 };
        db.put_tag_record(TagTree::Built, &format!("seeded/{i}"), "latest", &built)?;
    }
    tokio::runtime::Runtime::new()?.block_on(db.flush())?;
    // sled's flusher rewrites the pages of a log written in one burst
    // while it idles, as it does in a server after its builds; left to
    // the next process to open it, those pages stay in that process's
    // memory (~5 MB more at rest with 10,000 images). Leave it as a server
    // that ran on would.
    std::thread::sleep(SETTLE);
    println!("seeded {count} images into {}", storage.display());
    Ok(())
}
