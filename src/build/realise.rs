//! Realising an image's packages and reading their runtime closure in one
//! conversation in Nix's worker protocol (`worker_protocol`), the
//! interface `nix-store` itself uses with the daemon: with the daemon's
//! socket where the store is named a daemon's (no process at all), else
//! with a `nix-daemon --stdio` of our own (one process), which works on
//! a single-user store itself and passes the conversation on to a daemon
//! where Nix's own rules say the store is one. Either way the daemon's
//! rules on trusted users and options hold as for `nix-store`.
//!
//! In one conversation: each output is held by a temporary GC root before
//! it is built (so nothing between building and rooting can lose it),
//! missing outputs are built, each gets an indirect GC root under the
//! build's directory (as `nix-store --realise --add-root` makes), and the
//! closure is walked one level per round trip.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::build::nix::{Nix, NixError, Stage};
use crate::build::process::{self, Conversation, ProcessError};
use crate::build::store_path::{name_of, PathInfo};
use crate::build::worker_protocol::{Connection, PathInfoReply, ProtocolError};

/// How long `nix-daemon --stdio` gets to exit once the conversation ends.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A package to realise: its derivation and the output the image wants.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub drv_path: String,
    pub out_path: String,
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One conversation with Nix for a build. Dropping it stops the process
/// (or hangs up on the daemon, which stops what it did for us).
pub struct Session {
    conn: Connection<Reader, Writer>,
    /// The `nix-daemon --stdio` spoken to; none when talking to a
    /// daemon's socket.
    conversation: Option<Conversation>,
    timeout: Duration,
}

impl Session {
    /// Connects to the daemon's socket where the store is named a
    /// daemon's (`NIX_REMOTE` or `--nix-option store`: `daemon` or
    /// `unix://PATH`), else starts `nix-daemon --stdio` with the server's
    /// `--option`s; then sets the connection's options: Nix's build
    /// timeout, and the options again, which reach a daemon only this way.
    pub async fn open(nix: &Nix) -> Result<Session, NixError> {
        let (from, to, conversation) = match connect_daemon(nix).await {
            Some(stream) => {
                let (from, to) = stream.into_split();
                (Box::new(from) as Reader, Box::new(to) as Writer, None)
            }
            None => {
                let mut conversation = spawn_stdio(nix)?;
                let (Some(stdout), Some(stdin)) =
                    (conversation.stdout.take(), conversation.stdin.take())
                else {
                    return Err(NixError::Io {
                        stage: Stage::Realise,
                        source: std::io::Error::other("nix-daemon has no stdio"),
                    });
                };
                (
                    Box::new(stdout) as Reader,
                    Box::new(stdin) as Writer,
                    Some(conversation),
                )
            }
        };
        let timeout = nix.timeout();
        let secs = nix.timeout_secs().to_string();
        let opened = async {
            let mut conn = Connection::handshake(from, to).await?;
            let mut overrides: BTreeMap<String, String> = BTreeMap::new();
            overrides.insert("timeout".into(), secs);
            for (name, value) in nix.options() {
                overrides.insert(name.clone(), value.clone());
            }
            let jobs = |name: &str, default: u64| {
                overrides
                    .get(name)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(default)
            };
            // As nix.conf's `auto` and Nix's default: every core.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
            let (max_jobs, cores) = (jobs("max-jobs", cpus), jobs("cores", 0));
            let overrides: Vec<(String, String)> = overrides.into_iter().collect();
            conn.set_options(max_jobs, cores, &overrides).await?;
            Ok::<_, ProtocolError>(conn)
        };
        let conn = match tokio::time::timeout(timeout, opened).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(failed(Stage::Realise, e, conversation).await),
            Err(_) => return Err(timed_out(Stage::Realise, nix)),
        };
        Ok(Session {
            conn,
            conversation,
            timeout,
        })
    }

    /// Whether this session started a Nix process (for the build record).
    pub fn started_a_process(&self) -> bool {
        self.conversation.is_some()
    }

    /// Roots each output under `gc_root` (`out`, `out-2`, ...), then
    /// builds what is missing. The roots go when the caller removes them.
    pub async fn realise(
        mut self,
        nix: &Nix,
        wanted: &[Wanted],
        gc_root: &Path,
    ) -> Result<Session, NixError> {
        let work = async {
            for w in wanted {
                self.conn.add_temp_root(&w.out_path).await?;
            }
            let paths: Vec<String> = wanted
                .iter()
                .map(|w| derived_path(w, self.conn.minor()))
                .collect();
            if !paths.is_empty() {
                self.conn.build_paths(&paths).await?;
            }
            Ok::<_, ProtocolError>(())
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.fail(Stage::Realise, e, nix).await),
            Err(_) => return Err(timed_out(Stage::Realise, nix)),
        }
        let links = root_links(gc_root, wanted).await?;
        let work = async {
            for link in &links {
                self.conn.add_indirect_root(&link.to_string_lossy()).await?;
            }
            Ok::<_, ProtocolError>(())
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(())) => Ok(self),
            Ok(Err(e)) => Err(self.fail(Stage::Realise, e, nix).await),
            Err(_) => Err(timed_out(Stage::Realise, nix)),
        }
    }

    /// The runtime closure of `out_paths`, sorted by path, then the end
    /// of the conversation.
    pub async fn closure(
        mut self,
        nix: &Nix,
        out_paths: &[String],
    ) -> Result<Vec<PathInfo>, NixError> {
        let mut closure: BTreeMap<String, PathInfo> = BTreeMap::new();
        let mut level: Vec<String> = out_paths
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let walk = async {
            while !level.is_empty() {
                let replies = self.conn.query_path_infos(&level).await?;
                let mut next = BTreeSet::new();
                for (path, reply) in level.drain(..).zip(replies) {
                    let Some(reply) = reply else {
                        return Ok(Err(NixError::InvalidPath { path }));
                    };
                    let info = path_info(path, reply);
                    next.extend(
                        info.references
                            .iter()
                            .filter(|r| !closure.contains_key(*r))
                            .cloned(),
                    );
                    closure.insert(info.path.clone(), info);
                }
                level = next
                    .into_iter()
                    .filter(|p| !closure.contains_key(p))
                    .collect();
            }
            Ok::<_, ProtocolError>(Ok(()))
        };
        match tokio::time::timeout(self.timeout, walk).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(invalid))) => return Err(invalid),
            Ok(Err(e)) => return Err(self.fail(Stage::Closure, e, nix).await),
            Err(_) => return Err(timed_out(Stage::Closure, nix)),
        }
        drop(self.conn);
        if let Some(conversation) = self.conversation {
            conversation.finish(EXIT_GRACE).await;
        }
        Ok(closure.into_values().collect())
    }

    async fn fail(self, stage: Stage, e: ProtocolError, nix: &Nix) -> NixError {
        drop(self.conn);
        let err = failed(stage, e, self.conversation).await;
        match err {
            NixError::Daemon { ref log, .. } if stage == Stage::Realise && is_timeout(log) => {
                timed_out(stage, nix)
            }
            other => other,
        }
    }
}

