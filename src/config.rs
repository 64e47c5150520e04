//! Settings: flags, then the original Nixery's environment variables, then
//! defaults; validated into a [`Config`] before anything starts.

use crate::build::image::Arch;
use crate::build::layering::Strategy;
use crate::build::source::Source;
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// `nixery serve` flags. Each falls back to an environment variable; the
/// original's names are kept so this is a drop-in replacement.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "NIXERY_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Nix channel name or nixpkgs commit to build from.
    #[arg(long, env = "NIXERY_CHANNEL")]
    pub channel: Option<String>,
    /// Git repository with a package set; image tags are its refs.
    #[arg(long, env = "NIXERY_PKGS_REPO")]
    pub pkgs_repo: Option<String>,
    /// Local directory with a package set.
    #[arg(long, env = "NIXERY_PKGS_PATH")]
    pub pkgs_path: Option<PathBuf>,
    /// Flake reference; images use its packages.<system>, then
    /// legacyPackages.<system>.
    #[arg(long, env = "NIXERY_FLAKE")]
    pub flake: Option<String>,
    /// Storage backend: only `filesystem`.
    #[arg(long, env = "NIXERY_STORAGE_BACKEND", default_value = "filesystem")]
    pub storage_backend: String,
    /// Directory for blobs and the database.
    #[arg(long, env = "STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,
    /// Seconds each Nix invocation may run.
    #[arg(long, env = "NIX_TIMEOUT", default_value_t = 60)]
    pub nix_timeout: u64,
    /// File path or http(s) URL of JSON `{"name": count}` popularity data.
    #[arg(long, env = "NIX_POPULARITY_URL")]
    pub popularity_url: Option<String>,
    /// Image builds that may run at once; more wait their turn.
    #[arg(long, env = "NIXERY_MAX_BUILDS", default_value_t = 2)]
    pub max_concurrent_builds: usize,
    /// Extra Nix option as NAME=VALUE, passed to every Nix call (repeatable;
    /// the variable takes several separated by `;`).
    #[arg(long = "nix-option", env = "NIXERY_NIX_OPTIONS", value_delimiter = ';')]
    pub nix_options: Vec<String>,
    /// Most layers of store paths per image; the symlink layer comes on top
    /// (Docker allows 125 in all).
    #[arg(long, env = "NIXERY_LAYER_BUDGET", default_value_t = 94)]
    pub layer_budget: usize,
    /// How store paths are grouped into layers: `exclusive` (the default,
    /// shares best), `largest`, `popularity-contest` or `nixery` (the
    /// original's).
    #[arg(long, env = "NIXERY_LAYERING", value_enum, default_value_t = Strategy::default())]
    pub layering: Strategy,
    /// Seconds a build from a moving source (path, channel name, branch) is
    /// served from cache before it is evaluated again.
    #[arg(long, env = "NIXERY_CACHE_TTL", default_value_t = 300)]
    pub cache_ttl: u64,
    /// Platforms a pull by tag is built for, comma-separated
    /// (`linux/amd64,linux/arm64`); with more than one, clients that accept
    /// an index get one. Default: the host's platform only.
    #[arg(long, env = "NIXERY_PLATFORMS", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// Log lines as readable text or as one JSON object per line.
    #[arg(long, env = "NIXERY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How the server writes its log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub source: Source,
    pub storage_path: PathBuf,
    pub nix_timeout: Duration,
    pub popularity_url: Option<String>,
    pub max_concurrent_builds: usize,
    pub nix_options: Vec<(String, String)>,
    pub layer_budget: usize,
    pub layering: Strategy,
    pub cache_ttl: Duration,
    /// At least one, no duplicates, in the order given.
    pub platforms: Vec<Arch>,
}

/// A setting that is missing or contradicts another; says which.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no package source: set one of --pkgs-path (NIXERY_PKGS_PATH), --channel (NIXERY_CHANNEL), --pkgs-repo (NIXERY_PKGS_REPO) or --flake (NIXERY_FLAKE)")]
    NoSource,
    #[error("more than one package source ({0}): set at most one of NIXERY_PKGS_PATH, NIXERY_CHANNEL, NIXERY_PKGS_REPO, NIXERY_FLAKE (none for a mirror)")]
    SeveralSources(String),
    #[error("--pkgs-path (NIXERY_PKGS_PATH) {0:?} is not a readable directory")]
    PkgsPath(PathBuf),
    #[error("--flake (NIXERY_FLAKE) {0:?}: a relative path must name an existing directory")]
    FlakePath(String),
    #[error("--storage-backend (NIXERY_STORAGE_BACKEND) {0:?} is not supported; use `filesystem`")]
    Backend(String),
    #[error("--storage-path (STORAGE_PATH) is required for the filesystem backend")]
    NoStoragePath,
    #[error("--nix-timeout (NIX_TIMEOUT) must be at least 1 second")]
    Timeout,
    #[error("--max-concurrent-builds (NIXERY_MAX_BUILDS) must be at least 1")]
    MaxBuilds,
    #[error("--layer-budget (NIXERY_LAYER_BUDGET) must be between 1 and 124, got {0}")]
    LayerBudget(usize),
    #[error("--nix-option (NIXERY_NIX_OPTIONS) {0:?} is not of the form NAME=VALUE")]
    NixOption(String),
    #[error("--platforms (NIXERY_PLATFORMS) {0:?} is not one of linux/amd64, linux/arm64")]
    Platform(String),
    #[error(
        "--platforms (NIXERY_PLATFORMS) is empty and this host ({0}) is neither amd64 nor arm64"
    )]
    NoHostPlatform(&'static str),
}

