//! What the reconciler watches: kube-runtime reflectors, and one `Notify` that any change
//! pokes. Pods and claims are read straight into `policy::record`'s compact records (the
//! bulk of the memory), and pods are kept only where the hubs are (`pods.rs`); the few
//! Velero objects keep their types, minus managed fields.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use super::heartbeat::Heartbeat;
use super::pods::Pods;
use crate::cluster::velero::{
    Backup, DataUpload, PodVolumeBackup, PodVolumeRestore, Restore, Schedule,
};
use crate::names;
use crate::policy::{ClaimRecord, VolumeRecord};

#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub claims: Store<ClaimRecord>,
    pub pods: Pods,
    pub schedules: Store<Schedule>,
    pub backups: Store<Backup>,
    pub pvbs: Store<PodVolumeBackup>,
    /// The CSI data mover's copies (a claim copied without a pod): coverage only. A
    /// Velero without the DataUpload CRD (before v1.12) leaves it empty.
    pub uploads: Store<DataUpload>,
    pub restores: Store<Restore>,
    pub pvrs: Store<PodVolumeRestore>,
    /// Where helpers fit (`policy::waves::node_rooms`): Nodes, their CSI attach limits,
    /// attached volumes, and the volumes' drivers and node affinity.
    pub nodes: Store<Node>,
    pub csinodes: Store<CSINode>,
    pub attachments: Store<VolumeAttachment>,
    pub volumes: Store<VolumeRecord>,
    pub changed: Arc<Changed>,
}

/// What the watches poke on every event: a wake-up for the loop, and a count, so a pass
/// sees whether anything changed while it was writing.
#[derive(Default)]
pub struct Changed {
    notify: Notify,
    events: AtomicU64,
}

