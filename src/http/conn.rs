//! Accepting connections with bounds, so that slow or idle clients cannot
//! starve the others: at most `max_connections` open (more wait in the
//! kernel's backlog), a first request's headers within `header_timeout`,
//! no more than `idle_timeout` without a byte moving while no request is
//! in progress, and hyper's header-read timeout for every later request.
//!
//! A request in progress is never timed out here: a cold pull may wait
//! minutes for Nix without a byte on the wire.
//!
//! With TLS, the handshake is part of the wait for the first request's
//! headers (a client that stalls in it is cut off alike, and holds a slot
//! meanwhile); ALPN picks HTTP/2 or HTTP/1.1, and a plain HTTP request
//! sent to the port gets a 400 saying to use https.
//!
//! With `Limits::sendfile`, blob bodies on plain HTTP/1.1 go from the file
//! to the socket with sendfile: see [`super::sendfile`].

use super::sendfile::{self, Sendfile};
use crate::tls::Tls;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::Service;

/// How many connections, for how long each may wait on its client, and
/// whether plain HTTP/1.1 sends blob bodies with sendfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub sendfile: bool,
}

/// Accept errors (such as running out of file descriptors) and a full
/// connection table are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a connection's watchdog reads.
struct ConnState {
    opened: Instant,
    /// Milliseconds after `opened` when a byte last moved.
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
    requested: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            opened: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let age = self.opened.elapsed();
        if !self.requested.load(Ordering::Relaxed) {
            return (age > limits.header_timeout).then_some("no request headers in time");
        }
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        (age.saturating_sub(last) > limits.idle_timeout).then_some("idle")
    }
}

/// Counts a request as in progress until its response is ready.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn enter(state: &Arc<ConnState>) -> Self {
        state.requested.store(true, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, noting when bytes move; with `sendfile`, bytes of blob
/// windows registered there are sent from their file.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnState>,
    sendfile: Option<Sendfile>,
}

