//! `velero-jupyterhub restore`, the decisions: may the restore start, and what
//! happened to each claim?
//!
//! Velero restores a volume's files only through a pod it re-creates
//! (pkg/restore/restore.go creates PodVolumeRestores only for a pod it created, never for
//! one that already existed), and writes them into whatever claim the pod mounts: an
//! existing claim is not replaced, the backed-up files are written over it
//! (pkg/uploader/kopia/snapshot.go restores with `OverwriteFiles`, `OverwriteDirectories`:
//! same-named files are replaced, newer files stay). So before a restore:
//! - a user's server that runs would keep its pod (and its volumes) from being re-created;
//! - a pod with the name of one in the Backup would be skipped, silently;
//! - an existing claim would get the backup merged into it: only with an explicit flag.

use std::collections::BTreeSet;
use std::fmt;

use crate::velero;

/// Which users a restore is for: the named ones, or (empty) every user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Users(pub Vec<String>);

impl Users {
    /// Whether an object with this `hub.jupyter.org/username` label is restored.
    pub fn selects(&self, username: Option<&str>) -> bool {
        match username {
            None => false,
            Some(u) => self.0.is_empty() || self.0.iter().any(|s| s == u),
        }
    }
}

/// A pod in the namespace now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNow<'a> {
    pub name: &'a str,
    pub username: Option<&'a str>,
    /// A JupyterHub user server (not one re-created by a restore).
    pub user_server: bool,
    pub stopped: bool,
}

/// A claim in the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimNow<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub username: Option<&'a str>,
}

/// A PodVolumeBackup of the Backup, for a pod of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvbOfBackup<'a> {
    pub pod: &'a str,
    pub volume: &'a str,
    /// Its `velero.io/pvc-name` annotation.
    pub claim: Option<&'a str>,
    pub phase: Option<&'a str>,
}

/// Why a restore may not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The user's server runs: stop it first (from the hub's admin page).
    ServerRunning { pod: String, user: String },
    /// A pod with the name of one the Backup holds exists: Velero would not re-create it,
    /// so its volumes would not be restored.
    PodExists { pod: String },
    /// The claim exists: the backup would be written over it (`--into-existing`), or it
    /// must be deleted first for an exact restore.
    ClaimExists { claim: String },
    /// A claim the restore does not re-create (no username label of a selected user, e.g.
    /// a second per-user claim) exists, and a re-created pod restores a volume into it:
    /// Velero would write over it, and would not re-create it if it were deleted.
    MountedClaimExists { claim: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServerRunning { pod, user } => write!(
                f,
                "user {user}'s server {pod} is running: stop it first (JupyterHub admin page, or `jupyterhub` API), then run restore again"
            ),
            Self::PodExists { pod } => write!(
                f,
                "pod {pod} exists: Velero would not re-create it and would not restore its volumes; delete it (or wait for the backup window to close, if it is a backup helper)"
            ),
            Self::ClaimExists { claim } => write!(
                f,
                "claim {claim} exists: Velero would write the backup's files over its current files (same-named files replaced, newer files kept); pass --into-existing for that, or delete the claim first for an exact restore"
            ),
            Self::MountedClaimExists { claim } => write!(
                f,
                "claim {claim} exists and a pod this restore re-creates restores a volume into it: Velero would write the backup's files over its current files; pass --into-existing for that. The restore does not re-create it (only claims labelled {} with a selected user), so for an exact restore delete it and create it again, empty, with the same name and spec",
                crate::names::JUPYTERHUB_USERNAME
            ),
        }
    }
}

