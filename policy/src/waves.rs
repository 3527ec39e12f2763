//! Idle users at scale (issue 11): which idle claims the next wave backs up, and on which
//! node each one's helper runs, within what the cluster can hold at once.
//!
//! A Velero Backup copies a volume only while a pod mounting it is Running, so every
//! claim of a wave needs its helper up at the same time: an attached volume and a pod
//! slot on some node. A node has a bounded number of both: `pods` in its allocatable
//! resources (110 by default), and per CSI driver the attach limit its CSINode reports
//! (`spec.drivers[].allocatable.count`: Hetzner 16, AWS EBS ~25–39). The wave takes the
//! claims backed up least recently first (never-backed-up ones before all), so a night
//! that cannot reach everyone still rotates through everybody over several nights, and
//! places each on the eligible node with the most room left (helpers spread out; no node
//! is filled while another idles).
//!
//! Pure: the edge reads Nodes, CSINodes, pods, PersistentVolumes and Backups, and pins
//! each helper to the node chosen here (so the limits hold by construction, not by the
//! scheduler's goodwill).

use std::cmp::Reverse;

use jiff::Timestamp;

use crate::names;

/// An idle user claim waiting for its backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleClaim<'a> {
    pub namespace: &'a str,
    pub claim: &'a str,
    /// When its last completed file-system backup finished; `None`: never.
    pub last_backup: Option<Timestamp>,
    /// The CSI driver of its volume, whose attach limit applies; `None` for a volume that
    /// no attach limit counts (NFS, a driver without one).
    pub driver: Option<&'a str>,
    /// The nodes its volume can attach on (a zonal disk, a local volume), as indexes
    /// into the nodes given to [`next_wave`]; `None`: any node.
    pub nodes: Option<Vec<usize>>,
}

/// What a node can still take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom<'a> {
    pub name: &'a str,
    /// Allocatable pods minus the pods on it now.
    pub free_pods: u32,
    /// Per CSI driver that reports a limit: attachments left (the limit minus the volumes
    /// of that driver attached now). A driver not listed is not limited on this node.
    pub free_attach: Vec<(&'a str, u32)>,
}

impl NodeRoom<'_> {
    /// Helpers for volumes of `driver` this node can still take.
    fn room(&self, driver: Option<&str>) -> u32 {
        let attach = driver.and_then(|d| {
            self.free_attach
                .iter()
                .find(|(name, _)| *name == d)
                .map(|(_, n)| *n)
        });
        attach.map_or(self.free_pods, |a| a.min(self.free_pods))
    }

    fn take(&mut self, driver: Option<&str>) {
        self.free_pods = self.free_pods.saturating_sub(1);
        if let Some((_, n)) =
            driver.and_then(|d| self.free_attach.iter_mut().find(|(name, _)| *name == d))
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// The next wave: each claim (an index into the claims given) with the node (an index
/// into the nodes given) its helper runs on, least recently backed up first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wave {
    pub placed: Vec<(usize, usize)>,
    /// Claims that fit on no eligible node now (their nodes are full): a later wave.
    pub waiting: usize,
}

/// Plans the next wave of at most `max_helpers` helpers.
pub fn next_wave(claims: &[IdleClaim<'_>], nodes: &[NodeRoom<'_>], max_helpers: usize) -> Wave {
    let mut order: Vec<usize> = (0..claims.len()).collect();
    // Never backed up first, then oldest backup first; names break ties (stable plans).
    order.sort_unstable_by(|&a, &b| {
        let (a, b) = (&claims[a], &claims[b]);
        (a.last_backup.is_some(), a.last_backup, a.namespace, a.claim).cmp(&(
            b.last_backup.is_some(),
            b.last_backup,
            b.namespace,
            b.claim,
        ))
    });
    let mut rooms = nodes.to_vec();
    let mut wave = Wave::default();
    let mut pods_left: u64 = rooms.iter().map(|n| u64::from(n.free_pods)).sum();
    for (seen, &i) in order.iter().enumerate() {
        if wave.placed.len() >= max_helpers || pods_left == 0 {
            wave.waiting += order.len() - seen;
            break;
        }
        let claim = &claims[i];
        let best = match &claim.nodes {
            None => best_node(&rooms, 0..rooms.len(), claim.driver),
            Some(eligible) => best_node(
                &rooms,
                eligible.iter().copied().filter(|&n| n < rooms.len()),
                claim.driver,
            ),
        };
        match best {
            Some(n) => {
                rooms[n].take(claim.driver);
                pods_left -= 1;
                wave.placed.push((i, n));
            }
            None => wave.waiting += 1,
        }
    }
    wave
}

