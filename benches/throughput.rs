//! Throughput figures (not a test): `cargo bench --bench throughput`, an
//! in-process complement to `scripts/bench` (which measures the release
//! binary as a user runs it). Prints
//! - layer packing throughput, MB/s of store bytes, for the fixture's
//!   > 100 MB closure (`big`);
//! - warm manifest GETs per second against a running server;
//! - cached blob GET throughput in MB/s.
//!
//! Client and server share this process and the machine's cores, so the
//! HTTP figures are a floor for what a remote client would see.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{config, nix_closure, TestServer};
use nixery::build::archive;
use nixery::store::fs::BlobStore;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

const HTTP_SECONDS: u64 = 5;
const HTTP_CONNECTIONS: usize = 4;

fn store_bytes(paths: &[String]) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|entries| entries.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        }
    }
    paths.iter().map(|p| walk(std::path::Path::new(p))).sum()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn bench_packing() {
    let closure = nix_closure("big");
    let bytes = store_bytes(&closure);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(dir.path()).expect("blob store");
    let paths: Vec<PathBuf> = closure.iter().map(PathBuf::from).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let progress = AtomicU64::new(0);
        let start = Instant::now();
        let layer = archive::pack_paths(&store, &paths, &progress).expect("pack");
        best = best.min(start.elapsed().as_secs_f64());
        assert!(layer.size > 0);
    }
    println!(
        "layer packing: {:.1} MB/s of store bytes ({:.1} MB in {} paths, best of 3: {:.2} s, gzip level {})",
        mb(bytes) / best,
        mb(bytes),
        closure.len(),
        best,
        archive::GZIP_LEVEL
    );
}

/// Runs `HTTP_CONNECTIONS` clients GETting `url` for `HTTP_SECONDS`;
/// returns (requests, bytes).
async fn hammer(url: String) -> (u64, u64) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(HTTP_SECONDS);
    let workers = (0..HTTP_CONNECTIONS).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let (mut n, mut bytes) = (0u64, 0u64);
            while Instant::now() < deadline {
                let r = client.get(&url).send().await.expect("GET");
                assert!(r.status().is_success());
                bytes += r.bytes().await.expect("body").len() as u64;
                n += 1;
            }
            (n, bytes)
        })
    });
    let mut total = (0, 0);
    for w in futures::future::join_all(workers).await {
        let (n, b) = w.expect("worker");
        total.0 += n;
        total.1 += b;
    }
    total
}

async fn bench_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&config(dir.path(), &[])).await;
    let client = reqwest::Client::new();
    let manifest_url = server.url("/v2/big/manifests/latest");
    let manifest: serde_json::Value = serde_json::from_slice(
        &client
            .get(&manifest_url)
            .send()
            .await
            .expect("build")
            .bytes()
            .await
            .expect("manifest"),
    )
    .expect("manifest JSON");

    let (n, _) = hammer(manifest_url).await;
    println!(
        "warm manifest GETs: {:.0} requests/s ({n} in {HTTP_SECONDS} s, {HTTP_CONNECTIONS} connections)",
        n as f64 / HTTP_SECONDS as f64
    );

    let largest = manifest["layers"]
        .as_array()
        .and_then(|ls| ls.iter().max_by_key(|l| l["size"].as_u64()))
        .and_then(|l| l["digest"].as_str())
        .expect("a layer")
        .to_owned();
    let (n, bytes) = hammer(server.url(&format!("/v2/big/blobs/{largest}"))).await;
    println!(
        "cached blob GETs: {:.0} MB/s ({n} GETs of a {:.1} MB layer in {HTTP_SECONDS} s, {HTTP_CONNECTIONS} connections)",
        mb(bytes) / HTTP_SECONDS as f64,
        mb(bytes / n.max(1))
    );
    server.stop().await;
}

fn main() {
    // `cargo bench` passes --bench; any other argument filters nothing here.
    println!("command: cargo bench --bench throughput (release profile)");
    bench_packing();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(bench_http());
}
