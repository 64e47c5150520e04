//! A full disk: on a small tmpfs STORAGE_PATH (mounted here; the tests run
//! as root), a build that does not fit fails with a clear 500, leaves no
//! temp file and no partial blob, and the server keeps serving what it
//! has; it also starts on a disk that is full to the last byte.

mod common;

use common::{blob_path, config, error_code, get_blob, get_manifest, temp_files, TestServer};
use nixery::store::reserve::RESERVE_BYTES;
use reqwest::{Client, StatusCode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        common::require_tool("mount");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.path().to_owned(), dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn assert_blobs_whole(root: &Path) {
    assert_eq!(common::corrupt_blobs_on_disk(root), Vec::<String>::new());
}

/// Writes `path` until the file system has not one byte left.
fn fill(path: &Path) {
    let mut filler = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while filler.write_all(&chunk).is_ok() {}
    while filler.write_all(&[0u8]).is_ok() {}
}

#[tokio::test]
async fn a_full_disk_fails_builds_clearly_and_keeps_serving() {
    let fs = Tmpfs::mount("40m");
    let root = fs.0.clone();
    let c = Client::new();
    let s = TestServer::start(&config(&root, &[])).await;
    let (hello, hello_json) = get_manifest(&c, &s, "hello", "latest").await;

    // `big` has more than 100 MB of layers: it cannot fit.
    let r = c
        .get(s.url("/v2/big/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        err["message"].as_str().unwrap().contains("storage is full"),
        "{err}"
    );
    assert_eq!(
        temp_files(&root),
        Vec::<String>::new(),
        "temp files removed"
    );
    assert_blobs_whole(&root);

    // Still serving what it has.
    let r = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (again, _) = get_manifest(&c, &s, "hello", "latest").await;
    assert_eq!(again, hello);
    for l in hello_json["layers"].as_array().unwrap() {
        get_blob(&c, &s, l["digest"].as_str().unwrap()).await;
    }
    s.stop().await;

    // Fill the disk to the last byte, then start again.
    fill(&root.join("filler"));
    let s = TestServer::start(&config(&root, &[])).await;
    let (again, _) = get_manifest(&c, &s, "hello", "latest").await;
    assert_eq!(again, hello, "served on a full disk");
    for l in hello_json["layers"].as_array().unwrap() {
        get_blob(&c, &s, l["digest"].as_str().unwrap()).await;
    }
    // Starting took the reserve: fill what it freed too.
    fill(&root.join("filler-2"));
    assert_refused_as_full(&c, &s, &root, "bash").await;
    s.stop().await;
}

/// A cold build on a full disk is refused with the storage-full error and
/// leaves nothing behind.
async fn assert_refused_as_full(c: &Client, s: &TestServer, root: &Path, image: &str) {
    let r = c
        .get(s.url(&format!("/v2/{image}/manifests/latest")))
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("storage is full"),
        "{err}"
    );
    assert_eq!(temp_files(root), Vec::<String>::new());
    assert_blobs_whole(root);
}

#[tokio::test]
async fn a_full_disk_twice_in_a_row_keeps_its_reserve() {
    let fs = Tmpfs::mount("60m");
    let root = fs.0.clone();
    let reserve = root.join("reserve");
    let c = Client::new();
    let s = TestServer::start(&config(&root, &[])).await;
    let (hello, hello_json) = get_manifest(&c, &s, "hello", "latest").await;
    s.stop().await;
    assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES);

    fill(&root.join("filler"));
    for start in 1..=2 {
        let s = TestServer::start(&config(&root, &[])).await;
        let (again, _) = get_manifest(&c, &s, "hello", "latest").await;
        assert_eq!(again, hello, "start {start}: served on a full disk");
        for l in hello_json["layers"].as_array().unwrap() {
            get_blob(&c, &s, l["digest"].as_str().unwrap()).await;
        }
        // busybox would fit in the space the released reserve left: it is
        // kept for the next start all the same.
        assert_refused_as_full(&c, &s, &root, "busybox").await;
        if start == 2 {
            // Space is freed: the reserve is set aside again, and builds
            // work.
            std::fs::remove_file(root.join("filler")).unwrap();
            let freed = std::time::Instant::now();
            while std::fs::metadata(&reserve).map_or(0, |m| m.len()) != RESERVE_BYTES {
                assert!(
                    freed.elapsed() < std::time::Duration::from_secs(180),
                    "the reserve is not back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            get_manifest(&c, &s, "busybox", "latest").await;
        }
        s.stop().await;
    }
}

/// Writes `len` bytes (not zeros: a tmpfs holds them all) into `path`.
fn write_filler(path: &Path, len: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut written = 0;
    while written < len {
        let n = chunk.len().min((len - written) as usize);
        f.write_all(&chunk[..n]).unwrap();
        written += n as u64;
    }
    f.sync_all().unwrap();
}

#[tokio::test]
async fn a_build_below_the_free_space_floor_evicts_at_once_but_not_transfers() {
    let fs = Tmpfs::mount("400m");
    let root = fs.0.clone();
    let c = Client::new();
    // Leases far longer than the test: below the floor they do not hold.
    // The slow client below stalls for as long as the test takes.
    let limits = [
        "--min-free-space",
        "150M",
        "--gc-lease",
        "3600",
        "--idle-timeout",
        "3600",
    ];
    let s = TestServer::start(&config(&root, &limits)).await;
    // Pulled a second apart (last-pulled times are in seconds): big, then
    // hello, then coreutils, whose few MB of its own cover what the build
    // below takes.
    let mut pulled = Vec::new();
    for name in ["big", "hello", "coreutils"] {
        if !pulled.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        pulled.push(get_manifest(&c, &s, name, "latest").await.1);
    }
    let [big_json, hello_json, _] = &pulled[..] else {
        unreachable!()
    };
    let config_of =
        |m: &serde_json::Value| blob_path(&root, m["config"]["digest"].as_str().unwrap());
    let hello_config = config_of(hello_json);
    // A slow client of big's largest layer (most of big's bytes): big is
    // the least recently pulled image, but evicting it frees next to
    // nothing while this lasts.
    let layer = common::largest_layer(big_json);
    let download = common::start_download(&c, &s, "big", &layer).await;
    // Nothing written in the background from here on (bills of
    // materials, the collections they wake).
    s.builder.finish_background().await;
    s.builder.collector().collect().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // Just above the floor; the next build (more than a MB of bash's
    // layers) goes below it.
    let free = nixery::store::disk::free_bytes(&root).unwrap();
    write_filler(&root.join("filler"), free - (150 << 20) - (256 << 10));
    let (_, bash_json) = get_manifest(&c, &s, "bash", "latest").await;
    let built = std::time::Instant::now();

    // At once (woken by the build, not by the 5-minute timer), hello goes
    // though leased for an hour.
    while hello_config.exists() {
        assert!(
            built.elapsed() < std::time::Duration::from_secs(120),
            "hello is still stored; last collection: {}",
            common::status_json(&c, &s).await["limits"]["last_gc"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Least recently pulled first: the image just built stays.
    assert!(config_of(&bash_json).exists(), "bash was evicted");
    // The transfer in flight is spared, and completes whole.
    assert!(blob_path(&root, &layer).exists(), "in flight");
    common::finish_download(download, &layer).await;
    assert_blobs_whole(&root);
    s.stop().await;
}

#[tokio::test]
async fn a_disk_filled_from_outside_below_the_floor_is_collected_within_a_flush() {
    let fs = Tmpfs::mount("100m");
    let root = fs.0.clone();
    let c = Client::new();
    let limits = ["--min-free-space", "40M", "--gc-lease", "3600"];
    let s = TestServer::start(&config(&root, &limits)).await;
    let (_, hello_json) = get_manifest(&c, &s, "hello", "latest").await;
    let hello_config = blob_path(&root, hello_json["config"]["digest"].as_str().unwrap());
    // The collections that the build and its bills of materials asked
    // for are over.
    s.builder.finish_background().await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    // Something else fills the disk below the floor: no build, no write of
    // the server's own wakes the collector.
    let free = nixery::store::disk::free_bytes(&root).unwrap();
    write_filler(&root.join("filler"), free - (39 << 20));
    let filled = std::time::Instant::now();
    // Within a 30-second flush, not at the 5-minute tick: an emergency
    // collection, which evicts hello though it is leased.
    loop {
        let gc = common::status_json(&c, &s).await["limits"]["last_gc"].clone();
        if gc["emergency"] == true && !hello_config.exists() {
            break;
        }
        assert!(
            filled.elapsed() < std::time::Duration::from_secs(90),
            "no emergency collection evicted hello; last collection: {gc}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn an_image_whose_build_crosses_the_floor_is_served_whole_before_it_goes() {
    let fs = Tmpfs::mount("200m");
    let root = fs.0.clone();
    let c = Client::new();
    // Leases far longer than the test: below the floor they do not hold.
    let limits = ["--min-free-space", "100M", "--gc-lease", "3600"];
    let s = TestServer::start(&config(&root, &limits)).await;
    s.builder.collector().collect().await.unwrap();

    // Just above the floor, with nothing stored: the build of hello takes
    // the disk below it by itself, and hello is the one image to evict.
    let free = nixery::store::disk::free_bytes(&root).unwrap();
    write_filler(&root.join("filler"), free - (100 << 20) - (256 << 10));
    // Emergency collections back to back while the client waits for the
    // build (the server runs them soon after a build, and 10 s apart
    // while something holds it back): whenever they run, the image just
    // built must reach its client.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = std::sync::Arc::clone(s.builder.collector());
    let stopped = std::sync::Arc::clone(&stop);
    let collections = tokio::spawn(async move {
        let mut emergencies = 0;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            if collector.collect().await.is_ok_and(|r| r.emergency) {
                emergencies += 1;
            }
            tokio::task::yield_now().await;
        }
        emergencies
    });

    let r = c
        .get(s.url("/v2/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the build succeeded: {}",
        String::from_utf8_lossy(&body)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // Its client fetches the blobs next, all at once as docker does.
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let mut wanted = common::layer_digests(&manifest);
    wanted.push(config_digest.clone());
    futures::future::join_all(wanted.iter().map(|d| get_blob(&c, &s, d))).await;

    // Then the floor holds: hello goes, its delivery over.
    let served = std::time::Instant::now();
    while blob_path(&root, &config_digest).exists() {
        assert!(
            served.elapsed() < std::time::Duration::from_secs(120),
            "hello is still stored; last collection: {}",
            common::status_json(&c, &s).await["limits"]["last_gc"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        collections.await.unwrap() > 0,
        "no emergency collection ran"
    );
    assert_blobs_whole(&root);
    s.stop().await;
}
