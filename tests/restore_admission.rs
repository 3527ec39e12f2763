//! The restore path at the admission edge: a pod Velero re-creates in a restore
//! is answered with the patch that makes it a restore helper, by every entry alike; the
//! patched pod needs nothing more; a user server on a claim being restored is refused
//! with a clear message; `review --explain` says what the conversion did.

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use testkit::fixtures;
use velero_jupyterhub::admission::{self, Outcome, RestoreVerdict, Scope};
use velero_jupyterhub::policy::LiveVerdict;
use velero_jupyterhub::policy::restore::{RestoringClaim, restore_helper};

fn scope(restoring: Vec<RestoringClaim>) -> Scope {
    Scope {
        claims: fixtures::globs("claim-*"),
        helper: std::sync::Arc::new(fixtures::helper_options()),
        restoring,
        claims_now: vec![],
    }
}

fn home_volume(pod: &Value) -> String {
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let home = volumes
        .iter()
        .find(|v| v.get("persistentVolumeClaim").is_some())
        .expect("a claim volume");
    home["name"].as_str().expect("name").to_owned()
}

fn apply(pod: &Value, reviewed: &admission::Reviewed) -> Value {
    let mut patched = pod.clone();
    if let Some(patch) = admission::decode_patch(&reviewed.body).expect("patch") {
        let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON patch");
        json_patch::patch(&mut patched, &patch).expect("the patch applies");
    }
    patched
}

fn response(reviewed: &admission::Reviewed) -> Value {
    serde_json::from_slice::<Value>(&reviewed.body).expect("json")["response"].clone()
}

#[test]
fn a_restored_user_pod_is_converted_by_the_patch_and_then_left_alone() {
    let home = home_volume(&fixtures::z2jh_pod());
    let pod = fixtures::restored_z2jh(&[&home]);
    let request = fixtures::pod_create_review(&pod, "r-1");
    let reviewed = admission::review(&request, |_| scope(vec![]), true).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::Converted)
    );
    assert_eq!(response(&reviewed)["allowed"], true);

    // The patch is only `add`s, and applied it gives exactly the conversion.
    let ops = admission::decode_patch(&reviewed.body).unwrap().unwrap();
    let ops = ops.as_array().expect("ops");
    assert!(ops.iter().all(|op| op["op"] == "add"), "{ops:?}");
    let patched = apply(&pod, &reviewed);
    let typed: Pod = serde_json::from_value(pod.clone()).expect("pod");
    let want = serde_json::to_value(restore_helper(&typed, &fixtures::helper_options())).unwrap();
    assert_eq!(patched, want);

    // Reviewed again (reinvocation, or the other matching entry): nothing to change.
    let again = fixtures::pod_create_review(&patched, "r-2");
    let reviewed = admission::review(&again, |_| scope(vec![]), false).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::AlreadyConverted)
    );
    assert!(admission::decode_patch(&reviewed.body).unwrap().is_none());

    // The explanation names what went where.
    let reviewed = admission::review(&request, |_| scope(vec![]), true).expect("review");
    let notes = reviewed.notes.join("\n");
    for want in [
        "init container restore-wait: kept first, unchanged".to_owned(),
        "init container block-cloud-metadata: removed".to_owned(),
        "container notebook: replaced by restore-helper".to_owned(),
        format!("volume {home} (claim claim-alice-smith): kept, writable"),
    ] {
        assert!(notes.contains(&want), "{want:?} not in\n{notes}");
    }
}

#[test]
fn a_restored_pod_with_nothing_to_restore_still_becomes_a_helper() {
    let pod = fixtures::restored_z2jh(&[]);
    let request = fixtures::pod_create_review(&pod, "r-3");
    let reviewed = admission::review(&request, |_| scope(vec![]), true).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::Converted)
    );
    let patched = apply(&pod, &reviewed);
    assert_eq!(patched["spec"]["containers"].as_array().unwrap().len(), 1);
    assert!(patched["spec"].get("volumes").is_none());
    assert!(patched["spec"].get("initContainers").is_none());
    assert!(
        reviewed.notes[0].contains("nothing to restore"),
        "{:?}",
        reviewed.notes
    );
}

#[test]
fn a_restored_pod_that_cannot_be_read_in_full_is_refused_not_started_as_is() {
    let home = home_volume(&fixtures::z2jh_pod());
    let mut pod = fixtures::restored_z2jh(&[&home]);
    // Readable for the fast path (which skips this field), not as a full Pod.
    pod["spec"]["restartPolicy"] = 7.into();
    let request = fixtures::pod_create_review(&pod, "r-4");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::Unreadable)
    );
    let response = response(&reviewed);
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("no stale notebook server"), "{message}");
}

