//! The air-gapped mirror end to end with the real binary: `build` and
//! `export` outside, `import` and `serve` with no package source inside,
//! then docker, skopeo into a distribution registry, umoci and `nix copy`
//! against what was exported; broken layouts refused; serving stale when a
//! channel cannot be reached; `verify` and `--repair`.

mod common;

use common::{
    assert_same_tree, config_with_source, docker, docker_pull_and_run_fixtures, fixture_dir,
    get_manifest, git, nix_closure, package_set, require_tool, run, serve_bytes, tarball, Binary,
    TestServer,
};
use nixery::digest::Digest;
use nixery::store::db::{Db, TagTree};
use reqwest::Client;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `nixery ARGS` on `storage`, with the fixture set as source or none.
fn nixery(storage: &Path, with_source: bool) -> Command {
    require_tool("nix-instantiate");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.env("STORAGE_PATH", storage)
        .env("NIXERY_NIX_OPTIONS", "substituters=")
        .env("NIX_TIMEOUT", "300")
        .env("PORT", "0")
        .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
        .env_remove("NIXERY_PKGS_PATH")
        .env_remove("NIXERY_CHANNEL")
        .env_remove("NIXERY_PKGS_REPO")
        .env_remove("NIXERY_FLAKE")
        .stdin(Stdio::null());
    if with_source {
        cmd.env("NIXERY_PKGS_PATH", fixture_dir());
    }
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// `IMAGE DIGEST` lines, as `build` and `import` print them.
fn digests(stdout: &str) -> BTreeMap<String, Digest> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(" sha256:"))
        .map(|(image, hex)| (image.to_owned(), format!("sha256:{hex}").parse().unwrap()))
        .collect()
}

/// Builds busybox and shell/hello into `storage` outside; their digests.
fn build_outside(storage: &Path) -> BTreeMap<String, Digest> {
    let out = run(nixery(storage, true).args(["build", "shell/hello", "busybox"]));
    let built = digests(&out);
    assert_eq!(built.len(), 2, "{out}");
    built
}

/// Blob files with their content, and pinned names and tags.
type Snapshot = (Vec<(PathBuf, Vec<u8>)>, Vec<(String, String)>);

/// Every file under the storage's blobs with its content, and the images
/// the database pins: what an import must leave alone when it refuses.
fn snapshot(storage: &Path) -> Snapshot {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut files = Vec::new();
    walk(&storage.join("blobs"), &mut files);
    files.sort();
    let db = Db::open(&storage.join("db")).unwrap();
    let pinned = db
        .tag_records(TagTree::Pinned)
        .unwrap()
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    (files, pinned)
}

