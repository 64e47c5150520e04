//! Reproducible layer tarballs, streamed straight into the blob store.
//!
//! The same input tree always gives the same bytes: entries are in
//! `tar --sort=name` order (depth first, each directory's entries sorted by
//! name bytes, parents before children), with fixed owner, mtime and
//! normalised modes, and the gzip header carries no mtime or file name.
//!
//! Pipeline: walk -> `tar::Builder` -> sha256 of the tar (diff_id) ->
//! gzip -> progress counter -> [`BlobWriter`] (sha256 of the gzip, digest).
//! Nothing but one read buffer of file content is held in memory.

use crate::build::pgzip::ParallelGzip;
use crate::build::users;
use crate::digest::{Digest, HashingWriter};
use crate::store::fs::{BlobError, BlobStore, BlobWriter};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tar::{EntryType, Header};

/// Gzip level for layers. Layers are built while a client waits, so speed
/// matters as much as size. On /usr/lib/x86_64-linux-gnu (1008 MB of tar,
/// `examples/pack_throughput.rs`, miniz_oxide): level 1 gives 41.6% at
/// ~100 MB/s, level 2 37.0% at 61 MB/s, level 6 34.6% at 16 MB/s. Level 2
/// gets two thirds of level 6's saving over level 1 at four times its speed.
/// The backend is flate2's zlib-rs (pure Rust): at level 2 it packed
/// /usr/share/perl at 87-98 MB/s against miniz_oxide's 36-70 MB/s (2% larger
/// output), and the incompressible fixture `big` at 24 against 13-20 MB/s,
/// interleaved runs on a loaded 2-core machine. Changing the level or the
/// backend changes every layer digest: change [`LAYER_FORMAT`] with it.
/// With [`crate::build::pgzip`], level 1 packed the fixture `text` in 25%
/// less CPU time than level 2 but 43% larger (54% of the tar against 38%).
pub const GZIP_LEVEL: u32 = 2;

/// Names how layers are packed (tar normalisation, compressor, chunking,
/// level). It is part of every layer's key, so that a change of any of
/// these packs layers anew instead of mixing old and new blobs.
pub const LAYER_FORMAT: &str = "tar1-pgzip1-l2";

/// mtime of every entry: 1 rather than 0, as Nix's store normalises it.
const MTIME: u64 = 1;
const DIR_MODE: u32 = 0o555;
const TMP_MODE: u32 = 0o1777;
/// `/root`, as distributions make it.
const ROOT_HOME_MODE: u32 = 0o700;
/// The non-root user's home: its own, writable.
const USER_HOME_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o444;
const EXEC_MODE: u32 = 0o555;
const SYMLINK_MODE: u32 = 0o777;
/// Size of the inline name and linkname fields of a tar header.
const NAME_FIELD: usize = 100;
const READ_BUFFER: usize = 256 * 1024;
const TAR_BUFFER: usize = 128 * 1024;
/// Bound on directory nesting in the symlink layer, whose merge recurses.
const MAX_DEPTH: usize = 1024;

/// A layer written to the blob store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayer {
    /// sha256 of the gzip bytes: the blob's name.
    pub digest: Digest,
    /// sha256 of the uncompressed tar, for the image config's rootfs.
    pub diff_id: Digest,
    /// Compressed bytes.
    pub size: u64,
    /// Uncompressed tar bytes.
    pub tar_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0}: not an absolute path of normal components")]
    BadPath(PathBuf),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archiving {path}: {source}")]
    Entry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not a regular file, directory or symlink")]
    Unsupported(PathBuf),
    #[error("{0} changed while being archived")]
    Changed(PathBuf),
    #[error("{0}: directories nested too deeply")]
    TooDeep(PathBuf),
    #[error("writing layer: {0}")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Packs the given absolute paths (each a file, directory or symlink) into
/// one tar.gz blob. Their ancestors (`nix/`, `nix/store/`) become directory
/// entries. `progress` grows by the compressed bytes as they are written.
pub fn pack_paths(
    store: &BlobStore,
    paths: &[PathBuf],
    progress: &AtomicU64,
) -> Result<PackedLayer, ArchiveError> {
    pack_paths_with(store, paths, progress, Packing::default())
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Gzip level, 0-9. Digests depend on it: the registry always uses
    /// [`GZIP_LEVEL`]; other levels are for measuring the trade-off.
    pub level: u32,
    /// Compressor threads. The bytes do not depend on it.
    pub threads: usize,
}

