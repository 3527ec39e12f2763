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
