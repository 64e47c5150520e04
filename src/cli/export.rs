//! `nixery export --output DIR|FILE.tar IMAGE[:TAG]... [--with-closures]`:
//! writes the images as an OCI image layout, building those not cached
//! yet when a package source is configured; with several `--platforms`,
//! each image for every one of them.

use super::build::{build_all, image_list};
use crate::build::builder::{Builder, TagAnswer};
use crate::config::ServeArgs;
use crate::digest::Digest;
use crate::mirror::import::{NIX_CACHE_DIR, STORE_PATHS_FILE};
use crate::mirror::{layout, Image};
use crate::oci::Format;
use crate::store::db::Referrer;
use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The layout directory to write, or a file ending in `.tar` to write
    /// the same layout as one tar file.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Also write `nix-cache/`, a Nix binary cache of every store path in
    /// the images, for building new images inside.
    #[arg(long)]
    pub with_closures: bool,
    /// Images: `NAME[:TAG]` (tag `latest` if absent).
    pub images: Vec<String>,
    /// A file with more images, one per line (`#` starts a comment).
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> ExitCode {
    super::offline(&args.serve, false, |_, builder| async move {
        let images = image_list(&args.images, args.from_file.as_deref())?;
        let mut found = Vec::new();
        let mut failed = Vec::new();
        for (image, result) in images.iter().zip(build_all(&builder, &images).await) {
            match result {
                Ok(digest) => found.push((image.clone(), digest)),
                Err(e) => failed.push(format!("{image}: {e}")),
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("cannot export:\n  {}", failed.join("\n  "));
        }
        let mut exported = Vec::with_capacity(found.len());
        for (image, digest) in found {
            // With several platforms: each one's manifest (built if needed).
            let platforms = match builder.answer(&image.name, &image.tag, true).await {
                Ok(TagAnswer::Index(platforms)) => platforms,
                Ok(TagAnswer::Manifest(_)) => Vec::new(),
                Err(e) => anyhow::bail!("{image}: its platforms: {e}"),
            };
            let image = Image {
                digest: platforms.first().map_or(digest, |(_, d)| *d),
                image,
                platforms,
            };
            // From the bucket, what this replica's disk does not hold.
            for digest in image.manifests() {
                builder.bring_local(&digest).await.with_context(|| {
                    format!("{}: copying its blobs from the bucket", image.image)
                })?;
            }
            exported.push(image);
        }
        let referrers = referrers_of(&builder, &exported).await?;
        let as_tar = args.output.extension().is_some_and(|e| e == "tar");
        let dir = if as_tar {
            let name = args
                .output
                .file_name()
                .unwrap_or_default()
                .to_string_lossy();
            args.output.with_file_name(format!(".{name}.layout"))
        } else {
            args.output.clone()
        };
        let written = write_layout(&builder, &exported, referrers, &dir, args.with_closures).await;
        if as_tar {
            let packed = written.and_then(|w| {
                layout::pack_tar(&dir, &args.output)?;
                Ok(w)
            });
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove the staging layout");
            }
            report(&args.output, packed?, exported.len());
        } else {
            report(&args.output, written?, exported.len());
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn report(output: &Path, written: layout::Written, images: usize) {
    println!(
        "exported {images} images to {}: {} blobs, {}",
        output.display(),
        written.blobs,
        crate::http::format::bytes(written.bytes)
    );
}

/// What refers to each image's manifests (its Docker and OCI forms),
/// made if need be and brought to this replica's disk.
async fn referrers_of(
    builder: &Arc<Builder>,
    images: &[Image],
) -> anyhow::Result<BTreeMap<Digest, Vec<Referrer>>> {
    let mut out = BTreeMap::new();
    for image in images {
        for docker in image.manifests() {
            let oci = builder.manifest_in(docker, Format::Oci).await?;
            for subject in std::iter::once(docker).chain(oci.map(|s| s.digest)) {
                let listed = builder
                    .referrers(subject)
                    .await
                    .with_context(|| format!("{}: its bills of materials", image.image))?;
                for r in &listed {
                    builder.bring_local(&r.digest).await?;
                }
                out.insert(subject, listed);
            }
        }
    }
    Ok(out)
}

async fn write_layout(
    builder: &Arc<Builder>,
    images: &[Image],
    referrers: BTreeMap<Digest, Vec<Referrer>>,
    dir: &Path,
    with_closures: bool,
) -> anyhow::Result<layout::Written> {
    let blobs = builder.blobs().clone();
    let list = images.to_vec();
    let out = dir.to_owned();
    let written =
        tokio::task::spawn_blocking(move || layout::write(&blobs, &list, &referrers, &out))
            .await
            .context("writing the layout")??;
    if with_closures {
        write_closures(builder, images, dir).await?;
    }
    Ok(written)
}

/// `nix copy` of every image's store paths (of each platform exported)
/// into `DIR/nix-cache`, with the list of those paths beside it for
/// `import --with-closures`.
async fn write_closures(
    builder: &Arc<Builder>,
    images: &[Image],
    dir: &Path,
) -> anyhow::Result<()> {
    let mut paths = Vec::new();
    for Image {
        image, platforms, ..
    } in images
    {
        let archs = match platforms.is_empty() {
            true => vec![builder.platforms_for(&image.name)[0]],
            false => platforms.iter().map(|(arch, _)| *arch).collect(),
        };
        for arch in archs {
            let record = builder
                .cached_record(&image.name, &image.tag, arch)
                .await?
                .filter(|r| !r.out_paths.is_empty())
                .with_context(|| {
                    format!(
                        "{image}: its store paths are not known here (an imported image has none)"
                    )
                })?;
            paths.extend(record.out_paths);
        }
    }
    paths.sort();
    paths.dedup();
    let cache = dir.join(NIX_CACHE_DIR);
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let url = format!("file://{}", std::path::absolute(&cache)?.display());
    builder
        .nix()
        .copy(None, Some(&url), &paths)
        .await
        .context("copying the closures")?;
    // The Nix cache's own NARs, for the imported side to serve.
    let manifests: Vec<_> = images.iter().flat_map(|i| i.manifests()).collect();
    let (nars, left_out) = crate::nixcache::carry::export(builder, &manifests, &cache)
        .await
        .context("writing the Nix cache's NARs")?;
    if left_out > 0 {
        println!("{left_out} images were built before the Nix cache: their NARs are not carried (build them again)");
    }
    tracing::info!(nars, "wrote the Nix cache's NARs");
    crate::write_atomically(&cache.join(STORE_PATHS_FILE), paths.join("\n").as_bytes())
        .context("writing the list of store paths")?;
    Ok(())
}
