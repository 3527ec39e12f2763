//! Table tests of the restore decisions that are not the conversion: when the controller
//! is done with a restore helper (`policy::cleanup`), and what the `restore` command checks
//! first and reports after (`policy::restore_report`). Pods are Velero-shaped restore
//! helpers (tests/fixtures, converted by `policy::restore`), read as the watch keeps them.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use testkit::fixtures;
use velero_jupyterhub_policy::PodRecord;
use velero_jupyterhub_policy::cleanup::{HelperState, PvrView, RestoreView, restore_helpers};
use velero_jupyterhub_policy::restore::restore_helper;
use velero_jupyterhub_policy::restore_report::{
    ClaimNow, ClaimOutcome, PodNow, PvbOfBackup, PvrOfRestore, Refusal, Users, outcomes, preflight,
};

/// (case, volumes restore-wait mounts, PodVolumeRestores, Restore phase, expected state)
type Case<'a> = (
    &'a str,
    Vec<&'a str>,
    Vec<PvrView<'a>>,
    Option<&'a str>,
    HelperState,
);

const UID: &str = "6e2d1c00-0000-4000-8000-00000000d001";

/// alice's restore helper as stored: `restored` are the volumes restore-wait mounts.
fn helper(restored: &[&str], created: &str) -> PodRecord {
    let mut pod = fixtures::restored_z2jh(restored);
    pod["metadata"]["uid"] = UID.into();
    pod["metadata"]["creationTimestamp"] = created.into();
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    fixtures::record(&restore_helper(&pod, &fixtures::helper_options()))
}

fn pvr<'a>(volume: &'a str, phase: Option<&'a str>, completed: Option<&str>) -> PvrView<'a> {
    PvrView {
        pod_uid: UID,
        volume,
        phase,
        bytes_done: Some(1024),
        message: phase
            .filter(|p| *p == "Failed")
            .map(|_| "repository not found"),
        completed: completed.map(|t| t.parse().expect("time")),
    }
}

#[test]
fn when_a_restore_helper_is_done() {
    let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
    let ttl = SignedDuration::from_hours(1);
    let home = "volume-alice-smith";
    let restore = |phase: Option<&'static str>| RestoreView {
        name: "restore-1",
        backup: "daily-20261128030000",
        phase,
        completed: None,
    };
    let cases: Vec<Case> = vec![
        (
            "PVR running",
            vec![home],
            vec![pvr(home, Some("InProgress"), None)],
            Some("InProgress"),
            HelperState::Restoring,
        ),
        (
            "PVR not started",
            vec![home],
            vec![pvr(home, None, None)],
            Some("InProgress"),
            HelperState::Restoring,
        ),
        (
            "no PVR yet",
            vec![home],
            vec![],
            Some("InProgress"),
            HelperState::Restoring,
        ),
        (
            "Completed",
            vec![home],
            vec![pvr(home, Some("Completed"), Some("2026-11-28T11:59:00Z"))],
            Some("InProgress"),
            HelperState::Completed,
        ),
        (
            "Failed recently: kept",
            vec![home],
            vec![pvr(home, Some("Failed"), Some("2026-11-28T11:30:00Z"))],
            Some("PartiallyFailed"),
            HelperState::Failed {
                until: "2026-11-28T12:30:00Z".parse().unwrap(),
            },
        ),
        (
            "Failed long ago: deleted",
            vec![home],
            vec![pvr(home, Some("Failed"), Some("2026-11-28T10:30:00Z"))],
            Some("PartiallyFailed"),
            HelperState::FailedExpired,
        ),
        (
            "Canceled counts as failed",
            vec![home],
            vec![pvr(home, Some("Canceled"), Some("2026-11-28T11:30:00Z"))],
            Some("InProgress"),
            HelperState::Failed {
                until: "2026-11-28T12:30:00Z".parse().unwrap(),
            },
        ),
        (
            "Restore ended with the PVR unfinished",
            vec![home],
            vec![pvr(home, Some("InProgress"), None)],
            Some("PartiallyFailed"),
            HelperState::Failed {
                until: "2026-11-28T12:55:00Z".parse().unwrap(),
            },
        ),
        (
            "nothing to restore",
            vec![],
            vec![],
            Some("InProgress"),
            HelperState::NothingToRestore,
        ),
        (
            "no PVR and the Restore over",
            vec![home],
            vec![],
            Some("Completed"),
            HelperState::RestoreOver,
        ),
        (
            "no PVR and the Restore gone",
            vec![home],
            vec![],
            None,
            HelperState::RestoreOver,
        ),
    ];
    for (name, restored, pvrs, phase, want) in cases {
        let pod = helper(&restored, "2026-11-28T11:55:00Z");
        let restores: Vec<RestoreView> = phase.map(|p| restore(Some(p))).into_iter().collect();
        let (helpers, next) = restore_helpers(&[&pod], &pvrs, &restores, now, ttl);
        assert_eq!(helpers.len(), 1, "{name}");
        assert_eq!(helpers[0].state, want, "{name}");
        assert_eq!(helpers[0].restore, "restore-1", "{name}");
        match want {
            HelperState::Failed { until } => assert_eq!(next, Some(until), "{name}"),
            _ => assert_eq!(next, None, "{name}"),
        }
        assert_eq!(
            want.delete(),
            !matches!(want, HelperState::Restoring | HelperState::Failed { .. }),
            "{name}"
        );
    }
    // The volume's claim, the Backup and the message the claim's Event carries.
    let pod = helper(&[home], "2026-11-28T11:55:00Z");
    let pvrs = [pvr(home, Some("Completed"), None)];
    let (helpers, _) = restore_helpers(&[&pod], &pvrs, &[restore(Some("InProgress"))], now, ttl);
    assert_eq!(helpers[0].volumes[0].claim, Some("claim-alice-smith"));
    assert_eq!(
        velero_jupyterhub_policy::cleanup::restored_message(&helpers[0], &helpers[0].volumes[0]),
        "restored from backup daily-20261128030000 by restore restore-1 (1024 bytes, volume volume-alice-smith of pod jupyter-alice-smith)"
    );
    // Not ours: a user's pod, or another uid's PodVolumeRestore, is not considered.
    let user: PodRecord = fixtures::record(&fixtures::z2jh_pod());
    let (helpers, _) = restore_helpers(&[&user], &pvrs, &[], now, ttl);
    assert!(helpers.is_empty());
}

