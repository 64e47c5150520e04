//! Every package source against real Nix fetchers, offline: a nixpkgs-style
//! tarball over HTTP on 127.0.0.1, git repositories over file://, and a
//! path flake. Each version of the package set differs in what its `stamp`
//! package puts in its output, so the image contents show which was built.

mod common;

use common::{
    commit_version, config_with_source, error_code, get_blob, get_manifest, git, package_set,
    require_tool, serve_bytes, tarball, TestServer,
};
use flate2::read::GzDecoder;
use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

async fn error_of(c: &Client, s: &TestServer, name: &str, tag: &str) -> (StatusCode, String) {
    let r = c
        .get(s.url(&format!("/v2/{name}/manifests/{tag}")))
        .send()
        .await
        .unwrap();
    let (status, error) = error_code(r).await;
    (status, error["code"].as_str().unwrap().to_owned())
}

/// The content of the stamp's `share/version` in the image's layers.
async fn stamp_version(c: &Client, s: &TestServer, manifest: &Value) -> String {
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let gz = get_blob(c, s, digest).await;
        let mut tar = tar::Archive::new(GzDecoder::new(&gz[..]));
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            if path.ends_with("-stamp/share/version") {
                let mut text = String::new();
                entry.read_to_string(&mut text).unwrap();
                return text;
            }
        }
    }
    panic!("no stamp in the image");
}

/// Pulls `stamp:<tag>`: its digest and the version it contains.
async fn pull(c: &Client, s: &TestServer, tag: &str) -> (Digest, String) {
    let (digest, manifest) = get_manifest(c, s, "stamp", tag).await;
    (digest, stamp_version(c, s, &manifest).await)
}

fn builds(s: &TestServer) -> Vec<nixery::store::db::BuildRecord> {
    s.builder.db().builds().unwrap()
}

#[tokio::test]
async fn channel_tarball_over_http_is_cached_by_ttl() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let body = Arc::new(Mutex::new(tarball(work.path(), "channel-one")));
    let url = format!(
        "http://127.0.0.1:{}/nixpkgs.tar.gz",
        serve_bytes(Arc::clone(&body), Arc::default())
    );
    let c = Client::new();
    let cfg = |ttl: &str| config_with_source(&storage, &["--channel", &url], &["--cache-ttl", ttl]);

    let s = TestServer::start(&cfg("3600")).await;
    let (d1, v) = pull(&c, &s, "latest").await;
    assert_eq!(v, "channel-one");
    // Tags do not select anything in a channel: one build serves them all.
    assert_eq!(pull(&c, &s, "v1").await.0, d1);
    let b = builds(&s);
    assert_eq!(b.len(), 1);
    let rev1 = b[0]
        .revision
        .clone()
        .expect("a tarball build records its hash");
    assert!(rev1.starts_with("sha256-"), "{rev1}");
    s.stop().await;

    // The channel moves; within the TTL a restarted server still serves
    // the cached image without asking Nix.
    *body.lock().unwrap() = tarball(work.path(), "channel-two");
    let s = TestServer::start(&cfg("3600")).await;
    assert_eq!(pull(&c, &s, "latest").await, (d1, "channel-one".into()));
    assert_eq!(builds(&s).len(), 1);
    s.stop().await;

    // Past the TTL the tarball is fetched again (tarball-ttl follows it).
    let s = TestServer::start(&cfg("0")).await;
    let (d2, v) = pull(&c, &s, "latest").await;
    assert_eq!(v, "channel-two");
    assert_ne!(d2, d1);
    let rev2 = builds(&s)[0].revision.clone().unwrap();
    assert_ne!(rev2, rev1);
    // Evaluated again, same store paths: the same manifest.
    assert_eq!(pull(&c, &s, "latest").await.0, d2);
    let b = builds(&s);
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].revision.as_deref(), Some(rev2.as_str()));
    assert_eq!(
        b[0].layers_total, 0,
        "nothing packed for an unchanged check"
    );
    s.stop().await;
}

/// A repository: `main` (default) at "three", annotated tag `v1` at "one",
/// branch `feature` and lightweight tag `light` at "two".
fn repository(repo: &Path) -> String {
    require_tool("git");
    package_set(repo, "");
    git(repo, &["init", "-q", "-b", "main"]);
    let one = commit_version(repo, "one");
    git(repo, &["tag", "-a", "v1", "-m", "release one"]);
    git(repo, &["checkout", "-q", "-b", "feature"]);
    commit_version(repo, "two");
    git(repo, &["tag", "light"]);
    git(repo, &["checkout", "-q", "main"]);
    commit_version(repo, "three");
    one
}

