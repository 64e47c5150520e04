//! The Nix cache across an air gap: `export --with-closures` writes, beside
//! the layout's `nix-cache/`, the NARs of each exported image's store paths
//! (made here if they were not yet) and what they are (`nixery/nars.json`);
//! `import` takes them in, checked against their digests, so the imported
//! side serves the same narinfos (signed with its own key) and NARs.

use crate::blocking::blocking;
use crate::build::builder::Builder;
use crate::digest::Digest;
use crate::store::db::nix::{hash_part, ClosurePath, NarCompression, NarRecord};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Under the layout's `nix-cache/`.
const DIR: &str = "nixery";
const LIST: &str = "nars.json";

#[derive(Debug, Serialize, Deserialize)]
struct Carried {
    images: Vec<CarriedImage>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CarriedImage {
    /// The image's Docker manifest.
    manifest: Digest,
    paths: Vec<CarriedPath>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CarriedPath {
    path: String,
    references: Vec<String>,
    nar_hash: Digest,
    nar_size: u64,
    /// The derivation that built it, when known (absent in older exports).
    #[serde(default)]
    deriver: Option<String>,
    /// The zstd file, `nixery/<hex>.nar.zst`.
    file: Digest,
    file_size: u64,
}

fn nar_file(dir: &Path, file: &Digest) -> std::path::PathBuf {
    dir.join(format!("{}.nar.zst", file.hex()))
}

/// Writes the NARs of `manifests`' store paths into `cache` (the layout's
/// `nix-cache/`). Images with no recorded closure (built before the Nix
/// cache, whose paths were no longer in the Nix store) are left out and
/// counted. On s3 the closures and NARs are the bucket's. Returns (NARs
/// written, left out).
pub async fn export(
    builder: &Arc<Builder>,
    manifests: &[Digest],
    cache: &Path,
) -> anyhow::Result<(usize, usize)> {
    let dir = cache.join(DIR);
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("creating {}", dir.display()))?;
    let (mut images, mut left_out, mut written) = (Vec::new(), 0, 0);
    for manifest in manifests {
        if builder.storage().is_shared() {
            super::shared::take(builder, *manifest).await?;
        }
        let (db, m) = (builder.db().clone(), *manifest);
        let Some(closure) = blocking(move || db.nix_closure(&m)).await? else {
            left_out += 1;
            continue;
        };
        let mut paths = Vec::new();
        for path in closure.paths {
            let hash = hash_part(&path).context("a recorded path is not a store path")?;
            let (db, h) = (builder.db().clone(), hash.to_owned());
            let record = blocking(move || db.nix_path(&h))
                .await?
                .with_context(|| format!("{path} has no record"))?;
            if let Some(nar) = record.nar.filter(|n| !builder.blobs().contains(&n.file)) {
                // The bucket's, if it is there.
                if builder.storage().stat(&nar.file).await?.is_some() {
                    crate::store::fill::copy_to_disk(
                        builder.storage().as_ref(),
                        builder.blobs(),
                        &nar.file,
                    )
                    .await?;
                }
            }
            let nar = match record.nar {
                Some(nar) if builder.blobs().contains(&nar.file) => nar,
                _ => super::make_nar(path.clone(), hash.to_owned(), Arc::clone(builder))
                    .await?
                    .with_context(|| format!("{path} is not in the Nix store to make its NAR"))?,
            };
            let to = nar_file(&dir, &nar.file);
            if !tokio::fs::try_exists(&to).await.unwrap_or(false) {
                let from = builder.blobs().path_of(&nar.file);
                let (f, t) = (from.clone(), to.clone());
                blocking(move || std::fs::copy(&f, &t))
                    .await
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
                written += 1;
            }
            paths.push(CarriedPath {
                path,
                references: record.references,
                deriver: record.deriver,
                nar_hash: nar.nar_hash,
                nar_size: nar.nar_size,
                file: nar.file,
                file_size: nar.file_size,
            });
        }
        images.push(CarriedImage {
            manifest: *manifest,
            paths,
        });
    }
    let list = serde_json::to_vec_pretty(&Carried { images })?;
    crate::write_atomically(&dir.join(LIST), &list)?;
    Ok((written, left_out))
}

/// Takes in the NARs an export carried in `cache` (none: Ok(0)); each is
/// checked against its digest as it is stored. Returns the paths recorded.
pub async fn import(builder: &Arc<Builder>, cache: &Path) -> anyhow::Result<usize> {
    let dir = cache.join(DIR);
    let list = dir.join(LIST);
    if !tokio::fs::try_exists(&list).await.unwrap_or(false) {
        return Ok(0);
    }
    let text = tokio::fs::read(&list)
        .await
        .with_context(|| format!("reading {}", list.display()))?;
    let carried: Carried =
        serde_json::from_slice(&text).with_context(|| format!("{} is damaged", list.display()))?;
    let mut recorded = 0;
    for image in carried.images {
        for p in &image.paths {
            hash_part(&p.path).with_context(|| format!("{:?} is not a store path", p.path))?;
            if builder.blobs().contains(&p.file) {
                continue;
            }
            let (blobs, from, file) = (builder.blobs().clone(), nar_file(&dir, &p.file), p.file);
            blocking(move || -> anyhow::Result<()> {
                let mut f = std::fs::File::open(&from)
                    .with_context(|| format!("opening {}", from.display()))?;
                blobs
                    .put_expecting(&mut f, &file)
                    .with_context(|| format!("{} refused", from.display()))?;
                Ok(())
            })
            .await?;
            builder.publish(&p.file).await?;
        }
        let closure: Vec<ClosurePath> = image
            .paths
            .iter()
            .map(|p| ClosurePath {
                path: p.path.clone(),
                references: p.references.clone(),
                deriver: p.deriver.clone(),
            })
            .collect();
        // The NARs first: recording the closure then finds them made, and
        // (on s3) does not set out to make them again.
        let (db, paths) = (builder.db().clone(), image.paths.clone());
        blocking(move || -> Result<(), crate::store::db::DbError> {
            for p in &paths {
                if let Some(hash) = hash_part(&p.path) {
                    db.set_nar(hash, &nar_record(p))?;
                }
            }
            Ok(())
        })
        .await?;
        super::record_closure(builder, image.manifest, closure).await?;
        let referrers = image
            .paths
            .iter()
            .map(|p| super::nar_referrer(&p.path, &nar_record(p)))
            .collect();
        builder.add_referrers(&image.manifest, referrers).await?;
        recorded += image.paths.len();
    }
    Ok(recorded)
}

fn nar_record(p: &CarriedPath) -> NarRecord {
    NarRecord {
        nar_hash: p.nar_hash,
        nar_size: p.nar_size,
        file: p.file,
        file_size: p.file_size,
        compression: NarCompression::Zstd,
    }
}
