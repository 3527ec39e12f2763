//! A pod Velero re-creates in a restore becomes a
//! restore helper: a pod whose only job is to let Velero's `restore-wait` init container
//! and node-agent fill its volumes, and that cannot start a stale notebook server.
//!
//! Velero's part (v1.18): `pkg/restore/restore.go` labels the pod `velero.io/restore-name`
//! before creating it; `pkg/restore/actions/pod_volume_restore_action.go` prepends the
//! `restore-wait` init container (legacy `restic-wait`), mounting at `/restores/<volume>`
//! exactly the volumes that have a PodVolumeBackup. The node-agent writes through the
//! pod's volume directory, so those volumes must be writable; nothing else of the pod is
//! needed, and anything else may keep it from starting (a claim not restored, a ConfigMap
//! not there yet, a custom scheduler not running yet). The priority class goes too (a
//! helper needs no priority; the API server checked the class before us).
//!
//! [`restore_helper`] is the whole conversion, from the pod as Velero sends it to the pod
//! to store; it is idempotent (converting a restore helper again changes nothing). The
//! admission edge turns the difference into a patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, VolumeMount};

use crate::helper::{self, HelperOptions};
use crate::names;
use crate::pod::PodFacts;

/// Velero's init container that waits for the node-agent to fill the volumes.
pub const RESTORE_WAIT: &str = "restore-wait";
/// Its name before Velero 1.10.
pub const RESTIC_WAIT: &str = "restic-wait";
/// Where `restore-wait` mounts each volume Velero restores (pod_volume_restore_action.go).
pub const RESTORES_ROOT: &str = "/restores/";
/// Where the restore helper's own container mounts each restored volume.
pub const MOUNT_ROOT: &str = "/volumes";
/// The restore helper's container.
pub const CONTAINER: &str = "restore-helper";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// What the API server defaults `schedulerName` to.
const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Annotations that keep the cluster autoscaler and Karpenter from evicting a restore
/// helper to consolidate its node: the node-agent writes through the pod's volume, and
/// Velero does not restore it again.
const NOT_DISRUPTED: [(&str, &str); 2] = [
    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
    ("karpenter.sh/do-not-disrupt", "true"),
];

/// Labels a re-created user pod loses: KubeSpawner's role labels (they select it into
/// the hub's Services and NetworkPolicies, which a restore helper must not join).
const DROPPED_LABELS: &[&str] = &[
    names::JUPYTERHUB_COMPONENT,
    names::COMPONENT,
    "hub.jupyter.org/network-access-hub",
    // A backup helper's wave: the restore helper belongs to no run.
    names::WAVE_SCHEDULE,
    names::WAVE_TICK,
    names::WAVE_NUMBER,
];

/// A pod the restore path converts: re-created by a Velero restore, and either a user
/// server or one of our backup helpers (or already a restore helper: idempotence).
/// The labels [`is_restore_candidate`] reads.
pub const CANDIDATE_LABELS: [&str; 4] = [
    names::MANAGED_BY,
    names::COMPONENT,
    names::VELERO_RESTORE_NAME,
    names::JUPYTERHUB_COMPONENT,
];

pub fn is_restore_candidate<P: PodFacts>(pod: &P) -> bool {
    let ours = pod.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
        && matches!(
            pod.label(names::COMPONENT),
            Some(names::BACKUP_HELPER | names::RESTORE_HELPER)
        );
    pod.label(names::VELERO_RESTORE_NAME).is_some()
        && (ours || pod.label(names::JUPYTERHUB_COMPONENT) == Some(names::SINGLEUSER_SERVER))
}

