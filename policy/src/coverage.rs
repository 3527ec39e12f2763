//! Which user claims a Backup covers, and why not (`velero-jupyterhub
//! backup`). Two moments: before the Backup, who holds each user claim and whether it is
//! ready ([`claim_states`]); after it, what Velero made of each ([`outcomes`]).
//!
//! Velero's part (pkg/podvolume/backupper.go, v1.18): a volume is backed up only through
//! a Running pod that mounts it and names it in `backup.velero.io/backup-volumes`; each
//! gets a PodVolumeBackup labelled `velero.io/backup-name` and `velero.io/pvc-uid`,
//! annotated `velero.io/pvc-name`, whose `spec.pod` is the pod it was read through.

use crate::claims::ClaimGlobs;
use crate::names;
use crate::plan::ClaimView;
use crate::pod::PodFacts;
use crate::record::PodRecord;
use crate::velero;

/// Who mounts a user claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The claim is not Bound: there is no volume to mount.
    NotBound,
    /// No pod mounts it.
    Nobody,
    /// A pod mounts it: our backup helper, or anything else (the user's server).
    Pod {
        name: String,
        helper: bool,
        phase: Option<String>,
    },
}

/// One user claim and its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimState {
    pub claim: String,
    pub uid: String,
    pub holder: Holder,
}

impl ClaimState {
    /// Nothing more to wait for: a Running pod holds it, or it can never be mounted.
    pub fn ready(&self) -> bool {
        match &self.holder {
            Holder::NotBound => true,
            Holder::Nobody => false,
            Holder::Pod { phase, .. } => phase.as_deref() == Some("Running"),
        }
    }

    /// What it is waiting for, when not ready.
    pub fn waiting_for(&self) -> Option<String> {
        match &self.holder {
            _ if self.ready() => None,
            Holder::Pod { name, phase, .. } => Some(format!(
                "{name} to run (it is {})",
                phase.as_deref().unwrap_or("not scheduled")
            )),
            _ => Some("a backup helper".to_owned()),
        }
    }
}

/// The user claims of one namespace (those its globs match), by name, and who holds each.
/// A live pod other than a helper wins over a helper (the user always wins), a Running
/// one over one that is not.
pub fn claim_states(
    globs: &ClaimGlobs,
    claims: &[ClaimView<'_>],
    pods: &[&PodRecord],
) -> Vec<ClaimState> {
    let mut out: Vec<ClaimState> = claims
        .iter()
        .filter(|c| globs.matches(c.name))
        .map(|c| {
            let holder = if !c.bound {
                Holder::NotBound
            } else {
                pods.iter()
                    .filter(|p| p.namespace() == c.namespace && !p.is_stopped())
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| p.volumes().any(|(_, claim)| claim == Some(c.name)))
                    .map(|p| {
                        let helper = p.label(names::COMPONENT) == Some(names::BACKUP_HELPER)
                            && p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US);
                        (!helper, p.phase() == Some("Running"), *p, helper)
                    })
                    .max_by_key(|(user, running, ..)| (*user, *running))
                    .map_or(Holder::Nobody, |(_, _, p, helper)| Holder::Pod {
                        name: p.name().to_owned(),
                        helper,
                        phase: p.phase.clone(),
                    })
            };
            ClaimState {
                claim: c.name.to_owned(),
                uid: c.uid.to_owned(),
                holder,
            }
        })
        .collect();
    out.sort_by(|a, b| a.claim.cmp(&b.claim));
    out
}

/// A copy of a claim in the Backup, as the outcome needs it: a PodVolumeBackup (through
/// a pod), or a DataUpload (the CSI data mover's, with no pod: `data_mover`).
#[derive(Clone, Copy, Debug)]
pub struct PvbFacts<'a> {
    pub name: &'a str,
    pub data_mover: bool,
    /// Its `velero.io/pvc-uid` label.
    pub pvc_uid: Option<&'a str>,
    /// Its `velero.io/pvc-name` annotation.
    pub pvc_name: Option<&'a str>,
    pub pod: &'a str,
    pub phase: Option<&'a str>,
    pub bytes_done: Option<i64>,
    pub message: Option<&'a str>,
}