/// `nix-daemon --stdio` with the server's `--option`s.
fn spawn_stdio(nix: &Nix) -> Result<Conversation, NixError> {
    let mut args: Vec<OsString> = vec!["--stdio".into()];
    for (name, value) in nix.options() {
        args.extend(["--option".into(), name.into(), value.into()]);
    }
    tracing::debug!(args = %crate::redact::redact(&format!("{args:?}")), "starting nix-daemon --stdio");
    let mut cmd = Command::new("nix-daemon");
    cmd.args(&args);
    process::converse(cmd, "nix-daemon").map_err(|e| match e {
        ProcessError::Spawn { program, source } => NixError::Spawn { program, source },
        other => NixError::Io {
            stage: Stage::Realise,
            source: std::io::Error::other(other.to_string()),
        },
    })
}

/// The daemon's socket, connected, where the store is named a daemon's;
/// None otherwise, or if it cannot be reached (then `nix-daemon --stdio`
/// tries, and says why it cannot).
async fn connect_daemon(nix: &Nix) -> Option<UnixStream> {
    let store = nix
        .options()
        .iter()
        .rev()
        .find(|(name, _)| name == "store")
        .map(|(_, value)| value.clone())
        .or_else(|| std::env::var("NIX_REMOTE").ok())?;
    let socket = daemon_socket(
        &store,
        std::env::var_os("NIX_DAEMON_SOCKET_PATH"),
        std::env::var_os("NIX_STATE_DIR"),
    )?;
    match UnixStream::connect(&socket).await {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::warn!(socket = %socket.display(), %err, "cannot reach the Nix daemon's socket");
            None
        }
    }
}

