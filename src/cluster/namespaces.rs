//! The namespace cache: which namespaces are opted in, and their claim globs.
//!
//! Fed by a metadata watch on all Namespaces (labels and annotations are all we need).
//! The admission path asks it only for claim globs: being called by the API server means
//! the registration's namespaceSelector matched, so the namespace *is* opted in, whatever
//! the cache says. A namespace the watch has not delivered yet, or has not yet seen
//! labelled, is fetched with a GET, so its own globs apply to its very first pod. The
//! namespace name comes from an unauthenticated request: it is validated before any API
//! call, concurrent fetches of one name share one GET, results are kept a few seconds,
//! and fetches are rate-limited, so no request can multiply API traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Resource};
use tracing::{debug, info, warn};

use super::events::EventSink;
use crate::metrics::Metrics;
use crate::names;
use crate::policy::{ClaimGlobs, NamespacePolicy};

/// How long a GET of a namespace may take, at most (see [`NamespaceCache::with_fetch_timeout`]).
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a fetched namespace (or a miss) is trusted before asking again.
const FETCH_TTL: Duration = Duration::from_secs(5);
/// Fetched results kept at most (each is a name and an `Arc`).
const MAX_FETCHED: usize = 1024;
/// Fetches at most this many per second on average, in bursts of up to `FETCH_BURST`.
const FETCH_RATE: f64 = 5.0;
const FETCH_BURST: f64 = 10.0;

type Fetch = Shared<BoxFuture<'static, Arc<ClaimGlobs>>>;

enum Fetched {
    InFlight(Fetch),
    Done {
        at: Instant,
        claims: Arc<ClaimGlobs>,
    },
}

pub struct NamespaceCache {
    client: Option<kube::Client>,
    default_claims: Arc<ClaimGlobs>,
    watched: RwLock<HashMap<String, NamespacePolicy>>,
    fetched: Arc<Mutex<FetchState>>,
    fetch_timeout: Duration,
    synced: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    events: EventSink,
}

struct FetchState {
    entries: HashMap<String, Fetched>,
    bucket: TokenBucket,
}

impl NamespaceCache {
    /// `client`: where to watch and fetch namespaces; `None` runs without a cluster
    /// (every namespace uses `default_claims`).
    pub fn new(
        client: Option<kube::Client>,
        default_claims: ClaimGlobs,
        metrics: Arc<Metrics>,
    ) -> Self {
        let events = EventSink::new(client.clone());
        Self {
            client,
            default_claims: Arc::new(default_claims),
            watched: RwLock::new(HashMap::new()),
            fetched: Arc::new(Mutex::new(FetchState {
                entries: HashMap::new(),
                bucket: TokenBucket::new(FETCH_RATE, FETCH_BURST),
            })),
            fetch_timeout: FETCH_TIMEOUT,
            synced: Arc::new(AtomicBool::new(false)),
            metrics,
            events,
        }
    }

