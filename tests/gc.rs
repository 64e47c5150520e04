//! Garbage collection with a quota, against a real server: the least
//! recently pulled image goes, the others stay cached, the evicted one is
//! rebuilt on its next pull, and a blob download in flight during a
//! collection completes intact; an evicted name without a page leaves the
//! image list with its pulls.

mod common;

use common::{config, get_blob, get_manifest, next_gc, TestServer};
use nixery::digest::Digest;
use nixery::store::db::{BuildOutcome, BuildRecord};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::time::Duration;

fn evicted_names(gc: &Value) -> Vec<String> {
    gc["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["image"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn builds_of(s: &TestServer, image: &str) -> usize {
    let builds = s.builder.db().builds().unwrap();
    builds.iter().filter(|b| b.image == image).count()
}

/// Stops `s` and starts it again (no bills of materials) with a quota a
/// byte below the blobs it stores and no lease; the new server, the report
/// of its collection at start, and the bytes stored before.
async fn restart_a_byte_over_the_quota(
    c: &Client,
    dir: &std::path::Path,
    s: TestServer,
) -> (TestServer, Value, u64) {
    let total = s.builder.blobs().stats().1;
    s.stop().await;
    let quota = (total - 1).to_string();
    let limits = [
        "--max-storage",
        quota.as_str(),
        "--gc-lease",
        "0",
        "--no-sbom",
    ];
    let s = TestServer::start(&config(dir, &limits)).await;
    let gc = next_gc(c, &s, &Value::Null).await;
    (s, gc, total)
}

#[tokio::test]
async fn a_quota_evicts_the_least_recently_pulled_image() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new();
    // Three images, pulled a second apart (pull times have 1 s resolution).
    // Exact quota arithmetic: no bills of materials made after the builds
    // (tests/sbom.rs collects those).
    let s = TestServer::start(&config(dir.path(), &["--no-sbom"])).await;
    let mut manifests = Vec::new();
    for name in ["hello", "big", "bash"] {
        manifests.push(get_manifest(&c, &s, name, "latest").await);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A quota just below the three: evicting the oldest is enough.
    let (s, gc, total) = restart_a_byte_over_the_quota(&c, dir.path(), s).await;
    assert_eq!(evicted_names(&gc), vec!["hello"], "{gc}");
    assert!(gc["bytes_freed"].as_u64().unwrap() > 0);
    assert!(s.builder.blobs().stats().1 < total);
    let page = common::admin_page(&c, &s).await;
    assert!(
        page.contains("Last garbage collection"),
        "the page shows it"
    );

    // The others are served from cache, the evicted one is built again.
    for (i, name) in ["big", "bash"].into_iter().enumerate() {
        let (d, _) = get_manifest(&c, &s, name, "latest").await;
        assert_eq!(d, manifests[i + 1].0, "{name} kept");
        assert_eq!(builds_of(&s, name), 1, "{name} not rebuilt");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    // The image pages give the eviction order: big was pulled first.
    for (name, rank) in [("big", 1), ("bash", 2)] {
        let r = c
            .get(s.url(&format!("/api/images/{name}")))
            .send()
            .await
            .unwrap();
        let image: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(image["eviction"]["state"], "in_line", "{name}: {image}");
        assert_eq!(image["eviction"]["rank"], rank, "{name}");
    }
    let page = c
        .get(s.url("/images/big"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("next to evict"), "{page}");
    // The history's latest sample has the storage the collection left.
    let r = c.get(s.url("/api/history")).send().await.unwrap();
    let history: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let latest = history["minutes"]["points"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(latest["storage_used"].as_u64().unwrap() < total, "{latest}");
    assert_eq!(latest["max_storage"].as_u64(), Some(total - 1));

    // Stream big's largest layer slowly while a collection evicts big.
    let (big_manifest, big_json) = &manifests[1];
    let layer = common::largest_layer(big_json);
    let download = common::start_download(&c, &s, "big", &layer).await;

    // Pulling hello again rebuilds it, which goes over the quota: the least
    // recently pulled now is big.
    get_manifest(&c, &s, "hello", "latest").await;
    assert_eq!(builds_of(&s, "hello"), 2, "hello rebuilt");
    let gc = next_gc(&c, &s, &gc).await;
    assert_eq!(evicted_names(&gc), vec!["big"], "{gc}");
    assert!(gc["blobs_in_use"].as_u64().unwrap() >= 1, "{gc}");

    common::finish_download(download, &layer).await;
    let r = c
        .get(s.url(&format!("/v2/big/manifests/{big_manifest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "big's manifest was evicted"
    );
    // bash is still whole.
    let (_, bash) = get_manifest(&c, &s, "bash", "latest").await;
    for l in bash["layers"].as_array().unwrap() {
        get_blob(&c, &s, l["digest"].as_str().unwrap()).await;
    }
    s.stop().await;
}

#[test]
fn gc_subcommand_reports_and_collects() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let total = rt.block_on(async {
        let s = TestServer::start(&config(dir.path(), &[])).await;
        let c = Client::new();
        get_manifest(&c, &s, "hello", "latest").await;
        // Counted after the stop, which waits for the bills of materials
        // made after the build.
        let builder = std::sync::Arc::clone(&s.builder);
        s.stop().await;
        let total = builder.blobs().stats().1;
        drop(builder);
        total
    });
    let nixery = env!("CARGO_BIN_EXE_nixery");
    let storage = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(nixery)
            .args([
                "gc",
                "--storage-path",
                storage,
                "--max-storage",
                "1",
                "--gc-lease",
                "0",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = run(&["--dry-run"]);
    assert!(dry.contains("would evict hello"), "{dry}");
    assert!(
        dry.contains(&format!("{total} bytes of blobs before")),
        "{dry}"
    );
    let blobs_dir = dir.path().join("blobs/sha256");
    let count = || walk_count(&blobs_dir);
    assert!(count() > 0, "a dry run deletes nothing");
    let real = run(&[]);
    assert!(real.contains("evicted hello"), "{real}");
    assert_eq!(count(), 0, "{real}");
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|shard| std::fs::read_dir(shard.path()).map_or(0, |e| e.count()))
        .sum()
}

/// Bytes of the blobs an image needs: its manifest, config and layers.
fn image_bytes(s: &TestServer, manifest: &Digest, json: &Value) -> u64 {
    let blobs = s.builder.blobs();
    let mut digests = common::layer_digests(json);
    digests.push(json["config"]["digest"].as_str().unwrap().to_owned());
    digests.push(manifest.to_string());
    digests
        .iter()
        .map(|d| {
            let d: Digest = d.parse().unwrap();
            blobs.stat_blob(&d).unwrap().unwrap_or(0)
        })
        .sum()
}

#[tokio::test]
async fn a_burst_over_the_quota_is_within_it_soon_after_the_leases_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new();
    let names = ["hello", "big", "bash"];
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let mut largest = 0;
    let mut images = Vec::new();
    for name in names {
        let (d, json) = get_manifest(&c, &s, name, "latest").await;
        largest = largest.max(image_bytes(&s, &d, &json));
        images.push(json);
    }
    s.stop().await;

    // A quota the largest image fits, but no two: a burst of pulls of all
    // three goes over it, and their leases keep them for 3 s.
    let quota = largest.to_string();
    let limits = ["--max-storage", quota.as_str(), "--gc-lease", "3"];
    let s = TestServer::start(&config(dir.path(), &limits)).await;
    next_gc(&c, &s, &Value::Null).await;
    // big first, so that it is the least recently pulled (pull times have
    // 1 s resolution), then the others (rebuilt if the collection at start
    // evicted them). A slow client of big: one chunk of its largest
    // layer, then a pause while collections run; it holds the layer from
    // before big's lease can end, however slow the rebuilds.
    get_manifest(&c, &s, "big", "latest").await;
    let layer = common::largest_layer(&images[1]);
    let download = common::start_download(&c, &s, "big", &layer).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    get_manifest(&c, &s, "hello", "latest").await;
    get_manifest(&c, &s, "bash", "latest").await;
    let started = std::time::Instant::now();
    // The leases end after 3 s and the collection comes back by itself
    // (its timer is 5 minutes): bounded generously for a loaded machine.
    // What is stored tells, whichever reports were seen.
    let config_of =
        |json: &Value| common::blob_path(dir.path(), json["config"]["digest"].as_str().unwrap());
    while config_of(&images[1]).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "big is not evicted; last collection: {}",
            common::status_json(&c, &s).await["limits"]["last_gc"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only big, the least recently pulled; its layer is in flight.
    assert!(config_of(&images[0]).exists(), "hello was evicted");
    assert!(config_of(&images[2]).exists(), "bash was evicted");
    assert!(common::blob_path(dir.path(), &layer).exists(), "in flight");

    // The slow download completes whole.
    common::finish_download(download, &layer).await;
    // Then the store is within the quota, without a pull or a restart.
    let stored = |s: &TestServer| s.builder.blobs().stats().1;
    while stored(&s) > largest {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "still {} bytes, over a quota of {largest}",
            stored(&s)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let evicted = ["big"];
    // Evicted images are built again on their next pull.
    for name in &evicted {
        let before = builds_of(&s, name);
        get_manifest(&c, &s, name, "latest").await;
        assert_eq!(builds_of(&s, name), before + 1, "{name} rebuilt");
    }
    s.stop().await;
}

/// The names on `/` (`/api/status`) with their pulls, and the most pulled.
async fn listed(c: &Client, s: &TestServer) -> (Vec<(String, u64)>, Vec<String>) {
    let status = common::status_json(c, s).await;
    let names = status["images"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["pulls"].as_u64().unwrap(),
            )
        })
        .collect();
    let most_pulled = status["cache"]["most_pulled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    (names, most_pulled)
}

async fn tag_list(c: &Client, s: &TestServer, name: &str) -> Value {
    let r = c
        .get(s.url(&format!("/v2/{name}/tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{name}");
    serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap()["tags"].clone()
}

#[tokio::test]
async fn an_evicted_name_leaves_the_image_list_with_its_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new();
    let s = TestServer::start(&config(dir.path(), &["--no-sbom"])).await;
    // hello is built for its tag v1 (a path source builds every tag
    // alike), and pulled first: the least recently pulled.
    get_manifest(&c, &s, "hello", "v1").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    get_manifest(&c, &s, "bash", "latest").await;
    let (names, _) = listed(&c, &s).await;
    assert_eq!(names, [("bash".into(), 1), ("hello".into(), 1)]);
    assert_eq!(
        tag_list(&c, &s, "hello").await,
        serde_json::json!(["latest", "v1"])
    );
    // A hundred builds of other names since (failed: no image, no place on
    // `/`), so that hello's build is no longer among the recent ones.
    for i in 0..100 {
        let build = BuildRecord {
            image: format!("other-{i}"),
            tag: "latest".into(),
            started_at: 1,
            phases: vec![],
            layers_total: 0,
            layers_reused: 0,
            bytes_packed: 0,
            outcome: BuildOutcome::PackagesNotFound(vec!["other".into()]),
            revision: None,
            nix_processes: 1,
            evaluated: 1,
        };
        s.builder.db().add_build(&build).unwrap();
    }
    // A quota just below the two: the collection at start evicts hello.
    let (s, gc, _) = restart_a_byte_over_the_quota(&c, dir.path(), s).await;
    assert_eq!(evicted_names(&gc), vec!["hello"], "{gc}");
    // hello has no page, is not listed, and its pulls are forgotten; bash
    // stays with its count.
    let (names, most_pulled) = listed(&c, &s).await;
    assert_eq!(names, [("bash".into(), 1)]);
    assert_eq!(most_pulled, ["bash"]);
    let page = c.get(s.url("/api/images/hello")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
    // Any name is built on demand: its tag list says what a pull by tag
    // gets without naming one, and nothing of what was evicted.
    assert_eq!(
        tag_list(&c, &s, "hello").await,
        serde_json::json!(["latest"])
    );
    assert_eq!(
        tag_list(&c, &s, "bash").await,
        serde_json::json!(["latest"])
    );

    // Pulled again, hello is built again and listed anew.
    get_manifest(&c, &s, "hello", "latest").await;
    // (The first build is no longer among the recent ones.)
    assert_eq!(builds_of(&s, "hello"), 1, "hello rebuilt");
    let (names, _) = listed(&c, &s).await;
    assert!(names.contains(&("hello".into(), 1)), "{names:?}");
    s.stop().await;
}
