//! Content-addressed blob store on local disk.
//!
//! Layout: `<root>/blobs/sha256/<first 2 hex>/<64 hex>`, plus `<root>/tmp/`
//! for blobs being written. A blob becomes visible only by an atomic link
//! of its temp file, after its bytes are fsynced, so a crash leaves either nothing or a whole,
//! correctly named blob (and perhaps debris in `tmp/`, cleared on open).
//! Blob paths are only ever built from a parsed [`Digest`].

use crate::digest::{Digest, HashingWriter};
use crate::store::leases::Leases;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {0} is not in the store")]
    NotFound(Digest),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Prefix of temp file names, so `open` only ever deletes files this store made.
const TMP_PREFIX: &str = "blob-";
/// Buffer between callers' (possibly tiny) writes and the temp file.
const WRITE_BUFFER: usize = 128 * 1024;

/// Makes temp names unique within the process; the pid separates processes.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct Dirs {
    /// `<root>/blobs/sha256`
    blobs: PathBuf,
    /// `<root>/tmp`
    tmp: PathBuf,
    /// Stored blobs and their bytes: counted once after open, then kept up
    /// to date by commits, so stats never walk the directory.
    count: AtomicU64,
    bytes: AtomicU64,
    /// Blobs opened for sending to clients (see [`BlobStore::in_use`]).
    sending: AtomicU64,
    /// Blobs in use by a response or a build in flight: the garbage
    /// collector deletes none of them (see [`BlobStore::delete_unless_pinned`]).
    pins: Mutex<PinTable>,
    /// While the count after open runs (in the background, so that a large
    /// store does not slow start-up): the blobs committed since it began,
    /// which it must not count again. None once it is done.
    counting: Mutex<Option<HashSet<String>>>,
    counted: Condvar,
}

impl Dirs {
    /// The set is plain data: usable after a panic elsewhere.
    fn counting(&self) -> MutexGuard<'_, Option<HashSet<String>>> {
        self.counting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many holders each pinned blob has, the leases on images just
/// served, and how many builds' pin sets were released or new leases
/// granted (so a collector can tell whether its view went stale).
#[derive(Debug, Default)]
struct PinTable {
    holders: HashMap<Digest, usize>,
    leases: Leases,
    released: u64,
}

/// A content-addressed blob store. Cloning is cheap and shares the store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dirs: Arc<Dirs>,
    /// When set, every blob this handle commits is pinned into it before it
    /// becomes visible, so a build's new blobs are safe from the collector
    /// until the build has recorded the manifest that references them.
    pin_into: Option<PinSet>,
}

/// A hold on one blob; the collector skips it until this is dropped.
#[derive(Debug)]
pub struct Pin {
    dirs: Arc<Dirs>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut table = lock_pins(&self.dirs);
        if let Some(n) = table.holders.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                table.holders.remove(&self.digest);
            }
        }
    }
}

/// Pins collected by one build, all released together when its last
/// handle is dropped: after the build recorded its manifest, or, once it
/// is [delivering](PinSet::delivering) an image, after that manifest was
/// answered to every client that waited for the build.
#[derive(Debug, Clone)]
pub struct PinSet(Arc<PinSetInner>);

#[derive(Debug)]
struct PinSetInner {
    dirs: Arc<Dirs>,
    pins: Mutex<Vec<Pin>>,
    /// The image the build made, whose lease gets its delivery grace when
    /// the pins go (see [`Leases::deliver`]).
    delivers: Mutex<Option<Delivery>>,
}

/// An image a build made: its name and the blobs its lease holds.
#[derive(Debug)]
struct Delivery {
    image: Digest,
    name: String,
    blobs: Vec<Digest>,
}

impl PinSet {
    pub fn add(&self, pin: Pin) {
        self.0
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pin);
    }

    /// The build made `image` (a manifest it pinned) for `name`, leased
    /// with `blobs` (none without a storage limit): when the set is
    /// dropped, its lease is spared by an emergency for
    /// [`DELIVERY_GRACE`](crate::store::leases::DELIVERY_GRACE), so that its clients can start on its blobs
    /// (and leased again for that long if it ended while they waited).
    pub fn delivering(&self, image: Digest, name: &str, blobs: Vec<Digest>) {
        *self.0.delivers.lock().unwrap_or_else(|e| e.into_inner()) = Some(Delivery {
            image,
            name: name.to_owned(),
            blobs,
        });
    }
}

