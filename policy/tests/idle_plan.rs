//! Table tests of the reconciler's plan on real object shapes: the
//! z2jh user pod and its claim (tests/fixtures), our helper pod as `policy::helper`
//! builds it, and PodVolumeBackups as Velero writes them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use testkit::fixtures;
use velero_jupyterhub_policy::helper::{self, ClaimRef, HelperOptions};
use velero_jupyterhub_policy::names;
use velero_jupyterhub_policy::plan::{
    ClaimView, DeleteReason, NamespaceView, PlanInput, PvbView, plan,
};
use velero_jupyterhub_policy::window::NamespaceWindow;
use velero_jupyterhub_policy::{ClaimGlobs, PodFacts, PodRecord};

const NS: &str = "jhub";
/// The plan's now (the table's window opened for the 03:00 tick), and `--user-pod-grace`.
const NOW: &str = "2026-11-28T03:05:00Z";
const GRACE: SignedDuration = SignedDuration::from_mins(2);

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

/// `pod`, created at `at`.
fn created(mut pod: Pod, at: &str) -> Pod {
    pod.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts(at)));
    pod
}

fn options() -> HelperOptions {
    fixtures::helper_options()
}

/// The z2jh user pod of `user`, mounting `claim-<user>`, as a watch shows it.
fn user_pod(user: &str, node: Option<&str>, phase: &str) -> Pod {
    let mut pod = fixtures::z2jh_pod();
    pod["metadata"]["name"] = format!("jupyter-{user}").into();
    pod["metadata"]["namespace"] = NS.into();
    pod["metadata"]["uid"] = format!("uid-jupyter-{user}").into();
    pod["metadata"]["resourceVersion"] = "41".into();
    pod["metadata"]["annotations"] =
        json!({(names::VELERO_BACKUP_VOLUMES): format!("volume-{user}")});
    pod["spec"]["containers"][0]["volumeMounts"][0]["name"] = format!("volume-{user}").into();
    pod["spec"]["volumes"][0] = json!({"name": format!("volume-{user}"), "persistentVolumeClaim": {"claimName": format!("claim-{user}")}});
    if let Some(node) = node {
        pod["spec"]["nodeName"] = node.into();
    }
    pod["status"] = json!({"phase": phase});
    serde_json::from_value(pod).expect("pod")
}

/// Our helper for `claim-<user>`, as created and then scheduled.
fn helper_pod(user: &str, node: Option<&str>, phase: &str) -> Pod {
    let claim = format!("claim-{user}");
    let uid = format!("uid-{claim}");
    let claim_ref = ClaimRef {
        namespace: NS,
        name: &claim,
        uid: &uid,
        username: Some(user),
    };
    // With the table's window labels, as a helper created in that window has them.
    let mut labels = helper::own_labels(Some(user));
    labels.insert("backup".to_owned(), "homes".to_owned());
    let mut pod = helper::backup_helper(&claim_ref, labels, &options());
    pod.metadata.uid = Some(format!("uid-helper-{user}"));
    let spec = pod.spec.as_mut().expect("spec");
    spec.node_name = node.map(str::to_owned);
    pod.status = Some(serde_json::from_value(json!({"phase": phase})).expect("status"));
    pod
}

/// The pod as the controller's watch keeps it.
fn record(pod: &Pod) -> PodRecord {
    fixtures::record(pod)
}

