//! HTTPS: the certificate and key a server presents (`--tls-cert`,
//! `--tls-key`), reread when the files change, and a private CA for a LAN
//! without one (`nixery tls init`).

pub mod cert_info;
pub mod init;
pub mod pair;
pub mod reload;
pub mod trust;

pub use cert_info::CertInfo;
pub use pair::{load, Loaded, TlsError};
pub use reload::Tls;
