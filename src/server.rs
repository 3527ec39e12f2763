//! Puts the webhook server together: certificates, namespace cache, both listeners, the
//! background tasks and the shutdown sequence. Used by `velero-jupyterhub serve` and by
//! the tests, which run the real server in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cluster::NamespaceCache;
use crate::metrics::Metrics;
use crate::policy::ClaimGlobs;
use crate::policy::helper::HelperOptions;
use crate::tls::{self, CertStore, FileReloader, PemFiles, PemPair};
use crate::webhook::serve::{Listener, ServeOptions, serve};
use crate::webhook::{self, Health, WebhookState};

pub enum TlsSource {
    /// PEM files, polled for changes every `reload_interval`.
    Files {
        files: PemFiles,
        reload_interval: Duration,
    },
    /// A CA and serving certificate made in memory; the CA bundle is written to `ca_out`.
    SelfSigned {
        dns_names: Vec<String>,
        ca_out: Option<PathBuf>,
    },
    /// A `kubernetes.io/tls` Secret, watched through the API (needs a cluster): the
    /// controller's self-managed certificates, or cert-manager's Secret.
    Secret { namespace: String, name: String },
    /// A given certificate (tests).
    Pem(PemPair),
}

pub struct Config {
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub tls: TlsSource,
    pub default_claims: ClaimGlobs,
    /// What restore helpers run (`--helper-image`).
    pub helper: HelperOptions,
    /// Where Velero's Backups and Restores are (`--velero-namespace`).
    pub velero_namespace: String,
    /// Watch namespaces through this client; `None` runs without a cluster.
    pub cluster: Option<kube::Client>,
    pub serve: ServeOptions,
    /// After a shutdown signal, keep serving (not ready) this long so endpoints update.
    pub shutdown_delay: Duration,
}

/// A running server. Dropping it does not stop it: call [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    /// The CA bundle clients should trust, for a self-signed server.
    pub ca_pem: Option<String>,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub namespaces: Arc<NamespaceCache>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts the shutdown sequence: not ready, `shutdown_delay`, stop accepting, drain.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server has stopped.
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            warn!(error = %e, "server task ended abnormally");
        }
    }
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let certs = Arc::new(CertStore::new(metrics.clone()));
    let mut background: Vec<(&'static str, JoinHandle<()>)> = Vec::new();

    let ca_pem = match config.tls {
        TlsSource::Files {
            files,
            reload_interval,
        } => {
            let mut reloader = FileReloader::new(files.clone(), certs.clone(), metrics.clone());
            match reloader.poll().await {
                Ok(_) => info!(cert = %files.cert.display(), "loaded serving certificate"),
                Err(e) => {
                    warn!(error = %e, "no usable serving certificate yet; not ready until one loads")
                }
            }
            let task = tokio::spawn(reloader.run(reload_interval));
            background.push(("certificate reloader", task));
            None
        }
        TlsSource::SelfSigned { dns_names, ca_out } => {
            let (pair, ca_pem) =
                tls::self_signed(&dns_names).context("making a self-signed certificate")?;
            certs.set(pair.certified_key()?);
            if let Some(path) = ca_out {
                std::fs::write(&path, &ca_pem)
                    .with_context(|| format!("writing the CA bundle to {}", path.display()))?;
                info!(ca = %path.display(), "self-signed: wrote the CA bundle (use it as caBundle or curl --cacert)");
            }
            Some(ca_pem)
        }
        TlsSource::Secret { namespace, name } => {
            let client = config.cluster.clone().context(
                "--tls-secret reads the certificate through the API: it needs a cluster (not --no-cluster)",
            )?;
            let watch = crate::cluster::tls_secret::run(
                client,
                namespace,
                name,
                certs.clone(),
                metrics.clone(),
            );
            background.push(("certificate Secret watch", tokio::spawn(watch)));
            None
        }
        TlsSource::Pem(pair) => {
            certs.set(pair.certified_key()?);
            None
        }
    };

    let restore_claims =
        crate::cluster::RestoreClaims::new(config.cluster.clone(), &config.velero_namespace);
    let with_cluster = config.cluster.is_some();
    let namespaces = NamespaceCache::new(config.cluster, config.default_claims, metrics.clone());
    // A namespace fetch leaves its request half of its time to be answered.
    let namespaces = Arc::new(namespaces.with_fetch_timeout(config.serve.request_timeout / 2));
    let mut synced = Vec::new();
    if with_cluster {
        synced.push(("namespace cache", namespaces.synced()));
        background.push(("namespace watch", tokio::spawn(namespaces.clone().run())));
    }

    let listener = bind(config.listen)
        .with_context(|| format!("binding the webhook address --listen {}", config.listen))?;
    let ops_listener = bind(config.ops_listen).with_context(|| {
        format!(
            "binding the operations address --ops-listen {}",
            config.ops_listen
        )
    })?;
    let addr = listener.local_addr()?;
    let ops_addr = ops_listener.local_addr()?;

    let health = Health::new(Some(certs.clone()), synced);
    let admission = webhook::admission_router(Arc::new(WebhookState::new(
        namespaces.clone(),
        restore_claims,
        config.helper,
        metrics.clone(),
        &config.serve,
        health.shutting_down.clone(),
    )));
    let ops = webhook::ops_router(health.clone(), metrics.clone());
    let tls_config = tls::server_config(certs).context("building the TLS configuration")?;
    let serve_opts = config.serve;
    let listeners = [
        (
            Listener {
                name: "webhook",
                tcp: listener,
                tls: Some(tls_config),
                max_connections: serve_opts.max_connections,
            },
            admission,
        ),
        (
            Listener {
                name: "ops",
                tcp: ops_listener,
                tls: None,
                max_connections: serve_opts.max_ops_connections,
            },
            ops,
        ),
    ];

    let supervisors = background
        .into_iter()
        .map(|(name, task)| tokio::spawn(supervise(name, task, health.clone())))
        .collect();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        metrics.clone(),
        listeners,
        serve_opts,
        config.shutdown_delay,
        health.clone(),
        shutdown.clone(),
        supervisors,
    ));
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    info!(%addr, %ops_addr, workers, "serving: POST /mutate/live, /mutate/restore over HTTPS; /healthz, /readyz, /metrics over HTTP");
    Ok(Running {
        addr,
        ops_addr,
        ca_pem,
        metrics,
        health,
        namespaces,
        shutdown,
        task,
    })
}

