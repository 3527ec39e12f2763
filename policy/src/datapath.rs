//! Which way Velero copies a user claim's data in a Backup: through a pod (file-system
//! backup, what our helpers are for), by the CSI snapshot data mover, as a snapshot that
//! stays in the cluster, or not at all, and why. Helpers are made only where a pod is
//! what Velero needs, and `status` says where each home went.
//!
//! Velero v1.18.1, followed exactly:
//! - internal/volumehelper/volume_policy_helper.go: `ShouldPerformFSBackup` (the resource
//!   policy's first matching action decides; only `fs-backup` means a pod copy; without a
//!   match, the pod annotations, which our webhook and helpers always set) and
//!   `ShouldPerformSnapshot` (a `snapshot` action snapshots even with `snapshotVolumes:
//!   false`; a claim a pod copies is not snapshotted too);
//! - internal/resourcepolicies/ (resource_policies.go, volume_resources.go,
//!   volume_resources_validator.go): the ConfigMap's format, strict, `version: v1`, every
//!   condition of a policy must match, the first matching policy wins;
//! - pkg/podvolume/backupper.go `isHostPathVolume`: a claim on a `hostPath` volume is never
//!   copied through a pod, and no snapshotter takes it either;
//! - pkg/backup/actions/csi/pvc_action.go: only a CSI volume is snapshotted by the CSI
//!   path, and `snapshotMoveData` turns that snapshot into a DataUpload.

use std::collections::BTreeMap;

use serde::Deserialize;

/// How a claim's data is copied in a Backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// Velero's file-system backup, through a Running pod that mounts it: the user's
    /// server, or our helper while the user is away.
    FsBackup,
    /// A CSI snapshot whose data Velero's data mover copies to the backup storage (a
    /// `DataUpload`): no pod needed.
    DataMover,
    /// A CSI snapshot kept in the cluster's snapshot store: the data does not leave the
    /// storage system.
    CsiSnapshot,
    /// A snapshot by a Velero VolumeSnapshotter plugin, if one serves this volume; the data
    /// stays with the storage provider.
    NativeSnapshot,
    /// A `custom` action of the resource policy (Velero ≥ 1.18.1): a plugin of the
    /// operator's decides.
    Custom { policy: usize },
    /// Velero does not copy it.
    Skipped(Skip),
}

/// Why Velero does not copy a claim's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The resource policy's `skip` action (index into `volumePolicies`).
    Policy { policy: usize },
    /// A `hostPath` volume (e.g. k3s's local-path provisioner): the node-agent cannot
    /// reach it, and no snapshotter takes it.
    HostPath,
}

impl DataPath {
    /// A pod must mount the claim for Velero to copy it.
    pub fn needs_pod(&self) -> bool {
        matches!(self, Self::FsBackup)
    }

    /// What `status` and Events say about it.
    pub fn describe(&self, policies: Option<&str>) -> String {
        let config = policies.map_or_else(String::new, |p| format!(" of ConfigMap {p}"));
        match self {
            Self::FsBackup => "file-system backup through a pod".to_owned(),
            Self::DataMover => "CSI snapshot, data moved to the backup storage".to_owned(),
            Self::CsiSnapshot => {
                "CSI snapshot kept in the cluster (no data movement: the data stays in the storage system)"
                    .to_owned()
            }
            Self::NativeSnapshot => {
                "volume snapshot by a Velero VolumeSnapshotter plugin (the data stays with the storage provider)"
                    .to_owned()
            }
            Self::Custom { policy } => {
                format!("custom action of volume policy {}{config}", policy + 1)
            }
            Self::Skipped(Skip::Policy { policy }) => {
                format!("skipped by volume policy {}{config}", policy + 1)
            }
            Self::Skipped(Skip::HostPath) => {
                "skipped: a hostPath volume, which Velero can neither read through a pod nor snapshot"
                    .to_owned()
            }
        }
    }
}

/// What of a Backup (a Schedule's template) decides data paths.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupSettings<'a> {
    /// `spec.snapshotVolumes`: only `Some(false)` turns snapshots off.
    pub snapshot_volumes: Option<bool>,
    /// `spec.snapshotMoveData` (the server's default when unset is taken as false).
    pub snapshot_move_data: bool,
    /// The resource policies the Backup names, parsed.
    pub policies: Option<&'a ResourcePolicies>,
}

