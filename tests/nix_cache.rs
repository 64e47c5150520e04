//! The Nix binary cache under `/nix-cache/`, with Debian's Nix as the
//! client: substitution into a fresh store with signatures required, a
//! wrong key refused, `nix copy --from`, paths in no image refused, bad
//! input, and garbage collection.

mod common;

use common::{config, fresh_server, get_manifest, nix_closure, require_tool, TestServer};
use reqwest::{Client, StatusCode};
use std::path::Path;
use std::process::Command;

const NIXERY: &str = env!("CARGO_BIN_EXE_nixery");

/// `nixery nix-cache key` into `dir`: the secret key's path and the
/// public key, checked against what the command prints.
fn make_key(dir: &Path, name: &str) -> (String, String) {
    let out = Command::new(NIXERY)
        .args(["nix-cache", "key", "--name", name, "--dir"])
        .arg(dir)
        .output()
        .expect("nixery runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = dir.join(format!("{name}.secret"));
    let public = std::fs::read_to_string(dir.join(format!("{name}.public"))).unwrap();
    assert!(public.starts_with(&format!("{name}:")), "{public}");
    assert!(
        stdout.contains(&format!("extra-trusted-public-keys = {public}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("nix.settings.trusted-public-keys"),
        "{stdout}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the secret key is the owner's only");
    // Never overwritten.
    let again = Command::new(NIXERY)
        .args(["nix-cache", "key", "--name", name, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    (secret.to_string_lossy().into_owned(), public)
}

fn hash_of(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

fn nix_store(args: &[&str]) -> String {
    let out = Command::new("nix-store")
        .args(args)
        .output()
        .expect("nix-store runs");
    assert!(
        out.status.success(),
        "nix-store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn get(c: &Client, s: &TestServer, path: &str) -> (StatusCode, String) {
    let r = c.get(s.url(path)).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

fn field<'a>(narinfo: &'a str, name: &str) -> &'a str {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in\n{narinfo}"))
}

/// Realises `paths` into a chroot store at `root` from the server only.
fn substitute(
    s: &TestServer,
    root: &Path,
    public_key: &str,
    paths: &[String],
) -> std::process::Output {
    Command::new("nix-store")
        .arg("--store")
        .arg(root)
        .args(["--realise", "--option", "substituters"])
        .arg(s.url("/nix-cache"))
        .args(["--option", "trusted-public-keys", public_key])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        // Nix caches narinfos by the cache's URL: another test's server on
        // the same port (another key) must not answer for this one.
        .args(["--option", "narinfo-cache-positive-ttl", "0"])
        .args(paths)
        .output()
        .expect("nix-store runs")
}

/// Substitutes hello (`path`) from `s` into a fresh store, signatures
/// required, and checks its whole closure there.
fn substitute_hello(s: &TestServer, public_key: &str, path: &str) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let out = substitute(s, store.path(), public_key, &[path.to_owned()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = store.path().to_str().unwrap();
    for path in nix_closure("hello") {
        nix_store(&["--store", root, "--verify-path", &path]);
    }
    store
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_substitutes_an_image_closure_signed_by_the_server() {
    require_tool("nix-store");
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = make_key(keys.path(), "nixery-test-1");
    let (_wrong_secret, wrong_public) = make_key(keys.path(), "nixery-test-2");
    let (_dir, s) = fresh_server(&["--nix-cache-key", &secret]).await;
    let c = Client::new();
    get_manifest(&c, &s, "hello", "latest").await;

    let (status, info) = get(&c, &s, "/nix-cache/nix-cache-info").await;
    assert_eq!(status, StatusCode::OK);
    assert!(info.contains("StoreDir: /nix/store"), "{info}");

    // Every path of the closure, as the host's Nix reports it.
    let closure = nix_closure("hello");
    let hello = closure
        .iter()
        .find(|p| p.ends_with("-hello-2.10"))
        .unwrap()
        .clone();
    for path in &closure {
        let (status, narinfo) = get(&c, &s, &format!("/nix-cache/{}.narinfo", hash_of(path))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {narinfo}");
        assert_eq!(field(&narinfo, "StorePath"), path);
        assert_eq!(
            field(&narinfo, "NarHash"),
            nix_store(&["--query", "--hash", path]),
            "{path}"
        );
        assert_eq!(
            field(&narinfo, "NarSize"),
            nix_store(&["--query", "--size", path])
        );
        assert_eq!(field(&narinfo, "Compression"), "zstd");
        assert!(field(&narinfo, "Sig").starts_with("nixery-test-1:"));
        // The NAR itself, byte for byte what `nix-store --dump` writes,
        // and a Range of it.
        let url = s.url(&format!("/nix-cache/{}", field(&narinfo, "URL")));
        let compressed = c.get(&url).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(compressed.len().to_string(), field(&narinfo, "FileSize"));
        let dump = Command::new("nix-store")
            .args(["--dump", path])
            .output()
            .unwrap()
            .stdout;
        assert!(
            zstd::decode_all(&compressed[..]).unwrap() == dump,
            "{path}: NAR differs"
        );
        let part = c
            .get(&url)
            .header("range", "bytes=1-4")
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(part.bytes().await.unwrap()[..], compressed[1..5]);
    }

    // Debian's Nix substitutes the closure into a fresh store, checking
    // the signatures, and the store agrees with what it got.
    let store = tempfile::tempdir().unwrap();
    let out = substitute(&s, store.path(), &public, std::slice::from_ref(&hello));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = store.path().to_str().unwrap();
    for path in &closure {
        assert!(store.path().join(&path[1..]).exists(), "{path} substituted");
        nix_store(&["--store", root, "--verify-path", path]);
    }
    nix_store(&["--store", root, "--verify", "--check-contents"]);

    // A client that trusts another key refuses every path.
    let other = tempfile::tempdir().unwrap();
    let out = substitute(
        &s,
        other.path(),
        &wrong_public,
        std::slice::from_ref(&hello),
    );
    assert!(!out.status.success(), "a wrong key must be refused");
    assert!(!other.path().join(&hello[1..]).exists());

    // `nix copy --from` the cache, of another requested package's closure.
    get_manifest(&c, &s, "busybox", "latest").await;
    let busybox = nix_closure("busybox");
    let copied = tempfile::tempdir().unwrap();
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
        ])
        .arg(s.url("/nix-cache"))
        .arg("--to")
        .arg(copied.path())
        .args(["--option", "trusted-public-keys", &public])
        .args(&busybox)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &busybox {
        assert!(copied.path().join(&path[1..]).exists(), "{path} copied");
    }
    let page = get(&c, &s, "/").await.1;
    assert!(
        page.contains(&public),
        "the admin page shows the public key"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_paths_of_images_are_served_and_bad_names_are_refused() {
    require_tool("nix-instantiate");
    let keys = tempfile::tempdir().unwrap();
    let (secret, _) = make_key(keys.path(), "k");
    let (_dir, s) = fresh_server(&["--nix-cache-key", &secret]).await;
    let c = Client::new();
    get_manifest(&c, &s, "hello", "latest").await;
    // In the host's store (Nix built it for the image) but in no image.
    let drv = Command::new("nix-instantiate")
        .arg(common::fixture_dir())
        .args(["-A", "hello"])
        .output()
        .unwrap();
    let drv = String::from_utf8_lossy(&drv.stdout).trim().to_owned();
    assert!(Path::new(&drv).exists(), "{drv}");
    let (status, body) = get(&c, &s, &format!("/nix-cache/{}.narinfo", hash_of(&drv))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("\"errors\""), "{body}");
    let unknown = "0".repeat(32);
    assert_eq!(
        get(&c, &s, &format!("/nix-cache/{unknown}.narinfo"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    for bad in [
        "/nix-cache/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
        "/nix-cache/short.narinfo",
        "/nix-cache/nar/abc.nar.zst",
        "/nix-cache/nar/0000000000000000000000000000000000000000000000000000.nar.xz",
    ] {
        let (status, body) = get(&c, &s, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.contains("\"errors\""), "{body}");
    }
    let nar = format!("/nix-cache/nar/{}.nar.zst", "0".repeat(52));
    assert_eq!(get(&c, &s, &nar).await.0, StatusCode::NOT_FOUND);
    let post = c
        .post(s.url("/nix-cache/nix-cache-info"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    s.stop().await;

    // Without a key the cache is off.
    let (_dir, s) = fresh_server(&[]).await;
    let (status, body) = get(&c, &s, "/nix-cache/nix-cache-info").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("--nix-cache-key"), "{body}");
    s.stop().await;
}

#[test]
fn a_missing_or_malformed_key_stops_serve_and_fails_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.secret");
    std::fs::write(&bad, "name:bm90IGEga2V5").unwrap();
    let missing = dir.path().join("missing.secret");
    let storage = dir.path().join("storage");
    for (key, says) in [(&bad, "malformed"), (&missing, "cannot read")] {
        for command in ["check-config", "serve"] {
            let out = Command::new(NIXERY)
                .arg(command)
                .args([
                    "--pkgs-path",
                    "/tmp",
                    "--port",
                    "0",
                    "--listen-address",
                    "127.0.0.1",
                    "--storage-path",
                ])
                .arg(&storage)
                .arg("--nix-cache-key")
                .arg(key)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command}: {stderr}");
            assert!(
                stderr.contains("--nix-cache-key") && stderr.contains(says),
                "{command}: {stderr}"
            );
            assert!(
                !stderr.contains("bm90IGEga2V5"),
                "the key's text is not shown"
            );
        }
    }
}

/// Evicting an image stops serving the paths only it had, and deletes
/// their NARs; a path another image needs stays, NAR and all.
#[test]
fn collection_evicts_an_image_and_its_paths_only() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (secret, _) = make_key(keys.path(), "k");
    let flags = ["--nix-cache-key", secret.as_str()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Every image has cacert (and iana-etc) too.
    let cacert = nix_closure("cacert");
    let hello = [nix_closure("hello"), cacert.clone()].concat();
    let busybox = [nix_closure("busybox"), cacert].concat();
    let only_hello: Vec<&String> = hello.iter().filter(|p| !busybox.contains(p)).collect();
    let shared: Vec<&String> = hello.iter().filter(|p| busybox.contains(p)).collect();
    assert!(!only_hello.is_empty() && !shared.is_empty());
    let narinfo_of = |path: &str| format!("/nix-cache/{}.narinfo", hash_of(path));

    let (total, urls) = rt.block_on(async {
        let s = TestServer::start(&config(dir.path(), &flags)).await;
        let c = Client::new();
        get_manifest(&c, &s, "hello", "latest").await;
        // Pulled later: hello is the least recently pulled.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        get_manifest(&c, &s, "busybox", "latest").await;
        let mut urls = Vec::new();
        for path in hello.iter().chain(&busybox) {
            let (status, info) = get(&c, &s, &narinfo_of(path)).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            urls.push((path.clone(), format!("/nix-cache/{}", field(&info, "URL"))));
        }
        let total = s.builder.blobs().stats().1;
        s.stop().await;
        (total, urls)
    });
    let report = common::run(
        Command::new(NIXERY)
            .args(["gc", "--gc-keep-recent", "0", "--max-storage"])
            // Short of half a megabyte: more than the blobs no image holds
            // (documents about other forms), less than hello's glibc.
            .arg((total - 500_000).to_string())
            .arg("--storage-path")
            .arg(dir.path()),
    );
    assert!(
        report.contains("evicted hello") && !report.contains("evicted busybox"),
        "{report}"
    );

    rt.block_on(async {
        let s = TestServer::start(&config(dir.path(), &flags)).await;
        let c = Client::new();
        for (path, url) in &urls {
            let gone = only_hello.contains(&path);
            let want = if gone {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            assert_eq!(get(&c, &s, url).await.0, want, "NAR of {path}");
            assert_eq!(
                get(&c, &s, &narinfo_of(path)).await.0,
                want,
                "narinfo of {path}"
            );
        }
        // Pulled again, hello's paths are served again.
        get_manifest(&c, &s, "hello", "latest").await;
        for path in &only_hello {
            assert_eq!(
                get(&c, &s, &narinfo_of(path)).await.0,
                StatusCode::OK,
                "{path}"
            );
        }
        s.stop().await;
    });

    // verify checks the NARs kept with the images: a flipped byte is found.
    let (path, url) = urls.iter().find(|(p, _)| busybox.contains(p)).unwrap();
    let b32 = url.rsplit('/').next().unwrap().split('.').next().unwrap();
    let digest =
        nixery::digest::Digest::from_bytes(nixery::nixcache::base32::decode::<32>(b32).unwrap());
    let blob = common::blob_path(dir.path(), &digest.to_string());
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, bytes).unwrap();
    let out = Command::new(NIXERY)
        .arg("verify")
        .arg("--storage-path")
        .arg(dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&digest.hex()),
        "the NAR of {path} is named:\n{text}"
    );
}

/// An image exported with its closures and imported into fresh storage:
/// the mirror (no package source, another key) serves the same narinfos
/// and NARs, and Nix substitutes from it.
#[tokio::test(flavor = "multi_thread")]
async fn export_with_closures_and_import_carry_the_cache() {
    require_tool("nix-store");
    let work = tempfile::tempdir().unwrap();
    let (outside_key, _) = make_key(work.path(), "outside");
    let (inside_key, inside_public) = make_key(work.path(), "inside");
    let outside = work.path().join("outside");
    // Built by a server, whose narinfos are compared below.
    let s = TestServer::start(&config(&outside, &["--nix-cache-key", &outside_key])).await;
    let c = Client::new();
    get_manifest(&c, &s, "hello", "latest").await;
    let closure = [nix_closure("hello"), nix_closure("cacert")].concat();
    let mut before = Vec::new();
    for path in &closure {
        before.push(
            get(&c, &s, &format!("/nix-cache/{}.narinfo", hash_of(path)))
                .await
                .1,
        );
    }
    s.stop().await;

    let tar = work.path().join("media.tar");
    common::run(
        common::nixery_command(&outside, true)
            .args(["export", "--with-closures", "--output"])
            .arg(&tar)
            .arg("hello"),
    );
    let inside = work.path().join("inside");
    let text = common::run(
        common::nixery_command(&inside, false)
            .arg("import")
            .arg(&tar),
    );
    assert!(text.contains("the Nix binary cache serves"), "{text}");

    // The mirror: no package source.
    let mirror_config = {
        let mut config = config(&inside, &["--nix-cache-key", &inside_key]);
        config.source = nixery::build::source::Source::Mirror;
        config
    };
    let s = TestServer::start(&mirror_config).await;
    for (path, outside_info) in closure.iter().zip(&before) {
        let (status, info) = get(&c, &s, &format!("/nix-cache/{}.narinfo", hash_of(path))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {info}");
        for name in [
            "StorePath",
            "URL",
            "FileHash",
            "FileSize",
            "NarHash",
            "NarSize",
            "References",
        ] {
            assert_eq!(
                field(&info, name),
                field(outside_info, name),
                "{path}: {name}"
            );
        }
        assert!(field(&info, "Sig").starts_with("inside:"));
    }
    let store = tempfile::tempdir().unwrap();
    let hello = closure
        .iter()
        .find(|p| p.ends_with("-hello-2.10"))
        .unwrap()
        .clone();
    let out = substitute(&s, store.path(), &inside_public, &[hello]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop().await;
}

/// Two replicas on one bucket: A builds two images, and Nix substitutes
/// one's closure from B (signed, signatures required) with NARs A made;
/// once the bucket's collection evicts that image, neither replica serves
/// the paths only it had, and both still serve those the other has.
#[tokio::test(flavor = "multi_thread")]
async fn every_replica_on_a_bucket_serves_its_images_and_none_an_evicted_one() {
    use common::seaweed::Seaweed;
    use nixery::store::Storage;
    require_tool("nix-store");
    let weed = Seaweed::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = make_key(keys.path(), "bucket-1");
    let replica = |dir: &Path| {
        let mut flags = weed.flags("nixcache");
        flags.extend(["--nix-cache-key".to_owned(), secret.clone()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        config(dir, &flags)
    };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestServer::start(&replica(a_dir.path())).await;
    let b = TestServer::start(&replica(b_dir.path())).await;
    let c = Client::new();
    get_manifest(&c, &a, "hello", "latest").await;
    // Pulled later: hello is the least recently pulled.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    get_manifest(&c, &a, "busybox", "latest").await;
    // A makes the NARs after its builds, in the background.
    a.builder.finish_background().await;

    let cacert = nix_closure("cacert");
    let hello = [nix_closure("hello"), cacert.clone()].concat();
    let busybox = [nix_closure("busybox"), cacert].concat();
    let hello_path = hello.iter().find(|p| p.ends_with("-hello-2.10")).unwrap();
    substitute_hello(&b, &public, hello_path);
    let made_at_b = b
        .builder
        .nix_cache()
        .unwrap()
        .counters
        .nars_made
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(made_at_b, 0, "B served the NARs A made");
    assert!(
        b.builder.db().builds().unwrap().is_empty(),
        "B built nothing"
    );

    // The bucket's collection evicts hello, the least recently pulled.
    let dir = tempfile::tempdir().unwrap();
    let bucket = weed.client("nixcache", dir.path());
    let total: u64 = bucket.list().await.unwrap().iter().map(|(_, n)| n).sum();
    let report = common::run(
        Command::new(NIXERY)
            .args(["gc", "--gc-keep-recent", "0", "--max-storage"])
            .arg((total - 1).to_string())
            .args(weed.flags("nixcache"))
            .env_remove("STORAGE_PATH"),
    );
    assert_eq!(
        report.matches("evicted cached build").count(),
        1,
        "{report}"
    );

    // Each replica follows the bucket within seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for s in [&a, &b] {
            for path in hello.iter().chain(&busybox) {
                let want = if busybox.contains(path) {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                let got = get(&c, s, &format!("/nix-cache/{}.narinfo", hash_of(path)))
                    .await
                    .0;
                if got != want {
                    wrong.push(format!("{}: {path} is {got}", s.addr));
                }
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{wrong:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // Exported with closures by a tool with an empty disk (from the
    // bucket), imported into fresh local storage: the same NARs served.
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("media.tar");
    common::run(
        common::nixery_command(&work.path().join("exporter"), true)
            .args(["export", "--with-closures", "--output"])
            .arg(&tar)
            .arg("busybox")
            .args(weed.flags("nixcache")),
    );
    let inside = work.path().join("inside");
    let text = common::run(
        common::nixery_command(&inside, false)
            .arg("import")
            .arg(&tar),
    );
    assert!(text.contains("the Nix binary cache serves"), "{text}");
    let mirror = TestServer::start(&config(&inside, &["--nix-cache-key", &secret])).await;
    for path in &busybox {
        let narinfo = format!("/nix-cache/{}.narinfo", hash_of(path));
        let (status, there) = get(&c, &mirror, &narinfo).await;
        assert_eq!(status, StatusCode::OK, "{path}: {there}");
        let here = get(&c, &b, &narinfo).await.1;
        for name in ["NarHash", "FileHash", "References", "Deriver"] {
            assert_eq!(field(&there, name), field(&here, name), "{path}: {name}");
        }
    }
    mirror.stop().await;
    // What is left in the bucket is whole, NARs and closures included.
    common::run(
        Command::new(NIXERY)
            .arg("verify")
            .args(weed.flags("nixcache"))
            .env_remove("STORAGE_PATH"),
    );
    a.stop().await;
    b.stop().await;
}

/// An image recorded by a version without the Nix cache (no closure, no
/// path records) is served once the server starts again, without a
/// rebuild; its narinfos name the deriver, which Nix takes in.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_recorded_before_the_cache_is_served_without_a_rebuild() {
    require_tool("nix-store");
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = make_key(keys.path(), "older-1");
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--nix-cache-key", secret.as_str()];
    let s = TestServer::start(&config(dir.path(), &flags)).await;
    let c = Client::new();
    get_manifest(&c, &s, "hello", "latest").await;
    s.stop().await;
    {
        // The stopped server's last blocking tasks may still hold it.
        let mut tries = 0;
        let raw = loop {
            match sled::open(dir.path().join("db")) {
                Ok(db) => break db,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        for tree in ["nix_closures", "nix_paths", "nix_nars", "nix_users"] {
            raw.drop_tree(tree).unwrap();
        }
        raw.flush().unwrap();
    }

    let s = TestServer::start(&config(dir.path(), &flags)).await;
    // The closure is derived at start-up, in the background.
    s.builder.finish_background().await;
    let closure = [nix_closure("hello"), nix_closure("cacert")].concat();
    let hello = closure
        .iter()
        .find(|p| p.ends_with("-hello-2.10"))
        .unwrap()
        .clone();
    let (status, info) = get(&c, &s, &format!("/nix-cache/{}.narinfo", hash_of(&hello))).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    let deriver = nix_store(&["--query", "--deriver", &hello]);
    assert_eq!(field(&info, "Deriver"), deriver.rsplit('/').next().unwrap());
    let store = substitute_hello(&s, &public, &hello);
    let root = store.path().to_str().unwrap();
    assert_eq!(
        nix_store(&["--store", root, "--query", "--deriver", &hello]),
        deriver,
        "Nix took the Deriver line in"
    );
    assert_eq!(s.builder.db().builds().unwrap().len(), 1, "not built again");
    s.stop().await;
}
