//! `nixery check-config`: validates what `serve` would be given, without
//! starting anything or writing anywhere, so that a bad configuration fails
//! a system build instead of the service.

use crate::config::{Config, ConfigError, ServeArgs};
use clap::Args;
use std::path::{Path, PathBuf};

/// `nixery check-config` flags: those of `serve`, and one for sandboxes.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Check the settings only, not this machine's files: paths must be
    /// absolute but need not exist. For a Nix build sandbox, where the
    /// paths of the running system are absent.
    #[arg(long)]
    pub no_filesystem_checks: bool,
}

const PKGS_PATH: &str = "--pkgs-path (NIXERY_PKGS_PATH)";
const STORAGE_PATH: &str = "--storage-path (STORAGE_PATH)";
const POPULARITY: &str = "--popularity-url (NIX_POPULARITY_URL)";

/// What `check-config` finds wrong; each names the flag and variable.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{flag} {path:?} must be an absolute path")]
    NotAbsolute { flag: &'static str, path: PathBuf },
    #[error("{STORAGE_PATH} {path:?} cannot be created or written: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error("{POPULARITY} {url:?}: {reason}")]
    Popularity { url: String, reason: String },
    #[error("--htpasswd (NIXERY_HTPASSWD): {0}")]
    Htpasswd(#[from] crate::http::auth::HtpasswdError),
    #[error("--tls-cert/--tls-key (NIXERY_TLS_CERT, NIXERY_TLS_KEY): {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("--nix-cache-key (NIXERY_NIX_CACHE_KEY): {0}")]
    NixCacheKey(#[from] crate::nixcache::key::KeyError),
}

/// Validates `args` as `serve` would, plus what `serve` would only find out
/// at start: whether storage can be created and popularity data read.
pub fn check(args: &CheckArgs) -> Result<Config, CheckError> {
    let offline = args.no_filesystem_checks;
    let config = if offline {
        args.serve.validate_offline()?
    } else {
        args.serve.validate()?
    };
    if offline {
        // The unit's working directory is not the build's: only absolute
        // paths mean the same thing at build time and at run time.
        if let crate::build::source::Source::Path(p) = &config.source {
            require_absolute(PKGS_PATH, p)?;
        }
        // TLS files are not checked: the NixOS module names them by
        // systemd's credentials directory (`%d/tls-cert`).
        require_absolute(STORAGE_PATH, &config.storage_path)?;
    } else {
        creatable_dir(&config.storage_path).map_err(|reason| CheckError::Storage {
            path: config.storage_path.clone(),
            reason,
        })?;
        if let Some(path) = &config.htpasswd {
            crate::http::auth::load(path)?;
        }
        if let Some(files) = &config.tls {
            crate::tls::load(&files.cert, &files.key)?;
        }
        if let Some(path) = &config.nix_cache_key {
            crate::nixcache::key::SigningKey::load(path)?;
        }
    }
    if let Some(url) = &config.popularity_url {
        check_popularity(url, offline).map_err(|reason| CheckError::Popularity {
            url: crate::redact::redact(url).into_owned(),
            reason,
        })?;
    }
    Ok(config)
}

fn require_absolute(flag: &'static str, path: &Path) -> Result<(), CheckError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(CheckError::NotAbsolute {
            flag,
            path: path.to_owned(),
        })
    }
}

/// `serve` creates the storage directory: it must be a writable directory,
/// or its nearest existing ancestor must be one.
fn creatable_dir(path: &Path) -> Result<(), String> {
    let mut at = path;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", at.display())),
            Ok(_) if !writable(at) => return Err(format!("{} is not writable", at.display())),
            Ok(_) => return Ok(()),
            // A path below a file reports ENOTDIR: walk up to say which.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                at = match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
}

/// Whether this process may create entries in directory `dir`.
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // access(2) answers for this process's real ids, ACLs and read-only
    // mounts included, which permission bits alone do not.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Mirrors `popularity::load`: http(s) URLs are fetched, anything else is a