#[test]
fn a_restore_helper_is_not_ended_early() {
    let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
    let ttl = SignedDuration::from_hours(1);
    let home = "volume-alice-smith";
    let at = |t: &str| -> Timestamp { t.parse().unwrap() };
    // Velero's label for a Restore named over 63 characters (pkg/label GetValidName).
    let long_name = format!(
        "{}-20261128030000-20261128110502",
        "nightly-user-homes".repeat(2)
    );
    let mut pod = fixtures::restored_z2jh(&[home]);
    pod["metadata"]["uid"] = UID.into();
    pod["metadata"]["creationTimestamp"] = "2026-11-28T11:59:00Z".into();
    pod["metadata"]["labels"]["velero.io/restore-name"] =
        velero_jupyterhub_policy::velero::label_value(&long_name)
            .into_owned()
            .into();
    let typed: Pod = serde_json::from_value(pod.clone()).expect("pod");
    let long = fixtures::record(&restore_helper(&typed, &fixtures::helper_options()));
    let running = RestoreView {
        name: &long_name,
        backup: "b",
        phase: Some("InProgress"),
        completed: None,
    };
    let (helpers, _) = restore_helpers(&[&long], &[], &[running], now, ttl);
    assert_eq!(
        helpers[0].state,
        HelperState::Restoring,
        "the truncated label still finds its Restore"
    );

    // A Restore the watch does not show (yet): kept for a while, then taken as gone.
    let young = helper(&[home], "2026-11-28T11:58:00Z");
    let (helpers, next) = restore_helpers(&[&young], &[], &[], now, ttl);
    assert_eq!(
        (helpers[0].state.clone(), next),
        (HelperState::Restoring, Some(at("2026-11-28T12:03:00Z")))
    );

    // Two volumes to restore, one PodVolumeRestore so far (Velero makes them one by one).
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "projects",
        "persistentVolumeClaim": {"claimName": "claim-alice-projects"}}));
    pod["spec"]["initContainers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "projects", "mountPath": "/restores/projects"}));
    pod["metadata"]["labels"]["velero.io/restore-name"] = "restore-1".into();
    let typed: Pod = serde_json::from_value(pod).expect("pod");
    let two = fixtures::record(&restore_helper(&typed, &fixtures::helper_options()));
    let restore = RestoreView {
        name: "restore-1",
        backup: "b",
        phase: Some("InProgress"),
        completed: None,
    };
    let first = [pvr(home, Some("Completed"), Some("2026-11-28T11:59:00Z"))];
    let (helpers, _) = restore_helpers(&[&two], &first, std::slice::from_ref(&restore), now, ttl);
    assert_eq!(helpers[0].state, HelperState::Restoring);
    assert_eq!(helpers[0].volumes.len(), 2);
    // The Restore ends with the second never begun: that volume failed.
    let over = RestoreView {
        phase: Some("PartiallyFailed"),
        ..restore.clone()
    };
    let (helpers, _) = restore_helpers(&[&two], &first, &[over], now, ttl);
    assert!(
        matches!(helpers[0].state, HelperState::Failed { .. }),
        "{:?}",
        helpers[0].state
    );
    let projects = helpers[0]
        .volumes
        .iter()
        .find(|v| v.volume == "projects")
        .expect("a row");
    assert_eq!(
        (projects.claim, projects.phase),
        (Some("claim-alice-projects"), None)
    );

    // Completed a moment ago: restore-wait has not exited yet (the pod is not Running).
    let just = [pvr(home, Some("Completed"), Some("2026-11-28T11:59:50Z"))];
    let pending = helper(&[home], "2026-11-28T11:55:00Z");
    let (helpers, next) =
        restore_helpers(&[&pending], &just, std::slice::from_ref(&restore), now, ttl);
    assert_eq!(
        (helpers[0].state.clone(), next),
        (HelperState::Restoring, Some(at("2026-11-28T12:00:20Z")))
    );
    let mut running = pending.clone();
    running.phase = Some("Running".to_owned());
    let (helpers, _) =
        restore_helpers(&[&running], &just, std::slice::from_ref(&restore), now, ttl);
    assert_eq!(
        helpers[0].state,
        HelperState::Completed,
        "its container runs: restore-wait is done"
    );

    // Another pod's PodVolumeRestore is not this helper's.
    let other = [PvrView {
        pod_uid: "someone-else",
        ..pvr(home, Some("Completed"), None)
    }];
    let (helpers, _) = restore_helpers(&[&running], &other, &[restore], now, ttl);
    assert_eq!(helpers[0].state, HelperState::Restoring);
}

