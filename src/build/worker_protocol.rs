//! The client side of Nix's worker protocol (what `nix-store` speaks to
//! the daemon), as much of it as a build needs: the handshake, options,
//! temporary and indirect GC roots, building derivations, and path info.
//! Integers are little-endian u64; strings a length, the bytes, and zeros
//! up to a multiple of 8. Every operation is answered by a stream of log
//! messages ending in "last" (then the operation's result) or "error".

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// 1.34 (Nix 2.8); a newer daemon speaks down to it.
const CLIENT_VERSION: u64 = (1 << 8) | 34;
/// 1.17 (Nix 1.11): path info says whether a path is valid.
const OLDEST_MINOR: u64 = 17;

const OP_BUILD_PATHS: u64 = 9;
const OP_ADD_TEMP_ROOT: u64 = 11;
const OP_ADD_INDIRECT_ROOT: u64 = 12;
const OP_SET_OPTIONS: u64 = 19;
const OP_QUERY_PATH_INFO: u64 = 26;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;
/// A result carrying one line of a builder's log.
const RESULT_BUILD_LOG_LINE: u64 = 101;

/// Longest string accepted (log lines, messages, paths).
const STRING_MAX: u64 = 16 * 1024 * 1024;
/// Most items in a list (references, fields).
const LIST_MAX: u64 = 1 << 20;
/// Bytes of builder log and messages kept: the end, where the error is.
pub const LOG_TAIL: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("talking to the Nix daemon: {0}")]
    Io(#[from] io::Error),
    #[error("the Nix daemon said something unexpected: {0}")]
    Unexpected(String),
    /// The daemon's own error for an operation, with the log before it.
    #[error("{message}")]
    Daemon { message: String, log: String },
}

/// What the daemon knows of a valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfoReply {
    /// The derivation that built the path; empty when Nix does not know.
    pub deriver: String,
    /// SHA-256 of the NAR, hex.
    pub nar_hash_hex: String,
    pub nar_size: u64,
    pub references: Vec<String>,
}

/// An open conversation with a daemon (or `nix-daemon --stdio`).
pub struct Connection<R, W> {
    from: BufReader<R>,
    to: W,
    /// The message being put together, sent by [`Connection::send`].
    out: Vec<u8>,
    /// The protocol minor version both sides speak.
    minor: u64,
    log: LogTail,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    /// Greets the daemon and agrees on a version.
    pub async fn handshake(from: R, to: W) -> Result<Self, ProtocolError> {
        let mut conn = Connection {
            from: BufReader::new(from),
            to,
            out: Vec::new(),
            minor: 0,
            log: LogTail::default(),
        };
        conn.put(WORKER_MAGIC_1);
        conn.send().await?;
        let magic = conn.int().await?;
        if magic != WORKER_MAGIC_2 {
            return Err(ProtocolError::Unexpected(format!(
                "greeting {magic:#x}, not a Nix daemon"
            )));
        }
        let daemon = conn.int().await?;
        if daemon >> 8 != CLIENT_VERSION >> 8 || daemon & 0xff < OLDEST_MINOR {
            return Err(ProtocolError::Unexpected(format!(
                "protocol version {}.{}, not supported",
                daemon >> 8,
                daemon & 0xff
            )));
        }
        conn.minor = (daemon & 0xff).min(CLIENT_VERSION & 0xff);
        conn.put(CLIENT_VERSION);
        // No CPU affinity, no reserved space (both obsolete).
        conn.put(0);
        conn.put(0);
        conn.send().await?;
        if conn.minor >= 33 {
            let _nix_version = conn.string().await?;
        }
        conn.finish_work().await?;
        Ok(conn)
    }

    /// The protocol minor version agreed on.
    pub fn minor(&self) -> u64 {
        self.minor
    }

    /// Sets the connection's options: build jobs and cores, and settings
    /// by name (a daemon ignores most of those from users it does not
    /// trust, as it does for `nix-store`).
    pub async fn set_options(
        &mut self,
        max_jobs: u64,
        cores: u64,
        overrides: &[(String, String)],
    ) -> Result<(), ProtocolError> {
        self.put(OP_SET_OPTIONS);
        // keepFailed, keepGoing, tryFallback, verbosity (errors only),
        // maxBuildJobs, maxSilentTime, useBuildHook (obsolete),
        // buildVerbosity (errors: builder logs are sent), logType and
        // printBuildTrace (obsolete), buildCores, useSubstitutes.
        for value in [0, 0, 0, 0, max_jobs, 0, 1, 0, 0, 0, cores, 1] {
            self.put(value);
        }
        self.put(overrides.len() as u64);
        for (name, value) in overrides {
            self.put_str(name);
            self.put_str(value);
        }
        self.send().await?;
        self.finish_work().await
    }

