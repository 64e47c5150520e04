//! Bills of materials: SPDX and CycloneDX documents attached to each image
//! as OCI artifact manifests and listed by the referrers API, checked with
//! the SPDX and CycloneDX projects' own validators and against Nix.

mod common;

use common::{fresh_server, get_blob, get_manifest_as, MANIFEST_TYPE, OCI_INDEX_TYPE};
use common::{TestServer, OCI_MANIFEST_TYPE};
use nixery::build::sbom::nar_hash_hex;
use nixery::digest::Digest;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const SPDX: &str = "application/spdx+json";
const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
const VENV: &str = "/opt/nixery-test-venv/bin";

async fn referrers(c: &Client, s: &TestServer, subject: &Digest, query: &str) -> (Value, bool) {
    common::get_referrers(c, s, "hello", &subject.to_string(), query).await
}

/// The artifact manifest of `artifact_type` among `listed`, fetched by
/// digest, and the document it carries.
async fn document(
    c: &Client,
    s: &TestServer,
    listed: &Value,
    artifact_type: &str,
    subject: &Digest,
) -> (Value, Vec<u8>) {
    let entry = listed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == artifact_type)
        .unwrap_or_else(|| panic!("no {artifact_type} in {listed}"));
    assert_eq!(entry["mediaType"], OCI_MANIFEST_TYPE);
    let digest = entry["digest"].as_str().unwrap();
    let r = c
        .get(s.url(&format!("/v2/hello/manifests/{digest}")))
        .header("accept", OCI_MANIFEST_TYPE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    assert_eq!(Digest::of(&bytes).to_string(), digest);
    assert_eq!(entry["size"].as_u64(), Some(bytes.len() as u64));
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(m["artifactType"], artifact_type);
    assert_eq!(m["subject"]["digest"], subject.to_string());
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    get_blob(c, s, m["config"]["digest"].as_str().unwrap()).await;
    let layer = &m["layers"][0];
    assert_eq!(layer["mediaType"], artifact_type);
    let doc = get_blob(c, s, layer["digest"].as_str().unwrap()).await;
    (m, doc)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-deps)"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn validate(dir: &Path, spdx: &[u8], cyclonedx: &[u8]) {
    let spdx_file = dir.join("sbom.spdx.json");
    std::fs::write(&spdx_file, spdx).unwrap();
    run(Command::new(format!("{VENV}/pyspdxtools"))
        .arg("-i")
        .arg(&spdx_file));
    let cdx_file = dir.join("sbom.cdx.json");
    std::fs::write(&cdx_file, cyclonedx).unwrap();
    let script = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
if errors:
    sys.exit(f"invalid CycloneDX 1.6: {errors!r}")
"#;
    run(Command::new(format!("{VENV}/python"))
        .args(["-c", script])
        .arg(&cdx_file));
}

/// The SPDX document as an OCI client library (oras-py) fetches it: the
/// referrers index through the client's own requests, then `pull` of the
/// artifact manifest, which writes its layer under its title.
async fn pulled_by_oras(s: &TestServer, subject: &Digest, dir: &Path) -> Vec<u8> {
    let script = r#"
import sys, oras.client
host, subject, out = sys.argv[1:4]
c = oras.client.OrasClient(hostname=host, insecure=True)
r = c.do_request(f"http://{host}/v2/hello/referrers/{subject}?artifactType=application%2Fspdx%2Bjson", "GET")
r.raise_for_status()
listed = r.json()["manifests"]
assert len(listed) == 1, listed
print(c.pull(target=f"{host}/hello@{listed[0]['digest']}", outdir=out))
"#;
    let out = dir.join("oras");
    let mut cmd = Command::new(format!("{VENV}/python"));
    cmd.args(["-c", script])
        .arg(s.addr.to_string())
        .arg(subject.to_string())
        .arg(&out);
    // Off the test's runtime, which also runs the server.
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    std::fs::read(out.join("sbom.spdx.json")).expect("oras wrote the layer under its title")
}