/// The restore helper `pod` becomes. Name, namespace, Velero's labels, the username,
/// tolerations, node selector and affinity stay; `restore-wait` stays first and
/// untouched, with exactly the volumes it mounts (claims made writable); one minimal
/// container mounts them all; everything else goes.
pub fn restore_helper(pod: &Pod, options: &HelperOptions) -> Pod {
    let spec = pod.spec.clone().unwrap_or_default();
    let wait: Option<Container> = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == RESTORE_WAIT || c.name == RESTIC_WAIT)
        .cloned();
    // Every volume restore-wait mounts stays (it must stay valid as it is), but only those
    // it mounts under /restores/ are restored: another (the ServiceAccount admission
    // plugin's token, which it adds to init containers too) is not ours to mount.
    let mounts = wait.iter().flat_map(|c| c.volume_mounts.iter().flatten());
    let kept: Vec<&str> = mounts.clone().map(|m| m.name.as_str()).collect();
    let restored: Vec<&str> = mounts
        .filter(|m| m.mount_path.starts_with(RESTORES_ROOT))
        .map(|m| m.name.as_str())
        .collect();
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| kept.contains(&v.name.as_str()))
        .cloned()
        .map(|mut v| {
            if let Some(claim) = v.persistent_volume_claim.as_mut() {
                claim.read_only = None;
            }
            v
        })
        .collect();
    let mut container = Container {
        name: CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        resources: helper::helper_resources(),
        security_context: Some(helper::restricted_container_alone()),
        volume_mounts: Some(
            volumes
                .iter()
                .filter(|v| restored.contains(&v.name.as_str()))
                .map(|v| VolumeMount {
                    name: v.name.clone(),
                    mount_path: format!("{MOUNT_ROOT}/{}", v.name),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    };
    if container.volume_mounts.as_ref().is_some_and(Vec::is_empty) {
        container.volume_mounts = None;
    }
    // The pod's own security context, unchanged: restore-wait (a copy of the user's
    // container's securityContext, `runAsUser: 0` for a root notebook) ran under it as
    // that container did, and must start (the node-agent waits for it); its group
    // settings give restored files the ownership the user's server expects. Our container
    // is restricted on its own.
    let new_spec = PodSpec {
        init_containers: wait.map(|w| vec![w]),
        containers: vec![container],
        volumes: (!volumes.is_empty()).then_some(volumes),
        automount_service_account_token: Some(false),
        // The ServiceAccount admission plugin has already run (it sets the name before
        // webhooks); the namespace's `default` always exists, the pod's own may not yet.
        service_account_name: Some(DEFAULT_SERVICE_ACCOUNT.to_owned()),
        enable_service_links: Some(false),
        security_context: spec.security_context,
        termination_grace_period_seconds: Some(0),
        tolerations: spec.tolerations,
        node_selector: spec.node_selector,
        // Not a backup helper's pin to the node it was planned on: that node may be gone
        // (a restore into a new cluster, a replaced node), and the restore goes anywhere.
        affinity: spec.affinity.filter(|a| !helper::is_pinned(a)),
        ..Default::default()
    };

    let mut metadata = pod.metadata.clone();
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.retain(|k, _| !DROPPED_LABELS.contains(&k.as_str()));
    labels.insert(
        names::MANAGED_BY.to_owned(),
        names::MANAGED_BY_US.to_owned(),
    );
    labels.insert(
        names::COMPONENT.to_owned(),
        names::RESTORE_HELPER.to_owned(),
    );
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    // A half-restored volume must not be backed up.
    annotations.remove(names::VELERO_BACKUP_VOLUMES);
    annotations.extend(helper::no_mesh_sidecar());
    annotations.extend(NOT_DISRUPTED.map(|(k, v)| (k.to_owned(), v.to_owned())));
    Pod {
        metadata,
        spec: Some(new_spec),
        status: None,
    }
}

/// Whether `pod` is already the restore helper [`restore_helper`] makes of it, as the API
/// server stores it (with its defaults filled in): a reinvoked webhook, or the second of
/// two matching entries, then has nothing to change.
pub fn is_converted(pod: &Pod, options: &HelperOptions) -> bool {
    let want = restore_helper(pod, options);
    let (Some(have), Some(want_spec)) = (pod.spec.as_ref(), want.spec.as_ref()) else {
        return false;
    };
    let [container] = have.containers.as_slice() else {
        return false;
    };
    let want_container = &want_spec.containers[0];
    want.metadata.labels == pod.metadata.labels
        && want.metadata.annotations == pod.metadata.annotations
        && have.init_containers == want_spec.init_containers
        && have.volumes == want_spec.volumes
        && container.name == want_container.name
        && container.image == want_container.image
        && container.volume_mounts == want_container.volume_mounts
        && container.security_context == want_container.security_context
        && have.security_context == want_spec.security_context
        && have.automount_service_account_token == Some(false)
        && have.priority_class_name.is_none()
        && have.scheduler_name.as_deref().unwrap_or(DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER
}

/// What the conversion of `pod` into `helper` did, one line each (`review --explain`).
pub fn explain(pod: &Pod, helper: &Pod) -> Vec<String> {
    let names_of = |containers: Option<&Vec<Container>>| -> Vec<String> {
        containers
            .into_iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    };
    let (spec, new_spec) = (pod.spec.clone().unwrap_or_default(), helper.spec.clone());
    let new_spec = new_spec.unwrap_or_default();
    let kept = names_of(new_spec.init_containers.as_ref());
    let mut lines = Vec::new();
    match kept.first() {
        Some(wait) => lines.push(format!("init container {wait}: kept first, unchanged")),
        None => lines.push(
            "no restore-wait init container: nothing to restore; the helper is removed at once"
                .to_owned(),
        ),
    }
    for name in names_of(spec.init_containers.as_ref()) {
        if !kept.contains(&name) {
            lines.push(format!("init container {name}: removed"));
        }
    }
    for name in names_of(Some(&spec.containers)) {
        if name != CONTAINER {
            lines.push(format!("container {name}: replaced by {CONTAINER}"));
        }
    }
    let kept_volumes: Vec<&str> = new_spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let restored: Vec<&str> = new_spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| m.name.as_str())
        .collect();
    for (name, claim) in pod.volumes() {
        let what = claim.map(|c| format!(" (claim {c})")).unwrap_or_default();
        let fate = match (restored.contains(&name), kept_volumes.contains(&name)) {
            (true, _) => "kept, writable: restore-wait restores it",
            (false, true) => {
                "kept for restore-wait only (it mounts it outside /restores/: not restored)"
            }
            (false, false) => "removed: restore-wait does not mount it",
        };
        lines.push(format!("volume {name}{what}: {fate}"));
    }
    lines
}

/// A claim a re-created pod restores a volume into, as the cluster has it when the pod is
/// created (Velero restores claims before pods, pkg/restore/restore.go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimNow {
    /// Not there: nothing to write over (the pod waits for it).
    Absent,
    /// There, with its `velero.io/restore-name` label: Velero labels what a Restore
    /// creates, and what it updates under `existingResourcePolicy: update` (restore.go
    /// `addRestoreLabels`, and its labels-only patch when the update itself fails).
    Present { restore: Option<String> },
    /// Could not be read (why).
    Unknown(String),
}

/// The claims `pod`'s restore writes into: `(volume, claim)` for each claim volume that
/// `restore-wait` mounts under `/restores/` (Velero's node-agent fills exactly those).
pub fn restored_claims(pod: &Pod) -> Vec<(&str, &str)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let wait = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == RESTORE_WAIT || c.name == RESTIC_WAIT);
    let restored: Vec<&str> = wait
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .filter(|m| m.mount_path.starts_with(RESTORES_ROOT))
        .map(|m| m.name.as_str())
        .collect();
    spec.volumes
        .iter()
        .flatten()
        .filter(|v| restored.contains(&v.name.as_str()))
        .filter_map(|v| {
            let claim = v.persistent_volume_claim.as_ref()?;
            Some((v.name.as_str(), claim.claim_name.as_str()))
        })
        .collect()
}

