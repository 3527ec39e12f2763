//! The controller against the real API server, with the real scheduler placing pods on
//! hand-made nodes and the test playing Velero (its schedule controller creates
//! `<schedule>-<timestamp>` Backups labelled `velero.io/schedule-name` and sets the
//! Schedule's `status.lastBackup`: pkg/controller/schedule_controller.go, v1.18) and the
//! kubelet (pod phases). The helpers run in a namespace that enforces Pod Security
//! `restricted`, so a helper spec a locked-down cluster would refuse fails here.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::SignedDuration;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use testkit::cluster::{self, eventually, from_json, unique};
use testkit::controller::{
    Setup, dynamic, pod_volume_backup, restricted_user_pod, set_status, two_running_helpers,
    velero_creates_backup,
};
use velero_jupyterhub::names;
use velero_jupyterhub::policy::helper;

#[tokio::test]
async fn idle_claims_get_helpers_in_a_window_and_lose_them_to_their_user_and_when_it_closes() {
    let setup = Setup::new().await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
    cluster::bound_claim(&setup.client, &setup.users, "data-shared", "nobody").await;
    let tick = setup.schedule("homes").await;

    // The window is open (tick within the lead time): one helper per idle user claim,
    // accepted under `restricted`, placed by the real scheduler on a user node.
    let helpers = eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        let placed = hs
            .iter()
            .all(|h| h.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some());
        (hs.len() == 2 && placed).then_some(hs)
    })
    .await
    .expect("two helpers, scheduled");
    let mut names: Vec<_> = helpers
        .iter()
        .filter_map(|h| h.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["vjh-backup-claim-alice", "vjh-backup-claim-bob"],
        "not for data-shared (no glob match)"
    );
    for h in &helpers {
        let labels = h.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("backup").map(String::as_str),
            Some("homes"),
            "the Schedule's selector"
        );
        assert!(
            setup.nodes.contains(
                h.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .as_ref()
                    .expect("node")
            )
        );
        cluster::set_phase(
            &setup.pods(),
            h.metadata.name.as_deref().expect("name"),
            "Running",
        )
        .await;
    }

    // Alice starts her server (on another node than her helper's): her helper goes at
    // once; Bob's stays.
    let started = Instant::now();
    setup.start_server(&restricted_user_pod("alice")).await;
    eventually(Duration::from_secs(10), || async {
        let hs = setup.helpers().await;
        (hs.len() == 1 && hs[0].metadata.name.as_deref() == Some("vjh-backup-claim-bob"))
            .then_some(())
    })
    .await
    .expect("alice's helper deleted, bob's kept");
    let took = started.elapsed();
    println!("user pod created -> its helper gone: {took:?}");
    // The bound (the 50 ms polling of this check included); measured 80-95 ms.
    assert!(
        took < Duration::from_secs(1),
        "the user waited {took:?} for the helper to go"
    );

    // Backfill: Alice's pod was created with no webhook registered (as when it is down).
    let annotated = eventually(Duration::from_secs(10), || async {
        let pod = setup.pods().get("jupyter-alice").await.ok()?;
        pod.metadata
            .annotations?
            .get(names::VELERO_BACKUP_VOLUMES)
            .cloned()
    })
    .await
    .expect("alice's pod backfilled");
    assert_eq!(annotated, "volume-alice");

    // Velero creates the tick's Backup (lastBackup moves on: the next tick is an hour
    // away); while it runs Bob's helper stays, when it is terminal the helper goes.
    let backup = velero_creates_backup(&setup, "homes", tick, "InProgress").await;
    // Velero copies Bob's home through his helper while the Backup runs (its watch
    // event comes well before the Backup's Completed one); a Backup without it would start
    // a wave for him instead (cluster::waves).
    pod_volume_backup(
        &setup,
        &backup,
        &helper::helper_name("claim-bob"),
        "data",
        "claim-bob",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        setup.helpers().await.len(),
        1,
        "the window stays open while {backup} runs"
    );
    set_status(&setup, "backups", &backup, json!({"phase": "Completed"})).await;
    eventually(Duration::from_secs(10), || async {
        setup.helpers().await.is_empty().then_some(())
    })
    .await
    .expect("the window closed: helpers deleted");

    setup.finish().await;
}

#[tokio::test]
async fn steady_state_makes_no_writes_over_a_quiet_minute() {
    let setup = Setup::new().await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
    setup.schedule("homes").await;
    two_running_helpers(&setup).await;
    // Let the watches deliver our own writes' effects, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replica = &setup.controllers[0];
    let before = replica.writes();
    assert!(before >= 2.0, "the helpers' creates are counted: {before}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        replica.writes(),
        before,
        "no API writes while nothing changes"
    );
    assert_eq!(setup.helpers().await.len(), 2);
    setup.finish().await;
}

