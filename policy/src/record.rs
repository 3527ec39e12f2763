//! What the controller keeps of each Pod and PersistentVolumeClaim it watches: only what
//! [`plan`](crate::plan) and the webhook's rules read.
//!
//! Why not `k8s_openapi`'s types with fields cleared: their structs stay full size. A Pod
//! is 2 KiB before any string, each of its Volumes 3 KiB and each Container 2 KiB, so
//! 10,000 stripped z2jh pods still held ~150 MiB. These records deserialize straight from
//! the watch's JSON, skip everything else without keeping it (managedFields, container
//! specs, status), and implement `k8s_openapi::Resource`, so a kube `Api`, watcher and
//! reflector use them as they are.
//!
//! Labels and annotations are kept only for the keys in [`POD_LABELS`] and
//! [`POD_ANNOTATIONS`] (a pod's other keys are anyone's, and unbounded), in a short list
//! rather than a map (a BTreeMap node is 544 bytes, whatever it holds), and read through
//! [`PodFacts`]; reading any other key is a bug, caught by a debug assertion in tests.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use crate::names;
use crate::pod::PodFacts;

/// The pod labels any decision reads.
pub const POD_LABELS: &[&str] = &[
    names::MANAGED_BY,
    names::COMPONENT,
    names::JUPYTERHUB_COMPONENT,
    names::JUPYTERHUB_USERNAME,
    names::VELERO_RESTORE_NAME,
];

/// The pod annotations any decision reads.
pub const POD_ANNOTATIONS: &[&str] = &[
    names::VELERO_BACKUP_VOLUMES,
    names::VELERO_BACKUP_VOLUMES_EXCLUDES,
    names::POD_SKIP,
    names::HELPER_CLAIM,
];

/// The claim labels any decision reads.
pub const CLAIM_LABELS: &[&str] = &[names::JUPYTERHUB_USERNAME, names::VELERO_RESTORE_NAME];

/// A watched Pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodRecord {
    /// name, namespace, uid, resourceVersion, creation and deletion timestamps; nothing
    /// else.
    pub metadata: ObjectMeta,
    labels: Kept,
    /// `None`: the pod has no annotations map at all.
    annotations: Option<Kept>,
    pub node_name: Option<String>,
    /// The one node a required node affinity on `metadata.name` pins it to (our helpers,
    /// DaemonSet pods): where it will run once the scheduler binds it.
    pub pinned_node: Option<String>,
    pub phase: Option<String>,
    /// `(volume name, claim name if a persistentVolumeClaim)`, in `spec.volumes` order.
    pub volumes: Vec<(String, Option<String>)>,
    /// Volumes some regular container mounts (Velero backs up only these).
    pub container_mounts: Vec<String>,
    /// Volumes some init container mounts.
    pub init_container_mounts: Vec<String>,
    /// Every label, for our own pods only (`app.kubernetes.io/managed-by:
    /// velero-jupyterhub`): a helper must carry what each open window's Schedule selects.
    pub own_pod_labels: Vec<(String, String)>,
}

/// A watched PersistentVolumeClaim.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClaimRecord {
    /// name, namespace, uid, resourceVersion, creation and deletion timestamps; nothing
    /// else.
    pub metadata: ObjectMeta,
    labels: Kept,
    pub phase: Option<String>,
    /// `spec.volumeName`: the PersistentVolume it is bound to (its CSI driver and node
    /// affinity decide where a helper can mount it).
    pub volume_name: Option<Box<str>>,
    /// `ReadWriteOncePod` among `spec.accessModes`.
    pub exclusive: bool,
}

/// A PersistentVolumeClaim as the plan, coverage and status read it: borrowed from a
/// [`ClaimRecord`] ([`ClaimRecord::view`]), or built directly where no record is kept.
#[derive(Clone, Copy, Debug)]
pub struct ClaimView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `status.phase == Bound`: only a bound claim can be mounted.
    pub bound: bool,
    pub username: Option<&'a str>,
    /// `ReadWriteOncePod` among its access modes: the scheduler keeps a second pod that
    /// mounts it unscheduled while another uses it.
    pub exclusive: bool,
}

