//! Work a client can cause is bounded: the build queue refuses with 429
//! beyond its limit while cached images are served, a queued build whose
//! clients left is dropped, and failures are answered from memory.

mod common;

use common::{error_code, fresh_server, get_manifest, header, status_json};
use reqwest::{Client, StatusCode};
use std::time::Duration;

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_flood_of_cold_names_gets_429_while_cached_images_are_served() {
    let (_dir, s) =
        fresh_server(&["--max-concurrent-builds", "1", "--max-queued-builds", "4"]).await;
    let c = Client::new();
    let (cached, _) = get_manifest(&c, &s, "hello", "latest").await;
    let builds_before = s.builder.db().builds().unwrap().len();

    // 200 distinct cold names at once; each would need a Nix evaluation.
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            let url = s.url(&format!("/v2/hello/nosuch-flood-{i}/manifests/latest"));
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                let retry_after = r.headers().get("retry-after").is_some();
                let (status, err) = error_code(r).await;
                (
                    status,
                    err["code"].as_str().unwrap_or_default().to_owned(),
                    retry_after,
                )
            })
        })
        .collect();
    // The cached image is served during the flood.
    for _ in 0..20 {
        let (d, _) = get_manifest(&c, &s, "hello", "latest").await;
        assert_eq!(d, cached);
    }
    let mut refused = 0;
    let mut answered = 0;
    for f in flood {
        let (status, code, retry_after) = f.await.unwrap();
        match status {
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(code, "TOOMANYREQUESTS");
                assert!(retry_after, "429 carries Retry-After");
                refused += 1;
            }
            StatusCode::NOT_FOUND => {
                assert_eq!(code, "MANIFEST_UNKNOWN");
                answered += 1;
            }
            other => panic!("unexpected {other} for a cold name"),
        }
    }
    // At most one running and four queued at any time; the requests
    // arrive faster than one evaluation, so nearly all are refused.
    assert!(refused >= 150, "refused {refused}, answered {answered}");
    let builds = s.builder.db().builds().unwrap().len() - builds_before;
    assert_eq!(builds, answered, "only admitted names were evaluated");
    println!("flood: {refused} of 200 cold names refused with 429, {answered} built");
    s.stop().await;
}

#[tokio::test]
async fn a_queued_build_whose_clients_left_is_dropped() {
    let (_dir, s) = fresh_server(&["--max-concurrent-builds", "1"]).await;
    let c = Client::new();
    // `sleepy` holds the only build slot for 10 s.
    let busy = {
        let (c, url) = (c.clone(), s.url("/v2/sleepy/manifests/latest"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    };
    wait_until("sleepy to build", async || {
        status_json(&c, &s).await["in_flight"]
            .as_array()
            .is_some_and(|f| f.iter().any(|b| b["phase"] == "building"))
    })
    .await;
    // A client that gives up while its build waits for the slot.
    let impatient = Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let gave_up = impatient
        .get(s.url("/v2/hello/bash/manifests/latest"))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    wait_until("the abandoned build to leave the list", async || {
        let st = status_json(&c, &s).await;
        let in_flight = st["in_flight"].as_array().cloned().unwrap_or_default();
        in_flight.len() == 1
            && in_flight[0]["image"] == "sleepy"
            && st["limits"]["queued_builds"] == 0
    })
    .await;
    assert_eq!(busy.await.unwrap(), StatusCode::OK);
    let st = status_json(&c, &s).await;
    assert_eq!(
        st["in_flight"],
        serde_json::json!([]),
        "nothing started after sleepy"
    );
    let builds = s.builder.db().builds().unwrap();
    assert!(
        builds.iter().all(|b| b.image != "hello/bash"),
        "the dropped build never ran"
    );
    s.stop().await;
}

#[tokio::test]
async fn failures_are_answered_from_memory() {
    let (_dir, s) = fresh_server(&["--failed-build-ttl", "600"]).await;
    let c = Client::new();
    for url in [
        "/v2/hello/nosuchpkg/manifests/latest",
        "/v2/broken/manifests/latest",
    ] {
        let first = error_code(c.get(s.url(url)).send().await.unwrap()).await;
        let builds = s.builder.db().builds().unwrap().len();
        let second = error_code(c.get(s.url(url)).send().await.unwrap()).await;
        assert_eq!(first, second, "{url}: the same error");
        assert_eq!(
            s.builder.db().builds().unwrap().len(),
            builds,
            "{url}: no second build"
        );
    }
    s.stop().await;
    // A zero TTL remembers nothing but "not found" (a moving source keeps
    // that for the cache TTL).
    let (_dir, s) = fresh_server(&["--failed-build-ttl", "0", "--cache-ttl", "0"]).await;
    let r = c
        .get(s.url("/v2/broken/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    let r = c
        .get(s.url("/v2/broken/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    assert_eq!(s.builder.db().builds().unwrap().len(), 2);
    assert_eq!(header(&r, "content-type"), "application/json");
    s.stop().await;
}