struct Case {
    name: &'static str,
    pods: Vec<Pod>,
    /// Users whose claim is Bound (unbound: `!user`).
    claims: Vec<&'static str>,
    window: bool,
    /// (pod uid, backup, phase) of PodVolumeBackups.
    pvbs: Vec<(&'static str, &'static str, &'static str)>,
    create: Vec<&'static str>,
    delete: Vec<(&'static str, DeleteReason)>,
    backfill: Vec<&'static str>,
    /// What the next pass creates once this pass's plan is applied (a stopped helper's
    /// replacement: its name is free only after the deletion).
    then_create: Vec<&'static str>,
}

fn run(case: &Case) {
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let claim_names: Vec<(String, String, bool, String)> = case
        .claims
        .iter()
        .map(|c| {
            let (bound, user) = match c.strip_prefix('!') {
                Some(u) => (false, u),
                None => (true, *c),
            };
            let name = format!("claim-{user}");
            (format!("uid-{name}"), name, bound, user.to_owned())
        })
        .collect();
    let claims: Vec<ClaimView<'_>> = claim_names
        .iter()
        .map(|(uid, name, bound, user)| ClaimView {
            namespace: NS,
            name,
            uid,
            bound: *bound,
            username: Some(user),
            exclusive: false,
        })
        .collect();
    let records: Vec<PodRecord> = case.pods.iter().map(record).collect();
    let pods: Vec<&PodRecord> = records.iter().collect();
    let mut windows = BTreeMap::new();
    if case.window {
        windows.insert(
            NS.to_owned(),
            NamespaceWindow {
                schedules: vec!["daily".to_owned()],
                backups: vec!["daily-20261128030000".to_owned()],
                labels: BTreeMap::from([("backup".to_owned(), "homes".to_owned())]),
            },
        );
    }
    let pvbs: Vec<PvbView<'_>> = case
        .pvbs
        .iter()
        .map(|(uid, backup, phase)| PvbView {
            backup,
            pod_namespace: NS,
            pod_uid: uid,
            claim: None,
            phase: Some(phase),
        })
        .collect();
    let options = options();
    let input = PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &pods,
        windows: &windows,
        pvbs: &pvbs,
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    };
    let got = plan(&input);
    let created: Vec<&str> = got
        .create
        .iter()
        .map(|p| p.metadata.name.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(created, case.create, "{}: create", case.name);
    let deleted: Vec<(&str, DeleteReason)> = got
        .delete
        .iter()
        .map(|d| (d.name.as_str(), d.reason))
        .collect();
    assert_eq!(deleted, case.delete, "{}: delete", case.name);
    let backfilled: Vec<&str> = got.backfill.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(backfilled, case.backfill, "{}: backfill", case.name);
    assert!(
        got.relabel.is_empty(),
        "{}: relabel {:?}",
        case.name,
        got.relabel
    );
    for pod in &got.create {
        // Helpers carry the window's labels, so the Schedule's selector includes them.
        assert_eq!(pod.label("backup"), Some("homes"), "{}", case.name);
    }

    // Applying the plan and planning again changes nothing (steady state: no writes).
    let mut after: Vec<Pod> = case
        .pods
        .iter()
        .filter(|p| {
            !got.delete
                .iter()
                .any(|d| Some(&d.uid) == p.metadata.uid.as_ref())
        })
        .cloned()
        .collect();
    for mut pod in got.create.clone() {
        pod.metadata.uid = Some(format!("uid-new-{}", after.len()));
        after.push(pod);
    }
    for b in &got.backfill {
        let pod = after
            .iter_mut()
            .find(|p| p.metadata.name.as_deref() == Some(b.name.as_str()))
            .expect("backfilled pod");
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(names::VELERO_BACKUP_VOLUMES.to_owned(), b.value.clone());
    }
    let records: Vec<PodRecord> = after.iter().map(record).collect();
    let pods: Vec<&PodRecord> = records.iter().collect();
    let again = plan(&PlanInput {
        pods: &pods,
        ..input
    });
    let created: Vec<&str> = again
        .create
        .iter()
        .map(|p| p.metadata.name.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        created, case.then_create,
        "{}: second plan creates",
        case.name
    );
    assert!(
        again.backfill.is_empty(),
        "{}: second plan backfills",
        case.name
    );
    assert!(
        again.delete.is_empty(),
        "{}: second plan deletes {:?}",
        case.name,
        again.delete
    );
}

fn unannotated(mut pod: Pod) -> Pod {
    pod.metadata.annotations = None;
    pod
}

#[test]
fn plan_table() {
    use DeleteReason::*;
    let cases = vec![
        Case {
            name: "idle claims get one helper each while a window is open",
            pods: vec![],
            claims: vec!["alice", "bob"],
            window: true,
            pvbs: vec![],
            create: vec!["vjh-backup-claim-alice", "vjh-backup-claim-bob"],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "no window: no helpers, and existing ones go",
            pods: vec![helper_pod("alice", Some("node-a"), "Running")],
            claims: vec!["alice", "bob"],
            window: false,
            pvbs: vec![],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", WindowClosed)],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a live user's claim gets no helper; an unbound claim neither",
            pods: vec![user_pod("alice", Some("node-a"), "Running")],
            claims: vec!["alice", "!bob", "carol"],
            window: true,
            pvbs: vec![],
            create: vec!["vjh-backup-claim-carol"],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a stopped user pod does not hold the claim",
            pods: vec![user_pod("alice", Some("node-a"), "Succeeded")],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec!["vjh-backup-claim-alice"],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "the user starts on another node: the helper goes at once",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                user_pod("alice", Some("node-b"), "Pending"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", UserStarted)],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "the user's pod is not scheduled yet (a node being added): the helper stays for the grace period",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                created(user_pod("alice", None, "Pending"), "2026-11-28T03:04:00Z"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a pod unscheduled for longer than the grace period (a ReadWriteOncePod claim waits for the helper): the helper goes",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                created(user_pod("alice", None, "Pending"), "2026-11-28T03:03:00Z"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", UserStarted)],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a pod a node has taken goes ahead at once, however young (it waits for the volume there)",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                created(
                    user_pod("alice", Some("node-b"), "Pending"),
                    "2026-11-28T03:04:59Z",
                ),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", UserStarted)],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "same node, backup of the helper still running: the helper stays",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                user_pod("alice", Some("node-a"), "Running"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![("uid-helper-alice", "daily-20261128030000", "InProgress")],
            create: vec![],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "same node, helper's PodVolumeBackup done: the helper goes",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                user_pod("alice", Some("node-a"), "Running"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![("uid-helper-alice", "daily-20261128030000", "Completed")],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", BackedUpUserRunning)],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a PodVolumeBackup of an older Backup does not count",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                user_pod("alice", Some("node-a"), "Running"),
            ],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![("uid-helper-alice", "daily-20261127030000", "Completed")],
            create: vec![],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "a stopped helper is replaced (deleted now, created on the next pass)",
            pods: vec![helper_pod("alice", Some("node-a"), "Failed")],
            claims: vec!["alice"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![("vjh-backup-claim-alice", Stopped)],
            backfill: vec![],
            then_create: vec!["vjh-backup-claim-alice"],
        },
        Case {
            name: "a helper whose claim is gone or unbound goes",
            pods: vec![
                helper_pod("alice", Some("node-a"), "Running"),
                helper_pod("bob", Some("node-a"), "Running"),
            ],
            claims: vec!["!bob"],
            window: true,
            pvbs: vec![],
            create: vec![],
            delete: vec![
                ("vjh-backup-claim-alice", NotIdleUserClaim),
                ("vjh-backup-claim-bob", NotIdleUserClaim),
            ],
            backfill: vec![],
            then_create: vec![],
        },
        Case {
            name: "backfill: a live user pod without the annotation",
            pods: vec![unannotated(user_pod("alice", Some("node-a"), "Running"))],
            claims: vec!["alice"],
            window: false,
            pvbs: vec![],
            create: vec![],
            delete: vec![],
            backfill: vec!["jupyter-alice"],
            then_create: vec![],
        },
        Case {
            name: "no backfill for stopped pods",
            pods: vec![unannotated(user_pod("alice", Some("node-a"), "Failed"))],
            claims: vec!["alice"],
            window: false,
            pvbs: vec![],
            create: vec![],
            delete: vec![],
            backfill: vec![],
            then_create: vec![],
        },
    ];
    for case in &cases {
        run(case);
    }
}

#[test]
fn a_duplicate_helper_goes_and_ours_stays() {
    let mut other = helper_pod("alice", Some("node-a"), "Running");
    other.metadata.name = Some("old-helper-alice".to_owned());
    other.metadata.uid = Some("uid-old".to_owned());
    run(&Case {
        name: "duplicate",
        pods: vec![other, helper_pod("alice", Some("node-a"), "Running")],
        claims: vec!["alice"],
        window: true,
        pvbs: vec![],
        create: vec![],
        delete: vec![("old-helper-alice", DeleteReason::Duplicate)],
        backfill: vec![],
        then_create: vec![],
    });
}

#[test]
fn the_backfill_value_is_the_webhooks() {
    let pod = user_pod("alice", Some("node-a"), "Running");
    let mut v: Value = serde_json::to_value(&pod).expect("json");
    v["metadata"]["annotations"] = json!({(names::VELERO_BACKUP_VOLUMES): "scratch"});
    let pod: Pod = serde_json::from_value(v).expect("pod");
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let pod = record(&pod);
    let pods = [&pod];
    let options = options();
    let got = plan(&PlanInput {
        namespaces: &namespaces,
        claims: &[],
        pods: &pods,
        windows: &BTreeMap::new(),
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    });
    // Kept what was there, appended the user's volume: the webhook's merge rule.
    assert_eq!(got.backfill[0].value, "scratch,volume-alice");
    assert_eq!(got.backfill[0].resource_version, "41");
}

#[test]
fn helpers_not_running_two_minutes_after_creation_are_reported_once_due() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use velero_jupyterhub_policy::plan::stuck_helpers;
    let now: Timestamp = "2026-11-28T03:00:00Z".parse().expect("time");
    let created = |pod: Pod, ago: i64| {
        let mut v = serde_json::to_value(&pod).expect("json");
        v["metadata"]["creationTimestamp"] =
            (now - SignedDuration::from_secs(ago)).to_string().into();
        serde_json::from_value::<PodRecord>(v).expect("record")
    };
    let mut deleting = serde_json::to_value(helper_pod("erin", None, "Pending")).expect("json");
    deleting["metadata"]["creationTimestamp"] = "2026-11-28T02:00:00Z".into();
    deleting["metadata"]["deletionTimestamp"] = "2026-11-28T02:59:00Z".into();
    let pods = [
        created(helper_pod("alice", Some("node-a"), "Running"), 600),
        created(helper_pod("bob", None, "Pending"), 180),
        created(helper_pod("carol", Some("node-a"), "Pending"), 30),
        created(user_pod("dave", None, "Pending"), 600),
        serde_json::from_value(deleting).expect("record"),
    ];
    let refs: Vec<&PodRecord> = pods.iter().collect();
    let (stuck, next) = stuck_helpers(&refs, now, SignedDuration::from_mins(2));
    let names: Vec<&str> = stuck.iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        ["vjh-backup-claim-bob"],
        "not Running, Pending for 30 s, a user pod, or one going away"
    );
    assert_eq!(
        next,
        Some(now + SignedDuration::from_secs(90)),
        "carol's turns due in 90 s"
    );
}

/// A helper stuck terminating (its node is gone: the kubelet never
/// confirms) was deleted again every pass, for ever. Once being deleted it is left to
/// the cluster: no DELETE is planned for it, whatever would have been the reason.
#[test]
fn a_helper_already_being_deleted_is_not_deleted_again() {
    let terminating = |mut pod: Pod| {
        pod.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-28T02:59:00Z".parse().expect("time"),
            ));
        pod
    };
    let mut other = terminating(helper_pod("alice", Some("node-a"), "Running"));
    other.metadata.name = Some("old-helper-alice".to_owned());
    other.metadata.uid = Some("uid-old".to_owned());
    for (name, pods, claims, window, delete) in [
        (
            "window closed",
            vec![terminating(helper_pod("alice", Some("node-a"), "Running"))],
            vec!["alice"],
            false,
            vec![],
        ),
        (
            "its user started elsewhere",
            vec![
                terminating(helper_pod("alice", Some("node-a"), "Running")),
                user_pod("alice", Some("node-b"), "Running"),
            ],
            vec!["alice"],
            true,
            vec![],
        ),
        (
            "a duplicate already going, ours kept",
            vec![other, helper_pod("alice", Some("node-a"), "Running")],
            vec!["alice"],
            true,
            vec![],
        ),
        (
            "the one being deleted does not shield the other from its own reason",
            vec![
                terminating(helper_pod("bob", Some("node-a"), "Running")),
                helper_pod("alice", Some("node-a"), "Running"),
            ],
            vec!["alice", "bob"],
            false,
            vec![("vjh-backup-claim-alice", DeleteReason::WindowClosed)],
        ),
    ] {
        run(&Case {
            name,
            pods,
            claims,
            window,
            pvbs: vec![],
            create: vec![],
            delete,
            backfill: vec![],
            then_create: vec![],
        });
    }
}