impl Default for Packing {
    fn default() -> Self {
        Packing {
            level: GZIP_LEVEL,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// [`pack_paths`] with a chosen level and thread count.
pub fn pack_paths_with(
    store: &BlobStore,
    paths: &[PathBuf],
    progress: &AtomicU64,
    packing: Packing,
) -> Result<PackedLayer, ArchiveError> {
    // A tree of the requested paths, so that shared ancestors are emitted
    // once and everything comes out in one sorted walk.
    let mut roots = BTreeMap::new();
    for path in paths {
        insert_root(&mut roots, path)?;
    }

    let mut layer = LayerWriter::new(store, progress, packing)?;
    // Depth-first with an explicit stack: store trees can be deep, and the
    // stack then only holds the not-yet-visited siblings.
    let mut stack: Vec<(Vec<u8>, PathNode)> = roots.into_iter().rev().collect();
    while let Some((name, node)) = stack.pop() {
        match node {
            PathNode::Ancestor(children) => {
                layer.dir(&dir_name(&name), DIR_MODE)?;
                push_children(&mut stack, &name, children.into_iter());
            }
            PathNode::Fs(path) => {
                let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
                let kind = meta.file_type();
                if kind.is_dir() {
                    layer.dir(&dir_name(&name), DIR_MODE)?;
                    let children = sorted_entries(&path)?
                        .into_iter()
                        .map(|child| {
                            let fs_path = path.join(OsStr::from_bytes(&child));
                            (child, PathNode::Fs(fs_path))
                        })
                        .collect::<Vec<_>>();
                    push_children(&mut stack, &name, children.into_iter());
                } else if kind.is_file() {
                    layer.file(&name, &path)?;
                } else if kind.is_symlink() {
                    let target = fs::read_link(&path).map_err(read_err(&path))?;
                    layer.symlink(&name, target.as_os_str().as_bytes())?;
                } else {
                    return Err(ArchiveError::Unsupported(path));
                }
            }
        }
    }
    layer.finish()
}

/// A node of the tree of requested paths.
enum PathNode {
    /// A directory above the requested paths, synthesised in the layer.
    Ancestor(BTreeMap<Vec<u8>, PathNode>),
    /// A requested path (or something below one), taken from the filesystem.
    Fs(PathBuf),
}

fn insert_root(roots: &mut BTreeMap<Vec<u8>, PathNode>, path: &Path) -> Result<(), ArchiveError> {
    let names = normal_components(path)?;
    let Some((last, ancestors)) = names.split_last() else {
        return Err(ArchiveError::BadPath(path.to_owned()));
    };
    let mut level = roots;
    for name in ancestors {
        let node = level
            .entry(name.to_vec())
            .or_insert_with(|| PathNode::Ancestor(BTreeMap::new()));
        match node {
            PathNode::Ancestor(children) => level = children,
            // An ancestor was requested itself: its walk covers this path.
            PathNode::Fs(_) => return Ok(()),
        }
    }
    // Replaces any requested descendants: this path's walk covers them.
    level.insert(last.to_vec(), PathNode::Fs(path.to_owned()));
    Ok(())
}

/// The components of an absolute path, refusing `..` (which could escape).
fn normal_components(path: &Path) -> Result<Vec<&[u8]>, ArchiveError> {
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(ArchiveError::BadPath(path.to_owned()));
    }
    components
        .map(|c| match c {
            Component::Normal(n) => Ok(n.as_bytes()),
            _ => Err(ArchiveError::BadPath(path.to_owned())),
        })
        .collect()
}

/// Pushes `children` (in ascending order) so that they pop in that order.
fn push_children<T>(
    stack: &mut Vec<(Vec<u8>, T)>,
    parent: &[u8],
    children: impl DoubleEndedIterator<Item = (Vec<u8>, T)>,
) {
    for (child, node) in children.rev() {
        stack.push((join(parent, &child), node));
    }
}

/// A directory's entry names, sorted by bytes.
fn sorted_entries(dir: &Path) -> Result<Vec<Vec<u8>>, ArchiveError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        names.push(entry.file_name().as_bytes().to_vec());
    }
    names.sort_unstable();
    Ok(names)
}

fn join(parent: &[u8], child: &[u8]) -> Vec<u8> {
    let mut name = Vec::with_capacity(parent.len() + 1 + child.len());
    if !parent.is_empty() {
        name.extend_from_slice(parent);
        name.push(b'/');
    }
    name.extend_from_slice(child);
    name
}

/// Directory members end in `/`, as GNU tar writes them.
fn dir_name(name: &[u8]) -> Vec<u8> {
    let mut n = name.to_vec();
    n.push(b'/');
    n
}

/// The "symlink layer": the package outputs merged into `/` like Nix's
/// `symlinkJoin`. Directories are real (0555); files and symlinks become
/// symlinks to their absolute store location; the first package providing a
/// name wins. Always has `tmp/` (1777); `usr/bin/env` when `bin/env`
/// exists; and the user database of [`users`] (`etc/passwd`, `etc/group`,
/// `etc/nsswitch.conf`, `root/`, `home/user/`), each where no package
/// provides that name. Package outputs that are not directories are skipped.
pub fn pack_symlink_layer(
    store: &BlobStore,
    packages: &[PathBuf],
    progress: &AtomicU64,
) -> Result<PackedLayer, ArchiveError> {
    let mut root = BTreeMap::new();
    // Inserted first so that it wins over any package's non-directory `tmp`.
    root.insert(
        b"tmp".to_vec(),
        MergeNode::Dir(Perm::root(TMP_MODE), BTreeMap::new()),
    );

    for package in packages {
        normal_components(package)?;
        let meta = fs::symlink_metadata(package).map_err(read_err(package))?;
        if !meta.is_dir() {
            tracing::debug!(path = %package.display(), "skipping non-directory package output");
            continue;
        }
        merge_dir(&mut root, package, 0)?;
    }
    add_usr_bin_env(&mut root);
    add_user_database(&mut root);

    let mut layer = LayerWriter::new(store, progress, Packing::default())?;
    let mut stack: Vec<(Vec<u8>, MergeNode)> = root.into_iter().rev().collect();
    while let Some((name, node)) = stack.pop() {
        match node {
            MergeNode::Dir(perm, children) => {
                layer.dir_owned(&dir_name(&name), perm)?;
                push_children(&mut stack, &name, children.into_iter());
            }
            MergeNode::Link(target) => {
                layer.symlink(&name, target.as_os_str().as_bytes())?;
            }
            MergeNode::File(content) => layer.bytes(&name, &content)?,
        }
    }
    layer.finish()
}

