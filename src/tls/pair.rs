//! Reading a certificate chain and its private key from PEM files and
//! making the rustls configuration that serves them: TLS 1.2 and 1.3 with
//! ring, ALPN `h2` and `http/1.1`.

use super::cert_info::CertInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, RSA or EC)")]
    NoKey { path: String },
    #[error("{path}: not valid PEM: {reason}")]
    Pem { path: String, reason: String },
    #[error("{path}: the certificate cannot be read: {reason}")]
    Certificate { path: String, reason: String },
    #[error("{path}: the key cannot be used: {reason}")]
    Key { path: String, reason: String },
    #[error("the key {key} does not belong to the certificate {cert}")]
    Mismatch { cert: String, key: String },
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

/// A checked pair, ready to serve.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub info: CertInfo,
    /// The chain's own self-signed root in PEM, when it carries one.
    pub ca_pem: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads, parses and checks the pair: the key must match the first
/// certificate. An expired certificate loads (the caller warns).
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let shown = |p: &Path| p.display().to_string();
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: shown(cert_path),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: shown(cert_path),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: shown(key_path),
            })
        }
        Err(e) => {
            return Err(TlsError::Pem {
                path: shown(key_path),
                reason: e.to_string(),
            })
        }
    };
    let info = CertInfo::from_chain(&chain).map_err(|reason| TlsError::Certificate {
        path: shown(cert_path),
        reason,
    })?;
    let ca_pem = if info.private_ca {
        chain.last().map(|c| pem("CERTIFICATE", c.as_ref()))
    } else {
        None
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: shown(cert_path),
                key: shown(key_path),
            },
            other => TlsError::Key {
                path: shown(key_path),
                reason: other.to_string(),
            },
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        info,
        ca_pem,
    })
}

/// DER as a PEM block.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::init::{init, Names};

    fn pair(dir: &Path) -> crate::tls::init::Layout {
        let names = Names {
            hostnames: vec!["a.lan".into()],
            ips: vec![],
        };
        init(dir, &names, false).unwrap()
    }

    #[test]
    fn each_bad_pair_says_what_is_wrong() {
        let one = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let (a, b) = (pair(one.path()), pair(other.path()));
        assert!(load(&a.server_cert, &a.server_key).is_ok());
        assert!(matches!(
            load(&a.server_cert, &b.server_key),
            Err(TlsError::Mismatch { .. })
        ));
        assert!(matches!(
            load(&one.path().join("absent"), &a.server_key),
            Err(TlsError::Read { .. })
        ));
        let garbage = one.path().join("garbage");
        std::fs::write(&garbage, "not PEM at all\n").unwrap();
        assert!(matches!(
            load(&garbage, &a.server_key),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            load(&a.server_cert, &garbage),
            Err(TlsError::NoKey { .. })
        ));
        // A key where the certificate goes, and the other way round.
        assert!(matches!(
            load(&a.server_key, &a.server_key),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            load(&a.server_cert, &a.server_cert),
            Err(TlsError::NoKey { .. })
        ));
        let broken = one.path().join("broken");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nMIIB!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(load(&broken, &a.server_key).is_err());
    }
}
