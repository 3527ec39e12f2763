//! Self-managed certificates on the real API server: the controller's
//! certificate keeper and two webhook replicas, each with its ServiceAccount token and
//! the manifests' RBAC, behind a round-robin TCP proxy the API server calls. CAs and
//! serving certificates live seconds instead of months, so several renewals and CA
//! rollovers happen while pods are being created, and halfway the CA Secret is deleted:
//! none may fail admission.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::SignedDuration;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use testkit::cluster::{
    self, MANAGER, TEST_LABEL, TestNamespace, apply_rbac, backup_volumes, eventually, manifest,
    unique, user_pod,
};
use testkit::https::HttpsClient;
use tokio_util::sync::CancellationToken;
use velero_jupyterhub::controller::certs::{self, CertConfig};
use velero_jupyterhub::metrics::{Metrics, sample};
use velero_jupyterhub::policy::certs::CertOptions;

const NAMESPACE: &str = "velero-jupyterhub";

/// Forwards each connection to the next of `backends` in turn (a Service's job).
async fn round_robin(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// The CA certificates (DER) in a PEM bundle.
fn bundle_cas(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

fn secret_field(secret: &Secret, key: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

/// The DER of the certificate `addr` serves now (a fresh full handshake).
async fn served(addr: SocketAddr, bundle_pem: &str) -> Option<Vec<u8>> {
    let client = HttpsClient::new(addr, bundle_pem);
    let tls = client.tls_stream().await.ok()?;
    let certs = tls.get_ref().1.peer_certificates()?;
    Some(certs.first()?.as_ref().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_roll_over_while_pods_are_created_and_no_admission_fails() {
    let admin = cluster::client().await;
    apply_rbac(&admin).await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
    for name in [certs::CA_SECRET, certs::TLS_SECRET] {
        let _ = secrets.delete(name, &DeleteParams::default()).await;
    }
    eventually(Duration::from_secs(10), || async {
        let ca = secrets.get_opt(certs::CA_SECRET).await.ok()?;
        let tls = secrets.get_opt(certs::TLS_SECRET).await.ok()?;
        (ca.is_none() && tls.is_none()).then_some(())
    })
    .await
    .expect("leftover Secrets deleted");

    // Two webhook replicas, as the webhook's ServiceAccount: no certificate yet, not ready.
    let webhook_client = cluster::client_as_service_account(NAMESPACE, "velero-jupyterhub").await;
    let replicas = [
        cluster::webhook_from_secret(webhook_client.clone()).await,
        cluster::webhook_from_secret(webhook_client).await,
    ];
    for r in &replicas {
        let problems = r.health.problems().join("; ");
        assert!(
            problems.contains("certificate"),
            "not ready without a certificate: {problems:?}"
        );
    }
    let proxy = round_robin(replicas.iter().map(|r| r.addr).collect()).await;

    // The manifests' webhook configuration, under its own name (the controller's RBAC
    // names it), without a caBundle, pointed at the proxy, selecting this test only.
    let run_label = unique("certs");
    let mut wh = manifest("MutatingWebhookConfiguration", certs::WEBHOOK_CONFIGURATION);
    for hook in wh["webhooks"].as_array_mut().expect("webhooks") {
        let path = hook["clientConfig"]["service"]["path"]
            .as_str()
            .expect("path")
            .to_owned();
        hook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{}{path}", proxy.port())});
        hook["namespaceSelector"]["matchLabels"][TEST_LABEL] = run_label.clone().into();
    }
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let _ = webhooks
        .delete(certs::WEBHOOK_CONFIGURATION, &DeleteParams::default())
        .await;
    webhooks
        .patch(
            certs::WEBHOOK_CONFIGURATION,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&wh),
        )
        .await
        .expect("register the webhook configuration");

    // The certificate keeper, as the controller's ServiceAccount. CAs live 24 s (replaced
    // at 16 s), serving certificates 9 s (renewed at 6 s), 2 s of overlap.
    let controller_client =
        cluster::client_as_service_account(NAMESPACE, "velero-jupyterhub-controller").await;
    let options = CertOptions {
        ca_validity: SignedDuration::from_secs(24),
        cert_validity: SignedDuration::from_secs(9),
        overlap: SignedDuration::from_secs(2),
        retire_after: SignedDuration::from_secs(3),
    };
    options.check().expect("valid options");
    let mut config = CertConfig::for_service(NAMESPACE, "velero-jupyterhub", options);
    config.names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    config.check_interval = Duration::from_millis(500);
    let metrics = Arc::new(Metrics::for_controller());
    let stop = CancellationToken::new();
    let keeper = tokio::spawn(certs::run(
        controller_client,
        config,
        metrics.clone(),
        stop.clone(),
    ));

    // Both replicas load the certificate from the Secret and become ready.
    let started = Instant::now();
    eventually(Duration::from_secs(20), || async {
        replicas
            .iter()
            .all(|r| r.health.problems().is_empty())
            .then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "both replicas ready once the controller wrote the certificate; keeper metrics:\n{}",
            metrics.encode()
        )
    });
    eprintln!(
        "replicas ready {:?} after the keeper started",
        started.elapsed()
    );

    // Pods are created through the API server, three at a time, for 45 s (two CA
    // lifetimes): each must be admitted and carry the annotation only the webhook adds
    // (the live entry fails open, so an unannotated pod is a failed call).
    let ns = TestNamespace::create(&admin, &run_label, true, Default::default()).await;
    // The API server picks up a new caBundle within moments; start once it calls us.
    let pods = ns.pods();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(Duration::from_secs(10), || async {
        let created = pods.create(&dry_run, &user_pod("probe")).await.ok()?;
        backup_volumes(&created).map(|_| ())
    })
    .await
    .expect("the API server calls the webhook, trusting the controller's CA");
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut load = Vec::new();
    for worker in 0..3 {
        let (pods, ok, failed) = (ns.pods(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                // Every fifth pod is stored for real; the rest are server-side dry runs
                // (admission runs the same, nothing accumulates).
                let params = PostParams {
                    dry_run: n % 5 != 0,
                    ..Default::default()
                };
                let mut pod = user_pod(&format!("u{worker}x{n}"));
                pod.metadata.name = Some(format!("jupyter-u{worker}x{n}"));
                match pods.create(&params, &pod).await {
                    Ok(created) if backup_volumes(&created).is_some() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => failed
                        .lock()
                        .expect("lock")
                        .push(format!("{n}: not annotated (the webhook call failed open)")),
                    Err(e) => failed.lock().expect("lock").push(format!("{n}: {e}")),
                }
            }
        }));
    }

    // The API server keeps its connections open, so most of its calls reuse a handshake
    // made long before. Fresh handshakes with each replica directly, against the caBundle
    // the API server holds at that moment, show what a new connection would get.
    let probes = {
        let (webhooks, addrs) = (
            Api::<MutatingWebhookConfiguration>::all(admin.clone()),
            replicas.iter().map(|r| r.addr).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while Instant::now() < deadline {
                let bundle = webhooks
                    .get(certs::WEBHOOK_CONFIGURATION)
                    .await
                    .ok()
                    .and_then(|c| c.webhooks?.first()?.client_config.ca_bundle.clone())
                    .and_then(|b| String::from_utf8(b.0).ok())
                    .unwrap_or_default();
                for &addr in &addrs {
                    match served(addr, &bundle).await {
                        Some(_) => ok += 1,
                        None => failed.push(format!("{addr} at {:?}", Instant::now())),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };

    // Meanwhile, watch what the API server is told to trust, and what is served.
    let mut bundles_seen: Vec<usize> = Vec::new();
    let mut cas_seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut serving_seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut ca_deleted = false;
    while Instant::now() < deadline {
        if let Ok(config) = webhooks.get(certs::WEBHOOK_CONFIGURATION).await {
            for hook in config.webhooks.unwrap_or_default() {
                let cas = bundle_cas(
                    &hook
                        .client_config
                        .ca_bundle
                        .map(|b| b.0)
                        .unwrap_or_default(),
                );
                bundles_seen.push(cas.len());
                cas_seen.extend(cas);
            }
        }
        if let Ok(tls) = secrets.get(certs::TLS_SECRET).await {
            serving_seen.insert(secret_field(&tls, "tls.crt"));
        }
        // Halfway, someone deletes the CA Secret (the CA's key is lost): what replicas
        // serve must stay trusted while a new CA takes over.
        if !ca_deleted
            && deadline.saturating_duration_since(Instant::now()) < Duration::from_secs(22)
        {
            secrets
                .delete(certs::CA_SECRET, &DeleteParams::default())
                .await
                .expect("delete the CA Secret");
            ca_deleted = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for task in load {
        task.await.expect("load worker");
    }
    let (probed, probe_failures) = probes.await.expect("probes");
    eprintln!(
        "{probed} fresh handshakes verified against the live caBundle, {} failed",
        probe_failures.len()
    );
    assert!(
        probe_failures.is_empty(),
        "a fresh handshake failed to verify: {probe_failures:?}"
    );
    assert!(probed > 100, "the probes ran ({probed})");
    let failed = failed.lock().expect("lock").clone();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "{ok} pods admitted, {} failed {failed:?}; {} CAs and {} serving certificates seen; bundle sizes {:?}",
        failed.len(),
        cas_seen.len(),
        serving_seen.len(),
        bundles_seen.iter().collect::<BTreeSet<_>>()
    );
    assert!(
        failed.is_empty(),
        "admissions failed during rollover: {failed:?}"
    );
    assert!(ok > 100, "the load ran ({ok} pods)");
    assert!(
        cas_seen.len() >= 3,
        "at least two CA rollovers in 45 s of 24 s CAs: {} CAs",
        cas_seen.len()
    );
    assert!(
        bundles_seen.contains(&2),
        "the caBundle held the old and the new CA together"
    );
    assert!(
        bundles_seen.iter().all(|n| (1..=2).contains(n)),
        "one or two CAs, never none: {bundles_seen:?}"
    );
    assert!(
        serving_seen.len() >= 6,
        "serving certificates renewed every ~6 s: {}",
        serving_seen.len()
    );

    // Afterwards both replicas serve the Secret's certificate, and it verifies against
    // the bundle the API server holds.
    let converged = eventually(Duration::from_secs(10), || async {
        let tls = secrets.get(certs::TLS_SECRET).await.ok()?;
        let want = CertificateDer::from_pem_slice(&secret_field(&tls, "tls.crt")).ok()?;
        let config = webhooks.get(certs::WEBHOOK_CONFIGURATION).await.ok()?;
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?.0;
        let bundle = String::from_utf8(bundle).ok()?;
        for r in &replicas {
            if served(r.addr, &bundle).await? != want.as_ref() {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        converged.is_some(),
        "both replicas serve the current certificate, trusted by the caBundle"
    );

    let text = metrics.encode();
    for step in [
        "create",
        "introduce",
        "promote",
        "retire",
        "issue",
        "write_bundle",
    ] {
        let n = sample(
            &text,
            &format!(r#"velero_jupyterhub_certificate_steps_total{{step="{step}"}}"#),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "step {step} taken: {n:?}");
    }
    assert_eq!(
        sample(
            &text,
            r#"velero_jupyterhub_certificate_steps_total{step="create"}"#
        ),
        Some(1.0),
        "created once; the deleted CA was replaced by a rollover, not from scratch"
    );
    assert!(ca_deleted);
    assert!(
        !text.contains("velero_jupyterhub_certificate_errors_total{"),
        "no certificate errors: {text}"
    );
    // Secrets are labelled ours; the CA key is in the CA Secret only.
    let tls = secrets.get(certs::TLS_SECRET).await.expect("tls secret");
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(secret_field(&tls, "ca.key").is_empty());
    assert!(!secret_field(&secrets.get(certs::CA_SECRET).await.expect("ca"), "ca.key").is_empty());

    stop.cancel();
    keeper.await.expect("keeper stops");

    // A leaked controller token gets no further than the keeper goes (Kubernetes 1.30+:
    // the ValidatingAdmissionPolicy of manifests/controller-certificates-policy.yaml).
    if cluster::server_minor(&admin).await >= 30 {
        let as_controller =
            cluster::client_as_service_account(NAMESPACE, "velero-jupyterhub-controller").await;
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(as_controller.clone());
        let redirect = json!({"webhooks": [{"name": "live.velero-jupyterhub.io",
            "clientConfig": {"url": "https://attacker.example:443/mutate"}}]});
        let err = hooks
            .patch(
                certs::WEBHOOK_CONFIGURATION,
                &PatchParams::default(),
                &Patch::Strategic(&redirect),
            )
            .await
            .expect_err("the controller may not point the webhook elsewhere");
        assert!(
            err.to_string()
                .contains("only each webhook entry's caBundle"),
            "{err}"
        );
        let own: Api<Secret> = Api::namespaced(as_controller, NAMESPACE);
        let token: Secret = serde_json::from_value(json!({
            "metadata": {"name": "minted", "annotations": {"kubernetes.io/service-account.name": "velero-jupyterhub"}},
            "type": "kubernetes.io/service-account-token",
        }))
        .expect("secret");
        let err = own
            .create(&PostParams::default(), &token)
            .await
            .expect_err("the controller may not mint other Secrets");
        assert!(
            err.to_string().contains("only its two certificate Secrets"),
            "{err}"
        );
    }
    let _ = webhooks
        .delete(certs::WEBHOOK_CONFIGURATION, &DeleteParams::default())
        .await;
    for r in &replicas {
        r.shutdown();
    }
    for r in replicas {
        r.stopped().await;
    }
    ns.delete().await;
}

/// A TLS Secret someone else made (cert-manager, by hand) is never overwritten: the
/// keeper reports it and leaves it alone.
#[tokio::test]
async fn a_secret_the_controller_does_not_own_is_left_alone() {
    let admin = cluster::client().await;
    apply_rbac(&admin).await;
    // Its own namespace, names and webhook configuration name are not the RBAC'd ones,
    // so this runs as the admin (the point is the ownership rule, not RBAC).
    let ns = unique("vjh-certs");
    cluster::apply_dynamic(
        &admin,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "velero-jupyterhub-tls"},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &foreign)
        .await
        .expect("create");
    // A webhook configuration that exists, so the ownership rule is the only obstacle.
    let mut wh = manifest("MutatingWebhookConfiguration", certs::WEBHOOK_CONFIGURATION);
    wh["metadata"]["name"] = format!("{ns}-hooks").into();
    for hook in wh["webhooks"].as_array_mut().expect("webhooks") {
        hook["clientConfig"] = json!({"url": "https://127.0.0.1:9/mutate"});
        hook["namespaceSelector"]["matchLabels"][TEST_LABEL] = ns.clone().into();
    }
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    hooks
        .patch(
            &format!("{ns}-hooks"),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&wh),
        )
        .await
        .expect("register");
    let mut config = CertConfig::for_service(&ns, "velero-jupyterhub", CertOptions::default());
    config.webhook_configuration = format!("{ns}-hooks");
    config.check_interval = Duration::from_millis(200);
    let metrics = Arc::new(Metrics::for_controller());
    let stop = CancellationToken::new();
    let keeper = tokio::spawn(certs::run(
        admin.clone(),
        config,
        metrics.clone(),
        stop.clone(),
    ));
    eventually(Duration::from_secs(20), || async {
        let errors = sample(
            &metrics.encode(),
            r#"velero_jupyterhub_certificate_errors_total{reason="foreign_secret"}"#,
        )?;
        (errors >= 2.0).then_some(())
    })
    .await
    .expect("the keeper reports the foreign Secret, again on each check");
    stop.cancel();
    keeper.await.expect("keeper stops");
    let after = secrets
        .get("velero-jupyterhub-tls")
        .await
        .expect("still there");
    assert_eq!(
        secret_field(&after, "tls.crt"),
        Vec::<u8>::new(),
        "untouched"
    );
    assert!(
        secrets
            .get_opt(certs::CA_SECRET)
            .await
            .expect("get")
            .is_none(),
        "no CA made next to it"
    );
    let untouched = hooks.get(&format!("{ns}-hooks")).await.expect("hooks");
    assert!(
        untouched
            .webhooks
            .iter()
            .flatten()
            .all(|w| w.client_config.ca_bundle.is_none()),
        "no caBundle written"
    );
    let _ = hooks
        .delete(&format!("{ns}-hooks"), &DeleteParams::default())
        .await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin)
        .delete(&ns, &DeleteParams::default())
        .await;
}
