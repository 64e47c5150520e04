//! Packs directories into one layer at one or more gzip levels and prints
//! the throughput, e.g.:
//!
//!     cargo run --release --example pack_throughput -- /usr/lib/x86_64-linux-gnu 1 6
//!     cargo run --release --example pack_throughput -- --threads 1 /nix/store/...-big-1.0 /nix/store/...-hello
//!
//! Arguments: optionally `--threads N` (compressor threads; default: one per
//! core), then absolute paths, then levels. The layers go to a temporary
//! blob store, removed on exit, unless `NIXERY_KEEP_STORE=<dir>` names a
//! store to keep them in.

use nixery::build::archive::{pack_paths_with, Packing};
use nixery::store::fs::BlobStore;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut packing = Packing::default();
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--threads") {
        args.next();
        packing.threads = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?
            .parse()?;
    }
    let mut paths = Vec::new();
    let mut levels: Vec<u32> = Vec::new();
    for arg in args {
        if arg.starts_with('/') {
            paths.push(std::fs::canonicalize(PathBuf::from(arg))?);
        } else {
            levels.push(arg.parse()?);
        }
    }
    if paths.is_empty() {
        paths.push(std::fs::canonicalize("/usr/lib/x86_64-linux-gnu")?);
    }
    if levels.is_empty() {
        levels.push(packing.level);
    }
    let temp = tempfile::tempdir()?;
    let root =
        std::env::var_os("NIXERY_KEEP_STORE").map_or_else(|| temp.path().to_owned(), PathBuf::from);
    let store = BlobStore::open(&root)?;
    for level in levels {
        let progress = AtomicU64::new(0);
        let start = Instant::now();
        let layer = pack_paths_with(&store, &paths, &progress, Packing { level, ..packing })?;
        let secs = start.elapsed().as_secs_f64();
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "level {level}, {} threads: {:.1} MB tar -> {:.1} MB gzip ({:.1}%) in {secs:.2}s = {:.1} MB/s uncompressed ({})",
            packing.threads,
            mb(layer.tar_size),
            mb(layer.size),
            100.0 * layer.size as f64 / layer.tar_size as f64,
            mb(layer.tar_size) / secs,
            layer.digest,
        );
    }
    Ok(())
}
