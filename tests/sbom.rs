//! Bills of materials: SPDX and CycloneDX documents attached to each image
//! as OCI artifact manifests and listed by the referrers API, checked with
//! the SPDX and CycloneDX projects' own validators and against Nix.

mod common;

use common::{fresh_server, get_blob, get_manifest_as, header, MANIFEST_TYPE, OCI_INDEX_TYPE};
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
    let r = c
        .get(s.url(&format!("/v2/hello/referrers/{subject}{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), OCI_INDEX_TYPE);
    let filtered = r.headers().get("oci-filters-applied").is_some();
    (
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
        filtered,
    )
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
