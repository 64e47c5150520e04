//! The real `nixery` binary as a child process, for tests that need its
//! own process (logs, file descriptors, signals) or real clients.

use super::{fixture_dir, require_tool};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The real binary on a free port; killed on drop.
pub struct Binary {
    pub child: Child,
    pub port: u16,
    pub _storage: Option<tempfile::TempDir>,
}

/// `nixery serve` on a free port with the fixture set and `storage`.
pub fn serve_command(storage: &Path) -> Command {
    require_tool("nix-instantiate");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.arg("serve")
        .env("PORT", "0")
        .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
        .env("NIXERY_PKGS_PATH", fixture_dir())
        .env("STORAGE_PATH", storage)
        .env(
            "NIXERY_NIX_OPTIONS",
            format!("substituters=;{}", super::ARM64_NIX_OPTION),
        )
        .env("NIX_TIMEOUT", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

impl Binary {
    /// Starts the server with the fixture set.
    pub fn start() -> Binary {
        Binary::start_with(|_| {})
    }

    /// Starts the server after `adjust` changed its command, and reads its
    /// port from its first line of output.
    pub fn start_with(adjust: impl FnOnce(&mut Command)) -> Binary {
        Binary::start_on(tempfile::tempdir().unwrap(), adjust)
    }

    /// As [`start_with`](Self::start_with), on existing storage.
    pub fn start_on(storage: tempfile::TempDir, adjust: impl FnOnce(&mut Command)) -> Binary {
        let mut cmd = serve_command(storage.path());
        adjust(&mut cmd);
        Binary::spawn(&mut cmd, Some(storage))
    }

    /// Starts any `nixery serve` command (stdout is piped here) and reads
    /// its port from its first line of output; `storage` lives as long.
    pub fn spawn(cmd: &mut Command, storage: Option<tempfile::TempDir>) -> Binary {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("nixery starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("a line from nixery");
        // Keep reading so the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Binary {
            child,
            port,
            _storage: storage,
        }
    }

    pub fn image(&self, name: &str) -> String {
        format!("localhost:{}/{name}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn storage(&self) -> &Path {
        self._storage.as_ref().expect("started with storage").path()
    }

    /// Stops the server with SIGTERM (a clean shutdown) and hands back
    /// its storage.
    pub fn stop(mut self) -> tempfile::TempDir {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "clean shutdown: {status}");
        self._storage.take().expect("started with storage")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command that must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}
