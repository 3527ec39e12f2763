//! The controller's part of a restore: when is a restore helper done, and what
//! do we say about it? Velero's node-agent fills each restored volume through a
//! PodVolumeRestore labelled `velero.io/pod-uid=<the helper's uid>`
//! (pkg/podvolume/restorer.go); once all of a helper's are terminal, the helper has done
//! its job.
//!
//! - all `Completed`: delete it, and say on each claim how many bytes came back;
//! - any `Failed` (or `Canceled`): warn, keep it `failed_ttl` for inspection, then delete;
//! - none at all: nothing to restore (no `restore-wait`) → delete at once; else delete
//!   once the Restore is over (or gone for `RESTORE_GONE_AFTER`).
//!
//! "All" means one per volume `restore-wait` restores (Velero creates them one by one),
//! and a completed helper goes only once `restore-wait` has exited (it removes the
//! node-agent's marker files from the volume then).

use jiff::{SignedDuration, Timestamp};

use crate::names;
use crate::pod::PodFacts;
use crate::record::PodRecord;
use crate::velero;

/// A Restore the watch does not show is taken as deleted after this long.
pub const RESTORE_GONE_AFTER: SignedDuration = SignedDuration::from_mins(5);
/// After its last PodVolumeRestore completed, a helper whose container is not seen
/// running is deleted after this long (restore-wait looks once a second).
pub const RESTORE_WAIT_EXITS: SignedDuration = SignedDuration::from_secs(30);

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// A PodVolumeRestore, as the decision reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct PvrView<'a> {
    /// Its `velero.io/pod-uid` label.
    pub pod_uid: &'a str,
    pub volume: &'a str,
    pub phase: Option<&'a str>,
    pub bytes_done: Option<i64>,
    pub message: Option<&'a str>,
    pub completed: Option<Timestamp>,
}

/// A Restore, as the decision reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreView<'a> {
    pub name: &'a str,
    pub backup: &'a str,
    pub phase: Option<&'a str>,
    pub completed: Option<Timestamp>,
}

/// Where a restore helper stands.
#[derive(Clone, Debug, PartialEq)]
pub enum HelperState {
    /// Velero is still filling its volumes: keep it.
    Restoring,
    /// Every volume restored: delete it.
    Completed,
    /// A volume failed: keep it until `until` for inspection, then delete it.
    Failed { until: Timestamp },
    /// Failed, and kept long enough: delete it.
    FailedExpired,
    /// No `restore-wait`, so nothing to restore: delete it at once.
    NothingToRestore,
    /// No PodVolumeRestore, and its Restore is over or gone: delete it.
    RestoreOver,
}

impl HelperState {
    pub fn delete(&self) -> bool {
        !matches!(self, Self::Restoring | Self::Failed { .. })
    }

    /// For logs, Events and the `state` metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Restoring => "restoring",
            Self::Completed => "completed",
            Self::Failed { .. } => "failed",
            Self::FailedExpired => "failed_expired",
            Self::NothingToRestore => "nothing_to_restore",
            Self::RestoreOver => "restore_over",
        }
    }
}

/// One restored volume of a helper.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeOutcome<'a> {
    pub volume: &'a str,
    pub claim: Option<&'a str>,
    pub phase: Option<&'a str>,
    pub bytes_done: Option<i64>,
    pub message: Option<&'a str>,
}

impl VolumeOutcome<'_> {
    pub fn failed(&self) -> bool {
        matches!(self.phase, Some("Failed" | "Canceled"))
    }
}

/// A restore helper and where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreHelper<'a> {
    pub pod: &'a PodRecord,
    pub restore: &'a str,
    /// The Backup restored from (the Restore's, else the pod's `velero.io/backup-name`).
    pub backup: Option<&'a str>,
    /// One per volume `restore-wait` restores.
    pub volumes: Vec<VolumeOutcome<'a>>,
    pub state: HelperState,
}