#[tokio::test]
async fn when_the_leader_dies_the_other_replica_takes_over_without_duplicates() {
    // A short Lease keeps the test short; client-go's proportions apply.
    let lease = Duration::from_secs(4);
    let mut setup = Setup::with_lease(lease).await;
    setup.replica("replica-b");
    cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
    setup.schedule("homes").await;
    let uids = two_running_helpers(&setup).await;
    let leader = eventually(Duration::from_secs(10), || async {
        let leaders: Vec<usize> = (0..2).filter(|i| setup.controllers[*i].leads()).collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
    .expect("exactly one leader");

    // Both probes pass on both replicas: the leader's watches listed and its loop passes;
    // the standby has nothing to do (a rollout must not wait on it).
    for (i, replica) in setup.controllers.iter().enumerate() {
        let role = if i == leader { "leader" } else { "standby" };
        assert_eq!(replica.heartbeat.not_ready(), None, "{role}");
        assert_eq!(replica.heartbeat.not_live(), None, "{role}");
    }

    // The leader dies without releasing its Lease (its task is aborted, as a crash would).
    let dead = setup.controllers.remove(leader);
    dead.task.abort();
    let died = Instant::now();
    let _ = dead.task.await;
    eventually(lease * 3, || async {
        setup.controllers[0].leads().then_some(())
    })
    .await
    .expect("the other replica leads within the lease duration (plus a retry)");
    let took_over = died.elapsed();
    println!(
        "failover: the other replica led {took_over:?} after the leader died (lease {lease:?})"
    );
    assert!(
        took_over <= lease + lease * 2 / 15 + Duration::from_secs(2),
        "took {took_over:?}"
    );

    // A claim that turns up now gets its helper from the new leader; the old helpers are
    // the same pods (no duplicates, no re-creation).
    cluster::bound_claim(&setup.client, &setup.users, "claim-carol", "carol").await;
    let helpers = eventually(Duration::from_secs(15), || async {
        let hs = setup.helpers().await;
        (hs.len() == 3).then_some(hs)
    })
    .await
    .expect("carol's helper from the new leader");
    for uid in &uids {
        assert!(
            helpers.iter().any(|h| h.metadata.uid.as_ref() == Some(uid)),
            "helper {uid} kept"
        );
    }
    setup.finish().await;
}

/// A leader whose watches cannot list (here: its ClusterRole lacks
/// PodVolumeRestores, as when RBAC is applied half-way; Velero's CRDs missing fail the
/// same way) keeps its Lease and reconciles nothing. Its readiness probe says so at once
/// and its liveness probe once the watch has failed past its deadline, so the kubelet
/// restarts it; with the right granted, it lists and both pass again.
#[tokio::test]
async fn a_leader_whose_watches_cannot_list_fails_its_probes() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
    use serde_json::Value;
    use velero_jupyterhub::controller::heartbeat::Heartbeat;
    use velero_jupyterhub::policy::liveness::Deadlines;
    let mut setup = Setup::new().await;
    // The test's one replica steps aside: the half-granted one takes the Lease.
    let replica = setup.controllers.remove(0);
    replica.stop.cancel();
    let _ = replica.task.await;

    let account = unique("vjh-half");
    let own = setup.config.namespace.clone();
    let mut role = cluster::manifest("ClusterRole", "velero-jupyterhub-controller");
    role["metadata"] = json!({"name": account});
    let full_rules = role["rules"].clone();
    let without: Vec<Value> = full_rules
        .as_array()
        .expect("rules")
        .iter()
        .map(|rule| {
            let mut rule = rule.clone();
            if let Some(resources) = rule["resources"].as_array_mut() {
                resources.retain(|r| r != "podvolumerestores");
            }
            rule
        })
        .collect();
    role["rules"] = json!(without);
    cluster::apply_dynamic(&setup.client, &role).await;
    let subject = json!([{"kind": "ServiceAccount", "name": account, "namespace": own}]);
    cluster::apply_dynamic(&setup.client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": account},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
        "subjects": subject,
    }))
    .await;
    cluster::apply_dynamic(&setup.client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": account, "namespace": own},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "velero-jupyterhub-controller"},
        "subjects": subject,
    }))
    .await;
    let half = cluster::client_as_service_account(&own, &account).await;
    let deadline = Duration::from_secs(4);
    setup.replica_with(
        "half-granted",
        half,
        Heartbeat::with_deadlines(Deadlines {
            pass: Duration::from_secs(900),
            watch: deadline,
            retrying: Duration::from_secs(120),
        }),
    );
    let half = &setup.controllers[0];
    eventually(Duration::from_secs(20), || async {
        half.leads().then_some(())
    })
    .await
    .expect("the half-granted replica leads");
    let not_ready = half.heartbeat.not_ready().unwrap_or_default();
    assert!(not_ready.contains("not listed"), "{not_ready:?}");
    let started = Instant::now();
    let not_live = eventually(Duration::from_secs(60), || async {
        half.heartbeat.not_live()
    })
    .await
    .expect("not live once the watch has failed past its deadline");
    assert!(
        not_live.contains("the podvolumerestores watch has been failing"),
        "{not_live}"
    );
    assert!(started.elapsed() >= deadline - Duration::from_secs(1));
    println!("not live after {:?}: {not_live}", started.elapsed());

    // Granted: the watch lists, and both probes pass.
    role["rules"] = full_rules;
    cluster::apply_dynamic(&setup.client, &role).await;
    eventually(Duration::from_secs(90), || async {
        (half.heartbeat.not_ready().is_none() && half.heartbeat.not_live().is_none()).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "ready and live once granted: {:?} / {:?}",
            half.heartbeat.not_ready(),
            half.heartbeat.not_live()
        )
    });
    let _ = Api::<ClusterRoleBinding>::all(setup.client.clone())
        .delete(&account, &Default::default())
        .await;
    let _ = Api::<ClusterRole>::all(setup.client.clone())
        .delete(&account, &Default::default())
        .await;
    let _ = Api::<RoleBinding>::namespaced(setup.client.clone(), &own)
        .delete(&account, &Default::default())
        .await;
    setup.finish().await;
}

