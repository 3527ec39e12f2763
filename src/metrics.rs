//! Prometheus metrics (OpenMetrics text at `GET /metrics` on the operations port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// The webhook entry that called: `live` (`/mutate/live`, and `/mutate` as
    /// configurations installed before the paths were split still call it).
    pub webhook: &'static str,
    /// What happened: a decision (`annotated`, `nothing_to_add`, …) or an error
    /// (`bad_request`, `payload_too_large`, `length_required`, `unsupported_media_type`,
    /// `timeout`, `panic`).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `webhook` (HTTPS) or `ops` (probes and metrics).
    pub listener: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabels {
    pub namespace: String,
    pub claim: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: &'static str,
    pub resource: &'static str,
}

/// The controller's metrics (registered only by `controller`).
#[derive(Default)]
pub struct ControllerMetrics {
    pub helpers: Family<StateLabels, Gauge>,
    pub windows_open: Gauge,
    pub backfilled: Counter,
    pub reconcile_errors: Counter,
    pub api_writes: Family<WriteLabels, Counter>,
    pub leader: Gauge,
    pub last_pass: Gauge,
    pub restore_helpers: Family<StateLabels, Gauge>,
    pub restored_bytes: Counter,
    pub restores_failed: Counter,
    pub claim_last_backup: Family<ClaimLabels, Gauge>,
    pub claims: Family<StateLabels, Gauge>,
    pub claims_stale: Gauge,
    pub certificate_steps: Family<StepLabels, Counter>,
    pub certificate_errors: Family<ReasonLabels, Counter>,
    pub ca_expiry: Gauge,
    pub waves: Family<ScheduleLabels, Counter>,
    pub wave_claims: Family<ScheduleLabels, Counter>,
    pub wave_given_up: Family<ScheduleLabels, Counter>,
    pub run_waves: Family<ScheduleLabels, Gauge>,
    pub run_not_reached: Family<ScheduleLabels, Gauge>,
    pub run_duration: Family<ScheduleLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabels {
    pub schedule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: &'static str,
}

impl ControllerMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "backup_helpers",
            "Backup helper pods by phase (Pending, Running, other), as the pod watch sees them",
            self.helpers.clone(),
        );
        registry.register(
            "backup_windows_open",
            "Opted-in namespaces with a backup window open now",
            self.windows_open.clone(),
        );
        registry.register(
            "backfilled_pods",
            "Live user pods whose backup annotation the controller added (the webhook missed them)",
            self.backfilled.clone(),
        );
        registry.register(
            "reconcile_errors",
            "API writes the controller attempted that failed (each retried on the next pass)",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "api_writes",
            "API writes by verb and resource: zero in steady state, a rate proportional to changes otherwise",
            self.api_writes.clone(),
        );
        registry.register(
            "claim_last_backup_timestamp_seconds",
            "Per user claim: when its last completed file-system backup (of a restorable Backup) finished; 0 if never",
            self.claim_last_backup.clone(),
        );
        registry.register(
            "claims",
            "User claims by who holds them (live, idle, backup-helper, restoring), as `velero-jupyterhub status` shows them",
            self.claims.clone(),
        );
        registry.register(
            "claims_stale",
            "User claims with no completed backup within --stale-after (or never): alert on > 0",
            self.claims_stale.clone(),
        );
        registry.register(
            "restore_helpers",
            "Restore helper pods by state (restoring, failed: kept for inspection, done: about to be deleted)",
            self.restore_helpers.clone(),
        );
        registry.register(
            "restored_bytes",
            "Bytes Velero restored into volumes of restore helpers (PodVolumeRestores Completed)",
            self.restored_bytes.clone(),
        );
        registry.register(
            "restore_volumes_failed",
            "Volumes of restore helpers whose PodVolumeRestore failed, or was unfinished when its Restore ended",
            self.restores_failed.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the controller's Lease",
            self.leader.clone(),
        );
        registry.register(
            "reconcile_last_pass_timestamp_seconds",
            "When the leader's reconcile loop last finished a pass (Unix seconds; passes come at least every 5 minutes)",
            self.last_pass.clone(),
        );
        registry.register(
            "certificate_steps",
            "Self-managed certificates: steps taken (create, issue, introduce, promote, retire, write_bundle)",
            self.certificate_steps.clone(),
        );
        registry.register(
            "certificate_errors",
            "Self-managed certificates: checks that failed, by reason (foreign_secret, no_webhook_configuration, wrong_service, churn, tls, api); retried",
            self.certificate_errors.clone(),
        );
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "Self-managed certificates: when the current CA expires (it is replaced at 2/3 of its life)",
            self.ca_expiry.clone(),
        );
        registry.register(
            "waves",
            "Wave Backups created (idle claims beyond what the cluster holds at once, after a Schedule's own Backup), by Schedule",
            self.waves.clone(),
        );
        registry.register(
            "wave_claims",
            "Idle claims put in wave Backups (with waves_total: claims per wave), by Schedule",
            self.wave_claims.clone(),
        );
        registry.register(
            "wave_helpers_given_up",
            "Wave helpers not Running within --helper-start-timeout: their wave went on without them, by Schedule",
            self.wave_given_up.clone(),
        );
        registry.register(
            "run_waves",
            "Waves of the Schedule's last finished run (0: its own Backup took every idle claim)",
            self.run_waves.clone(),
        );
        registry.register(
            "run_claims_not_reached",
            "Idle claims the Schedule's last finished run did not back up (failed waves, helpers that never started, --max-window reached): alert on > 0",
            self.run_not_reached.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "The Schedule's last finished run: from its tick to the end of its last wave Backup",
            self.run_duration.clone(),
        );
    }

    pub fn write(&self, verb: &'static str, resource: &'static str) {
        self.api_writes
            .get_or_create(&WriteLabels { verb, resource })
            .inc();
    }
}

