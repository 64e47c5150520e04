//! Content-addressed blob store on local disk.
//!
//! Layout: `<root>/blobs/sha256/<first 2 hex>/<64 hex>`, plus `<root>/tmp/`
//! for blobs being written. A blob becomes visible only by an atomic link
//! of its temp file, after its bytes are fsynced, so a crash leaves either nothing or a whole,
//! correctly named blob (and perhaps debris in `tmp/`, cleared on open).
//! Blob paths are only ever built from a parsed [`Digest`].

use crate::digest::{Digest, HashingWriter};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// Stored blobs and their bytes: counted once at open, then kept up to
    /// date by commits, so stats never walk the directory.
    count: AtomicU64,
    bytes: AtomicU64,
}

/// A content-addressed blob store. Cloning is cheap and shares the store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dirs: Arc<Dirs>,
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

        let (count, bytes) = scan(&blobs)?;
        Ok(BlobStore {
            dirs: Arc::new(Dirs {
                blobs,
                tmp,
                count: AtomicU64::new(count),
                bytes: AtomicU64::new(bytes),
            }),
        })
    }

    fn shard_dir(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dirs.blobs.join(&hex[..2])
    }

    fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dirs.blobs.join(&hex[..2]).join(hex)
    }

    /// A writer to a new temp file; bytes are hashed as they are written.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
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

    /// The blob, memory-mapped, or None if it is not stored.
    pub fn get(&self, digest: &Digest) -> Result<Option<Blob>, BlobError> {
        let path = self.path_of(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        if len == 0 {
            // mmap of length 0 fails with EINVAL.
            return Ok(Some(Blob(Inner::Empty)));
        }
        // SAFETY: committed blobs are never written in place: they are
        // created read-only in tmp/ and linked into place whole; a name,
        // once linked, is never replaced.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("mapping", &path))?;
        Ok(Some(Blob(Inner::Mapped(map))))
    }

    /// Count and total bytes of stored blobs.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.dirs.count.load(Ordering::Relaxed),
            self.dirs.bytes.load(Ordering::Relaxed),
        )
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
                let parsed = name
                    .to_str()
                    .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
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
        let path = self.path_of(digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(*digest))
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut hashed = HashingWriter::new(io::sink());
        io::copy(&mut file, &mut hashed).map_err(io_err("reading", &path))?;
        Ok(hashed.finish().1 == *digest)
    }
}

/// Counts the blobs under `root` and their bytes.
fn scan(root: &Path) -> Result<(u64, u64), BlobError> {
    let (mut count, mut bytes) = (0u64, 0u64);
    for shard in fs::read_dir(root).map_err(io_err("listing", root))? {
        let shard = shard.map_err(io_err("listing", root))?;
        if !shard.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let shard_path = shard.path();
        for blob in fs::read_dir(&shard_path).map_err(io_err("listing", &shard_path))? {
            let blob = blob.map_err(io_err("listing", &shard_path))?;
            let meta = match blob.metadata() {
                Ok(m) => m,
                // Raced with a removal: not a blob any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &blob.path())(e)),
            };
            if meta.is_file() {
                count += 1;
                bytes += meta.len();
            }
        }
    }
    Ok((count, bytes))
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
        let dest = self.path_of(digest);
        if fs::symlink_metadata(&dest).is_ok() {
            // Already stored; the temp file is removed when `tmp` drops.
            return Ok(());
        }
        file.sync_all().map_err(io_err("syncing", tmp.path()))?;
        drop(file);

        let shard = self.shard_dir(digest);
        match fs::create_dir(&shard) {
            Ok(()) => sync_dir(&self.dirs.blobs)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &shard)(e)),
        }
        // A link, not a rename: it fails if a concurrent writer of the same
        // content got there first, so each blob is counted once. The temp
        // name goes when `tmp` drops; a crash leaves it for `open` to clear.
        match fs::hard_link(tmp.path(), &dest) {
            Ok(()) => {
                self.dirs.count.fetch_add(1, Ordering::Relaxed);
                self.dirs.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io_err("linking into place", tmp.path())(e)),
        }
        sync_dir(&shard)
    }
}

#[derive(Debug)]
enum Inner {
    Mapped(memmap2::Mmap),
    Empty,
}

/// A stored blob's bytes, memory-mapped.
#[derive(Debug)]
pub struct Blob(Inner);

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
            Inner::Mapped(map) => bytes::Bytes::from_owner(map),
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