/// file path, optionally `file://`.
fn check_popularity(url: &str, offline: bool) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return reqwest::Url::parse(url)
            .map(|_| ())
            .map_err(|e| format!("not a valid URL: {e}"));
    }
    let path = match url.split_once("://") {
        Some(("file", path)) => path,
        Some((scheme, _)) => {
            return Err(format!(
                "scheme {scheme:?} is not supported; use http(s):// or a file path"
            ))
        }
        None => url,
    };
    let path = Path::new(path);
    if offline {
        return match path.is_absolute() {
            true => Ok(()),
            false => Err("a file path must be absolute".into()),
        };
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| format!("cannot be read: {e}")),
        Ok(_) => Err("is not a file".into()),
        Err(e) => Err(format!("cannot be read: {e}")),
    }
}

fn size_or_none(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "none".to_owned(), crate::http::format::bytes)
}

/// A few lines that say what the server would run with.
pub fn summary(config: &Config, files_checked: bool) -> String {
    format!(
        "configuration OK{}\n  listen:  {}\n  source:  {}\n  storage: {}\n  builds:  {} at once, {} queued at most, Nix timeout {}s, layer budget {} ({} layering), cache TTL {}s\n  gc:      quota {}, free space kept {}, lease {}s\n  scrub:   {}\n  popularity: {}\n  nix cache: {}\n",
        if files_checked {
            ""
        } else {
            " (files not checked)"
        },
        config.listen,
        config.source.describe(),
        match &config.s3 {
            None => config.storage_path.display().to_string(),
            Some(s3) => format!(
                "{} ({}), {}",
                config.storage_path.display(),
                if config.gc.is_active() {
                    "staging and a cache of the bucket, within the gc limits"
                } else {
                    "staging; no cache of the bucket without gc limits"
                },
                s3.location()
            ),
        },
        config.max_concurrent_builds,
        config.max_queued_builds,
        config.nix_timeout.as_secs(),
        config.layer_budget,
        config.layering,
        config.cache_ttl.as_secs(),
        size_or_none(config.gc.max_storage),
        size_or_none(config.gc.min_free_space),
        config.gc.lease.as_secs(),
        match config.scrub.interval {
            Some(every) => format!(
                "every {}s at {}/s",
                every.as_secs(),
                crate::http::format::bytes(config.scrub.rate)
            ),
            None => "off".to_owned(),
        },
        crate::redact::redact(config.popularity_url.as_deref().unwrap_or("none")),
        match &config.nix_cache_key {
            Some(key) => format!("on at /nix-cache/, signed with {}", key.display()),
            None => "off (no --nix-cache-key)".to_owned(),
        },
    )
}

/// The summary's TLS line, and what to warn about: an expired
/// certificate, passwords in clear text. With `files_checked`, the pair
/// was loaded by [`check`].
pub fn tls_report(config: &Config, files_checked: bool) -> (String, Vec<String>) {
    let mut warnings = Vec::new();
    if config.cleartext_passwords() {
        warnings.push(crate::config::CLEARTEXT_PASSWORDS.to_owned());
    }
    let line = match &config.tls {
        None => "off (plain HTTP)".to_owned(),
        Some(files) if !files_checked => format!(
            "{} with {} (not checked)",
            files.cert.display(),
            files.key.display()
        ),
        Some(files) => match crate::tls::load(&files.cert, &files.key) {
            Err(e) => {
                warnings.push(e.to_string());
                "unreadable".to_owned()
            }
            Ok(loaded) => {
                let info = loaded.info;
                let expires = crate::http::format::utc(info.not_after);
                if info.expired() {
                    warnings.push(format!(
                        "the TLS certificate EXPIRED at {expires}: clients will refuse it"
                    ));
                } else if info.not_yet_valid() {
                    warnings.push(
                        "the TLS certificate is not valid yet: clients will refuse it".to_owned(),
                    );
                }
                format!(
                    "{} (issuer {}{}), expires {expires}",
                    info.names.join(", "),
                    info.issuer,
                    if info.private_ca {
                        ", a private CA: /ca.crt offers it"
                    } else {
                        ""
                    },
                )
            }
        },
    };
    (line, warnings)
}

