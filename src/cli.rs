//! The command line: `serve` (the webhook server), `review` (one AdmissionReview from
//! stdin or a file, answered exactly as `serve` would), `controller` (the reconciler for
//! idle users) and `backup` (one Backup of a namespace now). Most flags are also env vars.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Toleration;

use crate::names;
use crate::policy::ClaimGlobs;
use crate::policy::helper::HelperOptions;
use crate::policy::restore::RestoringClaim;
use crate::server::{self, TlsSource};
use crate::telemetry::{self, LogFormat};
use crate::tls::PemFiles;
use crate::webhook::serve::ServeOptions;

#[derive(Debug, Parser)]
#[command(
    name = "velero-jupyterhub",
    version,
    about = "Velero file-system backups that work for JupyterHub users' home volumes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(
        long,
        env = "VJH_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter: a level or tracing directives (e.g. `info,kube=warn`).
    #[arg(long, env = "VJH_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Worker threads of the async runtime. One answers tens of thousands of reviews a
    /// second, far beyond any API server's rate; tokio's default (one per core) would grow
    /// threads and memory with the node, not with the load.
    #[arg(
        long,
        env = "VJH_WORKER_THREADS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64),
        global = true
    )]
    pub worker_threads: u16,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the admission webhook server (HTTPS) and its health/metrics endpoints (HTTP).
    Serve(Box<ServeArgs>),
    /// Answer one AdmissionReview (JSON) from stdin or a file, exactly as `serve` would.
    Review(ReviewArgs),
    /// Run the reconciler: backup helpers for idle users around Velero Schedules, and
    /// backfilled annotations (one leader at a time, through a Lease).
    Controller(Box<ControllerArgs>),
    /// Back up one namespace now with Velero, idle users' homes included: opens a backup
    /// window (the controller starts helpers), creates the Backup, and with --wait
    /// follows it and reports each user claim. Exit 2: some user claim is not in it.
    Backup(Box<BackupArgs>),
    /// Restore users' homes from a Velero Backup: checks their servers are stopped and
    /// nothing would be skipped or overwritten silently, creates the Restore, and with
    /// --wait follows it and reports each claim. Exit 2: some claim was not restored.
    Restore(Box<RestoreArgs>),
    /// Is every user's home in a recent backup? One row per user claim: who holds it
    /// and its last completed backup. Exit 2: some claim is stale (or never backed up).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One namespace (opted in); default: every opted-in namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// `table` (with a summary line) or `json`.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: crate::commands::status::Output,
    /// A claim whose last completed backup is older than this is STALE.
    #[arg(long, env = "VJH_STALE_AFTER", default_value = "26h", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// Where Velero's Backups and PodVolumeBackups are.
    #[arg(long, env = "VJH_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,
    /// Claim-name globs used when a namespace has no `velero-jupyterhub.io/claims`
    /// annotation (the controller's --claims).
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The namespace to restore into (opted in, with the webhook running).
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// The Velero Backup to restore from.
    #[arg(long, required_unless_present_any = ["latest", "from_schedule"], conflicts_with_all = ["latest", "from_schedule"])]
    pub from_backup: Option<String>,
    /// Restore from this Velero Schedule's newest tick (or the newest at or before --at):
    /// its own Backup and the wave Backups that followed it (idle users beyond what the
    /// cluster could attach at once). Works in a cluster that knows the Backups only from
    /// object storage. A namespace that is gone is restored first from the Schedule's
    /// Backup.
    #[arg(long, conflicts_with = "latest")]
    pub from_schedule: Option<String>,
    /// With --from-schedule: the newest tick at or before this time (RFC 3339, e.g.
    /// 2026-12-07T03:00:00Z).
    #[arg(long, requires = "from_schedule")]
    pub at: Option<k8s_openapi::jiff::Timestamp>,
    /// Restore from the newest Backup (a Schedule's, a wave's, or one of `backup`) that
    /// holds the --user's claim: their claim now, else `claim-<user>` (KubeSpawner's
    /// default name). Needs --user.
    #[arg(long, requires = "users")]
    pub latest: bool,
    /// Restore only this user (their `hub.jupyter.org/username` label, as on their pods
    /// and claims); repeat for more. Default: every user of the namespace.
    #[arg(long = "user")]
    pub users: Vec<String>,
    /// Follow the Restore to its end and print one row per claim.
    #[arg(long)]
    pub wait: bool,
    /// Restore into claims that still exist: the backup's files are written over theirs
    /// (same-named files replaced, files created since kept). Without it, an existing
    /// claim stops the restore; delete it first for an exact restore.
    #[arg(long)]
    pub into_existing: bool,
    /// Where Velero's Backups, Restores and their volume objects are.
    #[arg(long, env = "VJH_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,
    /// Claim-name globs used when the namespace has no `velero-jupyterhub.io/claims`
    /// annotation (the controller's --claims).
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// --wait gives up after this long (the Restore goes on; at most 24h).
    #[arg(long, default_value = "6h", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl RestoreArgs {
    pub fn options(self) -> crate::commands::restore::Options {
        crate::commands::restore::Options {
            namespace: self.namespace,
            velero_namespace: self.velero_namespace,
            backup: self.from_backup.unwrap_or_default(),
            latest: self.latest,
            schedule: self.from_schedule,
            at: self.at,
            users: self.users,
            wait: self.wait,
            into_existing: self.into_existing,
            timeout: self.timeout,
            default_claims: Arc::new(self.claims),
            poll: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The namespace to back up (opted in, with the controller running).
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// Follow the Backup to its end, close the window, and print one row per user claim.
    #[arg(long)]
    pub wait: bool,
    /// The Backup's storage location (default: Velero's default location).
    #[arg(long)]
    pub storage_location: Option<String>,
    /// How long Velero keeps the Backup (default: Velero's, 30 days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Where Velero's Backups and PodVolumeBackups are.
    #[arg(long, env = "VJH_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,
    /// Claim-name globs used when the namespace has no `velero-jupyterhub.io/claims`
    /// annotation (the controller's --claims).
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// Back up without the helpers that are not running after this long (their claims
    /// are reported as not backed up).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub helper_timeout: Duration,
    /// The window closes after this long at the latest, and --wait gives up then (at
    /// most 24h).
    #[arg(long, default_value = "6h", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// The controller's namespace and Lease (to check that one is running).
    #[arg(
        long,
        env = "VJH_CONTROLLER_NAMESPACE",
        default_value = "velero-jupyterhub"
    )]
    pub controller_namespace: String,
    /// The controller's Lease in --controller-namespace.
    #[arg(long, env = "VJH_LEASE_NAME", default_value = crate::controller::leader::LEASE_NAME)]
    pub lease_name: String,
}