/// A directory's mode and owner (uid and gid alike).
#[derive(Debug, Clone, Copy)]
struct Perm {
    mode: u32,
    owner: u32,
}

impl Perm {
    fn root(mode: u32) -> Self {
        Perm { mode, owner: 0 }
    }
}

/// A node of the merged tree of the symlink layer.
enum MergeNode {
    Dir(Perm, BTreeMap<Vec<u8>, MergeNode>),
    /// A symlink to this absolute target.
    Link(PathBuf),
    /// A read-only file written from memory, owned by root.
    File(Vec<u8>),
}

type Tree = BTreeMap<Vec<u8>, MergeNode>;

fn merge_dir(into: &mut Tree, dir: &Path, depth: usize) -> Result<(), ArchiveError> {
    if depth > MAX_DEPTH {
        return Err(ArchiveError::TooDeep(dir.to_owned()));
    }
    for name in sorted_entries(dir)? {
        let path = dir.join(OsStr::from_bytes(&name));
        // Never follows symlinks: a symlinked directory becomes a link.
        let is_dir = fs::symlink_metadata(&path)
            .map_err(read_err(&path))?
            .is_dir();
        match into.get_mut(&name) {
            Some(MergeNode::Dir(_, children)) if is_dir => merge_dir(children, &path, depth + 1)?,
            // First wins: an earlier package already provides this name.
            Some(_) => {}
            None if is_dir => {
                let mut children = BTreeMap::new();
                merge_dir(&mut children, &path, depth + 1)?;
                into.insert(name, MergeNode::Dir(Perm::root(DIR_MODE), children));
            }
            None => {
                into.insert(name, MergeNode::Link(path));
            }
        }
    }
    Ok(())
}

/// Adds `node` at `path` (relative, `/`-separated) with any missing
/// parent directories, unless a package already provides that name, or
/// made one of its parents something other than a directory: packages win.
fn add_if_absent(root: &mut Tree, path: &str, node: MergeNode) {
    let mut names: Vec<&str> = path.split('/').collect();
    let Some(last) = names.pop() else { return };
    let mut level = root;
    for dir in names {
        let parent = level
            .entry(dir.as_bytes().to_vec())
            .or_insert_with(|| MergeNode::Dir(Perm::root(DIR_MODE), BTreeMap::new()));
        match parent {
            MergeNode::Dir(_, children) => level = children,
            MergeNode::Link(_) | MergeNode::File(_) => return,
        }
    }
    level.entry(last.as_bytes().to_vec()).or_insert(node);
}

/// Whether the merged tree has anything at `path` (relative, `/`-separated).
fn provides(root: &Tree, path: &str) -> bool {
    let mut names = path.split('/').peekable();
    let mut level = root;
    while let Some(name) = names.next() {
        match (level.get(name.as_bytes()), names.peek()) {
            (Some(_), None) => return true,
            (Some(MergeNode::Dir(_, children)), Some(_)) => level = children,
            _ => return false,
        }
    }
    false
}

/// `/usr/bin/env` is where shebangs look for `env`; point it where `bin/env`
/// points, unless a package already provides `usr/bin/env` (first wins).
fn add_usr_bin_env(root: &mut Tree) {
    let target = match root.get(&b"bin"[..]) {
        Some(MergeNode::Dir(_, bin)) => match bin.get(&b"env"[..]) {
            Some(MergeNode::Link(target)) => target.clone(),
            _ => return,
        },
        _ => return,
    };
    add_if_absent(root, "usr/bin/env", MergeNode::Link(target));
}

/// The accounts of [`users`] and their home directories, each unless a
/// package provides it. The login shell is `/bin/sh` when the image has one.
fn add_user_database(root: &mut Tree) {
    let shell = if provides(root, "bin/sh") {
        "/bin/sh"
    } else {
        users::NOLOGIN
    };
    let file = |text: String| MergeNode::File(text.into_bytes());
    add_if_absent(root, "etc/passwd", file(users::passwd(shell)));
    add_if_absent(root, "etc/group", file(users::group()));
    add_if_absent(root, "etc/nsswitch.conf", file(users::NSSWITCH.to_owned()));
    let home = |perm| MergeNode::Dir(perm, BTreeMap::new());
    add_if_absent(root, "root", home(Perm::root(ROOT_HOME_MODE)));
    let user = Perm {
        mode: USER_HOME_MODE,
        owner: users::USER_ID,
    };
    add_if_absent(root, users::USER_HOME.trim_start_matches('/'), home(user));
}

/// Reports compressed bytes as they leave the compressor.
struct ProgressWriter<'a> {
    inner: BlobWriter,
    progress: &'a AtomicU64,
}

impl Write for ProgressWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Yields exactly `remaining` bytes, failing if the file is shorter: the tar
/// header already promised that size.
struct ExactLen<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactLen<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

type TarSink<'a> = BufWriter<HashingWriter<ParallelGzip<ProgressWriter<'a>>>>;

/// Writes normalised entries into a layer blob.
struct LayerWriter<'a> {
    tar: tar::Builder<TarSink<'a>>,
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    // GNU format: long names and links via ././@LongLink entries, which GNU
    // tar, Go's archive/tar (docker, umoci) and the tar crate all read.
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

