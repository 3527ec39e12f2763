//! The live-session webhook end to end on a real kube-apiserver: registered from
//! manifests/, called by the API server over HTTPS, watching namespaces under the
//! manifests' RBAC. Needs the test API server (scripts/test.sh).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use testkit::cluster::{self, Webhook, backup_volumes, user_pod};
use testkit::fixtures;
use velero_jupyterhub::metrics::sample;

/// Every admission request this webhook has answered, whatever the outcome.
fn admission_requests(webhook: &Webhook) -> f64 {
    let text = webhook.server.metrics.encode();
    let series = "velero_jupyterhub_admission_duration_seconds_count";
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Requests of the live entry with this outcome (0 until the first one: the series is
/// created then).
fn live_outcomes(webhook: &Webhook, outcome: &str) -> f64 {
    let series = format!(
        r#"velero_jupyterhub_admission_requests_total{{webhook="live",outcome="{outcome}"}}"#
    );
    sample(&webhook.server.metrics.encode(), &series).unwrap_or(0.0)
}

#[tokio::test]
async fn user_pod_in_opted_in_namespace_is_stored_with_the_annotation() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace(true).await;
    // The probe pods that proved the registration live were annotated: the series exists.
    let annotated_before = live_outcomes(&webhook, "annotated");
    assert!(annotated_before >= 1.0);

    let created = ns
        .pods()
        .create(&PostParams::default(), &user_pod("alice-smith"))
        .await
        .unwrap();
    assert_eq!(backup_volumes(&created), Some("volume-alice-smith"));
    let stored = ns.pods().get("jupyter-alice-smith").await.unwrap();
    assert_eq!(
        backup_volumes(&stored),
        Some("volume-alice-smith"),
        "what the API server stored"
    );
    // The rest of the pod's annotations are kept.
    assert_eq!(
        stored.metadata.annotations.as_ref().unwrap()["hub.jupyter.org/username"],
        "alice-smith"
    );

    // Every variant of the fixtures is stored as the decision says (namespace default globs).
    for (name, want) in [
        ("jupyter-alice-2dsmith", Some("volume-alice-2dsmith")),
        ("jupyter-carol", Some("volume-carol")),
        ("jupyter-grace", Some("notes,volume-grace")),
        ("jupyter-heidi", None),
        ("jupyter-ivan", Some("volume-ivan")),
        ("jupyter-alice-smith--gpu", Some("volume-alice-smith--gpu")),
        ("jupyter-judy", Some("volume-judy")),
    ] {
        let mut pod = fixtures::variant(name);
        pod["metadata"].as_object_mut().unwrap().remove("namespace");
        let created = ns
            .pods()
            .create(&PostParams::default(), &cluster::from_json::<Pod>(pod))
            .await
            .unwrap();
        assert_eq!(backup_volumes(&created), want, "{name}");
    }
    // Once a scheduler and kubelet have done their part, the annotation is still there.
    cluster::bind(&ns.pods(), "jupyter-alice-smith", "worker-1").await;
    cluster::set_phase(&ns.pods(), "jupyter-alice-smith", "Running").await;
    let running = ns.pods().get("jupyter-alice-smith").await.unwrap();
    assert_eq!(
        running.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(backup_volumes(&running), Some("volume-alice-smith"));

    let m = live_outcomes(&webhook, "annotated") - annotated_before;
    assert_eq!(
        m, 6.0,
        "the API server called our webhook for each pod it annotated"
    );
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn other_namespaces_and_other_pods_are_stored_unchanged() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let off = webhook.namespace(false).await;
    let on = webhook.namespace(true).await;
    let requests_before = admission_requests(&webhook);

    let created = off
        .pods()
        .create(&PostParams::default(), &user_pod("bob"))
        .await
        .unwrap();
    assert_eq!(
        backup_volumes(&created),
        None,
        "namespace without the opt-in label"
    );

    let mut hub = fixtures::variant("hub-7d9c8b6f5-abcde");
    hub["metadata"].as_object_mut().unwrap().remove("namespace");
    let created = on
        .pods()
        .create(&PostParams::default(), &cluster::from_json::<Pod>(hub))
        .await
        .unwrap();
    assert_eq!(
        backup_volumes(&created),
        None,
        "not a singleuser-server pod"
    );
    assert_eq!(
        admission_requests(&webhook),
        requests_before,
        "the webhook was not even called"
    );
    // …while in the opted-in namespace a user pod is annotated (the registration is live).
    let created = on
        .pods()
        .create(&PostParams::default(), &user_pod("bob"))
        .await
        .unwrap();
    assert_eq!(backup_volumes(&created), Some("volume-bob"));
    off.delete().await;
    on.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn namespace_claims_annotation_changes_take_effect_without_restart() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace_with_claims("home-*").await;

    // z2jh's claim-… does not match home-*: nothing to add.
    let mut n = 0;
    let mut create = |user: &str| {
        n += 1;
        let mut pod = user_pod(user);
        pod.metadata.name = Some(format!("jupyter-{user}-{n}"));
        let pods = ns.pods();
        async move { pods.create(&PostParams::default(), &pod).await.unwrap() }
    };
    let created = create("carol").await;
    assert_eq!(backup_volumes(&created), None);

    ns.merge_metadata(json!({"annotations": {"velero-jupyterhub.io/claims": "home-*,claim-*"}}))
        .await;
    let mut seen = None;
    for _ in 0..100 {
        let created = create("carol").await;
        if let Some(v) = backup_volumes(&created) {
            seen = Some(v.to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.as_deref(),
        Some("volume-carol"),
        "the new globs were applied by the running webhook"
    );
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn with_the_webhook_down_user_pods_are_still_created() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace(true).await;
    webhook.stop_server().await;

    let started = std::time::Instant::now();
    let created = ns
        .pods()
        .create(&PostParams::default(), &user_pod("dave"))
        .await
        .expect("failurePolicy Ignore: created anyway");
    assert_eq!(backup_volumes(&created), None);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not held up by the webhook's timeout: {:?}",
        started.elapsed()
    );
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn server_side_dry_run_gets_the_same_patch_and_no_side_effects() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace(true).await;
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let dry = ns.pods().create(&params, &user_pod("erin")).await.unwrap();
    assert_eq!(backup_volumes(&dry), Some("volume-erin"));
    assert!(
        ns.pods().get_opt("jupyter-erin").await.unwrap().is_none(),
        "dry run stored nothing"
    );
    let real = ns
        .pods()
        .create(&PostParams::default(), &user_pod("erin"))
        .await
        .unwrap();
    assert_eq!(backup_volumes(&real), backup_volumes(&dry));
    ns.pods()
        .delete("jupyter-erin", &DeleteParams::default())
        .await
        .unwrap();
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn manifests_are_accepted_by_the_api_server() {
    let client = cluster::client().await;
    let minor = cluster::server_minor(&client).await;
    for obj in cluster::manifest_objects() {
        // v1.20 has no policy/v1 PodDisruptionBudget (every version since 1.21 has): on
        // v1.20 alone that one object is left out of this dry run.
        if minor < 21 && obj["apiVersion"] == "policy/v1" {
            continue;
        }
        // ValidatingAdmissionPolicy v1 arrived in 1.30 (README: drop those files before).
        let kind = obj["kind"].as_str().unwrap_or_default();
        if minor < 30 && kind.starts_with("ValidatingAdmissionPolicy") {
            continue;
        }
        // The Deployment needs its namespace to exist for a dry run; RBAC objects and the
        // namespace are applied for real (they are what the webhook runs as in tests).
        if obj["kind"] == "Namespace" {
            cluster::apply_dynamic(&client, &obj).await;
            continue;
        }
        cluster::apply_dynamic_with(&client, &obj, true)
            .await
            .unwrap_or_else(|e| {
                panic!("{} {} rejected: {e}", obj["kind"], obj["metadata"]["name"])
            });
    }
    // The examples too (not part of the kustomization). The Grafana dashboard (JSON) and
    // the PrometheusRule (prometheus-operator's CRD is not installed here) are checked by
    // tests/observability.rs instead.
    cluster::install_velero_crds(&client).await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).expect("manifests/examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("example");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let obj: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if obj["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
            {
                continue;
            }
            // A dry run needs the object's namespace to exist.
            if let Some(ns) = obj["metadata"]["namespace"].as_str() {
                let namespace = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                cluster::apply_dynamic(&client, &namespace).await;
            }
            let obj = match obj["kind"] == "NetworkPolicy" {
                true => api_server_only(&client, obj).await,
                false => obj,
            };
            cluster::apply_dynamic_with(&client, &obj, true)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 3, "{checked}");
}

/// The example NetworkPolicy as README says to fill it in: as written (its placeholder
/// left in) the API server refuses it and nothing changes; with the API server's
/// addresses (the endpoints of the `kubernetes` Service, as README's command reads them)
/// it is accepted. (Whether a network plugin enforces it is the plugin's business: the
/// test node's bridge plugin enforces no NetworkPolicy at all.)
async fn api_server_only(
    client: &kube::Client,
    mut policy: serde_json::Value,
) -> serde_json::Value {
    let refused = cluster::apply_dynamic_with(client, &policy, true).await;
    let message = refused.expect_err("the placeholder refused").to_string();
    assert!(message.contains("API-SERVER-CIDR"), "{message}");
    // EndpointSlices (discovery.k8s.io/v1) from Kubernetes 1.21; before, the Endpoints
    // object (README's note on older clusters).
    let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        kube::Api::namespaced(client.clone(), "default");
    let params = kube::api::ListParams::default().labels("kubernetes.io/service-name=kubernetes");
    let addresses: Vec<String> = match slices.list(&params).await {
        Ok(list) => list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
            .collect(),
        Err(kube::Error::Api(e)) if e.code == 404 && cluster::server_minor(client).await < 21 => {
            let endpoints: kube::Api<k8s_openapi::api::core::v1::Endpoints> =
                kube::Api::namespaced(client.clone(), "default");
            endpoints
                .get_opt("kubernetes")
                .await
                .expect("the kubernetes Service's Endpoints")
                .into_iter()
                .flat_map(|e| e.subsets.unwrap_or_default())
                .flat_map(|s| s.addresses.unwrap_or_default())
                .map(|a| a.ip)
                .collect()
        }
        Err(e) => panic!("the kubernetes Service's EndpointSlices: {e}"),
    };
    // The test API server advertises 127.0.0.1, which no Endpoints may hold: it runs
    // with --endpoint-reconciler-type=none, and its address is stood in for.
    let addresses = match addresses.is_empty() {
        true => vec!["192.0.2.10".to_owned()],
        false => addresses,
    };
    let from: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| serde_json::json!({"ipBlock": {"cidr": format!("{a}/32")}}))
        .collect();
    let rule = policy["spec"]["ingress"]
        .as_array_mut()
        .and_then(|rules| rules.iter_mut().find(|r| r["ports"][0]["port"] == 8443))
        .expect("a rule for 8443");
    assert_eq!(
        rule["from"],
        serde_json::json!([{"ipBlock": {"cidr": "API-SERVER-CIDR"}}])
    );
    rule["from"] = from.into();
    policy
}

#[tokio::test]
async fn velero_crds_install_and_velero_objects_can_be_created() {
    let client = cluster::client().await;
    cluster::install_velero_crds(&client).await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace(false).await;
    for doc in fixtures::yaml_docs("velero-backup-schedule-restore.example.yaml") {
        let mut doc = doc;
        doc["metadata"]["namespace"] = ns.name.clone().into();
        let applied = cluster::apply_dynamic(&client, &doc).await;
        assert_eq!(applied["kind"], doc["kind"]);
    }
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn with_the_webhook_hanging_user_pods_are_created_after_its_short_timeout() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace(true).await;
    // Our server goes away first, so no create can be annotated by it while the API
    // server's configuration still points at it.
    webhook.stop_server().await;
    // A black hole: accepts connections and never answers (not even the TLS handshake).
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            conns.push(c);
        }
    });
    webhook
        .register_at(&url, webhook.server.ca_pem.as_deref().unwrap())
        .await;
    let timeout_seconds = cluster::manifest("MutatingWebhookConfiguration", "velero-jupyterhub")["webhooks"][0]
        ["timeoutSeconds"]
        .as_u64()
        .unwrap();
    // Until the API server has picked the black hole up, creates are fast; once it has,
    // each waits for the webhook's timeout and then goes ahead (failurePolicy Ignore).
    let mut waited = None;
    for i in 0..50 {
        let started = std::time::Instant::now();
        let created = ns
            .pods()
            .create(&PostParams::default(), &user_pod(&format!("frank-{i}")))
            .await
            .expect("failurePolicy Ignore: created anyway");
        assert_eq!(backup_volumes(&created), None);
        if started.elapsed() >= Duration::from_secs(timeout_seconds) - Duration::from_millis(200) {
            waited = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = waited.expect("the API server never called the black hole");
    assert!(
        waited < Duration::from_secs(timeout_seconds + 2),
        "held up for {waited:?}"
    );
    held.abort();
    ns.delete().await;
    webhook.finish().await;
}

#[tokio::test]
async fn a_namespace_the_watch_has_not_delivered_is_fetched_with_its_claims() {
    use std::sync::Arc;
    use tower::ServiceExt;
    use velero_jupyterhub::cluster::NamespaceCache;
    use velero_jupyterhub::metrics::Metrics;
    use velero_jupyterhub::webhook::serve::ServeOptions;
    use velero_jupyterhub::webhook::{WebhookState, admission_router};

    let client = cluster::client().await;
    cluster::apply_rbac(&client).await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace_with_claims("home-*").await;
    // A cache whose watch never runs: every namespace is a miss, as for one created a
    // moment before its first pod. It fetches as the manifests' service account (RBAC).
    let sa = cluster::client_as_service_account("velero-jupyterhub", "velero-jupyterhub").await;
    let globs = velero_jupyterhub::policy::ClaimGlobs::parse("claim-*").unwrap();
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(NamespaceCache::new(Some(sa), globs, metrics.clone()));
    let state = WebhookState::new(
        cache.clone(),
        velero_jupyterhub::cluster::RestoreClaims::new(None, "velero"),
        velero_jupyterhub::policy::helper::HelperOptions::with_image("pause"),
        metrics.clone(),
        &ServeOptions::default(),
        Default::default(),
    );
    let app = admission_router(Arc::new(state));

    let mut pod = serde_json::to_value(user_pod("grace")).unwrap();
    pod["metadata"]["namespace"] = ns.name.clone().into();
    pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "home-grace".into();
    let body = fixtures::pod_create_review(&pod, "uid-fetch");
    let req = hyper::Request::post("/mutate/live")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let patch = velero_jupyterhub::admission::decode_patch(&bytes).unwrap();
    let patch = patch.expect("patched with the namespace's own globs");
    assert_eq!(patch[0]["value"], "volume-grace", "{patch}");
    let fetched = r#"velero_jupyterhub_namespace_fetches_total{result="fetched"}"#;
    assert_eq!(sample(&metrics.encode(), fetched), Some(1.0));
    ns.delete().await;
    webhook.finish().await;
}

/// Being called means the namespace selector matched: a namespace labelled a moment ago,
/// which the watch may still know as not opted in, gets its own globs for its very
/// first pod (fetched), never "not opted in".
#[tokio::test]
async fn a_namespace_labelled_a_moment_ago_gets_its_first_pod_annotated() {
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    for i in 0..5 {
        let ns = webhook.namespace(false).await;
        ns.merge_metadata(json!({"annotations": {"velero-jupyterhub.io/claims": "home-*"}}))
            .await;
        // Let the watch see it unlabelled, then label it and create a pod at once.
        cluster::eventually(Duration::from_secs(10), || async {
            let p = webhook.server.namespaces.watched_policy(&ns.name)?;
            (!p.opted_in && p.claims.to_string() == "home-*").then_some(())
        })
        .await
        .expect("the watch delivered the namespace");
        ns.merge_metadata(json!({"labels": {"velero-jupyterhub.io/enabled": "true"}}))
            .await;
        let mut pod = user_pod(&format!("ines-{i}"));
        let volumes = pod.spec.as_mut().unwrap().volumes.as_mut().unwrap();
        volumes[0]
            .persistent_volume_claim
            .as_mut()
            .unwrap()
            .claim_name = format!("home-ines-{i}");
        // The API server may not have seen the label yet either: retry until it calls
        // us. The first create it does call us for must come back annotated.
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let mut answered = None;
        for _ in 0..200 {
            let before = admission_requests(&webhook);
            let created = ns.pods().create(&params, &pod).await.unwrap();
            if admission_requests(&webhook) > before {
                answered = Some(backup_volumes(&created).map(str::to_owned));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let answered = answered.expect("the API server called the webhook within 10 s");
        assert_eq!(
            answered.as_deref(),
            Some(format!("volume-ines-{i}").as_str()),
            "the first call is annotated, with the namespace's own globs"
        );
        ns.delete().await;
    }
    webhook.finish().await;
}

/// A claims annotation that cannot be used as written is reported where a platform
/// engineer looks: a Warning Event about the Namespace, a metric, and the default globs
/// still apply (the pod is annotated, not skipped).
#[tokio::test]
async fn an_invalid_claims_annotation_is_reported_with_an_event_and_a_metric() {
    use k8s_openapi::api::core::v1::Event;
    let client = cluster::client().await;
    let webhook = Webhook::start(&client).await;
    let ns = webhook.namespace_with_claims("claim-[").await;
    let series = format!(
        r#"velero_jupyterhub_namespace_claims_invalid{{namespace="{}"}}"#,
        ns.name
    );
    cluster::eventually(Duration::from_secs(10), || async {
        (sample(&webhook.server.metrics.encode(), &series) == Some(1.0)).then_some(())
    })
    .await
    .expect("the metric reports the namespace");
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), &ns.name);
    let selector = format!(
        "involvedObject.kind=Namespace,involvedObject.name={}",
        ns.name
    );
    let event = cluster::eventually(Duration::from_secs(10), || {
        let (events, selector) = (events.clone(), selector.clone());
        async move {
            let list = events
                .list(&kube::api::ListParams::default().fields(&selector))
                .await
                .ok()?;
            list.items.into_iter().next()
        }
    })
    .await
    .expect("a Warning Event about the namespace (RBAC lets the webhook create Events)");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("InvalidClaimGlobs"));
    let message = event.message.unwrap_or_default();
    assert!(
        message.contains("claim-[") && message.contains("claim-*"),
        "{message}"
    );
    // The default globs apply meanwhile.
    let created = ns
        .pods()
        .create(&PostParams::default(), &user_pod("jo"))
        .await
        .unwrap();
    assert_eq!(backup_volumes(&created), Some("volume-jo"));
    assert_eq!(
        event.reporting_component.as_deref(),
        Some("velero-jupyterhub")
    );
    // Fixed: the series goes away.
    ns.merge_metadata(json!({"annotations": {"velero-jupyterhub.io/claims": "claim-*"}}))
        .await;
    cluster::eventually(Duration::from_secs(10), || async {
        sample(&webhook.server.metrics.encode(), &series)
            .is_none()
            .then_some(())
    })
    .await
    .expect("the metric clears once the annotation is fixed");
    ns.delete().await;
    webhook.finish().await;
}

