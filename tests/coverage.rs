//! Table tests of `policy::coverage` (the `backup` command's decisions) on real object
//! shapes: the z2jh user pod and our helper pod read as the watch reads them
//! (`PodRecord`), and PodVolumeBackups as Velero writes them
//! (tests/fixtures/velero-pvb-pvr.example.yaml, pkg/podvolume/backupper.go).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use testkit::fixtures;
use velero_jupyterhub::cluster::velero::PodVolumeBackup;
use velero_jupyterhub::policy::coverage::{
    ClaimState, Holder, Outcome, PvbFacts, claim_states, outcomes, progress,
};
use velero_jupyterhub::policy::helper::{self, ClaimRef};
use velero_jupyterhub::policy::plan::ClaimView;
use velero_jupyterhub::policy::{ClaimGlobs, PodRecord};

const NS: &str = "jhub";

fn record(v: Value) -> PodRecord {
    fixtures::record(&v)
}

fn user_pod(user: &str, phase: &str) -> PodRecord {
    let mut pod = fixtures::z2jh_pod();
    pod["metadata"]["name"] = format!("jupyter-{user}").into();
    pod["metadata"]["namespace"] = NS.into();
    pod["spec"]["volumes"][0] = json!({"name": format!("volume-{user}"), "persistentVolumeClaim": {"claimName": format!("claim-{user}")}});
    pod["status"] = json!({"phase": phase});
    record(pod)
}

fn helper_pod(user: &str, phase: Option<&str>) -> PodRecord {
    let claim = format!("claim-{user}");
    let uid = format!("uid-{claim}");
    let claim_ref = ClaimRef {
        namespace: NS,
        name: &claim,
        uid: &uid,
        username: Some(user),
    };
    let options = fixtures::helper_options();
    let pod = helper::backup_helper(&claim_ref, helper::own_labels(Some(user)), &options);
    let mut v = serde_json::to_value(&pod).expect("json");
    if let Some(phase) = phase {
        v["status"] = json!({"phase": phase});
    }
    record(v)
}

/// The fixture's PodVolumeBackup, for `claim` through `pod`, ended in `phase`.
fn pvb(claim: &str, pod: &str, phase: &str, bytes: i64) -> PodVolumeBackup {
    let mut v = fixtures::yaml_docs("velero-pvb-pvr.example.yaml")
        .into_iter()
        .find(|d| d["kind"] == "PodVolumeBackup")
        .expect("a PodVolumeBackup in the fixture");
    v["metadata"]["name"] = format!("b-{claim}").into();
    v["metadata"]["labels"]["velero.io/pvc-uid"] = format!("uid-{claim}").into();
    v["metadata"]["annotations"]["velero.io/pvc-name"] = claim.into();
    v["spec"]["pod"]["name"] = pod.into();
    v["status"]["phase"] = phase.into();
    v["status"]["progress"] = json!({"totalBytes": bytes, "bytesDone": bytes});
    if phase == "Failed" {
        v["status"]["message"] = "data path backup failed: no space left".into();
    }
    serde_json::from_value(v).expect("pvb")
}