impl Drop for PinSetInner {
    fn drop(&mut self) {
        // Counted before the pins go: a collector that sees any of them
        // gone also sees that its view of the records may be stale. The
        // grace is in place by then.
        let mut table = lock_pins(&self.dirs);
        let delivered = self.delivers.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = delivered.take() {
            table
                .leases
                .deliver(&d.name, d.image, d.blobs, Instant::now());
        }
        table.released += 1;
        drop(table);
        self.pins
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

fn lock_pins(dirs: &Dirs) -> MutexGuard<'_, PinTable> {
    dirs.pins.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlobStore {
    /// Creates `<root>/blobs/sha256/` and `<root>/tmp/`, and removes temp
    /// files left by a crash. Call it once at startup: temp files of writers
    /// already running on the same root would be removed too.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let blobs_parent = root.join("blobs");
        let blobs = blobs_parent.join("sha256");
        let tmp = root.join("tmp");
        for dir in [&blobs, &tmp] {
            fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        // Make the directories themselves durable before blobs land in them.
        for dir in [root, blobs_parent.as_path(), blobs.as_path()] {
            sync_dir(dir)?;
        }

        let entries = fs::read_dir(&tmp).map_err(io_err("listing", &tmp))?;
        let mut removed = 0usize;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &tmp))?;
            let is_ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX));
            if !is_ours {
                continue;
            }
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing leftover", &path)(e)),
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %tmp.display(), "removed leftover temp blobs");
        }

        let dirs = Arc::new(Dirs {
            blobs,
            tmp,
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sending: AtomicU64::new(0),
            counting: Mutex::new(Some(HashSet::new())),
            counted: Condvar::new(),
            pins: Mutex::default(),
        });
        let counter = Arc::clone(&dirs);
        std::thread::Builder::new()
            .name("blob-count".into())
            .spawn(move || count_stored(&counter))
            .map_err(io_err("starting the blob count for", root))?;
        Ok(BlobStore {
            dirs,
            pin_into: None,
        })
    }

    /// An empty set of pins for a build.
    pub fn pin_set(&self) -> PinSet {
        PinSet(Arc::new(PinSetInner {
            dirs: Arc::clone(&self.dirs),
            pins: Mutex::default(),
            delivers: Mutex::default(),
        }))
    }

    /// A handle on the same store whose commits are pinned into `pins`.
    pub fn pinning_into(&self, pins: &PinSet) -> BlobStore {
        BlobStore {
            dirs: Arc::clone(&self.dirs),
            pin_into: Some(pins.clone()),
        }
    }

    /// Keeps `digest` from the collector until the pin is dropped. Pin
    /// first, then check that the blob exists: that order cannot race with
    /// a deletion.
    pub fn pin(&self, digest: &Digest) -> Pin {
        *lock_pins(&self.dirs).holders.entry(*digest).or_insert(0) += 1;
        Pin {
            dirs: Arc::clone(&self.dirs),
            digest: *digest,
        }
    }

    /// Every blob pinned now (sent to a client, or written or reused by a
    /// build in flight or one whose clients are not answered yet): what no
    /// collection can delete yet.
    pub fn pinned(&self) -> HashSet<Digest> {
        lock_pins(&self.dirs).holders.keys().copied().collect()
    }

    /// How many builds' pin sets were released, or new leases granted, so
    /// far; a collector that computed what is referenced or leased before
    /// one must look again.
    pub fn pins_released(&self) -> u64 {
        lock_pins(&self.dirs).released
    }

    /// Holds `image` (a manifest or index, served as `name`) and the
    /// `blobs` it names for `ttl`, or renews the hold: its client is about
    /// to fetch them.
    pub fn lease(&self, name: &str, image: Digest, blobs: Vec<Digest>, ttl: Duration) {
        let mut table = lock_pins(&self.dirs);
        if table.leases.grant(name, image, blobs, ttl, Instant::now()) {
            table.released += 1;
        }
    }

    /// A blob is being fetched as part of `name`: renews the leases of the
    /// images of that name it is in.
    pub fn renew_lease(&self, name: &str, blob: &Digest) {
        lock_pins(&self.dirs)
            .leases
            .renew(name, blob, Instant::now());
    }

    /// Every blob a live lease holds, and how long until the first lease
    /// ends.
    pub fn leased(&self) -> (HashSet<Digest>, Option<Duration>) {
        self.leased_in(false)
    }

    /// As [`leased`](Self::leased); in an `emergency`, only the leases of
    /// images just delivered hold, for their grace.
    pub fn leased_in(&self, emergency: bool) -> (HashSet<Digest>, Option<Duration>) {
        let mut table = lock_pins(&self.dirs);
        let now = Instant::now();
        table.leases.expire(now);
        let end = table.leases.first_end(now, emergency).map(|e| e - now);
        (table.leases.held_blobs(now, emergency), end)
    }

    /// Deletes the blobs of `digests` that no one pins nor a lease holds
    /// (in an `emergency`, only a delivery grace), as long as no pin set was released
    /// nor lease granted since `released_before` (see
    /// [`pins_released`](Self::pins_released)); then it returns None and
    /// deletes nothing, because what the caller thought unreferenced may
    /// have been recorded or served since. Otherwise the deleted blobs and
    /// their bytes. Readers that mapped a blob keep their bytes: an
    /// unlinked file lives until it is unmapped.
    pub fn delete_unless_pinned(
        &self,
        digests: &[Digest],
        released_before: u64,
        emergency: bool,
    ) -> Result<Option<Vec<(Digest, u64)>>, BlobError> {
        self.wait_counted();
        // Held throughout: a commit pins before it links, so no blob can
        // become pinned between the check and the unlink.
        let table = lock_pins(&self.dirs);
        if table.released != released_before {
            return Ok(None);
        }
        let now = Instant::now();
        let mut deleted = Vec::new();
        for digest in digests {
            if table.holders.contains_key(digest) || table.leases.holds(digest, now, emergency) {
                continue;
            }
            let path = self.path_of(digest);
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.dirs.count.fetch_sub(1, Ordering::Relaxed);
                    self.dirs.bytes.fetch_sub(len, Ordering::Relaxed);
                    deleted.push((*digest, len));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        drop(table);
        if !deleted.is_empty() {
            sync_dir_tree(&self.dirs.blobs)?;
        }
        Ok(Some(deleted))
    }

    /// Temp files being written now (or left by a crash of another process).
    pub fn temp_files(&self) -> Result<usize, BlobError> {
        let tmp = &self.dirs.tmp;
        Ok(fs::read_dir(tmp).map_err(io_err("listing", tmp))?.count())
    }

    fn shard_dir(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dirs.blobs.join(&hex[..2])
    }

    /// Where blob `digest` is (or would be) stored.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dirs.blobs.join(&hex[..2]).join(hex)
    }

    /// Fails as a full disk would when less than the start-up reserve is
    /// free: that space is kept for the next start, even after the
    /// reserve file was released to open the database.
    fn check_room(&self, path: &Path) -> Result<(), BlobError> {
        let free =
            crate::store::disk::free_bytes(&self.dirs.tmp).map_err(io_err("statvfs", path))?;
        if free < crate::store::reserve::RESERVE_BYTES {
            return Err(io_err("writing", path)(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{free} bytes free, less than the {} kept in reserve",
                    crate::store::reserve::RESERVE_BYTES
                ),
            )));
        }
        Ok(())
    }

    /// A writer to a new temp file; bytes are hashed as they are written.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
        self.check_room(&self.dirs.tmp)?;
        loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = self
                .dirs
                .tmp
                .join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
            // Read-only mode: committed blobs are memory-mapped, and must
            // never be modified in place. The fd we get is still writable.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(BlobWriter {
                        out: HashingWriter::new(BufWriter::with_capacity(WRITE_BUFFER, file)),
                        tmp: TempPath(Some(path)),
                        store: self.clone(),
                    })
                }
                // A stale name from a previous process with our pid: try the next.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating", &path)(e)),
            }
        }
    }

    /// Writes `bytes` as a blob and commits it; returns its digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let mut w = self.writer()?;
        w.write_all(bytes)
            .map_err(io_err("writing", w.tmp.path()))?;
        Ok(w.commit()?.0)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        fs::metadata(self.path_of(digest)).is_ok_and(|m| m.is_file())
    }

    /// Whether the blob is stored whole: present with the size a manifest or
    /// layer record gives for it. A shorter file (damage from outside: blobs
    /// are never written in place) is not.
    pub fn contains_whole(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path_of(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// A stored blob's file and length, pinned first so that the collector
    /// cannot delete it between the open and the end of whatever holds the
    /// pin (a response, a build); None if it is not stored.
    fn open_pinned(&self, digest: &Digest) -> Result<Option<(File, u64, Pin)>, BlobError> {
        let pin = self.pin(digest);
        let path = self.path_of(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        Ok(Some((file, len, pin)))
    }

    /// The blob, memory-mapped, or None if it is not stored. It stays
    /// pinned (the collector keeps it) until the blob, or the bytes made of
    /// it, are dropped: a response in flight keeps its blob.
    pub fn get(&self, digest: &Digest) -> Result<Option<Blob>, BlobError> {
        let Some((file, len, pin)) = self.open_pinned(digest)? else {
            return Ok(None);
        };
        if len == 0 {
            // mmap of length 0 fails with EINVAL.
            return Ok(Some(Blob(Inner::Empty, pin)));
        }
        // SAFETY: committed blobs are never written in place: they are
        // created read-only in tmp/ and linked into place whole; a name,
        // once linked, is never replaced.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(io_err("mapping", &self.path_of(digest)))?;
        Ok(Some(Blob(Inner::Mapped(map), pin)))
    }

    /// Digests of the stored blobs of at most `max_len` bytes (manifests
    /// and configs are small). Walks the store: for start-up checks.
    pub fn small_blobs(&self, max_len: u64) -> Result<Vec<Digest>, BlobError> {
        let mut found = Vec::new();
        let root = &self.dirs.blobs;
        for shard in fs::read_dir(root).map_err(io_err("listing", root))? {
            let shard = shard.map_err(io_err("listing", root))?.path();
            let Ok(entries) = fs::read_dir(&shard) else {
                continue;
            };
            for blob in entries.flatten() {
                let small = blob
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.len() <= max_len);
                let digest = blob
                    .file_name()
                    .to_str()
                    .and_then(|hex| Digest::from_hex(hex).ok());
                if let (true, Some(d)) = (small, digest) {
                    found.push(d);
                }
            }
        }
        Ok(found)
    }

    /// The blob opened for reading in pieces (for serving large blobs
    /// without mapping or holding them whole), or None if it is not stored.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, BlobError> {
        let Some((file, len, pin)) = self.open_pinned(digest)? else {
            return Ok(None);
        };
        self.dirs.sending.fetch_add(1, Ordering::Relaxed);
        Ok(Some(BlobFile {
            file,
            len,
            _pin: pin,
            _sending: Sending(Arc::clone(&self.dirs)),
        }))
    }

    /// Count and total bytes of stored blobs. Right after open it waits
    /// for the count of what was stored before: blocking.
    pub fn stats(&self) -> (u64, u64) {
        self.wait_counted();
        (
            self.dirs.count.load(Ordering::Relaxed),
            self.dirs.bytes.load(Ordering::Relaxed),
        )
    }

    /// Waits for the count of what was stored at open. Deletions wait for
    /// it too: one before the count reached its blob would be subtracted
    /// from a count that never had it (a collection at start deleted a
    /// large layer so, and the store then looked that much smaller, within
    /// its quota, for good). Blocking.
    fn wait_counted(&self) {
        let mut counting = self.dirs.counting();
        while counting.is_some() {
            counting = self
                .dirs
                .counted
                .wait(counting)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Copies `reader` in as a blob, refusing (and keeping nothing) unless
    /// its content has the digest `expected`. Returns its size.
    pub fn put_expecting(
        &self,
        reader: &mut impl io::Read,
        expected: &Digest,
    ) -> Result<u64, BlobError> {
        let mut w = self.writer()?;
        io::copy(reader, &mut w).map_err(io_err("writing", w.tmp.path()))?;
        w.commit_expecting(expected)
    }

    /// Every stored blob with its size in bytes, sorted by digest; files
    /// not named as a digest are skipped.
    pub fn list_blobs(&self) -> Result<Vec<(Digest, u64)>, BlobError> {
        let root = &self.dirs.blobs;
        let mut out = Vec::new();
        for shard in fs::read_dir(root).map_err(io_err("listing", root))? {
            let shard = shard.map_err(io_err("listing", root))?.path();
            if !shard.is_dir() {
                continue;
            }
            for blob in fs::read_dir(&shard).map_err(io_err("listing", &shard))? {
                let name = blob.map_err(io_err("listing", &shard))?.file_name();
                let parsed = name.to_str().and_then(|hex| Digest::from_hex(hex).ok());
                if let Some(d) = parsed {
                    if let Some(len) = self.stat_blob(&d)? {
                        out.push((d, len));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The size of a stored blob, or None if it is not stored.
    pub fn stat_blob(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(digest);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Removes a stored blob (a corrupt one, or one nothing references).
    /// Returns whether it was there.
    pub fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
        self.wait_counted();
        let path = self.path_of(digest);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        self.dirs.count.fetch_sub(1, Ordering::Relaxed);
        self.dirs.bytes.fetch_sub(len, Ordering::Relaxed);
        sync_dir(&self.shard_dir(digest))?;
        Ok(true)
    }

    /// Re-hashes a stored blob; false if its content no longer matches its name.
    pub fn verify(&self, digest: &Digest) -> Result<bool, BlobError> {
        self.verify_with(digest, |_| {})
    }

    /// As [`verify`](Self::verify), calling `after_chunk` with the bytes
    /// of each chunk read (to pace the reading).
    pub fn verify_with(
        &self,
        digest: &Digest,
        mut after_chunk: impl FnMut(usize),
    ) -> Result<bool, BlobError> {
        let path = self.path_of(digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(*digest))
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut hashed = HashingWriter::new(io::sink());
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = io::Read::read(&mut file, &mut chunk).map_err(io_err("reading", &path))?;
            if n == 0 {
                break;
            }
            hashed
                .write_all(&chunk[..n])
                .map_err(io_err("hashing", &path))?;
            after_chunk(n);
        }
        Ok(hashed.finish().1 == *digest)
    }

    /// Whether blobs are being sent to clients now: background work such
    /// as the scrub waits.
    pub fn in_use(&self) -> bool {
        self.dirs.sending.load(Ordering::Relaxed) > 0
    }

    /// Moves a damaged blob aside to `<root>/quarantine/`, where nothing
    /// serves it from; false if it was not stored.
    pub fn quarantine(&self, digest: &Digest) -> Result<bool, BlobError> {
        self.wait_counted();
        let dir = self.root().join("quarantine");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let from = self.path_of(digest);
        let len = match fs::metadata(&from) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", &from)(e)),
        };
        let to = dir.join(digest.hex());
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("quarantining", &from)(e)),
        }
        self.dirs.count.fetch_sub(1, Ordering::Relaxed);
        self.dirs.bytes.fetch_sub(len, Ordering::Relaxed);
        sync_dir(&dir)?;
        sync_dir(&self.shard_dir(digest))?;
        Ok(true)
    }

    /// The directory the store was opened on.
    pub fn root(&self) -> &Path {
        self.dirs.tmp.parent().unwrap_or(&self.dirs.tmp)
    }
}

/// Counts the blobs stored at open, leaving out those committed since
/// (commits count themselves), then ends the counting phase.
fn count_stored(dirs: &Dirs) {
    let committed_since = |name: &str| dirs.counting().as_ref().is_some_and(|s| s.contains(name));
    let (count, bytes) = match scan(&dirs.blobs, committed_since) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "could not count stored blobs; stats will be low");
            (0, 0)
        }
    };
    let mut counting = dirs.counting();
    dirs.count.fetch_add(count, Ordering::Relaxed);
    dirs.bytes.fetch_add(bytes, Ordering::Relaxed);
    *counting = None;
    dirs.counted.notify_all();
}