#[test]
fn the_restore_guard_refuses_a_user_server_on_a_claim_being_restored() {
    let pod = fixtures::z2jh_pod();
    let restoring = RestoringClaim {
        claim: "claim-alice-smith".to_owned(),
        restore: Some("restore-1".to_owned()),
    };
    let request = fixtures::pod_create_review(&pod, "g-1");
    let reviewed =
        admission::review(&request, |_| scope(vec![restoring.clone()]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::Guarded);
    let response = response(&reviewed);
    assert_eq!(
        (
            response["allowed"].clone(),
            response["status"]["code"].clone()
        ),
        (false.into(), 403.into())
    );
    assert_eq!(
        response["status"]["message"],
        "home volume claim-alice-smith is being restored by Velero restore restore-1; try again when the restore completes"
    );
    // As the webhook reads it from the namespace's record (no Restore named there): the
    // words of the restoring-claims policy, which refuses the same pod inside the API server.
    let unnamed = RestoringClaim {
        restore: None,
        ..restoring.clone()
    };
    let reviewed = admission::review(&request, |_| scope(vec![unnamed]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::Guarded);
    assert_eq!(
        self::response(&reviewed)["status"]["message"],
        "home volume claim-alice-smith is being restored by Velero; try again when the restore completes"
    );

    // Another user's claim being restored does not concern alice.
    let other = RestoringClaim {
        claim: "claim-bob".to_owned(),
        ..restoring
    };
    let reviewed = admission::review(&request, |_| scope(vec![other]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::Live(LiveVerdict::Annotate));
}

#[test]
fn not_ours_and_not_a_user_server_a_restored_pod_is_left_alone() {
    let mut pod = fixtures::restored_z2jh(&[]);
    pod["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("component");
    let request = fixtures::pod_create_review(&pod, "r-5");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::Live(LiveVerdict::Restored));
    assert!(admission::decode_patch(&reviewed.body).unwrap().is_none());
}

/// A pod Velero re-creates whose volume would be restored into a claim that existed
/// before the Restore is refused (Velero records the message among the Restore's errors),
/// naming the claim and how to ask for it; the same claim made (or updated) by this
/// Restore is converted.
#[test]
fn a_restore_into_a_home_that_existed_is_refused_unless_this_restore_made_it() {
    use velero_jupyterhub::policy::restore::ClaimNow;
    let home = home_volume(&fixtures::z2jh_pod());
    let pod = fixtures::restored_z2jh(&[&home]);
    let claim = "claim-alice-smith";
    let request = fixtures::pod_create_review(&pod, "o-1");
    let with = |now: ClaimNow| Scope {
        claims_now: vec![(claim.to_owned(), now)],
        ..scope(vec![])
    };
    let review =
        |now: ClaimNow| admission::review(&request, |_| with(now.clone()), false).expect("review");

    for now in [
        ClaimNow::Present { restore: None },
        ClaimNow::Present {
            restore: Some("an-earlier-restore".into()),
        },
    ] {
        let reviewed = review(now.clone());
        assert_eq!(
            reviewed.outcome,
            Outcome::Restore(RestoreVerdict::WouldOverwrite),
            "{now:?}"
        );
        let response = response(&reviewed);
        assert_eq!(
            (
                response["allowed"].clone(),
                response["status"]["code"].clone()
            ),
            (false.into(), 403.into())
        );
        let message = response["status"]["message"].as_str().expect("message");
        for part in [
            "pod jhub/jupyter-alice-smith of Velero restore restore-1 not re-created",
            "claim claim-alice-smith existed before this restore",
            "--existing-resource-policy=update",
            "--into-existing",
            "delete the claim first",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        assert_eq!(reviewed.claims_refused, [claim]);
    }
    let reviewed = review(ClaimNow::Unknown("connection refused".into()));
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::WouldOverwrite)
    );
    let message = reviewed.detail.clone().unwrap_or_default();
    assert!(
        message.contains("could not be checked") && message.contains("connection refused"),
        "{message}"
    );

    // Made by this Restore (or updated by it: existingResourcePolicy update), or not
    // there yet: converted.
    for now in [
        ClaimNow::Present {
            restore: Some("restore-1".into()),
        },
        ClaimNow::Absent,
    ] {
        let reviewed = review(now.clone());
        assert_eq!(
            reviewed.outcome,
            Outcome::Restore(RestoreVerdict::Converted),
            "{now:?}"
        );
        assert!(reviewed.claims_refused.is_empty());
    }
}

#[test]
fn a_restored_pod_even_the_fast_read_cannot_read_is_refused_and_a_user_pod_so_shaped_is_not() {
    // Security review, Low: on the restore entries (failurePolicy Fail), a pod whose
    // fields have shapes we do not expect was allowed unchanged before the restore check:
    // a stale notebook server would start instead of a restore helper.
    let home = home_volume(&fixtures::z2jh_pod());
    let odd = |mut pod: Value| {
        pod["spec"]["volumes"][0]["name"] = 7.into();
        pod["metadata"]["labels"]["example.com/odd"] = serde_json::json!({"a": [1]});
        pod
    };
    let restored = odd(fixtures::restored_z2jh(&[&home]));
    let request = fixtures::pod_create_review(&restored, "r-odd");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::Unreadable)
    );
    let answer = response(&reviewed);
    assert_eq!(answer["allowed"], false);
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(message.contains("no stale notebook server"), "{message}");

    // The same shape on a user's own server is still allowed unchanged (never stop a
    // user's server from starting).
    let live = odd(fixtures::z2jh_pod());
    let request = fixtures::pod_create_review(&live, "l-odd");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::NotUnderstood);
    assert_eq!(response(&reviewed)["allowed"], true);
}

