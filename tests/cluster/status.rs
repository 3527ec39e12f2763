//! `velero-jupyterhub status` against the real API server, run as a user holding only
//! manifests/status-role.yaml: live, idle, helper-held, restoring, fresh, stale and
//! never-backed-up claims, in a table and in JSON, with exit code 2 while any is stale.

use k8s_openapi::jiff::{Timestamp, ToSpan};
use kube::api::PostParams;
use serde_json::{Value, json};
use testkit::cluster::{self, unique};
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
    let operator = unique("operator");
    cluster::apply_dynamic(&client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": operator},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "velero-jupyterhub-status"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": operator}],
    })).await;
    let kubeconfig = cluster::kubeconfig_as(&operator);
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
    let row = |claim: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(claim))
            .unwrap_or_else(|| panic!("no row for {claim}:\n{stdout}"))
            .to_owned()
    };
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
