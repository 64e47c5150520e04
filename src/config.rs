//! Settings: flags, then the original Nixery's environment variables, then
//! defaults; validated into a [`Config`] before anything starts.

use crate::build::image::Arch;
use crate::build::layering::Strategy;
use crate::build::source::Source;
use crate::store::gc::{parse_size, Policy};
use crate::store::s3::S3Settings;
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
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Directory for blobs and the database (with `s3`: the staging area,
    /// cache and this replica's own database).
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
    /// Builds that may wait for a build slot; a pull that needs a new
    /// build beyond them gets 429 (cached images are still served).
    #[arg(long, env = "NIXERY_MAX_QUEUED_BUILDS", default_value_t = 32)]
    pub max_queued_builds: usize,
    /// Seconds a failed build is answered from memory with the same error.
    #[arg(long, env = "NIXERY_FAILED_BUILD_TTL", default_value_t = 30)]
    pub failed_build_ttl: u64,
    #[command(flatten)]
    pub gc: GcLimits,
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
    /// An htpasswd file (bcrypt entries, `htpasswd -B`); when set, `/v2/`
    /// and the admin page need HTTP Basic credentials from it. Reread when
    /// it changes.
    #[arg(long, env = "NIXERY_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,
    /// PEM certificate chain (the server's certificate first): serve HTTPS
    /// (with --tls-key). Reread when it changes.
    #[arg(long, env = "NIXERY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of --tls-cert.
    #[arg(long, env = "NIXERY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// With --htpasswd: leave /metrics open to scrapers without credentials.
    #[arg(long, env = "NIXERY_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Do not make bills of materials right after each build (they are
    /// still made when an image's referrers are first asked for).
    #[arg(long, env = "NIXERY_NO_SBOM")]
    pub no_sbom: bool,
    /// The Nix binary cache's secret key file (`nixery nix-cache key`
    /// writes one); with it, `/nix-cache/` serves the store paths of every
    /// image, signed. Off without it.
    #[arg(long, env = "NIXERY_NIX_CACHE_KEY", value_name = "FILE")]
    pub nix_cache_key: Option<PathBuf>,
    /// Client connections open at once; more wait to be accepted.
    #[arg(long, env = "NIXERY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "NIXERY_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a connection may stay open without a request in progress.
    #[arg(long, env = "NIXERY_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout: u64,
    /// Hand blob bodies on plain HTTP/1.1 to the kernel with sendfile,
    /// rather than writing them from mapped windows (which measured faster
    /// over loopback; see the README's performance notes).
    #[arg(long, env = "NIXERY_SENDFILE")]
    pub sendfile: bool,
    /// Platforms a pull by tag is built for, comma-separated
    /// (`linux/amd64,linux/arm64`); with more than one, clients that accept
    /// an index get one. Default: the host's platform only.
    #[arg(long, env = "NIXERY_PLATFORMS", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// Seconds between scrubs, passes that hash every stored blob again
    /// and quarantine damaged ones; 0: never. Default: weekly.
    #[arg(long, env = "NIXERY_SCRUB_INTERVAL", default_value_t = 7 * 24 * 3600)]
    pub scrub_interval: u64,
    /// Most megabytes (MiB) a second a scrub reads.
    #[arg(long, env = "NIXERY_SCRUB_RATE", default_value_t = 20)]
    pub scrub_rate: u64,
    /// Log lines as readable text or as one JSON object per line.
    #[arg(long, env = "NIXERY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The garbage collector's limits, shared by `serve` and `gc`.
#[derive(Debug, Clone, Args)]
pub struct GcLimits {
    /// Most bytes of blobs to keep, e.g. `50G` (K, M, G, T are powers of
    /// 1024); beyond it the least recently pulled images are evicted.
    #[arg(long, env = "NIXERY_MAX_STORAGE")]
    pub max_storage: Option<String>,
    /// Least free space to leave on the storage path's file system, e.g.
    /// `5G`; below it the least recently pulled images are evicted.
    #[arg(long, env = "NIXERY_MIN_FREE_SPACE")]
    pub min_free_space: Option<String>,
    /// Seconds during which serving a manifest keeps its image from
    /// eviction; each blob of it fetched starts the lease again.
    #[arg(long, env = "NIXERY_GC_LEASE", default_value_t = 120)]
    pub gc_lease: u64,
    /// A bucket's collection only: blobs written, and images pulled or
    /// built, within this many seconds are kept (default 600).
    #[arg(long, env = "NIXERY_GC_KEEP_RECENT")]
    pub gc_keep_recent: Option<u64>,
}

/// What `--gc-keep-recent` defaults to for a bucket.
const BUCKET_KEEP_RECENT: u64 = 600;

impl GcLimits {
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let size = |flag: &'static str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
            match v.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(text) => parse_size(text)
                    .map(Some)
                    .map_err(|message| ConfigError::Size { flag, message }),
            }
        };
        Ok(Policy {
            max_storage: size("--max-storage (NIXERY_MAX_STORAGE)", &self.max_storage)?,
            min_free_space: size(
                "--min-free-space (NIXERY_MIN_FREE_SPACE)",
                &self.min_free_space,
            )?,
            lease: Duration::from_secs(self.gc_lease),
            keep_recent: Duration::from_secs(self.gc_keep_recent.unwrap_or(BUCKET_KEEP_RECENT)),
        })
    }

    /// What to tell a user who set `--gc-keep-recent` for a local store,
    /// where it no longer applies (images are leased instead).
    pub fn local_warning(&self) -> Option<String> {
        self.gc_keep_recent.map(|secs| {
            format!(
                "--gc-keep-recent (NIXERY_GC_KEEP_RECENT) {secs} is ignored on a local store: \
                 an image is kept for --gc-lease (NIXERY_GC_LEASE, now {} s) after its \
                 manifest is served, renewed by each blob fetched; set that instead",
                self.gc_lease
            )
        })
    }
}

