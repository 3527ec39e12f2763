//! The one place the controller writes. A pass's planners return [`Write`]s; the applier
//! makes each at most once while the watches have not shown it yet (one pending set,
//! keyed by [`Write::key`]: a write planned again within `PENDING_FOR` is not repeated,
//! and one the plan no longer asks for is forgotten), each bounded in time, several in
//! flight. Deletions, the restore guard's namespace records and wave Backups go first and
//! all at once (a user, Velero or the guard waits on them); helpers and pod patches go in
//! chunks that stop when the cluster changed meanwhile, so a window opening over thousands
//! of claims never holds up a user for longer than one chunk. What a write did is
//! reported here too: a log line, an Event on the claim, a metric.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use tracing::{debug, info, warn};

use super::waves::WaveBackupToMake;
use crate::cluster::events::EventSink;
use crate::cluster::velero::Schedule;
use crate::metrics::Metrics;
use crate::names;
use crate::policy::plan::Deletion;

/// A write not yet seen by the watches is not repeated for this long.
pub const PENDING_FOR: Duration = Duration::from_secs(30);
/// Writes in flight at once, and how long one may take before it is given up (the
/// pending set then retries it after `PENDING_FOR`).
const WRITES_IN_FLIGHT: usize = 16;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Helpers created (or pods patched) between two looks at whether anything changed.
const CHUNK: usize = 64;

/// One write a pass asks for.
#[derive(Debug)]
pub enum Write {
    /// A backup helper (a window's or a wave's).
    CreateHelper(Box<Pod>),
    /// A helper of ours, guarded by its uid; `done` is reported once it is deleted.
    DeletePod { deletion: Deletion, done: Vec<Note> },
    /// A merge patch of a pod.
    PatchPod(PodPatch),
    /// A wave's Backup, made from its Schedule as it is when it is made.
    CreateBackup(WaveBackupToMake),
    /// A namespace's record of the claims being restored there (the restore guard reads
    /// it), guarded by the resourceVersion read.
    RecordRestoring {
        namespace: String,
        claims: Option<String>,
        patch: serde_json::Value,
    },
}

/// A merge patch of a pod.
#[derive(Debug)]
pub struct PodPatch {
    pub kind: PodPatchKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// What makes this patch different from another of the same pod (a resourceVersion,
    /// the labels set).
    pub version: String,
    pub patch: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPatchKind {
    /// The backup annotation a user pod was created without.
    Backfill,
    /// A helper's labels, for an open window's Schedule.
    Relabel,
}

/// Something to report once a write is done: an Event on a claim, and metrics.
#[derive(Debug)]
pub struct Note {
    pub namespace: String,
    pub claim: Option<String>,
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
    pub restored_bytes: u64,
    pub restore_failed: bool,
}

impl Write {
    /// Equal for the same write planned again.
    pub fn key(&self) -> String {
        match self {
            Self::CreateHelper(pod) => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                format!("create/{ns}/{name}")
            }
            Self::DeletePod { deletion, .. } => format!("delete/{}", deletion.uid),
            Self::PatchPod(p) => {
                let kind = match p.kind {
                    PodPatchKind::Backfill => "backfill",
                    PodPatchKind::Relabel => "relabel",
                };
                format!("{kind}/{}/{}", p.uid, p.version)
            }
            Self::CreateBackup(b) => format!("backup/{}/{}/{}", b.schedule, b.tick, b.number),
            Self::RecordRestoring {
                namespace, claims, ..
            } => format!("restoring/{namespace}/{}", claims.as_deref().unwrap_or("")),
        }
    }

    /// Made at once, whatever else changes meanwhile.
    fn urgent(&self) -> bool {
        !matches!(self, Self::CreateHelper(_) | Self::PatchPod(_))
    }
}

/// Makes the writes; see the module's comment.
pub struct Applier {
    client: kube::Client,
    velero_namespace: String,
    events: EventSink,
    metrics: Arc<Metrics>,
    /// Writes made and not yet reflected by the watches, by key, with when they were made.
    pending: HashMap<String, Instant>,
}