    /// Keeps `path` from the garbage collector while the connection lasts
    /// (it need not exist yet).
    pub async fn add_temp_root(&mut self, path: &str) -> Result<(), ProtocolError> {
        self.simple(OP_ADD_TEMP_ROOT, path).await
    }

    /// Registers `link`, a symlink to a store path, as a GC root for as
    /// long as it exists.
    pub async fn add_indirect_root(&mut self, link: &str) -> Result<(), ProtocolError> {
        self.simple(OP_ADD_INDIRECT_ROOT, link).await
    }

    /// Builds (or substitutes) what is missing of the given derivation
    /// outputs, `drv!output` from 1.30 on, plain `.drv` paths before.
    pub async fn build_paths(&mut self, paths: &[String]) -> Result<(), ProtocolError> {
        self.put(OP_BUILD_PATHS);
        self.put(paths.len() as u64);
        for p in paths {
            self.put_str(p);
        }
        // Build mode: normal.
        self.put(0);
        self.send().await?;
        self.finish_work().await?;
        self.int().await?;
        Ok(())
    }

    /// Path info of each path, in order; `None` for a path that is not
    /// valid. The queries are all sent before the replies are read, so a
    /// level of a closure costs one round trip.
    pub async fn query_path_infos(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<Option<PathInfoReply>>, ProtocolError> {
        let Connection {
            from,
            to,
            minor,
            log,
            ..
        } = self;
        let minor = *minor;
        // Written and read at once: a daemon blocked on a full pipe of
        // replies stops reading queries.
        let send = async {
            let mut out = Vec::new();
            for chunk in paths.chunks(256) {
                out.clear();
                for p in chunk {
                    put(&mut out, OP_QUERY_PATH_INFO);
                    put_str(&mut out, p);
                }
                to.write_all(&out).await?;
            }
            to.flush().await?;
            Ok::<_, ProtocolError>(())
        };
        let receive = async {
            let mut replies = Vec::with_capacity(paths.len());
            for _ in paths {
                finish_work(from, log, minor).await?;
                if int(from).await? == 0 {
                    replies.push(None);
                    continue;
                }
                let deriver = string(from).await?;
                let nar_hash_hex = string(from).await?;
                let references = strings(from).await?;
                let _registered = int(from).await?;
                let nar_size = int(from).await?;
                if minor >= 16 {
                    let _ultimate = int(from).await?;
                    let _signatures = strings(from).await?;
                    let _content_address = string(from).await?;
                }
                replies.push(Some(PathInfoReply {
                    deriver,
                    nar_hash_hex,
                    nar_size,
                    references,
                }));
            }
            Ok::<_, ProtocolError>(replies)
        };
        let (sent, received) = tokio::join!(send, receive);
        sent?;
        received
    }

    /// An operation taking one string and answering an integer.
    async fn simple(&mut self, op: u64, arg: &str) -> Result<(), ProtocolError> {
        self.put(op);
        self.put_str(arg);
        self.send().await?;
        self.finish_work().await?;
        self.int().await?;
        Ok(())
    }

    fn put(&mut self, n: u64) {
        put(&mut self.out, n);
    }

    fn put_str(&mut self, s: &str) {
        put_str(&mut self.out, s);
    }

    /// Sends the message put together.
    async fn send(&mut self) -> Result<(), ProtocolError> {
        self.to.write_all(&self.out).await?;
        self.to.flush().await?;
        self.out.clear();
        Ok(())
    }

    async fn int(&mut self) -> Result<u64, ProtocolError> {
        int(&mut self.from).await
    }

    async fn string(&mut self) -> Result<String, ProtocolError> {
        string(&mut self.from).await
    }

    async fn finish_work(&mut self) -> Result<(), ProtocolError> {
        finish_work(&mut self.from, &mut self.log, self.minor).await
    }
}

/// Appends an integer to a message being put together.
fn put(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len().div_ceil(8) * 8, 0);
}

async fn int<R: AsyncRead + Unpin>(from: &mut BufReader<R>) -> Result<u64, ProtocolError> {
    Ok(from.read_u64_le().await?)
}

