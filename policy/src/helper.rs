//! The backup helper: a tiny pod that mounts an idle user's claim so Velero's
//! file-system backup, which copies only volumes of Running pods, copies it.
//!
//! Everything here is deterministic: the same claim and options give the same pod, so a
//! second controller (or a restarted one) asks for the same name and cannot duplicate it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::names;

/// What `controller` flags say about every helper.
#[derive(Clone, Debug, PartialEq)]
pub struct HelperOptions {
    /// A pause-like image (`--helper-image`): it must run as a non-root user and do nothing.
    pub image: String,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
}

/// The default helper image (`--helper-image`).
pub const DEFAULT_IMAGE: &str = "registry.k8s.io/pause:3.10";

impl HelperOptions {
    /// `image`, and no tolerations or node selector.
    pub fn with_image(image: &str) -> Self {
        Self {
            image: image.to_owned(),
            tolerations: Vec::new(),
            node_selector: BTreeMap::new(),
        }
    }
}

/// The user claim a helper mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// The claim's `hub.jupyter.org/username` label, copied to the helper.
    pub username: Option<&'a str>,
}

/// The helper's only volume, as named in its backup annotation. Velero matches a restore
/// to the backup by pod name, namespace and volume name, so this never changes.
pub const VOLUME: &str = "data";
const MOUNT_PATH: &str = "/data";
const NAME_PREFIX: &str = "vjh-backup-";
/// The pause image's own user (`65535:65535`), set explicitly so `runAsNonRoot` holds.
const USER: i64 = 65535;

/// The helper's pod name: `vjh-backup-<claim>`, or, when that is longer than 63
/// characters, its first 54 followed by `-` and 8 hex digits of a hash of the claim name.
pub fn helper_name(claim: &str) -> String {
    let full = format!("{NAME_PREFIX}{claim}");
    if full.len() <= 63 {
        return full;
    }
    let head = full[..54].trim_end_matches(['-', '.']);
    format!("{head}-{:08x}", fnv1a32(claim.as_bytes()))
}

/// FNV-1a, 32 bits: stable across versions and platforms (std's hashers are not).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Our helpers' own labels (before any a Schedule's selector adds).
pub fn own_labels(username: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            names::MANAGED_BY.to_owned(),
            names::MANAGED_BY_US.to_owned(),
        ),
        (names::COMPONENT.to_owned(), names::BACKUP_HELPER.to_owned()),
    ]);
    if let Some(user) = username.filter(|u| names::is_label_value(u)) {
        labels.insert(names::JUPYTERHUB_USERNAME.to_owned(), user.to_owned());
    }
    labels
}

/// The backup helper pod for `claim`, carrying `labels` (our own plus what the
/// Schedules' selectors need). Passes the Pod Security `restricted` profile.
pub fn backup_helper(
    claim: &ClaimRef<'_>,
    labels: BTreeMap<String, String>,
    options: &HelperOptions,
) -> Pod {
    let mount = VolumeMount {
        name: VOLUME.to_owned(),
        mount_path: MOUNT_PATH.to_owned(),
        read_only: Some(true),
        ..Default::default()
    };
    let container = Container {
        name: "helper".to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        resources: helper_resources(),
        security_context: Some(restricted_container()),
        volume_mounts: Some(vec![mount]),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(helper_name(claim.name)),
            namespace: Some(claim.namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(
                [
                    (names::VELERO_BACKUP_VOLUMES.to_owned(), VOLUME.to_owned()),
                    (names::HELPER_CLAIM.to_owned(), claim.name.to_owned()),
                ]
                .into_iter()
                .chain(no_mesh_sidecar())
                .collect(),
            ),
            // Deleting the claim deletes its helper (no blockOwnerDeletion: that would
            // need rights on the claim's finalizers).
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "PersistentVolumeClaim".to_owned(),
                name: claim.name.to_owned(),
                uid: claim.uid.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: VOLUME.to_owned(),
                // Not read-only here (only in the container's mount): the kubelet mounts a
                // read-only volume read-only on the node, and a Velero restore of this pod
                // where no webhook converts it writes through that mount.
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.name.to_owned(),
                    read_only: None,
                }),
                ..Default::default()
            }]),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(restricted_pod()),
            termination_grace_period_seconds: Some(0),
            tolerations: (!options.tolerations.is_empty()).then(|| options.tolerations.clone()),
            node_selector: (!options.node_selector.is_empty())
                .then(|| options.node_selector.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The claim a helper pod (as [`backup_helper`] makes it) is for: its
/// `velero-jupyterhub.io/helper-claim` annotation.
pub fn claim_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(names::HELPER_CLAIM)
        .map(String::as_str)
}

/// Pins a helper to `node` with a required node affinity on the node's name (as a
/// DaemonSet's pods are): the scheduler still checks the node's taints, pod slots and
/// volume limits, so a plan that no longer fits leaves the helper Pending (and given up
/// in time), never over a limit.
pub fn pin_to_node(pod: &mut Pod, node: &str) {
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    };
    if let Some(spec) = pod.spec.as_mut() {
        spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".to_owned(),
                            operator: "In".to_owned(),
                            values: Some(vec![node.to_owned()]),
                        }]),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
}

