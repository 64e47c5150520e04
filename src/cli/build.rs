//! `nixery build IMAGE[:TAG]... [--from-file LIST]`: builds images into
//! the storage (or finds them cached) as a pull would, without a server.
//! Progress per image: bars on a terminal, plain lines otherwise.

use crate::build::builder::Builder;
use crate::config::ServeArgs;
use crate::mirror::ImageRef;
use crate::observe::status::InFlight;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Images to build, as pulled: `NAME[:TAG]` (tag `latest` if absent).
    pub images: Vec<String>,
    /// A file with more images, one per line (`#` starts a comment).
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

/// The images named on the command line and in `--from-file`.
pub fn image_list(images: &[String], from_file: Option<&Path>) -> anyhow::Result<Vec<ImageRef>> {
    let mut names: Vec<String> = images.to_vec();
    if let Some(file) = from_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
        names.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    if names.is_empty() {
        anyhow::bail!("no images given: name them, or pass --from-file");
    }
    let mut refs = names
        .iter()
        .map(|n| ImageRef::parse(n).map_err(|e| anyhow::anyhow!("{n}: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    refs.dedup();
    Ok(refs)
}

pub fn run(args: BuildArgs) -> ExitCode {
    super::offline(&args.serve, true, |_, builder| async move {
        let images = image_list(&args.images, args.from_file.as_deref())?;
        let results = build_all(&builder, &images).await;
        let mut failed = 0;
        for (image, result) in images.iter().zip(results) {
            match result {
                Ok(digest) => println!("{image} {digest}"),
                Err(e) => {
                    failed += 1;
                    eprintln_redacted!("nixery: {image}: {e}");
                }
            }
        }
        if failed > 0 {
            eprintln_redacted!("nixery: {failed} of {} images failed", images.len());
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Builds every image (as many at once as the builder allows), showing
/// progress while they run. Results in the order of `images`.
pub async fn build_all(
    builder: &Arc<Builder>,
    images: &[ImageRef],
) -> Vec<Result<crate::digest::Digest, String>> {
    let all = futures::future::join_all(images.iter().map(|image| {
        let builder = Arc::clone(builder);
        let image = image.clone();
        async move {
            builder
                .manifest_for(&image.name, &image.tag)
                .await
                .map_err(|e| e.to_string())
        }
    }));
    let mut progress = Progress::new(super::on_terminal());
    tokio::pin!(all);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            results = &mut all => {
                progress.finish();
                return results;
            }
            _ = tick.tick() => progress.show(&builder.status().in_flight()),
        }
    }
}

/// Per-image progress: a bar each on a terminal, else a line whenever an
/// image enters a new phase.
struct Progress {
    bars: Option<MultiProgress>,
    shown: HashMap<String, (ProgressBar, &'static str)>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        Progress {
            bars: terminal.then(MultiProgress::new),
            shown: HashMap::new(),
        }
    }

    fn show(&mut self, live: &[InFlight]) {
        // Bars of builds that ended stop where they are.
        for (key, (bar, _)) in &self.shown {
            let running = live
                .iter()
                .any(|b| *key == format!("{}:{}", b.image, b.tag));
            if !running && !bar.is_finished() {
                bar.finish_with_message("done");
            }
        }
        for b in live {
            let key = format!("{}:{}", b.image, b.tag);
            let detail = format!(
                "{}, layers {}/{}, {}",
                b.phase_label,
                b.layers_done,
                b.layers_total,
                crate::http::format::bytes(b.bytes_written)
            );
            match (&self.bars, self.shown.get_mut(&key)) {
                (Some(_), Some((bar, _))) => bar.set_message(detail),
                (Some(multi), None) => {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(key.clone());
                    bar.set_message(detail);
                    bar.enable_steady_tick(Duration::from_millis(120));
                    self.shown.insert(key, (bar, b.phase));
                }
                (None, Some((_, phase))) if *phase == b.phase => {}
                (None, entry) => {
                    eprintln_redacted!("{key}: {detail}");
                    match entry {
                        Some((_, phase)) => *phase = b.phase,
                        None => {
                            self.shown.insert(key, (ProgressBar::hidden(), b.phase));
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) {
        for (bar, _) in self.shown.values() {
            bar.finish_and_clear();
        }
    }
}