/// A claim and its volume as the conditions read them.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeFacts<'a> {
    pub pvc_labels: Option<&'a BTreeMap<String, String>>,
    /// The claim's `status.phase`.
    pub pvc_phase: Option<&'a str>,
    /// Its PersistentVolume, when bound.
    pub pv: Option<PvFacts<'a>>,
}

/// The fields of a PersistentVolume the conditions read.
#[derive(Clone, Copy, Debug, Default)]
pub struct PvFacts<'a> {
    /// `spec.capacity.storage`, in bytes.
    pub capacity: Option<u128>,
    /// `spec.storageClassName` (the PV's, as Velero reads it, not the claim's).
    pub storage_class: Option<&'a str>,
    /// `spec.csi`: driver and volume attributes.
    pub csi: Option<(&'a str, Option<&'a BTreeMap<String, String>>)>,
    /// `spec.nfs`: server and path.
    pub nfs: Option<(&'a str, &'a str)>,
    /// The volume source's name as Velero's `volumeTypes` condition spells it
    /// (`csi`, `hostPath`, `local`, `nfs`, `rbd`, …).
    pub volume_type: Option<&'a str>,
}

impl<'a> PvFacts<'a> {
    /// Read from a PersistentVolume as Velero reads it (volume_types_conditions.go
    /// `getVolumeTypeFromPV`: the first volume source set, in its order).
    pub fn of(pv: &'a k8s_openapi::api::core::v1::PersistentVolume) -> Self {
        let Some(spec) = pv.spec.as_ref() else {
            return Self::default();
        };
        let sources: [(bool, &'static str); 22] = [
            (
                spec.aws_elastic_block_store.is_some(),
                "awsElasticBlockStore",
            ),
            (spec.azure_disk.is_some(), "azureDisk"),
            (spec.azure_file.is_some(), "azureFile"),
            (spec.cephfs.is_some(), "cephfs"),
            (spec.cinder.is_some(), "cinder"),
            (spec.csi.is_some(), "csi"),
            (spec.fc.is_some(), "fc"),
            (spec.flocker.is_some(), "flocker"),
            (spec.flex_volume.is_some(), "flexVolume"),
            (spec.gce_persistent_disk.is_some(), "gcePersistentDisk"),
            (spec.glusterfs.is_some(), "glusterfs"),
            (spec.host_path.is_some(), "hostPath"),
            (spec.iscsi.is_some(), "iscsi"),
            (spec.local.is_some(), "local"),
            (spec.nfs.is_some(), "nfs"),
            (
                spec.photon_persistent_disk.is_some(),
                "photonPersistentDisk",
            ),
            (spec.portworx_volume.is_some(), "portworxVolume"),
            (spec.quobyte.is_some(), "quobyte"),
            (spec.rbd.is_some(), "rbd"),
            (spec.scale_io.is_some(), "scaleIO"),
            (spec.storageos.is_some(), "storageOS"),
            (spec.vsphere_volume.is_some(), "vsphereVolume"),
        ];
        Self {
            capacity: spec
                .capacity
                .as_ref()
                .and_then(|c| c.get("storage"))
                .and_then(|q| quantity_bytes(&q.0)),
            storage_class: spec.storage_class_name.as_deref(),
            csi: spec
                .csi
                .as_ref()
                .map(|c| (c.driver.as_str(), c.volume_attributes.as_ref())),
            nfs: spec
                .nfs
                .as_ref()
                .map(|n| (n.server.as_str(), n.path.as_str())),
            volume_type: sources.iter().find(|(set, _)| *set).map(|(_, name)| *name),
        }
    }
}

/// The path Velero takes for a claim in a Backup of `settings`, when velero-jupyterhub
/// does its part: every user claim is mounted by an annotated pod (the user's server or
/// our helper) at the Backup. The resource policy's first matching action overrides the
/// annotation; a hostPath volume is never copied. (That the data mover could copy an idle
/// CSI claim without any pod is not counted on: it needs Velero's `EnableCSI` feature, a
/// storage class on the claim and a VolumeSnapshotClass for its driver, none of which a
/// Schedule shows; a helper too many costs a pod, one too few loses a home.)
pub fn data_path(settings: &BackupSettings<'_>, volume: &VolumeFacts<'_>) -> DataPath {
    let host_path = volume
        .pv
        .is_some_and(|pv| pv.volume_type == Some("hostPath"));
    let csi = volume.pv.is_some_and(|pv| pv.csi.is_some());
    if let Some((policy, action)) = settings.policies.and_then(|p| p.first_match(volume)) {
        return match action {
            ActionType::FsBackup if host_path => DataPath::Skipped(Skip::HostPath),
            ActionType::FsBackup => DataPath::FsBackup,
            ActionType::Skip => DataPath::Skipped(Skip::Policy { policy }),
            ActionType::Custom => DataPath::Custom { policy },
            ActionType::Snapshot => snapshot(settings, host_path, csi),
        };
    }
    // No policy matched: the pod annotations decide, and every user claim is mounted by
    // an annotated pod at the Backup (the user's server, or our helper): file-system
    // backup, which Velero then does not snapshot too (`ShouldPerformSnapshot` step 2),
    // `snapshotMoveData` or not.
    if host_path {
        DataPath::Skipped(Skip::HostPath)
    } else {
        DataPath::FsBackup
    }
}

/// How the Schedules covering a claim's namespace copy it, given each Schedule's name and
/// settings (in the order to report them): `None` when any of them copies it through a
/// pod, or when none covers it (then only our own pod copies count); else the first
/// Schedule's way.
pub fn schedules_path<'a>(
    schedules: &[(&'a str, BackupSettings<'_>)],
    volume: &VolumeFacts<'_>,
) -> Option<(&'a str, DataPath)> {
    let paths: Vec<(&str, DataPath)> = schedules
        .iter()
        .map(|(name, settings)| (*name, data_path(settings, volume)))
        .collect();
    if paths.iter().any(|(_, p)| p.needs_pod()) {
        return None;
    }
    paths.into_iter().next()
}

