//! Table tests of which way Velero copies a user claim (`policy::datapath`), following
//! Velero v1.18.1's internal/volumehelper/volume_policy_helper.go and
//! internal/resourcepolicies/ (cited per row), on Velero's own resource policies example
//! (tests/fixtures/velero-resource-policies.example.yaml).

use std::collections::BTreeMap;

use serde_json::json;
use testkit::fixtures;
use velero_jupyterhub_policy::datapath::{
    BackupSettings, DataPath, PoliciesError, PvFacts, ResourcePolicies, Skip, VolumeFacts,
    data_path, quantity_bytes, schedules_path,
};

const GI: u128 = 1 << 30;

fn example() -> ResourcePolicies {
    let docs = fixtures::yaml_docs("velero-resource-policies.example.yaml");
    ResourcePolicies::parse(docs[0].clone()).expect("Velero's own example is valid")
}

fn csi(driver: &'static str, class: &'static str, size: u128) -> PvFacts<'static> {
    PvFacts {
        capacity: Some(size),
        storage_class: Some(class),
        csi: Some((driver, None)),
        nfs: None,
        volume_type: Some("csi"),
    }
}

fn bound(pv: PvFacts<'static>) -> VolumeFacts<'static> {
    VolumeFacts {
        pvc_labels: None,
        pvc_phase: Some("Bound"),
        pv: Some(pv),
    }
}

#[test]
fn velero_resource_policies_example_decides_as_velero_does() {
    let policies = example();
    let with = |move_data: bool| BackupSettings {
        snapshot_volumes: None,
        snapshot_move_data: move_data,
        policies: Some(&policies),
    };
    let nfs = PvFacts {
        capacity: Some(GI),
        nfs: Some(("192.168.200.90", "/homes")),
        volume_type: Some("nfs"),
        ..Default::default()
    };
    let other_nfs = PvFacts {
        nfs: Some(("10.0.0.1", "/homes")),
        ..nfs
    };
    let rbd = PvFacts {
        capacity: Some(GI),
        volume_type: Some("rbd"),
        ..Default::default()
    };
    let host_path = PvFacts {
        volume_type: Some("hostPath"),
        ..Default::default()
    };
    let pending = VolumeFacts {
        pvc_phase: Some("Pending"),
        ..bound(csi("ebs.csi.aws.com", "gp2", 20 * GI))
    };
    let nfs_data = PvFacts {
        nfs: Some(("192.168.200.90", "/mnt/data")),
        ..nfs
    };
    // (what, volume, data mover on, path); the example's policies, numbered from 0:
    // 0 skip (ebs gp2/standard 10–100Gi, Pending), 1 skip (≤100Gi nfs 192.168.200.90
    // /mnt/data), 2 fs-backup (nfs 192.168.200.90), 3 skip (any nfs), 4 snapshot (any csi),
    // 5 skip (volume types).
    let rows: Vec<(&str, VolumeFacts<'_>, bool, DataPath)> = vec![
        // Policy 0 needs every condition, the claim's phase Pending among them
        // (volume_resources.go `match`: all conditions of a policy).
        (
            "ebs gp2 20Gi, Pending: policy 0 skips",
            pending,
            false,
            DataPath::Skipped(Skip::Policy { policy: 0 }),
        ),
        // Bound, so policy 0 does not match; policy 4 (`csi: {}`) snapshots it: a
        // `snapshot` action wins over the pod annotation (ShouldPerformFSBackup returns
        // false for any action but fs-backup).
        (
            "ebs gp2 20Gi, Bound: policy 4 snapshots",
            bound(csi("ebs.csi.aws.com", "gp2", 20 * GI)),
            false,
            DataPath::CsiSnapshot,
        ),
        (
            "…and with snapshotMoveData the snapshot's data moves",
            bound(csi("ebs.csi.aws.com", "gp2", 20 * GI)),
            true,
            DataPath::DataMover,
        ),
        (
            "nfs of that server, /mnt/data: policy 1 skips",
            bound(nfs_data),
            false,
            DataPath::Skipped(Skip::Policy { policy: 1 }),
        ),
        (
            "nfs of that server, another path: policy 2, fs-backup",
            bound(nfs),
            false,
            DataPath::FsBackup,
        ),
        (
            "another nfs server: policy 3 skips any nfs",
            bound(other_nfs),
            false,
            DataPath::Skipped(Skip::Policy { policy: 3 }),
        ),
        // Policy 5 lists cinder, emptyDir, …: not rbd; no match, the annotation decides.
        (
            "rbd: no match, fs-backup",
            bound(rbd),
            false,
            DataPath::FsBackup,
        ),
        // pkg/podvolume/backupper.go `isHostPathVolume`: never through a pod.
        (
            "hostPath: skipped",
            bound(host_path),
            false,
            DataPath::Skipped(Skip::HostPath),
        ),
    ];
    for (what, volume, move_data, want) in rows {
        assert_eq!(data_path(&with(move_data), &volume), want, "{what}");
        assert_eq!(
            data_path(&with(move_data), &volume).needs_pod(),
            want == DataPath::FsBackup
        );
    }
}

/// Without policies the pod annotation decides, and our pods carry it: a file-system
/// backup, `snapshotMoveData` or not (ShouldPerformSnapshot skips a claim a pod's
/// annotation selects), except for a hostPath volume.
#[test]
fn without_policies_our_annotated_pods_copy_every_claim_but_host_paths() {
    let settings = |snapshot_volumes, snapshot_move_data| BackupSettings {
        snapshot_volumes,
        snapshot_move_data,
        policies: None,
    };
    let volume = bound(csi("hostpath.csi.k8s.io", "csi-hostpath-sc", GI));
    let host_path = bound(PvFacts {
        volume_type: Some("hostPath"),
        ..Default::default()
    });
    // (snapshotVolumes, snapshotMoveData, volume, path)
    let rows = [
        (None, false, volume, DataPath::FsBackup),
        (Some(true), false, volume, DataPath::FsBackup),
        (None, true, volume, DataPath::FsBackup),
        (Some(false), true, volume, DataPath::FsBackup),
        (None, true, host_path, DataPath::Skipped(Skip::HostPath)),
    ];
    for (snapshot_volumes, move_data, volume, want) in rows {
        assert_eq!(
            data_path(&settings(snapshot_volumes, move_data), &volume),
            want,
            "snapshotVolumes {snapshot_volumes:?}, snapshotMoveData {move_data}"
        );
    }
}

#[test]
fn conditions_match_as_velero_matches_them() {
    let labels: BTreeMap<String, String> = [("tier".to_owned(), "scratch".to_owned())].into();
    let attrs: BTreeMap<String, String> = [("type".to_owned(), "fast".to_owned())].into();
    let volume = VolumeFacts {
        pvc_labels: Some(&labels),
        pvc_phase: Some("Bound"),
        pv: Some(PvFacts {
            capacity: Some(5 * GI),
            storage_class: Some("standard"),
            csi: Some(("disk.csi.example.com", Some(&attrs))),
            nfs: None,
            volume_type: Some("csi"),
        }),
    };
    // (conditions, matches)
    let rows = [
        (json!({"capacity": "1Gi,10Gi"}), true),
        (json!({"capacity": "5Gi,5Gi"}), true),
        (json!({"capacity": "6Gi,"}), false),
        (json!({"capacity": ",4Gi"}), false),
        (json!({"capacity": "1Gi,"}), true),
        (json!({"capacity": ""}), true),
        (json!({"storageClass": ["gp2", "standard"]}), true),
        (json!({"storageClass": ["gp2"]}), false),
        (json!({"csi": {}}), true),
        (json!({"csi": {"driver": "disk.csi.example.com"}}), true),
        (json!({"csi": {"driver": "other"}}), false),
        (
            json!({"csi": {"driver": "disk.csi.example.com", "volumeAttributes": {"type": "fast"}}}),
            true,
        ),
        (
            json!({"csi": {"driver": "disk.csi.example.com", "volumeAttributes": {"type": "slow"}}}),
            false,
        ),
        (json!({"nfs": {}}), false),
        (json!({"volumeTypes": ["csi"]}), true),
        // Case matters: Velero compares `vt == s.volumeType`.
        (json!({"volumeTypes": ["CSI"]}), false),
        (json!({"pvcLabels": {"tier": "scratch"}}), true),
        (json!({"pvcLabels": {"tier": "home"}}), false),
        (json!({"pvcPhase": ["Bound"]}), true),
        (json!({"pvcPhase": ["Pending", "Lost"]}), false),
        // Every condition of a policy must match.
        (
            json!({"storageClass": ["standard"], "pvcLabels": {"tier": "home"}}),
            false,
        ),
        (json!({}), true),
        // Empty lists are no condition (Velero: `len(...) == 0` matches).
        (json!({"storageClass": []}), true),
        (json!({"volumeTypes": []}), true),
        // A missing attribute reads as "" (a Go map's zero value).
        (
            json!({"csi": {"driver": "disk.csi.example.com", "volumeAttributes": {"zone": ""}}}),
            true,
        ),
    ];
    for (conditions, matches) in rows {
        let policies = ResourcePolicies::parse(json!({
            "version": "v1",
            "volumePolicies": [{"conditions": conditions, "action": {"type": "skip"}}]
        }))
        .expect("valid");
        let settings = BackupSettings {
            policies: Some(&policies),
            ..Default::default()
        };
        let got = data_path(&settings, &volume);
        assert_eq!(
            got == DataPath::Skipped(Skip::Policy { policy: 0 }),
            matches,
            "{conditions}: {got:?}"
        );
    }
}

#[test]
fn the_first_matching_policy_wins() {
    let policies = ResourcePolicies::parse(json!({
        "version": "v1",
        "volumePolicies": [
            {"conditions": {"storageClass": ["other"]}, "action": {"type": "skip"}},
            {"conditions": {"csi": {}}, "action": {"type": "fs-backup"}},
            {"conditions": {"csi": {}}, "action": {"type": "skip"}},
        ]
    }))
    .expect("valid");
    let settings = BackupSettings {
        snapshot_move_data: true,
        policies: Some(&policies),
        ..Default::default()
    };
    // fs-backup by policy 2, even with the data mover on: the operator asked for a pod
    // copy of these volumes.
    assert_eq!(
        data_path(&settings, &bound(csi("d", "standard", GI))),
        DataPath::FsBackup
    );
}

#[test]
fn documents_velero_refuses_are_errors_that_say_why() {
    let parse = |v: serde_json::Value| ResourcePolicies::parse(v).err();
    assert_eq!(
        parse(json!({"version": "v2", "volumePolicies": []})),
        Some(PoliciesError::Version("v2".to_owned()))
    );
    assert_eq!(
        parse(json!({"version": "v1", "volumePolicies": [{"action": {"type": "delete"}}]})),
        Some(PoliciesError::Action {
            policy: 1,
            kind: "delete".to_owned()
        })
    );
    assert!(matches!(
        parse(json!({"version": "v1", "volumePolicies": [
            {"conditions": {"capacity": "5Gi"}, "action": {"type": "skip"}}]})),
        Some(PoliciesError::Capacity { policy: 1, .. })
    ));
    assert!(matches!(
        parse(json!({"version": "v1", "volumePolicies": [
            {"conditions": {"capacity": "10Gi,1Gi"}, "action": {"type": "skip"}}]})),
        Some(PoliciesError::Capacity { policy: 1, .. })
    ));
    assert_eq!(
        parse(json!({"version": "v1", "volumePolicies": [
            {"conditions": {"csi": {"volumeAttributes": {"a": "b"}}}, "action": {"type": "skip"}}]})),
        Some(PoliciesError::CsiWithoutDriver { policy: 1 })
    );
    // `conditions:` left empty is no condition.
    assert_eq!(
        parse(json!({"version": "v1", "volumePolicies": [
            {"conditions": null, "action": {"type": "skip"}}]})),
        None
    );
    // Unknown fields are errors, as Velero decodes with KnownFields(true).
    for doc in [
        json!({"version": "v1", "volumePolicy": []}),
        json!({"version": "v1", "volumePolicies": [
            {"conditions": {"storageclass": ["x"]}, "action": {"type": "skip"}}]}),
    ] {
        assert!(
            matches!(parse(doc.clone()), Some(PoliciesError::Parse(_))),
            "{doc}"
        );
    }
}

#[test]
fn quantities_are_read_as_kubernetes_reads_them() {
    let rows = [
        ("10Gi", Some(10 * GI)),
        ("1.5Gi", Some(3 * GI / 2)),
        ("500M", Some(500_000_000)),
        ("1e3", Some(1000)),
        ("100", Some(100)),
        ("1500m", Some(2)),
        ("Gi", None),
        ("10GB", None),
        ("-1Gi", None),
        ("", None),
    ];
    for (q, want) in rows {
        assert_eq!(quantity_bytes(q), want, "{q}");
    }
}

#[test]
fn what_status_says_names_the_policy_and_its_configmap() {
    let p = DataPath::Skipped(Skip::Policy { policy: 1 });
    assert_eq!(
        p.describe(Some("velero/homes-policy")),
        "skipped by volume policy 2 of ConfigMap velero/homes-policy"
    );
    assert!(DataPath::CsiSnapshot.describe(None).contains("stays"));
}

#[test]
fn a_claim_needs_a_pod_if_any_schedule_copies_it_through_one() {
    let skip_all = ResourcePolicies::parse(json!({
        "version": "v1",
        "volumePolicies": [{"conditions": {}, "action": {"type": "skip"}}]
    }))
    .expect("valid");
    let mover = BackupSettings {
        snapshot_move_data: true,
        ..Default::default()
    };
    let host_path = VolumeFacts {
        pv: Some(PvFacts {
            volume_type: Some("hostPath"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let skipping = BackupSettings {
        policies: Some(&skip_all),
        ..Default::default()
    };
    let volume = bound(csi("d", "standard", GI));
    // (Schedules, the way reported)
    type Schedules<'a> = Vec<(&'a str, BackupSettings<'a>)>;
    let rows: Vec<(Schedules<'_>, Option<(&str, DataPath)>)> = vec![
        (vec![], None),
        (vec![("plain", BackupSettings::default())], None),
        // Our annotated pods copy it even where the data mover is on.
        (vec![("movers", mover)], None),
        (vec![("movers", mover), ("skips", skipping)], None),
        (
            vec![("skips", skipping)],
            Some(("skips", DataPath::Skipped(Skip::Policy { policy: 0 }))),
        ),
    ];
    for (schedules, want) in rows {
        let names: Vec<&str> = schedules.iter().map(|(n, _)| *n).collect();
        assert_eq!(schedules_path(&schedules, &volume), want, "{names:?}");
    }
    assert_eq!(
        schedules_path(&[("movers", mover)], &host_path),
        Some(("movers", DataPath::Skipped(Skip::HostPath)))
    );
}
