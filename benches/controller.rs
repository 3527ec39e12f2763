//! The controller on the real API server (`scripts/bench.sh` starts it):
//! 1. reaction time: a user pod created for a claim a backup helper holds, until the
//!    helper is deleted (goal: the user waits ≤ 1 s plus the volume's detach), median and
//!    p99 over 100 spawns;
//! 2. memory: RSS of `velero-jupyterhub controller` (the release binary, its own process)
//!    watching 10,000 user claims and 10,000 pods (goal ≤ 64 MiB);
//! 3. a simulated night: 2,000 idle claims on CSI volumes, 10 user nodes whose
//!    CSINodes allow 16 attachments and 110 pods each, Velero's part played with each
//!    Backup taking 10 s: every claim backed up, the waves and the time it took, and the
//!    most helpers bound at once on a node and overall, from a watch of the pods.
//!
//! `cargo test` runs it once with small numbers as a smoke test.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp, ToSpan};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use testkit::cluster::{self, eventually, from_json, unique};
use tokio_util::sync::CancellationToken;
use velero_jupyterhub::controller::{self, Config, LeaseOptions};
use velero_jupyterhub::metrics::Metrics;
use velero_jupyterhub::names;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::policy::helper::HelperOptions;
use velero_jupyterhub::policy::window::WindowOptions;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn reaction(client: &kube::Client, spawns: usize) {
    cluster::install_velero_crds(client).await;
    let run = unique("run");
    let users = cluster::labelled_namespace(
        client,
        "vjh-bench",
        json!({(names::NAMESPACE_ENABLED): "true", "vjh-bench": run}),
    )
    .await;
    let velero = cluster::labelled_namespace(client, "vjh-bench", json!({})).await;
    // A node of its own (helpers go only where they fit), tainted for this run alone.
    let node = unique("node-bench");
    cluster::ready_node(
        client,
        &node,
        json!([{"key": "vjh-bench", "value": run, "effect": "NoSchedule"}]),
    )
    .await;
    // Where users' servers land (z2jh's user-scheduler, played: the pods are made bound
    // to it): another node than the helpers', so a helper goes at once.
    let user_node = unique("node-bench-users");
    cluster::ready_node(
        client,
        &user_node,
        json!([{"key": "vjh-bench", "value": run, "effect": "NoSchedule"}]),
    )
    .await;
    let config = Config {
        namespace: velero.clone(),
        identity: "bench".to_owned(),
        velero_namespace: velero.clone(),
        namespace_selector: Some(format!("vjh-bench={run}")),
        windows: WindowOptions {
            lead: SignedDuration::from_mins(10),
            max: SignedDuration::from_hours(6),
        },
        helper: HelperOptions {
            image: "registry.k8s.io/pause:3.10".to_owned(),
            tolerations: vec![from_json(json!(
                {"key": "vjh-bench", "operator": "Equal", "value": run, "effect": "NoSchedule"}
            ))],
            node_selector: BTreeMap::new(),
        },
        default_claims: Arc::new(ClaimGlobs::parse("claim-*").expect("globs")),
        lease: LeaseOptions::with_duration(&unique("lease"), Duration::from_secs(15)),
        failed_helper_ttl: k8s_openapi::jiff::SignedDuration::from_secs(3600),
        stale_after: k8s_openapi::jiff::SignedDuration::from_hours(26),
        max_helpers: 200,
        helper_start_timeout: k8s_openapi::jiff::SignedDuration::from_mins(5),
        // Healthy watches; the night's figure is the waves' own time.
        wave_settle: k8s_openapi::jiff::SignedDuration::from_secs(1),
        headroom: velero_jupyterhub::policy::waves::Headroom::DEFAULT,
        user_pod_grace: k8s_openapi::jiff::SignedDuration::from_mins(2),
        certificates: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller::run(
        client.clone(),
        config,
        Arc::new(Metrics::for_controller()),
        Arc::new(controller::heartbeat::Heartbeat::new(Duration::from_secs(
            900,
        ))),
        stop.clone(),
    ));
    let minute = (Timestamp::now() + 5.minutes())
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
        .minute();
    cluster::apply_dynamic(client, &json!({
        "apiVersion": "velero.io/v1", "kind": "Schedule",
        "metadata": {"name": "homes", "namespace": velero},
        "spec": {"schedule": format!("CRON_TZ=UTC {minute} * * * *"), "template": {"includedNamespaces": [users]}},
    }))
    .await;

    // When each helper disappears, as a watch sees it.
    let gone: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &users);
    let watch = {
        let gone = gone.clone();
        let cfg = watcher::Config::default().labels("app.kubernetes.io/component=backup-helper");
        tokio::spawn(watcher::watcher(pods.clone(), cfg).try_for_each(move |e| {
            if let watcher::Event::Delete(p) = e {
                gone.lock()
                    .expect("lock")
                    .insert(p.metadata.name.unwrap_or_default(), Instant::now());
            }
            futures::future::ready(Ok(()))
        }))
    };
    let mut samples = Vec::new();
    for i in 0..spawns {
        let user = format!("u{i}");
        cluster::bound_claim(client, &users, &format!("claim-{user}"), &user).await;
        let helper = format!("vjh-backup-claim-{user}");
        eventually(Duration::from_secs(30), || async {
            pods.get_opt(&helper).await.ok().flatten().map(|_| ())
        })
        .await
        .expect("helper created");
        let mut server = cluster::user_pod(&user);
        if let Some(spec) = server.spec.as_mut() {
            spec.node_name = Some(user_node.clone());
        }
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &server)
            .await
            .expect("user pod");
        let at = eventually(Duration::from_secs(30), || async {
            gone.lock().expect("lock").get(&helper).copied()
        })
        .await
        .expect("helper deleted");
        samples.push(at.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let (p50, p99) = (pct(&mut samples, 0.5), pct(&mut samples, 0.99));
    println!(
        "user pod created -> its backup helper deleted, over {spawns} spawns: median {p50:.1} ms, p99 {p99:.1} ms (goal: <= 1000 ms)"
    );
    stop.cancel();
    let _ = task.await;
    watch.abort();
    cluster::delete_node(client, &node).await;
    cluster::delete_node(client, &user_node).await;
    for ns in [users, velero] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &Default::default())
            .await;
    }
}

