//! No setting's password ever leaves the process. The settings are read
//! from the configuration type itself, so a flag added later is covered
//! without editing this test: each flag that takes a value is set to a URL
//! with `user:SECRET@` (or `name=URL`, for `NAME=VALUE` flags), and SECRET
//! must appear in none of `check-config`'s output, `/`, `/api/status`,
//! `/metrics`, the log, an error answer, or the files under the storage
//! path (build and error records).

mod common;

use clap::Args;
use common::{files_containing, require_tool};
use nixery::config::ServeArgs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "Zq9SeCrEt4711";

/// An HTTP server that answers every request with `200 {}`: each secret URL
/// leads somewhere that answers (a popularity file must load for `serve`
/// to start), and what asks it gets an answer it cannot use.
fn answering_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            });
        }
    });
    port
}

/// The long names of every `serve` flag that takes a value.
fn value_flags() -> Vec<String> {
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    command
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// A set of flags: the base's, with later ones replacing earlier ones.
fn with(base: &[(String, String)], more: &[(String, String)]) -> Vec<String> {
    let mut merged: Vec<(String, String)> = Vec::new();
    for (flag, value) in base.iter().chain(more) {
        merged.retain(|(f, _)| f != flag);
        merged.push((flag.clone(), value.clone()));
    }
    merged.into_iter().flat_map(|(f, v)| [f, v]).collect()
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} shows the secret:\n{text}");
}

/// `check-config` with `args`; true when it accepts them. Its output
/// never holds the secret either way.
fn check_config(args: &[String], offline: bool) -> bool {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.arg("check-config");
    if offline {
        cmd.arg("--no-filesystem-checks");
    }
    let out = cmd.args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_no_secret(&format!("check-config {args:?}"), &text);
    out.status.success()
}

fn get(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "300"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `serve` with `args`: its port once it listens, or None when it exited
/// at start (its log is checked by the caller either way).
fn serve(args: &[String], log: &Path) -> (Child, Option<u16>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .args(["--port", "0", "--listen-address", "127.0.0.1"])
        .args(args)
        .env("RUST_LOG", "nixery=debug,info")
        .env("NIX_TIMEOUT", "120")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok());
    (child, port)
}

/// Serves `flags` on top of `base`, asks for everything that can show a
/// setting, and checks that none shows the secret. False when the server
/// would not start with them (its output checked all the same).
fn served_without_secret(base: &[(String, String)], flags: &[(String, String)]) -> bool {
    let storage = tempfile::tempdir().unwrap();
    let base: Vec<(String, String)> = base
        .iter()
        .cloned()
        .chain([(
            "--storage-path".to_owned(),
            storage.path().join("data").display().to_string(),
        )])
        .collect();
    let args = with(&base, flags);
    let log = storage.path().join("log");
    let (mut child, port) = serve(&args, &log);
    let Some(port) = port else {
        let _ = child.wait();
        assert_no_secret(
            &format!("serve {args:?} (at start)"),
            &std::fs::read_to_string(&log).unwrap(),
        );
        return false;
    };
    let mut answers = vec![
        ("a pull", get(port, "/v2/hello/manifests/latest")),
        (
            "a pull by digest",
            get(port, &format!("/v2/hello/blobs/sha256:{}", "0".repeat(64))),
        ),
    ];
    for path in ["/", "/api/status", "/metrics"] {
        answers.push((path, get(port, path)));
    }
    let status = get(port, "/api/status");
    let _ = child.kill();
    let _ = child.wait();
    for (what, body) in answers {
        assert_no_secret(&format!("{what} with {args:?}"), &body);
    }
    assert!(status.contains("\"builds\""), "{status}");
    assert_no_secret(
        &format!("the log of {args:?}"),
        &std::fs::read_to_string(&log).unwrap(),
    );
    assert_eq!(
        files_containing(&storage.path().join("data"), SECRET.as_bytes()),
        Vec::<String>::new(),
        "stored with {args:?}"
    );
    true
}

