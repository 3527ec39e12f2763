//! The reconciler's plan: given the opted-in namespaces, their claims and pods, the open
//! backup windows and the PodVolumeBackups, which backup helpers must be created, which
//! must go and why, and which live user pods need their annotation backfilled. The edge
//! applies the plan; applying it and planning again gives an empty plan (no writes in
//! steady state).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;

use crate::claims::ClaimGlobs;
use crate::helper::{self, ClaimRef, HelperOptions};
use crate::live::{LiveVerdict, decide_live};
use crate::names;
use crate::pod::PodFacts;
use crate::record::PodRecord;
use crate::velero;
use crate::window::NamespaceWindow;

// Claims are read from records, so the view lives there (the plan reads records, never
// the reverse); re-exported because callers name it `plan::ClaimView`.
pub use crate::record::ClaimView;

/// A PodVolumeBackup as the plan needs it.
#[derive(Clone, Copy, Debug)]
pub struct PvbView<'a> {
    /// Its `velero.io/backup-name` label.
    pub backup: &'a str,
    pub pod_namespace: &'a str,
    pub pod_uid: &'a str,
    /// Its `velero.io/pvc-name` annotation: the claim it copies.
    pub claim: Option<&'a str>,
    pub phase: Option<&'a str>,
}

/// An opted-in namespace and its claim globs.
#[derive(Clone, Copy, Debug)]
pub struct NamespaceView<'a> {
    pub name: &'a str,
    pub claims: &'a ClaimGlobs,
}

pub struct PlanInput<'a> {
    pub namespaces: &'a [NamespaceView<'a>],
    pub claims: &'a [ClaimView<'a>],
    /// Pods of the namespaces this controller manages, opted in or not (its
    /// `--namespace-selector`; helpers left where a namespace opted out are deleted).
    pub pods: &'a [&'a PodRecord],
    /// Open windows by namespace (`window::windows`).
    pub windows: &'a BTreeMap<String, NamespaceWindow>,
    pub pvbs: &'a [PvbView<'a>],
    pub helper: &'a HelperOptions,
    /// `(namespace, claim)` being restored (`restoring::claims_being_restored`): no
    /// helper takes them meanwhile.
    pub restoring: &'a std::collections::HashSet<(&'a str, &'a str)>,
    /// `(namespace, claim)` the open windows' Schedules copy without a pod
    /// (`datapath::without_pod`): no helper for them.
    pub without_pod: &'a std::collections::HashSet<(&'a str, &'a str)>,
    pub now: jiff::Timestamp,
    /// A user pod no node has taken yet displaces a helper only once it is this old
    /// (`--user-pod-grace`): a pod that never runs must not cancel a backup.
    pub user_pod_grace: jiff::SignedDuration,
}

/// Whether a user pod takes its claim from a helper now: it runs, or a node has taken it
/// (it waits for the volume there: a ReadWriteOnce volume attached elsewhere), or the
/// claim is ReadWriteOncePod (`exclusive`: the scheduler keeps the pod unscheduled while
/// the helper uses it), or it has waited unscheduled for the grace period. An unscheduled
/// pod does not wait on the helper of a ReadWriteOnce claim (the scheduler places it
/// regardless; an autoscaler adds its node): the helper keeps the claim in the Backup
/// meanwhile, and a pod that never schedules does not take it for long. `Err(when)`: not
/// yet, and when it will.
fn takes_claims(
    pod: &PodRecord,
    exclusive: bool,
    now: jiff::Timestamp,
    grace: jiff::SignedDuration,
) -> Result<(), jiff::Timestamp> {
    if pod.phase() == Some("Running") || pod.node().is_some() || exclusive {
        return Ok(());
    }
    let Some(created) = pod.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return Ok(());
    };
    let due = created.saturating_add(grace).unwrap_or(created);
    if due <= now { Ok(()) } else { Err(due) }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<Pod>,
    pub delete: Vec<Deletion>,
    pub backfill: Vec<Backfill>,
    pub relabel: Vec<Relabel>,
    /// When an unscheduled user pod's grace period ends (it may displace a helper then).
    pub wake: Option<jiff::Timestamp>,
    /// Claims a Backup under way will have no copy of: only pods that are not Running
    /// (past the grace period) mount them.
    pub held: Vec<Held>,
    /// Idle claims whose helper's name another pod has taken: (namespace, claim, pod
    /// uid). No helper can be made for them while it exists.
    pub squatted: Vec<(String, String, String)>,
}

