//! `nixery import DIR|FILE.tar [--with-closures]`: checks a layout whole,
//! then stores its blobs and records its images as pinned (with each
//! platform of an image exported with several), so `serve` answers their
//! names with the same digests, without Nix. On s3 the
//! blobs are also published to the bucket; the names are recorded in this
//! replica's database.

use crate::config::ServeArgs;
use crate::mirror::import;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// An OCI image layout directory or tar file, as `nixery export` writes.
    pub input: PathBuf,
    /// Also copy the layout's `nix-cache/` closures into the local Nix
    /// store, for building new images here.
    #[arg(long)]
    pub with_closures: bool,
}

pub fn run(args: ImportArgs) -> ExitCode {
    super::offline(&args.serve, false, |config, builder| async move {
        let input = args.input.clone();
        let staging = config.storage_path.join("tmp");
        let checked = tokio::task::spawn_blocking(move || import::check(&input, &staging))
            .await
            .context("checking the layout")?
            .with_context(|| format!("{} refused, nothing was imported", args.input.display()))?;
        println!(
            "checked {} images, {} blobs ({})",
            checked.images.len(),
            checked.blobs.len(),
            crate::http::format::bytes(checked.bytes)
        );
        match (checked.nix_cache(), args.with_closures) {
            (Some(cache), true) => {
                let paths = checked.store_paths()?;
                let url = format!("file://{}", std::path::absolute(&cache)?.display());
                builder
                    .nix()
                    .copy(Some(&url), None, &paths)
                    .await
                    .context("copying the closures into the Nix store")?;
                println!("copied the closures of {} store paths", paths.len());
            }
            (None, true) => anyhow::bail!(
                "{} has no nix-cache: export it with --with-closures",
                args.input.display()
            ),
            (Some(_), false) => {
                println!("the layout has a nix-cache; --with-closures copies it into the Nix store")
            }
            (None, false) => {}
        }
        let blobs = builder.blobs().clone();
        let db = builder.db().clone();
        let checked =
            tokio::task::spawn_blocking(move || checked.store(&blobs, &db).map(|()| checked))
                .await
                .context("storing the layout")??;
        if builder.storage().is_shared() {
            // Other replicas then serve these blobs and manifests by digest
            // (the names are this replica's: import on each).
            for digest in &checked.blobs {
                builder.publish(digest).await?;
            }
            for image in &checked.images {
                for digest in image.manifests() {
                    builder.mark_manifest(&digest).await?;
                    builder
                        .record_import(image.image.to_string(), &digest)
                        .await?;
                }
            }
            for (subject, referrer) in &checked.referrers {
                builder.mark_manifest(subject).await?;
                builder
                    .add_referrers(subject, vec![referrer.clone()])
                    .await?;
            }
            println!(
                "published {} blobs to {}",
                checked.blobs.len(),
                builder.storage().describe().location
            );
        }
        // After the images: on s3 a closure record of an image the bucket
        // does not have yet is the collection's to delete.
        if let Some(cache) = checked.nix_cache() {
            let paths = crate::nixcache::carry::import(&builder, &cache)
                .await
                .context("taking in the Nix cache's NARs")?;
            if paths > 0 {
                println!("the Nix binary cache serves the {paths} store paths of the images");
            }
        }
        for image in &checked.images {
            println!("{} {}", image.image, image.digest);
            for (arch, digest) in &image.platforms {
                println!("  linux/{} {digest}", arch.docker());
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