/// Counts the blobs under `root` and their bytes, except those `skip` names.
fn scan(root: &Path, skip: impl Fn(&str) -> bool) -> Result<(u64, u64), BlobError> {
    let (mut count, mut bytes) = (0u64, 0u64);
    walk(root, |digest, len| {
        if !skip(&digest.hex()) {
            count += 1;
            bytes += len;
        }
    })?;
    Ok((count, bytes))
}

/// Calls `each` with every blob under `root` (files named by their digest;
/// anything else is skipped) and its size.
fn walk(root: &Path, mut each: impl FnMut(Digest, u64)) -> Result<(), BlobError> {
    for shard in fs::read_dir(root).map_err(io_err("listing", root))? {
        let shard = shard.map_err(io_err("listing", root))?;
        if !shard.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let shard_path = shard.path();
        for blob in fs::read_dir(&shard_path).map_err(io_err("listing", &shard_path))? {
            let blob = blob.map_err(io_err("listing", &shard_path))?;
            let Some(digest) = blob
                .file_name()
                .to_str()
                .and_then(|hex| Digest::from_hex(hex).ok())
            else {
                continue;
            };
            let meta = match blob.metadata() {
                Ok(m) => m,
                // Raced with a removal: not a blob any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &blob.path())(e)),
            };
            if meta.is_file() {
                each(digest, meta.len());
            }
        }
    }
    Ok(())
}

