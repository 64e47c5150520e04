//! The Nix wrappers against real Nix and the offline fixture package set.
//! Needs nix-instantiate, nix-store and nix on PATH (no skipping).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixery::build::nix::{Nix, NixError, Resolved, Stage};
use nixery::build::realise::{Session, Wanted};
use nixery::build::store_path::{name_of, PathInfo};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pkgs");
const PREPARE_IMAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nix/prepare-image.nix");

fn nix(timeout: Duration) -> Nix {
    for tool in ["nix-instantiate", "nix-store", "nix"] {
        if let Err(err) = std::process::Command::new(tool).arg("--version").output() {
            panic!("these tests need Nix: could not run `{tool} --version`: {err}");
        }
    }
    Nix::new(
        PathBuf::from(PREPARE_IMAGE),
        timeout,
        // No binary cache is reachable in tests; never wait on one.
        vec![("substituters".into(), String::new())],
    )
}

async fn resolve(nix: &Nix, names: &[&str]) -> Result<Resolved, NixError> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    nix.resolve("path", FIXTURE, "x86_64-linux", &names).await
}

fn wanted(resolved: &Resolved) -> Vec<Wanted> {
    resolved
        .found
        .values()
        .map(|p| Wanted {
            drv_path: p.drv_path.clone(),
            out_path: p.out_path.clone(),
        })
        .collect()
}

/// Realises the packages in one session, rooted at `root`, and returns
/// their closure.
async fn realise(
    nix: &Nix,
    resolved: &Resolved,
    root: &std::path::Path,
) -> Result<Vec<PathInfo>, NixError> {
    let outs: Vec<String> = resolved
        .found
        .values()
        .map(|p| p.out_path.clone())
        .collect();
    let session = Session::open(nix).await?;
    let session = session.realise(nix, &wanted(resolved), root).await?;
    session.closure(nix, &outs).await
}

/// Resolves, builds and returns the out path of one fixture package.
async fn build(nix: &Nix, name: &str) -> String {
    let resolved = resolve(nix, &[name]).await.unwrap();
    let roots = tempfile::tempdir().unwrap();
    realise(nix, &resolved, &roots.path().join("r"))
        .await
        .unwrap();
    resolved.found[name].out_path.clone()
}

