//! Git ref names and resolving them to commits with `git ls-remote`.
//!
//! Resolving before evaluation lets the cache key and the build record
//! carry the exact commit, and lets Nix fetch a fully qualified ref (Nix
//! 2.x reads a bare ref name as a branch, so git tags would not resolve).

use crate::build::process::{self, ProcessError};
use std::time::Duration;
use tokio::process::Command;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GitError {
    #[error("{0:?} is not a valid git ref name")]
    InvalidRef(String),
    #[error("no branch or tag {0:?} in the package repository")]
    UnknownRef(String),
    #[error("no commit {0} in the package repository")]
    UnknownCommit(String),
    #[error("the package repository has no default branch (HEAD)")]
    NoHead,
    #[error("could not run git: {0}")]
    Spawn(String),
    #[error("git ls-remote timed out after {0} s")]
    Timeout(u64),
    #[error("git ls-remote failed: {0}")]
    Failed(String),
}

/// What a tag names in a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitTarget {
    /// The commit (tags are peeled).
    pub rev: String,
    /// The fully qualified ref it was found under (`refs/heads/main`);
    /// `None` when the server does not say which branch HEAD is.
    pub ref_name: Option<String>,
}

/// A 40-hex lowercase commit id.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The rules of `git check-ref-format --allow-onelevel`, plus no leading
/// `-` so that a name can never be read as an option.
pub fn check_ref_name(name: &str) -> Result<(), GitError> {
    let bad = || Err(GitError::InvalidRef(name.to_owned()));
    if name.is_empty()
        || name == "@"
        || name.starts_with('-')
        || name.starts_with('/')
        || name.ends_with('/')
        || name.ends_with('.')
        || name.contains("..")
        || name.contains("//")
        || name.contains("@{")
    {
        return bad();
    }
    let forbidden = |c: char| c.is_ascii_control() || " ~^:?*[\\".contains(c);
    if name.chars().any(forbidden) {
        return bad();
    }
    if name
        .split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        return bad();
    }
    Ok(())
}

/// The commit and ref a tag names: `latest` is the default branch's head,
/// any other name a git tag or a branch (a tag wins, as in `git rev-parse`).
/// Credentials come from git's own environment and configuration.
pub async fn resolve(url: &str, tag: &str, timeout: Duration) -> Result<GitTarget, GitError> {
    if tag == "latest" {
        let out = ls_remote(url, &["--symref"], &["HEAD".to_owned()], timeout).await?;
        return parse_head(&out).ok_or(GitError::NoHead);
    }
    check_ref_name(tag)?;
    let heads = format!("refs/heads/{tag}");
    let tags = format!("refs/tags/{tag}");
    let peeled = format!("{tags}^{{}}");
    let out = ls_remote(
        url,
        &[],
        &[tags.clone(), peeled.clone(), heads.clone()],
        timeout,
    )
    .await?;
    let refs = parse_refs(&out);
    let find = |name: &str| {
        refs.iter()
            .find(|(_, r)| r == name)
            .map(|(rev, _)| rev.clone())
    };
    // An annotated tag is listed as the tag object and, peeled, its commit.
    let rev = find(&peeled)
        .or_else(|| find(&tags))
        .map(|rev| (rev, tags))
        .or_else(|| find(&heads).map(|rev| (rev, heads)));
    match rev {
        Some((rev, ref_name)) => Ok(GitTarget {
            rev,
            ref_name: Some(ref_name),
        }),
        None => Err(GitError::UnknownRef(tag.to_owned())),
    }
}

/// `<sha>\t<ref>` lines, keeping only well-formed commit ids.
fn parse_refs(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(sha, _)| is_commit(sha))
        .map(|(sha, r)| (sha.to_owned(), r.to_owned()))
        .collect()
}

/// `ref: refs/heads/main\tHEAD` then `<sha>\tHEAD`.
fn parse_head(out: &str) -> Option<GitTarget> {
    let rev = parse_refs(out)
        .into_iter()
        .find(|(_, r)| r == "HEAD")
        .map(|(rev, _)| rev)?;
    let ref_name = out
        .lines()
        .filter_map(|l| l.strip_prefix("ref: "))
        .filter_map(|l| l.split_once('\t'))
        .find(|(_, r)| *r == "HEAD")
        .map(|(target, _)| target.to_owned());
    Some(GitTarget { rev, ref_name })
}

/// `git ls-remote`, arguments only; git never prompts, it fails instead.
/// On timeout its whole process group (helpers included) is stopped.
async fn ls_remote(
    url: &str,
    flags: &[&str],
    patterns: &[String],
    timeout: Duration,
) -> Result<String, GitError> {
    let mut cmd = Command::new("git");
    cmd.arg("ls-remote")
        .args(flags)
        .arg("--")
        .arg(url)
        .args(patterns)
        .env("GIT_TERMINAL_PROMPT", "0");
    let out = process::run(cmd, "git", timeout)
        .await
        .map_err(|e| match e {
            ProcessError::Timeout { .. } => GitError::Timeout(timeout.as_secs()),
            ProcessError::Spawn { source, .. } => GitError::Spawn(source.to_string()),
            other => GitError::Failed(other.to_string()),
        })?;
    if !out.status.success() {
        return Err(GitError::Failed(
            crate::redact::redact(out.stderr.trim()).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_follow_check_ref_format() {
        for ok in ["main", "v1.2.3", "release_2", "a-b", "feature/x", "1.0"] {
            assert_eq!(check_ref_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "@", "-x", ".hidden", "a..b", "a.lock", "end.", "a@{1}", "a b", "a~1", "a^", "a:b",
            "a?", "a*", "a[", "a\\b", "/a", "a/", "a//b", "a/.b", "x/y.lock", "a\u{7f}",
        ] {
            assert!(check_ref_name(bad).is_err(), "{bad:?}");
        }
    }

    /// A server that accepts and never answers: git's HTTP helper hangs.
    /// The timeout must take the helper down with git.
    #[tokio::test]
    async fn a_timeout_stops_git_and_its_helpers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let url = format!("http://127.0.0.1:{port}/never-answers.git");
        let err = resolve(&url, "latest", Duration::from_millis(1500))
            .await
            .unwrap_err();
        assert_eq!(err, GitError::Timeout(1));
        let left = || -> Vec<String> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(&url))
                .collect()
        };
        for _ in 0..30 {
            if left().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left(), Vec::<String>::new(), "git or a helper left running");
        held.abort();
    }

    #[test]
    fn parses_ls_remote_output() {
        let c1 = "1".repeat(40);
        let c2 = "2".repeat(40);
        let out = format!("ref: refs/heads/main\tHEAD\n{c1}\tHEAD\n");
        assert_eq!(
            parse_head(&out),
            Some(GitTarget {
                rev: c1.clone(),
                ref_name: Some("refs/heads/main".into())
            })
        );
        assert_eq!(parse_head(&format!("{c2}\tHEAD\n")).unwrap().ref_name, None);
        assert_eq!(parse_head(""), None);
        assert_eq!(
            parse_refs(&format!("{c1}\trefs/tags/v1\nnot-a-sha\trefs/x\n")),
            vec![(c1, "refs/tags/v1".to_owned())]
        );
    }
}