/// A claim the restore of a re-created pod would write over without having been asked to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// It existed before this Restore, which neither created nor updated it.
    Existing { claim: String },
    /// Whether it exists could not be checked.
    Unchecked { claim: String, why: String },
}

impl Overwrite {
    pub fn claim(&self) -> &str {
        match self {
            Self::Existing { claim } | Self::Unchecked { claim, .. } => claim,
        }
    }
}

/// The rule for restores into homes that exist: Velero writes a pod's backed-up volumes
/// into whatever claim of that name exists (Kopia overwrites same-named files,
/// pkg/uploader/kopia/snapshot.go), so a restore may write into a claim only when this
/// Restore created it, or was told to update what exists (`existingResourcePolicy:
/// update`): then the claim carries this Restore's name. A claim not there yet is fine
/// (nothing to overwrite). `claims` are the claims as looked up; one not in it counts as
/// absent (the `review` command, which has no cluster).
pub fn overwrites(pod: &Pod, claims: &[(String, ClaimNow)]) -> Vec<Overwrite> {
    let restore = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::VELERO_RESTORE_NAME));
    let mut out: Vec<Overwrite> = Vec::new();
    for (_, claim) in restored_claims(pod) {
        if out.iter().any(|o| o.claim() == claim) {
            continue;
        }
        let now = claims.iter().find(|(c, _)| c == claim).map(|(_, n)| n);
        match now {
            None | Some(ClaimNow::Absent) => {}
            Some(ClaimNow::Present { restore: by }) if by.is_some() && by.as_ref() == restore => {}
            Some(ClaimNow::Present { .. }) => out.push(Overwrite::Existing {
                claim: claim.to_owned(),
            }),
            Some(ClaimNow::Unknown(why)) => out.push(Overwrite::Unchecked {
                claim: claim.to_owned(),
                why: why.clone(),
            }),
        }
    }
    out
}

/// Why a re-created pod was refused (Velero records it among the Restore's errors; the
/// restore of its other volumes, if any, is refused with it).
pub fn overwrite_message(restore: &str, pod: &str, refused: &[Overwrite]) -> String {
    let mut existing = Vec::new();
    let mut unchecked = Vec::new();
    for o in refused {
        match o {
            Overwrite::Existing { claim } => existing.push(claim.as_str()),
            Overwrite::Unchecked { claim, why } => unchecked.push(format!("{claim} ({why})")),
        }
    }
    let mut parts = Vec::new();
    if !existing.is_empty() {
        parts.push(format!(
            "claim {} existed before this restore, and restoring would write the backup's files over its current ones. A restore writes into an existing home only when asked: restore with existingResourcePolicy=update (`velero restore create --existing-resource-policy=update`, `velero-jupyterhub restore --into-existing`), or delete the claim first for an exact restore",
            existing.join(", ")
        ));
    }
    if !unchecked.is_empty() {
        parts.push(format!(
            "whether claim {} exists could not be checked; run the restore again",
            unchecked.join(", ")
        ));
    }
    format!(
        "velero-jupyterhub: pod {pod} of Velero restore {restore} not re-created, nothing written: {}",
        parts.join("; ")
    )
}

