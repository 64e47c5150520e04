//! `nixery tls init`: a private CA and a server certificate signed by it,
//! for a LAN without a PKI. The CA's key goes in a directory of its own
//! (0700, the key 0600), apart from what the server reads, so that the
//! server's files can be handed over (LoadCredential, a container) without
//! it.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The CA outlives many server certificates.
const CA_DAYS: i64 = 3650;
/// Apple's clients refuse server certificates valid longer than 825 days.
const SERVER_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("give at least one --hostname or --ip for the server certificate")]
    NoNames,
    #[error("{0:?} is not a valid DNS name")]
    BadName(String),
    #[error("{} already exist; pass --force to replace them (clients that trust the old CA must then be given the new ca.crt)", list(.0))]
    Exists(Vec<PathBuf>),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read the CA's {path} (made by `nixery tls init`): {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CA certificate or key in PEM: {source}")]
    BadCa { path: PathBuf, source: rcgen::Error },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where `tls init` writes, under its `--dir`.
pub struct Layout {
    /// The CA certificate, for clients.
    pub ca_cert: PathBuf,
    /// The CA's key, in a directory of its own.
    pub ca_key: PathBuf,
    /// The server's chain: its certificate, then the CA's.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Layout {
    pub fn under(dir: &Path) -> Layout {
        Layout {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca-private").join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    fn all(&self) -> [&PathBuf; 4] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
        ]
    }
}

/// What the server certificate is for.
pub struct Names {
    pub hostnames: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Names {
    /// The name certificates are called by.
    fn first(&self) -> String {
        self.hostnames
            .first()
            .cloned()
            .or_else(|| self.ips.first().map(IpAddr::to_string))
            .unwrap_or_default()
    }
}

/// Writes a new CA and server certificate under `dir`. Refuses to replace
/// any of the files unless `force`.
pub fn init(dir: &Path, names: &Names, force: bool) -> Result<Layout, InitError> {
    if names.hostnames.is_empty() && names.ips.is_empty() {
        return Err(InitError::NoNames);
    }
    let layout = Layout::under(dir);
    let existing: Vec<PathBuf> = layout
        .all()
        .into_iter()
        .filter(|p| p.exists())
        .cloned()
        .collect();
    if !existing.is_empty() && !force {
        return Err(InitError::Exists(existing));
    }
    let first_name = names.first();
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("nixery private CA ({first_name}) {}", now.date()),
    );
    ca.distinguished_name
        .push(DnType::OrganizationName, "nixery");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;

    let issuer = Issuer::from_params(&ca, &ca_key);
    let (server_cert, server_key) = server_certificate(names, &issuer, now)?;

    let private_dir = layout.ca_key.parent().unwrap_or(dir);
    create_dir(dir, 0o755)?;
    create_dir(private_dir, 0o700)?;
    write_file(&layout.ca_key, &ca_key.serialize_pem(), 0o600)?;
    write_server(&layout, &server_cert, &server_key, &ca_cert.pem())?;
    write_file(&layout.ca_cert, &ca_cert.pem(), 0o644)?;
    Ok(layout)
}

/// Writes a new server key and certificate under `dir`, signed by the CA
/// that `init` wrote there (before the old certificate expires, or for
/// other names), keeping the CA: clients need nothing new. A running
/// server picks the pair up by itself.
pub fn renew(dir: &Path, names: &Names) -> Result<Layout, InitError> {
    if names.hostnames.is_empty() && names.ips.is_empty() {
        return Err(InitError::NoNames);
    }
    let layout = Layout::under(dir);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| InitError::ReadCa {
            path: path.to_owned(),
            source,
        })
    };
    let bad = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::BadCa { path, source }
    };
    let ca_pem = read(&layout.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read(&layout.ca_key)?).map_err(bad(&layout.ca_key))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(bad(&layout.ca_cert))?;
    let (server_cert, server_key) = server_certificate(names, &issuer, OffsetDateTime::now_utc())?;
    write_server(&layout, &server_cert, &server_key, &ca_pem)?;
    Ok(layout)
}

