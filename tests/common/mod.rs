//! Shared by the integration tests: start a real server on port 0 with a
//! temporary STORAGE_PATH and the fixture package set.
#![allow(dead_code)]

pub mod binary;
#[allow(unused_imports)] // not every test binary uses each
pub use binary::{docker, run, Binary};
pub mod browser;
pub mod seaweed;

use clap::Parser;
use nixery::config::{Config, ServeArgs};
use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio::sync::oneshot;

/// Where tests leave files for CI to keep (screenshots).
pub fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts")
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pkgs")
}

/// Fails (never skips) when a tool the tests need is missing.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test; .ci/run installs it"
    );
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Lets Nix build the fixture set's aarch64-linux packages, whose builders
/// only copy files, on this host.
pub const ARM64_NIX_OPTION: &str = "extra-platforms=aarch64-linux";

/// A config for the fixture set: Nix never waits on a binary cache.
pub fn config(storage: &Path, extra: &[&str]) -> Config {
    let fixture = fixture_dir().to_string_lossy().into_owned();
    config_with_source(storage, &["--pkgs-path", &fixture], extra)
}

/// As [`config`], with another package source (e.g. `["--channel", url]`).
pub fn config_with_source(storage: &Path, source: &[&str], extra: &[&str]) -> Config {
    require_tool("nix-instantiate");
    let mut args = vec![
        "nixery".to_owned(),
        "--port".into(),
        "0".into(),
        "--listen-address".into(),
        "127.0.0.1".into(),
    ];
    args.extend(source.iter().map(|s| s.to_string()));
    args.extend([
        "--storage-path".into(),
        storage.to_string_lossy().into_owned(),
        "--nix-option".into(),
        "substituters=".into(),
        "--nix-option".into(),
        ARM64_NIX_OPTION.into(),
        "--nix-timeout".into(),
        "300".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Cli::try_parse_from(args)
        .expect("test flags parse")
        .serve
        .validate()
        .expect("test config is valid")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub builder: std::sync::Arc<nixery::build::builder::Builder>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: &Config) -> TestServer {
        let server = nixery::Server::start(config).await.expect("server starts");
        let addr = server.local_addr().expect("bound");
        let builder = server.builder();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            builder,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server and waits until it has let go of its storage.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server ran");
        }
    }
}

/// A server on a new temporary storage path; keep the directory as long as
/// the server.
pub async fn fresh_server(extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(&config(dir.path(), extra)).await;
    (dir, server)
}

/// A fixture attribute's output path, built.
pub fn out_path(attr: &str) -> String {
    let out = Command::new("nix-build")
        .args(["--no-out-link", "--option", "substituters", ""])
        .arg(fixture_dir())
        .args(["-A", attr])
        .output()
        .expect("nix-build runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The runtime closure of a fixture attribute, as Nix itself reports it.
pub fn nix_closure(attr: &str) -> Vec<String> {
    let path = out_path(attr);
    let q = Command::new("nix-store")
        .args(["-qR", &path])
        .output()
        .expect("nix-store runs");
    assert!(q.status.success());
    String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const LIST_TYPE: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Fetches a manifest or index by tag or digest with an `Accept` header,
/// checking the Content-Type and that the digest header matches the bytes.
pub async fn get_manifest_as(
    client: &Client,
    s: &TestServer,
    name: &str,
    reference: &str,
    accept: &str,
    expected_type: &str,
) -> (Digest, Value) {
    fetch_manifest(client, s, name, reference, Some(accept), expected_type).await
}

/// Fetches a manifest by tag, checking the headers every client relies on.
pub async fn get_manifest(
    client: &Client,
    s: &TestServer,
    name: &str,
    tag: &str,
) -> (Digest, Value) {
    fetch_manifest(client, s, name, tag, None, MANIFEST_TYPE).await
}

/// A manifest GET (with `accept`, if any) that must succeed with
/// `expected_type`, the API version header, a digest header that matches
/// the bytes, and a body that says what it is.
async fn fetch_manifest(
    client: &Client,
    s: &TestServer,
    name: &str,
    reference: &str,
    accept: Option<&str>,
    expected_type: &str,
) -> (Digest, Value) {
    let mut request = client.get(s.url(&format!("/v2/{name}/manifests/{reference}")));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let r = request.send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{name}:{reference}: {}",
        r.text().await.unwrap()
    );
    assert_eq!(
        header(&r, "content-type"),
        expected_type,
        "{name}:{reference}"
    );
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let digest: Digest = header(&r, "docker-content-digest").parse().unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(Digest::of(&body), digest, "digest header matches the bytes");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["mediaType"], expected_type, "the body says what it is");
    (digest, v)
}

/// A response header that must be there.
pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("missing header {name}"))
}

