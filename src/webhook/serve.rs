//! The accept loop, shared by both listeners: HTTPS (tokio-rustls + hyper) for
//! admission, plain HTTP for operations. Every connection is bounded in memory (header
//! buffer), in time (handshake, idle and request timeouts) and in number (a cap); both
//! stop accepting on shutdown and let in-flight requests finish.
//!
//! One table of open connections per listener ([`Slots`]) does all the closing: it
//! evicts at the cap, closes idle connections (one sweeper per listener, not a timer per
//! request) and drains at shutdown, by aborting the connection's task. The connection
//! cap holds against clients that open connections and sit on them. When it is reached:
//! - a new connection from the peer address that holds the most connections, and at
//!   least half the cap, is closed at once, before any TLS work (a flood from one address
//!   costs an accept and a close);
//! - any other new connection takes the place of one held by that busiest address: the
//!   one that has gone longest without a request starting or finishing (idle, stalled in
//!   its headers, or trickling a body), never one whose request is being reviewed (if all
//!   of them are, the newcomer waits the moment a review takes).
//!
//! So a neighbour that floods us only ever displaces its own connections, and the API
//! server (a few keep-alive connections from its own addresses; half the cap would carry
//! tens of thousands of reviews a second) keeps its place.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
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
    let mut http = hyper::server::conn::http1::Builder::new();
    // No hyper timer: idle connections are the sweeper's (see `Slots::sweep`).
    http.header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let slots = Arc::new(Slots::new(name, max_connections.max(1), metrics.clone()));
    let sweeper = tokio::spawn(slots.clone().sweep(opts.idle_timeout));
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
            conn: conn.clone(),
            slots: slots.clone(),
            acceptor: acceptor.clone(),
            app: app.clone(),
            http: http.clone(),
            opts,
            metrics: metrics.clone(),
            peer,
        };
        let handle = tokio::spawn(task.run(tcp));
        let _ = conn.task.set(handle.abort_handle());
    }
    drop(tcp_listener);
    sweeper.abort();
    slots.drain(opts.shutdown_grace).await;
}

/// One accepted connection, from handshake to close. Dropping it (its task aborted:
/// evicted, idle, or drained) closes the socket and frees its slot.
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

impl Drop for Connection {
    fn drop(&mut self) {
        self.slots.close(&self.conn);
    }
}

