//! Optional HTTP Basic authentication from an htpasswd file (`--htpasswd`).
//!
//! Entries are bcrypt hashes as `htpasswd -B` writes them. bcrypt compares
//! its hashes in constant time; a verified password is remembered as its
//! SHA-256, compared in constant time too, so that a `docker pull` (which
//! sends credentials with each of its many requests) costs one bcrypt.
//! An unknown user costs a bcrypt as well, so timing does not tell which
//! users exist. The file is reread when it changes; a file that no longer
//! parses keeps the previous entries (and says so in the log).

use crate::error::{ApiError, ErrorCode};
use crate::file_stamp::{stamp, Stamp};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// How often the file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Verified against for unknown users, at `htpasswd -B`'s default cost.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| bcrypt::hash("not a password", 5).unwrap_or_default());

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HtpasswdError {
    #[error("cannot read the htpasswd file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("htpasswd line {line}: expected `user:hash`")]
    Syntax { line: usize },
    #[error(
        "htpasswd line {line}: only bcrypt entries are supported (create them with `htpasswd -B`)"
    )]
    NotBcrypt { line: usize },
    #[error("htpasswd line {line}: user {user:?} appears twice")]
    Duplicate { line: usize, user: String },
}

/// Users and their bcrypt hashes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl Htpasswd {
    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, HtpasswdError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = entry.split_once(':') else {
                return Err(HtpasswdError::Syntax { line });
            };
            if user.is_empty() || hash.is_empty() {
                return Err(HtpasswdError::Syntax { line });
            }
            if !is_bcrypt(hash) {
                return Err(HtpasswdError::NotBcrypt { line });
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(HtpasswdError::Duplicate {
                    line,
                    user: user.to_owned(),
                });
            }
        }
        Ok(Htpasswd { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a password with bcrypt (slow by design: call it off the
    /// async threads).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &DUMMY_HASH);
                false
            }
        }
    }
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2y$", "$2b$", "$2a$", "$2x$"]
        .iter()
        .any(|p| hash.starts_with(p))
        && hash.len() == 60
}

/// The user and password of an `Authorization: Basic ...` header.
pub fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Reads and parses an htpasswd file.
pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
    let text = std::fs::read_to_string(path).map_err(|e| HtpasswdError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Htpasswd::parse(&text)
}

struct Current {
    file: Htpasswd,
    stamp: Option<Stamp>,
    /// SHA-256 of `user:password` of passwords bcrypt accepted.
    verified: HashMap<String, [u8; 32]>,
}

/// The credentials a server checks, and who may skip them.
pub struct Auth {
    path: PathBuf,
    metrics_public: bool,
    current: RwLock<Current>,
}

impl Auth {
    /// Reads the file; a missing or invalid file stops the start.
    pub fn open(path: &Path, metrics_public: bool) -> Result<Arc<Self>, HtpasswdError> {
        let stamp = stamp(path);
        let file = load(path)?;
        if file.is_empty() {
            tracing::warn!(path = %path.display(), "the htpasswd file has no users: nobody can pull");
        }
        Ok(Arc::new(Auth {
            path: path.to_owned(),
            metrics_public,
            current: RwLock::new(Current {
                file,
                stamp,
                verified: HashMap::new(),
            }),
        }))
    }

    /// Rereads the file when it changed. Blocking: call it off the async
    /// threads.
    fn reload_if_changed(&self) {
        let now = stamp(&self.path);
        let known = self.current.read().map(|c| c.stamp).unwrap_or(None);
        if now == known {
            return;
        }
        match load(&self.path) {
            Ok(file) => {
                tracing::info!(path = %self.path.display(), users = file.len(), "htpasswd file reloaded");
                if let Ok(mut c) = self.current.write() {
                    *c = Current {
                        file,
                        stamp: now,
                        verified: HashMap::new(),
                    };
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "htpasswd file changed but cannot be used; keeping the previous users");
                if let Ok(mut c) = self.current.write() {
                    c.stamp = now;
                }
            }
        }
    }