fn claims(bound: &[(&'static str, bool)]) -> Vec<(String, String, bool)> {
    bound
        .iter()
        .map(|(c, b)| ((*c).to_owned(), format!("uid-{c}"), *b))
        .collect()
}

fn states(claims: &[(String, String, bool)], pods: &[PodRecord]) -> Vec<ClaimState> {
    let views: Vec<ClaimView<'_>> = claims
        .iter()
        .map(|(name, uid, bound)| ClaimView {
            namespace: NS,
            name,
            uid,
            bound: *bound,
            username: None,
            exclusive: false,
        })
        .collect();
    let refs: Vec<&PodRecord> = pods.iter().collect();
    claim_states(&ClaimGlobs::parse("claim-*").expect("globs"), &views, &refs)
}

#[test]
fn who_holds_each_user_claim_and_what_is_awaited() {
    let claims = claims(&[
        ("claim-alice", true),
        ("claim-bob", true),
        ("claim-carol", true),
        ("claim-dave", false),
        ("claim-erin", true),
        ("data-shared", true),
    ]);
    let pods = vec![
        helper_pod("alice", Some("Running")),
        helper_pod("bob", None),
        // Carol started her server while her helper was still there: she holds it.
        helper_pod("carol", Some("Running")),
        user_pod("carol", "Running"),
    ];
    let got = states(&claims, &pods);
    let summary: Vec<(&str, bool, Option<String>)> = got
        .iter()
        .map(|s| (s.claim.as_str(), s.ready(), s.waiting_for()))
        .collect();
    assert_eq!(
        summary,
        [
            ("claim-alice", true, None),
            (
                "claim-bob",
                false,
                Some("vjh-backup-claim-bob to run (it is not scheduled)".to_owned())
            ),
            ("claim-carol", true, None),
            ("claim-dave", true, None),
            ("claim-erin", false, Some("a backup helper".to_owned())),
        ],
        "data-shared matches no glob"
    );
    assert_eq!(
        got[2].holder,
        Holder::Pod {
            name: "jupyter-carol".to_owned(),
            helper: false,
            phase: Some("Running".to_owned())
        },
        "the user's pod wins over the helper"
    );
    assert_eq!(got[3].holder, Holder::NotBound);
}

#[test]
fn each_user_claim_gets_an_outcome_and_a_reason() {
    let claims = claims(&[
        ("claim-alice", true),
        ("claim-bob", true),
        ("claim-carol", true),
        ("claim-dave", false),
        ("claim-erin", true),
        ("claim-frank", true),
    ]);
    let pods = vec![
        helper_pod("alice", Some("Running")),
        helper_pod("bob", Some("Running")),
        user_pod("carol", "Running"),
        helper_pod("erin", Some("Pending")),
        helper_pod("frank", Some("Running")),
    ];
    let states = states(&claims, &pods);
    let pvbs = [
        pvb(
            "claim-alice",
            "vjh-backup-claim-alice",
            "Completed",
            1 << 20,
        ),
        pvb("claim-bob", "vjh-backup-claim-bob", "Failed", 0),
        pvb("claim-carol", "jupyter-carol", "Completed", 3 << 30),
    ];
    let facts: Vec<PvbFacts<'_>> = pvbs.iter().map(PodVolumeBackup::facts).collect();
    let got = outcomes(&states, "PartiallyFailed", &facts);
    let backed = |pod: &str, bytes: i64| Outcome::BackedUp {
        from: format!("pod {pod}"),
        bytes: Some(bytes),
    };
    assert_eq!(
        got[0],
        (
            "claim-alice".to_owned(),
            backed("vjh-backup-claim-alice", 1 << 20)
        )
    );
    assert_eq!(
        got[2],
        ("claim-carol".to_owned(), backed("jupyter-carol", 3 << 30))
    );
    let reason = |i: usize| match &got[i].1 {
        Outcome::NotBackedUp { reason } => reason.clone(),
        other => panic!("{}: {other:?}", got[i].0),
    };
    assert!(
        reason(1).contains("Failed: data path backup failed"),
        "{}",
        reason(1)
    );
    assert!(reason(3).contains("not Bound"), "{}", reason(3));
    assert!(
        reason(4).contains("vjh-backup-claim-erin was Pending")
            && reason(4).contains("Running pods only"),
        "{}",
        reason(4)
    );
    assert!(
        reason(5).contains("no PodVolumeBackup")
            && reason(5).contains("backup.velero.io/backup-volumes"),
        "{}",
        reason(5)
    );
    assert_eq!(got.len(), 6);
    assert_eq!(progress(&facts), (3, 3, (1 << 20) + (3 << 30)));
}

#[test]
fn a_volume_backup_is_matched_by_claim_uid_then_by_claim_name() {
    let claims = claims(&[("claim-alice", true)]);
    let states = states(&claims, &[helper_pod("alice", Some("Running"))]);
    // Another namespace's claim of the same name (another uid): not ours.
    let mut other = pvb("claim-alice", "elsewhere", "Completed", 5);
    other
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("velero.io/pvc-uid".to_owned(), "uid-of-another".to_owned());
    let facts = [other.facts()];
    assert!(matches!(
        outcomes(&states, "Completed", &facts)[0].1,
        Outcome::NotBackedUp { .. }
    ));
    // Without the uid label, the pvc-name annotation decides.
    let mut named = pvb("claim-alice", "vjh-backup-claim-alice", "Completed", 5);
    named.metadata.labels = None;
    let facts = [named.facts()];
    assert!(matches!(
        outcomes(&states, "Completed", &facts)[0].1,
        Outcome::BackedUp { .. }
    ));
}

#[test]
fn nothing_counts_as_backed_up_in_a_backup_velero_will_not_restore_from() {
    let claims = claims(&[("claim-alice", true)]);
    let states = states(&claims, &[helper_pod("alice", Some("Running"))]);
    let pvbs = [pvb("claim-alice", "vjh-backup-claim-alice", "Completed", 5)];
    let facts: Vec<PvbFacts<'_>> = pvbs.iter().map(PodVolumeBackup::facts).collect();
    for phase in ["Failed", "FailedValidation", "Deleting"] {
        match &outcomes(&states, phase, &facts)[0].1 {
            Outcome::NotBackedUp { reason } => {
                assert!(
                    reason.contains(phase) && reason.contains("restores nothing"),
                    "{reason}"
                )
            }
            other => panic!("{phase}: {other:?}"),
        }
    }
}

/// A claim the CSI data mover copied (a Completed DataUpload of the Backup, as
/// pkg/backup/actions/csi/pvc_action.go `newDataUpload` makes it: labelled
/// `velero.io/backup-name` and `velero.io/pvc-uid`, `spec.sourcePVC`) is backed up, from
/// the data mover; one whose DataUpload failed says so.
#[test]
fn the_data_movers_copies_count_as_backed_up() {
    use velero_jupyterhub::cluster::velero::DataUpload;
    let claims = claims(&[("claim-alice", true), ("claim-bob", true)]);
    let states = states(&claims, &[]);
    let upload = |claim: &str, phase: &str, message: Option<&str>| -> DataUpload {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
            "metadata": {"name": format!("nightly-{claim}-x7k2p"), "namespace": "velero",
                         "labels": {"velero.io/backup-name": "nightly",
                                    "velero.io/pvc-uid": format!("uid-{claim}")}},
            "spec": {"snapshotType": "CSI", "sourcePVC": claim, "sourceNamespace": "jhub",
                     "backupStorageLocation": "default", "operationTimeout": "10m0s",
                     "csiSnapshot": {"volumeSnapshot": "velero-x", "storageClass": "csi-hostpath"}},
            "status": {"phase": phase, "message": message,
                       "progress": {"totalBytes": 8192, "bytesDone": 8192}},
        }))
        .expect("DataUpload")
    };
    let uploads = [
        upload("claim-alice", "Completed", None),
        upload("claim-bob", "Failed", Some("snapshot not ready")),
    ];
    let facts: Vec<_> = uploads.iter().map(DataUpload::facts).collect();
    let got = outcomes(&states, "Completed", &facts);
    assert_eq!(
        got[0].1,
        Outcome::BackedUp {
            from: "the CSI data mover (DataUpload nightly-claim-alice-x7k2p)".to_owned(),
            bytes: Some(8192)
        }
    );
    match &got[1].1 {
        Outcome::NotBackedUp { reason } => assert!(
            reason.contains("DataUpload nightly-claim-bob-x7k2p of the CSI data mover ended Failed: snapshot not ready"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
}
