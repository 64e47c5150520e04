//! `nixery sbom NAME[:TAG] [--format spdx|cyclonedx] [--platform P]`:
//! prints an image's bill of materials (building the image first if it is
//! not cached and a package source is configured), for scripts and the
//! air gap.

use crate::build::builder::TagAnswer;
use crate::build::image::Arch;
use crate::build::sbom::Kind;
use crate::config::ServeArgs;
use crate::mirror::ImageRef;
use crate::oci::{named_by, Named};
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct SbomArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// `spdx` (SPDX 2.3 JSON) or `cyclonedx` (CycloneDX 1.6 JSON).
    #[arg(long, default_value = "spdx")]
    pub format: String,
    /// The platform's document (`linux/amd64`, `linux/arm64`) of an image
    /// built for several; default: the first.
    #[arg(long)]
    pub platform: Option<String>,
    /// The image: `NAME[:TAG]` (tag `latest` if absent).
    pub image: String,
}

pub fn run(args: SbomArgs) -> ExitCode {
    super::offline(&args.serve, false, |_, builder| async move {
        let kind = Kind::parse(&args.format)
            .with_context(|| format!("--format {:?}: use spdx or cyclonedx", args.format))?;
        let image = ImageRef::parse(&args.image)?;
        let built = super::build::build_all(&builder, std::slice::from_ref(&image)).await;
        let first = match built.into_iter().next() {
            Some(Ok(d)) => d,
            Some(Err(e)) => anyhow::bail!("{image}: {e}"),
            None => anyhow::bail!("{image}: nothing built"),
        };
        let docker = match &args.platform {
            None => first,
            Some(p) => {
                let arch = p
                    .strip_prefix("linux/")
                    .and_then(Arch::from_docker)
                    .with_context(|| format!("--platform {p:?}: use linux/amd64 or linux/arm64"))?;
                let platforms = match builder.answer(&image.name, &image.tag, true).await {
                    Ok(TagAnswer::Index(platforms)) => platforms,
                    Ok(TagAnswer::Manifest(_)) => builder
                        .platforms_for(&image.name)
                        .into_iter()
                        .take(1)
                        .map(|a| (a, first))
                        .collect(),
                    Err(e) => anyhow::bail!("{image}: its platforms: {e}"),
                };
                platforms
                    .into_iter()
                    .find(|(a, _)| *a == arch)
                    .map(|(_, d)| d)
                    .with_context(|| format!("{image} is not built for {p}"))?
            }
        };
        let referrers = builder.referrers(docker).await?;
        let artifact = referrers
            .iter()
            .find(|r| r.artifact_type == kind.media_type())
            .with_context(|| {
                format!("{image} has no bill of materials (its store paths are not known here)")
            })?;
        builder.bring_local(&artifact.digest).await?;
        let bytes = builder
            .manifest_bytes(&artifact.digest)
            .await?
            .context("the artifact manifest is not stored")?;
        let Some(Named::Artifact { blobs, .. }) = named_by(&bytes) else {
            anyhow::bail!("{} is not an artifact manifest", artifact.digest);
        };
        let (document, _) = *blobs
            .get(1)
            .context("the artifact manifest has no document")?;
        let doc = builder
            .manifest_bytes(&document)
            .await?
            .context("the document is not stored")?;
        std::io::stdout().write_all(&doc)?;
        Ok(ExitCode::SUCCESS)
    })
}