impl BackupArgs {
    pub fn options(self) -> crate::commands::backup::Options {
        crate::commands::backup::Options {
            namespace: self.namespace,
            velero_namespace: self.velero_namespace,
            storage_location: self.storage_location,
            ttl: self.ttl,
            wait: self.wait,
            default_claims: Arc::new(self.claims),
            helper_timeout: self.helper_timeout,
            timeout: self.timeout,
            controller_namespace: self.controller_namespace,
            lease_name: self.lease_name,
            poll: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Plain HTTP address for operations: the probes (`/healthz`, `/readyz`) and `/metrics`.
    #[arg(long, env = "VJH_OPS_LISTEN", default_value = "0.0.0.0:8080")]
    pub ops_listen: SocketAddr,
    /// The leader is not live (`/healthz` fails, the kubelet restarts it and the other
    /// replica takes over) when its loop has not finished a pass for this long (passes
    /// come at least every 5 minutes), or a watch has failed without a break for this long.
    #[arg(long, env = "VJH_PASS_DEADLINE", default_value = "15m", value_parser = parse_pass_deadline)]
    pub pass_deadline: Duration,
    /// The controller's own namespace (its Lease, and the certificate Secrets, live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "velero-jupyterhub", value_parser = parse_namespace)]
    pub namespace: String,
    /// This replica's name in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where Velero's Schedules, Backups and PodVolumeBackups are.
    #[arg(long, env = "VJH_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,
    /// Manage only opted-in namespaces that also match this label selector (e.g. to run
    /// a controller per group of namespaces). Default: every opted-in namespace.
    #[arg(long, env = "VJH_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Helpers start this long before a Schedule's tick.
    #[arg(long, env = "VJH_LEAD_TIME", default_value = "10m", value_parser = humantime::parse_duration)]
    pub lead_time: Duration,
    /// A backup window closes after this long even if its Backup is not finished.
    #[arg(long, env = "VJH_MAX_WINDOW", default_value = "6h", value_parser = humantime::parse_duration)]
    pub max_window: Duration,
    /// At most this many backup helpers at once, across namespaces. Idle claims beyond
    /// it (or beyond the nodes' free pod slots and CSI attach limits) are backed up in
    /// waves after the Schedule's own Backup, each wave a Backup of its own. At most
    /// 2,000 (a wave Backup records its claims in an annotation).
    #[arg(long, env = "VJH_MAX_HELPERS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=2_000))]
    pub max_helpers: u32,
    /// A wave's helper not Running this long after its creation is given up: the wave is
    /// backed up without it, and it is tried once more in a later wave.
    #[arg(long, env = "VJH_HELPER_START_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub helper_start_timeout: Duration,
    /// The first wave of a run starts this long after the Schedule's own Backup is seen
    /// finished, so that every PodVolumeBackup of it is seen first (they come on a watch of
    /// their own, which may lag by up to kube-runtime's 30 s retry): a claim Velero did
    /// copy must not get a needless wave.
    #[arg(long, env = "VJH_WAVE_SETTLE", default_value = "45s", value_parser = humantime::parse_duration)]
    pub wave_settle: Duration,
    /// Pod slots helpers leave free on every node: at least Velero's node-agent load
    /// concurrency (its hosting pods run on the volume's node; default 1) plus room for
    /// users' servers.
    #[arg(long, env = "VJH_NODE_HEADROOM_PODS", default_value_t = crate::policy::waves::Headroom::DEFAULT.pods)]
    pub node_headroom_pods: u32,
    /// Attachments helpers leave free, per node and CSI driver with an attach limit (its
    /// CSINode's `allocatable.count`), for users' servers.
    #[arg(long, env = "VJH_NODE_HEADROOM_ATTACHMENTS", default_value_t = crate::policy::waves::Headroom::DEFAULT.attachments)]
    pub node_headroom_attachments: u32,
    /// A user pod that mounts an idle claim takes it from its backup helper at once when
    /// it runs, a node has taken it, or the claim is ReadWriteOncePod; one not scheduled
    /// yet (a node being added) only after this long. A pod that never runs does not
    /// cancel a backup unseen: a claim only such pods hold while a Backup runs gets a
    /// Warning Event naming them.
    #[arg(long, env = "VJH_USER_POD_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub user_pod_grace: Duration,
    /// The helpers' image: pause-like, running as a non-root user.
    #[arg(long, env = "VJH_HELPER_IMAGE", default_value = crate::policy::helper::DEFAULT_IMAGE)]
    pub helper_image: String,
    /// Tolerations for helpers, `key=value:Effect`, `key:Effect` (any value) or
    /// `key=value` (any effect), comma-separated; default: z2jh's user-node taints.
    #[arg(
        long,
        env = "VJH_HELPER_TOLERATIONS",
        value_delimiter = ',',
        default_value = "hub.jupyter.org/dedicated=user:NoSchedule,hub.jupyter.org_dedicated=user:NoSchedule",
        value_parser = parse_toleration
    )]
    pub helper_tolerations: Vec<Toleration>,
    /// Node selector for helpers, `key=value`, comma-separated (default: none).
    #[arg(long, env = "VJH_HELPER_NODE_SELECTOR", value_delimiter = ',', value_parser = parse_label)]
    pub helper_node_selector: Vec<(String, String)>,
    /// Claim-name globs used when a namespace has no `velero-jupyterhub.io/claims` annotation.
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// A restore helper whose volume failed to restore is kept this long for inspection
    /// (a Warning Event on the claim says so), then deleted.
    #[arg(long, env = "VJH_FAILED_HELPER_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub failed_helper_ttl: Duration,
    /// A user claim with no completed backup within this is stale (the coverage metrics,
    /// as `status --stale-after`).
    #[arg(long, env = "VJH_STALE_AFTER", default_value = "26h", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// The leader-election Lease in `--namespace`.
    #[arg(long, env = "VJH_LEASE_NAME", default_value = crate::controller::leader::LEASE_NAME)]
    pub lease_name: String,
    /// How long the Lease holds without renewal (the leader renews every 2/15 of it and
    /// stops leading after failing to for 2/3 of it, as client-go does).
    #[arg(long, env = "VJH_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Self-managed webhook certificates: the leader keeps a CA and the serving
    /// certificate in Secrets of `--namespace` and the webhook configuration's caBundle in
    /// step. `false` when something else does (cert-manager: `certs/`).
    #[arg(long, env = "VJH_MANAGE_CERTIFICATES", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_certificates: bool,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps.
    #[arg(long, env = "VJH_WEBHOOK_CONFIGURATION", default_value = crate::controller::certs::WEBHOOK_CONFIGURATION, value_parser = parse_object_name)]
    pub webhook_configuration: String,
    /// The webhook's Service in `--namespace`: the serving certificate is for its DNS names.
    #[arg(long, env = "VJH_WEBHOOK_SERVICE", default_value = crate::controller::certs::WEBHOOK_SERVICE, value_parser = parse_namespace)]
    pub webhook_service: String,
    /// The Secret the serving certificate is written to (the webhook's `--tls-secret`).
    #[arg(long, env = "VJH_TLS_SECRET", default_value = crate::controller::certs::TLS_SECRET, value_parser = parse_object_name)]
    pub tls_secret: String,
    /// The Secret holding the CA's key (read by the controller only).
    #[arg(long, env = "VJH_CA_SECRET", default_value = crate::controller::certs::CA_SECRET, value_parser = parse_object_name)]
    pub ca_secret: String,
    /// Lifetime of each CA (replaced after 2/3 of it).
    #[arg(long, env = "VJH_CA_VALIDITY", default_value = "365d", value_parser = humantime::parse_duration)]
    pub ca_validity: Duration,
    /// Lifetime of each serving certificate (renewed after 2/3 of it).
    #[arg(long, env = "VJH_CERT_VALIDITY", default_value = "90d", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,
    /// How long a new CA is trusted before it signs (the API servers catch up).
    #[arg(long, env = "VJH_CA_OVERLAP", default_value = "5m", value_parser = humantime::parse_duration)]
    pub ca_overlap: Duration,
    /// How long the old CA stays trusted after the new one signs (webhook replicas catch
    /// up; an extra CA in the caBundle costs nothing).
    #[arg(long, env = "VJH_CA_RETIRE_AFTER", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ca_retire_after: Duration,
}

