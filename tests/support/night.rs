//! A night of waves, played (tests/cluster/waves.rs, benches/controller.rs): the kubelet
//! (helpers Running once bound) and Velero (pkg/podvolume/backupper.go: a PodVolumeBackup
//! per volume named in `backup.velero.io/backup-volumes` of each Running pod a Backup
//! selects, labelled `velero.io/backup-name`, annotated `velero.io/pvc-name`; the Backup
//! then terminal), and a watch that records the most helpers bound at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::core::DynamicObject;
use kube::runtime::watcher;
use serde_json::json;
use velero_jupyterhub::names;

use super::cluster::{self, from_json};
use super::controller::HELPER_SELECTOR;

/// What the watch saw: the most helpers bound to one node at once, and at once overall.
#[derive(Default)]
pub struct Seen {
    on: HashMap<String, String>,
    pub max_on_node: usize,
    pub max_total: usize,
}

/// How Velero and the kubelet behave in the play.
#[derive(Clone, Debug)]
pub struct Play {
    /// The first wave helper of this claim never starts.
    pub stuck: Option<String>,
    /// Backups whose name contains this end Failed (e.g. `-wave2-`).
    pub failing: Option<String>,
    /// How long a Backup takes.
    pub backup_takes: Duration,
}

pub fn label(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata.labels.as_ref()?.get(key).cloned()
}

pub fn phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

pub fn claim_of(pod: &Pod) -> String {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .find_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .unwrap_or_default()
}

/// Follows the helpers bound to nodes and records the most on one node and overall.
pub async fn watch_limits(pods: Api<Pod>, seen: Arc<Mutex<Seen>>) {
    let stream = watcher::watcher(pods, watcher::Config::default().labels(HELPER_SELECTOR));
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let Ok(event) = event else { continue };
        let mut seen = seen.lock().expect("seen");
        let mut track = |p: &Pod, present: bool| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            match p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                Some(node) if present => {
                    seen.on.insert(uid, node);
                }
                _ => {
                    seen.on.remove(&uid);
                }
            }
        };
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => track(&p, true),
            watcher::Event::Delete(p) => track(&p, false),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        let mut per_node: HashMap<&String, usize> = HashMap::new();
        for node in seen.on.values() {
            *per_node.entry(node).or_default() += 1;
        }
        let most = per_node.values().copied().max().unwrap_or(0);
        let total = seen.on.len();
        seen.max_on_node = seen.max_on_node.max(most);
        seen.max_total = seen.max_total.max(total);
    }
}

/// The kubelet: helpers bound to a node become Running (but the first wave helper of
/// `play.stuck`). Velero: every Backup not yet terminal gets, `play.backup_takes` later,
/// a Completed PodVolumeBackup for each Running pod it selects, and ends Completed (or
/// Failed, `play.failing`).
pub async fn play_kubelet_and_velero(
    client: kube::Client,
    users: String,
    velero: String,
    play: Play,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &users);
    let resource = |kind: &str, plural: &str| {
        kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("velero.io", "v1", kind),
            plural,
        )
    };
    let backups: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &velero, &resource("Backup", "backups"));
    let pvbs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &velero,
        &resource("PodVolumeBackup", "podvolumebackups"),
    );
    let mut stuck_uid: Option<String> = None;
    let mut seen_backups: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(list) = pods
            .list(&ListParams::default().labels(HELPER_SELECTOR))
            .await
        else {
            continue;
        };
        for p in &list.items {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            if !bound || phase(p) == "Running" || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if play.stuck.as_deref() == Some(claim_of(p).as_str())
                && stuck_uid.as_ref().is_none_or(|u| *u == uid)
                && label(p, names::WAVE_NUMBER).is_some()
            {
                stuck_uid = Some(uid);
                continue;
            }
            cluster::set_phase_if_present(
                &pods,
                p.metadata.name.as_deref().unwrap_or_default(),
                "Running",
            )
            .await;
        }
        let Ok(list) = backups.list(&ListParams::default()).await else {
            continue;
        };
        for b in &list.items {
            let name = b.metadata.name.clone().unwrap_or_default();
            let phase = b.data["status"]["phase"].as_str().unwrap_or("New");
            if !matches!(phase, "New" | "InProgress") {
                continue;
            }
            let since = *seen_backups
                .entry(name.clone())
                .or_insert_with(std::time::Instant::now);
            if since.elapsed() < play.backup_takes {
                continue;
            }
            let selector: BTreeMap<String, String> =
                serde_json::from_value(b.data["spec"]["labelSelector"]["matchLabels"].clone())
                    .unwrap_or_default();
            let selected = |p: &Pod| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            };
            for p in list_pods(&pods)
                .await
                .iter()
                .filter(|p| selected(p) && phase_is_running(p))
            {
                let pvb = cluster::unique(&name);
                let made = pvbs.create(&PostParams::default(), &from_json(json!({
                    "apiVersion": "velero.io/v1", "kind": "PodVolumeBackup",
                    "metadata": {"name": pvb, "namespace": velero,
                        "labels": {(names::VELERO_BACKUP_NAME): name},
                        "annotations": {(names::VELERO_PVC_NAME): claim_of(p)}},
                    "spec": {"node": p.spec.as_ref().and_then(|s| s.node_name.clone()), "volume": "data",
                        "uploaderType": "kopia", "backupStorageLocation": "default", "repoIdentifier": "",
                        "pod": {"kind": "Pod", "namespace": users, "name": p.metadata.name, "uid": p.metadata.uid}},
                }))).await;
                if made.is_ok() {
                    let _ = pvbs.patch(&pvb, &Default::default(), &kube::api::Patch::Merge(json!({"status": {
                        "phase": "Completed", "completionTimestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "progress": {"totalBytes": 4096, "bytesDone": 4096}}}))).await;
                }
            }
            let end = if play
                .failing
                .as_ref()
                .is_some_and(|f| name.contains(f.as_str()))
            {
                "Failed"
            } else {
                "Completed"
            };
            let _ = backups.patch(&name, &Default::default(), &kube::api::Patch::Merge(json!({"status": {
                "phase": end, "completionTimestamp": k8s_openapi::jiff::Timestamp::now().to_string()}}))).await;
        }
    }
}

async fn list_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn phase_is_running(p: &Pod) -> bool {
    phase(p) == "Running" && p.metadata.deletion_timestamp.is_none()
}
