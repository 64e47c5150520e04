//! `nixery gc`: one garbage collection now, with the limits `serve` takes,
//! or with `--dry-run` a report of what it would delete. The database
//! allows one process at a time: run it while the server is stopped (a
//! running server collects in the background by itself).

use crate::config::GcLimits;
use crate::store::gc::{self, Report};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Directory for blobs and the database.
    #[arg(long, env = "STORAGE_PATH")]
    pub storage_path: PathBuf,
    #[command(flatten)]
    pub limits: GcLimits,
    /// Report what would be evicted and deleted, changing nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: GcArgs) -> ExitCode {
    match collect(&args) {
        Ok(report) => {
            print(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nixery gc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn collect(args: &GcArgs) -> anyhow::Result<Report> {
    let policy = args.limits.policy()?;
    let root = &args.storage_path;
    if !root.join("db").is_dir() {
        anyhow::bail!("{} holds no nixery database", root.display());
    }
    // The database first: it refuses a second process before the blob
    // store clears temp files that a running server may be writing.
    let db = crate::store::db::Db::open(&root.join("db"))
        .map_err(|e| anyhow::anyhow!("{e} (a running server collects by itself)"))?;
    let blobs = crate::store::fs::BlobStore::open(root)?;
    let pulls = crate::store::pulls::LastPulled::default();
    let report = gc::collect(&db, &blobs, &pulls, root, &policy, args.dry_run)?;
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
