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

#[cfg(test)]
mod tests {
    use super::name_of;

    #[test]
    fn strips_store_dir_and_hash() {
        assert_eq!(
            name_of("/nix/store/0c0d2bd4mvhbq8i4a0x5h6k0fwkzfbw3-hello-2.12.1"),
            "hello-2.12.1"
        );
        assert_eq!(name_of("/nix/store/short-x"), "short-x");
    }
}