/// The status and first error of a registry error response, checking that
/// it is JSON.
pub async fn error_code(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    assert_eq!(header(&r, "content-type"), "application/json");
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).expect("error body is JSON");
    (status, v["errors"][0].clone())
}

/// Fetches a blob, checking its digest header and content.
pub async fn get_blob(client: &Client, s: &TestServer, digest: &str) -> Vec<u8> {
    let r = client
        .get(s.url(&format!("/v2/x/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let body = r.bytes().await.unwrap().to_vec();
    assert_eq!(Digest::of(&body).to_string(), digest);
    body
}

/// The image config a manifest names, fetched as a blob.
pub async fn image_config(client: &Client, s: &TestServer, manifest: &Value) -> Value {
    let digest = manifest["config"]["digest"]
        .as_str()
        .expect("a config digest");
    serde_json::from_slice(&get_blob(client, s, digest).await).expect("a JSON config")
}

/// The digest of a manifest's largest layer.
pub fn largest_layer(manifest: &Value) -> String {
    manifest["layers"]
        .as_array()
        .expect("a manifest has layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64().expect("a layer size"))
        .expect("at least one layer")["digest"]
        .as_str()
        .expect("a layer digest")
        .to_owned()
}

/// The file of blob `digest` (`sha256:...`) under a storage path, as the
/// blob store lays it out.
pub fn blob_path(storage: &Path, digest: &str) -> PathBuf {
    let d: Digest = digest.parse().expect("a digest");
    let hex = d.hex();
    storage.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// The digests of a manifest's layers, in order.
pub fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("a manifest has layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("a layer digest").to_owned())
        .collect()
}

/// The admin page's HTML.
pub async fn admin_page(client: &Client, s: &TestServer) -> String {
    let r = client.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

/// `/api/status` as JSON.
pub async fn status_json(client: &Client, s: &TestServer) -> Value {
    let r = client.get(s.url("/api/status")).send().await.unwrap();
    serde_json::from_slice(&r.bytes().await.unwrap()).expect("status is JSON")
}

/// Waits for a garbage collection newer than `after` (Null: any) and
/// returns its report from `/api/status`.
pub async fn next_gc(c: &Client, s: &TestServer, after: &Value) -> Value {
    for _ in 0..1200 {
        let gc = status_json(c, s).await["limits"]["last_gc"].clone();
        if !gc.is_null() && gc != *after {
            return gc;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no garbage collection ran");
}

/// A slow client: the first chunk of blob `digest` of `name`; the rest is
/// read by [`finish_download`], after whatever the test does meanwhile.
pub async fn start_download(
    c: &Client,
    s: &TestServer,
    name: &str,
    digest: &str,
) -> (reqwest::Response, Vec<u8>) {
    let mut r = c
        .get(s.url(&format!("/v2/{name}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.unwrap().unwrap().to_vec();
    (r, first)
}

/// Reads the rest of a download begun by [`start_download`] and checks
/// that it is whole.
pub async fn finish_download((mut r, mut body): (reqwest::Response, Vec<u8>), digest: &str) {
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(
        Digest::of(&body).to_string(),
        digest,
        "the download is whole"
    );
}

/// Names of the files in a storage path's `tmp/`.
/// Every file under `dir` that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// The `nixery` binary on `storage` for a one-off command (`sbom`,
/// `export`, `import`, `verify`, `gc`), with the fixture set as source or
/// none (a mirror); Nix never waits on a binary cache.
pub fn nixery_command(storage: &Path, with_source: bool) -> Command {
    require_tool("nix-instantiate");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.env("STORAGE_PATH", storage)
        .env("NIXERY_NIX_OPTIONS", "substituters=")
        .env("NIX_TIMEOUT", "300")
        .env_remove("NIXERY_PKGS_PATH")
        .env_remove("NIXERY_CHANNEL")
        .env_remove("NIXERY_PKGS_REPO")
        .env_remove("NIXERY_FLAKE")
        .stdin(std::process::Stdio::null());
    if with_source {
        cmd.env("NIXERY_PKGS_PATH", fixture_dir());
    }
    cmd
}

pub fn temp_files(storage: &Path) -> Vec<String> {
    std::fs::read_dir(storage.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Stored blobs whose content does not match their name (read from disk).
pub fn corrupt_blobs_on_disk(storage: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let Ok(shards) = std::fs::read_dir(storage.join("blobs/sha256")) else {
        return bad;
    };
    for shard in shards.flatten() {
        for blob in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let name = blob.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(blob.path()).unwrap();
            if Digest::of(&bytes).hex() != name {
                bad.push(name);
            }
        }
    }
    bad
}

/// Compares what an unpacked image holds at each store path with the store.
pub fn assert_same_tree(store: &Path, unpacked: &Path) {
    let meta = std::fs::symlink_metadata(store).unwrap();
    let got = std::fs::symlink_metadata(unpacked)
        .unwrap_or_else(|_| panic!("{} missing from the image", store.display()));
    if meta.file_type().is_symlink() {
        assert!(got.file_type().is_symlink(), "{}", store.display());
        assert_eq!(
            std::fs::read_link(store).unwrap(),
            std::fs::read_link(unpacked).unwrap()
        );
    } else if meta.is_dir() {
        assert!(got.is_dir(), "{}", store.display());
        let mut names: Vec<_> = std::fs::read_dir(store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut got_names: Vec<_> = std::fs::read_dir(unpacked)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        got_names.sort();
        assert_eq!(names, got_names, "{}", store.display());
        for n in names {
            assert_same_tree(&store.join(&n), &unpacked.join(&n));
        }
    } else {
        assert!(got.is_file(), "{}", store.display());
        assert_eq!(
            meta.permissions().mode() & 0o111 != 0,
            got.permissions().mode() & 0o111 != 0,
            "exec bit of {}",
            store.display()
        );
        assert!(
            std::fs::read(store).unwrap() == std::fs::read(unpacked).unwrap(),
            "content of {}",
            store.display()
        );
    }
}

/// Writes the fixture set to `dir` plus a `stamp` package whose
/// `share/version` holds `version`.
pub fn package_set(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture_dir().join("default.nix"), dir.join("base.nix")).unwrap();
    std::fs::write(dir.join("version"), version).unwrap();
    std::fs::write(
        dir.join("default.nix"),
        r#"args: (import ./base.nix args) // {
  stamp = derivation {
    name = "stamp";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out/share && printf %s \"$text\" > $out/share/version" ];
    text = builtins.readFile ./version;
    PATH = "/usr/bin:/bin";
  };
}
"#,
    )
    .unwrap();
}

/// A nixpkgs-style tarball (one top-level directory) of a package set.
pub fn tarball(work: &Path, version: &str) -> Vec<u8> {
    let root = work.join(format!("src-{version}"));
    package_set(&root.join("nixpkgs"), version);
    let file = work.join(format!("{version}.tar.gz"));
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&file)
        .arg("-C")
        .arg(&root)
        .arg("nixpkgs")
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::read(file).unwrap()
}

/// Commits `version` of a package set (see [`package_set`]) on the current
/// branch of the repository `repo`; the commit.
pub fn commit_version(repo: &Path, version: &str) -> String {
    std::fs::write(repo.join("version"), version).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", version]);
    git(repo, &["rev-parse", "HEAD"])
}

/// Runs git in `dir` (which must succeed); its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Pulls the fixture's `busybox` and `shell/hello` from `host` and runs
/// each with no network.
pub fn docker_pull_and_run_fixtures(host: &str) {
    let busybox = format!("{host}/busybox");
    let shell = format!("{host}/shell/hello");
    docker(&["pull", &busybox]);
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &busybox,
        "sh",
        "-c",
        "echo from busybox",
    ]);
    assert_eq!(out.trim(), "from busybox");
    docker(&["pull", &shell]);
    let out = docker(&["run", "--rm", "--network", "none", &shell, "hello"]);
    assert_eq!(out.trim(), "Hello, world!");
}

/// Serves whatever `body` holds at any path on 127.0.0.1, until `stop` is
/// set: then the listener closes and connections are refused.
pub fn serve_bytes(
    body: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = body.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    port
}

/// `GET /v2/<name>/referrers/<subject><query>`: the index, and whether it
/// says a filter was applied.
pub async fn get_referrers(
    client: &Client,
    s: &TestServer,
    name: &str,
    subject: &str,
    query: &str,
) -> (Value, bool) {
    let r = client
        .get(s.url(&format!("/v2/{name}/referrers/{subject}{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(header(&r, "content-type"), OCI_INDEX_TYPE);
    let filtered = r.headers().get("oci-filters-applied").is_some();
    (
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
        filtered,
    )
}