/// Plays Velero's file-system backup for one Backup, as pkg/podvolume/backupper.go
/// (v1.18) does: for every Running pod of the namespace, each volume named in its
/// `backup.velero.io/backup-volumes` that is a claim gets a PodVolumeBackup labelled
/// `velero.io/backup-name` and `velero.io/pvc-uid`, annotated `velero.io/pvc-name`, with
/// `spec.pod` the pod it reads through; then the data mover ends each (`failing`: Failed)
/// and the Backup ends PartiallyFailed if one failed, else Completed.
async fn velero_backs_up(setup: &Setup, backup: &str, failing: &str) {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    set_status(setup, "backups", backup, json!({"phase": "InProgress"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(setup.client.clone(), &setup.users);
    let mut failed = false;
    for pod in setup
        .pods()
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
    {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let Some(listed) = cluster::backup_volumes(&pod).map(str::to_owned) else {
            continue;
        };
        if !running {
            continue;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        for volume in listed.split(',') {
            let Some(claim) = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .and_then(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.clone())
            else {
                continue;
            };
            let claim_uid = claims.get(&claim).await.expect("claim").metadata.uid;
            let name = unique(backup);
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            cluster::apply_dynamic(&setup.client, &json!({
                "apiVersion": "velero.io/v1", "kind": "PodVolumeBackup",
                "metadata": {"name": name, "namespace": setup.velero,
                    "labels": {(names::VELERO_BACKUP_NAME): backup, "velero.io/pvc-uid": claim_uid},
                    "annotations": {(names::VELERO_PVC_NAME): claim}},
                "spec": {"node": spec.node_name, "volume": volume, "uploaderType": "kopia",
                    "backupStorageLocation": "default", "repoIdentifier": "",
                    "pod": {"kind": "Pod", "namespace": setup.users, "name": pod_name,
                            "uid": pod.metadata.uid}},
            }))
            .await;
            let status = if claim == failing {
                failed = true;
                json!({"phase": "Failed", "message": "data path backup failed: no space left on device"})
            } else {
                json!({"phase": "Completed", "progress": {"totalBytes": 4096, "bytesDone": 4096}})
            };
            set_status(setup, "podvolumebackups", &name, status).await;
        }
    }
    let phase = if failed {
        "PartiallyFailed"
    } else {
        "Completed"
    };
    set_status(setup, "backups", backup, json!({"phase": phase})).await;
}

/// Item 5: `velero-jupyterhub backup --namespace NS --wait`, our binary run as an
/// operator holding only manifests/backup-role.yaml, with the controller running and the
/// test playing the kubelet and Velero. Alice and Bob are idle (helpers), Carol's server
/// runs, Dave's claim never bound, and Velero fails on Bob's volume.
#[tokio::test]
async fn backup_command_backs_up_idle_and_live_users_and_says_who_is_missing() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let setup = Setup::new().await;
    for user in ["alice", "bob", "carol"] {
        cluster::bound_claim(&setup.client, &setup.users, &format!("claim-{user}"), user).await;
    }
    let dave: PersistentVolumeClaim = from_json(json!({
        "metadata": {"name": "claim-dave"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "no-such-class",
                 "resources": {"requests": {"storage": "1Gi"}}},
    }));
    Api::<PersistentVolumeClaim>::namespaced(setup.client.clone(), &setup.users)
        .create(&PostParams::default(), &dave)
        .await
        .expect("dave's claim");
    let mut carol = serde_json::to_value(restricted_user_pod("carol")).expect("json");
    carol["metadata"]["annotations"] = json!({(names::VELERO_BACKUP_VOLUMES): "volume-carol"});
    setup
        .pods()
        .create(&PostParams::default(), &from_json(carol))
        .await
        .expect("carol's pod");
    cluster::bind(&setup.pods(), "jupyter-carol", &setup.nodes[0]).await;
    cluster::set_phase(&setup.pods(), "jupyter-carol", "Running").await;

    // The operator: a user bound to the backup ClusterRole only.
    let operator = backup_operator(&setup.client).await;
    let kubeconfig = cluster::kubeconfig_as(&operator);
    eventually(Duration::from_secs(10), || async {
        setup.controllers[0].leads().then_some(())
    })
    .await
    .expect("the controller leads");

    // Kubelet and Velero, played until the Backup ends.
    let play = async {
        let backups = dynamic(&setup, "Backup", "backups");
        loop {
            for h in setup.helpers().await {
                let scheduled = h.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                let phase = h.status.as_ref().and_then(|s| s.phase.clone());
                if scheduled && phase.as_deref() != Some("Running") {
                    let name = h.metadata.name.clone().expect("name");
                    cluster::set_phase_if_present(&setup.pods(), &name, "Running").await;
                }
            }
            let created = backups
                .list(&ListParams::default())
                .await
                .expect("backups")
                .items;
            if let Some(b) = created.first() {
                let name = b.metadata.name.clone().expect("name");
                velero_backs_up(&setup, &name, "claim-bob").await;
                return b.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_velero-jupyterhub"))
        .args([
            "backup",
            "--namespace",
            &setup.users,
            "--wait",
            "--ttl",
            "1h",
        ])
        .args(["--storage-location", "default", "--helper-timeout", "60s"])
        .args(["--velero-namespace", &setup.velero])
        .args(["--controller-namespace", &setup.config.namespace])
        .args(["--lease-name", &setup.config.lease.name])
        .env("KUBECONFIG", kubeconfig.path())
        .kill_on_drop(true)
        .output();
    let (output, backup) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(120), run),
        tokio::time::timeout(Duration::from_secs(120), play),
    );
    let output = output.expect("backup ended in time").expect("backup ran");
    let backup = backup.expect("a Backup was created");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}\n{stdout}");
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit 2: a claim is missing\n{stderr}"
    );

    // The Backup: this namespace, the flags, labelled as ours.
    assert_eq!(
        backup.data["spec"]["includedNamespaces"],
        json!([setup.users])
    );
    assert_eq!(backup.data["spec"]["ttl"], "3600s");
    assert_eq!(backup.data["spec"]["storageLocation"], "default");
    // One row per user claim, with who it was read through or why not.
    let row = |claim: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{claim} ")))
            .unwrap_or_else(|| panic!("no row for {claim}:\n{stdout}"))
            .to_owned()
    };
    assert!(
        row("claim-alice").contains("backed up")
            && row("claim-alice").contains("from pod vjh-backup-claim-alice"),
        "{}",
        row("claim-alice")
    );
    assert!(
        row("claim-carol").contains("from pod jupyter-carol"),
        "{}",
        row("claim-carol")
    );
    assert!(
        row("claim-bob").contains("NOT backed up") && row("claim-bob").contains("no space left"),
        "{}",
        row("claim-bob")
    );
    assert!(
        row("claim-dave").contains("NOT backed up") && row("claim-dave").contains("not Bound"),
        "{}",
        row("claim-dave")
    );
    assert!(stdout.contains("2 of 4 user claims backed up"), "{stdout}");
    assert!(stderr.contains("volumes done"), "a progress line: {stderr}");

    // The window is closed (annotations gone), and with it the helpers.
    let ns = Api::<Namespace>::all(setup.client.clone())
        .get(&setup.users)
        .await
        .expect("ns");
    let annotations = ns.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key(names::NAMESPACE_WINDOW_UNTIL)
            && !annotations.contains_key(names::NAMESPACE_WINDOW_BACKUP),
        "{annotations:?}"
    );
    eventually(Duration::from_secs(10), || async {
        setup.helpers().await.is_empty().then_some(())
    })
    .await
    .expect("helpers deleted when the window closed");

    // A namespace that has not opted in: a clear error, exit 1, nothing written.
    let other = cluster::labelled_namespace(&setup.client, "vjh-ctl", json!({})).await;
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_velero-jupyterhub"))
        .args([
            "backup",
            "--namespace",
            &other,
            "--velero-namespace",
            &setup.velero,
        ])
        .env("KUBECONFIG", kubeconfig.path())
        .output()
        .await
        .expect("ran");
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("has not opted in"), "{message}");
    // No controller leading (another Lease name): said at once, instead of waiting.
    let leaderless = tokio::process::Command::new(env!("CARGO_BIN_EXE_velero-jupyterhub"))
        .args([
            "backup",
            "--namespace",
            &setup.users,
            "--velero-namespace",
            &setup.velero,
        ])
        .args([
            "--controller-namespace",
            &setup.config.namespace,
            "--lease-name",
            "no-such-lease",
        ])
        .env("KUBECONFIG", kubeconfig.path())
        .output()
        .await
        .expect("ran");
    assert_eq!(leaderless.status.code(), Some(1));
    let message = String::from_utf8_lossy(&leaderless.stderr);
    assert!(
        message.contains("no velero-jupyterhub controller is running"),
        "{message}"
    );
    let _ = Api::<Namespace>::all(setup.client.clone())
        .delete(&other, &Default::default())
        .await;
    let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(setup.client.clone())
        .delete(&operator, &Default::default())
        .await;
    setup.finish().await;
}

