//! What `nixery verify` finds in a storage (local or a bucket) and what
//! `--repair` did: one vocabulary for both backends' checks.

use crate::digest::Digest;
use crate::store::RecordKind;

/// A record that leads to a manifest, by what it is named.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A cached build, by cache key.
    Build(String),
    /// `name:tag`, imported.
    Pinned(String, String),
    /// One platform (its architecture) of `name:tag`, imported with several.
    PinnedPlatform(String, String, String),
    /// `name:tag`, as last built.
    Built(String, String),
    /// The bucket's record that the digest is a manifest (pulls by digest).
    Listed,
    /// The record of what refers to this subject manifest.
    Referrer(Digest),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Build(key) => write!(f, "cached build {}", &key[..key.len().min(12)]),
            Holder::Pinned(n, t) => write!(f, "imported image {n}:{t}"),
            Holder::PinnedPlatform(n, t, a) => write!(f, "imported image {n}:{t} for {a}"),
            Holder::Built(n, t) => write!(f, "image {n}:{t}"),
            Holder::Listed => write!(f, "pulls by digest"),
            Holder::Referrer(subject) => write!(f, "a referrer of {subject}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Findings {
    pub blobs: usize,
    pub bytes: u64,
    pub manifests: usize,
    /// Blobs whose content does not hash to their name.
    pub corrupt: Vec<Digest>,
    /// Manifests that cannot be served whole, why, and who records them.
    pub broken: Vec<(Digest, String, Vec<Holder>)>,
    /// Index records that cannot be read or name a missing or corrupt blob
    /// (a bucket's; the local database's are repaired with their blobs).
    pub stale_records: Vec<StaleRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRecord {
    pub kind: RecordKind,
    pub key: String,
    pub why: String,
}

impl Findings {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.broken.is_empty() && self.stale_records.is_empty()
    }
}

/// What a repair did.
#[derive(Debug, Default)]
pub struct Repaired {
    pub blobs_removed: usize,
    /// Cached builds forgotten: rebuilt on the next pull.
    pub rebuild: usize,
    /// Imported images forgotten: import them again.
    pub lost: Vec<String>,
}
