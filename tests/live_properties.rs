//! Property tests of the live-session decision over generated pods.

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use testkit::fixtures;
use velero_jupyterhub::admission::{self, Outcome};
use velero_jupyterhub::policy::{LiveVerdict, PodView, decide_live};

const ANNOTATION: &str = "backup.velero.io/backup-volumes";

#[derive(Debug, Clone)]
struct GenVolume {
    name: String,
    claim: Option<String>,
    mounted_by_container: bool,
    mounted_by_init: bool,
}

fn volume() -> impl Strategy<Value = GenVolume> {
    (
        prop::sample::select(vec![
            "home", "volume-a", "data", "shared", "x/y", "v~1", "scratch",
        ]),
        prop::option::of(prop::sample::select(vec![
            "claim-a",
            "claim-b",
            "data-a",
            "other",
            "claim-a/b",
        ])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, claim, c, i)| GenVolume {
            name: name.to_owned(),
            claim: claim.map(str::to_owned),
            mounted_by_container: c,
            mounted_by_init: i,
        })
}

/// An existing annotation value: entries from the same names plus odd spellings.
fn list_value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "home", "data", " home", "", "notes", "volume-a", "x/y",
        ]),
        0..4,
    )
    .prop_map(|v| v.join(","))
}

fn pod() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(volume(), 0..6),
        prop::option::of(list_value()),
        prop::option::of(list_value()),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["true", "false", "TRUE"])),
        prop::sample::select(vec!["singleuser-server", "hub"]),
    )
        .prop_map(|(vols, listed, excluded, has_map, skip, component)| {
            // Volume names are unique in a valid pod.
            let mut seen = std::collections::HashSet::new();
            let vols: Vec<GenVolume> = vols.into_iter().filter(|v| seen.insert(v.name.clone())).collect();
            let mut annotations = Map::new();
            if let Some(l) = listed {
                annotations.insert(ANNOTATION.into(), l.into());
            }
            if let Some(e) = excluded {
                annotations.insert("backup.velero.io/backup-volumes-excludes".into(), e.into());
            }
            if let Some(s) = skip {
                annotations.insert("velero-jupyterhub.io/skip".into(), s.into());
            }
            let mut metadata = json!({"name": "jupyter-p", "namespace": "jhub", "labels": {"component": component}});
            if has_map || !annotations.is_empty() {
                metadata["annotations"] = Value::Object(annotations);
            }
            let mounts = |pick: fn(&GenVolume) -> bool| -> Vec<Value> {
                vols.iter().filter(|v| pick(v)).map(|v| json!({"name": v.name, "mountPath": format!("/m/{}", v.name)})).collect()
            };
            let volumes: Vec<Value> = vols
                .iter()
                .map(|v| match &v.claim {
                    Some(c) => json!({"name": v.name, "persistentVolumeClaim": {"claimName": c}}),
                    None => json!({"name": v.name, "emptyDir": {}}),
                })
                .collect();
            json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {
                    "initContainers": [{"name": "init", "image": "i", "volumeMounts": mounts(|v| v.mounted_by_init)}],
                    "containers": [{"name": "notebook", "image": "n", "volumeMounts": mounts(|v| v.mounted_by_container)}],
                    "volumes": volumes
                }
            })
        })
}

fn review(pod: &Value, uid: &str) -> (Value, Option<json_patch::Patch>) {
    let body = fixtures::pod_create_review(pod, uid);
    let reviewed = admission::review(&body, |_| fixtures::globs("claim-*,data-*"), false)
        .expect("valid review");
    let response: Value = serde_json::from_slice(&reviewed.body).expect("response parses");
    (
        response,
        admission::decode_patch(&reviewed.body)
            .expect("patch decodes")
            .map(|p| serde_json::from_value(p).expect("a JSON patch")),
    )
}

