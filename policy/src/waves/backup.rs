//! A wave's identity (its Schedule, tick and number) and the Velero Backup made for it;
//! the claims that Backup records are read back from its annotations.

use jiff::Timestamp;

use crate::names;

/// Which wave of which Schedule's run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveId<'a> {
    /// The Schedule's namespace (Velero's) and name.
    pub velero_namespace: &'a str,
    pub schedule: &'a str,
    /// The tick the run belongs to.
    pub tick: Timestamp,
    /// 1, 2, … within the run.
    pub number: u32,
}

impl WaveId<'_> {
    /// The Backup's name: `<schedule>-wave<N>-<tick as yyyymmddhhmmss>` in UTC, the shape
    /// Velero gives the Schedule's own Backups (`<schedule>-<yyyymmddhhmmss>`,
    /// pkg/apis/velero/v1/schedule_types.go `TimestampedName`), so a
    /// night's Backups sort and read together.
    pub fn backup_name(&self) -> String {
        let tick = self.tick.strftime("%Y%m%d%H%M%S");
        format!("{}-wave{}-{tick}", self.schedule, self.number)
    }

    /// The labels a wave's helpers and its Backup carry (the Backup selects the helpers
    /// by them).
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                names::WAVE_SCHEDULE,
                crate::velero::label_value(self.schedule).into_owned(),
            ),
            (names::WAVE_TICK, self.tick.as_second().to_string()),
            (names::WAVE_NUMBER, self.number.to_string()),
        ]
    }
}

/// The Velero Backup of one wave, made from its Schedule as Velero's own Schedule
/// controller makes a scheduled Backup (pkg/builder/backup_builder.go `FromSchedule`),
/// so a wave keeps whatever the Schedule asks of its Backups: the Schedule's `spec.template` as the spec (storage location, TTL, hooks,
/// resource policy, everything), the template's labels if it has any, else the
/// Schedule's, the Schedule's annotations, and an owner reference to the Schedule when it
/// asks for one (`useOwnerReferencesInBackup`). Then narrowed to the wave: only
/// `namespaces` (those of the wave's claims), only the wave's helpers (a label selector
/// on [`WaveId::labels`]) with their claims and volumes.
///
/// One difference, on purpose: no `velero.io/schedule-name` label. Velero's Schedule
/// controller lists Backups with that label and skips its own next tick while any of them
/// is New or InProgress (pkg/controller/schedule_controller.go
/// `checkIfBackupInNewOrProgress`), so a night of waves would make the Schedule skip live users'
/// Backup. Our labels say which Schedule a wave belongs to instead.
///
/// `follows` names the Schedule's own Backup of the tick: its label form goes into
/// `velero-jupyterhub.io/wave-of`, which travels with the Backup into object storage, so
/// that a cluster that knows the Backups only from there (Velero's backup sync keeps
/// labels) still finds a night's waves (`velero-jupyterhub restore --from-schedule`).
///
/// `schedule` is the Schedule object as JSON (metadata and spec).
pub fn wave_backup(
    schedule: &serde_json::Value,
    wave: &WaveId<'_>,
    follows: &str,
    namespaces: &[&str],
) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let template = &schedule["spec"]["template"];
    let mut spec = template.as_object().cloned().unwrap_or_default();
    spec.remove("metadata");
    // The wave: its claims' namespaces, our helpers of this wave, their claims and volumes.
    spec.insert("includedNamespaces".into(), json!(namespaces));
    spec.remove("excludedNamespaces");
    spec.remove("orLabelSelectors");
    spec.remove("excludedResources");
    spec.remove("excludedNamespaceScopedResources");
    spec.remove("includedNamespaceScopedResources");
    // Cluster-scoped resources: only the helpers' volumes, which Velero takes along with
    // their claims by itself (and `includedResources` cannot be mixed with the newer
    // scoped filters: Velero refuses such a Backup).
    spec.remove("includeClusterResources");
    spec.remove("includedClusterScopedResources");
    spec.remove("excludedClusterScopedResources");
    spec.insert(
        "includedResources".into(),
        json!(["pods", "persistentvolumeclaims", "persistentvolumes"]),
    );
    let selector: Map<String, Value> = wave
        .labels()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    spec.insert("labelSelector".into(), json!({"matchLabels": selector}));

    let template_labels = template["metadata"]["labels"].as_object();
    let mut labels = template_labels
        .or(schedule["metadata"]["labels"].as_object())
        .cloned()
        .unwrap_or_default();
    labels.remove(names::VELERO_SCHEDULE_NAME);
    for (k, v) in wave.labels() {
        labels.insert(k.to_owned(), Value::String(v));
    }
    labels.insert(
        names::WAVE_OF.into(),
        Value::String(crate::velero::label_value(follows).into_owned()),
    );
    labels.insert(names::MANAGED_BY.into(), names::MANAGED_BY_US.into());
    let mut metadata = json!({
        "name": wave.backup_name(),
        "namespace": wave.velero_namespace,
        "labels": labels,
    });
    if let Some(annotations) = schedule["metadata"]["annotations"].as_object() {
        metadata["annotations"] = Value::Object(annotations.clone());
    }
    if schedule["spec"]["useOwnerReferencesInBackup"] == Value::Bool(true) {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "velero.io/v1",
            "kind": "Schedule",
            "name": schedule["metadata"]["name"],
            "uid": schedule["metadata"]["uid"],
            "controller": true,
        }]);
    }
    json!({
        "apiVersion": "velero.io/v1",
        "kind": "Backup",
        "metadata": metadata,
        "spec": Value::Object(spec),
    })
}

