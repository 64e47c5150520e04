//! The sled database: its trees and their bincode-encoded values, all here.
//!
//! Trees:
//! - `manifests`: image cache key -> [`ManifestRecord`]
//! - `manifest_digests`: manifest digest -> () (which blobs are manifests)
//! - `layers`: layer key -> [`LayerRecord`]
//! - `popularity`: store path name -> count (u64, big-endian)
//! - `builds`: build id (u64, big-endian) -> [`BuildRecord`]
//! - `tags`: `<name>\0<tag>` -> () (every tag recorded, built or
//!   imported, while the name has a page; see [`Db::forget_names`])
//! - `errors`: error id (u64, big-endian) -> [`ErrorRecord`]
//! - `pulls`: image name -> manifest pulls by tag (u64, big-endian;
//!   forgotten with the name's tags)
//! - `lookups`: `hit` / `miss` -> manifest requests by tag answered from
//!   cache or not (u64, big-endian)
//!
//! - `last_pulled`: manifest digest -> [`PullRecord`] (for the garbage
//!   collector; flushed in batches by [`crate::store::pulls`])
//! - `pinned`: `<name>\0<tag>` -> [`TagRecord`] (imported images)
//! - `built_tags`: `<name>\0<tag>` -> [`TagRecord`] (the last build)
//! - `pinned_platforms`: `<name>\0<tag>\0<arch>` -> [`TagRecord`] (each
//!   platform's manifest of an image imported with several; `pinned`
//!   names the first)
//! - `referrers`: subject manifest digest -> [`ReferrersRecord`] (what
//!   refers to it: SBOM artifact manifests, blobs kept with it)
//!
//! - `evaluations`: evaluation cache key -> [`EvalRecord`] (what a package
//!   name evaluated to at a fixed source revision; see
//!   [`crate::build::eval_cache`])
//! - `image_pulls`: image name -> [`ImagePullsRecord`] (pulls per day,
//!   the last 30 days with any; dropped by a collection once the name has
//!   no image nor recent build, with its tags and total)
//! - `history`: ring and slot (`m` or `h`, u16 big-endian) ->
//!   [`HistoryRecord`] (fixed-size rings; see [`crate::observe::history`])
//! - `nix_closures`, `nix_paths`, `nix_nars`: the Nix binary cache (see
//!   [`nix`])
//!
//! - `meta`: `schema` -> the layout version (u32, big-endian); see
//!   [`migrate`]
//!
//! Record values are a version byte and bincode (see [`records`]). A record
//! that cannot be decoded is logged once per tree and treated as absent:
//! an image whose record is damaged is rebuilt, never a 500.
//!
//! Blobs are written before the records that point at them, so a crash can
//! leave an unreferenced blob but never a record without its blob.

mod async_db;
mod migrate;
mod names;
pub mod nix;
pub mod records;
mod recover;

pub use async_db::AsyncDb;
pub use migrate::SCHEMA_VERSION;
pub use records::{
    BuildOutcome, BuildRecord, ErrorRecord, EvalRecord, HistoryRecord, ImagePullsRecord,
    ImportedRecord, LayerRecord, Levels, ManifestRecord, PullRecord, PulledRecord, Record,
    Referrer, ReferrerKind, ReferrersRecord, TagRecord,
};

use crate::digest::Digest;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Build records kept for the admin page.
const BUILDS_KEPT: usize = 100;

/// Evaluation cache records kept: past this many, the oldest half (by
/// key order, which is random: keys are hashes) is dropped. At ~200 bytes
/// a record, about 20 MB of database at most.
const EVALUATIONS_KEPT: usize = 100_000;

/// Evaluation records written between two counts of the tree.
const EVALUATIONS_COUNT_EVERY: u64 = 1_000;

/// Error records kept for the admin page (the original shows 15).
pub const ERRORS_KEPT: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("database record could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error(
        "the database was written by a newer nixery (layout version {found}; \
         this one reads up to {supported}): start that version, or move the \
         database away to start afresh"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("database {path}: {message}")]
    Recovery {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("database migration from layout version {from}: {message}")]
    Migration { from: u32, message: String },
    #[error(
        "the database {0} is in use by another nixery process (a running \
         `serve`?): one process at a time can open it; stop that one first"
    )]
    InUse(String),
    /// A call run on a blocking thread panicked (or was cancelled).
    #[error("a database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl DbError {
    /// Whether the disk (or quota) was full.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, DbError::Sled(sled::Error::Io(e))
            if e.kind() == std::io::ErrorKind::StorageFull
                || e.kind() == std::io::ErrorKind::QuotaExceeded
                || e.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// Whether a manifest request by tag was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

impl Lookup {
    fn key(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
        }
    }
}

/// The two trees that map a name and tag to a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagTree {
    /// Imported: served whatever the source, never rebuilt.
    Pinned,
    /// The last build of the name and tag: what a mirror serves.
    Built,
}

impl TagTree {
    fn name(self) -> &'static str {
        match self {
            TagTree::Pinned => "pinned",
            TagTree::Built => "built_tags",
        }
    }
}

#[derive(Clone)]
pub struct Db {
    db: sled::Db,
    manifests: sled::Tree,
    manifest_digests: sled::Tree,
    layers: sled::Tree,
    popularity: sled::Tree,
    builds: sled::Tree,
    tags: sled::Tree,
    errors: sled::Tree,
    pulls: sled::Tree,
    lookups: sled::Tree,
    last_pulled: sled::Tree,
    pinned: sled::Tree,
    built_tags: sled::Tree,
    pinned_platforms: sled::Tree,
    evaluations: sled::Tree,
    /// Evaluation records written since the tree was last counted.
    evaluations_written: Arc<std::sync::atomic::AtomicU64>,
    history: sled::Tree,
    image_pulls: sled::Tree,
    referrers: sled::Tree,
    nix: nix::NixTrees,
    /// Trees whose undecodable records were already logged.
    logged_undecodable: Arc<Mutex<HashSet<&'static str>>>,
    /// Whether this open created the database (it held nothing).
    created: bool,
}

