//! The image config, its manifest in Docker schema2 and OCI form, and the
//! index (or Docker manifest list) naming one manifest per platform.
//!
//! All are serialised from structs with a fixed field order and a fixed
//! `created` time, so the same layers and config always give the same bytes
//! and therefore the same digests. The OCI manifest is a pure function of
//! the Docker one (same config and layer blobs, OCI media types), so either
//! can be made from the other's record.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const LIST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The image config's `created`: fixed, so rebuilding gives the same digest.
pub const CREATED: &str = "1970-01-01T00:00:01Z";

/// Architectures images are built for, in Docker's (GOARCH) spelling.
pub const ARCHITECTURES: [&str; 2] = ["amd64", "arm64"];

/// The two manifest vocabularies a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => MANIFEST_MEDIA_TYPE,
            Format::Oci => OCI_MANIFEST_MEDIA_TYPE,
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Format::Docker => LIST_MEDIA_TYPE,
            Format::Oci => OCI_INDEX_MEDIA_TYPE,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Format::Docker => CONFIG_MEDIA_TYPE,
            Format::Oci => OCI_CONFIG_MEDIA_TYPE,
        }
    }

    fn layer_type(self) -> &'static str {
        match self {
            Format::Docker => LAYER_MEDIA_TYPE,
            Format::Oci => OCI_LAYER_MEDIA_TYPE,
        }
    }
}

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
    /// `uid:gid` to run as; none for root.
    pub user: Option<String>,
    pub cmd: Option<Vec<String>>,
    /// Sorted by key, so the bytes do not depend on insertion order.
    pub labels: BTreeMap<String, String>,
}

/// Serialised JSON and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub json: Vec<u8>,
    pub digest: Digest,
}

impl Document {
    fn of(json: Vec<u8>) -> Self {
        let digest = Digest::of(&json);
        Document { json, digest }
    }
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
    #[serde(rename = "User", skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
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

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    size: u64,
    digest: Digest,
}

/// Whether a blob is a manifest this registry wrote (they all start alike).
pub fn is_manifest(blob: &[u8]) -> bool {
    let prefix = br#"{"schemaVersion":2,"mediaType":""#;
    blob.starts_with(prefix) && blob[prefix.len()..].starts_with(MANIFEST_MEDIA_TYPE.as_bytes())
}

/// Blobs at most this large are looked at when searching the blob store
/// for manifests: a few hundred bytes a layer, within the layer budget.
pub const MANIFEST_SCAN_BYTES: u64 = 64 * 1024;

/// What a stored manifest or index names, each with its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// An image manifest: its config, then its layers.
    Image(Vec<(Digest, u64)>),
    /// An index or manifest list: its manifests.
    Index(Vec<(Digest, u64)>),
}

impl Named {
    pub fn blobs(&self) -> &[(Digest, u64)] {
        match self {
            Named::Image(b) | Named::Index(b) => b,
        }
    }
}

/// What a stored manifest or index names; `None` if the bytes are neither
/// (damaged).
pub fn named_by(json: &[u8]) -> Option<Named> {
    let doc: serde_json::Value = serde_json::from_slice(json).ok()?;
    let descriptor = |d: &serde_json::Value| -> Option<(Digest, u64)> {
        Some((d["digest"].as_str()?.parse().ok()?, d["size"].as_u64()?))
    };
    let list = |items: &serde_json::Value| -> Option<Vec<(Digest, u64)>> {
        items.as_array()?.iter().map(descriptor).collect()
    };
    if doc.get("manifests").is_some() {
        return list(&doc["manifests"]).map(Named::Index);
    }
    let mut blobs = vec![descriptor(&doc["config"])?];
    blobs.extend(list(&doc["layers"])?);
    Some(Named::Image(blobs))
}