impl Connection {
    async fn run(self, tcp: TcpStream) {
        let listener = self.slots.listener;
        let peer = self.peer;
        let service = PerConnection {
            app: self.app.clone(),
            conn: self.conn.clone(),
        };
        let result = match &self.acceptor {
            None => {
                let io = TokioIo::new(tcp);
                self.http.serve_connection(io, service).await
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
                let io = TokioIo::new(stream);
                self.http.serve_connection(io, service).await
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
    type Future = Tracked;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        self.conn.progress(true);
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut()
            .insert(ConnectionActivity(self.conn.clone()));
        Tracked {
            response: self.app.clone().oneshot(req),
            conn: self.conn.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response, marking its connection's progress when it is ready.
    struct Tracked {
        #[pin]
        response: tower::util::Oneshot<Router, Request>,
        conn: Arc<ConnState>,
    }
}

impl Future for Tracked {
    type Output = Result<axum::response::Response, std::convert::Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx));
        this.conn.progress(false);
        std::task::Poll::Ready(response)
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
    /// Last progress (accepted, a request started or finished), in ns since `epoch`.
    progress: AtomicU64,
    /// A request is being handled (its response not yet produced).
    in_request: AtomicBool,
    /// The request's body is in and it is being reviewed: never evicted now.
    reviewing: AtomicBool,
    /// The connection's task, to close it.
    task: OnceLock<AbortHandle>,
    epoch: Instant,
}

impl ConnState {
    fn progress(&self, in_request: bool) {
        self.progress
            .store(nanos_since(self.epoch), Ordering::Relaxed);
        self.in_request.store(in_request, Ordering::Release);
    }

    /// Closes the connection (drops its task; its slot is freed as the task ends).
    fn close(&self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct Table {
    last_id: u64,
    conns: HashMap<u64, Arc<ConnState>>,
}

/// The open connections of one listener, at most `cap`.
struct Slots {
    listener: &'static str,
    cap: usize,
    epoch: Instant,
    open: Mutex<Table>,
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
            open: Mutex::new(Table::default()),
            freed: Notify::new(),
            metrics,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
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
                if table.conns.len() >= self.cap {
                    match choose(table.conns.values(), peer, self.cap) {
                        AtCap::Refuse => return None,
                        AtCap::Evict(id) => {
                            if let Some(conn) = table.conns.remove(&id) {
                                conn.close();
                                self.metrics.connection(self.listener, "evicted");
                            }
                        }
                        AtCap::Wait => {}
                    }
                }
                if table.conns.len() < self.cap {
                    table.last_id += 1;
                    let conn = Arc::new(ConnState {
                        id: table.last_id,
                        peer,
                        progress: AtomicU64::new(nanos_since(self.epoch)),
                        in_request: AtomicBool::new(false),
                        reviewing: AtomicBool::new(false),
                        task: OnceLock::new(),
                        epoch: self.epoch,
                    });
                    table.conns.insert(conn.id, conn.clone());
                    let open = table.conns.len();
                    self.metrics.set_connections_open(self.listener, open);
                    return Some(conn);
                }
            }
            // Look again when a connection closes, or soon: a review in progress (which
            // made its connection unevictable) takes microseconds.
            let _ = tokio::time::timeout(Duration::from_millis(10), freed).await;
        }
    }

    /// Closes connections that have sent no complete request head for `idle`: at open,
    /// and between keep-alive requests (a connection with a request in hand is closed by
    /// that request's own timeout, not here).
    async fn sweep(self: Arc<Self>, idle: Duration) {
        let period = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        loop {
            ticker.tick().await;
            let now = nanos_since(self.epoch);
            let mut table = self.table();
            table.conns.retain(|_, conn| {
                let quiet = now.saturating_sub(conn.progress.load(Ordering::Relaxed));
                let stale = quiet > idle && !conn.in_request.load(Ordering::Acquire);
                if stale && conn.task.get().is_some() {
                    conn.close();
                    self.metrics.connection(self.listener, "idle_timeout");
                    return false;
                }
                true
            });
            self.metrics
                .set_connections_open(self.listener, table.conns.len());
        }
    }

    /// At shutdown: closes connections once they have had no request in hand for a
    /// moment (time for the last response to be written; a response sent while shutting
    /// down also asks the client to close), and every one left after `grace`.
    async fn drain(&self, grace: Duration) {
        const WRITTEN: u64 = 100_000_000; // 100 ms, in ns
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let freed = self.freed.notified();
            {
                let table = self.table();
                if table.conns.is_empty() {
                    return debug!(listener = self.listener, "all connections drained");
                }
                let over = tokio::time::Instant::now() >= deadline;
                let now = nanos_since(self.epoch);
                for conn in table.conns.values() {
                    let quiet = now.saturating_sub(conn.progress.load(Ordering::Relaxed));
                    let idle = !conn.in_request.load(Ordering::Acquire) && quiet > WRITTEN;
                    if over || idle {
                        conn.close();
                    }
                }
                if over {
                    let left = table.conns.len();
                    return warn!(
                        listener = self.listener,
                        ?grace,
                        left,
                        "shutdown grace period over; dropped the remaining connections"
                    );
                }
            }
            // Look again when a connection closes, or soon (a request may have finished).
            let _ = tokio::time::timeout(Duration::from_millis(20), freed).await;
        }
    }

    fn close(&self, conn: &ConnState) {
        let mut table = self.table();
        table.conns.remove(&conn.id);
        self.metrics
            .set_connections_open(self.listener, table.conns.len());
        drop(table);
        self.freed.notify_waiters();
    }
}

/// What to do with a new connection from `peer` when the table is at the cap.
#[derive(Debug, PartialEq, Eq)]
enum AtCap {
    /// Close it: its address already holds the most connections, and half the cap.
    Refuse,
    /// Close this connection to make room.
    Evict(u64),
    /// Every connection of the busiest address is mid-review (or just opened): wait.
    Wait,
}

