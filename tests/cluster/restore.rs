//! Restores against the real API server: the test plays Velero exactly as its
//! source does (v1.18, cited per step), our webhook and controller run as the manifests'
//! ServiceAccounts, the real kube-scheduler places the restore helpers, and the test plays
//! the node-agent's PodVolumeRestores and KubeSpawner's spawn during the restore.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testkit::cluster::{self, Webhook, eventually, from_json, unique};
use testkit::controller::{Setup, dynamic, pod_volume_backup, restricted_user_pod, set_status};
use velero_jupyterhub::metrics::sample;
use velero_jupyterhub::names;

const VELERO_IMAGE: &str = "velero/velero:v1.18.1";

/// A pod from the backup, as Velero re-creates it in restore `restore` (uid `restore_uid`)
/// of backup `backup`, with PodVolumeBackups for `with_pvb`:
/// - pkg/restore/restore.go `resetMetadataAndStatus`: generateName, uid, resourceVersion,
///   creationTimestamp, ownerReferences… and status go; `addRestoreLabels` adds
///   `velero.io/backup-name` and `velero.io/restore-name` before the create call;
/// - pkg/restore/actions/pod_action.go: `spec.nodeName` and `spec.priority` cleared;
/// - pkg/restore/actions/pod_volume_restore_action.go: any restore-wait removed, then one
///   prepended (only if some volume has a PodVolumeBackup) named `restore-wait`, args the
///   Restore's uid, env POD_NAMESPACE/POD_NAME from fieldRefs, 100m/128Mi requests and
///   limits, the first container's securityContext copied (else Velero's restricted
///   default), and `/restores/<volume>` mounts for exactly those volumes.
fn velero_recreates(
    mut pod: Value,
    restore: &str,
    restore_uid: &str,
    backup: &str,
    with_pvb: &[&str],
) -> Value {
    let meta = pod["metadata"].as_object_mut().expect("metadata");
    for k in [
        "generateName",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "ownerReferences",
        "namespace",
    ] {
        meta.remove(k);
    }
    pod.as_object_mut().expect("pod").remove("status");
    pod["metadata"]["labels"]["velero.io/backup-name"] = backup.into();
    pod["metadata"]["labels"][names::VELERO_RESTORE_NAME] = restore.into();
    let spec = pod["spec"].as_object_mut().expect("spec");
    spec.remove("nodeName");
    spec.remove("priority");
    let mut init: Vec<Value> = spec
        .get("initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["name"] != "restore-wait" && c["name"] != "restic-wait")
        .collect();
    if !with_pvb.is_empty() {
        let security_context = spec["containers"][0]
            .get("securityContext")
            .cloned()
            .unwrap_or_else(|| {
                json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                   "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}})
            });
        let wait = json!({
            "name": "restore-wait", "image": VELERO_IMAGE,
            "command": ["/velero-restore-helper"], "args": [restore_uid],
            "env": [
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"cpu": "100m", "memory": "128Mi"}},
            "securityContext": security_context,
            "volumeMounts": with_pvb.iter()
                .map(|v| json!({"name": v, "mountPath": format!("/restores/{v}")}))
                .collect::<Vec<_>>(),
        });
        init.insert(0, wait);
    }
    if init.is_empty() {
        spec.remove("initContainers");
    } else {
        spec.insert("initContainers".into(), init.into());
    }
    pod
}

/// Every field of `sent` is in `stored` with the same value (the API server adds its
/// defaults, e.g. `terminationMessagePath`, and nothing else may differ).
fn is_subset(sent: &Value, stored: &Value) -> bool {
    match (sent, stored) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| is_subset(v, w))),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| is_subset(v, w))
        }
        _ => sent == stored,
    }
}

/// The z2jh hub's ServiceAccount, with the pod rights z2jh gives it (jupyterhub/templates/
/// hub/rbac.yaml: get, watch, list, create, delete; no patch).
async fn hub_client(client: &kube::Client, namespace: &str) -> kube::Client {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "hub", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims"],
                   "verbs": ["get", "watch", "list", "create", "delete"]}],
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "hub", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hub"},
        "subjects": [{"kind": "ServiceAccount", "name": "hub", "namespace": namespace}],
    });
    cluster::apply_dynamic(client, &role).await;
    cluster::apply_dynamic(client, &binding).await;
    cluster::client_as_service_account(namespace, "hub").await
}

/// The first Event about `kind`/`name` with `reason` in `namespace`.
async fn event(
    client: &kube::Client,
    namespace: &str,
    kind: &str,
    name: &str,
    reason: &str,
) -> Event {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!("involvedObject.kind={kind},involvedObject.name={name},reason={reason}");
    eventually(Duration::from_secs(20), || {
        let (api, selector) = (api.clone(), selector.clone());
        async move {
            let list = api
                .list(&ListParams::default().fields(&selector))
                .await
                .ok()?;
            list.items.into_iter().next()
        }
    })
    .await
    .unwrap_or_else(|| panic!("no {reason} Event about {kind} {namespace}/{name}"))
}

/// A PodVolumeRestore as pkg/podvolume/restorer.go `newPodVolumeRestore` makes it.
async fn pod_volume_restore(
    setup: &Setup,
    restore: &str,
    restore_uid: &str,
    pod: &Pod,
    volume: &str,
) -> String {
    let name = unique(&format!("{restore}-"));
    let uid = pod.metadata.uid.as_deref().expect("uid");
    let pvr = json!({
        "apiVersion": "velero.io/v1", "kind": "PodVolumeRestore",
        "metadata": {"name": name, "namespace": setup.velero, "labels": {
            (names::VELERO_RESTORE_NAME): restore, "velero.io/restore-uid": restore_uid,
            (names::VELERO_POD_UID): uid}},
        "spec": {"pod": {"kind": "Pod", "namespace": setup.users,
                         "name": pod.metadata.name, "uid": uid},
                 "volume": volume, "snapshotID": "4c3b2a1f0e9d8c7b", "backupStorageLocation": "default",
                 "repoIdentifier": "", "uploaderType": "kopia", "sourceNamespace": setup.users},
    });
    cluster::apply_dynamic(&setup.client, &pvr).await;
    set_status(
        setup,
        "podvolumerestores",
        &name,
        json!({"phase": "InProgress"}),
    )
    .await;
    name
}