fn as_path(name: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(name))
}

impl<'a> LayerWriter<'a> {
    fn new(
        store: &BlobStore,
        progress: &'a AtomicU64,
        packing: Packing,
    ) -> Result<Self, ArchiveError> {
        let blob = store.writer()?;
        // The gzip bytes depend only on the tar and the level.
        let gz = ParallelGzip::new(
            ProgressWriter {
                inner: blob,
                progress,
            },
            packing.level,
            packing.threads,
        );
        // Hashes the uncompressed tar on its way to the compressor.
        let hashed = HashingWriter::new(gz);
        Ok(LayerWriter {
            tar: tar::Builder::new(BufWriter::with_capacity(TAR_BUFFER, hashed)),
        })
    }

    fn entry_err(name: &[u8]) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
        move |source| ArchiveError::Entry {
            path: as_path(name).to_owned(),
            source,
        }
    }

    fn dir(&mut self, name: &[u8], mode: u32) -> Result<(), ArchiveError> {
        self.dir_owned(name, Perm::root(mode))
    }

    fn dir_owned(&mut self, name: &[u8], perm: Perm) -> Result<(), ArchiveError> {
        let mut h = header(EntryType::Directory, perm.mode, 0);
        h.set_uid(perm.owner.into());
        h.set_gid(perm.owner.into());
        self.tar
            .append_data(&mut h, as_path(name), io::empty())
            .map_err(Self::entry_err(name))
    }

    /// A read-only regular file with `content`.
    fn bytes(&mut self, name: &[u8], content: &[u8]) -> Result<(), ArchiveError> {
        let mut h = header(EntryType::Regular, FILE_MODE, content.len() as u64);
        self.tar
            .append_data(&mut h, as_path(name), content)
            .map_err(Self::entry_err(name))
    }

    fn symlink(&mut self, name: &[u8], target: &[u8]) -> Result<(), ArchiveError> {
        let mut h = header(EntryType::Symlink, SYMLINK_MODE, 0);
        // Written by hand rather than with `append_link`, which normalises
        // short targets (`a//b` -> `a/b`); the target must stay verbatim.
        if target.len() <= NAME_FIELD {
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
        } else {
            let mut long = Header::new_gnu();
            long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
            long.set_mode(0o644);
            long.set_uid(0);
            long.set_gid(0);
            long.set_mtime(0);
            // NUL-terminated, as GNU tar writes it.
            long.set_size(target.len() as u64 + 1);
            long.set_entry_type(EntryType::GNULongLink);
            long.set_cksum();
            self.tar
                .append(&long, target.chain(&[0u8][..]))
                .map_err(Self::entry_err(name))?;
        }
        self.tar
            .append_data(&mut h, as_path(name), io::empty())
            .map_err(Self::entry_err(name))
    }

    /// A regular file's content; hard links are thereby stored as copies.
    fn file(&mut self, name: &[u8], source: &Path) -> Result<(), ArchiveError> {
        // O_NOFOLLOW: the walk saw a file here; if it has been swapped for a
        // symlink since, fail rather than read outside the tree.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(source)
            .map_err(read_err(source))?;
        let meta = file.metadata().map_err(read_err(source))?;
        if !meta.is_file() {
            return Err(ArchiveError::Changed(source.to_owned()));
        }
        let size = meta.len();
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            EXEC_MODE
        } else {
            FILE_MODE
        };
        let mut h = header(EntryType::Regular, mode, size);
        let content = BufReader::with_capacity(
            READ_BUFFER,
            ExactLen {
                inner: &file,
                remaining: size,
            },
        );
        self.tar
            .append_data(&mut h, as_path(name), content)
            .map_err(|source_err| ArchiveError::Entry {
                path: source.to_owned(),
                source: source_err,
            })?;
        // Grown while read: the layer would hold a truncated copy.
        if file.metadata().map_err(read_err(source))?.len() != size {
            return Err(ArchiveError::Changed(source.to_owned()));
        }
        Ok(())
    }

    fn finish(self) -> Result<PackedLayer, ArchiveError> {
        let sink = self.tar.into_inner().map_err(ArchiveError::Write)?;
        let hashed = sink
            .into_inner()
            .map_err(|e| ArchiveError::Write(e.into_error()))?;
        let (gz, diff_id, tar_size) = hashed.finish();
        let progress = gz.finish().map_err(ArchiveError::Write)?;
        let (digest, size) = progress.inner.commit()?;
        Ok(PackedLayer {
            digest,
            diff_id,
            size,
            tar_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    /// One tar member as read back.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Member {
        name: String,
        kind: EntryType,
        mode: u32,
        link: Option<String>,
        content: Vec<u8>,
        /// uid and gid alike.
        owner: u64,
    }

    fn blob_bytes(store: &BlobStore, layer: &PackedLayer) -> Vec<u8> {
        store.get(&layer.digest).unwrap().unwrap().as_ref().to_vec()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut tar = Vec::new();
        GzDecoder::new(gz).read_to_end(&mut tar).unwrap();
        tar
    }

    /// Reads every member, checking the fixed metadata on the way.
    fn members(store: &BlobStore, layer: &PackedLayer) -> Vec<Member> {
        let tar = gunzip(&blob_bytes(store, layer));
        let mut archive = tar::Archive::new(&tar[..]);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 1);
            let owner = h.uid().unwrap();
            assert_eq!(h.gid().unwrap(), owner);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            let kind = h.entry_type();
            let mode = h.mode().unwrap();
            let name = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
            let link = entry
                .link_name_bytes()
                .map(|l| String::from_utf8(l.to_vec()).unwrap());
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            out.push(Member {
                name,
                kind,
                mode,
                link,
                content,
                owner,
            });
        }
        out
    }

    /// The member name of an absolute path: without its leading `/`.
    fn rel(p: &Path) -> String {
        p.to_str().unwrap().trim_start_matches('/').to_owned()
    }

    /// A temp store with one package `<store>/aaaa-hello`:
    /// bin/hello (exec), share/doc/README, share/empty/, lib -> ../share (rel link),
    /// abs -> /etc/passwd (abs link, not followed), a hardlink pair.
    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("store/aaaa-hello");
        fs::create_dir_all(pkg.join("bin")).unwrap();
        fs::create_dir_all(pkg.join("share/doc")).unwrap();
        fs::create_dir_all(pkg.join("share/empty")).unwrap();
        fs::write(pkg.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
        fs::set_permissions(pkg.join("bin/hello"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(pkg.join("share/doc/README"), b"read me").unwrap();
        fs::set_permissions(
            pkg.join("share/doc/README"),
            fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        symlink("../share", pkg.join("lib")).unwrap();
        symlink("/etc/passwd", pkg.join("abs")).unwrap();
        fs::write(pkg.join("share/one"), b"same inode").unwrap();
        fs::hard_link(pkg.join("share/one"), pkg.join("share/two")).unwrap();
        (dir, pkg)
    }

    #[test]
    fn reproducible_and_digests_match() {
        let (dir, pkg) = fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let progress = AtomicU64::new(0);
        let a = pack_paths(&store, std::slice::from_ref(&pkg), &progress).unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), a.size);

        // Different mtimes and write bits must not change the layer.
        let f = fs::File::options()
            .write(true)
            .open(pkg.join("share/doc/README"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(99))
            .unwrap();
        fs::set_permissions(
            pkg.join("share/doc/README"),
            fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        let b = pack_paths(&store, &[pkg.clone(), pkg.clone()], &progress).unwrap();
        assert_eq!(a, b);

        let gz = blob_bytes(&store, &a);
        assert_eq!(Digest::of(&gz), a.digest);
        assert_eq!(gz.len() as u64, a.size);
        let tar = gunzip(&gz);
        assert_eq!(Digest::of(&tar), a.diff_id);
        assert_eq!(tar.len() as u64, a.tar_size);
        // gzip header: no mtime, no name, OS unknown.
        assert_eq!(&gz[3..8], &[0, 0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
    }

    /// A layer of several compression chunks (text and random data) is
    /// the same whatever the thread count, and one valid gzip stream of
    /// the tar.
    #[test]
    fn multi_chunk_layer_is_the_same_on_any_thread_count() {
        let (dir, pkg) = fixture();
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i} some text\n").into_bytes())
            .collect();
        fs::write(pkg.join("share/text"), &text).unwrap();
        let mut x = 1u64;
        let random: Vec<u8> = (0..(3 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        fs::write(pkg.join("share/random"), &random).unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let pack = |threads| {
            let packing = Packing {
                level: GZIP_LEVEL,
                threads,
            };
            let paths = std::slice::from_ref(&pkg);
            pack_paths_with(&store, paths, &AtomicU64::new(0), packing).unwrap()
        };
        let one = pack(1);
        assert!(one.tar_size > 4 * crate::build::pgzip::CHUNK as u64);
        assert_eq!(pack(2), one);
        assert_eq!(pack(5), one);
        let gz = blob_bytes(&store, &one);
        assert_eq!(Digest::of(&gunzip(&gz)), one.diff_id);
        // The random data is stored, the text deflated.
        assert!(one.size < one.tar_size - text.len() as u64 / 2);
        assert!(one.size > random.len() as u64);
        let path = dir.path().join("layer.tar.gz");
        fs::write(&path, &gz).unwrap();
        let status = Command::new("gzip").arg("-t").arg(&path).status().unwrap();
        assert!(status.success());
        let got = members(&store, &one);
        let content = |name: &str| &got.iter().find(|m| m.name.ends_with(name)).unwrap().content;
        assert_eq!(content("share/random"), &random);
        assert_eq!(content("share/text"), &text);
    }

    #[test]
    fn entries_sorted_parents_first_with_normalised_modes() {
        let (dir, pkg) = fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_paths(&store, std::slice::from_ref(&pkg), &AtomicU64::new(0)).unwrap();
        let got = members(&store, &layer);

        let mut expected = Vec::new();
        let mut prefix = String::new();
        for part in rel(&pkg).split('/') {
            prefix.push_str(part);
            prefix.push('/');
            expected.push((prefix.clone(), EntryType::Directory, 0o555, None));
        }
        let p = rel(&pkg);
        let link = |s: &str| Some(s.to_owned());
        expected.extend([
            (
                format!("{p}/abs"),
                EntryType::Symlink,
                0o777,
                link("/etc/passwd"),
            ),
            (format!("{p}/bin/"), EntryType::Directory, 0o555, None),
            (format!("{p}/bin/hello"), EntryType::Regular, 0o555, None),
            (
                format!("{p}/lib"),
                EntryType::Symlink,
                0o777,
                link("../share"),
            ),
            (format!("{p}/share/"), EntryType::Directory, 0o555, None),
            (format!("{p}/share/doc/"), EntryType::Directory, 0o555, None),
            (
                format!("{p}/share/doc/README"),
                EntryType::Regular,
                0o444,
                None,
            ),
            (
                format!("{p}/share/empty/"),
                EntryType::Directory,
                0o555,
                None,
            ),
            (format!("{p}/share/one"), EntryType::Regular, 0o444, None),
            (format!("{p}/share/two"), EntryType::Regular, 0o444, None),
        ]);
        let summary: Vec<_> = got
            .iter()
            .map(|m| (m.name.clone(), m.kind, m.mode, m.link.clone()))
            .collect();
        assert_eq!(summary, expected);
        assert!(got.iter().all(|m| m.owner == 0));

        let content = |name: &str| &got.iter().find(|m| m.name == name).unwrap().content;
        assert_eq!(
            content(&format!("{p}/bin/hello")),
            b"#!/bin/sh\necho hello\n"
        );
        // Hard links come out as two full regular files.
        assert_eq!(content(&format!("{p}/share/one")), b"same inode");
        assert_eq!(content(&format!("{p}/share/two")), b"same inode");
    }

    #[test]
    fn shared_ancestors_once_and_sorted_across_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        for name in ["zzzz-b", "aaaa-a", "aaaa-a.d"] {
            fs::create_dir_all(store_dir.join(name)).unwrap();
        }
        fs::write(store_dir.join("file-c"), b"c").unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let paths = [
            store_dir.join("zzzz-b"),
            store_dir.join("file-c"),
            store_dir.join("aaaa-a.d"),
            store_dir.join("aaaa-a"),
        ];
        let layer = pack_paths(&store, &paths, &AtomicU64::new(0)).unwrap();
        let names: Vec<_> = members(&store, &layer)
            .into_iter()
            .map(|m| m.name)
            .collect();
        let s = rel(&store_dir);
        let tail: Vec<_> = names
            .iter()
            .skip_while(|n| **n != format!("{s}/"))
            .collect();
        assert_eq!(
            tail,
            [
                format!("{s}/"),
                format!("{s}/aaaa-a/"),
                format!("{s}/aaaa-a.d/"),
                format!("{s}/file-c"),
                format!("{s}/zzzz-b/"),
            ]
            .iter()
            .collect::<Vec<_>>()
        );
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn nested_requested_paths_are_walked_once() {
        let (dir, pkg) = fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let whole = pack_paths(&store, std::slice::from_ref(&pkg), &AtomicU64::new(0)).unwrap();
        for paths in [
            vec![pkg.join("bin"), pkg.clone(), pkg.join("share/doc/README")],
            vec![pkg.clone(), pkg.join("bin")],
        ] {
            assert_eq!(
                pack_paths(&store, &paths, &AtomicU64::new(0)).unwrap(),
                whole
            );
        }
    }

    #[test]
    fn rejects_relative_and_dotdot_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for bad in ["relative/path", "/nix/../etc", "/"] {
            let r = pack_paths(&store, &[PathBuf::from(bad)], &AtomicU64::new(0));
            assert!(matches!(r, Err(ArchiveError::BadPath(_))), "{bad}: {r:?}");
        }
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    /// A package with long and unicode names and long link targets.
    fn awkward_fixture() -> (tempfile::TempDir, PathBuf, Vec<(String, String)>) {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("store/bbbb-awkward");
        let long_dir = pkg.join("d".repeat(120));
        let deep = long_dir.join("e".repeat(200));
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f".repeat(150)), b"deep file").unwrap();
        fs::create_dir_all(pkg.join("unicodé ☃/空")).unwrap();
        fs::write(pkg.join("unicodé ☃/空/файл"), b"unicode").unwrap();
        let targets = vec![
            ("long-link".to_owned(), format!("/{}", "t".repeat(300))),
            ("hundred".to_owned(), "h".repeat(100)),
            ("ninety-nine".to_owned(), "n".repeat(99)),
            ("verbatim".to_owned(), "./a//b/".to_owned()),
        ];
        for (name, target) in &targets {
            symlink(target, pkg.join(name)).unwrap();
        }
        (dir, pkg, targets)
    }

    #[test]
    fn long_and_unicode_names_round_trip() {
        let (dir, pkg, targets) = awkward_fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_paths(&store, std::slice::from_ref(&pkg), &AtomicU64::new(0)).unwrap();
        let got = members(&store, &layer);
        let p = rel(&pkg);
        let find = |name: &str| {
            got.iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} missing from {got:#?}"))
        };

        let deep = format!(
            "{p}/{}/{}/{}",
            "d".repeat(120),
            "e".repeat(200),
            "f".repeat(150)
        );
        assert!(deep.len() > 255);
        assert_eq!(find(&deep).content, b"deep file");
        assert_eq!(
            find(&format!("{p}/{}/", "d".repeat(120))).kind,
            EntryType::Directory
        );
        assert_eq!(find(&format!("{p}/unicodé ☃/空/файл")).content, b"unicode");
        for (name, target) in &targets {
            let m = find(&format!("{p}/{name}"));
            assert_eq!(m.kind, EntryType::Symlink);
            assert_eq!(m.link.as_deref(), Some(target.as_str()));
        }
        // The GNU extension records are not themselves members.
        assert!(got.iter().all(|m| !m.name.contains("LongLink")));
    }

    /// Extracts with GNU tar and compares against the source tree.
    #[test]
    fn system_tar_extracts_identical_tree() {
        let (dir, pkg, targets) = awkward_fixture();
        let (_dir2, pkg2) = fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_paths(&store, &[pkg.clone(), pkg2.clone()], &AtomicU64::new(0)).unwrap();
        let blob_path = dir.path().join("layer.tar.gz");
        fs::write(&blob_path, blob_bytes(&store, &layer)).unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&blob_path)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        // GNU tar agrees on the member list, in order.
        let listing = Command::new("tar")
            .arg("-tzf")
            .arg(&blob_path)
            .output()
            .unwrap();
        let listed: Vec<_> = String::from_utf8(listing.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let ours: Vec<_> = members(&store, &layer)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(listed, ours);

        let x = |p: &Path| out.join(rel(p));
        let deep = PathBuf::from(format!(
            "{}/{}/{}/{}",
            pkg.display(),
            "d".repeat(120),
            "e".repeat(200),
            "f".repeat(150)
        ));
        assert_eq!(fs::read(x(&deep)).unwrap(), b"deep file");
        assert_eq!(
            fs::read(x(&pkg.join("unicodé ☃/空/файл"))).unwrap(),
            b"unicode"
        );
        for (name, target) in &targets {
            assert_eq!(
                fs::read_link(x(&pkg.join(name))).unwrap(),
                PathBuf::from(target)
            );
        }
        assert_eq!(
            fs::read(x(&pkg2.join("bin/hello"))).unwrap(),
            fs::read(pkg2.join("bin/hello")).unwrap()
        );
        let mode = |p: &Path| fs::symlink_metadata(x(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&pkg2.join("bin/hello")), 0o555);
        assert_eq!(mode(&pkg2.join("share/doc/README")), 0o444);
        assert!(x(&pkg2.join("share/empty")).is_dir());
        assert_eq!(fs::read(x(&pkg2.join("share/two"))).unwrap(), b"same inode");
        assert_eq!(
            fs::read_link(x(&pkg2.join("abs"))).unwrap(),
            Path::new("/etc/passwd")
        );
        // Make the 0555 directories removable for TempDir's cleanup.
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&out)
            .status();
    }

    #[test]
    fn file_is_archived_at_its_stat_size() {
        // /proc files stat as size 0 yet yield bytes: the header's size rules.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let layer = pack_paths(
            &store,
            &[PathBuf::from("/proc/self/status")],
            &AtomicU64::new(0),
        )
        .unwrap();
        let got = members(&store, &layer);
        assert_eq!(got.last().unwrap().content, b"");
    }

    #[test]
    fn short_read_is_an_error() {
        let mut r = ExactLen {
            inner: &b"abc"[..],
            remaining: 5,
        };
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut r = ExactLen {
            inner: &b"abcdef"[..],
            remaining: 5,
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn failure_leaves_no_temp_or_blob() {
        let (dir, pkg) = fixture();
        let status = Command::new("mkfifo")
            .arg(pkg.join("share/fifo"))
            .status()
            .unwrap();
        assert!(status.success());
        let root = dir.path().join("blobs");
        let store = BlobStore::open(&root).unwrap();
        let r = pack_paths(&store, std::slice::from_ref(&pkg), &AtomicU64::new(0));
        assert!(matches!(r, Err(ArchiveError::Unsupported(ref p)) if p.ends_with("share/fifo")));
        assert!(fs::read_dir(root.join("tmp")).unwrap().next().is_none());
        assert_eq!(store.stats(), (0, 0));
    }

    fn symlink_fixture() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("store");
        let hello = s.join("aaaa-hello");
        fs::create_dir_all(hello.join("bin")).unwrap();
        fs::create_dir_all(hello.join("share/man/man1")).unwrap();
        fs::write(hello.join("bin/hello"), b"hello").unwrap();
        fs::write(hello.join("bin/common"), b"from hello").unwrap();
        fs::write(hello.join("share/man/man1/hello.1"), b"man").unwrap();
        let coreutils = s.join("bbbb-coreutils");
        fs::create_dir_all(coreutils.join("bin")).unwrap();
        fs::create_dir_all(coreutils.join("share/man/man1")).unwrap();
        fs::write(coreutils.join("bin/coreutils"), b"cu").unwrap();
        symlink("coreutils", coreutils.join("bin/env")).unwrap();
        fs::write(coreutils.join("bin/common"), b"from coreutils").unwrap();
        fs::write(coreutils.join("share/man/man1/ls.1"), b"man").unwrap();
        fs::create_dir_all(coreutils.join("share/man/man1/hello.1")).unwrap();
        let file_output = s.join("cccc-just-a-file");
        fs::write(&file_output, b"not a dir").unwrap();
        (dir, vec![hello, file_output, coreutils])
    }

    #[test]
    fn symlink_layer_merges_first_wins() {
        let (dir, pkgs) = symlink_fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_symlink_layer(&store, &pkgs, &AtomicU64::new(0)).unwrap();
        let again = pack_symlink_layer(&store, &pkgs, &AtomicU64::new(0)).unwrap();
        assert_eq!(layer, again);
        let got: Vec<_> = members(&store, &layer)
            .into_iter()
            .map(|m| (m.name, m.mode, m.link))
            .collect();
        let (h, c) = (pkgs[0].display(), pkgs[2].display());
        let l = |s: String| Some(s);
        let expected = vec![
            ("bin/".to_owned(), 0o555, None),
            ("bin/common".to_owned(), 0o777, l(format!("{h}/bin/common"))),
            (
                "bin/coreutils".to_owned(),
                0o777,
                l(format!("{c}/bin/coreutils")),
            ),
            ("bin/env".to_owned(), 0o777, l(format!("{c}/bin/env"))),
            ("bin/hello".to_owned(), 0o777, l(format!("{h}/bin/hello"))),
            ("etc/".to_owned(), 0o555, None),
            ("etc/group".to_owned(), 0o444, None),
            ("etc/nsswitch.conf".to_owned(), 0o444, None),
            ("etc/passwd".to_owned(), 0o444, None),
            ("home/".to_owned(), 0o555, None),
            ("home/user/".to_owned(), 0o755, None),
            ("root/".to_owned(), 0o700, None),
            ("share/".to_owned(), 0o555, None),
            ("share/man/".to_owned(), 0o555, None),
            ("share/man/man1/".to_owned(), 0o555, None),
            // First wins: hello's file over coreutils' directory of that name.
            (
                "share/man/man1/hello.1".to_owned(),
                0o777,
                l(format!("{h}/share/man/man1/hello.1")),
            ),
            (
                "share/man/man1/ls.1".to_owned(),
                0o777,
                l(format!("{c}/share/man/man1/ls.1")),
            ),
            ("tmp/".to_owned(), 0o1777, None),
            ("usr/".to_owned(), 0o555, None),
            ("usr/bin/".to_owned(), 0o555, None),
            ("usr/bin/env".to_owned(), 0o777, l(format!("{c}/bin/env"))),
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn symlink_layer_without_env_has_no_usr() {
        let (dir, pkgs) = symlink_fixture();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_symlink_layer(&store, &pkgs[..2], &AtomicU64::new(0)).unwrap();
        let names: Vec<_> = members(&store, &layer)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert!(names.contains(&"tmp/".to_owned()));
        assert!(names.iter().all(|n| !n.starts_with("usr")), "{names:?}");

        let empty = pack_symlink_layer(&store, &[], &AtomicU64::new(0)).unwrap();
        let got: Vec<_> = members(&store, &empty)
            .into_iter()
            .map(|m| (m.name, m.mode))
            .collect();
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/group",
                "etc/nsswitch.conf",
                "etc/passwd",
                "home/",
                "home/user/",
                "root/",
                "tmp/"
            ]
        );
        assert_eq!(got.last().unwrap().1, 0o1777);
    }

    /// The symlink layer's members by name.
    fn symlink_members(packages: &[PathBuf]) -> (tempfile::TempDir, BTreeMap<String, Member>) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let layer = pack_symlink_layer(&store, packages, &AtomicU64::new(0)).unwrap();
        let got = members(&store, &layer)
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        (dir, got)
    }

    #[test]
    fn symlink_layer_has_the_user_database_with_the_image_shell() {
        let (_dir, pkgs) = symlink_fixture();
        let (_d, got) = symlink_members(&pkgs);
        let text = |name: &str| String::from_utf8(got[name].content.clone()).unwrap();
        // No package has bin/sh: nobody can log in.
        assert_eq!(text("etc/passwd"), users::passwd(users::NOLOGIN));
        assert_eq!(text("etc/group"), users::group());
        assert_eq!(text("etc/nsswitch.conf"), users::NSSWITCH);
        assert_eq!(got["etc/passwd"].kind, EntryType::Regular);
        // The user's home is its own; everything else is root's.
        assert_eq!(got["home/user/"].owner, u64::from(users::USER_ID));
        assert!(got.values().all(|m| m.owner == 0 || m.name == "home/user/"));

        let (_s, mut pkgs) = symlink_fixture();
        let shell = pkgs[0].parent().unwrap().join("dddd-bash");
        fs::create_dir_all(shell.join("bin")).unwrap();
        symlink("bash", shell.join("bin/sh")).unwrap();
        pkgs.push(shell);
        let (_d, got) = symlink_members(&pkgs);
        let passwd = String::from_utf8(got["etc/passwd"].content.clone()).unwrap();
        assert_eq!(passwd, users::passwd("/bin/sh"));
        assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"));
    }

    #[test]
    fn a_package_user_database_wins() {
        let (dir, mut pkgs) = symlink_fixture();
        let s = dir.path().join("store");
        let own = s.join("eeee-passwd");
        fs::create_dir_all(own.join("etc")).unwrap();
        fs::write(own.join("etc/passwd"), b"root:x:0:0::/:/x\n").unwrap();
        pkgs.push(own.clone());
        let (_d, got) = symlink_members(&pkgs);
        assert_eq!(got["etc/passwd"].kind, EntryType::Symlink);
        let own_passwd = own.join("etc/passwd").display().to_string();
        assert_eq!(got["etc/passwd"].link.as_deref(), Some(own_passwd.as_str()));
        // Only what the package provides is its own.
        assert_eq!(got["etc/group"].kind, EntryType::Regular);

        // A package whose `etc` is a link keeps it whole.
        let linked = s.join("ffff-etc-link");
        fs::create_dir_all(&linked).unwrap();
        symlink("/nix/store/elsewhere", linked.join("etc")).unwrap();
        let (_d, got) = symlink_members(std::slice::from_ref(&linked));
        assert_eq!(got["etc"].kind, EntryType::Symlink);
        assert!(got.keys().all(|n| !n.starts_with("etc/")), "{got:?}");
        assert_eq!(got["home/user/"].owner, u64::from(users::USER_ID));
    }
}