#[test]
fn a_helper_left_in_a_namespace_that_opted_out_goes() {
    // The helper's namespace is not among the opted-in ones any more (label removed).
    let helper = record(&helper_pod("alice", Some("node-a"), "Running"));
    let user = record(&user_pod("bob", Some("node-a"), "Running"));
    let pods = [&helper, &user];
    let windows = BTreeMap::from([(NS.to_owned(), NamespaceWindow::default())]);
    let options = options();
    let got = plan(&PlanInput {
        namespaces: &[],
        claims: &[],
        pods: &pods,
        windows: &windows,
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    });
    let deleted: Vec<(&str, &str, DeleteReason)> = got
        .delete
        .iter()
        .map(|d| (d.name.as_str(), d.claim.as_str(), d.reason))
        .collect();
    assert_eq!(
        deleted,
        [(
            "vjh-backup-claim-alice",
            "claim-alice",
            DeleteReason::NamespaceNotOptedIn
        )],
        "the user's own pod is not touched"
    );
    assert!(got.create.is_empty() && got.backfill.is_empty());
}

#[test]
fn a_helper_made_for_another_window_gets_the_labels_this_one_selects() {
    // Created in a window whose Schedule selects nothing; now a Schedule selecting
    // backup=homes opens.
    let claim = "claim-alice";
    let claim_ref = ClaimRef {
        namespace: NS,
        name: claim,
        uid: "uid-claim-alice",
        username: Some("alice"),
    };
    let mut bare = helper::backup_helper(&claim_ref, helper::own_labels(Some("alice")), &options());
    bare.metadata.uid = Some("uid-helper-alice".to_owned());
    bare.status = Some(serde_json::from_value(json!({"phase": "Running"})).expect("status"));
    let helper = record(&bare);
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let claims = [ClaimView {
        namespace: NS,
        name: claim,
        uid: "uid-claim-alice",
        bound: true,
        username: Some("alice"),
        exclusive: false,
    }];
    let windows = BTreeMap::from([(
        NS.to_owned(),
        NamespaceWindow {
            schedules: vec!["homes".to_owned()],
            backups: vec![],
            labels: BTreeMap::from([("backup".to_owned(), "homes".to_owned())]),
        },
    )]);
    let options = options();
    let input = PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &[&helper],
        windows: &windows,
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    };
    let got = plan(&input);
    assert!(got.create.is_empty() && got.delete.is_empty(), "{got:?}");
    assert_eq!(got.relabel.len(), 1);
    assert_eq!(got.relabel[0].uid, "uid-helper-alice");
    assert_eq!(
        got.relabel[0].labels,
        BTreeMap::from([("backup".to_owned(), "homes".to_owned())])
    );
    // Labelled: nothing more to do.
    let mut labelled = bare.clone();
    labelled
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("backup".to_owned(), "homes".to_owned());
    let labelled = record(&labelled);
    assert!(
        plan(&PlanInput {
            pods: &[&labelled],
            ..input
        })
        .is_empty()
    );
}