/// The Nebari-shaped user pod of `user` (KubeSpawner with Nebari's spawner config): the
/// home claim as volume `home`, a second per-user claim, a shared RWX claim mounted with
/// `subPath`, a ConfigMap, and a (preferred) podAffinity.
fn nebari_pod(user: &str, shared_claim: &str) -> Value {
    let mut pod = serde_json::to_value(restricted_user_pod(user)).expect("json");
    pod["spec"]["volumes"] = json!([
        {"name": "home", "persistentVolumeClaim": {"claimName": format!("claim-{user}")}},
        {"name": "projects", "persistentVolumeClaim": {"claimName": format!("claim-{user}-projects")}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": shared_claim}},
        {"name": "etc-jupyter", "configMap": {"name": "etc-jupyter"}},
    ]);
    pod["spec"]["containers"][0]["volumeMounts"] = json!([
        {"name": "home", "mountPath": "/home/jovyan"},
        {"name": "projects", "mountPath": "/home/jovyan/projects"},
        {"name": "shared", "mountPath": "/shared/analysts", "subPath": "shared/analysts"},
        {"name": "etc-jupyter", "mountPath": "/etc/jupyter"},
    ]);
    pod["spec"]["affinity"] = json!({"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "dask-worker"}}}}]}});
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn velero_re_created_pods_become_restore_helpers_guarded_and_cleaned_up() {
    let setup = Setup::new().await;
    let client = setup.client.clone();
    assert!(
        cluster::server_minor(&client).await >= 30,
        "the restore guard's DELETE policy is a ValidatingAdmissionPolicy (v1.30+): run on the current test server"
    );
    let webhook = Webhook::start(&client).await;
    // Into the webhook's registration (its test label); Pod Security `restricted` so far.
    let ns = setup.users.clone();
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    let label = |labels: Value| {
        let namespaces = namespaces.clone();
        let ns = ns.clone();
        async move {
            let patch = Patch::Merge(json!({"metadata": {"labels": labels}}));
            namespaces
                .patch(&ns, &PatchParams::default(), &patch)
                .await
                .expect("label the namespace");
        }
    };
    label(json!({(cluster::TEST_LABEL): webhook.run_label})).await;
    let shared = unique("jupyterhub-shared");
    for (claim, user) in [
        ("claim-alice", "alice"),
        ("claim-bob", "bob"),
        ("claim-bob-projects", "bob"),
        (shared.as_str(), "none"),
        ("claim-carol", "carol"),
    ] {
        cluster::bound_claim(&client, &ns, claim, user).await;
    }

    // The Restore, as `velero restore create` makes it; Velero sets InProgress.
    let restore = unique("restore");
    let backup = "daily-20261128030000";
    let created = cluster::apply_dynamic(
        &client,
        &json!({"apiVersion": "velero.io/v1", "kind": "Restore",
                "metadata": {"name": restore, "namespace": setup.velero},
                "spec": {"backupName": backup, "includedNamespaces": [ns]}}),
    )
    .await;
    let restore_uid = created["metadata"]["uid"].as_str().expect("uid").to_owned();
    set_status(&setup, "restores", &restore, json!({"phase": "InProgress"})).await;
    // Velero restores claims before pods, labelled as everything it creates
    // (pkg/restore/restore.go `addRestoreLabels`): the users' claims come from this
    // Restore. erin's is older: her home exists, and this Restore does not update it.
    let claims_api: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &ns);
    for claim in [
        "claim-alice",
        "claim-bob",
        "claim-bob-projects",
        "claim-carol",
    ] {
        let labels = json!({"metadata": {"labels": {
            (names::VELERO_RESTORE_NAME): restore, (names::VELERO_BACKUP_NAME): backup}}});
        claims_api
            .patch(claim, &PatchParams::default(), &Patch::Merge(labels))
            .await
            .expect("Velero's claim");
    }
    cluster::bound_claim(&client, &ns, "claim-erin", "erin").await;

    // The pods in the backup. Each tolerates this test's nodes (as the hub's do theirs).
    let run_toleration = setup.config.helper.tolerations.clone();
    let with_tolerations = |mut pod: Value| {
        let mut tolerations = pod["spec"]["tolerations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        tolerations.extend(
            run_toleration
                .iter()
                .map(|t| serde_json::to_value(t).unwrap()),
        );
        pod["spec"]["tolerations"] = tolerations.into();
        pod
    };
    let mut alice = serde_json::to_value(cluster::user_pod("alice")).unwrap();
    alice["spec"]["nodeName"] = setup.nodes[0].clone().into();
    alice["status"] = json!({"phase": "Running"});
    alice["metadata"]["annotations"][names::VELERO_BACKUP_VOLUMES] = "volume-alice".into();
    let bob = nebari_pod("bob", &shared);
    let helper_options = setup.config.helper.clone();
    let carol = serde_json::to_value(velero_jupyterhub::policy::helper::backup_helper(
        &velero_jupyterhub::policy::helper::ClaimRef {
            namespace: &ns,
            name: "claim-carol",
            uid: "0c0c0c0c-0000-4000-8000-000000000001",
            username: Some("carol"),
        },
        velero_jupyterhub::policy::helper::own_labels(Some("carol")),
        &helper_options,
    ))
    .unwrap();
    // dave's server was in the backup, but none of its volumes was backed up.
    let dave = serde_json::to_value(cluster::user_pod("dave")).unwrap();
    let backed_up = [
        (alice, vec!["volume-alice"]),
        (bob, vec!["home", "projects"]),
        (carol, vec![velero_jupyterhub::policy::helper::VOLUME]),
        (dave, vec![]),
    ];

    let pods = setup.pods();
    let velero_pods = cluster::velero_pods(&client, &ns).await;
    // In a `restricted` namespace, the restore helper of a pod whose container is
    // restricted (Velero copies its securityContext to restore-wait) passes Pod Security;
    // that of a stock z2jh pod does not, because of Velero's restore-wait alone.
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for (pod, volumes) in &backed_up {
        let sent = velero_recreates(
            with_tolerations(pod.clone()),
            &restore,
            &restore_uid,
            backup,
            volumes,
        );
        let stock_z2jh = sent["spec"]["initContainers"].as_array().is_some_and(|i| {
            i.iter().any(|c| c["name"] == "block-cloud-metadata")
                && i.iter().any(|c| c["name"] == "restore-wait")
        });
        let sent: Pod = from_json(sent);
        let outcome = eventually(Duration::from_secs(20), || {
            let (velero_pods, sent, dry_run) = (velero_pods.clone(), sent.clone(), dry_run.clone());
            async move {
                match velero_pods.create(&dry_run, &sent).await {
                    // Converted by the webhook (its registration may take a moment).
                    Ok(p) if p.spec.as_ref()?.containers[0].name == "restore-helper" => {
                        Some(Ok(()))
                    }
                    Ok(_) => None,
                    Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => {
                        Some(Err(e.message))
                    }
                    Err(_) => None,
                }
            }
        })
        .await
        .expect("an answer");
        match (stock_z2jh, outcome) {
            (false, Ok(())) => {}
            (true, Err(message)) => assert!(
                message.contains(r#"container "restore-wait""#)
                    && !message.contains(r#"container "restore-helper""#),
                "{message}"
            ),
            (stock, outcome) => panic!("stock z2jh {stock}: {outcome:?}"),
        }
    }
    // Then `baseline`, as z2jh's own pods (a privileged init container) need.
    label(json!({"pod-security.kubernetes.io/enforce": "baseline",
                 "pod-security.kubernetes.io/warn": "restricted"}))
    .await;
    let mut stored = BTreeMap::new();
    for (pod, volumes) in backed_up {
        let sent = velero_recreates(
            with_tolerations(pod),
            &restore,
            &restore_uid,
            backup,
            &volumes,
        );
        let name = sent["metadata"]["name"].as_str().unwrap().to_owned();
        // As Velero: a plain create (pkg/restore/restore.go `createResource`).
        let got = velero_pods
            .create(&PostParams::default(), &from_json(sent.clone()))
            .await
            .unwrap_or_else(|e| panic!("Velero's create of {name}: {e}"));
        let got = serde_json::to_value(got).unwrap();
        assert_restore_helper(&sent, &got, &volumes, &helper_options.image);
        stored.insert(name, (sent, got));
    }
    let carol_name = velero_jupyterhub::policy::helper::helper_name("claim-carol");
    // Nebari's pod: the shared claim and the ConfigMap are gone; podAffinity kept.
    let (bob_sent, bob_got) = &stored["jupyter-bob"];
    assert_eq!(bob_got["spec"]["affinity"], bob_sent["spec"]["affinity"]);
    let kept: Vec<&str> = bob_got["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["home", "projects"]);
    // The backup helper's read-only claim is writable now (the node-agent writes to it).
    let (_, carol_got) = &stored[&carol_name];
    assert_eq!(
        carol_got["spec"]["volumes"][0]["persistentVolumeClaim"].get("readOnly"),
        None
    );

    // erin's backup helper, re-created: its restore would write over her current home
    // (Kopia overwrites same-named files). Refused: Velero records the message among the
    // Restore's errors, and the claim says so too.
    let erin = velero_recreates(
        with_tolerations(
            serde_json::to_value(velero_jupyterhub::policy::helper::backup_helper(
                &velero_jupyterhub::policy::helper::ClaimRef {
                    namespace: &ns,
                    name: "claim-erin",
                    uid: "0e0e0e0e-0000-4000-8000-000000000001",
                    username: Some("erin"),
                },
                velero_jupyterhub::policy::helper::own_labels(Some("erin")),
                &helper_options,
            ))
            .unwrap(),
        ),
        &restore,
        &restore_uid,
        backup,
        &[velero_jupyterhub::policy::helper::VOLUME],
    );
    let err = velero_pods
        .create(&PostParams::default(), &from_json(erin))
        .await
        .expect_err("no restore into a home that existed before it");
    let message = err.to_string();
    assert!(
        message.contains("claim claim-erin existed before this restore")
            && message.contains("--existing-resource-policy=update"),
        "{message}"
    );
    let refused = eventually(Duration::from_secs(20), || {
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        async move {
            events
                .list(&ListParams::default().fields("involvedObject.name=claim-erin"))
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("RestoreRefused"))
        }
    })
    .await
    .expect("a RestoreRefused Event on erin's claim");
    assert!(
        refused.message.unwrap_or_default().contains(&restore),
        "the Event names the Restore"
    );

    // Anyone but Velero creating a pod that would become a restore helper (and so lock a
    // user out of their home) is refused, whatever their pod rights. Mallory's forgery
    // mounts her own claim, which no restore is writing: one being restored (alice's) is
    // refused by the restore guard too, whichever policy the API server asks first.
    let forged = velero_recreates(
        with_tolerations(serde_json::to_value(cluster::user_pod("mallory")).unwrap()),
        &restore,
        &restore_uid,
        backup,
        &["volume-mallory"],
    );
    let err = pods
        .create(&PostParams::default(), &from_json(forged))
        .await
        .expect_err("only Velero creates restore helpers");
    assert!(
        err.to_string()
            .contains("only Velero creates restore helpers"),
        "{err}"
    );
    // Nor can an existing pod be made one by an update; other updates of ordinary pods
    // are not its business.
    let plain = pods
        .create(&PostParams::default(), &restricted_user_pod("mallory"))
        .await
        .expect("an ordinary pod");
    let plain = plain.metadata.name.expect("name");
    let relabel = |labels: Value| Patch::Merge(json!({"metadata": {"labels": labels}}));
    let err = pods
        .patch(
            &plain,
            &PatchParams::default(),
            &relabel(json!({
                (names::MANAGED_BY): names::MANAGED_BY_US,
                (names::COMPONENT): names::RESTORE_HELPER,
                (names::VELERO_RESTORE_NAME): restore,
            })),
        )
        .await
        .expect_err("a pod cannot be relabelled into a restore helper");
    assert!(
        err.to_string()
            .contains("cannot be given a restore helper's labels"),
        "{err}"
    );
    pods.patch(
        &plain,
        &PatchParams::default(),
        &relabel(json!({"team": "blue"})),
    )
    .await
    .expect("other label changes are left alone");
    pods.delete(&plain, &DeleteParams::default())
        .await
        .expect("delete mallory's pod");

    // dave's had nothing to restore: the controller deletes it at once.
    eventually(Duration::from_secs(20), || async {
        pods.get_opt("jupyter-dave")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .expect("a restore helper with nothing to restore is deleted");
    stored.remove("jupyter-dave");

    // The real kube-scheduler places each one (no z2jh user-scheduler needed).
    for name in stored.keys() {
        let node = eventually(Duration::from_secs(30), || {
            let pods = pods.clone();
            async move { pods.get(name).await.ok()?.spec?.node_name }
        })
        .await
        .unwrap_or_else(|| panic!("the scheduler did not place {name}"));
        assert!(setup.nodes.contains(&node), "{name} on {node}");
    }
    // The kubelet starts them (the test plays it: restore-wait waits for the node-agent).
    for name in stored.keys() {
        cluster::set_phase(&pods, name, "Pending").await;
    }

    // KubeSpawner spawns alice meanwhile. Admission runs before the name is checked, so
    // the webhook's guard answers first (mutating webhooks run before validating
    // policies), with a message the hub shows the user. It reads the claims being
    // restored from the namespace, where the controller records them (the webhook
    // reads no pods).
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    eventually(Duration::from_secs(20), || async {
        let n = namespaces.get(&ns).await.ok()?;
        let recorded = n
            .metadata
            .annotations?
            .get(names::NAMESPACE_RESTORING_CLAIMS)?
            .clone();
        recorded
            .split(',')
            .any(|c| c == "claim-alice")
            .then_some(())
    })
    .await
    .expect("the controller records alice's claim as being restored");
    let hub = hub_client(&client, &ns).await;
    let hub_pods: Api<Pod> = Api::namespaced(hub.clone(), &ns);
    let want =
        "home volume claim-alice is being restored by Velero; try again when the restore completes";
    let err = hub_pods
        .create(&PostParams::default(), &cluster::user_pod("alice"))
        .await
        .expect_err("the restore guard refuses it");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403 && e.message.contains(want)),
        "{err}"
    );
    // With the webhook missed (failurePolicy Ignore), KubeSpawner would get a 409 and
    // delete the pod that has the name: the guard policy refuses that, in the API server.
    let err = hub_pods
        .delete("jupyter-alice", &DeleteParams::default())
        .await
        .expect_err("the guard refuses KubeSpawner's delete");
    let message = err.to_string();
    assert!(
        message.contains("is restoring home volumes for Velero restore")
            && message.contains(&restore),
        "{message}"
    );
    assert!(
        message.contains("velero-jupyterhub.io/allow-delete=true"),
        "the refusal says how an administrator forces it: {message}"
    );
    assert!(
        pods.get_opt("jupyter-alice").await.unwrap().is_some(),
        "the helper survives"
    );
    // An administrator forces it as README says: annotates it; then anyone may delete it,
    // here the hub (a server-side dry run: the policy judges it like a real delete, and
    // the restore goes on); the annotation goes again.
    let allow = |value: Option<&str>| {
        Patch::Merge(
            json!({"metadata": {"annotations": {"velero-jupyterhub.io/allow-delete": value}}}),
        )
    };
    pods.patch(
        "jupyter-alice",
        &PatchParams::default(),
        &allow(Some("true")),
    )
    .await
    .expect("an administrator annotates the helper");
    let dry_run = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    hub_pods
        .delete("jupyter-alice", &dry_run)
        .await
        .expect("deleting an annotated restore helper is allowed");
    pods.patch("jupyter-alice", &PatchParams::default(), &allow(None))
        .await
        .expect("the annotation removed");
    let err = hub_pods
        .delete("jupyter-alice", &dry_run)
        .await
        .expect_err("without the annotation the guard holds again");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403
            && e.message.contains("is restoring home volumes")
            && e.message.contains("allow-delete")),
        "{err}"
    );
    // A named server of alice's mounting the same claim: the webhook refuses it, clearly.
    let mut named = serde_json::to_value(restricted_user_pod("alice")).unwrap();
    named["metadata"]["name"] = "jupyter-alice--gpu".into();
    let err = hub_pods
        .create(&PostParams::default(), &from_json(named.clone()))
        .await
        .expect_err("the restore guard refuses it");
    assert!(err.to_string().contains(want), "{err}");

    // The node-agent fills the volumes (pkg/podvolume/restorer.go: one PodVolumeRestore
    // per volume, labelled with the pod's uid) …
    let uid_of = |name: &str| from_json::<Pod>(stored[name].1.clone());
    let alice_pod = uid_of("jupyter-alice");
    let bob_pod = uid_of("jupyter-bob");
    let carol_pod = uid_of(&carol_name);
    let pvr_alice =
        pod_volume_restore(&setup, &restore, &restore_uid, &alice_pod, "volume-alice").await;
    let pvr_bob_home = pod_volume_restore(&setup, &restore, &restore_uid, &bob_pod, "home").await;
    let pvr_bob_projects =
        pod_volume_restore(&setup, &restore, &restore_uid, &bob_pod, "projects").await;
    let pvr_carol = pod_volume_restore(
        &setup,
        &restore,
        &restore_uid,
        &carol_pod,
        velero_jupyterhub::policy::helper::VOLUME,
    )
    .await;
    // … and while they run, every helper stays.
    let metrics = setup.controllers[0].metrics.clone();
    eventually(Duration::from_secs(20), || async {
        let text = metrics.encode();
        (sample(
            &text,
            r#"velero_jupyterhub_restore_helpers{state="restoring"}"#,
        ) == Some(3.0))
        .then_some(())
    })
    .await
    .expect("three restore helpers restoring");
    assert_eq!(
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=restore-helper"))
            .await
            .unwrap()
            .items
            .len(),
        3
    );

    let done = |bytes: i64| {
        json!({"phase": "Completed", "progress": {"totalBytes": bytes, "bytesDone": bytes},
               "completionTimestamp": k8s_openapi::jiff::Timestamp::now().to_string()})
    };
    set_status(&setup, "podvolumerestores", &pvr_alice, done(1_048_576)).await;
    set_status(&setup, "podvolumerestores", &pvr_carol, done(4096)).await;
    set_status(&setup, "podvolumerestores", &pvr_bob_home, done(2048)).await;
    set_status(
        &setup,
        "podvolumerestores",
        &pvr_bob_projects,
        json!({"phase": "Failed", "message": "error restoring volume: repository not found",
               "completionTimestamp": k8s_openapi::jiff::Timestamp::now().to_string()}),
    )
    .await;
    // Velero's Restore ends once its PodVolumeRestores have (pkg/restore/restore.go waits
    // for them; a failed one is an error): PartiallyFailed. Until then the claims it made
    // count as being restored, and no one may mount them.
    set_status(
        &setup,
        "restores",
        &restore,
        json!({"phase": "PartiallyFailed"}),
    )
    .await;

    // restore-wait has not exited yet (the pod is still Pending): the helper stays, so
    // restore-wait can clean the node-agent's marker out of the home.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        pods.get_opt("jupyter-alice").await.unwrap().is_some(),
        "not deleted before restore-wait exits"
    );
    // restore-wait sees the node-agent's done-file and exits; the helper's container runs
    // (the test plays the kubelet). Only then is a completed helper deleted.
    for name in ["jupyter-alice", carol_name.as_str(), "jupyter-bob"] {
        cluster::set_phase(&pods, name, "Running").await;
    }
    // Completed: deleted, and the claim says what came back.
    for name in ["jupyter-alice", carol_name.as_str()] {
        eventually(Duration::from_secs(20), || async {
            pods.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{name} deleted once restored"));
    }
    let restored = event(
        &client,
        &ns,
        "PersistentVolumeClaim",
        "claim-alice",
        "Restored",
    )
    .await;
    assert_eq!(
        restored.message.as_deref().unwrap_or_default(),
        format!(
            "restored from backup {backup} by restore {restore} (1048576 bytes, volume volume-alice of pod jupyter-alice)"
        )
    );
    // Failed: a Warning on the claim, the helper kept for inspection …
    let failed = event(
        &client,
        &ns,
        "PersistentVolumeClaim",
        "claim-bob-projects",
        "RestoreFailed",
    )
    .await;
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    let message = failed.message.unwrap_or_default();
    assert!(
        message.contains(
            "did not restore volume projects (Failed): error restoring volume: repository not found"
        ) && message.contains("kept until"),
        "{message}"
    );
    assert!(
        pods.get_opt("jupyter-bob").await.unwrap().is_some(),
        "kept for inspection"
    );
    let text = metrics.encode();
    assert_eq!(
        sample(
            &text,
            r#"velero_jupyterhub_restore_helpers{state="failed"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "velero_jupyterhub_restored_bytes_total"),
        Some(1_048_576.0 + 4096.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "velero_jupyterhub_restore_volumes_failed_total"),
        Some(1.0),
        "{text}"
    );
    // … then deleted after --failed-helper-ttl (6 s in these tests).
    eventually(Duration::from_secs(30), || async {
        pods.get_opt("jupyter-bob")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .expect("the failed helper is deleted after its time");

    // The restore is over for alice: her server starts, and gets its backup annotation.
    let created = eventually(Duration::from_secs(20), || {
        let hub_pods = hub_pods.clone();
        async move {
            hub_pods
                .create(&PostParams::default(), &restricted_user_pod("alice"))
                .await
                .ok()
        }
    })
    .await
    .expect("alice's server starts once the restore is done");
    assert_eq!(cluster::backup_volumes(&created), Some("volume-alice"));
    let _ = hub_pods
        .create(&PostParams::default(), &from_json(named))
        .await
        .expect("the named server too");

    // Nothing else was touched: the webhook counted what it did per entry.
    let text = webhook.server.metrics.encode();
    // Each pod converted once by the dry run and once for real, and the forged one (then
    // refused by the origin policy).
    let converted = r#"velero_jupyterhub_admission_requests_total{webhook="restore",outcome="restore_converted"}"#;
    assert_eq!(sample(&text, converted), Some(9.0), "{text}");
    // The live entry never saw a restored pod: the restore entries come first and convert.
    let live_conversions = text
        .lines()
        .filter(|l| l.contains(r#"webhook="live",outcome="restore_"#) && !l.contains("guard"))
        .count();
    assert_eq!(live_conversions, 0, "{text}");
    let refused = r#"velero_jupyterhub_admission_requests_total{webhook="restore",outcome="restore_refused_existing"}"#;
    assert!(sample(&text, refused).is_some_and(|n| n >= 1.0), "{text}");
    let guarded = r#"velero_jupyterhub_admission_requests_total{webhook="live",outcome="restore_guard_denied"}"#;
    assert_eq!(sample(&text, guarded), Some(2.0), "{text}");
    // Every later call (the restore-helper entry after restore-user, reinvocations)
    // found nothing to change: each pod was converted exactly once.
    let no_op = r#"velero_jupyterhub_admission_requests_total{webhook="restore",outcome="restore_already_converted"}"#;
    assert!(sample(&text, no_op).is_some_and(|n| n >= 3.0), "{text}");
    let restore_lines = text
        .lines()
        .filter(|l| l.contains(r#"webhook="restore""#))
        .count();
    assert_eq!(
        restore_lines, 3,
        "only conversions, no-ops and erin's refusal on the restore path: {text}"
    );

    let _ = dynamic(&setup, "Restore", "restores")
        .delete(&restore, &DeleteParams::default())
        .await;
    webhook.finish().await;
    setup.finish().await;
}

/// The restore helper as stored, field by field, against the pod Velero sent.
fn assert_restore_helper(sent: &Value, got: &Value, restored: &[&str], image: &str) {
    let name = got["metadata"]["name"].as_str().unwrap_or_default();
    let spec = &got["spec"];
    let init = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if restored.is_empty() {
        assert!(
            init.is_empty(),
            "{name}: no restore-wait, no init container"
        );
        assert!(spec.get("volumes").is_none(), "{name}: {spec}");
    } else {
        // restore-wait first, alone, and as Velero sent it (plus the API server's defaults).
        assert_eq!(init.len(), 1, "{name}: {init:?}");
        assert!(
            is_subset(&sent["spec"]["initContainers"][0], &init[0]),
            "{name}: {:?}",
            init[0]
        );
        let volumes: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(volumes, restored, "{name}: exactly the restored volumes");
        for v in spec["volumes"].as_array().unwrap() {
            assert!(
                v["persistentVolumeClaim"].get("readOnly").is_none(),
                "{name}: {v}"
            );
        }
    }
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{name}");
    let c = &containers[0];
    assert_eq!(
        (c["name"].as_str(), c["image"].as_str()),
        (Some("restore-helper"), Some(image))
    );
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap(),
                        m["mountPath"].as_str().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let want: Vec<(String, String)> = restored
        .iter()
        .map(|v| (v.to_string(), format!("/volumes/{v}")))
        .collect();
    let want: Vec<(&str, &str)> = want.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(mounts, want, "{name}");
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"], false,
        "{name}"
    );
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        json!(["ALL"]),
        "{name}"
    );
    assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
    assert_eq!(spec["serviceAccountName"], "default", "{name}");
    assert_eq!(
        spec["schedulerName"], "default-scheduler",
        "{name}: the API server's default"
    );
    assert!(spec.get("priorityClassName").is_none(), "{name}");
    // Our container is restricted on its own; the pod keeps its own security context,
    // under which Velero's copy of the user's container (restore-wait) must start.
    assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(
        c["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{name}"
    );
    assert_eq!(
        spec.get("securityContext"),
        sent["spec"].get("securityContext"),
        "{name}: the pod's own security context"
    );
    // Placement kept (the DefaultTolerationSeconds admission plugin adds its own).
    let stored_tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for t in sent["spec"]["tolerations"].as_array().into_iter().flatten() {
        assert!(stored_tolerations.contains(t), "{name}: {t} kept");
    }
    assert_eq!(
        spec["securityContext"].get("fsGroup"),
        sent["spec"]["securityContext"].get("fsGroup"),
        "{name}: the pod's fsGroup kept"
    );
    let labels = &got["metadata"]["labels"];
    assert_eq!(labels[names::MANAGED_BY], names::MANAGED_BY_US, "{name}");
    assert_eq!(labels[names::COMPONENT], names::RESTORE_HELPER, "{name}");
    assert!(labels.get("component").is_none(), "{name}: {labels}");
    assert!(
        labels.get("hub.jupyter.org/network-access-hub").is_none(),
        "{name}"
    );
    assert_eq!(
        labels[names::VELERO_RESTORE_NAME],
        sent["metadata"]["labels"][names::VELERO_RESTORE_NAME]
    );
    assert_eq!(
        labels[names::JUPYTERHUB_USERNAME],
        sent["metadata"]["labels"][names::JUPYTERHUB_USERNAME]
    );
    let annotations = &got["metadata"]["annotations"];
    assert!(
        annotations.get(names::VELERO_BACKUP_VOLUMES).is_none(),
        "{name}: {annotations}"
    );
    assert_eq!(annotations["sidecar.istio.io/inject"], "false", "{name}");
}

/// A user bound to the restore ClusterRole only (manifests/restore-role.yaml).
async fn restore_operator(client: &kube::Client) -> String {
    let operator = unique("operator");
    cluster::apply_dynamic(client, &json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": operator},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "velero-jupyterhub-restore"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": operator}],
    }))
    .await;
    operator
}

async fn run_restore(
    setup: &Setup,
    kubeconfig: &std::path::Path,
    namespace: &str,
    backup: &str,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_velero-jupyterhub"))
        .args([
            "restore",
            "--namespace",
            namespace,
            "--from-backup",
            backup,
            "--wait",
        ])
        .args(["--velero-namespace", &setup.velero])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("restore runs")
}

async fn finished(child: tokio::process::Child) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("restore ended in time")
        .expect("restore ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("{stderr}\n{stdout}");
    (output.status.code(), stdout, stderr)
}

/// Waits for the command's Restore, and returns it.
async fn the_restore(setup: &Setup, seen: &[String]) -> Value {
    let restores = dynamic(setup, "Restore", "restores");
    let restore = eventually(Duration::from_secs(60), || async {
        let list = restores.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|r| !seen.contains(r.metadata.name.as_ref().unwrap()))
    })
    .await
    .expect("the command created a Restore");
    serde_json::to_value(restore).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_command_checks_first_then_restores_and_reports_each_claim() {
    let setup = Setup::new().await;
    let client = setup.client.clone();
    let webhook = Webhook::start(&client).await;
    let ns = setup.users.clone();
    let patch = Patch::Merge(json!({"metadata": {"labels": {
        (cluster::TEST_LABEL): webhook.run_label, "pod-security.kubernetes.io/enforce": "baseline"}}}));
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(&ns, &PatchParams::default(), &patch)
        .await
        .expect("label the namespace");
    let operator = restore_operator(&client).await;
    let kubeconfig = cluster::kubeconfig_as(&operator);

    // The Backup: alice's home through her running server, bob's through a backup
    // helper; carol's claim was never backed up.
    let backup = unique("daily");
    cluster::apply_dynamic(
        &client,
        &json!({"apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": backup, "namespace": setup.velero},
        "spec": {"includedNamespaces": [ns]}}),
    )
    .await;
    set_status(&setup, "backups", &backup, json!({"phase": "Completed"})).await;
    pod_volume_backup(
        &setup,
        &backup,
        "jupyter-alice",
        "volume-alice",
        "claim-alice",
    )
    .await;
    let bob_helper = velero_jupyterhub::policy::helper::helper_name("claim-bob");
    pod_volume_backup(&setup, &backup, &bob_helper, "data", "claim-bob").await;

    // Now: alice's server runs on her claim; carol's claim exists; bob's is gone.
    cluster::bound_claim(&client, &ns, "claim-alice", "alice").await;
    cluster::bound_claim(&client, &ns, "claim-carol", "carol").await;
    let pods = setup.pods();
    pods.create(&PostParams::default(), &restricted_user_pod("alice"))
        .await
        .expect("alice's server");
    cluster::bind(&pods, "jupyter-alice", &setup.nodes[0]).await;
    cluster::set_phase(&pods, "jupyter-alice", "Running").await;

    // A namespace whose restored pods the webhook would not convert: refused.
    let unguarded = cluster::labelled_namespace(
        &client,
        "vjh-ctl",
        json!({(names::NAMESPACE_ENABLED): "true"}),
    )
    .await;
    let (code, _, stderr) =
        finished(run_restore(&setup, kubeconfig.path(), &unguarded, &backup, &[]).await).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("webhook did not convert a restored pod"),
        "{stderr}"
    );

    // The whole namespace: refused, naming every reason, and nothing created.
    let (code, _, stderr) =
        finished(run_restore(&setup, kubeconfig.path(), &ns, &backup, &[]).await).await;
    assert_eq!(code, Some(1), "{stderr}");
    for want in [
        "user alice's server jupyter-alice is running: stop it first",
        "claim claim-alice exists: Velero would write the backup's files over its current files",
        "claim claim-carol exists",
    ] {
        assert!(stderr.contains(want), "{want:?} in {stderr}");
    }
    let restores = dynamic(&setup, "Restore", "restores");
    assert!(
        restores
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // bob alone: allowed. The test plays Velero for the Restore it creates.
    let child = run_restore(&setup, kubeconfig.path(), &ns, &backup, &["--user", "bob"]).await;
    let restore = the_restore(&setup, &[]).await;
    let restore_name = restore["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(restore["spec"]["backupName"], backup.as_str());
    assert_eq!(restore["spec"]["includedNamespaces"], json!([ns]));
    assert_eq!(
        restore["spec"]["includedResources"],
        json!(["pods", "persistentvolumeclaims", "persistentvolumes"]),
        "Velero makes PodVolumeRestores only with claims and volumes included (restore.go)"
    );
    assert_eq!(
        restore["spec"]["labelSelector"],
        json!({"matchExpressions": [{"key": "hub.jupyter.org/username", "operator": "In", "values": ["bob"]}]})
    );
    set_status(
        &setup,
        "restores",
        &restore_name,
        json!({"phase": "InProgress"}),
    )
    .await;
    // Before its Restore existed, the command recorded the claim it restores on the
    // namespace: from then on no pod but Velero's may mount it (a ValidatingAdmissionPolicy
    // in the API server: it holds before Velero re-creates anything, and whether or not
    // our webhook is up). KubeSpawner spawning bob now is refused, saying why.
    let annotations = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get(&ns)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default();
    assert_eq!(
        annotations
            .get(names::NAMESPACE_RESTORING_CLAIMS)
            .map(String::as_str),
        Some("claim-bob"),
        "{annotations:?}"
    );
    assert!(annotations.contains_key(names::NAMESPACE_RESTORING_SINCE));
    assert_eq!(
        annotations.get(names::NAMESPACE_RESTORING_RESTORES),
        Some(&restore_name),
        "the Restore it is for"
    );
    let err = pods
        .create(&PostParams::default(), &restricted_user_pod("bob"))
        .await
        .expect_err("bob's home is being restored");
    assert!(
        err.to_string()
            .contains("home volume claim-bob is being restored by Velero"),
        "{err}"
    );
    // Velero re-creates bob's claim (labelled as all it creates, restore.go
    // `addRestoreLabels`), then his helper (restore-wait for `data`).
    cluster::bound_claim(&client, &ns, "claim-bob", "bob").await;
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .patch(
            "claim-bob",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                (names::VELERO_RESTORE_NAME): restore_name, (names::VELERO_BACKUP_NAME): backup}}})),
        )
        .await
        .expect("Velero's claim");
    let helper = serde_json::to_value(velero_jupyterhub::policy::helper::backup_helper(
        &velero_jupyterhub::policy::helper::ClaimRef {
            namespace: &ns,
            name: "claim-bob",
            uid: "u",
            username: Some("bob"),
        },
        velero_jupyterhub::policy::helper::own_labels(Some("bob")),
        &setup.config.helper,
    ))
    .unwrap();
    let restore_uid = restore["metadata"]["uid"].as_str().unwrap().to_owned();
    let sent = velero_recreates(helper, &restore_name, &restore_uid, &backup, &["data"]);
    let created = cluster::velero_pods(&client, &ns)
        .await
        .create(&PostParams::default(), &from_json(sent))
        .await
        .expect("Velero's create");
    let claim_uid =
        Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client.clone(), &ns)
            .get("claim-bob")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap();
    let pvr = pod_volume_restore(&setup, &restore_name, &restore_uid, &created, "data").await;
    dynamic(&setup, "PodVolumeRestore", "podvolumerestores")
        .patch(
            &pvr,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {(names::VELERO_PVC_UID): claim_uid}}})),
        )
        .await
        .unwrap();
    set_status(
        &setup,
        "podvolumerestores",
        &pvr,
        json!({"phase": "Completed",
        "progress": {"totalBytes": 4096, "bytesDone": 4096}}),
    )
    .await;
    set_status(
        &setup,
        "restores",
        &restore_name,
        json!({"phase": "Completed"}),
    )
    .await;
    let (code, stdout, stderr) = finished(child).await;
    assert_eq!(code, Some(0), "{stderr}\n{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("claim-bob "))
        .unwrap_or_default();
    assert!(
        row.contains("restored") && row.contains("4.0 KiB"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 1 claims restored"), "{stdout}");
    assert!(
        stderr.contains("1 of 1 volumes done"),
        "a progress line: {stderr}"
    );

    // carol, into her existing claim: allowed with the flag; the Backup holds nothing of
    // hers, so nothing comes back, and the row says why (exit 2).
    let child = run_restore(
        &setup,
        kubeconfig.path(),
        &ns,
        &backup,
        &["--user", "carol", "--into-existing"],
    )
    .await;
    let restore = the_restore(&setup, &[restore_name]).await;
    let carol_restore = restore["metadata"]["name"].as_str().unwrap().to_owned();
    // Writing into what exists, in Velero's words: the Restore updates existing objects
    // (Velero then labels carol's claim with it, and our webhook lets it be written).
    assert_eq!(restore["spec"]["existingResourcePolicy"], "update");
    set_status(
        &setup,
        "restores",
        &carol_restore,
        json!({"phase": "Completed"}),
    )
    .await;
    let (code, stdout, stderr) = finished(child).await;
    assert_eq!(code, Some(2), "{stderr}\n{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("claim-carol "))
        .unwrap_or_default();
    assert!(
        row.contains("NOT restored") && row.contains("holds no file-system copy"),
        "{stdout}"
    );

    for r in [&carol_restore] {
        let _ = dynamic(&setup, "Restore", "restores")
            .delete(r, &DeleteParams::default())
            .await;
    }
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(&unguarded, &DeleteParams::default())
        .await;
    webhook.finish().await;
    setup.finish().await;
}

/// A restore while a backup window is open: the controller takes no claim Velero is about
/// to restore. From the moment the Restore is seen (New), the backup helper of a claim its
/// Backup holds is deleted (Velero re-creates a pod of that very name: finding ours, it
/// would skip it and not restore the volume), none is made for the claim Velero re-creates,
/// the namespace records the claim (and the API server refuses anyone else's pod on it),
/// and when the Restore is over all of that is undone.
#[tokio::test]
async fn a_restore_under_way_keeps_backup_helpers_and_users_off_the_claims_it_restores() {
    let setup = Setup::new().await;
    let client = setup.client.clone();
    let ns = setup.users.clone();
    for (claim, user) in [("claim-alice", "alice"), ("claim-bob", "bob")] {
        cluster::bound_claim(&client, &ns, claim, user).await;
    }
    setup.schedule("homes").await;
    let pods = setup.pods();
    let helper_of = |claim: &str| velero_jupyterhub::policy::helper::helper_name(claim);
    let helpers_now = || async {
        let mut names: Vec<String> = setup
            .helpers()
            .await
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        names
    };
    eventually(Duration::from_secs(30), || async {
        (helpers_now().await.len() == 2).then_some(())
    })
    .await
    .expect("the window's two helpers");

    // Last night's Backup holds alice's home (through her helper); a Restore of it is
    // made, as `velero restore create` makes one (Velero sets no phase at first).
    let backup = unique("daily");
    cluster::apply_dynamic(&client, &json!({"apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": backup, "namespace": setup.velero}, "spec": {"includedNamespaces": [ns]}}))
    .await;
    set_status(&setup, "backups", &backup, json!({"phase": "Completed"})).await;
    pod_volume_backup(
        &setup,
        &backup,
        &helper_of("claim-alice"),
        "data",
        "claim-alice",
    )
    .await;
    // A plain Restore cannot write into alice's home while her claim exists (the webhook
    // refuses the pod that would): her helper stays, nothing is recorded.
    let plain = unique("restore");
    cluster::apply_dynamic(
        &client,
        &json!({"apiVersion": "velero.io/v1", "kind": "Restore",
        "metadata": {"name": plain, "namespace": setup.velero},
        "spec": {"backupName": backup, "includedNamespaces": [ns]}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        helpers_now().await.len(),
        2,
        "a Restore that writes nothing takes nothing"
    );
    set_status(
        &setup,
        "restores",
        &plain,
        json!({"phase": "PartiallyFailed"}),
    )
    .await;
    // One that updates what exists will write into it.
    let restore = unique("restore");
    cluster::apply_dynamic(
        &client,
        &json!({"apiVersion": "velero.io/v1", "kind": "Restore",
        "metadata": {"name": restore, "namespace": setup.velero},
        "spec": {"backupName": backup, "includedNamespaces": [ns], "existingResourcePolicy": "update"}}),
    )
    .await;

    // alice's helper goes at once, saying why; bob's (not in that Backup) stays.
    eventually(Duration::from_secs(20), || async {
        (helpers_now().await == [helper_of("claim-bob")]).then_some(())
    })
    .await
    .expect("alice's helper deleted, bob's kept");
    let deleted = event(
        &client,
        &ns,
        "PersistentVolumeClaim",
        "claim-alice",
        "BackupHelperDeleted",
    )
    .await;
    assert!(
        deleted
            .message
            .unwrap_or_default()
            .contains("restore in progress"),
        "the Event says why"
    );
    // The namespace records the claim being restored; a pod of anyone but Velero that
    // mounts it is refused inside the API server.
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    eventually(Duration::from_secs(20), || async {
        let n = namespaces.get(&ns).await.ok()?;
        (n.metadata
            .annotations?
            .get(names::NAMESPACE_RESTORING_CLAIMS)?
            == "claim-alice")
            .then_some(())
    })
    .await
    .expect("the claim being restored recorded on the namespace");
    let err = pods
        .create(&PostParams::default(), &restricted_user_pod("alice"))
        .await
        .expect_err("alice's home is being restored");
    assert!(
        err.to_string()
            .contains("home volume claim-alice is being restored by Velero"),
        "{err}"
    );
    // The controller may change that annotation only (its namespace policy).
    let as_controller =
        Api::<k8s_openapi::api::core::v1::Namespace>::all(setup.as_controller.clone());
    for (patch, why) in [
        (
            json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}}),
            "no namespace's labels",
        ),
        (
            json!({"metadata": {"annotations": {(names::NAMESPACE_CLAIMS): "*"}}}),
            "no namespace annotation but",
        ),
    ] {
        let err = as_controller
            .patch(&ns, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }

    // Velero starts and re-creates alice's claim (gone since): bound at once, idle, in an
    // open window, and still no helper takes it.
    set_status(&setup, "restores", &restore, json!({"phase": "InProgress"})).await;
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &ns);
    claims
        .delete("claim-alice", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(Duration::from_secs(30), || async {
        claims
            .get_opt("claim-alice")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .expect("alice's claim gone");
    cluster::bound_claim(&client, &ns, "claim-alice", "alice").await;
    claims
        .patch(
            "claim-alice",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
            (names::VELERO_RESTORE_NAME): restore, (names::VELERO_BACKUP_NAME): backup}}})),
        )
        .await
        .expect("Velero's labels");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        helpers_now().await,
        [helper_of("claim-bob")],
        "no helper on a claim being restored"
    );

    // Over: the record goes, and the window's helper comes back.
    set_status(&setup, "restores", &restore, json!({"phase": "Completed"})).await;
    eventually(Duration::from_secs(20), || async {
        let n = namespaces.get(&ns).await.ok()?;
        let left = n.metadata.annotations.unwrap_or_default();
        (!left.contains_key(names::NAMESPACE_RESTORING_CLAIMS)).then_some(())
    })
    .await
    .expect("the record cleared");
    eventually(Duration::from_secs(30), || async {
        (helpers_now().await.len() == 2).then_some(())
    })
    .await
    .expect("alice's helper back in the open window");
    pods.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &restricted_user_pod("alice"),
    )
    .await
    .expect("alice may start again");
    setup.finish().await;
}

