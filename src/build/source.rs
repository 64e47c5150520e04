//! Where packages come from, and how an image tag selects a version of them.
//!
//! Only git repositories read the tag, as in the original: `latest` is the
//! default branch, 40 hex a commit, anything else a git tag or a branch.
//! Every other source serves the same package set whatever the tag.

use crate::build::git::{self, GitError};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::build::git::is_commit;

/// Where a channel name or nixpkgs commit is fetched from, as the original.
const NIXPKGS_ARCHIVE: &str = "https://github.com/NixOS/nixpkgs/archive";

/// The one package source an instance serves from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local directory with a package set (`NIXERY_PKGS_PATH`).
    Path(PathBuf),
    /// A nixpkgs channel name or commit, or a tarball URL or absolute path
    /// (`NIXERY_CHANNEL`).
    Channel(String),
    /// A git repository whose refs are image tags (`NIXERY_PKGS_REPO`).
    Git(String),
    /// A flake reference (`NIXERY_FLAKE`): `packages.<system>`, then
    /// `legacyPackages.<system>`.
    Flake(String),
    /// None: a mirror, which serves only what was imported or built before.
    Mirror,
}

/// The `srcType`/`srcArgs` pair that `prepare-image.nix` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSource {
    pub src_type: &'static str,
    pub src_args: String,
}

/// A tag resolved, before evaluation, to what Nix is to evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub nix: NixSource,
    /// The commit, when it is known before evaluation (git sources, a
    /// channel given as a commit, a flake that names one): everything a
    /// build depends on, and what the evaluation cache is keyed by.
    pub commit: Option<String>,
}

impl Source {
    /// Checks a tag (already valid in the registry grammar) as a git ref
    /// name, for the sources that hand it to git and Nix.
    pub fn check_tag(&self, tag: &str) -> Result<(), GitError> {
        match self {
            Source::Git(_) => git::check_ref_name(tag),
            _ => Ok(()),
        }
    }

    /// Resolves a tag: a git ref becomes a commit with `git ls-remote`
    /// (bounded by `timeout`); other sources need no network here.
    pub async fn resolve(&self, tag: &str, timeout: Duration) -> Result<Resolution, GitError> {
        match self {
            Source::Git(url) => {
                self.check_tag(tag)?;
                let (rev, ref_name) = if is_commit(tag) {
                    (tag.to_owned(), None)
                } else {
                    let target = git::resolve(url, tag, timeout).await?;
                    (target.rev, target.ref_name)
                };
                Ok(Resolution {
                    nix: git_source(url, &rev, ref_name.as_deref()),
                    commit: Some(rev),
                })
            }
            Source::Path(p) => Ok(Resolution {
                nix: NixSource {
                    src_type: "path",
                    src_args: p.to_string_lossy().into_owned(),
                },
                commit: None,
            }),
            Source::Channel(c) => Ok(Resolution {
                nix: NixSource {
                    src_type: "nixpkgs",
                    src_args: channel_url(c),
                },
                commit: is_commit(c).then(|| c.clone()),
            }),
            Source::Flake(f) => Ok(Resolution {
                nix: NixSource {
                    src_type: "flake",
                    src_args: f.clone(),
                },
                commit: flake_commit(f),
            }),
            // The builder stops before resolving in a mirror.
            Source::Mirror => Err(GitError::Failed("this mirror has no package source".into())),
        }
    }

    pub fn is_mirror(&self) -> bool {
        matches!(self, Source::Mirror)
    }

    /// Whether the tag names content that can never change, so a build of it
    /// can be cached for good.
    pub fn is_pinned(&self, tag: &str) -> bool {
        match self {
            Source::Path(_) | Source::Mirror => false,
            Source::Flake(f) => flake_commit(f).is_some(),
            Source::Channel(c) => is_commit(c),
            Source::Git(_) => is_commit(tag),
        }
    }

    /// The part of a tag that selects contents: sources that ignore tags
    /// share one cache entry for all of them.
    pub fn cache_tag<'a>(&self, tag: &'a str) -> &'a str {
        match self {
            Source::Git(_) => tag,
            _ => "",
        }
    }

    /// What the image label `org.opencontainers.image.source` says: the
    /// description with any user name or password taken out of a URL.
    pub fn public_description(&self) -> String {
        crate::redact::without_userinfo(&self.describe()).into_owned()
    }

    /// A stable description for cache keys and the admin page, with any
    /// credentials in a URL hidden (so changing a token keeps the cache).
    pub fn describe(&self) -> String {
        let described = match self {
            Source::Path(p) => format!("path:{}", p.display()),
            Source::Channel(c) => format!("channel:{c}"),
            Source::Git(url) => format!("git:{url}"),
            Source::Flake(f) => format!("flake:{f}"),
            Source::Mirror => "mirror (no package source)".to_owned(),
        };
        crate::redact::redact(&described).into_owned()
    }
}

/// The tarball a channel setting names: a URL or absolute path as is (an
/// air-gapped site serves its own), else nixpkgs on GitHub.
pub fn channel_url(channel: &str) -> String {
    let is_url = ["http://", "https://", "file://"]
        .iter()
        .any(|s| channel.starts_with(s));
    if is_url {
        channel.to_owned()
    } else if channel.starts_with('/') {
        format!("file://{channel}")
    } else {
        format!("{NIXPKGS_ARCHIVE}/{channel}.tar.gz")
    }
}