impl ControllerArgs {
    fn certificates(&self) -> anyhow::Result<Option<crate::controller::certs::CertConfig>> {
        use k8s_openapi::jiff::SignedDuration;
        if !self.manage_certificates {
            return Ok(None);
        }
        let options = crate::policy::certs::CertOptions {
            ca_validity: SignedDuration::try_from(self.ca_validity).context("--ca-validity")?,
            cert_validity: SignedDuration::try_from(self.cert_validity)
                .context("--cert-validity")?,
            overlap: SignedDuration::try_from(self.ca_overlap).context("--ca-overlap")?,
            retire_after: SignedDuration::try_from(self.ca_retire_after)
                .context("--ca-retire-after")?,
        };
        options.check().map_err(|e| {
            anyhow::anyhow!(
                "{e} (--ca-validity {}, --cert-validity {}, --ca-overlap {}, --ca-retire-after {})",
                humantime::format_duration(self.ca_validity),
                humantime::format_duration(self.cert_validity),
                humantime::format_duration(self.ca_overlap),
                humantime::format_duration(self.ca_retire_after)
            )
        })?;
        let mut config = crate::controller::certs::CertConfig::for_service(
            &self.namespace,
            &self.webhook_service,
            options,
        );
        config.webhook_configuration = self.webhook_configuration.clone();
        config.tls_secret = self.tls_secret.clone();
        config.ca_secret = self.ca_secret.clone();
        Ok(Some(config))
    }
}