impl Changed {
    pub(super) fn poke(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Until the next event (or at once, if one came since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Stores {
    /// Starts the watches as tasks stopped by `stop`; the stores fill as they list.
    pub fn start(
        client: &kube::Client,
        velero_namespace: &str,
        namespace_selector: Option<&str>,
        heartbeat: &Arc<Heartbeat>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Self {
        let changed = Arc::new(Changed::default());
        // Paged lists (500 objects a page, the default), not `any_semantic`: a list at
        // resourceVersion 0 may be served whole from the API server's cache, ignoring the
        // page size, and one 10,000-pod answer held while it is read costs more than the
        // whole store.
        let config = watcher::Config::default();
        let mut namespace_config = config.clone();
        if let Some(selector) = namespace_selector {
            namespace_config = namespace_config.labels(selector);
        }
        // Namespaces: metadata only (labels and annotations are all we read). The pod
        // watch hears of them too: it keeps the pods of opted-in namespaces only.
        let namespaces_changed = Arc::new(Notify::new());
        let w = Watching {
            config: &config,
            changed: &changed,
            heartbeat,
            stop,
        };
        let namespaces = w.start_and_tell(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            &namespace_config,
            |n| n.metadata.managed_fields = None,
            Some(namespaces_changed.clone()),
            "namespaces",
        );
        let claims = w.start(Api::all(client.clone()), |_| {}, "claims");
        let pods = Pods::start(
            client,
            &config,
            namespaces.clone(),
            namespaces_changed,
            &changed,
            heartbeat,
            stop,
        );
        let schedules = w.start(
            Api::namespaced(client.clone(), velero_namespace),
            |s: &mut Schedule| s.metadata.managed_fields = None,
            "schedules",
        );
        let backups = w.start(
            Api::namespaced(client.clone(), velero_namespace),
            |b: &mut Backup| {
                b.metadata.managed_fields = None;
                // Only a wave Backup's record of its claims is read.
                if let Some(a) = b.metadata.annotations.as_mut() {
                    a.retain(|k, _| k == names::WAVE_CLAIMS || k == names::WAVE_GIVEN_UP);
                }
            },
            "backups",
        );
        let pvbs = w.start(
            Api::namespaced(client.clone(), velero_namespace),
            |p: &mut PodVolumeBackup| {
                p.metadata.managed_fields = None;
                // Only the claim's name (coverage) is read.
                if let Some(a) = p.metadata.annotations.as_mut() {
                    a.retain(|k, _| k == names::VELERO_PVC_NAME);
                }
            },
            "podvolumebackups",
        );
        let uploads = w.start_optional(
            Api::namespaced(client.clone(), velero_namespace),
            bare::<DataUpload>,
            "datauploads",
        );
        // Restores and PodVolumeRestores: when a restore helper is done.
        let restores = w.start(
            Api::namespaced(client.clone(), velero_namespace),
            bare::<Restore>,
            "restores",
        );
        let pvrs = w.start(
            Api::namespaced(client.clone(), velero_namespace),
            bare::<PodVolumeRestore>,
            "podvolumerestores",
        );
        let nodes = w.start(
            Api::all(client.clone()),
            |n: &mut Node| {
                n.metadata.managed_fields = None;
                n.metadata.annotations = None;
                if let Some(s) = n.status.as_mut() {
                    // The bulk of a Node: only allocatable and conditions are read.
                    s.images = None;
                    s.volumes_attached = None;
                    s.volumes_in_use = None;
                    s.node_info = None;
                    s.addresses = None;
                    s.capacity = None;
                    s.daemon_endpoints = None;
                    s.features = None;
                    s.runtime_handlers = None;
                }
            },
            "nodes",
        );
        let csinodes = w.start(
            Api::all(client.clone()),
            |c: &mut CSINode| c.metadata.managed_fields = None,
            "csinodes",
        );
        let attachments = w.start(
            Api::all(client.clone()),
            |a: &mut VolumeAttachment| {
                a.metadata.managed_fields = None;
                a.status = None;
            },
            "volumeattachments",
        );
        // Compact records: the CSI driver and node affinity only.
        let volumes = w.start(
            Api::all(client.clone()),
            |_: &mut VolumeRecord| {},
            "persistentvolumes",
        );
        Self {
            nodes,
            csinodes,
            attachments,
            volumes,
            namespaces,
            claims,
            pods,
            schedules,
            backups,
            pvbs,
            uploads,
            restores,
            pvrs,
            changed,
        }
    }

    /// How many watch events have arrived so far.
    pub fn generation(&self) -> u64 {
        self.changed.events.load(Ordering::Relaxed)
    }

    /// Waits until every watch has listed once: planning on a partial view would create
    /// helpers for claims whose user pods are not seen yet.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.namespaces.wait_until_ready().await?;
        self.claims.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.schedules.wait_until_ready().await?;
        self.backups.wait_until_ready().await?;
        self.pvbs.wait_until_ready().await?;
        self.restores.wait_until_ready().await?;
        self.pvrs.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.csinodes.wait_until_ready().await?;
        self.attachments.wait_until_ready().await?;
        self.volumes.wait_until_ready().await?;
        Ok(())
    }
}

/// Strips an object of its managed fields and annotations (neither is read).
fn bare<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// What a reflector can hold.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// What every watch shares: the list settings, the loop's wake-up, the probes' heartbeat,
/// and the token that stops it.
struct Watching<'a> {
    config: &'a watcher::Config,
    changed: &'a Arc<Changed>,
    heartbeat: &'a Arc<Heartbeat>,
    stop: &'a tokio_util::sync::CancellationToken,
}

impl Watching<'_> {
    /// A reflector of `api`'s objects, each stripped by `strip` of what is never read.
    fn start<K>(&self, api: Api<K>, strip: fn(&mut K), what: &'static str) -> Store<K>
    where
        K: Watched,
    {
        self.start_and_tell(api, self.config, strip, None, what)
    }

    /// A reflector of objects whose kind may not exist (another project's optional
    /// CRD): its failures are logged once while they last, never fail the probes, and
    /// `Stores::ready` does not wait for it.
    fn start_optional<K>(&self, api: Api<K>, strip: fn(&mut K), what: &'static str) -> Store<K>
    where
        K: Watched,
    {
        let (store, writer) = reflector::store();
        let stream = watcher::watcher(api, self.config.clone())
            .default_backoff()
            .modify(strip)
            .reflect(writer);
        spawn_watch(what, stream, self.changed, None, None, self.stop);
        store
    }

    /// The same with its own list settings, also poking `tell` on every event from its
    /// first finished list on.
    fn start_and_tell<K>(
        &self,
        api: Api<K>,
        config: &watcher::Config,
        strip: fn(&mut K),
        tell: Option<Arc<Notify>>,
        what: &'static str,
    ) -> Store<K>
    where
        K: Watched,
    {
        let (store, writer) = reflector::store();
        let stream = watcher::watcher(api, config.clone())
            .default_backoff()
            .modify(strip)
            .reflect(writer);
        spawn_watch(
            what,
            stream,
            self.changed,
            tell,
            Some(self.heartbeat),
            self.stop,
        );
        store
    }
}

/// Drives a reflector stream, poking `changed` on every event and telling `heartbeat`
/// whether the watch works (`None`: an optional watch, whose failures are logged once
/// while they last), until `stop`.
fn spawn_watch<S, T>(
    what: &'static str,
    stream: S,
    changed: &Arc<Changed>,
    tell: Option<Arc<Notify>>,
    heartbeat: Option<&Arc<Heartbeat>>,
    stop: &tokio_util::sync::CancellationToken,
) where
    S: Stream<Item = Result<watcher::Event<T>, watcher::Error>> + Send + 'static,
{
    let changed = changed.clone();
    let heartbeat = heartbeat.cloned();
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => match event {
                    // The watcher says Init as it starts each (re)list, before the
                    // request, and InitApply for each object of a list that may still
                    // fail: only a finished list, or a watch event, shows it works.
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => changed.poke(),
                    Some(Ok(_)) => {
                        failing = false;
                        if let Some(heartbeat) = &heartbeat {
                            heartbeat.watch_ok(what);
                        }
                        changed.poke();
                        if let Some(tell) = &tell {
                            tell.notify_one();
                        }
                    }
                    // The backoff retries; the store keeps its last state meanwhile.
                    Some(Err(e)) => match &heartbeat {
                        Some(heartbeat) => {
                            heartbeat.watch_failed(what);
                            warn!(watch = what, error = %e, "watch error; retrying");
                        }
                        None if !failing => {
                            failing = true;
                            warn!(watch = what, error = %e, "optional watch failing (is the CRD installed, and may the controller list it: manifests/controller.yaml?); retrying, said again only after it recovers");
                        }
                        None => {}
                    },
                    None => return,
                },
            }
        }
    });
}
