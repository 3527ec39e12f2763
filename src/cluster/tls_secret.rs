//! `serve --tls-secret`: the serving certificate from a `kubernetes.io/tls` Secret, read
//! through a watch of that one Secret (a field selector on its name, so the webhook's
//! Role can name it). A new certificate is served from the next handshake on; nothing is
//! mounted, so there is no file-reload delay and no restart.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::tls::{CertStore, Loader};

/// Keys of a `kubernetes.io/tls` Secret.
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
/// The CA bundle that verifies `tls.crt` (written by the controller and by cert-manager).
pub const CA_KEY: &str = "ca.crt";

/// Watches `namespace/name` forever, loading each new certificate into `store`. A watch
/// error is retried with backoff while the last certificate stays in use; until one
/// loads, the replica is not ready (`/readyz` says why).
pub async fn run(
    client: kube::Client,
    namespace: String,
    name: String,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    let mut loader = Loader::new(store, metrics);
    let mut last_error: Option<String> = None;
    while let Some(item) = stream.next().await {
        let problem = match item {
            Ok(secret) => {
                let data = secret.data.unwrap_or_default();
                match (data.get(CERT_KEY), data.get(KEY_KEY)) {
                    (Some(cert), Some(key)) => match loader.offer(cert.0.clone(), key.0.clone()) {
                        Ok(true) => {
                            info!(secret = %format!("{namespace}/{name}"), "loaded serving certificate");
                            last_error = None;
                            continue;
                        }
                        Ok(false) => continue,
                        Err(e) => e.to_string(),
                    },
                    _ => format!("the Secret has no {CERT_KEY} and {KEY_KEY} yet"),
                }
            }
            Err(e) => format!("watch: {e}"),
        };
        if last_error.as_deref() != Some(&problem) {
            warn!(secret = %format!("{namespace}/{name}"), error = %problem, loaded = loader.is_loaded(),
                "serving certificate not (re)loaded from the Secret; waiting for a change");
            last_error = Some(problem);
        }
    }
}
