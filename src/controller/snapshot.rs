//! One pass's view of the cluster: every store read once, at the start of the pass, so
//! every planner in the pass decides from the same objects (a write made earlier in the
//! pass, or a watch event that arrives meanwhile, is seen by the next pass).

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;

use super::stores::Stores;
use crate::cluster::velero::{
    Backup, DataUpload, PodVolumeBackup, PodVolumeRestore, Restore, Schedule,
};
use crate::policy::namespace;
use crate::policy::{ClaimRecord, PodRecord, VolumeRecord};

pub struct Snapshot {
    pub now: Timestamp,
    /// How many watch events had arrived when it was taken.
    pub generation: u64,
    /// The namespaces the controller manages (its `--namespace-selector`), less those
    /// that opted in so recently that the pod watch has not listed their pods yet: a
    /// pass leaves those alone until it has.
    pub namespaces: Vec<Arc<PartialObjectMeta<Namespace>>>,
    pub claims: Vec<Arc<ClaimRecord>>,
    /// The pods of opted-in namespaces, and our own pods anywhere.
    pub pods: Vec<Arc<PodRecord>>,
    /// Per node, the pod slots taken by every other pod.
    pub slots_elsewhere: Vec<(Arc<str>, u32)>,
    pub schedules: Vec<Arc<Schedule>>,
    pub backups: Vec<Arc<Backup>>,
    pub pvbs: Vec<Arc<PodVolumeBackup>>,
    pub uploads: Vec<Arc<DataUpload>>,
    pub restores: Vec<Arc<Restore>>,
    pub pvrs: Vec<Arc<PodVolumeRestore>>,
    pub nodes: Vec<Arc<Node>>,
    pub csinodes: Vec<Arc<CSINode>>,
    pub attachments: Vec<Arc<VolumeAttachment>>,
    pub volumes: Vec<Arc<VolumeRecord>>,
}

impl Snapshot {
    pub fn take(stores: &Stores, now: Timestamp) -> Self {
        let generation = stores.generation();
        let pods = stores.pods.read();
        let covered: Arc<BTreeSet<String>> = pods.covered;
        let mut namespaces = stores.namespaces.state();
        namespaces.retain(|n| {
            !namespace::is_opted_in(n.metadata.labels.as_ref())
                || n.metadata
                    .name
                    .as_ref()
                    .is_some_and(|name| covered.contains(name))
        });
        Self {
            now,
            generation,
            namespaces,
            claims: stores.claims.state(),
            pods: pods.kept,
            slots_elsewhere: pods.slots_elsewhere,
            schedules: stores.schedules.state(),
            backups: stores.backups.state(),
            pvbs: stores.pvbs.state(),
            uploads: stores.uploads.state(),
            restores: stores.restores.state(),
            pvrs: stores.pvrs.state(),
            nodes: stores.nodes.state(),
            csinodes: stores.csinodes.state(),
            attachments: stores.attachments.state(),
            volumes: stores.volumes.state(),
        }
    }
}
