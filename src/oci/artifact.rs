//! Artifact manifests (image-spec 1.1: an `artifactType`, the empty
//! config, the content as layers, and a `subject` naming the manifest they
//! refer to) and the referrers index that lists them (distribution-spec
//! 1.1, `GET /v2/<name>/referrers/<digest>`).

use super::manifest::{Descriptor, Document};
use super::media::{OCI_EMPTY_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE};
use super::OciError;
use crate::digest::Digest;
use serde::Serialize;
use std::collections::BTreeMap;

/// The empty config's bytes (`{}`), stored as a blob like any other.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// The image-spec annotation naming a layer's file.
pub const TITLE: &str = "org.opencontainers.image.title";

/// A descriptor with what artifact manifests and referrer listings add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactDescriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

// Field order is the serialised order; keep it stable, digests depend on it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactDoc<'a> {
    schema_version: u32,
    media_type: &'static str,
    artifact_type: &'a str,
    config: Descriptor,
    layers: Vec<ArtifactDescriptor>,
    subject: &'a Descriptor,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// The artifact manifest of type `artifact_type` whose one layer is
/// `content` (a stored blob) and whose subject is `subject`.
pub fn artifact_manifest(
    artifact_type: &str,
    content: ArtifactDescriptor,
    subject: &Descriptor,
    annotations: &BTreeMap<String, String>,
) -> Result<Document, OciError> {
    let doc = ArtifactDoc {
        schema_version: 2,
        media_type: OCI_MANIFEST_MEDIA_TYPE,
        artifact_type,
        config: Descriptor {
            media_type: OCI_EMPTY_MEDIA_TYPE.to_owned(),
            size: EMPTY_CONFIG.len() as u64,
            digest: Digest::of(EMPTY_CONFIG),
        },
        layers: vec![content],
        subject,
        annotations,
    };
    Ok(Document::of(serde_json::to_vec(&doc)?))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrersDoc<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: &'a [ArtifactDescriptor],
}

/// The referrers index listing `referrers` (already filtered).
pub fn referrers_index(referrers: &[ArtifactDescriptor]) -> Result<Vec<u8>, OciError> {
    Ok(serde_json::to_vec(&ReferrersDoc {
        schema_version: 2,
        media_type: OCI_INDEX_MEDIA_TYPE,
        manifests: referrers,
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{named_by, Named};
    use serde_json::Value;

    #[test]
    fn an_artifact_names_its_subject_and_content() {
        let subject = Descriptor {
            media_type: OCI_MANIFEST_MEDIA_TYPE.into(),
            size: 7,
            digest: Digest::of(b"subject"),
        };
        let content = ArtifactDescriptor {
            media_type: "application/spdx+json".into(),
            digest: Digest::of(b"doc"),
            size: 3,
            artifact_type: None,
            annotations: BTreeMap::from([(TITLE.into(), "sbom.spdx.json".into())]),
        };
        let doc = artifact_manifest(
            "application/spdx+json",
            content.clone(),
            &subject,
            &BTreeMap::new(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&doc.json).unwrap();
        assert_eq!(v["artifactType"], "application/spdx+json");
        assert_eq!(v["config"]["mediaType"], OCI_EMPTY_MEDIA_TYPE);
        assert_eq!(
            v["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(v["subject"]["digest"], subject.digest.to_string());
        assert_eq!(v["layers"][0]["annotations"][TITLE], "sbom.spdx.json");
        assert!(v.get("annotations").is_none());
        assert_eq!(
            named_by(&doc.json),
            Some(Named::Artifact {
                subject: subject.digest,
                blobs: vec![(Digest::of(EMPTY_CONFIG), 2), (content.digest, 3)],
            })
        );
        let listed = referrers_index(&[]).unwrap();
        let v: Value = serde_json::from_slice(&listed).unwrap();
        assert_eq!(v["mediaType"], OCI_INDEX_MEDIA_TYPE);
        assert_eq!(v["manifests"], serde_json::json!([]));
    }
}
