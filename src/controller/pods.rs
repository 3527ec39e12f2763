//! The pod watch, sized by the hubs rather than the cluster. Every pod in the cluster is
//! watched: a pod that mounts a user's claim may carry any labels (no selector would be
//! sure to see it), and every pod bound to a node takes one of the node's pod slots, which
//! waves must not overfill. But only the pods of opted-in namespaces, and our own pods
//! wherever they are, are kept as records; of every other pod only the node whose slot it
//! takes is kept ([`Elsewhere`], 16 bytes a pod against a record's ~1 KiB).
//!
//! Which namespaces are kept is fixed for one list-and-watch. When a namespace opts in,
//! its pods were not kept: the watch lists again, and until that list is done the
//! namespace is not [`Pods::covered`], so a pass leaves it alone rather than plan from
//! half a view (helpers for claims whose users' pods it cannot see yet).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::heartbeat::Heartbeat;
use super::stores::Changed;
use crate::names;
use crate::policy::namespace;
use crate::policy::{PodFacts, PodRecord};

/// The pods the controller keeps, and the pod slots taken by those it does not.
#[derive(Clone)]
pub struct Pods {
    store: Store<PodRecord>,
    shared: Arc<Mutex<Shared>>,
}

/// What [`Pods::read`] returns.
pub struct PodsRead {
    pub kept: Vec<Arc<PodRecord>>,
    pub slots_elsewhere: Vec<(Arc<str>, u32)>,
    pub covered: Arc<BTreeSet<String>>,
}

#[derive(Default)]
struct Shared {
    elsewhere: Elsewhere,
    /// The namespaces whose pods the store holds whole (as of the last finished list).
    covered: Arc<BTreeSet<String>>,
}

impl Pods {
    /// Starts the watch as a task stopped by `stop`. It lists only once `namespaces` has
    /// (so it knows which namespaces to keep: `namespaces_changed` is poked on its every
    /// event from its first finished list on), and again whenever a namespace opted in
    /// that it does not keep.
    pub fn start(
        client: &kube::Client,
        config: &watcher::Config,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        namespaces_changed: Arc<Notify>,
        changed: &Arc<Changed>,
        heartbeat: &Arc<Heartbeat>,
        stop: &CancellationToken,
    ) -> Self {
        let (store, writer) = reflector::store();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = Watch {
            api: Api::all(client.clone()),
            config: config.clone(),
            namespaces,
            namespaces_changed,
            writer,
            shared: shared.clone(),
            changed: changed.clone(),
            heartbeat: heartbeat.clone(),
            listing: false,
            relist: false,
            slots_woke: None,
        };
        tokio::spawn(task.run(stop.clone()));
        Self { store, shared }
    }

