//! Images behave like a distribution's: a user database, a home, and the
//! `nonroot` meta-package (issue 18), with docker running them, and an
//! upgraded server rebuilding images cached before.

mod common;

use common::{
    config, docker, fresh_server, get_blob, get_manifest, image_config, layer_digests, out_path,
    require_tool, Binary, TestServer,
};
use flate2::read::GzDecoder;
use nixery::store::db::{Db, LayerRecord, ManifestRecord};
use reqwest::Client;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

/// Runs `args` in a container of `image` with no network; its stdout lines.
fn docker_lines(options: &[&str], image: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec!["run", "--rm", "--network", "none"];
    all.extend_from_slice(options);
    all.push(image);
    all.extend_from_slice(args);
    docker(&all).lines().map(str::to_owned).collect()
}

#[test]
fn docker_runs_as_root_with_names_for_root_and_nobody() {
    require_tool("docker");
    let server = Binary::start();
    let shell = server.image("shell");
    docker(&["pull", &shell]);
    let got = docker_lines(
        &[],
        &shell,
        &[
            "sh",
            "-c",
            "whoami; id -un; id -gn; echo $HOME $LANG; test -d ~ && echo home",
        ],
    );
    assert_eq!(got, ["root", "root", "root", "/root C.UTF-8", "home"]);
    let got = docker_lines(
        &["--user", "65534:65534"],
        &shell,
        &["sh", "-c", "whoami; id -gn"],
    );
    assert_eq!(got, ["nobody", "nogroup"]);
    let got = docker_lines(&["--user", "65534"], &shell, &["whoami"]);
    assert_eq!(got, ["nobody"]);
    let user = docker(&["inspect", "--format", "{{json .Config.User}}", &shell]);
    assert_eq!(user.trim(), r#""""#);
    let _ = Command::new("docker").args(["rmi", "-f", &shell]).output();
}

#[test]
fn docker_runs_nonroot_images_as_a_user_with_a_writable_home() {
    require_tool("docker");
    let server = Binary::start();
    let nonroot = server.image("shell/nonroot");
    docker(&["pull", &nonroot]);
    let got = docker_lines(
        &[],
        &nonroot,
        &[
            "sh",
            "-c",
            "id -u; id -un; id -gn; echo $HOME; touch ~/x && echo ok; touch /tmp/y && echo tmp",
        ],
    );
    assert_eq!(got, ["1000", "user", "user", "/home/user", "ok", "tmp"]);
    let user = docker(&["inspect", "--format", "{{json .Config.User}}", &nonroot]);
    assert_eq!(user.trim(), r#""1000:1000""#);

    // git takes its default identity from the passwd entry, and writes
    // its config to $HOME. Without the entry it fails, naming `unknown`.
    let git = server.image("shell/git/nonroot");
    docker(&["pull", &git]);
    let got = docker_lines(
        &["--hostname", "box.example"],
        &git,
        &[
            "sh",
            "-c",
            "git config --global user.name Someone && test -s /home/user/.gitconfig && git var GIT_COMMITTER_IDENT",
        ],
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("Someone <user@box.example> "), "{got:?}");
    let _ = Command::new("docker")
        .args(["rmi", "-f", &nonroot, &git])
        .output();
}

/// The members of a layer blob: name -> (uid, gid, mode, content).
fn layer_members(blob: &[u8]) -> BTreeMap<String, (u64, u64, u32, Vec<u8>)> {
    let mut archive = tar::Archive::new(GzDecoder::new(blob));
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let h = entry.header();
        let meta = (h.uid().unwrap(), h.gid().unwrap(), h.mode().unwrap());
        let name = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        out.insert(name, (meta.0, meta.1, meta.2, content));
    }
    out
}

/// The symlink layer (the last) of an image.
async fn symlink_layer(c: &Client, s: &TestServer, manifest: &Value) -> Vec<u8> {
    let last = layer_digests(manifest).pop().expect("a layer");
    get_blob(c, s, &last).await
}

#[tokio::test]
async fn nonroot_images_are_reproducible_and_share_every_layer_with_root_ones() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (root_digest, root) = get_manifest(&c, &s, "shell", "latest").await;
    let (nonroot_digest, nonroot) = get_manifest(&c, &s, "shell/nonroot", "latest").await;
    assert_ne!(root_digest, nonroot_digest);
    // Only the config differs: the user database is the same in both.
    assert_eq!(layer_digests(&root), layer_digests(&nonroot));
    let (reordered, _) = get_manifest(&c, &s, "nonroot/shell", "latest").await;
    assert_eq!(reordered, nonroot_digest);

    let config = image_config(&c, &s, &nonroot).await;
    assert_eq!(config["config"]["User"], "1000:1000");
    let env = config["config"]["Env"].as_array().unwrap();
    for wanted in [
        "HOME=/home/user",
        "LANG=C.UTF-8",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
    ] {
        assert!(env.contains(&Value::from(wanted)), "{env:?}");
    }
    assert!(env.iter().any(|e| e.as_str().unwrap().starts_with("PATH=")));
    let config = image_config(&c, &s, &root).await;
    assert!(config["config"].get("User").is_none(), "{config}");
    assert!(config["config"]["Env"]
        .as_array()
        .unwrap()
        .contains(&Value::from("HOME=/root")));

    let members = layer_members(&symlink_layer(&c, &s, &root).await);
    let passwd = String::from_utf8(members["etc/passwd"].3.clone()).unwrap();
    assert!(
        passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"),
        "{passwd}"
    );
    assert!(passwd.contains("\nuser:x:1000:1000:user:/home/user:/bin/sh\n"));
    assert!(passwd.contains("\nnobody:x:65534:65534:"));
    let nsswitch = String::from_utf8(members["etc/nsswitch.conf"].3.clone()).unwrap();
    assert!(nsswitch.contains("hosts: files dns\n"), "{nsswitch}");
    assert_eq!(members["home/user/"].0, 1000);
    assert_eq!(members["home/user/"].1, 1000);
    assert_eq!(members["root/"].0, 0);
    assert_eq!(members["tmp/"].2, 0o1777);
    assert_eq!(members["etc/group"].0, 0);

    // An image without a shell: nobody logs in to a shell it lacks.
    let (_, hello) = get_manifest(&c, &s, "hello", "latest").await;
    let members = layer_members(&symlink_layer(&c, &s, &hello).await);
    let passwd = String::from_utf8(members["etc/passwd"].3.clone()).unwrap();
    assert!(
        passwd.starts_with("root:x:0:0:root:/root:/sbin/nologin\n"),
        "{passwd}"
    );
    s.stop().await;

    // Another server, another disk: the same digests.
    let (_dir2, s2) = fresh_server(&[]).await;
    let (again, _) = get_manifest(&c, &s2, "shell/nonroot", "latest").await;
    assert_eq!(again, nonroot_digest);
    let (again, _) = get_manifest(&c, &s2, "shell", "latest").await;
    assert_eq!(again, root_digest);
    s2.stop().await;
}

