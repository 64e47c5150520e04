//! The evaluation cache against real Nix: a git repository of the fixture
//! set (whose `stamp` package holds a text unique to the test), pulled by
//! commit.

mod common;

use common::{
    commit_version, config_with_source, get_manifest, git, package_set, require_tool, TestServer,
};
use nixery::store::db::BuildRecord;
use reqwest::Client;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// The newest build record.
fn last_build(s: &TestServer) -> BuildRecord {
    s.builder.db().builds().unwrap().remove(0)
}

/// A repository with one commit of the package set whose stamp says
/// `version`; the commit.
fn repository(repo: &Path, version: &str) -> String {
    require_tool("git");
    package_set(repo, version);
    git(repo, &["init", "-q", "-b", "main"]);
    commit_version(repo, version)
}

/// A stamp text no other test builds, so that its store path is this
/// test's alone (and can be deleted).
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

fn layers(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// (Nix processes, names evaluated) of the newest build.
fn counted(s: &TestServer) -> (u32, u32) {
    let b = last_build(s);
    (b.nix_processes, b.evaluated)
}

/// The store path of the stamp in the newest image built.
async fn stamp_path(s: &TestServer, tag: &str, name: &str) -> String {
    let record = s
        .builder
        .cached_record(name, tag, nixery::build::image::Arch::host().unwrap())
        .await
        .unwrap()
        .unwrap();
    record
        .out_paths
        .into_iter()
        .find(|p| p.ends_with("-stamp"))
        .unwrap()
}

#[tokio::test]
async fn known_names_are_not_evaluated_and_images_are_the_same() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let one = repository(&repo, &unique("cache"));
    let url = format!("file://{}", repo.display());
    let cfg = |dir: &str| config_with_source(&work.path().join(dir), &["--pkgs-repo", &url], &[]);
    let c = Client::new();
    let s = TestServer::start(&cfg("cached")).await;

    // cacert and iana-etc are in every image.
    get_manifest(&c, &s, "hello/stamp", &one).await;
    assert_eq!(counted(&s), (2, 4), "evaluate; realise and closure");
    // One name new: only it is evaluated.
    get_manifest(&c, &s, "busybox/stamp", &one).await;
    assert_eq!(counted(&s).1, 1);
    // All known: no evaluation at all.
    let (_, cached) = get_manifest(&c, &s, "busybox/hello", &one).await;
    assert_eq!(counted(&s), (1, 0), "realise and closure only");
    // A moving tag that resolves to the same commit: still known.
    get_manifest(&c, &s, "hello", "main").await;
    assert_eq!(counted(&s), (1, 0));

    // A new commit: the same names are evaluated again.
    let two_text = unique("two");
    let two = commit_version(&repo, &two_text);
    get_manifest(&c, &s, "stamp", &two).await;
    assert_eq!(counted(&s), (2, 3));
    assert_ne!(
        stamp_path(&s, &two, "stamp").await,
        stamp_path(&s, &one, "hello/stamp").await
    );
    s.stop().await;

    // Built without any cache, the same image has the same layers.
    let fresh = TestServer::start(&cfg("fresh")).await;
    let (_, uncached) = get_manifest(&c, &fresh, "busybox/hello", &one).await;
    assert_eq!(counted(&fresh).1, 4);
    assert_eq!(layers(&uncached), layers(&cached));
    assert_eq!(uncached["config"], cached["config"]);
    fresh.stop().await;
}

#[tokio::test]
async fn a_collected_output_is_built_again_from_its_known_derivation() {
    require_tool("nix-store");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let one = repository(&repo, &unique("gc"));
    let url = format!("file://{}", repo.display());
    let cfg = config_with_source(&work.path().join("storage"), &["--pkgs-repo", &url], &[]);
    let c = Client::new();
    let s = TestServer::start(&cfg).await;

    get_manifest(&c, &s, "stamp", &one).await;
    let stamp = stamp_path(&s, &one, "stamp").await;
    let deleted = Command::new("nix-store")
        .args(["--delete", &stamp])
        .output()
        .unwrap();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert!(!Path::new(&stamp).exists());

    // Known, but no longer built: realised again, not evaluated.
    get_manifest(&c, &s, "hello/stamp", &one).await;
    assert_eq!(counted(&s).1, 1, "only hello is new");
    assert!(Path::new(&stamp).exists());
    let deleted = Command::new("nix-store")
        .args(["--delete", &stamp])
        .output()
        .unwrap();
    assert!(deleted.status.success());
    get_manifest(&c, &s, "bash/stamp", &one).await;
    assert!(Path::new(&stamp).exists());
    let b = last_build(&s);
    assert!(matches!(
        b.outcome,
        nixery::store::db::BuildOutcome::Success { .. }
    ));
    s.stop().await;
}

#[tokio::test]
async fn a_damaged_record_is_a_miss() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let one = repository(&repo, &unique("damaged"));
    let url = format!("file://{}", repo.display());
    let storage = work.path().join("storage");
    let cfg = config_with_source(&storage, &["--pkgs-repo", &url], &[]);
    let c = Client::new();

    let s = TestServer::start(&cfg).await;
    let (_, before) = get_manifest(&c, &s, "hello/stamp", &one).await;
    s.stop().await;

    // Every evaluation record damaged, as a torn write or a bad disk would.
    {
        // The stopped server's last blocking tasks may still hold it.
        let mut tries = 0;
        let raw = loop {
            match sled::open(storage.join("db")) {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let tree = raw.open_tree("evaluations").unwrap();
        let keys: Vec<_> = tree.iter().keys().map(Result::unwrap).collect();
        assert_eq!(keys.len(), 4);
        for key in keys {
            tree.insert(key, &[1u8, 0xff, 0xff, 0xff][..]).unwrap();
        }
        raw.flush().unwrap();
    }

    let s = TestServer::start(&cfg).await;
    let (_, after) = get_manifest(&c, &s, "stamp/hello/busybox", &one).await;
    assert_eq!(counted(&s), (2, 5), "every name evaluated again");
    assert!(layers(&before).iter().any(|l| layers(&after).contains(l)));
    // And remembered again.
    get_manifest(&c, &s, "busybox/hello", &one).await;
    assert_eq!(counted(&s), (1, 0));
    s.stop().await;
}

#[tokio::test]
async fn a_local_path_is_always_evaluated() {
    let work = tempfile::tempdir().unwrap();
    let set = work.path().join("set");
    package_set(&set, &unique("path"));
    let path = set.to_string_lossy().into_owned();
    let cfg = config_with_source(&work.path().join("storage"), &["--pkgs-path", &path], &[]);
    let c = Client::new();
    let s = TestServer::start(&cfg).await;
    get_manifest(&c, &s, "stamp", "latest").await;
    get_manifest(&c, &s, "hello/stamp", "latest").await;
    assert_eq!(counted(&s), (2, 4));
    s.stop().await;
}
