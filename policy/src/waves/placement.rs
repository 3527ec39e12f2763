//! Which idle claims the next wave takes, and on which node each one's helper runs.
//!
//! A node holds a bounded number of helpers: `pods` in its allocatable resources (110 by
//! default), and per CSI driver the attach limit its CSINode reports
//! (`spec.drivers[].allocatable.count`: Hetzner 16, AWS EBS ~25–39). A wave takes the
//! claims backed up least recently first (never-backed-up ones before all), so a night
//! that cannot reach everyone still rotates through everybody over several nights, and
//! places each on the eligible node with the most room left (helpers spread out; no node
//! is filled while another idles). The edge pins each helper to the node chosen here, so
//! the limits hold by construction, not by the scheduler's goodwill.

use std::cmp::Reverse;

use jiff::Timestamp;

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
    /// Per CSI driver on the node (its CSINode lists it): attachments left (the limit
    /// minus the volumes of that driver in use there; `u32::MAX` when it reports no
    /// limit). A volume of a driver not listed cannot attach here: its node plugin is
    /// not running (a new node still registering, a node pool without it).
    pub free_attach: Vec<(&'a str, u32)>,
}

impl NodeRoom<'_> {
    /// Helpers for volumes of `driver` this node can still take.
    fn room(&self, driver: Option<&str>) -> u32 {
        let Some(driver) = driver else {
            return self.free_pods;
        };
        self.free_attach
            .iter()
            .find(|(name, _)| *name == driver)
            .map_or(0, |(_, n)| (*n).min(self.free_pods))
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

/// What helpers leave free on every node: pod slots and, per CSI driver with an attach
/// limit, attachments. Velero (1.17 and later) copies each volume in a hosting pod bound
/// to its node (`pkg/exposer/pod_volume.go`), as many at once as the node-agent's load
/// concurrency, and a user who starts a server must still find a pod slot and an
/// attachment there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headroom {
    pub pods: u32,
    pub attachments: u32,
}

impl Headroom {
    /// The node-agent's default load concurrency (1) and three user servers; one
    /// attachment for a user's server.
    pub const DEFAULT: Self = Self {
        pods: 4,
        attachments: 1,
    };
    /// Nothing kept free (the benchmarks and tests of placement alone).
    pub const NONE: Self = Self {
        pods: 0,
        attachments: 0,
    };
}

/// A pod bound to a node, as [`node_rooms`] counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOnNode<'a> {
    pub node: &'a str,
    /// Not Succeeded or Failed: it holds a pod slot.
    pub holds_slot: bool,
    /// Its volumes that an attach limit counts: (CSI driver, PersistentVolume name).
    pub volumes: Vec<(&'a str, &'a str)>,
}

