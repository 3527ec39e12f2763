//! `velero-jupyterhub status` against the real API server, run as a user holding only
//! manifests/status-role.yaml: live, idle, helper-held, restoring, fresh, stale and
//! never-backed-up claims, in a table and in JSON, with exit code 2 while any is stale.

use k8s_openapi::jiff::{Timestamp, ToSpan};
use kube::api::PostParams;
use serde_json::{Value, json};
use testkit::cluster::{self, eventually, unique};
use testkit::controller::{Setup, pod_volume_backup_at, restricted_user_pod, set_status};
use velero_jupyterhub::names;
use velero_jupyterhub::policy::helper::{self, ClaimRef};

async fn run_status(kubeconfig: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_velero-jupyterhub"))
        .arg("status")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .expect("status ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("{stderr}\n{stdout}");
    (output.status.code(), stdout, stderr)
}

/// The operator: a user bound to the status ClusterRole only; their name and kubeconfig.
async fn status_operator(client: &kube::Client) -> (String, tempfile::NamedTempFile) {
    let operator = unique("operator");
    cluster::apply_dynamic(client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": operator},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "velero-jupyterhub-status"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": operator}],
    })).await;
    let kubeconfig = cluster::kubeconfig_as(&operator);
    (operator, kubeconfig)
}

