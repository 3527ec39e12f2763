//! Fixtures under tests/fixtures (see SOURCES.txt there for where each comes from).

use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

use velero_jupyterhub_policy::ClaimGlobs;

pub fn path(name: &str) -> PathBuf {
    crate::repo_root().join("tests/fixtures").join(name)
}

pub fn read(name: &str) -> String {
    std::fs::read_to_string(path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Every YAML document of a fixture, as JSON values.
pub fn yaml_docs(name: &str) -> Vec<Value> {
    let text = read(name);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The z2jh 4 user pod as the API server sends it at CREATE (no uid, nodeName, status).
pub fn z2jh_pod() -> Value {
    let mut pod = yaml_docs("z2jh-4.x-kubespawner-7-singleuser-pod.example.yaml").remove(0);
    strip_server_fields(&mut pod);
    pod
}

/// The PVC that goes with the z2jh pod.
pub fn z2jh_claim() -> Value {
    yaml_docs("z2jh-4.x-kubespawner-7-singleuser-pod.example.yaml").remove(1)
}

pub fn strip_server_fields(pod: &mut Value) {
    if let Some(m) = pod["metadata"].as_object_mut() {
        m.remove("uid");
    }
    if let Some(s) = pod["spec"].as_object_mut() {
        s.remove("nodeName");
    }
    if let Some(p) = pod.as_object_mut() {
        p.remove("status");
    }
}

/// One document of singleuser-pod-variants.yaml, by pod name.
pub fn variant(pod_name: &str) -> Value {
    yaml_docs("singleuser-pod-variants.yaml")
        .into_iter()
        .find(|d| d["metadata"]["name"] == pod_name)
        .unwrap_or_else(|| panic!("no variant named {pod_name}"))
}

pub fn variants() -> Vec<Value> {
    yaml_docs("singleuser-pod-variants.yaml")
}

/// An admission.k8s.io/v1 AdmissionReview for a Pod CREATE, shaped as the API server
/// sends it.
pub fn pod_create_review(pod: &Value, uid: &str) -> Vec<u8> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("jhub");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:jhub:hub"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    serde_json::to_vec(&review).expect("serialize review")
}

/// The golden AdmissionReview fixture: (request bytes, expected response).
pub fn golden_review() -> (Vec<u8>, Value) {
    let v: Value =
        serde_json::from_str(&read("admissionreview-singleuser-pod-create.example.json"))
            .expect("golden");
    let mut request = v["request"].clone();
    if let Some(r) = request.as_object_mut() {
        r.remove("_note");
    }
    let mut response = v["response"].clone();
    if let Some(r) = response["response"].as_object_mut() {
        r.remove("_decodedPatch");
    }
    (serde_json::to_vec(&request).expect("serialize"), response)
}

pub fn globs(globs: &str) -> Arc<ClaimGlobs> {
    Arc::new(ClaimGlobs::parse(globs).expect("globs"))
}

/// Helper options as the tests use them: the default pause image, no tolerations or
/// node selector.
pub fn helper_options() -> velero_jupyterhub_policy::helper::HelperOptions {
    velero_jupyterhub_policy::helper::HelperOptions {
        image: "registry.k8s.io/pause:3.10".to_owned(),
        tolerations: vec![],
        node_selector: std::collections::BTreeMap::new(),
    }
}

/// An object as the controller's watch keeps it: its JSON read as a `PodRecord`.
pub fn record(pod: &impl serde::Serialize) -> velero_jupyterhub_policy::PodRecord {
    serde_json::from_value(serde_json::to_value(pod).expect("json")).expect("record")
}

/// Velero's `restore-wait` init container for `volumes`, as
/// pkg/restore/actions/pod_volume_restore_action.go builds it (v1.18; image, args and
/// resources as in tests/fixtures/velero-helper-pod-and-restored-pod.example.yaml).
pub fn restore_wait(volumes: &[&str]) -> Value {
    json!({
        "name": "restore-wait", "image": "velero/velero:v1.18.1",
        "command": ["/velero-restore-helper"], "args": ["9c0f7a52-0000-4000-8000-00000000aaaa"],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "100m", "memory": "128Mi"}},
        "volumeMounts": volumes.iter().map(|v| json!({"name": v, "mountPath": format!("/restores/{v}")})).collect::<Vec<_>>(),
    })
}

/// The z2jh pod of `alice` as Velero re-creates it (pkg/restore/restore.go): restore
/// labels, nodeName cleared, `restore-wait` prepended for the volumes that have a
/// PodVolumeBackup (none: no restore-wait at all), with the notebook's securityContext.
pub fn restored_z2jh(restored: &[&str]) -> Value {
    let mut pod = z2jh_pod();
    pod["metadata"]["labels"]["velero.io/restore-name"] = "restore-1".into();
    pod["metadata"]["labels"]["velero.io/backup-name"] = "daily-20261128030000".into();
    if let Some(spec) = pod["spec"].as_object_mut() {
        spec.remove("nodeName");
    }
    if !restored.is_empty() {
        // Velero copies the first container's securityContext into restore-wait
        // (pod_volume_restore_action.go, with no securityContext in its ConfigMap).
        let mut wait = restore_wait(restored);
        if let Some(sc) = pod["spec"]["containers"][0].get("securityContext") {
            wait["securityContext"] = sc.clone();
        }
        let mut init = vec![wait];
        let theirs = pod["spec"]["initContainers"].as_array().cloned();
        init.extend(theirs.unwrap_or_default());
        pod["spec"]["initContainers"] = init.into();
    }
    pod
}