impl Applier {
    pub fn new(
        client: kube::Client,
        velero_namespace: String,
        events: EventSink,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            velero_namespace,
            events,
            metrics,
            pending: HashMap::new(),
        }
    }

    /// Makes `writes`, skipping those made within `PENDING_FOR`; stops making deferrable
    /// ones once `generation()` (how many watch events have arrived) moves on after the
    /// urgent ones are made. Returns when a write not seen done is due to be retried.
    pub async fn apply(
        &mut self,
        writes: Vec<Write>,
        claim_uids: &HashMap<(&str, &str), &str>,
        generation: impl Fn() -> u64,
    ) -> Option<Timestamp> {
        let wanted: HashSet<String> = writes.iter().map(Write::key).collect();
        // What the plan no longer asks for has been seen done (or undone): forget it.
        self.pending
            .retain(|k, at| wanted.contains(k) && at.elapsed() < PENDING_FOR);
        let (urgent, deferrable): (Vec<Write>, Vec<Write>) =
            writes.into_iter().partition(Write::urgent);
        if !urgent.is_empty() || !deferrable.is_empty() {
            debug!(
                urgent = urgent.len(),
                deferrable = deferrable.len(),
                "applying a plan"
            );
        }
        let todo: Vec<Write> = urgent.into_iter().filter(|w| self.begin(w)).collect();
        self.make(&todo, claim_uids).await;
        let seen = generation();
        for chunk in deferrable.chunks(CHUNK) {
            if generation() != seen {
                debug!("the cluster changed while writing: planning again");
                break;
            }
            let todo: Vec<&Write> = chunk.iter().filter(|w| self.begin(w)).collect();
            self.make_refs(&todo, claim_uids).await;
        }
        self.pending
            .values()
            .map(|at| (*at + PENDING_FOR).saturating_duration_since(Instant::now()))
            .min()
            .and_then(|d| SignedDuration::try_from(d).ok())
            .map(|d| Timestamp::now() + d)
    }

    /// Marks a write as made now; false if it was made recently and is still pending.
    fn begin(&mut self, write: &Write) -> bool {
        let key = write.key();
        if self.pending.contains_key(&key) {
            return false;
        }
        self.pending.insert(key, Instant::now());
        true
    }

    async fn make(&self, writes: &[Write], claim_uids: &HashMap<(&str, &str), &str>) {
        let refs: Vec<&Write> = writes.iter().collect();
        self.make_refs(&refs, claim_uids).await;
    }

    async fn make_refs(&self, writes: &[&Write], claim_uids: &HashMap<(&str, &str), &str>) {
        futures::stream::iter(writes)
            .for_each_concurrent(WRITES_IN_FLIGHT, |w| async move {
                if tokio::time::timeout(WRITE_TIMEOUT, self.write(w, claim_uids))
                    .await
                    .is_err()
                {
                    warn!(write = %w.key(), "a write timed out; retried later");
                }
            })
            .await;
    }

    async fn write(&self, write: &Write, claim_uids: &HashMap<(&str, &str), &str>) {
        match write {
            Write::CreateHelper(pod) => self.create_helper(pod, claim_uids).await,
            Write::DeletePod { deletion, done } => {
                if self.delete_pod(deletion, claim_uids).await {
                    for note in done {
                        self.report(note, claim_uids);
                    }
                }
            }
            Write::PatchPod(p) => self.patch_pod(p).await,
            Write::CreateBackup(b) => self.create_backup(b).await,
            Write::RecordRestoring {
                namespace,
                claims,
                patch,
            } => {
                self.record_restoring(namespace, claims.as_deref(), patch)
                    .await
            }
        }
    }

    fn report(&self, note: &Note, claim_uids: &HashMap<(&str, &str), &str>) {
        if note.warning {
            warn!(namespace = %note.namespace, claim = ?note.claim, "{}", note.message);
        }
        let m = &self.metrics.controller;
        m.restored_bytes.inc_by(note.restored_bytes);
        if note.restore_failed {
            m.restores_failed.inc();
        }
        let Some(claim) = note.claim.as_deref() else {
            return;
        };
        let reference = claim_reference(&note.namespace, claim, claim_uids);
        if note.warning {
            self.events
                .warn(reference, note.reason, note.action, note.message.clone());
        } else {
            self.events
                .normal(reference, note.reason, note.action, note.message.clone());
        }
    }

    async fn create_helper(&self, pod: &Pod, claim_uids: &HashMap<(&str, &str), &str>) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let claim = crate::policy::helper::claim_of(pod).unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        self.metrics.controller.write("create", "pods");
        let failed = |why: String| {
            self.metrics.controller.reconcile_errors.inc();
            self.events.warn(
                claim_reference(ns, claim, claim_uids),
                "BackupHelperFailed",
                "Create",
                why,
            );
        };
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => {
                info!(
                    namespace = ns,
                    helper = name,
                    claim,
                    "created a backup helper"
                );
                self.events.normal(
                    claim_reference(ns, claim, claim_uids),
                    "BackupHelperCreated",
                    "Create",
                    format!(
                        "backup helper {name} mounts this idle claim for the next Velero backup"
                    ),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Ours, not seen by the watch yet; or another pod has the name, which the
                // next plan sees in the watch and reports (`Plan::squatted`): the
                // controller may not read single pods.
                debug!(namespace = ns, helper = name, "already exists");
            }
            Err(e) => {
                warn!(namespace = ns, helper = name, error = %e, "could not create a backup helper");
                failed(format!("could not create backup helper {name}: {e}"));
            }
        }
    }

    /// Deletes a helper of ours; true if it is gone now (deleted, or already gone).
    async fn delete_pod(&self, d: &Deletion, claim_uids: &HashMap<(&str, &str), &str>) -> bool {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &d.namespace);
        let params = DeleteParams {
            grace_period_seconds: d.reason.immediate().then_some(0),
            preconditions: Some(Preconditions {
                uid: Some(d.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let what = if d.reason.restore_helper() {
            "restore helper"
        } else {
            "backup helper"
        };
        self.metrics.controller.write("delete", "pods");
        match api.delete(&d.name, &params).await {
            Ok(_) => {
                info!(namespace = %d.namespace, pod = %d.name, reason = d.reason.as_str(), "deleted a {what}");
                if !d.reason.restore_helper() {
                    self.events.normal(
                        claim_reference(&d.namespace, &d.claim, claim_uids),
                        "BackupHelperDeleted",
                        "Delete",
                        format!(
                            "backup helper {} deleted: {}",
                            d.name,
                            d.reason.as_str().replace('_', " ")
                        ),
                    );
                }
                true
            }
            // Gone already, or another pod of that name (its uid differs).
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                debug!(pod = %d.name, "already gone");
                false
            }
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = %d.namespace, pod = %d.name, error = %e, "could not delete a {what}; retried later");
                false
            }
        }
    }

    async fn patch_pod(&self, p: &PodPatch) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace);
        self.metrics.controller.write("patch", "pods");
        match api
            .patch(&p.name, &PatchParams::default(), &Patch::Merge(&p.patch))
            .await
        {
            Ok(_) if p.kind == PodPatchKind::Backfill => {
                self.metrics.controller.backfilled.inc();
                info!(namespace = %p.namespace, pod = %p.name, "backfilled the backup annotation");
            }
            Ok(_) => info!(
                namespace = %p.namespace,
                helper = %p.name,
                "labelled a backup helper for an open window's Schedule"
            ),
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = %p.namespace, pod = %p.name, error = %e, "patch failed; retried when the pod changes");
            }
        }
    }

    /// Creates a wave's Backup from its Schedule as it is now (read whole: the template's
    /// every field goes into the Backup).
    async fn create_backup(&self, b: &WaveBackupToMake) {
        let velero = self.velero_namespace.as_str();
        let resource = kube::api::ApiResource::erase::<crate::cluster::velero::Backup>(&());
        let schedules: Api<kube::core::DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            velero,
            &kube::api::ApiResource::erase::<Schedule>(&()),
        );
        let backups: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), velero, &resource);
        let id = b.id(velero);
        let name = id.backup_name();
        let schedule = match schedules.get(&b.schedule).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(schedule = %b.schedule, error = %e, "could not read the Schedule for a wave Backup; retried later");
                return;
            }
        };
        let schedule = serde_json::to_value(&schedule).unwrap_or_default();
        let namespaces: Vec<&str> = b.namespaces.iter().map(String::as_str).collect();
        let mut backup = crate::policy::waves::wave_backup(&schedule, &id, &b.follows, &namespaces);
        backup["metadata"]["annotations"][names::WAVE_CLAIMS] = b.claims.join(",").into();
        backup["metadata"]["annotations"][names::WAVE_GIVEN_UP] = b.given_up.join(",").into();
        let object: kube::core::DynamicObject = match serde_json::from_value(backup) {
            Ok(o) => o,
            Err(e) => {
                warn!(backup = %name, error = %e, "a wave Backup did not encode");
                return;
            }
        };
        self.metrics.controller.write("create", "backups");
        match backups.create(&PostParams::default(), &object).await {
            Ok(_) => {
                let labels = crate::metrics::ScheduleLabels {
                    schedule: b.schedule.clone(),
                };
                let m = &self.metrics.controller;
                m.waves.get_or_create(&labels).inc();
                m.wave_claims
                    .get_or_create(&labels)
                    .inc_by(b.claims.len() as u64);
                m.wave_given_up
                    .get_or_create(&labels)
                    .inc_by(b.given_up.len() as u64);
                info!(backup = %name, claims = b.claims.len(), given_up = b.given_up.len(), "created a wave Backup");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => debug!(backup = %name, "already exists"),
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(backup = %name, error = %e, "could not create a wave Backup; retried later");
                let reference = crate::cluster::velero::schedule_reference(
                    Some(b.schedule.clone()),
                    Some(velero.to_owned()),
                    None,
                );
                self.events.warn(
                    reference,
                    "WaveBackupFailed",
                    "Create",
                    format!("could not create wave Backup {name} (retried): {e}"),
                );
            }
        }
    }

    async fn record_restoring(&self, name: &str, claims: Option<&str>, patch: &serde_json::Value) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.metrics.controller.write("patch", "namespaces");
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => info!(
                namespace = name,
                claims = claims.unwrap_or(""),
                "claims being restored recorded on the namespace"
            ),
            Err(e) => {
                warn!(namespace = name, error = %e, "could not record the claims being restored on the namespace; retrying")
            }
        }
    }
}

