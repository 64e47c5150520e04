//! HTTPS with real clients: docker from an address it does not treat as
//! insecure (a veth pair into a network namespace made here), docker login
//! with htpasswd, skopeo and podman with their certificate directories,
//! curl over HTTP/2 and HTTP/1.1, the pair replaced during a 110 MB
//! download, `nixery tls init` followed as printed, and each bad input.

mod common;

use common::binary::serve_command;
use common::{require_tool, run, Binary};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn nixery() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nixery"))
}

/// `nixery tls init` into `dir` for `names` (IPs or hostnames); its output.
fn tls_init(dir: &Path, names: &[&str], port: u16, force: bool) -> String {
    let mut cmd = nixery();
    cmd.args(["tls", "init", "--dir"])
        .arg(dir)
        .args(["--port", &port.to_string()]);
    for n in names {
        let flag = if n.parse::<IpAddr>().is_ok() {
            "--ip"
        } else {
            "--hostname"
        };
        cmd.args([flag, n]);
    }
    if force {
        cmd.arg("--force");
    }
    run(&mut cmd)
}

/// A free port on `ip` (the server is told it, so that `tls init` can
/// print it first).
fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server on `ip:port` with the pair under `dir` (as `tls init`
/// writes it); its log goes to `log`.
fn tls_server(dir: &Path, ip: IpAddr, port: u16, log: &Path, extra: &[(&str, &str)]) -> Binary {
    let storage = tempfile::tempdir().unwrap();
    let mut cmd = serve_command(storage.path());
    cmd.env("NIXERY_LISTEN_ADDRESS", ip.to_string())
        .env("PORT", port.to_string())
        .env("NIXERY_TLS_CERT", dir.join("server.crt"))
        .env("NIXERY_TLS_KEY", dir.join("server.key"))
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Binary::spawn(&mut cmd, Some(storage))
}

/// A veth pair whose far end is in a network namespace of its own: the
/// near end's address is a non-loopback address of this host, which
/// docker does not treat as an insecure registry. Removed on drop.
struct Veth {
    netns: String,
    near: String,
    ip: Ipv4Addr,
}

impl Veth {
    fn new() -> Veth {
        require_tool("ip");
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let netns = format!("nxtls-{pid}-{n}");
        let (near, far) = (format!("nxt{pid}{n}a"), format!("nxt{pid}{n}b"));
        // A /30 of 10.128.0.0/10 of its own per process and pair.
        let idx = (pid.wrapping_mul(8).wrapping_add(n)) & 0x3_ffff;
        let base = Ipv4Addr::new(
            10,
            128 + (idx >> 14) as u8,
            ((idx >> 6) & 0xff) as u8,
            ((idx & 0x3f) * 4) as u8,
        );
        let ip = Ipv4Addr::from(u32::from(base) + 1);
        let peer = Ipv4Addr::from(u32::from(base) + 2);
        let veth = Veth { netns, near, ip };
        let ip_cmd = |args: &[&str]| {
            run(Command::new("ip").args(args));
        };
        ip_cmd(&["netns", "add", &veth.netns]);
        ip_cmd(&[
            "link", "add", &veth.near, "type", "veth", "peer", "name", &far,
        ]);
        ip_cmd(&["link", "set", &far, "netns", &veth.netns]);
        ip_cmd(&["addr", "add", &format!("{ip}/30"), "dev", &veth.near]);
        ip_cmd(&["link", "set", &veth.near, "up"]);
        ip_cmd(&[
            "-n",
            &veth.netns,
            "addr",
            "add",
            &format!("{peer}/30"),
            "dev",
            &far,
        ]);
        ip_cmd(&["-n", &veth.netns, "link", "set", &far, "up"]);
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.near])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// A directory removed on drop (client trust set up by a test).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lines of `tls init`'s output under `## for HOST` and `# section`,
/// without `sudo` (the tests run as root).
fn printed_steps(output: &str, host: &str, section: &str) -> Vec<String> {
    let block = output
        .split("\n## for ")
        .find(|b| b.starts_with(&format!("{host}\n")))
        .unwrap_or_else(|| panic!("no steps for {host} in:\n{output}"));
    let mut lines = Vec::new();
    let mut inside = false;
    for line in block.lines() {
        if let Some(title) = line.strip_prefix("# ") {
            inside = title.starts_with(section);
        } else if inside && !line.is_empty() {
            lines.push(line.replace("sudo ", ""));
        }
    }
    assert!(!lines.is_empty(), "no {section} steps for {host}");
    lines
}

fn output_of(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn docker_with(config: &Path, args: &[&str]) -> Output {
    output_of(
        Command::new("docker")
            .arg("--config")
            .arg(config)
            .args(args),
    )
}

#[test]
fn docker_pulls_over_tls_from_a_lan_address_once_it_trusts_the_printed_ca() {
    require_tool("docker");
    require_tool("htpasswd");
    let veth = Veth::new();
    let ip = IpAddr::V4(veth.ip);
    let port = free_port(ip);
    let host = format!("{ip}:{port}");
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    let printed = tls_init(&pki, &[&ip.to_string(), "registry.test"], port, false);
    let users = work.path().join("htpasswd");
    run(Command::new("htpasswd")
        .args(["-cbB", "-C", "5"])
        .arg(&users)
        .args(["alice", "wonderland"]));
    let log = work.path().join("log");
    let server = tls_server(
        &pki,
        ip,
        port,
        &log,
        &[("NIXERY_HTPASSWD", users.to_str().unwrap())],
    );
    let trust = RemoveOnDrop(PathBuf::from(format!("/etc/docker/certs.d/{host}")));
    let config = work.path().join("docker");
    let image = format!("{host}/hello");

    // Without the CA docker refuses the certificate, before any password.
    let refused = docker_with(&config, &["pull", &image]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("certificate signed by unknown authority"),
        "{}",
        text(&refused)
    );

    // The steps exactly as printed, run where ca.crt is.
    for step in printed_steps(&printed, &host, "docker") {
        run(Command::new("sh").args(["-c", &step]).current_dir(&pki));
    }
    assert!(trust.0.join("ca.crt").is_file());
    let anonymous = docker_with(&config, &["pull", &image]);
    assert!(!anonymous.status.success(), "no credentials, no pull");
    let mut login = Command::new("docker")
        .arg("--config")
        .arg(&config)
        .args(["login", &host, "-u", "alice", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    login
        .stdin
        .take()
        .unwrap()
        .write_all(b"wonderland")
        .unwrap();
    let login = login.wait_with_output().unwrap();
    assert!(login.status.success(), "{}", text(&login));
    let pulled = docker_with(&config, &["pull", &image]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    let ran = docker_with(&config, &["run", "--rm", "--network", "none", &image]);
    assert!(
        String::from_utf8_lossy(&ran.stdout).contains("Hello, world!"),
        "{}",
        text(&ran)
    );
    // The CA is public, the rest is not.
    let ca = run(Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg(format!("https://{host}/ca.crt")));
    assert_eq!(ca, std::fs::read_to_string(pki.join("ca.crt")).unwrap());
    let status = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg(format!("https://{host}/api/status")));
    assert_eq!(status, "401");
    let _ = docker_with(&config, &["rmi", "-f", &image]);
    drop(server);
}

/// The server on 127.0.0.1 with a fresh private CA for it.
fn local_tls_server(work: &Path, extra: &[(&str, &str)]) -> (Binary, PathBuf) {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = free_port(ip);
    let pki = work.join("pki");
    tls_init(&pki, &["127.0.0.1", "localhost"], port, false);
    let server = tls_server(&pki, ip, port, &work.join("log"), extra);
    (server, pki)
}

fn curl_tls(pki: &Path, args: &[&str]) -> String {
    run(Command::new("curl")
        .args(["-sSf", "--max-time", "60", "--cacert"])
        .arg(pki.join("ca.crt"))
        .args(args))
}

#[test]
fn skopeo_podman_and_curl_verify_the_certificate() {
    require_tool("skopeo");
    require_tool("podman");
    require_tool("curl");
    let work = tempfile::tempdir().unwrap();
    let (server, pki) = local_tls_server(work.path(), &[]);
    let host = format!("127.0.0.1:{}", server.port);
    // containers/image reads `*.crt` as CAs and wants no keys beside them.
    let certs = work.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(pki.join("ca.crt"), certs.join("ca.crt")).unwrap();

    let unverified = output_of(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=true",
        &format!("docker://{host}/hello"),
    ]));
    assert!(!unverified.status.success());
    assert!(
        text(&unverified).contains("certificate signed by unknown authority"),
        "{}",
        text(&unverified)
    );
    let inspected = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=true", "--cert-dir"])
        .arg(&certs)
        .arg(format!("docker://{host}/hello")));
    assert!(inspected.contains("\"Digest\""), "{inspected}");

    let root = tempfile::tempdir().unwrap();
    run(Command::new("podman")
        .arg("--root")
        .arg(root.path().join("root"))
        .arg("--runroot")
        .arg(root.path().join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "pull",
            "--tls-verify=true",
            "--cert-dir",
        ])
        .arg(&certs)
        .arg(format!("{host}/hello")));

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let got = curl_tls(
            &pki,
            &[
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &format!("https://{host}/v2/"),
            ],
        );
        assert_eq!(got, format!("{version} 200"));
        // The admin page names the host the client used, also over HTTP/2
        // (no Host header there), and offers the CA.
        let page = curl_tls(&pki, &[flag, &format!("https://{host}/")]);
        assert!(
            page.contains(&format!("docker pull {host}/shell/hello")),
            "{flag}"
        );
        assert!(page.contains("href=\"/ca.crt\""), "{flag}");
    }
    // Both TLS versions.
    for (flags, version) in [
        (["--tlsv1.2", "--tls-max", "1.2"], "TLSv1.2"),
        (["--tlsv1.3", "--tls-max", "1.3"], "TLSv1.3"),
    ] {
        let out = output_of(
            Command::new("curl")
                .args(["-sSfv", "-o", "/dev/null", "--cacert"])
                .arg(pki.join("ca.crt"))
                .args(flags)
                .arg(format!("https://{host}/v2/")),
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("SSL connection using {version}")),
            "{}",
            text(&out)
        );
    }
    let status: serde_json::Value =
        serde_json::from_str(&curl_tls(&pki, &[&format!("https://{host}/api/status")])).unwrap();
    assert_eq!(
        status["tls"]["names"],
        serde_json::json!(["localhost", "127.0.0.1"])
    );
    assert_eq!(status["tls"]["private_ca"], true);
    assert_eq!(status["tls"]["expired"], false);
    let metrics = curl_tls(&pki, &[&format!("https://{host}/metrics")]);
    let left: f64 = metrics
        .lines()
        .find(|l| l.starts_with("nixery_tls_certificate_expiry_seconds"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no expiry metric in {metrics}"));
    assert!(left > 800.0 * 86400.0, "{left}");
}

/// The serial of the certificate a new connection is shown, as openssl
/// prints it (`serial=...`).
fn served_serial(port: u16) -> String {
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pem = String::new();
    s_client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut pem)
        .unwrap();
    let _ = s_client.wait();
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn file_serial(cert: &Path) -> String {
    run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert))
    .trim()
    .to_owned()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_new_pair_serves_new_connections_while_a_download_finishes() {
    require_tool("openssl");
    require_tool("curl");
    let work = tempfile::tempdir().unwrap();
    let (server, pki) = local_tls_server(work.path(), &[]);
    let host = format!("127.0.0.1:{}", server.port);
    let manifest: serde_json::Value = serde_json::from_str(&curl_tls(
        &pki,
        &[
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            &format!("https://{host}/v2/big/manifests/latest"),
        ],
    ))
    .unwrap();
    let layer = common::largest_layer(&manifest);
    let size = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["digest"] == layer.as_str())
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    assert!(size > 100_000_000, "{size}");
    let old_serial = file_serial(&pki.join("server.crt"));
    assert_eq!(served_serial(server.port), old_serial);

    // About 11 s at 10 MB/s: the pair is replaced meanwhile.
    let file = work.path().join("blob");
    let mut download = Command::new("curl")
        .args(["-sSf", "--limit-rate", "10M", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg("-o")
        .arg(&file)
        .arg(format!("https://{host}/v2/big/blobs/{layer}"))
        .spawn()
        .unwrap();
    wait_for("the download starts", Duration::from_secs(30), || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
    });
    tls_init(&pki, &["127.0.0.1", "localhost"], server.port, true);
    let new_serial = file_serial(&pki.join("server.crt"));
    assert_ne!(new_serial, old_serial);
    wait_for(
        "the new certificate is served",
        Duration::from_secs(30),
        || served_serial(server.port) == new_serial,
    );
    let finished_early = download.try_wait().unwrap().is_some();
    let status = download.wait().unwrap();
    assert!(status.success(), "the download survives the change");
    assert!(
        !finished_early,
        "the download was meant to span the change; make it slower"
    );
    let sum = run(Command::new("sha256sum").arg(&file));
    assert_eq!(format!("sha256:{}", &sum[..64]), layer);

    // A broken pair keeps the one that works, and says so once.
    std::fs::write(pki.join("server.crt"), "garbage\n").unwrap();
    wait_for("the error is logged", Duration::from_secs(30), || {
        std::fs::read_to_string(work.path().join("log"))
            .unwrap()
            .contains("cannot be used")
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(served_serial(server.port), new_serial);
    let log = std::fs::read_to_string(work.path().join("log")).unwrap();
    assert_eq!(log.matches("cannot be used").count(), 1, "{log}");

    // `tls renew` signs a new pair with the same CA: the client that
    // trusts ca.crt needs nothing new. Without names it takes the current
    // certificate's, which is broken now: a clear refusal.
    let ca_before = std::fs::read(pki.join("ca.crt")).unwrap();
    let refused = nixery()
        .args(["tls", "renew", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("give --hostname or --ip"), "{said}");
    run(nixery().args(["tls", "renew", "--dir"]).arg(&pki).args([
        "--ip",
        "127.0.0.1",
        "--hostname",
        "localhost",
    ]));
    assert_eq!(std::fs::read(pki.join("ca.crt")).unwrap(), ca_before);
    let renewed = file_serial(&pki.join("server.crt"));
    assert_ne!(renewed, new_serial);
    wait_for(
        "the renewed certificate is served",
        Duration::from_secs(30),
        || served_serial(server.port) == renewed,
    );
    run(Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg(format!("https://{host}/v2/")));
    // And again without names: the renewed certificate's are taken.
    run(nixery().args(["tls", "renew", "--dir"]).arg(&pki));
    assert_ne!(file_serial(&pki.join("server.crt")), renewed);
    let names = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(pki.join("server.crt")));
    assert!(
        names.contains("DNS:localhost") && names.contains("IP Address:127.0.0.1"),
        "{names}"
    );
}

/// Writes a certificate for localhost that expired yesterday, signed by
/// itself, and its key.
fn expired_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("expired.crt"), dir.join("expired.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// `nixery check-config` with `--tls-cert` and, if given, `--tls-key`.
fn check_config_tls(cert: &Path, key: Option<&Path>) -> Output {
    let mut cmd = nixery();
    cmd.args(["check-config", "--storage-path", "/tmp", "--tls-cert"])
        .arg(cert);
    if let Some(key) = key {
        cmd.arg("--tls-key").arg(key);
    }
    output_of(&mut cmd)
}

/// `serve` with a pair that cannot be used: exit 1, one line naming it.
fn refused_start(cert: &Path, key: &Path, says: &str) {
    let storage = tempfile::tempdir().unwrap();
    let out = output_of(
        serve_command(storage.path())
            .env("NIXERY_TLS_CERT", cert)
            .env("NIXERY_TLS_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains(says), "{says:?} in {}", text(&out));
    let check = check_config_tls(cert, Some(key));
    assert_eq!(check.status.code(), Some(2), "{}", text(&check));
    assert!(text(&check).contains(says), "{}", text(&check));
}

#[test]
fn bad_pairs_are_refused_with_what_is_wrong() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    tls_init(&a, &["localhost"], 8080, false);
    tls_init(&b, &["localhost"], 8080, false);
    let garbage = work.path().join("garbage.pem");
    std::fs::write(&garbage, "this is no PEM\n").unwrap();
    refused_start(
        &work.path().join("absent.crt"),
        &a.join("server.key"),
        "absent.crt",
    );
    refused_start(&garbage, &a.join("server.key"), "holds no PEM certificate");
    refused_start(&a.join("server.crt"), &garbage, "holds no PEM private key");
    refused_start(
        &a.join("server.crt"),
        &b.join("server.key"),
        "does not belong to the certificate",
    );
    // The key formats openssl writes: PKCS#8, and the traditional RSA
    // (PKCS#1) and EC (SEC1) ones.
    require_tool("openssl");
    for (name, keygen) in [
        ("rsa-pkcs8", "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out k.pem"),
        ("rsa-pkcs1", "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl rsa -traditional -out k.pem"),
        ("ec-sec1", "openssl ecparam -name prime256v1 -genkey -noout -out k.pem"),
    ] {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let script = format!(
            "{keygen} 2>/dev/null && openssl req -x509 -key k.pem -out c.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost"
        );
        run(Command::new("sh").args(["-c", &script]).current_dir(&dir));
        let ok = check_config_tls(&dir.join("c.pem"), Some(&dir.join("k.pem")));
        assert!(ok.status.success(), "{name}: {}", text(&ok));
        assert!(text(&ok).contains("tls:     localhost (issuer CN=localhost"), "{name}: {}", text(&ok));
    }
    // Only one of the two.
    let out = check_config_tls(&a.join("server.crt"), None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("go together"), "{}", text(&out));
    // A good pair is summarised; passwords without TLS on a LAN address
    // are warned about.
    let ok = check_config_tls(&a.join("server.crt"), Some(&a.join("server.key")));
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("tls:     localhost (issuer CN=nixery private CA"));
    let users = work.path().join("htpasswd");
    std::fs::write(&users, "").unwrap();
    let cleartext = output_of(
        nixery()
            .args(["check-config", "--storage-path", "/tmp", "--htpasswd"])
            .arg(&users)
            .args(["--listen-address", "0.0.0.0"]),
    );
    assert!(cleartext.status.success());
    assert!(
        text(&cleartext).contains("passwords cross the network in clear text"),
        "{}",
        text(&cleartext)
    );
}

#[test]
fn an_expired_certificate_serves_and_warns_loudly() {
    let work = tempfile::tempdir().unwrap();
    let (cert, key) = expired_pair(work.path());
    let log = work.path().join("log");
    let storage = tempfile::tempdir().unwrap();
    let mut cmd = serve_command(storage.path());
    cmd.env("NIXERY_TLS_CERT", &cert)
        .env("NIXERY_TLS_KEY", &key)
        .stderr(std::fs::File::create(&log).unwrap());
    let server = Binary::spawn(&mut cmd, Some(storage));
    assert!(std::fs::read_to_string(&log).unwrap().contains("EXPIRED"));
    let url = |p: &str| format!("https://localhost:{}{p}", server.port);
    let refused = output_of(
        Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&cert)
            .arg(url("/v2/")),
    );
    assert!(!refused.status.success(), "curl refuses it");
    let page = run(Command::new("curl").args(["-sSfk", &url("/")]));
    assert!(page.contains("EXPIRED"), "{page}");
    let status = run(Command::new("curl").args(["-sSfk", &url("/api/status")]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["tls"]["expired"], true);
    let check = check_config_tls(&cert, Some(&key));
    assert!(check.status.success());
    assert!(text(&check).contains("EXPIRED"), "{}", text(&check));
}

/// Reads until the server closes the connection; what it sent.
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("not closed within {limit:?} ({:?}): {e}", start.elapsed()),
        }
    }
}

