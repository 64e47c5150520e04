//! Image names: the distribution grammar, and the name -> package list rules
//! of the original Nixery (path components are packages, meta-packages,
//! always-added packages).

use crate::build::nix::ResolvedPackage;
use crate::build::users::{ImageUser, NONROOT};
use crate::digest::{Digest, DigestError};
use std::collections::BTreeMap;
use std::fmt;

/// Packages that every image gets, as in the original.
pub const ALWAYS_ADDED: [&str; 2] = ["cacert", "iana-etc"];
/// What the `shell` meta-package expands to.
pub const SHELL_PACKAGES: [&str; 4] = ["bashInteractive", "coreutils", "moreutils", "nano"];
/// Where the cacert package puts its bundle; exported as SSL_CERT_FILE.
pub const SSL_CERT_FILE: &str = "/etc/ssl/certs/ca-bundle.crt";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error(
        "invalid repository name {0:?}: components must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*"
    )]
    Name(String),
    #[error("invalid tag {0:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// Checks a repository name against the distribution grammar.
pub fn validate_name(name: &str) -> Result<(), ReferenceError> {
    // 255 is the practical limit registries and clients agree on.
    if name.is_empty() || name.len() > 255 || !name.split('/').all(valid_component) {
        return Err(ReferenceError::Name(name.to_owned()));
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep_start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > sep_start);
    }
}

/// Checks a tag against the distribution grammar.
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Tag(tag.to_owned()))
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.to_owned()))
        }
    }
}

