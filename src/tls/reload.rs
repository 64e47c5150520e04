//! The pair a server presents, reread when either file changes (an ACME
//! client renewing, `security.acme` on NixOS): new connections get the new
//! certificate, connections in flight keep theirs. A changed pair that
//! does not load keeps the previous one and is logged once.

use super::cert_info::CertInfo;
use super::pair::{load, Loaded, TlsError};
use crate::file_stamp::{stamp, Stamp};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Certificates expiring within this are warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    stamps: RwLock<(Option<Stamp>, Option<Stamp>)>,
}

impl Tls {
    /// Loads the pair; a missing or invalid pair stops the start.
    pub fn open(cert_path: &Path, key_path: &Path) -> Result<Arc<Tls>, TlsError> {
        let stamps = (stamp(cert_path), stamp(key_path));
        let loaded = load(cert_path, key_path)?;
        warn_about_validity(&loaded.info);
        Ok(Arc::new(Tls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            stamps: RwLock::new(stamps),
        }))
    }

    /// The configuration for a new connection.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.loaded().config)
    }

    pub fn info(&self) -> CertInfo {
        self.loaded().info.clone()
    }

    /// The private CA's certificate, when the chain carries one.
    pub fn ca_pem(&self) -> Option<String> {
        self.loaded().ca_pem.clone()
    }

    fn loaded(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Rereads the pair when either file changed. Blocking: call it off
    /// the async threads.
    fn reload_if_changed(&self) {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        let known = self.stamps.read().map(|s| *s).unwrap_or((None, None));
        if now == known {
            return;
        }
        if let Ok(mut s) = self.stamps.write() {
            *s = now;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(loaded) => {
                tracing::info!(
                    cert = %self.cert_path.display(),
                    serial = %loaded.info.serial,
                    names = ?loaded.info.names,
                    not_after = %crate::http::format::utc(loaded.info.not_after),
                    "TLS certificate reloaded; new connections use it"
                );
                warn_about_validity(&loaded.info);
                if let Ok(mut c) = self.current.write() {
                    *c = Arc::new(loaded);
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS certificate or key changed but cannot be used; keeping the previous pair"
            ),
        }
    }

    /// Checks the files for changes every few seconds while the server runs.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        crate::file_stamp::poll(self, RELOAD_EVERY, Self::reload_if_changed)
    }
}

/// Says loudly when the certificate is expired or not yet valid, and
/// warns when it expires soon: clients refuse such a certificate.
pub fn warn_about_validity(info: &CertInfo) {
    let not_after = crate::http::format::utc(info.not_after);
    if info.expired() {
        tracing::error!(%not_after, names = ?info.names, "the TLS certificate has EXPIRED: clients will refuse it; renew it (the server picks the new files up)");
    } else if info.not_yet_valid() {
        tracing::error!(not_before = %crate::http::format::utc(info.not_before), "the TLS certificate is not valid yet: clients will refuse it (is the clock right?)");
    } else if info.seconds_left() < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(%not_after, "the TLS certificate expires within 14 days");
    }
}