/// The commit a flake reference pins, if it pins one: `rev=<commit>` in
/// its query, or the commit as the third part of a `github:`, `gitlab:` or
/// `sourcehut:` reference. Its inputs are then pinned too, by the
/// `flake.lock` of that commit.
pub fn flake_commit(flake: &str) -> Option<String> {
    let (path, query) = flake.split_once('?').unwrap_or((flake, ""));
    let in_query = query
        .split('&')
        .filter_map(|p| p.strip_prefix("rev="))
        .find(|r| is_commit(r));
    let in_path = ["github:", "gitlab:", "sourcehut:"]
        .iter()
        .find_map(|scheme| path.strip_prefix(scheme))
        .and_then(|rest| rest.split('/').nth(2))
        .filter(|r| is_commit(r));
    in_query.or(in_path).map(str::to_owned)
}

/// fetchGit arguments for an exact commit. A known ref is passed fully
/// qualified (Nix reads a bare name as a branch); without one Nix fetches
/// all refs so that any commit is found.
fn git_source(url: &str, rev: &str, ref_name: Option<&str>) -> NixSource {
    let args = match ref_name {
        Some(r) => serde_json::json!({ "url": url, "rev": rev, "ref": r }),
        None => serde_json::json!({ "url": url, "rev": rev, "allRefs": true }),
    };
    NixSource {
        src_type: "git",
        src_args: args.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn public_description_drops_credentials() {
        let git = Source::Git("https://user:s3cret@example.org/pkgs.git".into());
        assert_eq!(git.public_description(), "git:https://example.org/pkgs.git");
        let token = Source::Channel("https://tok@host/a@b.tar.gz".into());
        assert_eq!(
            token.public_description(),
            "channel:https://host/a@b.tar.gz"
        );
        let plain = Source::Git("git@example.org:pkgs.git".into());
        assert_eq!(plain.public_description(), "git:git@example.org:pkgs.git");
        assert_eq!(
            Source::Path("/srv/pkgs".into()).public_description(),
            "path:/srv/pkgs"
        );
    }

    #[tokio::test]
    async fn commits_need_no_lookup_and_are_pinned() {
        let g = Source::Git("file:///nonexistent".into());
        let r = g.resolve(COMMIT, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.commit.as_deref(), Some(COMMIT));
        assert_eq!(
            r.nix.src_args,
            format!(r#"{{"allRefs":true,"rev":"{COMMIT}","url":"file:///nonexistent"}}"#)
        );
        assert!(g.is_pinned(COMMIT));
        assert!(!g.is_pinned("latest"));
        assert!(!Source::Path("/p".into()).is_pinned(COMMIT));
        assert!(!Source::Flake("path:/p".into()).is_pinned(COMMIT));
        assert!(Source::Channel(COMMIT.into()).is_pinned("latest"));
        assert!(!Source::Channel("nixos-unstable".into()).is_pinned(COMMIT));
    }

    #[tokio::test]
    async fn bad_ref_names_never_reach_git() {
        let g = Source::Git("file:///nonexistent".into());
        for tag in ["a..b", "x.lock", "end."] {
            assert!(matches!(
                g.resolve(tag, Duration::from_secs(5)).await,
                Err(GitError::InvalidRef(_))
            ));
        }
        assert_eq!(Source::Path("/p".into()).check_tag("a..b"), Ok(()));
    }

    #[test]
    fn channel_urls() {
        assert_eq!(
            channel_url("nixos-unstable"),
            "https://github.com/NixOS/nixpkgs/archive/nixos-unstable.tar.gz"
        );
        assert_eq!(
            channel_url(COMMIT),
            format!("https://github.com/NixOS/nixpkgs/archive/{COMMIT}.tar.gz")
        );
        assert_eq!(
            channel_url("http://127.0.0.1:1/n.tgz"),
            "http://127.0.0.1:1/n.tgz"
        );
        assert_eq!(channel_url("/srv/n.tar.gz"), "file:///srv/n.tar.gz");
    }

    #[test]
    fn flakes_pin_a_commit_by_rev_or_path() {
        for pinned in [
            format!("github:o/r/{COMMIT}"),
            format!("github:o/r/{COMMIT}?dir=sub"),
            format!("git+https://h/r?ref=main&rev={COMMIT}"),
            format!("git+file:///srv/r?rev={COMMIT}"),
        ] {
            assert_eq!(flake_commit(&pinned).as_deref(), Some(COMMIT), "{pinned}");
            assert!(Source::Flake(pinned).is_pinned("latest"));
        }
        for moving in [
            "github:o/r",
            "github:o/r/main",
            "path:/srv/r",
            "git+https://h/r?ref=main",
            "git+https://h/r?rev=abc",
        ] {
            assert_eq!(flake_commit(moving), None, "{moving}");
        }
    }

    #[test]
    fn only_git_reads_tags() {
        assert_eq!(Source::Git("u".into()).cache_tag("v1"), "v1");
        assert_eq!(Source::Channel("c".into()).cache_tag("v1"), "");
    }
}
