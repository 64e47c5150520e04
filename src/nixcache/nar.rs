//! NAR serialisation of a store path, written by our own code: Nix's
//! archive format (`nix-store --dump`), streamed to any writer so that it
//! is hashed and compressed in the same pass and never held in memory.
//!
//! Every string is its length (u64, little-endian), its bytes and zero
//! padding to a multiple of 8. Directory entries are sorted by the bytes
//! of their names; only the owner-executable bit of a file is kept.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the archive: {0}")]
    Write(io::Error),
    #[error("{0} is neither a file, a directory nor a symlink")]
    Unsupported(String),
    #[error("{0} changed size while it was archived")]
    Changed(String),
}

/// Writes the NAR of `path` (a file, directory or symlink) to `out`.
pub fn write_nar(path: &Path, out: &mut impl Write) -> Result<(), NarError> {
    let mut nar = Nar { out };
    nar.str(b"nix-archive-1")?;
    nar.node(path)
}

struct Nar<'a, W: Write> {
    out: &'a mut W,
}

const PAD: [u8; 8] = [0; 8];

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |source| NarError::Read {
        path: path.display().to_string(),
        source,
    }
}

impl<W: Write> Nar<'_, W> {
    fn raw(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        self.out.write_all(bytes).map_err(NarError::Write)
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        self.raw(&PAD[..pad])
    }

    fn str(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        self.raw(&(bytes.len() as u64).to_le_bytes())?;
        self.raw(bytes)?;
        self.padding(bytes.len() as u64)
    }

    fn node(&mut self, path: &Path) -> Result<(), NarError> {
        let meta = std::fs::symlink_metadata(path).map_err(read_err(path))?;
        self.str(b"(")?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(path).map_err(read_err(path))?;
            self.str(b"type")?;
            self.str(b"symlink")?;
            self.str(b"target")?;
            self.str(target.as_os_str().as_bytes())?;
        } else if kind.is_file() {
            self.str(b"type")?;
            self.str(b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.str(b"executable")?;
                self.str(b"")?;
            }
            self.str(b"contents")?;
            self.contents(path, meta.len())?;
        } else if kind.is_dir() {
            self.str(b"type")?;
            self.str(b"directory")?;
            let mut names = Vec::new();
            for entry in std::fs::read_dir(path).map_err(read_err(path))? {
                names.push(entry.map_err(read_err(path))?.file_name());
            }
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.str(b"entry")?;
                self.str(b"(")?;
                self.str(b"name")?;
                self.str(name.as_bytes())?;
                self.str(b"node")?;
                self.node(&path.join(&name))?;
                self.str(b")")?;
            }
        } else {
            return Err(NarError::Unsupported(path.display().to_string()));
        }
        self.str(b")")
    }

    fn contents(&mut self, path: &Path, len: u64) -> Result<(), NarError> {
        self.raw(&len.to_le_bytes())?;
        let file = File::open(path).map_err(read_err(path))?;
        let mut limited = file.take(len);
        let copied = copy(&mut limited, self.out, path)?;
        if copied != len
            || limited
                .into_inner()
                .read(&mut [0u8; 1])
                .map_err(read_err(path))?
                != 0
        {
            return Err(NarError::Changed(path.display().to_string()));
        }
        self.padding(len)
    }
}

/// `io::copy`, telling read errors from write errors.
fn copy(from: &mut impl Read, to: &mut impl Write, path: &Path) -> Result<u64, NarError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(path)(e)),
        };
        to.write_all(&buf[..n]).map_err(NarError::Write)?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&(p.len() as u64).to_le_bytes());
            out.extend_from_slice(p);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out
    }

    #[test]
    fn a_directory_with_a_file_an_executable_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("p");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("b"), b"hello").unwrap();
        std::fs::write(root.join("a"), b"").unwrap();
        std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink("b", root.join("c")).unwrap();
        let mut nar = Vec::new();
        write_nar(&root, &mut nar).unwrap();
        let want = strs(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"c",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"b",
            b")",
            b")",
            b")",
        ]);
        assert_eq!(nar, want);
    }

    #[test]
    fn a_missing_path_is_a_read_error() {
        let err = write_nar(Path::new("/nonexistent/nixery-nar"), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, NarError::Read { .. }), "{err}");
    }
}