#[test]
fn no_setting_shows_its_password_anywhere() {
    require_tool("curl");
    require_tool("git");
    require_tool("nix-instantiate");
    let port = answering_server();
    let url = format!("http://user:{SECRET}@127.0.0.1:{port}/x?access_token={SECRET}");
    let storage = "/tmp/nixery-redaction-check".to_owned();
    let filesystem = vec![("--storage-path".to_owned(), storage.clone())];
    let s3 = vec![
        ("--storage-path".to_owned(), storage),
        ("--storage-backend".to_owned(), "s3".to_owned()),
        ("--s3-bucket".to_owned(), "bucket".to_owned()),
    ];
    let candidates = [url.clone(), format!("option={url}")];

    // Every flag, every form, on both backends: check-config never shows
    // it. Note which settings each backend accepts.
    let mut accepted: Vec<(usize, (String, String))> = Vec::new();
    for flag in value_flags() {
        for (b, base) in [&filesystem, &s3].into_iter().enumerate() {
            let mut taken = false;
            for value in &candidates {
                let set = [(flag.clone(), value.clone())];
                check_config(&with(base, &set), false);
                if check_config(&with(base, &set), true) && !taken {
                    accepted.push((b, set[0].clone()));
                    taken = true;
                }
            }
        }
    }
    let names: Vec<&str> = accepted.iter().map(|(_, (f, _))| f.as_str()).collect();
    for url_setting in [
        "--channel",
        "--pkgs-repo",
        "--flake",
        "--popularity-url",
        "--s3-endpoint",
        "--nix-option",
    ] {
        assert!(
            names.contains(&url_setting),
            "{url_setting} takes a URL but was not tried: {names:?}"
        );
    }

    // Serve them, as many at once as check-config accepts together; a set
    // that does not start is tried again a flag at a time.
    let bases = [&filesystem, &s3];
    let mut groups: Vec<(usize, Vec<(String, String)>)> = Vec::new();
    for (b, setting) in accepted {
        let fits = groups.iter_mut().find(|(gb, group)| {
            *gb == b && {
                let mut more = group.clone();
                more.push(setting.clone());
                check_config(&with(bases[b], &more), true)
            }
        });
        match fits {
            Some((_, group)) => group.push(setting),
            None => groups.push((b, vec![setting])),
        }
    }
    let started = Instant::now();
    let mut served = Vec::new();
    let mut runs = 0;
    while let Some((b, group)) = groups.pop() {
        runs += 1;
        if served_without_secret(bases[b], &group) {
            served.extend(group.into_iter().map(|(f, _)| (b, f)));
        } else if group.len() > 1 {
            groups.extend(group.into_iter().map(|s| (b, vec![s])));
        }
    }
    for (b, url_setting) in [
        (0, "--channel"),
        (0, "--pkgs-repo"),
        (0, "--popularity-url"),
        (1, "--s3-endpoint"),
    ] {
        assert!(
            served.iter().any(|(sb, f)| *sb == b && f == url_setting),
            "{url_setting} was never served: {served:?}"
        );
    }
    eprintln!(
        "{runs} servers with {} settings in {:?}: {served:?}",
        served.len(),
        started.elapsed()
    );
}

/// The commands that work on the storage without a server print their
/// own errors: an s3 endpoint with a password that answers nonsense must
/// not show up in them.
#[test]
fn offline_commands_do_not_show_the_endpoint_password() {
    let port = answering_server();
    let endpoint = format!("http://user:{SECRET}@127.0.0.1:{port}/x");
    let storage = tempfile::tempdir().unwrap();
    for command in [
        vec!["verify"],
        vec!["gc"],
        vec!["import", "/nonexistent/layout"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(&command)
            .arg("--storage-path")
            .arg(storage.path())
            .args(["--storage-backend", "s3", "--s3-bucket", "bucket"])
            .args(["--s3-endpoint", &endpoint])
            .env("AWS_ACCESS_KEY_ID", "id")
            .env("AWS_SECRET_ACCESS_KEY", "key")
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command:?} succeeded:\n{text}");
        assert_no_secret(&format!("{command:?}"), &text);
    }
}
