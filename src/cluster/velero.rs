//! Velero's objects as watched by the controller: metadata plus the fields `policy` reads
//! (everything else is dropped at decode time, so thousands of Backups and
//! PodVolumeBackups stay small in memory).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::names;
use crate::policy::coverage::PvbFacts;
use crate::policy::velero::{
    BackupStatus, DataUploadSpec, DataUploadStatus, PodVolumeBackupSpec, PodVolumeBackupStatus,
    PodVolumeRestoreSpec, PodVolumeRestoreStatus, RestoreSpec, RestoreStatus, ScheduleSpec,
    ScheduleStatus,
};

macro_rules! velero_resource {
    ($name:ident, $kind:literal, $plural:literal, $spec:ty, $status:ty) => {
        velero_resource!($name, $kind, $plural, $spec, $status, "v1");
    };
    ($name:ident, $kind:literal, $plural:literal, $spec:ty, $status:ty, $version:literal) => {
        #[derive(Clone, Debug, Default, Deserialize)]
        pub struct $name {
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: $spec,
            #[serde(default)]
            pub status: Option<$status>,
        }

        impl k8s_openapi::Resource for $name {
            const API_VERSION: &'static str = concat!("velero.io/", $version);
            const GROUP: &'static str = "velero.io";
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $name {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Backup's spec is not read: only its labels, creation time and phase.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Ignored {}

velero_resource!(
    Schedule,
    "Schedule",
    "schedules",
    ScheduleSpec,
    ScheduleStatus
);
velero_resource!(Backup, "Backup", "backups", Ignored, BackupStatus);
velero_resource!(
    PodVolumeBackup,
    "PodVolumeBackup",
    "podvolumebackups",
    PodVolumeBackupSpec,
    PodVolumeBackupStatus
);

velero_resource!(Restore, "Restore", "restores", RestoreSpec, RestoreStatus);
velero_resource!(
    PodVolumeRestore,
    "PodVolumeRestore",
    "podvolumerestores",
    PodVolumeRestoreSpec,
    PodVolumeRestoreStatus
);

// The CSI snapshot data mover's copy of one claim (pkg/apis/velero/v2alpha1/
// data_upload_types.go; made by pkg/backup/actions/csi/pvc_action.go `newDataUpload`).
velero_resource!(
    DataUpload,
    "DataUpload",
    "datauploads",
    DataUploadSpec,
    DataUploadStatus,
    "v2alpha1"
);

/// An Event's reference to a Schedule (its uid when known).
pub fn schedule_reference(
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("velero.io/v1".to_owned()),
        kind: Some("Schedule".to_owned()),
        name,
        namespace,
        uid,
        ..Default::default()
    }
}

impl Schedule {
    pub fn reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        let m = &self.metadata;
        schedule_reference(m.name.clone(), m.namespace.clone(), m.uid.clone())
    }
}

impl Backup {
    /// Whether Velero restores from it: `Completed` or `PartiallyFailed`.
    pub fn restorable(&self) -> bool {
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Completed" | "PartiallyFailed"))
    }
}

/// The DataUploads in `namespace` that `params` selects; none where Velero has no data
/// mover CRD (before v1.12).
pub async fn list_data_uploads(
    client: &kube::Client,
    namespace: &str,
    params: kube::api::ListParams,
) -> kube::Result<Vec<DataUpload>> {
    match super::list_all(&kube::Api::namespaced(client.clone(), namespace), params).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        listed => listed,
    }
}

impl DataUpload {
    /// What `policy::coverage` reads of it: the claim it copied (its uid in the
    /// `velero.io/pvc-uid` label, pkg/backup/actions/csi/pvc_action.go `newDataUpload`;
    /// its name in `spec.sourcePVC`), its phase and bytes.
    pub fn facts(&self) -> PvbFacts<'_> {
        let status = self.status.as_ref();
        PvbFacts {
            name: self.metadata.name.as_deref().unwrap_or_default(),
            data_mover: true,
            pvc_uid: self
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::VELERO_PVC_UID))
                .map(String::as_str),
            pvc_name: Some(&self.spec.source_pvc),
            pod: "",
            phase: status.and_then(|s| s.phase.as_deref()),
            bytes_done: status.and_then(|s| s.progress.bytes_done),
            message: status.and_then(|s| s.message.as_deref()),
        }
    }

    /// A Completed one as `status` reads a copy (`velero.io/backup-name` label, the
    /// claim it copied, when, how many bytes); `None` for any other.
    pub fn done(&self) -> Option<crate::policy::status::PvbDone<'_>> {
        let status = self.status.as_ref()?;
        if status.phase.as_deref() != Some("Completed") {
            return None;
        }
        Some(crate::policy::status::PvbDone {
            backup: self
                .metadata
                .labels
                .as_ref()?
                .get(names::VELERO_BACKUP_NAME)?,
            pod_namespace: &self.spec.source_namespace,
            claim: &self.spec.source_pvc,
            completed: status.completion_timestamp.as_ref()?.0,
            bytes: status.progress.total_bytes,
        })
    }
}

impl PodVolumeBackup {
    /// What `policy::status` reads of a Completed one (`None` for any other, or one
    /// without a Backup label, claim annotation or completion time).
    pub fn done(&self) -> Option<crate::policy::status::PvbDone<'_>> {
        let status = self.status.as_ref()?;
        if status.phase.as_deref() != Some("Completed") {
            return None;
        }
        let facts = self.facts();
        Some(crate::policy::status::PvbDone {
            backup: self
                .metadata
                .labels
                .as_ref()?
                .get(names::VELERO_BACKUP_NAME)?,
            pod_namespace: &self.spec.pod.namespace,
            claim: facts.pvc_name?,
            completed: status.completion_timestamp.as_ref()?.0,
            bytes: facts.bytes_done,
        })
    }

    /// What `policy::coverage` reads of it.
    pub fn facts(&self) -> PvbFacts<'_> {
        let m = &self.metadata;
        let status = self.status.as_ref();
        PvbFacts {
            name: m.name.as_deref().unwrap_or_default(),
            data_mover: false,
            pvc_uid: m
                .labels
                .as_ref()
                .and_then(|l| l.get(names::VELERO_PVC_UID))
                .map(String::as_str),
            pvc_name: m
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::VELERO_PVC_NAME))
                .map(String::as_str),
            pod: &self.spec.pod.name,
            phase: status.and_then(|s| s.phase.as_deref()),
            bytes_done: status.and_then(|s| s.progress.bytes_done),
            message: status.and_then(|s| s.message.as_deref()),
        }
    }
}