/// At the cap: the busiest address (most open connections, counting those mid-review)
/// gives up its least recently active connection that is not mid-review; a newcomer from
/// that address itself is refused once it holds half the cap. Between equally busy
/// addresses, the one whose idle connection has been quiet longest gives way.
fn choose<'a>(open: impl Iterator<Item = &'a Arc<ConnState>>, peer: IpAddr, cap: usize) -> AtCap {
    // Per address: (connections, least recent progress of an evictable one, its id).
    let mut per_peer: HashMap<IpAddr, (usize, u64, Option<u64>)> = HashMap::new();
    for c in open {
        let entry = per_peer.entry(c.peer).or_insert((0, u64::MAX, None));
        entry.0 += 1;
        let evictable = !c.reviewing.load(Ordering::Acquire) && c.task.get().is_some();
        let progress = c.progress.load(Ordering::Relaxed);
        if evictable && progress < entry.1 {
            (entry.1, entry.2) = (progress, Some(c.id));
        }
    }
    let busiest = per_peer
        .iter()
        .max_by_key(|&(_, &(n, progress, _))| (n, std::cmp::Reverse(progress)));
    let Some((&address, &(held, _, victim))) = busiest else {
        return AtCap::Wait;
    };
    if address == peer && held * 2 >= cap {
        return AtCap::Refuse;
    }
    victim.map_or(AtCap::Wait, AtCap::Evict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, peer: [u8; 4], progress: u64, reviewing: bool) -> Arc<ConnState> {
        let task = OnceLock::new();
        let _ = task.set(tokio::spawn(async {}).abort_handle());
        Arc::new(ConnState {
            id,
            peer: IpAddr::from(peer),
            progress: AtomicU64::new(progress),
            in_request: AtomicBool::new(reviewing),
            reviewing: AtomicBool::new(reviewing),
            task,
            epoch: Instant::now(),
        })
    }

    #[tokio::test]
    async fn at_the_cap_the_busiest_address_gives_way() {
        let (api, pod, other) = ([10, 0, 0, 1], [10, 1, 2, 3], [10, 9, 9, 9]);
        let newcomer = IpAddr::from(other);
        // (connections, newcomer, cap, what happens)
        let cases: Vec<(Vec<Arc<ConnState>>, IpAddr, usize, AtCap)> = vec![
            (vec![], newcomer, 1, AtCap::Wait),
            // The API server's connection is older, but the pod holds more.
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, pod, 5, false),
                    conn(3, pod, 3, false),
                ],
                newcomer,
                3,
                AtCap::Evict(3),
            ),
            // The pod's connections are all mid-review: wait, never take the API server's.
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, pod, 0, true),
                    conn(3, pod, 9, true),
                ],
                newcomer,
                3,
                AtCap::Wait,
            ),
            // A newcomer from the busiest address holding half the cap is refused...
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, pod, 5, false),
                    conn(3, pod, 3, false),
                ],
                IpAddr::from(pod),
                4,
                AtCap::Refuse,
            ),
            // ...but not from an address that holds half the cap and is not the busiest.
            (
                vec![
                    conn(1, api, 1, false),
                    conn(2, api, 2, false),
                    conn(3, pod, 5, false),
                    conn(4, pod, 3, false),
                    conn(5, pod, 4, false),
                ],
                IpAddr::from(api),
                4,
                AtCap::Evict(4),
            ),
            // Equally busy: the connection quiet longest gives way.
            (
                vec![conn(1, api, 7, false), conn(2, pod, 4, false)],
                newcomer,
                2,
                AtCap::Evict(2),
            ),
        ];
        for (i, (open, peer, cap, want)) in cases.into_iter().enumerate() {
            assert_eq!(choose(open.iter(), peer, cap), want, "case {i}");
        }
    }

    #[tokio::test]
    async fn a_full_table_of_reviews_lets_the_next_connection_in_once_they_finish() {
        let slots = Slots::new("test", 2, Arc::new(Metrics::new()));
        let mut held = Vec::new();
        for i in 0..2u8 {
            let conn = slots.open(IpAddr::from([10, 0, 0, i])).await.unwrap();
            let _ = conn
                .task
                .set(tokio::spawn(std::future::pending::<()>()).abort_handle());
            conn.reviewing.store(true, Ordering::Release);
            held.push(conn);
        }
        let waiting = slots.open(IpAddr::from([10, 0, 0, 9]));
        tokio::pin!(waiting);
        let pending = tokio::time::timeout(Duration::from_millis(100), &mut waiting).await;
        assert!(
            pending.is_err(),
            "admitted while every connection was mid-review"
        );
        // The reviews finish; the connections stay open (keep-alive).
        for conn in &held {
            conn.reviewing.store(false, Ordering::Release);
        }
        let admitted = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(admitted.expect("admitted within a second").is_some());
    }
}