/// Our restore helpers (ours, `restore-helper`, made by a restore), by what their
/// PodVolumeRestores and Restores say at `now`; and when a kept failed helper is next due
/// for deletion.
pub fn restore_helpers<'a>(
    pods: &[&'a PodRecord],
    pvrs: &[PvrView<'a>],
    restores: &[RestoreView<'a>],
    now: Timestamp,
    failed_ttl: SignedDuration,
) -> (Vec<RestoreHelper<'a>>, Option<Timestamp>) {
    let mut out = Vec::new();
    let mut next = None::<Timestamp>;
    for pod in pods.iter().copied() {
        if pod.metadata.deletion_timestamp.is_some() || !is_restore_helper(pod) {
            continue;
        }
        let Some(restore_name) = own_label(pod, names::VELERO_RESTORE_NAME) else {
            continue;
        };
        // Velero writes the Restore's name into the label as a valid label value.
        let restore = restores
            .iter()
            .find(|r| velero::label_value(r.name) == restore_name);
        let mine: Vec<&PvrView<'a>> = pvrs.iter().filter(|p| p.pod_uid == pod.uid()).collect();
        let claim_of = |volume: &str| {
            pod.volumes()
                .find(|(name, _)| *name == volume)
                .and_then(|(_, claim)| claim)
        };
        // One per volume restore-wait restores (our container mounts exactly those), with
        // its PodVolumeRestore's result if there is one yet.
        let volumes: Vec<VolumeOutcome<'a>> = pod
            .container_mounts
            .iter()
            .map(|volume| {
                let pvr = mine.iter().find(|p| p.volume == volume);
                VolumeOutcome {
                    volume: pvr.map_or(volume.as_str(), |p| p.volume),
                    claim: claim_of(volume),
                    phase: pvr.and_then(|p| p.phase),
                    bytes_done: pvr.and_then(|p| p.bytes_done),
                    message: pvr.and_then(|p| p.message),
                }
            })
            .collect();
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // A Restore not (yet) seen is over only once the helper is old enough: a watch
        // that lags must not end a restore that has just begun.
        let restore_over = match restore {
            Some(r) => velero::restore_is_terminal(r.phase),
            None => {
                let due = created.map_or(now, |c| c + RESTORE_GONE_AFTER);
                if due > now {
                    next = earliest(next, due);
                }
                due <= now
            }
        };
        // The volumes restore-wait restores (our container mounts exactly those): each
        // gets a PodVolumeRestore, created one after another.
        let restored = &pod.container_mounts;
        let all_started = restored.iter().all(|v| mine.iter().any(|p| p.volume == v));
        let all_terminal = mine
            .iter()
            .all(|p| velero::pod_volume_restore_is_terminal(p.phase));
        let state = if restored.is_empty() {
            HelperState::NothingToRestore
        } else if mine.is_empty() && restore_over {
            HelperState::RestoreOver
        } else if (all_started && all_terminal) || restore_over {
            // A Restore that ended with a volume unfinished (or never begun) failed it.
            let failed = !all_started || mine.iter().any(|p| p.phase != Some("Completed"));
            let finished = mine
                .iter()
                .filter_map(|p| p.completed)
                .chain(restore.and_then(|r| r.completed))
                .max();
            if failed {
                let until = finished.or(created).unwrap_or(now) + failed_ttl;
                if until <= now {
                    HelperState::FailedExpired
                } else {
                    next = earliest(next, until);
                    HelperState::Failed { until }
                }
            } else {
                // restore-wait sees the node-agent's done-file within a second, removes
                // it and exits; deleting the pod before that would leave `.velero/` in
                // the home. Its container running says restore-wait is done.
                let done = finished.map_or(now, |f| f + RESTORE_WAIT_EXITS);
                if matches!(pod.phase(), Some("Running" | "Succeeded" | "Failed")) || done <= now {
                    HelperState::Completed
                } else {
                    next = earliest(next, done);
                    HelperState::Restoring
                }
            }
        } else {
            HelperState::Restoring
        };
        out.push(RestoreHelper {
            pod,
            restore: restore_name,
            backup: restore
                .map(|r| r.backup)
                .filter(|b| !b.is_empty())
                .or_else(|| own_label(pod, names::VELERO_BACKUP_NAME)),
            volumes,
            state,
        });
    }
    (out, next)
}

/// A restore helper's per-claim summary for a `Completed` Event:
/// "restored from backup B by restore R (N bytes)".
pub fn restored_message(helper: &RestoreHelper<'_>, volume: &VolumeOutcome<'_>) -> String {
    let bytes = volume
        .bytes_done
        .map_or("size unknown".to_owned(), |b| format!("{b} bytes"));
    format!(
        "restored from backup {} by restore {} ({bytes}, volume {} of pod {})",
        helper.backup.unwrap_or("(unknown)"),
        helper.restore,
        volume.volume,
        helper.pod.name()
    )
}

/// The Warning for a volume that failed to restore.
pub fn failed_message(
    helper: &RestoreHelper<'_>,
    volume: &VolumeOutcome<'_>,
    until: Option<Timestamp>,
) -> String {
    let kept = until.map_or(String::new(), |u| {
        format!(
            "; restore helper {} is kept until {u} for inspection (kubectl describe pod {})",
            helper.pod.name(),
            helper.pod.name()
        )
    });
    format!(
        "restore {} of backup {} did not restore volume {} ({}): {}{kept}",
        helper.restore,
        helper.backup.unwrap_or("(unknown)"),
        volume.volume,
        volume.phase.unwrap_or("unfinished when the Restore ended"),
        volume.message.unwrap_or("no message from Velero"),
    )
}

fn is_restore_helper(pod: &PodRecord) -> bool {
    pod.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
        && pod.label(names::COMPONENT) == Some(names::RESTORE_HELPER)
}

/// A label of one of our own pods (all of whose labels the record keeps).
fn own_label<'a>(pod: &'a PodRecord, key: &str) -> Option<&'a str> {
    pod.own_pod_labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
