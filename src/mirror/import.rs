//! Reading an OCI layout for `nixery import`: everything is checked first
//! (every blob hashed against its digest and size, every manifest's
//! references present), in a staging directory when the layout is a tar
//! file; only then are blobs stored and names recorded, so a broken layout
//! leaves the storage as it was. An image exported with several
//! platforms is an index: each of its manifests is checked the same way.

use super::layout::{Descriptor, Index, Manifest, DOCKER_MANIFEST, REF_NAME};
use super::{Image, ImageRef};
use crate::build::image::Arch;
use crate::digest::{Digest, HashingWriter};
use crate::oci::manifest::media_type_of;
use crate::oci::media::{
    MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE as OCI_INDEX, OCI_MANIFEST_MEDIA_TYPE as OCI_MANIFEST,
};
use crate::oci::{named_by, Named};
use crate::store::db::{Db, DbError, Referrer, ReferrerKind, TagRecord, TagTree};
use crate::store::fs::{BlobError, BlobStore};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where `--with-closures` puts the binary cache inside a layout, and the
/// file in it that lists the images' top-level store paths.
pub const NIX_CACHE_DIR: &str = "nix-cache";
pub const STORE_PATHS_FILE: &str = "store-paths";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Io(#[from] super::FileError),
    #[error("not an OCI image layout: {0}")]
    NotALayout(String),
    #[error("blob {digest} is missing from the layout")]
    MissingBlob { digest: Digest },
    #[error("blob {digest} is damaged: its content hashes to {actual}")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("blob {digest} has {actual} bytes where its manifest says {expected}")]
    WrongSize {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("manifest {digest}: {message}")]
    BadManifest { digest: Digest, message: String },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Db(#[from] DbError),
}

use super::file_err as io_err;

/// A layout on disk that was checked whole: what may be stored.
pub struct Checked {
    dir: PathBuf,
    /// Removed on drop when the layout was unpacked from a tar file.
    _staging: Option<Staging>,
    pub images: Vec<Image>,
    /// Artifact manifests of the layout and the manifest each refers to.
    pub referrers: Vec<(Digest, Referrer)>,
    /// Every blob the images need, each once.
    pub blobs: BTreeSet<Digest>,
    pub bytes: u64,
}

/// A directory removed with everything in it when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove the staging directory");
        }
    }
}

impl Checked {
    /// The layout's binary cache, when it has one (`--with-closures`).
    pub fn nix_cache(&self) -> Option<PathBuf> {
        let dir = self.dir.join(NIX_CACHE_DIR);
        dir.join("nix-cache-info").is_file().then_some(dir)
    }

    /// The top-level store paths listed with the binary cache.
    pub fn store_paths(&self) -> Result<Vec<String>, ImportError> {
        let Some(cache) = self.nix_cache() else {
            return Ok(Vec::new());
        };
        let file = cache.join(STORE_PATHS_FILE);
        let text = std::fs::read_to_string(&file).map_err(io_err("reading", &file))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Stores the blobs (each hashed again as it is copied), then records
    /// each image under its name and tag as pinned, with its platforms.
    pub fn store(&self, blobs: &BlobStore, db: &Db) -> Result<(), ImportError> {
        for digest in &self.blobs {
            if blobs.contains(digest) {
                continue;
            }
            let path = self.blob_path(digest);
            let mut file = std::fs::File::open(&path).map_err(io_err("opening", &path))?;
            blobs.put_expecting(&mut file, digest)?;
        }
        let at = crate::clock::now_unix();
        let record = |digest: &Digest| TagRecord {
            digest: *digest,
            at,
        };
        for image in &self.images {
            let (name, tag) = (&image.image.name, &image.image.tag);
            let platforms: Vec<_> = image
                .platforms
                .iter()
                .map(|(arch, digest)| (arch.docker().to_owned(), record(digest)))
                .collect();
            // Also replaces the platforms of an earlier import of the name.
            db.put_pinned_platforms(name, tag, &platforms)?;
            db.put_tag_record(TagTree::Pinned, name, tag, &record(&image.digest))?;
        }
        for (subject, referrer) in &self.referrers {
            // An OCI form is served (and kept) once marked as a manifest.
            db.add_manifest_digest(subject)?;
            db.add_referrers(subject, std::slice::from_ref(referrer))?;
        }
        Ok(())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }
}

/// Prefix of staging directories, so leftovers of a crash can be told.
const STAGING_PREFIX: &str = "import-";

/// Checks the layout at `input`: a directory, or a tar file unpacked under
/// `staging_parent` first. The caller holds the storage (its database), so
/// staging directories found there are a crashed import's and are removed.
pub fn check(input: &Path, staging_parent: &Path) -> Result<Checked, ImportError> {
    remove_leftovers(staging_parent);
    let meta = std::fs::metadata(input).map_err(io_err("reading", input))?;
    let (dir, staging) = if meta.is_dir() {
        (input.to_owned(), None)
    } else {
        let dir = staging_parent.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let staging = Staging(dir.clone());
        let file = std::fs::File::open(input).map_err(io_err("opening", input))?;
        // `unpack` refuses entries that would land outside `dir`.
        tar::Archive::new(std::io::BufReader::new(file))
            .unpack(&dir)
            .map_err(io_err("unpacking", input))?;
        (dir, Some(staging))
    };
    let mut checked = Checked {
        dir,
        _staging: staging,
        images: Vec::new(),
        referrers: Vec::new(),
        blobs: BTreeSet::new(),
        bytes: 0,
    };
    check_layout(&mut checked)?;
    Ok(checked)
}

fn remove_leftovers(staging_parent: &Path) {
    let Ok(entries) = std::fs::read_dir(staging_parent) else {
        return;
    };
    for entry in entries.flatten() {
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(STAGING_PREFIX));
        if ours && entry.path().is_dir() {
            drop(Staging(entry.path()));
        }
    }
}