/// A wave Backup's claims annotation read back (`velero-jupyterhub.io/wave-claims`,
/// `…/wave-given-up`): `namespace/claim`, comma-separated; an entry without a `/` is
/// skipped (it names nothing a helper could have mounted).
pub fn read_claims(value: &str) -> Vec<(&str, &str)> {
    value
        .split(',')
        .filter_map(|c| c.trim().split_once('/'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waves::test_support::t;

    /// A Schedule as users write it (a TTL, a storage location, a hook, a resource
    /// policy, template labels), read as the API server returns it.
    #[test]
    fn a_wave_backup_is_the_schedules_backup_narrowed_to_the_wave() {
        let schedule: serde_json::Value = serde_json::json!({
            "apiVersion": "velero.io/v1", "kind": "Schedule",
            "metadata": {"name": "homes", "namespace": "velero", "uid": "u-1",
                         "labels": {"team": "platform"}, "annotations": {"note": "nightly"}},
            "spec": {
                "schedule": "0 3 * * *",
                "useOwnerReferencesInBackup": true,
                "template": {
                    "metadata": {"labels": {"tier": "homes", "velero.io/schedule-name": "forged"}},
                    "includedNamespaces": ["*"],
                    "excludedNamespaces": ["kube-system"],
                    "includeClusterResources": true,
                    "includedClusterScopedResources": ["storageclasses"],
                    "excludedClusterScopedResources": ["nodes"],
                    "orLabelSelectors": [{"matchLabels": {"a": "b"}}],
                    "storageLocation": "s3-eu",
                    "ttl": "720h0m0s",
                    "defaultVolumesToFsBackup": false,
                    "hooks": {"resources": [{"name": "sync", "pre": [{"exec": {"command": ["sync"]}}]}]},
                    "resourcePolicy": {"kind": "configmap", "name": "skip-big"}
                }
            }
        });
        let wave = WaveId {
            velero_namespace: "velero",
            schedule: "homes",
            tick: t("2026-11-28T03:00:00Z"),
            number: 2,
        };
        let backup = wave_backup(&schedule, &wave, "homes-20261128030004", &["jhub"]);
        let want = serde_json::json!({
            "apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {
                "name": "homes-wave2-20261128030000",
                "namespace": "velero",
                "labels": {
                    "tier": "homes",
                    "velero-jupyterhub.io/wave-schedule": "homes",
                    "velero-jupyterhub.io/wave-tick": "1795834800",
                    "velero-jupyterhub.io/wave": "2",
                    "velero-jupyterhub.io/wave-of": "homes-20261128030004",
                    "app.kubernetes.io/managed-by": "velero-jupyterhub"
                },
                "annotations": {"note": "nightly"},
                "ownerReferences": [{"apiVersion": "velero.io/v1", "kind": "Schedule",
                                     "name": "homes", "uid": "u-1", "controller": true}]
            },
            "spec": {
                "includedNamespaces": ["jhub"],
                "includedResources": ["pods", "persistentvolumeclaims", "persistentvolumes"],
                "labelSelector": {"matchLabels": {
                    "velero-jupyterhub.io/wave-schedule": "homes",
                    "velero-jupyterhub.io/wave-tick": "1795834800",
                    "velero-jupyterhub.io/wave": "2"
                }},
                "storageLocation": "s3-eu",
                "ttl": "720h0m0s",
                "defaultVolumesToFsBackup": false,
                "hooks": {"resources": [{"name": "sync", "pre": [{"exec": {"command": ["sync"]}}]}]},
                "resourcePolicy": {"kind": "configmap", "name": "skip-big"}
            }
        });
        assert_eq!(backup, want);
        // Without template labels the Schedule's own labels are used, as Velero does.
        let mut plain = schedule.clone();
        plain["spec"]["template"]["metadata"] = serde_json::json!({});
        plain["spec"]["useOwnerReferencesInBackup"] = false.into();
        let backup = wave_backup(&plain, &wave, "homes-20261128030004", &["jhub"]);
        assert_eq!(backup["metadata"]["labels"]["team"], "platform");
        assert!(backup["metadata"].get("ownerReferences").is_none());
        assert!(
            backup["metadata"]["labels"]
                .get("velero.io/schedule-name")
                .is_none()
        );
    }
}
