//! nixery: a container registry that builds images on demand with Nix.
//!
//! [`Server::start`] is what both the binary and the tests run.

pub mod build;
pub mod cli;
pub mod config;
pub mod digest;
pub mod error;
pub mod http;
pub mod mirror;
pub mod observe;
pub mod store;

use axum::http::{HeaderName, HeaderValue};
use axum::routing::{any, get};
use axum::Router;
use build::builder::{Builder, BuilderSettings};
use config::Config;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tower_http::LatencyUnit;
use tracing::Level;

/// The image-preparation expression, shipped inside the binary so that an
/// installed server never looks for it on disk.
const PREPARE_IMAGE_NIX: &str = include_str!("../nix/prepare-image.nix");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use storage path {path:?}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Blobs(#[from] store::fs::BlobError),
    #[error(transparent)]
    Db(#[from] store::db::DbError),
    #[error(transparent)]
    Popularity(#[from] build::popularity::PopularityError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Writes a file so that a crash leaves either the old or the new content.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The axum application for a builder.
pub fn router(builder: Arc<Builder>) -> Router {
    let status = Arc::clone(builder.status());
    Router::new()
        .route("/", get(http::admin::page))
        .route("/api/status", get(http::admin::status))
        .route("/metrics", get(http::admin::metrics))
        .route("/v2", get(http::registry::base))
        .route("/v2/", get(http::registry::base))
        .route("/v2/{*rest}", any(http::registry::dispatch))
        .fallback(|| async { error::ApiError::not_found_route() })
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("docker-distribution-api-version"),
            HeaderValue::from_static("registry/2.0"),
        ))
        .layer(axum::middleware::from_fn_with_state(
            status,
            http::observe::measure,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(
                    DefaultOnResponse::new()
                        .level(Level::INFO)
                        .latency_unit(LatencyUnit::Millis),
                ),
        )
        .with_state(builder)
}

/// A server bound to its address, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    builder: Arc<Builder>,
}

/// Opens storage (the database first: it refuses a second process) and
/// loads popularity data: the builder `serve` runs, and `build`, `export`,
/// `import` and `verify` use without a server.
pub async fn open_builder(config: &Config) -> Result<Arc<Builder>, StartError> {
    let storage = |source| StartError::Storage {
        path: config.storage_path.clone(),
        source,
    };
    std::fs::create_dir_all(&config.storage_path).map_err(storage)?;
    // First: another process on this storage makes this fail before
    // the clean-ups below touch what that process is using.
    let db = store::db::Db::open(&config.storage_path.join("db"))?;
    let nix_dir = config.storage_path.join("nix");
    std::fs::create_dir_all(&nix_dir).map_err(storage)?;
    // Roots left by builds that a crash interrupted would keep their
    // store paths from the garbage collector for good.
    let gc_roots = config.storage_path.join("gcroots");
    match std::fs::remove_dir_all(&gc_roots) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(storage(e)),
        _ => {}
    }
    std::fs::create_dir_all(&gc_roots).map_err(storage)?;
    let prepare_image = nix_dir.join("prepare-image.nix");
    // Written only when it changed: a server must start on a full disk.
    if std::fs::read(&prepare_image).ok().as_deref() != Some(PREPARE_IMAGE_NIX.as_bytes()) {
        write_atomically(&prepare_image, PREPARE_IMAGE_NIX.as_bytes()).map_err(storage)?;
    }
    let blobs = store::fs::BlobStore::open(&config.storage_path)?;
    let popularity = match &config.popularity_url {
        Some(url) => build::popularity::load(url).await?,
        None => Default::default(),
    };
    let settings = BuilderSettings {
        source: config.source.clone(),
        nix: build::nix::Nix::new(
            prepare_image,
            config.nix_timeout,
            config.nix_options.clone(),
        )
        .with_fetch_ttl(config.cache_ttl),
        layer_budget: config.layer_budget,
        layering: config.layering,
        cache_ttl: config.cache_ttl,
        max_concurrent_builds: config.max_concurrent_builds,
        gc_roots,
        popularity: Arc::new(popularity),
        platforms: config.platforms.clone(),
    };
    let status = observe::status::Status::new(
        db.clone(),
        observe::status::Instance {
            version: env!("CARGO_PKG_VERSION"),
            source: config.source.describe(),
            storage_path: config.storage_path.display().to_string(),
        },
    );
    Ok(Builder::new(settings, db, blobs, status))
}

impl Server {
    /// Opens storage, loads popularity data and binds the listener.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let builder = open_builder(config).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        Ok(Server { listener, builder })
    }

    /// The builder, for tests and tools that inspect what was built.
    pub fn builder(&self) -> Arc<Builder> {
        Arc::clone(&self.builder)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let db = self.builder.db().clone();
        axum::serve(self.listener, router(self.builder))
            .with_graceful_shutdown(shutdown)
            .await?;
        if let Err(e) = db.flush().await {
            tracing::warn!(error = %e, "could not flush the database at shutdown");
        }
        Ok(())
    }
}