/// What must hold before a restore of `users` from a Backup with `pvbs` starts, given the
/// namespace's `pods` and `claims` now.
pub fn preflight(
    users: &Users,
    pods: &[PodNow<'_>],
    claims: &[ClaimNow<'_>],
    pvbs: &[PvbOfBackup<'_>],
    into_existing: bool,
) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    for pod in pods {
        if pod.user_server && !pod.stopped && users.selects(pod.username) {
            refusals.push(Refusal::ServerRunning {
                pod: pod.name.to_owned(),
                user: pod.username.unwrap_or_default().to_owned(),
            });
        }
    }
    let restored_pods = restored_pods(users, claims, pvbs);
    for pod in pods {
        let running_server = refusals
            .iter()
            .any(|r| matches!(r, Refusal::ServerRunning { pod: p, .. } if p == pod.name));
        if restored_pods.contains(pod.name) && !running_server {
            refusals.push(Refusal::PodExists {
                pod: pod.name.to_owned(),
            });
        }
    }
    if !into_existing {
        // A claim without the username label (e.g. a second per-user claim) is not
        // re-created by Velero, but a re-created pod that mounts it still has its volume
        // restored into it: Velero writes over it as over any existing claim.
        let written = written_claims(users, claims, pvbs);
        for claim in claims {
            let name = claim.name.to_owned();
            if users.selects(claim.username) {
                refusals.push(Refusal::ClaimExists { claim: name });
            } else if written.contains(claim.name) {
                refusals.push(Refusal::MountedClaimExists { claim: name });
            }
        }
    }
    refusals
}

/// The Backup's pods that restore the selected users' claims (a claim not in the cluster
/// now belongs to whom its restored labels say: Velero's selector decides).
fn restored_pods<'a>(
    users: &Users,
    claims: &[ClaimNow<'_>],
    pvbs: &[PvbOfBackup<'a>],
) -> BTreeSet<&'a str> {
    pvbs.iter()
        .filter(|p| {
            p.claim.is_none_or(|c| {
                claims
                    .iter()
                    .find(|claim| claim.name == c)
                    .is_none_or(|claim| users.selects(claim.username))
            })
        })
        .map(|p| p.pod)
        .collect()
}

/// The claims a restore of `users` from a Backup with `pvbs` writes into: those the pods
/// it re-creates restore (recorded on the namespace first, so that no one else mounts
/// them meanwhile: `policy::restoring`).
pub fn written_claims<'a>(
    users: &Users,
    claims: &[ClaimNow<'_>],
    pvbs: &[PvbOfBackup<'a>],
) -> BTreeSet<&'a str> {
    let pods = restored_pods(users, claims, pvbs);
    pvbs.iter()
        .filter(|p| pods.contains(p.pod))
        .filter_map(|p| p.claim)
        .collect()
}

/// A PodVolumeRestore of the Restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvrOfRestore<'a> {
    /// Its `velero.io/pvc-uid` label: the claim it writes to.
    pub claim_uid: Option<&'a str>,
    pub phase: Option<&'a str>,
    pub bytes_done: Option<i64>,
    pub message: Option<&'a str>,
}

/// What happened to one claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    Restored {
        bytes: Option<i64>,
    },
    /// Still being restored (the command stopped following first).
    InProgress,
    Failed {
        reason: String,
    },
}