/// Fsyncs every shard directory, so that deletions are durable.
fn sync_dir_tree(root: &Path) -> Result<(), BlobError> {
    for shard in fs::read_dir(root).map_err(io_err("listing", root))? {
        let shard = shard.map_err(io_err("listing", root))?;
        if shard.file_type().is_ok_and(|t| t.is_dir()) {
            sync_dir(&shard.path())?;
        }
    }
    Ok(())
}

/// Fsyncs a directory so that entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// A temp file path deleted on drop unless taken.
#[derive(Debug)]
struct TempPath(Option<PathBuf>);

impl TempPath {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn remove(mut self) -> Result<(), BlobError> {
        match self.0.take() {
            Some(p) => fs::remove_file(&p).map_err(io_err("removing", &p)),
            None => Ok(()),
        }
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove temp blob");
            }
        }
    }
}

/// Writes a new blob to a temp file, hashing as it goes. Dropping it without
/// committing deletes the temp file.
#[derive(Debug)]
pub struct BlobWriter {
    out: HashingWriter<BufWriter<File>>,
    tmp: TempPath,
    store: BlobStore,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Makes the blob durable under its digest: fsync, link into place,
    /// fsync the directory. If the blob already exists the temp file is dropped (same
    /// content, by definition).
    pub fn commit(self) -> Result<(Digest, u64), BlobError> {
        let (digest, file, tmp, len, store) = self.finish()?;
        store.install(&digest, file, tmp, len)?;
        Ok((digest, len))
    }

