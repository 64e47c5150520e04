//! What an attacker or an unlucky operator does: methods and paths the
//! registry does not serve, absurd Range headers, damaged blobs, and
//! thousands of malformed requests.

mod common;

use common::binary::Binary;
use common::{blob_path, error_code, fresh_server, get_blob, get_manifest, header, layer_digests};
use nixery::digest::Digest;
use reqwest::{Client, Method, StatusCode};
use std::os::unix::fs::PermissionsExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn every_error_has_the_json_body() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    for method in [Method::POST, Method::DELETE, Method::OPTIONS, Method::PUT] {
        for path in [
            "/v2/",
            "/v2",
            "/v2/hello/manifests/latest",
            "/",
            "/api/status",
        ] {
            let r = c.request(method.clone(), s.url(path)).send().await.unwrap();
            let (status, e) = error_code(r).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(e["code"], "UNSUPPORTED", "{method} {path}");
        }
    }
    for path in [
        "/v2/%FF/manifests/latest",
        "/v2/hello/manifests/%C3%28",
        "/v2/hello/tags/list?n=%FF",
    ] {
        let r = c.get(s.url(path)).send().await.unwrap();
        let (status, _) = error_code(r).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn range_arithmetic_saturates() {
    let (_dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (_, manifest) = get_manifest(&c, &s, "hello", "latest").await;
    let layer = &layer_digests(&manifest)[0];
    let whole = get_blob(&c, &s, layer).await;
    assert!(whole.len() > 100);
    let get = |range: &'static str| {
        c.get(s.url(&format!("/v2/hello/blobs/{layer}")))
            .header("range", range)
            .send()
    };
    let r = get("bytes=100-18446744073709551615").await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 100-{}/{}", whole.len() - 1, whole.len())
    );
    assert_eq!(r.bytes().await.unwrap(), whole[100..]);
    let r = get("bytes=0-18446744073709551615").await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), whole[..]);
    let r = get("bytes=18446744073709551615-18446744073709551615")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    s.stop().await;
}

#[tokio::test]
async fn an_image_whose_blobs_are_missing_or_short_is_rebuilt() {
    let (dir, s) = fresh_server(&[]).await;
    let c = Client::new();
    let (first, manifest) = get_manifest(&c, &s, "bash", "latest").await;
    let layers = layer_digests(&manifest);
    assert!(layers.len() >= 2, "{manifest}");
    // One layer deleted, one cut short, as a full disk or a careless
    // operator would leave them.
    std::fs::remove_file(blob_path(dir.path(), &layers[0])).unwrap();
    let short = blob_path(dir.path(), &layers[1]);
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o644)).unwrap();
    let len = std::fs::metadata(&short).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // A warm manifest is served from memory and its blobs checked on disk
    // again after this long.
    tokio::time::sleep(
        nixery::build::hot::REVALIDATE_AFTER + std::time::Duration::from_millis(100),
    )
    .await;

    let (again, manifest) = get_manifest(&c, &s, "bash", "latest").await;
    assert_eq!(again, first, "the same content gives the same manifest");
    for layer in layer_digests(&manifest) {
        get_blob(&c, &s, &layer).await;
    }
    get_blob(&c, &s, manifest["config"]["digest"].as_str().unwrap()).await;
    let builds = s.builder.db().builds().unwrap();
    assert_eq!(builds.len(), 2, "the damaged image was built again");
    s.stop().await;
}