#[tokio::test]
async fn an_index_lists_each_platforms_documents() {
    let (_dir, s) = fresh_server(&["--platforms", "linux/amd64,linux/arm64"]).await;
    let c = Client::new();
    let accept = format!("{OCI_INDEX_TYPE}, {OCI_MANIFEST_TYPE}");
    let (index, im) = get_manifest_as(&c, &s, "hello", "latest", &accept, OCI_INDEX_TYPE).await;
    let (listed, _) = referrers(&c, &s, &index, "").await;
    let entries = listed["manifests"].as_array().unwrap();
    let mut seen: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["artifactType"].as_str().unwrap().to_owned(),
                e["annotations"]["org.nixery.platform"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(String, String)> = [SPDX, CYCLONEDX]
        .iter()
        .flat_map(|t| ["linux/amd64", "linux/arm64"].map(|p| (t.to_string(), p.to_string())))
        .collect();
    assert_eq!(seen, want);
    let (spdx_only, filtered) =
        referrers(&c, &s, &index, "?artifactType=application/spdx%2Bjson").await;
    assert!(filtered);
    assert_eq!(spdx_only["manifests"].as_array().unwrap().len(), 2);
    // Each platform's document is the one its own manifest carries, and
    // names that platform.
    for child in im["manifests"].as_array().unwrap() {
        let arch = child["platform"]["architecture"].as_str().unwrap();
        let digest: Digest = child["digest"].as_str().unwrap().parse().unwrap();
        let (own, _) = referrers(&c, &s, &digest, "?artifactType=application/spdx%2Bjson").await;
        let (_, doc) = document(&c, &s, &own, SPDX, &digest).await;
        let from_index = spdx_only["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["annotations"]["org.nixery.platform"] == format!("linux/{arch}"))
            .unwrap()
            .clone();
        let one = serde_json::json!({ "manifests": [from_index] });
        let (_, via_index) = document(&c, &s, &one, SPDX, &index).await;
        assert_eq!(doc, via_index);
        let v: Value = serde_json::from_slice(&doc).unwrap();
        assert!(
            v["name"]
                .as_str()
                .unwrap()
                .ends_with(&format!("(linux/{arch})")),
            "{}",
            v["name"]
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn every_image_has_validated_bills_of_materials_listing_its_closure() {
    let (dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (docker, _) =
        get_manifest_as(&c, &s, "hello", "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;

    let (listed, filtered) = referrers(&c, &s, &docker, "").await;
    assert!(!filtered);
    assert_eq!(listed["manifests"].as_array().unwrap().len(), 2, "{listed}");
    let (_, spdx) = document(&c, &s, &listed, SPDX, &docker).await;
    let (_, cdx) = document(&c, &s, &listed, CYCLONEDX, &docker).await;
    validate(dir.path(), &spdx, &cdx);
    assert_eq!(pulled_by_oras(&s, &docker, dir.path()).await, spdx);

    // Filtering: one type, and a type nothing has.
    let (only, filtered) =
        referrers(&c, &s, &docker, "?artifactType=application/spdx%2Bjson").await;
    assert!(filtered);
    let types: Vec<&Value> = only["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["artifactType"])
        .collect();
    assert_eq!(types, [SPDX]);
    let (none, filtered) = referrers(&c, &s, &docker, "?artifactType=application/example").await;
    assert!(filtered);
    assert_eq!(none["manifests"], serde_json::json!([]));

    // Exactly the closure, with Nix's NAR hashes.
    let spdx_bytes = spdx.clone();
    let spdx: Value = serde_json::from_slice(&spdx).unwrap();
    let cdx: Value = serde_json::from_slice(&cdx).unwrap();
    let roots: Vec<String> = cdx["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["ref"] == "image")
        .unwrap()["dependsOn"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roots.len(), 3, "hello, cacert, iana-etc: {roots:?}");
    let closure: BTreeSet<String> = run(Command::new("nix-store").arg("-qR").args(&roots))
        .lines()
        .map(str::to_owned)
        .collect();
    let cdx_paths: BTreeSet<String> = cdx["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bom-ref"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cdx_paths, closure);
    let spdx_packages = spdx["packages"].as_array().unwrap();
    let spdx_paths: BTreeSet<String> = spdx_packages
        .iter()
        .filter_map(|p| p["packageFileName"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(spdx_paths, closure);
    for p in spdx_packages
        .iter()
        .filter(|p| p["packageFileName"].is_string())
    {
        let path = p["packageFileName"].as_str().unwrap();
        let nix_hash = run(Command::new("nix-store").args(["-q", "--hash", path]));
        assert_eq!(
            p["checksums"][0]["checksumValue"].as_str(),
            nar_hash_hex(nix_hash.trim()).as_deref(),
            "{path}"
        );
        if path.ends_with("-hello-2.10") {
            assert_eq!(p["licenseDeclared"], "GPL-3.0-or-later");
            assert_eq!(p["homepage"], "https://www.gnu.org/software/hello/");
            assert_eq!(p["versionInfo"], "2.10");
        } else {
            assert_eq!(p["licenseDeclared"], "NOASSERTION");
        }
    }

    // The OCI form has referrers of its own over the same documents.
    let (oci, _) = get_manifest_as(
        &c,
        &s,
        "hello",
        "latest",
        OCI_MANIFEST_TYPE,
        OCI_MANIFEST_TYPE,
    )
    .await;
    let (listed_oci, _) = referrers(&c, &s, &oci, "").await;
    assert_eq!(listed_oci["manifests"].as_array().unwrap().len(), 2);
    let (_, doc) = document(&c, &s, &listed_oci, SPDX, &oci).await;
    assert_eq!(doc, spdx_bytes);

    // Unknown digests: an empty index.
    let (empty, _) = referrers(&c, &s, &Digest::of(b"nothing"), "").await;
    assert_eq!(empty["manifests"], serde_json::json!([]));
    s.stop().await;

    // The same store paths on a fresh storage: the same bytes.
    let (_dir2, s2) = fresh_server(&[]).await;
    let (docker2, _) =
        get_manifest_as(&c, &s2, "hello", "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;
    assert_eq!(docker2, docker);
    let (listed2, _) = referrers(&c, &s2, &docker2, "").await;
    assert_eq!(
        listed2, listed,
        "byte-identical documents, same artifact digests"
    );
    s2.stop().await;
}

fn stored(storage: &Path, digest: &Digest) -> bool {
    let hex = digest.hex();
    storage
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(&hex)
        .exists()
}

#[test]
fn documents_travel_through_export_and_import_and_go_with_their_image() {
    let outside = tempfile::tempdir().unwrap();
    let inside = tempfile::tempdir().unwrap();
    let sbom = |storage: &Path, with_source: bool, format: &str| -> Vec<u8> {
        run(common::nixery_command(storage, with_source)
            .args(["sbom", "hello", "--format", format]));
        let out = common::nixery_command(storage, with_source)
            .args(["sbom", "hello", "--format", format])
            .output()
            .unwrap();
        out.stdout
    };
    let spdx = sbom(outside.path(), true, "spdx");
    let cdx = sbom(outside.path(), true, "cyclonedx");
    let v: Value = serde_json::from_slice(&spdx).unwrap();
    assert_eq!(v["spdxVersion"], "SPDX-2.3");
    let v: Value = serde_json::from_slice(&cdx).unwrap();
    assert_eq!(v["specVersion"], "1.6");

    let layout = outside.path().join("layout");
    run(common::nixery_command(outside.path(), true)
        .args(["export", "--output"])
        .arg(&layout)
        .arg("hello"));
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let artifacts: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["artifactType"].is_string())
        .collect();
    // Both documents, for the Docker and the OCI manifest each.
    assert_eq!(artifacts.len(), 4, "{index}");

    run(common::nixery_command(inside.path(), false)
        .arg("import")
        .arg(&layout));
    assert_eq!(sbom(inside.path(), false, "spdx"), spdx);
    assert_eq!(sbom(inside.path(), false, "cyclonedx"), cdx);
    run(common::nixery_command(inside.path(), false).arg("verify"));

    // Evicted outside: its documents and artifact manifests go with it.
    // Imported inside: never evicted, so they stay.
    let documents = [Digest::of(&spdx), Digest::of(&cdx)];
    let manifests: Vec<Digest> = artifacts
        .iter()
        .map(|a| a["digest"].as_str().unwrap().parse().unwrap())
        .collect();
    for storage in [outside.path(), inside.path()] {
        for d in documents.iter().chain(&manifests) {
            assert!(stored(storage, d), "{d} in {}", storage.display());
        }
        run(common::nixery_command(storage, false).args([
            "gc",
            "--max-storage",
            "1",
            "--gc-keep-recent",
            "0",
        ]));
    }
    for d in documents.iter().chain(&manifests) {
        assert!(!stored(outside.path(), d), "{d} outlived its image");
        assert!(stored(inside.path(), d), "{d} went with its image kept");
    }
    assert_eq!(sbom(inside.path(), false, "spdx"), spdx);
}

#[tokio::test]
async fn an_image_cached_without_documents_gets_them_when_asked() {
    // As for an image cached by an older version: nothing made after the
    // build.
    let (dir, s) = fresh_server(&["--no-sbom"]).await;
    let c = Client::new();
    let (docker, _) =
        get_manifest_as(&c, &s, "hello", "latest", MANIFEST_TYPE, MANIFEST_TYPE).await;
    assert!(s.builder.db().referrers(&docker).unwrap().is_none());
    let (listed, _) = referrers(&c, &s, &docker, "").await;
    assert_eq!(listed["manifests"].as_array().unwrap().len(), 2, "{listed}");
    let (_, spdx) = document(&c, &s, &listed, SPDX, &docker).await;
    let (_, cdx) = document(&c, &s, &listed, CYCLONEDX, &docker).await;
    validate(dir.path(), &spdx, &cdx);
    let v: Value = serde_json::from_slice(&spdx).unwrap();
    // The package set is not evaluated again: no licenses declared.
    for p in v["packages"].as_array().unwrap() {
        assert_eq!(p["licenseDeclared"], "NOASSERTION");
    }
    s.stop().await;
}