async fn memory(client: &kube::Client, objects: usize, elsewhere: usize) {
    // The controller's watches of Schedules and Backups list only once Velero's CRDs
    // exist (this part may run alone: `-- memory`).
    cluster::install_velero_crds(client).await;
    // Its own namespaces only (--namespace-selector): tests may share the server.
    let run = unique("run");
    let ns = cluster::labelled_namespace(
        client,
        "vjh-bench",
        json!({(names::NAMESPACE_ENABLED): "true", "vjh-bench": run}),
    )
    .await;
    let velero = cluster::labelled_namespace(client, "vjh-bench", json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let t0 = Instant::now();
    futures::stream::iter(0..objects)
        .for_each_concurrent(16, |i| {
            let (pods, claims, client, ns, run) = (pods.clone(), claims.clone(), client.clone(), ns.clone(), run.clone());
            async move {
                let user = format!("user{i}");
                // Each claim with its volume, as a CSI provisioner makes it (a zonal disk).
                let pv_name = format!("pvc-{run}-{i}");
                cluster::apply_dynamic(&client, &json!({
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": pv_name, "labels": {"vjh-bench": run},
                        "annotations": {"pv.kubernetes.io/provisioned-by": "csi.hetzner.cloud"}},
                    "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "hcloud-volumes",
                        "csi": {"driver": "csi.hetzner.cloud", "volumeHandle": format!("{i}"), "fsType": "ext4"},
                        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "csi.hetzner.cloud/location", "operator": "In", "values": ["fsn1"]}]}]}},
                        "claimRef": {"namespace": ns, "name": format!("claim-{user}")}},
                }))
                .await;
                let claim: PersistentVolumeClaim = from_json(json!({
                    "metadata": {"name": format!("claim-{user}"), "labels": {"hub.jupyter.org/username": user}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hcloud-volumes",
                        "volumeName": pv_name, "resources": {"requests": {"storage": "1Gi"}}},
                }));
                claims.create(&PostParams::default(), &claim).await.expect("claim");
                // As the webhook stores them (annotated): the steady state, nothing to backfill.
                let mut pod = cluster::user_pod(&user);
                pod.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(names::VELERO_BACKUP_VOLUMES.to_owned(), format!("volume-{user}"));
                pods.create(&PostParams::default(), &pod).await.expect("pod");
            }
        })
        .await;
    println!(
        "created {objects} claims (each with its PersistentVolume) and {objects} pods in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let hubs = format!("{objects} claims, their volumes and {objects} pods");
    controller_rss(
        &velero,
        &run,
        &hubs,
        "<= 64 MiB, and below the 63 MiB measured before pods elsewhere were left out",
    )
    .await;
    if elsewhere > 0 {
        let t0 = Instant::now();
        let (other_ns, nodes) = pods_elsewhere(client, &run, elsewhere).await;
        println!(
            "created {elsewhere} pods in another namespace, bound to {} nodes, in {:.0} s",
            nodes.len(),
            t0.elapsed().as_secs_f64()
        );
        controller_rss(
            &velero,
            &run,
            &format!("{hubs}, plus {elsewhere} pods elsewhere"),
            "<= 64 MiB",
        )
        .await;
        let others: Api<Pod> = Api::namespaced(client.clone(), &other_ns);
        let _ = others
            .delete_collection(
                &DeleteParams::background().grace_period(0),
                &ListParams::default(),
            )
            .await;
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&other_ns, &Default::default())
            .await;
        for n in &nodes {
            cluster::delete_node(client, n).await;
        }
    }
    let _ = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
        .delete_collection(
            &Default::default(),
            &kube::api::ListParams::default().labels(&format!("vjh-bench={run}")),
        )
        .await;
    for n in [ns, velero] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&n, &Default::default())
            .await;
    }
}