/// The table row of `claim` (its third column).
fn row(stdout: &str, claim: &str) -> String {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(claim))
        .unwrap_or_else(|| panic!("no row for {claim}:\n{stdout}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_each_user_claim_and_fails_while_one_is_stale() {
    let mut setup = Setup::new().await;
    // No controller: it would delete a backup helper outside a backup window at once.
    for r in &setup.controllers {
        r.stop.cancel();
    }
    let client = setup.client.clone();
    let ns = setup.users.clone();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        cluster::bound_claim(&client, &ns, &format!("claim-{user}"), user).await;
    }
    // Backups: one that can be restored from, one that failed.
    let (daily, failed) = (unique("daily"), unique("failed"));
    for (name, phase) in [(&daily, "Completed"), (&failed, "Failed")] {
        cluster::apply_dynamic(
            &client,
            &json!({"apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": setup.velero},
            "spec": {"includedNamespaces": [ns]}}),
        )
        .await;
        set_status(&setup, "backups", name, json!({"phase": phase})).await;
    }
    let now = Timestamp::now();
    pod_volume_backup_at(
        &setup,
        &daily,
        "jupyter-alice",
        "volume-alice",
        "claim-alice",
        now - 2.hours(),
    )
    .await;
    pod_volume_backup_at(
        &setup,
        &daily,
        "vjh-backup-claim-bob",
        "data",
        "claim-bob",
        now - 3.hours(),
    )
    .await;
    pod_volume_backup_at(
        &setup,
        &daily,
        "vjh-backup-claim-dave",
        "data",
        "claim-dave",
        now - 30.hours(),
    )
    .await;
    pod_volume_backup_at(
        &setup,
        &failed,
        "vjh-backup-claim-frank",
        "data",
        "claim-frank",
        now - 1.hours(),
    )
    .await;

    // Holders now: alice's server runs; a backup helper holds dave's claim; a restore
    // helper (Velero's) erin's.
    let pods = setup.pods();
    pods.create(&PostParams::default(), &restricted_user_pod("alice"))
        .await
        .expect("alice");
    cluster::bind(&pods, "jupyter-alice", &setup.nodes[0]).await;
    cluster::set_phase(&pods, "jupyter-alice", "Running").await;
    // Owned by the real claim (the garbage collector deletes a pod whose owner is gone).
    let claims: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(client.clone(), &ns);
    let uid = claims
        .get("claim-dave")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let claim = ClaimRef {
        namespace: &ns,
        name: "claim-dave",
        uid: &uid,
        username: Some("dave"),
    };
    let dave = helper::backup_helper(
        &claim,
        helper::own_labels(Some("dave")),
        &setup.config.helper,
    );
    pods.create(&PostParams::default(), &dave)
        .await
        .expect("dave's helper");
    let mut erin = serde_json::to_value(restricted_user_pod("erin")).unwrap();
    erin["metadata"]["labels"] = json!({(names::MANAGED_BY): names::MANAGED_BY_US,
        (names::COMPONENT): names::RESTORE_HELPER, (names::VELERO_RESTORE_NAME): "r1",
        (names::JUPYTERHUB_USERNAME): "erin"});
    cluster::velero_pods(&client, &ns)
        .await
        .create(&PostParams::default(), &cluster::from_json(erin))
        .await
        .expect("erin's restore helper");

    // The operator: a user bound to the status ClusterRole only.
    let (_, kubeconfig) = status_operator(&client).await;
    let velero = setup.velero.clone();
    let base = [
        "--velero-namespace",
        velero.as_str(),
        "--stale-after",
        "26h",
    ];

    let (code, stdout, stderr) = run_status(
        kubeconfig.path(),
        &[&base[..], &["--namespace", &ns]].concat(),
    )
    .await;
    assert_eq!(code, Some(2), "exit 2: stale claims\n{stderr}");
    let row = |claim: &str| row(&stdout, claim);
    for (claim, state, backup, stale) in [
        ("claim-alice", "live", Some(daily.as_str()), false),
        ("claim-bob", "idle", Some(daily.as_str()), false),
        ("claim-carol", "idle", None, true),
        ("claim-dave", "backup-helper", Some(daily.as_str()), true),
        ("claim-erin", "restoring", None, true),
        ("claim-frank", "idle", None, true),
    ] {
        let r = row(claim);
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols[3], state, "{r}");
        assert_eq!(cols[5], backup.unwrap_or("-"), "{r}");
        assert_eq!(r.ends_with("STALE"), stale, "{r}");
    }
    assert!(
        stdout.contains("6 user claims (1 backup-helper, 3 idle, 1 live, 1 restoring); 4 stale"),
        "{stdout}"
    );

    // JSON, the same rows.
    let (code, stdout, _) = run_status(
        kubeconfig.path(),
        &[&base[..], &["--namespace", &ns, "-o", "json"]].concat(),
    )
    .await;
    assert_eq!(code, Some(2));
    let v: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["stale"], 4);
    let alice = v["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["claim"] == "claim-alice")
        .unwrap();
    assert_eq!(
        (alice["user"].as_str(), alice["state"].as_str()),
        (Some("alice"), Some("live"))
    );
    assert_eq!(alice["lastBackup"]["bytes"], 4096);

    // Every opted-in namespace (others' tests' too, on this shared server): ours is there.
    let (_, stdout, stderr) = run_status(kubeconfig.path(), &base).await;
    assert!(
        stdout.lines().any(|l| l.starts_with(&ns)),
        "{stderr}\n{stdout}"
    );

    // The controller exports the same as metrics. Started now, it deletes dave's backup
    // helper (no backup window is open), so his claim turns idle.
    setup.replica("replica-b");
    let metrics = setup.controllers.last().unwrap().metrics.clone();
    let sample = |text: &str, series: &str| velero_jupyterhub::metrics::sample(text, series);
    let text = cluster::eventually(std::time::Duration::from_secs(60), || {
        let text = metrics.encode();
        let idle = sample(&text, r#"velero_jupyterhub_claims{state="idle"}"#);
        async move { (idle == Some(4.0)).then_some(text) }
    })
    .await
    .unwrap_or_else(|| panic!("coverage metrics: {}", metrics.encode()));
    assert_eq!(
        sample(&text, r#"velero_jupyterhub_claims{state="live"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"velero_jupyterhub_claims{state="restoring"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "velero_jupyterhub_claims_stale"),
        Some(4.0),
        "{text}"
    );
    let last = |claim: &str| {
        let series = format!(
            r#"velero_jupyterhub_claim_last_backup_timestamp_seconds{{namespace="{ns}",claim="{claim}"}}"#
        );
        sample(&text, &series)
    };
    let alice = last("claim-alice").expect("alice's series");
    assert!(
        (alice - (now - 2.hours()).as_second() as f64).abs() < 2.0,
        "{alice}"
    );
    assert_eq!(last("claim-carol"), Some(0.0), "never backed up: 0");
    assert_eq!(last("claim-frank"), Some(0.0), "only in a Failed Backup: 0");

    // A namespace that has not opted in: a clear error, exit 1.
    let other = cluster::labelled_namespace(&client, "vjh-ctl", json!({})).await;
    let (code, _, stderr) = run_status(
        kubeconfig.path(),
        &[&base[..], &["--namespace", &other]].concat(),
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has not opted in"), "{stderr}");
    let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(&other, &Default::default())
        .await;
    setup.finish().await;
}

/// How Velero copies each claim, as `status` reads it from the Schedule covering the
/// namespace (v1.18: internal/volumehelper/volume_policy_helper.go): a claim the data
/// mover copied is backed up by its Completed DataUpload (pkg/backup/actions/csi/pvc_action.go `newDataUpload`: labelled
/// `velero.io/backup-name`, `spec.sourcePVC`, `spec.sourceNamespace`); a claim its resource
/// policies skip, named with the ConfigMap; a hostPath volume, which Velero never copies.
/// Skipped claims stay stale (exit 2) with their reason. Without `get configmaps` in
/// Velero's namespace, status says so and reads the claims as if no policy applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_says_how_velero_copies_each_claim_and_why_one_is_skipped() {
    let setup = Setup::new().await;
    for r in &setup.controllers {
        r.stop.cancel();
    }
    let client = setup.client.clone();
    let ns = setup.users.clone();
    let velero = setup.velero.clone();
    let driver = "hostpath.csi.k8s.io";
    cluster::bound_claim_with(&client, &ns, "claim-ann", "ann", Some(driver)).await;
    cluster::bound_claim_with(&client, &ns, "claim-ben", "ben", Some(driver)).await;
    cluster::bound_host_path_claim(&client, &ns, "claim-cat", "cat").await;
    let claims: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(client.clone(), &ns);
    claims
        .patch(
            "claim-ben",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"tier": "scratch"}}})),
        )
        .await
        .expect("label ben's claim");
    let policy = unique("homes-policy");
    cluster::apply_dynamic(&client, &json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": policy, "namespace": velero},
        "data": {"policies.yaml": "version: v1\nvolumePolicies:\n- conditions:\n    pvcLabels:\n      tier: scratch\n  action:\n    type: skip\n"},
    })).await;
    let schedule = unique("movers");
    cluster::apply_dynamic(
        &client,
        &json!({
            "apiVersion": "velero.io/v1", "kind": "Schedule",
            "metadata": {"name": schedule, "namespace": velero},
            "spec": {"schedule": "0 3 * * *", "template": {
                "includedNamespaces": [ns], "snapshotMoveData": true,
                "resourcePolicy": {"kind": "configmap", "name": policy}}},
        }),
    )
    .await;
    // The Schedule's Backup, and the data mover's copy of ann's claim in it.
    let backup = unique("movers-backup");
    cluster::apply_dynamic(
        &client,
        &json!({"apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": backup, "namespace": velero},
        "spec": {"includedNamespaces": [ns]}}),
    )
    .await;
    set_status(&setup, "backups", &backup, json!({"phase": "Completed"})).await;
    let upload = cluster::apply_dynamic(&client, &json!({
        "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
        "metadata": {"name": unique("du"), "namespace": velero,
            "labels": {"velero.io/backup-name": backup}},
        "spec": {"snapshotType": "CSI", "sourcePVC": "claim-ann", "sourceNamespace": ns,
            "backupStorageLocation": "default", "operationTimeout": "10m0s",
            "csiSnapshot": {"volumeSnapshot": "velero-claim-ann-x", "storageClass": "csi-hostpath-sc"}},
    })).await;
    let done = (Timestamp::now() - 1.hours()).to_string();
    let uploads: kube::Api<kube::core::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        &velero,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("velero.io", "v2alpha1", "DataUpload"),
            "datauploads",
        ),
    );
    uploads
        .patch(
            upload["metadata"]["name"].as_str().expect("name"),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"phase": "Completed",
                "completionTimestamp": done, "progress": {"totalBytes": 8192, "bytesDone": 8192}}})),
        )
        .await
        .expect("the data mover completes");

    // The operator: the status ClusterRole, and `get configmaps` in Velero's namespace.
    let (operator, kubeconfig) = status_operator(&client).await;
    let args = [
        "--velero-namespace",
        velero.as_str(),
        "--namespace",
        ns.as_str(),
    ];

    // Not allowed to read the ConfigMap yet: said, and ben reads as if no policy applied.
    let (code, stdout, stderr) = run_status(kubeconfig.path(), &args).await;
    assert!(stderr.contains("not allowed to read it"), "{stderr}");
    assert!(!row(&stdout, "claim-ben").contains("skipped"), "{stdout}");
    assert_eq!(code, Some(2), "ben and cat are stale");

    let role = unique("policies");
    cluster::apply_dynamic(
        &client,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": role, "namespace": velero},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        }),
    )
    .await;
    cluster::apply_dynamic(&client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": role, "namespace": velero},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": operator}],
    })).await;
    let (code, stdout, stderr) = eventually(std::time::Duration::from_secs(30), || async {
        let out = run_status(kubeconfig.path(), &args).await;
        (!out.2.contains("not allowed")).then_some(out)
    })
    .await
    .expect("the Role takes effect");
    assert_eq!(code, Some(2), "{stderr}");
    let ann = row(&stdout, "claim-ann");
    assert!(ann.contains(&backup) && ann.contains("8.0 KiB"), "{ann}");
    // Copied by the data mover, fresh; no note (through our annotated pods the next
    // Backup copies it by file-system backup).
    assert!(ann.ends_with("8.0 KiB"), "{ann}");
    let ben = row(&stdout, "claim-ben");
    assert!(
        ben.contains(&format!(
            "skipped by volume policy 1 of ConfigMap {velero}/{policy} (Schedule {schedule})"
        )) && ben.ends_with("STALE"),
        "{ben}"
    );
    let cat = row(&stdout, "claim-cat");
    assert!(cat.contains("hostPath") && cat.ends_with("STALE"), "{cat}");

    // JSON says the same.
    let (_, stdout, _) =
        run_status(kubeconfig.path(), &[&args[..], &["-o", "json"]].concat()).await;
    let v: Value = serde_json::from_str(&stdout).expect("json");
    let by_claim = |c: &str| {
        v["claims"]
            .as_array()
            .expect("claims")
            .iter()
            .find(|r| r["claim"] == c)
            .cloned()
            .expect("row")
    };
    assert_eq!(
        by_claim("claim-ann")["lastBackup"]["backup"],
        backup.as_str()
    );
    assert_eq!(
        by_claim("claim-ben")["copiedBy"]["schedule"],
        schedule.as_str()
    );
    assert_eq!(v["stale"], 2);

    // The controller's coverage metrics count the data mover's copy the same way.
    let mut setup = setup;
    setup.replica("replica-b");
    let metrics = setup.controllers.last().expect("replica").metrics.clone();
    let series = format!(
        r#"velero_jupyterhub_claim_last_backup_timestamp_seconds{{namespace="{ns}",claim="claim-ann"}}"#
    );
    let at = eventually(std::time::Duration::from_secs(60), || {
        let value = velero_jupyterhub::metrics::sample(&metrics.encode(), &series);
        async move { value.filter(|v| *v > 0.0) }
    })
    .await
    .unwrap_or_else(|| panic!("ann's series: {}", metrics.encode()));
    let done: Timestamp = done.parse().expect("time");
    assert_eq!(at, done.as_second() as f64, "the DataUpload's completion");
    setup.finish().await;
}