    /// Bounds a namespace GET by `timeout` (at most 1 s): a fetch must leave the request
    /// it serves time to be answered (the server passes half its request timeout).
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout.min(FETCH_TIMEOUT);
        self
    }

    /// Becomes true after the first complete list.
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// The claim globs of a namespace whose pod the API server sent us.
    pub async fn claims_for(&self, namespace: &str) -> Arc<ClaimGlobs> {
        let watched = self.watched_policy(namespace);
        match watched {
            Some(p) if p.opted_in => return p.claims,
            _ if self.client.is_none() => {
                return watched.map_or_else(|| self.default_claims.clone(), |p| p.claims);
            }
            // Unknown to the watch, or not labelled as far as it knows: it is behind.
            _ => {}
        }
        let fetch = {
            let mut state = self.fetch_state();
            let in_flight = match state.entries.get(namespace) {
                Some(Fetched::Done { at, claims }) if at.elapsed() < FETCH_TTL => {
                    return claims.clone();
                }
                Some(Fetched::InFlight(fetch)) => Some(fetch.clone()),
                _ => None,
            };
            match in_flight {
                Some(fetch) => fetch,
                // admission::parse already refuses invalid names: they never reach the API.
                None if !names::is_dns1123_label(namespace) => {
                    self.metrics.namespace_fetch("invalid_name");
                    return self.default_claims.clone();
                }
                // Past the rate limit, use what the watch knows, else the default.
                None if !state.bucket.take() => {
                    self.metrics.namespace_fetch("rate_limited");
                    return watched.map_or_else(|| self.default_claims.clone(), |p| p.claims);
                }
                None => {
                    let fetch = self.start_fetch(namespace);
                    state.insert(namespace, Fetched::InFlight(fetch.clone()));
                    fetch
                }
            }
        };
        fetch.await
    }

    /// Starts a GET of one namespace as a task of its own, so it finishes (and its result
    /// is kept for [`FETCH_TTL`]) even if every request waiting for it goes away; the
    /// requests share its result.
    fn start_fetch(&self, namespace: &str) -> Fetch {
        let fetch = self.fetch(namespace);
        let state = self.fetched.clone();
        let name = namespace.to_owned();
        let task = tokio::spawn(async move {
            let claims = fetch.await;
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry @ Fetched::InFlight(_)) = state.entries.get_mut(&name) {
                let done = claims.clone();
                *entry = Fetched::Done {
                    at: Instant::now(),
                    claims: done,
                };
            }
            claims
        });
        let default = self.default_claims.clone();
        async move { task.await.unwrap_or(default) }
            .boxed()
            .shared()
    }

    /// A GET of one namespace, bounded by the fetch timeout; the default globs when it
    /// does not answer or does not exist (the pod is still annotated by them).
    fn fetch(&self, namespace: &str) -> impl Future<Output = Arc<ClaimGlobs>> + Send + 'static {
        let client = self.client.clone();
        let default = self.default_claims.clone();
        let metrics = self.metrics.clone();
        let namespace = namespace.to_owned();
        let timeout = self.fetch_timeout;
        async move {
            let Some(client) = client else {
                return default;
            };
            let api: Api<Namespace> = Api::all(client);
            let (result, claims) = match tokio::time::timeout(
                timeout,
                api.get_metadata_opt(&namespace),
            )
            .await
            {
                Ok(Ok(Some(ns))) => {
                    let meta = &ns.metadata;
                    let policy = NamespacePolicy::read(
                        meta.labels.as_ref(),
                        meta.annotations.as_ref(),
                        &default,
                    );
                    debug!(%namespace, opted_in = policy.opted_in, "namespace fetched ahead of the watch");
                    ("fetched", policy.claims)
                }
                Ok(Ok(None)) => {
                    debug!(%namespace, "namespace not found; using the default claim globs");
                    ("not_found", default)
                }
                Ok(Err(e)) => {
                    warn!(%namespace, error = %e, "could not fetch namespace; using the default claim globs");
                    ("error", default)
                }
                Err(_) => {
                    warn!(%namespace, "fetching namespace timed out; using the default claim globs");
                    ("timeout", default)
                }
            };
            metrics.namespace_fetch(result);
            claims
        }
    }

    fn fetch_state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        // A poisoned lock only means a holder panicked; the map is still usable.
        self.fetched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the watch knows of a namespace.
    pub fn watched_policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        let watched = self.watched.read().unwrap_or_else(|p| p.into_inner());
        watched.get(namespace).cloned()
    }

    /// The claims being restored in a namespace, as its `velero-jupyterhub.io/restoring-claims`
    /// record reads (the restore guard; empty for a namespace the watch has not seen:
    /// nothing is being restored in a namespace that new).
    pub fn restoring_in(&self, namespace: &str) -> Vec<crate::policy::restore::RestoringClaim> {
        let watched = self.watched.read().unwrap_or_else(|p| p.into_inner());
        let Some(policy) = watched.get(namespace) else {
            return Vec::new();
        };
        policy
            .restoring
            .iter()
            .map(|claim| crate::policy::restore::RestoringClaim {
                claim: claim.clone(),
                restore: None,
            })
            .collect()
    }

    pub fn opted_in_count(&self) -> usize {
        count_opted_in(&self.watched.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Watches namespaces until the stream ends (it does not: errors are logged, counted
    /// and retried with backoff, and the cache keeps serving what it last knew).
    pub async fn run(self: Arc<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let mut relist: Option<HashMap<String, NamespacePolicy>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => relist = Some(HashMap::new()),
                Ok(Event::InitApply(ns)) => {
                    if let Some(name) = ns.metadata.name.clone() {
                        let policy = self.read(&ns);
                        self.report_claims(&name, &ns, &policy);
                        relist.get_or_insert_with(HashMap::new).insert(name, policy);
                    }
                }
                Ok(Event::InitDone) => {
                    self.replace_all(relist.take().unwrap_or_default());
                    if !self.synced.swap(true, Ordering::AcqRel) {
                        info!(opted_in = self.opted_in_count(), "namespace cache synced");
                    }
                }
                Ok(Event::Apply(ns)) => {
                    if let Some(name) = ns.metadata.name.clone() {
                        let policy = self.read(&ns);
                        self.report_claims(&name, &ns, &policy);
                        self.upsert(name, policy);
                    }
                }
                Ok(Event::Delete(ns)) => {
                    if let Some(name) = ns.metadata.name.as_deref() {
                        self.metrics.set_claims_problem(name, false);
                        self.remove(name);
                    }
                }
                Err(e) => {
                    self.metrics.namespace_watch_error();
                    warn!(error = %e, "namespace watch failed; retrying with backoff");
                }
            }
        }
    }

    fn read(&self, ns: &PartialObjectMeta<Namespace>) -> NamespacePolicy {
        let meta = &ns.metadata;
        NamespacePolicy::read(
            meta.labels.as_ref(),
            meta.annotations.as_ref(),
            &self.default_claims,
        )
    }

    /// A claims annotation we cannot use as written is reported where a platform engineer
    /// looks (log, metric, Event on the Namespace) once per change, never silently
    /// replaced by the default.
    fn report_claims(
        &self,
        name: &str,
        ns: &PartialObjectMeta<Namespace>,
        policy: &NamespacePolicy,
    ) {
        let problem = policy.claims_problem.as_ref().filter(|_| policy.opted_in);
        let before = self.watched_policy(name);
        let before = before
            .as_ref()
            .and_then(|p| p.claims_problem.as_ref().filter(|_| p.opted_in));
        self.metrics.set_claims_problem(name, problem.is_some());
        let Some(problem) = problem else {
            return;
        };
        if before == Some(problem) {
            return;
        }
        let note = format!(
            "{problem}; claims matching {} are treated as user data",
            policy.claims
        );
        warn!(namespace = name, annotation = names::NAMESPACE_CLAIMS, problem = %note, "namespace claims annotation cannot be used as written");
        // Filed in the namespace itself (where `kubectl get events -n NS` shows it), not in
        // "default" as for other cluster-scoped objects: before Kubernetes 1.22 the API
        // server accepts an Event only where its object's namespace field says.
        let mut regarding = ns.object_ref(&());
        regarding.namespace = Some(name.to_owned());
        self.events
            .warn(regarding, "InvalidClaimGlobs", "ReadClaims", note);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, NamespacePolicy>> {
        // A poisoned lock only means a writer panicked mid-insert; the map is still usable.
        self.watched.write().unwrap_or_else(|p| p.into_inner())
    }

    fn replace_all(&self, fresh: HashMap<String, NamespacePolicy>) {
        let mut watched = self.write();
        // Namespaces deleted while the watch was away leave no metric behind.
        for gone in watched.keys().filter(|name| !fresh.contains_key(*name)) {
            self.metrics.set_claims_problem(gone, false);
        }
        *watched = fresh;
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&watched));
    }

    /// Inserts or updates one namespace, saying so when its opt-in changes.
    fn upsert(&self, name: String, policy: NamespacePolicy) {
        let mut watched = self.write();
        let was = watched.get(&name).map(|p| p.opted_in);
        if was != Some(policy.opted_in) && self.synced.load(Ordering::Acquire) {
            info!(namespace = %name, opted_in = policy.opted_in, "namespace opt-in changed");
        }
        watched.insert(name, policy);
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&watched));
    }

    fn remove(&self, name: &str) {
        let mut watched = self.write();
        watched.remove(name);
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&watched));
    }
}