#[test]
fn the_restore_command_refuses_what_would_be_skipped_or_overwritten() {
    let pods = [
        PodNow {
            name: "jupyter-alice",
            username: Some("alice"),
            user_server: true,
            stopped: false,
        },
        PodNow {
            name: "jupyter-dora",
            username: Some("dora"),
            user_server: true,
            stopped: true,
        },
        PodNow {
            name: "vjh-backup-claim-bob",
            username: Some("bob"),
            user_server: false,
            stopped: false,
        },
        PodNow {
            name: "hub-5d8f",
            username: None,
            user_server: false,
            stopped: false,
        },
    ];
    let claims = [
        ClaimNow {
            name: "claim-alice",
            uid: "a",
            username: Some("alice"),
        },
        ClaimNow {
            name: "claim-carol",
            uid: "c",
            username: Some("carol"),
        },
        ClaimNow {
            name: "hub-db-dir",
            uid: "h",
            username: None,
        },
        // Alice's second claim, not labelled (Nebari-shaped): her pod's volume in the
        // Backup is restored into it whether Velero re-creates the claim or not.
        ClaimNow {
            name: "projects-alice",
            uid: "p",
            username: None,
        },
        // Dora's second claim: her home claim is gone, so whose her pod in the Backup is
        // cannot be told; it may be re-created, so this counts as written over for any
        // restore (README: a refusal you may not need, never a silent merge).
        ClaimNow {
            name: "projects-dora",
            uid: "pd",
            username: None,
        },
    ];
    let pvbs = [
        PvbOfBackup {
            pod: "jupyter-alice",
            volume: "volume-alice",
            claim: Some("claim-alice"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-alice",
            volume: "projects",
            claim: Some("projects-alice"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "vjh-backup-claim-bob",
            volume: "data",
            claim: Some("claim-bob"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-dora",
            volume: "volume-dora",
            claim: Some("claim-dora"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-dora",
            volume: "projects",
            claim: Some("projects-dora"),
            phase: Some("Completed"),
        },
    ];
    let users = |u: &[&str]| Users(u.iter().map(|s| s.to_string()).collect());
    let server = |pod: &str, user: &str| Refusal::ServerRunning {
        pod: pod.into(),
        user: user.into(),
    };
    let exists = |pod: &str| Refusal::PodExists { pod: pod.into() };
    let claim = |c: &str| Refusal::ClaimExists { claim: c.into() };
    let mounted = |c: &str| Refusal::MountedClaimExists { claim: c.into() };
    let cases: Vec<(&str, Users, bool, Vec<Refusal>)> = vec![
        (
            "everyone",
            users(&[]),
            false,
            vec![
                server("jupyter-alice", "alice"),
                exists("jupyter-dora"),
                exists("vjh-backup-claim-bob"),
                claim("claim-alice"),
                claim("claim-carol"),
                mounted("projects-alice"),
                mounted("projects-dora"),
            ],
        ),
        (
            "everyone, into existing claims",
            users(&[]),
            true,
            vec![
                server("jupyter-alice", "alice"),
                exists("jupyter-dora"),
                exists("vjh-backup-claim-bob"),
            ],
        ),
        // bob's claim is gone, so whose the helper's claim was is Velero's selector's call.
        (
            "carol",
            users(&["carol"]),
            false,
            vec![
                exists("jupyter-dora"),
                exists("vjh-backup-claim-bob"),
                claim("claim-carol"),
                mounted("projects-dora"),
            ],
        ),
        (
            "alice",
            users(&["alice"]),
            false,
            vec![
                server("jupyter-alice", "alice"),
                exists("jupyter-dora"),
                exists("vjh-backup-claim-bob"),
                claim("claim-alice"),
                mounted("projects-alice"),
                mounted("projects-dora"),
            ],
        ),
        (
            "alice, into existing claims",
            users(&["alice"]),
            true,
            vec![
                server("jupyter-alice", "alice"),
                exists("jupyter-dora"),
                exists("vjh-backup-claim-bob"),
            ],
        ),
    ];
    for (name, who, into_existing, want) in cases {
        assert_eq!(
            preflight(&who, &pods, &claims, &pvbs, into_existing),
            want,
            "{name}"
        );
    }
    assert!(
        claim("claim-x")
            .to_string()
            .contains("pass --into-existing"),
        "the refusal says how to go on"
    );
    let says = mounted("projects-x").to_string();
    assert!(
        says.contains("pass --into-existing") && says.contains("create it again, empty"),
        "deleting it alone would leave the restored pod without its volume: {says}"
    );
}

#[test]
fn the_restore_command_reports_each_claim() {
    let claims = [
        ClaimNow {
            name: "claim-alice",
            uid: "a",
            username: Some("alice"),
        },
        ClaimNow {
            name: "claim-bob",
            uid: "b",
            username: Some("bob"),
        },
        ClaimNow {
            name: "claim-carol",
            uid: "c",
            username: Some("carol"),
        },
        ClaimNow {
            name: "claim-erin",
            uid: "e",
            username: Some("erin"),
        },
    ];
    let pvbs = [
        PvbOfBackup {
            pod: "jupyter-alice",
            volume: "v",
            claim: Some("claim-alice"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-bob",
            volume: "v",
            claim: Some("claim-bob"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-erin",
            volume: "v",
            claim: Some("claim-erin"),
            phase: Some("Completed"),
        },
        PvbOfBackup {
            pod: "jupyter-fred",
            volume: "v",
            claim: Some("claim-fred"),
            phase: Some("Completed"),
        },
    ];
    let pvrs = [
        PvrOfRestore {
            claim_uid: Some("a"),
            phase: Some("Completed"),
            bytes_done: Some(10),
            message: None,
        },
        PvrOfRestore {
            claim_uid: Some("b"),
            phase: Some("Failed"),
            bytes_done: None,
            message: Some("disk full"),
        },
    ];
    let rows = outcomes(
        &Users::default(),
        &claims,
        &pvbs,
        &pvrs,
        Some("PartiallyFailed"),
        "daily",
        "r1",
    );
    let reason = |claim: &str| match &rows.iter().find(|(c, _)| c == claim).expect(claim).1 {
        ClaimOutcome::Failed { reason } => reason.clone(),
        other => format!("{other:?}"),
    };
    assert_eq!(
        rows[0],
        (
            "claim-alice".into(),
            ClaimOutcome::Restored { bytes: Some(10) }
        )
    );
    assert_eq!(reason("claim-bob"), "PodVolumeRestore Failed: disk full");
    assert!(
        reason("claim-carol").contains("holds no file-system copy"),
        "{}",
        reason("claim-carol")
    );
    assert!(
        reason("claim-erin").contains("restored no data into it"),
        "{}",
        reason("claim-erin")
    );
    assert!(
        reason("claim-fred").contains("did not re-create the claim"),
        "{}",
        reason("claim-fred")
    );
    assert_eq!(rows.len(), 5);
    // Still running: in progress, not failed.
    let rows = outcomes(
        &Users::default(),
        &claims[..1],
        &pvbs,
        &[],
        Some("InProgress"),
        "daily",
        "r1",
    );
    assert_eq!(rows, [("claim-alice".into(), ClaimOutcome::InProgress)]);
    // One user: only that user's claims.
    let rows = outcomes(
        &Users(vec!["bob".into()]),
        &claims,
        &pvbs,
        &pvrs,
        Some("PartiallyFailed"),
        "daily",
        "r1",
    );
    assert_eq!(rows.len(), 1);
    // A user with no claim at all gets a row saying so.
    let two = Users(vec!["bob".into(), "zed".into()]);
    let rows = outcomes(
        &two,
        &claims,
        &pvbs,
        &pvrs,
        Some("Completed"),
        "daily",
        "r1",
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "(user zed)");
    assert!(
        matches!(&rows[0].1, ClaimOutcome::Failed { reason } if reason.contains("hub.jupyter.org/username=zed")),
        "{rows:?}"
    );
}

/// Which claims the restore of a re-created pod would write over without being asked
/// (`policy::restore::overwrites`): only claims `restore-wait` restores into count, one
/// this Restore created or updated (its `velero.io/restore-name` on the claim) or that
/// is not there yet is fine, any other that exists is refused, and one that could not be
/// read is refused too.
#[test]
fn a_restore_writes_only_into_homes_it_made_or_was_told_to_update() {
    use velero_jupyterhub_policy::restore::{ClaimNow, Overwrite, overwrites, restored_claims};
    // bob's pod as Velero re-creates it for restore "r-now": his home, a second claim of
    // his, both restored; a shared claim restore-wait does not restore.
    let mut pod = fixtures::restored_z2jh(&["home", "projects"]);
    pod["metadata"]["labels"]["velero.io/restore-name"] = "r-now".into();
    pod["spec"]["volumes"] = json!([
        {"name": "home", "persistentVolumeClaim": {"claimName": "claim-bob"}},
        {"name": "projects", "persistentVolumeClaim": {"claimName": "projects-bob"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}},
    ]);
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    assert_eq!(
        restored_claims(&pod),
        [("home", "claim-bob"), ("projects", "projects-bob")]
    );
    let made = || ClaimNow::Present {
        restore: Some("r-now".into()),
    };
    let existing = |restore: Option<&str>| ClaimNow::Present {
        restore: restore.map(str::to_owned),
    };
    type Case<'a> = (&'a str, Vec<(&'a str, ClaimNow)>, Vec<Overwrite>);
    let cases: Vec<Case<'_>> = vec![
        (
            "both made by this restore",
            vec![("claim-bob", made()), ("projects-bob", made())],
            vec![],
        ),
        (
            "neither there yet",
            vec![
                ("claim-bob", ClaimNow::Absent),
                ("projects-bob", ClaimNow::Absent),
            ],
            vec![],
        ),
        ("not looked up (review)", vec![], vec![]),
        (
            "home made, the second claim kept from before",
            vec![("claim-bob", made()), ("projects-bob", existing(None))],
            vec![Overwrite::Existing {
                claim: "projects-bob".into(),
            }],
        ),
        (
            "both restored by an earlier restore",
            vec![
                ("claim-bob", existing(Some("r-before"))),
                ("projects-bob", existing(Some("r-before"))),
            ],
            vec![
                Overwrite::Existing {
                    claim: "claim-bob".into(),
                },
                Overwrite::Existing {
                    claim: "projects-bob".into(),
                },
            ],
        ),
        (
            "the shared claim exists: not restored, not checked",
            vec![
                ("claim-bob", made()),
                ("projects-bob", made()),
                ("shared", existing(None)),
            ],
            vec![],
        ),
        (
            "one could not be read",
            vec![
                ("claim-bob", ClaimNow::Unknown("timed out".into())),
                ("projects-bob", made()),
            ],
            vec![Overwrite::Unchecked {
                claim: "claim-bob".into(),
                why: "timed out".into(),
            }],
        ),
    ];
    for (case, claims, want) in cases {
        let claims: Vec<(String, ClaimNow)> =
            claims.into_iter().map(|(c, n)| (c.to_owned(), n)).collect();
        assert_eq!(overwrites(&pod, &claims), want, "{case}");
    }
    // Nothing to restore (no restore-wait): nothing written, nothing refused.
    let bare: Pod = serde_json::from_value(fixtures::restored_z2jh(&[])).expect("pod");
    assert!(restored_claims(&bare).is_empty());
    assert!(overwrites(&bare, &[("claim-alice-smith".into(), existing(None))]).is_empty());
}

/// Which claims are being restored (`policy::restoring`): nothing else may take them
/// meanwhile. A Restore not over takes the claims its Backup has file-system copies of,
/// in the namespaces it restores into (its includes, excludes and namespace mapping, as
/// Velero reads them), from the moment it is seen (`New`); also claims it made (their
/// `velero.io/restore-name`), claims our restore helpers mount, and claims the `restore`
/// command listed on the namespace within the last two minutes.
#[test]
fn the_claims_being_restored() {
    use std::collections::{BTreeMap, BTreeSet};
    use velero_jupyterhub_policy::restoring::{
        BackedUpClaim, Input, LabelledClaim, Listed, RestoreSpecView, claims_being_restored,
    };
    let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
    let none = BTreeMap::new();
    let mapped = BTreeMap::from([("jhub".to_owned(), "jhub-dr".to_owned())]);
    let (all, jhub, other) = (vec![], vec!["jhub".to_owned()], vec!["other".to_owned()]);
    let restore = |name: &'static str, phase: Option<&'static str>| RestoreSpecView {
        name,
        backup: "nightly-20261207030000",
        phase,
        included_namespaces: &all,
        excluded_namespaces: &all,
        namespace_mapping: &none,
        label_selector: None,
        or_label_selectors: &[],
        included_resources: &[],
        excluded_resources: &[],
        updates_existing: false,
    };
    let backed_up = [
        BackedUpClaim {
            backup: "nightly-20261207030000",
            pod_namespace: "jhub",
            claim: "claim-alice",
        },
        BackedUpClaim {
            backup: "nightly-20261207030000",
            pod_namespace: "jhub",
            claim: "claim-bob",
        },
        BackedUpClaim {
            backup: "nightly-20261207030000",
            pod_namespace: "other",
            claim: "claim-olga",
        },
        BackedUpClaim {
            backup: "nightly-20261206030000",
            pod_namespace: "jhub",
            claim: "claim-carol",
        },
    ];
    let namespaces = ["jhub", "jhub-dr"];
    let set =
        |pairs: &[(&'static str, &'static str)]| -> BTreeMap<&'static str, BTreeSet<&'static str>> {
            let mut m: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (ns, c) in pairs {
                m.entry(*ns).or_default().insert(*c);
            }
            m
        };
    let run = |restores: &[RestoreSpecView<'_>],
               claims: &[LabelledClaim<'_>],
               helpers: &[(&str, &str)],
               listed: &[Listed<'_>]| {
        let input = Input {
            namespaces: &namespaces,
            restores,
            backed_up: &backed_up,
            claims,
            restore_helpers: helpers,
            listed,
            now,
        };
        claims_being_restored(&input)
            .into_iter()
            .map(|(ns, cs)| {
                (
                    ns.to_owned(),
                    cs.into_iter().map(str::to_owned).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    let want = |m: BTreeMap<&str, BTreeSet<&str>>| {
        m.into_iter()
            .map(|(ns, cs)| {
                (
                    ns.to_owned(),
                    cs.into_iter().map(str::to_owned).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };

    // Nothing under way.
    assert!(run(&[], &[], &[], &[]).is_empty());
    // A Restore seen New, or in progress: its Backup's claims, in our namespaces only
    // ("other" is not opted in); another Backup's claim is not concerned.
    for phase in [
        None,
        Some("New"),
        Some("InProgress"),
        Some("WaitingForPluginOperations"),
    ] {
        assert_eq!(
            run(&[restore("r1", phase)], &[], &[], &[]),
            want(set(&[("jhub", "claim-alice"), ("jhub", "claim-bob")])),
            "{phase:?}"
        );
    }
    // Over: nothing.
    for phase in ["Completed", "PartiallyFailed", "Failed", "FailedValidation"] {
        assert!(
            run(&[restore("r1", Some(phase))], &[], &[], &[]).is_empty(),
            "{phase}"
        );
    }
    // Its includes and excludes, and its namespace mapping.
    let only_other = RestoreSpecView {
        included_namespaces: &other,
        ..restore("r1", Some("InProgress"))
    };
    assert!(run(&[only_other], &[], &[], &[]).is_empty());
    let not_jhub = RestoreSpecView {
        excluded_namespaces: &jhub,
        ..restore("r1", Some("InProgress"))
    };
    assert!(run(&[not_jhub], &[], &[], &[]).is_empty());
    let into_dr = RestoreSpecView {
        namespace_mapping: &mapped,
        ..restore("r1", Some("InProgress"))
    };
    assert_eq!(
        run(&[into_dr], &[], &[], &[]),
        want(set(&[("jhub-dr", "claim-alice"), ("jhub-dr", "claim-bob")]))
    );
    // Claims it made or updated, while it is not over.
    let made = [
        LabelledClaim {
            namespace: "jhub",
            name: "claim-dave",
            restore: Some("r2"),
            username: Some("dave"),
        },
        LabelledClaim {
            namespace: "jhub",
            name: "claim-erin",
            restore: Some("r-old"),
            username: Some("erin"),
        },
    ];
    let r2 = RestoreSpecView {
        backup: "elsewhere",
        ..restore("r2", Some("InProgress"))
    };
    assert_eq!(
        run(std::slice::from_ref(&r2), &made, &[], &[]),
        want(set(&[("jhub", "claim-dave")]))
    );
    let r2_done = RestoreSpecView {
        phase: Some("Completed"),
        ..r2
    };
    assert!(run(&[r2_done], &made, &[], &[]).is_empty());
    // Claims that are there: the Restore writes into one only if it updates what exists
    // (else our webhook refuses the pod that would, and a helper's name taken is
    // harmless), and only its users' (`velero-jupyterhub restore --user bob`). One that
    // is not there may be re-created.
    let bob_only: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        serde_json::from_value(json!({"matchExpressions": [
            {"key": "hub.jupyter.org/username", "operator": "In", "values": ["bob"]}]}))
        .unwrap();
    let there = [
        LabelledClaim {
            namespace: "jhub",
            name: "claim-alice",
            restore: None,
            username: Some("alice"),
        },
        LabelledClaim {
            namespace: "jhub",
            name: "claim-bob",
            restore: None,
            username: Some("bob"),
        },
    ];
    let updating = RestoreSpecView {
        updates_existing: true,
        ..restore("r1", Some("New"))
    };
    assert!(run(&[restore("r1", Some("New"))], &there, &[], &[]).is_empty());
    assert_eq!(
        run(std::slice::from_ref(&updating), &there, &[], &[]),
        want(set(&[("jhub", "claim-alice"), ("jhub", "claim-bob")]))
    );
    let for_bob = RestoreSpecView {
        label_selector: Some(&bob_only),
        ..updating
    };
    assert_eq!(
        run(std::slice::from_ref(&for_bob), &there, &[], &[]),
        want(set(&[("jhub", "claim-bob")]))
    );
    assert_eq!(
        run(&[for_bob], &there[1..], &[], &[]),
        want(set(&[("jhub", "claim-alice"), ("jhub", "claim-bob")]))
    );
    // A Restore that re-creates no pods restores no volume.
    let configmaps = ["configmaps".to_owned()];
    let pods = ["pods".to_owned()];
    for (included, excluded) in [(&configmaps[..], &[][..]), (&[][..], &pods[..])] {
        let r = RestoreSpecView {
            included_resources: included,
            excluded_resources: excluded,
            ..restore("r1", Some("New"))
        };
        assert!(
            run(&[r], &[], &[], &[]).is_empty(),
            "{included:?} {excluded:?}"
        );
    }
    // Restore helpers' claims, whatever the Restores say.
    assert_eq!(
        run(
            &[],
            &[],
            &[("jhub", "claim-frank"), ("elsewhere", "claim-x")],
            &[]
        ),
        want(set(&[("jhub", "claim-frank")]))
    );
    // Listed by the restore command: for two minutes.
    let listed = |since: &str| Listed {
        namespace: "jhub",
        claims: vec!["claim-gina"],
        since: Some(since.parse().unwrap()),
        restores: vec!["r-gina"],
    };
    // Listed by the restore command for its Restore: until that is over, at most two
    // minutes (then the Restore, if under way, counts by itself).
    let gina = |phase: &'static str| RestoreSpecView {
        backup: "elsewhere",
        ..restore("r-gina", Some(phase))
    };
    assert_eq!(
        run(
            &[gina("InProgress")],
            &[],
            &[],
            &[listed("2026-12-07T11:58:30Z")]
        ),
        want(set(&[("jhub", "claim-gina")]))
    );
    assert!(
        run(
            &[gina("Completed")],
            &[],
            &[],
            &[listed("2026-12-07T11:58:30Z")]
        )
        .is_empty()
    );
    // Past the two minutes, while one of its Restores is under way (the command creates
    // the next only when Velero has re-created the previous one's claims).
    assert_eq!(
        run(
            &[gina("InProgress")],
            &[],
            &[],
            &[listed("2026-12-07T11:30:00Z")]
        ),
        want(set(&[("jhub", "claim-gina")]))
    );
    assert_eq!(
        run(&[], &[], &[], &[listed("2026-12-07T11:58:30Z")]),
        want(set(&[("jhub", "claim-gina")]))
    );
    assert!(run(&[], &[], &[], &[listed("2026-12-07T11:57:59Z")]).is_empty());
    assert!(
        run(
            &[],
            &[],
            &[],
            &[Listed {
                since: None,
                ..listed("2026-12-07T11:59:00Z")
            }]
        )
        .is_empty()
    );
}

/// `restore --from-schedule`: the newest tick of the Schedule (at or before `--at`)
/// whose own Backup can be restored from, with the wave Backups of that tick, found by
/// their `velero-jupyterhub.io/wave-of` label as Velero's backup sync keeps it (or, made
/// before it, by name); never another tick's waves, another Schedule's, or one by hand.
#[test]
fn a_schedules_tick_is_its_backup_and_its_waves() {
    use velero_jupyterhub_policy::restore_report::{BackupOf, Tick, schedule_tick};
    let t = |s: &str| Some(s.parse::<Timestamp>().unwrap());
    let own = |name: &'static str, phase: &'static str, at: &str| BackupOf {
        name,
        phase: Some(phase),
        started: t(at),
        schedule: Some("homes"),
        wave_of: None,
        wave_schedule: None,
    };
    let wave = |name: &'static str, of: Option<&'static str>, phase: &'static str| BackupOf {
        name,
        phase: Some(phase),
        started: t("2026-12-07T03:20:00Z"),
        schedule: None,
        wave_of: of,
        wave_schedule: Some("homes"),
    };
    let backups = [
        own("homes-20261206030000", "Completed", "2026-12-06T03:00:00Z"),
        own(
            "homes-20261207030000",
            "PartiallyFailed",
            "2026-12-07T03:00:00Z",
        ),
        own("homes-20261208030000", "Failed", "2026-12-08T03:00:00Z"),
        wave(
            "homes-wave1-20261207030000",
            Some("homes-20261207030000"),
            "Completed",
        ),
        wave(
            "homes-wave2-20261207030000",
            Some("homes-20261207030000"),
            "Failed",
        ),
        // Made before the wave-of label: matched by its name.
        wave("homes-wave3-20261207030000", None, "Completed"),
        wave(
            "homes-wave1-20261206030000",
            Some("homes-20261206030000"),
            "Completed",
        ),
        // By hand, or another Schedule's: never.
        BackupOf {
            schedule: None,
            wave_schedule: None,
            ..own("homes-by-hand", "Completed", "2026-12-07T04:00:00Z")
        },
        BackupOf {
            schedule: Some("other"),
            ..own("other-20261207030000", "Completed", "2026-12-07T03:00:00Z")
        },
    ];
    assert_eq!(
        schedule_tick("homes", None, &backups),
        Ok(Tick {
            backup: "homes-20261207030000",
            waves: vec!["homes-wave1-20261207030000", "homes-wave3-20261207030000"],
            failed_waves: vec!["homes-wave2-20261207030000"],
        })
    );
    assert_eq!(
        schedule_tick("homes", t("2026-12-06T12:00:00Z"), &backups),
        Ok(Tick {
            backup: "homes-20261206030000",
            waves: vec!["homes-wave1-20261206030000"],
            failed_waves: vec![],
        })
    );
    let err = schedule_tick("homes", t("2026-12-01T00:00:00Z"), &backups).unwrap_err();
    assert!(
        err.contains("no Completed or PartiallyFailed Backup of Schedule homes at or before"),
        "{err}"
    );
    assert!(schedule_tick("nightly", None, &backups).is_err());
}

/// Rows over a tick's Restores: each claim's row comes from the Restore of the Backup
/// that holds its data.
#[test]
fn the_rows_of_a_restore_of_several_backups() {
    use velero_jupyterhub_policy::restore_report::{RestoreOf, outcomes_of_many};
    let claims = [
        ClaimNow {
            name: "claim-alice",
            uid: "u-a",
            username: Some("alice"),
        },
        ClaimNow {
            name: "claim-bob",
            uid: "u-b",
            username: Some("bob"),
        },
        ClaimNow {
            name: "claim-carol",
            uid: "u-c",
            username: Some("carol"),
        },
    ];
    let pvb = |claim: &'static str| PvbOfBackup {
        pod: "p",
        volume: "data",
        claim: Some(claim),
        phase: Some("Completed"),
    };
    let pvr = |uid: &'static str| PvrOfRestore {
        claim_uid: Some(uid),
        phase: Some("Completed"),
        bytes_done: Some(4096),
        message: None,
    };
    let restores = [
        RestoreOf {
            backup: "homes-1",
            restore: "r",
            phase: Some("Completed"),
            pvbs: vec![pvb("claim-alice")],
            pvrs: vec![pvr("u-a")],
        },
        RestoreOf {
            backup: "homes-wave1-1",
            restore: "r-w1",
            phase: Some("Completed"),
            pvbs: vec![pvb("claim-bob")],
            pvrs: vec![pvr("u-b")],
        },
    ];
    let rows = outcomes_of_many(&Users::default(), &claims, &restores);
    let restored = ClaimOutcome::Restored { bytes: Some(4096) };
    assert_eq!(rows[0], ("claim-alice".to_owned(), restored.clone()));
    assert_eq!(rows[1], ("claim-bob".to_owned(), restored));
    match &rows[2] {
        (c, ClaimOutcome::Failed { reason }) if c == "claim-carol" => {
            assert!(
                reason.contains("backup homes-1 holds no file-system copy"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rows.len(), 3);
}

/// Velero's own `restore create --from-schedule` re-creates every claim of the Schedule's
/// Backup, also those whose homes a wave Backup holds (`policy::restore::home_in_a_wave`):
/// such a claim is found by the wave's `velero-jupyterhub.io/wave-claims`, in the Backup's
/// namespace (before any mapping); another claim, or another namespace's, is not.
#[test]
fn a_claim_whose_home_is_in_a_wave() {
    use velero_jupyterhub_policy::restore::{WaveOf, home_in_a_wave, wave_home_message};
    let waves = [
        WaveOf::read(
            "homes-wave1-20261207030000",
            Some("homes"),
            Some("Completed"),
            "jhub/claim-bob,jhub/claim-carol",
        ),
        WaveOf::read(
            "homes-wave2-20261207030000",
            Some("homes"),
            Some("PartiallyFailed"),
            "jhub/claim-dave, other/claim-erin",
        ),
        WaveOf::read(
            "homes-wave3-20261207030000",
            Some("homes"),
            Some("Failed"),
            "jhub/claim-fay",
        ),
    ];
    let found = |ns: &str, claim: &str| home_in_a_wave(ns, claim, &waves).map(|w| w.name);
    assert_eq!(
        found("jhub", "claim-carol"),
        Some("homes-wave1-20261207030000")
    );
    assert_eq!(
        found("jhub", "claim-dave"),
        Some("homes-wave2-20261207030000")
    );
    assert_eq!(
        found("other", "claim-erin"),
        Some("homes-wave2-20261207030000")
    );
    assert_eq!(
        found("jhub", "claim-alice"),
        None,
        "in the Schedule's own Backup"
    );
    assert_eq!(
        found("other", "claim-bob"),
        None,
        "another namespace's claim-bob"
    );
    assert!(home_in_a_wave("jhub", "claim-bob", &[]).is_none());
    let m = wave_home_message("jhub", "claim-bob", "homes-20261207030000", &waves[0]);
    for part in [
        "claim jhub/claim-bob not re-created from Backup homes-20261207030000",
        "come back empty",
        "--from-schedule homes",
        "velero restore create --from-backup homes-wave1-20261207030000",
    ] {
        assert!(m.contains(part), "{part}: {m}");
    }
    // A wave that failed holds no copy either: refused too, saying so.
    let failed = home_in_a_wave("jhub", "claim-fay", &waves).expect("wave 3");
    let m = wave_home_message("jhub", "claim-fay", "homes-20261207030000", failed);
    assert!(
        m.contains("homes-wave3-20261207030000")
            && m.contains("is Failed")
            && m.contains("--latest"),
        "{m}"
    );
}