#[test]
fn wrong_protocols_and_stalled_handshakes_are_cut_off() {
    require_tool("curl");
    let work = tempfile::tempdir().unwrap();
    let (server, pki) = local_tls_server(
        work.path(),
        &[
            ("NIXERY_HEADER_TIMEOUT", "1"),
            ("NIXERY_MAX_CONNECTIONS", "1"),
        ],
    );
    let addr = format!("127.0.0.1:{}", server.port);

    // Plain HTTP to the TLS port: a 400 that says to use https.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut plain, Duration::from_secs(30))).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");

    // A client that starts a handshake and never finishes it holds the
    // only slot until the header timeout, then is cut off; the next
    // client is served.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    let started = Instant::now();
    let waiting = std::thread::spawn({
        let pki = pki.clone();
        let addr = addr.clone();
        move || {
            curl_tls(
                &pki,
                &[
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("https://{addr}/v2/"),
                ],
            )
        }
    });
    assert!(read_to_close(&mut stalled, Duration::from_secs(30)).is_empty());
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(waiting.join().unwrap(), "200");

    // A TLS hello to a plain port fails at once rather than hang.
    let plain_server = Binary::start();
    let out = output_of(Command::new("curl").args([
        "-sS",
        "--max-time",
        "30",
        "-k",
        &format!("https://127.0.0.1:{}/v2/", plain_server.port),
    ]));
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(28), "timed out: {}", text(&out));
    let still = run(Command::new("curl").args(["-sSf", &plain_server.url("/v2/")]));
    assert_eq!(still, "{}");
}

#[test]
fn serve_warns_of_passwords_in_clear_text_on_a_lan_address() {
    let work = tempfile::tempdir().unwrap();
    let users = work.path().join("htpasswd");
    std::fs::write(&users, "").unwrap();
    let serve_log = |listen: &str| {
        let log = work.path().join(format!("log-{listen}"));
        let storage = tempfile::tempdir().unwrap();
        let mut cmd = serve_command(storage.path());
        cmd.env("NIXERY_HTPASSWD", &users)
            .env("NIXERY_LISTEN_ADDRESS", listen)
            .stderr(std::fs::File::create(&log).unwrap());
        let server = Binary::spawn(&mut cmd, Some(storage));
        drop(server);
        std::fs::read_to_string(&log).unwrap()
    };
    const WARNING: &str = "passwords cross the network in clear text";
    assert!(serve_log("0.0.0.0").contains(WARNING));
    assert!(!serve_log("127.0.0.1").contains(WARNING));
}
