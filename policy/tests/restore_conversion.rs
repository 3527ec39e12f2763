//! Table tests of the restore conversion (`policy::restore`) on
//! pods as Velero re-creates them: the fixture's Velero-re-created helper
//! (tests/fixtures/velero-helper-pod-and-restored-pod.example.yaml) and the z2jh user pod
//! with Velero's changes applied as pkg/restore/restore.go and
//! pkg/restore/actions/pod_volume_restore_action.go make them (v1.18).

use k8s_openapi::api::core::v1::Pod;
use testkit::fixtures;
use velero_jupyterhub_policy::PodFacts;
use velero_jupyterhub_policy::helper::HelperOptions;
use velero_jupyterhub_policy::names;
use velero_jupyterhub_policy::restore::{is_restore_candidate, restore_helper};

fn options() -> HelperOptions {
    fixtures::helper_options()
}

fn restored_z2jh(restored: &[&str]) -> Pod {
    serde_json::from_value(fixtures::restored_z2jh(restored)).expect("pod")
}

fn first_claim_volume(pod: &Pod) -> String {
    pod.volumes()
        .find_map(|(name, claim)| claim.map(|_| name.to_owned()))
        .expect("a claim volume")
}

#[test]
fn a_restored_user_pod_becomes_a_restore_helper() {
    let home = first_claim_volume(&restored_z2jh(&[]));
    let mut pod = restored_z2jh(&[&home]);
    // z2jh's user pods name a priority class and may carry a nodeSelector (singleuser
    // `nodeSelector`, `scheduling.podPriority`): the class goes, the selector stays.
    if let Some(spec) = pod.spec.as_mut() {
        spec.priority_class_name = Some("jhub-default-priority".into());
        spec.node_selector = Some([("hub.jupyter.org/node-purpose".into(), "user".into())].into());
    }
    assert!(is_restore_candidate(&pod));
    let got = restore_helper(&pod, &options());
    let spec = got.spec.as_ref().expect("spec");
    let original = pod.spec.as_ref().expect("spec");

    // restore-wait first and untouched; z2jh's privileged init container gone.
    let init = spec.init_containers.as_ref().expect("init");
    assert_eq!(init.len(), 1);
    assert_eq!(init[0], original.init_containers.as_ref().expect("init")[0]);
    // Exactly the restored volume, writable; one minimal container mounting it.
    let volumes = spec.volumes.as_ref().expect("volumes");
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].name, home);
    assert!(
        volumes[0]
            .persistent_volume_claim
            .as_ref()
            .expect("pvc")
            .read_only
            .is_none()
    );
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.k8s.io/pause:3.10"));
    let mounts = c.volume_mounts.as_ref().expect("mounts");
    assert_eq!(
        (mounts[0].name.as_str(), mounts[0].read_only),
        (home.as_str(), None)
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(spec.scheduler_name.is_none() && spec.priority_class_name.is_none());
    assert_eq!(spec.tolerations, original.tolerations, "placement kept");
    assert_eq!(spec.affinity, original.affinity);
    assert_eq!(spec.node_selector, original.node_selector);
    assert!(original.priority_class_name.is_some() && spec.node_selector.is_some());
    // Labels: KubeSpawner's role labels gone, ours in, the user's and Velero's kept.
    assert_eq!(got.label(names::JUPYTERHUB_COMPONENT), None);
    assert_eq!(got.label("hub.jupyter.org/network-access-hub"), None);
    assert_eq!(got.label(names::COMPONENT), Some(names::RESTORE_HELPER));
    assert_eq!(got.label(names::MANAGED_BY), Some(names::MANAGED_BY_US));
    assert_eq!(
        got.label(names::JUPYTERHUB_USERNAME),
        pod.label(names::JUPYTERHUB_USERNAME)
    );
    assert_eq!(got.label(names::VELERO_RESTORE_NAME), Some("restore-1"));
    assert_eq!(got.annotation(names::VELERO_BACKUP_VOLUMES), None);
    assert_eq!(got.metadata.name, pod.metadata.name);
}

#[test]
fn the_fixtures_restored_helper_keeps_restore_wait_byte_for_byte_and_loses_read_only() {
    let doc = fixtures::yaml_docs("velero-helper-pod-and-restored-pod.example.yaml").remove(1);
    let pod: Pod = serde_json::from_value(doc).expect("pod");
    let got = restore_helper(&pod, &options());
    let spec = got.spec.as_ref().expect("spec");
    let before =
        serde_json::to_value(&pod.spec.as_ref().expect("spec").init_containers).expect("json");
    let after = serde_json::to_value(&spec.init_containers).expect("json");
    assert_eq!(after, before);
    let claim = spec.volumes.as_ref().expect("volumes")[0]
        .persistent_volume_claim
        .as_ref()
        .expect("pvc");
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("claim-alice-smith", None)
    );
    // Another tool's helper is converted if asked, but the webhook does not ask.
    assert!(!is_restore_candidate(&pod), "not ours, not a user server");
}