fn parse_toleration(s: &str) -> Result<Toleration, String> {
    let (key_value, effect) = match s.rsplit_once(':') {
        Some((kv, e)) => (kv, Some(e)),
        None => (s, None),
    };
    if let Some(e) =
        effect.filter(|e| !matches!(*e, "NoSchedule" | "PreferNoSchedule" | "NoExecute"))
    {
        return Err(format!(
            "{s:?}: effect {e:?} is not NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match key_value.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (key_value, None),
    };
    if !names::is_label_key(key) || value.is_some_and(|v| !names::is_label_value(v)) {
        return Err(format!(
            "{s:?}: expected key=value:Effect with a label key and value"
        ));
    }
    Ok(Toleration {
        key: Some(key.to_owned()),
        operator: Some(if value.is_some() { "Equal" } else { "Exists" }.to_owned()),
        value: value.map(str::to_owned),
        effect: effect.map(str::to_owned),
        ..Default::default()
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
        return Err(format!("{s:?}: between 1s and 24h"));
    }
    Ok(d)
}

/// A Kubernetes object name (DNS-1123 subdomain): it goes into API paths.
fn parse_object_name(s: &str) -> Result<String, String> {
    if names::is_dns1123_subdomain(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a Kubernetes object name (DNS-1123 subdomain)"
        ))
    }
}

/// A namespace name (DNS-1123 label).
fn parse_namespace(s: &str) -> Result<String, String> {
    if names::is_dns1123_label(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a namespace name (DNS-1123 label)"))
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if names::is_label_key(k) && names::is_label_value(v) => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("expected key=value (a label), got {s:?}")),
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("tls").required(true).args(["tls_cert", "tls_secret", "self_signed"])))]
pub struct ServeArgs {
    /// HTTPS address for the webhook (`POST /mutate/live`).
    #[arg(long, env = "VJH_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain HTTP address for operations: the probes (`/healthz`, `/readyz`) and
    /// `/metrics`.
    #[arg(
        long,
        env = "VJH_OPS_LISTEN",
        alias = "metrics-listen",
        default_value = "0.0.0.0:8080"
    )]
    pub ops_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when its content changes.
    #[arg(long, env = "VJH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the serving certificate (PEM); reloaded with the certificate.
    #[arg(long, env = "VJH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The serving certificate from this `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`),
    /// read through a watch: the controller's self-managed certificates (the default
    /// install), or cert-manager's Secret.
    #[arg(long, env = "VJH_TLS_SECRET", conflicts_with_all = ["tls_cert", "tls_key"], value_parser = parse_object_name)]
    pub tls_secret: Option<String>,
    /// The namespace of `--tls-secret` (the pod's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "velero-jupyterhub", value_parser = parse_namespace)]
    pub tls_secret_namespace: String,
    /// How often to check the certificate files for changes.
    #[arg(long, env = "VJH_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
    /// Development: make a CA and a serving certificate for localhost, 127.0.0.1 and
    /// `--dns-names` in memory.
    #[arg(long, env = "VJH_SELF_SIGNED", conflicts_with_all = ["tls_cert", "tls_key", "tls_secret"])]
    pub self_signed: bool,
    /// Extra names for the self-signed certificate (repeat or comma-separate).
    #[arg(
        long = "dns-names",
        alias = "dns-name",
        env = "VJH_DNS_NAMES",
        value_delimiter = ',',
        requires = "self_signed"
    )]
    pub dns_names: Vec<String>,
    /// With `--self-signed`: write the CA bundle (PEM) here, for `caBundle` or `curl --cacert`.
    #[arg(long, env = "VJH_CA_OUT", requires = "self_signed")]
    pub ca_out: Option<PathBuf>,
    /// Claim-name globs used when a namespace has no `velero-jupyterhub.io/claims` annotation.
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// The image of the restore helpers pods re-created by a Velero restore become:
    /// pause-like, running as a non-root user (the controller's `--helper-image`).
    #[arg(long, env = "VJH_HELPER_IMAGE", default_value = crate::policy::helper::DEFAULT_IMAGE)]
    pub helper_image: String,
    /// Where Velero's Backups and Restores are: a claim a restore re-creates is checked
    /// against the wave Backups of its Backup's tick.
    #[arg(long, env = "VJH_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,
    /// Run without any API server (webhook only; every namespace uses `--claims`).
    #[arg(long, env = "VJH_NO_CLUSTER")]
    pub no_cluster: bool,
    /// A TLS handshake must finish within this time.
    #[arg(long, env = "VJH_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection must send a complete request head within this time, also between
    /// keep-alive requests (so idle connections close after it). Keep it above the API
    /// server's own idle timeout (90 s), so the API server closes idle connections first.
    #[arg(long, env = "VJH_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// One AdmissionReview, body included, must be received and answered within this time
    /// (else 408). Keep it below the webhook's `timeoutSeconds` (3 s in manifests/).
    #[arg(long, env = "VJH_REQUEST_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Bytes of AdmissionReviews larger than 64 KiB read and reviewed at once (more wait);
    /// at least 3Mi (the largest request). Accepts `Ki`, `Mi`, `Gi` suffixes.
    #[arg(long, env = "VJH_LARGE_BODY_BUDGET", default_value = "16Mi", value_parser = parse_budget)]
    pub large_body_budget: usize,
    /// Open connections on the webhook port at most. At the cap, a new connection from the
    /// address holding the most connections (and half the cap) is refused; any other takes
    /// the place of that address's least recently active one (never one mid-review).
    #[arg(long, env = "VJH_MAX_CONNECTIONS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open connections on the operations port at most (same rule).
    #[arg(long, env = "VJH_MAX_OPS_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_ops_connections: u32,
    /// After SIGTERM, keep serving (reporting not ready) this long before closing the listener.
    #[arg(long, env = "VJH_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// After closing the listener, how long in-flight requests may take to finish.
    #[arg(long, env = "VJH_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl ServeArgs {
    /// The limits these flags set.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            large_body_budget: self.large_body_budget,
            max_connections: self.max_connections as usize,
            max_ops_connections: self.max_ops_connections as usize,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

