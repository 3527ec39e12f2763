//! The Kubernetes side: what we watch and (later) write through the API server.

pub mod namespaces;

pub use namespaces::NamespaceCache;

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the in-cluster
/// service account, whichever `kube` finds; `None` when neither is there.
pub async fn try_client() -> Result<Option<kube::Client>, kube::Error> {
    match kube::Config::infer().await {
        Ok(config) => kube::Client::try_from(config).map(Some),
        Err(e) => {
            tracing::debug!(error = %e, "no kubeconfig or in-cluster configuration");
            Ok(None)
        }
    }
}