fn check_layout(c: &mut Checked) -> Result<(), ImportError> {
    let marker = c.dir.join("oci-layout");
    let version: serde_json::Value = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ImportError::NotALayout(format!("no readable {}", marker.display())))?;
    if version["imageLayoutVersion"] != "1.0.0" {
        return Err(ImportError::NotALayout(format!(
            "imageLayoutVersion {} is not 1.0.0",
            version["imageLayoutVersion"]
        )));
    }
    let index_path = c.dir.join("index.json");
    let index: Index = std::fs::read(&index_path)
        .map_err(|e| ImportError::from(io_err("reading", &index_path)(e)))
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| ImportError::NotALayout(format!("index.json: {e}")))
        })?;
    let (artifacts, images): (Vec<&Descriptor>, Vec<&Descriptor>) = index
        .manifests
        .iter()
        .partition(|e| e.artifact_type.is_some());
    for entry in images {
        let name = entry.annotations.get(REF_NAME).ok_or_else(|| {
            ImportError::NotALayout(format!("manifest {} has no {REF_NAME}", entry.digest))
        })?;
        let image = ImageRef::parse(name).map_err(|e| ImportError::BadManifest {
            digest: entry.digest,
            message: format!("{REF_NAME} {name:?}: {e}"),
        })?;
        let bytes = c.read_verified(&entry.digest, Some(entry.size))?;
        let imported = if media_type_of(&bytes).as_deref() == Some(OCI_INDEX) {
            let platforms = check_platforms(c, entry, &bytes)?;
            Image {
                image,
                digest: platforms[0].1,
                platforms,
            }
        } else {
            Image {
                image,
                digest: check_manifest(c, entry, &bytes)?,
                platforms: Vec::new(),
            }
        };
        c.images.push(imported);
    }
    if c.images.is_empty() {
        return Err(ImportError::NotALayout("index.json lists no images".into()));
    }
    for entry in artifacts {
        check_artifact(c, entry)?;
    }
    Ok(())
}

/// Whether `subject` is a blob of the layout that reads as an image
/// manifest or index (the OCI form of an imported image): not any blob,
/// which would be stored as a manifest served by digest and kept.
fn is_image_form(c: &mut Checked, subject: &Digest) -> Result<bool, ImportError> {
    let small = std::fs::metadata(c.blob_path(subject))
        .is_ok_and(|m| m.len() <= crate::oci::manifest::MANIFEST_MAX_BYTES);
    if !c.blobs.contains(subject) || !small {
        return Ok(false);
    }
    let bytes = c.read_verified(subject, None)?;
    Ok(matches!(
        named_by(&bytes),
        Some(Named::Image(_) | Named::Index(_))
    ))
}

/// Checks an artifact manifest of the layout (a bill of materials), its
/// blobs, and that its subject is a manifest of an image imported with it.
fn check_artifact(c: &mut Checked, entry: &Descriptor) -> Result<(), ImportError> {
    let bad = |message: String| ImportError::BadManifest {
        digest: entry.digest,
        message,
    };
    let bytes = c.read_verified(&entry.digest, Some(entry.size))?;
    let Some(Named::Artifact { subject, blobs }) = named_by(&bytes) else {
        return Err(bad("an artifactType but no subject".into()));
    };
    let manifests: BTreeSet<Digest> = c.images.iter().flat_map(|i| i.manifests()).collect();
    if !manifests.contains(&subject) && !is_image_form(c, &subject)? {
        return Err(bad(format!(
            "its subject {subject} is no image of the layout"
        )));
    }
    for (d, size) in blobs {
        c.verify(&d, Some(size))?;
    }
    c.referrers.push((
        subject,
        Referrer {
            kind: ReferrerKind::Manifest,
            media_type: entry.media_type.clone(),
            artifact_type: entry.artifact_type.clone().unwrap_or_default(),
            digest: entry.digest,
            size: entry.size,
            annotations: entry.annotations.clone().into_iter().collect(),
        },
    ));
    Ok(())
}

