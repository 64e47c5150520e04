//! Cached-manifest latency while 200 distinct cold names arrive at once
//! (not a test): `cargo bench --bench flood`, or `scripts/bench`. Prints
//! p50/p99 of warm manifest GETs alone, then during the flood, and how the
//! flood was answered (429 beyond the queue).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{config, TestServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FLOOD: usize = 200;
const SAMPLES: usize = 400;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Sequential GETs of `url`: at least `SAMPLES`, and on until `done` says so.
async fn sample(client: &reqwest::Client, url: &str, done: impl Fn() -> bool) -> Vec<Duration> {
    let mut out = Vec::with_capacity(SAMPLES);
    while out.len() < SAMPLES || !done() {
        let start = Instant::now();
        let r = client.get(url).send().await.expect("GET");
        assert!(r.status().is_success(), "cached manifest: {}", r.status());
        r.bytes().await.expect("body");
        out.push(start.elapsed());
    }
    out.sort();
    out
}

fn report(what: &str, samples: &[Duration]) {
    println!(
        "cached manifest GET {what}: p50 {:.2} ms, p99 {:.2} ms ({} requests)",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples.len()
    );
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TestServer::start(&config(dir.path(), &[])).await;
        let client = reqwest::Client::new();
        let warm = s.url("/v2/hello/manifests/latest");
        let r = client.get(&warm).send().await.expect("first pull");
        assert!(r.status().is_success());

        report("alone", &sample(&client, &warm, || true).await);

        let flood: Vec<_> = (0..FLOOD)
            .map(|i| {
                let c = client.clone();
                let url = s.url(&format!("/v2/hello/bench-flood-{i}/manifests/latest"));
                tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
            })
            .collect();
        let flood_started = Instant::now();
        // Sampled until every flood request, admitted builds included, is
        // answered.
        let answered = Arc::new(AtomicBool::new(false));
        let outcome = {
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let mut refused = 0;
                let mut other = 0;
                for f in flood {
                    match f.await.expect("task") {
                        Ok(429) => refused += 1,
                        _ => other += 1,
                    }
                }
                answered.store(true, Ordering::Release);
                (refused, other)
            })
        };
        let during = sample(&client, &warm, || answered.load(Ordering::Acquire)).await;
        let sampled_for = flood_started.elapsed();
        let (refused, other) = outcome.await.expect("flood");
        report("during the flood", &during);
        println!(
            "flood: {FLOOD} cold names at once: {refused} answered 429, {other} admitted (queue {}); samples over {:.1} s, until the last admitted build answered",
            s.builder.queue_depth().1,
            sampled_for.as_secs_f64()
        );
        s.stop().await;
    });
}
