//! Image manifests (Docker schema2 and OCI), indexes (and Docker manifest
//! lists), and what a stored one names.
//!
//! All are serialised from structs with a fixed field order, so the same
//! blobs always give the same bytes and therefore the same digests. The
//! OCI manifest is a pure function of the Docker one (same config and
//! layer blobs, OCI media types), so either can be made from the other's
//! record.

use super::media::{Format, MANIFEST_MEDIA_TYPE};
use super::OciError;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// Serialised JSON and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub json: Vec<u8>,
    pub digest: Digest,
}

impl Document {
    pub fn of(json: Vec<u8>) -> Self {
        let digest = Digest::of(&json);
        Document { json, digest }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// A blob as a manifest names it (no annotations: none are written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub size: u64,
    pub digest: Digest,
}

/// Whether a blob is a manifest this registry wrote (they all start alike).
pub fn is_manifest(blob: &[u8]) -> bool {
    let prefix = br#"{"schemaVersion":2,"mediaType":""#;
    blob.starts_with(prefix) && blob[prefix.len()..].starts_with(MANIFEST_MEDIA_TYPE.as_bytes())
}

/// Blobs at most this large are looked at when searching the blob store
/// for manifests: a few hundred bytes a layer, within the layer budget.
pub const MANIFEST_SCAN_BYTES: u64 = 64 * 1024;

/// More than any manifest this server writes; a bound on reading one whole.
pub const MANIFEST_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// What a stored manifest or index names, each with its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// An image manifest: its config, then its layers.
    Image(Vec<(Digest, u64)>),
    /// An index or manifest list: its manifests.
    Index(Vec<(Digest, u64)>),
    /// An artifact manifest (one with a `subject`): its config and layers.
    /// It is kept as long as its subject, by the referrers record (see
    /// `store::db::ReferrersRecord`), not by what it names.
    Artifact {
        subject: Digest,
        blobs: Vec<(Digest, u64)>,
    },
}

impl Named {
    pub fn blobs(&self) -> &[(Digest, u64)] {
        match self {
            Named::Image(b) | Named::Index(b) | Named::Artifact { blobs: b, .. } => b,
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
    match doc.get("subject") {
        Some(subject) => Some(Named::Artifact {
            subject: descriptor(subject)?.0,
            blobs,
        }),
        None => Some(Named::Image(blobs)),
    }
}

/// The config and layer blobs a stored manifest names, with their sizes;
/// `None` if the bytes are not such a manifest (damaged).
pub fn referenced_blobs(manifest_json: &[u8]) -> Option<Vec<(Digest, u64)>> {
    match named_by(manifest_json)? {
        Named::Image(blobs) => Some(blobs),
        Named::Index(_) | Named::Artifact { .. } => None,
    }
}

/// The image manifest in `format` naming the config and `layers` (size
/// and digest each), base-most first.
pub fn image_manifest(
    format: Format,
    config_size: u64,
    config_digest: Digest,
    layers: impl Iterator<Item = (u64, Digest)>,
) -> Result<Document, OciError> {
    let doc = manifest_doc(format, config_size, config_digest, layers);
    Ok(Document::of(serde_json::to_vec(&doc)?))
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
pub fn convert(docker_json: &[u8], format: Format) -> Result<Document, OciError> {
    let doc: ManifestDoc = serde_json::from_slice(docker_json)?;
    image_manifest(
        format,
        doc.config.size,
        doc.config.digest,
        doc.layers.iter().map(|l| (l.size, l.digest)),
    )
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
pub fn index(format: Format, manifests: &[PlatformManifest]) -> Result<Document, OciError> {
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
