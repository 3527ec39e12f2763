//! The accept loop, shared by both listeners: HTTPS (tokio-rustls + hyper) for
//! admission, plain HTTP for operations. Every connection is bounded in memory (header
//! buffer), in time (handshake, header and idle timeouts) and in number (a cap with
//! eviction); both stop accepting on shutdown and let in-flight requests finish.
//!
//! The connection cap holds against clients that open connections and sit on them. When
//! it is reached:
//! - a new connection from a peer address that already holds half the cap is closed at
//!   once, before any TLS work (a flood from one address costs an accept and a close);
//! - any other new connection takes the place of one held by the peer address with the
//!   most open connections: of those, the one that has gone longest without a request
//!   starting or finishing (idle, stalled in its headers, or trickling a body), never one
//!   whose request is being reviewed.
//!
//! So a neighbour that floods us only ever displaces its own connections, and the API
//! server (a few keep-alive connections from its own addresses; half the cap would carry
//! tens of thousands of reviews a second) keeps its place.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Largest request head (and read buffer) per connection. The API server's request
/// heads are a few hundred bytes; hyper's default would let each connection hold ~400 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// A client must finish the TLS handshake within this time.
    pub handshake_timeout: Duration,
    /// A connection must send a complete request head within this time, both when it
    /// opens and between keep-alive requests (so idle connections close after it). Longer
    /// than client-go's 90 s idle timeout, so the API server, not us, closes idle
    /// connections: a request it writes onto a connection we are closing would fail open.
    pub idle_timeout: Duration,
    /// One AdmissionReview, body included, must be read and answered within this time:
    /// below the webhook's `timeoutSeconds` (3 s), so a slow client gets our 408, not the
    /// API server's give-up.
    pub request_timeout: Duration,
    /// Bytes of request bodies over [`super::SMALL_BODY_BYTES`] read and reviewed at once
    /// (more wait their turn, inside `request_timeout`).
    pub large_body_budget: usize,
    /// Open connections on the webhook port at most (see the module docs on eviction).
    pub max_connections: usize,
    /// Open connections on the operations port at most (probes and scrapes).
    pub max_ops_connections: usize,
    /// On shutdown, how long in-flight requests may take before connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(2),
            large_body_budget: 16 * 1024 * 1024,
            max_connections: 128,
            max_ops_connections: 16,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// One listener: its name (for metrics and logs), TLS or not, and its limits.
pub struct Listener {
    pub name: &'static str,
    pub tcp: TcpListener,
    /// `None`: plain HTTP (the operations port).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests
/// for up to `opts.shutdown_grace`.
pub async fn serve(
    listener: Listener,
    app: Router,
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let Listener {
        name,
        tcp: tcp_listener,
        tls,
        max_connections,
    } = listener;
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.idle_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let slots = Arc::new(Slots::new(name, max_connections.max(1), metrics.clone()));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = tcp_listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // At the cap, make room (or, when every connection is mid-review, wait for one).
        let conn = tokio::select! {
            conn = slots.open(peer.ip()) => conn,
            () = &mut shutdown => break,
        };
        let Some(conn) = conn else {
            metrics.connection(name, "refused");
            debug!(listener = name, %peer, "connection refused: its address holds half the connection cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let task = Connection {
            conn,
            slots: slots.clone(),
            acceptor: acceptor.clone(),
            app: app.clone(),
            http: http.clone(),
            opts,
            metrics: metrics.clone(),
            peer,
        };
        tokio::spawn(task.run(tcp, graceful.watcher()));
    }
    drop(tcp_listener);
    tokio::select! {
        () = graceful.shutdown() => debug!(listener = name, "all connections drained"),
        () = tokio::time::sleep(opts.shutdown_grace) => {
            warn!(listener = name, grace = ?opts.shutdown_grace, "shutdown grace period over; dropping remaining connections");
        }
    }
}

/// One accepted connection, from handshake to close.
struct Connection {
    conn: Arc<ConnState>,
    slots: Arc<Slots>,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    http: hyper::server::conn::http1::Builder,
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, tcp: TcpStream, watcher: hyper_util::server::graceful::Watcher) {
        let evicted = self.conn.evict.clone();
        let listener = self.slots.listener;
        tokio::select! {
            () = self.serve(tcp, watcher) => {}
            () = evicted.cancelled() => {
                self.metrics.connection(listener, "evicted");
                debug!(listener, peer = %self.peer, "connection evicted to make room");
            }
        }
        self.slots.close(&self.conn);
    }