/// A byte count with an optional binary suffix (`Ki`, `Mi`, `Gi`, with or without `B`),
/// at least the largest AdmissionReview we accept.
fn parse_budget(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = t.strip_suffix('B').unwrap_or(t);
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let unit: usize = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use Ki, Mi or Gi)")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("expected a size such as 16Mi, got {s:?}"))?;
    let bytes = n
        .checked_mul(unit)
        .filter(|b| u32::try_from(*b).is_ok())
        .ok_or_else(|| format!("{s:?} is too large (at most 4095Mi)"))?;
    if bytes < crate::webhook::MAX_BODY_BYTES {
        return Err(format!(
            "{s:?} is below the largest AdmissionReview we accept (3Mi)"
        ));
    }
    Ok(bytes)
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// Read the AdmissionReview from this file instead of stdin (`-` is stdin).
    #[arg(short = 'f', long = "file", env = "VJH_REVIEW_FILE")]
    pub file: Option<PathBuf>,
    /// Claim-name globs for namespaces without `--namespace-claims`.
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// Claim globs for one namespace, as its `velero-jupyterhub.io/claims` annotation
    /// would give them: `NS=GLOBS` (repeatable).
    #[arg(long = "namespace-claims", value_parser = parse_namespace_claims)]
    pub namespace_claims: Vec<(String, ClaimGlobs)>,
    /// The input is a Pod (JSON, e.g. `kubectl get pod NAME -o json`), not an
    /// AdmissionReview: review it as if it were being created.
    #[arg(long)]
    pub pod: bool,
    /// Also explain on stderr what was decided and why: per volume for a user server,
    /// per container and volume for a restore conversion.
    #[arg(long)]
    pub explain: bool,
    /// The restore helpers' image, as `serve --helper-image`.
    #[arg(long, env = "VJH_HELPER_IMAGE", default_value = crate::policy::helper::DEFAULT_IMAGE)]
    pub helper_image: String,
    /// Review as if CLAIM were being restored in the pod's namespace (listed in its
    /// `velero-jupyterhub.io/restoring-claims`: the restore guard), by Velero restore
    /// RESTORE if given: `CLAIM[=RESTORE]` (repeatable).
    #[arg(long, value_parser = parse_restoring)]
    pub restoring: Vec<RestoringClaim>,
    /// For a pod a restore re-creates: review as if CLAIM existed in the pod's namespace,
    /// created (or updated) by Velero restore RESTORE if given: `CLAIM[=RESTORE]`
    /// (repeatable). Claims not named are taken as not existing.
    #[arg(long, value_parser = parse_claim_exists)]
    pub claim_exists: Vec<(String, crate::policy::restore::ClaimNow)>,
}