/// `count` pods in a namespace of their own, outside the hubs (not opted in, not matched
/// by the controller's namespace selector), each bound to one of `count / 100` Ready nodes
/// (its slot counted there, as a kubelet's pods are) and tolerating every taint (so no
/// eviction removes them while the bench runs: no kubelet renews the nodes' leases).
async fn pods_elsewhere(client: &kube::Client, run: &str, count: usize) -> (String, Vec<String>) {
    let ns = cluster::labelled_namespace(client, "vjh-bench-else", json!({})).await;
    let nodes: Vec<String> = (0..count.div_ceil(100).max(1))
        .map(|i| format!("vjh-bench-{run}-{i}"))
        .collect();
    futures::stream::iter(&nodes)
        .for_each_concurrent(16, |n| async move {
            cluster::ready_node(
                client,
                n,
                json!([{"key": "vjh-bench-else", "value": run, "effect": "NoSchedule"}]),
            )
            .await;
        })
        .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..count)
        .for_each_concurrent(64, |i| {
            let (pods, node) = (pods.clone(), nodes[i % nodes.len()].clone());
            async move {
                // A typical pod of a shared cluster: a few labels, a container, a volume.
                let pod: Pod = from_json(json!({
                    "metadata": {"name": format!("worker-{i}"), "labels": {"app": "batch", "team": "data", "run": format!("r{}", i % 50)}},
                    "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "work", "image": "registry.k8s.io/pause:3.10",
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                        "volumes": [{"name": "scratch", "emptyDir": {}}]},
                }));
                pods.create(&PostParams::default(), &pod).await.expect("a pod elsewhere");
            }
        })
        .await;
    (ns, nodes)
}

/// Runs `velero-jupyterhub controller` (the release binary, its own process) until it
/// has listed its watches and planned a few passes, and prints its RSS.
async fn controller_rss(velero: &str, run: &str, watching: &str, goal: &str) {
    // This build's binary, and the one named, if any (the image's static musl build from
    // `scripts/image.sh`: its allocator is musl's, not glibc's).
    let binaries = [env!("CARGO_BIN_EXE_velero-jupyterhub").to_owned()]
        .into_iter()
        .chain(std::env::var("VJH_BENCH_CONTROLLER_BIN").ok());
    for binary in binaries {
        measure_rss(&binary, velero, run, watching, goal).await;
    }
}

async fn measure_rss(binary: &str, velero: &str, run: &str, watching: &str, goal: &str) {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let mut child = std::process::Command::new(binary)
        .args([
            "controller",
            "--ops-listen",
            "127.0.0.1:0",
            "--velero-namespace",
            velero,
            "--namespace",
            velero,
            // The webhook's certificates are not this bench's business (and the shared
            // test server's webhook configuration belongs to the tests).
            "--manage-certificates=false",
        ])
        .args(["--namespace-selector", &format!("vjh-bench={run}")])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", "bench-memory")
        .env("VJH_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("controller");
    // Until it leads and has listed everything (its log says so), then a few passes more.
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // The runtime's worker count, from the serving line (--worker-threads), which
        // comes before the watches are listed.
        let mut workers = None;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(n) = v["workers"].as_u64()
            {
                workers = Some(n);
            }
            if line.contains("watches listed") {
                let _ = tx.send(workers);
            }
        }
    });
    let workers = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the controller listed its watches")
        .expect("the serving line names its workers");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    println!(
        "controller ({binary}, worker threads: {workers}) watching {watching}: RSS {}, peak {} (goal: {goal})",
        field("VmRSS:"),
        field("VmHWM:")
    );
    let _ = child.kill();
    let _ = child.wait();
}