/// A distribution registry (`docker-registry`) on a free port.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        let registry = Registry {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            let up = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{port}/v2/")])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("docker-registry did not come up on port {port}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn air_gapped_round_trip() {
    require_tool("docker");
    require_tool("skopeo");
    require_tool("umoci");
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    let built = build_outside(&outside);
    // Built again: found in the cache, same digests.
    assert_eq!(build_outside(&outside), built);

    let layout = work.path().join("layout");
    let tar = work.path().join("media.tar");
    for target in [&layout, &tar] {
        let out = run(nixery(&outside, true)
            .args(["export", "--with-closures", "--output"])
            .arg(target)
            .args(["shell/hello", "busybox"]));
        assert!(out.contains("exported 2 images"), "{out}");
    }
    assert!(layout.join("oci-layout").is_file());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    // The images by name; their bills of materials (artifact manifests,
    // see tests/sbom.rs) are listed unnamed, with their artifactType.
    let (artifacts, images): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = index
        ["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .partition(|m| m["artifactType"].is_string());
    assert_eq!(
        artifacts.len(),
        2 * 2 * 2,
        "two documents per form per image"
    );
    let names: Vec<&str> = images
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names, vec!["shell/hello:latest", "busybox:latest"]);
    // Shared blobs (the cacert layer...) are written once: as many files as
    // distinct blobs.
    let files = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .count();
    let mut distinct = std::collections::BTreeSet::new();
    for m in &artifacts {
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let artifact: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        distinct.insert(m["digest"].as_str().unwrap().to_owned());
        distinct.insert(artifact["config"]["digest"].as_str().unwrap().to_owned());
        distinct.insert(artifact["layers"][0]["digest"].as_str().unwrap().to_owned());
    }
    for m in &images {
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let oci: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        distinct.insert(m["digest"].as_str().unwrap().to_owned());
        distinct.insert(
            m["annotations"]["org.nixery.docker-manifest"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        distinct.insert(oci["config"]["digest"].as_str().unwrap().to_owned());
        for l in oci["layers"].as_array().unwrap() {
            distinct.insert(l["digest"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(files, distinct.len());

    // Inside: another storage, no package source.
    let inside = work.path().join("inside");
    let out = run(nixery(&inside, false)
        .args(["import", "--with-closures"])
        .arg(&tar));
    assert_eq!(digests(&out), built, "{out}");
    // Idempotent, and a directory works as well as a tar file.
    let out = run(nixery(&inside, false).arg("import").arg(&layout));
    assert_eq!(digests(&out), built, "{out}");

    // `build` needs a source, and the storage while serve has it.
    let refused = output(nixery(&inside, false).args(["build", "busybox"]));
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no package source"));

    let server = Binary::spawn(nixery(&inside, false).arg("serve"), None);
    let busy = output(nixery(&inside, false).arg("import").arg(&layout));
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by another nixery process"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    for (image, digest) in &built {
        let name = image.trim_end_matches(":latest");
        let head = run(Command::new("curl").args([
            "-sfI",
            &format!(
                "http://127.0.0.1:{}/v2/{name}/manifests/latest",
                server.port
            ),
        ]));
        assert!(
            head.to_lowercase()
                .contains(&format!("docker-content-digest: {digest}")),
            "{head}"
        );
    }
    // A client that asks for OCI gets the layout's OCI manifest.
    for m in &images {
        let name = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap()
            .trim_end_matches(":latest");
        let head = run(Command::new("curl").args([
            "-sfI",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!(
                "http://127.0.0.1:{}/v2/{name}/manifests/latest",
                server.port
            ),
        ]));
        let want = format!("docker-content-digest: {}", m["digest"].as_str().unwrap());
        assert!(head.to_lowercase().contains(&want), "{head}");
    }
    let missing = run(Command::new("curl").args([
        "-s",
        &format!(
            "http://127.0.0.1:{}/v2/shell/curl/manifests/latest",
            server.port
        ),
    ]));
    assert!(
        missing.contains("MANIFEST_UNKNOWN") && missing.contains("no package source"),
        "{missing}"
    );
    let page =
        run(Command::new("curl").args(["-s", &format!("http://127.0.0.1:{}/", server.port)]));
    assert!(page.contains("mirror"), "the admin page says mirror");

    docker_pull_and_run_fixtures(&format!("localhost:{}", server.port));
    let busybox = server.image("busybox");
    let shell = server.image("shell/hello");
    // Every repository digest docker keeps for this image ID: other tests
    // (or an earlier run on the same port) may have added theirs.
    let pulled = docker(&["inspect", "--format", "{{json .RepoDigests}}", &busybox]);
    let want = format!("{busybox}@{}", built["busybox:latest"]);
    assert!(
        pulled.contains(&format!("\"{want}\"")),
        "{want} in {pulled}"
    );
    let _ = Command::new("docker")
        .args(["rmi", "-f", &busybox, &shell])
        .output();
    drop(server);

    // skopeo reads the layout and pushes it into a plain registry.
    let registry = Registry::start();
    let dest = format!(
        "docker://127.0.0.1:{}/mirrored/busybox:latest",
        registry.port
    );
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:busybox:latest", layout.display()),
        &dest,
    ]));
    let inspect = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", &dest]));
    assert!(inspect.contains("\"Architecture\": \"amd64\""), "{inspect}");
    let busybox_oci = index["manifests"][1]["digest"].as_str().unwrap();
    assert!(
        inspect.contains(busybox_oci),
        "pushed as exported: {inspect}"
    );

    // umoci unpacks what the store holds.
    let bundle = work.path().join("bundle");
    run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:shell/hello:latest", layout.display()),
        &bundle.to_string_lossy(),
    ]));
    for path in nix_closure("hello") {
        let unpacked = bundle.join("rootfs").join(path.trim_start_matches('/'));
        assert_same_tree(Path::new(&path), &unpacked);
    }

    // The closure cache is a valid binary cache: copy it into a chroot store.
    let store_paths = std::fs::read_to_string(layout.join("nix-cache/store-paths")).unwrap();
    let chroot = work.path().join("chroot");
    let mut copy = Command::new("nix");
    copy.args([
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--no-check-sigs",
        "--from",
        &format!("file://{}", layout.join("nix-cache").display()),
        "--to",
        &chroot.to_string_lossy(),
    ])
    .args(store_paths.lines());
    run(&mut copy);
    let hello = nix_closure("hello");
    for path in &hello {
        assert!(
            chroot.join(path.trim_start_matches('/')).exists(),
            "{path} in the chroot store"
        );
    }
}