/// A listening socket with a deep accept queue (the kernel caps it at `somaxconn`): when
/// a flood fills the queue, the kernel drops new connection attempts and the client
/// (the API server, a kubelet probe) retries only a second later.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Waits for a task that should run as long as the server; if it ends, the replica is
/// no longer ready nor live (the kubelet restarts it), and says why.
async fn supervise(name: &'static str, task: JoinHandle<()>, health: Health) {
    let abort = task.abort_handle();
    // Abort the task when the supervisor itself is aborted at shutdown.
    let _guard = AbortOnDrop(abort);
    let reason = match task.await {
        Ok(()) => format!("the {name} stopped"),
        Err(e) if e.is_cancelled() => return,
        Err(e) => format!("the {name} panicked: {e}"),
    };
    error!(
        task = name,
        "{reason}; not ready, and /healthz fails so the container restarts"
    );
    health.failed.store(Some(Arc::new(reason)));
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(
    metrics: Arc<Metrics>,
    listeners: [(Listener, axum::Router); 2],
    opts: ServeOptions,
    shutdown_delay: Duration,
    health: Health,
    shutdown: CancellationToken,
    background: Vec<JoinHandle<()>>,
) {
    let [(webhook_listener, admission), (ops_listener, ops)] = listeners;
    let stop_admission = CancellationToken::new();
    let stop_ops = CancellationToken::new();
    let admission_task = tokio::spawn(serve(
        webhook_listener,
        admission,
        opts,
        metrics.clone(),
        stop_admission.clone().cancelled_owned(),
    ));
    let ops_task = tokio::spawn(serve(
        ops_listener,
        ops,
        opts,
        metrics,
        stop_ops.clone().cancelled_owned(),
    ));

    shutdown.cancelled().await;
    health.shutting_down.store(true, Ordering::Release);
    info!(delay = ?shutdown_delay, "shutting down: not ready, draining");
    tokio::time::sleep(shutdown_delay).await;
    stop_admission.cancel();
    let _ = admission_task.await;
    // The operations port stays up until the admission server has drained.
    stop_ops.cancel();
    let _ = ops_task.await;
    for task in background {
        task.abort();
    }
    info!("stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(Some(Arc::new(CertStore::default())), Vec::new())
    }

    #[tokio::test]
    async fn a_background_task_that_dies_makes_the_replica_unready_and_not_live() {
        for (task, want) in [
            (tokio::spawn(async {}), "the namespace watch stopped"),
            (
                tokio::spawn(async { panic!("boom") }),
                "the namespace watch panicked",
            ),
        ] {
            let health = health();
            supervise("namespace watch", task, health.clone()).await;
            let failure = health.failure().expect("a failure");
            assert!(failure.starts_with(want), "{failure}");
            assert!(health.problems().contains(&failure));
        }
    }

    #[tokio::test]
    async fn a_running_task_is_healthy_and_aborted_with_its_supervisor() {
        let health = health();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        let supervisor = tokio::spawn(supervise("namespace watch", task, health.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(health.failure().is_none());
        supervisor.abort();
        // The task is aborted with it: its end drops the sender.
        assert!(rx.await.is_err());
        assert!(
            health.failure().is_none(),
            "an abort at shutdown is not a failure"
        );
    }
}
