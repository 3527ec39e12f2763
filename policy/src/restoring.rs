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
//! - a Restore that is not over and re-creates pods covers its namespace, and its Backup
//!   holds a PodVolumeBackup of the claim (Velero will re-create the pod that restores
//!   it), unless the claim is there now and the Restore will not write into it (its label
//!   selector leaves the user out, or it neither made the claim nor updates what
//!   exists); a Restore is seen `New` before Velero restores anything, so this holds from
//!   the start (one made `--from-schedule` is read as the Backup Velero will take);
//! - it carries the `velero.io/restore-name` of a Restore that is not over (Velero made
//!   or updated it);
//! - a restore helper of ours mounts it (until the controller deletes the helper);
//! - `velero-jupyterhub restore` listed it on the namespace just before creating its
//!   Restores (`velero-jupyterhub.io/restoring-restores`), so that the guard holds before
//!   the controller has seen them: until they are all over, while one of them is under
//!   way, and for [`COMMAND_GRACE`] from `velero-jupyterhub.io/restoring-since` (it
//!   creates the first right after listing, the next ones as Velero finishes each).

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
    /// Its `includedResources` and `excludedResources`.
    pub included_resources: &'a [String],
    pub excluded_resources: &'a [String],
    /// `existingResourcePolicy: update`: it may write into claims that exist.
    pub updates_existing: bool,
}

impl RestoreSpecView<'_> {
    /// Whether it re-creates pods (Velero restores a volume only through a pod it
    /// re-creates): its resource includes and excludes, as Velero reads them (`*` or
    /// empty: everything; plural names, with or without their group).
    pub fn restores_pods(&self) -> bool {
        let pods = |r: &String| matches!(r.as_str(), "*" | "pods" | "pod");
        !self.excluded_resources.iter().any(pods)
            && (self.included_resources.is_empty() || self.included_resources.iter().any(pods))
    }

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
    for restore in active.iter().filter(|r| r.restores_pods()) {
        let backup = velero::label_value(restore.backup);
        for pvb in input.backed_up.iter().filter(|p| p.backup == backup) {
            let Some(target) = restore.target(pvb.pod_namespace) else {
                continue;
            };
            let Some(ns) = input.namespaces.iter().find(|n| **n == target) else {
                continue;
            };
            // A claim there now is not concerned if the Restore's selector leaves its user
            // out, or if the Restore will not write into it (it did not make it and does
            // not update what exists: our webhook refuses the pod that would, and a
            // backup helper's name taken then only meets a refused pod). One not there is:
            // Velero may re-create it.
            let label = velero::label_value(restore.name);
            let concerned = input
                .claims
                .iter()
                .find(|c| c.namespace == *ns && c.name == pvb.claim)
                .is_none_or(|c| {
                    restore.may_select_user(c.username)
                        && (restore.updates_existing || c.restore == Some(label.as_ref()))
                });
            if concerned {
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
    let phase_of = |name: &str| input.restores.iter().find(|r| r.name == name);
    for listed in input.listed {
        let fresh = listed.until().is_some_and(|until| input.now < until);
        // Its Restores: all over, or one under way (the command creates them one after
        // the other, as Velero finishes the previous).
        let all_over = !listed.restores.is_empty()
            && listed
                .restores
                .iter()
                .all(|r| phase_of(r).is_some_and(|r| !r.in_progress()));
        let one_under_way = listed
            .restores
            .iter()
            .any(|r| phase_of(r).is_some_and(RestoreSpecView::in_progress));
        if !all_over && (fresh || one_under_way) {
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