fn parse_claim_exists(s: &str) -> Result<(String, crate::policy::restore::ClaimNow), String> {
    let (claim, restore) = match s.split_once('=') {
        Some((claim, restore)) => (claim, Some(restore.to_owned())),
        None => (s, None),
    };
    if !names::is_dns1123_subdomain(claim) || restore.as_deref() == Some("") {
        return Err(format!("expected CLAIM or CLAIM=RESTORE, got {s:?}"));
    }
    Ok((
        claim.to_owned(),
        crate::policy::restore::ClaimNow::Present { restore },
    ))
}

fn parse_restoring(s: &str) -> Result<RestoringClaim, String> {
    let (claim, restore) = match s.split_once('=') {
        Some((claim, restore)) => (claim, Some(restore)),
        None => (s, None),
    };
    if claim.is_empty() || restore.is_some_and(str::is_empty) {
        return Err(format!("expected CLAIM or CLAIM=RESTORE, got {s:?}"));
    }
    Ok(RestoringClaim {
        claim: claim.to_owned(),
        restore: restore.map(str::to_owned),
    })
}

fn parse_namespace_claims(s: &str) -> Result<(String, ClaimGlobs), String> {
    let (ns, globs) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NS=GLOBS, got {s:?}"))?;
    if ns.is_empty() {
        return Err(format!("empty namespace in {s:?}"));
    }
    Ok((
        ns.to_owned(),
        ClaimGlobs::parse(globs).map_err(|e| e.to_string())?,
    ))
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(cli.log_format, &cli.log_level)?;
            serve(*args).await.map(|()| 0)
        }
        Command::Review(args) => crate::commands::review::run(args),
        Command::Controller(args) => {
            telemetry::init(cli.log_format, &cli.log_level)?;
            controller(*args).await.map(|()| 0)
        }
        Command::Backup(args) => backup(*args).await,
        Command::Restore(args) => restore(*args).await,
        Command::Status(args) => status(args).await,
    }
}

