//! The NixOS module (nixos-module/default.nix), evaluated with the stub
//! library in nixos-module/tests (this machine has no nixpkgs), and its
//! build-time `check-config` run against the real binary.

mod common;

use common::require_tool;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn eval(settings: &str) -> Value {
    require_tool("nix-instantiate");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/tests/stub-eval.nix");
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(file)
        .args(["--argstr", "settings", settings])
        .output()
        .expect("nix-instantiate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from nix-instantiate")
}

/// Runs the module's build-time check script with the binary under test;
/// returns whether it succeeded, and its stderr.
fn run_build_check(unit: &Value) -> (bool, String) {
    let exec = unit["serviceConfig"]["ExecStart"].as_str().unwrap();
    let script = exec
        .strip_prefix("<<nixery-checked-config:")
        .and_then(|s| s.split_once(">>"))
        .map(|(script, rest)| {
            assert_eq!(rest, "/bin/nixery serve");
            script
        })
        .unwrap_or_else(|| panic!("ExecStart does not run the checked binary: {exec}"));
    let script = script.replace("@NIXERY@/bin/nixery", env!("CARGO_BIN_EXE_nixery"));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("out", dir.path().join("out"))
        .current_dir(dir.path())
        .output()
        .expect("bash runs");
    if out.status.success() {
        assert!(dir.path().join("out/bin/nixery").exists());
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn module_yields_a_hardened_notify_unit_through_the_daemon() {
    let unit = eval(r#"{"channel": "nixos-unstable"}"#);
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    for name in [
        "enable",
        "package",
        "listenAddress",
        "port",
        "openFirewall",
        "storagePath",
        "channel",
        "pkgsRepo",
        "pkgsPath",
        "flake",
        "nixTimeout",
        "popularityUrl",
        "maxConcurrentBuilds",
        "maxQueuedBuilds",
        "maxStorage",
        "minFreeSpace",
        "gcLease",
        "scrubInterval",
        "scrubRate",
        "logFormat",
        "layering",
        "extraEnvironment",
        "environmentFile",
        "htpasswdFile",
        "metricsPublic",
        "tls",
        "storageBackend",
        "s3Bucket",
        "s3Endpoint",
        "s3Redirect",
    ] {
        assert!(
            unit["options"].as_array().unwrap().contains(&name.into()),
            "option {name}"
        );
    }
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["DynamicUser"], true);
    assert_eq!(sc["StateDirectory"], "nixery");
    assert_eq!(sc["ProtectSystem"], "strict");
    assert_eq!(sc["ProtectHome"], true);
    assert_eq!(sc["PrivateTmp"], true);
    assert_eq!(sc["NoNewPrivileges"], true);
    assert_eq!(sc["CapabilityBoundingSet"], serde_json::json!([""]));
    assert_eq!(
        sc["RestrictAddressFamilies"],
        serde_json::json!(["AF_UNIX", "AF_INET", "AF_INET6"])
    );
    assert_eq!(sc["SystemCallFilter"][0], "@system-service");
    assert!(sc.get("EnvironmentFile").is_none());
    assert!(sc.get("LoadCredential").is_none());
    assert!(unit["requires"]
        .as_array()
        .unwrap()
        .contains(&"nix-daemon.socket".into()));
    assert!(unit["after"]
        .as_array()
        .unwrap()
        .contains(&"nix-daemon.socket".into()));
    let env = &unit["environment"];
    assert_eq!(env["NIX_REMOTE"], "daemon");
    assert_eq!(env["NIXERY_CHANNEL"], "nixos-unstable");
    assert_eq!(env["STORAGE_PATH"], "/var/lib/nixery");
    assert_eq!(env["PORT"], "8080");
    assert!(env.get("NIXERY_PKGS_PATH").is_none());
    assert_eq!(env["NIXERY_MAX_QUEUED_BUILDS"], "32");
    assert!(env.get("NIXERY_MAX_STORAGE").is_none());
    assert_eq!(unit["firewall"], serde_json::json!([]));
}

#[test]
fn module_maps_settings_to_the_binarys_variables() {
    let unit = eval(
        r#"{"pkgsPath": "/srv/pkgs", "port": 5000, "openFirewall": true,
            "storagePath": "/srv/nixery", "nixOptions": {"keep-going": "true", "cores": "2"},
            "extraEnvironment": {"RUST_LOG": "debug"}, "environmentFile": "/run/secrets/nixery",
            "logFormat": "json", "popularityUrl": "https://example.org/p.json",
            "maxQueuedBuilds": 8, "maxStorage": "50G", "minFreeSpace": "5G",
            "gcLease": 30, "layering": "nixery"}"#,
    );
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    let env = &unit["environment"];
    assert_eq!(env["NIXERY_PKGS_PATH"], "/srv/pkgs");
    assert_eq!(env["PORT"], "5000");
    assert_eq!(env["NIXERY_NIX_OPTIONS"], "cores=2;keep-going=true");
    assert_eq!(env["RUST_LOG"], "debug");
    assert_eq!(env["NIXERY_LOG_FORMAT"], "json");
    assert_eq!(env["NIXERY_LAYERING"], "nixery");
    assert_eq!(env["NIX_POPULARITY_URL"], "https://example.org/p.json");
    assert_eq!(env["NIXERY_MAX_QUEUED_BUILDS"], "8");
    assert_eq!(env["NIXERY_MAX_STORAGE"], "50G");
    assert_eq!(env["NIXERY_MIN_FREE_SPACE"], "5G");
    assert_eq!(env["NIXERY_GC_LEASE"], "30");
    assert_eq!(env["NIXERY_SCRUB_INTERVAL"], "604800");
    assert_eq!(env["NIXERY_SCRUB_RATE"], "20");
    let sc = &unit["serviceConfig"];
    // Storage outside /var/lib is opened up instead of created.
    assert!(sc.get("StateDirectory").is_none());
    assert_eq!(sc["ReadWritePaths"], serde_json::json!(["/srv/nixery"]));
    assert_eq!(sc["EnvironmentFile"], "/run/secrets/nixery");
    assert_eq!(unit["firewall"], serde_json::json!([5000]));
}

#[test]
fn module_passes_the_htpasswd_file_as_a_credential() {
    let unit =
        eval(r#"{"channel": "c", "htpasswdFile": "/run/secrets/htpasswd", "metricsPublic": true}"#);
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!(["htpasswd:/run/secrets/htpasswd"])
    );
    let env = &unit["environment"];
    assert_eq!(env["NIXERY_HTPASSWD"], "%d/htpasswd");
    assert_eq!(env["NIXERY_METRICS_PUBLIC"], "true");
    let (ok, stderr) = run_build_check(&unit);
    assert!(ok, "{stderr}");

    let in_store = eval(r#"{"channel": "c", "htpasswdFile": "/nix/store/x-htpasswd"}"#);
    let msgs = in_store["failedAssertions"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].as_str().unwrap().contains("htpasswdFile"),
        "{msgs:?}"
    );
}

#[test]
fn module_hands_tls_files_over_as_credentials() {
    let unit = eval(
        r#"{"channel": "c", "htpasswdFile": "/run/secrets/htpasswd",
            "tls": {"certFile": "/var/lib/pki/server.crt", "keyFile": "/run/secrets/server.key"}}"#,
    );
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!([
            "htpasswd:/run/secrets/htpasswd",
            "tls-cert:/var/lib/pki/server.crt",
            "tls-key:/run/secrets/server.key"
        ])
    );
    let env = &unit["environment"];
    assert_eq!(env["NIXERY_TLS_CERT"], "%d/tls-cert");
    assert_eq!(env["NIXERY_TLS_KEY"], "%d/tls-key");
    let (ok, stderr) = run_build_check(&unit);
    assert!(ok, "{stderr}");
    assert_eq!(unit["acmeCerts"], serde_json::json!({}));

    for (settings, says) in [
        (r#"{"tls": {"certFile": "/a.crt"}}"#, "go together"),
        (
            r#"{"tls": {"certFile": "/a.crt", "keyFile": "/nix/store/x-key"}}"#,
            "outside the Nix store",
        ),
        (
            r#"{"tls": {"certFile": "/a.crt", "keyFile": "/a.key", "acmeHost": "r.lan"}}"#,
            "not both",
        ),
    ] {
        let bad = eval(settings);
        let msgs = bad["failedAssertions"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{settings}: {msgs:?}");
        assert!(msgs[0].as_str().unwrap().contains(says), "{msgs:?}");
    }
}

#[test]
fn module_serves_the_acme_certificate_and_restarts_on_renewal() {
    let unit = eval(r#"{"channel": "c", "tls": {"acmeHost": "registry.example.org"}}"#);
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!([
            "tls-cert:/var/lib/acme/registry.example.org/fullchain.pem",
            "tls-key:/var/lib/acme/registry.example.org/key.pem"
        ])
    );
    assert_eq!(unit["environment"]["NIXERY_TLS_CERT"], "%d/tls-cert");
    assert_eq!(
        unit["acmeCerts"]["registry.example.org"]["reloadServices"],
        serde_json::json!(["nixery.service"])
    );
    for list in ["after", "wants"] {
        assert!(
            unit[list]
                .as_array()
                .unwrap()
                .contains(&"acme-registry.example.org.service".into()),
            "{list}"
        );
    }
    let (ok, stderr) = run_build_check(&unit);
    assert!(ok, "{stderr}");
}

#[test]
fn module_passes_the_nix_cache_key_as_a_credential() {
    let unit = eval(
        r#"{"channel": "c", "htpasswdFile": "/run/secrets/htpasswd",
            "nixCache": {"enable": true, "secretKeyFile": "/run/secrets/cache.secret"}}"#,
    );
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    assert!(unit["options"]
        .as_array()
        .unwrap()
        .contains(&"nixCache".into()));
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!([
            "htpasswd:/run/secrets/htpasswd",
            "nix-cache-key:/run/secrets/cache.secret"
        ])
    );
    assert_eq!(
        unit["environment"]["NIXERY_NIX_CACHE_KEY"],
        "%d/nix-cache-key"
    );
    let (ok, stderr) = run_build_check(&unit);
    assert!(ok, "{stderr}");

    let off = eval(r#"{"channel": "c"}"#);
    assert!(off["environment"].get("NIXERY_NIX_CACHE_KEY").is_none());
    for bad in [
        r#"{"channel": "c", "nixCache": {"enable": true, "secretKeyFile": null}}"#,
        r#"{"channel": "c", "nixCache": {"enable": true, "secretKeyFile": "/nix/store/x-key"}}"#,
    ] {
        let msgs = eval(bad)["failedAssertions"].clone();
        assert!(
            msgs.as_array().unwrap().len() == 1 && msgs[0].as_str().unwrap().contains("nixCache"),
            "{bad}: {msgs:?}"
        );
    }
}

