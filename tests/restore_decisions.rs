//! Table tests of the restore decisions that are not the conversion: when the controller
//! is done with a restore helper (`policy::cleanup`), and what the `restore` command checks
//! first and reports after (`policy::restore_report`). Pods are Velero-shaped restore
//! helpers (tests/fixtures, converted by `policy::restore`), read as the watch keeps them.

mod support;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use support::fixtures;
use velero_jupyterhub::policy::PodRecord;
use velero_jupyterhub::policy::cleanup::{HelperState, PvrView, RestoreView, restore_helpers};
use velero_jupyterhub::policy::restore::restore_helper;
use velero_jupyterhub::policy::restore_report::{
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
        velero_jupyterhub::policy::cleanup::restored_message(&helpers[0], &helpers[0].volumes[0]),
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
        velero_jupyterhub::policy::velero::label_value(&long_name)
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
