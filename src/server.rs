//! Puts the webhook server together: certificates, namespace cache, both listeners, and
//! the shutdown sequence. Used by `velero-jupyterhub serve` and by the tests, which run
//! the real server in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::NamespaceCache;
use crate::metrics::Metrics;
use crate::policy::{ClaimGlobs, StaticNamespaces};
use crate::tls::{self, CertStore, FileReloader, PemFiles, PemPair};
use crate::webhook::serve::{ServeOptions, serve_plain, serve_tls};
use crate::webhook::{self, Namespaces, Readiness, WebhookState};

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
    /// A given certificate (tests).
    Pem(PemPair),
}

pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub tls: TlsSource,
    pub default_claims: ClaimGlobs,
    /// Watch namespaces through this client; `None` runs without a cluster.
    pub cluster: Option<kube::Client>,
    pub serve: ServeOptions,
    /// After a shutdown signal, keep serving (not ready) this long so endpoints update.
    pub shutdown_delay: Duration,
}

/// A running server. Dropping it does not stop it: call [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The CA bundle clients should trust, for a self-signed server.
    pub ca_pem: Option<String>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
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
    let certs = Arc::new(CertStore::default());
    let mut background: Vec<JoinHandle<()>> = Vec::new();

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
            background.push(tokio::spawn(reloader.run(reload_interval)));
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
        TlsSource::Pem(pair) => {
            certs.set(pair.certified_key()?);
            None
        }
    };

    let (namespaces, namespaces_synced) = match config.cluster {
        Some(client) => {
            let cache = Arc::new(NamespaceCache::new(
                Some(client),
                config.default_claims,
                metrics.clone(),
            ));
            let synced = cache.synced();
            background.push(tokio::spawn(cache.clone().run()));
            (Namespaces::Cluster(cache), Some(synced))
        }
        None => (
            Namespaces::Static(StaticNamespaces::new(config.default_claims)),
            None,
        ),
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the webhook address --listen {}", config.listen))?;
    let ops_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "binding the metrics address --metrics-listen {}",
                config.metrics_listen
            )
        })?;
    let addr = listener.local_addr()?;
    let metrics_addr = ops_listener.local_addr()?;

    let readiness = Readiness {
        certs: certs.clone(),
        namespaces_synced,
        shutting_down: Arc::new(AtomicBool::new(false)),
    };
    let admission = webhook::admission_router(Arc::new(WebhookState::new(
        namespaces,
        metrics.clone(),
        &config.serve,
        readiness.shutting_down.clone(),
    )));
    let ops = webhook::ops_router(readiness.clone(), metrics.clone());
    let tls_config = tls::server_config(certs).context("building the TLS configuration")?;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        metrics.clone(),
        listener,
        ops_listener,
        tls_config,
        admission,
        ops,
        config.serve,
        config.shutdown_delay,
        readiness.shutting_down.clone(),
        shutdown.clone(),
        background,
    ));
    info!(%addr, %metrics_addr, "serving: POST /mutate over HTTPS; /healthz, /readyz, /metrics over HTTP");
    Ok(Running {
        addr,
        metrics_addr,
        ca_pem,
        metrics,
        readiness,
        shutdown,
        task,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    ops_listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    admission: axum::Router,
    ops: axum::Router,
    serve: ServeOptions,
    shutdown_delay: Duration,
    shutting_down: Arc<AtomicBool>,
    shutdown: CancellationToken,
    background: Vec<JoinHandle<()>>,
) {
    let stop_admission = CancellationToken::new();
    let stop_ops = CancellationToken::new();
    let admission_task = tokio::spawn(serve_tls(
        listener,
        tls_config,
        admission,
        serve,
        metrics,
        stop_admission.clone().cancelled_owned(),
    ));
    let ops_task = tokio::spawn(serve_plain(
        ops_listener,
        ops,
        stop_ops.clone().cancelled_owned(),
    ));

    shutdown.cancelled().await;
    shutting_down.store(true, Ordering::Release);
    info!(delay = ?shutdown_delay, "shutting down: not ready, draining");
    tokio::time::sleep(shutdown_delay).await;
    stop_admission.cancel();
    let _ = admission_task.await;
    stop_ops.cancel();
    let _ = ops_task.await;
    for task in background {
        task.abort();
    }
    info!("stopped");
}
