//! Accept loops: HTTPS (tokio-rustls + hyper) for admission, plain HTTP for operations.
//! Both stop accepting on shutdown and let in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// A client must finish the TLS handshake within this time.
    pub handshake_timeout: Duration,
    /// A connection must send a complete request head within this time, both when it opens
    /// and between keep-alive requests (idle connections are closed after it).
    pub idle_timeout: Duration,
    /// One request, body included, must be read and answered within this time.
    pub request_timeout: Duration,
    /// Requests whose bodies are read and reviewed at once (more wait): bounds memory.
    pub max_concurrent_reviews: usize,
    /// Open connections at most; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// On shutdown, how long in-flight requests may take before connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_concurrent_reviews: 16,
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then drains.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.idle_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    let connections = Arc::new(Semaphore::new(opts.max_connections));
    loop {
        // Wait for a connection slot first: past the limit, new clients queue in the backlog.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let watcher = graceful.watcher();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    metrics.connection("handshake_failed");
                    return debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.connection("handshake_timeout");
                    return debug!(%peer, "TLS handshake timed out");
                }
            };
            metrics.connection("accepted");
            let conn = http.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drain(graceful, opts.shutdown_grace).await;
}

/// Serves `app` over plain HTTP (health and metrics) until `shutdown` resolves.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(e) = result {
        warn!(error = %e, "operations server stopped with an error");
    }
}

async fn drain(graceful: GracefulShutdown, grace: Duration) {
    tokio::select! {
        () = graceful.shutdown() => debug!("all connections drained"),
        () = tokio::time::sleep(grace) => warn!(?grace, "shutdown grace period over; dropping remaining connections"),
    }
}
