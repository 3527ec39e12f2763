//! The restore guard's view of the cluster: which claims restore helpers mount, per
//! namespace. A watch of our restore helpers only (a label selector), so it holds a few
//! records however large the cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::warn;

use crate::metrics::Metrics;
use crate::names;
use crate::policy::PodRecord;
use crate::policy::restore::{self, RestoringClaim};

/// The label selector of our restore helpers.
pub fn selector() -> String {
    format!(
        "{}={},{}={},{}",
        names::MANAGED_BY,
        names::MANAGED_BY_US,
        names::COMPONENT,
        names::RESTORE_HELPER,
        names::VELERO_RESTORE_NAME
    )
}

/// Restore helpers, as watched (empty without a cluster). Readiness does not wait for
/// this watch: the live webhook's main job (the backup annotation) must not depend on a
/// guard; until it has listed, the guard lets user servers through.
#[derive(Clone, Default)]
pub struct RestoreHelpers {
    store: Option<Store<PodRecord>>,
    synced: Arc<AtomicBool>,
}

impl RestoreHelpers {
    /// Starts the watch; the returned future runs it (forever: a watch error is retried
    /// with backoff while the store keeps its last state).
    pub fn start(
        client: kube::Client,
        metrics: Arc<Metrics>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().labels(&selector());
        let stream = watcher::watcher(Api::<PodRecord>::all(client), config)
            .default_backoff()
            .reflect(writer);
        let synced = Arc::new(AtomicBool::new(false));
        let this = Self {
            store: Some(store.clone()),
            synced: synced.clone(),
        };
        let run = async move {
            let ready = async {
                if store.wait_until_ready().await.is_ok() {
                    synced.store(true, Ordering::Release);
                    metrics.restore_guard_synced();
                }
            };
            let drive = async {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    if let Err(e) = event {
                        metrics.restore_guard_watch_error();
                        warn!(watch = "restore helpers", error = %e, "restore guard: watch error; retrying (meanwhile the guard lets user servers through)");
                    }
                }
            };
            futures::join!(ready, drive);
        };
        (this, run)
    }

    /// Set once the watch has listed.
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// The claims restore helpers mount in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<RestoringClaim> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        store
            .state()
            .iter()
            .filter(|p| p.namespace() == namespace && p.metadata.deletion_timestamp.is_none())
            .flat_map(|p| restore::restoring_claims(p.as_ref(), p.name()))
            .collect()
    }
}

/// How long one claim lookup may take: the restore path answers within the webhook's
/// request timeout (2 s), and a lookup that does not answer refuses the pod.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// At most this many claims are looked up for one pod (a re-created user pod restores a
/// handful); beyond, the pod is refused rather than the API server asked without bound.
const MAX_LOOKUPS: usize = 16;

/// The claims a pod re-created by a restore writes into, looked up when it is created
/// (`policy::restore::overwrites` decides), and the Events on those a restore may not
/// write over. A GET of each claim's metadata: a restore re-creates a pod once per user.
#[derive(Clone)]
pub struct RestoreClaims {
    client: Option<kube::Client>,
    events: super::events::EventSink,
}

impl RestoreClaims {
    pub fn new(client: Option<kube::Client>) -> Self {
        Self {
            events: super::events::EventSink::new(client.clone()),
            client,
        }
    }

    /// Each of `claims` in `namespace` as it is now (without a cluster: unknown).
    pub async fn look_up(
        &self,
        namespace: &str,
        claims: &[String],
    ) -> Vec<(String, restore::ClaimNow)> {
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        use restore::ClaimNow;
        let lookups = claims.iter().enumerate().map(|(i, claim)| async move {
            let now = match &self.client {
                None => ClaimNow::Unknown("no cluster to look it up in".to_owned()),
                Some(_) if i >= MAX_LOOKUPS => {
                    ClaimNow::Unknown(format!("the pod restores more than {MAX_LOOKUPS} claims"))
                }
                Some(_) if !names::is_dns1123_subdomain(claim) => {
                    ClaimNow::Unknown("not a claim name".to_owned())
                }
                Some(client) => {
                    let api: Api<PersistentVolumeClaim> =
                        Api::namespaced(client.clone(), namespace);
                    match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_metadata_opt(claim)).await {
                        Ok(Ok(None)) => ClaimNow::Absent,
                        Ok(Ok(Some(meta))) => ClaimNow::Present {
                            restore: meta
                                .metadata
                                .labels
                                .and_then(|mut l| l.remove(names::VELERO_RESTORE_NAME)),
                        },
                        Ok(Err(e)) => ClaimNow::Unknown(e.to_string()),
                        Err(_) => ClaimNow::Unknown(format!("no answer within {LOOKUP_TIMEOUT:?}")),
                    }
                }
            };
            (claim.clone(), now)
        });
        futures::future::join_all(lookups).await
    }

    /// A Warning Event on each claim a restore was refused to write over.
    pub fn refused(&self, namespace: &str, claims: &[String], message: &str) {
        for claim in claims {
            let regarding = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: Some(namespace.to_owned()),
                name: Some(claim.clone()),
                ..Default::default()
            };
            self.events
                .warn(regarding, "RestoreRefused", "Restore", message.to_owned());
        }
    }
}