pub(crate) fn encode<T: Record>(value: &T) -> Result<Vec<u8>, DbError> {
    let mut out = vec![T::VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())?;
    Ok(out)
}

/// Decodes a record of its current version, or upgrades an older one.
pub(crate) fn decode<T: Record>(bytes: &[u8]) -> Option<T> {
    let (&version, body) = bytes.split_first()?;
    if version == T::VERSION {
        bincode::serde::decode_from_slice(body, bincode::config::standard())
            .ok()
            .map(|(v, _)| v)
    } else {
        T::upgrade(version, body)
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn increment(tree: &sled::Tree, key: &[u8]) -> Result<(), DbError> {
    add(tree, key, 1)
}

fn add(tree: &sled::Tree, key: &[u8], n: u64) -> Result<(), DbError> {
    if n == 0 {
        return Ok(());
    }
    tree.update_and_fetch(key, |old| {
        Some(
            (old.map(be_u64).unwrap_or(0).saturating_add(n))
                .to_be_bytes()
                .to_vec(),
        )
    })?;
    Ok(())
}

/// Appends to a tree keyed by id, dropping the oldest beyond `keep`.
fn push_bounded(
    db: &sled::Db,
    tree: &sled::Tree,
    value: Vec<u8>,
    keep: usize,
) -> Result<(), DbError> {
    let id = db.generate_id()?;
    tree.insert(id.to_be_bytes(), value)?;
    while tree.len() > keep {
        if tree.pop_min()?.is_none() {
            break;
        }
    }
    Ok(())
}

/// An image name with its tags.
pub type NameTags = (String, Vec<String>);

/// Every key with its count, largest first.
fn counts_desc(tree: &sled::Tree) -> Result<Vec<(String, u64)>, DbError> {
    let mut all = tree
        .iter()
        .map(|kv| {
            let (k, v) = kv?;
            Ok((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)))
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(all)
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = recover::open(path)?;
        let created = migrate::run(&db)?;
        Ok(Db {
            manifests: db.open_tree("manifests")?,
            manifest_digests: db.open_tree("manifest_digests")?,
            layers: db.open_tree("layers")?,
            popularity: db.open_tree("popularity")?,
            builds: db.open_tree("builds")?,
            tags: db.open_tree("tags")?,
            errors: db.open_tree("errors")?,
            pulls: db.open_tree("pulls")?,
            lookups: db.open_tree("lookups")?,
            last_pulled: db.open_tree("last_pulled")?,
            pinned: db.open_tree("pinned")?,
            built_tags: db.open_tree("built_tags")?,
            pinned_platforms: db.open_tree("pinned_platforms")?,
            evaluations: db.open_tree("evaluations")?,
            evaluations_written: Arc::default(),
            history: db.open_tree("history")?,
            image_pulls: db.open_tree("image_pulls")?,
            referrers: db.open_tree("referrers")?,
            nix: nix::NixTrees::open(&db)?,
            logged_undecodable: Arc::default(),
            created,
            db,
        })
    }

    /// Whether opening found nothing and started a new database. With
    /// blobs stored, that means the database was lost or damaged.
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// Decodes a record read from `tree`; one that cannot be decoded is
    /// absent, and logged the first time per tree.
    fn decode<T: Record>(&self, tree: &'static str, bytes: &[u8]) -> Option<T> {
        let record = decode(bytes);
        if record.is_none() {
            let first = self
                .logged_undecodable
                .lock()
                .map(|mut seen| seen.insert(tree))
                .unwrap_or(false);
            if first {
                tracing::warn!(
                    tree,
                    "a database record could not be decoded; it is treated as \
                     absent (an image is rebuilt, a build record not shown)"
                );
            }
        }
        record
    }

    pub fn manifest(&self, cache_key: &str) -> Result<Option<ManifestRecord>, DbError> {
        Ok(self
            .manifests
            .get(cache_key)?
            .and_then(|v| self.decode("manifests", &v)))
    }

    pub fn put_manifest(&self, cache_key: &str, record: &ManifestRecord) -> Result<(), DbError> {
        self.manifest_digests
            .insert(record.digest.as_bytes(), &[])?;
        self.manifests.insert(cache_key, encode(record)?)?;
        Ok(())
    }

    /// Every cached build: cache key and record.
    pub fn manifests(&self) -> Result<Vec<(String, ManifestRecord)>, DbError> {
        self.all(&self.manifests, "manifests")
    }

    /// Every record of a tree with its key; undecodable ones are absent.
    fn all<T: Record>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
    ) -> Result<Vec<(String, T)>, DbError> {
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            if let Some(r) = self.decode(name, &v) {
                out.push((String::from_utf8_lossy(&k).into_owned(), r));
            }
        }
        Ok(out)
    }

    /// Forgets a cached build, so its image is built again when pulled.
    pub fn remove_manifest(&self, cache_key: &str) -> Result<(), DbError> {
        self.manifests.remove(cache_key)?;
        Ok(())
    }

    /// Forgets that a digest is a manifest (its blob is gone), and when it
    /// was last pulled: a superseded build's record would otherwise stay
    /// for good, and keep its name from being forgotten.
    pub fn forget_manifest_digest(&self, digest: &Digest) -> Result<(), DbError> {
        self.manifest_digests.remove(digest.as_bytes())?;
        self.last_pulled.remove(digest.as_bytes())?;
        Ok(())
    }

    fn tag_tree(&self, which: TagTree) -> &sled::Tree {
        match which {
            TagTree::Pinned => &self.pinned,
            TagTree::Built => &self.built_tags,
        }
    }

    /// The manifest recorded for a name and tag.
    pub fn tag_record(
        &self,
        which: TagTree,
        name: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, DbError> {
        Ok(self
            .tag_tree(which)
            .get(format!("{name}\0{tag}"))?
            .and_then(|v| self.decode(which.name(), &v)))
    }

    /// Records the manifest `name:tag` stands for (and that it is one).
    /// The record goes before the tag, which `forget_names` relies on.
    pub fn put_tag_record(
        &self,
        which: TagTree,
        name: &str,
        tag: &str,
        record: &TagRecord,
    ) -> Result<(), DbError> {
        self.manifest_digests
            .insert(record.digest.as_bytes(), &[])?;
        self.tag_tree(which)
            .insert(format!("{name}\0{tag}"), encode(record)?)?;
        self.add_tag(name, tag)
    }

    /// Every name and tag recorded in a tree, with its record.
    pub fn tag_records(&self, which: TagTree) -> Result<Vec<(String, String, TagRecord)>, DbError> {
        Ok(self
            .all(self.tag_tree(which), which.name())?
            .into_iter()
            .filter_map(|(key, r)| {
                let (name, tag) = key.split_once('\0')?;
                Some((name.to_owned(), tag.to_owned(), r))
            })
            .collect())
    }

    /// Whether any name and tag is recorded in `which`.
    pub fn has_tag_records(&self, which: TagTree) -> bool {
        !self.tag_tree(which).is_empty()
    }

    pub fn remove_tag_record(&self, which: TagTree, name: &str, tag: &str) -> Result<(), DbError> {
        self.tag_tree(which).remove(format!("{name}\0{tag}"))?;
        Ok(())
    }

    /// Records each platform's manifest (by architecture) of the imported
    /// `name:tag`, and that each is a manifest, replacing any recorded
    /// before; none for an image imported with one platform.
    pub fn put_pinned_platforms(
        &self,
        name: &str,
        tag: &str,
        platforms: &[(String, TagRecord)],
    ) -> Result<(), DbError> {
        self.remove_pinned_platforms(name, tag)?;
        for (arch, record) in platforms {
            self.manifest_digests
                .insert(record.digest.as_bytes(), &[])?;
            self.pinned_platforms
                .insert(format!("{name}\0{tag}\0{arch}"), encode(record)?)?;
        }
        Ok(())
    }

    /// The platforms recorded for the imported `name:tag`, by architecture
    /// (in key order).
    pub fn pinned_platforms(
        &self,
        name: &str,
        tag: &str,
    ) -> Result<Vec<(String, TagRecord)>, DbError> {
        let prefix = format!("{name}\0{tag}\0");
        let mut out = Vec::new();
        for kv in self.pinned_platforms.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if let Some(r) = self.decode("pinned_platforms", &v) {
                let arch = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                out.push((arch, r));
            }
        }
        Ok(out)
    }

    /// Every platform of every imported name: name, tag, architecture and
    /// record.
    pub fn all_pinned_platforms(
        &self,
    ) -> Result<Vec<(String, String, String, TagRecord)>, DbError> {
        Ok(self
            .all(&self.pinned_platforms, "pinned_platforms")?
            .into_iter()
            .filter_map(|(key, r)| {
                let mut parts = key.splitn(3, '\0');
                let (name, tag, arch) = (parts.next()?, parts.next()?, parts.next()?);
                Some((name.to_owned(), tag.to_owned(), arch.to_owned(), r))
            })
            .collect())
    }

    fn remove_pinned_platforms(&self, name: &str, tag: &str) -> Result<(), DbError> {
        for k in self
            .pinned_platforms
            .scan_prefix(format!("{name}\0{tag}\0"))
            .keys()
        {
            self.pinned_platforms.remove(k?)?;
        }
        Ok(())
    }

    /// Forgets an imported `name:tag`, with every platform recorded for it.
    pub fn remove_pinned(&self, name: &str, tag: &str) -> Result<(), DbError> {
        self.remove_tag_record(TagTree::Pinned, name, tag)?;
        self.remove_pinned_platforms(name, tag)
    }

    /// Every packed layer: key and record.
    pub fn layers(&self) -> Result<Vec<(String, LayerRecord)>, DbError> {
        self.all(&self.layers, "layers")
    }

    /// Forgets a packed layer, so it is packed again when needed.
    pub fn remove_layer(&self, key: &str) -> Result<(), DbError> {
        self.layers.remove(key)?;
        Ok(())
    }

    /// Marks a stored blob as a manifest (or index) that is served by its
    /// digest, besides those `put_manifest` records.
    pub fn add_manifest_digest(&self, digest: &Digest) -> Result<(), DbError> {
        self.manifest_digests.insert(digest.as_bytes(), &[])?;
        Ok(())
    }

    /// Every digest served as a manifest (Docker, OCI, index).
    pub fn manifest_digest_list(&self) -> Result<Vec<Digest>, DbError> {
        let mut out = Vec::new();
        for k in self.manifest_digests.iter().keys() {
            if let Ok(raw) = <[u8; 32]>::try_from(k?.as_ref()) {
                out.push(Digest::from_bytes(raw));
            }
        }
        Ok(out)
    }

    pub fn is_manifest(&self, digest: &Digest) -> Result<bool, DbError> {
        Ok(self.manifest_digests.contains_key(digest.as_bytes())?)
    }

    /// What refers to `subject` (none recorded: `None`).
    pub fn referrers(&self, subject: &Digest) -> Result<Option<ReferrersRecord>, DbError> {
        Ok(self
            .referrers
            .get(subject.as_bytes())?
            .and_then(|v| self.decode("referrers", &v)))
    }

    /// Records that `more` refer to `subject` (merged with those recorded)
    /// and marks the manifests among them as served by digest. The
    /// referrers' blobs must be stored first. Returns the record.
    pub fn add_referrers(
        &self,
        subject: &Digest,
        more: &[Referrer],
    ) -> Result<ReferrersRecord, DbError> {
        for r in more.iter().filter(|r| r.kind == ReferrerKind::Manifest) {
            self.manifest_digests.insert(r.digest.as_bytes(), &[])?;
        }
        loop {
            let old = self.referrers.get(subject.as_bytes())?;
            let mut record: ReferrersRecord = old
                .as_ref()
                .and_then(|v| self.decode("referrers", v))
                .unwrap_or_default();
            if !record.merge(more) && old.is_some() {
                return Ok(record);
            }
            let new = encode(&record)?;
            // Another writer may have added some meanwhile: merge again.
            if self
                .referrers
                .compare_and_swap(subject.as_bytes(), old, Some(new))?
                .is_ok()
            {
                return Ok(record);
            }
        }
    }

    /// Every subject with what refers to it; undecodable records are absent.
    pub fn all_referrers(&self) -> Result<Vec<(Digest, ReferrersRecord)>, DbError> {
        let mut out = Vec::new();
        for kv in self.referrers.iter() {
            let (k, v) = kv?;
            let (Ok(raw), Some(r)) = (
                <[u8; 32]>::try_from(k.as_ref()),
                self.decode("referrers", &v),
            ) else {
                continue;
            };
            out.push((Digest::from_bytes(raw), r));
        }
        Ok(out)
    }

    /// Forgets what refers to `subject` (it is gone, or they are damaged:
    /// they are made again when asked for).
    pub fn remove_referrers(&self, subject: &Digest) -> Result<(), DbError> {
        self.referrers.remove(subject.as_bytes())?;
        Ok(())
    }

    pub fn layer(&self, key: &str) -> Result<Option<LayerRecord>, DbError> {
        Ok(self
            .layers
            .get(key)?
            .and_then(|v| self.decode("layers", &v)))
    }

    pub fn put_layer(&self, key: &str, record: &LayerRecord) -> Result<(), DbError> {
        self.layers.insert(key, encode(record)?)?;
        Ok(())
    }

    /// Counts one more image that contains each of these store path names.
    pub fn add_popularity<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), DbError> {
        for name in names {
            increment(&self.popularity, name.as_bytes())?;
        }
        Ok(())
    }

    pub fn popularity(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.popularity
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)))
            })
            .collect()
    }

    /// What a package name evaluated to, under its evaluation cache key.
    pub fn evaluation(&self, key: &str) -> Result<Option<EvalRecord>, DbError> {
        Ok(self
            .evaluations
            .get(key)?
            .and_then(|v| self.decode("evaluations", &v)))
    }

    /// Remembers evaluations, keeping at most about [`EVALUATIONS_KEPT`]
    /// (counted every [`EVALUATIONS_COUNT_EVERY`] writes: sled counts by
    /// walking the tree).
    pub fn put_evaluations(&self, records: &[(String, EvalRecord)]) -> Result<(), DbError> {
        for (key, record) in records {
            self.evaluations.insert(key.as_str(), encode(record)?)?;
        }
        let written = self
            .evaluations_written
            .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if written / EVALUATIONS_COUNT_EVERY
            != (written + records.len() as u64) / EVALUATIONS_COUNT_EVERY
        {
            self.prune_evaluations(EVALUATIONS_KEPT)?;
        }
        Ok(())
    }

    /// Past `keep` records, drops the first half of the tree by key (keys
    /// are hashes, so that is a random half). A dropped record only costs
    /// an evaluation.
    fn prune_evaluations(&self, keep: usize) -> Result<usize, DbError> {
        let count = self.evaluations.len();
        if count <= keep {
            return Ok(0);
        }
        let mut dropped = 0;
        for key in self.evaluations.iter().keys().take(count / 2) {
            self.evaluations.remove(key?)?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Records a build, keeping the newest [`BUILDS_KEPT`].
    pub fn add_build(&self, record: &BuildRecord) -> Result<(), DbError> {
        push_bounded(&self.db, &self.builds, encode(record)?, BUILDS_KEPT)
    }

    /// Build records, newest first.
    pub fn builds(&self) -> Result<Vec<BuildRecord>, DbError> {
        self.newest_first(&self.builds, "builds")
    }

    /// Records a failed build, keeping the newest [`ERRORS_KEPT`].
    pub fn add_error(&self, record: &ErrorRecord) -> Result<(), DbError> {
        push_bounded(&self.db, &self.errors, encode(record)?, ERRORS_KEPT)
    }

    /// Error records, newest first.
    pub fn errors(&self) -> Result<Vec<ErrorRecord>, DbError> {
        self.newest_first(&self.errors, "errors")
    }

    /// The records of a tree that [`push_bounded`] fills, newest first;
    /// those that cannot be decoded are left out.
    fn newest_first<T: Record>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
    ) -> Result<Vec<T>, DbError> {
        let mut out = Vec::new();
        for kv in tree.iter().rev() {
            out.extend(self.decode(name, &kv?.1));
        }
        Ok(out)
    }

    /// Adds manifest requests counted in memory: answered from the cache
    /// (`hits`) and not, and pulls per image.
    pub fn add_manifest_requests(
        &self,
        hits: u64,
        misses: u64,
        pulls: &std::collections::HashMap<String, u64>,
    ) -> Result<(), DbError> {
        add(&self.lookups, Lookup::Hit.key().as_bytes(), hits)?;
        add(&self.lookups, Lookup::Miss.key().as_bytes(), misses)?;
        for (image, n) in pulls {
            add(&self.pulls, image.as_bytes(), *n)?;
        }
        Ok(())
    }

    /// Adds pulls per image name on the day starting at `day`.
    pub fn add_image_pulls(&self, pulls: &HashMap<String, u64>, day: u64) -> Result<(), DbError> {
        for (image, n) in pulls {
            let mut record: ImagePullsRecord = self
                .image_pulls
                .get(image)?
                .and_then(|v| self.decode("image_pulls", &v))
                .unwrap_or_default();
            record.add(day, *n);
            self.image_pulls
                .insert(image.as_bytes(), encode(&record)?)?;
        }
        Ok(())
    }

    /// An image name's pulls per day.
    pub fn image_pulls(&self, image: &str) -> Result<ImagePullsRecord, DbError> {
        Ok(self
            .image_pulls
            .get(image)?
            .and_then(|v| self.decode("image_pulls", &v))
            .unwrap_or_default())
    }

    /// All pulls of an image name.
    pub fn pull_count(&self, image: &str) -> Result<u64, DbError> {
        Ok(self.pulls.get(image)?.map_or(0, |v| be_u64(&v)))
    }

    /// The image names served (with their tags, sorted) whose name
    /// contains `query`, in name order: how many match, and those from
    /// `offset`, at most `limit`.
    pub fn image_names(
        &self,
        query: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(usize, Vec<NameTags>), DbError> {
        let mut matching = 0;
        let mut page: Vec<NameTags> = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for key in self.tags.iter().keys() {
            let key = key?;
            let Some(split) = key.iter().position(|&b| b == 0) else {
                continue;
            };
            let (name, tag) = (&key[..split], &key[split + 1..]);
            let on_page = matching > offset && matching <= offset + limit;
            if last.as_deref() == Some(name) {
                // Another tag of the name just counted.
                if let Some((_, tags)) = page.last_mut().filter(|_| on_page) {
                    tags.push(String::from_utf8_lossy(tag).into_owned());
                }
                continue;
            }
            last = Some(name.to_vec());
            let name = String::from_utf8_lossy(name);
            if !name.contains(query) {
                last = None;
                continue;
            }
            matching += 1;
            if matching > offset && matching <= offset + limit {
                page.push((
                    name.into_owned(),
                    vec![String::from_utf8_lossy(tag).into_owned()],
                ));
            }
        }
        Ok((matching, page))
    }

    /// Manifest requests by tag answered from the cache, and not.
    pub fn lookups(&self) -> Result<(u64, u64), DbError> {
        let get = |l: Lookup| -> Result<u64, DbError> {
            Ok(self.lookups.get(l.key())?.map_or(0, |v| be_u64(&v)))
        };
        Ok((get(Lookup::Hit)?, get(Lookup::Miss)?))
    }

    /// Pulls per image, most pulled first.
    pub fn pulls(&self) -> Result<Vec<(String, u64)>, DbError> {
        counts_desc(&self.pulls)
    }

    /// Popularity counts, most popular first.
    pub fn popularity_desc(&self) -> Result<Vec<(String, u64)>, DbError> {
        counts_desc(&self.popularity)
    }

    pub fn add_tag(&self, name: &str, tag: &str) -> Result<(), DbError> {
        self.tags.insert(format!("{name}\0{tag}"), &[])?;
        Ok(())
    }

    /// Tags served for a name, sorted.
    pub fn tags(&self, name: &str) -> Result<Vec<String>, DbError> {
        let prefix = format!("{name}\0");
        self.tags
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, _) = kv?;
                Ok(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            })
            .collect()
    }

    /// Forgets an image: every cache key and last-built tag that names this
    /// manifest, and its pull record. Its blobs are the collector's to delete.
    pub fn remove_image(&self, digest: &Digest) -> Result<(), DbError> {
        for kv in self.manifests.iter() {
            let (k, v) = kv?;
            let names_it = self
                .decode::<ManifestRecord>("manifests", &v)
                .is_none_or(|r| r.digest == *digest);
            if names_it {
                self.manifests.remove(k)?;
            }
        }
        for (name, tag, r) in self.tag_records(TagTree::Built)? {
            if r.digest == *digest {
                self.remove_tag_record(TagTree::Built, &name, &tag)?;
            }
        }
        self.manifest_digests.remove(digest.as_bytes())?;
        self.last_pulled.remove(digest.as_bytes())?;
        Ok(())
    }

    /// Drops layer records whose blob is gone, so the index does not grow
    /// with layers the collector deleted.
    pub fn prune_layers(&self, stored: impl Fn(&Digest) -> bool) -> Result<usize, DbError> {
        let mut pruned = 0;
        for kv in self.layers.iter() {
            let (k, v) = kv?;
            let gone = self
                .decode::<LayerRecord>("layers", &v)
                .is_none_or(|r| !stored(&r.digest));
            if gone {
                self.layers.remove(k)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Records when images were last pulled, in one batch.
    pub fn put_last_pulled(&self, pulls: &HashMap<Digest, PullRecord>) -> Result<(), DbError> {
        let mut batch = sled::Batch::default();
        for (digest, record) in pulls {
            batch.insert(digest.as_bytes(), encode(record)?);
        }
        self.last_pulled.apply_batch(batch)?;
        Ok(())
    }

    /// When one image was last pulled, as last flushed.
    pub fn last_pulled_of(&self, digest: &Digest) -> Result<Option<PullRecord>, DbError> {
        Ok(self
            .last_pulled
            .get(digest.as_bytes())?
            .and_then(|v| self.decode("last_pulled", &v)))
    }

    /// When each image was last pulled, as last flushed.
    pub fn last_pulled(&self) -> Result<HashMap<Digest, PullRecord>, DbError> {
        let mut out = HashMap::new();
        for kv in self.last_pulled.iter() {
            let (k, v) = kv?;
            let digest = <[u8; 32]>::try_from(k.as_ref())
                .ok()
                .map(Digest::from_bytes);
            if let (Some(d), Some(r)) = (digest, self.decode("last_pulled", &v)) {
                out.insert(d, r);
            }
        }
        Ok(out)
    }

    /// The history slots under these keys, as stored (absent or
    /// undecodable: `None`).
    pub fn history_slots(&self, keys: &[[u8; 3]]) -> Result<Vec<Option<HistoryRecord>>, DbError> {
        keys.iter()
            .map(|k| {
                Ok(self
                    .history
                    .get(k)?
                    .and_then(|v| self.decode("history", &v)))
            })
            .collect()
    }

    /// Writes history slots in one batch.
    pub fn put_history_slots(&self, slots: &[([u8; 3], HistoryRecord)]) -> Result<(), DbError> {
        let mut batch = sled::Batch::default();
        for (key, record) in slots {
            batch.insert(&key[..], encode(record)?);
        }
        self.history.apply_batch(batch)?;
        Ok(())
    }

    /// Slots stored in the history rings.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// Bytes of the history rings' keys and records.
    pub fn history_bytes(&self) -> Result<u64, DbError> {
        let mut total = 0;
        for kv in self.history.iter() {
            let (k, v) = kv?;
            total += (k.len() + v.len()) as u64;
        }
        Ok(total)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.manifest_digests.len(), self.layers.len())
    }

    /// As [`flush`](Self::flush), blocking: for tools without a runtime.
    pub fn flush_blocking(&self) -> Result<(), DbError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// Opens the database as soon as sled's flusher thread, which holds the
/// file lock a moment after the last handle is dropped, lets go of it.
#[cfg(test)]
pub(crate) fn open_when_free(path: &std::path::Path) -> Result<Db, DbError> {
    for _ in 0..100 {
        match Db::open(path) {
            Err(DbError::InUse(_)) => std::thread::sleep(std::time::Duration::from_millis(50)),
            other => return other,
        }
    }
    Db::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_manifest_takes_its_last_pull_along() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        let pull = |image: &str| PullRecord {
            at: 5,
            image: image.into(),
        };
        let pulls = HashMap::from([(old, pull("hello")), (new, pull("hello"))]);
        db.put_last_pulled(&pulls).unwrap();
        db.add_manifest_digest(&old).unwrap();
        db.forget_manifest_digest(&old).unwrap();
        assert!(!db.is_manifest(&old).unwrap());
        assert_eq!(db.last_pulled_of(&old).unwrap(), None);
        assert_eq!(db.last_pulled_of(&new).unwrap(), Some(pull("hello")));
    }

    #[test]
    fn records_round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"m");
        {
            let db = Db::open(dir.path()).unwrap();
            let rec = ManifestRecord {
                digest: d,
                checked_at: 5,
                out_paths: vec!["/nix/store/x".into()],
                revision: Some("sha256-x".into()),
            };
            db.put_manifest("k", &rec).unwrap();
            db.put_layer(
                "l",
                &LayerRecord {
                    digest: d,
                    diff_id: d,
                    size: 3,
                },
            )
            .unwrap();
            db.add_popularity(["a", "b", "a"]).unwrap();
            db.add_tag("shell/hello", "latest").unwrap();
            db.add_tag("shell/hello", "v1").unwrap();
            db.add_tag("shell/hello/x", "other").unwrap();
            for i in 0..(BUILDS_KEPT + 5) {
                db.add_build(&BuildRecord {
                    image: format!("img{i}"),
                    tag: "latest".into(),
                    started_at: i as u64,
                    phases: vec![("nix".into(), 1)],
                    layers_total: 1,
                    layers_reused: 0,
                    bytes_packed: 1,
                    outcome: BuildOutcome::Success { manifest: d },
                    revision: None,
                    nix_processes: 3,
                    evaluated: 1,
                })
                .unwrap();
            }
            for i in 0..(ERRORS_KEPT + 2) {
                db.add_error(&ErrorRecord {
                    image: format!("err{i}"),
                    tag: "latest".into(),
                    at: i as u64,
                    message: "m".into(),
                    stderr_tail: "s".into(),
                })
                .unwrap();
            }
            // a: a miss and a hit, both served; b: a hit; c: a miss not served.
            let pulls = std::collections::HashMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)]);
            db.add_manifest_requests(2, 2, &pulls).unwrap();
            db.db.flush().unwrap();
        }
        let db = open_when_free(dir.path()).unwrap();
        let errors = db.errors().unwrap();
        assert_eq!(errors.len(), ERRORS_KEPT);
        assert_eq!(errors[0].image, format!("err{}", ERRORS_KEPT + 1));
        assert_eq!(db.lookups().unwrap(), (2, 2));
        assert_eq!(db.pulls().unwrap(), vec![("a".into(), 2), ("b".into(), 1)]);
        assert_eq!(db.popularity_desc().unwrap()[0], ("a".into(), 2));
        let m = db.manifest("k").unwrap().unwrap();
        assert_eq!((m.digest, m.revision.as_deref()), (d, Some("sha256-x")));
        assert!(db.manifest("other").unwrap().is_none());
        assert!(db.is_manifest(&d).unwrap());
        assert_eq!(db.layer("l").unwrap().unwrap().size, 3);
        assert_eq!(
            db.popularity().unwrap(),
            vec![("a".into(), 2), ("b".into(), 1)]
        );
        assert_eq!(db.tags("shell/hello").unwrap(), vec!["latest", "v1"]);
        let builds = db.builds().unwrap();
        assert_eq!(builds.len(), BUILDS_KEPT);
        assert_eq!(builds[0].image, format!("img{}", BUILDS_KEPT + 4));
    }

    fn sample_manifest() -> ManifestRecord {
        ManifestRecord {
            digest: Digest::of(b"m"),
            checked_at: 7,
            out_paths: vec!["/nix/store/x-hello".into()],
            revision: None,
        }
    }

    /// Layout 1 as the previous release wrote it: bare bincode values and
    /// no `meta` tree.
    #[test]
    fn opens_a_layout_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let bare = |v: &ManifestRecord| {
            bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
        };
        {
            let raw = sled::open(dir.path()).unwrap();
            let manifests = raw.open_tree("manifests").unwrap();
            manifests.insert("k", bare(&sample_manifest())).unwrap();
            let layer = LayerRecord {
                digest: Digest::of(b"l"),
                diff_id: Digest::of(b"d"),
                size: 9,
            };
            let layer = bincode::serde::encode_to_vec(layer, bincode::config::standard()).unwrap();
            raw.open_tree("layers").unwrap().insert("l", layer).unwrap();
            raw.open_tree("pulls")
                .unwrap()
                .insert("a", &5u64.to_be_bytes())
                .unwrap();
            raw.flush().unwrap();
        }
        for _ in 0..2 {
            let db = open_when_free(dir.path()).unwrap();
            assert_eq!(db.manifest("k").unwrap(), Some(sample_manifest()));
            assert_eq!(db.layer("l").unwrap().unwrap().size, 9);
            assert_eq!(db.pulls().unwrap(), vec![("a".into(), 5)]);
            let meta = db.db.open_tree("meta").unwrap();
            let schema = meta.get("schema").unwrap().unwrap();
            assert_eq!(schema.as_ref(), SCHEMA_VERSION.to_be_bytes());
            db.db.flush().unwrap();
        }
    }

    #[test]
    fn image_names_are_searched_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        for (name, tag) in [
            ("a", "latest"),
            ("a", "v1"),
            ("a/curl", "latest"),
            ("b", "latest"),
            ("curl", "latest"),
            ("curl", "v2"),
        ] {
            db.add_tag(name, tag).unwrap();
        }
        let names = |q: &str, offset, limit| {
            let (total, page) = db.image_names(q, offset, limit).unwrap();
            (total, page)
        };
        let (total, page) = names("", 0, 10);
        assert_eq!(total, 4);
        assert_eq!(page[0], ("a".into(), vec!["latest".into(), "v1".into()]));
        assert_eq!(page[3], ("curl".into(), vec!["latest".into(), "v2".into()]));
        let (total, page) = names("curl", 1, 1);
        assert_eq!(total, 2);
        assert_eq!(
            page,
            vec![("curl".into(), vec!["latest".into(), "v2".into()])]
        );
        assert_eq!(names("", 3, 2).1.len(), 1);
        assert_eq!(names("zzz", 0, 5), (0, vec![]));
        let mut pulls = db.image_pulls("a").unwrap();
        assert!(pulls.days.is_empty());
        db.add_image_pulls(&HashMap::from([("a".to_owned(), 2)]), 86_400)
            .unwrap();
        db.add_image_pulls(&HashMap::from([("a".to_owned(), 1)]), 86_400)
            .unwrap();
        pulls = db.image_pulls("a").unwrap();
        assert_eq!(pulls.days, vec![(86_400, 3)]);
        for day in 2..40 {
            pulls.add(day * 86_400, 1);
        }
        assert_eq!(pulls.days.len(), ImagePullsRecord::DAYS);
        assert_eq!(pulls.days.last(), Some(&(39 * 86_400, 1)));
    }

    #[test]
    fn tag_records_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let r = TagRecord {
            digest: Digest::of(b"m"),
            at: 3,
        };
        db.put_tag_record(TagTree::Pinned, "shell/hello", "v1", &r)
            .unwrap();
        assert_eq!(
            db.tag_record(TagTree::Pinned, "shell/hello", "v1").unwrap(),
            Some(r.clone())
        );
        assert_eq!(
            db.tag_record(TagTree::Built, "shell/hello", "v1").unwrap(),
            None
        );
        assert!(db.is_manifest(&r.digest).unwrap());
        assert_eq!(db.tags("shell/hello").unwrap(), vec!["v1"]);
        assert_eq!(
            db.tag_records(TagTree::Pinned).unwrap(),
            vec![("shell/hello".into(), "v1".into(), r)]
        );
        db.remove_tag_record(TagTree::Pinned, "shell/hello", "v1")
            .unwrap();
        assert!(db.tag_records(TagTree::Pinned).unwrap().is_empty());
        db.put_manifest("k", &sample_manifest()).unwrap();
        assert_eq!(db.manifests().unwrap().len(), 1);
        db.remove_manifest("k").unwrap();
        assert!(db.manifests().unwrap().is_empty());
    }

    #[test]
    fn pinned_platforms_replace_and_go_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let record = |s: &[u8]| TagRecord {
            digest: Digest::of(s),
            at: 1,
        };
        let both = [
            ("amd64".to_owned(), record(b"x")),
            ("arm64".to_owned(), record(b"a")),
        ];
        db.put_tag_record(TagTree::Pinned, "a", "v1", &both[0].1)
            .unwrap();
        db.put_pinned_platforms("a", "v1", &both).unwrap();
        // Another tag that starts alike is another image.
        db.put_pinned_platforms("a", "v10", &both[..1]).unwrap();
        assert_eq!(db.pinned_platforms("a", "v1").unwrap(), both.to_vec());
        assert!(db.is_manifest(&both[1].1.digest).unwrap());
        assert_eq!(db.all_pinned_platforms().unwrap().len(), 3);
        db.put_pinned_platforms("a", "v1", &both[1..]).unwrap();
        assert_eq!(db.pinned_platforms("a", "v1").unwrap(), both[1..].to_vec());
        db.remove_pinned("a", "v1").unwrap();
        assert!(db.pinned_platforms("a", "v1").unwrap().is_empty());
        assert_eq!(db.tag_record(TagTree::Pinned, "a", "v1").unwrap(), None);
        assert_eq!(
            db.all_pinned_platforms().unwrap(),
            vec![("a".into(), "v10".into(), "amd64".into(), both[0].1.clone())]
        );
    }

    #[test]
    fn a_second_open_says_the_database_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Db::open(dir.path()).unwrap();
        let err = Db::open(dir.path()).err().unwrap();
        assert!(matches!(err, DbError::InUse(_)), "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn undecodable_records_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.put_manifest("good", &sample_manifest()).unwrap();
        db.manifests
            .insert("garbage", &[1u8, 0xff, 0xff][..])
            .unwrap();
        db.manifests.insert("future", &[200u8, 0][..]).unwrap();
        db.manifests.insert("empty", &[][..]).unwrap();
        db.builds
            .insert(0u64.to_be_bytes(), &[1u8, 0xff][..])
            .unwrap();
        assert_eq!(db.manifest("good").unwrap(), Some(sample_manifest()));
        for key in ["garbage", "future", "empty"] {
            assert_eq!(db.manifest(key).unwrap(), None, "{key}");
        }
        assert!(db.builds().unwrap().is_empty());
    }

    #[test]
    fn a_newer_layout_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let raw = sled::open(dir.path()).unwrap();
            let newer = (SCHEMA_VERSION + 1).to_be_bytes();
            raw.open_tree("meta")
                .unwrap()
                .insert("schema", &newer)
                .unwrap();
            raw.flush().unwrap();
        }
        let err = open_when_free(dir.path()).err().unwrap();
        assert!(matches!(err, DbError::TooNew { .. }), "{err}");
        assert!(err.to_string().contains("newer nixery"), "{err}");
    }

    fn eval_record(n: usize) -> EvalRecord {
        EvalRecord {
            drv_path: format!("/nix/store/{n}.drv"),
            out_path: format!("/nix/store/{n}"),
            main_program: n.is_multiple_of(2).then(|| "prog".to_owned()),
            licenses: vec!["MIT".to_owned()],
            homepage: None,
        }
    }

    #[test]
    fn evaluations_are_kept_and_a_damaged_one_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.put_evaluations(&[("a".into(), eval_record(0)), ("b".into(), eval_record(1))])
            .unwrap();
        assert_eq!(db.evaluation("a").unwrap(), Some(eval_record(0)));
        assert_eq!(db.evaluation("b").unwrap(), Some(eval_record(1)));
        assert_eq!(db.evaluation("c").unwrap(), None);
        db.evaluations.insert("a", &[1u8, 0xff, 0xff][..]).unwrap();
        assert_eq!(db.evaluation("a").unwrap(), None);
    }

    #[test]
    fn evaluations_are_pruned_past_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let records: Vec<_> = (0..10).map(|n| (format!("{n}"), eval_record(n))).collect();
        db.put_evaluations(&records).unwrap();
        assert_eq!(db.prune_evaluations(10).unwrap(), 0);
        assert_eq!(db.prune_evaluations(6).unwrap(), 5);
        assert_eq!(db.evaluations.len(), 5);
    }

    #[test]
    fn build_records_of_version_1_are_read() {
        let old = records::legacy::BuildRecordV1 {
            image: "shell".into(),
            tag: "latest".into(),
            started_at: 7,
            phases: vec![("resolve".into(), 40)],
            layers_total: 2,
            layers_reused: 1,
            bytes_packed: 9,
            outcome: BuildOutcome::PackagesNotFound(vec!["x".into()]),
            revision: Some("abc".into()),
        };
        let mut bytes = vec![1u8];
        bincode::serde::encode_into_std_write(&old, &mut bytes, bincode::config::standard())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.builds.insert(0u64.to_be_bytes(), bytes).unwrap();
        let read = db.builds().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(
            (
                read[0].image.as_str(),
                read[0].layers_reused,
                read[0].nix_processes
            ),
            ("shell", 1, 0)
        );
        assert_eq!(read[0].revision.as_deref(), Some("abc"));
    }
}
