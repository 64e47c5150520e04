//! A store path as Nix reports it in a runtime closure.

use serde::{Deserialize, Serialize};

/// One node of a runtime closure: what `nix path-info --json` says of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    /// Absolute store path, e.g. `/nix/store/<32 chars>-hello-2.12`.
    pub path: String,
    /// Size of the path's NAR serialisation, in bytes.
    pub nar_size: u64,
    /// Hash of the NAR serialisation as Nix reports it (SRI,
    /// `sha256-<base64>`, or `sha256:<nix32>` from older Nix); empty
    /// where unknown.
    pub nar_hash: String,
    /// Absolute store paths this path refers to (may include itself).
    pub references: Vec<String>,
    /// The derivation that built it (absolute), when Nix knows it.
    #[serde(default)]
    pub deriver: Option<String>,
}

/// The part of a store path after `<store dir>/<hash>-`, e.g. `hello-2.12`.
/// Popularity data is keyed by this name, as in the original's popcount.
pub fn name_of(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// A store path's package name and version, split as Nix's
/// `parseDrvName` does: the version starts after the first `-` that is
/// followed by a digit (`hello-2.12` -> `hello`, `2.12`).
pub fn name_and_version(path: &str) -> (&str, Option<&str>) {
    let name = name_of(path);
    let split = name
        .char_indices()
        .find(|&(i, c)| c == '-' && name[i + 1..].starts_with(|d: char| d.is_ascii_digit()));
    match split {
        Some((i, _)) => (&name[..i], Some(&name[i + 1..])),
        None => (name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::{name_and_version, name_of};

    #[test]
    fn names_and_versions() {
        let p = |s| name_and_version(s);
        assert_eq!(
            p("/nix/store/00000000000000000000000000000000-hello-2.12"),
            ("hello", Some("2.12"))
        );
        assert_eq!(
            p("/nix/store/00000000000000000000000000000000-iana-etc-20240318"),
            ("iana-etc", Some("20240318"))
        );
        assert_eq!(
            p("/nix/store/00000000000000000000000000000000-cacert"),
            ("cacert", None)
        );
    }

    #[test]
    fn strips_store_dir_and_hash() {
        assert_eq!(
            name_of("/nix/store/0c0d2bd4mvhbq8i4a0x5h6k0fwkzfbw3-hello-2.12.1"),
            "hello-2.12.1"
        );
        assert_eq!(name_of("/nix/store/short-x"), "short-x");
    }
}
