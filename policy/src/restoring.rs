//! Which claims are being restored, namespace by namespace: nothing else may take them
//! while Velero works on them. The controller starts no backup helper for them (a helper
//! named `vjh-backup-<claim>` would make Velero skip the pod of that name it re-creates,
//! and with it the volume's data: pkg/restore/restore.go warns `AlreadyExists` and makes
//! no PodVolumeRestore), deletes those it has, and records them on the namespace
//! (`velero-jupyterhub.io/restoring-claims`), where a ValidatingAdmissionPolicy refuses
//! any other pod that mounts them, inside the API server, whether or not our webhook is
//! up.
//!
//! A claim is being restored when
//! - a Restore that is not over covers its namespace, and its Backup holds a
//!   PodVolumeBackup of the claim (Velero will re-create the pod that restores it), unless
//!   the claim is there now with a user the Restore's label selector leaves out; a
//!   Restore is seen `New` before Velero restores anything, so this holds from the start;
//! - it carries the `velero.io/restore-name` of a Restore that is not over (Velero made
//!   or updated it);
//! - a restore helper of ours mounts it (until the controller deletes the helper);
//! - `velero-jupyterhub restore` listed it on the namespace just before creating its
//!   Restores (`velero-jupyterhub.io/restoring-restores`), so that the guard holds before
//!   the controller has seen them: until they are all over, or for [`COMMAND_GRACE`] from
//!   `velero-jupyterhub.io/restoring-since` (a Restore under way counts by itself).

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{names, selector, velero};

/// How long claims the `restore` command listed on a namespace count, with no Restore
/// seen for them yet (it creates its Restore right after listing them).
pub const COMMAND_GRACE: SignedDuration = SignedDuration::from_mins(2);

/// A Restore as this decision reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreSpecView<'a> {
    pub name: &'a str,
    pub backup: &'a str,
    pub phase: Option<&'a str>,
    pub included_namespaces: &'a [String],
    pub excluded_namespaces: &'a [String],
    pub namespace_mapping: &'a BTreeMap<String, String>,
    pub label_selector: Option<&'a LabelSelector>,
    pub or_label_selectors: &'a [LabelSelector],
}

impl RestoreSpecView<'_> {
    /// Whether it may restore an object whose `hub.jupyter.org/username` is `user` (only
    /// that label is known of a claim here; `velero-jupyterhub restore` selects by it):
    /// Velero takes an item matching `labelSelector`, or any of `orLabelSelectors`, or
    /// everything when neither is set (pkg/restore/restore.go).
    fn may_select_user(&self, user: Option<&str>) -> bool {
        let key = names::JUPYTERHUB_USERNAME;
        match (self.label_selector, self.or_label_selectors) {
            (None, []) => true,
            (Some(s), _) => selector::may_select(s, key, user),
            (None, any) => any.iter().any(|s| selector::may_select(s, key, user)),
        }
    }

    /// Whether Velero is (or will be) restoring: not in a terminal phase.
    pub fn in_progress(&self) -> bool {
        !velero::restore_is_terminal(self.phase)
    }

    /// The namespace objects of `source` are restored into, if this Restore covers it
    /// (pkg/restore/restore.go: includes/excludes by the source namespace, then the
    /// mapping).
    pub fn target<'s>(&'s self, source: &'s str) -> Option<&'s str> {
        velero::includes_namespace(self.included_namespaces, self.excluded_namespaces, source).then(
            || {
                self.namespace_mapping
                    .get(source)
                    .map_or(source, String::as_str)
            },
        )
    }
}

/// A PodVolumeBackup as this decision reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackedUpClaim<'a> {
    /// Its `velero.io/backup-name` label (the label form of the Backup's name).
    pub backup: &'a str,
    pub pod_namespace: &'a str,
    /// Its `velero.io/pvc-name` annotation.
    pub claim: &'a str,
}

/// A claim in the cluster as this decision reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelledClaim<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Its `velero.io/restore-name` label.
    pub restore: Option<&'a str>,
    /// Its `hub.jupyter.org/username` label.
    pub username: Option<&'a str>,
}