async fn night(claims: usize, nodes: usize, attach: usize, backup_takes: Duration) {
    use testkit::controller::{Setup, velero_creates_backup};
    use testkit::night::{self, Play};
    const DRIVER: &str = "csi.vjh.bench";
    let mut setup = Setup::configured(Duration::from_secs(15), |_| {}).await;
    while setup.nodes.len() < nodes {
        setup.add_node().await;
    }
    setup.csinodes(DRIVER, attach).await;
    let made = Instant::now();
    let names: Vec<String> = (0..claims).map(|i| format!("claim-u{i:04}")).collect();
    setup
        .csi_claims(&names, DRIVER, Duration::from_secs(1800))
        .await;
    println!("{claims} bound claims made in {:.0?}", made.elapsed());
    let seen = Arc::new(Mutex::new(night::Seen::default()));
    let watching = tokio::spawn(night::watch_limits(setup.pods(), seen.clone()));
    let played = tokio::spawn(night::play_kubelet_and_velero(
        setup.client.clone(),
        setup.users.clone(),
        setup.velero.clone(),
        Play {
            stuck: None,
            failing: None,
            backup_takes,
        },
    ));
    // Helpers leave an attachment a node free (the default headroom, for a user's server).
    let per_node =
        attach - velero_jupyterhub::policy::waves::Headroom::DEFAULT.attachments as usize;
    let fits = nodes * per_node;
    let tick = setup.schedule("homes").await;
    let started = Instant::now();
    eventually(Duration::from_secs(600), || async {
        let hs = setup.helpers().await;
        let running = hs.iter().filter(|h| night::phase(h) == "Running").count();
        (running == fits.min(claims)).then_some(())
    })
    .await
    .expect("the window's helpers Running");
    let window_took = started.elapsed();
    velero_creates_backup(&setup, "homes", tick, "InProgress").await;
    let finished = eventually(Duration::from_secs(3600), || async {
        let text = setup.controllers[0].metrics.encode();
        velero_jupyterhub::metrics::sample(&text, "velero_jupyterhub_run_waves{schedule=\"homes\"}")
            .filter(|w| *w > 0.0 || claims <= fits)
    })
    .await
    .expect("the run finished");
    let took = started.elapsed();
    let text = setup.controllers[0].metrics.encode();
    let not_reached = velero_jupyterhub::metrics::sample(
        &text,
        "velero_jupyterhub_run_claims_not_reached{schedule=\"homes\"}",
    )
    .unwrap_or(f64::NAN);
    let backed_up = Api::<kube::core::DynamicObject>::namespaced_with(
        setup.client.clone(),
        &setup.velero,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("velero.io", "v1", "PodVolumeBackup"),
            "podvolumebackups",
        ),
    )
    .list(&Default::default())
    .await
    .map(|l| l.items.len())
    .unwrap_or(0);
    let (on_node, total) = {
        let seen = seen.lock().expect("seen");
        (seen.max_on_node, seen.max_total)
    };
    println!(
        "simulated night: {claims} idle claims, {nodes} nodes x {attach} attachments, Backups taking {backup_takes:?}: \
         the window's {} helpers Running after {window_took:.0?}; the Schedule's Backup + {finished} waves; \
         {backed_up} volumes backed up, {not_reached} claims not reached, in {took:.0?} \
         ({:.1} s a wave); at most {on_node} helpers on a node (limit {per_node}: {attach} less the headroom) and {total} at once (limit {fits})",
        fits.min(claims),
        took.as_secs_f64() / (finished + 1.0),
    );
    assert_eq!(backed_up, claims, "every claim backed up");
    assert_eq!(not_reached, 0.0);
    assert!(
        on_node <= per_node && total <= fits,
        "over the limits: {on_node} on a node, {total} in all"
    );
    played.abort();
    watching.abort();
    setup.finish().await;
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        println!(
            "smoke run (cargo test): the bench works end to end; its figures mean nothing here. Measure with scripts/bench.sh."
        );
    }
    let (spawns, objects, elsewhere) = if quick {
        (3, 50, 200)
    } else {
        (100, 10_000, 100_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = cluster::client().await;
        // `cargo bench --bench controller -- night`: only the parts named.
        let only: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with("--"))
            .collect();
        let runs = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
        if runs("reaction") {
            reaction(&client, spawns).await;
        }
        if runs("memory") {
            memory(&client, objects, elsewhere).await;
        }
        if runs("night") {
            let (claims, nodes, attach, backup) = if quick {
                (30, 2, 4, 1)
            } else {
                (2000, 10, 16, 10)
            };
            night(claims, nodes, attach, Duration::from_secs(backup)).await;
        }
    });
}