#[test]
fn module_configures_an_s3_replica_with_credentials_from_a_file() {
    let unit = eval(
        r#"{"channel": "nixos-unstable", "storageBackend": "s3", "s3Bucket": "images",
            "s3Prefix": "reg", "s3Endpoint": "http://127.0.0.1:8333", "s3ForcePathStyle": true,
            "s3Redirect": true, "environmentFile": "/run/secrets/nixery-s3"}"#,
    );
    assert_eq!(unit["failedAssertions"], serde_json::json!([]));
    let env = &unit["environment"];
    assert_eq!(env["NIXERY_STORAGE_BACKEND"], "s3");
    assert_eq!(env["NIXERY_S3_BUCKET"], "images");
    assert_eq!(env["NIXERY_S3_PREFIX"], "reg");
    assert_eq!(env["NIXERY_S3_ENDPOINT"], "http://127.0.0.1:8333");
    assert_eq!(env["NIXERY_S3_FORCE_PATH_STYLE"], "true");
    assert_eq!(env["NIXERY_S3_REDIRECT"], "true");
    assert!(env.get("NIXERY_S3_REGION").is_none());
    assert!(env.get("AWS_SECRET_ACCESS_KEY").is_none());
    assert_eq!(
        unit["serviceConfig"]["EnvironmentFile"],
        "/run/secrets/nixery-s3"
    );
    let (ok, stderr) = run_build_check(&unit);
    assert!(ok, "{stderr}");

    let missing = eval(r#"{"channel": "nixos-unstable", "storageBackend": "s3"}"#);
    let msgs = missing["failedAssertions"].as_array().unwrap();
    assert!(
        msgs.iter()
            .any(|m| m.as_str().unwrap().contains("needs s3Bucket")),
        "{msgs:?}"
    );
}