/// Our own wave helper, pinned to a node and labelled with its wave, as Velero re-creates
/// it from a wave Backup (labels kept, `restore-wait` prepended, nodeName cleared): the
/// restore helper keeps neither, so it can run on any node (the planned one may be gone)
/// and no run of waves takes it for one of its helpers.
#[test]
fn a_restored_wave_helper_loses_its_pin_and_its_wave() {
    use velero_jupyterhub_policy::helper::{self, ClaimRef};
    use velero_jupyterhub_policy::names;
    let claim = ClaimRef {
        namespace: "jhub",
        name: "claim-alice",
        uid: "u-1",
        username: Some("alice"),
    };
    let mut labels = helper::own_labels(Some("alice"));
    for (k, v) in [
        (names::WAVE_SCHEDULE, "homes"),
        (names::WAVE_TICK, "1795834800"),
        (names::WAVE_NUMBER, "3"),
        (names::VELERO_RESTORE_NAME, "jhub-restore"),
    ] {
        labels.insert(k.to_owned(), v.to_owned());
    }
    let mut pod = helper::backup_helper(&claim, labels, &options());
    helper::pin_to_node(&mut pod, "node-gone");
    assert!(helper::is_pinned(
        pod.spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .expect("pinned")
    ));
    let got = restore_helper(&pod, &options());
    let labels = got.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(names::COMPONENT).map(String::as_str),
        Some(names::RESTORE_HELPER)
    );
    for key in [names::WAVE_SCHEDULE, names::WAVE_TICK, names::WAVE_NUMBER] {
        assert!(!labels.contains_key(key), "{key}");
    }
    assert_eq!(got.spec.as_ref().and_then(|s| s.affinity.clone()), None);
    // A user's own node affinity (not a pin) stays.
    let mut user = restored_z2jh(&["home"]);
    let zone: k8s_openapi::api::core::v1::Affinity = serde_json::from_value(serde_json::json!({
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["fsn1"]}]}]}}}))
    .expect("affinity");
    user.spec.as_mut().expect("spec").affinity = Some(zone.clone());
    let got = restore_helper(&user, &options());
    assert_eq!(
        got.spec.as_ref().and_then(|s| s.affinity.clone()),
        Some(zone)
    );
}

#[test]
fn converting_twice_changes_nothing_and_nothing_to_restore_keeps_no_volume() {
    let home = first_claim_volume(&restored_z2jh(&[]));
    for restored in [vec![home.as_str()], vec![]] {
        let once = restore_helper(&restored_z2jh(&restored), &options());
        assert!(
            is_restore_candidate(&once),
            "a restore helper is a candidate again"
        );
        assert_eq!(restore_helper(&once, &options()), once, "{restored:?}");
        if restored.is_empty() {
            let spec = once.spec.as_ref().expect("spec");
            assert!(spec.volumes.is_none() && spec.init_containers.is_none());
        }
    }
    // Not re-created by a restore: not a candidate.
    let plain: Pod = serde_json::from_value(fixtures::z2jh_pod()).expect("pod");
    assert!(!is_restore_candidate(&plain));
}

#[test]
fn a_service_account_token_restore_wait_mounts_stays_for_it_but_is_not_the_helpers() {
    // The ServiceAccount admission plugin runs before webhooks and mounts the token into
    // every container, restore-wait included (a pod with a ServiceAccount of its own).
    let home = first_claim_volume(&restored_z2jh(&[]));
    let mut pod = fixtures::restored_z2jh(&[&home]);
    let token = "kube-api-access-x7k2p";
    pod["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(serde_json::json!({"name": token, "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}));
    for c in ["initContainers", "containers"] {
        pod["spec"][c][0]["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(serde_json::json!({"name": token, "readOnly": true,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
    }
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    let got = restore_helper(&pod, &options());
    let spec = got.spec.as_ref().expect("spec");
    // restore-wait stays valid as it is: the volume it mounts stays …
    let kept: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(kept, [home.as_str(), token]);
    // … but our container mounts only what Velero restores, and no token.
    let mounts: Vec<&str> = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(mounts, [home.as_str()]);
    assert_eq!(restore_helper(&got, &options()), got, "idempotent");
    let notes = velero_jupyterhub_policy::restore::explain(&pod, &got).join("\n");
    assert!(
        notes.contains(&format!("volume {token}: kept for restore-wait only")),
        "{notes}"
    );
}