/// A watched PersistentVolume: where a claim's volume can be attached (`policy::waves`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumeRecord {
    /// The name and resourceVersion; nothing else.
    pub metadata: ObjectMeta,
    /// `spec.csi.driver`: whose attach limit counts (`None`: not a CSI volume).
    pub driver: Option<Box<str>>,
    /// `spec.nodeAffinity`: the nodes it can attach on (zonal disks, local volumes).
    pub node_affinity: Option<k8s_openapi::api::core::v1::VolumeNodeAffinity>,
    /// `spec.hostPath` is set: Velero never copies it (`policy::datapath`).
    pub host_path: bool,
}

impl VolumeRecord {
    /// What `policy::datapath` can read of it (the rest is not kept).
    pub fn path_facts(&self) -> crate::datapath::PvFacts<'_> {
        crate::datapath::PvFacts {
            csi: self.driver.as_deref().map(|d| (d, None)),
            volume_type: if self.host_path {
                Some("hostPath")
            } else {
                self.driver.as_ref().map(|_| "csi")
            },
            ..Default::default()
        }
    }
}

/// The kept entries of a label or annotation map; each key is one of a fixed list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Kept(Vec<(&'static str, Box<str>)>);

impl Kept {
    fn from_map(map: BTreeMap<String, String>, keys: &[&'static str]) -> Self {
        let mut kept: Vec<(&'static str, Box<str>)> = map
            .into_iter()
            .filter_map(|(k, v)| Some((*keys.iter().find(|key| **key == k)?, v.into())))
            .collect();
        kept.shrink_to_fit();
        Self(kept)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| &**v)
    }
}

impl PodRecord {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn uid(&self) -> &str {
        self.metadata.uid.as_deref().unwrap_or_default()
    }

    pub fn node(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    pub fn phase(&self) -> Option<&str> {
        self.phase.as_deref()
    }

    /// Succeeded or Failed: its containers will not run again.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase(), Some("Succeeded" | "Failed"))
    }

    /// An own pod's label (ours carry all theirs: [`PodRecord::own_pod_labels`]).
    pub fn own_label(&self, key: &str) -> Option<&str> {
        self.own_pod_labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl ClaimRecord {
    pub fn label(&self, key: &str) -> Option<&str> {
        debug_assert!(CLAIM_LABELS.contains(&key), "claim label {key} is not kept");
        self.labels.get(key)
    }

    pub fn view(&self) -> ClaimView<'_> {
        let m = &self.metadata;
        ClaimView {
            namespace: m.namespace.as_deref().unwrap_or_default(),
            name: m.name.as_deref().unwrap_or_default(),
            uid: m.uid.as_deref().unwrap_or_default(),
            bound: self.phase.as_deref() == Some("Bound"),
            username: self.label(names::JUPYTERHUB_USERNAME),
            exclusive: self.exclusive,
        }
    }
}

impl PodFacts for PodRecord {
    fn label(&self, key: &str) -> Option<&str> {
        debug_assert!(POD_LABELS.contains(&key), "pod label {key} is not kept");
        self.labels.get(key)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        debug_assert!(
            POD_ANNOTATIONS.contains(&key),
            "pod annotation {key} is not kept"
        );
        self.annotations.as_ref()?.get(key)
    }

    fn has_annotations_map(&self) -> bool {
        self.annotations.is_some()
    }

    fn volumes(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.volumes
            .iter()
            .map(|(name, claim)| (name.as_str(), claim.as_deref()))
    }

    fn container_mounts(&self) -> impl Iterator<Item = &str> {
        self.container_mounts.iter().map(String::as_str)
    }