#[test]
fn module_asserts_at_most_one_package_source() {
    // None is a mirror, which serves what was imported.
    let none = eval("{}");
    let msgs = none["failedAssertions"].as_array().unwrap();
    assert!(msgs.is_empty(), "{msgs:?}");
    let env = &none["environment"];
    for var in [
        "NIXERY_CHANNEL",
        "NIXERY_PKGS_REPO",
        "NIXERY_PKGS_PATH",
        "NIXERY_FLAKE",
    ] {
        assert!(env.get(var).is_none(), "{var} in {env}");
    }
    // The build-time check accepts a mirror too.
    let (ok, stderr) = run_build_check(&none);
    assert!(ok, "{stderr}");
    let two = eval(r#"{"channel": "a", "pkgsRepo": "b"}"#);
    let msgs = two["failedAssertions"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0]
            .as_str()
            .unwrap()
            .contains("at most one package source")
            && msgs[0].as_str().unwrap().contains("set: channel, pkgsRepo"),
        "{msgs:?}"
    );
    let secret_in_store = eval(r#"{"channel": "a", "environmentFile": "/nix/store/x-env"}"#);
    assert_eq!(
        secret_in_store["failedAssertions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn module_build_time_check_accepts_good_and_rejects_bad_settings() {
    // Paths of the running system need not exist at build time.
    let (ok, stderr) = run_build_check(&eval(r#"{"pkgsPath": "/srv/no/such/pkgs"}"#));
    assert!(ok, "{stderr}");

    let (ok, stderr) = run_build_check(&eval(r#"{"pkgsPath": "relative/pkgs"}"#));
    assert!(!ok);
    assert!(
        stderr.contains(
            "nixery: invalid configuration: --pkgs-path (NIXERY_PKGS_PATH) \"relative/pkgs\" must be an absolute path"
        ),
        "{stderr}"
    );

    let (ok, stderr) = run_build_check(&eval(
        r#"{"channel": "c", "popularityUrl": "ftp://example.org/p.json"}"#,
    ));
    assert!(!ok);
    assert!(
        stderr.contains("scheme \"ftp\" is not supported"),
        "{stderr}"
    );
}

/// Runs a unit's `ExecStart` with the binary under test and only the
/// unit's environment (plus `extra`, standing for its environment file).
fn run_unit(unit: &Value, extra: &[(&str, &str)]) -> std::process::Output {
    let exec = unit["serviceConfig"]["ExecStart"].as_str().unwrap();
    let command = exec.replace("@NIXERY@/bin/nixery", env!("CARGO_BIN_EXE_nixery"));
    let mut words = command.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap());
    cmd.args(words).env_clear();
    for (k, v) in unit["environment"].as_object().unwrap() {
        cmd.env(k, v.as_str().unwrap());
    }
    cmd.envs(extra.iter().copied());
    cmd.output().expect("the unit's command runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn module_collects_the_bucket_on_a_timer() {
    let none = eval(r#"{"channel": "a", "storageBackend": "s3", "s3Bucket": "b"}"#);
    assert_eq!(none["bucketGc"], Value::Null);
    assert_eq!(none["bucketGcTimer"], Value::Null);

    let weed = common::seaweed::Seaweed::start().await;
    let settings = serde_json::json!({
        "channel": "a", "storageBackend": "s3", "s3Bucket": "timer", "s3Prefix": "nixery",
        "s3Endpoint": weed.endpoint(), "s3ForcePathStyle": true,
        "s3CollectSchedule": "daily", "s3MaxStorage": "10G",
        "environmentFile": "/run/secrets/nixery-s3",
    });
    let evaluated = eval(&settings.to_string());
    assert_eq!(evaluated["failedAssertions"], serde_json::json!([]));
    let timer = &evaluated["bucketGcTimer"];
    assert_eq!(timer["timerConfig"]["OnCalendar"], "daily");
    assert_eq!(timer["wantedBy"], serde_json::json!(["timers.target"]));
    let unit = &evaluated["bucketGc"];
    assert_eq!(unit["serviceConfig"]["Type"], "oneshot");
    assert_eq!(unit["serviceConfig"]["DynamicUser"], true);
    assert_eq!(
        unit["serviceConfig"]["EnvironmentFile"],
        "/run/secrets/nixery-s3"
    );
    assert_eq!(unit["environment"]["NIXERY_MAX_STORAGE"], "10G");
    assert!(unit["environment"].get("STORAGE_PATH").is_none());

    // What the unit runs collects the bucket with what the unit sets.
    let credentials = [
        ("AWS_ACCESS_KEY_ID", common::seaweed::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", common::seaweed::SECRET_KEY),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let unit = eval(&settings.to_string())["bucketGc"].clone();
        run_unit(&unit, &credentials)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deleted 0 blobs"), "{stdout}");
}