/// Manifest digests of images pulled from a binary server, checking that
/// every blob they name is served whole.
async fn pull_all(server: &Binary, images: &[&str]) -> Vec<String> {
    let c = Client::new();
    let mut digests = Vec::new();
    for image in images {
        let r = c
            .get(server.url(&format!("/v2/{image}/manifests/latest")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{image}");
        let digest = header(&r, "docker-content-digest").to_owned();
        let manifest: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let mut blobs = layer_digests(&manifest);
        blobs.push(manifest["config"]["digest"].as_str().unwrap().to_owned());
        for blob in blobs {
            let bytes = c
                .get(server.url(&format!("/v2/{image}/blobs/{blob}")))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(Digest::of(&bytes).to_string(), blob);
        }
        digests.push(digest);
    }
    digests
}

#[tokio::test]
async fn a_damaged_database_is_reported_and_the_server_serves() {
    let images = ["hello", "bash", "coreutils"];
    let server = Binary::start();
    let before = pull_all(&server, &images).await;
    let storage = server.stop();
    let db = storage.path().join("db");
    // One flipped byte a third into sled's log, and a damaged conf file.
    let mut log = std::fs::read(db.join("db")).unwrap();
    let at = log.len() / 3;
    log[at] ^= 0x10;
    std::fs::write(db.join("db"), log).unwrap();
    let mut conf = std::fs::read(db.join("conf")).unwrap();
    conf[2] = 0xff;
    std::fs::write(db.join("conf"), conf).unwrap();

    let logs = tempfile::NamedTempFile::new().unwrap();
    let log_file = logs.reopen().unwrap();
    let server = Binary::start_on(storage, |cmd| {
        cmd.stderr(std::process::Stdio::from(log_file));
    });
    assert_eq!(pull_all(&server, &images).await, before);
    drop(server);
    let log = std::fs::read_to_string(logs.path()).unwrap();
    assert!(log.contains("sled conf file could not be read"), "{log}");
    assert!(log.contains("the database lacks images"), "{log}");
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn junk(&mut self, max: usize) -> String {
        const PIECES: [&str; 22] = [
            "a", "Z", "0", "-", "_", "__", ".", "..", "/", "//", "%", "%FF", "%00", "%2F",
            "%C3%28", ":", "sha256:", "é", "?", "#", "~", "@",
        ];
        let n = self.below(max + 1);
        (0..n).map(|_| self.pick(&PIECES)).collect()
    }

    /// A name that never passes validation, so no request starts a build.
    fn bad_name(&mut self) -> String {
        format!("{}Z{}", self.junk(4), self.junk(4))
    }

    fn path(&mut self) -> String {
        let digest_like = format!("sha256:{}", "ab".repeat(self.below(40)));
        match self.below(9) {
            0 => format!("/v2/{}/manifests/{}", self.bad_name(), self.junk(8)),
            1 => format!("/v2/hello/manifests/{digest_like}{}", self.junk(2)),
            2 => format!("/v2/hello/blobs/{digest_like}{}", self.junk(3)),
            3 => format!("/v2/{}/blobs/{}", self.junk(6), self.junk(6)),
            4 => format!(
                "/v2/hello/tags/list?n={}&last={}",
                self.junk(3),
                self.junk(3)
            ),
            5 => format!("/{}", self.junk(10)),
            6 => format!("/v2/{}", "a/".repeat(self.below(3000))),
            7 => format!("/api/status?{}", self.junk(5)),
            _ => format!("/v2/{}/tags/list", self.bad_name()),
        }
    }

    fn request(&mut self) -> Vec<u8> {
        if self.below(20) == 0 {
            return (0..self.below(300)).map(|_| self.next() as u8).collect();
        }
        let method = self.pick(&[
            "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
            "CONNECT", "G\u{0}T", "BREW", "get",
        ]);
        let version = self.pick(&[
            "HTTP/1.1",
            "HTTP/1.1",
            "HTTP/1.0",
            "HTTP/9.9",
            "",
            "HTTP/1.1 x",
        ]);
        let mut req = format!("{method} {} {version}\r\nHost: x\r\n", self.path());
        for _ in 0..self.below(4) {
            let h = match self.below(8) {
                0 => format!(
                    "Range: {}",
                    self.pick(&[
                        "bytes=",
                        "bytes=-",
                        "bytes=1-0",
                        "bytes=18446744073709551615-",
                        "bytes=0-18446744073709551616",
                        "bytes=--1",
                        "bytes=1-2,3-4",
                        "lines=1-2"
                    ])
                ),
                1 => format!("Authorization: Basic {}", self.junk(6)),
                2 => format!(
                    "Content-Length: {}",
                    self.pick(&["0", "-1", "99999999999999999999", "abc", "5"])
                ),
                3 => "Transfer-Encoding: chunked".to_owned(),
                4 => format!("Accept: {}", self.junk(6)),
                5 => format!("X-{}: {}", self.below(100), "v".repeat(self.below(20_000))),
                6 => format!("{}: {}", self.junk(3), self.junk(3)),
                _ => "Connection: close".to_owned(),
            };
            req.push_str(&h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        let body_len = self.below(3) * 7;
        bytes.extend((0..body_len).map(|_| self.next() as u8));
        bytes
    }
}

/// Sends one request on a new connection; the status code, if any came.
async fn send_raw(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut head = [0u8; 12];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut got = 0;
        while got < head.len() {
            match stream.read(&mut head[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    })
    .await
    .expect("the server answers or closes within 30 s");
    let line = std::str::from_utf8(&head[..read]).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

#[tokio::test]
async fn thousands_of_malformed_requests_get_no_5xx() {
    let (_dir, s) = fresh_server(&[]).await;
    let mut rng = Rng(0x5eed_8a8a_1234_5678);
    const REQUESTS: usize = 3000;
    let requests: Vec<Vec<u8>> = (0..REQUESTS).map(|_| rng.request()).collect();
    let mut answered = 0;
    let mut server_errors = Vec::new();
    for chunk in requests.chunks(50) {
        let results = futures::future::join_all(chunk.iter().map(|r| send_raw(s.addr, r))).await;
        for (status, request) in results.into_iter().zip(chunk) {
            if let Some(code) = status {
                answered += 1;
                if code >= 500 {
                    server_errors.push((code, String::from_utf8_lossy(request).into_owned()));
                }
            }
        }
    }
    println!(
        "malformed requests sent: {REQUESTS}, answered: {answered}, 5xx: {}",
        server_errors.len()
    );
    assert!(server_errors.is_empty(), "{server_errors:#?}");
    assert!(answered > REQUESTS / 2, "most requests get an answer");
    // Still alive and serving.
    let r = Client::new().get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = Client::new()
        .get(s.url("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}
