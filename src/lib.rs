//! nixery: a container registry that builds images on demand with Nix.
//!
//! [`Server::start`] is what both the binary and the tests run.

mod blocking;
pub mod build;
pub mod cli;
pub mod clock;
pub mod config;
pub mod digest;
pub mod error;
pub mod file_stamp;
pub mod http;
pub mod memory;
pub mod mirror;
pub mod nixcache;
pub mod observe;
pub mod oci;
pub mod redact;
pub mod store;
pub mod tls;

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
    Remote(#[from] store::StoreError),
    #[error(transparent)]
    Popularity(#[from] build::popularity::PopularityError),
    #[error(transparent)]
    Htpasswd(#[from] http::auth::HtpasswdError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("--nix-cache-key (NIXERY_NIX_CACHE_KEY): {0}")]
    NixCacheKey(#[from] nixcache::key::KeyError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Writes a file so that a crash leaves either the old or the new content.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, content, 0o666)
}

/// As [`write_atomically`], the file created with `mode` (less the umask):
/// 0o600 for a private key, which must never be readable by others, not
/// even for a moment.
pub fn write_atomically_mode(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    // A leftover from an interrupted write may have another mode.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Says so when the database lost records that the blob store shows were
/// there: sled drops a damaged log's tail silently, and a database may be
/// removed or restored from an old copy. The images are rebuilt on their
/// next pull, reusing stored layers.
fn report_lost_records(blobs: &store::fs::BlobStore, db: &store::db::Db) -> Result<(), StartError> {
    use oci::manifest::{is_manifest, MANIFEST_SCAN_BYTES};
    let mut stored = 0usize;
    let mut unknown = 0usize;
    for digest in blobs.small_blobs(MANIFEST_SCAN_BYTES)? {
        let Ok(Some(blob)) = blobs.get(&digest) else {
            continue;
        };
        if is_manifest(blob.as_ref()) {
            stored += 1;
            if !db.is_manifest(&digest)? {
                unknown += 1;
            }
        }
    }
    if unknown > 0 {
        tracing::warn!(
            stored_manifests = stored,
            unknown_to_the_database = unknown,
            new_database = db.was_created(),
            "the database lacks images whose manifests are stored: it was damaged \
             (sled drops the end of a damaged log), removed or restored from an \
             older copy, or a build was interrupted; those images are rebuilt on \
             their next pull, reusing stored layers"
        );
    }
    Ok(())
}

/// The axum application for a builder; with `auth`, everything but what
/// it leaves public needs credentials.
pub fn router(
    builder: Arc<Builder>,
    auth: Option<Arc<http::auth::Auth>>,
    tls: Option<Arc<tls::Tls>>,
) -> Router {
    let status = Arc::clone(builder.status());
    let routes = Router::new()
        .route("/", get(http::admin::page))
        .route("/ca.crt", get(http::admin::ca_cert))
        .route("/api/status", get(http::admin::status))
        .route("/api/history", get(http::admin::history))
        .route("/images/{*name}", get(http::admin::image_page))
        .route("/api/images/{*name}", get(http::admin::image_json))
        .route("/metrics", get(http::admin::metrics))
        .route("/v2", any(http::registry::base))
        .route("/v2/", any(http::registry::base))
        .route("/v2/{*rest}", any(http::registry::dispatch))
        .route("/nix-cache/{name}", any(http::nix_cache::file))
        .route("/nix-cache/nar/{name}", any(http::nix_cache::nar))
        .fallback(|| async { error::ApiError::not_found_route() })
        .method_not_allowed_fallback(|| async { error::ApiError::method_not_allowed() });
    let routes = match auth {
        Some(auth) => routes.layer(axum::middleware::from_fn_with_state(
            auth,
            http::auth::require,
        )),
        None => routes,
    };
    routes
        .layer(axum::Extension(http::admin::ServedTls(tls)))
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

/// How often request counts kept in memory are written to the database.
const COUNT_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes the request counts and history kept in memory to the database,
/// forever.
async fn flush_counts_every(builder: Arc<Builder>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let builder = Arc::clone(&builder);
        if let Err(e) =
            tokio::task::spawn_blocking(move || http::report::flush_counts(&builder)).await
        {
            tracing::warn!(error = %e, "could not record request counts");
        }
    }
}

/// A server bound to its address, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    builder: Arc<Builder>,
    auth: Option<Arc<http::auth::Auth>>,
    tls: Option<Arc<tls::Tls>>,
    limits: http::conn::Limits,
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
    let db_path = config.storage_path.join("db");
    let db = match store::db::Db::open(&db_path) {
        // sled writes when it opens: on a full disk, use the reserve.
        Err(e)
            if e.is_storage_full()
                && store::reserve::release(&config.storage_path).map_err(storage)? =>
        {
            tracing::warn!("the disk is full: released the start-up reserve to open the database; cached images are served, builds fail until space is freed");
            store::db::Db::open(&db_path)?
        }
        other => other?,
    };
    // Not right after releasing it: that space stays free for the next
    // start (blob writes count it as none) until space is freed.
    if !store::reserve::restore(&config.storage_path)
        && !store::reserve::is_set_aside(&config.storage_path)
    {
        tracing::warn!("no room to set aside the start-up reserve: builds fail as on a full disk until space is freed");
    }
    let nix_dir = config.storage_path.join("nix");
    std::fs::create_dir_all(&nix_dir).map_err(storage)?;
    // Roots left by builds that a crash interrupted would keep their
    // store paths from the garbage collector for good.
    // Emptied, not recreated: a server must start on a full disk.
    let gc_roots = config.storage_path.join("gcroots");
    std::fs::create_dir_all(&gc_roots).map_err(storage)?;
    for entry in std::fs::read_dir(&gc_roots).map_err(storage)? {
        let path = entry.map_err(storage)?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(storage(e)),
            _ => {}
        }
    }
    let prepare_image = nix_dir.join("prepare-image.nix");
    // Written only when it changed: a server must start on a full disk.
    if std::fs::read(&prepare_image).ok().as_deref() != Some(PREPARE_IMAGE_NIX.as_bytes()) {
        write_atomically(&prepare_image, PREPARE_IMAGE_NIX.as_bytes()).map_err(storage)?;
    }
    tracing::info!(
        source = %config.source.describe(),
        storage = %config.storage_path.display(),
        "starting"
    );
    let blobs = store::fs::BlobStore::open(&config.storage_path)?;
    // For the log only, so off the start-up path: it reads every small
    // blob, which takes a while with thousands of images.
    let (lost_blobs, lost_db) = (blobs.clone(), db.clone());
    std::thread::Builder::new()
        .name("lost-records".into())
        .spawn(move || {
            if let Err(e) = report_lost_records(&lost_blobs, &lost_db) {
                tracing::warn!(error = %e, "could not compare stored manifests with the database");
            }
        })
        .map_err(storage)?;
    let storage: Arc<dyn store::Storage> = match &config.s3 {
        None => Arc::new(blobs.clone()),
        Some(s3) => Arc::new(store::s3::S3Store::open(s3.clone(), blobs.clone())?),
    };
    let described = storage.describe();
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
        max_queued_builds: config.max_queued_builds,
        failed_build_ttl: config.failed_build_ttl,
        gc_roots,
        popularity: Arc::new(popularity),
        lease_ttl: config.lease_ttl,
        platforms: config.platforms.clone(),
        sbom_after_build: config.sbom_after_build,
    };
    let status = observe::status::Status::new(
        db.clone(),
        observe::status::Instance {
            version: env!("CARGO_PKG_VERSION"),
            source: config.source.describe(),
            storage_path: config.storage_path.display().to_string(),
            storage_backend: described.backend.to_owned(),
            storage_location: described.location,
        },
    );
    let collector = store::collector::Collector::new(
        db.clone(),
        blobs.clone(),
        config.storage_path.clone(),
        config.gc,
        (config.scrub, status.metrics().scrub_counters()),
        storage.is_shared(),
    );
    Ok(Builder::new(settings, db, storage, status, collector))
}

impl Server {
    /// Opens storage, loads popularity data and binds the listener.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let auth = match &config.htpasswd {
            Some(path) => Some(http::auth::Auth::open(path, config.metrics_public)?),
            None => None,
        };
        let tls = match &config.tls {
            Some(files) => Some(tls::Tls::open(&files.cert, &files.key)?),
            None => None,
        };
        if config.cleartext_passwords() {
            tracing::warn!("{}", config::CLEARTEXT_PASSWORDS);
        }
        let nix_cache_key = match &config.nix_cache_key {
            Some(path) => Some(nixcache::key::SigningKey::load(path)?),
            None => None,
        };
        let builder = open_builder(config).await?;
        if let Some(key) = nix_cache_key {
            tracing::info!(public_key = %key.public(), "the Nix binary cache is on at /nix-cache/");
            builder.set_nix_cache(Arc::new(nixcache::NixCache::new(key)));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        Ok(Server {
            listener,
            builder,
            auth,
            tls,
            limits: config.connections,
        })
    }

    /// The builder, for tests and tools that inspect what was built.
    pub fn builder(&self) -> Arc<Builder> {
        Arc::clone(&self.builder)
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
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
        let collector = Arc::clone(self.builder.collector());
        let background = tokio::spawn(Arc::clone(&collector).run_in_background());
        let scrub = tokio::spawn(Arc::clone(&collector).scrub_in_background());
        let flusher = tokio::spawn(flush_counts_every(Arc::clone(&self.builder), COUNT_FLUSH));
        let trimmer = tokio::spawn(memory::trim_periodically());
        let builder = Arc::clone(&self.builder);
        // Its own task, not the builder's background work that shutdown
        // waits for: it may run a Nix process per older image.
        let backfill = builder.nix_cache().map(|cache| {
            tokio::spawn(nixcache::backfill::run(
                Arc::clone(&builder),
                Arc::clone(cache),
            ))
        });
        let watcher = self.auth.as_ref().map(|a| a.watch());
        let tls_watcher = self.tls.as_ref().map(|t| t.watch());
        let app = router(self.builder, self.auth, self.tls.clone());
        http::conn::serve(self.listener, app, self.limits, self.tls, shutdown).await?;
        builder.finish_background().await;
        for w in [watcher, tls_watcher].into_iter().flatten() {
            w.abort();
        }
        let tasks: Vec<_> = [background, scrub, flusher, trimmer]
            .into_iter()
            .chain(backfill)
            .collect();
        for task in &tasks {
            task.abort();
        }
        // An aborted task keeps the builder, and so the database, until
        // the runtime drops it: wait for that, so the database is closed
        // when `run` returns (a restart in the same process opens it).
        for task in tasks {
            let _ = task.await;
        }
        collector.flush_pulls().await;
        if let Err(e) =
            tokio::task::spawn_blocking(move || http::report::flush_counts(&builder)).await
        {
            tracing::warn!(error = %e, "could not record request counts at shutdown");
        }
        if let Err(e) = db.flush().await {
            tracing::warn!(error = %e, "could not flush the database at shutdown");
        }
        Ok(())
    }
}
