//! What the reconciler watches: kube-runtime reflectors, each object stripped to what
//! `policy` reads before it is stored (managed fields, container specs, status details
//! are dropped), and one `Notify` that any change pokes.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Container, Namespace, PersistentVolumeClaim, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use crate::cluster::velero::{Backup, PodVolumeBackup, Schedule};
use crate::names;

#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub claims: Store<PersistentVolumeClaim>,
    pub pods: Store<Pod>,
    pub schedules: Store<Schedule>,
    pub backups: Store<Backup>,
    pub pvbs: Store<PodVolumeBackup>,
    pub changed: Arc<Notify>,
}

impl Stores {
    /// Starts the watches as tasks stopped by `stop`; the stores fill as they list.
    pub fn start(
        client: &kube::Client,
        velero_namespace: &str,
        namespace_selector: Option<&str>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Self {
        let changed = Arc::new(Notify::new());
        let config = watcher::Config::default().any_semantic();
        let mut namespace_config = config.clone();
        if let Some(selector) = namespace_selector {
            namespace_config = namespace_config.labels(selector);
        }
        // Namespaces: metadata only (labels and annotations are all we read).
        let namespaces = watch(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            &namespace_config,
            |n| n.metadata.managed_fields = None,
            &changed,
            stop,
            "namespaces",
        );
        let claims = watch(
            Api::all(client.clone()),
            &config,
            strip_claim,
            &changed,
            stop,
            "claims",
        );
        let pods = watch(
            Api::all(client.clone()),
            &config,
            strip_pod,
            &changed,
            stop,
            "pods",
        );
        let schedules = watch(
            Api::namespaced(client.clone(), velero_namespace),
            &config,
            |s: &mut Schedule| s.metadata.managed_fields = None,
            &changed,
            stop,
            "schedules",
        );
        let backups = watch(
            Api::namespaced(client.clone(), velero_namespace),
            &config,
            |b: &mut Backup| {
                b.metadata.managed_fields = None;
                b.metadata.annotations = None;
            },
            &changed,
            stop,
            "backups",
        );
        let pvbs = watch(
            Api::namespaced(client.clone(), velero_namespace),
            &config,
            |p: &mut PodVolumeBackup| {
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
            },
            &changed,
            stop,
            "podvolumebackups",
        );
        Self {
            namespaces,
            claims,
            pods,
            schedules,
            backups,
            pvbs,
            changed,
        }
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
        Ok(())
    }
}

fn watch<K>(
    api: Api<K>,
    config: &watcher::Config,
    strip: fn(&mut K),
    changed: &Arc<Notify>,
    stop: &tokio_util::sync::CancellationToken,
    what: &'static str,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(api, config.clone())
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    spawn(what, stream, changed, stop);
    store
}

/// Drives a reflector stream, poking `changed` on every event, until `stop`.
fn spawn<S, T>(
    what: &'static str,
    stream: S,
    changed: &Arc<Notify>,
    stop: &tokio_util::sync::CancellationToken,
) where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
{
    let changed = changed.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => match event {
                    Some(Ok(_)) => changed.notify_one(),
                    // The backoff retries; the store keeps its last state meanwhile.
                    Some(Err(e)) => warn!(watch = what, error = %e, "watch error; retrying"),
                    None => return,
                },
            }
        }
    });
}

fn strip_claim(c: &mut PersistentVolumeClaim) {
    c.metadata.managed_fields = None;
    c.metadata.annotations = None;
    c.spec = None;
    if let Some(status) = c.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

/// Keeps what the plan and the webhook's decision read: labels, our and Velero's
/// annotations, volumes (claims), which containers mount which volume, node and phase.
fn strip_pod(p: &mut Pod) {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| {
            k == names::VELERO_BACKUP_VOLUMES
                || k == names::VELERO_BACKUP_VOLUMES_EXCLUDES
                || k == names::POD_SKIP
                || k == names::HELPER_CLAIM
        });
    }
    if let Some(spec) = p.spec.as_mut() {
        let keep_mounts = |c: &mut Container| Container {
            name: std::mem::take(&mut c.name),
            volume_mounts: c.volume_mounts.take().map(|mounts| {
                mounts
                    .into_iter()
                    .map(|m| k8s_openapi::api::core::v1::VolumeMount {
                        name: m.name,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        spec.containers = spec.containers.iter_mut().map(keep_mounts).collect();
        spec.init_containers = spec
            .init_containers
            .take()
            .map(|mut cs| cs.iter_mut().map(keep_mounts).collect());
        spec.volumes = spec.volumes.take().map(|vs| {
            vs.into_iter()
                .map(|v| k8s_openapi::api::core::v1::Volume {
                    name: v.name,
                    persistent_volume_claim: v.persistent_volume_claim,
                    ..Default::default()
                })
                .collect()
        });
        *spec = k8s_openapi::api::core::v1::PodSpec {
            containers: std::mem::take(&mut spec.containers),
            init_containers: spec.init_containers.take(),
            volumes: spec.volumes.take(),
            node_name: spec.node_name.take(),
            ..Default::default()
        };
    }
    if let Some(status) = p.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}
