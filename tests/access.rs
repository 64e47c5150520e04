//! Secrets and access on a shared LAN: credentials in a source URL never
//! leave the process, htpasswd authentication works with `docker login`,
//! and clients that hold connections open cannot starve the others.

mod common;

use common::binary::{docker, run, Binary};
use common::files_containing;
use common::{error_code, fresh_server, require_tool};
use reqwest::StatusCode;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "S3cretTok3nXyZ";

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn text(url: String) -> (StatusCode, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn credentials_in_a_source_url_never_leave_the_process() {
    require_tool("git");
    let port = closed_port();
    let sources = [
        (
            "NIXERY_PKGS_REPO",
            format!("http://nixuser:{SECRET}@127.0.0.1:{port}/repo.git"),
        ),
        (
            "NIXERY_CHANNEL",
            format!(
                "http://nixuser:{SECRET}@127.0.0.1:{port}/nixpkgs.tar.gz?access_token={SECRET}"
            ),
        ),
    ];
    for (variable, url) in sources {
        let logs = tempfile::NamedTempFile::new().unwrap();
        let log_file = logs.reopen().unwrap();
        let mut server = Binary::start_with(|cmd| {
            cmd.env_remove("NIXERY_PKGS_PATH")
                .env(variable, &url)
                .env("RUST_LOG", "nixery=debug,info")
                .env("NIXERY_NIX_OPTIONS", "substituters=;download-attempts=1")
                .stderr(Stdio::from(log_file));
        });
        let (status, body) = text(server.url("/v2/hello/manifests/latest")).await;
        assert!(!status.is_success(), "{variable}: {status} {body}");
        assert!(!body.contains(SECRET), "{variable}: client error: {body}");

        let (_, status_json) = text(server.url("/api/status")).await;
        assert!(
            status_json.contains("***@127.0.0.1"),
            "{variable}: the source is shown: {status_json}"
        );
        assert!(
            status_json.contains("\"errors\":[{"),
            "{variable}: the failure is recorded: {status_json}"
        );
        for path in ["/api/status", "/", "/metrics"] {
            let (_, body) = text(server.url(path)).await;
            assert!(
                !body.contains(SECRET),
                "{variable}: {path} shows the secret"
            );
        }
        let _ = server.child.kill();
        let _ = server.child.wait();
        let storage = server.storage();
        let log = std::fs::read_to_string(logs.path()).unwrap();
        assert!(log.contains("***@127.0.0.1"), "{variable}: {log}");
        assert!(
            !log.contains(SECRET),
            "{variable}: the log shows the secret:\n{log}"
        );
        assert_eq!(
            files_containing(storage, SECRET.as_bytes()),
            Vec::<String>::new(),
            "{variable}: stored"
        );

        let check = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(["check-config", "--storage-path", "/tmp"])
            .env(variable, &url)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(check.status.success(), "{out}");
        assert!(
            out.contains("***@127.0.0.1") && !out.contains(SECRET),
            "{out}"
        );
    }
}

/// An htpasswd file with bcrypt entries, written by `htpasswd -B`.
fn htpasswd(file: &Path, user: &str, password: &str, create: bool) {
    require_tool("htpasswd");
    let flags = if create { "-cbB" } else { "-bB" };
    run(Command::new("htpasswd")
        .args([flags, "-C", "5"])
        .arg(file)
        .args([user, password]));
}

fn login(config: &Path, registry: &str, user: &str, password: &str) -> bool {
    let mut child = Command::new("docker")
        .arg("--config")
        .arg(config)
        .args(["login", registry, "-u", user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(password.as_bytes()).unwrap();
    drop(stdin);
    child.wait().unwrap().success()
}

#[tokio::test]
async fn docker_login_and_pull_with_an_htpasswd_file() {
    require_tool("docker");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("htpasswd");
    htpasswd(&file, "alice", "wonderland", true);
    let server = Binary::start_with(|cmd| {
        cmd.env("NIXERY_HTPASSWD", &file);
    });
    let c = reqwest::Client::new();
    for path in [
        "/v2/",
        "/v2/hello/manifests/latest",
        "/",
        "/api/status",
        "/metrics",
    ] {
        let r = c.get(server.url(path)).send().await.unwrap();
        assert_eq!(
            r.headers()["www-authenticate"],
            "Basic realm=\"nixery\"",
            "{path}"
        );
        let (status, e) = error_code(r).await;
        assert_eq!(
            (status, e["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED")),
            "{path}"
        );
    }
    let basic = |user: &str, password: &str| {
        c.get(server.url("/v2/"))
            .basic_auth(user, Some(password))
            .send()
    };
    assert_eq!(basic("alice", "wrong").await.unwrap().status(), 401);
    assert_eq!(basic("mallory", "wonderland").await.unwrap().status(), 401);
    assert_eq!(basic("alice", "wonderland").await.unwrap().status(), 200);

    let registry = format!("localhost:{}", server.port);
    let config = work.path().join("docker");
    assert!(
        !login(&config, &registry, "alice", "wrong"),
        "wrong password"
    );
    assert!(login(&config, &registry, "alice", "wonderland"));
    let image = server.image("hello");
    docker(&["--config", config.to_str().unwrap(), "pull", &image]);
    let out = docker(&["run", "--rm", "--network", "none", &image, "hello"]);
    assert_eq!(out.trim(), "Hello, world!");
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();

    // A user added to the file can log in without a restart.
    htpasswd(&file, "bob", "builder", false);
    let deadline = Instant::now() + Duration::from_secs(15);
    while basic("bob", "builder").await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "the file was not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metrics_can_stay_public() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("htpasswd");
    htpasswd(&file, "alice", "wonderland", true);
    let (_dir, s) = fresh_server(&["--htpasswd", file.to_str().unwrap(), "--metrics-public"]).await;
    let (status, _) = text(s.url("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = text(s.url("/api/status")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    s.stop().await;
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_cannot_starve_others() {
    const MAX_CONNECTIONS: usize = 200;
    const CLIENTS: usize = 3000;
    let server = Binary::start_with(|cmd| {
        cmd.env("NIXERY_MAX_CONNECTIONS", MAX_CONNECTIONS.to_string())
            .env("NIXERY_HEADER_TIMEOUT", "1")
            .env("NIXERY_IDLE_TIMEOUT", "2");
    });
    let pid = server.child.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let baseline = open_fds(pid);
    // Half send the start of a request and stop, half send nothing; all
    // hold their socket open for a while.
    let mut holders = Vec::new();
    for i in 0..CLIENTS {
        holders.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let connect = tokio::net::TcpStream::connect(addr);
            let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(30), connect).await
            else {
                return;
            };
            if i % 2 == 0 {
                let _ = stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await;
            }
            tokio::time::sleep(Duration::from_secs(40)).await;
            drop(stream);
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(server.url("/v2/"))
        .send()
        .await
        .expect("a normal request is answered while thousands of clients stall");
    assert_eq!(r.status(), StatusCode::OK);
    let fds = open_fds(pid);
    println!(
        "{CLIENTS} stalled clients, max {MAX_CONNECTIONS} connections: a normal request took {:?}; server fds {baseline} -> {fds}",
        started.elapsed()
    );
    assert!(
        fds <= baseline + MAX_CONNECTIONS + 16,
        "the server holds {fds} file descriptors"
    );
    for h in holders {
        h.abort();
    }
    let r = reqwest::get(server.url("/v2/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn check_config_reads_the_htpasswd_file() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("htpasswd");
    std::fs::write(&file, "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n").unwrap();
    let check = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(["check-config", "--channel", "c", "--storage-path"])
            .arg(work.path().join("storage"))
            .arg("--htpasswd")
            .arg(file)
            .output()
            .unwrap()
    };
    let out = check(&file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only bcrypt entries"), "{stderr}");
    htpasswd(&file, "alice", "wonderland", true);
    let out = check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
