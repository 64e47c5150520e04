//! Images built by the server share the layer of a large dependency they
//! have in common, under the default layering, even when the budget forces
//! merges (real Nix builds of the fixture package set).

mod common;

use common::{fresh_server, get_manifest, TestServer};
use reqwest::Client;
use serde_json::Value;
use std::collections::HashMap;

/// Layers of the image above 100 MB (only the fixture's `big` is): digest
/// to size.
async fn large_layers(c: &Client, s: &TestServer, image: &str) -> HashMap<String, u64> {
    let (_, m) = get_manifest(c, s, image, "latest").await;
    let layers: &Vec<Value> = m["layers"].as_array().expect("layers");
    // A budget of 3 plus the symlink layer.
    assert_eq!(layers.len(), 4, "{image}: {m}");
    layers
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().expect("digest").to_owned();
            (digest, l["size"].as_u64().expect("size"))
        })
        .filter(|(_, size)| *size > 100_000_000)
        .collect()
}

/// `bigview` and `bigcount` both depend on `big` (110 MB); each image also
/// holds its tool, busybox, cacert and iana-etc: five paths for a budget of
/// three, so something must be merged.
async fn shared_large_layers(layering: Option<&str>) -> usize {
    let mut flags = vec!["--layer-budget", "3"];
    if let Some(name) = layering {
        flags.extend(["--layering", name]);
    }
    let (_dir, s) = fresh_server(&flags).await;
    let c = Client::new();
    let view = large_layers(&c, &s, "bigview").await;
    let count = large_layers(&c, &s, "bigcount").await;
    assert_eq!(view.len(), 1, "big is in exactly one layer: {view:?}");
    assert_eq!(count.len(), 1, "big is in exactly one layer: {count:?}");
    s.stop().await;
    view.keys().filter(|d| count.contains_key(*d)).count()
}

#[tokio::test]
async fn images_share_a_large_dependency_layer_under_the_default() {
    assert_eq!(shared_large_layers(None).await, 1);
}

/// The control: the original's strategy merges `big` with whatever else
/// its ratings put last, differently per image, so the same check fails.
#[tokio::test]
async fn the_original_strategy_does_not_share_it() {
    assert_eq!(shared_large_layers(Some("nixery")).await, 0);
}