/// What a `/v2/...` path asks for; the name is already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryPath {
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
    TagsList {
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`; `None` for a digest of another
    /// algorithm, which nothing here can refer to.
    Referrers {
        name: String,
        digest: Option<Digest>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("no such endpoint")]
    NotFound,
    /// A well-formed digest of an algorithm this registry never uses: it
    /// names nothing stored here.
    #[error("no manifest with digest algorithm {0:?}; this registry uses sha256")]
    UnknownManifest(String),
    #[error("no blob with digest algorithm {0:?}; this registry uses sha256")]
    UnknownBlob(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

impl RegistryPath {
    /// Parses the part after `/v2/`. Names contain slashes, so the path is
    /// read from its end: references never do.
    pub fn parse(rest: &str) -> Result<Self, PathError> {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 3 {
            return Err(PathError::NotFound);
        }
        let (head, tail) = parts.split_at(parts.len() - 2);
        let name = head.join("/");
        match (tail[0], tail[1]) {
            ("manifests", reference) => {
                validate_name(&name)?;
                let reference = match Reference::parse(reference) {
                    Err(ReferenceError::Digest(DigestError::Unsupported(a))) => {
                        return Err(PathError::UnknownManifest(a))
                    }
                    other => other?,
                };
                Ok(RegistryPath::Manifest { name, reference })
            }
            ("blobs", digest) => {
                validate_name(&name)?;
                let digest = match digest.parse() {
                    Err(DigestError::Unsupported(a)) => return Err(PathError::UnknownBlob(a)),
                    other => other.map_err(ReferenceError::Digest)?,
                };
                Ok(RegistryPath::Blob { name, digest })
            }
            ("referrers", digest) => {
                validate_name(&name)?;
                let digest = match digest.parse() {
                    Err(DigestError::Unsupported(_)) => None,
                    other => Some(other.map_err(ReferenceError::Digest)?),
                };
                Ok(RegistryPath::Referrers { name, digest })
            }
            ("tags", "list") => {
                validate_name(&name)?;
                Ok(RegistryPath::TagsList { name })
            }
            _ => Err(PathError::NotFound),
        }
    }
}

/// Target architecture, chosen by the `arm64` meta-package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The Nix system double.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }

    /// The architecture name in the image config.
    pub fn docker(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// An architecture by its name in an image config or platform.
    pub fn from_docker(name: &str) -> Option<Arch> {
        [Arch::Amd64, Arch::Arm64]
            .into_iter()
            .find(|a| a.docker() == name)
    }

    /// The machine this server runs on, when images can be built for it.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// A platform as clients spell it: `linux/amd64`, `linux/arm64`
    /// (`linux/arm64/v8` too).
    pub fn from_platform(platform: &str) -> Option<Arch> {
        match platform.trim() {
            "linux/amd64" => Some(Arch::Amd64),
            "linux/arm64" | "linux/arm64/v8" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.docker())
    }
}

/// What to build: the package attribute names, the architecture, who the
/// image runs as and the tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    /// Sorted and de-duplicated, meta-packages expanded, always-added included.
    pub packages: Vec<String>,
    pub arch: Arch,
    /// Root, unless the name says `nonroot`.
    pub user: ImageUser,
    pub tag: String,
}

impl ImageSpec {
    /// Turns a validated image name and tag into a spec for amd64 (unless
    /// the name says `arm64`). Component order does not matter: `a/b` and
    /// `b/a` are the same image.
    pub fn from_name(name: &str, tag: &str) -> Self {
        Self::for_arch(name, tag, Arch::Amd64)
    }

    /// As [`from_name`](Self::from_name), for `arch` unless the name says
    /// `arm64`. Meta-packages shadow package attributes of their names.
    pub fn for_arch(name: &str, tag: &str, mut arch: Arch) -> Self {
        let mut packages: Vec<String> = Vec::new();
        let mut user = ImageUser::Root;
        for component in name.split('/') {
            match component {
                "arm64" => arch = Arch::Arm64,
                NONROOT => user = ImageUser::NonRoot,
                "shell" => packages.extend(SHELL_PACKAGES.iter().map(|p| p.to_string())),
                other => packages.push(other.to_owned()),
            }
        }
        packages.extend(ALWAYS_ADDED.iter().map(|p| p.to_string()));
        packages.sort();
        packages.dedup();
        ImageSpec {
            packages,
            arch,
            user,
            tag: tag.to_owned(),
        }
    }

    /// Whether the name fixes the architecture (the `arm64` meta-package),
    /// so that it names one image, never an index.
    pub fn names_arch(name: &str) -> bool {
        name.split('/').any(|c| c == "arm64")
    }

    /// The command an image runs when none is given: `bash` when it has an
    /// interactive shell; else the `meta.mainProgram` of the one requested
    /// package that declares one (none when several do).
    pub fn default_cmd(&self, found: &BTreeMap<String, ResolvedPackage>) -> Option<Vec<String>> {
        if self
            .packages
            .iter()
            .any(|p| p.eq_ignore_ascii_case("bashInteractive"))
        {
            return Some(vec!["bash".to_owned()]);
        }
        let mut declared = self
            .packages
            .iter()
            .filter(|p| !ALWAYS_ADDED.contains(&p.as_str()))
            .filter_map(|p| found.get(p))
            .filter_map(|r| {
                let program = r.main_program.as_ref()?;
                Some(format!("{}/bin/{program}", r.out_path))
            });
        match (declared.next(), declared.next()) {
            (Some(only), None) => Some(vec![only]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_grammar() {
        for ok in [
            "a",
            "shell/hello",
            "tools.xev",
            "a_b",
            "a__b",
            "a---b",
            "1password",
            "x/y/z0",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "A",
            "bashInteractive",
            "a/",
            "/a",
            "a//b",
            "_a",
            "a_",
            "a___b",
            "a.-b",
            "a..b",
            "..",
            "a/../b",
            "a b",
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "v1.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert_eq!(validate_tag(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "ü"] {
            assert!(validate_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_registry_paths_from_the_end() {
        assert_eq!(
            RegistryPath::parse("shell/hello/manifests/latest"),
            Ok(RegistryPath::Manifest {
                name: "shell/hello".into(),
                reference: Reference::Tag("latest".into())
            })
        );
        // A package may be called "manifests" or "blobs".
        assert_eq!(
            RegistryPath::parse("blobs/manifests/manifests/v1"),
            Ok(RegistryPath::Manifest {
                name: "blobs/manifests".into(),
                reference: Reference::Tag("v1".into())
            })
        );
        let d = Digest::of(b"x");
        assert_eq!(
            RegistryPath::parse(&format!("a/blobs/{d}")),
            Ok(RegistryPath::Blob {
                name: "a".into(),
                digest: d
            })
        );
        assert_eq!(
            RegistryPath::parse("a/b/tags/list"),
            Ok(RegistryPath::TagsList { name: "a/b".into() })
        );
        assert_eq!(RegistryPath::parse("a/other/x"), Err(PathError::NotFound));
        assert_eq!(RegistryPath::parse("manifests/x"), Err(PathError::NotFound));
        assert!(matches!(
            RegistryPath::parse("Hello/manifests/latest"),
            Err(PathError::Reference(ReferenceError::Name(_)))
        ));
        assert!(matches!(
            RegistryPath::parse("a/blobs/sha256:zz"),
            Err(PathError::Reference(ReferenceError::Digest(_)))
        ));
        // Well-formed digests of other algorithms name nothing here.
        assert_eq!(
            RegistryPath::parse("a/manifests/bad:tag"),
            Err(PathError::UnknownManifest("bad".into()))
        );
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            RegistryPath::parse(&format!("a/blobs/{sha512}")),
            Err(PathError::UnknownBlob("sha512".into()))
        );
        assert!(matches!(
            RegistryPath::parse("a/manifests/bad:t/ag"),
            Err(PathError::NotFound)
        ));
        assert_eq!(
            RegistryPath::parse(&format!("a/b/referrers/{d}")),
            Ok(RegistryPath::Referrers {
                name: "a/b".into(),
                digest: Some(d)
            })
        );
        assert_eq!(
            RegistryPath::parse(&format!("a/referrers/{sha512}")),
            Ok(RegistryPath::Referrers {
                name: "a".into(),
                digest: None
            })
        );
        assert!(matches!(
            RegistryPath::parse("a/referrers/sha256:zz"),
            Err(PathError::Reference(ReferenceError::Digest(_)))
        ));
    }

    #[test]
    fn spec_is_sorted_with_meta_packages_expanded() {
        let a = ImageSpec::from_name("shell/hello", "latest");
        let b = ImageSpec::from_name("hello/shell", "latest");
        assert_eq!(a, b);
        assert_eq!(
            a.packages,
            [
                "bashInteractive",
                "cacert",
                "coreutils",
                "hello",
                "iana-etc",
                "moreutils",
                "nano"
            ]
        );
        assert_eq!(a.arch, Arch::Amd64);
        assert_eq!(
            a.default_cmd(&BTreeMap::new()),
            Some(vec!["bash".to_owned()])
        );

        let arm = ImageSpec::from_name("arm64/hello/hello", "v2");
        assert_eq!(arm.packages, ["cacert", "hello", "iana-etc"]);
        assert_eq!(arm.arch, Arch::Arm64);
        assert_eq!(arm.arch.nix_system(), "aarch64-linux");
        assert_eq!(arm.default_cmd(&BTreeMap::new()), None);
        assert!(ImageSpec::names_arch("arm64/hello"));
        assert!(!ImageSpec::names_arch("hello/arm64x"));
        let nonroot = ImageSpec::from_name("nonroot/shell", "latest");
        assert_eq!(nonroot.user, ImageUser::NonRoot);
        assert_eq!(
            nonroot.packages,
            ImageSpec::from_name("shell", "latest").packages
        );
        assert_eq!(a.user, ImageUser::Root);
        let forced = ImageSpec::for_arch("hello", "latest", Arch::Arm64);
        assert_eq!(forced.arch, Arch::Arm64);
        assert_eq!(
            forced.packages,
            ImageSpec::from_name("hello", "latest").packages
        );
    }

    fn resolved(out: &str, main: Option<&str>) -> ResolvedPackage {
        ResolvedPackage {
            drv_path: format!("{out}.drv"),
            out_path: out.to_owned(),
            main_program: main.map(str::to_owned),
        }
    }

    #[test]
    fn default_cmd_is_the_one_declared_main_program() {
        let found = BTreeMap::from([
            (
                "hello".to_owned(),
                resolved("/nix/store/h-hello", Some("hello")),
            ),
            ("jq".to_owned(), resolved("/nix/store/j-jq", Some("jq"))),
            (
                "coreutils".to_owned(),
                resolved("/nix/store/c-coreutils", None),
            ),
            (
                "cacert".to_owned(),
                resolved("/nix/store/x-cacert", Some("x")),
            ),
        ]);
        let cmd = |name: &str| ImageSpec::from_name(name, "latest").default_cmd(&found);
        assert_eq!(
            cmd("hello"),
            Some(vec!["/nix/store/h-hello/bin/hello".to_owned()])
        );
        // Packages that declare none do not count; always-added ones neither.
        assert_eq!(
            cmd("coreutils/hello"),
            Some(vec!["/nix/store/h-hello/bin/hello".to_owned()])
        );
        assert_eq!(cmd("hello/jq"), None);
        assert_eq!(cmd("coreutils"), None);
        assert_eq!(cmd("shell/hello"), Some(vec!["bash".to_owned()]));
    }

    #[test]
    fn platforms_parse() {
        assert_eq!(Arch::from_platform("linux/amd64"), Some(Arch::Amd64));
        assert_eq!(Arch::from_platform(" linux/arm64 "), Some(Arch::Arm64));
        assert_eq!(Arch::from_platform("linux/arm64/v8"), Some(Arch::Arm64));
        assert_eq!(Arch::from_platform("windows/amd64"), None);
        assert_eq!(Arch::from_platform("amd64"), None);
    }
    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// The grammar of a name component, written as a regex.
        const COMPONENT: &str = "[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+){0,3}";

        proptest! {
            #[test]
            fn grammar_names_are_accepted(parts in proptest::collection::vec(COMPONENT, 1..4)) {
                let name = parts.join("/");
                prop_assume!(name.len() <= 255);
                prop_assert_eq!(validate_name(&name), Ok(()));
            }

            #[test]
            fn accepted_names_are_lowercase_ascii(name in "\\PC{0,40}") {
                if validate_name(&name).is_ok() {
                    prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit() || b"._-/".contains(&b)));
                    prop_assert!(!name.starts_with('/') && !name.ends_with('/'));
                    prop_assert!(!name.contains("//") && !name.contains(".."));
                }
            }

            #[test]
            fn tags_follow_the_grammar(tag in "\\PC{0,140}") {
                let grammar = !tag.is_empty()
                    && tag.len() <= 128
                    && tag.chars().enumerate().all(|(i, c)| {
                        c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'))
                    });
                prop_assert_eq!(validate_tag(&tag).is_ok(), grammar);
            }

            #[test]
            fn grammar_tags_are_accepted(tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
                prop_assert_eq!(Reference::parse(&tag), Ok(Reference::Tag(tag.clone())));
            }

            #[test]
            fn registry_paths_never_panic(rest in "[a-z0-9/:._-]{0,60}|\\PC{0,60}") {
                if let Ok(RegistryPath::Manifest { name, .. }
                    | RegistryPath::Blob { name, .. }
                    | RegistryPath::TagsList { name }) = RegistryPath::parse(&rest)
                {
                    prop_assert_eq!(validate_name(&name), Ok(()));
                }
            }
        }
    }
}
