//! Blob bodies sent with sendfile on plain HTTP/1.1 (`--sendfile`): whole
//! and ranged bytes, HEAD, keep-alive afterwards, clients that hang up or
//! stop reading, and the same bytes from mapped windows (the default). A
//! 110 MB layer (`hello/big`) spans several of the 16 MiB windows handed
//! to the kernel.

mod common;

use common::{blob_path, config, get_manifest, largest_layer, require_tool, TestServer};
use nixery::digest::Digest;
use reqwest::Client;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WINDOW: u64 = 16 * 1024 * 1024;

/// A server for `hello/big` on `storage`, and its largest layer.
async fn big_server(storage: &Path, extra: &[&str]) -> (TestServer, String) {
    let s = TestServer::start(&config(storage, extra)).await;
    let (_, m) = get_manifest(&Client::new(), &s, "hello/big", "latest").await;
    let layer = largest_layer(&m);
    (s, layer)
}

/// A server for `hello/big` on a new storage path, with its largest
/// layer's bytes and path, and a connection to it.
struct Big {
    _dir: tempfile::TempDir,
    s: TestServer,
    layer: String,
    file: Vec<u8>,
    path: String,
    stream: TcpStream,
}

async fn big(extra: &[&str]) -> Big {
    let dir = tempfile::tempdir().unwrap();
    let (s, layer) = big_server(dir.path(), extra).await;
    let file = std::fs::read(blob_path(dir.path(), &layer)).unwrap();
    let path = format!("/v2/hello/big/blobs/{layer}");
    let stream = TcpStream::connect(s.addr).await.unwrap();
    Big {
        _dir: dir,
        s,
        layer,
        file,
        path,
        stream,
    }
}

/// One response's status line and headers, read off `stream` up to the
/// blank line; the body stays unread.
async fn read_head(stream: &mut TcpStream) -> (u16, Vec<(String, String)>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "connection closed in the headers: {head:?}");
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status.parse().unwrap(), headers)
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
}