    /// Like [`commit`](Self::commit), but fails and deletes the temp file if
    /// the content's digest is not `expected`.
    pub fn commit_expecting(self, expected: &Digest) -> Result<u64, BlobError> {
        let (actual, file, tmp, len, store) = self.finish()?;
        if actual != *expected {
            drop(file);
            tmp.remove()?;
            return Err(BlobError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        store.install(&actual, file, tmp, len)?;
        Ok(len)
    }

    fn finish(self) -> Result<(Digest, File, TempPath, u64, BlobStore), BlobError> {
        let BlobWriter { out, tmp, store } = self;
        let (file, digest, len) = out.finish();
        let file = file
            .into_inner()
            .map_err(|e| io_err("writing", tmp.path())(e.into_error()))?;
        // The temp file goes with the error: the space is given back.
        store.check_room(tmp.path())?;
        Ok((digest, file, tmp, len, store))
    }
}

impl BlobStore {
    fn install(
        &self,
        digest: &Digest,
        file: File,
        tmp: TempPath,
        len: u64,
    ) -> Result<(), BlobError> {
        // Pinned before it can be seen, so the collector never takes a
        // blob a build has just written (or found already stored).
        if let Some(pins) = &self.pin_into {
            pins.add(self.pin(digest));
        }
        let dest = self.path_of(digest);
        match fs::symlink_metadata(&dest) {
            // Already stored; the temp file is removed when `tmp` drops.
            Ok(m) if m.len() == len => return Ok(()),
            // Same name, other length: the stored file was damaged. Readers
            // that mapped it keep their mapping; new ones get the whole blob.
            Ok(m) => {
                tracing::warn!(blob = %digest, stored = m.len(), expected = len, "replacing a damaged blob");
                fs::remove_file(&dest).map_err(io_err("removing damaged", &dest))?;
                let less = |n: u64| move |v: u64| Some(v.saturating_sub(n));
                let _ =
                    (self.dirs.count).fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(1));
                let _ = (self.dirs.bytes).fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    less(m.len()),
                );
            }
            Err(_) => {}
        }
        file.sync_all().map_err(io_err("syncing", tmp.path()))?;
        drop(file);

        let shard = self.shard_dir(digest);
        match fs::create_dir(&shard) {
            Ok(()) => sync_dir(&self.dirs.blobs)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &shard)(e)),
        }
        // While the blobs stored before open are being counted, the count
        // must skip this one: it counts itself. Marked before the link, so
        // that the count cannot see it unmarked.
        let hex = digest.hex();
        let marked = self
            .dirs
            .counting()
            .as_mut()
            .is_some_and(|s| s.insert(hex.clone()));
        // A link, not a rename: it fails if a concurrent writer of the same
        // content got there first, so each blob is counted once. The temp
        // name goes when `tmp` drops; a crash leaves it for `open` to clear.
        match fs::hard_link(tmp.path(), &dest) {
            Ok(()) => {
                self.dirs.count.fetch_add(1, Ordering::Relaxed);
                self.dirs.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                // Not ours after all: whatever is there is counted by the scan.
                if marked {
                    if let Some(s) = self.dirs.counting().as_mut() {
                        s.remove(&hex);
                    }
                }
                if e.kind() == io::ErrorKind::AlreadyExists {
                    return Ok(());
                }
                return Err(io_err("linking into place", tmp.path())(e));
            }
        }
        sync_dir(&shard)
    }
}

