//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format
//! (which Prometheus scrapes natively).
//!
//! Every label takes a few fixed values: routes are classified, never
//! named by image, so a scraper's series stay bounded whatever is pulled.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a request was for, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    base,
    manifests,
    blobs,
    tags,
    admin,
    api,
    metrics,
    /// The Nix binary cache (`/nix-cache/`).
    nix_cache,
    other,
}

impl Route {
    /// Classifies a request path; image names never become labels.
    pub fn of(path: &str) -> Route {
        match path {
            "/" => Route::admin,
            p if p.starts_with("/images/") => Route::admin,
            p if p.starts_with("/api/") => Route::api,
            "/metrics" => Route::metrics,
            p if p.starts_with("/nix-cache/") => Route::nix_cache,
            "/v2" | "/v2/" => Route::base,
            p if p.starts_with("/v2/") => {
                if p.contains("/manifests/") {
                    Route::manifests
                } else if p.contains("/blobs/") {
                    Route::blobs
                } else if p.ends_with("/tags/list") {
                    Route::tags
                } else {
                    Route::other
                }
            }
            _ => Route::other,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

/// How a build ended, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BuildResult {
    success,
    not_found,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: BuildResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// One of the builder's fixed phase names.
    phase: String,
}

/// Whether a cache had what was asked for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheResult {
    hit,
    miss,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: CacheResult,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies: 1 ms to about 30 min, since a manifest request can
/// wait for a whole build.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 3.0, 14))
}

/// Phase durations: 10 ms to about 30 min.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 12))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    builds: Family<ResultLabels, Counter>,
    builds_in_flight: Gauge,
    phases: HistogramFamily<PhaseLabels>,
    manifest_cache: Family<CacheLabels, Counter>,
    layer_cache: Family<CacheLabels, Counter>,
    blob_bytes: Counter,
    /// One sample, and only over TLS.
    tls_expiry: Family<Vec<(String, String)>, Gauge>,
    scrub: crate::store::scrub::Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nixery");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let builds = Family::<ResultLabels, Counter>::default();
        registry.register("builds", "Image builds by result", builds.clone());
        let builds_in_flight = Gauge::default();
        registry.register(
            "builds_in_flight",
            "Image builds running or waiting for a slot",
            builds_in_flight.clone(),
        );
        let phases: HistogramFamily<PhaseLabels> =
            Family::new_with_constructor(phase_histogram as fn() -> Histogram);
        registry.register(
            "build_phase_duration_seconds",
            "Duration of each build phase",
            phases.clone(),
        );
        let manifest_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "manifest_cache_lookups",
            "Manifest requests by tag answered from the cache (hit) or by a build (miss)",
            manifest_cache.clone(),
        );
        let layer_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "layer_cache_lookups",
            "Layers of builds reused from the layer index (hit) or packed (miss)",
            layer_cache.clone(),
        );
        let blob_bytes = Counter::default();
        registry.register(
            "blob_bytes_served",
            "Bytes of blob and layer bodies sent to clients",
            blob_bytes.clone(),
        );
        let tls_expiry = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until the served TLS certificate expires (negative once it has)",
            tls_expiry.clone(),
        );
        let scrub = crate::store::scrub::Counters::default();
        registry.register(
            "scrub_bytes_checked",
            "Bytes of stored blobs hashed again by the scrub",
            scrub.bytes.clone(),
        );
        registry.register(
            "scrub_blobs_quarantined",
            "Stored blobs the scrub found damaged and moved aside",
            scrub.quarantined.clone(),
        );
        // Both cache outcomes and all build results appear from the start,
        // so rates are defined before the first build.
        for result in [CacheResult::hit, CacheResult::miss] {
            manifest_cache.get_or_create_owned(&CacheLabels { result });
            layer_cache.get_or_create_owned(&CacheLabels { result });
        }
        for result in [
            BuildResult::success,
            BuildResult::not_found,
            BuildResult::failed,
        ] {
            builds.get_or_create_owned(&ResultLabels { result });
        }
        Metrics {
            registry,
            requests,
            latency,
            builds,
            builds_in_flight,
            phases,
            manifest_cache,
            layer_cache,
            blob_bytes,
            tls_expiry,
            scrub,
        }
    }

    /// The counters the scrub adds to.
    pub fn scrub_counters(&self) -> crate::store::scrub::Counters {
        self.scrub.clone()
    }

    pub fn request(&self, route: Route, status: u16, latency: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(latency.as_secs_f64());
    }

    pub fn blob_bytes(&self, n: u64) {
        self.blob_bytes.inc_by(n);
    }

    pub fn manifest_lookup(&self, result: CacheResult) {
        self.manifest_cache
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    pub fn build_started(&self) {
        self.builds_in_flight.inc();
    }

    pub fn build_ended(&self) {
        self.builds_in_flight.dec();
    }

    /// A finished build: its result, phases and layer reuse.
    pub fn build_finished(
        &self,
        result: BuildResult,
        phases: &[(String, u64)],
        layers_reused: u64,
        layers_built: u64,
    ) {
        self.builds.get_or_create(&ResultLabels { result }).inc();
        for (phase, ms) in phases {
            self.phases
                .get_or_create(&PhaseLabels {
                    phase: phase.clone(),
                })
                .observe(*ms as f64 / 1000.0);
        }
        self.layer_cache
            .get_or_create(&CacheLabels {
                result: CacheResult::hit,
            })
            .inc_by(layers_reused);
        self.layer_cache
            .get_or_create(&CacheLabels {
                result: CacheResult::miss,
            })
            .inc_by(layers_built);
    }

    /// Seconds the served certificate has left, set before each scrape.
    pub fn tls_seconds_left(&self, seconds: i64) {
        self.tls_expiry.get_or_create(&Vec::new()).set(seconds);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_classified_without_names() {
        assert_eq!(Route::of("/v2/"), Route::base);
        assert_eq!(
            Route::of("/v2/shell/hello/manifests/latest"),
            Route::manifests
        );
        assert_eq!(Route::of("/v2/a/blobs/sha256:00"), Route::blobs);
        assert_eq!(Route::of("/v2/a/b/tags/list"), Route::tags);
        assert_eq!(Route::of("/"), Route::admin);
        assert_eq!(Route::of("/api/status"), Route::api);
        assert_eq!(Route::of("/api/history"), Route::api);
        assert_eq!(Route::of("/api/images/shell/hello"), Route::api);
        assert_eq!(Route::of("/images/shell/hello"), Route::admin);
        assert_eq!(Route::of("/metrics"), Route::metrics);
        assert_eq!(Route::of("/nix-cache/nix-cache-info"), Route::nix_cache);
        assert_eq!(Route::of("/nix-cache/nar/x.nar.zst"), Route::nix_cache);
        assert_eq!(Route::of("/favicon.ico"), Route::other);
        assert_eq!(Route::of("/v2/a/other"), Route::other);
    }

    #[test]
    fn encodes_every_family() {
        let m = Metrics::new();
        m.request(Route::manifests, 200, Duration::from_millis(5));
        m.blob_bytes(10);
        m.manifest_lookup(CacheResult::hit);
        m.build_finished(BuildResult::success, &[("resolve".into(), 20)], 1, 2);
        let text = m.encode().unwrap();
        for line in [
            "nixery_http_requests_total{route=\"manifests\",status=\"200\"} 1",
            "nixery_blob_bytes_served_total 10",
            "nixery_manifest_cache_lookups_total{result=\"hit\"} 1",
            "nixery_builds_total{result=\"success\"} 1",
            "nixery_layer_cache_lookups_total{result=\"miss\"} 2",
            "nixery_build_phase_duration_seconds_count{phase=\"resolve\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
