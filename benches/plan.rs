//! The reconciler's plan at scale: 10,000 user claims and 10,000 pods in one namespace
//! during an open window (a third of the users live, the rest idle with helpers, some
//! helpers to delete because their user just started, elsewhere or on the same node, and
//! a PodVolumeBackup for every other helper). Goal: ≤ 50 ms.
//!
//! And the next wave for 10,000 idle claims over 100 nodes: attach limit 16
//! and 110 pods per node, backups spread over the last month, a tenth of the claims zonal
//! (three eligible nodes each), some never backed up. Goal: ≤ 50 ms.

use testkit::fixtures;

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use velero_jupyterhub::policy::helper::{self, ClaimRef, HelperOptions};
use velero_jupyterhub::policy::plan::{ClaimView, NamespaceView, PlanInput, PvbView, plan};
use velero_jupyterhub::policy::window::NamespaceWindow;
use velero_jupyterhub::policy::{ClaimGlobs, PodRecord};

const USERS: usize = 10_000;

fn bench(c: &mut Criterion) {
    let options = HelperOptions {
        image: "registry.k8s.io/pause:3.10".to_owned(),
        tolerations: vec![],
        node_selector: BTreeMap::new(),
    };
    let names: Vec<(String, String, String)> = (0..USERS)
        .map(|i| {
            (
                format!("claim-user{i}"),
                format!("uid-claim-{i}"),
                format!("user{i}"),
            )
        })
        .collect();
    let claims: Vec<ClaimView<'_>> = names
        .iter()
        .map(|(name, uid, user)| ClaimView {
            namespace: "jhub",
            name,
            uid,
            bound: true,
            username: Some(user),
            exclusive: false,
        })
        .collect();
    // As the controller's watch keeps them (`PodRecord`, read from the objects' JSON).
    let mut pods: Vec<PodRecord> = Vec::with_capacity(USERS);
    for (i, (claim, uid, user)) in names.iter().enumerate() {
        let node = format!("node-{}", i % 50);
        if i % 3 == 0 {
            // A live user (every 30th just started on another node than its helper).
            let mut pod = fixtures::z2jh_pod();
            pod["metadata"]["name"] = format!("jupyter-{user}").into();
            pod["metadata"]["namespace"] = "jhub".into();
            pod["metadata"]["uid"] = format!("uid-pod-{i}").into();
            pod["metadata"]["annotations"] =
                json!({"backup.velero.io/backup-volumes": format!("volume-{user}")});
            pod["spec"]["containers"][0]["volumeMounts"][0]["name"] =
                format!("volume-{user}").into();
            pod["spec"]["volumes"][0] = json!({"name": format!("volume-{user}"), "persistentVolumeClaim": {"claimName": claim}});
            pod["spec"]["nodeName"] = node.clone().into();
            pod["status"] = json!({"phase": "Running"});
            pods.push(serde_json::from_value(pod).expect("pod"));
        }
        if i % 3 != 0 || i % 30 == 0 {
            let claim_ref = ClaimRef {
                namespace: "jhub",
                name: claim,
                uid,
                username: Some(user),
            };
            let mut h = helper::backup_helper(&claim_ref, helper::own_labels(Some(user)), &options);
            h.metadata.uid = Some(format!("uid-helper-{i}"));
            // Most live users' helpers are on another node (deleted at once); every 60th
            // shares the user's node (kept until its PodVolumeBackup is done).
            let helper_node = if i % 60 == 0 { i % 50 } else { (i + 1) % 50 };
            h.spec.as_mut().expect("spec").node_name = Some(format!("node-{helper_node}"));
            h.status = Some(serde_json::from_value(json!({"phase": "Running"})).expect("status"));
            pods.push(
                serde_json::from_value(serde_json::to_value(&h).expect("json")).expect("helper"),
            );
        }
    }
    let pod_refs: Vec<&PodRecord> = pods.iter().collect();
    let globs = ClaimGlobs::parse("claim-*").expect("globs");
    let namespaces = [NamespaceView {
        name: "jhub",
        claims: &globs,
    }];
    let windows = BTreeMap::from([(
        "jhub".to_owned(),
        NamespaceWindow {
            schedules: vec!["daily".to_owned()],
            backups: vec!["daily-20261128030012".to_owned()],
            labels: BTreeMap::new(),
        },
    )]);
    let pvb_uids: Vec<String> = (0..USERS)
        .step_by(2)
        .map(|i| format!("uid-helper-{i}"))
        .collect();
    let pvbs: Vec<PvbView<'_>> = pvb_uids
        .iter()
        .map(|uid| PvbView {
            backup: "daily-20261128030012",
            pod_namespace: "jhub",
            pod_uid: uid,
            claim: None,
            phase: Some("Completed"),
        })
        .collect();
    let input = PlanInput {
        namespaces: &namespaces,
        claims: &claims,
        pods: &pod_refs,
        windows: &windows,
        pvbs: &pvbs,
        helper: &options,
        restoring: &Default::default(),
        without_pod: &Default::default(),
        now: "2026-11-28T03:05:00Z".parse().expect("now"),
        user_pod_grace: k8s_openapi::jiff::SignedDuration::from_mins(2),
    };
    let first = plan(&input);
    println!(
        "plan over {} claims and {} pods: {} to create, {} to delete, {} to backfill",
        claims.len(),
        pods.len(),
        first.create.len(),
        first.delete.len(),
        first.backfill.len()
    );
    c.bench_function("plan_10k_claims_10k_pods", |b| {
        b.iter(|| plan(black_box(&input)))
    });
}

fn bench_waves(c: &mut Criterion) {
    use velero_jupyterhub::policy::waves::{IdleClaim, NodeRoom, next_wave};
    let start: k8s_openapi::jiff::Timestamp = "2026-11-01T03:00:00Z".parse().expect("time");
    let names: Vec<String> = (0..USERS).map(|i| format!("claim-user{i}")).collect();
    let claims: Vec<IdleClaim<'_>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| IdleClaim {
            namespace: "jhub",
            claim: name,
            // Every 13th never backed up; the rest spread over 30 days, in no order.
            last_backup: (i % 13 != 0).then(|| {
                start
                    .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
                        ((i * 7919) % (30 * 86_400)) as i64,
                    ))
                    .expect("time")
            }),
            driver: Some("csi.hetzner.cloud"),
            nodes: (i % 10 == 0).then(|| vec![i % 100, (i + 33) % 100, (i + 66) % 100]),
        })
        .collect();
    let nodes: Vec<NodeRoom<'_>> = (0..100)
        .map(|n| NodeRoom {
            name: Box::leak(format!("node-{n}").into_boxed_str()),
            free_pods: 110 - (n % 7) as u32 * 10,
            free_attach: vec![("csi.hetzner.cloud", 16 - (n % 5) as u32)],
        })
        .collect();
    let wave = next_wave(&claims, &nodes, usize::MAX);
    println!(
        "wave over {} idle claims and {} nodes: {} placed, {} waiting",
        claims.len(),
        nodes.len(),
        wave.placed.len(),
        wave.waiting
    );
    c.bench_function("next_wave_10k_claims_100_nodes", |b| {
        b.iter(|| next_wave(black_box(&claims), black_box(&nodes), usize::MAX))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench, bench_waves
}
criterion_main!(benches);
