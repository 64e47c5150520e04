//! End to end with real clients: the `nixery` binary, docker and skopeo.

mod common;

use common::binary::serve_command;
use common::{
    assert_same_tree, docker, docker_pull_and_run_fixtures, nix_closure, require_tool, run, Binary,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

#[test]
fn survives_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut cmd = serve_command(&dir.path().join("storage"));
    let child = cmd.env("NOTIFY_SOCKET", &socket_path).spawn().unwrap();
    let mut server = Binary {
        child,
        port: 0,
        _storage: Some(dir),
    };
    // Closed before the server writes a line, so every write it makes to
    // stdout fails; it must still come up (readiness follows the lines).
    drop(server.child.stdout.take());
    let mut buf = [0u8; 512];
    let len = socket
        .recv(&mut buf)
        .expect("READY=1 although stdout is closed");
    let ready = String::from_utf8_lossy(&buf[..len]).into_owned();
    server.port = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
    let out =
        run(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{}/v2/", server.port)]));
    assert_eq!(out, "{}");
}

#[test]
fn docker_pulls_and_runs_images() {
    require_tool("docker");
    let server = Binary::start();
    docker_pull_and_run_fixtures(&format!("localhost:{}", server.port));
    let busybox = server.image("busybox");
    let shell = server.image("shell/hello");
    // The shell image starts bash, has coreutils' env at /usr/bin/env, a
    // writable /tmp and the CA bundle where SSL_CERT_FILE says.
    let out = docker(&[
        "run", "--rm", "--network", "none", &shell, "bash", "-c",
        "echo $BASH_VERSION >/dev/null && /usr/bin/env true && touch /tmp/x && test -s \"$SSL_CERT_FILE\" && test -s /etc/services && echo ok",
    ]);
    assert_eq!(out.trim(), "ok");
    let cmd = docker(&["inspect", "--format", "{{json .Config.Cmd}}", &shell]);
    assert_eq!(cmd.trim(), r#"["bash"]"#);
    let _ = Command::new("docker")
        .args(["rmi", "-f", &busybox, &shell])
        .output();
}

fn skopeo_unpack(server: &Binary, name: &str, work: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(work).unwrap();
    let layout = work.join("oci");
    let bundle = work.join("bundle");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}", server.image(name)),
        &format!("oci:{}:img", layout.display()),
    ]));
    run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:img", layout.display()),
        &bundle.to_string_lossy(),
    ]));
    bundle.join("rootfs")
}

#[test]
fn skopeo_copies_images_that_match_the_store() {
    require_tool("skopeo");
    require_tool("umoci");
    let server = Binary::start();
    let work = tempfile::tempdir().unwrap();

    // skopeo inspect lists tags first.
    let inspect = run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}", server.image("awkward")),
    ]));
    assert!(inspect.contains("\"Architecture\": \"amd64\""), "{inspect}");

    for name in ["shell/hello", "awkward"] {
        let dir = work.path().join(name.replace('/', "_"));
        let rootfs = skopeo_unpack(&server, name, &dir);
        let attr = if name == "awkward" {
            "awkward"
        } else {
            "hello"
        };
        for path in nix_closure(attr) {
            let inside = rootfs.join(path.trim_start_matches('/'));
            assert_same_tree(Path::new(&path), &inside);
        }
        let tmp = std::fs::metadata(rootfs.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    }
    let hello = work.path().join("shell_hello/bundle/rootfs");
    let link = std::fs::read_link(hello.join("bin/hello")).unwrap();
    assert!(link.starts_with("/nix/store/"), "{}", link.display());
    assert!(std::fs::symlink_metadata(hello.join("usr/bin/env")).is_ok());
}

#[test]
fn docker_runs_the_main_program_without_a_command() {
    require_tool("docker");
    let server = Binary::start();
    let hello = server.image("hello");
    docker(&["pull", &hello]);
    let out = docker(&["run", "--rm", "--network", "none", &hello]);
    assert_eq!(out.trim(), "Hello, world!");
    let labels = docker(&["inspect", "--format", "{{json .Config.Labels}}", &hello]);
    assert!(
        labels.contains("\"org.opencontainers.image.source\":\"path:"),
        "{labels}"
    );
    let _ = Command::new("docker").args(["rmi", "-f", &hello]).output();
}

/// A server that builds every pull by tag for amd64 and arm64.
fn two_platform_server() -> Binary {
    Binary::start_with(|cmd| {
        cmd.env("NIXERY_PLATFORMS", "linux/amd64,linux/arm64");
    })
}