impl FetchState {
    /// Keeps at most [`MAX_FETCHED`] entries: expired results go first; when every entry
    /// is fresh, the new one is not kept (its fetch still happens, rate-limited).
    fn insert(&mut self, namespace: &str, fetched: Fetched) {
        if self.entries.len() >= MAX_FETCHED {
            self.entries.retain(|_, f| match f {
                Fetched::Done { at, .. } => at.elapsed() < FETCH_TTL,
                Fetched::InFlight(_) => true,
            });
        }
        if self.entries.len() < MAX_FETCHED {
            self.entries.insert(namespace.to_owned(), fetched);
        }
    }
}

fn count_opted_in(watched: &HashMap<String, NamespacePolicy>) -> usize {
    watched.values().filter(|p| p.opted_in).count()
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cache() -> NamespaceCache {
        NamespaceCache::new(
            None,
            ClaimGlobs::parse("claim-*").unwrap(),
            Arc::new(Metrics::new()),
        )
    }

    fn policy(cache: &NamespaceCache, opted_in: bool, claims: Option<&str>) -> NamespacePolicy {
        let labels = BTreeMap::from([(names::NAMESPACE_ENABLED.to_owned(), opted_in.to_string())]);
        let annotations =
            claims.map(|c| BTreeMap::from([(names::NAMESPACE_CLAIMS.to_owned(), c.to_owned())]));
        NamespacePolicy::read(Some(&labels), annotations.as_ref(), &cache.default_claims)
    }

    #[tokio::test]
    async fn without_a_cluster_every_namespace_is_served_its_known_or_default_globs() {
        let cache = cache();
        assert_eq!(cache.claims_for("new").await.to_string(), "claim-*");
        cache.upsert("lab".into(), policy(&cache, true, Some("home-*")));
        assert_eq!(cache.claims_for("lab").await.to_string(), "home-*");
        // Called for a namespace the watch saw unlabelled: the API server knows better.
        cache.upsert("late".into(), policy(&cache, false, Some("data-*")));
        assert_eq!(cache.claims_for("late").await.to_string(), "data-*");
        assert_eq!(cache.opted_in_count(), 1);
        cache.remove("lab");
        assert_eq!(cache.opted_in_count(), 0);
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(1000.0, 3.0);
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.take(), "burst spent");
        std::thread::sleep(Duration::from_millis(5));
        assert!(bucket.take(), "refilled at the rate");
    }
}
