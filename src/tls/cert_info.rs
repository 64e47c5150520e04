//! What a certificate says about itself, for the admin page, the log,
//! metrics and `check-config`.

use crate::clock::now_unix;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use x509_parser::extensions::GeneralName;

/// The served certificate as people and scripts see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names and IP addresses (subject alternative names; the common
    /// name when there are none).
    pub names: Vec<String>,
    pub subject: String,
    pub issuer: String,
    /// Colon-separated hex, as `openssl x509 -serial` prints it (in lower case).
    pub serial: String,
    pub not_before: u64,
    pub not_after: u64,
    /// The chain ends in a self-signed CA (as `nixery tls init` writes
    /// it): clients must be given that CA, and `/ca.crt` offers it.
    pub private_ca: bool,
}

impl CertInfo {
    /// Reads the end-entity certificate (the first of the chain) and notes
    /// whether the chain carries its own root.
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Result<CertInfo, String> {
        let first = chain.first().ok_or("no certificate")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push((*d).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from(bytes) {
                            names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        if names.is_empty() {
            names.extend(
                cert.subject()
                    .iter_common_name()
                    .filter_map(|cn| cn.as_str().ok().map(str::to_owned)),
            );
        }
        let private_ca = chain.len() > 1 && chain.last().is_some_and(|c| is_self_signed_ca(c));
        Ok(CertInfo {
            names,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().to_ascii_lowercase(),
            not_before: cert.validity().not_before.timestamp().max(0) as u64,
            not_after: cert.validity().not_after.timestamp().max(0) as u64,
            private_ca,
        })
    }

    /// Seconds until it expires; negative once it has.
    pub fn seconds_left(&self) -> i64 {
        self.not_after as i64 - now_unix() as i64
    }

    pub fn expired(&self) -> bool {
        self.seconds_left() <= 0
    }

    pub fn not_yet_valid(&self) -> bool {
        self.not_before > now_unix()
    }
}

/// The certificate as `/api/status` shows it, with its time left.
#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    #[serde(flatten)]
    pub cert: CertInfo,
    /// Negative once expired.
    pub seconds_left: i64,
    pub expired: bool,
}

impl From<CertInfo> for TlsStatus {
    fn from(cert: CertInfo) -> Self {
        TlsStatus {
            seconds_left: cert.seconds_left(),
            expired: cert.expired(),
            cert,
        }
    }
}

fn ip_from(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(Into::into),
        16 => <[u8; 16]>::try_from(bytes).ok().map(Into::into),
        _ => None,
    }
}

/// A CA certificate whose issuer is itself.
fn is_self_signed_ca(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c.is_ca() && c.subject() == c.issuer())
        .unwrap_or(false)
}