/// A server key and a certificate for `names`, signed by `issuer`.
fn server_certificate(
    names: &Names,
    issuer: &Issuer<'_, &KeyPair>,
    now: OffsetDateTime,
) -> Result<(rcgen::Certificate, KeyPair), InitError> {
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server.distinguished_name = DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, names.first());
    let mut sans = Vec::new();
    for h in &names.hostnames {
        let dns = h
            .clone()
            .try_into()
            .map_err(|_| InitError::BadName(h.clone()))?;
        sans.push(SanType::DnsName(dns));
    }
    sans.extend(names.ips.iter().copied().map(SanType::IpAddress));
    server.subject_alt_names = sans;
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = now - Duration::hours(1);
    server.not_after = now + Duration::days(SERVER_DAYS);
    let server_cert = server.signed_by(&server_key, issuer)?;

    Ok((server_cert, server_key))
}

/// The server's key, then its chain (its certificate, then the CA's): the
/// key first, so that a server rereading between the two sees a mismatch
/// (and keeps its pair) rather than an old key under a new certificate.
fn write_server(
    layout: &Layout,
    cert: &rcgen::Certificate,
    key: &KeyPair,
    ca_pem: &str,
) -> Result<(), InitError> {
    write_file(&layout.server_key, &key.serialize_pem(), 0o600)?;
    write_file(
        &layout.server_cert,
        &format!("{}{}", cert.pem(), ca_pem),
        0o644,
    )
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), InitError> {
    crate::write_atomically_mode(path, text.as_bytes(), mode).map_err(|source| InitError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Creates a directory (and its parents) with `mode`; an existing one is
/// given `mode` too, so a key's directory is never left open to others.
fn create_dir(dir: &Path, mode: u32) -> Result<(), InitError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let failed = |source| InitError::Write {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(failed)?;
    if mode == 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            hostnames: vec!["registry.lan".into()],
            ips: vec!["192.0.2.7".parse().unwrap()],
        }
    }

    #[test]
    fn writes_a_pair_the_server_loads_and_keeps_the_ca_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = init(dir.path(), &names(), false).unwrap();
        let loaded = crate::tls::load(&layout.server_cert, &layout.server_key).unwrap();
        assert_eq!(loaded.info.names, ["registry.lan", "192.0.2.7"]);
        assert!(loaded.info.private_ca);
        assert!(loaded.info.issuer.contains("nixery private CA"));
        let ca = std::fs::read_to_string(&layout.ca_cert).unwrap();
        assert_eq!(loaded.ca_pem.as_deref(), Some(ca.as_str()));
        for key in [&layout.ca_key, &layout.server_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key:?}");
        }
        let dir_mode = std::fs::metadata(layout.ca_key.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = init(dir.path(), &names(), false).unwrap();
        let before = std::fs::read(&first.server_cert).unwrap();
        assert!(matches!(
            init(dir.path(), &names(), false),
            Err(InitError::Exists(p)) if p.len() == 4
        ));
        assert_eq!(std::fs::read(&first.server_cert).unwrap(), before);
        init(dir.path(), &names(), true).unwrap();
        assert_ne!(std::fs::read(&first.server_cert).unwrap(), before);
    }

    #[test]
    fn renew_signs_a_new_server_pair_with_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let layout = init(dir.path(), &names(), false).unwrap();
        let ca = std::fs::read(&layout.ca_cert).unwrap();
        let ca_key = std::fs::read(&layout.ca_key).unwrap();
        let old = crate::tls::load(&layout.server_cert, &layout.server_key).unwrap();
        let other = Names {
            hostnames: vec!["other.lan".into()],
            ips: vec![],
        };
        renew(dir.path(), &other).unwrap();
        let new = crate::tls::load(&layout.server_cert, &layout.server_key).unwrap();
        assert_eq!(new.info.names, ["other.lan"]);
        assert_ne!(new.info.serial, old.info.serial);
        assert_eq!(new.info.issuer, old.info.issuer);
        assert_eq!(std::fs::read(&layout.ca_cert).unwrap(), ca);
        assert_eq!(std::fs::read(&layout.ca_key).unwrap(), ca_key);
        assert_eq!(new.ca_pem.as_deref().map(str::as_bytes), Some(&ca[..]));
    }

    #[test]
    fn renew_needs_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            renew(dir.path(), &names()),
            Err(InitError::ReadCa { .. })
        ));
        let layout = init(dir.path(), &names(), false).unwrap();
        std::fs::write(&layout.ca_key, "not a key").unwrap();
        assert!(matches!(
            renew(dir.path(), &names()),
            Err(InitError::BadCa { .. })
        ));
    }

    #[test]
    fn needs_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let none = Names {
            hostnames: vec![],
            ips: vec![],
        };
        assert!(matches!(
            init(dir.path(), &none, false),
            Err(InitError::NoNames)
        ));
    }
}