    /// Checks the file for changes every few seconds while the server runs.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        crate::file_stamp::poll(self, RELOAD_EVERY, Self::reload_if_changed)
    }

    fn remembered(&self, user: &str, digest: &[u8; 32]) -> bool {
        self.current
            .read()
            .ok()
            .and_then(|c| c.verified.get(user).map(|d| bool::from(d.ct_eq(digest))))
            .unwrap_or(false)
    }

    /// Whether these credentials are valid; bcrypt runs on a blocking thread.
    async fn check(self: &Arc<Self>, user: String, password: String) -> bool {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update(b":")
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if self.remembered(&user, &digest) {
            return true;
        }
        let auth = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let file = match auth.current.read() {
                Ok(c) => c.file.clone(),
                Err(_) => return false,
            };
            let ok = file.verify(&user, &password);
            if ok {
                if let Ok(mut c) = auth.current.write() {
                    if c.file == file {
                        c.verified.insert(user, digest);
                    }
                }
            }
            ok
        })
        .await
        .unwrap_or(false)
    }

    /// `/ca.crt` is public: clients need it before they can trust the
    /// server with a password.
    fn is_public(&self, path: &str) -> bool {
        path == "/ca.crt" || (self.metrics_public && path == "/metrics")
    }
}

/// Middleware: every request needs valid credentials, but `/ca.crt`, and
/// `/metrics` with `--metrics-public`.
pub async fn require(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    if auth.is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let Some((user, password)) = credentials else {
        return unauthorized("authentication required");
    };
    if auth.check(user, password).await {
        next.run(request).await
    } else {
        unauthorized("invalid user name or password")
    }
}

fn unauthorized(message: &str) -> Response {
    let mut r =
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"nixery\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A well-formed entry (the parser does not check the hash itself).
    const ALICE: &str = "alice:$2y$04$0W6GmQOqXgW8N7KZC1K5ReN2tqNTrCAfzuKbzCzpf/2BaFLdVJYGK";

    #[test]
    fn parses_and_verifies_bcrypt_entries() {
        let hash = bcrypt::hash("wonderland", 4).unwrap();
        let file = Htpasswd::parse(&format!("# users\n\nalice:{hash}\n")).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", "wonderland"));
        assert!(!file.verify("alice", "Wonderland"));
        assert!(!file.verify("bob", "wonderland"));
    }

    #[test]
    fn rejects_what_it_cannot_check() {
        assert_eq!(
            Htpasswd::parse("alice:{SHA}abc"),
            Err(HtpasswdError::NotBcrypt { line: 1 })
        );
        assert_eq!(
            Htpasswd::parse("\nno colon"),
            Err(HtpasswdError::Syntax { line: 2 })
        );
        assert!(matches!(
            Htpasswd::parse(&format!("{ALICE}\n{ALICE}")),
            Err(HtpasswdError::Duplicate { line: 2, .. })
        ));
    }

    #[test]
    fn basic_header() {
        assert_eq!(
            parse_basic("Basic YWxpY2U6d29uZGVyOmxhbmQ="),
            Some(("alice".into(), "wonder:land".into()))
        );
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
    }

    proptest! {
        #[test]
        fn htpasswd_parser_never_panics(text in "\\PC{0,200}") {
            let _ = Htpasswd::parse(&text);
        }

        #[test]
        fn basic_header_round_trips(user in "[^:\\x00]{0,20}", password in "\\PC{0,30}") {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{password}"));
            prop_assert_eq!(
                parse_basic(&format!("Basic {encoded}")),
                Some((user, password))
            );
        }

        #[test]
        fn basic_parser_never_panics(value in "\\PC{0,100}") {
            let _ = parse_basic(&value);
        }

        #[test]
        fn parsed_entries_are_the_lines(users in proptest::collection::btree_set("[a-z]{1,10}", 0..5)) {
            let hash = "$2y$04$0W6GmQOqXgW8N7KZC1K5ReN2tqNTrCAfzuKbzCzpf/2BaFLdVJYGK";
            let text: String = users.iter().map(|u| format!("{u}:{hash}\n")).collect();
            prop_assert_eq!(Htpasswd::parse(&text).unwrap().len(), users.len());
        }
    }
}