/// Whether `affinity` is exactly what [`pin_to_node`] sets.
pub fn is_pinned(affinity: &k8s_openapi::api::core::v1::Affinity) -> bool {
    let Some(required) = affinity.node_affinity.as_ref().and_then(|n| {
        n.required_during_scheduling_ignored_during_execution
            .as_ref()
    }) else {
        return false;
    };
    affinity.pod_affinity.is_none()
        && affinity.pod_anti_affinity.is_none()
        && match required.node_selector_terms.as_slice() {
            [term] => {
                term.match_expressions.as_ref().is_none_or(Vec::is_empty)
                    && matches!(term.match_fields.as_deref(), Some([field])
                        if field.key == "metadata.name" && field.operator == "In"
                            && field.values.as_ref().is_some_and(|v| v.len() == 1))
            }
            _ => false,
        }
}

/// Annotations that keep service meshes from injecting a sidecar: a helper talks to no
/// one, and an injected container would not be the one pause-like container it must be.
pub fn no_mesh_sidecar() -> [(String, String); 2] {
    [
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        ("linkerd.io/inject".to_owned(), "disabled".to_owned()),
    ]
}

/// A pause-like helper's resources: 1m CPU and 8Mi requested, 32Mi limit.
pub fn helper_resources() -> Option<ResourceRequirements> {
    Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("1m".to_owned())),
            ("memory".to_owned(), Quantity("8Mi".to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("32Mi".to_owned()),
        )])),
        ..Default::default()
    })
}

/// Pod Security `restricted`, pod level: non-root, RuntimeDefault seccomp.
pub fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pod Security `restricted` on the container alone, whatever its pod says: a restore
/// helper keeps its pod's own settings, under which Velero's `restore-wait` (a copy of
/// the user's container's securityContext, possibly root) must still start.
pub fn restricted_container_alone() -> SecurityContext {
    let pod = restricted_pod();
    SecurityContext {
        run_as_user: pod.run_as_user,
        run_as_group: pod.run_as_group,
        seccomp_profile: pod.seccomp_profile,
        ..restricted_container()
    }
}

/// Pod Security `restricted`, container level: no privilege escalation, no
/// capabilities, read-only root file system.
pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::PodFacts;

    #[test]
    fn names_are_short_stable_and_distinct() {
        assert_eq!(helper_name("claim-alice"), "vjh-backup-claim-alice");
        let long_a = format!("claim-{}", "a".repeat(60));
        let long_b = format!("claim-{}b", "a".repeat(59));
        let (a, b) = (helper_name(&long_a), helper_name(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b, "same prefix, different claims");
        assert_eq!(a, helper_name(&long_a), "deterministic");
        // The hash must not change between versions (names are identities): FNV-1a's
        // published test vector for "a", and one of ours.
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"claim-alice"), 0xd9d7_166e);
        // A cut that would end in '-' or '.' is trimmed: the name stays a DNS subdomain.
        let dotted = format!("{}.{}", "b".repeat(42), "c".repeat(30));
        let n = helper_name(&dotted);
        assert!(!n.contains(".-"), "{n}");
    }

    #[test]
    fn helper_is_annotated_read_only_and_restricted() {
        let claim = ClaimRef {
            namespace: "jhub",
            name: "claim-alice",
            uid: "u-1",
            username: Some("alice"),
        };
        let options = HelperOptions {
            image: "registry.k8s.io/pause:3.10".to_owned(),
            tolerations: vec![],
            node_selector: BTreeMap::new(),
        };
        let pod = backup_helper(&claim, own_labels(claim.username), &options);
        assert_eq!(pod.annotation(names::VELERO_BACKUP_VOLUMES), Some(VOLUME));
        assert!(pod.mounted_by_container(VOLUME));
        assert_eq!(
            pod.volumes().collect::<Vec<_>>(),
            vec![(VOLUME, Some("claim-alice"))]
        );
        assert_eq!(pod.label(names::JUPYTERHUB_USERNAME), Some("alice"));
        assert_eq!(pod.label(names::COMPONENT), Some(names::BACKUP_HELPER));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.tolerations, None);
        let c = &spec.containers[0];
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].read_only, Some(true));
        // Read-only in the container only: a volume marked read-only is mounted read-only
        // by the kubelet, and Velero's node-agent, which restores through the pod's volume
        // directory, could not write into it where no webhook converts the re-created
        // helper (a restore into a cluster without velero-jupyterhub).
        let claim_source = spec.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(claim_source.read_only, None, "{claim_source:?}");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("PersistentVolumeClaim", "u-1")
        );
        // A username that is not a valid label value is left out, not sent to fail.
        assert!(!own_labels(Some("alice smith")).contains_key(names::JUPYTERHUB_USERNAME));
    }
}