/// The GC roots Nix knows for a store path.
fn roots_of(path: &str) -> String {
    let out = std::process::Command::new("nix-store")
        .args(["--query", "--roots", path])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn realised_outputs_are_rooted_until_the_link_goes() {
    let nix = nix(Duration::from_secs(120));
    let resolved = resolve(&nix, &["hello", "coreutils"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("build").join("out");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let session = Session::open(&nix).await.unwrap();
    assert!(session.started_a_process(), "nix-daemon --stdio");
    drop(session);
    realise(&nix, &resolved, &root).await.unwrap();
    // Again on the same links, as a rebuild of the same image does.
    realise(&nix, &resolved, &root).await.unwrap();
    for pkg in resolved.found.values() {
        let roots = roots_of(&pkg.out_path);
        assert!(
            roots.contains(&dir.path().join("build").display().to_string()),
            "{} not rooted: {roots}",
            pkg.out_path
        );
    }
    std::fs::remove_dir_all(dir.path().join("build")).unwrap();
    for pkg in resolved.found.values() {
        let roots = roots_of(&pkg.out_path);
        assert!(
            !roots.contains(&dir.path().display().to_string()),
            "still rooted: {roots}"
        );
    }
}

#[tokio::test]
async fn resolve_applies_the_lookup_rules() {
    let nix = nix(Duration::from_secs(120));
    let resolved = resolve(
        &nix,
        &[
            "hello",
            "bashinteractive",
            "tools.xev",
            "1password",
            "nosuchpkg",
            "tools",
        ],
    )
    .await
    .unwrap();

    let name = |n: &str| name_of(&resolved.found[n].out_path).to_string();
    assert_eq!(name("hello"), "hello-2.10");
    assert_eq!(name("bashinteractive"), "bash-interactive-5.2.15");
    assert_eq!(name("tools.xev"), "xev-1.2.5");
    assert_eq!(name("1password"), "1password-cli-2.24.0");
    for pkg in resolved.found.values() {
        assert!(pkg.drv_path.starts_with("/nix/store/"), "{pkg:?}");
        assert!(pkg.drv_path.ends_with(".drv"), "{pkg:?}");
    }
    let mut not_found = resolved.not_found.clone();
    not_found.sort();
    assert_eq!(not_found, ["nosuchpkg", "tools"]);
}

#[tokio::test]
async fn resolve_does_not_evaluate_other_packages() {
    // The fixture's `evalError` throws when evaluated.
    let nix = nix(Duration::from_secs(120));
    let resolved = resolve(&nix, &["hello", "nosuchpkg"]).await.unwrap();
    assert!(resolved.found.contains_key("hello"));

    match resolve(&nix, &["evalError"]).await {
        Err(err @ NixError::Failed { .. }) => {
            let tail = err.stderr_tail(5).unwrap();
            assert!(tail.contains("evalError was evaluated"), "{tail}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn package_names_are_never_nix_code() {
    let nix = nix(Duration::from_secs(120));
    let names = [
        r#"${builtins.abort "x"}"#,
        r#"a"b"#,
        r#"hello" + "x"#,
        "''",
        "\\",
        "",
        ".",
    ];
    let resolved = resolve(&nix, &names).await.unwrap();
    assert!(resolved.found.is_empty(), "{resolved:?}");
    let mut not_found = resolved.not_found.clone();
    not_found.sort();
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(not_found, expected);
}

#[tokio::test]
async fn closure_of_hello_contains_glibc() {
    let nix = nix(Duration::from_secs(300));
    let hello = build(&nix, "hello").await;
    let closure = nix.closure(std::slice::from_ref(&hello)).await.unwrap();

    let glibc = closure
        .iter()
        .find(|p| name_of(&p.path) == "glibc-2.36")
        .unwrap_or_else(|| panic!("no glibc in {closure:?}"));
    assert!(glibc.nar_size > 0);
    let hello_info = closure.iter().find(|p| p.path == hello).unwrap();
    assert!(hello_info.nar_size > 0);
    assert!(
        hello_info.references.contains(&glibc.path),
        "{hello_info:?}"
    );
}

#[tokio::test]
async fn closure_of_manydeps_is_large() {
    let nix = nix(Duration::from_secs(600));
    let manydeps = build(&nix, "manydeps").await;
    let closure = nix.closure(&[manydeps]).await.unwrap();
    assert!(closure.len() > 100, "only {} paths", closure.len());
}

#[tokio::test]
async fn the_session_reads_the_closure_nix_path_info_reports() {
    let nix = nix(Duration::from_secs(600));
    let resolved = resolve(&nix, &["manydeps", "hello"]).await.unwrap();
    let roots = tempfile::tempdir().unwrap();
    let from_session = realise(&nix, &resolved, &roots.path().join("r"))
        .await
        .unwrap();
    let outs: Vec<String> = resolved
        .found
        .values()
        .map(|p| p.out_path.clone())
        .collect();
    let from_path_info = nix.closure(&outs).await.unwrap();
    assert!(from_session.len() > 100);
    assert_eq!(from_session, from_path_info);
}

#[tokio::test]
async fn closure_of_an_unbuilt_path_is_an_error() {
    let nix = nix(Duration::from_secs(120));
    let path = "/nix/store/00000000000000000000000000000000-not-there-1.0".to_string();
    let err = nix.closure(&[path]).await.unwrap_err();
    assert!(
        matches!(
            err,
            NixError::Failed {
                stage: Stage::Closure,
                ..
            } | NixError::InvalidPath { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn broken_build_keeps_the_builder_message() {
    let nix = nix(Duration::from_secs(120));
    let resolved = resolve(&nix, &["broken"]).await.unwrap();
    let roots = tempfile::tempdir().unwrap();
    let err = realise(&nix, &resolved, &roots.path().join("r"))
        .await
        .unwrap_err();
    match &err {
        NixError::Daemon {
            stage: Stage::Realise,
            log,
        } => {
            assert!(
                log.contains("nixery-fixture: this package is broken on purpose"),
                "{log}"
            );
            assert!(log.contains("failed with exit code"), "{log}");
            assert!(!log.contains('\u{1b}'), "colours left in {log:?}");
        }
        other => panic!("expected Daemon, got {other:?}"),
    }
}

#[tokio::test]
async fn slow_build_times_out() {
    let nix = nix(Duration::from_secs(2));
    let resolved = resolve(&nix, &["slow"]).await.unwrap();
    assert_times_out(&nix, &resolved).await;
}

/// Realising `resolved` (the `slow` package) with a 2 s timeout is a
/// timeout, in time.
async fn assert_times_out(nix: &Nix, resolved: &Resolved) {
    let roots = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = realise(nix, resolved, &roots.path().join("r"))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            NixError::Timeout {
                stage: Stage::Realise,
                seconds: 2
            }
        ),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

/// A package set whose evaluation blocks forever: reading a FIFO that no
/// one writes. Returns the directory (unique, so it identifies our Nix
/// processes) and keeps it alive.
fn hanging_package_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    std::fs::write(
        dir.path().join("default.nix"),
        "{ ... }: { hang = builtins.readFile ./fifo; }\n",
    )
    .unwrap();
    dir
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

async fn assert_gone(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn hanging_evaluation_is_killed_on_timeout() {
    let dir = hanging_package_set();
    let src = dir.path().to_str().unwrap();
    let nix = nix(Duration::from_secs(1));
    let started = Instant::now();
    let err = nix
        .resolve("path", src, "x86_64-linux", &["hang".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NixError::Timeout {
                stage: Stage::Resolve,
                seconds: 1
            }
        ),
        "{err:?}"
    );
    // 1 s timeout + 3 s grace before SIGKILL (Nix ignores SIGTERM while
    // blocked in open(2)).
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_gone(src).await;
}

#[tokio::test]
async fn dropping_the_future_stops_nix() {
    let dir = hanging_package_set();
    let src = dir.path().to_str().unwrap().to_string();
    let nix = nix(Duration::from_secs(600));
    let names = ["hang".to_string()];
    let mut resolve = Box::pin(nix.resolve("path", &src, "x86_64-linux", &names));
    tokio::select! {
        res = &mut resolve => panic!("resolve should hang: {res:?}"),
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    assert!(!processes_mentioning(&src).is_empty(), "nix is not running");
    drop(resolve);
    assert_gone(&src).await;
}

#[tokio::test]
async fn missing_prepare_image_is_a_failure() {
    let nix = Nix::new(
        PathBuf::from("/nonexistent/prepare-image.nix"),
        Duration::from_secs(5),
        vec![],
    );
    let err = nix
        .resolve("path", FIXTURE, "x86_64-linux", &["hello".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NixError::Failed {
                stage: Stage::Resolve,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A nix-daemon of our own on a private socket, stopped on drop.
struct PrivateDaemon {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_daemon() -> PrivateDaemon {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("socket");
    let child = std::process::Command::new("nix-daemon")
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("these tests need nix-daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "nix-daemon made no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    PrivateDaemon {
        child,
        _dir: dir,
        socket,
    }
}

#[tokio::test]
async fn a_store_owned_by_a_daemon_is_reached_through_it() {
    let daemon = private_daemon();
    let direct = nix(Duration::from_secs(120));
    let resolved = resolve(&direct, &["hello"]).await.unwrap();
    let store = format!("unix://{}", daemon.socket.display());
    let through = Nix::new(
        PathBuf::from(PREPARE_IMAGE),
        Duration::from_secs(120),
        vec![
            ("substituters".into(), String::new()),
            ("store".into(), store),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    // Its socket is spoken to directly: no process of ours.
    let session = Session::open(&through).await.unwrap();
    assert!(!session.started_a_process());
    drop(session);
    let closure = realise(&through, &resolved, &root).await.unwrap();
    let hello = &resolved.found["hello"].out_path;
    assert!(closure.iter().any(|p| &p.path == hello), "{closure:?}");
    // The daemon registered the root.
    assert!(roots_of(hello).contains(&root.display().to_string()));
    // A build failure comes back the same way.
    let broken = resolve(&direct, &["broken"]).await.unwrap();
    let err = realise(&through, &broken, &dir.path().join("b"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NixError::Daemon { log, .. } if log.contains("broken on purpose")),
        "{err:?}"
    );
    // And the timeout holds.
    let hurried = Nix::new(
        PathBuf::from(PREPARE_IMAGE),
        Duration::from_secs(2),
        through.options().to_vec(),
    );
    let slow = resolve(&direct, &["slow"]).await.unwrap();
    assert_times_out(&hurried, &slow).await;
}

#[tokio::test]
async fn sessions_started_ahead_serve_one_build_each() {
    let nix = nix(Duration::from_secs(120));
    let spare = std::sync::Arc::new(nixery::build::spare::Spare::default());
    let resolved = resolve(&nix, &["hello"]).await.unwrap();
    let hello = resolved.found["hello"].out_path.clone();
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let root = dir.path().join(format!("r{round}"));
        // From the second round on, the session was started ahead.
        let session = spare.take(&nix).await.unwrap();
        assert!(session.started_a_process());
        let session = session
            .realise(&nix, &wanted(&resolved), &root)
            .await
            .unwrap();
        let closure = session
            .closure(&nix, std::slice::from_ref(&hello))
            .await
            .unwrap();
        assert!(closure.iter().any(|p| p.path == hello));
        assert!(roots_of(&hello).contains(&root.display().to_string()));
        spare.refill(&nix);
        if round == 1 {
            // Not waited for: the next take waits for it to start.
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
