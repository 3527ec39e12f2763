//! Table tests of the live-session decision on real pod shapes, from request
//! bytes to response bytes, through the same `admission::review` the server uses.

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use testkit::fixtures;
use velero_jupyterhub::admission::{self, Outcome, RestoreVerdict};
use velero_jupyterhub::policy::{LiveVerdict, PodView, VolumeReason, decide_live};

/// Runs a pod through admission and returns (outcome, annotation after applying the patch,
/// the patch as JSON).
fn run(pod: &Value, globs: &str) -> (Outcome, Option<String>, Option<Value>) {
    let body = fixtures::pod_create_review(pod, "uid-1");
    let reviewed = admission::review(&body, |_| fixtures::globs(globs), false).expect("review");
    let response: Value = serde_json::from_slice(&reviewed.body).expect("response json");
    assert_eq!(response["response"]["uid"], "uid-1");
    assert_eq!(response["response"]["allowed"], true);
    let patch = admission::decode_patch(&reviewed.body).expect("patch decodes");
    let mut patched = pod.clone();
    if let Some(p) = &patch {
        let p: json_patch::Patch = serde_json::from_value(p.clone()).expect("a JSON patch");
        json_patch::patch(&mut patched, &p).expect("patch applies to the pod");
        assert_eq!(response["response"]["patchType"], "JSONPatch");
    } else {
        assert!(response["response"].get("patchType").is_none());
    }
    let value = patched["metadata"]["annotations"]["backup.velero.io/backup-volumes"]
        .as_str()
        .map(str::to_owned);
    (reviewed.outcome, value, patch)
}

#[test]
fn golden_admission_review_fixture() {
    let (request, expected) = fixtures::golden_review();
    let reviewed =
        admission::review(&request, |_| fixtures::globs("claim-*"), false).expect("review");
    let got: Value = serde_json::from_slice(&reviewed.body).expect("json");
    assert_eq!(
        got, expected,
        "byte-for-byte the fixture's expected response (as JSON)"
    );
    assert_eq!(reviewed.outcome, Outcome::Live(LiveVerdict::Annotate));
}

#[test]
fn z2jh_fixture_gets_its_home_volume() {
    let (outcome, value, patch) = run(&fixtures::z2jh_pod(), "claim-*");
    assert_eq!(outcome, Outcome::Live(LiveVerdict::Annotate));
    assert_eq!(value.as_deref(), Some("volume-alice-smith"));
    let patch = patch.unwrap();
    assert_eq!(patch[0]["op"], "add");
    assert_eq!(
        patch[0]["path"],
        "/metadata/annotations/backup.velero.io~1backup-volumes"
    );
}

#[test]
fn variants_table() {
    use LiveVerdict::*;
    // (pod, namespace globs, verdict, annotation after the patch)
    let cases: &[(&str, &str, LiveVerdict, Option<&str>)] = &[
        (
            "jupyter-alice-2dsmith",
            "claim-*",
            Annotate,
            Some("volume-alice-2dsmith"),
        ),
        ("jupyter-bob", "claim-*", Annotate, Some("home")),
        ("jupyter-carol", "claim-*", Annotate, Some("volume-carol")),
        (
            "jupyter-carol",
            "claim-*,data-*",
            Annotate,
            Some("volume-carol,data"),
        ),
        ("jupyter-dave", "claim-*", Annotate, Some("volume-dave")),
        (
            "jupyter-dave",
            "claim-*,jupyterhub-shared-volume",
            Annotate,
            Some("volume-dave,shared"),
        ),
        ("jupyter-erin", "claim-*", Annotate, Some("volume-erin")),
        ("jupyter-erin", "*", Annotate, Some("volume-erin")),
        ("jupyter-frank", "claim-*", Annotate, Some("volume-frank")),
        (
            "jupyter-grace",
            "claim-*",
            Annotate,
            Some("notes,volume-grace"),
        ),
        ("jupyter-heidi", "claim-*", Skipped, None),
        ("jupyter-ivan", "claim-*", Annotate, Some("volume-ivan")),
        (
            "jupyter-alice-smith--gpu",
            "claim-*",
            Annotate,
            Some("volume-alice-smith--gpu"),
        ),
        ("hub-7d9c8b6f5-abcde", "*", NotUserServer, None),
        ("jupyter-judy", "claim-*", NothingToAdd, Some("volume-judy")),
        ("jupyter-bob", "home-*", NothingToAdd, None),
    ];
    for (name, globs, verdict, want) in cases {
        let pod = fixtures::variant(name);
        let (outcome, value, _) = run(&pod, globs);
        assert_eq!(outcome, Outcome::Live(*verdict), "{name} with {globs}");
        assert_eq!(value.as_deref(), *want, "{name} with {globs}");
    }
    // Re-created by a Velero restore: the restore path's (tests/restore_admission.rs),
    // which takes the backup annotation away (a half-restored volume is not backed up).
    let (outcome, value, _) = run(&fixtures::variant("jupyter-mallory"), "claim-*");
    assert_eq!(outcome, Outcome::Restore(RestoreVerdict::Converted));
    assert_eq!(value, None);
}