/// manifests/controller-policy.yaml: the controller's ServiceAccount may create and
/// delete backup helpers only, and patch pods' metadata only, whatever its RBAC allows.
#[tokio::test]
async fn the_controllers_pod_rights_stop_at_backup_helpers() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, Patch, PatchParams};
    let setup = Setup::new().await;
    let as_controller: Api<Pod> = Api::namespaced(setup.as_controller.clone(), &setup.users);
    let refused = |r: Result<Pod, kube::Error>, why: &str| match r {
        Err(kube::Error::Api(e)) => assert!(e.message.contains(why), "{why}: {}", e.message),
        other => panic!("{why}: not refused: {other:?}"),
    };
    // The policy is in force once the API server has loaded it.
    eventually(Duration::from_secs(20), || async {
        let probe = as_controller
            .create(&PostParams { dry_run: true, ..Default::default() }, &restricted_user_pod("probe"))
            .await;
        matches!(probe, Err(kube::Error::Api(e)) if e.message.contains("creates backup helpers only")).then_some(())
    })
    .await
    .expect("the policy refuses a non-helper pod");

    // A helper-labelled pod that is not helper-shaped (a service-account token).
    let mut fake = serde_json::to_value(restricted_user_pod("mallory")).expect("json");
    fake["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "velero-jupyterhub",
                                         "app.kubernetes.io/component": "backup-helper"});
    refused(
        as_controller
            .create(&PostParams::default(), &from_json(fake))
            .await,
        "no service-account token",
    );

    // A real helper shape placed by hand on a node (past the scheduler's checks).
    let claim = velero_jupyterhub::policy::helper::ClaimRef {
        namespace: &setup.users,
        name: "claim-mallory",
        uid: "u-1",
        username: Some("mallory"),
    };
    let mut placed = velero_jupyterhub::policy::helper::backup_helper(
        &claim,
        velero_jupyterhub::policy::helper::own_labels(Some("mallory")),
        &setup.config.helper,
    );
    let mut writable = placed.clone();
    placed.spec.as_mut().expect("spec").node_name = Some(setup.nodes[0].clone());
    refused(
        as_controller.create(&PostParams::default(), &placed).await,
        "goes through the scheduler",
    );
    // Security review M2: a helper-shaped pod that differs from what the controller
    // builds in any field that would give a stolen token more than a helper: another
    // image, another user or groups, an added capability, a port, an environment, a
    // system priority class, a toleration the helpers' ConfigMap does not list. (The
    // namespace enforces Pod Security `restricted`, which would refuse root or a host
    // port first; the policy holds where it does not.)
    let as_json = serde_json::to_value(&writable).expect("json");
    // (what is changed, the change, what the refusal says)
    type Change = (&'static str, fn(&mut serde_json::Value), &'static str);
    let changes: [Change; 9] = [
        (
            "image",
            |p| p["spec"]["containers"][0]["image"] = "busybox:1.36".into(),
            "runs the helper image registry.k8s.io/pause:3.10",
        ),
        (
            "user",
            |p| p["spec"]["securityContext"]["runAsUser"] = 1000.into(),
            "runs as user and group 65535",
        ),
        (
            "container user",
            |p| p["spec"]["containers"][0]["securityContext"]["runAsUser"] = 1000.into(),
            "runs the helper image",
        ),
        (
            "groups",
            |p| p["spec"]["securityContext"]["supplementalGroups"] = json!([0]),
            "no supplemental groups",
        ),
        (
            "capability",
            |p| {
                p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                    json!(["NET_BIND_SERVICE"])
            },
            "no added capability",
        ),
        (
            "port",
            |p| p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8080}]),
            "no ports",
        ),
        (
            "env",
            |p| p["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "b"}]),
            "no environment",
        ),
        (
            "priority",
            |p| p["spec"]["priorityClassName"] = "system-node-critical".into(),
            "no system priority class",
        ),
        (
            "toleration",
            |p| p["spec"]["tolerations"] = json!([{"operator": "Exists"}]),
            "tolerates only the taint keys",
        ),
    ];
    for (what, change, why) in changes {
        let mut pod = as_json.clone();
        pod["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = true.into();
        change(&mut pod);
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match as_controller.create(&params, &from_json(pod)).await {
            Err(kube::Error::Api(e)) => assert!(e.message.contains(why), "{what}: {}", e.message),
            other => panic!("{what}: not refused: {other:?}"),
        }
    }
    // A helper whose container could write to the user's home.
    writable.spec.as_mut().expect("spec").containers[0]
        .volume_mounts
        .as_mut()
        .expect("mounts")[0]
        .read_only = None;
    refused(
        as_controller
            .create(&PostParams::default(), &writable)
            .await,
        "mounts one claim read-only",
    );

    // A user's pod: not deleted, its spec not patched; its annotation may be.
    setup
        .pods()
        .create(&PostParams::default(), &restricted_user_pod("carol"))
        .await
        .expect("carol's pod");
    match as_controller
        .delete("jupyter-carol", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(e)) => assert!(
            e.message
                .contains("deletes backup and restore helpers only"),
            "{}",
            e.message
        ),
        other => panic!("deleted a user's pod: {other:?}"),
    }
    refused(
        as_controller
            .patch(
                "jupyter-carol",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"activeDeadlineSeconds": 60}})),
            )
            .await,
        "metadata only",
    );
    // Metadata: not our helper labels (then a delete would pass), not a dangling owner
    // (the garbage collector would delete it), no annotation but the backup list.
    for (patch, why) in [
        (
            json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "velero-jupyterhub",
                                           "app.kubernetes.io/component": "backup-helper"}}}),
            "labels of backup helpers only",
        ),
        (
            json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                                     "name": "gone", "uid": "0000"}]}}),
            "owners or finalizers",
        ),
        (
            json!({"metadata": {"annotations": {"example.com/other": "x"}}}),
            "no annotation but backup.velero.io/backup-volumes",
        ),
    ] {
        refused(
            as_controller
                .patch(
                    "jupyter-carol",
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await,
            why,
        );
    }
    as_controller
        .patch(
            "jupyter-carol",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {(names::VELERO_BACKUP_VOLUMES): "volume-carol"}}})),
        )
        .await
        .expect("the backfill patch is allowed");
    // A helper, exactly as the controller builds it, but in a namespace that has not
    // opted in.
    let claim = velero_jupyterhub::policy::helper::ClaimRef {
        namespace: &setup.velero,
        name: "claim-x",
        uid: "uid-x",
        username: None,
    };
    let helper = velero_jupyterhub::policy::helper::backup_helper(
        &claim,
        velero_jupyterhub::policy::helper::own_labels(None),
        &setup.config.helper,
    );
    refused(
        Api::<Pod>::namespaced(setup.as_controller.clone(), &setup.velero)
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &helper,
            )
            .await,
        "opted-in namespaces only",
    );
    setup.finish().await;
}

