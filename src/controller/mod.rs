//! `velero-jupyterhub controller`: the reconciler for idle users. One replica at
//! a time leads (a Lease, `leader.rs`); the leader watches namespaces, claims, pods and
//! Velero's Schedules, Backups and PodVolumeBackups (`stores.rs`), plans with
//! `policy::window` and `policy::plan` whenever something changes or a window is due to
//! open or close, and applies the plan (`reconcile.rs`). Everything that writes lives here;
//! the webhook (`serve`) stays read-only.

pub mod apply;
pub mod certs;
pub mod cleanup;
pub mod heartbeat;
pub mod leader;
pub mod pods;
pub mod reconcile;
pub mod snapshot;
pub mod stores;
pub mod views;
pub mod waves;

use std::sync::Arc;
use std::time::Duration;

use jiff::SignedDuration;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;
use crate::policy::ClaimGlobs;
use crate::policy::helper::HelperOptions;
use crate::policy::window::WindowOptions;

pub use leader::LeaseOptions;

use k8s_openapi::jiff;

/// What `controller`'s flags configure.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the Lease lives (`POD_NAMESPACE`).
    pub namespace: String,
    /// This replica's name in the Lease (`POD_NAME`, else the host name).
    pub identity: String,
    pub velero_namespace: String,
    /// Manage only opted-in namespaces that also match this label selector (several
    /// controllers for disjoint sets of namespaces; `None`: every opted-in namespace).
    pub namespace_selector: Option<String>,
    pub windows: WindowOptions,
    /// Helpers at once (`--max-helpers`) and how long one may take to start
    /// (`--helper-start-timeout`); a run's window is `windows.max`.
    pub max_helpers: usize,
    pub helper_start_timeout: SignedDuration,
    /// The first wave of a run waits this long after the tick's Backup is seen terminal
    /// (`--wave-settle`).
    pub wave_settle: SignedDuration,
    /// What helpers leave free on every node (`--node-headroom-pods`,
    /// `--node-headroom-attachments`).
    pub headroom: crate::policy::waves::Headroom,
    /// A user pod no node has taken yet displaces a helper only once it is this old
    /// (`--user-pod-grace`).
    pub user_pod_grace: SignedDuration,
    pub helper: HelperOptions,
    pub default_claims: Arc<ClaimGlobs>,
    pub lease: LeaseOptions,
    /// A restore helper whose volume failed to restore is kept this long for inspection.
    pub failed_helper_ttl: SignedDuration,
    /// A user claim with no completed backup within this is stale (coverage metrics).
    pub stale_after: SignedDuration,
    /// Self-managed webhook certificates (`None`: someone else manages them).
    pub certificates: Option<certs::CertConfig>,
}

impl Config {
    pub fn window_options(lead: Duration, max: Duration) -> anyhow::Result<WindowOptions> {
        Ok(WindowOptions {
            lead: SignedDuration::try_from(lead)?,
            max: SignedDuration::try_from(max)?,
        })
    }
}

/// Runs until `shutdown` is cancelled, or returns an error when leadership is lost (the
/// process then exits and is restarted: a clean slate, no half-applied state).
pub async fn run(
    client: kube::Client,
    config: Config,
    metrics: Arc<Metrics>,
    heartbeat: Arc<heartbeat::Heartbeat>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    info!(identity = %config.identity, namespace = %config.namespace, "waiting to lead");
    let elector = leader::Elector::new(client.clone(), &config);
    let leading = tokio::select! {
        leading = elector.acquire() => leading?,
        () = shutdown.cancelled() => return Ok(()),
    };
    info!(identity = %config.identity, "leading: starting the reconciler");
    metrics.controller.leader.set(1);
    heartbeat.leading(true);
    let work = CancellationToken::new();
    let certificates = config.certificates.clone().map(|certs| {
        tokio::spawn(certs::run(
            client.clone(),
            certs,
            metrics.clone(),
            work.clone(),
        ))
    });
    let reconciler = tokio::spawn(reconcile::run(
        client,
        config.clone(),
        metrics.clone(),
        heartbeat.clone(),
        work.clone(),
    ));
    let outcome = tokio::select! {
        lost = leading.keep() => Err(lost),
        () = shutdown.cancelled() => Ok(()),
    };
    work.cancel();
    let _ = reconciler.await;
    if let Some(certificates) = certificates {
        let _ = certificates.await;
    }
    metrics.controller.leader.set(0);
    heartbeat.leading(false);
    match outcome {
        Ok(()) => {
            elector.release().await;
            Ok(())
        }
        Err(lost) => Err(anyhow::anyhow!("lost the lease: {lost}")),
    }
}