async fn send(stream: &mut TcpStream, method: &str, path: &str, extra: &str) {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

async fn read_body(stream: &mut TcpStream, len: u64) -> Vec<u8> {
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await.unwrap();
    body
}

/// Waits (bounded) until no blob is being sent.
async fn until_nothing_is_sent(s: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.builder.blobs().in_use() {
        assert!(Instant::now() < deadline, "a blob is still being sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// curl fetches the whole layer with its digest, and ranges across windows
/// hold the file's bytes, with and without sendfile.
#[tokio::test]
async fn large_blobs_and_ranges_hold_the_files_bytes() {
    require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    for extra in [&["--sendfile"][..], &[][..]] {
        let (s, layer) = big_server(dir.path(), extra).await;
        let file = std::fs::read(blob_path(dir.path(), &layer)).unwrap();
        let n = file.len() as u64;
        assert!(n > 3 * WINDOW, "the layer spans windows: {n}");
        let url = s.url(&format!("/v2/hello/big/blobs/{layer}"));
        let out = dir.path().join("fetched");
        // curl blocks: off the runtime, which serves the download.
        let status = tokio::task::spawn_blocking({
            let (url, out) = (url.clone(), out.clone());
            move || {
                Command::new("curl")
                    .args(["-sSf", "-o"])
                    .arg(&out)
                    .arg(&url)
                    .status()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(status.success(), "curl {url}: {status}");
        let fetched = std::fs::read(&out).unwrap();
        assert_eq!(Digest::of(&fetched).to_string(), layer, "{extra:?}");

        let c = Client::new();
        for (a, b) in [
            (0, 0),
            (WINDOW - 3, WINDOW + 4),
            (5, 2 * WINDOW + 4097),
            (n - 100, n - 1),
        ] {
            let r = c
                .get(&url)
                .header("Range", format!("bytes={a}-{b}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::PARTIAL_CONTENT);
            assert_eq!(
                common::header(&r, "content-range"),
                format!("bytes {a}-{b}/{n}")
            );
            assert_eq!(
                common::header(&r, "content-length"),
                (b - a + 1).to_string()
            );
            assert_eq!(common::header(&r, "docker-content-digest"), layer);
            let got = r.bytes().await.unwrap();
            assert!(
                got[..] == file[a as usize..=b as usize],
                "{a}-{b} {extra:?}"
            );
        }
        until_nothing_is_sent(&s).await;
        s.stop().await;
    }
}

/// After a body sent by the kernel, the connection serves more requests:
/// a HEAD, a range, and the base route, all on the one socket.
#[tokio::test]
async fn the_connection_is_kept_alive_after_a_sendfile_body() {
    let Big {
        _dir,
        s,
        layer,
        file,
        path,
        mut stream,
    } = big(&["--sendfile"]).await;

    send(&mut stream, "GET", &path, "").await;
    let (status, headers) = read_head(&mut stream).await;
    assert_eq!(status, 200);
    assert_eq!(find(&headers, "content-length"), file.len().to_string());
    assert_eq!(find(&headers, "docker-content-digest"), layer);
    let body = read_body(&mut stream, file.len() as u64).await;
    assert!(body == file, "the body is the file");

    send(&mut stream, "HEAD", &path, "").await;
    let (status, headers) = read_head(&mut stream).await;
    assert_eq!(status, 200);
    assert_eq!(find(&headers, "content-length"), file.len().to_string());

    let (a, b) = (WINDOW - 10, WINDOW + 1_000_000);
    send(
        &mut stream,
        "GET",
        &path,
        &format!("Range: bytes={a}-{b}\r\n"),
    )
    .await;
    let (status, headers) = read_head(&mut stream).await;
    assert_eq!(status, 206);
    let body = read_body(&mut stream, b - a + 1).await;
    assert!(body[..] == file[a as usize..=b as usize]);

    send(&mut stream, "GET", "/v2/", "").await;
    let (status, headers2) = read_head(&mut stream).await;
    assert_eq!(status, 200, "{headers:?} {headers2:?}");
    assert_eq!(read_body(&mut stream, 2).await, b"{}");
    drop(stream);
    until_nothing_is_sent(&s).await;

    // Bytes sent by the kernel are counted as served, HEAD's none.
    let metrics = Client::new()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nixery_blob_bytes_served_total "))
        .unwrap_or_else(|| panic!("no blob bytes in {metrics}"));
    assert_eq!(served, (file.len() as u64 + b - a + 1).to_string());
    s.stop().await;
}

/// A client that hangs up mid-body releases the blob (its pin and the
/// scrub's pause), and the server goes on serving it.
#[tokio::test]
async fn a_client_that_hangs_up_mid_body_releases_the_blob() {
    let Big {
        _dir,
        s,
        layer,
        path,
        mut stream,
        ..
    } = big(&["--sendfile"]).await;
    send(&mut stream, "GET", &path, "").await;
    let (status, _) = read_head(&mut stream).await;
    assert_eq!(status, 200);
    read_body(&mut stream, 1 << 20).await;
    assert!(s.builder.blobs().in_use(), "the blob is being sent");
    drop(stream);
    until_nothing_is_sent(&s).await;

    common::get_blob(&Client::new(), &s, &layer).await;
    s.stop().await;
}

/// A slow reader gets every byte as long as bytes move; one that stops
/// reading is cut off after the idle timeout, and the blob is released.
#[tokio::test]
async fn slow_clients_are_served_and_stalled_ones_cut_off() {
    let Big {
        _dir,
        s,
        file,
        path,
        mut stream,
        ..
    } = big(&["--sendfile", "--idle-timeout", "2"]).await;

    // Slow: 64 KiB every 10 ms, across a window's end.
    let (a, b) = (WINDOW - (1 << 20), WINDOW + (2 << 20) - 1);
    send(
        &mut stream,
        "GET",
        &path,
        &format!("Range: bytes={a}-{b}\r\n"),
    )
    .await;
    let (status, _) = read_head(&mut stream).await;
    assert_eq!(status, 206);
    let mut body = Vec::new();
    while (body.len() as u64) < b - a + 1 {
        let mut piece = vec![0u8; 64 * 1024];
        let n = stream.read(&mut piece).await.unwrap();
        assert!(n > 0, "closed after {} bytes", body.len());
        body.extend_from_slice(&piece[..n]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(body[..] == file[a as usize..=b as usize]);
    drop(stream);

    // Stalled: reads the headers, then nothing.
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    send(&mut stream, "GET", &path, "").await;
    let (status, _) = read_head(&mut stream).await;
    assert_eq!(status, 200);
    until_nothing_is_sent(&s).await;
    let mut rest = Vec::new();
    // The server has closed: what was in flight, then the end (or a
    // reset, which ends the read as well).
    let _ = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest))
        .await
        .expect("the server closed the connection");
    assert!(
        (rest.len() as u64) < file.len() as u64,
        "cut off before the end: {} of {}",
        rest.len(),
        file.len()
    );
    s.stop().await;
}