async fn string<R: AsyncRead + Unpin>(from: &mut BufReader<R>) -> Result<String, ProtocolError> {
    let bytes = bytes(from).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn bytes<R: AsyncRead + Unpin>(from: &mut BufReader<R>) -> Result<Vec<u8>, ProtocolError> {
    let len = int(from).await?;
    if len > STRING_MAX {
        return Err(ProtocolError::Unexpected(format!(
            "a string of {len} bytes"
        )));
    }
    let padded = len.div_ceil(8) * 8;
    let mut buf = vec![0u8; padded as usize];
    from.read_exact(&mut buf).await?;
    buf.truncate(len as usize);
    Ok(buf)
}

async fn strings<R: AsyncRead + Unpin>(
    from: &mut BufReader<R>,
) -> Result<Vec<String>, ProtocolError> {
    let n = int(from).await?;
    if n > LIST_MAX {
        return Err(ProtocolError::Unexpected(format!("a list of {n} items")));
    }
    let mut items = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        items.push(string(from).await?);
    }
    Ok(items)
}

/// Reads log messages up to the end of an operation's work: Ok at "last",
/// the daemon's error (with the log before it) at "error".
async fn finish_work<R: AsyncRead + Unpin>(
    from: &mut BufReader<R>,
    log: &mut LogTail,
    minor: u64,
) -> Result<(), ProtocolError> {
    loop {
        match int(from).await? {
            STDERR_LAST => {
                // An operation that ended well: its log is no later
                // error's.
                log.take();
                return Ok(());
            }
            STDERR_ERROR => {
                let message = if minor >= 26 {
                    read_error(from).await?
                } else {
                    let message = string(from).await?;
                    let _status = int(from).await?;
                    message
                };
                return Err(ProtocolError::Daemon {
                    message: strip_ansi(&message),
                    log: log.take(),
                });
            }
            STDERR_NEXT => log.push(&string(from).await?),
            STDERR_START_ACTIVITY => {
                let _id = int(from).await?;
                let _level = int(from).await?;
                let _kind = int(from).await?;
                let _text = string(from).await?;
                fields(from).await?;
                let _parent = int(from).await?;
            }
            STDERR_STOP_ACTIVITY => {
                let _id = int(from).await?;
            }
            STDERR_RESULT => {
                let _id = int(from).await?;
                let kind = int(from).await?;
                let fields = fields(from).await?;
                if kind == RESULT_BUILD_LOG_LINE {
                    for line in fields {
                        log.push(&line);
                        log.push("\n");
                    }
                }
            }
            // No operation used here reads or writes data streams.
            other @ (STDERR_READ | STDERR_WRITE) => {
                return Err(ProtocolError::Unexpected(format!(
                    "a data request ({other:#x})"
                )))
            }
            other => return Err(ProtocolError::Unexpected(format!("log message {other:#x}"))),
        }
    }
}

/// A structured error (1.26+): its message and trace hints.
async fn read_error<R: AsyncRead + Unpin>(
    from: &mut BufReader<R>,
) -> Result<String, ProtocolError> {
    let _kind = string(from).await?;
    let _level = int(from).await?;
    let _name = string(from).await?;
    let mut message = string(from).await?;
    let _position = int(from).await?;
    let traces = int(from).await?;
    if traces > LIST_MAX {
        return Err(ProtocolError::Unexpected(format!("{traces} traces")));
    }
    for _ in 0..traces {
        let _position = int(from).await?;
        let hint = string(from).await?;
        message.push('\n');
        message.push_str(&hint);
    }
    Ok(message)
}

/// An activity's fields; strings are kept, integers dropped.
async fn fields<R: AsyncRead + Unpin>(
    from: &mut BufReader<R>,
) -> Result<Vec<String>, ProtocolError> {
    let n = int(from).await?;
    if n > LIST_MAX {
        return Err(ProtocolError::Unexpected(format!("{n} fields")));
    }
    let mut strings = Vec::new();
    for _ in 0..n {
        match int(from).await? {
            0 => {
                int(from).await?;
            }
            1 => strings.push(string(from).await?),
            other => return Err(ProtocolError::Unexpected(format!("field type {other}"))),
        }
    }
    Ok(strings)
}

/// Nix colours store paths in messages; a log has no terminal.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The end of the daemon's log messages and builder output.
#[derive(Default)]
struct LogTail {
    kept: VecDeque<u8>,
}

impl LogTail {
    fn push(&mut self, s: &str) {
        self.kept.extend(strip_ansi(s).bytes());
        let over = self.kept.len().saturating_sub(LOG_TAIL);
        self.kept.drain(..over);
    }