/// A stored blob opened for positioned reads. Committed blobs never change,
/// so its length holds for as long as it is open, even if it is removed.
#[derive(Debug)]
pub struct BlobFile {
    file: File,
    len: u64,
    /// Keeps the collector away while a response reads the file.
    _pin: Pin,
    _sending: Sending,
}

/// Counts a blob being sent to a client while it lives.
#[derive(Debug)]
struct Sending(Arc<Dirs>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BlobFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads exactly `buf.len()` bytes at `offset`; blocking.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    /// The `len` bytes at `offset` (within the blob) as a read-only shared
    /// mapping of the page cache, its pages faulted in now (blocking: they
    /// may come from the disk) and read ahead sequentially. The mapping
    /// lasts as long as the returned bytes.
    pub fn map_window(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let window = self.map(offset, len, true)?;
        // Only advice: a kernel that ignores it changes nothing.
        let _ = window.map.advise(memmap2::Advice::Sequential);
        let skip = window.skip;
        Ok(bytes::Bytes::from_owner(window.map).slice(skip..))
    }

    /// The `len` (> 0) bytes at `offset` mapped read-only and shared, from
    /// the page holding `offset`; faulted in now with `populate`, else
    /// only when read.
    pub fn map(&self, offset: u64, len: usize, populate: bool) -> io::Result<MappedWindow> {
        let page = page_size();
        let start = offset - offset % page;
        let skip = (offset - start) as usize;
        let mut options = memmap2::MmapOptions::new();
        options.offset(start).len(skip + len);
        if populate {
            options.populate();
        }
        // SAFETY: blobs are never written in place (a new one is linked in
        // whole; deleting unlinks), so the mapped bytes cannot change.
        let map = unsafe { options.map(&self.file)? };
        Ok(MappedWindow {
            map,
            skip,
            file_start: start,
        })
    }
}

