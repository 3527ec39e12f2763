//! The controller under test (tests/cluster/controller.rs, tests/cluster/restart.rs): a
//! test's own namespaces and tainted nodes, the controller run in-process as the
//! manifests' ServiceAccount, and the test playing the kubelet and Velero's schedule
//! controller (pkg/controller/schedule_controller.go, v1.18).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp, ToSpan};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use velero_jupyterhub::controller::{self, Config, LeaseOptions};
use velero_jupyterhub::metrics::{Metrics, sample};
use velero_jupyterhub::names;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::policy::helper::HelperOptions;
use velero_jupyterhub::policy::window::WindowOptions;

use super::cluster::{self, eventually, from_json, unique};

pub const HELPER_SELECTOR: &str = "app.kubernetes.io/component=backup-helper";

/// The z2jh user pod hardened to pass `restricted` (as locked-down hubs configure it):
/// no root init container, non-root, no privilege escalation, RuntimeDefault seccomp.
pub fn restricted_user_pod(user: &str) -> Pod {
    let mut pod = serde_json::to_value(cluster::user_pod(user)).expect("json");
    let spec = pod["spec"].as_object_mut().expect("spec");
    spec.remove("initContainers");
    spec.insert(
        "securityContext".into(),
        json!({"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}),
    );
    for c in spec["containers"].as_array_mut().expect("containers") {
        c["securityContext"] =
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    }
    pod["metadata"]["annotations"] = json!({});
    from_json(pod)
}

pub struct Setup {
    pub client: kube::Client,
    pub users: String,
    pub velero: String,
    pub nodes: Vec<String>,
    /// The taints of this test's nodes (the helpers tolerate them).
    pub taints: Value,
    pub as_controller: kube::Client,
    pub config: Config,
    pub controllers: Vec<Replica>,
}

/// One in-process controller replica.
pub struct Replica {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub metrics: Arc<Metrics>,
    /// What its probes read (the default deadline, 15 minutes).
    pub heartbeat: Arc<controller::heartbeat::Heartbeat>,
}

impl Replica {
    pub fn leads(&self) -> bool {
        self.metrics.controller.leader.get() == 1
    }

    pub fn writes(&self) -> f64 {
        let text = self.metrics.encode();
        ["create", "delete", "patch"]
            .iter()
            .filter_map(|verb| {
                sample(
                    &text,
                    &format!(
                        "velero_jupyterhub_api_writes_total{{verb=\"{verb}\",resource=\"pods\"}}"
                    ),
                )
            })
            .sum()
    }
}

impl Setup {
    /// Namespaces, nodes, RBAC, and one controller replica (more with [`Self::replica`]).
    pub async fn new() -> Self {
        Self::with_lease(Duration::from_secs(15)).await
    }

    pub async fn with_lease(lease: Duration) -> Self {
        Self::configured(lease, |_| {}).await
    }

    /// With the controller's configuration edited before its first replica starts.
    pub async fn configured(lease: Duration, edit: impl FnOnce(&mut Config)) -> Self {
        let client = cluster::client().await;
        let minor = cluster::server_minor(&client).await;
        assert!(
            minor >= 25,
            "needs Pod Security admission (v1.25+): run on the current test server"
        );
        cluster::install_velero_crds(&client).await;
        // Tests run side by side on one server: each controller manages only its test's
        // namespace (--namespace-selector), and schedules only onto its test's nodes.
        let run = unique("run");
        let users = cluster::labelled_namespace(&client, "vjh-ctl",
            json!({(names::NAMESPACE_ENABLED): "true", "pod-security.kubernetes.io/enforce": "restricted",
                   "vjh-test-run": run}),
        )
        .await;
        let velero = cluster::labelled_namespace(&client, "vjh-ctl", json!({})).await;
        let taints = json!([
            {"key": "hub.jupyter.org/dedicated", "value": "user", "effect": "NoSchedule"},
            {"key": cluster::TEST_TOLERATION_KEY, "value": run, "effect": "NoSchedule"},
        ]);
        let nodes = vec![unique("node-a"), unique("node-b")];
        for n in &nodes {
            cluster::ready_node(&client, n, taints.clone()).await;
        }
        let taints_kept = taints.clone();
        let mut tolerations: Vec<k8s_openapi::api::core::v1::Toleration> = from_json(json!([
            {"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user", "effect": "NoSchedule"},
        ]));
        tolerations.push(from_json(json!(
            {"key": cluster::TEST_TOLERATION_KEY, "operator": "Equal", "value": run, "effect": "NoSchedule"}
        )));
        // The controller runs as the manifests' ServiceAccount, with exactly what they grant.
        cluster::apply_rbac(&client).await;
        let sa = cluster::manifest("ServiceAccount", "velero-jupyterhub-controller");
        let own_namespace = sa["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
            .to_owned();
        let as_controller = cluster::client_as_service_account(
            &own_namespace,
            sa["metadata"]["name"].as_str().expect("name"),
        )
        .await;
        let config = Config {
            namespace: own_namespace,
            identity: "replica-a".to_owned(),
            velero_namespace: velero.clone(),
            namespace_selector: Some(format!("vjh-test-run={run}")),
            windows: WindowOptions {
                lead: SignedDuration::from_mins(10),
                max: SignedDuration::from_hours(6),
            },
            helper: HelperOptions {
                image: "registry.k8s.io/pause:3.10".to_owned(),
                tolerations,
                node_selector: BTreeMap::new(),
            },
            default_claims: Arc::new(ClaimGlobs::parse("claim-*").expect("globs")),
            // A Lease of this test's own: tests run side by side on one server.
            lease: LeaseOptions::with_duration(&unique("lease"), lease),
            // Short, so the restore tests see a failed helper kept and then deleted.
            failed_helper_ttl: SignedDuration::from_secs(6),
            stale_after: SignedDuration::from_hours(26),
            max_helpers: 200,
            helper_start_timeout: k8s_openapi::jiff::SignedDuration::from_mins(5),
            // Short: the tests' watches are healthy (cluster::restart's are not, and it
            // sets its own).
            wave_settle: SignedDuration::from_secs(1),
            headroom: velero_jupyterhub::policy::waves::Headroom::DEFAULT,
            user_pod_grace: SignedDuration::from_mins(10),
            certificates: None,
        };
        let mut config = config;
        edit(&mut config);
        let mut setup = Self {
            client,
            users,
            velero,
            nodes,
            taints: taints_kept,
            as_controller,
            config,
            controllers: vec![],
        };
        setup.replica("replica-a");
        setup
    }

    /// Starts another replica (same Lease) named `identity`.
    pub fn replica(&mut self, identity: &str) {
        let heartbeat = controller::heartbeat::Heartbeat::new(Duration::from_secs(900));
        self.replica_with(identity, self.as_controller.clone(), heartbeat);
    }

    /// Starts another replica (same Lease) named `identity`, acting as `client`, its probes
    /// judged by `heartbeat`.
    pub fn replica_with(
        &mut self,
        identity: &str,
        client: kube::Client,
        heartbeat: controller::heartbeat::Heartbeat,
    ) {
        let mut config = self.config.clone();
        config.identity = identity.to_owned();
        let metrics = Arc::new(Metrics::for_controller());
        let heartbeat = Arc::new(heartbeat);
        let stop = CancellationToken::new();
        let task = tokio::spawn(controller::run(
            client,
            config,
            metrics.clone(),
            heartbeat.clone(),
            stop.clone(),
        ));
        self.controllers.push(Replica {
            stop,
            task,
            metrics,
            heartbeat,
        });
    }

    /// Another Ready node of this test's.
    pub async fn add_node(&mut self) -> String {
        let name = unique("node-c");
        cluster::ready_node(&self.client, &name, self.taints.clone()).await;
        self.nodes.push(name.clone());
        name
    }

    /// A CSINode for each of this test's nodes: CSI `driver` attaches at most `count`
    /// volumes there (as a cloud's CSI node plugin reports it).
    pub async fn csinodes(&self, driver: &str, count: usize) {
        for node in &self.nodes {
            cluster::apply_dynamic(&self.client, &json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                "metadata": {"name": node},
                "spec": {"drivers": [{"name": driver, "nodeID": node, "allocatable": {"count": count}}]},
            }))
            .await;
        }
    }

    /// Idle user claims bound to volumes of CSI `driver`, each user named after their
    /// claim (`claim-<user>`), waiting up to `timeout` for the binder.
    pub async fn csi_claims(&self, claims: &[String], driver: &str, timeout: Duration) {
        let wanted: Vec<(String, String)> = claims
            .iter()
            .map(|c| (c.clone(), c.trim_start_matches("claim-").to_owned()))
            .collect();
        cluster::bound_claims(&self.client, &self.users, &wanted, Some(driver), timeout).await;
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.users)
    }

    /// A user's server as z2jh's user-scheduler places it (the test server does not run
    /// that scheduler): created, then bound to a node other than its claim's helper's.
    pub async fn start_server(&self, pod: &Pod) -> Pod {
        let created = self
            .pods()
            .create(&PostParams::default(), pod)
            .await
            .expect("the user's pod");
        let claims: Vec<String> = created
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
            .collect();
        let helper_nodes: Vec<String> = self
            .helpers()
            .await
            .iter()
            .filter(|h| {
                h.spec
                    .iter()
                    .flat_map(|s| s.volumes.iter().flatten())
                    .any(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| claims.contains(&c.claim_name))
                    })
            })
            .filter_map(|h| h.spec.as_ref()?.node_name.clone())
            .collect();
        let node = self
            .nodes
            .iter()
            .find(|n| !helper_nodes.contains(n))
            .unwrap_or(&self.nodes[0]);
        let name = created.metadata.name.clone().expect("name");
        cluster::bind(&self.pods(), &name, node).await;
        created
    }

    pub async fn helpers(&self) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(HELPER_SELECTOR))
            .await
            .expect("list helpers")
            .items
    }

    /// A Schedule whose next tick is a few minutes away (inside the lead time); returns
    /// the tick.
    pub async fn schedule(&self, name: &str) -> Timestamp {
        self.schedule_with(name, json!({})).await
    }

    /// The same, with `template` merged into its Backup template.
    pub async fn schedule_with(&self, name: &str, template: Value) -> Timestamp {
        let tick = Timestamp::now() + 5.minutes();
        let minute = tick.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).minute();
        let mut schedule = json!({
            "apiVersion": "velero.io/v1", "kind": "Schedule",
            "metadata": {"name": name, "namespace": self.velero},
            "spec": {"schedule": format!("CRON_TZ=UTC {minute} * * * *"),
                     "template": {"includedNamespaces": [self.users],
                                  "labelSelector": {"matchLabels": {"backup": "homes"}}}},
        });
        if let (Some(have), Value::Object(extra)) =
            (schedule["spec"]["template"].as_object_mut(), template)
        {
            have.extend(extra);
        }
        cluster::apply_dynamic(&self.client, &schedule).await;
        let s = tick.as_second();
        Timestamp::from_second(s - s.rem_euclid(60)).expect("minute")
    }

    pub async fn finish(self) {
        for r in self.controllers {
            r.stop.cancel();
            let _ = r.task.await;
        }
        for n in &self.nodes {
            cluster::delete_node(&self.client, n).await;
        }
        for ns in [&self.users, &self.velero] {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(ns, &Default::default())
                .await;
        }
    }
}