/// Whether the kubelet starts a container with this pod- and container-level security
/// context: it refuses a container that must run as non-root but runs as user 0
/// (pkg/kubelet/kuberuntime/security_context_others.go `verifyRunAsNonRoot`; the
/// container's settings override the pod's, pkg/securitycontext/util.go).
fn kubelet_starts(pod: &serde_json::Value, container: &serde_json::Value) -> bool {
    let field = |name: &str| container.get(name).or_else(|| pod.get(name)).cloned();
    let non_root = field("runAsNonRoot") == Some(serde_json::Value::Bool(true));
    !(non_root && field("runAsUser") == Some(0.into()))
}

/// A notebook that runs as root (z2jh `singleuser.uid: 0`: KubeSpawner sets `runAsUser: 0`
/// on the notebook container, `fsGroup` on the pod), alone and with the group settings
/// KubeSpawner can add (`gid` → the container's `runAsGroup`, `supplemental_gids` → the
/// pod's `supplementalGroups`). Velero copies the container's securityContext into
/// restore-wait; the conversion must leave restore-wait able to start, and keep the
/// pod's group settings (the restored files' ownership).
#[test]
fn a_root_notebooks_restore_wait_still_starts() {
    use serde_json::json;
    let home = first_claim_volume(&restored_z2jh(&[]));
    for (container_sc, pod_sc) in [
        (
            json!({"runAsUser": 0, "allowPrivilegeEscalation": false}),
            json!({"fsGroup": 100}),
        ),
        (
            json!({"runAsUser": 0, "runAsGroup": 0, "allowPrivilegeEscalation": false}),
            json!({"fsGroup": 100, "supplementalGroups": [100]}),
        ),
        (
            json!({"runAsUser": 1000, "runAsGroup": 100}),
            json!({"fsGroup": 100, "fsGroupChangePolicy": "OnRootMismatch"}),
        ),
    ] {
        let mut sent = fixtures::z2jh_pod();
        sent["spec"]["containers"][0]["securityContext"] = container_sc.clone();
        sent["spec"]["securityContext"] = pod_sc.clone();
        let mut restored = fixtures::restored_z2jh(&[&home]);
        restored["spec"]["containers"] = sent["spec"]["containers"].clone();
        restored["spec"]["securityContext"] = pod_sc.clone();
        restored["spec"]["initContainers"][0]["securityContext"] = container_sc.clone();
        let pod: Pod = serde_json::from_value(restored).expect("pod");
        let got = serde_json::to_value(restore_helper(&pod, &options())).expect("json");
        let spec = &got["spec"];
        let wait = &spec["initContainers"][0];
        assert_eq!(
            wait["securityContext"], container_sc,
            "restore-wait unchanged"
        );
        assert!(
            kubelet_starts(&spec["securityContext"], &wait["securityContext"]),
            "restore-wait of {container_sc} under {}",
            spec["securityContext"]
        );
        // Our container runs as non-root, whatever the pod says.
        let ours = &spec["containers"][0];
        assert!(kubelet_starts(
            &spec["securityContext"],
            &ours["securityContext"]
        ));
        assert_eq!(ours["securityContext"]["runAsNonRoot"], true, "{ours}");
        assert_eq!(ours["securityContext"]["runAsUser"], 65535, "{ours}");
        assert_eq!(
            ours["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        // The pod's own group settings stay.
        for key in ["fsGroup", "supplementalGroups", "fsGroupChangePolicy"] {
            assert_eq!(spec["securityContext"].get(key), pod_sc.get(key), "{key}");
        }
        // Converting twice changes nothing.
        let once: Pod = serde_json::from_value(got.clone()).expect("pod");
        assert_eq!(
            serde_json::to_value(restore_helper(&once, &options())).expect("json"),
            got
        );
    }
}

/// Restore helpers are not evicted mid-restore by the cluster autoscaler or Karpenter
/// (their own annotations); the node-agent would lose the pod it writes through.
#[test]
fn restore_helpers_are_not_disrupted_by_autoscalers() {
    let home = first_claim_volume(&restored_z2jh(&[]));
    let got = restore_helper(&restored_z2jh(&[&home]), &options());
    assert_eq!(
        got.annotation("cluster-autoscaler.kubernetes.io/safe-to-evict"),
        Some("false")
    );
    assert_eq!(got.annotation("karpenter.sh/do-not-disrupt"), Some("true"));
}
