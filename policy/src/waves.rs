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
