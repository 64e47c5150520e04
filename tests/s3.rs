//! Several replicas on one S3 bucket (a real SeaweedFS): shared images,
//! one build per image, no partial objects, redirects and outages.

mod common;

use common::seaweed::{assert_all_blobs_whole, Seaweed};
use common::{config, error_code, get_blob, get_manifest, layer_digests, require_tool, TestServer};
use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A replica (in this process) on `bucket`, with its own empty disk.
async fn replica(weed: &Seaweed, bucket: &str, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = weed.flags(bucket);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&config(dir.path(), &flags)).await;
    (dir, server)
}

fn builds(s: &TestServer) -> usize {
    s.builder.db().builds().unwrap().len()
}

/// Runs docker off the runtime's threads: the servers it talks to are on them.
async fn docker(args: &[&str]) -> String {
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new("docker").args(owned).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replica_serves_what_the_first_built() {
    require_tool("docker");
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "shared", &[]).await;
    let (b_dir, b) = replica(&weed, "shared", &[]).await;
    let client = Client::new();

    let (built, manifest) = get_manifest(&client, &a, "shell/hello", "latest").await;
    assert_eq!(builds(&a), 1);
    // B has an empty disk and builds nothing: the bucket has it all.
    let (served, _) = get_manifest(&client, &b, "shell/hello", "latest").await;
    assert_eq!(served, built);
    assert_eq!(builds(&b), 0, "replica B built the image again");
    for layer in layer_digests(&manifest) {
        get_blob(&client, &b, &layer).await;
    }
    // Pulls by digest work at B too.
    let r = client
        .get(b.url(&format!("/v2/shell/hello/manifests/{built}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // An OCI form made at A answers by its digest at B.
    let r = client
        .get(a.url("/v2/shell/hello/manifests/latest"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let oci = common::header(&r, "docker-content-digest").to_owned();
    assert_ne!(oci, built.to_string());
    let r = client
        .get(b.url(&format!("/v2/shell/hello/manifests/{oci}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(Digest::of(&r.bytes().await.unwrap()).to_string(), oci);
    assert!(!b_dir
        .path()
        .join("blobs/sha256")
        .read_dir()
        .unwrap()
        .any(|_| true));

    let image = format!("localhost:{}/shell/hello", b.addr.port());
    docker(&["pull", &image]).await;
    let out = docker(&["run", "--rm", "--network", "none", &image, "hello"]).await;
    assert_eq!(out.trim(), "Hello, world!");
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    assert_eq!(builds(&b), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_replica_serves_an_existing_image_at_once() {
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "fresh", &[]).await;
    let client = Client::new();
    let (built, manifest) = get_manifest(&client, &a, "hello", "latest").await;
    a.stop().await;

    let (_c_dir, c) = replica(&weed, "fresh", &[]).await;
    let started = Instant::now();
    let (served, _) = get_manifest(&client, &c, "hello", "latest").await;
    println!("fresh replica answered in {:?}", started.elapsed());
    assert_eq!(served, built);
    assert_eq!(builds(&c), 0);
    get_blob(&client, &c, manifest["config"]["digest"].as_str().unwrap()).await;

    // The admin page says where content lives, and nothing secret.
    let page = common::admin_page(&client, &c).await;
    assert!(
        page.contains("s3://fresh/nixery at http://127.0.0.1:"),
        "{page}"
    );
    assert!(!page.contains(common::seaweed::SECRET_KEY));
    assert!(!page.contains(common::seaweed::ACCESS_KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_cold_pulls_build_once() {
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "race", &[]).await;
    let (_b_dir, b) = replica(&weed, "race", &[]).await;
    let client = Client::new();
    let ((da, ma), (db, _)) = tokio::join!(
        get_manifest(&client, &a, "shell/hello", "latest"),
        get_manifest(&client, &b, "shell/hello", "latest"),
    );
    assert_eq!(da, db, "both replicas serve one digest");
    assert_eq!(builds(&a) + builds(&b), 1, "built once between the two");
    for layer in layer_digests(&ma) {
        get_blob(&client, &a, &layer).await;
        get_blob(&client, &b, &layer).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = assert_all_blobs_whole(&weed.client("race", dir.path())).await;
    assert!(n >= 3, "the bucket holds the image's blobs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_upload_leaves_no_partial_object() {
    let weed = Seaweed::start().await;
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .args(weed.flags("killed"))
        .env("PORT", "0")
        .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
        .env("NIXERY_PKGS_PATH", common::fixture_dir())
        .env("STORAGE_PATH", a_dir.path())
        .env("NIXERY_NIX_OPTIONS", "substituters=")
        .env("NIX_TIMEOUT", "300")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nixery starts");
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    // Ask for the image with a >100 MB layer, and kill A once it uploads.
    let url = format!("http://127.0.0.1:{port}/v2/big/manifests/latest");
    let pull = tokio::spawn(async move { reqwest::get(url).await });
    let stderr = a.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("uploading a blob in parts") {
                let _ = tx.send(());
            }
        }
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(1200)))
        .await
        .unwrap()
        .expect("A starts a multipart upload");
    a.kill().unwrap();
    a.wait().unwrap();
    assert!(pull.await.unwrap().is_err(), "A's answer was cut off");

    let dir = tempfile::tempdir().unwrap();
    let bucket = weed.client("killed", dir.path());
    assert_all_blobs_whole(&bucket).await;

    // B builds once A's lease expired, and serves the whole image.
    let (_b_dir, b) = replica(&weed, "killed", &[]).await;
    let client = Client::new();
    let (_, manifest) = get_manifest(&client, &b, "big", "latest").await;
    assert_eq!(builds(&b), 1);
    for layer in layer_digests(&manifest) {
        get_blob(&client, &b, &layer).await;
    }
    assert_all_blobs_whole(&bucket).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_to_presigned_urls_that_docker_follows() {
    require_tool("docker");
    let weed = Seaweed::start().await;
    let (_dir, s) = replica(&weed, "redirect", &["--s3-redirect"]).await;
    let (_b_dir, b) = replica(&weed, "redirect", &["--s3-redirect"]).await;
    let client = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (_, manifest) = get_manifest(&client, &s, "shell/hello", "latest").await;
    // B has none of the blobs on disk: it redirects to the bucket.
    let layer = layer_digests(&manifest)[0].clone();
    let r = client
        .get(b.url(&format!("/v2/shell/hello/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = common::header(&r, "location").to_owned();
    assert!(location.starts_with(&weed.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(Digest::of(&body).to_string(), layer);

    let image = format!("localhost:{}/shell/hello", b.addr.port());
    docker(&["pull", &image]).await;
    let out = docker(&["run", "--rm", "--network", "none", &image, "hello"]).await;
    assert_eq!(out.trim(), "Hello, world!");
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_bucket_is_a_clear_503_until_it_returns() {
    let mut weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "outage", &[]).await;
    let (_b_dir, b) = replica(&weed, "outage", &[]).await;
    let client = Client::new();
    let (_, manifest) = get_manifest(&client, &a, "hello", "latest").await;
    get_manifest(&client, &b, "hello", "latest").await;
    let layer = layer_digests(&manifest)[0].clone();

    weed.stop();
    let started = Instant::now();
    let r = client
        .get(b.url(&format!("/v2/hello/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    let (status, error) = error_code(r).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["code"], "UNAVAILABLE");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("object storage"),
        "{error}"
    );
    println!("503 after {:?}", started.elapsed());

    weed.restart().await;
    get_blob(&client, &b, &layer).await;
}

/// Takes the lease `name` in the bucket for a minute, as a replica would.
async fn take_lease(bucket: &dyn nixery::store::Storage, name: &str) -> nixery::store::Lease {
    match bucket
        .try_lease(name, Duration::from_secs(60))
        .await
        .unwrap()
    {
        nixery::store::LeaseState::Acquired(l) => l,
        held => panic!("{held:?}"),
    }
}

/// `nixery ARGS...` with the s3 flags for `bucket`, as an operator runs
/// it next to the replicas: with no disk of its own (`verify`, `gc`), or
/// with `storage` and the fixture set (`export`, `import`). The exit
/// status and what it printed.
fn nixery_on(
    weed: &Seaweed,
    bucket: &str,
    storage: Option<&std::path::Path>,
    args: &[&str],
) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.args(args).args(weed.flags(bucket));
    match storage {
        Some(dir) => cmd
            .env("STORAGE_PATH", dir)
            .env("NIXERY_PKGS_PATH", common::fixture_dir())
            .env("NIXERY_NIX_OPTIONS", "substituters="),
        None => cmd.env_remove("STORAGE_PATH"),
    };
    let out = cmd.output().expect("nixery runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn upkeep(weed: &Seaweed, bucket: &str, args: &[&str]) -> (i32, String) {
    nixery_on(weed, bucket, None, args)
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_and_gc_work_on_the_bucket_while_replicas_serve() {
    use nixery::store::Storage;
    use object_store::ObjectStore;
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "upkeep", &[]).await;
    let client = Client::new();
    let (hello, hello_manifest) = get_manifest(&client, &a, "hello", "latest").await;
    let (shell, _) = get_manifest(&client, &a, "shell/hello", "latest").await;
    // The bills of materials are written after the builds, in the
    // background: verify looks once they are there.
    a.builder.finish_background().await;

    let (code, out) = upkeep(&weed, "upkeep", &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 corrupt blobs, 0 broken manifests, 0 stale records"),
        "{out}"
    );

    // An unreferenced blob is kept while young, and while a build runs.
    let dir = tempfile::tempdir().unwrap();
    let bucket = weed.client("upkeep", dir.path());
    let orphan_file = dir.path().join("orphan");
    std::fs::write(&orphan_file, b"left by a build that died").unwrap();
    let orphan = Digest::of(b"left by a build that died");
    bucket.put_file(&orphan_file, &orphan).await.unwrap();
    let (code, out) = upkeep(&weed, "upkeep", &["gc"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted 0 blobs"), "{out}");
    let lease = take_lease(&bucket, "build-someone").await;
    let (code, out) = upkeep(&weed, "upkeep", &["gc", "--gc-keep-recent", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted 0 blobs"), "{out}");
    assert!(bucket.stat(&orphan).await.unwrap().is_some());
    bucket.release(&lease).await.unwrap();
    // One collection at a time; the second says so and exits 75.
    let gc_lease = take_lease(&bucket, "gc").await;
    let (code, out) = upkeep(&weed, "upkeep", &["gc", "--gc-keep-recent", "0"]);
    assert_eq!(code, 75, "{out}");
    assert!(out.contains("another collection is running"), "{out}");
    bucket.release(&gc_lease).await.unwrap();
    let (code, out) = upkeep(&weed, "upkeep", &["gc", "--gc-keep-recent", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted 1 blobs"), "{out}");
    assert!(bucket.stat(&orphan).await.unwrap().is_none());

    // A damaged layer is found, and the repair makes replicas rebuild.
    // The top layer (the image's own symlinks) is in no other image.
    let layer: Digest = layer_digests(&hello_manifest)
        .last()
        .unwrap()
        .parse()
        .unwrap();
    let raw = weed.raw("upkeep");
    let key = object_store::path::Path::from(format!("nixery/blobs/sha256/{}", layer.hex()));
    let mut bytes = raw.get(&key).await.unwrap().bytes().await.unwrap().to_vec();
    bytes[100] ^= 1;
    raw.put(&key, bytes.into()).await.unwrap();
    let (code, out) = upkeep(&weed, "upkeep", &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("corrupt blob {layer}")), "{out}");
    assert!(out.contains(&format!("broken manifest {hello}")), "{out}");
    assert_eq!(out.matches("broken manifest sha256:").count(), 1, "{out}");
    assert!(out.contains("stale record layers/"), "{out}");
    let (code, out) = upkeep(&weed, "upkeep", &["verify", "--repair"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = upkeep(&weed, "upkeep", &["verify"]);
    assert_eq!(code, 0, "{out}");
    let (_b_dir, b) = replica(&weed, "upkeep", &[]).await;
    let (rebuilt, manifest) = get_manifest(&client, &b, "hello", "latest").await;
    assert_eq!(rebuilt, hello, "the rebuild has the same digest");
    assert_eq!(builds(&b), 1, "B rebuilt the repaired image");
    for layer in layer_digests(&manifest) {
        get_blob(&client, &b, &layer).await;
    }

    // Over quota, the oldest builds are evicted; a replica builds them again.
    let (code, out) = upkeep(
        &weed,
        "upkeep",
        &["gc", "--max-storage", "1", "--gc-keep-recent", "0"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("evicted cached build").count(), 2, "{out}");
    assert_eq!(bucket.list().await.unwrap(), vec![], "{out}");
    let (_c_dir, c) = replica(&weed, "upkeep", &[]).await;
    let (again, _) = get_manifest(&client, &c, "shell/hello", "latest").await;
    assert_eq!(again, shell);
    assert_eq!(builds(&c), 1);
    assert_all_blobs_whole(&bucket).await;
    let (code, out) = upkeep(&weed, "upkeep", &["verify"]);
    assert_eq!(code, 0, "{out}");
}

/// Waits (up to 60 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_a_limit_caches_proxied_blobs_within_it() {
    let mut weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "cache", &[]).await;
    let (_b_dir, b) = replica(&weed, "cache", &["--max-storage", "1G"]).await;
    let (_c_dir, c) = replica(&weed, "cache", &["--max-storage", "1", "--gc-lease", "0"]).await;
    let client = Client::new();
    let (_, manifest) = get_manifest(&client, &a, "shell/hello", "latest").await;
    let layers = layer_digests(&manifest);
    assert!(layers.len() > 1);

    // Proxied from the bucket the first time, copied to B's disk after.
    get_manifest(&client, &b, "shell/hello", "latest").await;
    for layer in &layers {
        get_blob(&client, &b, layer).await;
    }
    let digests: Vec<Digest> = layers.iter().map(|l| l.parse().unwrap()).collect();
    eventually("B has every layer on disk", || {
        digests.iter().all(|d| b.builder.blobs().contains(d))
    })
    .await;

    // C's limit is one byte: what it copies is collected again. A copy
    // that failed (the bucket is shared with other tests' load) is tried
    // again on the next pull, as a client's would be.
    get_manifest(&client, &c, "shell/hello", "latest").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let report = c.builder.collector().last_report();
        if report.as_ref().is_some_and(|r| r.blobs_deleted > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C never collected what it copied: last report {report:?}, on disk {:?}",
            c.builder.blobs().stats()
        );
        for layer in &layers {
            get_blob(&client, &c, layer).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually("C's disk is back within its limit", || {
        c.builder.blobs().stats().1 <= 1
    })
    .await;

    // B serves the layers from its disk with the bucket gone.
    weed.stop();
    for layer in &layers {
        get_blob(&client, &b, layer).await;
    }
    let r = client
        .get(c.url(&format!("/v2/x/blobs/{}", layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// As [`nixery_on`] with a disk, which must succeed.
fn offline(weed: &Seaweed, bucket: &str, storage: &std::path::Path, args: &[&str]) -> String {
    let (code, out) = nixery_on(weed, bucket, Some(storage), args);
    assert_eq!(code, 0, "nixery {args:?}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn images_export_from_one_bucket_and_import_into_another_that_keeps_them() {
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "outside", &[]).await;
    let client = Client::new();
    let (built, _) = get_manifest(&client, &a, "hello", "latest").await;

    // Exported by a tool with an empty disk: the blobs come from the bucket.
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let layout_arg = layout.to_str().unwrap();
    let out = offline(
        &weed,
        "outside",
        &work.path().join("exporter"),
        &["export", "--output", layout_arg, "hello"],
    );
    assert!(out.contains("exported 1 images"), "{out}");

    let out = offline(
        &weed,
        "inside",
        &work.path().join("importer"),
        &["import", layout_arg],
    );
    assert!(out.contains("published"), "{out}");
    assert!(out.contains(&format!("hello:latest {built}")), "{out}");
    // Another replica of the inside bucket serves it by digest at once.
    let (_b_dir, b) = replica(&weed, "inside", &[]).await;
    let r = client
        .get(b.url(&format!("/v2/hello/manifests/{built}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(builds(&b), 0);

    // The bucket's collector keeps an imported image whatever the quota.
    let (code, out) = upkeep(
        &weed,
        "inside",
        &["gc", "--max-storage", "1", "--gc-keep-recent", "0"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("evicted"), "{out}");
    let (code, out) = upkeep(&weed, "inside", &["verify"]);
    assert_eq!(code, 0, "{out}");
    // The image, its OCI form and the four artifact manifests of its bills
    // of materials (two documents for each form), all kept by the gc.
    assert!(out.contains("and 6 manifests"), "{out}");
    assert!(out.contains("0 stale records"), "{out}");
    let (_c_dir, c) = replica(&weed, "inside", &[]).await;
    let r = client
        .get(c.url(&format!("/v2/hello/manifests/{built}")))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let manifest: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    for layer in layer_digests(&manifest) {
        get_blob(&client, &c, &layer).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bucket_evicts_the_image_least_recently_pulled_anywhere() {
    use nixery::store::{RecordKind, Storage};
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "pulls", &[]).await;
    let client = Client::new();
    let (hello, _) = get_manifest(&client, &a, "hello", "latest").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (shell, _) = get_manifest(&client, &a, "shell/hello", "latest").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Built first, but pulled last (at another replica): kept.
    let dir = tempfile::tempdir().unwrap();
    let bucket = weed.client("pulls", dir.path());
    let hello_hex = hello.hex();
    let note = || bucket.get_record(RecordKind::Pulled, &hello_hex);
    let before = note().await.unwrap();
    assert!(before.is_some(), "A noted its pull of hello");
    let (_b_dir, b) = replica(&weed, "pulls", &[]).await;
    get_manifest(&client, &b, "hello", "latest").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while note().await.unwrap() == before {
        assert!(Instant::now() < deadline, "B never noted its pull");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let total: u64 = bucket.list().await.unwrap().iter().map(|(_, n)| n).sum();
    let quota = (total - 1).to_string();
    let (code, out) = upkeep(
        &weed,
        "pulls",
        &["gc", "--max-storage", &quota, "--gc-keep-recent", "0"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("evicted cached build").count(), 1, "{out}");
    assert!(out.contains(&shell.to_string()), "{out}");
    assert!(bucket.stat(&hello).await.unwrap().is_some(), "{out}");
    assert!(bucket.stat(&shell).await.unwrap().is_none(), "{out}");
}

/// Replicas write while `verify` runs: an image built (with its bills of
/// materials and their referrers record) after verify listed the bucket's
/// blobs is whole, not a stale record or a broken manifest.
#[tokio::test(flavor = "multi_thread")]
async fn verify_is_not_fooled_by_what_is_written_while_it_runs() {
    let weed = Seaweed::start().await;
    let (_a_dir, a) = replica(&weed, "during", &[]).await;
    let client = Client::new();
    get_manifest(&client, &a, "hello", "latest").await;
    a.builder.finish_background().await;

    let bucket = nixery::store::s3::Bucket::open(weed.settings("during")).unwrap();
    let mut built = false;
    let findings = nixery::store::s3::check::check(&bucket, |_, _| {
        if std::mem::replace(&mut built, true) {
            return;
        }
        // The blobs are listed; the records are read after this.
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                get_manifest(&client, &a, "bash", "latest").await;
                a.builder.finish_background().await;
            })
        });
    })
    .await
    .unwrap();
    assert!(built);
    assert!(
        findings.stale_records.is_empty(),
        "{:?}",
        findings.stale_records
    );
    assert!(findings.broken.is_empty(), "{:?}", findings.broken);
    let referrers = a
        .builder
        .db()
        .all_referrers()
        .unwrap()
        .into_iter()
        .filter(|(_, r)| !r.referrers.is_empty())
        .count();
    assert!(referrers >= 2, "bash's bills of materials were written");
}
