//! The admin page, `/api/status` and `/metrics` against a real server and
//! real Nix builds of the fixture set, and the page in headless Chromium.

mod common;

use common::browser::Browser;
use common::{artifacts_dir, config, TestServer};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

async fn get(c: &Client, s: &TestServer, path: &str) -> reqwest::Response {
    c.get(s.url(path)).send().await.unwrap()
}

async fn status_json(c: &Client, s: &TestServer) -> Value {
    let r = get(c, s, "/api/status").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

async fn page(c: &Client, s: &TestServer) -> String {
    let r = get(c, s, "/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    r.text().await.unwrap()
}

/// Entities spelled one way, whichever the template engine chose.
fn named_entities(html: &str) -> String {
    html.replace("&#60;", "&lt;")
        .replace("&#62;", "&gt;")
        .replace("&#34;", "&quot;")
        .replace("&#38;", "&amp;")
}

fn build<'a>(status: &'a Value, image: &str) -> &'a Value {
    status["builds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["image"] == image)
        .unwrap_or_else(|| panic!("no build of {image} in {status}"))
}

/// Checks the OpenMetrics/Prometheus text line by line (names, labels,
/// values, TYPE before samples, `# EOF` last), then parses it with a
/// Prometheus text parser; returns samples as `name{labels}` -> value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "exposition ends with # EOF");
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut families: Vec<String> = Vec::new();
    let mut samples = HashMap::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap_or_default();
            assert!(matches!(kind, "HELP" | "TYPE"), "comment {line}");
            assert!(name_ok(name), "metric name in {line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or_default();
                assert!(
                    matches!(t, "counter" | "gauge" | "histogram" | "summary" | "unknown"),
                    "{line}"
                );
                families.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "name in {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(name_ok(k), "label name in {line}");
                    assert!(!v.contains('\n'));
                }
            }
        }
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{name} has a TYPE line before it"
        );
        samples.insert(series.to_owned(), value);
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert!(!scrape.samples.is_empty());
    samples
}