/// Item 3 on the real scheduler's placement: a user pod bound to another node than the
/// helper's takes the claim at once; on the helper's own node (both may mount a
/// ReadWriteOnce volume there) the helper stays until its PodVolumeBackup of the current
/// Backup is terminal.
#[tokio::test]
async fn the_user_wins_at_once_elsewhere_and_after_the_volume_backup_on_the_same_node() {
    let setup = Setup::new().await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
    let tick = setup.schedule("homes").await;
    two_running_helpers(&setup).await;
    let helper = |name: &str| {
        let name = name.to_owned();
        let setup = &setup;
        async move {
            setup
                .helpers()
                .await
                .into_iter()
                .find(|h| h.metadata.name.as_deref() == Some(name.as_str()))
        }
    };
    let node_of = |p: &k8s_openapi::api::core::v1::Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("scheduled")
    };
    let alice_helper = helper("vjh-backup-claim-alice")
        .await
        .expect("alice's helper");
    let bob_helper = helper("vjh-backup-claim-bob").await.expect("bob's helper");

    // Velero's Backup of the tick is running.
    let backup = velero_creates_backup(&setup, "homes", tick, "InProgress").await;

    // Alice starts on her helper's node: it stays while its volume backup runs.
    // Created already placed (spec.nodeName): created unscheduled, it would count as "not
    // on the helper's node" and win at once.
    let mut alice = serde_json::to_value(restricted_user_pod("alice")).expect("json");
    alice["spec"]["nodeName"] = node_of(&alice_helper).into();
    setup
        .pods()
        .create(&PostParams::default(), &from_json(alice))
        .await
        .expect("alice's pod");
    cluster::set_phase(&setup.pods(), "jupyter-alice", "Running").await;
    let pvb = unique(&backup);
    cluster::apply_dynamic(&setup.client, &json!({
        "apiVersion": "velero.io/v1", "kind": "PodVolumeBackup",
        "metadata": {"name": pvb, "namespace": setup.velero,
                     "labels": {(names::VELERO_BACKUP_NAME): backup}},
        "spec": {"node": node_of(&alice_helper), "volume": "data", "backupStorageLocation": "default",
                 "repoIdentifier": "", "uploaderType": "kopia",
                 "pod": {"kind": "Pod", "namespace": setup.users, "name": "vjh-backup-claim-alice",
                         "uid": alice_helper.metadata.uid}},
    }))
    .await;
    set_status(
        &setup,
        "podvolumebackups",
        &pvb,
        json!({"phase": "InProgress"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        helper("vjh-backup-claim-alice").await.is_some(),
        "kept on the same node while its volume backup runs"
    );
    set_status(
        &setup,
        "podvolumebackups",
        &pvb,
        json!({"phase": "Completed"}),
    )
    .await;
    eventually(Duration::from_secs(10), || async {
        helper("vjh-backup-claim-alice")
            .await
            .is_none()
            .then_some(())
    })
    .await
    .expect("deleted once its volume is backed up");

    // Bob starts on the other node: his helper goes at once.
    let other = setup
        .nodes
        .iter()
        .find(|n| **n != node_of(&bob_helper))
        .expect("another node")
        .clone();
    // Created already placed there (spec.nodeName), so it is "on another node" from the
    // first event, not "unscheduled" (that case is the first test's).
    let mut bob = serde_json::to_value(restricted_user_pod("bob")).expect("json");
    bob["spec"]["nodeName"] = other.clone().into();
    let started = Instant::now();
    setup
        .pods()
        .create(&PostParams::default(), &from_json(bob))
        .await
        .expect("bob's pod");
    eventually(Duration::from_secs(10), || async {
        helper("vjh-backup-claim-bob").await.is_none().then_some(())
    })
    .await
    .expect("bob's helper deleted");
    let took = started.elapsed();
    println!("user pod on another node -> its helper gone: {took:?}");
    assert!(took < Duration::from_secs(1), "the user waited {took:?}");
    setup.finish().await;
}

/// RBAC as installed, asked of the API server (SubjectAccessReview): `serve` reads and
/// files Events, nothing else; the controller has the verbs it uses and no others; who
/// runs `backup` has its own short list.
#[tokio::test]
async fn each_component_has_exactly_the_access_it_uses() {
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    let client = cluster::client().await;
    cluster::apply_rbac(&client).await;
    let sa = |name: &str| format!("system:serviceaccount:velero-jupyterhub:{name}");
    let webhook = sa("velero-jupyterhub");
    let controller = sa("velero-jupyterhub-controller");
    let operator = backup_operator(&client).await;
    // (user, verb, group, resource, namespace, allowed)
    let table: &[(&str, &str, &str, &str, &str, bool)] = &[
        (&webhook, "list", "", "namespaces", "", true),
        (&webhook, "create", "events.k8s.io", "events", "jhub", true),
        (&webhook, "patch", "", "namespaces", "", false),
        (&webhook, "create", "", "pods", "jhub", false),
        (&webhook, "patch", "", "pods", "jhub", false),
        // The network-facing webhook reads no pods at all (the restore
        // guard reads the claims being restored from the namespace's record).
        (&webhook, "list", "", "pods", "jhub", false),
        (&webhook, "watch", "", "pods", "", false),
        (&webhook, "get", "", "pods", "jhub", false),
        (&webhook, "get", "", "secrets", "jhub", false),
        // Whether a claim a restored pod writes into existed before the Restore: a GET.
        (&webhook, "get", "", "persistentvolumeclaims", "jhub", true),
        (
            &webhook,
            "list",
            "",
            "persistentvolumeclaims",
            "jhub",
            false,
        ),
        (
            &controller,
            "watch",
            "velero.io",
            "restores",
            "velero",
            true,
        ),
        (
            &controller,
            "watch",
            "velero.io",
            "podvolumerestores",
            "velero",
            true,
        ),
        (
            &controller,
            "create",
            "velero.io",
            "restores",
            "velero",
            false,
        ),
        (&webhook, "get", "", "secrets", "jhub", false),
        (&controller, "watch", "", "pods", "jhub", true),
        (&controller, "create", "", "pods", "jhub", true),
        (&controller, "delete", "", "pods", "jhub", true),
        (&controller, "patch", "", "pods", "jhub", true),
        (&controller, "update", "", "pods", "jhub", false),
        (&controller, "create", "", "pods/exec", "jhub", false),
        (&controller, "get", "", "secrets", "jhub", false),
        (
            &controller,
            "delete",
            "",
            "persistentvolumeclaims",
            "jhub",
            false,
        ),
        // Recording the claims being restored (controller-policy.yaml holds it to that
        // annotation).
        (&controller, "patch", "", "namespaces", "", true),
        (&controller, "update", "", "namespaces", "", false),
        // Wave Backups (controller-backups-policy.yaml narrows them to one wave's helpers).
        (
            &controller,
            "create",
            "velero.io",
            "backups",
            "velero",
            true,
        ),
        (
            &controller,
            "update",
            "velero.io",
            "backups",
            "velero",
            false,
        ),
        (
            &controller,
            "delete",
            "velero.io",
            "backups",
            "velero",
            false,
        ),
        (&controller, "get", "velero.io", "schedules", "velero", true),
        (
            &controller,
            "update",
            "velero.io",
            "schedules",
            "velero",
            false,
        ),
        // Where helpers fit: read-only.
        (&controller, "watch", "", "nodes", "", true),
        (&controller, "patch", "", "nodes", "", false),
        (&controller, "watch", "", "persistentvolumes", "", true),
        (&controller, "delete", "", "persistentvolumes", "", false),
        (&controller, "watch", "storage.k8s.io", "csinodes", "", true),
        (
            &controller,
            "watch",
            "storage.k8s.io",
            "volumeattachments",
            "",
            true,
        ),
        (
            &controller,
            "create",
            "storage.k8s.io",
            "volumeattachments",
            "",
            false,
        ),
        (
            &controller,
            "update",
            "coordination.k8s.io",
            "leases",
            "velero-jupyterhub",
            true,
        ),
        (
            &controller,
            "update",
            "coordination.k8s.io",
            "leases",
            "kube-system",
            false,
        ),
        (&operator, "create", "velero.io", "backups", "velero", true),
        (&operator, "patch", "", "namespaces", "", true),
        (&operator, "list", "", "pods", "jhub", true),
        (&operator, "create", "", "pods", "jhub", false),
        (&operator, "delete", "velero.io", "backups", "velero", false),
        (&operator, "get", "", "secrets", "jhub", false),
    ];
    // Self-managed certificates, by object name: the webhook reads its own serving
    // certificate and nothing else; the controller keeps both Secrets and one caBundle.
    // (user, verb, group, resource, namespace/name, allowed)
    let (ns, tls, ca) = (
        "velero-jupyterhub",
        "velero-jupyterhub-tls",
        "velero-jupyterhub-webhook-ca",
    );
    let admission = "admissionregistration.k8s.io";
    let hooks = "mutatingwebhookconfigurations";
    type Row<'a> = (&'a str, &'a str, &'a str, &'a str, (&'a str, &'a str), bool);
    let named: &[Row] = &[
        (&webhook, "get", "", "secrets", (ns, tls), true),
        (&webhook, "watch", "", "secrets", (ns, tls), true),
        (&webhook, "list", "", "secrets", (ns, ""), false),
        (&webhook, "get", "", "secrets", (ns, ca), false),
        (&webhook, "update", "", "secrets", (ns, tls), false),
        (
            &webhook,
            "update",
            admission,
            hooks,
            ("", "velero-jupyterhub"),
            false,
        ),
        (&controller, "get", "", "secrets", (ns, ca), true),
        (&controller, "update", "", "secrets", (ns, ca), true),
        (&controller, "update", "", "secrets", (ns, tls), true),
        (
            &controller,
            "get",
            "",
            "secrets",
            (ns, "someone-elses"),
            false,
        ),
        (&controller, "delete", "", "secrets", (ns, tls), false),
        (&controller, "create", "", "secrets", (ns, ""), true),
        (&controller, "create", "", "secrets", ("jhub", ""), false),
        (
            &controller,
            "patch",
            admission,
            hooks,
            ("", "velero-jupyterhub"),
            true,
        ),
        (
            &controller,
            "update",
            admission,
            hooks,
            ("", "velero-jupyterhub"),
            false,
        ),
        (
            &controller,
            "watch",
            admission,
            hooks,
            ("", "velero-jupyterhub"),
            true,
        ),
        (
            &controller,
            "patch",
            admission,
            hooks,
            ("", "someone-elses"),
            false,
        ),
        (
            &controller,
            "update",
            admission,
            "validatingwebhookconfigurations",
            ("", "velero-jupyterhub"),
            false,
        ),
    ];
    let rows = table
        .iter()
        .map(|&(u, v, g, r, n, a)| (u, v, g, r, (n, ""), a))
        .chain(named.iter().copied());
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    for (user, verb, group, resource, (namespace, name), allowed) in rows {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let review: SubjectAccessReview = from_json(json!({
            "spec": {"user": user, "groups": ["system:authenticated"],
                     "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                            "subresource": subresource, "namespace": namespace,
                                            "name": name}},
        }));
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .expect("review");
        let got = answer.status.map(|s| s.allowed).unwrap_or_default();
        assert_eq!(
            got, allowed,
            "{user} {verb} {group}/{resource} {name:?} in {namespace:?}"
        );
    }
    let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client)
        .delete(&operator, &Default::default())
        .await;
}