/// As the builder derives cache keys: each part, then a NUL.
fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// A database written before the user database came: its image key
/// (`image-v3`) and symlink layer key (`symlink-layer-v1`) name images and
/// layers without `/etc/passwd`. An upgraded server must build anew rather
/// than serve them.
#[tokio::test]
async fn an_upgraded_server_rebuilds_images_cached_before_the_user_database() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new();
    let s = TestServer::start(&config(dir.path(), &[])).await;
    // Stand-ins for what an older server cached: another image's manifest
    // and a layer that is not a symlink layer, both stored.
    let (old_manifest, hello) = get_manifest(&c, &s, "hello", "latest").await;
    let hello_config = image_config(&c, &s, &hello).await;
    let old_layer = LayerRecord {
        digest: hello["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        diff_id: hello_config["rootfs"]["diff_ids"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        size: hello["layers"][0]["size"].as_u64().unwrap(),
    };
    let source = s.builder.source().describe();
    s.stop().await;

    let db = Db::open(&dir.path().join("db")).unwrap();
    let shell_packages = "bashInteractive\ncacert\ncoreutils\niana-etc\nmoreutils\nnano";
    let image_key = key(&["image-v3", &source, "", "x86_64-linux", shell_packages]);
    let record = ManifestRecord {
        digest: old_manifest,
        checked_at: u64::MAX / 2,
        out_paths: Vec::new(),
        revision: None,
    };
    db.put_manifest(&image_key, &record).unwrap();
    let outs = ["cacert", "coreutils", "iana-etc"].map(out_path).join("\n");
    let layer_key = key(&[
        "symlink-layer-v1",
        nixery::build::archive::LAYER_FORMAT,
        &outs,
    ]);
    db.put_layer(&layer_key, &old_layer).unwrap();
    db.flush_blocking().unwrap();
    drop(db);

    let s = TestServer::start(&config(dir.path(), &[])).await;
    let (_, coreutils) = get_manifest(&c, &s, "coreutils", "latest").await;
    let last = layer_digests(&coreutils).pop().unwrap();
    assert_ne!(
        last,
        old_layer.digest.to_string(),
        "the old symlink layer was reused"
    );
    let members = layer_members(&get_blob(&c, &s, &last).await);
    assert!(members.contains_key("etc/passwd"));
    assert!(members.contains_key("bin/whoami"));
    let (digest, shell) = get_manifest(&c, &s, "shell", "latest").await;
    assert_ne!(digest, old_manifest, "the image cached before was served");
    let members = layer_members(&symlink_layer(&c, &s, &shell).await);
    assert!(members.contains_key("etc/passwd"));
    s.stop().await;
}
