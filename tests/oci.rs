//! OCI: manifests by content negotiation, indexes over platforms, and the
//! OCI distribution-spec conformance suite against a real server.

mod common;

use common::TestServer;
use common::{
    error_code, fresh_server, get_blob, get_manifest_as, header, require_tool, LIST_TYPE,
    MANIFEST_TYPE, OCI_INDEX_TYPE, OCI_MANIFEST_TYPE,
};
use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const OCI_CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What a client that wants every form sends, Docker's order.
const ACCEPT_ALL: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

fn digests(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// `name:latest` as a Docker schema2 and as an OCI manifest.
async fn both_forms(c: &Client, s: &TestServer, name: &str) -> ((Digest, Value), (Digest, Value)) {
    let docker = get_manifest_as(c, s, name, "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;
    let oci = get_manifest_as(c, s, name, "latest", OCI_MANIFEST_TYPE, OCI_MANIFEST_TYPE).await;
    (docker, oci)
}

#[tokio::test]
async fn docker_and_oci_forms_share_the_blobs() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let ((docker, dm), (oci, om)) = both_forms(&c, &s, "hello").await;
    assert_ne!(docker, oci, "two documents, two digests");
    assert_eq!(dm["config"]["digest"], om["config"]["digest"]);
    assert_eq!(om["config"]["mediaType"], OCI_CONFIG_TYPE);
    assert_eq!(digests(&dm["layers"]), digests(&om["layers"]));
    for layer in om["layers"].as_array().unwrap() {
        assert_eq!(layer["mediaType"], OCI_LAYER_TYPE);
    }
    // The blobs both name are served.
    get_blob(&c, &s, om["config"]["digest"].as_str().unwrap()).await;
    for d in digests(&om["layers"]) {
        get_blob(&c, &s, &d).await;
    }

    // Without an Accept, or preferring Docker: schema2, as before.
    let r = c
        .get(s.url("/v2/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type"), MANIFEST_TYPE);
    let (d, _) = get_manifest_as(&c, &s, "hello", "latest", ACCEPT_ALL, MANIFEST_TYPE).await;
    assert_eq!(d, docker);
    let weighted = format!("{MANIFEST_TYPE};q=0.5, {OCI_MANIFEST_TYPE}");
    let (d, _) = get_manifest_as(&c, &s, "hello", "latest", &weighted, OCI_MANIFEST_TYPE).await;
    assert_eq!(d, oci);

    // By digest each is served as what it is, whatever the client accepts,
    // with HEAD answering the same headers.
    for (digest, media_type) in [(docker, MANIFEST_TYPE), (oci, OCI_MANIFEST_TYPE)] {
        let by_digest = digest.to_string();
        get_manifest_as(&c, &s, "hello", &by_digest, ACCEPT_ALL, media_type).await;
        let r = c
            .head(s.url(&format!("/v2/hello/manifests/{digest}")))
            .header("accept", MANIFEST_TYPE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), media_type);
        assert_eq!(header(&r, "docker-content-digest"), by_digest);
    }
    s.stop().await;
}

#[tokio::test]
async fn config_has_path_labels_and_the_main_program() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (_, m) = get_manifest_as(&c, &s, "hello", "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;
    let config = common::image_config(&c, &s, &m).await;
    assert_eq!(config["created"], "1970-01-01T00:00:01Z");
    let cmd = config["config"]["Cmd"][0].as_str().unwrap();
    assert!(
        cmd.starts_with("/nix/store/") && cmd.ends_with("-hello-2.10/bin/hello"),
        "{cmd}"
    );
    let env = config["config"]["Env"].as_array().unwrap();
    assert!(env.iter().any(
        |e| e.as_str().unwrap().starts_with("PATH=") && e.as_str().unwrap().ends_with(":/bin")
    ));
    let fixture = common::fixture_dir().canonicalize().unwrap();
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.source"],
        format!("path:{}", fixture.display())
    );

    // Two packages that declare a main program: no default command.
    let (_, m) = get_manifest_as(
        &c,
        &s,
        "hello/busybox",
        "latest",
        MANIFEST_TYPE,
        MANIFEST_TYPE,
    )
    .await;
    let config = common::image_config(&c, &s, &m).await;
    assert!(config["config"].get("Cmd").is_none(), "{config}");
    s.stop().await;
}

