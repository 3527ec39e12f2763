//! The namespace cache: which namespaces are opted in, and their claim globs.
//!
//! Fed by a metadata watch on all Namespaces (labels and annotations are all we need), so
//! a namespace that is known and not opted in is recognised as such. A namespace the
//! watch has not delivered yet (created a moment ago) is fetched once with a GET, so its
//! claims annotation applies to its very first pod; if that fails too, it is treated as
//! opted in with the default globs (the API server only calls the webhook for labelled
//! namespaces anyway).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::names;
use crate::policy::namespace::scope_from_metadata;
use crate::policy::{ClaimGlobs, NamespaceDirectory, NamespaceScope};

/// How long the admission path waits for a GET of a namespace the watch has not delivered.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);

pub struct NamespaceCache {
    client: Option<kube::Client>,
    default_claims: Arc<ClaimGlobs>,
    entries: RwLock<HashMap<String, NamespaceScope>>,
    synced: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl NamespaceCache {
    /// `client`: where to watch and fetch namespaces (`None` in tests of the cache alone).
    pub fn new(
        client: Option<kube::Client>,
        default_claims: ClaimGlobs,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            default_claims: Arc::new(default_claims),
            entries: RwLock::new(HashMap::new()),
            synced: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// Becomes true after the first complete list.
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// Watches namespaces until the returned future is dropped. Watch errors are logged
    /// and retried with backoff; the cache keeps serving what it last knew.
    pub async fn run(self: Arc<Self>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let mut relist: Option<HashMap<String, NamespaceScope>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => relist = Some(HashMap::new()),
                Ok(Event::InitApply(ns)) => {
                    if let Some((name, scope)) = self.scope_of(&ns) {
                        relist.get_or_insert_with(HashMap::new).insert(name, scope);
                    }
                }
                Ok(Event::InitDone) => {
                    let fresh = relist.take().unwrap_or_default();
                    self.replace_all(fresh);
                    if !self.synced.swap(true, Ordering::AcqRel) {
                        info!(opted_in = self.opted_in_count(), "namespace cache synced");
                    }
                }
                Ok(Event::Apply(ns)) => {
                    if let Some((name, scope)) = self.scope_of(&ns) {
                        self.upsert(name, scope);
                    }
                }
                Ok(Event::Delete(ns)) => {
                    if let Some(name) = ns.metadata.name.as_deref() {
                        self.remove(name);
                    }
                }
                Err(e) => warn!(error = %e, "namespace watch failed; retrying"),
            }
        }
    }

    fn scope_of(&self, ns: &PartialObjectMeta<Namespace>) -> Option<(String, NamespaceScope)> {
        let name = ns.metadata.name.clone()?;
        let (scope, errors) = scope_from_metadata(
            ns.metadata.labels.as_ref(),
            ns.metadata.annotations.as_ref(),
            &self.default_claims,
        );
        for e in errors {
            warn!(namespace = %name, annotation = names::NAMESPACE_CLAIMS, error = %e, "ignoring an invalid claim glob");
        }
        Some((name, scope))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, NamespaceScope>> {
        // A poisoned lock only means a writer panicked mid-insert; the map is still usable.
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    fn replace_all(&self, fresh: HashMap<String, NamespaceScope>) {
        let mut entries = self.write();
        *entries = fresh;
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&entries));
    }

    /// Inserts or updates one namespace, saying so when its opt-in changes.
    fn upsert(&self, name: String, scope: NamespaceScope) {
        let mut entries = self.write();
        let was = entries
            .get(&name)
            .map(|s| matches!(s, NamespaceScope::OptedIn(_)));
        let now = matches!(scope, NamespaceScope::OptedIn(_));
        if was != Some(now) && self.synced.load(Ordering::Acquire) {
            info!(namespace = %name, opted_in = now, "namespace opt-in changed");
        }
        entries.insert(name, scope);
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&entries));
    }

    fn remove(&self, name: &str) {
        let mut entries = self.write();
        entries.remove(name);
        self.metrics
            .set_namespaces_opted_in(count_opted_in(&entries));
    }

    pub fn opted_in_count(&self) -> usize {
        count_opted_in(&self.entries.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn default_scope(&self) -> NamespaceScope {
        NamespaceScope::OptedIn(self.default_claims.clone())
    }

    fn lookup(&self, namespace: &str) -> Option<NamespaceScope> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .cloned()
    }

    /// Like [`NamespaceDirectory::scope`], but a namespace the watch has not delivered
    /// yet is fetched first (bounded by a short timeout).
    pub async fn resolve(&self, namespace: &str) -> NamespaceScope {
        if let Some(scope) = self.lookup(namespace) {
            return scope;
        }
        if let Some(client) = &self.client {
            let api: Api<Namespace> = Api::all(client.clone());
            match tokio::time::timeout(FETCH_TIMEOUT, api.get_metadata_opt(namespace)).await {
                Ok(Ok(Some(ns))) => {
                    if let Some((name, scope)) = self.scope_of(&ns) {
                        debug!(namespace = %name, "namespace fetched ahead of the watch");
                        self.upsert(name, scope.clone());
                        return scope;
                    }
                }
                Ok(Ok(None)) => debug!(namespace, "namespace not found"),
                Ok(Err(e)) => {
                    warn!(namespace, error = %e, "could not fetch namespace; using the default claim globs")
                }
                Err(_) => warn!(
                    namespace,
                    "fetching namespace timed out; using the default claim globs"
                ),
            }
        }
        self.default_scope()
    }
}

fn count_opted_in(entries: &HashMap<String, NamespaceScope>) -> usize {
    entries
        .values()
        .filter(|s| matches!(s, NamespaceScope::OptedIn(_)))
        .count()
}

impl NamespaceDirectory for NamespaceCache {
    fn scope(&self, namespace: &str) -> NamespaceScope {
        self.lookup(namespace)
            .unwrap_or_else(|| self.default_scope())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    impl NamespaceCache {
        /// Applies a namespace's labels and annotations as a watch event would.
        fn apply_metadata(
            &self,
            name: &str,
            labels: Option<&BTreeMap<String, String>>,
            annotations: Option<&BTreeMap<String, String>>,
        ) {
            let (scope, _) = scope_from_metadata(labels, annotations, &self.default_claims);
            self.upsert(name.to_owned(), scope);
        }
    }

    #[test]
    fn unknown_is_default_known_is_respected() {
        let cache = NamespaceCache::new(
            None,
            ClaimGlobs::parse("claim-*").unwrap(),
            Arc::new(Metrics::new()),
        );
        assert!(
            matches!(cache.scope("new"), NamespaceScope::OptedIn(g) if g.to_string() == "claim-*")
        );
        cache.apply_metadata("off", None, None);
        assert!(matches!(cache.scope("off"), NamespaceScope::NotOptedIn));
        let labels = BTreeMap::from([(names::NAMESPACE_ENABLED.to_owned(), "true".to_owned())]);
        let annotations =
            BTreeMap::from([(names::NAMESPACE_CLAIMS.to_owned(), "home-*".to_owned())]);
        cache.apply_metadata("lab", Some(&labels), Some(&annotations));
        assert!(
            matches!(cache.scope("lab"), NamespaceScope::OptedIn(g) if g.to_string() == "home-*")
        );
        assert_eq!(cache.opted_in_count(), 1);
        cache.remove("lab");
        assert_eq!(cache.opted_in_count(), 0);
    }
}
