//! `nixery verify [--repair]`: re-hashes every blob and checks that every
//! recorded manifest can be served whole; exit 1 on any problem. On the
//! filesystem backend it works on the database and blob store (with the
//! server stopped); on s3, on the bucket alone (while replicas serve).

use crate::config::ServeArgs;
use crate::mirror::check;
use crate::store::findings::{Findings, Repaired};
use crate::store::s3::{check as bucket_check, Bucket, S3Settings};
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
    match args.serve.backend.s3() {
        Ok(Some(settings)) => return verify_bucket(settings, args.repair),
        Ok(None) => {}
        Err(e) => {
            eprintln_redacted!("nixery: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    }
    super::offline(&args.serve, false, |_, builder| async move {
        let blobs = builder.blobs().clone();
        let db = builder.db().clone();
        let repair = args.repair;
        let (findings, repaired) = tokio::task::spawn_blocking(move || {
            let bar = progress_bar();
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
        Ok(report(&findings, repaired.as_ref()))
    })
}

/// Checks (and with `repair`, mends) the bucket, reading no local state.
fn verify_bucket(settings: S3Settings, repair: bool) -> ExitCode {
    super::with_runtime(async move {
        let bucket = Bucket::open(settings)?;
        let bar = progress_bar();
        let findings = bucket_check::check(&bucket, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .await;
        bar.finish_and_clear();
        let findings = findings?;
        let repaired = if repair && !findings.is_clean() {
            Some(bucket_check::repair(&bucket, &findings).await?)
        } else {
            None
        };
        Ok(report(&findings, repaired.as_ref()))
    })
}

fn progress_bar() -> indicatif::ProgressBar {
    if super::on_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Prints the findings and what a repair did; the exit status they call for.
fn report(findings: &Findings, repaired: Option<&Repaired>) -> ExitCode {
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
    for stale in &findings.stale_records {
        println!(
            "stale record {}/{}: {}",
            stale.kind.dir(),
            stale.key,
            stale.why
        );
    }
    println!(
        "checked {} blobs ({}) and {} manifests: {} corrupt blobs, {} broken manifests, {} stale records",
        findings.blobs,
        crate::http::format::bytes(findings.bytes),
        findings.manifests,
        findings.corrupt.len(),
        findings.broken.len(),
        findings.stale_records.len()
    );
    let Some(done) = repaired else {
        return if findings.is_clean() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    };
    println!(
        "repaired: removed {} blobs and {} stale records; {} cached builds will be rebuilt on their next pull",
        done.blobs_removed,
        findings.stale_records.len(),
        done.rebuild
    );
    if done.lost.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!("lost (import them again): {}", done.lost.join(", "));
    ExitCode::FAILURE
}