/// How the server writes its log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where content lives: the flags `serve`, `verify` and `gc` share.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Storage backend: `filesystem`, or `s3` (a bucket shared by replicas).
    #[arg(long, env = "NIXERY_STORAGE_BACKEND", default_value = "filesystem")]
    pub storage_backend: String,
    /// S3 bucket (with --storage-backend s3).
    #[arg(long, env = "NIXERY_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, env = "NIXERY_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// S3 endpoint URL for stores other than AWS (SeaweedFS, MinIO, ...).
    #[arg(long, env = "NIXERY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "NIXERY_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`).
    #[arg(long, env = "NIXERY_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,
    /// Answer blob pulls with a 307 to a presigned URL of the bucket.
    #[arg(long, env = "NIXERY_S3_REDIRECT")]
    pub s3_redirect: bool,
    /// Seconds a replica's claim on building an image lasts unless renewed.
    #[arg(long, env = "NIXERY_S3_LEASE_TTL", default_value_t = 60)]
    pub s3_lease_ttl: u64,
}

impl BackendArgs {
    /// The bucket, or None for the filesystem backend.
    pub fn s3(&self) -> Result<Option<S3Settings>, ConfigError> {
        match self.storage_backend.as_str() {
            "filesystem" => Ok(None),
            "s3" => self.s3_settings().map(Some),
            other => Err(ConfigError::Backend(other.to_owned())),
        }
    }