/// A namespace name comes from an unauthenticated request: concurrent lookups of one
/// name share one GET, results (and misses) are kept, GETs are rate-limited, and a name
/// that is not a namespace name never reaches the API.
#[tokio::test]
async fn namespace_lookups_cannot_multiply_api_traffic() {
    use std::sync::Arc;
    use velero_jupyterhub::cluster::NamespaceCache;
    use velero_jupyterhub::metrics::Metrics;

    let client = cluster::client().await;
    cluster::apply_rbac(&client).await;
    let ns = cluster::TestNamespace::create(
        &client,
        &cluster::unique("lookups"),
        true,
        [(
            "velero-jupyterhub.io/claims".to_owned(),
            "home-*".to_owned(),
        )]
        .into(),
    )
    .await;
    // A cache whose watch never runs: every name is a miss, fetched as the manifests'
    // service account.
    let sa = cluster::client_as_service_account("velero-jupyterhub", "velero-jupyterhub").await;
    let metrics = Arc::new(Metrics::new());
    let globs = velero_jupyterhub::policy::ClaimGlobs::parse("claim-*").unwrap();
    let cache = Arc::new(NamespaceCache::new(Some(sa), globs, metrics.clone()));
    let fetches = |result: &str| {
        let series = format!(r#"velero_jupyterhub_namespace_fetches_total{{result="{result}"}}"#);
        sample(&metrics.encode(), &series).unwrap_or(0.0)
    };

    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let (cache, name) = (cache.clone(), ns.name.clone());
            tokio::spawn(async move { cache.claims_for(&name).await.to_string() })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(lookup.await.unwrap(), "home-*");
    }
    assert_eq!(fetches("fetched"), 1.0, "20 concurrent lookups, one GET");
    assert_eq!(cache.claims_for(&ns.name).await.to_string(), "home-*");
    assert_eq!(fetches("fetched"), 1.0, "kept");

    let missing = cluster::unique("missing");
    for _ in 0..3 {
        assert_eq!(cache.claims_for(&missing).await.to_string(), "claim-*");
    }
    assert_eq!(fetches("not_found"), 1.0, "a miss is kept too");

    assert_eq!(cache.claims_for("Not_A/Name").await.to_string(), "claim-*");
    assert_eq!(fetches("invalid_name"), 1.0);

    // Many distinct names at once: past the burst, no GET. (At once: one after the other
    // on a loaded machine, each GET's time would refill the bucket as it went.)
    let names: Vec<String> = (0..20).map(|i| format!("{missing}-{i}")).collect();
    futures::future::join_all(names.iter().map(|name| cache.claims_for(name))).await;
    let gets = fetches("fetched") + fetches("not_found");
    assert!(gets <= 12.0, "{gets} GETs for 22 names: not rate-limited");
    assert!(fetches("rate_limited") >= 10.0);
    ns.delete().await;
}
