//! The Kubernetes side: what we watch, and the Events we publish.

pub mod events;
pub mod namespaces;
pub mod restoring;
pub mod tls_secret;
pub mod velero;

pub use namespaces::NamespaceCache;
pub use restoring::RestoreClaims;

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the in-cluster
/// service account, whichever `kube` finds. `Ok(None)` only when no configuration exists
/// at all; a configuration that exists but does not work is an error, not a silent
/// fallback to running without a cluster.
pub async fn try_client() -> anyhow::Result<Option<kube::Client>> {
    let configured = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists());
    match kube::Config::infer().await {
        Ok(config) => Ok(Some(kube::Client::try_from(config)?)),
        Err(e) if configured => Err(anyhow::anyhow!(
            "a Kubernetes configuration is present (KUBECONFIG, ~/.kube/config or in-cluster) but unusable: {e}; \
             fix it, or run with --no-cluster"
        )),
        Err(e) => {
            tracing::debug!(error = %e, "no kubeconfig or in-cluster configuration");
            Ok(None)
        }
    }
}

/// Every object `api` lists, a page (500) at a time: one answer of 10,000 pods held while
/// it is read would cost more than the objects themselves.
pub async fn list_all<K>(api: &kube::Api<K>, params: kube::api::ListParams) -> kube::Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = params.limit(500);
    let mut out = Vec::new();
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}