impl Watched {
    /// Writes the first of `bufs` with sendfile if it is a registered
    /// window, or the buffers before the first such one; `None` when no
    /// buffer is one.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        let (i, span) = self.sendfile.as_ref()?.locate(bufs)?;
        Some(if i == 0 {
            sendfile::poll_send(&self.stream, cx, &span)
        } else {
            Pin::new(&mut self.stream).poll_write_vectored(cx, &bufs[..i])
        })
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = match self.poll_send_file(cx, &[io::IoSlice::new(buf)]) {
            Some(r) => r,
            None => Pin::new(&mut self.stream).poll_write(cx, buf),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = match self.poll_send_file(cx, bufs) {
            Some(r) => r,
            None => Pin::new(&mut self.stream).poll_write_vectored(cx, bufs),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The application as hyper calls it, counting requests in progress and
/// giving each the connection's [`Sendfile`], if it has one.
#[derive(Clone)]
struct Tracked {
    app: Router,
    state: Arc<ConnState>,
    sendfile: Option<Sendfile>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let guard = InFlight::enter(&self.state);
        if let Some(sendfile) = &self.sendfile {
            req.extensions_mut().insert(sendfile.clone());
        }
        let mut app = self.app.clone();
        Box::pin(async move {
            // A Router is always ready.
            let response = app.call(req.map(axum::body::Body::new)).await;
            drop(guard);
            response
        })
    }
}

/// Logs a repeated condition at most every [`WARN_EVERY`].
struct Throttled(Option<Instant>);

impl Throttled {
    fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

/// How a connection speaks HTTP, once accepted.
#[derive(Clone)]
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    tls: Option<Arc<Tls>>,
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain HTTP client sent to the TLS port is told.
const PLAIN_HTTP_TO_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: application/json\r\nConnection: close\r\nContent-Length: 99\r\n\r\n\
{\"errors\":[{\"code\":\"UNSUPPORTED\",\"message\":\"this port speaks HTTPS: use https://\",\"detail\":null}]}\n";

type ConnError = Box<dyn std::error::Error + Send + Sync>;

impl Protocols {
    /// Serves one connection until it ends; shutdown lets its requests
    /// finish.
    async fn serve(self, io: Watched, service: Tracked, watcher: Watcher) -> Result<(), ConnError> {
        let Some(tls) = self.tls else {
            let conn = self.http1.serve_connection(TokioIo::new(io), service);
            return Ok(watcher.watch(conn).await?);
        };
        let mut first = [0u8; 1];
        if io.stream.peek(&mut first).await? == 0 {
            return Ok(());
        }
        if first[0] != TLS_HANDSHAKE {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut io = io;
            // Read what the request sent so far: closing a socket with
            // unread data resets it, and the client might lose the answer.
            let mut request = [0u8; 4096];
            let _ = io.read(&mut request).await?;
            io.write_all(PLAIN_HTTP_TO_TLS).await?;
            io.shutdown().await?;
            return Ok(());
        }
        let stream = tokio_rustls::TlsAcceptor::from(tls.server_config())
            .accept(io)
            .await?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let conn = self.http2.serve_connection(TokioIo::new(stream), service);
            Ok(watcher.watch(conn).await?)
        } else {
            let conn = self.http1.serve_connection(TokioIo::new(stream), service);
            Ok(watcher.watch(conn).await?)
        }
    }
}

/// Serves `app` until `shutdown` resolves, then lets the requests in
/// progress finish. With `tls`, every connection speaks HTTPS.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        // Queue body buffers rather than copy them into one: sendfile
        // needs to see the blob windows themselves.
        .writev(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // Stated rather than left to hyper's default, which may change.
        .max_concurrent_streams(100)
        // Blobs are large: send in big slices, and let uploads of requests
        // (small here) use the defaults.
        .max_send_buf_size(1 << 20);
    let protocols = Protocols { http1, http2, tls };
    let mut accept_warning = Throttled(None);
    let mut full_warning = Throttled(None);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if accept_warning.due() {
                        tracing::warn!(error = %e, "cannot accept a connection");
                    }
                    // Out of file descriptors: give closing connections a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if permits.available_permits() == 0 && full_warning.due() {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection limit reached; new clients wait"
            );
        }
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::new());
        // Only plain HTTP/1.1 writes a body's bytes to the socket as they
        // are; TLS encrypts them first.
        let sendfile = (limits.sendfile && protocols.tls.is_none()).then(Sendfile::default);
        let service = Tracked {
            app: app.clone(),
            state: Arc::clone(&state),
            sendfile: sendfile.clone(),
        };
        let io = Watched {
            stream,
            state: Arc::clone(&state),
            sendfile,
        };
        let conn = protocols.clone().serve(io, service, graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                reason = watchdog(&state, &limits) => {
                    tracing::debug!(reason, "closing a connection");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Resolves when the connection has waited on its client too long.
async fn watchdog(state: &ConnState, limits: &Limits) -> &'static str {
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        if let Some(reason) = state.expired(limits) {
            return reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 1,
        header_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        sendfile: true,
    };

    /// A connection state as if opened `ago`.
    fn opened(ago: Duration) -> ConnState {
        let mut state = ConnState::new();
        state.opened -= ago;
        state
    }

    #[test]
    fn the_answer_to_plain_http_on_the_tls_port_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_TO_TLS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNSUPPORTED");
    }

    #[test]
    fn a_silent_connection_expires_after_the_header_timeout() {
        assert_eq!(opened(Duration::from_millis(50)).expired(&LIMITS), None);
        assert_eq!(
            opened(Duration::from_millis(150)).expired(&LIMITS),
            Some("no request headers in time")
        );
    }

    #[test]
    fn a_request_in_progress_never_expires() {
        let state = Arc::new(opened(Duration::from_secs(3600)));
        let guard = InFlight::enter(&state);
        assert_eq!(state.expired(&LIMITS), None);
        drop(guard);
        // Just finished: idle from now on.
        assert_eq!(state.expired(&LIMITS), None);
    }

    #[test]
    fn an_idle_connection_expires_after_the_idle_timeout() {
        let state = Arc::new(opened(Duration::from_secs(10)));
        drop(InFlight::enter(&state));
        assert_eq!(state.expired(&LIMITS), None);
        // The last byte moved 9.5 s after opening, 0.5 s ago.
        state.last_activity_ms.store(9_500, Ordering::Relaxed);
        assert_eq!(state.expired(&LIMITS), Some("idle"));
    }
}