    /// The pods kept (every pod of a covered namespace, and our own pods anywhere), the
    /// slots every other pod takes per node, and the covered namespaces: read at once
    /// (the watch changes them under the same lock), so no pod is counted twice or not
    /// at all.
    pub fn read(&self) -> PodsRead {
        let shared = self.lock();
        PodsRead {
            kept: self.store.state(),
            slots_elsewhere: shared
                .elsewhere
                .per_node()
                .map(|(node, n)| (node.clone(), n))
                .collect(),
            covered: shared.covered.clone(),
        }
    }

    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The namespaces opted in (labelled `velero-jupyterhub.io/enabled: "true"`) among those
/// the namespace watch shows.
fn opted_in(namespaces: &Store<PartialObjectMeta<Namespace>>) -> BTreeSet<String> {
    namespaces
        .state()
        .iter()
        .filter(|n| namespace::is_opted_in(n.metadata.labels.as_ref()))
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

struct Watch {
    api: Api<PodRecord>,
    config: watcher::Config,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    namespaces_changed: Arc<Notify>,
    writer: reflector::store::Writer<PodRecord>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Changed>,
    heartbeat: Arc<Heartbeat>,
    /// A list is under way (between `Init` and `InitDone`).
    listing: bool,
    /// A namespace opted in during the list: list again once it is done.
    relist: bool,
    /// When a freed slot elsewhere last woke the loop.
    slots_woke: Option<std::time::Instant>,
}

/// How often, at most, pod slots freed outside the hubs wake the loop.
const WAKE_FOR_SLOTS: std::time::Duration = std::time::Duration::from_secs(10);

impl Watch {
    async fn run(mut self, stop: CancellationToken) {
        // The namespace watch tells of its first finished list (it tells of nothing
        // before). Not `Store::wait_until_ready`: kube's readiness wakes only the last of
        // several tasks waiting on one store, and the reconciler waits on it too.
        tokio::select! {
            () = self.namespaces_changed.notified() => {}
            () = stop.cancelled() => return,
        }
        loop {
            let kept = opted_in(&self.namespaces);
            let stream = watcher::watcher(self.api.clone(), self.config.clone()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.namespaces_changed.notified() => {
                        let now = opted_in(&self.namespaces);
                        if !now.is_subset(&kept) {
                            let new: Vec<&String> = now.difference(&kept).collect();
                            info!(namespaces = ?new, "namespaces opted in: listing pods again to keep theirs");
                            // A list under way finishes first: namespaces opting in one
                            // after another must not restart it for ever.
                            if !self.listing {
                                break;
                            }
                            self.relist = true;
                        }
                        // One that opted out: its records stay until the next list
                        // (a pass reads only opted-in namespaces').
                    }
                    event = stream.next() => match event {
                        Some(Ok(event)) => {
                            let done = matches!(event, watcher::Event::InitDone);
                            self.apply(event, &kept);
                            if done && std::mem::take(&mut self.relist) {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            self.heartbeat.watch_failed("pods");
                            warn!(watch = "pods", error = %e, "watch error; retrying");
                        }
                        None => return,
                    },
                }
            }
        }
    }

    /// One watch event into the store (a pod kept) or the slot count (any other).
    fn apply(&mut self, event: watcher::Event<PodRecord>, kept: &BTreeSet<String>) {
        let keep = |p: &PodRecord| {
            kept.contains(p.namespace()) || p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
        };
        // The store and the counts change under one lock: a pass reads both at once.
        let lock = self.shared.clone();
        let mut shared = lock.lock().unwrap_or_else(PoisonError::into_inner);
        // Whether a pass should plan again: the kept pods changed, or (at most every
        // `WAKE_FOR_SLOTS`) a slot was freed on a node a wave may be waiting for.
        let wake = match event {
            // The watcher says Init as it starts each (re)list, before the request, and
            // InitApply for each object of a list that may still fail: only a finished
            // list, or a watch event, shows it works. The store changes only when the
            // list is done.
            watcher::Event::Init => {
                self.listing = true;
                self.writer.apply_watcher_event(&watcher::Event::Init);
                shared.elsewhere.init();
                false
            }
            watcher::Event::InitApply(p) => {
                if keep(&p) {
                    self.writer
                        .apply_watcher_event(&watcher::Event::InitApply(p));
                } else {
                    shared.elsewhere.init_apply(&p);
                }
                false
            }
            watcher::Event::InitDone => {
                self.listing = false;
                self.writer.apply_watcher_event(&watcher::Event::InitDone);
                shared.elsewhere.init_done();
                shared.covered = Arc::new(kept.clone());
                self.heartbeat.watch_ok("pods");
                true
            }
            watcher::Event::Apply(p) => {
                self.heartbeat.watch_ok("pods");
                if keep(&p) {
                    self.writer.apply_watcher_event(&watcher::Event::Apply(p));
                    true
                } else {
                    let freed = shared.elsewhere.apply(&p);
                    // Kept before (ours, and no longer labelled so): not any more.
                    self.writer.apply_watcher_event(&watcher::Event::Delete(p));
                    freed && self.slots_wake_due()
                }
            }
            watcher::Event::Delete(p) => {
                self.heartbeat.watch_ok("pods");
                let freed = !keep(&p) && shared.elsewhere.delete(&p);
                self.writer.apply_watcher_event(&watcher::Event::Delete(p));
                freed && self.slots_wake_due()
            }
        };
        drop(shared);
        if wake {
            self.changed.poke();
        }
    }

    /// Whether a freed slot elsewhere may wake the loop now: at most every
    /// `WAKE_FOR_SLOTS` (a large cluster's pods end all the time; a wave waiting for room
    /// waits that much longer at most).
    fn slots_wake_due(&mut self) -> bool {
        let due = self
            .slots_woke
            .is_none_or(|at| at.elapsed() >= WAKE_FOR_SLOTS);
        if due {
            self.slots_woke = Some(std::time::Instant::now());
        }
        due
    }
}

/// The pod slots taken on each node by pods the controller does not keep: per pod its
/// node, and per node a count. A pod takes a slot from when it is bound (or, like a
/// DaemonSet's, pinned) to a node until it has Succeeded or Failed, as the scheduler
/// counts. Its volumes are not kept: a volume attached to a node is counted from its
/// VolumeAttachment. Compact: 16 bytes a pod (a 64-bit hash of its uid, and its node's
/// number), so 100,000 pods take about 2 MiB.
#[derive(Default)]
pub struct Elsewhere {
    /// Node number by pod.
    pods: HashMap<u64, u32>,
    /// A list in progress (after `Init`): replaces `pods` when it is done.
    listing: Option<HashMap<u64, u32>>,
    /// Node names by number, their numbers by name, and pods per node number; numbers
    /// of nodes no pod is on any more, to give again (nodes come and go).
    names: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
    counts: Vec<u32>,
    free: Vec<u32>,
}

impl Elsewhere {
    /// Counts a pod's slot; true if it freed one (it ended, or moved).
    pub fn apply(&mut self, pod: &PodRecord) -> bool {
        let key = key(pod);
        let old = match self.slot(pod) {
            Some(node) => self.pods.insert(key, node),
            None => self.pods.remove(&key),
        };
        let now = self.pods.get(&key).copied();
        if let Some(node) = now {
            self.counts[node as usize] += 1;
        }
        if let Some(old) = old {
            self.leave(old);
        }
        old.is_some() && old != now
    }

    /// Forgets a pod; true if it held a slot.
    pub fn delete(&mut self, pod: &PodRecord) -> bool {
        let old = self.pods.remove(&key(pod));
        if let Some(old) = old {
            self.leave(old);
        }
        old.is_some()
    }

    /// A pod left node `n`: the last one frees its number (not while a list is in
    /// progress: the listed pods hold numbers the counts do not show).
    fn leave(&mut self, n: u32) {
        let count = &mut self.counts[n as usize];
        *count = count.saturating_sub(1);
        if *count == 0 && self.listing.is_none() {
            let name = std::mem::replace(&mut self.names[n as usize], Arc::from(""));
            self.numbers.remove(&name);
            self.free.push(n);
        }
    }

    pub fn init(&mut self) {
        self.listing = Some(HashMap::new());
    }

    pub fn init_apply(&mut self, pod: &PodRecord) {
        let key = key(pod);
        if let Some(node) = self.slot(pod) {
            self.listing.get_or_insert_default().insert(key, node);
        }
    }

    /// The list is done: it replaces what was counted, and node names no pod is on any
    /// more are dropped (numbers are given anew).
    pub fn init_done(&mut self) {
        let listed = self.listing.take().unwrap_or_default();
        let old_names = std::mem::take(&mut self.names);
        self.numbers.clear();
        self.counts.clear();
        self.free.clear();
        let mut pods = HashMap::with_capacity(listed.len());
        for (pod, old) in listed {
            let node = self.number(&old_names[old as usize]);
            self.counts[node as usize] += 1;
            pods.insert(pod, node);
        }
        self.pods = pods;
    }

    /// The number of the node whose slot the pod takes, if any.
    fn slot(&mut self, pod: &PodRecord) -> Option<u32> {
        if pod.is_stopped() {
            return None;
        }
        let node = pod.node().or(pod.pinned_node.as_deref())?;
        Some(self.number(node))
    }

    fn number(&mut self, node: &str) -> u32 {
        if let Some(&n) = self.numbers.get(node) {
            return n;
        }
        let name: Arc<str> = node.into();
        let n = match self.free.pop() {
            Some(n) => {
                self.names[n as usize] = name.clone();
                n
            }
            None => {
                self.names.push(name.clone());
                self.counts.push(0);
                u32::try_from(self.names.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.numbers.insert(name, n);
        n
    }

    /// Per node, the slots taken (nodes with none left out).
    pub fn per_node(&self) -> impl Iterator<Item = (&Arc<str>, u32)> {
        self.names
            .iter()
            .zip(self.counts.iter().copied())
            .filter(|(_, n)| *n > 0)
    }
}

/// A pod's key: a hash of its uid (the API server's UUID), or of its namespace and name
/// if it has none. Two of 100,000 pods share one with a chance of 1 in 3 billion (and
/// then a node's count is one short).
fn key(pod: &PodRecord) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if pod.uid().is_empty() {
        (pod.namespace(), pod.name()).hash(&mut hasher);
    } else {
        pod.uid().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, node: Option<&str>, phase: &str) -> PodRecord {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p-{uid}"), "namespace": "other", "uid": uid},
            "spec": {"nodeName": node},
            "status": {"phase": phase},
        }))
        .expect("a pod")
    }

    fn counts(e: &Elsewhere) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = e.per_node().map(|(n, c)| (n.to_string(), c)).collect();
        v.sort();
        v
    }

