//! The parts of Velero's objects our decisions read (Velero v1.18 CRDs), as plain data:
//! unknown fields are ignored, so the edge keeps only these in memory.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use serde::Deserialize;

/// `Schedule.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ScheduleSpec {
    /// A robfig/cron v3 `ParseStandard` expression.
    pub schedule: String,
    pub paused: bool,
    pub template: BackupTemplate,
}

/// The part of a Backup spec (a Schedule's `template`) that decides which pods it covers.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BackupTemplate {
    pub included_namespaces: Option<Vec<String>>,
    pub excluded_namespaces: Option<Vec<String>>,
    pub label_selector: Option<LabelSelector>,
    pub or_label_selectors: Option<Vec<LabelSelector>>,
    /// Which way volumes are copied (`policy::datapath`).
    pub snapshot_volumes: Option<bool>,
    pub snapshot_move_data: Option<bool>,
    pub resource_policy: Option<PolicyRef>,
    /// Resource hooks Velero runs in the pods it backs up (`policy::hooks`).
    pub hooks: crate::hooks::BackupHooks,
}

/// `spec.resourcePolicy`: Velero reads only `kind: configmap` (any case), named in the
/// Backup's namespace (internal/resourcepolicies `GetResourcePoliciesFromBackup`); any
/// other kind is ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PolicyRef {
    pub kind: String,
    pub name: String,
}

impl PolicyRef {
    /// The ConfigMap's name, if Velero reads this reference.
    pub fn config_map(&self) -> Option<&str> {
        self.kind
            .eq_ignore_ascii_case("configmap")
            .then_some(self.name.as_str())
    }
}

/// `DataUpload.spec` (velero.io/v2alpha1): the claim the data mover copies.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DataUploadSpec {
    #[serde(rename = "sourcePVC")]
    pub source_pvc: String,
    pub source_namespace: String,
}

/// `DataUpload.status`: phase (Completed is done), bytes, when.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DataUploadStatus {
    pub phase: Option<String>,
    pub message: Option<String>,
    pub progress: Progress,
    pub completion_timestamp: Option<Time>,
}

/// `Schedule.status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ScheduleStatus {
    pub phase: Option<String>,
    pub last_backup: Option<Time>,
    pub last_skipped: Option<Time>,
}

/// `Backup.status` (its spec is not needed).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BackupStatus {
    pub phase: Option<String>,
    /// When Velero started it (kept by its backup sync, unlike the creation time).
    pub start_timestamp: Option<Time>,
    /// When it became terminal (how long a run of waves took).
    pub completion_timestamp: Option<Time>,
}

/// `PodVolumeBackup.spec`: which pod's volume it copies.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodVolumeBackupSpec {
    pub pod: PodRef,
    pub volume: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// `PodVolumeBackup.status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodVolumeBackupStatus {
    pub phase: Option<String>,
    /// Why it failed, when it did.
    pub message: Option<String>,
    pub progress: Progress,
    pub completion_timestamp: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Progress {
    pub total_bytes: Option<i64>,
    pub bytes_done: Option<i64>,
}

/// `Restore.spec`: the Backup it restores from.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RestoreSpec {
    pub backup_name: String,
    /// `velero restore create --from-schedule`: Velero fills `backupName` from it when it
    /// validates the Restore (the newest Completed Backup of the Schedule).
    pub schedule_name: String,
    pub included_resources: Vec<String>,
    pub excluded_resources: Vec<String>,
    /// `none` (the default) or `update`.
    pub existing_resource_policy: String,
    pub included_namespaces: Vec<String>,
    pub excluded_namespaces: Vec<String>,
    /// Source namespace → the namespace its objects are restored into.
    pub namespace_mapping: std::collections::BTreeMap<String, String>,
    pub label_selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    pub or_label_selectors: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// `Restore.status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RestoreStatus {
    pub phase: Option<String>,
    pub completion_timestamp: Option<Time>,
}

/// `PodVolumeRestore.spec`: which pod's volume it fills.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodVolumeRestoreSpec {
    pub pod: PodRef,
    pub volume: String,
}

/// `PodVolumeRestore.status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodVolumeRestoreStatus {
    pub phase: Option<String>,
    pub message: Option<String>,
    pub progress: Progress,
    pub completion_timestamp: Option<Time>,
}

/// The label value Velero writes for an object name (`velero.io/restore-name`,
/// `velero.io/backup-name`): pkg/label/label.go `GetValidName`. A name over 63 characters
/// keeps its first 57, followed by the first 6 hex digits of its SHA-256.
pub fn label_value(name: &str) -> std::borrow::Cow<'_, str> {
    use sha2::Digest as _;
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name.into();
    }
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest[..3].iter().map(|b| format!("{b:02x}")).collect();
    // Velero cuts bytes; a name that reaches us as a Kubernetes name is ASCII.
    let head = name.get(..MAX - 6).unwrap_or(name);
    format!("{head}{hex}").into()
}

/// A Backup as [`backup_for_schedule`] reads it: name, `velero.io/schedule-name` label,
/// phase, `status.startTimestamp`.
pub type ScheduledBackup<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<jiff::Timestamp>,
);

