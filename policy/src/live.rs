//! Which volumes of a live JupyterHub user pod Velero must back up.
//!
//! Velero's file-system backup copies a pod volume only when it is named in
//! `backup.velero.io/backup-volumes`, mounted by a regular container and the pod is
//! running; anything else is skipped silently. So every user pod must carry the
//! annotation, naming every user-claim volume it mounts. We read the volumes from the
//! pod (never recompute names from usernames) and only ever add to the list.

use std::collections::BTreeSet;
use std::fmt;

use crate::claims::ClaimGlobs;
use crate::pod::{NameSet, PodFacts};
use crate::{names, volume_list};

/// Why the pod as a whole was or was not annotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveVerdict {
    /// New volumes are added to the annotation.
    Annotate,
    /// Every user-claim volume is already listed, or the pod mounts none: no patch.
    NothingToAdd,
    /// `velero-jupyterhub.io/skip=true`.
    Skipped,
    /// Not a JupyterHub user server (`component=singleuser-server` missing).
    NotUserServer,
    /// Re-created by a Velero restore (`velero.io/restore-name`): the restore path's job.
    Restored,
}

impl LiveVerdict {
    /// A stable, low-cardinality name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Annotate => "annotated",
            Self::NothingToAdd => "nothing_to_add",
            Self::Skipped => "skipped",
            Self::NotUserServer => "not_user_server",
            Self::Restored => "restored_pod",
        }
    }
}

/// Why one volume was or was not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeReason {
    /// Added to the annotation by this decision.
    Added,
    /// Already in the annotation.
    AlreadyListed,
    /// Not a persistentVolumeClaim volume.
    NotPvc,
    /// A PVC, but mounted only by init containers: Velero would skip it.
    InitContainersOnly,
    /// A PVC no container mounts.
    NotMounted,
    /// The claim name matches none of the namespace's globs.
    ClaimNotMatched,
    /// Named in `backup.velero.io/backup-volumes-excludes`.
    Excluded,
}

impl VolumeReason {
    pub fn is_listed(self) -> bool {
        matches!(self, Self::Added | Self::AlreadyListed)
    }
}

impl fmt::Display for VolumeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Added => "added: user claim mounted by a regular container",
            Self::AlreadyListed => "already listed in backup.velero.io/backup-volumes",
            Self::NotPvc => "not listed: not a persistentVolumeClaim volume",
            Self::InitContainersOnly => {
                "not listed: mounted only by init containers (Velero backs up volumes of regular containers only)"
            }
            Self::NotMounted => "not listed: no container mounts it",
            Self::ClaimNotMatched => "not listed: claim name matches none of the namespace's claim globs",
            Self::Excluded => "not listed: named in backup.velero.io/backup-volumes-excludes",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeReport<'p> {
    pub volume: &'p str,
    pub claim: Option<&'p str>,
    pub reason: VolumeReason,
}

#[derive(Debug)]
pub struct LiveDecision<'p> {
    pub verdict: LiveVerdict,
    /// Per volume, in `spec.volumes` order (empty unless the volumes were examined).
    pub volumes: Vec<VolumeReport<'p>>,
    /// The annotation value after the change (only with [`LiveVerdict::Annotate`]).
    pub new_value: Option<String>,
    /// Whether the pod already had an annotations map: the edge needs it to render a
    /// change (a JSON patch adds the whole map when there is none).
    pub had_annotations_map: bool,
}

impl LiveDecision<'_> {
    fn unchanged(verdict: LiveVerdict) -> Self {
        Self {
            verdict,
            volumes: Vec::new(),
            new_value: None,
            had_annotations_map: false,
        }
    }
}

/// Decides for one pod, at CREATE (the webhook) or later (the reconciler's backfill):
/// which of its volumes `backup.velero.io/backup-volumes` must list. `globs` are its
/// namespace's claim globs. Being asked means the namespace is opted in.
pub fn decide_live<'p, P: PodFacts>(pod: &'p P, globs: &ClaimGlobs) -> LiveDecision<'p> {
    if pod.label(names::VELERO_RESTORE_NAME).is_some() {
        return LiveDecision::unchanged(LiveVerdict::Restored);
    }
    if pod.label(names::JUPYTERHUB_COMPONENT) != Some(names::SINGLEUSER_SERVER) {
        return LiveDecision::unchanged(LiveVerdict::NotUserServer);
    }
    if pod.annotation(names::POD_SKIP) == Some("true") {
        return LiveDecision::unchanged(LiveVerdict::Skipped);
    }

    let listed = pod.annotation(names::VELERO_BACKUP_VOLUMES);
    let excluded = pod
        .annotation(names::VELERO_BACKUP_VOLUMES_EXCLUDES)
        .unwrap_or("");
    // Every look-up below is in a set built once: the decision stays O(n log n) in the
    // pod's volumes, mounts and listed names, whatever a crafted pod holds.
    let mounted: NameSet = pod.container_mounts().collect();
    let init_mounted: NameSet = pod.init_container_mounts().collect();
    let excluded: NameSet = volume_list::entries(excluded).collect();
    let mut listed_or_added: BTreeSet<&str> = listed
        .map(volume_list::entries)
        .into_iter()
        .flatten()
        .collect();
    let mut volumes = Vec::with_capacity(pod.volumes().size_hint().0);
    let mut additions: Vec<&str> = Vec::new();
    for (name, claim) in pod.volumes() {
        let reason = match claim {
            None => VolumeReason::NotPvc,
            Some(claim) => {
                if !mounted.contains(name) {
                    if init_mounted.contains(name) {
                        VolumeReason::InitContainersOnly
                    } else {
                        VolumeReason::NotMounted
                    }
                } else if claim.len() > names::MAX_NAME_LEN || !globs.matches(claim) {
                    // A name longer than any claim can have (Kubernetes does not check it
                    // in a pod) is never one of ours, and is not glob-matched at any length.
                    VolumeReason::ClaimNotMatched
                } else if excluded.contains(name) {
                    VolumeReason::Excluded
                } else if !listed_or_added.insert(name) {
                    VolumeReason::AlreadyListed
                } else {
                    additions.push(name);
                    VolumeReason::Added
                }
            }
        };
        volumes.push(VolumeReport {
            volume: name,
            claim,
            reason,
        });
    }

    let (verdict, new_value) = if additions.is_empty() {
        (LiveVerdict::NothingToAdd, None)
    } else {
        let value = volume_list::append(listed, &additions);
        (LiveVerdict::Annotate, Some(value))
    };
    LiveDecision {
        verdict,
        volumes,
        new_value,
        had_annotations_map: pod.has_annotations_map(),
    }
}
