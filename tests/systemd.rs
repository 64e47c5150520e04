//! The binary as systemd runs it: `Type=notify` readiness and stopping, and
//! `check-config` as the NixOS module runs it at build time.

mod common;

use common::fixture_dir;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    // A signal to the test process (another test's child exiting) may
    // interrupt the wait: that is not a timeout.
    let len = loop {
        match socket.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other.expect("a notification before the timeout"),
        }
    };
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("port answers");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn notifies_ready_once_listening_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("PORT", "0")
        .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
        .env("NIXERY_PKGS_PATH", fixture_dir())
        .env("STORAGE_PATH", dir.path().join("storage"))
        .env("NIXERY_NIX_OPTIONS", "substituters=")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nixery starts");

    let ready = recv(&socket);
    let mut lines = ready.lines();
    assert_eq!(lines.next(), Some("READY=1"), "{ready:?}");
    // The status names the bound address, so the port is known without
    // reading stdout: readiness means the listener exists.
    let port: u16 = lines
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
    let answer = http_get(port, "/v2/");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let pid = i32::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(recv(&socket), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nixery did not exit within 30s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

fn check_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.arg("check-config").args(args);
    // Only what the test gives: a developer's own NIXERY_* must not leak in.
    for var in [
        "PORT",
        "NIXERY_LISTEN_ADDRESS",
        "NIXERY_CHANNEL",
        "NIXERY_PKGS_REPO",
        "NIXERY_PKGS_PATH",
        "NIXERY_STORAGE_BACKEND",
        "STORAGE_PATH",
        "NIX_TIMEOUT",
        "NIX_POPULARITY_URL",
        "NIXERY_MAX_BUILDS",
        "NIXERY_NIX_OPTIONS",
        "NIXERY_LAYER_BUDGET",
        "NIXERY_LAYERING",
        "NIXERY_CACHE_TTL",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("nixery runs")
}

#[test]
fn check_config_accepts_a_good_configuration_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let fixtures = fixture_dir();
    let out = check_config(
        &[],
        &[
            ("NIXERY_PKGS_PATH", fixtures.to_str().unwrap()),
            ("STORAGE_PATH", storage.to_str().unwrap()),
            ("PORT", "5000"),
            ("NIXERY_MAX_BUILDS", "3"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.starts_with("configuration OK\n"), "{stdout}");
    assert!(stdout.contains("0.0.0.0:5000"), "{stdout}");
    assert!(stdout.contains("3 at once"), "{stdout}");
    // Checking has no side effects: the storage directory is not created.
    assert!(!storage.exists());
}

#[test]
fn check_config_accepts_a_mirror_with_no_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_config(&["--storage-path", dir.path().to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("source:  mirror (no package source)"),
        "{stdout}"
    );
}

#[test]
fn check_config_rejects_a_bad_configuration_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--storage-path", d, "--channel", "a", "--pkgs-repo", "b"],
            "more than one package source",
        ),
        (
            &["--storage-path", d, "--pkgs-path", "/no/such/pkgs"],
            "--pkgs-path (NIXERY_PKGS_PATH) \"/no/such/pkgs\" is not a readable directory",
        ),
        (
            &["--storage-path", d, "--channel", "a", "--layer-budget", "0"],
            "--layer-budget (NIXERY_LAYER_BUDGET) must be between 1 and 124",
        ),
        (
            &[
                "--no-filesystem-checks",
                "--storage-path",
                "relative",
                "--channel",
                "a",
            ],
            "--storage-path (STORAGE_PATH) \"relative\" must be an absolute path",
        ),
    ];
    for (args, want) in cases {
        let out = check_config(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("nixery: invalid configuration: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn check_config_without_filesystem_checks_accepts_paths_of_another_machine() {
    let out = check_config(
        &[
            "--no-filesystem-checks",
            "--pkgs-path",
            "/srv/nixery/pkgs",
            "--storage-path",
            "/var/lib/nixery",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.starts_with("configuration OK (files not checked)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("path:/srv/nixery/pkgs"), "{stdout}");
}