/// Checks an image manifest of the layout (`bytes`, verified) and every
/// blob it names; the Docker manifest it is served as.
fn check_manifest(
    c: &mut Checked,
    entry: &Descriptor,
    bytes: &[u8],
) -> Result<Digest, ImportError> {
    let manifest = parse(&entry.digest, bytes)?;
    let (docker_digest, docker) = match manifest.media_type.as_str() {
        MANIFEST_MEDIA_TYPE => (entry.digest, manifest),
        OCI_MANIFEST => docker_of(c, entry, &manifest)?,
        other => {
            return Err(ImportError::BadManifest {
                digest: entry.digest,
                message: format!("media type {other:?} is not an image manifest"),
            })
        }
    };
    for r in docker.references() {
        c.verify(&r.digest, Some(r.size))?;
    }
    Ok(docker_digest)
}

/// Checks an image's index over platforms (`bytes`, verified) and each
/// manifest it names; each platform's Docker manifest, in its order.
fn check_platforms(
    c: &mut Checked,
    entry: &Descriptor,
    bytes: &[u8],
) -> Result<Vec<(Arch, Digest)>, ImportError> {
    let bad = |message: String| ImportError::BadManifest {
        digest: entry.digest,
        message,
    };
    let index: Index = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let mut platforms: Vec<(Arch, Digest)> = Vec::new();
    for child in &index.manifests {
        let arch = child
            .platform
            .as_ref()
            .filter(|p| p.os == "linux")
            .and_then(|p| Arch::from_docker(&p.architecture))
            .ok_or_else(|| {
                bad(format!(
                    "manifest {} is not for linux/amd64 or linux/arm64",
                    child.digest
                ))
            })?;
        if platforms.iter().any(|(a, _)| *a == arch) {
            return Err(bad(format!("two manifests for {}", arch.docker())));
        }
        let child_bytes = c.read_verified(&child.digest, Some(child.size))?;
        platforms.push((arch, check_manifest(c, child, &child_bytes)?));
    }
    if platforms.is_empty() {
        return Err(bad("an index of no manifests".into()));
    }
    Ok(platforms)
}

fn parse(digest: &Digest, bytes: &[u8]) -> Result<Manifest, ImportError> {
    Manifest::parse(digest, bytes).map_err(|e| ImportError::BadManifest {
        digest: *digest,
        message: e.to_string(),
    })
}

/// The Docker manifest that an export's index entry names beside its OCI
/// manifest, checked to have the same blobs.
fn docker_of(
    c: &mut Checked,
    entry: &Descriptor,
    oci: &Manifest,
) -> Result<(Digest, Manifest), ImportError> {
    let bad = |message: String| ImportError::BadManifest {
        digest: entry.digest,
        message,
    };
    let named = entry.annotations.get(DOCKER_MANIFEST).ok_or_else(|| {
        bad(format!(
            "no {DOCKER_MANIFEST} annotation: not written by nixery export"
        ))
    })?;
    let digest: Digest = named
        .parse()
        .map_err(|e| bad(format!("{DOCKER_MANIFEST}: {e}")))?;
    let bytes = c.read_verified(&digest, None)?;
    let docker = parse(&digest, &bytes)?;
    let blobs = |m: &Manifest| {
        m.references()
            .map(|r| (r.digest, r.size))
            .collect::<Vec<_>>()
    };
    if docker.media_type != MANIFEST_MEDIA_TYPE || blobs(&docker) != blobs(oci) {
        return Err(bad(format!(
            "the Docker manifest {digest} it names has other blobs"
        )));
    }
    Ok((digest, docker))
}

impl Checked {
    /// Reads a (small) blob of the layout, checked against its digest.
    fn read_verified(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Vec<u8>, ImportError> {
        let path = self.blob_path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::MissingBlob { digest: *digest })
            }
            Err(e) => return Err(io_err("reading", &path)(e).into()),
        };
        check_blob(digest, size, Digest::of(&bytes), bytes.len() as u64)?;
        self.note(digest, bytes.len() as u64);
        Ok(bytes)
    }

    /// Hashes a blob of the layout, once however many images use it.
    fn verify(&mut self, digest: &Digest, size: Option<u64>) -> Result<(), ImportError> {
        if self.blobs.contains(digest) {
            return Ok(());
        }
        let path = self.blob_path(digest);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::MissingBlob { digest: *digest })
            }
            Err(e) => return Err(io_err("opening", &path)(e).into()),
        };
        let mut hashed = HashingWriter::new(std::io::sink());
        std::io::copy(&mut file, &mut hashed).map_err(io_err("reading", &path))?;
        let (_, actual, len) = hashed.finish();
        check_blob(digest, size, actual, len)?;
        self.note(digest, len);
        Ok(())
    }

    fn note(&mut self, digest: &Digest, len: u64) {
        if self.blobs.insert(*digest) {
            self.bytes += len;
        }
    }
}

fn check_blob(
    digest: &Digest,
    size: Option<u64>,
    actual: Digest,
    len: u64,
) -> Result<(), ImportError> {
    if actual != *digest {
        return Err(ImportError::Corrupt {
            digest: *digest,
            actual,
        });
    }
    match size {
        Some(expected) if expected != len => Err(ImportError::WrongSize {
            digest: *digest,
            expected,
            actual: len,
        }),
        _ => Ok(()),
    }
}