#[test]
fn docker_and_skopeo_pick_a_platform_from_the_index() {
    require_tool("docker");
    require_tool("skopeo");
    let server = two_platform_server();
    let hello = server.image("hello");
    for arch in ["arm64", "amd64"] {
        docker(&["pull", "--platform", &format!("linux/{arch}"), &hello]);
        let got = docker(&["image", "inspect", "--format", "{{.Architecture}}", &hello]);
        assert_eq!(got.trim(), arch);
    }
    // The amd64 image runs here.
    let out = docker(&["run", "--rm", "--network", "none", &hello]);
    assert_eq!(out.trim(), "Hello, world!");
    let _ = Command::new("docker").args(["rmi", "-f", &hello]).output();

    for arch in ["arm64", "amd64"] {
        let inspect = run(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            "--override-os",
            "linux",
            "--override-arch",
            arch,
            &format!("docker://{hello}"),
        ]));
        assert!(
            inspect.contains(&format!("\"Architecture\": \"{arch}\"")),
            "{inspect}"
        );
    }
    let raw = run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{hello}"),
    ]));
    assert!(
        raw.contains("application/vnd.oci.image.index.v1+json"),
        "{raw}"
    );
}

#[test]
fn podman_pulls_each_platform() {
    require_tool("podman");
    let server = two_platform_server();
    let hello = server.image("hello");
    // Its own storage, so the test leaves nothing behind.
    let root = tempfile::tempdir().unwrap();
    let podman = |args: &[&str]| podman_in(root.path(), args);
    podman(&["pull", "--tls-verify=false", &hello]);
    let arch = podman(&["image", "inspect", "--format", "{{.Architecture}}", &hello]);
    assert_eq!(arch.trim(), "amd64");
    podman(&["pull", "--tls-verify=false", "--arch", "arm64", &hello]);
    let arch = podman(&["image", "inspect", "--format", "{{.Architecture}}", &hello]);
    assert_eq!(arch.trim(), "arm64");
}

/// Runs podman with its storage under `root`; its stdout.
fn podman_in(root: &Path, args: &[&str]) -> String {
    run(Command::new("podman")
        .arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args))
}

/// containerd in a namespace of its own, removed with what it pulled
/// when dropped.
struct Ctr {
    socket: String,
    namespace: String,
}

impl Ctr {
    fn new(label: &str) -> Ctr {
        Ctr {
            socket: containerd_socket(),
            namespace: format!("nixery-test-{label}{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        run(Command::new("ctr")
            .args(["--address", &self.socket, "--namespace", &self.namespace])
            .args(args))
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = Command::new("ctr")
            .args([
                "--address",
                &self.socket,
                "namespaces",
                "remove",
                &self.namespace,
            ])
            .output();
    }
}

/// containerd's socket: its own service's, else the one dockerd runs.
fn containerd_socket() -> String {
    [
        "/run/containerd/containerd.sock",
        "/var/run/docker/containerd/containerd.sock",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("a containerd socket (scripts/start-dockerd starts one)")
    .to_owned()
}

#[test]
fn ctr_pulls_from_containerd() {
    require_tool("ctr");
    require_tool("docker");
    let server = two_platform_server();
    let hello = format!("{}:latest", server.image("hello"));
    let ctr = Ctr::new("");
    ctr.run(&["images", "pull", "--plain-http", "--all-platforms", &hello]);
    let listed = ctr.run(&["images", "list"]);
    assert!(listed.contains(&hello), "{listed}");
    assert!(listed.contains("linux/amd64,linux/arm64"), "{listed}");
    ctr.run(&["images", "remove", &hello]);
}

/// podman and containerd take a `nonroot` image's numeric user (they
/// cannot run containers here).
#[test]
fn podman_and_ctr_pull_a_nonroot_image() {
    require_tool("podman");
    require_tool("ctr");
    require_tool("docker");
    let server = Binary::start();
    let image = format!("{}:latest", server.image("shell/nonroot"));
    let root = tempfile::tempdir().unwrap();
    podman_in(root.path(), &["pull", "--tls-verify=false", &image]);
    let inspect = ["image", "inspect", "--format", "{{.Config.User}}", &image];
    let user = podman_in(root.path(), &inspect);
    assert_eq!(user.trim(), "1000:1000");

    let ctr = Ctr::new("nonroot-");
    ctr.run(&["images", "pull", "--plain-http", &image]);
    // The config containerd stored names the user.
    let config = ctr.run(&["content", "get", &image_config_digest(&ctr, &image)]);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["config"]["User"], "1000:1000");
    ctr.run(&["images", "remove", &image]);
}

/// The config digest of an image containerd pulled, from its manifest.
fn image_config_digest(ctr: &Ctr, image: &str) -> String {
    let listed = ctr.run(&["images", "list"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with(image))
        .unwrap_or_else(|| panic!("{image} in {listed}"));
    let manifest_digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("a digest column");
    let manifest: serde_json::Value =
        serde_json::from_str(&ctr.run(&["content", "get", manifest_digest])).unwrap();
    manifest["config"]["digest"].as_str().unwrap().to_owned()
}
