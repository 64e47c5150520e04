//! Readiness notification for systemd's `Type=notify` (sd_notify(3)): one
//! datagram per state change to the socket named by `$NOTIFY_SOCKET`.
//!
//! Written here rather than linking libsystemd: the protocol is a single
//! `sendto` and the binary must also run where there is no systemd.

use std::ffi::OsStr;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for services that may notify.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name (@...)")]
    Address(String),
    #[error("cannot use NOTIFY_SOCKET {addr:?}: {source}")]
    Socket {
        addr: String,
        source: std::io::Error,
    },
}

/// Where to send notifications.
#[derive(Debug)]
pub struct Notifier {
    display: String,
    addr: SocketAddr,
    socket: UnixDatagram,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and removes it from the environment, so that
    /// child processes (Nix) do not see it and cannot send states on our
    /// behalf. `None` when the variable is unset or empty (not under
    /// systemd).
    ///
    /// Call before any other thread starts: changing the environment is
    /// only sound while the process is single-threaded.
    pub fn take_from_env() -> Option<Result<Notifier, NotifyError>> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        std::env::remove_var(NOTIFY_SOCKET);
        if value.is_empty() {
            return None;
        }
        Some(Notifier::new(&value))
    }

    /// A notifier for a socket path, or an abstract socket written as
    /// `@name` as systemd does.
    pub fn new(socket: &OsStr) -> Result<Notifier, NotifyError> {
        let display = socket.to_string_lossy().into_owned();
        let bytes = socket.as_encoded_bytes();
        let io = |source| NotifyError::Socket {
            addr: display.clone(),
            source,
        };
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(socket).map_err(io)?,
            Some(b'@') => abstract_addr(&bytes[1..]).map_err(io)?,
            _ => return Err(NotifyError::Address(display)),
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        Ok(Notifier {
            display,
            addr,
            socket,
        })
    }

    /// Sends newline-separated `KEY=VALUE` assignments, e.g. `READY=1`.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Socket {
                addr: self.display.clone(),
                source,
            })
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.notify("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("nixery-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn rejects_relative_addresses() {
        assert!(matches!(
            Notifier::new(OsStr::new("relative/sock")),
            Err(NotifyError::Address(_))
        ));
    }

    #[test]
    fn a_missing_socket_is_an_error_on_send() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("absent").as_os_str()).unwrap();
        assert!(matches!(
            n.notify("READY=1"),
            Err(NotifyError::Socket { .. })
        ));
    }
}
