//! Crash consistency: the real binary is killed with SIGKILL at a random
//! point of a cold build, restarted on the same storage, and must then
//! serve the image with every blob intact. Between cycles `nixery gc`
//! empties the store, so each cycle packs its layers again (`big`'s are
//! over 100 MB, the others small).
//!
//! Prints the cycles run and the corrupt blobs found (served or on disk);
//! `NIXERY_CRASH_SEED` repeats a run's kill points.

mod common;

use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CYCLES: usize = 20;
const IMAGES: [&str; 2] = ["big", "hello/bash/coreutils"];

/// A small xorshift generator: the kill points only need to spread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(storage: &Path) -> Server {
        let fixture = common::fixture_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(["serve", "--port", "0", "--listen-address", "127.0.0.1"])
            .arg("--pkgs-path")
            .arg(&fixture)
            .arg("--storage-path")
            .arg(storage)
            .args(["--nix-option", "substituters=", "--nix-timeout", "300"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nixery starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("a start-up line")
            .expect("readable stdout");
        let addr = first
            .strip_prefix("nixery listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL, no chance to clean up.
    fn kill(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fetches the manifest and every blob it names; returns the blobs whose
/// bytes did not match their digest, and how many were fetched.
async fn pull_and_check(c: &Client, s: &Server, image: &str) -> (Vec<String>, usize) {
    let r = c
        .get(s.url(&format!("/v2/{image}/manifests/latest")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{image} after a restart");
    let digest = r
        .headers()
        .get("docker-content-digest")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body = r.bytes().await.unwrap();
    let mut bad = Vec::new();
    if Digest::of(&body).to_string() != digest {
        bad.push(digest);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for l in manifest["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in &digests {
        let r = c
            .get(s.url(&format!("/v2/{image}/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "blob {d}");
        let bytes = r.bytes().await.unwrap();
        if Digest::of(&bytes).to_string() != *d {
            bad.push(d.clone());
        }
    }
    (bad, digests.len() + 1)
}

fn empty_the_store(storage: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("gc")
        .arg("--storage-path")
        .arg(storage)
        .args(["--max-storage", "1", "--gc-lease", "0"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nixery gc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_never_serves_a_partial_blob() {
    common::require_tool("nix-instantiate");
    let seed = std::env::var("NIXERY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash: seed {seed} (NIXERY_CRASH_SEED)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path();
    let c = Client::new();
    // How long a cold build takes, per image, to spread the kill points.
    let mut build_ms = [4000u64; IMAGES.len()];
    let (mut corrupt_served, mut corrupt_stored, mut blobs_checked) = (0, 0, 0);
    let mut killed_mid_write = 0;
    for cycle in 0..CYCLES {
        let which = cycle % IMAGES.len();
        let image = IMAGES[which];
        let s = Server::start(storage);
        assert_eq!(
            common::temp_files(storage),
            Vec::<String>::new(),
            "cycle {cycle}: temp files cleared at start"
        );
        let kill_after = rng.below(build_ms[which]);
        let pending = {
            let (c, url) = (c.clone(), s.url(&format!("/v2/{image}/manifests/latest")));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status()) })
        };
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        s.kill();
        let _ = pending.await;
        // Half-written blobs left by the kill: it hit a blob being written.
        let debris = common::temp_files(storage).len();
        killed_mid_write += usize::from(debris > 0);

        let s = Server::start(storage);
        assert_eq!(
            common::temp_files(storage),
            Vec::<String>::new(),
            "cycle {cycle}: debris of the crash removed"
        );
        let started = Instant::now();
        let (bad, n) = pull_and_check(&c, &s, image).await;
        build_ms[which] = build_ms[which].max(started.elapsed().as_millis() as u64);
        // The bills of materials are written after the pull is answered:
        // a temp file may be one being written; left means it stays.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !common::temp_files(storage).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            common::temp_files(storage),
            Vec::<String>::new(),
            "cycle {cycle}: no temp files left after the build"
        );
        corrupt_served += bad.len();
        blobs_checked += n;
        let on_disk = common::corrupt_blobs_on_disk(storage);
        corrupt_stored += on_disk.len();
        println!(
            "crash: cycle {cycle}: {image}, killed after {kill_after} ms ({debris} temp files left); {n} blobs served, {} corrupt served, {} corrupt on disk",
            bad.len(),
            on_disk.len()
        );
        s.kill();
        empty_the_store(storage);
    }
    println!(
        "crash: {CYCLES} kill -9 cycles ({killed_mid_write} killed while writing a blob), {blobs_checked} blobs served and checked, {corrupt_served} corrupt blobs served, {corrupt_stored} corrupt on disk"
    );
    assert_eq!((corrupt_served, corrupt_stored), (0, 0));
}
