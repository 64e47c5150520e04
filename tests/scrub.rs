//! Scrubbing against a real server: a byte flipped in a stored layer from
//! outside is found, the blob is quarantined and never served again, by
//! digest or in an image, and the image is built again on its next pull.

mod common;

use common::{blob_path, config, get_blob, get_manifest, largest_layer, status_json, TestServer};
use reqwest::{Client, StatusCode};
use std::time::{Duration, Instant};

fn flip_a_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    // In place, as damage would be (blobs are stored read-only; the tests
    // run as root).
    std::fs::write(path, &bytes).unwrap();
}

#[tokio::test]
async fn a_flipped_byte_is_quarantined_never_served_and_the_image_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new();
    let limits = ["--scrub-interval", "1", "--scrub-rate", "50"];
    let s = TestServer::start(&config(dir.path(), &limits)).await;
    let (first, hello) = get_manifest(&c, &s, "hello", "latest").await;
    let layer = largest_layer(&hello);
    flip_a_byte(&blob_path(dir.path(), &layer));

    let started = Instant::now();
    let scrub = loop {
        let scrub = status_json(&c, &s).await["limits"]["scrub"].clone();
        if scrub["quarantined_total"].as_u64().unwrap() > 0 {
            break scrub;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "{scrub}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(scrub["quarantined"][0]["digest"], layer, "{scrub}");
    assert!(
        scrub["quarantined"][0]["rebuild"].as_u64().unwrap() >= 1,
        "{scrub}"
    );
    let hex = layer.trim_start_matches("sha256:");
    assert!(dir.path().join("quarantine").join(hex).is_file());

    // Never served by digest.
    let r = c
        .get(s.url(&format!("/v2/hello/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Nor by the old manifest's digest: its image is gone.
    let r = c
        .get(s.url(&format!("/v2/hello/manifests/{first}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The next pull builds the image again, and all of it is whole.
    let (_, again) = get_manifest(&c, &s, "hello", "latest").await;
    let builds = s.builder.db().builds().unwrap();
    assert_eq!(builds.iter().filter(|b| b.image == "hello").count(), 2);
    for l in common::layer_digests(&again) {
        get_blob(&c, &s, &l).await;
    }
    assert_eq!(
        common::corrupt_blobs_on_disk(dir.path()),
        Vec::<String>::new()
    );

    let page = common::admin_page(&c, &s).await;
    assert!(page.contains(&layer), "the admin page lists it");
    let metrics = c.get(s.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("nixery_scrub_blobs_quarantined_total 1"),
        "{metrics}"
    );
    s.stop().await;
}
