//! Prometheus metrics (OpenMetrics text at `GET /metrics` on the metrics port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `live` (the only webhook so far).
    pub webhook: &'static str,
    /// What happened: a decision (`annotated`, `nothing_to_add`, …) or an error
    /// (`bad_request`, `payload_too_large`, `unsupported_media_type`, `panic`, `timeout`).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    admission_requests: Family<AdmissionLabels, Counter>,
    admission_duration: Histogram,
    tls_reloads: Family<ResultLabels, Counter>,
    connections: Family<ResultLabels, Counter>,
    namespaces_opted_in: Gauge,
}

/// Latency buckets from 25 µs to 1 s: decisions take microseconds, TLS and queueing more.
const DURATION_BUCKETS: [f64; 12] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("velero_jupyterhub");
        let admission_requests = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "AdmissionReview requests by webhook and outcome",
            admission_requests.clone(),
        );
        let admission_duration = Histogram::new(DURATION_BUCKETS);
        registry.register(
            "admission_duration_seconds",
            "Time to answer an AdmissionReview, from the request head to the response (body read, decision, encoding)",
            admission_duration.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Serving certificate (re)loads from files, by result",
            tls_reloads.clone(),
        );
        let connections = Family::<ResultLabels, Counter>::default();
        registry.register(
            "connections",
            "TCP connections to the webhook port, by how the TLS handshake went (the API server keeps connections alive: a steady climb means churn)",
            connections.clone(),
        );
        let namespaces_opted_in = Gauge::default();
        registry.register(
            "namespaces_opted_in",
            "Namespaces labelled velero-jupyterhub.io/enabled=true in the namespace cache",
            namespaces_opted_in.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry,
            admission_requests,
            admission_duration,
            tls_reloads,
            connections,
            namespaces_opted_in,
        }
    }

    pub fn admission(&self, webhook: &'static str, outcome: &'static str, seconds: f64) {
        self.admission_requests
            .get_or_create(&AdmissionLabels { webhook, outcome })
            .inc();
        self.admission_duration.observe(seconds);
    }

    pub fn admission_count(&self, webhook: &'static str, outcome: &'static str) -> u64 {
        self.admission_requests
            .get_or_create(&AdmissionLabels { webhook, outcome })
            .get()
    }

    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// `result`: `accepted`, `handshake_failed` or `handshake_timeout`.
    pub fn connection(&self, result: &'static str) {
        self.connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn connection_count(&self, result: &'static str) -> u64 {
        self.connections
            .get_or_create(&ResultLabels { result })
            .get()
    }

    pub fn set_namespaces_opted_in(&self, n: usize) {
        self.namespaces_opted_in
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
