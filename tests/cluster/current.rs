//! What only current Kubernetes can show (the v1.20 test server cannot): our own pods pass
//! the Pod Security `restricted` profile as a locked-down cluster enforces it. Runs on the
//! current test server (scripts/test.sh); it fails, saying so, on an older one.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use testkit::cluster;

/// A namespace labelled like manifests/namespace.yaml (which enforces the `restricted`
/// profile, as a locked-down cluster would) under a name of this test's own.
async fn namespace_like_ours(client: &kube::Client) -> String {
    let minor = cluster::server_minor(client).await;
    assert!(
        minor >= 25,
        "the test API server is v1.{minor}: Pod Security admission needs v1.25+ \
         (run on the current one: scripts/test.sh, KUBE_ENVTEST_VERSION=current)"
    );
    let ours = cluster::manifest("Namespace", "velero-jupyterhub");
    let mut labels = ours["metadata"]["labels"].clone();
    assert_eq!(
        labels["pod-security.kubernetes.io/enforce"], "restricted",
        "manifests/namespace.yaml enforces the restricted profile"
    );
    let name = cluster::unique("vjh-restricted");
    labels["kubernetes.io/metadata.name"] = name.clone().into();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

#[tokio::test]
async fn the_webhook_pods_pass_the_restricted_profile_and_a_user_pod_would_not() {
    let client = cluster::client().await;
    let ns = namespace_like_ours(&client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };

    // The Deployment's pod, as its ReplicaSet would create it.
    let deployment = cluster::manifest("Deployment", "velero-jupyterhub");
    let template = &deployment["spec"]["template"];
    let ours: Pod = serde_json::from_value(json!({
        "metadata": {"name": "velero-jupyterhub-check", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }))
    .unwrap();
    pods.create(&dry_run, &ours)
        .await
        .unwrap_or_else(|e| panic!("our Deployment's pod is refused under `restricted`: {e}"));

    // The check can fail: a z2jh user pod (root init container, no seccomp profile) is
    // refused in the same namespace.
    let user = cluster::user_pod("rita");
    let refused = pods.create(&dry_run, &user).await.expect_err("refused");
    assert!(
        refused.to_string().contains("PodSecurity"),
        "refused for another reason: {refused}"
    );
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}