impl Config {
    /// For commands that build (`nixery build`): a mirror is an error.
    pub fn require_source(self) -> Result<Config, ConfigError> {
        match self.source {
            Source::Mirror => Err(ConfigError::NoSource),
            _ => Ok(self),
        }
    }
}

/// `builtins.getFlake` takes no relative paths: make them absolute.
fn flake_ref(flake: &str) -> Result<String, ConfigError> {
    if !(flake == "." || flake.starts_with("./") || flake.starts_with("../")) {
        return Ok(flake.to_owned());
    }
    std::fs::canonicalize(flake)
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .ok_or_else(|| ConfigError::FlakePath(flake.to_owned()))
}

fn non_empty<T: AsRef<std::ffi::OsStr>>(v: &Option<T>) -> bool {
    v.as_ref().is_some_and(|s| !s.as_ref().is_empty())
}

impl ServeArgs {
    /// The package source that is set, or [`Source::Mirror`] when none
    /// is (only `serve` accepts that; see [`Config::require_source`]). `read_files`: resolve a pkgs
    /// path on disk (not in a build sandbox, where it does not exist).
    fn source(&self, read_files: bool) -> Result<Source, ConfigError> {
        let set: Vec<&str> = [
            (non_empty(&self.pkgs_path), "NIXERY_PKGS_PATH"),
            (non_empty(&self.channel), "NIXERY_CHANNEL"),
            (non_empty(&self.pkgs_repo), "NIXERY_PKGS_REPO"),
            (non_empty(&self.flake), "NIXERY_FLAKE"),
        ]
        .into_iter()
        .filter_map(|(is_set, name)| is_set.then_some(name))
        .collect();
        let value = |v: &Option<String>| v.clone().unwrap_or_default();
        match set.as_slice() {
            [] => Ok(Source::Mirror),
            ["NIXERY_PKGS_PATH"] if !read_files => {
                Ok(Source::Path(self.pkgs_path.clone().unwrap_or_default()))
            }
            ["NIXERY_PKGS_PATH"] => {
                let p = self.pkgs_path.clone().unwrap_or_default();
                // Nix needs an absolute path; resolving it now also proves it exists.
                let abs =
                    std::fs::canonicalize(&p).map_err(|_| ConfigError::PkgsPath(p.clone()))?;
                if !abs.is_dir() {
                    return Err(ConfigError::PkgsPath(p));
                }
                Ok(Source::Path(abs))
            }
            ["NIXERY_CHANNEL"] => Ok(Source::Channel(value(&self.channel))),
            ["NIXERY_PKGS_REPO"] => Ok(Source::Git(value(&self.pkgs_repo))),
            ["NIXERY_FLAKE"] => flake_ref(&value(&self.flake)).map(Source::Flake),
            several => Err(ConfigError::SeveralSources(several.join(", "))),
        }
    }

    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_reading(true)
    }

    /// As [`validate`](Self::validate), but reads no file: `--pkgs-path` is
    /// kept as given. For checks in a Nix build sandbox, where the running
    /// system's paths do not exist.
    pub fn validate_offline(&self) -> Result<Config, ConfigError> {
        self.validate_reading(false)
    }

    fn validate_reading(&self, read_files: bool) -> Result<Config, ConfigError> {
        let source = self.source(read_files)?;
        if self.storage_backend != "filesystem" {
            return Err(ConfigError::Backend(self.storage_backend.clone()));
        }
        let storage_path = match &self.storage_path {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => return Err(ConfigError::NoStoragePath),
        };
        if self.nix_timeout == 0 {
            return Err(ConfigError::Timeout);
        }
        if self.max_concurrent_builds == 0 {
            return Err(ConfigError::MaxBuilds);
        }
        if !(1..=124).contains(&self.layer_budget) {
            return Err(ConfigError::LayerBudget(self.layer_budget));
        }
        let nix_options = self
            .nix_options
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| match o.trim().split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => Err(ConfigError::NixOption(o.clone())),
            })
            .collect::<Result<_, _>>()?;
        let mut platforms = Vec::new();
        for p in self.platforms.iter().filter(|p| !p.trim().is_empty()) {
            let arch = Arch::from_platform(p).ok_or_else(|| ConfigError::Platform(p.clone()))?;
            if !platforms.contains(&arch) {
                platforms.push(arch);
            }
        }
        if platforms.is_empty() {
            platforms
                .push(Arch::host().ok_or(ConfigError::NoHostPlatform(std::env::consts::ARCH))?);
        }
        Ok(Config {
            listen: SocketAddr::new(self.listen_address, self.port),
            source,
            storage_path,
            nix_timeout: Duration::from_secs(self.nix_timeout),
            popularity_url: self.popularity_url.clone().filter(|u| !u.is_empty()),
            max_concurrent_builds: self.max_concurrent_builds,
            nix_options,
            layer_budget: self.layer_budget,
            layering: self.layering,
            cache_ttl: Duration::from_secs(self.cache_ttl),
            platforms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["nixery"];
        full.extend_from_slice(args);
        Cli::parse_from(full).serve.validate()
    }

    #[test]
    fn requires_exactly_one_source_and_storage() {
        let dir = std::env::temp_dir();
        let d = dir.to_str().unwrap();
        // No source: a mirror, which `build` refuses.
        let mirror = parse(&["--storage-path", d]).unwrap();
        assert_eq!(mirror.source, Source::Mirror);
        assert_eq!(mirror.require_source().unwrap_err(), ConfigError::NoSource);
        assert!(matches!(
            parse(&[
                "--storage-path",
                d,
                "--pkgs-path",
                d,
                "--channel",
                "nixos-unstable"
            ]),
            Err(ConfigError::SeveralSources(_))
        ));
        assert_eq!(
            parse(&["--pkgs-path", d]).unwrap_err(),
            ConfigError::NoStoragePath
        );
        assert!(matches!(
            parse(&["--storage-path", d, "--pkgs-path", "/no/such/dir"]),
            Err(ConfigError::PkgsPath(_))
        ));
        assert!(matches!(
            parse(&[
                "--storage-path",
                d,
                "--channel",
                "c",
                "--storage-backend",
                "gcs"
            ]),
            Err(ConfigError::Backend(_))
        ));
        assert!(matches!(
            parse(&[
                "--storage-path",
                d,
                "--channel",
                "c",
                "--nix-option",
                "nonsense"
            ]),
            Err(ConfigError::NixOption(_))
        ));
        let ok = parse(&[
            "--storage-path",
            d,
            "--channel",
            "c",
            "--nix-option",
            "substituters=",
            "--port",
            "0",
        ])
        .unwrap();
        assert_eq!(ok.nix_options, vec![("substituters".into(), String::new())]);
        assert_eq!(ok.source, Source::Channel("c".into()));
        assert!(matches!(
            parse(&["--storage-path", d, "--flake", "path:/f", "--pkgs-repo", "file:///r"]),
            Err(ConfigError::SeveralSources(s)) if s == "NIXERY_PKGS_REPO, NIXERY_FLAKE"
        ));
        let flake = parse(&["--storage-path", d, "--flake", "github:o/r"]).unwrap();
        assert_eq!(flake.source, Source::Flake("github:o/r".into()));
        let cwd = std::env::current_dir().unwrap();
        let rel = parse(&["--storage-path", d, "--flake", "."]).unwrap();
        assert_eq!(
            rel.source,
            Source::Flake(cwd.canonicalize().unwrap().to_str().unwrap().into())
        );
        assert!(matches!(
            parse(&["--storage-path", d, "--flake", "./no/such/dir"]),
            Err(ConfigError::FlakePath(_))
        ));
    }

    #[test]
    fn platforms_default_to_the_host_and_parse_in_order() {
        let dir = std::env::temp_dir();
        let d = dir.to_str().unwrap();
        let base = ["--storage-path", d, "--channel", "c"];
        assert_eq!(parse(&base).unwrap().platforms, vec![Arch::host().unwrap()]);
        let mut two = base.to_vec();
        two.extend(["--platforms", "linux/arm64,linux/amd64,linux/arm64"]);
        assert_eq!(
            parse(&two).unwrap().platforms,
            vec![Arch::Arm64, Arch::Amd64]
        );
        let mut bad = base.to_vec();
        bad.extend(["--platforms", "linux/s390x"]);
        assert_eq!(
            parse(&bad).unwrap_err(),
            ConfigError::Platform("linux/s390x".into())
        );
    }
}