/// What each node a helper may use can still take, from the cluster's objects: a Node's
/// allocatable `pods` minus the pods bound to it that hold a slot, and per CSI driver its
/// CSINode's `allocatable.count` minus the distinct volumes of that driver in use there:
/// mounted by a pod bound to it, or attached (a VolumeAttachment, until the volume is
/// detached). The scheduler counts the same way (NodeResourcesFit for pods,
/// NodeVolumeLimits for volumes), less the `headroom` helpers must leave. Left out: nodes that are unschedulable (cordoned), not
/// Ready, tainted with a NoSchedule or NoExecute taint the helpers do not tolerate, or
/// without the helpers' node selector labels. `slots_elsewhere`: pod slots taken on each
/// node by pods known only by count (the controller keeps no record of pods outside the
/// hubs; their attached volumes count through their VolumeAttachments).
pub fn node_rooms<'a>(
    nodes: &[&'a k8s_openapi::api::core::v1::Node],
    csinodes: &[&'a k8s_openapi::api::storage::v1::CSINode],
    pods: &[PodOnNode<'_>],
    slots_elsewhere: &[(&str, u32)],
    attachments: &[&k8s_openapi::api::storage::v1::VolumeAttachment],
    helper: &crate::helper::HelperOptions,
    headroom: Headroom,
) -> Vec<NodeRoom<'a>> {
    use std::collections::{HashMap, HashSet};
    let mut pods_on: HashMap<&str, u32> = HashMap::new();
    for &(node, n) in slots_elsewhere {
        *pods_on.entry(node).or_default() += n;
    }
    let mut volumes_on: HashSet<(&str, &str, &str)> = HashSet::new();
    for pod in pods {
        if pod.holds_slot {
            *pods_on.entry(pod.node).or_default() += 1;
            for &(driver, pv) in &pod.volumes {
                volumes_on.insert((pod.node, driver, pv));
            }
        }
    }
    for a in attachments {
        let pv = a
            .spec
            .source
            .persistent_volume_name
            .as_deref()
            .unwrap_or_default();
        volumes_on.insert((a.spec.node_name.as_str(), a.spec.attacher.as_str(), pv));
    }
    let mut used: HashMap<(&str, &str), u32> = HashMap::new();
    for (node, driver, _) in volumes_on {
        *used.entry((node, driver)).or_default() += 1;
    }
    nodes
        .iter()
        .copied()
        .filter(|node| usable(node, helper))
        .filter_map(|node| {
            let name = node.metadata.name.as_deref()?;
            let allocatable = node
                .status
                .as_ref()?
                .allocatable
                .as_ref()
                .and_then(|a| a.get("pods"))
                .and_then(|q| q.0.parse::<u32>().ok())
                .unwrap_or(0);
            let free_pods = allocatable
                .saturating_sub(pods_on.get(name).copied().unwrap_or(0))
                .saturating_sub(headroom.pods);
            let free_attach = csinodes
                .iter()
                .filter(|c| c.metadata.name.as_deref() == Some(name))
                .flat_map(|c| c.spec.drivers.iter())
                .map(|d| {
                    let used = used.get(&(name, d.name.as_str())).copied().unwrap_or(0);
                    let left = match d.allocatable.as_ref().and_then(|a| a.count) {
                        None => u32::MAX,
                        Some(limit) => u32::try_from(limit)
                            .unwrap_or(0)
                            .saturating_sub(used)
                            .saturating_sub(headroom.attachments),
                    };
                    (d.name.as_str(), left)
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

/// Whether a helper may run on `node`: schedulable, Ready, its NoSchedule and NoExecute
/// taints tolerated (core/v1 Toleration matching), and the helpers' node selector met.
fn usable(node: &k8s_openapi::api::core::v1::Node, helper: &crate::helper::HelperOptions) -> bool {
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable) == Some(true) {
        return false;
    }
    let ready = node.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    let labels = node.metadata.labels.as_ref();
    let selected = helper
        .node_selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let tolerated = spec
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect != "PreferNoSchedule")
        .all(|taint| {
            helper.tolerations.iter().any(|t| {
                let key = t.key.as_deref().unwrap_or_default();
                let exists = t.operator.as_deref() == Some("Exists");
                let effect = t.effect.as_deref().unwrap_or_default();
                (effect.is_empty() || effect == taint.effect)
                    && (key.is_empty() && exists
                        || key == taint.key
                            && (exists
                                || t.value.as_deref().unwrap_or_default()
                                    == taint.value.as_deref().unwrap_or_default()))
            })
        });
    ready && selected && tolerated
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waves::test_support::{claim, node};

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

    /// User nodes as a Hetzner cluster reports them (CSINode limit 16): one cordoned, one
    /// not Ready, one tainted for GPUs, one without the helpers' node selector label;
    /// pods, their volumes and attachments on them.
    #[test]
    fn node_rooms_count_what_the_scheduler_counts() {
        use k8s_openapi::api::core::v1::Node;
        use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
        use serde_json::json;
        let node = |name: &str,
                    ready: &str,
                    cordoned: bool,
                    taints: serde_json::Value,
                    pool: &str|
         -> Node {
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"pool": pool}},
                "spec": {"unschedulable": cordoned, "taints": taints},
                "status": {"allocatable": {"pods": "110"}, "conditions": [{"type": "Ready", "status": ready}]}})).unwrap()
        };
        let user_taint = json!([{"key": "hub.jupyter.org/dedicated", "value": "user", "effect": "NoSchedule"},
                                {"key": "spot", "value": "yes", "effect": "PreferNoSchedule"}]);
        let nodes = [
            node("a", "True", false, user_taint.clone(), "user"),
            node("b", "True", false, json!([]), "user"),
            node("c", "True", true, json!([]), "user"),
            node("d", "False", false, json!([]), "user"),
            node(
                "gpu",
                "True",
                false,
                json!([{"key": "nvidia.com/gpu", "value": "true", "effect": "NoExecute"}]),
                "user",
            ),
            node("core", "True", false, json!([]), "core"),
        ];
        let csinode = |name: &str| -> CSINode {
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"drivers": [
                {"name": "csi.hetzner.cloud", "nodeID": "1", "allocatable": {"count": 16}},
                {"name": "nfs.csi.k8s.io", "nodeID": "1"}]}}))
            .unwrap()
        };
        let csinodes = [csinode("a"), csinode("b")];
        let pv_names: Vec<String> = (0..100).map(|i| format!("pv-{i}")).collect();
        let mut pods: Vec<PodOnNode<'_>> = (0..100)
            .map(|i| PodOnNode {
                node: "a",
                holds_slot: true,
                // Ten pods mount a Hetzner volume each; pv-0..pv-7 are attached too.
                volumes: if i < 10 {
                    vec![("csi.hetzner.cloud", pv_names[i].as_str())]
                } else {
                    vec![]
                },
            })
            .collect();
        pods.push(PodOnNode {
            node: "a",
            holds_slot: false,
            volumes: vec![("csi.hetzner.cloud", "pv-done")],
        });
        pods.push(PodOnNode {
            node: "b",
            holds_slot: true,
            volumes: vec![],
        });
        let attachment = |node: &str, driver: &str, pv: &str| -> VolumeAttachment {
            serde_json::from_value(
                json!({"metadata": {"name": "x"}, "spec": {"attacher": driver, "nodeName": node,
                "source": {"persistentVolumeName": pv}}}),
            )
            .unwrap()
        };
        // pv-0..pv-7 mounted and attached (counted once), pv-a1/pv-a2 still attached after
        // their pods went: 12 in use on a.
        let attachments: Vec<_> = (0..8)
            .map(|i| attachment("a", "csi.hetzner.cloud", &pv_names[i]))
            .chain([
                attachment("a", "csi.hetzner.cloud", "pv-a1"),
                attachment("a", "csi.hetzner.cloud", "pv-a2"),
                attachment("b", "other", "pv-b"),
            ])
            .collect();
        let mut helper = crate::helper::HelperOptions::with_image("pause");
        helper.tolerations = serde_json::from_value(json!([
            {"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user", "effect": "NoSchedule"}]))
        .unwrap();
        helper.node_selector = [("pool".to_owned(), "user".to_owned())].into();
        let (nodes, csinodes, attachments): (Vec<_>, Vec<_>, Vec<_>) = (
            nodes.iter().collect(),
            csinodes.iter().collect(),
            attachments.iter().collect(),
        );
        // Nine pods kept only by count on b (outside the hubs), three on a node not listed.
        let elsewhere = [("b", 9), ("gone", 3)];
        let rooms = node_rooms(
            &nodes,
            &csinodes,
            &pods,
            &elsewhere,
            &attachments,
            &helper,
            Headroom::NONE,
        );
        assert_eq!(
            rooms,
            vec![
                NodeRoom {
                    name: "a",
                    free_pods: 10,
                    free_attach: vec![("csi.hetzner.cloud", 4), ("nfs.csi.k8s.io", u32::MAX)]
                },
                NodeRoom {
                    name: "b",
                    free_pods: 100,
                    free_attach: vec![("csi.hetzner.cloud", 16), ("nfs.csi.k8s.io", u32::MAX)]
                },
            ],
            "cordoned c, not-Ready d, untolerated gpu and unselected core left out; finished pods not counted; a driver without a limit unlimited"
        );
        // The GPU node has no CSINode entry for the driver: nothing of it attaches there.
        assert_eq!(rooms[0].room(Some("csi.other")), 0);
        assert_eq!(rooms[0].room(None), 10, "a volume no attach limit counts");
        // Tolerating everything (an empty key with Exists) takes the GPU node in.
        helper.tolerations = serde_json::from_value(json!([{"operator": "Exists"}])).unwrap();
        let rooms = node_rooms(
            &nodes,
            &csinodes,
            &pods,
            &[],
            &attachments,
            &helper,
            Headroom::NONE,
        );
        let names: Vec<&str> = rooms.iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "b", "gpu"]);
        // The headroom helpers leave for Velero's hosting pods and users' servers: pod
        // slots, and attachments of a driver with a limit (not of one without).
        let rooms = node_rooms(
            &nodes,
            &csinodes,
            &pods,
            &elsewhere,
            &attachments,
            &helper,
            Headroom::DEFAULT,
        );
        assert_eq!(
            (rooms[0].free_pods, &rooms[0].free_attach),
            (
                6,
                &vec![("csi.hetzner.cloud", 3), ("nfs.csi.k8s.io", u32::MAX)]
            )
        );
        assert_eq!(rooms[1].free_pods, 96);
        let tight = Headroom {
            pods: 20,
            attachments: 16,
        };
        let rooms = node_rooms(&nodes, &csinodes, &pods, &[], &attachments, &helper, tight);
        assert_eq!(
            (
                rooms[0].room(None),
                rooms[0].room(Some("csi.hetzner.cloud"))
            ),
            (0, 0),
            "a node with less than the headroom left takes no helper"
        );
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