/// The eligible node with the most room for `driver`, the first of equals.
fn best_node(
    rooms: &[NodeRoom<'_>],
    eligible: impl Iterator<Item = usize>,
    driver: Option<&str>,
) -> Option<usize> {
    eligible
        .map(|n| (rooms[n].room(driver), Reverse(n)))
        .filter(|(room, _)| *room > 0)
        .max()
        .map(|(_, Reverse(n))| n)
}

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
    /// The Backup's name: `<schedule>-wave<N>-<tick as yyyymmddhhmmss>`, the shape of the
    /// Schedule's own Backups, `<schedule>-<yyyymmddhhmmss>` (pkg/apis/velero/v1/
    /// schedule_types.go `TimestampedName`), in UTC.
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
/// controller makes a scheduled Backup (pkg/builder/backup_builder.go `FromSchedule`):
/// the Schedule's `spec.template` as the spec (storage location, TTL, hooks, resource
/// policy, everything), the template's labels if it has any, else the Schedule's, the
/// Schedule's annotations, and an owner reference to the Schedule when it asks for one
/// (`useOwnerReferencesInBackup`). Then narrowed to the wave: only `namespace`, only the
/// wave's helpers (a label selector on [`WaveId::labels`]) with their claims and
/// volumes.
///
/// One difference, on purpose: no `velero.io/schedule-name` label. Velero's Schedule
/// controller lists Backups with that label and skips its own next tick while any of them
/// is New or InProgress (pkg/controller/schedule_controller.go
/// `checkIfBackupInNewOrProgress`), so a night of waves would make the Schedule skip
/// live users' Backup. Our labels say which Schedule a wave belongs to instead.
///
/// `schedule` is the Schedule object as JSON (metadata and spec).
pub fn wave_backup(
    schedule: &serde_json::Value,
    wave: &WaveId<'_>,
    namespace: &str,
) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let template = &schedule["spec"]["template"];
    let mut spec = template.as_object().cloned().unwrap_or_default();
    spec.remove("metadata");
    // The wave: one namespace, our helpers of this wave, their claims and volumes.
    spec.insert("includedNamespaces".into(), json!([namespace]));
    spec.remove("excludedNamespaces");
    spec.remove("orLabelSelectors");
    spec.remove("excludedResources");
    spec.remove("excludedNamespaceScopedResources");
    spec.remove("includedNamespaceScopedResources");
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

/// A helper of the current wave, as the pod watch sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaveHelper {
    pub phase: HelperPhase,
    pub created: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelperPhase {
    /// Not Running yet (not scheduled, volume attaching, image pulling).
    Pending,
    Running,
    /// Failed, or gone (its user started a server and it was deleted).
    Gone,
}

/// Where the wave's Backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveBackup {
    NotCreated,
    /// Created, not terminal.
    Running,
    /// Terminal: Completed (`true`) or not.
    Done(bool),
}

/// What to do with the current wave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaveStep {
    /// Helpers are still starting: look again by `until` (or on a change).
    WaitForHelpers { until: Timestamp },
    /// Create the wave's Backup now. `given_up`: helpers (indexes) that did not run
    /// within the bound: delete them; their claims go back to the queue (reported, and
    /// retried in a later wave), so one stuck volume does not hold the wave.
    Back { given_up: Vec<usize> },
    /// The Backup runs.
    WaitForBackup,
    /// Over: delete the wave's helpers, then plan the next wave. `completed`: whether its
    /// Backup completed (if not, its claims keep their old last-backup time and so come
    /// first in the next wave).
    Over { completed: bool },
}