/// Plays Velero's schedule controller at `tick` (the test compresses time: the Backup is
/// created now, `lastBackup` says the tick, so the next tick is an hour later). The
/// Backup is named in the local time of a Velero server with `TZ=Asia/Kathmandu`
/// (+05:45), as Velero formats it (pkg/apis/velero/v1/schedule_types.go
/// `TimestampedName`, Go's local time), so the controller must not rebuild it in UTC.
pub async fn velero_creates_backup(
    setup: &Setup,
    schedule: &str,
    tick: Timestamp,
    phase: &str,
) -> String {
    let now = tick;
    let kathmandu = k8s_openapi::jiff::tz::TimeZone::fixed(
        k8s_openapi::jiff::tz::Offset::from_seconds(5 * 3600 + 45 * 60).expect("+05:45"),
    );
    let name = format!(
        "{schedule}-{}",
        now.to_zoned(kathmandu).strftime("%Y%m%d%H%M%S")
    );
    let backup = json!({
        "apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": name, "namespace": setup.velero,
                     "labels": {(names::VELERO_SCHEDULE_NAME): schedule}},
        "spec": {"includedNamespaces": [setup.users]},
    });
    cluster::apply_dynamic(&setup.client, &backup).await;
    set_status(setup, "backups", &name, json!({"phase": phase})).await;
    set_status(
        setup,
        "schedules",
        schedule,
        json!({"phase": "Enabled", "lastBackup": now.to_string()}),
    )
    .await;
    name
}