/// Velero's own `velero restore create --from-schedule` restores the Schedule's Backup
/// alone (pkg/controller/restore_controller.go). A user whose home a wave Backup of the
/// same night holds has a claim in that Backup but no data: re-created from it, the claim
/// would come back empty under a Restore that says Completed. The webhook refuses that
/// claim (Velero records it among the Restore's errors, naming the wave Backup); the same
/// claim from the wave Backup, and any other claim, is created.
#[tokio::test]
async fn a_wave_users_claim_is_not_re_created_empty_from_the_schedules_backup() {
    let setup = Setup::new().await;
    let client = setup.client.clone();
    let webhook = Webhook::start_for(
        &client,
        velero_jupyterhub::webhook::serve::ServeOptions::default(),
        &setup.velero,
    )
    .await;
    let ns = setup.users.clone();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {(cluster::TEST_LABEL): webhook.run_label}}}),
            ),
        )
        .await
        .expect("label the namespace");
    // The night: the Schedule's Backup, and a wave Backup for bob made by the controller.
    let own = "homes-20261207030000";
    let wave = "homes-wave1-20261207030000";
    // carol's home was backed up in another namespace, which a Restore maps to this one.
    let source = unique("jhub-before");
    for (name, labels, annotations) in [
        (own, json!({"velero.io/schedule-name": "homes"}), json!({})),
        (
            wave,
            json!({(names::WAVE_OF): own, (names::WAVE_SCHEDULE): "homes", (names::WAVE_NUMBER): "1"}),
            json!({(names::WAVE_CLAIMS): format!("{ns}/claim-bob,{source}/claim-carol")}),
        ),
    ] {
        cluster::apply_dynamic(&client, &json!({"apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": setup.velero, "labels": labels, "annotations": annotations},
            "spec": {"includedNamespaces": [ns]}}))
        .await;
        set_status(&setup, "backups", name, json!({"phase": "Completed"})).await;
    }
    // Velero restores the claims of the Schedule's Backup (restore.go: labelled, then
    // created), as its service account.
    let velero = cluster::client_as_service_account("velero", "velero").await;
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "velero-claims", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["create"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "velero-claims", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "velero-claims"},
        "subjects": [{"kind": "ServiceAccount", "name": "velero", "namespace": "velero"}]});
    cluster::apply_dynamic(&client, &role).await;
    cluster::apply_dynamic(&client, &binding).await;
    // The Restores Velero runs: its own --from-schedule (the Schedule's Backup alone), one
    // of the wave Backup, and one of the Schedule's Backup mapped from another namespace.
    for (name, backup, mapping) in [
        ("from-schedule-1", own, json!({})),
        ("wave-1", wave, json!({})),
        ("mapped-1", own, json!({(source.clone()): ns.clone()})),
    ] {
        cluster::apply_dynamic(
            &client,
            &json!({"apiVersion": "velero.io/v1", "kind": "Restore",
            "metadata": {"name": name, "namespace": setup.velero},
            "spec": {"backupName": backup, "namespaceMapping": mapping}}),
        )
        .await;
    }
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(velero, &ns);
    let claim = |name: &str,
                 user: &str,
                 backup: &str,
                 restore: &str|
     -> k8s_openapi::api::core::v1::PersistentVolumeClaim {
        from_json(json!({"metadata": {"name": name, "labels": {
                "hub.jupyter.org/username": user, (names::VELERO_BACKUP_NAME): backup, (names::VELERO_RESTORE_NAME): restore}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
    };
    // The webhook's registration may take a moment to be called.
    let refused = eventually(Duration::from_secs(20), || {
        let claims = claims.clone();
        let c = claim("claim-bob", "bob", own, "from-schedule-1");
        async move {
            match claims
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &c,
                )
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 403 => Some(e.message),
                _ => None,
            }
        }
    })
    .await
    .expect("bob's claim refused from the Schedule's Backup");
    for part in [
        format!("claim {ns}/claim-bob not re-created from Backup {own}"),
        format!("velero restore create --from-backup {wave}"),
        "--from-schedule".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part}: {refused}");
    }
    claims
        .create(
            &PostParams::default(),
            &claim("claim-alice", "alice", own, "from-schedule-1"),
        )
        .await
        .expect("alice's claim: her home is in the Schedule's Backup");
    claims
        .create(
            &PostParams::default(),
            &claim("claim-bob", "bob", wave, "wave-1"),
        )
        .await
        .expect("bob's claim from his wave Backup");
    // Restored into another namespace: the wave's claims are found by the namespace they
    // had in the Backup (the Restore's mapping, read backwards).
    let err = claims
        .create(
            &PostParams::default(),
            &claim("claim-carol", "carol", own, "mapped-1"),
        )
        .await
        .expect_err("carol's claim, mapped from her namespace");
    assert!(
        err.to_string().contains("not re-created from Backup"),
        "{err}"
    );
    // A Restore that cannot be read: refused, not let through.
    let err = claims
        .create(
            &PostParams::default(),
            &claim("claim-dave", "dave", own, "gone-1"),
        )
        .await
        .expect_err("unchecked");
    assert!(
        err.to_string().contains("could not be checked") && err.to_string().contains("gone-1"),
        "{err}"
    );
    let text = webhook.server.metrics.encode();
    let series = r#"velero_jupyterhub_admission_requests_total{webhook="restore",outcome="restore_claim_home_in_a_wave"}"#;
    assert!(sample(&text, series).is_some_and(|n| n >= 1.0), "{text}");
    webhook.finish().await;
    setup.finish().await;
}
