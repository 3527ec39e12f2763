//! The API server restarts in the middle of a backup window: no duplicate
//! helpers, none leaked, and every watch resumes. The test runs its own API server (its
//! own run dir and ports, `scripts/kube-envtest.sh`), because restarting the shared one
//! would break the tests running beside it; `restart-apiserver` stops and starts
//! kube-apiserver alone, so etcd (every object) stays, as in a control-plane upgrade.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use testkit::cluster::{self, OwnServer, eventually};
use testkit::controller::{
    Setup, pod_volume_backup, restricted_user_pod, set_status, two_running_helpers,
    velero_creates_backup,
};

#[tokio::test]
async fn an_api_server_restart_mid_window_leaves_no_duplicates_or_leaks_and_watches_resume() {
    let (server, kubeconfig) = OwnServer::start("restart", 16473, 12409);
    cluster::on_own_server(&kubeconfig.clone(), async move {
        // A Lease long enough to ride out the restart: this test is about the watches (a
        // replica that loses its Lease exits and is restarted: cluster::controller's failover).
        // The first wave settles as long as in production (`--wave-settle` 45s): a watch the
        // restart broke may still be retrying when the Backup completes.
        let settle = Duration::from_secs(45);
        let setup = Setup::configured(Duration::from_secs(60), |c| {
            c.wave_settle = settle.try_into().expect("duration");
        })
        .await;
        cluster::bound_claim(&setup.client, &setup.users, "claim-alice", "alice").await;
        cluster::bound_claim(&setup.client, &setup.users, "claim-bob", "bob").await;
        let tick = setup.schedule("homes").await;
        let mut before = two_running_helpers(&setup).await;
        before.sort();

        let t0 = Instant::now();
        let restart = tokio::task::spawn_blocking(move || {
            server.run("restart-apiserver");
            server
        });
        let server = restart.await.expect("restarted");
        println!("kube-apiserver restarted in {:?}", t0.elapsed());

        // The same two helpers: none deleted, none doubled by a controller that lost sight.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut after: Vec<String> = setup
            .helpers()
            .await
            .iter()
            .filter_map(|h| h.metadata.uid.clone())
            .collect();
        after.sort();
        assert_eq!(after, before, "the helpers are the same pods");

        // Every watch resumed: a new claim gets a helper (claims), a user start takes its
        // helper away (pods), the Backup's end closes the window (backups).
        let t1 = Instant::now();
        cluster::bound_claim(&setup.client, &setup.users, "claim-carol", "carol").await;
        eventually(Duration::from_secs(60), || async {
            (setup.helpers().await.len() == 3).then_some(())
        })
        .await
        .expect("carol's claim gets a helper after the restart");
        println!(
            "claims and pods watched again {:?} after the restart",
            t1.elapsed()
        );
        setup.start_server(&restricted_user_pod("alice")).await;
        eventually(Duration::from_secs(30), || async {
            let names: Vec<String> = setup
                .helpers()
                .await
                .iter()
                .filter_map(|h| h.metadata.name.clone())
                .collect();
            (!names.iter().any(|n| n == "vjh-backup-claim-alice") && names.len() == 2).then_some(())
        })
        .await
        .expect("alice's helper goes when she starts");
        let backup = velero_creates_backup(&setup, "homes", tick, "InProgress").await;
        // Velero copies every home through the pod that mounts it (alice's server, the two
        // helpers), so no claim is left for a wave after the Schedule's own Backup.
        pod_volume_backup(
            &setup,
            &backup,
            "jupyter-alice",
            "volume-alice",
            "claim-alice",
        )
        .await;
        for claim in ["claim-bob", "claim-carol"] {
            let helper = velero_jupyterhub::policy::helper::helper_name(claim);
            pod_volume_backup(&setup, &backup, &helper, "data", claim).await;
        }
        set_status(
            &setup,
            "backups",
            &backup,
            serde_json::json!({"phase": "Completed"}),
        )
        .await;
        let completed = Instant::now();
        if eventually(Duration::from_secs(30), || async {
            setup.helpers().await.is_empty().then_some(())
        })
        .await
        .is_none()
        {
            let left: Vec<_> = setup
                .helpers()
                .await
                .into_iter()
                .map(|h| {
                    (
                        h.metadata.name,
                        h.metadata.labels,
                        h.status.and_then(|s| s.phase),
                    )
                })
                .collect();
            panic!("the window closed, yet helpers are left: {left:?}");
        }
        // No wave follows once the first one's settle is over: the PodVolumeBackups were seen.
        tokio::time::sleep(
            (completed + settle + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
        )
        .await;
        // One replica led throughout, and nothing failed.
        assert!(setup.controllers[0].leads(), "the replica still leads");
        let pods: Vec<Pod> = setup
            .pods()
            .list(&Default::default())
            .await
            .expect("pods")
            .items;
        assert_eq!(
            pods.len(),
            1,
            "only alice's server is left: {:?}",
            pods.iter().map(|p| &p.metadata.name).collect::<Vec<_>>()
        );
        setup.finish().await;
        drop(server);
    })
    .await;
}