/// The config and layer blobs a stored manifest names, with their sizes;
/// `None` if the bytes are not such a manifest (damaged).
pub fn referenced_blobs(manifest_json: &[u8]) -> Option<Vec<(Digest, u64)>> {
    match named_by(manifest_json)? {
        Named::Image(blobs) => Some(blobs),
        Named::Index(_) => None,
    }
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
            user: config.user.as_deref(),
            env: &config.env,
            cmd: config.cmd.as_deref(),
            labels: &config.labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id).collect(),
        },
    })?);
    let manifest = manifest_doc(
        Format::Docker,
        config_doc.json.len() as u64,
        config_doc.digest,
        layers.iter().map(|l| (l.size, l.digest)),
    );
    Ok(BuiltImage {
        manifest: Document::of(serde_json::to_vec(&manifest)?),
        config: config_doc,
    })
}

fn manifest_doc(
    format: Format,
    config_size: u64,
    config_digest: Digest,
    layers: impl Iterator<Item = (u64, Digest)>,
) -> ManifestDoc {
    ManifestDoc {
        schema_version: 2,
        media_type: format.manifest_type().to_owned(),
        config: Descriptor {
            media_type: format.config_type().to_owned(),
            size: config_size,
            digest: config_digest,
        },
        layers: layers
            .map(|(size, digest)| Descriptor {
                media_type: format.layer_type().to_owned(),
                size,
                digest,
            })
            .collect(),
    }
}

/// The same image as `docker_json` (a manifest this module wrote) in
/// `format`: the same config and layer blobs under that format's media
/// types.
pub fn convert(docker_json: &[u8], format: Format) -> Result<Document, ManifestError> {
    let doc: ManifestDoc = serde_json::from_slice(docker_json)?;
    let converted = manifest_doc(
        format,
        doc.config.size,
        doc.config.digest,
        doc.layers.iter().map(|l| (l.size, l.digest)),
    );
    Ok(Document::of(serde_json::to_vec(&converted)?))
}

/// One platform's manifest, as an index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformManifest<'a> {
    pub architecture: &'a str,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<IndexEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry<'a> {
    media_type: &'static str,
    size: u64,
    digest: Digest,
    platform: Platform<'a>,
}

#[derive(Serialize)]
struct Platform<'a> {
    architecture: &'a str,
    os: &'static str,
}

/// An OCI image index or Docker manifest list of `manifests`, each of
/// which must be in `format`.
pub fn index(format: Format, manifests: &[PlatformManifest]) -> Result<Document, ManifestError> {
    let doc = IndexDoc {
        schema_version: 2,
        media_type: format.index_type(),
        manifests: manifests
            .iter()
            .map(|m| IndexEntry {
                media_type: format.manifest_type(),
                size: m.size,
                digest: m.digest,
                platform: Platform {
                    architecture: m.architecture,
                    os: "linux",
                },
            })
            .collect(),
    };
    Ok(Document::of(serde_json::to_vec(&doc)?))
}

/// An empty OCI image index: the referrers of anything in this registry,
/// which takes no pushes.
pub fn empty_index() -> &'static [u8] {
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#
}

/// The `mediaType` a stored manifest or index declares (every one this
/// module writes has one), for the Content-Type it is served with.
pub fn media_type_of(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        media_type: String,
    }
    serde_json::from_slice::<Typed>(json)
        .ok()
        .map(|t| t.media_type)
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
            user: Some("1000:1000".into()),
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
                    "User": "1000:1000",
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
            r#"{"created":"1970-01-01T00:00:01Z","architecture":"amd64","os":"linux","config":{"User":"1000:1000","Env":"#
        ));
        assert!(text.contains(r#""Labels":{"a":"1","b":"2"}"#), "{text}");
    }

    #[test]
    fn cmd_and_user_are_omitted_when_absent() {
        let mut c = config();
        c.cmd = None;
        c.user = None;
        let image = build(&c, &[blob(1)]).unwrap();
        let v: Value = serde_json::from_slice(&image.config.json).unwrap();
        assert!(v["config"].get("Cmd").is_none());
        assert!(v["config"].get("User").is_none());
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
        let empty: Value = serde_json::from_slice(empty_index()).unwrap();
        assert_eq!(empty["mediaType"], OCI_INDEX_MEDIA_TYPE);
        assert_eq!(empty["manifests"], json!([]));
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