/// A user claim with a Backup under way that no Running pod mounts, held by pods that
/// have not run for the grace period (stuck Pending, a bad image, a pod made to squat
/// it): Velero copies a volume only from a Running pod (pkg/podvolume/backupper.go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub namespace: String,
    pub claim: String,
    /// The Backups under way in its window.
    pub backups: Vec<String>,
    /// The pods holding it: (name, what it is doing).
    pub pods: Vec<(String, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.delete.is_empty()
            && self.backfill.is_empty()
            && self.relabel.is_empty()
    }
}

/// A kept helper that lacks labels an open window's Schedule selects (it was created for
/// another window): they are added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relabel {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}

/// A helper to delete (with its uid as a precondition: never someone else's pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub claim: String,
    pub reason: DeleteReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// A user pod needs the claim and is not on the helper's node (or either is not
    /// scheduled): the user wins, at once.
    UserStarted,
    /// A user pod shares the helper's node, and the helper's PodVolumeBackup is done.
    BackedUpUserRunning,
    /// No backup window is open in its namespace any more.
    WindowClosed,
    /// Its claim is gone, unbound, or no longer a user claim.
    NotIdleUserClaim,
    /// Its namespace is not (or no longer) opted in.
    NamespaceNotOptedIn,
    /// Another helper holds the same claim (e.g. one named by an older version).
    Duplicate,
    /// It stopped (Succeeded/Failed): a new one takes its place.
    Stopped,
    /// Its wave's Backup is terminal, or its run is over (`waves::run_step`).
    WaveOver,
    /// It did not run within `--helper-start-timeout`: its wave went on without it.
    GivenUp,
    /// A Velero restore is under way for its claim: Velero may re-create a pod of this
    /// name (then, finding ours, it would skip it and not restore its volume).
    RestoreInProgress,
    /// A restore helper whose restore is over (`cleanup::restore_helpers`): it restored
    /// its volumes, or failed and was kept its time for inspection.
    RestoreDone,
}

impl DeleteReason {
    /// Delete with grace period 0: the user is waiting for the volume (or, for a restore
    /// helper, nothing runs in it that could need one).
    pub fn immediate(self) -> bool {
        matches!(
            self,
            Self::UserStarted | Self::RestoreInProgress | Self::RestoreDone
        )
    }

    /// The pod is a restore helper, not a backup helper.
    pub fn restore_helper(self) -> bool {
        self == Self::RestoreDone
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserStarted => "user_started",
            Self::BackedUpUserRunning => "backed_up_user_running",
            Self::WindowClosed => "window_closed",
            Self::NotIdleUserClaim => "not_an_idle_user_claim",
            Self::NamespaceNotOptedIn => "namespace_not_opted_in",
            Self::Duplicate => "duplicate",
            Self::Stopped => "stopped",
            Self::WaveOver => "wave_over",
            Self::GivenUp => "given_up",
            Self::RestoreInProgress => "restore_in_progress",
            Self::RestoreDone => "restore_done",
        }
    }
}

/// A live user pod whose `backup.velero.io/backup-volumes` misses volumes the webhook
/// would have listed (it was down, or the namespace opted in later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backfill {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's resourceVersion: the patch applies only to the pod as it was read.
    pub resource_version: String,
    pub value: String,
}