#[tokio::test]
async fn git_tags_select_branches_tags_and_commits() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let one = repository(&repo);
    let url = format!("file://{}", repo.display());
    let cfg = config_with_source(&work.path().join("storage"), &["--pkgs-repo", &url], &[]);
    let s = TestServer::start(&cfg).await;
    let c = Client::new();

    let (latest, v) = pull(&c, &s, "latest").await;
    assert_eq!(v, "three");
    let (v1, v) = pull(&c, &s, "v1").await;
    assert_eq!(v, "one");
    let (feature, v) = pull(&c, &s, "feature").await;
    assert_eq!(v, "two");
    assert_eq!(pull(&c, &s, "light").await, (feature, "two".into()));
    // The commit a tag named was built already: reused, not evaluated.
    assert_eq!(pull(&c, &s, &one).await, (v1, "one".into()));
    assert_ne!(latest, v1);

    let b = builds(&s);
    let by_tag = |t: &str| b.iter().find(|r| r.tag == t).unwrap();
    assert_eq!(by_tag("v1").revision.as_deref(), Some(one.as_str()));
    assert_eq!(by_tag(&one).revision.as_deref(), Some(one.as_str()));
    assert_eq!(by_tag(&one).layers_total, 0);
    assert_eq!(
        by_tag("latest").revision,
        Some(git(&repo, &["rev-parse", "main"]))
    );
    // The image says where it came from and which commit.
    let (_, m) = get_manifest(&c, &s, "stamp", "v1").await;
    let config = common::image_config(&c, &s, &m).await;
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.revision"], one.as_str());
    assert_eq!(
        labels["org.opencontainers.image.source"],
        format!("git:{url}")
    );

    assert_eq!(
        error_of(&c, &s, "stamp", "nosuchref").await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    // A commit the repository does not have is as unknown as a ref.
    assert_eq!(
        error_of(&c, &s, "stamp", "0123456789abcdef0123456789abcdef01234567").await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    for bad in ["a..b", "x.lock", "end."] {
        assert_eq!(
            error_of(&c, &s, "stamp", bad).await,
            (StatusCode::BAD_REQUEST, "TAG_INVALID".into()),
            "{bad}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn git_cache_rules_hold_across_restarts() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let one = repository(&repo);
    let url = format!("file://{}", repo.display());
    let storage = work.path().join("storage");
    let cfg =
        |ttl: &str| config_with_source(&storage, &["--pkgs-repo", &url], &["--cache-ttl", ttl]);
    let c = Client::new();

    let s = TestServer::start(&cfg("3600")).await;
    let (pinned, _) = pull(&c, &s, &one).await;
    let (latest, _) = pull(&c, &s, "latest").await;
    let (feature, _) = pull(&c, &s, "feature").await;
    assert_eq!(builds(&s).len(), 3);
    s.stop().await;

    // `main` moves on. Within the TTL, nothing is asked again.
    commit_version(&repo, "four");
    let s = TestServer::start(&cfg("3600")).await;
    assert_eq!(pull(&c, &s, "latest").await, (latest, "three".into()));
    assert_eq!(pull(&c, &s, &one).await.0, pinned);
    assert_eq!(builds(&s).len(), 3);
    s.stop().await;

    // TTL 0: the moved branch gives a new image, the unchanged one keeps
    // its digest, and a commit is still never asked again.
    let s = TestServer::start(&cfg("0")).await;
    let (latest2, v) = pull(&c, &s, "latest").await;
    assert_eq!(v, "four");
    assert_ne!(latest2, latest);
    assert_eq!(builds(&s).len(), 4);
    assert_eq!(pull(&c, &s, "feature").await, (feature, "two".into()));
    assert_eq!(builds(&s).len(), 5, "the branch was checked");
    assert_eq!(pull(&c, &s, &one).await.0, pinned);
    assert_eq!(builds(&s).len(), 5, "a commit is cached for good");
    s.stop().await;
}

#[tokio::test]
async fn flake_serves_packages_then_legacy_packages() {
    let work = tempfile::tempdir().unwrap();
    let flake = work.path().join("flake");
    package_set(&flake, "legacy");
    std::fs::write(
        flake.join("flake.nix"),
        r#"{
  outputs = { self }:
    let
      system = builtins.currentSystem;
      legacy = import ./. { inherit system; };
    in {
      legacyPackages.${system} = legacy;
      packages.${system}.stamp = derivation {
        name = "stamp";
        inherit system;
        builder = "/bin/sh";
        args = [ "-e" "-c" "mkdir -p $out/share && printf flake > $out/share/version" ];
        PATH = "/usr/bin:/bin";
      };
    };
}
"#,
    )
    .unwrap();
    let flake_ref = format!("path:{}", flake.display());
    let cfg = config_with_source(&work.path().join("storage"), &["--flake", &flake_ref], &[]);
    let s = TestServer::start(&cfg).await;
    let c = Client::new();

    assert_eq!(pull(&c, &s, "latest").await.1, "flake");
    // hello is only in legacyPackages.
    get_manifest(&c, &s, "hello", "latest").await;
    let b = builds(&s);
    assert!(b.iter().all(|r| r
        .revision
        .as_deref()
        .is_some_and(|h| h.starts_with("sha256-"))));
    s.stop().await;
}