    async fn serve(&self, tcp: TcpStream, watcher: hyper_util::server::graceful::Watcher) {
        let listener = self.slots.listener;
        let peer = self.peer;
        let service = PerConnection {
            app: self.app.clone(),
            conn: self.conn.clone(),
        };
        let result = match &self.acceptor {
            None => {
                let conn = self.http.serve_connection(TokioIo::new(tcp), service);
                watcher.watch(conn).await
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.opts.handshake_timeout, acceptor.accept(tcp));
                let stream = match handshake.await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        self.metrics.connection(listener, "handshake_failed");
                        return debug!(listener, %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        self.metrics.connection(listener, "handshake_timeout");
                        return debug!(listener, %peer, "TLS handshake timed out");
                    }
                };
                self.metrics.connection(listener, "accepted");
                let conn = self.http.serve_connection(TokioIo::new(stream), service);
                watcher.watch(conn).await
            }
        };
        if let Err(e) = result {
            debug!(listener, %peer, error = %e, "connection ended with an error");
        }
    }
}

/// The Router as one connection's hyper service: marks the connection's progress as each
/// request starts and finishes, and hands the request a [`ConnectionActivity`].
#[derive(Clone)]
struct PerConnection {
    app: Router,
    conn: Arc<ConnState>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for PerConnection {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let conn = self.conn.clone();
        conn.progress();
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut()
            .insert(ConnectionActivity(conn.clone()));
        let response = self.app.clone().oneshot(req);
        Box::pin(async move {
            let response = response.await;
            conn.progress();
            response
        })
    }
}

/// Handed to handlers through request extensions: a handler marks the stretch during which
/// its connection must not be evicted (the review, once the body is in).
#[derive(Clone)]
pub struct ConnectionActivity(Arc<ConnState>);

impl ConnectionActivity {
    /// Not evictable until the guard drops.
    pub fn reviewing(&self) -> ReviewingGuard {
        self.0.reviewing.store(true, Ordering::Release);
        ReviewingGuard(self.0.clone())
    }
}

pub struct ReviewingGuard(Arc<ConnState>);

impl Drop for ReviewingGuard {
    fn drop(&mut self) {
        self.0.reviewing.store(false, Ordering::Release);
    }
}

/// The request's [`ConnectionActivity`] (absent when a Router is driven without the
/// accept loop, as in tests and fuzzing).
pub fn activity(req: &Request) -> Option<ConnectionActivity> {
    req.extensions().get::<ConnectionActivity>().cloned()
}

struct ConnState {
    id: u64,
    peer: IpAddr,
    /// Last progress (accepted, a request started or finished), in ns since `Slots::epoch`.
    progress: AtomicU64,
    reviewing: AtomicBool,
    evict: CancellationToken,
    epoch: Instant,
}

impl ConnState {
    fn progress(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.progress.store(now, Ordering::Relaxed);
    }
}

/// The open connections of one listener, at most `cap`.
struct Slots {
    listener: &'static str,
    cap: usize,
    epoch: Instant,
    open: Mutex<(u64, HashMap<u64, Arc<ConnState>>)>,
    freed: Notify,
    metrics: Arc<Metrics>,
}