/// The current wave's next step. `start_bound`: how long a helper may take to run.
pub fn wave_step(
    helpers: &[WaveHelper],
    backup: WaveBackup,
    now: Timestamp,
    start_bound: jiff::SignedDuration,
) -> WaveStep {
    match backup {
        WaveBackup::Done(completed) => return WaveStep::Over { completed },
        WaveBackup::Running => return WaveStep::WaitForBackup,
        WaveBackup::NotCreated => {}
    }
    let deadline = |h: &WaveHelper| h.created.checked_add(start_bound).unwrap_or(Timestamp::MAX);
    let pending: Vec<usize> = helpers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.phase == HelperPhase::Pending)
        .map(|(i, _)| i)
        .collect();
    let running = helpers.iter().any(|h| h.phase == HelperPhase::Running);
    let waiting_until = pending
        .iter()
        .map(|&i| deadline(&helpers[i]))
        .filter(|&d| d > now)
        .max();
    match waiting_until {
        Some(until) => WaveStep::WaitForHelpers { until },
        // Everyone Running, gone, or past the bound. A wave with nobody Running backs up
        // nothing: over (uncompleted), its claims back to the queue.
        None if !running => WaveStep::Over { completed: false },
        None => WaveStep::Back { given_up: pending },
    }
}

/// The nodes (indexes into `nodes`, each a name and its labels) a volume can attach on,
/// from its PersistentVolume's `spec.nodeAffinity.required` (a zonal disk, a local
/// volume); `None` when it says nothing (any node). The terms are ORed and each term's
/// requirements ANDed, with the operators of core/v1 NodeSelectorRequirement (In, NotIn,
/// Exists, DoesNotExist, Gt, Lt); `matchFields` knows `metadata.name` only, as the
/// scheduler does. An operator we do not know matches nothing (the helper would not
/// schedule there either).
pub fn volume_nodes(
    affinity: Option<&k8s_openapi::api::core::v1::VolumeNodeAffinity>,
    nodes: &[(&str, &std::collections::BTreeMap<String, String>)],
) -> Option<Vec<usize>> {
    use k8s_openapi::api::core::v1::NodeSelectorRequirement;
    let terms = &affinity?.required.as_ref()?.node_selector_terms;
    let holds = |r: &NodeSelectorRequirement, value: Option<&str>| {
        let values = r.values.as_deref().unwrap_or_default();
        let number = |v: &str| v.parse::<i64>().ok();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.iter().any(|w| w == v)),
            "NotIn" => value.is_none_or(|v| values.iter().all(|w| w != v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            "Gt" | "Lt" => match (
                value.and_then(number),
                values.first().and_then(|w| number(w)),
            ) {
                (Some(v), Some(w)) if values.len() == 1 => {
                    if r.operator == "Gt" {
                        v > w
                    } else {
                        v < w
                    }
                }
                _ => false,
            },
            _ => false,
        }
    };
    let matches = |(name, labels): &(&str, &std::collections::BTreeMap<String, String>)| {
        terms.iter().any(|term| {
            let expressions = term.match_expressions.as_deref().unwrap_or_default();
            let fields = term.match_fields.as_deref().unwrap_or_default();
            // An empty term matches nothing (core/v1 NodeSelectorTerm).
            (!expressions.is_empty() || !fields.is_empty())
                && expressions
                    .iter()
                    .all(|r| holds(r, labels.get(&r.key).map(String::as_str)))
                && fields
                    .iter()
                    .all(|r| r.key == "metadata.name" && holds(r, Some(name)))
        })
    };
    Some(
        nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| matches(n))
            .map(|(i, _)| i)
            .collect(),
    )
}

