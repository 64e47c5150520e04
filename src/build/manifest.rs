//! The image config and Docker schema2 manifest for a built image.
//!
//! Both are serialised from structs with a fixed field order and no
//! timestamps, so the same layers and config always give the same bytes and
//! therefore the same digests.

use crate::digest::Digest;
use serde::Serialize;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

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
}

/// The serialised config and manifest, with their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub config_json: Vec<u8>,
    pub config_digest: Digest,
    pub manifest_json: Vec<u8>,
    pub manifest_digest: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("unsupported architecture {0:?}; expected one of amd64, arm64")]
    UnsupportedArchitecture(String),
    #[error("serialising image metadata: {0}")]
    Serialise(#[from] serde_json::Error),
}

// Field order here is the serialised order; keep it stable, digests
// depend on it.
#[derive(Serialize)]
struct ConfigDoc<'a> {
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
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<Digest>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    size: u64,
    digest: Digest,
}

/// Whether a blob is a manifest this registry wrote (they all start alike).
pub fn is_manifest(blob: &[u8]) -> bool {
    let prefix = br#"{"schemaVersion":2,"mediaType":""#;
    blob.starts_with(prefix) && blob[prefix.len()..].starts_with(MANIFEST_MEDIA_TYPE.as_bytes())
}

/// Manifests are far smaller: a few hundred bytes a layer.
pub const MANIFEST_MAX_BYTES: u64 = 64 * 1024;

/// The config and layer blobs a stored manifest names, with their sizes;
/// `None` if the bytes are not such a manifest (damaged).
pub fn referenced_blobs(manifest_json: &[u8]) -> Option<Vec<(Digest, u64)>> {
    let doc: serde_json::Value = serde_json::from_slice(manifest_json).ok()?;
    let descriptor = |d: &serde_json::Value| -> Option<(Digest, u64)> {
        Some((d["digest"].as_str()?.parse().ok()?, d["size"].as_u64()?))
    };
    let mut blobs = vec![descriptor(&doc["config"])?];
    for layer in doc["layers"].as_array()? {
        blobs.push(descriptor(layer)?);
    }
    Some(blobs)
}

/// Serialises the config and the manifest for `layers`, base-most first.
pub fn build(config: &ImageConfig, layers: &[LayerBlob]) -> Result<BuiltImage, ManifestError> {
    if !ARCHITECTURES.contains(&config.architecture.as_str()) {
        return Err(ManifestError::UnsupportedArchitecture(
            config.architecture.clone(),
        ));
    }
    let config_json = serde_json::to_vec(&ConfigDoc {
        architecture: &config.architecture,
        os: "linux",
        config: RunConfig {
            env: &config.env,
            cmd: config.cmd.as_deref(),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id).collect(),
        },
    })?;
    let config_digest = Digest::of(&config_json);

    let manifest_json = serde_json::to_vec(&ManifestDoc {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE,
            size: config_json.len() as u64,
            digest: config_digest,
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: LAYER_MEDIA_TYPE,
                size: l.size,
                digest: l.digest,
            })
            .collect(),
    })?;
    let manifest_digest = Digest::of(&manifest_json);

    Ok(BuiltImage {
        config_json,
        config_digest,
        manifest_json,
        manifest_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    #[test]
    fn config_has_the_image_spec_shape() {
        let layers = [blob(1), blob(2)];
        let image = build(&config(), &layers).unwrap();
        let v: Value = serde_json::from_slice(&image.config_json).unwrap();
        assert_eq!(
            v,
            json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"],
                    "Cmd": ["/bin/sh", "-c"],
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
        let text = String::from_utf8(image.config_json).unwrap();
        assert!(text.starts_with(r#"{"architecture":"amd64","os":"linux","config":{"Env":"#));
    }

    #[test]
    fn cmd_is_omitted_when_absent() {
        let mut c = config();
        c.cmd = None;
        let image = build(&c, &[blob(1)]).unwrap();
        let v: Value = serde_json::from_slice(&image.config_json).unwrap();
        assert!(v["config"].get("Cmd").is_none());
        assert_eq!(v["config"]["Env"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn manifest_has_the_schema2_shape() {
        let layers = [blob(3), blob(1), blob(2)];
        let image = build(&config(), &layers).unwrap();
        let v: Value = serde_json::from_slice(&image.manifest_json).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(v["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(v["config"]["digest"], image.config_digest.to_string());
        assert_eq!(
            v["config"]["size"].as_u64(),
            Some(image.config_json.len() as u64)
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
        assert!(is_manifest(&built.manifest_json));
        assert!(!is_manifest(&built.config_json));
        assert!(!is_manifest(b"{\"schemaVersion\":2,\"mediaType\":\""));
        let named = referenced_blobs(&built.manifest_json).unwrap();
        assert_eq!(named.len(), 3);
        assert_eq!(
            named[0],
            (built.config_digest, built.config_json.len() as u64)
        );
        assert_eq!(named[1], (blob(1).digest, blob(1).size));
        assert_eq!(referenced_blobs(b"{}"), None);
    }

    #[test]
    fn digests_are_sha256_of_the_bytes() {
        let image = build(&config(), &[blob(1)]).unwrap();
        assert_eq!(image.config_digest, Digest::of(&image.config_json));
        assert_eq!(image.manifest_digest, Digest::of(&image.manifest_json));
    }

    #[test]
    fn output_is_deterministic() {
        let layers = [blob(1), blob(2)];
        let a = build(&config(), &layers).unwrap();
        let b = build(&config(), &layers).unwrap();
        assert_eq!(a, b);
        let reordered = build(&config(), &[blob(2), blob(1)]).unwrap();
        assert_ne!(a.manifest_digest, reordered.manifest_digest);
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
