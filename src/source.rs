//! Where packages come from, and how an image tag selects a version of them.

use std::path::PathBuf;

/// The one package source an instance serves from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local directory with a package set (`NIXERY_PKGS_PATH`).
    Path(PathBuf),
    /// A nixpkgs channel name, commit, or tarball URL (`NIXERY_CHANNEL`).
    Channel(String),
    /// A git repository whose refs are image tags (`NIXERY_PKGS_REPO`).
    Git(String),
}

/// The `srcType`/`srcArgs` pair that `prepare-image.nix` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSource {
    pub src_type: &'static str,
    pub src_args: String,
}

impl Source {
    /// Nix arguments for a tag: only git repositories read the tag, as in the
    /// original (`latest` is the default branch, 40 hex a commit, else a ref).
    pub fn nix_source(&self, tag: &str) -> NixSource {
        match self {
            Source::Path(p) => NixSource {
                src_type: "path",
                src_args: p.to_string_lossy().into_owned(),
            },
            Source::Channel(c) => NixSource {
                src_type: "nixpkgs",
                src_args: c.clone(),
            },
            Source::Git(url) => {
                let args = if tag == "latest" {
                    serde_json::json!({ "url": url })
                } else if is_commit(tag) {
                    serde_json::json!({ "url": url, "rev": tag })
                } else {
                    serde_json::json!({ "url": url, "ref": tag })
                };
                NixSource {
                    src_type: "git",
                    src_args: args.to_string(),
                }
            }
        }
    }

    /// Whether the tag names content that can never change, so a build of it
    /// can be cached for good.
    pub fn is_pinned(&self, tag: &str) -> bool {
        match self {
            Source::Path(_) => false,
            Source::Channel(c) => is_commit(c),
            Source::Git(_) => is_commit(tag),
        }
    }

    /// A stable description for cache keys and the admin page.
    pub fn describe(&self) -> String {
        match self {
            Source::Path(p) => format!("path:{}", p.display()),
            Source::Channel(c) => format!("channel:{c}"),
            Source::Git(url) => format!("git:{url}"),
        }
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_tags_select_refs() {
        let g = Source::Git("file:///repo".into());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(g.nix_source("latest").src_args, r#"{"url":"file:///repo"}"#);
        assert_eq!(
            g.nix_source(commit).src_args,
            format!(r#"{{"rev":"{commit}","url":"file:///repo"}}"#)
        );
        assert_eq!(
            g.nix_source("release-v2").src_args,
            r#"{"ref":"release-v2","url":"file:///repo"}"#
        );
        assert!(g.is_pinned(commit));
        assert!(!g.is_pinned("latest"));
        assert!(!Source::Path("/p".into()).is_pinned(commit));
    }
}