    fn take(&mut self) -> String {
        let bytes: Vec<u8> = std::mem::take(&mut self.kept).into();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A daemon's side of a conversation, written ahead: the handshake
    /// (1.34, with its version string) and then `replies`.
    async fn connect(
        replies: Vec<u8>,
    ) -> (
        Connection<tokio::io::DuplexStream, tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let mut daemon = Vec::new();
        put(&mut daemon, WORKER_MAGIC_2);
        put(&mut daemon, (1 << 8) | 34);
        put_str(&mut daemon, "2.8.0");
        put(&mut daemon, STDERR_LAST);
        daemon.extend(replies);
        let (mut daemon_end, from) = duplex(1 << 20);
        daemon_end.write_all(&daemon).await.unwrap();
        // What the client writes is kept, unread, in the other end.
        let (to, sink) = duplex(1 << 20);
        (Connection::handshake(from, to).await.unwrap(), sink)
    }

    #[tokio::test]
    async fn path_info_and_missing_paths() {
        let mut replies = Vec::new();
        // A log line and an activity first, as Nix sends them.
        put(&mut replies, STDERR_NEXT);
        put_str(&mut replies, "querying\n");
        put(&mut replies, STDERR_START_ACTIVITY);
        for n in [1, 0, 105] {
            put(&mut replies, n);
        }
        put_str(&mut replies, "building");
        put(&mut replies, 1);
        put(&mut replies, 1);
        put_str(&mut replies, "field");
        put(&mut replies, 0);
        put(&mut replies, STDERR_LAST);
        put(&mut replies, 1);
        put_str(&mut replies, "/nix/store/d.drv");
        put_str(&mut replies, "ab".repeat(32).as_str());
        put(&mut replies, 1);
        put_str(&mut replies, "/nix/store/glibc");
        put(&mut replies, 7);
        put(&mut replies, 4096);
        put(&mut replies, 1);
        put(&mut replies, 0);
        put_str(&mut replies, "");
        put(&mut replies, STDERR_LAST);
        put(&mut replies, 0);
        let (mut conn, _sink) = connect(replies).await;
        assert_eq!(conn.minor(), 34);
        let got = conn
            .query_path_infos(&["/nix/store/hello".into(), "/nix/store/gone".into()])
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                Some(PathInfoReply {
                    deriver: "/nix/store/d.drv".into(),
                    nar_hash_hex: "ab".repeat(32),
                    nar_size: 4096,
                    references: vec!["/nix/store/glibc".into()],
                }),
                None
            ]
        );
    }

    #[tokio::test]
    async fn errors_keep_the_log_and_lose_the_colours() {
        let mut replies = Vec::new();
        put(&mut replies, STDERR_RESULT);
        put(&mut replies, 1);
        put(&mut replies, RESULT_BUILD_LOG_LINE);
        put(&mut replies, 1);
        put(&mut replies, 1);
        put_str(&mut replies, "make: *** [all] Error 1");
        put(&mut replies, STDERR_ERROR);
        put_str(&mut replies, "Error");
        put(&mut replies, 0);
        put_str(&mut replies, "Error");
        put_str(
            &mut replies,
            "builder for '\u{1b}[35;1m/nix/store/x.drv\u{1b}[0m' failed",
        );
        put(&mut replies, 0);
        put(&mut replies, 0);
        let (mut conn, _sink) = connect(replies).await;
        match conn.build_paths(&["/nix/store/x.drv!out".into()]).await {
            Err(ProtocolError::Daemon { message, log }) => {
                assert_eq!(message, "builder for '/nix/store/x.drv' failed");
                assert_eq!(log, "make: *** [all] Error 1\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_strings_are_refused() {
        let mut replies = Vec::new();
        put(&mut replies, STDERR_NEXT);
        put(&mut replies, STRING_MAX + 1);
        let (mut conn, _sink) = connect(replies).await;
        assert!(matches!(
            conn.add_temp_root("/nix/store/x").await,
            Err(ProtocolError::Unexpected(_))
        ));
    }

    #[tokio::test]
    async fn not_a_daemon_is_refused() {
        let (mut other, from) = duplex(64);
        other.write_all(&[0u8; 16]).await.unwrap();
        let (to, _sink) = duplex(64);
        assert!(matches!(
            Connection::handshake(from, to).await,
            Err(ProtocolError::Unexpected(_))
        ));
    }
}
