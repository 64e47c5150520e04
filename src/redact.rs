//! Hides credentials in text that leaves the process: the userinfo of
//! URLs (`https://user:token@host/` -> `https://***@host/`) and the values
//! of token-like query parameters (`?access_token=...` -> `?access_token=***`).
//!
//! Applied twice: where text is made (source descriptions, the bucket's
//! location, the output of Nix and git, storage errors), so database
//! records hold redacted text; and again at every sink (the log, the admin
//! page, `/api/status`, `/metrics`, error answers, `check-config` and
//! `serve`'s own messages), so a setting added later cannot leak even if
//! its maker forgot it. `tests/redaction.rs` sets every flag to a URL
//! with a password and looks for it everywhere.

use std::borrow::Cow;
use std::io::Write;

const HIDDEN: &str = "***";

/// Query parameter names (lowercased substrings) whose values are secrets.
const SECRET_PARAMS: [&str; 9] = [
    "token",
    "key",
    "secret",
    "pass",
    "pwd",
    "auth",
    "sig",
    "credential",
    "session",
];

/// Where a URL written in free text ends.
fn ends_url(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | '`' | '<' | '>' | '(' | ')' | '[' | ']' | '{' | '}' | '\\' | ',' | ';'
        )
}

/// `text` with every URL's credentials hidden; borrowed when there were none.
pub fn redact(text: &str) -> Cow<'_, str> {
    rewrite_urls(text, Userinfo::Hide)
}

/// As [`redact`], but a URL's `user:password@` is removed rather than
/// hidden: for text that names a URL to the public (an image label).
pub fn without_userinfo(text: &str) -> Cow<'_, str> {
    rewrite_urls(text, Userinfo::Drop)
}

/// `text` redacted, reusing `text` itself when nothing was hidden.
pub fn redact_owned(text: String) -> String {
    match redact(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(redacted) => redacted,
    }
}

/// Standard error for the log, each event redacted before it is written
/// (the log formatter writes one whole event per call).
pub struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[derive(Clone, Copy)]
enum Userinfo {
    Hide,
    Drop,
}

fn rewrite_urls(text: &str, userinfo: Userinfo) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let after = i + 3;
        out.push_str(&rest[..after]);
        let url = &rest[after..];
        let mut end = url.find(ends_url).unwrap_or(url.len());
        // A URL inside this one (`s3://http://u:p@h`, `?next=https://...`)
        // is redacted on its own: this one ends where the inner scheme starts.
        if let Some(inner) = url[..end].find("://") {
            end = scheme_start(&url[..inner]);
        }
        redact_after_scheme(&url[..end], userinfo, &mut out);
        rest = &url[end..];
    }
    out.push_str(rest);
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

/// Where the scheme that ends `text` begins (`x=git+https` -> 2).
fn scheme_start(text: &str) -> usize {
    text.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        .len()
}

/// Redacts `authority/path?query#fragment` into `out`.
fn redact_after_scheme(url: &str, userinfo: Userinfo, out: &mut String) {
    let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let (authority, rest) = url.split_at(authority_end);
    match (authority.rfind('@'), userinfo) {
        (Some(at), Userinfo::Hide) => {
            out.push_str(HIDDEN);
            out.push_str(&authority[at..]);
        }
        (Some(at), Userinfo::Drop) => out.push_str(&authority[at + 1..]),
        (None, _) => out.push_str(authority),
    }
    let Some(q) = rest.find('?') else {
        out.push_str(rest);
        return;
    };
    out.push_str(&rest[..=q]);
    let query = &rest[q + 1..];
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    for (n, pair) in query.split('&').enumerate() {
        if n > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, value)) if is_secret_param(name) && !value.is_empty() => {
                out.push_str(name);
                out.push('=');
                out.push_str(HIDDEN);
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(fragment);
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::redact;
    use proptest::prelude::*;

    #[test]
    fn hides_userinfo_and_token_parameters() {
        let cases = [
            (
                "https://user:s3cret@git.example/repo.git",
                "https://***@git.example/repo.git",
            ),
            ("https://tok@host", "https://***@host"),
            (
                "error: fetching 'git+https://u:p@h/x?ref=main' failed",
                "error: fetching 'git+https://***@h/x?ref=main' failed",
            ),
            (
                "https://h/x.tar.gz?access_token=abc&ref=1#frag",
                "https://h/x.tar.gz?access_token=***&ref=1#frag",
            ),
            (
                "a https://a:b@h/ and ssh://c@d:22/e",
                "a https://***@h/ and ssh://***@d:22/e",
            ),
            ("https://h/p@q", "https://h/p@q"),
            ("s3://http://u:p@h:9/x", "s3://http://***@h:9/x"),
            (
                "https://u:p@h/x?next=git+https://v:q@i/y",
                "https://***@h/x?next=git+https://***@i/y",
            ),
            ("no url here", "no url here"),
            ("path:/srv/pkgs", "path:/srv/pkgs"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    proptest! {
        #[test]
        fn a_password_never_survives(
            prefix in "[ -~]{0,20}",
            user in "[a-z]{1,8}",
            secret in "[A-Za-z0-9]{12,24}",
            path in "(/[a-z]{1,6}){0,3}",
            suffix in "( [ -~]{0,20})?",
        ) {
            let text = format!("{prefix} https://{user}:{secret}@host.example{path}?token={secret}{suffix}");
            let redacted = redact(&text);
            prop_assert!(!redacted.contains(&secret), "{}", redacted);
        }

        #[test]
        fn never_panics_and_is_idempotent(text in "\\PC{0,80}") {
            let once = redact(&text).into_owned();
            prop_assert_eq!(redact(&once).into_owned(), once);
        }
    }
}
