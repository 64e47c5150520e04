//! `nixery verify [--repair]`: re-hashes every blob and checks that every
//! recorded manifest can be served whole; exit 1 on any problem.

use crate::config::ServeArgs;
use crate::mirror::check;
use anyhow::Context;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Remove corrupt blobs and the records that lead to them: those
    /// images are built again on the next pull (a mirror reports them lost).
    #[arg(long)]
    pub repair: bool,
}

pub fn run(args: VerifyArgs) -> ExitCode {
    super::offline(&args.serve, false, |_, builder| async move {
        let blobs = builder.blobs().clone();
        let db = builder.db().clone();
        let terminal = super::on_terminal();
        let repair = args.repair;
        let (findings, repaired) = tokio::task::spawn_blocking(move || {
            let bar = if terminal {
                indicatif::ProgressBar::new(0)
            } else {
                indicatif::ProgressBar::hidden()
            };
            let findings = check::check(&blobs, &db, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            });
            bar.finish_and_clear();
            let findings = findings?;
            let repaired = if repair && !findings.is_clean() {
                Some(check::repair(&blobs, &db, &findings)?)
            } else {
                None
            };
            Ok::<_, check::CheckError>((findings, repaired))
        })
        .await
        .context("verifying")??;
        for digest in &findings.corrupt {
            println!("corrupt blob {digest}");
        }
        for (digest, problem, holders) in &findings.broken {
            let held: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
            println!(
                "broken manifest {digest}: {problem} (used by {})",
                held.join(", ")
            );
        }
        println!(
            "checked {} blobs ({}) and {} manifests: {} corrupt blobs, {} broken manifests",
            findings.blobs,
            crate::http::format::bytes(findings.bytes),
            findings.manifests,
            findings.corrupt.len(),
            findings.broken.len()
        );
        let Some(done) = repaired else {
            return Ok(if findings.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        };
        println!(
            "repaired: removed {} blobs; {} cached builds will be rebuilt on their next pull",
            done.blobs_removed, done.rebuild
        );
        if done.lost.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        println!("lost (import them again): {}", done.lost.join(", "));
        Ok(ExitCode::FAILURE)
    })
}
