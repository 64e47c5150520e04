//! Bills of materials for an image, from the closure its build already
//! has: SPDX 2.3 JSON (`spdx`) and CycloneDX 1.6 JSON (`cyclonedx`), one
//! package per store path with its name and version (parsed from the store
//! path name as Nix's `parseDrvName` does), NAR hash and size, the
//! dependency edges, and the licenses and homepages the package set
//! declares for the requested packages (`NOASSERTION` otherwise).
//!
//! Both are pure functions of their input with a fixed creation time, so
//! the same store paths give byte-identical documents.

mod cyclonedx;
mod spdx;

use crate::build::store_path::PathInfo;
use base64::Engine;

/// `artifactType` (and layer media type) of each document.
pub const SPDX_TYPE: &str = "application/spdx+json";
pub const CYCLONEDX_TYPE: &str = "application/vnd.cyclonedx+json";

/// The documents' creation time: fixed, like the image config's.
pub const CREATED: &str = crate::build::manifest::CREATED;

/// A requested package: its top-level store path and what its package
/// set declares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub out_path: String,
    /// SPDX license identifiers; empty when none is declared.
    pub licenses: Vec<String>,
    pub homepage: Option<String>,
}

/// What a bill of materials is made from.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The image name, as pulled.
    pub image: &'a str,
    /// Docker's spelling (`amd64`, `arm64`).
    pub architecture: &'a str,
    /// The package source, as the image's `org.opencontainers.image.source`.
    pub source: &'a str,
    pub revision: Option<&'a str>,
    /// The closure, sorted by store path.
    pub closure: &'a [PathInfo],
    pub roots: &'a [Root],
}

/// A document format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Spdx,
    CycloneDx,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Spdx, Kind::CycloneDx];

    pub fn media_type(self) -> &'static str {
        match self {
            Kind::Spdx => SPDX_TYPE,
            Kind::CycloneDx => CYCLONEDX_TYPE,
        }
    }

    /// The file name a layer of this kind is given (its title annotation).
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::Spdx => "sbom.spdx.json",
            Kind::CycloneDx => "sbom.cdx.json",
        }
    }

    /// From `--format`: `spdx` or `cyclonedx`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "spdx" => Some(Kind::Spdx),
            "cyclonedx" => Some(Kind::CycloneDx),
            _ => None,
        }
    }

    pub fn from_media_type(t: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.media_type() == t)
    }

    /// The document for `input`.
    pub fn write(self, input: &Input) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Kind::Spdx => spdx::write(input),
            Kind::CycloneDx => cyclonedx::write(input),
        }
    }
}

pub use crate::build::store_path::name_and_version;

/// The hash part of a store path (`/nix/store/<hash>-name`).
fn store_hash(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split_once('-').map_or(base, |(h, _)| h)
}

/// The package URL of a store path: `pkg:nix/<name>@<version>` (the
/// `nix` type as sbomnix and bombon write it); name and version are
/// percent-encoded where the purl grammar needs it.
pub fn purl(path: &str) -> String {
    let (name, version) = name_and_version(path);
    match version {
        Some(v) => format!("pkg:nix/{}@{}", encode(name), encode(v)),
        None => format!("pkg:nix/{}", encode(name)),
    }
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A NAR hash (`sha256-<base64>` or `sha256:<nix32 or hex>`) as lowercase
/// hex; `None` when it is neither.
pub fn nar_hash_hex(hash: &str) -> Option<String> {
    let bytes = if let Some(b64) = hash.strip_prefix("sha256-") {
        base64::engine::general_purpose::STANDARD.decode(b64).ok()?
    } else {
        let rest = hash.strip_prefix("sha256:")?;
        match rest.len() {
            64 => hex::decode(rest).ok()?,
            52 => nix32_decode(rest)?,
            _ => return None,
        }
    };
    (bytes.len() == 32).then(|| hex::encode(bytes))
}

/// Nix's base-32 (its alphabet, least significant digit last).
fn nix32_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = s.len() * 5 / 8;
    let mut out = vec![0u8; len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        if i + 1 < len {
            out[i + 1] |= (digit >> (8 - j)) as u8;
        } else if digit >> (8 - j) != 0 {
            return None;
        }
    }
    Some(out)
}

/// The root for `path` when it is a requested package.
fn root_of<'a>(input: &'a Input, path: &str) -> Option<&'a Root> {
    input.roots.iter().find(|r| r.out_path == path)
}

/// The SPDX license expression of declared identifiers.
fn license_expression(licenses: &[String]) -> Option<String> {
    match licenses {
        [] => None,
        [one] => Some(one.clone()),
        many => Some(many.join(" AND ")),
    }
}

/// A digest of everything the documents say, to name them uniquely.
fn input_digest(input: &Input) -> crate::digest::Digest {
    let mut text = format!(
        "{}\0{}\0{}\0{}\0",
        input.image,
        input.architecture,
        input.source,
        input.revision.unwrap_or("")
    );
    for p in input.closure {
        text.push_str(&p.path);
        text.push('\0');
        text.push_str(&p.nar_hash);
        text.push('\0');
    }
    for r in input.roots {
        text.push_str(&r.out_path);
        text.push('\0');
        text.push_str(&r.licenses.join(","));
        text.push('\0');
        text.push_str(r.homepage.as_deref().unwrap_or(""));
        text.push('\0');
    }
    crate::digest::Digest::of(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_split_like_nix() {
        let p = |s: &str| format!("/nix/store/mp2idg5w9j21l85c53gb9bkmfpk0ggbx-{s}");
        assert_eq!(name_and_version(&p("hello-2.10")), ("hello", Some("2.10")));
        assert_eq!(
            name_and_version(&p("bash-interactive-5.2.15")),
            ("bash-interactive", Some("5.2.15"))
        );
        assert_eq!(name_and_version(&p("iana-etc")), ("iana-etc", None));
        assert_eq!(purl(&p("nss-cacert-3.86")), "pkg:nix/nss-cacert@3.86");
        assert_eq!(purl(&p("a+b-1.0")), "pkg:nix/a%2Bb@1.0");
    }

    #[test]
    fn nar_hashes_become_hex() {
        let sri = "sha256-HN6s3W77d31JI9vCFh2UtbpCh7cY+Q/9PYObrX/kXYI=";
        let hex = nar_hash_hex(sri).unwrap();
        assert_eq!(
            hex,
            "1cdeacdd6efb777d4923dbc2161d94b5ba4287b718f90ffd3d839bad7fe45d82"
        );
        assert_eq!(nar_hash_hex(&format!("sha256:{hex}")), Some(hex.clone()));
        // The same hash in Nix's base-32, as `nix hash to-base32` prints it.
        let nix32 = "10jxwizsv6w37pyhzy8qny3l5fmmjhfidhnv4d4psxzvdvfsrphw";
        assert_eq!(nar_hash_hex(&format!("sha256:{nix32}")), Some(hex));
        assert_eq!(nar_hash_hex("md5-abc"), None);
    }
}