pub async fn set_status(setup: &Setup, plural: &str, name: &str, status: Value) {
    let kind = match plural {
        "backups" => "Backup",
        "podvolumebackups" => "PodVolumeBackup",
        "restores" => "Restore",
        "podvolumerestores" => "PodVolumeRestore",
        _ => "Schedule",
    };
    let api = dynamic(setup, kind, plural);
    // Velero's CRDs have no status subresource: Velero patches the object itself.
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .unwrap_or_else(|e| panic!("status of {plural}/{name}: {e}"));
}

/// Waits for two Running helpers (the test plays the kubelet) and returns their uids.
pub async fn two_running_helpers(setup: &Setup) -> Vec<String> {
    let helpers = eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        (hs.len() == 2).then_some(hs)
    })
    .await
    .expect("two helpers");
    for h in &helpers {
        cluster::set_phase(
            &setup.pods(),
            h.metadata.name.as_deref().expect("name"),
            "Running",
        )
        .await;
    }
    helpers
        .iter()
        .filter_map(|h| h.metadata.uid.clone())
        .collect()
}

pub fn dynamic(setup: &Setup, kind: &str, plural: &str) -> Api<kube::core::DynamicObject> {
    use kube::core::{ApiResource, GroupVersionKind};
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("velero.io", "v1", kind), plural);
    Api::namespaced_with(setup.client.clone(), &setup.velero, &ar)
}

