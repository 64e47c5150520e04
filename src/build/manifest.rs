//! The image config and its Docker schema2 manifest (the formats
//! themselves are `crate::oci`'s).
//!
//! The config is serialised from structs with a fixed field order and a
//! fixed `created` time, so the same layers and config always give the
//! same bytes and therefore the same digests.

use crate::digest::Digest;
use crate::oci::manifest::{image_manifest, Document};
use crate::oci::{Format, OciError};
use serde::Serialize;
use std::collections::BTreeMap;

/// The image config's `created`: fixed, so rebuilding gives the same digest.
pub const CREATED: &str = "1970-01-01T00:00:01Z";

/// Architectures images are built for, in Docker's (GOARCH) spelling.
pub const ARCHITECTURES: [&str; 2] = ["amd64", "arm64"];

/// A layer as stored in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the compressed blob, as served.
    pub digest: Digest,
    /// Digest of the uncompressed tar, which the config lists.
    pub diff_id: Digest,
    /// Size of the compressed blob in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `"amd64"` or `"arm64"`.
    pub architecture: String,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    /// Sorted by key, so the bytes do not depend on insertion order.
    pub labels: BTreeMap<String, String>,
}

/// The serialised config and the Docker schema2 manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub config: Document,
    pub manifest: Document,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("unsupported architecture {0:?}; expected one of amd64, arm64")]
    UnsupportedArchitecture(String),
    #[error("serialising image metadata: {0}")]
    Serialise(#[from] serde_json::Error),
    #[error(transparent)]
    Oci(#[from] OciError),
}

// Field order here is the serialised order; keep it stable, digests
// depend on it.
#[derive(Serialize)]
struct ConfigDoc<'a> {
    created: &'static str,
    architecture: &'a str,
    os: &'static str,
    config: RunConfig<'a>,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(rename = "Env")]
    env: &'a [String],
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
    #[serde(rename = "Labels", skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<Digest>,
}

