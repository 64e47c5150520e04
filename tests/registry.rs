//! The registry API against a real server, real Nix and the fixture set.

mod common;

use common::{
    config, error_code, fresh_server, get_blob, get_manifest, header, nix_closure, TestServer,
    MANIFEST_TYPE,
};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::collections::HashSet;

#[tokio::test]
async fn base_errors_and_grammar() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();

    for path in ["/v2/", "/v2"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "docker-distribution-api-version"),
            "registry/2.0"
        );
    }
    let r = c.head(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let cases = [
        ("/nope", StatusCode::NOT_FOUND, "UNSUPPORTED"),
        ("/v2/hello/other/thing", StatusCode::NOT_FOUND, "UNSUPPORTED"),
        ("/v2/Hello/manifests/latest", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a..b/manifests/latest", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        // Not a tag, so no manifest has it (the conformance suite wants 404).
        ("/v2/hello/manifests/-bad", StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        ("/v2/hello/manifests/.INVALID_MANIFEST_NAME", StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        ("/v2/hello/blobs/sha256:1234", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/hello/referrers/sha256:1234", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        // Well-formed digests of other algorithms are unknown, not invalid.
        ("/v2/hello/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        (
            "/v2/hello/manifests/sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/hello/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            "/v2/hello/manifests/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (path, status, code) in cases {
        let r = c.get(s.url(path)).send().await.unwrap();
        let (got, err) = error_code(r).await;
        assert_eq!(
            (got, err["code"].as_str().unwrap()),
            (status, code),
            "{path}"
        );
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // HEAD errors carry a Content-Length and no body.
    let r = c
        .head(s.url("/v2/hello/blobs/sha256:1234"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(header(&r, "content-length").parse::<u64>().unwrap() > 0);
    // Writes are refused with the error envelope.
    let r = c
        .put(s.url("/v2/hello/manifests/latest"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("UNSUPPORTED"))
    );
    s.stop().await;
}

#[tokio::test]
async fn builds_serves_and_reuses_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let c = Client::new();

    let (digest, manifest) = get_manifest(&c, &s, "shell/hello", "latest").await;
    assert_eq!(manifest["mediaType"], MANIFEST_TYPE);

    // Config: architecture, Env and Cmd.
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let image: Value = serde_json::from_slice(&get_blob(&c, &s, config_digest).await).unwrap();
    assert_eq!(image["architecture"], "amd64");
    assert_eq!(image["os"], "linux");
    assert!(image["config"]["Env"]
        .as_array()
        .unwrap()
        .contains(&Value::from("SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt")));
    assert_eq!(image["config"]["Cmd"], serde_json::json!(["bash"]));

    // Every layer is served, and its size matches the manifest.
    let layers = manifest["layers"].as_array().unwrap();
    assert!(layers.len() >= 2);
    assert_eq!(
        image["rootfs"]["diff_ids"].as_array().unwrap().len(),
        layers.len()
    );
    for layer in layers {
        let d = layer["digest"].as_str().unwrap();
        let blob = get_blob(&c, &s, d).await;
        assert_eq!(blob.len() as u64, layer["size"].as_u64().unwrap());
    }

    // Order of components does not matter; the manifest is also served by digest.
    let (again, _) = get_manifest(&c, &s, "hello/shell", "latest").await;
    assert_eq!(again, digest);
    let r = c
        .get(s.url(&format!("/v2/shell/hello/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), MANIFEST_TYPE);
    assert_eq!(header(&r, "docker-content-digest"), digest.to_string());

    // HEAD: headers and Content-Length, no body.
    let r = c
        .head(s.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let len: usize = header(&r, "content-length").parse().unwrap();
    assert_eq!(header(&r, "docker-content-digest"), digest.to_string());
    assert!(len > 0);
    assert!(r.bytes().await.unwrap().is_empty());

    // Tags.
    let tags = c
        .get(s.url("/v2/shell/hello/tags/list"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let tags: Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"name": "shell/hello", "tags": ["latest"]})
    );

    // A second image shares the layers of the store paths both contain.
    let (_, other) = get_manifest(&c, &s, "hello/coreutils", "latest").await;
    let first: HashSet<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let shared = other["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| first.contains(l["digest"].as_str().unwrap()))
        .count();
    assert!(shared >= 1, "images with common store paths share layers");
    let builds = s.builder.db().builds().unwrap();
    assert_eq!(
        builds.len(),
        2,
        "the second pull of shell/hello was a cache hit"
    );
    assert!(builds[0].layers_reused >= 1);
    // Finished builds let go of their GC roots.
    let roots = std::fs::read_dir(dir.path().join("gcroots"))
        .unwrap()
        .count();
    assert_eq!(roots, 0);
    s.stop().await;

    // A restart on the same storage serves the image without building.
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let (after, _) = get_manifest(&c, &s, "shell/hello", "latest").await;
    assert_eq!(after, digest);
    assert_eq!(s.builder.db().builds().unwrap().len(), 2);
    s.stop().await;

    // And with the cache expired it evaluates again, finds the same store
    // paths and keeps the same manifest.
    let s = TestServer::start(&config(dir.path(), &["--cache-ttl", "0"])).await;
    let (rebuilt, _) = get_manifest(&c, &s, "shell/hello", "latest").await;
    assert_eq!(rebuilt, digest);
    s.stop().await;
}

#[tokio::test]
async fn unknown_packages_and_failed_builds() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();

    let r = c
        .get(s.url("/v2/hello/nosuchpkg/tools.nope/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["code"], "MANIFEST_UNKNOWN");
    assert_eq!(
        err["detail"]["packages"],
        serde_json::json!(["nosuchpkg", "tools.nope"])
    );
    assert!(err["message"].as_str().unwrap().contains("nosuchpkg"));

    let r = c
        .get(s.url("/v2/broken/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert!(status.is_server_error());
    assert_eq!(err["code"], "UNKNOWN");
    assert!(!err["message"].as_str().unwrap().contains("/nix/store"));
    let builds = s.builder.db().builds().unwrap();
    match &builds[0].outcome {
        nixery::store::db::BuildOutcome::Failed { stderr_tail, .. } => {
            assert!(
                stderr_tail.contains("fixture"),
                "stderr kept: {stderr_tail}"
            )
        }
        other => panic!("unexpected outcome {other:?}"),
    }
    s.stop().await;
}

#[tokio::test]
async fn lookup_rules_and_arm64() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    // Dotted path, lowercase fallback, digit prefix.
    get_manifest(&c, &s, "tools.xev/bashinteractive/1password", "latest").await;
    let (_, m) = get_manifest(&c, &s, "arm64/hello", "latest").await;
    let config = common::image_config(&c, &s, &m).await;
    assert_eq!(config["architecture"], "arm64");
    s.stop().await;
}

#[tokio::test]
async fn ranges_on_blobs() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (_, m) = get_manifest(&c, &s, "hello", "latest").await;
    let d = m["layers"][0]["digest"].as_str().unwrap();
    let full = get_blob(&c, &s, d).await;
    let n = full.len();
    let url = s.url(&format!("/v2/hello/blobs/{d}"));

    let r = c
        .get(&url)
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), format!("bytes 0-9/{n}"));
    assert_eq!(r.bytes().await.unwrap(), &full[..10]);

    let r = c
        .get(&url)
        .header("Range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), &full[n - 5..]);

    let r = c
        .get(&url)
        .header("Range", format!("bytes={n}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range"), format!("bytes */{n}"));
    assert_eq!(header(&r, "content-type"), "application/json");

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(header(&r, "content-length"), n.to_string());
    assert!(r.bytes().await.unwrap().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn parallel_pulls_share_one_build() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let url = s.url("/v2/coreutils/hello/manifests/latest");
    let pulls = (0..6).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    });
    let digests: HashSet<String> = futures::future::join_all(pulls).await.into_iter().collect();
    assert_eq!(digests.len(), 1);
    assert_eq!(s.builder.db().builds().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn large_closures_stay_within_the_layer_budget() {
    let dir = tempfile::tempdir().unwrap();
    let closure = nix_closure("manydeps");
    assert!(closure.len() > 100);
    let popularity: serde_json::Map<String, Value> = closure
        .iter()
        .map(|p| {
            (
                nixery::build::store_path::name_of(p).to_owned(),
                Value::from(1000),
            )
        })
        .collect();
    let pop_file = dir.path().join("popularity.json");
    std::fs::write(&pop_file, serde_json::to_vec(&popularity).unwrap()).unwrap();
    let c = Client::new();
    // The default strategy: without popularity data every path would be a
    // layer of its own, more than the budget allows.
    let storage = dir.path().join("default");
    let s = TestServer::start(&config(&storage, &[])).await;
    let (_, m) = get_manifest(&c, &s, "manydeps", "latest").await;
    let layers = m["layers"].as_array().unwrap().len();
    assert_eq!(layers, 95, "94 store-path layers and the symlink layer");
    s.stop().await;

    // The original's: popular paths get layers of their own, so with every
    // dependency popular the image needs more layers than the budget allows.
    let storage = dir.path().join("storage");
    let s = TestServer::start(&config(
        &storage,
        &[
            "--popularity-url",
            pop_file.to_str().unwrap(),
            "--layering",
            "nixery",
        ],
    ))
    .await;
    let (_, m) = get_manifest(&c, &s, "manydeps", "latest").await;
    let layers = m["layers"].as_array().unwrap().len();
    assert_eq!(layers, 95, "94 store-path layers and the symlink layer");
    s.stop().await;

    // Without popularity data the dependencies share their dominator's layer.
    let plain = dir.path().join("plain");
    let s = TestServer::start(&config(&plain, &["--layering", "nixery"])).await;
    let (_, m) = get_manifest(&c, &s, "manydeps", "latest").await;
    assert!(m["layers"].as_array().unwrap().len() < 10);
    s.stop().await;
}

/// Polls `/api/status` until `ready` holds for its `in_flight` list.
async fn wait_for_in_flight(
    c: &Client,
    s: &TestServer,
    what: &str,
    ready: impl Fn(&[Value]) -> bool,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let body = c
            .get(s.url("/api/status"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let status: Value = serde_json::from_slice(&body).unwrap();
        let in_flight = status["in_flight"].as_array().cloned().unwrap_or_default();
        if ready(&in_flight) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw {what}: {in_flight:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn builds_beyond_the_limit_wait_their_turn() {
    let (_dir, s) = fresh_server(&["--max-concurrent-builds", "1"]).await;
    let c = Client::new();
    let pull = |name: &str| {
        let c = c.clone();
        let url = s.url(&format!("/v2/{name}/manifests/latest"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    };
    // `sleepy` builds for 10 s and is new on every evaluation.
    let slow = pull("sleepy");
    let phase_of = |in_flight: &[Value], image: &str| {
        in_flight
            .iter()
            .find(|b| b["image"] == image)
            .map(|b| b["phase"].as_str().unwrap_or_default().to_owned())
    };
    wait_for_in_flight(&c, &s, "sleepy building", |f| {
        phase_of(f, "sleepy").as_deref() == Some("building")
    })
    .await;
    let queued = pull("hello");
    wait_for_in_flight(&c, &s, "hello queued behind sleepy", |f| {
        phase_of(f, "hello").as_deref() == Some("queued")
            && phase_of(f, "sleepy").as_deref() == Some("building")
    })
    .await;
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(queued.await.unwrap(), StatusCode::OK);
    s.stop().await;
}
