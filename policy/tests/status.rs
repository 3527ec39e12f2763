//! Table test of `policy::status`: one row per user claim, who holds it, its last
//! completed backup (from restorable Backups only), and whether it is stale.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use testkit::fixtures;
use velero_jupyterhub_policy::datapath::{DataPath, Skip};
use velero_jupyterhub_policy::plan::ClaimView;
use velero_jupyterhub_policy::status::{CopiedBy, Holder, PvbDone, rows};

fn pod(
    name: &str,
    claim: &str,
    labels: serde_json::Value,
    phase: &str,
) -> velero_jupyterhub_policy::PodRecord {
    fixtures::record(&json!({
        "metadata": {"name": name, "namespace": "jhub", "uid": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                 "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": phase},
    }))
}

#[test]
fn one_row_per_user_claim() {
    let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
    let claim = |name: &'static str, user: &'static str| ClaimView {
        namespace: "jhub",
        name,
        uid: name,
        bound: true,
        username: Some(user),
        exclusive: false,
    };
    let claims = [
        claim("claim-alice", "alice"),
        claim("claim-bob", "bob"),
        claim("claim-carol", "carol"),
        claim("claim-dave", "dave"),
        claim("claim-erin", "erin"),
        claim("claim-frank", "frank"),
        ClaimView {
            name: "hub-db-dir",
            ..claim("x", "-")
        },
    ];
    let ours = |component: &str| {
        json!({"app.kubernetes.io/managed-by": "velero-jupyterhub",
        "app.kubernetes.io/component": component, "velero.io/restore-name": "r"})
    };
    let pods = [
        pod(
            "jupyter-alice",
            "claim-alice",
            json!({"component": "singleuser-server"}),
            "Running",
        ),
        pod(
            "vjh-backup-claim-dave",
            "claim-dave",
            ours("backup-helper"),
            "Running",
        ),
        pod(
            "jupyter-erin",
            "claim-erin",
            ours("restore-helper"),
            "Pending",
        ),
        // A user's server that stopped holds nothing.
        pod(
            "jupyter-frank",
            "claim-frank",
            json!({"component": "singleuser-server"}),
            "Succeeded",
        ),
        // Two pods on one claim: one row.
        pod(
            "jupyter-alice-2",
            "claim-alice",
            json!({"component": "singleuser-server"}),
            "Running",
        ),
    ];
    let pvb = |backup, claim, at: &str| PvbDone {
        backup,
        pod_namespace: "jhub",
        claim,
        completed: at.parse().unwrap(),
        bytes: Some(4096),
    };
    let pvbs = [
        pvb("daily-1", "claim-alice", "2026-11-27T03:10:00Z"),
        pvb("daily-2", "claim-alice", "2026-11-28T03:10:00Z"),
        pvb("daily-2", "claim-bob", "2026-11-28T03:12:00Z"),
        pvb("daily-0", "claim-dave", "2026-11-26T03:10:00Z"),
        // Only in a Backup that failed: Velero restores nothing from it.
        pvb("failed-1", "claim-carol", "2026-11-28T03:11:00Z"),
        // Another namespace's claim of the same name.
        PvbDone {
            pod_namespace: "other",
            ..pvb("daily-2", "claim-frank", "2026-11-28T03:13:00Z")
        },
    ];
    let globs = fixtures::globs("claim-*");
    let pod_refs: Vec<_> = pods.iter().collect();
    let got = rows(
        |ns| (ns == "jhub").then(|| globs.clone()),
        &claims,
        &pod_refs,
        &pvbs,
        |b| b != "failed-1",
        |c| {
            (c.name == "claim-frank").then(|| CopiedBy {
                schedule: "nightly".to_owned(),
                path: DataPath::Skipped(Skip::HostPath),
                detail: DataPath::Skipped(Skip::HostPath).describe(None),
            })
        },
        now,
        SignedDuration::from_hours(26),
    );
    let summary: Vec<(&str, Holder, Option<&str>, bool)> = got
        .iter()
        .map(|r| {
            (
                r.claim.as_str(),
                r.holder,
                r.last.as_ref().map(|l| l.backup.as_str()),
                r.stale,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("claim-alice", Holder::Live, Some("daily-2"), false),
            ("claim-bob", Holder::Idle, Some("daily-2"), false),
            ("claim-carol", Holder::Idle, None, true),
            ("claim-dave", Holder::BackupHelper, Some("daily-0"), true),
            ("claim-erin", Holder::Restoring, None, true),
            ("claim-frank", Holder::Idle, None, true),
        ]
    );
    assert_eq!(got[0].user.as_deref(), Some("alice"));
    // How Velero copies a claim, when not through a pod, is on its row.
    let copied: Vec<_> = got
        .iter()
        .filter_map(|r| Some((r.claim.as_str(), r.copied_by.as_ref()?.path.clone())))
        .collect();
    assert_eq!(copied, [("claim-frank", DataPath::Skipped(Skip::HostPath))]);
    assert_eq!(
        got[0].last.as_ref().unwrap().at,
        "2026-11-28T03:10:00Z".parse::<Timestamp>().unwrap()
    );
    // Not opted in: no rows at all.
    let none = rows(
        |_| None,
        &claims,
        &pod_refs,
        &pvbs,
        |_| true,
        |_| None,
        now,
        SignedDuration::from_hours(26),
    );
    assert!(none.is_empty());
}