/// Where a store URI names a daemon's socket: `daemon` (Nix's own
/// default place, or `NIX_DAEMON_SOCKET_PATH`) or `unix://PATH`.
fn daemon_socket(
    store: &str,
    socket_path: Option<OsString>,
    state_dir: Option<OsString>,
) -> Option<PathBuf> {
    if store == "daemon" {
        return Some(match socket_path {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(state_dir.unwrap_or_else(|| "/nix/var/nix".into()))
                .join("daemon-socket/socket"),
        });
    }
    let path = store.strip_prefix("unix://")?;
    let path = path.split('?').next().unwrap_or(path);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// `drv!output` (1.30+), or the derivation alone (all its outputs).
fn derived_path(w: &Wanted, minor: u64) -> String {
    if minor < 30 {
        return w.drv_path.clone();
    }
    // Outputs are named `<name>` ("out") or `<name>-<output>`.
    let drv_name = name_of(&w.drv_path).trim_end_matches(".drv");
    let out_name = name_of(&w.out_path);
    let output = match out_name.strip_prefix(drv_name) {
        Some("") | None => "out",
        Some(rest) => rest.strip_prefix('-').unwrap_or("out"),
    };
    format!("{}!{output}", w.drv_path)
}

/// Symlinks `gc_root`, `gc_root-2`, ... to the outputs (replaced if a
/// build before left them), as `nix-store --add-root` names them.
async fn root_links(gc_root: &Path, wanted: &[Wanted]) -> Result<Vec<PathBuf>, NixError> {
    let targets: Vec<(PathBuf, String)> = wanted
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let link = match i {
                0 => gc_root.to_path_buf(),
                i => {
                    let mut name = gc_root.as_os_str().to_owned();
                    name.push(format!("-{}", i + 1));
                    PathBuf::from(name)
                }
            };
            (link, w.out_path.clone())
        })
        .collect();
    let io = |source| NixError::Io {
        stage: Stage::Realise,
        source,
    };
    tokio::task::spawn_blocking(move || {
        let mut links = Vec::with_capacity(targets.len());
        for (link, target) in targets {
            let mut temp = link.clone().into_os_string();
            temp.push(".new");
            let temp = PathBuf::from(temp);
            match std::fs::remove_file(&temp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::os::unix::fs::symlink(&target, &temp)?;
            std::fs::rename(&temp, &link)?;
            links.push(link);
        }
        Ok(links)
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?
    .map_err(io)
}

fn path_info(path: String, reply: PathInfoReply) -> PathInfo {
    let mut references = reply.references;
    references.sort();
    references.dedup();
    PathInfo {
        path,
        nar_size: reply.nar_size,
        nar_hash: sri_sha256(&reply.nar_hash_hex),
        references,
        deriver: Some(reply.deriver).filter(|d| !d.is_empty()),
    }
}

/// Hex SHA-256 as `nix path-info --json` prints it (SRI); as given if it
/// is not hex.
fn sri_sha256(hex: &str) -> String {
    match hex::decode(hex) {
        Ok(bytes) if bytes.len() == 32 => format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
        _ => hex.to_owned(),
    }
}

/// Nix's own build timeout, as its message says it.
fn is_timeout(message: &str) -> bool {
    message.contains("timed out after")
}

fn timed_out(stage: Stage, nix: &Nix) -> NixError {
    tracing::warn!(%stage, timeout = ?nix.timeout(), "nix timed out and was stopped");
    NixError::Timeout {
        stage,
        seconds: nix.timeout_secs(),
    }
}

/// The daemon's error (its message after its log), or what went wrong
/// with the process, with the end of its stderr.
async fn failed(stage: Stage, e: ProtocolError, conversation: Option<Conversation>) -> NixError {
    let stderr_tail = match conversation {
        Some(conversation) => conversation.finish(EXIT_GRACE).await,
        None => String::new(),
    };
    let stderr_tail = crate::redact::redact(&stderr_tail).into_owned();
    let log = match e {
        ProtocolError::Daemon { message, log } => format!("{log}{message}"),
        other => format!("{stderr_tail}{other}"),
    };
    let log = crate::redact::redact(&log).into_owned();
    tracing::warn!(%stage, %log, "nix failed");
    NixError::Daemon { stage, log }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_paths_name_the_wanted_output() {
        let w = |drv: &str, out: &str| Wanted {
            drv_path: format!("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-{drv}"),
            out_path: format!("/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-{out}"),
        };
        let hello = w("hello-2.10.drv", "hello-2.10");
        assert_eq!(derived_path(&hello, 34), format!("{}!out", hello.drv_path));
        assert_eq!(derived_path(&hello, 29), hello.drv_path);
        let curl = w("curl-8.0.drv", "curl-8.0-bin");
        assert_eq!(derived_path(&curl, 34), format!("{}!bin", curl.drv_path));
    }

    #[test]
    fn daemon_sockets_from_store_names() {
        let socket = |store, path: Option<&str>, state: Option<&str>| {
            daemon_socket(store, path.map(Into::into), state.map(Into::into))
        };
        assert_eq!(
            socket("daemon", None, None),
            Some(PathBuf::from("/nix/var/nix/daemon-socket/socket"))
        );
        assert_eq!(
            socket("daemon", None, Some("/s")),
            Some(PathBuf::from("/s/daemon-socket/socket"))
        );
        assert_eq!(
            socket("daemon", Some("/x/sock"), Some("/s")),
            Some(PathBuf::from("/x/sock"))
        );
        assert_eq!(
            socket("unix:///run/nix.sock?max-connections=1", None, None),
            Some(PathBuf::from("/run/nix.sock"))
        );
        for other in ["auto", "local", "unix://", "ssh://host", ""] {
            assert_eq!(socket(other, None, None), None, "{other}");
        }
    }

    #[test]
    fn nar_hashes_are_sri() {
        let hex = "1d9e8d6e2e1a3f0b5c4d7e6f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b";
        let sri = sri_sha256(hex);
        assert!(sri.starts_with("sha256-"), "{sri}");
        assert_eq!(sri.len(), "sha256-".len() + 44);
        assert_eq!(sri_sha256("not hex"), "not hex");
    }
}