/// The Backup a Restore of `scheduleName` restores (`velero restore create
/// --from-schedule`): of the Backups labelled with the Schedule, newest start first, the
/// first `Completed` (pkg/controller/restore_controller.go; Velero fills `backupName`
/// with it only when it validates the Restore).
pub fn backup_for_schedule<'a>(schedule: &str, backups: &[ScheduledBackup<'a>]) -> Option<&'a str> {
    let label = label_value(schedule);
    backups
        .iter()
        .filter(|(_, s, phase, _)| *s == Some(label.as_ref()) && *phase == Some("Completed"))
        .max_by_key(|(name, _, _, started)| (*started, *name))
        .map(|(name, ..)| *name)
}

/// Restore phases after which Velero does nothing more with it
/// (pkg/apis/velero/v1/restore_types.go).
pub fn restore_is_terminal(phase: Option<&str>) -> bool {
    matches!(
        phase,
        Some("Completed" | "PartiallyFailed" | "Failed" | "FailedValidation")
    )
}

/// PodVolumeRestore phases after which the node-agent writes no more
/// (pkg/apis/velero/v1/pod_volume_restore_types.go).
pub fn pod_volume_restore_is_terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Completed" | "Failed" | "Canceled"))
}

/// Backup phases after which Velero does nothing more with it
/// (pkg/apis/velero/v1/backup_types.go). `Deleting` ends it too: it is going away.
pub fn backup_is_terminal(phase: Option<&str>) -> bool {
    matches!(
        phase,
        Some("Completed" | "PartiallyFailed" | "Failed" | "FailedValidation" | "Deleting")
    )
}

/// PodVolumeBackup phases after which its volume is no longer read
/// (pkg/apis/velero/v1/pod_volume_backup_types.go).
pub fn pod_volume_backup_is_terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Completed" | "Failed" | "Canceled"))
}

impl BackupTemplate {
    /// Whether a Backup from this template includes `namespace`, as Velero decides it
    /// (pkg/util/collections/includes_excludes.go `IncludesExcludes.ShouldInclude`):
    /// excludes first, then an empty include list, `*`, or a matching glob. Velero's
    /// globs are gobwas/glob patterns; namespace names have no separators, so `*`, `?`
    /// and `[...]` mean the same here (`{a,b}` alternatives are not supported: such a
    /// pattern matches nothing, as an invalid pattern does in Velero).
    pub fn covers_namespace(&self, namespace: &str) -> bool {
        includes_namespace(
            self.included_namespaces.as_deref().unwrap_or_default(),
            self.excluded_namespaces.as_deref().unwrap_or_default(),
            namespace,
        )
    }
}

/// Whether Velero's namespace includes and excludes (of a Backup or a Restore) take
/// `namespace` (pkg/util/collections/includes_excludes.go `ShouldInclude`; see
/// [`BackupTemplate::covers_namespace`]).
pub fn includes_namespace(included: &[String], excluded: &[String], namespace: &str) -> bool {
    let matches = |patterns: &[String]| {
        patterns
            .iter()
            .any(|p| glob::Pattern::new(p).is_ok_and(|g| g.matches(namespace)) && !p.contains('{'))
    };
    if matches(excluded) {
        return false;
    }
    included.is_empty() || included.iter().any(|p| p == "*") || matches(included)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_coverage_like_velero() {
        let t = |inc: &[&str], exc: &[&str]| BackupTemplate {
            included_namespaces: Some(inc.iter().map(|s| s.to_string()).collect()),
            excluded_namespaces: Some(exc.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&[], &[], "jhub", true),
            (&["*"], &[], "jhub", true),
            (&["jhub"], &[], "jhub", true),
            (&["other"], &[], "jhub", false),
            (&["jhub-*"], &[], "jhub-prod", true),
            (&["jhub-*"], &[], "jhub", false),
            (&["j?ub"], &[], "jhub", true),
            (&["*"], &["jhub"], "jhub", false),
            (&[], &["kube-*"], "jhub", true),
            (&[], &["kube-*"], "kube-system", false),
            (&["jhub"], &["jhub"], "jhub", false),
            (&["{jhub,other}"], &[], "jhub", false),
        ];
        for (inc, exc, ns, want) in cases {
            assert_eq!(
                t(inc, exc).covers_namespace(ns),
                *want,
                "{inc:?} {exc:?} {ns}"
            );
        }
        assert!(BackupTemplate::default().covers_namespace("jhub"));
    }

    #[test]
    fn label_values_as_velero_writes_them() {
        assert_eq!(label_value("restore-1"), "restore-1");
        let long = format!("{}-20261128030000-20261128110502", "a".repeat(40));
        let got = label_value(&long);
        assert_eq!(got.len(), 63);
        assert!(got.starts_with(&long[..57]));
        // The first 6 hex digits of that name's SHA-256 (computed apart, with Python's hashlib).
        assert_eq!(&got[57..], SHA_OF_LONG);
        assert_eq!(label_value(&"b".repeat(63)), "b".repeat(63));
    }

    const SHA_OF_LONG: &str = "545dc9";

    #[test]
    fn reads_velero_objects() {
        let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
            "schedule": "CRON_TZ=Europe/Berlin 0 3 * * *",
            "template": {"includedNamespaces": ["jhub"], "ttl": "720h0m0s",
                         "labelSelector": {"matchLabels": {"backup": "homes"}}},
            "useOwnerReferencesInBackup": false
        }))
        .unwrap();
        assert!(!spec.paused);
        assert!(spec.template.covers_namespace("jhub"));
        assert!(spec.template.label_selector.is_some());
        assert!(backup_is_terminal(Some("PartiallyFailed")));
        assert!(!backup_is_terminal(Some("InProgress")));
        assert!(!backup_is_terminal(None));
    }
}