/// `nixery check-config`: exit 0 and a summary, or 2 and what is wrong.
pub fn run(args: CheckArgs) -> std::process::ExitCode {
    match check(&args) {
        Ok(config) => {
            let files_checked = !args.no_filesystem_checks;
            let (line, warnings) = tls_report(&config, files_checked);
            let summary = format!("{}  tls:     {line}\n", summary(&config, files_checked));
            print!("{}", crate::redact::redact(&summary));
            for w in warnings {
                eprintln_redacted!("nixery: warning: {w}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln_redacted!("nixery: invalid configuration: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        check: CheckArgs,
    }

    fn check_args(args: &[&str]) -> Result<Config, CheckError> {
        let mut full = vec!["nixery"];
        full.extend_from_slice(args);
        check(&Cli::try_parse_from(full).expect("flags parse").check)
    }

    #[test]
    fn offline_accepts_absent_absolute_paths_only() {
        let ok = check_args(&[
            "--no-filesystem-checks",
            "--pkgs-path",
            "/no/such/pkgs",
            "--storage-path",
            "/no/such/storage",
            "--popularity-url",
            "/no/such/popularity.json",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        assert!(matches!(
            check_args(&[
                "--no-filesystem-checks",
                "--pkgs-path",
                "pkgs",
                "--storage-path",
                "/s"
            ]),
            Err(CheckError::NotAbsolute {
                flag: PKGS_PATH,
                ..
            })
        ));
        assert!(matches!(
            check_args(&[
                "--no-filesystem-checks",
                "--channel",
                "c",
                "--storage-path",
                "data"
            ]),
            Err(CheckError::NotAbsolute {
                flag: STORAGE_PATH,
                ..
            })
        ));
        // Settings themselves are still checked: several sources contradict,
        // none is a mirror.
        assert!(matches!(
            check_args(&[
                "--no-filesystem-checks",
                "--storage-path",
                "/s",
                "--channel",
                "c",
                "--flake",
                "path:/f"
            ]),
            Err(CheckError::Config(ConfigError::SeveralSources(_)))
        ));
        let mirror = check_args(&["--no-filesystem-checks", "--storage-path", "/s"]).unwrap();
        assert!(summary(&mirror, false).contains("source:  mirror"));
    }

    #[test]
    fn storage_must_be_creatable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let d = dir.path().to_str().unwrap();
        let nested = dir.path().join("a/b/c");
        assert!(
            check_args(&["--channel", "c", "--storage-path", nested.to_str().unwrap()]).is_ok()
        );
        assert!(check_args(&["--channel", "c", "--storage-path", d]).is_ok());
        let under_file = file.join("storage");
        let err = check_args(&[
            "--channel",
            "c",
            "--storage-path",
            under_file.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        // Nothing was created.
        assert!(!nested.exists());
    }

    #[test]
    fn popularity_sources() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let pop = dir.path().join("pop.json");
        std::fs::write(&pop, b"{}").unwrap();
        let base = ["--channel", "c", "--storage-path", d, "--popularity-url"];
        let with = |url: &str| {
            let mut a = base.to_vec();
            a.push(url);
            check_args(&a)
        };
        assert!(with(pop.to_str().unwrap()).is_ok());
        assert!(with(&format!("file://{}", pop.display())).is_ok());
        assert!(with("https://example.org/popularity.json").is_ok());
        assert!(matches!(
            with("ftp://example.org/p.json"),
            Err(CheckError::Popularity { .. })
        ));
        assert!(matches!(
            with(&format!("{d}/absent.json")),
            Err(CheckError::Popularity { .. })
        ));
        assert!(matches!(
            with("https://"),
            Err(CheckError::Popularity { .. })
        ));
    }
}