pub struct Metrics {
    registry: Registry,
    /// Registered only for `controller` (see [`Metrics::for_controller`]).
    pub controller: ControllerMetrics,
    admission_requests: Family<AdmissionLabels, Counter>,
    admission_duration: Histogram,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_expiry: Gauge,
    connections: Family<ConnectionLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    namespaces_opted_in: Gauge,
    namespace_fetches: Family<ResultLabels, Counter>,
    namespace_watch_errors: Counter,
    claims_problems: Family<NamespaceLabels, Gauge>,
}

/// Latency buckets from 25 µs to 2.5 s: decisions take microseconds, TLS, queueing and
/// namespace fetches more; the request timeout is a few seconds.
const DURATION_BUCKETS: [f64; 13] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 2.5,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The registry of `serve` (the webhook's metrics).
    pub fn new() -> Self {
        Self::build(true)
    }

    /// The registry of `controller`: build information and the controller's metrics only
    /// (no webhook series, e.g. no certificate expiry of 0 for an alert to misread).
    pub fn for_controller() -> Self {
        let mut m = Self::build(false);
        m.controller.register(&mut m.registry);
        m
    }

    fn build(webhook: bool) -> Self {
        let mut registry = Registry::with_prefix("velero_jupyterhub");
        // The webhook's metrics exist either way (the code paths are shared) but are
        // exposed only by `serve`.
        let mut unexposed = Registry::default();
        let reg = if webhook {
            &mut registry
        } else {
            &mut unexposed
        };
        let admission_requests = Family::<AdmissionLabels, Counter>::default();
        reg.register(
            "admission_requests",
            "AdmissionReview requests by webhook entry and outcome",
            admission_requests.clone(),
        );
        let admission_duration = Histogram::new(DURATION_BUCKETS);
        reg.register(
            "admission_duration_seconds",
            "Time to answer an AdmissionReview, from the request head to the response (body read, namespace lookup, decision, encoding)",
            admission_duration.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        reg.register(
            "tls_reloads",
            "Serving certificate (re)loads from files, by result",
            tls_reloads.clone(),
        );
        let tls_expiry = Gauge::default();
        reg.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the serving certificate in use expires (Unix time; 0 until one is loaded). Alert well before it",
            tls_expiry.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        reg.register(
            "connections",
            "Connections by listener and what became of them: accepted (TLS handshake done on the webhook port), handshake_failed, handshake_timeout, evicted (closed to make room at the connection cap), idle_timeout (no complete request head for --idle-timeout), refused (at the cap, from an address that holds half of it). The API server keeps connections alive: a steady climb means churn",
            connections.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        reg.register(
            "connections_open",
            "Connections open now, by listener (at most its connection cap)",
            connections_open.clone(),
        );
        let namespaces_opted_in = Gauge::default();
        reg.register(
            "namespaces_opted_in",
            "Namespaces labelled velero-jupyterhub.io/enabled=true, as the namespace watch sees them",
            namespaces_opted_in.clone(),
        );
        let namespace_fetches = Family::<ResultLabels, Counter>::default();
        reg.register(
            "namespace_fetches",
            "Namespaces fetched because the watch had not delivered them (or their label) yet: fetched, not_found, error, timeout; rate_limited or invalid_name when not fetched",
            namespace_fetches.clone(),
        );
        let namespace_watch_errors = Counter::default();
        reg.register(
            "namespace_watch_errors",
            "Errors of the namespace watch (each retried with backoff)",
            namespace_watch_errors.clone(),
        );
        let claims_problems = Family::<NamespaceLabels, Gauge>::default();
        reg.register(
            "namespace_claims_invalid",
            "1 while an opted-in namespace's velero-jupyterhub.io/claims annotation is empty or has invalid globs (the valid ones, else the default, apply)",
            claims_problems.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry,
            controller: ControllerMetrics::default(),
            admission_requests,
            admission_duration,
            tls_reloads,
            tls_expiry,
            connections,
            connections_open,
            namespaces_opted_in,
            namespace_fetches,
            namespace_watch_errors,
            claims_problems,
        }
    }

    pub fn admission(&self, webhook: &'static str, outcome: &'static str, seconds: f64) {
        self.admission_requests
            .get_or_create(&AdmissionLabels { webhook, outcome })
            .inc();
        self.admission_duration.observe(seconds);
    }

    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn set_tls_expiry(&self, unix_seconds: i64) {
        self.tls_expiry.set(unix_seconds);
    }

    /// `result`: `accepted`, `handshake_failed`, `handshake_timeout`, `evicted`,
    /// `idle_timeout` or `refused`.
    pub fn connection(&self, listener: &'static str, result: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { listener, result })
            .inc();
    }

    pub fn set_connections_open(&self, listener: &'static str, open: usize) {
        self.connections_open
            .get_or_create(&ListenerLabels { listener })
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub fn set_namespaces_opted_in(&self, n: usize) {
        self.namespaces_opted_in
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn namespace_fetch(&self, result: &'static str) {
        self.namespace_fetches
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn namespace_watch_error(&self) {
        self.namespace_watch_errors.inc();
    }

    /// Sets (or clears) the invalid-claims gauge of one namespace; a cleared namespace
    /// leaves no series behind.
    pub fn set_claims_problem(&self, namespace: &str, invalid: bool) {
        let labels = NamespaceLabels {
            namespace: namespace.to_owned(),
        };
        if invalid {
            self.claims_problems.get_or_create(&labels).set(1);
        } else {
            self.claims_problems.remove(&labels);
        }
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

/// One sample of the exposition, by its exact series name and labels (as printed, e.g.
/// `velero_jupyterhub_connections_total{listener="ops",result="evicted"}`): `None` when the
/// series does not exist, so a renamed metric fails a test instead of reading as 0.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