    const A: &str = "0b9e3b8e-6f7c-4a4e-9a55-5d1d8f0b0001";
    const B: &str = "0b9e3b8e-6f7c-4a4e-9a55-5d1d8f0b0002";
    const C: &str = "0b9e3b8e-6f7c-4a4e-9a55-5d1d8f0b0003";

    #[test]
    fn slots_follow_binding_ending_and_deletion() {
        let mut e = Elsewhere::default();
        e.apply(&pod(A, None, "Pending"));
        assert_eq!(counts(&e), vec![], "not bound: no slot");
        e.apply(&pod(A, Some("n1"), "Pending"));
        e.apply(&pod(B, Some("n1"), "Running"));
        e.apply(&pod(C, Some("n2"), "Running"));
        assert_eq!(counts(&e), vec![("n1".into(), 2), ("n2".into(), 1)]);
        e.apply(&pod(A, Some("n1"), "Running"));
        assert_eq!(
            counts(&e),
            vec![("n1".into(), 2), ("n2".into(), 1)],
            "an update counts once"
        );
        e.apply(&pod(B, Some("n1"), "Succeeded"));
        assert_eq!(
            counts(&e),
            vec![("n1".into(), 1), ("n2".into(), 1)],
            "ended: slot freed"
        );
        e.delete(&pod(C, Some("n2"), "Running"));
        e.delete(&pod(B, Some("n1"), "Succeeded"));
        assert_eq!(counts(&e), vec![("n1".into(), 1)]);
    }