/// Exit 0: every user claim has a completed backup within --stale-after; 2: some has not
/// (the rows say which); errors exit 1.
async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let client = tool_client().await?;
    let options = crate::commands::status::Options {
        namespace: args.namespace,
        velero_namespace: args.velero_namespace,
        stale_after: args.stale_after,
        default_claims: Arc::new(args.claims),
    };
    let rows = crate::commands::status::run(client, &options).await?;
    match args.output {
        crate::commands::status::Output::Table => print!(
            "{}",
            crate::commands::status::table(&rows, args.stale_after)
        ),
        crate::commands::status::Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&crate::commands::status::json(&rows, args.stale_after))?
        ),
    }
    Ok(if rows.iter().any(|r| r.stale) { 2 } else { 0 })
}

/// The Kubernetes client of a command-line tool (`backup`, `restore`, `status`): one is
/// required.
async fn tool_client() -> anyhow::Result<kube::Client> {
    crate::cluster::try_client()
        .await
        .context("connecting to the Kubernetes API")?
        .context("no kubeconfig or in-cluster configuration found")
}

/// Exit 0: the Restore was created (and with --wait, every claim restored); 2: some
/// claim was not (the rows say why); errors, refusals included, exit 1.
async fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    let client = tool_client().await?;
    let options = args.options();
    let mut stderr = std::io::stderr();
    match crate::commands::restore::run(client, &options, &mut stderr).await? {
        crate::commands::restore::Finished::Started { restores } => {
            for restore in restores {
                println!("{restore}");
            }
            Ok(0)
        }
        crate::commands::restore::Finished::Done(report) => {
            print!("{}", report.table());
            Ok(if report.complete() { 0 } else { 2 })
        }
    }
}

/// Exit 0: the Backup was created (and with --wait, every user claim is in it); 2: it
/// ended without some user claim (the rows say why); errors exit 1.
async fn backup(args: BackupArgs) -> anyhow::Result<i32> {
    let client = tool_client().await?;
    let options = args.options();
    let mut stderr = std::io::stderr();
    match crate::commands::backup::run(client, &options, &mut stderr).await? {
        crate::commands::backup::Finished::Started { backup } => {
            println!("{backup}");
            Ok(0)
        }
        crate::commands::backup::Finished::Done(report) => {
            print!("{}", report.table());
            Ok(if report.complete() { 0 } else { 2 })
        }
    }
}