/// A user bound (ClusterRoleBinding of its own name) to manifests/backup-role.yaml only.
async fn backup_operator(client: &kube::Client) -> String {
    let operator = unique("operator");
    cluster::apply_dynamic(client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": operator},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "velero-jupyterhub-backup"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": operator}],
    }))
    .await;
    operator
}

/// The controller keeps records of the pods of opted-in namespaces only. A namespace that
/// opts in later has its pods listed before any plan touches it: a user whose server
/// was running before the label came gets no helper on their claim.
#[tokio::test]
async fn a_namespace_that_opts_in_later_is_planned_with_the_pods_it_already_holds() {
    let setup = Setup::new().await;
    let run = setup
        .config
        .namespace_selector
        .clone()
        .expect("selector")
        .split_once('=')
        .map(|(_, run)| run.to_owned())
        .expect("run");
    let late =
        cluster::labelled_namespace(&setup.client, "vjh-late", json!({"vjh-test-run": run})).await;
    cluster::bound_claim(&setup.client, &late, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &late, "claim-bob", "bob").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-carol", "carol").await;
    let late_pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(setup.client.clone(), &late);
    late_pods
        .create(&PostParams::default(), &restricted_user_pod("alice"))
        .await
        .expect("alice's server");
    cluster::set_phase(&late_pods, "jupyter-alice", "Running").await;
    let tick = k8s_openapi::jiff::Timestamp::now() + std::time::Duration::from_secs(300);
    let minute = tick.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).minute();
    cluster::apply_dynamic(
        &setup.client,
        &json!({
            "apiVersion": "velero.io/v1", "kind": "Schedule",
            "metadata": {"name": "homes", "namespace": setup.velero},
            "spec": {"schedule": format!("CRON_TZ=UTC {minute} * * * *"),
                     "template": {"includedNamespaces": [setup.users, late]}},
        }),
    )
    .await;
    // The window is open: carol (opted in from the start) gets her helper.
    eventually(Duration::from_secs(30), || async {
        (setup.helpers().await.len() == 1).then_some(())
    })
    .await
    .expect("carol's helper");

    // The late namespace opts in: bob's idle claim gets a helper, alice's (her server
    // runs) none.
    let namespaces: Api<Namespace> = Api::all(setup.client.clone());
    namespaces
        .patch(
            &late,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {(names::NAMESPACE_ENABLED): "true"}}}),
            ),
        )
        .await
        .expect("opt in");
    let helper_names = || async {
        let mut names: Vec<String> = late_pods
            .list(&ListParams::default().labels(testkit::controller::HELPER_SELECTOR))
            .await
            .expect("list")
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        names
    };
    eventually(Duration::from_secs(30), || async {
        (!helper_names().await.is_empty()).then_some(())
    })
    .await
    .expect("a helper in the namespace that opted in");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        helper_names().await,
        ["vjh-backup-claim-bob"],
        "no helper for alice, whose server runs"
    );
    let _ = namespaces.delete(&late, &Default::default()).await;
    setup.finish().await;
}

