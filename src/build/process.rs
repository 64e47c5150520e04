//! Runs the external tools a build needs (Nix, git): each in its own
//! process group, bounded by a timeout, with bounded output.
//!
//! Nix starts builders in their own sessions, which a signal to our
//! process group cannot reach, and git starts helpers (`git-remote-http`,
//! ssh); so on timeout (or when the future is dropped) the group first gets
//! SIGTERM, for Nix to stop its builders itself, and after a grace period
//! SIGKILL.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// How long a stopped process gets to clean up after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Most bytes of stdout read (it is parsed whole; beyond this is an error).
pub const STDOUT_MAX: usize = 64 * 1024 * 1024;
/// Bytes of stderr kept: its end, where the error is.
pub const STDERR_TAIL: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} timed out")]
    Timeout { program: String },
    #[error("I/O error while running {program}: {source}")]
    Io {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} wrote more than {max} bytes of output")]
    TooMuchOutput { program: String, max: usize },
}

/// A finished process.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The last [`STDERR_TAIL`] bytes of stderr, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` (its stdio is set here) to the end, or stops its whole
/// process group after `timeout`.
pub async fn run(
    mut cmd: Command,
    program: &str,
    timeout: Duration,
) -> Result<Finished, ProcessError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let mut guard = ChildGuard(None);
    let child = guard.0.insert(child);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let waited = tokio::time::timeout(timeout, async {
        let (out, err, status) = tokio::join!(
            read_bounded(stdout, STDOUT_MAX),
            read_tail(stderr, STDERR_TAIL),
            child.wait()
        );
        Ok::<_, io::Error>((out?, err?, status?))
    })
    .await;
    let (stdout, stderr, status) = match waited {
        Err(_elapsed) => {
            if let Some(child) = guard.0.take() {
                terminate(child).await;
            }
            return Err(ProcessError::Timeout {
                program: program.to_owned(),
            });
        }
        Ok(Err(source)) => {
            return Err(ProcessError::Io {
                program: program.to_owned(),
                source,
            })
        }
        Ok(Ok(done)) => done,
    };
    // Reaped: nothing left for the guard to stop.
    guard.0 = None;
    let Some(stdout) = stdout else {
        return Err(ProcessError::TooMuchOutput {
            program: program.to_owned(),
            max: STDOUT_MAX,
        });
    };
    Ok(Finished {
        status,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// A child talked to through its stdin and stdout (a `nix-daemon
/// --stdio`), in its own process group like [`run`]'s; dropping it before
/// [`Conversation::finish`] stops the whole group.
pub struct Conversation {
    guard: ChildGuard,
    /// The child's stdin; `None` once handed out.
    pub stdin: Option<ChildStdin>,
    /// The child's stdout; `None` once handed out.
    pub stdout: Option<ChildStdout>,
    /// The end of its stderr, read all along so the child never blocks.
    stderr: JoinHandle<io::Result<Vec<u8>>>,
}

/// Starts `cmd` (its stdio is set here) for a [`Conversation`].
pub fn converse(mut cmd: Command, program: &str) -> Result<Conversation, ProcessError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = tokio::spawn(read_tail(child.stderr.take(), STDERR_TAIL));
    Ok(Conversation {
        guard: ChildGuard(Some(child)),
        stdin,
        stdout,
        stderr,
    })
}

impl Conversation {
    /// Closes stdin (the end of the conversation) and waits up to `grace`
    /// for the child to exit, then stops its group; returns the end of
    /// its stderr, lossily decoded.
    pub async fn finish(mut self, grace: Duration) -> String {
        drop(self.stdin.take());
        drop(self.stdout.take());
        if let Some(mut child) = self.guard.0.take() {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                terminate(child).await;
            }
        }
        // A helper that inherited the pipe could hold it open: bounded.
        let stderr = match tokio::time::timeout(grace, &mut self.stderr).await {
            Ok(Ok(Ok(tail))) => tail,
            _ => Vec::new(),
        };
        String::from_utf8_lossy(&stderr).into_owned()
    }
}

/// All of a pipe, or None if it was longer than `max` (it is drained to the
/// end either way, so the writer never blocks).
async fn read_bounded(
    pipe: Option<impl AsyncRead + Unpin>,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut kept = Vec::new();
    let mut over = false;
    drain(pipe, |chunk| {
        if kept.len() + chunk.len() > max {
            over = true;
            kept = Vec::new();
        } else if !over {
            kept.extend_from_slice(chunk);
        }
    })
    .await?;
    Ok((!over).then_some(kept))
}

/// The last `max` bytes of a pipe.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    drain(pipe, |chunk| {
        kept.extend_from_slice(chunk);
        // Trimmed in batches, so each byte is moved a bounded number of times.
        if kept.len() > 2 * max {
            kept.drain(..kept.len() - max);
        }
    })
    .await?;
    if kept.len() > max {
        kept.drain(..kept.len() - max);
    }
    Ok(kept)
}

async fn drain(
    pipe: Option<impl AsyncRead + Unpin>,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let Some(mut pipe) = pipe else {
        return Ok(());
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n]);
    }
}

/// Sends `signal` to the process group led by `pid`. Errors (typically
/// ESRCH: the group is already gone) are ignored: there is nothing to do.
fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and touches no memory. The
        // leader is not reaped yet, so its id still names our group.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Stops a child started with `process_group(0)`: SIGTERM first so that
/// Nix kills its builders, then SIGKILL for whatever is left.
async fn terminate(mut child: Child) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    signal_group(pid, libc::SIGTERM);
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        signal_group(pid, libc::SIGKILL);
        if let Err(err) = child.wait().await {
            tracing::warn!(pid, %err, "could not reap a stopped process");
        }
    } else {
        // The leader is gone; helpers that ignored SIGTERM are not.
        signal_group(pid, libc::SIGKILL);
    }
}

/// Owns a running child; stops it if dropped before it was reaped, e.g.
/// when the caller's future is cancelled.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(child) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(terminate(child));
            }
            Err(_) => {
                // No runtime to wait in: SIGTERM now, and kill_on_drop
                // SIGKILLs the direct child.
                if let Some(pid) = child.id() {
                    signal_group(pid, libc::SIGTERM);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_bounded() {
        let tail = read_tail(Some(&b"0123456789"[..]), 4).await.unwrap();
        assert_eq!(tail, b"6789");
        let big = vec![b'x'; 300_000];
        let tail = read_tail(Some(&big[..]), 1000).await.unwrap();
        assert_eq!(tail.len(), 1000);
        assert_eq!(
            read_bounded(Some(&b"abc"[..]), 3).await.unwrap(),
            Some(b"abc".to_vec())
        );
        assert_eq!(read_bounded(Some(&b"abcd"[..]), 3).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_chatty_process_keeps_only_the_end_of_stderr() {
        let mut cmd = Command::new("/bin/sh");
        // ~1 MiB of stderr, then the line that matters.
        cmd.args([
            "-c",
            "head -c 1048576 /dev/zero | tr '\\0' x >&2; echo; echo the end >&2; exit 3",
        ]);
        let done = run(cmd, "sh", Duration::from_secs(20)).await.unwrap();
        assert_eq!(done.status.code(), Some(3));
        assert!(done.stderr.len() <= STDERR_TAIL);
        assert!(
            done.stderr.ends_with("the end\n"),
            "{:?}",
            &done.stderr[done.stderr.len() - 20..]
        );
    }
}