#[test]
fn per_volume_reasons() {
    use VolumeReason::*;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, VolumeReason)]);
    let cases: &[Case] = &[
        (
            "jupyter-dave",
            "claim-*",
            &[("volume-dave", Added), ("shared", ClaimNotMatched)],
        ),
        (
            "jupyter-erin",
            "*",
            &[
                ("jupyter-config", NotPvc),
                ("scratch", NotPvc),
                ("kube-api-access", NotPvc),
                ("git-credentials", NotPvc),
                ("podinfo", NotPvc),
                ("volume-erin", Added),
            ],
        ),
        (
            "jupyter-frank",
            "claim-*",
            &[("volume-frank", Added), ("seed", InitContainersOnly)],
        ),
        (
            "jupyter-grace",
            "claim-*",
            &[
                ("notes", NotPvc),
                ("volume-grace", Added),
                ("scratch", Excluded),
            ],
        ),
        ("jupyter-judy", "claim-*", &[("volume-judy", AlreadyListed)]),
    ];
    for (name, globs, want) in cases {
        let json = serde_json::to_string(&fixtures::variant(name)).unwrap();
        let pod: PodView = serde_json::from_str(&json).unwrap();
        let decision = decide_live(&pod, &fixtures::globs(globs));
        let got: Vec<(&str, VolumeReason)> = decision
            .volumes
            .iter()
            .map(|v| (v.volume, v.reason))
            .collect();
        assert_eq!(got, *want, "{name}");
    }
}

#[test]
fn a_volume_mounted_by_no_container_is_reported() {
    let mut pod = fixtures::variant("jupyter-ivan");
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"name": "orphan", "persistentVolumeClaim": {"claimName": "claim-ivan-old"}}
        ));
    let json = serde_json::to_string(&pod).unwrap();
    let view: PodView = serde_json::from_str(&json).unwrap();
    let decision = decide_live(&view, &fixtures::globs("claim-*"));
    assert_eq!(decision.volumes[1].reason, VolumeReason::NotMounted);
    assert_eq!(decision.new_value.as_deref(), Some("volume-ivan"));
}

#[test]
fn no_annotations_map_adds_the_whole_map() {
    let (_, _, patch) = run(&fixtures::variant("jupyter-ivan"), "claim-*");
    let patch = patch.unwrap();
    assert_eq!(patch[0]["op"], "add");
    assert_eq!(patch[0]["path"], "/metadata/annotations");
    assert_eq!(
        patch[0]["value"],
        serde_json::json!({"backup.velero.io/backup-volumes": "volume-ivan"})
    );
}

#[test]
fn null_annotations_map_adds_the_whole_map() {
    let mut pod = fixtures::variant("jupyter-ivan");
    pod["metadata"]["annotations"] = Value::Null;
    let (_, value, patch) = run(&pod, "claim-*");
    assert_eq!(patch.unwrap()[0]["path"], "/metadata/annotations");
    assert_eq!(value.as_deref(), Some("volume-ivan"));
}

#[test]
fn an_existing_value_is_extended_with_add_which_cannot_fail_to_apply() {
    let (_, value, patch) = run(&fixtures::variant("jupyter-grace"), "claim-*");
    assert_eq!(value.as_deref(), Some("notes,volume-grace"));
    let patch = patch.unwrap();
    // `add` on an existing member replaces it (RFC 6902 §4.1); `replace` would fail if
    // the member were gone, and a failed patch turns the user's create into a 500.
    assert_eq!(patch[0]["op"], "add");
    assert_eq!(
        patch[0]["path"],
        "/metadata/annotations/backup.velero.io~1backup-volumes"
    );
    assert_eq!(patch[0]["value"], "notes,volume-grace");
}

#[test]
fn skip_annotation_is_exactly_true_like_the_opt_in_label() {
    for (v, skipped) in [
        ("true", true),
        ("TRUE", false),
        ("True", false),
        ("false", false),
        ("yes", false),
    ] {
        let mut pod = fixtures::variant("jupyter-heidi");
        pod["metadata"]["annotations"]["velero-jupyterhub.io/skip"] = v.into();
        let (outcome, _, _) = run(&pod, "claim-*");
        assert_eq!(
            outcome == Outcome::Live(LiveVerdict::Skipped),
            skipped,
            "skip={v}"
        );
    }
}

#[test]
fn reinvocation_is_a_no_op_for_every_variant() {
    for pod in fixtures::variants() {
        for globs in ["claim-*", "*"] {
            let (_, _, patch) = run(&pod, globs);
            let Some(patch) = patch else { continue };
            let mut patched = pod.clone();
            let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
            json_patch::patch(&mut patched, &patch).unwrap();
            let (outcome, _, again) = run(&patched, globs);
            assert!(
                again.is_none(),
                "second pass patched {} again: {again:?}",
                pod["metadata"]["name"]
            );
            assert!(
                matches!(
                    outcome,
                    Outcome::Live(LiveVerdict::NothingToAdd)
                        | Outcome::Restore(RestoreVerdict::AlreadyConverted)
                ),
                "{outcome:?}"
            );
        }
    }
}

/// The reconciler's backfill reads pods from a watch as `k8s_openapi` Pods; the webhook
/// reads a borrowed view of the request. One set of rules: the same decision, volume by
/// volume, for every variant.
#[test]
fn a_full_pod_and_a_request_view_get_the_same_decision() {
    let mut compared = 0;
    for doc in fixtures::variants() {
        let json = serde_json::to_string(&doc).unwrap();
        let view: PodView = serde_json::from_str(&json).unwrap();
        let pod: Pod = serde_json::from_str(&json).unwrap();
        for globs in ["claim-*", "*", "claim-*,data-*", "home-*"] {
            let globs = fixtures::globs(globs);
            let a = decide_live(&view, &globs);
            let b = decide_live(&pod, &globs);
            let name = &doc["metadata"]["name"];
            assert_eq!(a.verdict, b.verdict, "{name}");
            assert_eq!(a.volumes, b.volumes, "{name}");
            assert_eq!(a.new_value, b.new_value, "{name}");
            assert_eq!(a.had_annotations_map, b.had_annotations_map, "{name}");
            compared += 1;
        }
    }
    assert!(compared >= 40, "only {compared} comparisons");
}