/// A claim the open window's Schedules copy without a pod (`datapath::without_pod`: the
/// data mover, or a volume Velero never copies) gets no helper; the others still do.
#[test]
fn claims_copied_without_a_pod_get_no_helper() {
    use velero_jupyterhub_policy::datapath::{self, DataPath, PvFacts, Skip, VolumeFacts};
    use velero_jupyterhub_policy::velero::{BackupTemplate, PolicyRef};
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let view = |name: &'static str, uid: &'static str| ClaimView {
        namespace: NS,
        name,
        uid,
        bound: true,
        username: None,
        exclusive: false,
    };
    let claims = [
        view("claim-csi", "uid-1"),
        view("claim-hostpath", "uid-2"),
        view("claim-local", "uid-3"),
    ];
    let facts = |name: &str| VolumeFacts {
        pv: Some(match name {
            "claim-csi" => PvFacts {
                csi: Some(("hostpath.csi.k8s.io", None)),
                volume_type: Some("csi"),
                ..Default::default()
            },
            "claim-hostpath" => PvFacts {
                volume_type: Some("hostPath"),
                ..Default::default()
            },
            _ => PvFacts {
                volume_type: Some("local"),
                ..Default::default()
            },
        }),
        ..Default::default()
    };
    let mover = BackupTemplate {
        snapshot_move_data: Some(true),
        ..Default::default()
    };
    let plain = BackupTemplate::default();
    let with_policies = BackupTemplate {
        snapshot_move_data: Some(true),
        resource_policy: Some(PolicyRef {
            kind: "configmap".to_owned(),
            name: "homes".to_owned(),
        }),
        ..Default::default()
    };
    // (Schedules open, a manual window too, the claims without a helper and why)
    type Row<'a> = (
        Vec<(&'a str, &'a BackupTemplate)>,
        bool,
        Vec<(&'a str, DataPath)>,
    );
    let rows: Vec<Row<'_>> = vec![
        // The data mover is not counted on (our annotated pods make it a file-system
        // backup anyway); a hostPath volume Velero never copies.
        (
            vec![("movers", &mover)],
            false,
            vec![("claim-hostpath", DataPath::Skipped(Skip::HostPath))],
        ),
        (
            vec![("plain", &plain)],
            false,
            vec![("claim-hostpath", DataPath::Skipped(Skip::HostPath))],
        ),
        // Another Schedule copies through pods, or our own window is open: helpers.
        (
            vec![("movers", &mover), ("plain", &plain)],
            false,
            vec![("claim-hostpath", DataPath::Skipped(Skip::HostPath))],
        ),
        (vec![("movers", &mover)], true, vec![]),
        // Policies the controller does not read: helpers, to be safe.
        (vec![("policed", &with_policies)], false, vec![]),
    ];
    let options = options();
    let windows = BTreeMap::from([(
        NS.to_owned(),
        NamespaceWindow {
            schedules: vec!["movers".to_owned()],
            backups: vec![],
            labels: BTreeMap::new(),
        },
    )]);
    for (open, manual, want) in rows {
        let got: Vec<(&str, DataPath)> = claims
            .iter()
            .filter_map(|c| {
                let (_, path) = datapath::without_pod(&open, manual, &facts(c.name))?;
                Some((c.name, path))
            })
            .collect();
        let names: Vec<&str> = open.iter().map(|(n, _)| *n).collect();
        assert_eq!(got, want, "{names:?}, manual {manual}");
        // The plan makes helpers for the others only.
        let without: std::collections::HashSet<(&str, &str)> =
            got.iter().map(|(c, _)| (NS, *c)).collect();
        let plan = plan(&PlanInput {
            namespaces: &namespaces,
            claims: &claims,
            pods: &[],
            windows: &windows,
            pvbs: &[],
            helper: &options,
            restoring: &Default::default(),
            without_pod: &without,
            now: ts(NOW),
            user_pod_grace: GRACE,
        });
        assert_eq!(plan.create.len(), claims.len() - without.len(), "{names:?}");
    }
}

