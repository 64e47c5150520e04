//! OCI image layouts (image-spec `image-layout.md`): `oci-layout`,
//! `index.json` and `blobs/sha256/<hex>`, as `nixery export` writes them.
//!
//! The builder stores Docker schema2 manifests; OCI tools (umoci) want OCI
//! media types. The layout's manifests are each image's OCI form, the bytes
//! the registry serves to a client that asks for OCI (same config and layer
//! blobs). Each index entry also names the Docker manifest (a blob of the
//! layout too) in an annotation, so that an import serves exactly the
//! bytes, and so the digests, that the outside served. An image exported
//! for several platforms is an index entry naming a nested OCI index (a
//! blob), whose entries are those manifests, each with its `platform`.

use super::Image;
use crate::digest::Digest;
use crate::oci::manifest;
use crate::oci::media::{
    OCI_INDEX_MEDIA_TYPE as OCI_INDEX, OCI_MANIFEST_MEDIA_TYPE as OCI_MANIFEST,
};
use crate::oci::Format;
use crate::store::fs::{BlobError, BlobStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The image-spec annotation that names an index entry (`NAME:TAG`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// On an index entry (or a nested index's): the digest of the Docker
/// manifest its OCI manifest was made from.
pub const DOCKER_MANIFEST: &str = "org.nixery.docker-manifest";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Io(#[from] super::FileError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("blob {0} is not in the store (run `nixery verify`)")]
    MissingBlob(Digest),
    #[error("manifest {digest} cannot be converted to OCI: {message}")]
    Convert { digest: Digest, message: String },
    #[error("manifest {digest} cannot be read: {source}")]
    Manifest {
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
}

use super::file_err as io_err;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// In an image's index: the platform of the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// A Docker schema2 or OCI image manifest: what import and verify read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    pub fn parse(digest: &Digest, bytes: &[u8]) -> Result<Manifest, LayoutError> {
        serde_json::from_slice(bytes).map_err(|source| LayoutError::Manifest {
            digest: *digest,
            source,
        })
    }

    /// The config and the layers.
    pub fn references(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

impl Index {
    fn of(manifests: Vec<Descriptor>) -> Index {
        Index {
            schema_version: 2,
            media_type: OCI_INDEX.to_owned(),
            manifests,
        }
    }
}

fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        annotations: BTreeMap::new(),
        platform: None,
    }
}

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub blobs: usize,
    pub bytes: u64,
}

/// Writes `images` into the layout directory `dir`; blobs already there
/// are kept, so a blob shared by several images is written once. An image
/// with several platforms is an OCI index (a blob) over each platform's
/// OCI manifest.
pub fn write(blobs: &BlobStore, images: &[Image], dir: &Path) -> Result<Written, LayoutError> {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).map_err(io_err("creating", &blob_dir))?;
    let mut w = Writer {
        blobs,
        blob_dir,
        written: Written::default(),
        seen: BTreeSet::new(),
    };
    let mut entries = Vec::new();
    for image in images {
        let mut entry = if image.platforms.is_empty() {
            w.manifest(&image.digest)?
        } else {
            let mut children = Vec::new();
            for (arch, digest) in &image.platforms {
                let mut child = w.manifest(digest)?;
                child.platform = Some(Platform {
                    architecture: arch.docker().to_owned(),
                    os: "linux".to_owned(),
                });
                children.push(child);
            }
            let json = to_json(serde_json::to_vec(&Index::of(children)))?;
            let digest = Digest::of(&json);
            w.new_file(&digest, &json)?;
            descriptor(OCI_INDEX, digest, json.len() as u64)
        };
        entry
            .annotations
            .insert(REF_NAME.to_owned(), image.image.to_string());
        entries.push(entry);
    }
    let index_json = to_json(serde_json::to_vec_pretty(&Index::of(entries)))?;
    write_file(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    // Last: a layout with an index is complete.
    write_file(&dir.join("index.json"), &index_json)?;
    Ok(w.written)
}

fn to_json(encoded: serde_json::Result<Vec<u8>>) -> Result<Vec<u8>, LayoutError> {
    encoded.map_err(|source| LayoutError::Manifest {
        digest: Digest::of(b""),
        source,
    })
}

/// The blobs of a layout being written, and what was written.
struct Writer<'a> {
    blobs: &'a BlobStore,
    blob_dir: PathBuf,
    written: Written,
    seen: BTreeSet<Digest>,
}

impl Writer<'_> {
    /// Writes the Docker manifest `digest`, its blobs and its OCI form;
    /// the OCI manifest's descriptor, naming the Docker manifest.
    fn manifest(&mut self, digest: &Digest) -> Result<Descriptor, LayoutError> {
        let docker_bytes = read(self.blobs, digest)?;
        let docker = Manifest::parse(digest, &docker_bytes)?;
        for d in std::iter::once(*digest).chain(docker.references().map(|r| r.digest)) {
            if self.seen.insert(d) {
                self.written.bytes += write_blob(self.blobs, &self.blob_dir, &d)?;
                self.written.blobs += 1;
            }
        }
        let oci =
            manifest::convert(&docker_bytes, Format::Oci).map_err(|e| LayoutError::Convert {
                digest: *digest,
                message: e.to_string(),
            })?;
        self.new_file(&oci.digest, &oci.json)?;
        let mut entry = descriptor(OCI_MANIFEST, oci.digest, oci.json.len() as u64);
        entry
            .annotations
            .insert(DOCKER_MANIFEST.to_owned(), digest.to_string());
        Ok(entry)
    }

    /// Writes a blob made here (not from the store), once.
    fn new_file(&mut self, digest: &Digest, bytes: &[u8]) -> Result<(), LayoutError> {
        if self.seen.insert(*digest) {
            write_file(&self.blob_dir.join(digest.hex()), bytes)?;
            self.written.blobs += 1;
            self.written.bytes += bytes.len() as u64;
        }
        Ok(())
    }
}

fn read(blobs: &BlobStore, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
    Ok(blobs
        .get(digest)?
        .ok_or(LayoutError::MissingBlob(*digest))?
        .as_ref()
        .to_vec())
}

/// Copies a stored blob into the layout unless a file of its size is
/// there; returns the bytes written.
fn write_blob(blobs: &BlobStore, blob_dir: &Path, digest: &Digest) -> Result<u64, LayoutError> {
    let blob = blobs
        .get(digest)?
        .ok_or(LayoutError::MissingBlob(*digest))?;
    let path = blob_dir.join(digest.hex());
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == blob.len()) {
        return Ok(0);
    }
    write_file(&path, blob.as_ref())?;
    Ok(blob.len())
}

/// Temp file, fsync, rename: a crash never leaves half a file under the
/// final name.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    Ok(crate::write_atomically(path, bytes).map_err(io_err("writing", path))?)
}

/// Packs the layout directory `dir` into the tar file `out` (written to a
/// temp name, then renamed).
pub fn pack_tar(dir: &Path, out: &Path) -> Result<(), LayoutError> {
    let tmp = out.with_extension("tar.partial");
    let file = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)
        .map_err(io_err("packing", dir))?;
    let mut file = tar
        .into_inner()
        .map_err(io_err("writing", &tmp))?
        .into_inner()
        .map_err(|e| io_err("writing", &tmp)(e.into_error()))?;
    file.flush().map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    Ok(std::fs::rename(&tmp, out).map_err(io_err("renaming", &tmp))?)
}