    fn init_container_mounts(&self) -> impl Iterator<Item = &str> {
        self.init_container_mounts.iter().map(String::as_str)
    }
}

// kube's `Resource` comes with these (a blanket impl): `Api<PodRecord>` lists and watches
// `/api/v1/pods` and reads the answer as records.
impl k8s_openapi::Resource for PodRecord {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodRecord {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl k8s_openapi::Resource for ClaimRecord {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "PersistentVolumeClaim";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "persistentvolumeclaims";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for ClaimRecord {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

// ---- the wire shapes: every field optional, unknown fields skipped ----

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaWire {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

impl MetaWire {
    /// The metadata to keep, and the labels and annotations maps as they came.
    #[allow(clippy::type_complexity)]
    fn split(
        self,
    ) -> (
        ObjectMeta,
        Option<BTreeMap<String, String>>,
        Option<BTreeMap<String, String>>,
    ) {
        let meta = ObjectMeta {
            name: self.name,
            namespace: self.namespace,
            uid: self.uid,
            resource_version: self.resource_version,
            creation_timestamp: self.creation_timestamp,
            deletion_timestamp: self.deletion_timestamp,
            ..ObjectMeta::default()
        };
        (meta, self.labels, self.annotations)
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodWire {
    metadata: Option<MetaWire>,
    spec: Option<PodSpecWire>,
    status: Option<PhaseWire>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecWire {
    node_name: Option<String>,
    affinity: Option<AffinityWire>,
    containers: Option<Vec<ContainerWire>>,
    init_containers: Option<Vec<ContainerWire>>,
    volumes: Option<Vec<VolumeWire>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AffinityWire {
    node_affinity: Option<NodeAffinityWire>,
}

#[derive(Deserialize)]
struct NodeAffinityWire {
    #[serde(rename = "requiredDuringSchedulingIgnoredDuringExecution")]
    required: Option<NodeSelectorWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeSelectorWire {
    node_selector_terms: Vec<TermWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TermWire {
    match_expressions: Option<Vec<serde::de::IgnoredAny>>,
    match_fields: Option<Vec<RequirementWire>>,
}

#[derive(Deserialize)]
struct RequirementWire {
    key: String,
    operator: String,
    values: Option<Vec<String>>,
}

impl AffinityWire {
    /// One term, whose only requirement is `metadata.name In [node]`.
    fn pinned_node(self) -> Option<String> {
        let [term] =
            <[TermWire; 1]>::try_from(self.node_affinity?.required?.node_selector_terms).ok()?;
        if term.match_expressions.is_some_and(|e| !e.is_empty()) {
            return None;
        }
        let [field] = <[RequirementWire; 1]>::try_from(term.match_fields?).ok()?;
        let [node] = <[String; 1]>::try_from(field.values?).ok()?;
        (field.key == "metadata.name" && field.operator == "In").then_some(node)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerWire {
    volume_mounts: Option<Vec<NameWire>>,
}

#[derive(Deserialize)]
struct NameWire {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeWire {
    name: String,
    persistent_volume_claim: Option<ClaimSourceWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimSourceWire {
    claim_name: String,
}

#[derive(Default, Deserialize)]
struct PhaseWire {
    phase: Option<String>,
}

#[derive(Default, Deserialize)]
struct ClaimWire {
    metadata: Option<MetaWire>,
    spec: Option<ClaimSpecWire>,
    status: Option<PhaseWire>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimSpecWire {
    volume_name: Option<String>,
    access_modes: Option<Vec<String>>,
}

/// The distinct volume names the containers mount.
fn mounts(containers: Option<Vec<ContainerWire>>) -> Vec<String> {
    let mut out: Vec<String> = containers
        .unwrap_or_default()
        .into_iter()
        .flat_map(|c| c.volume_mounts.unwrap_or_default())
        .map(|m| m.name)
        .collect();
    out.sort_unstable();
    out.dedup();
    out.shrink_to_fit();
    out
}

impl<'de> Deserialize<'de> for PodRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = PodWire::deserialize(d)?;
        let spec = wire.spec.unwrap_or_default();
        let (metadata, labels, annotations) = wire.metadata.unwrap_or_default().split();
        let labels = labels.unwrap_or_default();
        let ours = labels.get(names::MANAGED_BY).map(String::as_str) == Some(names::MANAGED_BY_US);
        let own_pod_labels = if ours {
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            metadata,
            own_pod_labels,
            labels: Kept::from_map(labels, POD_LABELS),
            annotations: annotations.map(|a| Kept::from_map(a, POD_ANNOTATIONS)),
            node_name: spec.node_name,
            pinned_node: spec.affinity.and_then(AffinityWire::pinned_node),
            phase: wire.status.and_then(|s| s.phase),
            volumes: spec
                .volumes
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.name, v.persistent_volume_claim.map(|c| c.claim_name)))
                .collect(),
            container_mounts: mounts(spec.containers),
            init_container_mounts: mounts(spec.init_containers),
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersistentVolumeWire {
    metadata: Option<MetaWire>,
    spec: Option<VolumeSpecWire>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeSpecWire {
    csi: Option<CsiWire>,
    host_path: Option<serde::de::IgnoredAny>,
    node_affinity: Option<k8s_openapi::api::core::v1::VolumeNodeAffinity>,
}

#[derive(Deserialize)]
struct CsiWire {
    driver: String,
}

impl<'de> Deserialize<'de> for VolumeRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = PersistentVolumeWire::deserialize(d)?;
        // The name, and the resourceVersion the watch resumes from; not the uid, which
        // the reflector would copy into its key for each of the cluster's volumes.
        let (metadata, _, _) = wire.metadata.unwrap_or_default().split();
        let metadata = ObjectMeta {
            name: metadata.name,
            resource_version: metadata.resource_version,
            ..ObjectMeta::default()
        };
        let spec = wire.spec.unwrap_or_default();
        Ok(Self {
            metadata,
            driver: spec.csi.map(|c| c.driver.into_boxed_str()),
            node_affinity: spec.node_affinity,
            host_path: spec.host_path.is_some(),
        })
    }
}

impl k8s_openapi::Resource for VolumeRecord {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "PersistentVolume";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "persistentvolumes";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for VolumeRecord {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de> Deserialize<'de> for ClaimRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = ClaimWire::deserialize(d)?;
        let (metadata, labels, _) = wire.metadata.unwrap_or_default().split();
        let spec = wire.spec.unwrap_or_default();
        Ok(Self {
            metadata,
            labels: Kept::from_map(labels.unwrap_or_default(), CLAIM_LABELS),
            phase: wire.status.and_then(|s| s.phase),
            volume_name: spec
                .volume_name
                .filter(|v| !v.is_empty())
                .map(String::into_boxed_str),
            exclusive: spec
                .access_modes
                .unwrap_or_default()
                .iter()
                .any(|m| m == "ReadWriteOncePod"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    const POD: &str = r#"{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "jupyter-alice", "namespace": "jhub", "uid": "u1",
            "resourceVersion": "7", "managedFields": [{"manager": "x"}],
            "labels": {"component": "singleuser-server", "hub.jupyter.org/username": "alice", "app": "jupyterhub"},
            "annotations": {"backup.velero.io/backup-volumes": "home", "hub.jupyter.org/whatever": "big"}},
        "spec": {"nodeName": "n1",
            "initContainers": [{"name": "init", "image": "i", "volumeMounts": [{"name": "scratch", "mountPath": "/s"}]}],
            "containers": [{"name": "notebook", "image": "j", "env": [{"name": "A", "value": "b"}],
                "volumeMounts": [{"name": "home", "mountPath": "/home"}, {"name": "home", "mountPath": "/x"}]}],
            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": "claim-alice"}},
                        {"name": "scratch", "emptyDir": {}}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    }"#;

    #[test]
    fn a_pod_record_keeps_what_decisions_read_and_answers_like_the_pod() {
        let record: PodRecord = serde_json::from_str(POD).unwrap();
        let pod: Pod = serde_json::from_str(POD).unwrap();
        assert_eq!(record.name(), "jupyter-alice");
        assert_eq!(record.uid(), "u1");
        assert_eq!(record.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(record.node(), Some("n1"));
        assert_eq!(record.phase(), Some("Running"));
        assert!(record.metadata.managed_fields.is_none());
        // Only the kept keys stay.
        assert_eq!(record.labels.0.len(), 2);
        assert_eq!(record.annotations.as_ref().map(|a| a.0.len()), Some(1));
        // Every fact the decisions read, the same as from the full Pod.
        for key in [names::JUPYTERHUB_COMPONENT, names::JUPYTERHUB_USERNAME] {
            assert_eq!(record.label(key), pod.label(key), "{key}");
        }
        assert_eq!(
            record.annotation(names::VELERO_BACKUP_VOLUMES),
            pod.annotation(names::VELERO_BACKUP_VOLUMES)
        );
        assert_eq!(
            record.volumes().collect::<Vec<_>>(),
            pod.volumes().collect::<Vec<_>>()
        );
        for v in ["home", "scratch", "nope"] {
            assert_eq!(record.mounted_by_container(v), pod.mounted_by_container(v));
            assert_eq!(
                record.mounted_by_init_container(v),
                pod.mounted_by_init_container(v)
            );
        }
        assert_eq!(record.container_mounts, ["home"]);
    }

    #[test]
    fn missing_and_null_fields_are_empty_and_an_emptied_annotation_map_still_exists() {
        let bare: PodRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(bare, PodRecord::default());
        assert!(!bare.has_annotations_map());
        let nulls: PodRecord = serde_json::from_str(
            r#"{"metadata": {"labels": null, "annotations": {"other": "x"}}, "spec": {"volumes": null, "containers": [{"volumeMounts": null}]}, "status": null}"#,
        )
        .unwrap();
        assert!(nulls.has_annotations_map());
        assert_eq!(nulls.volumes().count(), 0);
        assert!(!nulls.mounted_by_container("x"));
    }

    #[test]
    fn a_claim_record_keeps_name_phase_and_username() {
        let claim: ClaimRecord = serde_json::from_str(
            r#"{"metadata": {"name": "claim-alice", "namespace": "jhub", "uid": "c1",
                "labels": {"hub.jupyter.org/username": "alice", "app": "jupyterhub"},
                "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-1"},
                "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}"#,
        )
        .unwrap();
        let view = claim.view();
        assert_eq!(
            (
                view.namespace,
                view.name,
                view.uid,
                view.bound,
                view.username
            ),
            ("jhub", "claim-alice", "c1", true, Some("alice"))
        );
        assert!(claim.metadata.annotations.is_none());
        assert_eq!(claim.labels.0.len(), 1);
        assert!(!view.exclusive);
        let rwop: ClaimRecord = serde_json::from_str(
            r#"{"metadata": {"name": "claim-bob", "namespace": "jhub"},
                "spec": {"accessModes": ["ReadWriteOncePod"]}}"#,
        )
        .unwrap();
        assert!(rwop.view().exclusive, "ReadWriteOncePod");
    }

    #[test]
    fn a_wrongly_typed_field_is_an_error_not_a_guess() {
        assert!(
            serde_json::from_str::<PodRecord>(r#"{"spec": {"volumes": [{"name": 3}]}}"#).is_err()
        );
    }

    #[test]
    fn a_pod_pinned_to_one_node_by_affinity_is_counted_there() {
        let pinned = |affinity: serde_json::Value| -> Option<String> {
            let pod = serde_json::json!({"metadata": {"name": "p"}, "spec": {"affinity": affinity, "containers": []}});
            serde_json::from_value::<PodRecord>(pod)
                .unwrap()
                .pinned_node
        };
        let term = |fields: serde_json::Value| {
            serde_json::json!({"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [fields]}}})
        };
        assert_eq!(
            pinned(term(
                serde_json::json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]})
            )),
            Some("n1".to_owned())
        );
        for (case, affinity) in [
            (
                "two nodes",
                term(
                    serde_json::json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}]}),
                ),
            ),
            (
                "NotIn",
                term(
                    serde_json::json!({"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]}),
                ),
            ),
            (
                "and a label",
                term(
                    serde_json::json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
                "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}),
                ),
            ),
            (
                "preferred only",
                serde_json::json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}),
            ),
        ] {
            assert_eq!(pinned(affinity), None, "{case}");
        }
    }

    /// A Hetzner volume as the API server sends it: only the driver and the zone kept.
    #[test]
    fn a_volume_keeps_its_driver_and_node_affinity() {
        let v: VolumeRecord = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pvc-1", "uid": "u", "resourceVersion": "9", "annotations": {"pv.kubernetes.io/provisioned-by": "csi.hetzner.cloud"},
                "managedFields": [{"manager": "x"}]},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                "csi": {"driver": "csi.hetzner.cloud", "volumeHandle": "123", "fsType": "ext4"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "csi.hetzner.cloud/location", "operator": "In", "values": ["fsn1"]}]}]}},
                "claimRef": {"namespace": "jhub", "name": "claim-alice"}},
            "status": {"phase": "Bound"}
        }))
        .unwrap();
        assert_eq!(v.metadata.name.as_deref(), Some("pvc-1"));
        assert_eq!(v.driver.as_deref(), Some("csi.hetzner.cloud"));
        let terms = &v
            .node_affinity
            .unwrap()
            .required
            .unwrap()
            .node_selector_terms;
        assert_eq!(
            terms[0].match_expressions.as_ref().unwrap()[0].values,
            Some(vec!["fsn1".to_owned()])
        );
        assert!(v.metadata.annotations.is_none() && v.metadata.managed_fields.is_none());
        assert_eq!(v.metadata.uid, None);
        let host: VolumeRecord = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "local"}, "spec": {"hostPath": {"path": "/x"}}}))
        .unwrap();
        assert_eq!((host.driver, host.node_affinity), (None, None));
    }
}