/// Pods outside the hubs are kept only as a count per node, and that count still fills
/// nodes: helpers go only where a pod slot is left beyond the headroom (4 by default)
/// kept for Velero's hosting pods and users' servers.
#[tokio::test]
async fn pods_outside_the_hubs_still_take_their_node_slots() {
    let setup = Setup::new().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(setup.client.clone());
    for node in &setup.nodes {
        nodes
            .patch_status(
                node,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"status": {"allocatable": {"pods": "6"}, "capacity": {"pods": "6"}}}),
                ),
            )
            .await
            .expect("six pod slots, four of them headroom");
    }
    // Another team's namespace, not managed by this controller: node a full, b half full.
    let elsewhere = cluster::labelled_namespace(&setup.client, "vjh-else", json!({})).await;
    let others: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(setup.client.clone(), &elsewhere);
    for (i, node) in [&setup.nodes[0], &setup.nodes[0], &setup.nodes[1]]
        .into_iter()
        .enumerate()
    {
        let pod = from_json(json!({
            "metadata": {"name": format!("other-{i}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
        }));
        others
            .create(&PostParams::default(), &pod)
            .await
            .expect("another team's pod");
    }
    cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
    setup.schedule("homes").await;
    let helpers = eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        (!hs.is_empty()).then_some(hs)
    })
    .await
    .expect("a helper");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let helpers_now = setup.helpers().await;
    assert_eq!(
        helpers_now.len(),
        1,
        "one slot beyond the headroom is left in the cluster: one helper, the other claim waits"
    );
    let affinity =
        serde_json::to_string(&helpers[0].spec.as_ref().expect("spec").affinity).expect("json");
    assert!(
        affinity.contains(&setup.nodes[1]),
        "pinned to the node with a free slot: {affinity}"
    );
    let _ = Api::<Namespace>::all(setup.client.clone())
        .delete(&elsewhere, &Default::default())
        .await;
    setup.finish().await;
}

/// No helper where a pod is pointless (`policy::datapath`, Velero v1.18's
/// pkg/podvolume/backupper.go `isHostPathVolume`): a hostPath claim Velero never copies
/// gets none, with a `NoBackupHelper` Event saying why. Under a Schedule with
/// `snapshotMoveData` a CSI claim still gets its helper: the data mover is not counted on
/// (it needs Velero's EnableCSI feature, a storage class and a VolumeSnapshotClass), and
/// through our annotated helper Velero copies it by file-system backup.
#[tokio::test]
async fn a_claim_velero_never_copies_gets_no_helper_and_says_why() {
    let setup = Setup::new().await;
    let (client, users) = (&setup.client, &setup.users);
    // The driver's CSINodes on the test's nodes: a helper for a CSI claim goes only
    // where its driver attaches.
    setup.csinodes("hostpath.csi.k8s.io", 8).await;
    cluster::bound_claim_with(
        client,
        users,
        "claim-ann",
        "ann",
        Some("hostpath.csi.k8s.io"),
    )
    .await;
    cluster::bound_host_path_claim(client, users, "claim-ben", "ben").await;
    cluster::bound_claim(client, users, "claim-cat", "cat").await;
    setup
        .schedule_with("movers", json!({"snapshotMoveData": true}))
        .await;

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), users);
    let said = eventually(Duration::from_secs(30), || async {
        let notes: Vec<(String, String)> = events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("NoBackupHelper"))
            .filter_map(|e| Some((e.regarding?.name?, e.note?)))
            .collect();
        (!notes.is_empty()).then_some(notes)
    })
    .await
    .expect("a NoBackupHelper Event");
    let [(claim, note)] = &said[..] else {
        panic!("one Event, on ben's claim: {said:?}");
    };
    assert_eq!(claim, "claim-ben");
    assert!(
        note.contains("Schedule movers")
            && note.contains("will not copy")
            && note.contains("hostPath"),
        "{note}"
    );
    let helpers = eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        (hs.len() == 2).then_some(hs)
    })
    .await
    .expect("two helpers");
    let mut names: Vec<_> = helpers
        .iter()
        .filter_map(|h| h.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["vjh-backup-claim-ann", "vjh-backup-claim-cat"],
        "every claim Velero copies at all"
    );
    // And it stays so; ben's Event was the only one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(setup.helpers().await.len(), 2);
    setup.finish().await;
}