/// Serialises the config and the Docker manifest for `layers`, base-most
/// first.
pub fn build(config: &ImageConfig, layers: &[LayerBlob]) -> Result<BuiltImage, ManifestError> {
    if !ARCHITECTURES.contains(&config.architecture.as_str()) {
        return Err(ManifestError::UnsupportedArchitecture(
            config.architecture.clone(),
        ));
    }
    let config_doc = Document::of(serde_json::to_vec(&ConfigDoc {
        created: CREATED,
        architecture: &config.architecture,
        os: "linux",
        config: RunConfig {
            env: &config.env,
            cmd: config.cmd.as_deref(),
            labels: &config.labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id).collect(),
        },
    })?);
    let manifest = image_manifest(
        Format::Docker,
        config_doc.json.len() as u64,
        config_doc.digest,
        layers.iter().map(|l| (l.size, l.digest)),
    )?;
    Ok(BuiltImage {
        manifest,
        config: config_doc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{
        convert, index, is_manifest, media_type_of, referenced_blobs, PlatformManifest,
    };
    use crate::oci::media::*;
    use serde_json::{json, Value};

    fn blob(n: u8) -> LayerBlob {
        LayerBlob {
            digest: Digest::of(&[n]),
            diff_id: Digest::of(&[n, n]),
            size: 1000 + u64::from(n),
        }
    }

    fn config() -> ImageConfig {
        ImageConfig {
            architecture: "amd64".into(),
            env: vec!["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt".into()],
            cmd: Some(vec!["/bin/sh".into(), "-c".into()]),
            labels: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
        }
    }

    #[test]
    fn config_has_the_image_spec_shape() {
        let layers = [blob(1), blob(2)];
        let image = build(&config(), &layers).unwrap();
        let v: Value = serde_json::from_slice(&image.config.json).unwrap();
        assert_eq!(
            v,
            json!({
                "created": CREATED,
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"],
                    "Cmd": ["/bin/sh", "-c"],
                    "Labels": {"a": "1", "b": "2"},
                },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [
                        Digest::of(&[1, 1]).to_string(),
                        Digest::of(&[2, 2]).to_string(),
                    ],
                },
            })
        );
        // Fixed field order, not just the same fields.
        let text = String::from_utf8(image.config.json).unwrap();
        assert!(text.starts_with(
            r#"{"created":"1970-01-01T00:00:01Z","architecture":"amd64","os":"linux","config":{"Env":"#
        ));
        assert!(text.contains(r#""Labels":{"a":"1","b":"2"}"#), "{text}");
    }

    #[test]
    fn cmd_is_omitted_when_absent() {
        let mut c = config();
        c.cmd = None;
        let image = build(&c, &[blob(1)]).unwrap();
        let v: Value = serde_json::from_slice(&image.config.json).unwrap();
        assert!(v["config"].get("Cmd").is_none());
        assert_eq!(v["config"]["Env"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn manifest_has_the_schema2_shape() {
        let layers = [blob(3), blob(1), blob(2)];
        let image = build(&config(), &layers).unwrap();
        let v: Value = serde_json::from_slice(&image.manifest.json).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(v["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(v["config"]["digest"], image.config.digest.to_string());
        assert_eq!(
            v["config"]["size"].as_u64(),
            Some(image.config.json.len() as u64)
        );
        let listed = v["layers"].as_array().unwrap();
        assert_eq!(listed.len(), 3);
        // In the order given, not re-sorted.
        for (entry, layer) in listed.iter().zip(&layers) {
            assert_eq!(entry["mediaType"], LAYER_MEDIA_TYPE);
            assert_eq!(entry["digest"], layer.digest.to_string());
            assert_eq!(entry["size"].as_u64(), Some(layer.size));
        }
    }

    #[test]
    fn stored_manifests_are_recognised_and_read() {
        let built = build(&config(), &[blob(1), blob(2)]).unwrap();
        assert!(is_manifest(&built.manifest.json));
        assert!(!is_manifest(&built.config.json));
        assert!(!is_manifest(b"{\"schemaVersion\":2,\"mediaType\":\""));
        let named = referenced_blobs(&built.manifest.json).unwrap();
        assert_eq!(named.len(), 3);
        assert_eq!(
            named[0],
            (built.config.digest, built.config.json.len() as u64)
        );
        assert_eq!(named[1], (blob(1).digest, blob(1).size));
        assert_eq!(referenced_blobs(b"{}"), None);
    }

    #[test]
    fn digests_are_sha256_of_the_bytes() {
        let image = build(&config(), &[blob(1)]).unwrap();
        assert_eq!(image.config.digest, Digest::of(&image.config.json));
        assert_eq!(image.manifest.digest, Digest::of(&image.manifest.json));
    }

    #[test]
    fn output_is_deterministic() {
        let layers = [blob(1), blob(2)];
        let a = build(&config(), &layers).unwrap();
        let b = build(&config(), &layers).unwrap();
        assert_eq!(a, b);
        let reordered = build(&config(), &[blob(2), blob(1)]).unwrap();
        assert_ne!(a.manifest.digest, reordered.manifest.digest);
    }

    #[test]
    fn oci_form_shares_the_blobs_under_oci_types() {
        let layers = [blob(1), blob(2)];
        let image = build(&config(), &layers).unwrap();
        let oci = convert(&image.manifest.json, Format::Oci).unwrap();
        assert_eq!(oci.digest, Digest::of(&oci.json));
        assert_ne!(oci.digest, image.manifest.digest);
        let v: Value = serde_json::from_slice(&oci.json).unwrap();
        assert_eq!(v["mediaType"], OCI_MANIFEST_MEDIA_TYPE);
        assert_eq!(v["config"]["mediaType"], OCI_CONFIG_MEDIA_TYPE);
        assert_eq!(v["config"]["digest"], image.config.digest.to_string());
        for (entry, layer) in v["layers"].as_array().unwrap().iter().zip(&layers) {
            assert_eq!(entry["mediaType"], OCI_LAYER_MEDIA_TYPE);
            assert_eq!(entry["digest"], layer.digest.to_string());
        }
        // Converting back gives the Docker bytes exactly.
        let back = convert(&oci.json, Format::Docker).unwrap();
        assert_eq!(back.json, image.manifest.json);
        assert_eq!(
            media_type_of(&oci.json).as_deref(),
            Some(OCI_MANIFEST_MEDIA_TYPE)
        );
        assert_eq!(
            media_type_of(&image.manifest.json).as_deref(),
            Some(MANIFEST_MEDIA_TYPE)
        );
    }

    #[test]
    fn index_names_one_manifest_per_platform() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let entries = [
            PlatformManifest {
                architecture: "amd64",
                digest: a,
                size: 10,
            },
            PlatformManifest {
                architecture: "arm64",
                digest: b,
                size: 20,
            },
        ];
        for format in [Format::Oci, Format::Docker] {
            let doc = index(format, &entries).unwrap();
            let v: Value = serde_json::from_slice(&doc.json).unwrap();
            assert_eq!(v["mediaType"], format.index_type());
            let listed = v["manifests"].as_array().unwrap();
            assert_eq!(listed.len(), 2);
            assert_eq!(listed[1]["mediaType"], format.manifest_type());
            assert_eq!(listed[1]["digest"], b.to_string());
            assert_eq!(listed[1]["size"], 20);
            assert_eq!(
                listed[1]["platform"],
                json!({"architecture": "arm64", "os": "linux"})
            );
        }
    }

    #[test]
    fn arm64_is_accepted_and_others_rejected() {
        let mut c = config();
        c.architecture = "arm64".into();
        assert!(build(&c, &[]).is_ok());
        c.architecture = "x86_64".into();
        assert!(matches!(
            build(&c, &[]),
            Err(ManifestError::UnsupportedArchitecture(a)) if a == "x86_64"
        ));
    }
}
