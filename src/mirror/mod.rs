//! The air-gapped mirror: images moved between storages as OCI image
//! layouts (`layout`: write, `import`: read, verify, store), one manifest
//! or an index over platforms per image, and the check
//! of a storage's blobs against its records (`check`).

pub mod check;
pub mod import;
pub mod layout;

use crate::build::image::{validate_name, validate_tag, Arch, ReferenceError};
use crate::digest::Digest;
use std::path::{Path, PathBuf};

/// A file operation that failed, with the file.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FileError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// For `map_err`: the I/O error of `op` on `path`.
pub(crate) fn file_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An image moved through a layout: its name, the Docker manifest served
/// to a client that takes one manifest, and, when it has several
/// platforms, each platform's Docker manifest (the first is `digest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub image: ImageRef,
    pub digest: Digest,
    pub platforms: Vec<(Arch, Digest)>,
}

impl Image {
    /// Every Docker manifest of the image, each once.
    pub fn manifests(&self) -> impl Iterator<Item = Digest> + '_ {
        let first = self.platforms.is_empty().then_some(self.digest);
        first
            .into_iter()
            .chain(self.platforms.iter().map(|(_, d)| *d))
    }
}

/// An image as named on the command line or in a layout: `NAME[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    /// Parses `NAME[:TAG]` (tag `latest` when absent), by the registry
    /// grammar.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let (name, tag) = match s.rsplit_once(':') {
            Some((name, tag)) => (name, tag),
            None => (s, "latest"),
        };
        validate_name(name)?;
        validate_tag(tag)?;
        Ok(ImageRef {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::ImageRef;

    #[test]
    fn image_refs() {
        let r = ImageRef::parse("shell/hello").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("shell/hello", "latest"));
        assert_eq!(
            ImageRef::parse("busybox:v1").unwrap().to_string(),
            "busybox:v1"
        );
        assert!(ImageRef::parse("Bad/Name").is_err());
        assert!(ImageRef::parse("x:bad tag").is_err());
    }
}