/// A Schedule whose `pre` backup hook would run in the helpers (no label selector) with
/// `onError: Fail` gets a Warning Event saying Velero would skip their volumes
/// (internal/hook/item_hook_handler.go, pkg/backup/backup.go). Its helpers are still made.
#[tokio::test]
async fn a_schedule_whose_hooks_would_fail_in_helpers_is_warned() {
    let setup = Setup::new().await;
    let (client, users) = (&setup.client, &setup.users);
    cluster::bound_claim(client, users, "claim-ann", "ann").await;
    setup
        .schedule_with(
            "hooked",
            json!({"hooks": {"resources": [{"name": "fsfreeze", "pre": [{"exec": {
                "container": "notebook", "command": ["/sbin/fsfreeze", "--freeze", "/home/jovyan"],
                "onError": "Fail"}}]}]}}),
        )
        .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &setup.velero);
    let note = eventually(Duration::from_secs(30), || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("BackupHooksInHelpers"))
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("hooked")
                    && e.type_.as_deref() == Some("Warning")
            })?
            .note
    })
    .await
    .expect("a BackupHooksInHelpers Warning on the Schedule");
    assert!(
        note.contains("fsfreeze")
            && note.contains(users.as_str())
            && note.contains("skip the helpers' volumes"),
        "{note}"
    );
    // Served all the same: the window's helper is made.
    let helpers = eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        (hs.len() == 1).then_some(hs)
    })
    .await;
    assert!(helpers.is_some(), "ann's helper");
    setup.finish().await;
}

/// A pod that never runs does not cancel a backup unseen: one that mounts an idle claim
/// but no node takes (here: a scheduler that does not run) leaves the claim's helper in
/// place for `--user-pod-grace`, takes it then (a ReadWriteOncePod claim would keep it
/// unscheduled), and while the tick's Backup runs the claim gets a Warning Event naming
/// the pod.
#[tokio::test]
async fn a_pod_that_never_runs_takes_a_claim_only_after_the_grace_and_is_named() {
    let grace = Duration::from_secs(8);
    let setup = Setup::configured(Duration::from_secs(15), |c| {
        c.user_pod_grace = SignedDuration::try_from(grace).expect("grace");
    })
    .await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-ann", "ann").await;
    let tick = setup.schedule("homes").await;
    eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        (hs.len() == 1).then_some(())
    })
    .await
    .expect("ann's helper in the window");
    // A pod mounting ann's claim that no node takes.
    let squatter = setup
        .pods()
        .create(&PostParams::default(), &restricted_user_pod("ann"))
        .await
        .expect("a user pod no scheduler takes");
    let made = Instant::now();
    let name = squatter.metadata.name.clone().expect("name");
    tokio::time::sleep(grace / 2).await;
    assert_eq!(
        setup.helpers().await.len(),
        1,
        "within the grace period the helper stays"
    );
    let gone = eventually(Duration::from_secs(30), || async {
        setup.helpers().await.is_empty().then_some(made.elapsed())
    })
    .await
    .expect("after the grace period the pod takes the claim");
    // (creationTimestamp has whole seconds: the grace may end up to a second early.)
    assert!(
        gone + Duration::from_secs(1) >= grace,
        "taken after {gone:?}, before the grace"
    );
    // The tick's Backup runs: the claim has no copy in it, and says which pod holds it.
    let backup = velero_creates_backup(&setup, "homes", tick, "InProgress").await;
    let note = event_note(
        &setup.client,
        &setup.users,
        "BackupMissedClaim",
        "claim-ann",
    )
    .await
    .expect("a BackupMissedClaim Warning on ann's claim");
    assert!(
        note.contains(&backup) && note.contains(&name) && note.contains("not scheduled"),
        "{note}"
    );
    setup.finish().await;
}

/// A pod squatting a helper's name (not ours: none of our labels, another volume) is
/// reported on the claim, never taken for the helper and waited on. (The controller may
/// not read single pods: it learns of the squatter from its watch, not from the create's
/// conflict.)
#[tokio::test]
async fn a_pod_squatting_a_helpers_name_is_reported() {
    let setup = Setup::new().await;
    cluster::bound_claim(&setup.client, &setup.users, "claim-ann", "ann").await;
    let mut squatter = serde_json::to_value(restricted_user_pod("mallory")).expect("json");
    squatter["metadata"]["name"] = helper::helper_name("claim-ann").into();
    squatter["spec"]["volumes"][0] = json!({"name": "volume-mallory", "emptyDir": {}});
    squatter["spec"]["containers"][0]["volumeMounts"][0]["name"] = "volume-mallory".into();
    setup
        .pods()
        .create(&PostParams::default(), &from_json(squatter))
        .await
        .expect("a pod with the helper's name");
    setup.schedule("homes").await;
    let note = event_note(
        &setup.client,
        &setup.users,
        "BackupHelperNameTaken",
        "claim-ann",
    )
    .await
    .expect("a BackupHelperNameTaken Warning on ann's claim");
    assert!(
        note.contains(&helper::helper_name("claim-ann"))
            && note.contains("is not this claim's helper"),
        "{note}"
    );
    // The squatter is not taken for the helper: it is neither relabelled nor deleted.
    let pod = setup
        .pods()
        .get(&helper::helper_name("claim-ann"))
        .await
        .expect("the squatter");
    assert!(
        pod.metadata
            .labels
            .unwrap_or_default()
            .get(names::MANAGED_BY)
            .map(String::as_str)
            == Some("kubespawner"),
        "not relabelled"
    );
    setup.finish().await;
}

/// The note of the first `reason` Event about `name` in `namespace`, within 30 s.
async fn event_note(
    client: &kube::Client,
    namespace: &str,
    reason: &str,
    name: &str,
) -> Option<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), namespace);
    eventually(Duration::from_secs(30), || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })?
            .note
    })
    .await
}