/// One row per claim of the selected users, after (or while) Restore `restore` of
/// `backup` runs: the claims there are now, and the ones the Backup holds data of.
pub fn outcomes(
    users: &Users,
    claims: &[ClaimNow<'_>],
    pvbs: &[PvbOfBackup<'_>],
    pvrs: &[PvrOfRestore<'_>],
    restore_phase: Option<&str>,
    backup: &str,
    restore: &str,
) -> Vec<(String, ClaimOutcome)> {
    let over = velero::restore_is_terminal(restore_phase);
    let mut rows: Vec<(String, ClaimOutcome)> = Vec::new();
    for claim in claims.iter().filter(|c| users.selects(c.username)) {
        let mine: Vec<&PvrOfRestore<'_>> = pvrs
            .iter()
            .filter(|p| p.claim_uid == Some(claim.uid))
            .collect();
        let in_backup = pvbs
            .iter()
            .any(|p| p.claim == Some(claim.name) && p.phase == Some("Completed"));
        let outcome = if let Some(failed) = mine
            .iter()
            .find(|p| matches!(p.phase, Some("Failed" | "Canceled")))
        {
            ClaimOutcome::Failed {
                reason: format!(
                    "PodVolumeRestore {}: {}",
                    failed.phase.unwrap_or_default(),
                    failed.message.unwrap_or("no message")
                ),
            }
        } else if !mine.is_empty() && mine.iter().all(|p| p.phase == Some("Completed")) {
            let bytes = mine.iter().map(|p| p.bytes_done).sum::<Option<i64>>();
            ClaimOutcome::Restored { bytes }
        } else if !mine.is_empty() && !over {
            ClaimOutcome::InProgress
        } else if !mine.is_empty() {
            ClaimOutcome::Failed {
                reason: format!(
                    "restore {restore} ended {} before its PodVolumeRestore did",
                    restore_phase.unwrap_or("")
                ),
            }
        } else if !in_backup {
            ClaimOutcome::Failed {
                reason: format!(
                    "backup {backup} holds no file-system copy of it (no Completed PodVolumeBackup): nothing to restore"
                ),
            }
        } else if over {
            ClaimOutcome::Failed {
                reason: format!(
                    "Velero restored no data into it (no PodVolumeRestore): see `velero restore describe {restore} --details`"
                ),
            }
        } else {
            ClaimOutcome::InProgress
        };
        rows.push((claim.name.to_owned(), outcome));
    }
    // Claims the Backup holds data of that are not here (not re-created).
    for pvb in pvbs.iter().filter(|p| p.phase == Some("Completed")) {
        let Some(name) = pvb.claim else { continue };
        if users.0.is_empty() && !rows.iter().any(|(c, _)| c == name) && over {
            rows.push((
                name.to_owned(),
                ClaimOutcome::Failed {
                    reason: format!("restore {restore} did not re-create the claim"),
                },
            ));
        }
    }
    // A user asked for with no claim at all: say so (a misspelt name, or nothing of
    // theirs in the Backup), rather than print nothing.
    for user in &users.0 {
        let has_claim = claims.iter().any(|c| c.username == Some(user.as_str()));
        if !has_claim && over {
            rows.push((
                format!("(user {user})"),
                ClaimOutcome::Failed {
                    reason: format!(
                        "no claim labelled {}={user} after the restore: backup {backup} holds none of theirs, or the name is not their label value",
                        crate::names::JUPYTERHUB_USERNAME
                    ),
                },
            ));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|a, b| a.0 == b.0);
    rows
}

/// A Backup as `restore --from-schedule` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupOf<'a> {
    pub name: &'a str,
    pub phase: Option<&'a str>,
    /// `status.startTimestamp` (kept by Velero's backup sync), else its creation.
    pub started: Option<jiff::Timestamp>,
    /// Its `velero.io/schedule-name` label: a Schedule's own Backup.
    pub schedule: Option<&'a str>,
    /// Its `velero-jupyterhub.io/wave-of` label: a wave Backup of that tick.
    pub wave_of: Option<&'a str>,
    /// Its `velero-jupyterhub.io/wave-schedule` label (wave Backups made before
    /// `wave-of` existed are matched by name instead).
    pub wave_schedule: Option<&'a str>,
}

/// The Backups of one tick of a Schedule: its own, and the waves that followed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick<'a> {
    pub backup: &'a str,
    pub waves: Vec<&'a str>,
    /// Wave Backups of the tick that Velero cannot restore from (they failed): their
    /// claims come back empty, and the rows will say so.
    pub failed_waves: Vec<&'a str>,
}

/// The newest tick of Schedule `schedule` at or before `at` whose own Backup can be
/// restored from (Completed or PartiallyFailed, as `--from-backup` takes), with the wave
/// Backups of the same tick: labelled `velero-jupyterhub.io/wave-of` with its name (the
/// label form), or, made before that label, named `<schedule>-wave<N>-<its timestamp>`.
/// Velero's own `restore create --from-schedule` takes the Schedule's Backup alone
/// (pkg/controller/restore_controller.go), so wave users' homes would be missing.
pub fn schedule_tick<'a>(
    schedule: &str,
    at: Option<jiff::Timestamp>,
    backups: &[BackupOf<'a>],
) -> Result<Tick<'a>, String> {
    let restorable = |b: &BackupOf<'_>| matches!(b.phase, Some("Completed" | "PartiallyFailed"));
    let label = velero::label_value(schedule);
    let own = backups
        .iter()
        .filter(|b| b.schedule == Some(label.as_ref()) && restorable(b))
        .filter(|b| at.is_none_or(|at| b.started.is_some_and(|s| s <= at)))
        .max_by_key(|b| (b.started, b.name))
        .ok_or_else(|| {
            format!(
                "no Completed or PartiallyFailed Backup of Schedule {schedule}{} (Backups labelled velero.io/schedule-name={label}: `velero backup get --selector velero.io/schedule-name={label}`)",
                at.map(|t| format!(" at or before {t}")).unwrap_or_default()
            )
        })?;
    let own_label = velero::label_value(own.name);
    let stamp = own.name.strip_prefix(&format!("{schedule}-"));
    let of_this_tick = |b: &&BackupOf<'a>| {
        b.wave_of == Some(own_label.as_ref())
            || (b.wave_of.is_none()
                && b.wave_schedule == Some(label.as_ref())
                && stamp.is_some_and(|stamp| {
                    b.name
                        .strip_prefix(&format!("{schedule}-wave"))
                        .and_then(|rest| rest.split_once('-'))
                        .is_some_and(|(n, ts)| {
                            !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) && ts == stamp
                        })
                }))
    };
    let mut waves: Vec<&BackupOf<'a>> = backups.iter().filter(of_this_tick).collect();
    waves.sort_by_key(|b| b.name);
    Ok(Tick {
        backup: own.name,
        waves: waves
            .iter()
            .filter(|b| restorable(b))
            .map(|b| b.name)
            .collect(),
        failed_waves: waves
            .iter()
            .filter(|b| !restorable(b))
            .map(|b| b.name)
            .collect(),
    })
}

/// One Restore of a restore made of several (a tick's Backups), as followed.
pub struct RestoreOf<'a> {
    pub backup: &'a str,
    pub restore: &'a str,
    pub phase: Option<&'a str>,
    pub pvbs: Vec<PvbOfBackup<'a>>,
    pub pvrs: Vec<PvrOfRestore<'a>>,
}

/// One row per claim over several Restores: each claim's row comes from the Restore of
/// the Backup that holds its data (else from the first, which says there is none).
pub fn outcomes_of_many(
    users: &Users,
    claims: &[ClaimNow<'_>],
    restores: &[RestoreOf<'_>],
) -> Vec<(String, ClaimOutcome)> {
    let mut rows: Vec<(String, ClaimOutcome, bool)> = Vec::new();
    for r in restores {
        let part = outcomes(
            users, claims, &r.pvbs, &r.pvrs, r.phase, r.backup, r.restore,
        );
        for (claim, outcome) in part {
            let holds = r
                .pvbs
                .iter()
                .any(|p| p.claim == Some(claim.as_str()) && p.phase == Some("Completed"));
            match rows.iter_mut().find(|(c, _, _)| *c == claim) {
                None => rows.push((claim, outcome, holds)),
                Some(row) if holds && !row.2 => *row = (claim, outcome, holds),
                Some(_) => {}
            }
        }
    }
    rows.into_iter().map(|(c, o, _)| (c, o)).collect()
}