/// A claim being restored in the namespace (its `velero-jupyterhub.io/restoring-claims`
/// record): the user may not start a server on it until the restore is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoringClaim {
    pub claim: String,
    /// The Velero Restore, when known (`review --restoring CLAIM=RESTORE`).
    pub restore: Option<String>,
}

/// The restore guard: the first claim of `pod` being restored. A user server
/// starting on it would race Velero's node-agent writing the data back.
pub fn guard<'r, P: PodFacts>(
    pod: &P,
    restoring: &'r [RestoringClaim],
) -> Option<&'r RestoringClaim> {
    if restoring.is_empty() {
        return None;
    }
    pod.volumes()
        .filter_map(|(_, claim)| claim)
        .find_map(|claim| restoring.iter().find(|r| r.claim == claim))
}

/// The restore guard's refusal, as the user sees it in the spawn progress (the words of
/// the restoring-claims policy, which refuses the same pods inside the API server).
pub fn guard_message(r: &RestoringClaim) -> String {
    match &r.restore {
        Some(restore) => format!(
            "home volume {} is being restored by Velero restore {restore}; try again when the restore completes",
            r.claim
        ),
        None => format!(
            "home volume {} is being restored by Velero; try again when the restore completes",
            r.claim
        ),
    }
}

/// A wave Backup of a Schedule's tick, as the claim decision reads it: its name, and the
/// claims it holds the homes of (`velero-jupyterhub.io/wave-claims`, `namespace/claim`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveOf<'a> {
    pub name: &'a str,
    /// Its Schedule (`velero-jupyterhub.io/wave-schedule`), to name in the message.
    pub schedule: Option<&'a str>,
    /// Its phase, when Velero cannot restore from it (it failed): the home has no copy
    /// from that night at all.
    pub failed: Option<&'a str>,
    pub claims: Vec<(&'a str, &'a str)>,
}

impl<'a> WaveOf<'a> {
    /// `velero-jupyterhub.io/wave-claims` read: `namespace/claim`, comma-separated.
    pub fn read(
        name: &'a str,
        schedule: Option<&'a str>,
        phase: Option<&'a str>,
        wave_claims: &'a str,
    ) -> Self {
        let claims = crate::waves::read_claims(wave_claims);
        let failed = phase.filter(|p| !matches!(*p, "Completed" | "PartiallyFailed"));
        Self {
            name,
            schedule,
            failed,
            claims,
        }
    }
}

/// The wave Backup that holds the home of claim `claim`, which a Restore is re-creating
/// from the Schedule's own Backup of the same tick (`waves`: those labelled
/// `velero-jupyterhub.io/wave-of` with it). Velero's `restore create --from-schedule`
/// restores that Backup alone (pkg/controller/restore_controller.go): re-created from it,
/// the claim would come back empty and the Restore would say Completed.
/// `source_namespace`: the claim's namespace in the Backup (before any mapping).
pub fn home_in_a_wave<'w>(
    source_namespace: &str,
    claim: &str,
    waves: &'w [WaveOf<'w>],
) -> Option<&'w WaveOf<'w>> {
    waves.iter().find(|w| {
        w.claims
            .iter()
            .any(|&(ns, c)| ns == source_namespace && c == claim)
    })
}

/// Why the claim is refused (Velero records it among the Restore's errors).
pub fn wave_home_message(namespace: &str, claim: &str, backup: &str, wave: &WaveOf<'_>) -> String {
    let name = wave.name;
    let schedule = wave.schedule.unwrap_or("<schedule>");
    match wave.failed {
        None => format!(
            "velero-jupyterhub: claim {namespace}/{claim} not re-created from Backup {backup}: that Backup holds no copy of its home, which is in wave Backup {name} of the same night, and restored from {backup} alone it would come back empty. Restore both: `velero-jupyterhub restore --namespace {namespace} --from-schedule {schedule}`, or `velero restore create --from-backup {name}` (with the same namespace options)"
        ),
        Some(phase) => format!(
            "velero-jupyterhub: claim {namespace}/{claim} not re-created from Backup {backup}: that Backup holds no copy of its home, and wave Backup {name} of the same night, which was to hold it, is {phase}: restored from this night it would come back empty. Restore it from another night (`velero-jupyterhub restore --namespace {namespace} --latest --user <user>`)"
        ),
    }
}