impl<'a> BackupSettings<'a> {
    /// A Schedule template's settings, with the resource policies it names (read by the
    /// caller) if any.
    pub fn of(
        template: &crate::velero::BackupTemplate,
        policies: Option<&'a ResourcePolicies>,
    ) -> Self {
        Self {
            snapshot_volumes: template.snapshot_volumes,
            snapshot_move_data: template.snapshot_move_data == Some(true),
            policies,
        }
    }
}

/// How the Schedules with a window open over a claim's namespace copy it, when none of
/// them needs a pod for it: then it gets no backup helper. Without resource policies that
/// is a hostPath volume only (Velero never copies it). `manual`: a window of our own
/// (`velero-jupyterhub backup`) is open there too, whose Backup copies through pods. A
/// Schedule naming resource policies counts as a pod copy: the controller does not read
/// them, and a helper too many costs a pod where one too few loses a home.
pub fn without_pod<'s>(
    open: &[(&'s str, &crate::velero::BackupTemplate)],
    manual: bool,
    volume: &VolumeFacts<'_>,
) -> Option<(&'s str, DataPath)> {
    if manual
        || open.iter().any(|(_, t)| {
            t.resource_policy
                .as_ref()
                .and_then(|r| r.config_map())
                .is_some()
        })
    {
        return None;
    }
    let settings: Vec<(&str, BackupSettings<'_>)> = open
        .iter()
        .map(|(name, t)| (*name, BackupSettings::of(t, None)))
        .collect();
    schedules_path(&settings, volume)
}

/// A snapshot's way (pkg/backup/item_backupper.go `takePVSnapshot`, the CSI action).
fn snapshot(settings: &BackupSettings<'_>, host_path: bool, csi: bool) -> DataPath {
    match (host_path, csi) {
        (true, _) => DataPath::Skipped(Skip::HostPath),
        (false, true) if settings.snapshot_move_data => DataPath::DataMover,
        (false, true) => DataPath::CsiSnapshot,
        (false, false) => DataPath::NativeSnapshot,
    }
}

/// A resource policies ConfigMap's document (`version: v1`), as Velero reads it: unknown
/// fields are errors, as in Velero (yaml.v3 with `KnownFields`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourcePolicies {
    pub version: String,
    #[serde(default)]
    pub volume_policies: Vec<VolumePolicy>,
    /// Which resources a Backup includes; not about volumes (kept so a valid document
    /// parses).
    #[serde(default)]
    pub include_exclude_policy: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumePolicy {
    /// `conditions:` left empty (null) is no condition, as in Velero.
    #[serde(default, deserialize_with = "null_is_default")]
    pub conditions: Conditions,
    pub action: Action,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// A policy's conditions; every one given must match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conditions {
    /// `"lower,upper"`: either side may be empty (0; an upper of 0 is unbounded).
    pub capacity: Option<String>,
    pub storage_class: Option<Vec<String>>,
    pub nfs: Option<NfsCondition>,
    pub csi: Option<CsiCondition>,
    pub volume_types: Option<Vec<String>>,
    pub pvc_labels: Option<BTreeMap<String, String>>,
    pub pvc_phase: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NfsCondition {
    #[serde(default)]
    pub server: String,
    #[serde(default)]
    pub path: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CsiCondition {
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub volume_attributes: BTreeMap<String, String>,
}

fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActionType {
    Skip,
    Snapshot,
    FsBackup,
    Custom,
}

/// A resource policies document Velero would refuse: the Backup ends `FailedValidation`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoliciesError {
    #[error("not a resource policies document: {0}")]
    Parse(String),
    #[error("version {0:?} is not supported (Velero reads version v1)")]
    Version(String),
    #[error(
        "volume policy {policy}: invalid action type {kind:?} (skip, snapshot, fs-backup or custom)"
    )]
    Action { policy: usize, kind: String },
    #[error("volume policy {policy}: capacity {value:?}: {reason}")]
    Capacity {
        policy: usize,
        value: String,
        reason: String,
    },
    #[error("volume policy {policy}: csi volumeAttributes need a driver")]
    CsiWithoutDriver { policy: usize },
}

impl ResourcePolicies {
    /// Parses and validates a document (the ConfigMap's one value, as JSON).
    pub fn parse(document: serde_json::Value) -> Result<Self, PoliciesError> {
        let parsed: Self =
            serde_json::from_value(document).map_err(|e| PoliciesError::Parse(e.to_string()))?;
        if parsed.version != "v1" {
            return Err(PoliciesError::Version(parsed.version));
        }
        for (i, p) in parsed.volume_policies.iter().enumerate() {
            let policy = i + 1;
            if action_type(&p.action.kind).is_none() {
                return Err(PoliciesError::Action {
                    policy,
                    kind: p.action.kind.clone(),
                });
            }
            if let Some(value) = &p.conditions.capacity {
                capacity_range(value).map_err(|reason| PoliciesError::Capacity {
                    policy,
                    value: value.clone(),
                    reason,
                })?;
            }
            if p.conditions
                .csi
                .as_ref()
                .is_some_and(|c| c.driver.is_empty() && !c.volume_attributes.is_empty())
            {
                return Err(PoliciesError::CsiWithoutDriver { policy });
            }
        }
        Ok(parsed)
    }

    /// The first policy whose every condition matches, and its action.
    fn first_match(&self, volume: &VolumeFacts<'_>) -> Option<(usize, ActionType)> {
        self.volume_policies
            .iter()
            .enumerate()
            .find(|(_, p)| p.conditions.matches(volume))
            .and_then(|(i, p)| Some((i, action_type(&p.action.kind)?)))
    }
}

fn action_type(kind: &str) -> Option<ActionType> {
    match kind {
        "skip" => Some(ActionType::Skip),
        "snapshot" => Some(ActionType::Snapshot),
        "fs-backup" => Some(ActionType::FsBackup),
        "custom" => Some(ActionType::Custom),
        _ => None,
    }
}

impl Conditions {
    /// volume_resources.go: each condition present must match.
    fn matches(&self, v: &VolumeFacts<'_>) -> bool {
        let pv = v.pv.unwrap_or_default();
        let capacity = self.capacity.as_deref().is_none_or(|c| {
            capacity_range(c).is_ok_and(|(lo, hi)| {
                let size = pv.capacity.unwrap_or(0);
                size >= lo && (hi == 0 || size <= hi)
            })
        });
        // An empty list is no condition (Velero matches when `len(...) == 0`); a volume
        // without a class never matches a list.
        let class = (self.storage_class.as_ref())
            .filter(|c| !c.is_empty())
            .is_none_or(|classes| {
                (pv.storage_class.filter(|c| !c.is_empty()))
                    .is_some_and(|c| classes.iter().any(|x| x == c))
            });
        let nfs = self.nfs.as_ref().is_none_or(|want| {
            pv.nfs.is_some_and(|(server, path)| {
                (want.server.is_empty() || want.server == server)
                    && (want.path.is_empty() || want.path == path)
            })
        });
        let csi = self.csi.as_ref().is_none_or(|want| {
            pv.csi.is_some_and(|(driver, attributes)| {
                (want.driver.is_empty() || want.driver == driver)
                    && want
                        .volume_attributes
                        .iter()
                        // A missing attribute reads as "" (a Go map's zero value).
                        .all(|(k, val)| {
                            attributes.and_then(|a| a.get(k)).map_or("", String::as_str) == val
                        })
            })
        });
        let types = (self.volume_types.as_ref())
            .filter(|t| !t.is_empty())
            .is_none_or(|types| pv.volume_type.is_some_and(|t| types.iter().any(|x| x == t)));
        // Empty maps and lists are not conditions (BuildPolicy adds them only when set).
        let labels = self
            .pvc_labels
            .as_ref()
            .filter(|l| !l.is_empty())
            .is_none_or(|want| {
                v.pvc_labels
                    .is_some_and(|have| want.iter().all(|(k, val)| have.get(k) == Some(val)))
            });
        let phase = self
            .pvc_phase
            .as_ref()
            .filter(|p| !p.is_empty())
            .is_none_or(|phases| v.pvc_phase.is_some_and(|p| phases.iter().any(|x| x == p)));
        capacity && class && nfs && csi && types && labels && phase
    }
}

/// `"lower,upper"` in bytes (internal/resourcepolicies `parseCapacity`): exactly one
/// comma (`""` is `","`: any size); an empty side is 0; an upper of 0 is unbounded
/// (`isInRange`).
fn capacity_range(value: &str) -> Result<(u128, u128), String> {
    let value = if value.is_empty() { "," } else { value };
    let Some((lo, hi)) = value.split_once(',') else {
        return Err("needs \"lower,upper\" (one comma)".to_owned());
    };
    if hi.contains(',') {
        return Err("needs \"lower,upper\" (one comma)".to_owned());
    }
    let side = |s: &str| match s.trim() {
        "" => Ok(0),
        q => quantity_bytes(q).ok_or_else(|| format!("{q:?} is not a quantity")),
    };
    let (lo, hi) = (side(lo)?, side(hi)?);
    if hi != 0 && lo > hi {
        return Err("lower is above upper".to_owned());
    }
    Ok((lo, hi))
}

/// A Kubernetes quantity (`10Gi`, `500M`, `1.5Ti`, `1e3`) in whole bytes, rounded up as
/// `Quantity.Value()` does; `None` if it is not one.
pub fn quantity_bytes(q: &str) -> Option<u128> {
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    // (multiplier numerator, denominator): exact for every suffix but `m`.
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1000, 1),
        "M" => (1000u128.pow(2), 1),
        "G" => (1000u128.pow(3), 1),
        "T" => (1000u128.pow(4), 1),
        "P" => (1000u128.pow(5), 1),
        "E" => (1000u128.pow(6), 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        s if s.starts_with(['e', 'E']) => (10u128.checked_pow(s[1..].parse().ok()?)?, 1),
        _ => return None,
    };
    let digits = |s: &str| -> Option<u128> {
        if s.is_empty() {
            Some(0)
        } else if s.chars().all(|c| c.is_ascii_digit()) && s.len() <= 30 {
            s.parse().ok()
        } else {
            None
        }
    };
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let value = digits(whole)?
        .checked_mul(scale)?
        .checked_add(digits(fraction)?)?;
    let numerator = value.checked_mul(mul)?;
    let denominator = scale.checked_mul(div)?;
    Some(numerator.div_ceil(denominator))
}
