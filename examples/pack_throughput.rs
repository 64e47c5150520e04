//! Packs a directory into a layer at one or more gzip levels and prints the
//! throughput, e.g.:
//!
//!     cargo run --release --example pack_throughput -- /usr/lib/x86_64-linux-gnu 1 6
//!
//! The layers go to a temporary blob store, removed on exit, unless
//! `NIXERY_KEEP_STORE=<dir>` names a store to keep them in.

use nixery::build::archive::{pack_paths_with_level, GZIP_LEVEL};
use nixery::store::fs::BlobStore;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu".into()),
    );
    let mut levels: Vec<u32> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if levels.is_empty() {
        levels.push(GZIP_LEVEL);
    }
    let dir = std::fs::canonicalize(dir)?;
    let temp = tempfile::tempdir()?;
    let root =
        std::env::var_os("NIXERY_KEEP_STORE").map_or_else(|| temp.path().to_owned(), PathBuf::from);
    let store = BlobStore::open(&root)?;
    for level in levels {
        let progress = AtomicU64::new(0);
        let start = Instant::now();
        let layer = pack_paths_with_level(&store, std::slice::from_ref(&dir), &progress, level)?;
        let secs = start.elapsed().as_secs_f64();
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "level {level}: {:.1} MB tar -> {:.1} MB gzip ({:.1}%) in {secs:.2}s = {:.1} MB/s uncompressed ({})",
            mb(layer.tar_size),
            mb(layer.size),
            100.0 * layer.size as f64 / layer.tar_size as f64,
            mb(layer.tar_size) / secs,
            layer.digest,
        );
    }
    Ok(())
}