/// A Completed PodVolumeBackup of `backup` (4 KiB), as pkg/podvolume/backupper.go
/// `newPodVolumeBackup` makes it, for `pod`'s `volume` of `claim` in the test namespace;
/// completed now.
pub async fn pod_volume_backup(setup: &Setup, backup: &str, pod: &str, volume: &str, claim: &str) {
    pod_volume_backup_at(setup, backup, pod, volume, claim, Timestamp::now()).await;
}

/// The same, completed at `at`.
pub async fn pod_volume_backup_at(
    setup: &Setup,
    backup: &str,
    pod: &str,
    volume: &str,
    claim: &str,
    at: Timestamp,
) {
    let name = unique(backup);
    cluster::apply_dynamic(&setup.client, &json!({
        "apiVersion": "velero.io/v1", "kind": "PodVolumeBackup",
        "metadata": {"name": name, "namespace": setup.velero,
            "labels": {(names::VELERO_BACKUP_NAME): backup},
            "annotations": {(names::VELERO_PVC_NAME): claim}},
        "spec": {"node": setup.nodes[0], "volume": volume, "uploaderType": "kopia",
            "backupStorageLocation": "default", "repoIdentifier": "",
            "pod": {"kind": "Pod", "namespace": setup.users, "name": pod, "uid": unique("uid")}},
    }))
    .await;
    let status = json!({"phase": "Completed", "completionTimestamp": at.to_string(),
        "progress": {"totalBytes": 4096, "bytesDone": 4096}});
    set_status(setup, "podvolumebackups", &name, status).await;
}