/// An Event's reference to a user claim (its uid when the watch has it).
pub fn claim_reference(
    ns: &str,
    claim: &str,
    uids: &HashMap<(&str, &str), &str>,
) -> ObjectReference {
    crate::cluster::events::claim_reference(ns, claim, uids.get(&(ns, claim)).copied())
}

/// What has been reported, so each thing is reported once while it lasts (and again if
/// it goes away and comes back): a Schedule's problem, a helper stuck or failed.
#[derive(Debug)]
pub struct ReportOnce<K>(HashSet<K>);

impl<K> Default for ReportOnce<K> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<K: std::hash::Hash + Eq + Clone> ReportOnce<K> {
    /// Of the things there are `now`, those not reported yet (to report now); forgets
    /// those no longer there.
    pub fn fresh(&mut self, now: impl IntoIterator<Item = K>) -> Vec<K> {
        let now: HashSet<K> = now.into_iter().collect();
        let fresh = now.difference(&self.0).cloned().collect();
        self.0 = now;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_once_while_it_lasts_and_again_when_it_comes_back() {
        let mut once = ReportOnce::default();
        assert_eq!(once.fresh(["a"]), ["a"]);
        assert_eq!(
            once.fresh(["a"]),
            Vec::<&str>::new(),
            "still there: not again"
        );
        let mut both = once.fresh(["a", "b"]);
        both.sort();
        assert_eq!(both, ["b"]);
        assert_eq!(once.fresh(["b"]), Vec::<&str>::new(), "a went away");
        assert_eq!(once.fresh(["a", "b"]), ["a"], "a came back");
    }

    fn deletion(uid: &str) -> Deletion {
        Deletion {
            namespace: "jhub".into(),
            name: "vjh-backup-claim-alice".into(),
            uid: uid.into(),
            claim: "claim-alice".into(),
            reason: crate::policy::plan::DeleteReason::WindowClosed,
        }
    }

    fn patch(kind: PodPatchKind, uid: &str, version: &str) -> Write {
        Write::PatchPod(PodPatch {
            kind,
            namespace: "jhub".into(),
            name: "jupyter-alice".into(),
            uid: uid.into(),
            version: version.into(),
            patch: serde_json::json!({}),
        })
    }

    /// A write planned again has the same key (it is not repeated while pending); another
    /// write, even of the same object, has another.
    #[test]
    fn keys_tell_the_same_write_from_another() {
        let delete = |uid: &str| Write::DeletePod {
            deletion: deletion(uid),
            done: Vec::new(),
        };
        let record = |claims: Option<&str>| Write::RecordRestoring {
            namespace: "jhub".into(),
            claims: claims.map(str::to_owned),
            patch: serde_json::json!({}),
        };
        let same = [
            (delete("u1"), delete("u1")),
            (
                patch(PodPatchKind::Backfill, "u1", "7"),
                patch(PodPatchKind::Backfill, "u1", "7"),
            ),
            (record(Some("claim-a")), record(Some("claim-a"))),
        ];
        for (a, b) in &same {
            assert_eq!(a.key(), b.key());
        }
        let different = [
            (delete("u1"), delete("u2")),
            (
                patch(PodPatchKind::Backfill, "u1", "7"),
                patch(PodPatchKind::Backfill, "u1", "8"),
            ),
            (
                patch(PodPatchKind::Backfill, "u1", "7"),
                patch(PodPatchKind::Relabel, "u1", "7"),
            ),
            (record(Some("claim-a")), record(None)),
        ];
        for (a, b) in &different {
            assert_ne!(a.key(), b.key());
        }
    }

    /// Deletions, the restore guard's records and wave Backups never wait behind a
    /// change; helpers and patches do.
    #[test]
    fn what_goes_first() {
        assert!(
            Write::DeletePod {
                deletion: deletion("u"),
                done: Vec::new()
            }
            .urgent()
        );
        assert!(
            Write::RecordRestoring {
                namespace: "jhub".into(),
                claims: None,
                patch: serde_json::json!({})
            }
            .urgent()
        );
        assert!(!patch(PodPatchKind::Relabel, "u", "x").urgent());
        assert!(!Write::CreateHelper(Box::default()).urgent());
    }
}