#[tokio::test]
async fn an_index_names_one_manifest_per_platform() {
    let (_dir, s) = fresh_server(&["--platforms", "linux/amd64,linux/arm64"]).await;
    let c = Client::new();
    let (index, im) = get_manifest_as(&c, &s, "hello", "latest", ACCEPT_ALL, OCI_INDEX_TYPE).await;
    let entries = im["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{im}");
    let mut layers_seen = Vec::new();
    for (entry, arch) in entries.iter().zip(["amd64", "arm64"]) {
        assert_eq!(entry["platform"]["architecture"], arch);
        assert_eq!(entry["platform"]["os"], "linux");
        assert_eq!(entry["mediaType"], OCI_MANIFEST_TYPE);
        let digest = entry["digest"].as_str().unwrap();
        let (_, m) = get_manifest_as(&c, &s, "hello", digest, ACCEPT_ALL, OCI_MANIFEST_TYPE).await;
        let config: Value = serde_json::from_slice(
            &get_blob(&c, &s, m["config"]["digest"].as_str().unwrap()).await,
        )
        .unwrap();
        assert_eq!(config["architecture"], arch);
        layers_seen.push(digests(&m["layers"]));
    }
    // Nix built each for its own system: the hello layers differ.
    assert_ne!(layers_seen[0], layers_seen[1]);
    // The index is served by its digest too.
    get_manifest_as(
        &c,
        &s,
        "hello",
        &index.to_string(),
        MANIFEST_TYPE,
        OCI_INDEX_TYPE,
    )
    .await;

    // A Docker-only client gets a manifest list of schema2 manifests ...
    let docker_only = format!("{MANIFEST_TYPE}, {LIST_TYPE}");
    let (_, list) = get_manifest_as(&c, &s, "hello", "latest", &docker_only, LIST_TYPE).await;
    let listed = list["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for entry in listed {
        assert_eq!(entry["mediaType"], MANIFEST_TYPE);
        get_manifest_as(
            &c,
            &s,
            "hello",
            entry["digest"].as_str().unwrap(),
            MANIFEST_TYPE,
            MANIFEST_TYPE,
        )
        .await;
    }
    // ... one that takes no index the first platform's manifest, and the
    // arm64 meta-package one arm64 image.
    let (_, single) =
        get_manifest_as(&c, &s, "hello", "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;
    let first = &listed[0]["digest"];
    let (_, amd) = get_manifest_as(
        &c,
        &s,
        "hello",
        first.as_str().unwrap(),
        MANIFEST_TYPE,
        MANIFEST_TYPE,
    )
    .await;
    assert_eq!(single, amd);
    let (_, arm) =
        get_manifest_as(&c, &s, "arm64/hello", "latest", ACCEPT_ALL, MANIFEST_TYPE).await;
    let config = common::image_config(&c, &s, &arm).await;
    assert_eq!(config["architecture"], "arm64");
    s.stop().await;
}

#[tokio::test]
async fn referrers_of_an_unknown_digest_are_an_empty_index() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let d = format!("sha256:{}", "0".repeat(64));
    for query in ["", "?artifactType=application/example"] {
        let (v, filtered) = common::get_referrers(&c, &s, "hello", &d, query).await;
        assert_eq!(filtered, !query.is_empty());
        assert_eq!(v["manifests"], serde_json::json!([]));
    }
    let r = c
        .get(s.url("/v2/Hello/referrers/sha256:zz"))
        .send()
        .await
        .unwrap();
    let (status, err) = error_code(r).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("NAME_INVALID"))
    );
    s.stop().await;
}

/// The conformance checks a pull-only registry serving one tag cannot pass,
/// with the reason.
const IMPOSSIBLE: [(&str, &str); 4] = [
    (
        "GET start of tag is set by `last` query parameter",
        "the suite indexes tagList[len/2 - 1], which panics with the one tag it is given",
    ),
    (
        "GET request to existing blob should yield 200",
        "expects the referrers of a manifest the suite pushed",
    ),
    (
        "GET request to existing blob with filter should yield 200",
        "expects the referrers of a manifest the suite pushed, filtered",
    ),
    (
        "GET request to missing manifest should yield 200",
        "expects one referrer the suite pushed for a manifest that is not there",
    ),
];

/// The conformance suite from ../shared, as CI lays it beside the repo.
fn conformance_run_script() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/oci-conformance/run");
    assert!(
        script.is_file(),
        "{} is missing: the conformance suite comes with shared/",
        script.display()
    );
    script
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_conformance_suite_passes_all_a_pull_only_registry_can() {
    require_tool("xz");
    let script = conformance_run_script();
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    // The suite asks for OCI manifests, so it is given the OCI digest.
    let (digest, m) = get_manifest_as(
        &c,
        &s,
        "hello",
        "latest",
        OCI_MANIFEST_TYPE,
        OCI_MANIFEST_TYPE,
    )
    .await;
    let blob = m["config"]["digest"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    // The suite binary is unpacked here, never into shared/.
    let unpack = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/oci-conformance");
    std::fs::create_dir_all(&unpack).unwrap();
    let url = format!("http://{}", s.addr);
    let out_dir = out.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(&script)
            .args([&url, "hello", "latest", &digest.to_string(), &blob])
            .arg(&out_dir)
            .env("TMPDIR", &unpack)
            .output()
            .expect("the conformance suite runs")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let _ = std::fs::create_dir_all(common::artifacts_dir());
    let _ = std::fs::write(common::artifacts_dir().join("oci-conformance.txt"), &text);

    let failed: BTreeSet<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("[FAIL]") || l.starts_with("[PANICKED!]")
        })
        .filter_map(|l| l.split_once("[It] ").map(|(_, name)| name.trim()))
        .collect();
    let expected: BTreeSet<&str> = IMPOSSIBLE.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        failed, expected,
        "failures other than the impossible ones:\n{text}"
    );
    assert!(
        text.contains("Ran 22 of 79 Specs") && text.contains("18 Passed | 4 Failed"),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn digests_are_the_same_on_another_server() {
    let c = Client::new();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (_dir, s) = fresh_server(&[]).await;
        let ((docker, _), (oci, _)) = both_forms(&c, &s, "hello").await;
        seen.push((docker, oci));
        s.stop().await;
    }
    assert_eq!(seen[0], seen[1], "fixed `created`, so rebuilt images match");
}