    fn s3_settings(&self) -> Result<S3Settings, ConfigError> {
        let bucket = self
            .s3_bucket
            .clone()
            .filter(|b| !b.is_empty())
            .ok_or(ConfigError::NoBucket)?;
        // S3's own naming rules; checked here so a typo is a clear error
        // at start rather than a signature error at the first request.
        let named = |text: &str, extra: &[char]| {
            text.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c))
        };
        let alnum_ends = |b: &str| {
            b.starts_with(|c: char| c.is_ascii_alphanumeric())
                && b.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        if !(3..=63).contains(&bucket.len()) || !named(&bucket, &['.', '-']) || !alnum_ends(&bucket)
        {
            return Err(ConfigError::BucketName(bucket));
        }
        if !self
            .s3_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        {
            return Err(ConfigError::Prefix(self.s3_prefix.clone()));
        }
        if self.s3_region.is_empty() || !named(&self.s3_region, &['-']) {
            return Err(ConfigError::Region(self.s3_region.clone()));
        }
        Ok(S3Settings {
            bucket,
            prefix: self.s3_prefix.trim_matches('/').to_owned(),
            endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.s3_region.clone(),
            force_path_style: self.s3_force_path_style,
            redirect: self.s3_redirect,
        })
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub source: Source,
    pub storage_path: PathBuf,
    /// Where content is shared: None for the filesystem backend.
    pub s3: Option<S3Settings>,
    /// How long a build lease lasts unless renewed.
    pub lease_ttl: Duration,
    pub nix_timeout: Duration,
    pub popularity_url: Option<String>,
    pub max_concurrent_builds: usize,
    pub max_queued_builds: usize,
    pub failed_build_ttl: Duration,
    pub gc: Policy,
    /// Off with a bucket: its blobs are not on this disk.
    pub scrub: crate::store::scrub::Settings,
    pub nix_options: Vec<(String, String)>,
    pub layer_budget: usize,
    pub layering: Strategy,
    pub cache_ttl: Duration,
    pub htpasswd: Option<PathBuf>,
    pub metrics_public: bool,
    /// Serve HTTPS with this pair.
    pub tls: Option<TlsFiles>,
    /// Make bills of materials in the background after each build.
    pub sbom_after_build: bool,
    pub nix_cache_key: Option<PathBuf>,
    pub connections: crate::http::conn::Limits,
    /// At least one, no duplicates, in the order given.
    pub platforms: Vec<Arch>,
}

/// The certificate chain and key files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// Passwords would cross the network in clear text: `--htpasswd`
    /// without TLS on an address other clients reach.
    pub fn cleartext_passwords(&self) -> bool {
        self.htpasswd.is_some() && self.tls.is_none() && !self.listen.ip().is_loopback()
    }
}