#[tokio::test]
async fn page_json_and_metrics_show_builds_cache_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let c = Client::new();

    // Nothing yet: the page renders, the hit rate is undefined.
    let empty = status_json(&c, &s).await;
    assert_eq!(empty["builds"], serde_json::json!([]));
    assert!(empty["cache"]["hit_rate"].is_null());
    assert!(page(&c, &s).await.contains("No builds yet."));

    // A build, a cache hit, unknown packages and a failing Nix build.
    for (path, want) in [
        ("/v2/hello/manifests/latest", StatusCode::OK),
        ("/v2/hello/manifests/latest", StatusCode::OK),
        (
            "/v2/hello/nosuchpkg/manifests/latest",
            StatusCode::NOT_FOUND,
        ),
        (
            "/v2/script-error/manifests/latest",
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ] {
        assert_eq!(get(&c, &s, path).await.status(), want, "{path}");
    }
    let manifest: Value = serde_json::from_slice(
        &get(&c, &s, "/v2/hello/manifests/latest")
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let layers_in_manifest = manifest["layers"].as_array().unwrap().len() as u64;
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    assert_eq!(
        get(&c, &s, &format!("/v2/hello/blobs/{layer}"))
            .await
            .status(),
        StatusCode::OK
    );

    let st = status_json(&c, &s).await;
    assert_eq!(st["instance"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["instance"]["storage_path"], dir.path().to_str().unwrap());
    assert!(st["instance"]["source"]
        .as_str()
        .unwrap()
        .starts_with("path:"));
    assert_eq!(st["in_flight"], serde_json::json!([]));
    assert_eq!(st["builds"].as_array().unwrap().len(), 3);
    let hello = build(&st, "hello");
    assert_eq!(hello["result"], "success");
    assert_eq!(hello["layers_total"].as_u64(), Some(layers_in_manifest));
    assert_eq!(
        hello["layers_reused"].as_u64().unwrap() + hello["layers_built"].as_u64().unwrap(),
        layers_in_manifest
    );
    assert!(hello["bytes_packed"].as_u64().unwrap() > 0);
    let phases: Vec<&str> = hello["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["resolve", "nix build", "closure", "layering", "packing"]
    );
    let not_found = build(&st, "hello/nosuchpkg");
    assert_eq!(not_found["result"], "not_found");
    assert_eq!(not_found["message"], "packages not found: nosuchpkg");
    assert_eq!(build(&st, "script-error")["result"], "failed");

    let errors = st["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["image"], "script-error");
    assert!(errors[0]["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("<script>alert(1)</script>"));
    assert_eq!(errors[1]["message"], "packages not found: nosuchpkg");

    let cache = &st["cache"];
    assert_eq!(cache["manifests"], 1);
    assert_eq!(cache["layers"].as_u64(), Some(layers_in_manifest));
    // Layers, the image config and the manifest.
    assert_eq!(cache["blobs"].as_u64(), Some(layers_in_manifest + 2));
    assert!(cache["blob_bytes"].as_u64().unwrap() > 0);
    assert!(cache["free_bytes"].as_u64().unwrap() > 0);
    // Hits: the 2nd and 5th hello; misses: hello, nosuchpkg, script-error.
    assert_eq!(
        (
            cache["manifest_hits"].as_u64(),
            cache["manifest_misses"].as_u64()
        ),
        (Some(2), Some(3))
    );
    assert_eq!(cache["hit_rate"].as_f64(), Some(0.4));
    assert_eq!(
        cache["most_pulled"],
        serde_json::json!([{"name": "hello", "count": 3}])
    );
    assert!(cache["popular_packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "hello-2.10"));

    // The page: usage with the host the client used, figures, and Nix's
    // markup escaped.
    let html = page(&c, &s).await;
    assert!(!html.contains("<script"), "no markup from Nix or requests");
    let html = named_entities(&html);
    for want in [
        format!("docker pull {}/shell/hello", s.addr),
        format!("docker run --rm {}/shell/nonroot sh", s.addr),
        format!(
            "<code>{}</code>",
            st["instance"]["source"].as_str().unwrap()
        ),
        format!("<code>{}</code>", dir.path().display()),
        "hello:latest".to_owned(),
        "packages not found: nosuchpkg".to_owned(),
        "&lt;script&gt;alert(1)&lt;/script&gt;".to_owned(),
        "40 %".to_owned(),
        "Nothing is building.".to_owned(),
    ] {
        assert!(html.contains(&want), "page shows {want} in {html}");
    }

    // A Host header with markup is escaped too.
    let r = c
        .get(s.url("/"))
        .header("host", "x\"><script>alert(2)</script>")
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(!html.contains("<script"));
    assert!(
        named_entities(&html)
            .contains("docker pull x&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;/shell/hello"),
        "host escaped in {html}"
    );

    // Metrics parse, with low-cardinality route labels.
    let r = get(&c, &s, "/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    assert!(!text.contains("hello"), "no image names in labels");
    let m = parse_metrics(&text);
    for (series, want) in [
        ("nixery_builds_total{result=\"success\"}", 1.0),
        ("nixery_builds_total{result=\"not_found\"}", 1.0),
        ("nixery_builds_total{result=\"failed\"}", 1.0),
        ("nixery_manifest_cache_lookups_total{result=\"hit\"}", 2.0),
        ("nixery_manifest_cache_lookups_total{result=\"miss\"}", 3.0),
        (
            "nixery_http_requests_total{route=\"manifests\",status=\"200\"}",
            3.0,
        ),
        (
            "nixery_http_requests_total{route=\"manifests\",status=\"404\"}",
            1.0,
        ),
        (
            "nixery_http_requests_total{route=\"blobs\",status=\"200\"}",
            1.0,
        ),
        ("nixery_blob_bytes_served_total", layer_size as f64),
        ("nixery_builds_in_flight", 0.0),
        (
            "nixery_build_phase_duration_seconds_count{phase=\"packing\"}",
            1.0,
        ),
        (
            "nixery_http_request_duration_seconds_count{route=\"manifests\"}",
            5.0,
        ),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series} in\n{text}");
    }
    s.stop().await;

    // Builds, errors, pulls and the hit rate survive a restart.
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let again = status_json(&c, &s).await;
    assert_eq!(again["builds"], st["builds"]);
    assert_eq!(again["errors"], st["errors"]);
    assert_eq!(again["cache"]["most_pulled"], st["cache"]["most_pulled"]);
    assert_eq!(again["cache"]["hit_rate"], st["cache"]["hit_rate"]);
    s.stop().await;
}

/// Polls `/api/status` until `pred` holds.
async fn wait_for(c: &Client, s: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = status_json(c, s).await;
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs browser steps off the async runtime, which keeps serving.
async fn in_browser<T: Send + 'static>(
    browser: Browser,
    f: impl FnOnce(&mut Browser) -> T + Send + 'static,
) -> (Browser, T) {
    tokio::task::spawn_blocking(move || {
        let mut b = browser;
        let out = f(&mut b);
        (b, out)
    })
    .await
    .expect("browser steps")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_a_live_build_and_then_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(&config(dir.path(), &[])).await;
    let c = Client::new();
    let base = s.url("/");
    let browser = tokio::task::spawn_blocking(Browser::launch).await.unwrap();

    // The harness sees console errors, exceptions and failed loads, or a
    // clean run below would prove nothing.
    let probe = s.url("/no-such-image.png");
    let (browser, seen) = in_browser(browser, move |b| {
        b.navigate(&format!(
            "data:text/html,<img src=\"{probe}\"><script>console.error('probe-error'); throw new Error('probe-exception')</script>"
        ));
        b.console_errors()
    })
    .await;
    let seen = seen.join("\n");
    assert!(seen.contains("probe-error"), "{seen}");
    assert!(seen.contains("probe-exception"), "{seen}");
    assert!(seen.contains("no-such-image.png"), "{seen}");
    let (mut browser, ()) = in_browser(browser, |b| {
        b.navigate("about:blank");
    })
    .await;
    let probe_events = browser.console_errors().len();

    // A build in flight (the fixture's `sleepy` builds for 10 s).
    let pull = {
        let c = c.clone();
        let url = s.url("/v2/sleepy/manifests/latest");
        tokio::spawn(async move { c.get(url).send().await.unwrap() })
    };
    wait_for(&c, &s, "sleepy building with Nix", |st| {
        st["in_flight"][0]["phase"] == "building"
    })
    .await;
    let url = base.clone();
    let (b, live) = in_browser(browser, move |b| {
        b.navigate(&url);
        let live = b.text("#in-flight");
        b.screenshot(&artifacts_dir().join("admin-in-flight.png"));
        live
    })
    .await;
    browser = b;
    assert!(live.contains("sleepy:latest"), "in flight: {live}");
    assert!(live.contains("building with Nix"), "in flight: {live}");
    assert!(live.contains("Builds in flight (1)"), "in flight: {live}");

    // Finished: the build's figures as the JSON has them.
    let r = pull.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let manifest: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let st = status_json(&c, &s).await;
    assert_eq!(st["in_flight"], serde_json::json!([]));
    let sleepy = build(&st, "sleepy");
    assert_eq!(sleepy["result"], "success");
    assert_eq!(
        sleepy["layers_total"].as_u64(),
        Some(manifest["layers"].as_array().unwrap().len() as u64)
    );
    let nix_ms = sleepy["phases"][1]["ms"].as_u64().unwrap();
    assert!(nix_ms >= 10_000, "the Nix phase took the builder's 10 s");
    let url = base.clone();
    let (b, (flight, builds, cache)) = in_browser(browser, move |b| {
        b.navigate(&url);
        let texts = (b.text("#in-flight"), b.text("#builds"), b.text("#cache"));
        b.screenshot(&artifacts_dir().join("admin-finished.png"));
        texts
    })
    .await;
    browser = b;
    assert!(flight.contains("Nothing is building."), "{flight}");
    let row = builds
        .lines()
        .find(|l| l.contains("sleepy:latest"))
        .unwrap_or_else(|| panic!("no sleepy row in {builds}"));
    let cells: Vec<&str> = row.split('\t').map(str::trim).collect();
    assert!(cells.contains(&"success"), "{row}");
    assert!(
        cells.contains(&sleepy["layers_total"].to_string().as_str()),
        "layer count in {row}"
    );
    assert!(
        cells.contains(
            &format!("{} / {}", sleepy["layers_reused"], sleepy["layers_built"]).as_str()
        ),
        "reused / built in {row}"
    );
    assert!(
        row.contains(&format!("nix build {:.1} s", nix_ms as f64 / 1000.0)),
        "{row}"
    );
    assert!(cache.contains("sleepy"), "most pulled: {cache}");

    let errors = browser.console_errors();
    assert_eq!(
        &errors[probe_events..],
        &[] as &[String],
        "console errors on the admin page"
    );
    drop(browser);
    s.stop().await;
}