impl PvbFacts<'_> {
    /// Where the copy was made from: `pod NAME`, or the data mover's DataUpload.
    pub fn source(&self) -> String {
        if self.data_mover {
            format!("the CSI data mover (DataUpload {})", self.name)
        } else {
            format!("pod {}", self.pod)
        }
    }
}

/// What a Backup made of one user claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `from`: [`PvbFacts::source`].
    BackedUp {
        from: String,
        bytes: Option<i64>,
    },
    NotBackedUp {
        reason: String,
    },
}

/// Each user claim's outcome, from who held it when the Backup started (`states`), the
/// Backup's final phase and its PodVolumeBackups. Velero restores only from a `Completed`
/// or `PartiallyFailed` Backup: from any other, nothing counts as backed up.
pub fn outcomes(
    states: &[ClaimState],
    backup_phase: &str,
    pvbs: &[PvbFacts<'_>],
) -> Vec<(String, Outcome)> {
    let restorable = matches!(backup_phase, "Completed" | "PartiallyFailed");
    states
        .iter()
        .map(|s| {
            let mine: Vec<&PvbFacts<'_>> = pvbs
                .iter()
                .filter(|p| match p.pvc_uid {
                    Some(uid) => uid == s.uid,
                    None => p.pvc_name == Some(s.claim.as_str()),
                })
                .collect();
            let completed = mine.iter().find(|p| p.phase == Some("Completed"));
            let outcome = match (completed, mine.last()) {
                (Some(p), _) if !restorable => Outcome::NotBackedUp {
                    reason: format!(
                        "copied from {}, but the Backup ended {backup_phase}: Velero restores nothing from it",
                        p.source()
                    ),
                },
                (Some(p), _) => Outcome::BackedUp {
                    from: p.source(),
                    bytes: p.bytes_done,
                },
                (None, Some(p)) => Outcome::NotBackedUp {
                    reason: format!(
                        "{} ended {}{}",
                        if p.data_mover {
                            format!("DataUpload {} of the CSI data mover", p.name)
                        } else {
                            format!("PodVolumeBackup {} through pod {}", p.name, p.pod)
                        },
                        p.phase.unwrap_or("without a phase"),
                        p.message.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                },
                (None, None) => Outcome::NotBackedUp {
                    reason: no_volume_backup(&s.holder),
                },
            };
            (s.claim.clone(), outcome)
        })
        .collect()
}

fn no_volume_backup(holder: &Holder) -> String {
    match holder {
        Holder::NotBound => "the claim is not Bound: no volume to back up".to_owned(),
        Holder::Nobody => {
            "no pod mounted it when the Backup started (no backup helper: is the controller running?)"
                .to_owned()
        }
        Holder::Pod { name, phase, .. } if phase.as_deref() != Some("Running") => format!(
            "pod {name} was {} when the Backup started: Velero backs up volumes of Running pods only",
            phase.as_deref().unwrap_or("not scheduled")
        ),
        Holder::Pod { name, .. } => format!(
            "Velero made no PodVolumeBackup for it (does pod {name} list it in {}?)",
            names::VELERO_BACKUP_VOLUMES
        ),
    }
}

/// `(terminal, total)` PodVolumeBackups, and the bytes done so far: the progress line.
pub fn progress(pvbs: &[PvbFacts<'_>]) -> (usize, usize, i64) {
    let done = pvbs
        .iter()
        .filter(|p| velero::pod_volume_backup_is_terminal(p.phase))
        .count();
    let bytes = pvbs.iter().filter_map(|p| p.bytes_done).sum();
    (done, pvbs.len(), bytes)
}