impl Slots {
    fn new(listener: &'static str, cap: usize, metrics: Arc<Metrics>) -> Self {
        metrics.set_connections_open(listener, 0);
        Self {
            listener,
            cap,
            epoch: Instant::now(),
            open: Mutex::new((0, HashMap::new())),
            freed: Notify::new(),
            metrics,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Arc<ConnState>>)> {
        // A poisoned lock only means a holder panicked; the table is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection from `peer`; at the cap, refuses it (`None`) or evicts
    /// another (see the module docs), or waits while every open connection is mid-review.
    async fn open(&self, peer: IpAddr) -> Option<Arc<ConnState>> {
        loop {
            let freed = self.freed.notified();
            {
                let mut table = self.table();
                if table.1.len() >= self.cap {
                    let held = table.1.values().filter(|c| c.peer == peer).count();
                    if held * 2 >= self.cap {
                        return None;
                    }
                    let victim = eviction_victim(table.1.values());
                    if let Some(conn) = victim.and_then(|id| table.1.remove(&id)) {
                        conn.evict.cancel();
                    }
                }
                if table.1.len() < self.cap {
                    table.0 += 1;
                    let conn = Arc::new(ConnState {
                        id: table.0,
                        peer,
                        progress: AtomicU64::new(0),
                        reviewing: AtomicBool::new(false),
                        evict: CancellationToken::new(),
                        epoch: self.epoch,
                    });
                    conn.progress();
                    table.1.insert(conn.id, conn.clone());
                    self.metrics
                        .set_connections_open(self.listener, table.1.len());
                    return Some(conn);
                }
            }
            freed.await;
        }
    }

    fn close(&self, conn: &ConnState) {
        let mut table = self.table();
        table.1.remove(&conn.id);
        self.metrics
            .set_connections_open(self.listener, table.1.len());
        drop(table);
        self.freed.notify_one();
    }
}

/// Which connection makes room: among the evictable ones (not mid-review), those of the
/// peer address holding the most connections, and of those the least recently active
/// (between equally busy peers, the least recently active connection overall).
fn eviction_victim<'a>(open: impl Iterator<Item = &'a Arc<ConnState>>) -> Option<u64> {
    // Per peer: (connections, least recent progress, that connection's id).
    let mut per_peer: HashMap<IpAddr, (usize, u64, u64)> = HashMap::new();
    for c in open.filter(|c| !c.reviewing.load(Ordering::Acquire)) {
        let progress = c.progress.load(Ordering::Relaxed);
        let entry = per_peer.entry(c.peer).or_insert((0, u64::MAX, c.id));
        entry.0 += 1;
        if progress < entry.1 {
            (entry.1, entry.2) = (progress, c.id);
        }
    }
    let busiest = per_peer
        .into_values()
        .max_by_key(|&(n, progress, _)| (n, std::cmp::Reverse(progress)))?;
    Some(busiest.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, peer: [u8; 4], progress: u64, reviewing: bool) -> Arc<ConnState> {
        Arc::new(ConnState {
            id,
            peer: IpAddr::from(peer),
            progress: AtomicU64::new(progress),
            reviewing: AtomicBool::new(reviewing),
            evict: CancellationToken::new(),
            epoch: Instant::now(),
        })
    }

    #[test]
    fn the_busiest_peer_loses_its_least_recently_active_connection() {
        let (api, pod) = ([10, 0, 0, 1], [10, 1, 2, 3]);
        // (connections, victim)
        let cases: Vec<(Vec<Arc<ConnState>>, Option<u64>)> = vec![
            (vec![], None),
            // The API server's connection is older, but the pod holds more.
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, pod, 5, false),
                    conn(3, pod, 3, false),
                ],
                Some(3),
            ),
            // A connection mid-review is never chosen, nor counted.
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, api, 2, false),
                    conn(3, pod, 0, true),
                    conn(4, pod, 9, false),
                ],
                Some(1),
            ),
            (vec![conn(1, api, 1, true), conn(2, pod, 2, true)], None),
            // Equally busy: the least recently active connection overall.
            (
                vec![conn(1, api, 7, false), conn(2, pod, 4, false)],
                Some(2),
            ),
        ];
        for (i, (open, want)) in cases.into_iter().enumerate() {
            assert_eq!(eviction_victim(open.iter()), want, "case {i}");
        }
    }
}