#[test]
fn a_restored_pod_too_large_to_read_whole_is_refused_with_the_reason() {
    // Security review H1: the restore path read any pod whole, ~3 KiB per trivial volume.
    // Within the counts the fast read checks, a pod of tens of thousands of tiny values
    // is refused before it is built.
    let home = home_volume(&fixtures::z2jh_pod());
    let mut pod = fixtures::restored_z2jh(&[&home]);
    let env: Vec<Value> = (0..25_000)
        .map(|i| serde_json::json!({"name": format!("E{i}")}))
        .collect();
    pod["spec"]["containers"][0]["env"] = env.into();
    let request = fixtures::pod_create_review(&pod, "r-big");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(
        reviewed.outcome,
        Outcome::Restore(RestoreVerdict::Unreadable)
    );
    let answer = response(&reviewed);
    assert_eq!(answer["allowed"], false);
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(message.contains("more than 20000 JSON values"), "{message}");
}

#[test]
fn pods_beyond_the_limits_get_an_error_for_the_entry_failure_policy_to_decide() {
    // Security review H1: counts far above any real pod are refused before any decision,
    // as an error (400): the live entry (Ignore) then creates the pod unchanged, the
    // restore entries (Fail) refuse it. The message says which count and its limit.
    use velero_jupyterhub::admission::ReviewError;
    use velero_jupyterhub::policy::pod::PodLimits;
    let home = home_volume(&fixtures::z2jh_pod());
    let volumes = |n: usize| -> Value {
        (0..n)
            .map(|i| serde_json::json!({"name": format!("v{i}"), "emptyDir": {}}))
            .collect::<Vec<_>>()
            .into()
    };
    let containers = |n: usize| -> Value {
        (0..n)
            .map(|i| serde_json::json!({"name": format!("c{i}"), "image": "i"}))
            .collect::<Vec<_>>()
            .into()
    };
    let mounts = |n: usize| -> Value {
        (0..n)
            .map(|i| serde_json::json!({"name": format!("v{i}"), "mountPath": format!("/m/{i}")}))
            .collect::<Vec<_>>()
            .into()
    };
    type Shape = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Shape, &str)> = vec![
        (
            "volumes",
            Box::new(move |p| p["spec"]["volumes"] = volumes(PodLimits::VOLUMES + 1)),
            "1025 volumes (the limit is 1024)",
        ),
        (
            "containers",
            Box::new(move |p| p["spec"]["initContainers"] = containers(PodLimits::CONTAINERS)),
            "containers and init containers (the limit is 256)",
        ),
        (
            "mounts",
            Box::new(move |p| {
                p["spec"]["containers"][0]["volumeMounts"] = mounts(PodLimits::MOUNTS + 1)
            }),
            "volume mounts (the limit is 4096)",
        ),
    ];
    for (what, shape, want) in cases {
        for mut pod in [fixtures::z2jh_pod(), fixtures::restored_z2jh(&[&home])] {
            shape(&mut pod);
            let request = fixtures::pod_create_review(&pod, "big");
            let err = admission::review(&request, |_| scope(vec![]), false)
                .err()
                .unwrap_or_else(|| panic!("{what}: reviewed"));
            assert!(
                matches!(err, ReviewError::OverLimits { .. }),
                "{what}: {err}"
            );
            assert_eq!(err.outcome(), "over_limits");
            assert!(err.to_string().contains(want), "{what}: {err}");
        }
    }
    // At the limits, a pod is reviewed as usual.
    let mut pod = fixtures::z2jh_pod();
    pod["spec"]["initContainers"] = serde_json::json!([]);
    pod["spec"]["volumes"] = volumes(PodLimits::VOLUMES);
    pod["spec"]["containers"][0]["volumeMounts"] = mounts(PodLimits::MOUNTS);
    let request = fixtures::pod_create_review(&pod, "at-limits");
    let reviewed = admission::review(&request, |_| scope(vec![]), false).expect("review");
    assert_eq!(reviewed.outcome, Outcome::Live(LiveVerdict::NothingToAdd));
}