/// A pod that never runs does not cancel a backup silently: while the window's Backup
/// is under way, a claim that no Running pod mounts, held by a pod past the grace period,
/// is named with that pod (and the plan wakes when a young pod's grace ends).
#[test]
fn a_claim_held_by_a_pod_that_never_runs_is_named_while_the_backup_runs() {
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let users = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let uids: Vec<String> = users.iter().map(|u| format!("uid-claim-{u}")).collect();
    let names: Vec<String> = users.iter().map(|u| format!("claim-{u}")).collect();
    let claims: Vec<ClaimView<'_>> = (0..users.len())
        .map(|i| ClaimView {
            namespace: NS,
            name: &names[i],
            uid: &uids[i],
            bound: true,
            username: Some(users[i]),
            exclusive: false,
        })
        .collect();
    let pods = [
        // ann: unscheduled for three minutes (an impossible node selector).
        created(user_pod("ann", None, "Pending"), "2026-11-28T03:02:00Z"),
        // ben: a bad image on node-b, its helper gone.
        created(
            user_pod("ben", Some("node-b"), "Pending"),
            "2026-11-28T02:00:00Z",
        ),
        // cat: just made, not scheduled yet: within the grace period.
        created(user_pod("cat", None, "Pending"), "2026-11-28T03:04:30Z"),
        // dan: stuck, but his helper runs beside him: copied.
        created(
            user_pod("dan", Some("node-a"), "Pending"),
            "2026-11-28T02:00:00Z",
        ),
        helper_pod("dan", Some("node-a"), "Running"),
        // eve: running.
        user_pod("eve", Some("node-a"), "Running"),
        // fay: stuck now, but her helper's copy in this Backup finished before.
        created(user_pod("fay", None, "Pending"), "2026-11-28T02:00:00Z"),
    ];
    let records: Vec<PodRecord> = pods.iter().map(record).collect();
    let pods: Vec<&PodRecord> = records.iter().collect();
    let window = |backups: Vec<String>| {
        BTreeMap::from([(
            NS.to_owned(),
            NamespaceWindow {
                schedules: vec!["daily".to_owned()],
                backups,
                labels: BTreeMap::from([("backup".to_owned(), "homes".to_owned())]),
            },
        )])
    };
    let options = options();
    let under_way = window(vec!["daily-20261128030000".to_owned()]);
    let pvbs = [PvbView {
        backup: "daily-20261128030000",
        pod_namespace: NS,
        pod_uid: "uid-helper-fay",
        claim: Some("claim-fay"),
        phase: Some("Completed"),
    }];
    let input = PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &pods,
        windows: &under_way,
        pvbs: &pvbs,
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    };
    let got = plan(&input);
    let held: Vec<(&str, Vec<(&str, &str)>)> = got
        .held
        .iter()
        .map(|h| {
            assert_eq!(h.backups, ["daily-20261128030000"]);
            (
                h.claim.as_str(),
                h.pods
                    .iter()
                    .map(|(p, s)| (p.as_str(), s.as_str()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            ("claim-ann", vec![("jupyter-ann", "Pending, not scheduled")]),
            ("claim-ben", vec![("jupyter-ben", "Pending on node node-b")]),
        ]
    );
    assert_eq!(
        got.wake,
        Some(ts("2026-11-28T03:06:30Z")),
        "cat's claim is looked at again when her pod's grace ends"
    );
    // Before the tick's Backup exists, nothing is missed yet.
    let before = window(vec![]);
    let got = plan(&PlanInput {
        windows: &before,
        ..input
    });
    assert!(got.held.is_empty(), "{:?}", got.held);
}

/// A helper kept for a young unscheduled pod is looked at again when its grace ends.
#[test]
fn the_plan_wakes_when_a_user_pods_grace_ends() {
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let claims = [ClaimView {
        namespace: NS,
        name: "claim-alice",
        uid: "uid-claim-alice",
        bound: true,
        username: Some("alice"),
        exclusive: false,
    }];
    let pods = [
        helper_pod("alice", Some("node-a"), "Running"),
        created(user_pod("alice", None, "Pending"), "2026-11-28T03:04:00Z"),
    ];
    let records: Vec<PodRecord> = pods.iter().map(record).collect();
    let pods: Vec<&PodRecord> = records.iter().collect();
    let windows = BTreeMap::from([(
        NS.to_owned(),
        NamespaceWindow {
            schedules: vec!["daily".to_owned()],
            backups: vec![],
            labels: BTreeMap::from([("backup".to_owned(), "homes".to_owned())]),
        },
    )]);
    let options = options();
    let got = plan(&PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &pods,
        windows: &windows,
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    });
    assert!(got.delete.is_empty(), "{:?}", got.delete);
    assert_eq!(got.wake, Some(ts("2026-11-28T03:06:00Z")));

    // A ReadWriteOncePod claim: the scheduler keeps alice's pod unscheduled while the
    // helper uses the claim, so the helper goes at once.
    let exclusive = [ClaimView {
        exclusive: true,
        ..claims[0]
    }];
    let got = plan(&PlanInput {
        namespaces: &namespaces,
        claims: &exclusive,
        pods: &pods,
        windows: &windows,
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    });
    let deleted: Vec<(&str, DeleteReason)> = got
        .delete
        .iter()
        .map(|d| (d.name.as_str(), d.reason))
        .collect();
    assert_eq!(
        deleted,
        [("vjh-backup-claim-alice", DeleteReason::UserStarted)]
    );
}

/// A pod that has the helper's name but is not the claim's helper: no helper is made
/// for the claim (its name is taken), and the claim is named with that pod.
#[test]
fn a_pod_with_the_helpers_name_is_reported_not_waited_on() {
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: NS,
        claims: &globs,
    }];
    let claims = [ClaimView {
        namespace: NS,
        name: "claim-alice",
        uid: "uid-claim-alice",
        bound: true,
        username: Some("alice"),
        exclusive: false,
    }];
    // Mallory's pod, named as alice's helper, mounting mallory's own claim.
    let mut squatter = user_pod("mallory", Some("node-a"), "Running");
    squatter.metadata.name = Some("vjh-backup-claim-alice".to_owned());
    let records = [record(&squatter)];
    let pods: Vec<&PodRecord> = records.iter().collect();
    let windows = BTreeMap::from([(
        NS.to_owned(),
        NamespaceWindow {
            schedules: vec!["daily".to_owned()],
            backups: vec![],
            labels: BTreeMap::new(),
        },
    )]);
    let options = options();
    let got = plan(&PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &pods,
        windows: &windows,
        pvbs: &[],
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: ts(NOW),
        user_pod_grace: GRACE,
    });
    assert!(got.create.is_empty(), "{:?}", got.create);
    assert!(
        got.delete.is_empty(),
        "never someone else's pod: {:?}",
        got.delete
    );
    assert_eq!(
        got.squatted,
        [(
            NS.to_owned(),
            "claim-alice".to_owned(),
            "uid-jupyter-mallory".to_owned()
        )]
    );
}
