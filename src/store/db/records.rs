//! The records the database stores, each with its own version.
//!
//! A record is stored as one version byte followed by its bincode (serde)
//! encoding. bincode has no field names, so a record whose fields change
//! gets a new [`Record::VERSION`], keeps its previous shape as a frozen
//! struct in `legacy`, and converts it in [`Record::upgrade`]. A record
//! that still cannot be decoded is treated as absent (see `Db::decode`).

use crate::digest::Digest;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A value kept in a sled tree.
pub trait Record: Serialize + DeserializeOwned {
    /// The version byte written in front of this record's encoding.
    const VERSION: u8;

    /// A record written with an older `version` (its bincode `bytes`
    /// after the version byte), converted; `None` if it cannot be.
    fn upgrade(version: u8, bytes: &[u8]) -> Option<Self> {
        let _ = (version, bytes);
        None
    }
}

/// A built image: its manifest and what it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub digest: Digest,
    /// Unix seconds of the build (or of the last check that it is current).
    pub checked_at: u64,
    /// The top-level store paths the image was built from.
    pub out_paths: Vec<String>,
    /// What the package source resolved to: a git commit, or a NAR hash
    /// (`sha256-...`) of a tarball or flake; `None` for a local path.
    pub revision: Option<String>,
}

/// A packed layer, shared by every image with the same store paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildOutcome {
    Success {
        manifest: Digest,
    },
    PackagesNotFound(Vec<String>),
    Failed {
        message: String,
        stderr_tail: String,
    },
}

/// What one build did, for the admin page and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub image: String,
    pub tag: String,
    pub started_at: u64,
    /// Milliseconds per phase, in the order they ran.
    pub phases: Vec<(String, u64)>,
    pub layers_total: usize,
    pub layers_reused: usize,
    pub bytes_packed: u64,
    pub outcome: BuildOutcome,
    /// The package source's revision this build used, once known (see
    /// [`ManifestRecord::revision`]).
    pub revision: Option<String>,
}

/// A failed build, kept apart from the build records so that a run of
/// successful builds does not push errors off the admin page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub image: String,
    pub tag: String,
    /// Unix seconds when the build failed.
    pub at: u64,
    pub message: String,
    /// The end of Nix's stderr; empty when Nix was not what failed.
    pub stderr_tail: String,
}

/// When an image was last pulled, by which name: what the garbage
/// collector evicts by. Written in batches, never per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRecord {
    /// Unix seconds of the last manifest response for the image.
    pub at: u64,
    pub image: String,
}

impl Record for PullRecord {
    const VERSION: u8 = 1;
}

/// The manifest a name and tag stands for: imported (`pinned` tree, served
/// whatever the package source and never rebuilt) or last built
/// (`built_tags` tree, what a mirror serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    /// Unix seconds of the import or build.
    pub at: u64,
}

impl Record for TagRecord {
    const VERSION: u8 = 1;
}

impl Record for ManifestRecord {
    const VERSION: u8 = 1;
}

impl Record for LayerRecord {
    const VERSION: u8 = 1;
}

/// The names an imported manifest was given (`name:tag`), in a shared
/// bucket's index, where the collector keeps it like a build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedRecord {
    pub names: Vec<String>,
}

impl Record for ImportedRecord {
    const VERSION: u8 = 1;
}

/// When a replica last noted a pull of a manifest, in a shared bucket's
/// index (a replica notes one at most every few hours per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledRecord {
    /// Unix seconds.
    pub at: u64,
}

impl Record for PulledRecord {
    const VERSION: u8 = 1;
}

impl Record for BuildRecord {
    const VERSION: u8 = 1;
}

impl Record for ErrorRecord {
    const VERSION: u8 = 1;
}

/// How a referrer refers to its subject (see [`ReferrersRecord`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReferrerKind {
    /// An OCI manifest whose `subject` is the subject (an SBOM's artifact
    /// manifest): listed by the referrers API, served by digest, and what
    /// it names is kept with it.
    Manifest,
    /// A blob kept exactly as long as the subject (say, the NAR of a store
    /// path in the image); never listed by the referrers API.
    Blob,
}

/// One thing that refers to a subject: its descriptor as the referrers
/// API lists it, and how it refers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Referrer {
    pub kind: ReferrerKind,
    pub media_type: String,
    pub artifact_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The artifact manifest's annotations, listed with it (sorted).
    pub annotations: Vec<(String, String)>,
}

/// What refers to one stored manifest (the subject): the `referrers` tree
/// and the bucket's `referrers/` index, keyed by the subject's digest.
/// Stored content that exists because of an image is kept through this
/// record: the collector keeps a referrer exactly as long as its subject,
/// verify checks it, export and import carry it. Sorted by digest, one
/// entry per digest, so the same referrers give the same bytes (replicas
/// writing the same record write the same thing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferrersRecord {
    pub referrers: Vec<Referrer>,
}

impl ReferrersRecord {
    /// Adds `more`, replacing any entry of the same digest; true if that
    /// changed the record.
    pub fn merge(&mut self, more: &[Referrer]) -> bool {
        let before = self.referrers.clone();
        for r in more {
            self.referrers.retain(|old| old.digest != r.digest);
            self.referrers.push(r.clone());
        }
        self.referrers.sort_by_key(|r| r.digest);
        self.referrers != before
    }
}

impl Record for ReferrersRecord {
    const VERSION: u8 = 1;
}
