//! SPEC 3.1: which volumes of a live JupyterHub user pod Velero must back up.
//!
//! Velero's file-system backup copies a pod volume only when it is named in
//! `backup.velero.io/backup-volumes`, mounted by a regular container and the pod is
//! running; anything else is skipped silently. So every user pod must carry the
//! annotation, naming every user-claim volume it mounts. We read the volumes from the
//! pod (never recompute names from usernames) and only ever add to the list.

use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};

use super::namespace::NamespaceScope;
use super::pod::PodView;
use super::volume_list;
use crate::names;

/// Why the pod as a whole was or was not annotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveVerdict {
    /// New volumes are added to the annotation.
    Annotate,
    /// Every user-claim volume is already listed, or the pod mounts none: no patch.
    NothingToAdd,
    /// `velero-jupyterhub.io/skip=true`.
    Skipped,
    /// The namespace is known and not opted in.
    NotOptedIn,
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
            Self::NotOptedIn => "not_opted_in",
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
    /// The JSON patch to return (only with [`LiveVerdict::Annotate`]).
    pub patch: Option<Patch>,
}

impl LiveDecision<'_> {
    fn unchanged(verdict: LiveVerdict) -> Self {
        Self {
            verdict,
            volumes: Vec::new(),
            new_value: None,
            patch: None,
        }
    }
}

/// Decides for one pod at CREATE. `scope` is what we know of the pod's namespace.
pub fn decide_live<'p>(pod: &'p PodView<'_>, scope: &NamespaceScope) -> LiveDecision<'p> {
    if pod.label(names::VELERO_RESTORE_NAME).is_some() {
        return LiveDecision::unchanged(LiveVerdict::Restored);
    }
    if pod.label(names::JUPYTERHUB_COMPONENT) != Some(names::SINGLEUSER_SERVER) {
        return LiveDecision::unchanged(LiveVerdict::NotUserServer);
    }
    let globs = match scope {
        NamespaceScope::OptedIn(globs) => globs,
        NamespaceScope::NotOptedIn => return LiveDecision::unchanged(LiveVerdict::NotOptedIn),
    };
    if pod
        .annotation(names::POD_SKIP)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return LiveDecision::unchanged(LiveVerdict::Skipped);
    }

    let listed = pod.annotation(names::VELERO_BACKUP_VOLUMES);
    let excluded = pod
        .annotation(names::VELERO_BACKUP_VOLUMES_EXCLUDES)
        .unwrap_or("");
    let mut volumes = Vec::with_capacity(pod.volumes().len());
    let mut additions: Vec<&str> = Vec::new();
    for v in pod.volumes() {
        let name: &str = &v.name;
        let claim = v.persistent_volume_claim.as_ref().map(|c| &*c.claim_name);
        let reason = match claim {
            None => VolumeReason::NotPvc,
            Some(claim) => {
                if !pod.containers().iter().any(|c| c.mounts(name)) {
                    if pod.init_containers().iter().any(|c| c.mounts(name)) {
                        VolumeReason::InitContainersOnly
                    } else {
                        VolumeReason::NotMounted
                    }
                } else if !globs.matches(claim) {
                    VolumeReason::ClaimNotMatched
                } else if volume_list::contains(excluded, name) {
                    VolumeReason::Excluded
                } else if listed.is_some_and(|l| volume_list::contains(l, name))
                    || additions.contains(&name)
                {
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

    if additions.is_empty() {
        return LiveDecision {
            verdict: LiveVerdict::NothingToAdd,
            volumes,
            new_value: None,
            patch: None,
        };
    }
    let value = volume_list::append(listed, &additions);
    let patch = set_annotation_patch(
        pod.has_annotations_map(),
        listed.is_some(),
        names::VELERO_BACKUP_VOLUMES,
        &value,
    );
    LiveDecision {
        verdict: LiveVerdict::Annotate,
        volumes,
        new_value: Some(value),
        patch: Some(patch),
    }
}

/// A JSON patch that sets one annotation. With no annotations map the whole map must be
/// added (a patch to `/metadata/annotations/<key>` would fail); keys are escaped per
/// RFC 6901 (`/` becomes `~1`) by `jsonptr`.
pub fn set_annotation_patch(has_map: bool, has_key: bool, key: &str, value: &str) -> Patch {
    let op = if !has_map {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: serde_json::json!({ key: value }),
        })
    } else if has_key {
        PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", key]),
            value: value.into(),
        })
    } else {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", key]),
            value: value.into(),
        })
    };
    Patch(vec![op])
}