#[test]
fn broken_layouts_are_refused_and_change_nothing() {
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    run(nixery(&outside, true).args(["build", "busybox"]));
    let layout = work.path().join("layout");
    run(nixery(&outside, true)
        .args(["export", "--output"])
        .arg(&layout)
        .arg("busybox"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let oci_hex = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let oci: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&oci_hex)).unwrap())
            .unwrap();
    let layer_hex = |i: usize| {
        oci["layers"][i]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned()
    };

    let copy = |name: &str| {
        let dir = work.path().join(name);
        run(Command::new("cp").arg("-a").arg(&layout).arg(&dir));
        dir
    };
    let flipped = copy("flipped");
    let blob = flipped.join("blobs/sha256").join(layer_hex(0));
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();
    let missing = copy("missing");
    std::fs::remove_file(missing.join("blobs/sha256").join(layer_hex(1))).unwrap();
    // A bill of materials whose subject is a layer, not an image: that
    // layer would be kept as a manifest served by digest.
    let misplaced = copy("misplaced");
    let mut misplaced_index = index.clone();
    let artifact = misplaced_index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["artifactType"].is_string())
        .expect("the export carries a bill of materials");
    let artifact_path = |dir: &Path, d: &serde_json::Value| {
        dir.join("blobs/sha256")
            .join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let mut doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact_path(&misplaced, &artifact["digest"])).unwrap(),
    )
    .unwrap();
    doc["subject"]["digest"] = oci["layers"][0]["digest"].clone();
    doc["subject"]["size"] = oci["layers"][0]["size"].clone();
    let bytes = serde_json::to_vec(&doc).unwrap();
    let digest = nixery::digest::Digest::of(&bytes).to_string();
    artifact["digest"] = digest.clone().into();
    artifact["size"] = bytes.len().into();
    std::fs::write(artifact_path(&misplaced, &digest.into()), &bytes).unwrap();
    std::fs::write(
        misplaced.join("index.json"),
        serde_json::to_vec(&misplaced_index).unwrap(),
    )
    .unwrap();
    let flipped_tar = work.path().join("flipped.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&flipped_tar)
        .arg("-C")
        .arg(&flipped)
        .arg("."));

    // The inside already serves another import: that must stay as it is.
    let inside = work.path().join("inside");
    run(nixery(&inside, false).arg("import").arg(&layout));
    let before = snapshot(&inside);
    assert_eq!(before.1, vec![("busybox".to_owned(), "latest".to_owned())]);
    for (bad, says) in [
        (&flipped, "is damaged"),
        (&missing, "is missing from the layout"),
        (&flipped_tar, "is damaged"),
        (&misplaced, "is no image of the layout"),
    ] {
        let other = work.path().join("other");
        let out = output(nixery(&other, false).arg("import").arg(bad));
        assert!(!out.status.success());
        let out = output(nixery(&inside, false).arg("import").arg(bad));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was imported", bad.display());
        assert!(
            stderr.contains("refused, nothing was imported") && stderr.contains(says),
            "{stderr}"
        );
        assert!(
            snapshot(&inside) == before,
            "{} changed the storage",
            bad.display()
        );
        assert!(snapshot(&other).0.is_empty());
    }
    // No staging left behind.
    let leftovers: Vec<_> = std::fs::read_dir(inside.join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn an_unreachable_channel_serves_the_cached_image() {
    let work = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let body = Arc::new(std::sync::Mutex::new(tarball(work.path(), "stale-one")));
    let port = serve_bytes(body, Arc::clone(&stop));
    let url = format!("http://127.0.0.1:{port}/nixpkgs.tar.gz");
    let storage = work.path().join("storage");
    let config = config_with_source(&storage, &["--channel", &url], &["--cache-ttl", "1"]);
    let s = TestServer::start(&config).await;
    let c = Client::new();
    let (first, _) = get_manifest(&c, &s, "stamp", "latest").await;

    stop.store(true, Ordering::SeqCst);
    // Wait until the port refuses, then past the TTL.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (again, _) = get_manifest(&c, &s, "stamp", "latest").await;
    assert_eq!(again, first);
    s.stop().await;
}

/// Nix itself falls back to its cached tarball when a channel's download
/// fails; a git repository that cannot be reached is nixery's to handle.
#[tokio::test]
async fn an_unreachable_git_repository_serves_the_cached_image() {
    require_tool("git");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    package_set(&repo, "git-one");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let url = format!("file://{}", repo.display());
    let storage = work.path().join("storage");
    let config = config_with_source(&storage, &["--pkgs-repo", &url], &["--cache-ttl", "1"]);
    let s = TestServer::start(&config).await;
    let c = Client::new();
    let (first, _) = get_manifest(&c, &s, "stamp", "latest").await;

    std::fs::rename(&repo, work.path().join("gone")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (again, _) = get_manifest(&c, &s, "stamp", "latest").await;
    assert_eq!(again, first);
    let body = c.get(s.url("/api/status")).send().await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&body.bytes().await.unwrap()).unwrap();
    let stale = &status["stale"][0];
    assert_eq!(
        (stale["image"].as_str(), stale["tag"].as_str()),
        (Some("stamp"), Some("latest")),
        "{status}"
    );
    assert!(stale["error"].as_str().unwrap().contains("git"), "{stale}");
    let page = common::admin_page(&c, &s).await;
    assert!(page.contains("Served stale"), "the admin page shows it");
    s.stop().await;
}

#[tokio::test]
async fn verify_finds_a_changed_byte_and_repair_lets_the_pull_rebuild() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let built = run(nixery(&storage, true).args(["build", "busybox"]));
    let digest = digests(&built)["busybox:latest"];
    let clean = run(nixery(&storage, true).arg("verify"));
    assert!(
        clean.contains("0 corrupt blobs, 0 broken manifests"),
        "{clean}"
    );

    // Change one byte of the biggest layer.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::blob_path(&storage, &digest.to_string())).unwrap(),
    )
    .unwrap();
    let layer = common::largest_layer(&manifest);
    let path = common::blob_path(&storage, &layer);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, bytes).unwrap();

    let found = output(nixery(&storage, true).arg("verify"));
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(found.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("corrupt blob {layer}")),
        "{stdout}"
    );
    assert!(stdout.contains("1 corrupt blobs"), "{stdout}");

    let repaired = run(nixery(&storage, true).args(["verify", "--repair"]));
    assert!(repaired.contains("removed 1 blobs"), "{repaired}");

    let config = common::config(&storage, &[]);
    let s = TestServer::start(&config).await;
    let c = Client::new();
    let (again, manifest) = get_manifest(&c, &s, "busybox", "latest").await;
    assert_eq!(again, digest, "the rebuild packs the same bytes");
    for l in manifest["layers"].as_array().unwrap() {
        common::get_blob(&c, &s, l["digest"].as_str().unwrap()).await;
    }
    s.stop().await;
    let clean = run(nixery(&storage, true).arg("verify"));
    assert!(
        clean.contains("0 corrupt blobs, 0 broken manifests"),
        "{clean}"
    );
}