/// What `velero-jupyterhub restore` listed on a namespace, when, and for which Restores.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed<'a> {
    pub namespace: &'a str,
    pub claims: Vec<&'a str>,
    pub since: Option<Timestamp>,
    pub restores: Vec<&'a str>,
}

impl Listed<'_> {
    /// Until when its claims count, whatever the Restores say.
    pub fn until(&self) -> Option<Timestamp> {
        self.since
            .map(|s| s.saturating_add(COMMAND_GRACE).unwrap_or(s))
    }
}

/// Everything the decision reads: views (`'s`) of the objects (`'a`).
pub struct Input<'s, 'a> {
    /// The namespaces this applies to (opted in).
    pub namespaces: &'s [&'a str],
    pub restores: &'s [RestoreSpecView<'a>],
    pub backed_up: &'s [BackedUpClaim<'a>],
    pub claims: &'s [LabelledClaim<'a>],
    /// `(namespace, claim)` of every claim a restore helper of ours mounts.
    pub restore_helpers: &'s [(&'a str, &'a str)],
    pub listed: &'s [Listed<'a>],
    pub now: Timestamp,
}

/// The claims being restored, by namespace (only namespaces of `input.namespaces`; a
/// namespace with none is absent).
pub fn claims_being_restored<'a>(input: &Input<'_, 'a>) -> BTreeMap<&'a str, BTreeSet<&'a str>> {
    let mut out: BTreeMap<&'a str, BTreeSet<&'a str>> = BTreeMap::new();
    let ours = |ns: &str| input.namespaces.contains(&ns);
    let mut add = |ns: &'a str, claim: &'a str| {
        if ours(ns) {
            out.entry(ns).or_default().insert(claim);
        }
    };
    let active: Vec<&RestoreSpecView<'a>> =
        input.restores.iter().filter(|r| r.in_progress()).collect();
    for restore in &active {
        let backup = velero::label_value(restore.backup);
        for pvb in input.backed_up.iter().filter(|p| p.backup == backup) {
            let Some(target) = restore.target(pvb.pod_namespace) else {
                continue;
            };
            let Some(ns) = input.namespaces.iter().find(|n| **n == target) else {
                continue;
            };
            // A claim there now whose user the Restore's selector leaves out is not
            // concerned (one not there is: Velero may re-create it).
            let user_left_out = input
                .claims
                .iter()
                .find(|c| c.namespace == *ns && c.name == pvb.claim)
                .is_some_and(|c| !restore.may_select_user(c.username));
            if !user_left_out {
                add(ns, pvb.claim);
            }
        }
    }
    let active_labels: BTreeSet<std::borrow::Cow<'_, str>> =
        active.iter().map(|r| velero::label_value(r.name)).collect();
    for claim in input.claims {
        if claim.restore.is_some_and(|r| active_labels.contains(r)) {
            add(claim.namespace, claim.name);
        }
    }
    for &(ns, claim) in input.restore_helpers {
        add(ns, claim);
    }
    let over: BTreeSet<&str> = input
        .restores
        .iter()
        .filter(|r| !r.in_progress())
        .map(|r| r.name)
        .collect();
    for listed in input.listed {
        let fresh = listed.until().is_some_and(|until| input.now < until);
        let all_over =
            !listed.restores.is_empty() && listed.restores.iter().all(|r| over.contains(r));
        if fresh && !all_over {
            for claim in &listed.claims {
                add(listed.namespace, claim);
            }
        }
    }
    out
}

/// The annotation value for a set of claims: their names, sorted, comma-separated.
pub fn annotation_value<'a>(claims: impl IntoIterator<Item = &'a str>) -> String {
    let sorted: BTreeSet<&str> = claims.into_iter().collect();
    sorted.into_iter().collect::<Vec<_>>().join(",")
}

/// The claims an annotation value lists.
pub fn parse_annotation(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}