/// Said by `serve` (in the log) and `check-config`.
pub const CLEARTEXT_PASSWORDS: &str = "--htpasswd without --tls-cert/--tls-key on a non-loopback address: passwords cross the network in clear text (see `nixery tls init`)";

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
    #[error("--storage-backend (NIXERY_STORAGE_BACKEND) {0:?} is not supported; use `filesystem` or `s3`")]
    Backend(String),
    #[error("--s3-bucket (NIXERY_S3_BUCKET) is required for the s3 backend")]
    NoBucket,
    #[error("--s3-bucket (NIXERY_S3_BUCKET) {0:?} is not a bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit")]
    BucketName(String),
    #[error(
        "--s3-prefix (NIXERY_S3_PREFIX) {0:?} may hold only letters, digits, '.', '_', '-' and '/'"
    )]
    Prefix(String),
    #[error(
        "--s3-region (NIXERY_S3_REGION) {0:?} may hold only lowercase letters, digits and '-'"
    )]
    Region(String),
    #[error("--s3-lease-ttl (NIXERY_S3_LEASE_TTL) must be at least 3 seconds")]
    LeaseTtl,
    #[error("--storage-path (STORAGE_PATH) is required for the filesystem backend")]
    NoStoragePath,
    #[error("--nix-timeout (NIX_TIMEOUT) must be at least 1 second")]
    Timeout,
    #[error("--max-concurrent-builds (NIXERY_MAX_BUILDS) must be at least 1")]
    MaxBuilds,
    #[error("--scrub-rate (NIXERY_SCRUB_RATE) must be at least 1 MiB/s, and below 16 TiB/s; turn scrubbing off with --scrub-interval 0")]
    ScrubRate,
    #[error("--max-queued-builds (NIXERY_MAX_QUEUED_BUILDS) must be at least 1")]
    MaxQueued,
    #[error("{flag}: {message}")]
    Size { flag: &'static str, message: String },
    #[error("--layer-budget (NIXERY_LAYER_BUDGET) must be between 1 and 124, got {0}")]
    LayerBudget(usize),
    #[error("--nix-option (NIXERY_NIX_OPTIONS) {0:?} is not of the form NAME=VALUE")]
    NixOption(String),
    #[error("--max-connections, --header-timeout and --idle-timeout (NIXERY_MAX_CONNECTIONS, NIXERY_HEADER_TIMEOUT, NIXERY_IDLE_TIMEOUT) must be at least 1")]
    Connections,
    #[error("--tls-cert and --tls-key (NIXERY_TLS_CERT, NIXERY_TLS_KEY) go together: set both or neither")]
    TlsPair,
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
        let s3 = self.backend.s3()?;
        if self.backend.s3_lease_ttl < 3 {
            return Err(ConfigError::LeaseTtl);
        }
        let storage_path = match &self.storage_path {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => return Err(ConfigError::NoStoragePath),
        };
        if self.nix_timeout == 0 {
            return Err(ConfigError::Timeout);
        }
        if self.scrub_rate == 0 || self.scrub_rate.checked_mul(1 << 20).is_none() {
            return Err(ConfigError::ScrubRate);
        }
        if self.max_concurrent_builds == 0 {
            return Err(ConfigError::MaxBuilds);
        }
        if self.max_queued_builds == 0 {
            return Err(ConfigError::MaxQueued);
        }
        let gc = self.gc.policy()?;
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
        if self.max_connections == 0 || self.header_timeout == 0 || self.idle_timeout == 0 {
            return Err(ConfigError::Connections);
        }
        let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        let tls = match (given(&self.tls_cert), given(&self.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(ConfigError::TlsPair),
        };
        let mut platforms = Vec::new();
        for p in self.platforms.iter().filter(|p| !p.trim().is_empty()) {
            let arch = Arch::from_platform(p).ok_or_else(|| ConfigError::Platform(p.clone()))?;
            if !platforms.contains(&arch) {
                platforms.push(arch);
            }
        }
        let scrub = crate::store::scrub::Settings {
            interval: (self.scrub_interval > 0 && s3.is_none())
                .then(|| Duration::from_secs(self.scrub_interval)),
            rate: self.scrub_rate.saturating_mul(1 << 20),
        };
        if platforms.is_empty() {
            platforms
                .push(Arch::host().ok_or(ConfigError::NoHostPlatform(std::env::consts::ARCH))?);
        }
        Ok(Config {
            listen: SocketAddr::new(self.listen_address, self.port),
            source,
            storage_path,
            s3,
            lease_ttl: Duration::from_secs(self.backend.s3_lease_ttl),
            nix_timeout: Duration::from_secs(self.nix_timeout),
            popularity_url: self.popularity_url.clone().filter(|u| !u.is_empty()),
            max_concurrent_builds: self.max_concurrent_builds,
            max_queued_builds: self.max_queued_builds,
            failed_build_ttl: Duration::from_secs(self.failed_build_ttl),
            gc,
            scrub,
            nix_options,
            layer_budget: self.layer_budget,
            layering: self.layering,
            cache_ttl: Duration::from_secs(self.cache_ttl),
            htpasswd: self.htpasswd.clone().filter(|p| !p.as_os_str().is_empty()),
            metrics_public: self.metrics_public,
            tls,
            sbom_after_build: !self.no_sbom,
            nix_cache_key: self
                .nix_cache_key
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            connections: crate::http::conn::Limits {
                max_connections: self.max_connections,
                header_timeout: Duration::from_secs(self.header_timeout),
                idle_timeout: Duration::from_secs(self.idle_timeout),
                sendfile: self.sendfile,
            },
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
    fn s3_backend_needs_a_bucket_and_takes_its_settings() {
        let dir = std::env::temp_dir();
        let d = dir.to_str().unwrap();
        let base = [
            "--channel",
            "x",
            "--storage-path",
            d,
            "--storage-backend",
            "s3",
        ];
        assert_eq!(parse(&base).unwrap_err(), ConfigError::NoBucket);
        let mut args = base.to_vec();
        args.extend([
            "--s3-bucket",
            "bkt",
            "--s3-prefix",
            "/p/",
            "--s3-force-path-style",
        ]);
        let s3 = parse(&args).unwrap().s3.unwrap();
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("bkt", "p"));
        for (flag, bad) in [
            ("--s3-bucket", "b"),
            ("--s3-bucket", "Images"),
            ("--s3-bucket", "-images"),
            ("--s3-bucket", "http://u:p@h"),
            ("--s3-prefix", "a?b"),
            ("--s3-prefix", "http://u:p@h"),
            ("--s3-region", "us east"),
        ] {
            let setting = format!("{flag}={bad}");
            let mut args = base.to_vec();
            if flag != "--s3-bucket" {
                args.push("--s3-bucket=bkt");
            }
            args.push(&setting);
            let e = parse(&args).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{flag} {bad}: {e}");
        }
        assert!(s3.force_path_style && !s3.redirect && s3.endpoint.is_none());
        assert!(parse(&["--channel", "x", "--storage-path", d])
            .unwrap()
            .s3
            .is_none());
        assert!(matches!(
            parse(&[
                "--channel",
                "x",
                "--storage-path",
                d,
                "--storage-backend",
                "gcs"
            ]),
            Err(ConfigError::Backend(_))
        ));
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
        let limits = parse(&[
            "--storage-path",
            d,
            "--channel",
            "c",
            "--max-storage",
            "50G",
            "--min-free-space",
            "512M",
        ])
        .unwrap();
        assert_eq!(limits.gc.max_storage, Some(50 << 30));
        assert_eq!(limits.gc.min_free_space, Some(512 << 20));
        assert_eq!(limits.gc.lease, Duration::from_secs(120));
        assert_eq!(limits.scrub.interval, Some(Duration::from_secs(604800)));
        assert_eq!(limits.scrub.rate, 20 << 20);
        let base = ["--storage-path", d, "--channel", "c"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend(extra);
            parse(&args)
        };
        assert_eq!(
            with(&["--scrub-interval", "0"]).unwrap().scrub.interval,
            None
        );
        assert_eq!(
            with(&["--scrub-rate", "0"]).unwrap_err(),
            ConfigError::ScrubRate
        );
        assert_eq!(
            with(&["--scrub-rate", &u64::MAX.to_string()]).unwrap_err(),
            ConfigError::ScrubRate
        );
        // The old window has no meaning on a local store: said so, once.
        let args = |extra: &[&str]| {
            let mut all = vec!["nixery"];
            all.extend(extra);
            <Cli as clap::Parser>::parse_from(all).serve.gc
        };
        assert_eq!(args(&[]).local_warning(), None);
        let old = args(&["--gc-keep-recent", "600"]);
        assert!(old.local_warning().unwrap().contains("--gc-lease"));
        assert_eq!(old.policy().unwrap().keep_recent, Duration::from_secs(600));
        assert_eq!(limits.max_queued_builds, 32);
        assert!(matches!(
            parse(&[
                "--storage-path",
                d,
                "--channel",
                "c",
                "--max-storage",
                "lots"
            ]),
            Err(ConfigError::Size { .. })
        ));
        assert_eq!(
            parse(&[
                "--storage-path",
                d,
                "--channel",
                "c",
                "--max-queued-builds",
                "0"
            ])
            .unwrap_err(),
            ConfigError::MaxQueued
        );
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