async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let signalled = shutdown_signal()?;
    let args_ops_listen = args.ops_listen;
    let args_pass_deadline = args.pass_deadline;
    let client = crate::cluster::try_client()
        .await
        .context("connecting to the Kubernetes API")?
        .context(
            "the controller needs a cluster: no kubeconfig or in-cluster configuration found",
        )?;
    let certificates = args.certificates()?;
    let identity = match args.identity {
        Some(i) if !i.is_empty() => i,
        _ => {
            std::env::var("HOSTNAME").unwrap_or_else(|_| "velero-jupyterhub-controller".to_owned())
        }
    };
    let config = crate::controller::Config {
        certificates,
        namespace: args.namespace,
        identity,
        velero_namespace: args.velero_namespace,
        namespace_selector: args.namespace_selector.filter(|s| !s.is_empty()),
        windows: crate::controller::Config::window_options(args.lead_time, args.max_window)?,
        max_helpers: args.max_helpers as usize,
        helper_start_timeout: k8s_openapi::jiff::SignedDuration::try_from(
            args.helper_start_timeout,
        )
        .context("--helper-start-timeout")?,
        wave_settle: k8s_openapi::jiff::SignedDuration::try_from(args.wave_settle)
            .context("--wave-settle")?,
        user_pod_grace: k8s_openapi::jiff::SignedDuration::try_from(args.user_pod_grace)
            .context("--user-pod-grace")?,
        headroom: crate::policy::waves::Headroom {
            pods: args.node_headroom_pods,
            attachments: args.node_headroom_attachments,
        },
        helper: crate::policy::helper::HelperOptions {
            image: args.helper_image,
            tolerations: args.helper_tolerations,
            node_selector: args.helper_node_selector.into_iter().collect(),
        },
        default_claims: Arc::new(args.claims),
        lease: crate::controller::LeaseOptions::with_duration(
            &args.lease_name,
            args.lease_duration,
        ),
        failed_helper_ttl: k8s_openapi::jiff::SignedDuration::try_from(args.failed_helper_ttl)
            .context("--failed-helper-ttl")?,
        stale_after: k8s_openapi::jiff::SignedDuration::try_from(args.stale_after)
            .context("--stale-after")?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signalled.await;
        stop.cancel();
    });
    // Probes and /metrics, with the same bounds as the webhook's operations port.
    let metrics = Arc::new(crate::metrics::Metrics::for_controller());
    let heartbeat = Arc::new(crate::controller::heartbeat::Heartbeat::new(
        args_pass_deadline,
    ));
    let mut health = crate::webhook::Health::new(None, Vec::new());
    health.heartbeat = Some(heartbeat.clone());
    let ops = crate::server::bind(args_ops_listen).with_context(|| {
        format!("binding the operations address --ops-listen {args_ops_listen}")
    })?;
    let listener = crate::webhook::serve::Listener {
        name: "ops",
        tcp: ops,
        tls: None,
        max_connections: 16,
    };
    let router = crate::webhook::ops_router(health, metrics.clone());
    let ops_stop = shutdown.clone();
    let ops_task = tokio::spawn(crate::webhook::serve::serve(
        listener,
        router,
        ServeOptions::default(),
        metrics.clone(),
        async move { ops_stop.cancelled().await },
    ));
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(ops = %args_ops_listen, workers, "serving /healthz, /readyz, /metrics over HTTP");
    let result = crate::controller::run(client, config, metrics, heartbeat, shutdown.clone()).await;
    shutdown.cancel();
    let _ = ops_task.await;
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let signalled = shutdown_signal()?;
    crate::tls::install_default_provider();
    let tls = match (
        args.tls_cert.clone(),
        args.tls_key.clone(),
        &args.tls_secret,
    ) {
        (Some(cert), Some(key), _) => TlsSource::Files {
            files: PemFiles { cert, key },
            reload_interval: args.tls_reload_interval,
        },
        (_, _, Some(name)) => TlsSource::Secret {
            namespace: args.tls_secret_namespace.clone(),
            name: name.clone(),
        },
        _ => TlsSource::SelfSigned {
            dns_names: args.dns_names.clone(),
            ca_out: args.ca_out.clone(),
        },
    };
    let cluster = if args.no_cluster {
        None
    } else {
        let client = crate::cluster::try_client()
            .await
            .context("connecting to the Kubernetes API")?;
        if client.is_none() {
            tracing::warn!(
                "no kubeconfig or in-cluster config found: running without a cluster (as with --no-cluster)"
            );
        }
        client
    };
    let serve = args.serve_options();
    let running = server::start(server::Config {
        listen: args.listen,
        ops_listen: args.ops_listen,
        tls,
        default_claims: args.claims,
        helper: HelperOptions::with_image(&args.helper_image),
        velero_namespace: args.velero_namespace.clone(),
        cluster,
        serve,
        shutdown_delay: args.shutdown_delay,
    })
    .await?;
    signalled.await;
    running.shutdown();
    running.stopped().await;
    Ok(())
}

/// Registers for SIGTERM and SIGINT now (before the server starts, so an early signal is
/// not lost to the default action) and resolves when one arrives.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// `--pass-deadline`: over the 5 minutes between passes, so an idle loop is not taken for
/// a wedged one.
fn parse_pass_deadline(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    match d >= Duration::from_secs(6 * 60) {
        true => Ok(d),
        false => Err(format!(
            "{s} is too short: passes come at least every 5 minutes; give 6m or more"
        )),
    }
}