/// What each schedulable node can still take, from the cluster's objects: a Node's
/// allocatable `pods` minus the pods bound to it that still hold a slot (not Succeeded or
/// Failed), and per CSI driver its CSINode's `allocatable.count` minus the
/// VolumeAttachments of that driver to that node. Nodes that are unschedulable
/// (cordoned) or not Ready are left out. The scheduler counts the same way
/// (NodeResourcesFit for pods, NodeVolumeLimits for attachments).
pub fn node_rooms<'a>(
    nodes: &'a [k8s_openapi::api::core::v1::Node],
    csinodes: &'a [k8s_openapi::api::storage::v1::CSINode],
    pods: &[k8s_openapi::api::core::v1::Pod],
    attachments: &[k8s_openapi::api::storage::v1::VolumeAttachment],
) -> Vec<NodeRoom<'a>> {
    use std::collections::HashMap;
    let mut pods_on: HashMap<&str, u32> = HashMap::new();
    for pod in pods {
        let done = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|_| !done)
        {
            *pods_on.entry(node).or_default() += 1;
        }
    }
    let mut attached: HashMap<(&str, &str), u32> = HashMap::new();
    for a in attachments {
        *attached
            .entry((a.spec.node_name.as_str(), a.spec.attacher.as_str()))
            .or_default() += 1;
    }
    nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.as_deref()?;
            let spec = node.spec.as_ref();
            if spec.and_then(|s| s.unschedulable) == Some(true) {
                return None;
            }
            let status = node.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if !ready {
                return None;
            }
            let allocatable = status
                .allocatable
                .as_ref()
                .and_then(|a| a.get("pods"))
                .and_then(|q| q.0.parse::<u32>().ok())
                .unwrap_or(0);
            let free_pods = allocatable.saturating_sub(pods_on.get(name).copied().unwrap_or(0));
            let free_attach = csinodes
                .iter()
                .filter(|c| c.metadata.name.as_deref() == Some(name))
                .flat_map(|c| c.spec.drivers.iter())
                .filter_map(|d| {
                    let limit = u32::try_from(d.allocatable.as_ref()?.count?).ok()?;
                    let used = attached.get(&(name, d.name.as_str())).copied().unwrap_or(0);
                    Some((d.name.as_str(), limit.saturating_sub(used)))
                })
                .collect();
            Some(NodeRoom {
                name,
                free_pods,
                free_attach,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn claim(name: &str, last: Option<&str>) -> IdleClaim<'static> {
        IdleClaim {
            namespace: "jhub",
            claim: Box::leak(name.to_owned().into_boxed_str()),
            last_backup: last.map(t),
            driver: Some("csi.hetzner.cloud"),
            nodes: None,
        }
    }

    fn node(name: &'static str, pods: u32, attach: u32) -> NodeRoom<'static> {
        NodeRoom {
            name,
            free_pods: pods,
            free_attach: vec![("csi.hetzner.cloud", attach)],
        }
    }

    /// The wave as `claim@node` strings, in placement order.
    fn show(claims: &[IdleClaim<'_>], nodes: &[NodeRoom<'_>], wave: &Wave) -> Vec<String> {
        wave.placed
            .iter()
            .map(|&(c, n)| format!("{}@{}", claims[c].claim, nodes[n].name))
            .collect()
    }

    #[test]
    fn least_recently_backed_up_first_spread_over_nodes_within_limits() {
        let claims = vec![
            claim("claim-fresh", Some("2026-11-27T03:00:00Z")),
            claim("claim-old", Some("2026-11-01T03:00:00Z")),
            claim("claim-never-b", None),
            claim("claim-never-a", None),
            claim("claim-older", Some("2026-10-01T03:00:00Z")),
        ];
        let nodes = vec![node("a", 110, 2), node("b", 110, 1)];
        let wave = next_wave(&claims, &nodes, 10);
        assert_eq!(
            show(&claims, &nodes, &wave),
            ["claim-never-a@a", "claim-never-b@a", "claim-older@b"],
            "never first (by name), then oldest; a has room for 2 attachments, b for 1 (the most room wins, the first node of equals)"
        );
        assert_eq!(wave.waiting, 2);
    }

    #[test]
    fn limits_table() {
        let claims: Vec<_> = (0..6).map(|i| claim(&format!("claim-{i}"), None)).collect();
        let cases: Vec<(&str, Vec<NodeRoom<'static>>, usize, usize, usize)> = vec![
            // (case, nodes, max_helpers, placed, waiting)
            (
                "max_helpers caps the wave",
                vec![node("a", 110, 16)],
                4,
                4,
                2,
            ),
            ("pod slots cap it", vec![node("a", 3, 16)], 10, 3, 3),
            (
                "attach slots cap it",
                vec![node("a", 110, 2), node("b", 110, 1)],
                10,
                3,
                3,
            ),
            (
                "a full node takes nothing",
                vec![node("a", 0, 16), node("b", 110, 0)],
                10,
                0,
                6,
            ),
            ("no nodes at all", vec![], 10, 0, 6),
            ("room for everyone", vec![node("a", 110, 16)], 10, 6, 0),
        ];
        for (name, nodes, max, placed, waiting) in cases {
            let wave = next_wave(&claims, &nodes, max);
            assert_eq!(
                (wave.placed.len(), wave.waiting),
                (placed, waiting),
                "{name}"
            );
            // Never more on a node than its pod and attach room.
            for (n, room) in nodes.iter().enumerate() {
                let on = wave.placed.iter().filter(|&&(_, at)| at == n).count() as u32;
                assert!(
                    on <= room.room(Some("csi.hetzner.cloud")),
                    "{name}: node {n}"
                );
            }
        }
    }

    /// A Schedule as users write it (Velero's docs: a TTL, a storage location, a hook, a
    /// resource policy, template labels), read as the API server returns it.
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
        let backup = wave_backup(&schedule, &wave, "jhub");
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
        let backup = wave_backup(&plain, &wave, "jhub");
        assert_eq!(backup["metadata"]["labels"]["team"], "platform");
        assert!(backup["metadata"].get("ownerReferences").is_none());
        assert!(
            backup["metadata"]["labels"]
                .get("velero.io/schedule-name")
                .is_none()
        );
    }

    #[test]
    fn wave_steps_table() {
        use HelperPhase::*;
        let bound = jiff::SignedDuration::from_mins(5);
        let now = t("2026-11-28T03:10:00Z");
        let h = |phase, created: &str| WaveHelper {
            phase,
            created: t(created),
        };
        let cases: Vec<(&str, Vec<WaveHelper>, WaveBackup, WaveStep)> = vec![
            (
                "all running: back up",
                vec![
                    h(Running, "2026-11-28T03:08:00Z"),
                    h(Running, "2026-11-28T03:09:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::Back { given_up: vec![] },
            ),
            (
                "one still starting within its bound: wait for it",
                vec![
                    h(Running, "2026-11-28T03:08:00Z"),
                    h(Pending, "2026-11-28T03:09:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::WaitForHelpers {
                    until: t("2026-11-28T03:14:00Z"),
                },
            ),
            (
                "one stuck past its bound: back up without it",
                vec![
                    h(Running, "2026-11-28T03:08:00Z"),
                    h(Pending, "2026-11-28T03:04:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::Back { given_up: vec![1] },
            ),
            (
                "a user took one over: the rest go on",
                vec![
                    h(Gone, "2026-11-28T03:08:00Z"),
                    h(Running, "2026-11-28T03:08:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::Back { given_up: vec![] },
            ),
            (
                "nobody ran: over, uncompleted",
                vec![
                    h(Pending, "2026-11-28T03:00:00Z"),
                    h(Gone, "2026-11-28T03:08:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::Over { completed: false },
            ),
            (
                "backup running",
                vec![h(Running, "2026-11-28T03:08:00Z")],
                WaveBackup::Running,
                WaveStep::WaitForBackup,
            ),
            (
                "backup completed",
                vec![h(Running, "2026-11-28T03:08:00Z")],
                WaveBackup::Done(true),
                WaveStep::Over { completed: true },
            ),
            (
                "backup failed",
                vec![h(Running, "2026-11-28T03:08:00Z")],
                WaveBackup::Done(false),
                WaveStep::Over { completed: false },
            ),
        ];
        for (name, helpers, backup, want) in cases {
            assert_eq!(wave_step(&helpers, backup, now, bound), want, "{name}");
        }
    }

    #[test]
    fn volume_node_affinity_as_the_scheduler_reads_it() {
        use std::collections::BTreeMap;
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let (a, b, c) = (
            labels(&[("topology.kubernetes.io/zone", "fsn1"), ("disks", "12")]),
            labels(&[("topology.kubernetes.io/zone", "nbg1"), ("disks", "4")]),
            labels(&[("kubernetes.io/hostname", "c")]),
        );
        let nodes = [("a", &a), ("b", &b), ("c", &c)];
        let affinity =
            |terms: serde_json::Value| -> k8s_openapi::api::core::v1::VolumeNodeAffinity {
                serde_json::from_value(
                    serde_json::json!({"required": {"nodeSelectorTerms": terms}}),
                )
                .unwrap()
            };
        let cases: Vec<(&str, serde_json::Value, Vec<usize>)> = vec![
            (
                "a Hetzner volume's zone (In)",
                serde_json::json!([{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["fsn1"]}]}]),
                vec![0],
            ),
            (
                "terms are ORed",
                serde_json::json!([
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["fsn1"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}]}]),
                vec![0, 2],
            ),
            (
                "requirements are ANDed",
                serde_json::json!([{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "Exists"},
                {"key": "disks", "operator": "Gt", "values": ["5"]}]}]),
                vec![0],
            ),
            (
                "NotIn and DoesNotExist hold without the label",
                serde_json::json!([{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["fsn1"]},
                {"key": "gpu", "operator": "DoesNotExist"}]}]),
                vec![1, 2],
            ),
            (
                "Lt needs one integer",
                serde_json::json!([{"matchExpressions": [
                {"key": "disks", "operator": "Lt", "values": ["5", "6"]}]}]),
                vec![],
            ),
            (
                "an empty term matches nothing",
                serde_json::json!([{}]),
                vec![],
            ),
            (
                "an unknown operator matches nothing",
                serde_json::json!([{"matchExpressions": [
                {"key": "disks", "operator": "Near", "values": ["4"]}]}]),
                vec![],
            ),
        ];
        for (name, terms, want) in cases {
            assert_eq!(
                volume_nodes(Some(&affinity(terms)), &nodes),
                Some(want),
                "{name}"
            );
        }
        assert_eq!(volume_nodes(None, &nodes), None, "no affinity: any node");
    }

    /// Two user nodes as a Hetzner cluster reports them (CSINode limit 16), one cordoned
    /// and one not Ready; pods and attachments on them.
    #[test]
    fn node_rooms_count_what_the_scheduler_counts() {
        use k8s_openapi::api::core::v1::{Node, Pod};
        use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
        use serde_json::json;
        let node = |name: &str, ready: &str, cordoned: bool| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"unschedulable": cordoned},
                "status": {"allocatable": {"pods": "110"}, "conditions": [{"type": "Ready", "status": ready}]}})).unwrap()
        };
        let nodes = vec![
            node("a", "True", false),
            node("b", "True", false),
            node("c", "True", true),
            node("d", "False", false),
        ];
        let csinode = |name: &str| -> CSINode {
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"drivers": [
                {"name": "csi.hetzner.cloud", "nodeID": "1", "allocatable": {"count": 16}},
                {"name": "nfs.csi.k8s.io", "nodeID": "1"}]}}))
            .unwrap()
        };
        let csinodes = vec![csinode("a"), csinode("b")];
        let pod = |node: &str, phase: &str| -> Pod {
            serde_json::from_value(
                json!({"spec": {"nodeName": node, "containers": []}, "status": {"phase": phase}}),
            )
            .unwrap()
        };
        let mut pods: Vec<Pod> = (0..100).map(|_| pod("a", "Running")).collect();
        pods.push(pod("a", "Succeeded"));
        pods.push(pod("b", "Pending"));
        let attachment = |node: &str, driver: &str| -> VolumeAttachment {
            serde_json::from_value(
                json!({"metadata": {"name": "x"}, "spec": {"attacher": driver, "nodeName": node,
                "source": {"persistentVolumeName": "pv"}}}),
            )
            .unwrap()
        };
        let attachments: Vec<_> = (0..12)
            .map(|_| attachment("a", "csi.hetzner.cloud"))
            .chain([attachment("b", "other")])
            .collect();
        let rooms = node_rooms(&nodes, &csinodes, &pods, &attachments);
        assert_eq!(
            rooms,
            vec![
                NodeRoom {
                    name: "a",
                    free_pods: 10,
                    free_attach: vec![("csi.hetzner.cloud", 4)]
                },
                NodeRoom {
                    name: "b",
                    free_pods: 109,
                    free_attach: vec![("csi.hetzner.cloud", 16)]
                },
            ],
            "cordoned c and not-Ready d left out; finished pods and drivers without a limit not counted"
        );
    }

    /// A night in miniature, pure: 60 idle claims, 3 nodes with room for 4 attachments
    /// each. Wave after wave (each Backup takes 10 minutes; one helper in the second wave
    /// never starts), everyone is backed up, in 6 waves, never more than 4 helpers on a
    /// node, the stuck claim first in the wave after.
    #[test]
    fn a_night_of_waves_reaches_everyone_within_the_limits() {
        let names: Vec<String> = (0..60).map(|i| format!("claim-{i:02}")).collect();
        let mut last: Vec<Option<Timestamp>> = (0..60)
            .map(|i| (i % 2 == 0).then(|| t("2026-11-20T03:00:00Z")))
            .collect();
        let nodes = vec![node("a", 110, 4), node("b", 110, 4), node("c", 110, 4)];
        let bound = jiff::SignedDuration::from_mins(5);
        let night = t("2026-11-28T03:00:00Z");
        let mut now = night;
        let mut waves = 0;
        let mut stuck_claim = None;
        while last.iter().any(|l| l.is_none_or(|l| l < night)) {
            waves += 1;
            assert!(waves <= 10, "the night does not end");
            let claims: Vec<IdleClaim<'_>> = names
                .iter()
                .zip(&last)
                .filter(|(_, l)| l.is_none_or(|l| l < night))
                .map(|(n, l)| IdleClaim {
                    namespace: "jhub",
                    claim: n,
                    last_backup: *l,
                    driver: Some("csi.hetzner.cloud"),
                    nodes: None,
                })
                .collect();
            let wave = next_wave(&claims, &nodes, usize::MAX);
            for (n, room) in nodes.iter().enumerate() {
                let on = wave.placed.iter().filter(|&&(_, at)| at == n).count();
                assert!(on <= 4, "wave {waves}: {on} helpers on {}", room.name);
            }
            if waves == 3 {
                assert_eq!(
                    claims[wave.placed[0].0].claim,
                    stuck_claim.unwrap_or_default(),
                    "the claim left out last wave goes first"
                );
            }
            // Helpers come up within a minute, except one in wave 2.
            let helpers: Vec<WaveHelper> = wave
                .placed
                .iter()
                .enumerate()
                .map(|(k, _)| WaveHelper {
                    phase: if waves == 2 && k == 0 {
                        HelperPhase::Pending
                    } else {
                        HelperPhase::Running
                    },
                    created: now,
                })
                .collect();
            now = now.checked_add(jiff::SignedDuration::from_mins(1)).unwrap();
            let given_up = match wave_step(&helpers, WaveBackup::NotCreated, now, bound) {
                WaveStep::Back { given_up } => given_up,
                WaveStep::WaitForHelpers { until } => {
                    now = until;
                    match wave_step(&helpers, WaveBackup::NotCreated, now, bound) {
                        WaveStep::Back { given_up } => given_up,
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            };
            now = now
                .checked_add(jiff::SignedDuration::from_mins(10))
                .unwrap();
            assert_eq!(
                wave_step(&helpers, WaveBackup::Done(true), now, bound),
                WaveStep::Over { completed: true }
            );
            for (k, &(c, _)) in wave.placed.iter().enumerate() {
                let name = claims[c].claim;
                if given_up.contains(&k) {
                    stuck_claim = Some(name);
                    continue;
                }
                let i = names.iter().position(|n| n == name).unwrap();
                last[i] = Some(now);
            }
        }
        assert_eq!(waves, 6, "60 claims, 12 at a time, one retried: 6 waves");
        let took = now.duration_since(night);
        assert!(took < jiff::SignedDuration::from_mins(90), "{took:?}");
    }

    #[test]
    fn a_claim_goes_only_where_its_volume_can_attach() {
        let mut zonal = claim("claim-zonal", None);
        zonal.nodes = Some(vec![1]);
        let mut nfs = claim("claim-nfs", Some("2026-01-01T00:00:00Z"));
        nfs.driver = None;
        let mut stuck = claim("claim-stuck", None);
        stuck.nodes = Some(vec![7]); // a node that is gone
        let claims = vec![zonal, nfs, stuck];
        // Node a has attach room for nothing, but NFS counts no attachments.
        let nodes = vec![node("a", 110, 0), node("b", 110, 5)];
        let wave = next_wave(&claims, &nodes, 10);
        assert_eq!(
            show(&claims, &nodes, &wave),
            ["claim-zonal@b", "claim-nfs@a"]
        );
        assert_eq!(wave.waiting, 1);
    }
}
