//! `kubectl apply -k manifests/` with no other step, on an API server of its
//! own (the install registers the cluster-wide webhook configuration and policies, which
//! the tests sharing the main server must not see). kubectl is the one of the test
//! server's version (`scripts/kube-envtest.sh kubectl` builds it; scripts/test.sh sets
//! KUBECTL).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use testkit::cluster::{self, OwnServer, eventually};
use tokio_util::sync::CancellationToken;
use velero_jupyterhub::controller::certs::{self, CertConfig};
use velero_jupyterhub::metrics::Metrics;
use velero_jupyterhub::policy::certs::CertOptions;
use velero_jupyterhub::tls::CertInfo;

const NAMESPACE: &str = "velero-jupyterhub";

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| {
        panic!(
            "KUBECTL is not set: run the tests with scripts/test.sh, or \
             export KUBECTL=$(scripts/kube-envtest.sh kubectl)"
        )
    })
}

/// Runs kubectl; panics with its output unless it succeeds. Returns stdout.
fn run(kubeconfig: &str, args: &[&str]) -> String {
    let out = Command::new(kubectl())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ca_bundles(config: &MutatingWebhookConfiguration) -> Vec<Option<Vec<u8>>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_installs_everything_and_certificates_need_no_other_step() {
    let (_server, kubeconfig) = OwnServer::start("install", 16483, 12419);
    cluster::on_own_server(&kubeconfig.clone(), async move {
        let admin = cluster::client().await;

        // The install, as README says: one command.
        let applied = run(&kubeconfig, &["apply", "-k", "manifests/"]);
        let rendered = run(&kubeconfig, &["kustomize", "manifests/"]);
        let objects =
            rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: "));
        assert_eq!(
            applied.lines().filter(|l| l.ends_with(" created")).count(),
            objects,
            "every object created:\n{applied}"
        );
        // Everything it declares exists (kubectl reads them back by the same kustomization).
        let listed = run(&kubeconfig, &["get", "-k", "manifests/", "-o", "name"]);
        assert_eq!(listed.lines().count(), objects, "{listed}");

        // The Deployments' pods pass the namespace's Pod Security `restricted` enforcement
        // (the ReplicaSet controller creates them; a violation would leave none).
        let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
        for component in ["webhook", "controller"] {
            let selector = format!("app.kubernetes.io/component={component}");
            let found = eventually(Duration::from_secs(60), || async {
                let n = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?
                    .items
                    .len();
                (n == 2).then_some(n)
            })
            .await;
            assert_eq!(
                found,
                Some(2),
                "two {component} pods admitted under `restricted`"
            );
        }
        let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
        let webhook_deployment = deployments
            .get("velero-jupyterhub")
            .await
            .expect("deployment");
        assert!(
            webhook_deployment
                .spec
                .and_then(|s| s.template.spec)
                .is_some_and(|s| s.volumes.unwrap_or_default().is_empty()),
            "no certificate volume to wait for: the webhook reads its Secret through the API"
        );

        // No kubelet runs here, so the two components run in-process, each with a token of
        // its installed ServiceAccount: the controller makes the certificates, the webhook
        // loads them. Nobody else does anything.
        let controller =
            cluster::client_as_service_account(NAMESPACE, "velero-jupyterhub-controller").await;
        let mut config =
            CertConfig::for_service(NAMESPACE, "velero-jupyterhub", CertOptions::default());
        config.check_interval = Duration::from_secs(1);
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(certs::run(
            controller,
            config,
            Arc::new(Metrics::for_controller()),
            stop.clone(),
        ));
        let replica = cluster::webhook_from_secret(
            cluster::client_as_service_account(NAMESPACE, "velero-jupyterhub").await,
        )
        .await;
        eventually(Duration::from_secs(30), || async {
            replica.health.problems().is_empty().then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("the webhook became ready: {:?}", replica.health.problems()));

        let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
        let installed = webhooks
            .get(certs::WEBHOOK_CONFIGURATION)
            .await
            .expect("installed");
        let bundles = ca_bundles(&installed);
        assert_eq!(bundles.len(), 4, "four webhook entries");
        let bundle = bundles[0].clone().expect("a caBundle");
        assert!(
            bundles.iter().all(|b| b.as_ref() == Some(&bundle)),
            "every entry has it"
        );
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
        let tls = secrets
            .get(certs::TLS_SECRET)
            .await
            .expect("the serving certificate's Secret");
        let cert = CertInfo::from_pem(&tls.data.as_ref().expect("data")["tls.crt"].0)
            .expect("a certificate");
        assert_eq!(
            cert.names,
            [
                "velero-jupyterhub.velero-jupyterhub.svc",
                "velero-jupyterhub.velero-jupyterhub.svc.cluster.local"
            ],
            "for the Service the API server calls"
        );
        let ca = CertInfo::from_pem(&bundle).expect("the CA");
        assert!(
            cert.signed_by(&ca),
            "the caBundle verifies the served certificate"
        );

        // An upgrade re-applies the manifests, with nobody to repair what it might undo (the
        // keeper stopped): a server-side dry run passes, and the real re-apply leaves the
        // webhook configuration as it was, caBundle included.
        stop.cancel();
        keeper.await.expect("keeper stops");
        run(
            &kubeconfig,
            &["apply", "--dry-run=server", "-k", "manifests/"],
        );
        let again = run(&kubeconfig, &["apply", "-k", "manifests/"]);
        let line = again
            .lines()
            .find(|l| l.starts_with("mutatingwebhookconfiguration"))
            .unwrap_or_default();
        assert!(line.ends_with(" unchanged"), "{again}");
        let after = webhooks
            .get(certs::WEBHOOK_CONFIGURATION)
            .await
            .expect("still installed");
        assert_eq!(
            after.metadata.resource_version, installed.metadata.resource_version,
            "re-applying did not touch the webhook configuration"
        );
        assert_eq!(
            ca_bundles(&after),
            bundles,
            "re-applying keeps the caBundle"
        );
        // The Secrets are the controller's, out of Velero backups (the CA's private key).
        for name in [certs::CA_SECRET, certs::TLS_SECRET] {
            let secret = secrets.get(name).await.expect("secret");
            let labels = secret.metadata.labels.unwrap_or_default();
            assert_eq!(
                labels
                    .get("velero.io/exclude-from-backup")
                    .map(String::as_str),
                Some("true"),
                "{name}"
            );
        }

        // The cert-manager variant renders (its Certificate and Issuer kinds need cert-manager,
        // which the test server lacks, so it is not applied): files and no self-management.
        let certs_overlay = run(&kubeconfig, &["kustomize", "certs/"]);
        assert!(certs_overlay.contains("--tls-cert=/etc/velero-jupyterhub/tls/tls.crt"));
        assert!(certs_overlay.contains("--manage-certificates=false"));
        assert!(!certs_overlay.contains("--tls-secret"));

        replica.shutdown();
        replica.stopped().await;
    })
    .await;
}