impl std::os::fd::AsRawFd for BlobFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.file)
    }
}

/// A window of a blob mapped by [`BlobFile::map`]: the requested bytes
/// start `skip` bytes into `map`, whose first byte is the file's byte
/// `file_start` (a page boundary).
pub struct MappedWindow {
    pub map: memmap2::Mmap,
    pub skip: usize,
    pub file_start: u64,
}

/// The size of a memory page (mapping offsets are multiples of it).
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system setting.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[derive(Debug)]
enum Inner {
    Mapped(memmap2::Mmap),
    Empty,
}

/// A stored blob's bytes, memory-mapped, and its pin.
#[derive(Debug)]
pub struct Blob(Inner, Pin);

/// The owner of a served blob's bytes: the mapping and the pin go together.
struct PinnedMap(memmap2::Mmap, #[allow(dead_code)] Pin);

impl AsRef<[u8]> for PinnedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Blob {
    pub fn len(&self) -> u64 {
        self.as_ref().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes without copying: the mapping is owned by the `Bytes`.
    pub fn into_bytes(self) -> bytes::Bytes {
        match self.0 {
            Inner::Mapped(map) => bytes::Bytes::from_owner(PinnedMap(map, self.1)),
            Inner::Empty => bytes::Bytes::new(),
        }
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Inner::Mapped(map) => map,
            Inner::Empty => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp_names(root: &Path) -> Vec<String> {
        fs::read_dir(root.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[test]
    fn put_get_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"hello world").unwrap();
        assert_eq!(d, Digest::of(b"hello world"));
        assert!(store.contains(&d));
        let path = dir
            .path()
            .join("blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex());
        assert!(path.is_file());
        let blob = store.get(&d).unwrap().unwrap();
        assert_eq!(blob.len(), 11);
        assert_eq!(blob.as_ref(), b"hello world");
        assert_eq!(&blob.into_bytes()[..], b"hello world");
        assert!(tmp_names(dir.path()).is_empty());

        let absent = Digest::of(b"absent");
        assert!(!store.contains(&absent));
        assert!(store.get(&absent).unwrap().is_none());
    }

    #[test]
    fn open_blob_reads_at_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"0123456789").unwrap();
        let f = store.open_blob(&d).unwrap().unwrap();
        assert_eq!(f.len(), 10);
        let mut buf = [0u8; 4];
        f.read_exact_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"3456");
        let err = f.read_exact_at(&mut buf, 8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(store.open_blob(&Digest::of(b"absent")).unwrap().is_none());
    }

    #[test]
    fn empty_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"").unwrap();
        assert_eq!(d, Digest::of(b""));
        let blob = store.get(&d).unwrap().unwrap();
        assert!(blob.is_empty());
        assert!(blob.into_bytes().is_empty());
        assert!(store.verify(&d).unwrap());
    }

    #[test]
    fn streamed_writes_hash_like_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = store.writer().unwrap();
        for chunk in data.chunks(777) {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(w.len(), data.len() as u64);
        let (d, n) = w.commit().unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
        assert_eq!(store.get(&d).unwrap().unwrap().as_ref(), &data[..]);
    }

    #[test]
    fn open_removes_crash_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"half a blob").unwrap();
        w.flush().unwrap();
        // Simulate a crash: the process dies without running destructors.
        std::mem::forget(w);
        fs::write(dir.path().join("tmp/blob-999-0"), b"older debris").unwrap();
        fs::write(dir.path().join("tmp/unrelated"), b"not ours").unwrap();
        assert_eq!(tmp_names(dir.path()).len(), 3);

        BlobStore::open(dir.path()).unwrap();
        assert_eq!(tmp_names(dir.path()), vec!["unrelated".to_string()]);
    }

    #[test]
    fn dropped_writer_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(&[7u8; 300_000]).unwrap();
        assert_eq!(tmp_names(dir.path()).len(), 1);
        drop(w);
        assert!(tmp_names(dir.path()).is_empty());
        assert_eq!(store.stats(), (0, 0));
    }

    #[test]
    fn commit_expecting_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"actual").unwrap();
        let expected = Digest::of(b"expected");
        match w.commit_expecting(&expected) {
            Err(BlobError::DigestMismatch {
                expected: e,
                actual,
            }) => {
                assert_eq!(e, expected);
                assert_eq!(actual, Digest::of(b"actual"));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert!(tmp_names(dir.path()).is_empty());
        assert!(!store.contains(&Digest::of(b"actual")));
        assert_eq!(store.stats(), (0, 0));

        let mut w = store.writer().unwrap();
        w.write_all(b"actual").unwrap();
        assert_eq!(w.commit_expecting(&Digest::of(b"actual")).unwrap(), 6);
        assert!(store.contains(&Digest::of(b"actual")));
    }

    #[test]
    fn concurrent_writers_of_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![42u8; 2 * 1024 * 1024];
        let barrier = std::sync::Barrier::new(4);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut w = store.writer().unwrap();
                        w.write_all(&data).unwrap();
                        barrier.wait();
                        w.commit()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r.unwrap(), (Digest::of(&data), data.len() as u64));
        }
        assert_eq!(store.stats(), (1, data.len() as u64));
        assert!(tmp_names(dir.path()).is_empty());
        assert!(store.verify(&Digest::of(&data)).unwrap());
    }

    #[test]
    fn stats_counts_blobs_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.stats(), (0, 0));
        store.put(b"one").unwrap();
        store.put(b"three").unwrap();
        store.put(b"three").unwrap();
        store.put(b"").unwrap();
        assert_eq!(store.stats(), (3, 8));
        // A reopened store counts what is on disk.
        drop(store);
        assert_eq!(BlobStore::open(dir.path()).unwrap().stats(), (3, 8));
    }

    #[test]
    fn commits_while_counting_after_open_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let before: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().to_vec()).collect();
        for b in &before {
            store.put(b).unwrap();
        }
        drop(store);
        // Reopen and commit new and already stored blobs while it counts.
        let store = BlobStore::open(dir.path()).unwrap();
        for i in 0..300u32 {
            store.put(&(i + 150).to_le_bytes()).unwrap();
        }
        assert_eq!(store.stats(), (450, 450 * 4));
    }

    #[test]
    fn deletions_while_counting_after_open_are_subtracted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let before: Vec<Digest> = (0..2000u32)
            .map(|i| store.put(&i.to_le_bytes()).unwrap())
            .collect();
        drop(store);
        // Reopen and delete half while it counts.
        let store = BlobStore::open(dir.path()).unwrap();
        for d in before.iter().step_by(2) {
            assert!(store.delete(d).unwrap());
        }
        assert_eq!(store.stats(), (1000, 1000 * 4));
    }

    #[test]
    fn verify_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"pristine content").unwrap();
        assert!(store.verify(&d).unwrap());

        let path = store.path_of(&d);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"pristine c0ntent").unwrap();
        assert!(!store.verify(&d).unwrap());

        let absent = Digest::of(b"absent");
        assert!(matches!(store.verify(&absent), Err(BlobError::NotFound(x)) if x == absent));
    }

    #[test]
    fn list_stat_delete_and_put_expecting() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = store.put(b"a").unwrap();
        let b = store
            .put_expecting(&mut &b"bb"[..], &Digest::of(b"bb"))
            .map(|n| (n, Digest::of(b"bb")))
            .unwrap();
        assert_eq!(b.0, 2);
        assert!(matches!(
            store.put_expecting(&mut &b"cc"[..], &Digest::of(b"not cc")),
            Err(BlobError::DigestMismatch { .. })
        ));
        let mut want = vec![(a, 1), (b.1, 2)];
        want.sort();
        assert_eq!(store.list_blobs().unwrap(), want);
        assert_eq!(store.stat_blob(&b.1).unwrap(), Some(2));
        assert!(store.delete(&a).unwrap());
        assert!(!store.delete(&a).unwrap());
        assert_eq!(store.list_blobs().unwrap(), vec![(b.1, 2)]);
        assert_eq!(store.stats(), (1, 2));
    }

    #[test]
    fn committed_blobs_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"x").unwrap();
        let mode = fs::metadata(store.path_of(&d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
    }
}