    /// What wakes a wave waiting for room: a slot freed, not one taken.
    #[test]
    fn a_slot_freed_is_told() {
        let mut e = Elsewhere::default();
        assert!(!e.apply(&pod(A, Some("n1"), "Running")), "taken");
        assert!(!e.apply(&pod(A, Some("n1"), "Running")), "the same");
        assert!(
            e.apply(&pod(A, Some("n2"), "Running")),
            "moved (pinned, then bound)"
        );
        assert!(e.apply(&pod(A, Some("n2"), "Succeeded")), "ended");
        assert!(
            !e.delete(&pod(A, Some("n2"), "Succeeded")),
            "held none any more"
        );
        e.apply(&pod(B, Some("n1"), "Running"));
        assert!(
            e.delete(&pod(B, Some("n1"), "Running")),
            "deleted while holding one"
        );
    }

    #[test]
    fn a_new_list_replaces_what_was_counted() {
        let mut e = Elsewhere::default();
        e.apply(&pod(A, Some("n1"), "Running"));
        e.apply(&pod(B, Some("n2"), "Running"));
        e.init();
        e.init_apply(&pod(B, Some("n2"), "Running"));
        e.init_apply(&pod(C, Some("n3"), "Failed"));
        assert_eq!(
            counts(&e),
            vec![("n1".into(), 1), ("n2".into(), 1)],
            "the old count holds meanwhile"
        );
        e.init_done();
        assert_eq!(
            counts(&e),
            vec![("n2".into(), 1)],
            "A is gone, C holds no slot"
        );
        e.delete(&pod(A, Some("n1"), "Running"));
        assert_eq!(
            counts(&e),
            vec![("n2".into(), 1)],
            "deleting one not counted changes nothing"
        );
    }

    /// Nodes come and go: a node no pod is on frees its number for the next, and never
    /// while a list holds it.
    #[test]
    fn node_numbers_are_given_again_but_never_under_a_list() {
        let mut e = Elsewhere::default();
        e.apply(&pod(A, Some("n1"), "Running"));
        e.delete(&pod(A, Some("n1"), "Running"));
        e.apply(&pod(B, Some("n2"), "Running"));
        assert_eq!(counts(&e), vec![("n2".into(), 1)]);
        assert_eq!(e.names.len(), 1, "n2 took n1's number");
        e.init();
        e.init_apply(&pod(B, Some("n2"), "Running"));
        e.delete(&pod(B, Some("n2"), "Running"));
        e.apply(&pod(C, Some("n3"), "Running"));
        e.init_done();
        assert_eq!(counts(&e), vec![("n2".into(), 1)], "the list had B on n2");
    }

    #[test]
    fn a_pod_without_a_uuid_is_keyed_by_its_name() {
        let mut e = Elsewhere::default();
        e.apply(&pod("not-a-uuid", Some("n1"), "Running"));
        e.apply(&pod("not-a-uuid", Some("n1"), "Running"));
        assert_eq!(counts(&e), vec![("n1".into(), 1)]);
        e.delete(&pod("not-a-uuid", Some("n1"), "Running"));
        assert_eq!(counts(&e), vec![]);
    }
}
