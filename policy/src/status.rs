//! `velero-jupyterhub status`: is every user's home in a recent
//! backup? One row per user claim: who holds it now, and its last completed file-system
//! backup.
//!
//! Velero's part (v1.18): a claim's volume is in a Backup when a PodVolumeBackup of that
//! Backup copied it: `velero.io/backup-name` label, `velero.io/pvc-name` annotation,
//! `spec.pod.namespace` (pkg/podvolume/backupper.go), `Completed` with a
//! `completionTimestamp`. Velero restores nothing from a Backup that ended `Failed`, so
//! only Backups that are `Completed` or `PartiallyFailed` count.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};

use crate::claims::ClaimGlobs;
use crate::names;
use crate::plan::ClaimView;
use crate::pod::PodFacts;
use crate::record::PodRecord;

/// Who holds a user claim now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The user's server (or any pod that is not ours) mounts it.
    Live,
    /// No pod mounts it: backed up only through a backup helper in a window.
    Idle,
    /// Our backup helper mounts it.
    BackupHelper,
    /// A restore helper mounts it: Velero is restoring it.
    Restoring,
}

impl Holder {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Idle => "idle",
            Self::BackupHelper => "backup-helper",
            Self::Restoring => "restoring",
        }
    }
}

/// A claim's last completed file-system backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastBackup {
    pub at: Timestamp,
    pub backup: String,
    pub bytes: Option<i64>,
}

/// One user claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub namespace: String,
    pub claim: String,
    pub user: Option<String>,
    pub holder: Holder,
    pub last: Option<LastBackup>,
    /// Never backed up, or last backed up longer than `stale_after` ago.
    pub stale: bool,
    /// How Velero copies it when not through a pod (the data mover, a snapshot, a skip),
    /// and under which Schedule.
    pub copied_by: Option<CopiedBy>,
}

/// A claim Velero copies some other way than through a pod, under `schedule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiedBy {
    pub schedule: String,
    pub path: crate::datapath::DataPath,
    /// What to say about it (names the resource policies ConfigMap, if that decided).
    pub detail: String,
}

/// A completed copy of a claim, as the status reads it: a Completed PodVolumeBackup, or
/// a Completed DataUpload of the CSI snapshot data mover.
#[derive(Clone, Copy, Debug)]
pub struct PvbDone<'a> {
    pub backup: &'a str,
    pub pod_namespace: &'a str,
    /// Its `velero.io/pvc-name` annotation.
    pub claim: &'a str,
    pub completed: Timestamp,
    pub bytes: Option<i64>,
}

/// The rows for `claims` (only those their namespace's globs match; `globs` gives them by
/// namespace, `None`: not opted in, skipped), given the pods, the Completed
/// PodVolumeBackups and the Backups that can be restored from (by name); `copied_by`
/// says how Velero copies a claim when not through a pod.
#[allow(clippy::too_many_arguments)]
pub fn rows(
    globs: impl Fn(&str) -> Option<std::sync::Arc<ClaimGlobs>>,
    claims: &[ClaimView<'_>],
    pods: &[&PodRecord],
    pvbs: &[PvbDone<'_>],
    restorable: impl Fn(&str) -> bool,
    copied_by: impl Fn(&ClaimView<'_>) -> Option<CopiedBy>,
    now: Timestamp,
    stale_after: SignedDuration,
) -> Vec<Row> {
    // (namespace, claim) → who holds it.
    let mut holders: HashMap<(&str, &str), Holder> = HashMap::new();
    for pod in pods.iter().copied() {
        if pod.is_stopped() || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ours = pod.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US);
        let holder = match pod.label(names::COMPONENT) {
            Some(names::RESTORE_HELPER) if ours => Holder::Restoring,
            Some(names::BACKUP_HELPER) if ours => Holder::BackupHelper,
            _ => Holder::Live,
        };
        for claim in pod.volumes().filter_map(|(_, claim)| claim) {
            // Several pods on one claim: the row shows the one that matters most.
            let entry = holders.entry((pod.namespace(), claim)).or_insert(holder);
            *entry = strongest(*entry, holder);
        }
    }
    let mut last: HashMap<(&str, &str), &PvbDone<'_>> = HashMap::new();
    for p in pvbs.iter().filter(|p| restorable(p.backup)) {
        let entry = last.entry((p.pod_namespace, p.claim)).or_insert(p);
        if p.completed > entry.completed {
            *entry = p;
        }
    }
    let mut out: Vec<Row> = claims
        .iter()
        .filter(|c| globs(c.namespace).is_some_and(|g| g.matches(c.name)))
        .map(|c| {
            let key = (c.namespace, c.name);
            let last = last.get(&key).map(|p| LastBackup {
                at: p.completed,
                backup: p.backup.to_owned(),
                bytes: p.bytes,
            });
            let stale = last
                .as_ref()
                .is_none_or(|l| now.duration_since(l.at) > stale_after);
            Row {
                namespace: c.namespace.to_owned(),
                claim: c.name.to_owned(),
                user: c.username.map(str::to_owned),
                holder: holders.get(&key).copied().unwrap_or(Holder::Idle),
                last,
                stale,
                copied_by: copied_by(c),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.claim).cmp(&(&b.namespace, &b.claim)));
    out
}

/// The newest restorable Backup holding one of `claims` of `namespace` (a Completed
/// PodVolumeBackup of it): what `restore --latest` restores a user from. Any Backup
/// counts: a Schedule's own, a wave's, one of `velero-jupyterhub backup`.
pub fn newest_backup_of(
    pvbs: &[PvbDone<'_>],
    restorable: impl Fn(&str) -> bool,
    namespace: &str,
    claims: &[&str],
) -> Option<LastBackup> {
    pvbs.iter()
        .filter(|p| p.pod_namespace == namespace && claims.contains(&p.claim))
        .filter(|p| restorable(p.backup))
        .max_by_key(|p| (p.completed, p.backup))
        .map(|p| LastBackup {
            at: p.completed,
            backup: p.backup.to_owned(),
            bytes: p.bytes,
        })
}

/// Of two pods on one claim, the one the row shows: a restore above all (the user cannot
/// start), then the user's server, then our helper.
fn strongest(a: Holder, b: Holder) -> Holder {
    let rank = |h: Holder| match h {
        Holder::Restoring => 3,
        Holder::Live => 2,
        Holder::BackupHelper => 1,
        Holder::Idle => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}