#[tokio::test]
async fn an_imported_name_is_its_manifest_whatever_the_platforms() {
    let storage = tempfile::tempdir().unwrap();
    let built = tokio::task::spawn_blocking({
        let path = storage.path().to_owned();
        move || build_outside(&path)
    })
    .await
    .unwrap();
    let imported = built["shell/hello:latest"];
    // As `import` records a name: pinned, whatever the source builds.
    {
        let db = Db::open(&storage.path().join("db")).unwrap();
        let record = nixery::store::db::TagRecord {
            digest: imported,
            at: 1,
        };
        db.put_tag_record(TagTree::Pinned, "busybox", "imported", &record)
            .unwrap();
        db.flush_blocking().unwrap();
    }
    let server = tokio::task::spawn_blocking(move || {
        Binary::start_on(storage, |cmd| {
            cmd.env("NIXERY_PLATFORMS", "linux/amd64,linux/arm64");
        })
    })
    .await
    .unwrap();
    let client = Client::new();
    let get = |tag: &str| {
        client
            .get(format!(
                "http://127.0.0.1:{}/v2/busybox/manifests/{tag}",
                server.port
            ))
            .header(
                "accept",
                "application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json, \
                 application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
    };
    // A built name is an index over both platforms...
    let r = get("latest").await.unwrap();
    assert_eq!(r.status(), 200);
    let media = common::header(&r, "content-type").to_owned();
    assert!(media.contains("list") || media.contains("index"), "{media}");
    // ...an imported one the manifest imported, not a build of both.
    let r = get("imported").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        common::header(&r, "content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        common::header(&r, "docker-content-digest"),
        imported.to_string()
    );
}

#[test]
fn an_image_exported_for_two_platforms_is_imported_and_served_with_both() {
    require_tool("docker");
    require_tool("skopeo");
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    let layout = work.path().join("layout");
    let out = run(nixery(&outside, true)
        .env("NIXERY_PLATFORMS", "linux/amd64,linux/arm64")
        .env(
            "NIXERY_NIX_OPTIONS",
            format!("substituters=;{}", common::ARM64_NIX_OPTION),
        )
        .args(["export", "--with-closures", "--output"])
        .arg(&layout)
        .arg("busybox"));
    assert!(out.contains("exported 1 images"), "{out}");
    // The closures of both platforms: iana-etc is built for each system.
    let store_paths = std::fs::read_to_string(layout.join("nix-cache/store-paths")).unwrap();
    assert_eq!(
        store_paths
            .lines()
            .filter(|l| l.contains("-iana-etc-"))
            .count(),
        2,
        "{store_paths}"
    );
    let read_json = |hex: &str| -> serde_json::Value {
        let hex = hex.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "busybox:latest"
    );
    // Per platform: the OCI manifest and the Docker manifest it was made
    // from, as the outside serves them.
    let nested = read_json(entry["digest"].as_str().unwrap());
    let mut oci = Vec::new();
    let mut docker_digests = Vec::new();
    for (child, arch) in nested["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["amd64", "arm64"])
    {
        assert_eq!(child["platform"]["architecture"], arch, "{nested}");
        assert_eq!(child["platform"]["os"], "linux");
        let config = read_json(
            read_json(child["digest"].as_str().unwrap())["config"]["digest"]
                .as_str()
                .unwrap(),
        );
        assert_eq!(config["architecture"], arch);
        oci.push(child["digest"].as_str().unwrap().to_owned());
        docker_digests.push(
            child["annotations"]["org.nixery.docker-manifest"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(oci.len(), 2, "{nested}");
    // A nested index whose platforms cannot be told apart is refused.
    for (name, arch, says) in [
        ("no-platform", None, "is not for linux/amd64 or linux/arm64"),
        ("twice", Some("amd64"), "two manifests for amd64"),
    ] {
        let bad = work.path().join(name);
        run(Command::new("cp").arg("-a").arg(&layout).arg(&bad));
        let mut changed = nested.clone();
        match arch {
            Some(a) => changed["manifests"][1]["platform"]["architecture"] = a.into(),
            None => {
                changed["manifests"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("platform");
            }
        }
        let bytes = serde_json::to_vec(&changed).unwrap();
        let digest = Digest::of(&bytes);
        std::fs::write(bad.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
        let mut top = index.clone();
        top["manifests"][0]["digest"] = digest.to_string().into();
        top["manifests"][0]["size"] = bytes.len().into();
        std::fs::write(bad.join("index.json"), top.to_string()).unwrap();
        let out = output(
            nixery(&work.path().join("refusing"), false)
                .arg("import")
                .arg(&bad),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{stderr}");
    }
    // OCI tools read it: skopeo picks a platform from the nested index.
    let inspect = run(Command::new("skopeo").args([
        "inspect",
        "--override-arch",
        "arm64",
        &format!("oci:{}:busybox:latest", layout.display()),
    ]));
    assert!(inspect.contains("\"Architecture\": \"arm64\""), "{inspect}");

    // Inside: a mirror with the default platforms.
    let inside = work.path().join("inside");
    let out = run(nixery(&inside, false).arg("import").arg(&layout));
    assert!(
        out.contains(&format!("busybox:latest {}", docker_digests[0]))
            && out.contains(&format!("linux/arm64 {}", docker_digests[1])),
        "{out}"
    );
    let verified = run(nixery(&inside, false).arg("verify"));
    assert!(
        verified.contains("and 2 manifests: 0 corrupt blobs, 0 broken manifests"),
        "{verified}"
    );

    let server = Binary::spawn(nixery(&inside, false).arg("serve"), None);
    let get = |accept: &str| -> (String, serde_json::Value) {
        let out = run(Command::new("curl").args([
            "-sf",
            "-D",
            "/dev/stderr",
            "-H",
            &format!("Accept: {accept}"),
            &format!(
                "http://127.0.0.1:{}/v2/busybox/manifests/latest",
                server.port
            ),
        ]));
        let body: serde_json::Value = serde_json::from_str(&out).unwrap();
        (body["mediaType"].as_str().unwrap().to_owned(), body)
    };
    let children = |body: &serde_json::Value| -> Vec<String> {
        body["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    let (media, body) = get("application/vnd.oci.image.index.v1+json");
    assert_eq!(media, "application/vnd.oci.image.index.v1+json", "{body}");
    assert_eq!(children(&body), oci);
    let (media, body) = get("application/vnd.docker.distribution.manifest.list.v2+json");
    assert_eq!(
        media, "application/vnd.docker.distribution.manifest.list.v2+json",
        "{body}"
    );
    assert_eq!(children(&body), docker_digests);
    // A client that takes one manifest gets the first platform's.
    let head = run(Command::new("curl").args([
        "-sfI",
        &format!(
            "http://127.0.0.1:{}/v2/busybox/manifests/latest",
            server.port
        ),
    ]));
    assert!(
        head.to_lowercase()
            .contains(&format!("docker-content-digest: {}", docker_digests[0])),
        "{head}"
    );

    let image = server.image("busybox");
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    docker(&["pull", "--platform", "linux/arm64", &image]);
    let arch = docker(&["image", "inspect", "--format", "{{.Architecture}}", &image]);
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    assert_eq!(arch.trim(), "arm64");
    drop(server);

    // A platform that cannot be served whole loses the image as imported.
    let amd64_layers = read_json(&oci[0]).to_string();
    let arm64_only = read_json(&oci[1])["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_owned()
        })
        .find(|hex| !amd64_layers.contains(hex.as_str()))
        .expect("a layer only arm64 has");
    std::fs::remove_file(common::blob_path(&inside, &format!("sha256:{arm64_only}"))).unwrap();
    let found = output(nixery(&inside, false).arg("verify"));
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(found.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("imported image busybox:latest for arm64"),
        "{stdout}"
    );
    let repaired = output(nixery(&inside, false).args(["verify", "--repair"]));
    let stdout = String::from_utf8_lossy(&repaired.stdout);
    assert_eq!(repaired.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("lost (import them again): busybox:latest"),
        "{stdout}"
    );
    let clean = run(nixery(&inside, false).arg("verify"));
    assert!(clean.contains("0 broken manifests"), "{clean}");
}