/// A helper of a wave (`waves`): its run, not a window, decides when it goes.
pub fn is_wave_helper(pod: &PodRecord) -> bool {
    is_backup_helper(pod) && pod.own_label(names::WAVE_SCHEDULE).is_some()
}

fn is_backup_helper<P: PodFacts>(pod: &P) -> bool {
    pod.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
        && pod.label(names::COMPONENT) == Some(names::BACKUP_HELPER)
}

/// The claim a backup helper holds: the claim it mounts (never what an annotation says:
/// a pod that only claims to hold it must not stand in for its helper).
fn helper_claim(pod: &PodRecord) -> Option<&str> {
    pod.volumes().find_map(|(_, claim)| claim)
}

pub fn plan(input: &PlanInput<'_>) -> Plan {
    let mut out = Plan::default();
    let globs: HashMap<&str, &ClaimGlobs> = input
        .namespaces
        .iter()
        .map(|n| (n.name, n.claims))
        .collect();

    // Who mounts what: (namespace, claim) → the live pods that are not backup helpers.
    let mut users: HashMap<(&str, &str), Vec<&PodRecord>> = HashMap::new();
    let mut helpers: HashMap<(&str, &str), Vec<&PodRecord>> = HashMap::new();
    for pod in input.pods.iter().copied() {
        let ns = pod.namespace();
        if !globs.contains_key(ns) {
            // A helper left in a namespace that has opted out since: it goes.
            if is_backup_helper(pod) && pod.metadata.deletion_timestamp.is_none() {
                out.delete.push(Deletion {
                    namespace: ns.to_owned(),
                    name: pod.name().to_owned(),
                    uid: pod.uid().to_owned(),
                    claim: helper_claim(pod).unwrap_or_default().to_owned(),
                    reason: DeleteReason::NamespaceNotOptedIn,
                });
            }
            continue;
        }
        if is_backup_helper(pod) {
            if let Some(claim) = helper_claim(pod) {
                helpers.entry((ns, claim)).or_default().push(pod);
            }
            continue;
        }
        if pod.is_stopped() {
            continue;
        }
        for (_, claim) in pod.volumes() {
            if let Some(claim) = claim {
                users.entry((ns, claim)).or_default().push(pod);
            }
        }
        backfill(pod, globs[ns], &mut out.backfill);
    }
    // Pods whose volume backup is done: (namespace, pod uid) → the Backups it was in.
    let mut backed_up: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for p in input.pvbs {
        if velero::pod_volume_backup_is_terminal(p.phase) {
            backed_up
                .entry((p.pod_namespace, p.pod_uid))
                .or_default()
                .push(p.backup);
        }
    }
    let done = |ns: &str, uid: &str, window: &NamespaceWindow| {
        backed_up.get(&(ns, uid)).is_some_and(|backups| {
            backups
                .iter()
                .any(|b| window.backups.iter().any(|w| w == b))
        })
    };

    // Existing helpers: keep, or delete and say why.
    let claims: HashMap<(&str, &str), &ClaimView<'_>> = input
        .claims
        .iter()
        .map(|c| ((c.namespace, c.name), c))
        .collect();
    for (&(ns, claim_name), pods) in &helpers {
        let wanted_name = helper::helper_name(claim_name);
        let user_claim = claims
            .get(&(ns, claim_name))
            .is_some_and(|c| c.bound && globs.get(ns).is_some_and(|g| g.matches(claim_name)));
        let window = input.windows.get(ns);
        // The one to keep: the one with our name, else the first.
        let keep = pods
            .iter()
            .position(|p| p.name() == wanted_name)
            .unwrap_or(0);
        for (i, pod) in pods.iter().enumerate() {
            // Already being deleted: nothing more to ask of it. (On a node that is gone
            // it stays so until the node is deleted or marked out of service; deleting
            // it again would change nothing, every pass.)
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (name, uid) = (pod.name(), pod.uid());
            // The user pods that take the claim from a helper now.
            let mut taking: Vec<&PodRecord> = Vec::new();
            let exclusive = claims.get(&(ns, claim_name)).is_some_and(|c| c.exclusive);
            for u in users.get(&(ns, claim_name)).into_iter().flatten() {
                match takes_claims(u, exclusive, input.now, input.user_pod_grace) {
                    Ok(()) => taking.push(u),
                    Err(due) => {
                        if out.wake.is_none_or(|w| due < w) {
                            out.wake = Some(due);
                        }
                    }
                }
            }
            let reason = if i != keep {
                Some(DeleteReason::Duplicate)
            } else if !user_claim {
                Some(DeleteReason::NotIdleUserClaim)
            } else if input.restoring.contains(&(ns, claim_name)) {
                Some(DeleteReason::RestoreInProgress)
            } else if pod.is_stopped() {
                Some(DeleteReason::Stopped)
            } else if is_wave_helper(pod) {
                // Its user is in the Schedule's own Backup (the webhook annotated their
                // server): the helper goes at once, wherever it runs.
                (!taking.is_empty()).then_some(DeleteReason::UserStarted)
            } else if let Some(window) = window {
                let helper_node = pod.node();
                match taking.as_slice() {
                    [] => None,
                    users
                        if users
                            .iter()
                            .any(|u| helper_node.is_none() || u.node() != helper_node) =>
                    {
                        Some(DeleteReason::UserStarted)
                    }
                    _ if done(ns, uid, window) => Some(DeleteReason::BackedUpUserRunning),
                    _ => None,
                }
            } else {
                Some(DeleteReason::WindowClosed)
            };
            if reason.is_none()
                && !is_wave_helper(pod)
                && let Some(window) = window
            {
                let missing: BTreeMap<String, String> = window
                    .labels
                    .iter()
                    .filter(|(k, v)| {
                        !pod.own_pod_labels
                            .iter()
                            .any(|(pk, pv)| pk == *k && pv == *v)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !missing.is_empty() {
                    out.relabel.push(Relabel {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                        uid: uid.to_owned(),
                        labels: missing,
                    });
                }
            }
            if let Some(reason) = reason {
                out.delete.push(Deletion {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    uid: uid.to_owned(),
                    claim: claim_name.to_owned(),
                    reason,
                });
            }
        }
    }

    // Claims a Backup under way misses: held only by pods that do not run.
    for claim in input.claims {
        let key = (claim.namespace, claim.name);
        let (Some(window), Some(g)) = (
            input.windows.get(claim.namespace),
            globs.get(claim.namespace),
        ) else {
            continue;
        };
        if window.backups.is_empty()
            || !claim.bound
            || !g.matches(claim.name)
            || input.restoring.contains(&key)
            || input.without_pod.contains(&key)
        {
            continue;
        }
        // Copied already (or being copied) in one of the window's Backups: not missed.
        let copied = input.pvbs.iter().any(|p| {
            p.pod_namespace == claim.namespace
                && p.claim == Some(claim.name)
                && p.phase != Some("Failed")
                && window.backups.iter().any(|b| b == p.backup)
        });
        if copied {
            continue;
        }
        let holders = users.get(&key).map(Vec::as_slice).unwrap_or_default();
        let helper_running = helpers
            .get(&key)
            .into_iter()
            .flatten()
            .any(|h| h.phase() == Some("Running") && h.metadata.deletion_timestamp.is_none());
        if holders.is_empty()
            || helper_running
            || holders.iter().any(|u| u.phase() == Some("Running"))
        {
            continue;
        }
        // A holder past the grace period is stuck; a younger one is looked at again when
        // its grace ends (an unscheduled pod makes no more watch events).
        let mut stuck = false;
        for u in holders {
            let Some(created) = u.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
                stuck = true;
                continue;
            };
            let due = created
                .saturating_add(input.user_pod_grace)
                .unwrap_or(created);
            if due <= input.now {
                stuck = true;
            } else if out.wake.is_none_or(|w| due < w) {
                out.wake = Some(due);
            }
        }
        if !stuck {
            continue;
        }
        out.held.push(Held {
            namespace: claim.namespace.to_owned(),
            claim: claim.name.to_owned(),
            backups: window.backups.clone(),
            pods: holders
                .iter()
                .map(|u| {
                    let state = match (u.phase(), u.node()) {
                        (Some("Pending") | None, None) => "Pending, not scheduled".to_owned(),
                        (phase, Some(node)) => {
                            format!("{} on node {node}", phase.unwrap_or("Pending"))
                        }
                        (Some(phase), None) => phase.to_owned(),
                    };
                    (u.name().to_owned(), state)
                })
                .collect(),
        });
    }

    // Idle user claims in open windows without a helper: create one.
    for claim in input.claims {
        let (Some(window), Some(g)) = (
            input.windows.get(claim.namespace),
            globs.get(claim.namespace),
        ) else {
            continue;
        };
        let key = (claim.namespace, claim.name);
        if !claim.bound
            || !g.matches(claim.name)
            || users.contains_key(&key)
            || helpers.contains_key(&key)
            || input.restoring.contains(&key)
            || input.without_pod.contains(&key)
        {
            continue;
        }
        // A pod of the helper's name that is not its helper (that one would be in
        // `helpers`): the helper cannot be made; said, never waited on in silence.
        let name = helper::helper_name(claim.name);
        if let Some(squatter) = input
            .pods
            .iter()
            .find(|p| p.namespace() == claim.namespace && p.name() == name)
        {
            out.squatted.push((
                claim.namespace.to_owned(),
                claim.name.to_owned(),
                squatter.uid().to_owned(),
            ));
            continue;
        }
        let mut labels = helper::own_labels(claim.username);
        for (k, v) in &window.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let claim_ref = ClaimRef {
            namespace: claim.namespace,
            name: claim.name,
            uid: claim.uid,
            username: claim.username,
        };
        out.create
            .push(helper::backup_helper(&claim_ref, labels, input.helper));
    }
    out.create
        .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out.delete
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.backfill
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.relabel
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Backup helpers not running `after` their creation (no node takes them, the image does
/// not pull, ...): their claims will miss the Backup unless someone looks. Returns them,
/// and when the next one will have waited that long (to wake up then).
pub fn stuck_helpers<'a>(
    pods: &[&'a PodRecord],
    now: jiff::Timestamp,
    after: jiff::SignedDuration,
) -> (Vec<&'a PodRecord>, Option<jiff::Timestamp>) {
    let mut stuck = Vec::new();
    let mut next = None::<jiff::Timestamp>;
    for pod in pods.iter().copied().filter(|p| is_backup_helper(*p)) {
        let running_or_done = matches!(pod.phase(), Some("Running" | "Succeeded" | "Failed"));
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let (Some(created), false) = (
            created,
            running_or_done || pod.metadata.deletion_timestamp.is_some(),
        ) else {
            continue;
        };
        let due = created.saturating_add(after).unwrap_or(created);
        if due <= now {
            stuck.push(pod);
        } else if next.is_none_or(|n| due < n) {
            next = Some(due);
        }
    }
    stuck.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    (stuck, next)
}

/// The webhook's own decision (one shared function), applied to a pod already running.
fn backfill(pod: &PodRecord, globs: &ClaimGlobs, out: &mut Vec<Backfill>) {
    if pod.metadata.deletion_timestamp.is_some() {
        return;
    }
    let decision = decide_live(pod, globs);
    if let (LiveVerdict::Annotate, Some(value)) = (decision.verdict, decision.new_value) {
        out.push(Backfill {
            namespace: pod.namespace().to_owned(),
            name: pod.name().to_owned(),
            uid: pod.uid().to_owned(),
            resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
            value,
        });
    }
}