fn annotation(pod: &Value) -> Option<&str> {
    pod["metadata"]["annotations"][ANNOTATION].as_str()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn patch_then_review_again_is_a_no_op(pod in pod()) {
        let (_, patch) = review(&pod, "u");
        if let Some(patch) = patch {
            // Only `add`, which cannot fail to apply (see admission::render_patch).
            for op in &patch.0 {
                prop_assert!(matches!(op, json_patch::PatchOperation::Add(_)), "{:?}", op);
            }
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch).expect("patch applies");
            let (_, again) = review(&patched, "u");
            prop_assert!(again.is_none(), "second pass patched again: {:?}", again);
        }
    }

    #[test]
    fn existing_entries_are_never_removed(pod in pod()) {
        let (_, patch) = review(&pod, "u");
        let mut patched = pod.clone();
        if let Some(patch) = &patch {
            json_patch::patch(&mut patched, patch).expect("patch applies");
        }
        let before: Vec<&str> = annotation(&pod).unwrap_or("").split(',').filter(|e| !e.is_empty()).collect();
        let after: Vec<&str> = annotation(&patched).unwrap_or("").split(',').filter(|e| !e.is_empty()).collect();
        prop_assert!(after.len() >= before.len());
        prop_assert_eq!(&after[..before.len()], &before[..], "existing entries kept, in order, at the front");
        // Every other pod field is untouched.
        let (mut a, mut b) = (pod.clone(), patched.clone());
        a["metadata"].as_object_mut().unwrap().remove("annotations");
        b["metadata"].as_object_mut().unwrap().remove("annotations");
        prop_assert_eq!(a, b);
        // Only the backup-volumes annotation changes.
        for (k, v) in pod["metadata"]["annotations"].as_object().into_iter().flatten() {
            if k != ANNOTATION {
                prop_assert_eq!(&patched["metadata"]["annotations"][k], v);
            }
        }
    }

    #[test]
    fn added_entries_are_mounted_user_claims(pod in pod()) {
        let (_, patch) = review(&pod, "u");
        let Some(patch) = patch else { return Ok(()) };
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).expect("patch applies");
        let before: Vec<&str> = annotation(&pod).unwrap_or("").split(',').collect();
        let excluded = pod["metadata"]["annotations"]["backup.velero.io/backup-volumes-excludes"].as_str().unwrap_or("");
        for name in annotation(&patched).unwrap_or("").split(',').filter(|e| !before.contains(e)) {
            let vol = pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).expect("a pod volume");
            let claim = vol["persistentVolumeClaim"]["claimName"].as_str().expect("a PVC");
            prop_assert!(claim.starts_with("claim-") || claim.starts_with("data-"));
            let mounted = pod["spec"]["containers"][0]["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == name);
            prop_assert!(mounted, "{} not mounted by a regular container", name);
            prop_assert!(!excluded.split(',').any(|e| e == name));
        }
        prop_assert_eq!(pod["metadata"]["labels"]["component"].as_str(), Some("singleuser-server"));
    }

    #[test]
    fn every_eligible_volume_ends_up_listed(pod in pod()) {
        let (_, patch) = review(&pod, "u");
        let mut patched = pod.clone();
        if let Some(patch) = &patch {
            json_patch::patch(&mut patched, patch).expect("patch applies");
        }
        let annotations = &pod["metadata"]["annotations"];
        let user_server = pod["metadata"]["labels"]["component"] == "singleuser-server";
        let skipped = annotations["velero-jupyterhub.io/skip"].as_str() == Some("true");
        let excluded = annotations["backup.velero.io/backup-volumes-excludes"].as_str().unwrap_or("");
        let listed: Vec<&str> = annotation(&patched).unwrap_or("").split(',').collect();
        let mounts = pod["spec"]["containers"][0]["volumeMounts"].as_array().unwrap();
        for vol in pod["spec"]["volumes"].as_array().unwrap() {
            let name = vol["name"].as_str().unwrap();
            let Some(claim) = vol["persistentVolumeClaim"]["claimName"].as_str() else { continue };
            let eligible = (claim.starts_with("claim-") || claim.starts_with("data-"))
                && mounts.iter().any(|m| m["name"] == name)
                && !excluded.split(',').any(|e| e == name);
            if eligible && user_server && !skipped {
                prop_assert!(listed.contains(&name), "{} (claim {}) not listed in {:?}", name, claim, listed);
            }
        }
    }

    #[test]
    fn the_response_is_an_admission_review_with_the_request_uid(pod in pod(), uid in "\\PC{1,40}") {
        let (response, _) = review(&pod, &uid);
        prop_assert_eq!(response["apiVersion"].as_str(), Some("admission.k8s.io/v1"));
        prop_assert_eq!(response["kind"].as_str(), Some("AdmissionReview"));
        prop_assert_eq!(response["response"]["uid"].as_str(), Some(uid.as_str()));
        prop_assert_eq!(response["response"]["allowed"].as_bool(), Some(true));
    }

    #[test]
    fn a_full_pod_and_the_request_view_agree(pod in pod()) {
        let json = serde_json::to_string(&pod).unwrap();
        let view: PodView = serde_json::from_str(&json).unwrap();
        let full: Pod = serde_json::from_str(&json).unwrap();
        let globs = fixtures::globs("claim-*,data-*");
        let (a, b) = (decide_live(&view, &globs), decide_live(&full, &globs));
        prop_assert_eq!(a.verdict, b.verdict);
        prop_assert_eq!(a.volumes, b.volumes);
        prop_assert_eq!(a.new_value, b.new_value);
        prop_assert_eq!(a.had_annotations_map, b.had_annotations_map);
    }

    #[test]
    fn odd_objects_are_allowed_and_only_non_objects_refused(
        uid in "[a-z0-9-]{1,20}",
        object in prop::sample::select(vec![
            json!(null), json!(1), json!([]), json!("pod"), json!({}), json!({"metadata": 3}),
            json!({"metadata": {"labels": {"component": "singleuser-server"}}, "spec": {"volumes": [{"name": 1}]}}),
            json!({"metadata": {"labels": {"component": "singleuser-server"}, "annotations": []}}),
            json!({"kind": "Pod", "spec": {"containers": {}}}),
        ]),
        op in prop::sample::select(vec!["CREATE", "UPDATE", "DELETE", "CONNECT", ""]),
    ) {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": op, "namespace": "jhub", "object": object}
        })).unwrap();
        let result = admission::review(&body, |_| fixtures::globs("claim-*"), false);
        match (op, &object) {
            ("CREATE", Value::Null) => {
                let e = result.expect_err("no object");
                prop_assert!(e.to_string().contains("must carry request.object"), "{}", e);
            }
            ("CREATE", o) if !o.is_object() => {
                let e = result.expect_err("not an object");
                prop_assert!(e.to_string().contains("not a Pod: not a JSON object"), "{}", e);
            }
            _ => {
                let r = result.expect("allowed");
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                prop_assert_eq!(v["response"]["uid"].as_str(), Some(uid.as_str()));
                prop_assert_eq!(v["response"]["allowed"].as_bool(), Some(true));
                prop_assert!(v["response"].get("patch").is_none());
                // Every object but {} has a field of a shape a Pod does not have.
                let want = match (op, object == json!({})) {
                    ("CREATE", true) => Outcome::Live(LiveVerdict::NotUserServer),
                    ("CREATE", false) => Outcome::NotUnderstood,
                    _ => Outcome::NotPodCreate,
                };
                prop_assert_eq!(r.outcome, want);
            }
        }
    }
}
