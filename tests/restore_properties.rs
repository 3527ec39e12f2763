//! Property tests of the restore conversion (`policy::restore`) over generated
//! re-created pods: idempotent, `restore-wait` never changed or moved, no kept volume
//! read-only, and exactly the volumes `restore-wait` mounts kept.

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Value, json};
use velero_jupyterhub::policy::restore::{RESTIC_WAIT, RESTORE_WAIT, restore_helper};

#[derive(Debug, Clone)]
struct GenVolume {
    name: String,
    /// A claim (read-only or not), else an emptyDir or a ConfigMap.
    kind: u8,
    restored: bool,
    mounted: bool,
}

fn volume() -> impl Strategy<Value = GenVolume> {
    (
        prop::sample::select(vec!["home", "data", "shared", "config", "scratch", "v2"]),
        0u8..4,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, kind, restored, mounted)| GenVolume {
            name: name.to_owned(),
            kind,
            restored,
            mounted,
        })
}

fn pod() -> impl Strategy<Value = (Pod, bool)> {
    (
        prop::collection::vec(volume(), 0..6),
        any::<bool>(),
        any::<bool>(),
        0usize..3,
        0usize..3,
    )
        .prop_map(|(mut volumes, legacy, with_wait, other_inits, wait_at)| {
            volumes.sort_by(|a, b| a.name.cmp(&b.name));
            volumes.dedup_by(|a, b| a.name == b.name);
            let source = |v: &GenVolume| match v.kind {
                0 => json!({"name": v.name, "persistentVolumeClaim": {"claimName": format!("claim-{}", v.name), "readOnly": true}}),
                1 => json!({"name": v.name, "persistentVolumeClaim": {"claimName": format!("claim-{}", v.name)}}),
                2 => json!({"name": v.name, "emptyDir": {}}),
                _ => json!({"name": v.name, "configMap": {"name": "cm"}}),
            };
            let mounts = |vs: &[&GenVolume], prefix: &str, ro: bool| {
                vs.iter()
                    .map(|v| json!({"name": v.name, "mountPath": format!("{prefix}/{}", v.name), "readOnly": ro}))
                    .collect::<Vec<_>>()
            };
            let restored: Vec<&GenVolume> = volumes.iter().filter(|v| v.restored).collect();
            let mounted: Vec<&GenVolume> = volumes.iter().filter(|v| v.mounted).collect();
            let mut init: Vec<Value> = Vec::new();
            let has_wait = with_wait && !restored.is_empty();
            for i in 0..other_inits {
                init.push(json!({"name": format!("init-{i}"), "image": "busybox",
                                 "securityContext": {"privileged": true},
                                 "volumeMounts": mounts(&mounted, "/x", false)}));
            }
            if has_wait {
                // Velero prepends it; anywhere else it must still come out first.
                let name = if legacy { RESTIC_WAIT } else { RESTORE_WAIT };
                init.insert(wait_at.min(init.len()), json!({"name": name, "image": "velero/velero:v1.18.1",
                                 "args": ["uid"], "volumeMounts": mounts(&restored, "/restores", false)}));
            }
            let pod = json!({
                "metadata": {"name": "jupyter-alice", "namespace": "jhub",
                    "labels": {"component": "singleuser-server", "velero.io/restore-name": "r",
                               "hub.jupyter.org/username": "alice"},
                    "annotations": {"backup.velero.io/backup-volumes": "home"}},
                "spec": {"initContainers": init, "schedulerName": "user-scheduler",
                    "containers": [{"name": "notebook", "image": "jupyter",
                                    "volumeMounts": mounts(&mounted, "/home", true)}],
                    "volumes": volumes.iter().map(source).collect::<Vec<_>>()},
            });
            (serde_json::from_value(pod).expect("pod"), has_wait)
        })
}

proptest! {
    #[test]
    fn the_conversion_holds_its_invariants((pod, has_wait) in pod()) {
        let options = testkit::fixtures::helper_options();
        let once = restore_helper(&pod, &options);
        // Idempotent.
        prop_assert_eq!(&restore_helper(&once, &options), &once);
        let spec = once.spec.as_ref().expect("spec");
        let original = pod.spec.as_ref().expect("spec");
        // restore-wait: first, alone, byte for byte; nothing else survives.
        let wait = original.init_containers.iter().flatten()
            .find(|c| c.name == RESTORE_WAIT || c.name == RESTIC_WAIT);
        prop_assert_eq!(wait.is_some(), has_wait);
        match wait {
            Some(w) => prop_assert_eq!(spec.init_containers.as_deref(), Some(std::slice::from_ref(w))),
            None => prop_assert!(spec.init_containers.is_none()),
        }
        // Exactly the volumes restore-wait mounts, none read-only, all mounted writable
        // by the one container.
        let waited: Vec<&str> = wait.iter().flat_map(|w| w.volume_mounts.iter().flatten())
            .map(|m| m.name.as_str()).collect();
        let kept: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        prop_assert_eq!(&kept, &waited);
        for v in spec.volumes.iter().flatten() {
            prop_assert!(v.persistent_volume_claim.as_ref().is_none_or(|c| c.read_only.is_none()));
        }
        prop_assert_eq!(spec.containers.len(), 1);
        let mounts = spec.containers[0].volume_mounts.clone().unwrap_or_default();
        prop_assert_eq!(mounts.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), kept);
        prop_assert!(mounts.iter().all(|m| m.read_only.is_none()));
        prop_assert!(spec.scheduler_name.is_none());
    }
}

proptest! {
    /// At the admission edge: the patch applied to the pod is exactly the conversion, and
    /// the patched pod reviewed again (reinvocation, the other entry) gets no patch.
    #[test]
    fn the_patch_is_the_conversion_and_converts_once((pod, _) in pod()) {
        use velero_jupyterhub::admission::{self, Outcome, RestoreVerdict};
        let options = testkit::fixtures::helper_options();
        let value = serde_json::to_value(&pod).expect("json");
        let request = testkit::fixtures::pod_create_review(&value, "p");
        let reviewed = admission::review(&request, |_| testkit::fixtures::globs("claim-*"), false)
            .expect("review");
        prop_assert_eq!(reviewed.outcome, Outcome::Restore(RestoreVerdict::Converted));
        let ops = admission::decode_patch(&reviewed.body).expect("patch").expect("a patch");
        prop_assert!(ops.as_array().expect("ops").iter().all(|op| op["op"] == "add"));
        let patch: json_patch::Patch = serde_json::from_value(ops).expect("a JSON patch");
        let mut patched = value.clone();
        json_patch::patch(&mut patched, &patch).expect("the patch applies");
        prop_assert_eq!(&patched, &serde_json::to_value(restore_helper(&pod, &options)).expect("json"));
        let again = testkit::fixtures::pod_create_review(&patched, "q");
        let reviewed = admission::review(&again, |_| testkit::fixtures::globs("claim-*"), false)
            .expect("review");
        prop_assert_eq!(reviewed.outcome, Outcome::Restore(RestoreVerdict::AlreadyConverted));
        prop_assert!(admission::decode_patch(&reviewed.body).expect("patch").is_none());
    }
}
