//! `nixery gc`: one garbage collection now, with the limits `serve` takes,
//! or with `--dry-run` a report of what it would delete. On the filesystem
//! backend the database allows one process at a time: run it while the
//! server is stopped (a running server collects in the background by
//! itself). On s3 it collects the bucket, while the replicas serve.

use crate::config::{BackendArgs, GcLimits};
use crate::store::gc::{self, Report};
use crate::store::s3::gc::BucketGcError;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit status when another collection holds the bucket (EX_TEMPFAIL):
/// not a failure for a timer that runs on every replica.
pub const ANOTHER_COLLECTION: u8 = 75;

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Directory for blobs and the database (filesystem backend).
    #[arg(long, env = "STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub limits: GcLimits,
    /// Report what would be evicted and deleted, changing nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: GcArgs) -> ExitCode {
    let settings = match args.backend.s3() {
        Ok(s) => s,
        Err(e) => {
            eprintln_redacted!("nixery gc: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(settings) = settings {
        return super::with_runtime(async move {
            let policy = args.limits.policy()?;
            let bucket = crate::store::s3::Bucket::open(settings)?;
            match crate::store::s3::gc::collect(&bucket, &policy, args.dry_run).await {
                Ok(report) => {
                    print(&report);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ BucketGcError::Running(_)) => {
                    eprintln_redacted!("nixery gc: {e}; nothing done");
                    Ok(ExitCode::from(ANOTHER_COLLECTION))
                }
                Err(e) => Err(e.into()),
            }
        });
    }
    match collect(&args) {
        Ok(report) => {
            print(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln_redacted!("nixery gc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn collect(args: &GcArgs) -> anyhow::Result<Report> {
    let policy = args.limits.policy()?;
    if let Some(warning) = args.limits.local_warning() {
        eprintln_redacted!("nixery gc: {warning}");
    }
    let Some(root) = &args.storage_path else {
        anyhow::bail!("--storage-path (STORAGE_PATH) is required");
    };
    if !root.join("db").is_dir() {
        anyhow::bail!("{} holds no nixery database", root.display());
    }
    // The database first: it refuses a second process before the blob
    // store clears temp files that a running server may be writing.
    let db = crate::store::db::Db::open(&root.join("db"))
        .map_err(|e| anyhow::anyhow!("{e} (a running server collects by itself)"))?;
    let blobs = crate::store::fs::BlobStore::open(root)?;
    let pulls = crate::store::pulls::LastPulled::default();
    let report = gc::collect(&db, &blobs, &pulls, root, &policy, args.dry_run, false)?;
    if !args.dry_run {
        db.flush_blocking()?;
    }
    Ok(report)
}

fn print(report: &Report) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let verb = if report.dry_run {
        "would evict"
    } else {
        "evicted"
    };
    for e in &report.evicted {
        let name = e.image.as_deref().unwrap_or("(never pulled)");
        let _ = writeln!(
            out,
            "{verb} {name} {} (last used {})",
            e.manifest,
            crate::http::format::utc(e.last_used)
        );
    }
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let _ = writeln!(
        out,
        "{verb} {} blobs, {} bytes; {} bytes of blobs before, {} after",
        report.blobs_deleted, report.bytes_freed, report.bytes_before, report.bytes_after
    );
}
