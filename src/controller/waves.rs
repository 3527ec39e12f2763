//! Idle users at scale, the edge: reads the stores into the views
//! `policy::waves` decides on, and turns its decisions into writes for the reconciler to
//! apply: window helpers limited to what fits (and pinned to the node chosen), each
//! Schedule's run of waves after its tick (helpers, wave Backups), Events and metrics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use tracing::{info, warn};

use super::snapshot::Snapshot;
use crate::cluster::events::EventSink;
use crate::cluster::velero::{Backup, Schedule};
use crate::metrics::{Metrics, ScheduleLabels};
use crate::names;
use crate::policy::datapath::{self, PvFacts, VolumeFacts};
use crate::policy::helper::{self, ClaimRef, HelperOptions};
use crate::policy::plan::{DeleteReason, Deletion, is_wave_helper};
use crate::policy::waves::{
    self, Headroom, IdleClaim, NodeRoom, PodOnNode, RunHelper, RunInput, RunOptions, RunStep,
    WaveId, inputs,
};
use crate::policy::{ClaimGlobs, ClaimRecord, PodFacts, PodRecord, VolumeRecord};

/// A wave Backup to create: made from its Schedule (read whole when it is made).
#[derive(Clone, Debug)]
pub struct WaveBackupToMake {
    pub schedule: String,
    /// The Schedule's own Backup of the tick.
    pub follows: String,
    pub tick: Timestamp,
    pub number: u32,
    pub namespaces: Vec<String>,
    /// `namespace/claim` of the Running helpers, and of those given up.
    pub claims: Vec<String>,
    pub given_up: Vec<String>,
}

impl WaveBackupToMake {
    pub fn id<'a>(&'a self, velero_namespace: &'a str) -> WaveId<'a> {
        WaveId {
            velero_namespace,
            schedule: &self.schedule,
            tick: self.tick,
            number: self.number,
        }
    }
}

/// What the runs ask for in one pass.
#[derive(Default)]
pub struct WavePlan {
    pub create: Vec<Pod>,
    pub delete: Vec<Deletion>,
    pub backups: Vec<WaveBackupToMake>,
    pub next_change: Option<Timestamp>,
}

impl WavePlan {
    fn wake(&mut self, at: Timestamp) {
        if self.next_change.is_none_or(|n| at < n) {
            self.next_change = Some(at);
        }
    }
}

pub struct Waves {
    pub options: RunOptions,
    helper: HelperOptions,
    headroom: Headroom,
    events: EventSink,
    metrics: Arc<Metrics>,
    /// What was reported once in the current run of each Schedule (a wave started, a
    /// finished run, no room).
    reported: Reported,
    /// Per Schedule: its tick (seconds) and when this replica first saw that tick's Backup
    /// terminal (the first wave settles after it).
    done_seen: std::collections::HashMap<String, (i64, Timestamp)>,
}

/// Per Schedule, what was reported in its current run (its tick): a new tick forgets
/// the last run's, and a Schedule that is gone is forgotten, so this stays as large as
/// the Schedules served, however long the controller runs.
#[derive(Default)]
struct Reported(std::collections::HashMap<String, (i64, HashSet<String>)>);

impl Reported {
    /// Whether `what` is new in `schedule`'s run after `tick` (and remember it).
    fn first(&mut self, schedule: &str, tick: i64, what: &str) -> bool {
        let run = self
            .0
            .entry(schedule.to_owned())
            .or_insert_with(|| (tick, HashSet::new()));
        if run.0 != tick {
            *run = (tick, HashSet::new());
        }
        run.1.insert(what.to_owned())
    }

    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|schedule, _| keep(schedule));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.values().map(|(_, r)| r.len()).sum()
    }
}

/// Where a claim's volume can go: its CSI driver (whose attach limit counts) and the
/// nodes it can attach on (`None`: any).
type Placement<'a> = (Option<&'a str>, Option<Vec<usize>>);

/// The cluster as the decisions read it, built once a pass.
struct View<'a> {
    /// Opted-in user claims, by (namespace, name).
    claims: HashMap<(&'a str, &'a str), &'a ClaimRecord>,
    /// Claims mounted by a pod that is not ours (a user's server): not idle.
    live: HashSet<(&'a str, &'a str)>,
    /// Last completed file-system backup per claim (of a restorable Backup).
    last: HashMap<(&'a str, &'a str), Timestamp>,
    /// The CSI driver and the nodes (indexes into `rooms`) of each claim's volume.
    volume: HashMap<(&'a str, &'a str), Placement<'a>>,
    /// What decides how Velero copies each claim (`policy::datapath`).
    facts: HashMap<(&'a str, &'a str), PvFacts<'a>>,
    rooms: Vec<NodeRoom<'a>>,
    /// PersistentVolumes with a VolumeAttachment (attached, or detaching).
    attached: HashSet<&'a str>,
    /// Our backup helpers up (towards --max-helpers).
    helpers_up: usize,
}

impl View<'_> {
    fn idle_claim<'b>(&'b self, ns: &'b str, claim: &'b str) -> IdleClaim<'b> {
        let (driver, nodes) = self.volume.get(&(ns, claim)).cloned().unwrap_or_default();
        IdleClaim {
            namespace: ns,
            claim,
            last_backup: self.last.get(&(ns, claim)).copied(),
            driver,
            nodes,
        }
    }

    /// Marks helpers as placed: (their volume's CSI driver, the node index).
    fn take(&mut self, placed: &[(Option<String>, usize)]) {
        for (driver, n) in placed {
            if let Some(room) = self.rooms.get_mut(*n) {
                room.free_pods = room.free_pods.saturating_sub(1);
                if let Some((_, left)) = room
                    .free_attach
                    .iter_mut()
                    .find(|(d, _)| Some(*d) == driver.as_deref())
                {
                    *left = left.saturating_sub(1);
                }
            }
            self.helpers_up += 1;
        }
    }
}

/// The placed claims' drivers, owned (the view is borrowed mutably next).
fn placements(claims: &[IdleClaim<'_>], placed: &[(usize, usize)]) -> Vec<(Option<String>, usize)> {
    placed
        .iter()
        .map(|&(c, n)| (claims[c].driver.map(str::to_owned), n))
        .collect()
}

impl Waves {
    pub fn new(
        options: RunOptions,
        helper: HelperOptions,
        headroom: Headroom,
        events: EventSink,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            options,
            helper,
            headroom,
            events,
            metrics,
            reported: Reported::default(),
            done_seen: Default::default(),
        }
    }

    /// Limits the window's helpers (`window_creates`) to what fits now, pinned to their
    /// nodes, and plans each Schedule's run of waves.
    pub fn plan(
        &mut self,
        snap: &Snapshot,
        opted_in: &[(&str, Arc<ClaimGlobs>)],
        excluded: &HashSet<&str>,
        restoring: &HashSet<(&str, &str)>,
        window_creates: &mut Vec<Pod>,
    ) -> WavePlan {
        let now = snap.now;
        let node_objects: Vec<_> = snap.nodes.iter().map(AsRef::as_ref).collect();
        let csinodes: Vec<_> = snap.csinodes.iter().map(AsRef::as_ref).collect();
        let attachments: Vec<_> = snap.attachments.iter().map(AsRef::as_ref).collect();
        let backup_objects = &snap.backups;
        let pod_objects = &snap.pods;
        let mut view = self.view(opted_in, snap, &node_objects, &csinodes, &attachments);
        let mut out = WavePlan::default();
        self.limit_window(&mut view, window_creates);
        let creating: HashSet<(String, String)> = window_creates
            .iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.clone()?;
                Some((ns, helper::claim_of(p)?.to_owned()))
            })
            .collect();
        let mut schedules: Vec<&Arc<Schedule>> = snap.schedules.iter().collect();
        schedules.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        // A Schedule that is gone keeps no memory here (one not served for a while, a
        // selector being fixed, keeps its run's).
        let existing: HashSet<&str> = schedules
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        self.reported.retain(|s| existing.contains(s));
        self.done_seen.retain(|s, _| existing.contains(s.as_str()));
        // Our pods in the namespaces this controller manages (another controller, with
        // another --namespace-selector, runs its own).
        let managed: HashSet<&str> = opted_in.iter().map(|(n, _)| *n).collect();
        let pod_objects: Vec<Arc<PodRecord>> = pod_objects
            .iter()
            .filter(|p| managed.contains(p.namespace()))
            .cloned()
            .collect();
        // Schedules we do not serve (a selector helpers cannot match, a schedule that
        // does not parse: reported by the window) run no waves either.
        let schedules: Vec<&Arc<Schedule>> = schedules
            .into_iter()
            .filter(|s| {
                s.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| !excluded.contains(n))
            })
            .collect();
        // Wave helpers of a Schedule that is gone (or not served): their run is over.
        let known: HashSet<std::borrow::Cow<'_, str>> = schedules
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .map(crate::policy::velero::label_value)
            .collect();
        for p in pod_objects.iter().filter(|p| {
            is_wave_helper(p)
                && p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
                && p.metadata.deletion_timestamp.is_none()
                && p.own_label(names::WAVE_SCHEDULE)
                    .is_some_and(|s| !known.contains(s))
        }) {
            out.delete.push(Deletion {
                namespace: p.namespace().to_owned(),
                name: p.name().to_owned(),
                uid: p.uid().to_owned(),
                claim: p
                    .volumes()
                    .find_map(|(_, c)| c)
                    .unwrap_or_default()
                    .to_owned(),
                reason: DeleteReason::WaveOver,
            });
        }
        for schedule in schedules {
            self.run(
                schedule,
                opted_in,
                &pod_objects,
                backup_objects,
                &creating,
                restoring,
                &mut view,
                now,
                &mut out,
            );
        }
        out
    }

    fn view<'a>(
        &self,
        opted_in: &[(&str, Arc<ClaimGlobs>)],
        snap: &'a Snapshot,
        nodes: &[&'a k8s_openapi::api::core::v1::Node],
        csinodes: &[&'a k8s_openapi::api::storage::v1::CSINode],
        attachments: &[&'a k8s_openapi::api::storage::v1::VolumeAttachment],
    ) -> View<'a> {
        let (claims, pods, volumes, backups, pvbs) = (
            &snap.claims,
            &snap.pods,
            &snap.volumes,
            &snap.backups,
            &snap.pvbs,
        );
        let pv: HashMap<&str, &VolumeRecord> = volumes
            .iter()
            .filter_map(|v| Some((v.metadata.name.as_deref()?, v.as_ref())))
            .collect();
        let driver_of = |pv_name: &str| -> Option<&'a str> { pv.get(pv_name)?.driver.as_deref() };
        let all_claims: HashMap<(&str, &str), &ClaimRecord> = claims
            .iter()
            .map(|c| {
                let v = c.view();
                ((v.namespace, v.name), c.as_ref())
            })
            .collect();
        // Every pod bound to a node holds a slot there, and its volumes count.
        let on_nodes: Vec<PodOnNode<'_>> = pods
            .iter()
            .filter_map(|p| {
                // A helper pinned and not bound yet counts where it will run.
                let node = p.node().or(p.pinned_node.as_deref())?;
                Some(PodOnNode {
                    node,
                    holds_slot: !p.is_stopped(),
                    volumes: p
                        .volumes()
                        .filter_map(|(_, claim)| {
                            let c = all_claims.get(&(p.namespace(), claim?))?;
                            let pv_name = c.volume_name.as_deref()?;
                            Some((driver_of(pv_name)?, pv_name))
                        })
                        .collect(),
                })
            })
            .collect();
        let elsewhere: Vec<(&str, u32)> = snap
            .slots_elsewhere
            .iter()
            .map(|(node, n)| (&**node, *n))
            .collect();
        let rooms = waves::node_rooms(
            nodes,
            csinodes,
            &on_nodes,
            &elsewhere,
            attachments,
            &self.helper,
            self.headroom,
        );
        let room_labels: Vec<(&str, &BTreeMap<String, String>)> = rooms
            .iter()
            .filter_map(|r| {
                let node = nodes
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(r.name))?;
                static EMPTY: BTreeMap<String, String> = BTreeMap::new();
                Some((r.name, node.metadata.labels.as_ref().unwrap_or(&EMPTY)))
            })
            .collect();
        let globs: HashMap<&str, &ClaimGlobs> =
            opted_in.iter().map(|(n, g)| (*n, g.as_ref())).collect();
        let user_claims: HashMap<(&str, &str), &ClaimRecord> = all_claims
            .into_iter()
            .filter(|((ns, name), c)| {
                c.view().bound && globs.get(ns).is_some_and(|g| g.matches(name))
            })
            .collect();
        let facts = user_claims
            .iter()
            .filter_map(|(&key, c)| Some((key, pv.get(c.volume_name.as_deref()?)?.path_facts())))
            .collect();
        let volume = user_claims
            .iter()
            .map(|(&key, c)| {
                let pv_name = c.volume_name.as_deref();
                let v = pv_name.and_then(|n| pv.get(n));
                let driver = pv_name.and_then(driver_of);
                let affinity = v.and_then(|v| v.node_affinity.as_ref());
                (key, (driver, waves::volume_nodes(affinity, &room_labels)))
            })
            .collect();
        let mut live = HashSet::new();
        let mut helpers_up = 0;
        for p in pods.iter().filter(|p| !p.is_stopped()) {
            let ours = p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US);
            if ours && p.label(names::COMPONENT) == Some(names::BACKUP_HELPER) {
                helpers_up += usize::from(globs.contains_key(p.namespace()));
                continue;
            }
            if ours {
                continue;
            }
            for claim in p.volumes().filter_map(|(_, c)| c) {
                live.insert((p.namespace(), claim));
            }
        }
        // As PodVolumeBackups name them: `velero.io/backup-name` is the label form of the
        // name (hashed beyond 63 characters).
        let restorable: HashSet<std::borrow::Cow<'_, str>> = backups
            .iter()
            .filter(|b| b.restorable())
            .filter_map(|b| b.metadata.name.as_deref())
            .map(crate::policy::velero::label_value)
            .collect();
        let mut last: HashMap<(&str, &str), Timestamp> = HashMap::new();
        for done in pvbs.iter().filter_map(|p| p.done()) {
            if restorable.contains(done.backup) {
                let entry = last
                    .entry((done.pod_namespace, done.claim))
                    .or_insert(done.completed);
                *entry = (*entry).max(done.completed);
            }
        }
        let attached = attachments
            .iter()
            .filter_map(|a| a.spec.source.persistent_volume_name.as_deref())
            .collect();
        View {
            attached,
            claims: user_claims,
            live,
            last,
            volume,
            facts,
            rooms,
            helpers_up,
        }
    }

    /// The window's helpers: only as many as fit (least recently backed up first), each
    /// pinned to its node; the others wait for the run after the tick.
    fn limit_window(&self, view: &mut View<'_>, creates: &mut Vec<Pod>) {
        if creates.is_empty() {
            return;
        }
        let keys: Vec<(String, String)> = creates
            .iter()
            .map(|p| {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let claim = helper::claim_of(p).unwrap_or_default().to_owned();
                (ns, claim)
            })
            .collect();
        let candidates: Vec<IdleClaim<'_>> =
            keys.iter().map(|(ns, c)| view.idle_claim(ns, c)).collect();
        let budget = self.options.max_helpers.saturating_sub(view.helpers_up);
        let wave = waves::next_wave(&candidates, &view.rooms, budget);
        let placed: HashMap<usize, &str> = wave
            .placed
            .iter()
            .map(|&(c, n)| (c, view.rooms[n].name))
            .collect();
        let mut kept = Vec::with_capacity(placed.len());
        for (i, mut pod) in std::mem::take(creates).into_iter().enumerate() {
            if let Some(node) = placed.get(&i) {
                helper::pin_to_node(&mut pod, node);
                kept.push(pod);
            }
        }
        if wave.waiting > 0 {
            info!(
                placed = kept.len(),
                waiting = wave.waiting,
                "more idle claims than fit at once: the rest go in waves after the tick"
            );
        }
        let taken = placements(&candidates, &wave.placed);
        view.take(&taken);
        *creates = kept;
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        schedule: &Schedule,
        opted_in: &[(&str, Arc<ClaimGlobs>)],
        pods: &[Arc<PodRecord>],
        backups: &[Arc<Backup>],
        creating: &HashSet<(String, String)>,
        restoring: &HashSet<(&str, &str)>,
        view: &mut View<'_>,
        now: Timestamp,
        out: &mut WavePlan,
    ) {
        let Some(name) = schedule.metadata.name.as_deref() else {
            return;
        };
        // The tick: the Backup Velero's Schedule controller made for it, named after
        // `status.lastBackup` (not one made by hand with `--from-schedule`).
        let own = schedule
            .status
            .as_ref()
            .and_then(|s| s.last_backup.as_ref())
            .and_then(|at| {
                let label = crate::policy::velero::label_value(name);
                let candidates = backups.iter().filter_map(|b| {
                    (b.metadata
                        .labels
                        .as_ref()?
                        .get(names::VELERO_SCHEDULE_NAME)?
                        == &label)
                        .then_some(())?;
                    Some((
                        b.metadata.name.as_deref()?,
                        b.metadata.creation_timestamp.as_ref()?.0,
                    ))
                });
                let wanted = crate::policy::window::tick_backup(name, at.0, candidates)?;
                backups
                    .iter()
                    .find(|b| b.metadata.name.as_deref() == Some(wanted))
            });
        let tick = own.and_then(|o| o.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let schedule_label = crate::policy::velero::label_value(name);
        let covered: Vec<&str> = opted_in
            .iter()
            .map(|(n, _)| *n)
            .filter(|ns| schedule.spec.template.covers_namespace(ns))
            .collect();
        // This Schedule's wave helpers, and the claims other helpers hold.
        let ours = inputs::our_pods(pods.iter().map(AsRef::as_ref), &schedule_label, now);
        let (run_helpers, held, terminating) = (ours.helpers, ours.held, ours.terminating);
        let deletion = |i: usize, reason: DeleteReason| {
            let (h, pod) = &run_helpers[i];
            Deletion {
                namespace: h.namespace.to_owned(),
                name: pod.name().to_owned(),
                uid: pod.uid().to_owned(),
                claim: h.claim.to_owned(),
                reason,
            }
        };
        let (Some(own), Some(tick)) = (own, tick) else {
            // No tick's Backup (none yet, or Velero deleted it at its TTL): no run, and
            // helpers of an earlier one go.
            for i in 0..run_helpers.len() {
                out.delete.push(deletion(i, DeleteReason::WaveOver));
            }
            return;
        };
        if covered.is_empty() && run_helpers.is_empty() {
            return;
        }
        let deadline = tick
            .checked_add(self.options.max_window)
            .unwrap_or(Timestamp::MAX);
        let creating: HashSet<(&str, &str)> = creating
            .iter()
            .map(|(ns, c)| (ns.as_str(), c.as_str()))
            .collect();
        // Claims this Schedule copies without a pod (the data mover, or never): no wave.
        let open = [(name, &schedule.spec.template)];
        let without_pod: HashSet<(&str, &str)> = view
            .facts
            .iter()
            .filter(|(_, pv)| {
                let volume = VolumeFacts {
                    pv: Some(**pv),
                    ..Default::default()
                };
                datapath::without_pod(&open, false, &volume).is_some()
            })
            .map(|(key, _)| *key)
            .collect();
        let claims: Vec<IdleClaim<'_>> = inputs::candidates(
            view.claims
                .iter()
                .map(|(&(namespace, name), c)| inputs::ClaimFacts {
                    namespace,
                    name,
                    created: c.metadata.creation_timestamp.as_ref().map(|t| t.0),
                }),
            &covered,
            tick,
            &inputs::NotForWaves {
                live: &view.live,
                held: &held,
                restoring,
                creating: &creating,
                without_pod: &without_pod,
            },
        )
        .into_iter()
        .map(|(ns, claim)| view.idle_claim(ns, claim))
        .collect();
        let facts: Vec<inputs::BackupFacts<'_>> = backups
            .iter()
            .map(|b| {
                let status = b.status.as_ref();
                inputs::BackupFacts {
                    labels: b.metadata.labels.as_ref(),
                    annotations: b.metadata.annotations.as_ref(),
                    phase: status.and_then(|s| s.phase.as_deref()),
                    completed: status
                        .and_then(|s| s.completion_timestamp.as_ref())
                        .map(|t| t.0),
                }
            })
            .collect();
        let records = inputs::wave_records(&facts, &schedule_label, tick);
        let helpers: Vec<RunHelper<'_>> = run_helpers.iter().map(|(h, _)| *h).collect();
        // The last wave's volumes still attached (a VolumeAttachment until detached).
        let last_wave = records.iter().max_by_key(|w| w.number);
        let detaching = last_wave.is_some_and(|w| {
            w.claims.iter().chain(&w.given_up).any(|key| {
                view.claims
                    .get(key)
                    .and_then(|c| c.volume_name.as_deref())
                    .is_some_and(|pv| view.attached.contains(pv))
            })
        });
        let done = crate::policy::velero::backup_is_terminal(
            own.status.as_ref().and_then(|s| s.phase.as_deref()),
        );
        let tick_backup_done_since = done.then(|| {
            let seen = self
                .done_seen
                .entry(name.to_owned())
                .or_insert((tick.as_second(), now));
            if seen.0 != tick.as_second() {
                *seen = (tick.as_second(), now);
            }
            seen.1
        });
        let step = waves::run_step(&RunInput {
            tick,
            tick_backup_done_since,
            claims: &claims,
            waves: &records,
            helpers: &helpers,
            nodes: &view.rooms,
            helpers_up: view.helpers_up,
            settling: terminating || detaching,
            now,
            options: self.options,
        });
        let mut first = |what: &str| self.reported.first(name, tick.as_second(), what);
        match step {
            RunStep::NotStarted => {}
            RunStep::Start {
                number,
                placed,
                waiting,
            } => {
                let id = WaveId {
                    velero_namespace: "",
                    schedule: name,
                    tick,
                    number,
                };
                for &(c, n) in &placed {
                    let claim = &claims[c];
                    let Some(record) = view.claims.get(&(claim.namespace, claim.claim)) else {
                        continue;
                    };
                    let v = record.view();
                    let mut labels = helper::own_labels(v.username);
                    labels.extend(id.labels().into_iter().map(|(k, v)| (k.to_owned(), v)));
                    let claim_ref = ClaimRef {
                        namespace: v.namespace,
                        name: v.name,
                        uid: v.uid,
                        username: v.username,
                    };
                    let mut pod = helper::backup_helper(&claim_ref, labels, &self.helper);
                    helper::pin_to_node(&mut pod, view.rooms[n].name);
                    out.create.push(pod);
                }
                let taken = placements(&claims, &placed);
                view.take(&taken);
                info!(
                    schedule = name,
                    wave = number,
                    helpers = placed.len(),
                    waiting,
                    "starting a wave"
                );
                // Once a wave (a wave made in chunks starts again for each).
                if first(&format!("started-{number}")) {
                    self.schedule_event(
                        schedule,
                        false,
                        "WaveStarted",
                        format!(
                            "wave {number} of the run after {tick}: helpers for {} idle claims ({waiting} left for later waves)",
                            placed.len()
                        ),
                    );
                }
                out.wake(deadline);
            }
            RunStep::WaitForHelpers { until } | RunStep::Settle { until } => out.wake(until),
            RunStep::Back {
                number,
                running,
                given_up,
            } => {
                let claim = |&i: &usize| format!("{}/{}", helpers[i].namespace, helpers[i].claim);
                let mut namespaces: Vec<String> = running
                    .iter()
                    .map(|&i| helpers[i].namespace.to_owned())
                    .collect();
                namespaces.sort();
                namespaces.dedup();
                if namespaces.is_empty() {
                    // Nobody to back up: the Backup only records who was given up.
                    namespaces = covered.iter().take(1).map(|n| (*n).to_owned()).collect();
                }
                for &i in &given_up {
                    out.delete.push(deletion(i, DeleteReason::GivenUp));
                }
                out.backups.push(WaveBackupToMake {
                    schedule: name.to_owned(),
                    follows: own.metadata.name.clone().unwrap_or_default(),
                    tick,
                    number,
                    namespaces,
                    claims: running.iter().map(claim).collect(),
                    given_up: given_up.iter().map(claim).collect(),
                });
            }
            RunStep::WaitForBackup => {}
            RunStep::Clear { helpers: gone } => {
                for i in gone {
                    out.delete.push(deletion(i, DeleteReason::WaveOver));
                }
            }
            RunStep::NoRoom { waiting } => {
                if first("no-room") {
                    warn!(
                        schedule = name,
                        waiting, "idle claims left and no node has room for a helper"
                    );
                    self.schedule_event(
                        schedule,
                        true,
                        "NoRoomForHelpers",
                        format!("{waiting} idle claims wait for a wave, and no node the helpers may use has a free pod slot or attach slot (or --max-helpers are up); waiting for room until {deadline}"),
                    );
                }
                out.wake(deadline);
            }
            RunStep::Finished {
                waves: count,
                reached,
                not_reached,
                ended,
            } => {
                let labels = ScheduleLabels {
                    schedule: name.to_owned(),
                };
                let m = &self.metrics.controller;
                m.run_waves
                    .get_or_create(&labels)
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
                m.run_not_reached
                    .get_or_create(&labels)
                    .set(i64::try_from(not_reached).unwrap_or(i64::MAX));
                m.run_duration
                    .get_or_create(&labels)
                    .set(ended.duration_since(tick).as_secs());
                if count > 0 && first("finished") {
                    let took = ended.duration_since(tick);
                    info!(schedule = name, waves = count, reached, not_reached, took = %format!("{took:#}"), "a run of waves finished");
                    self.schedule_event(
                        schedule,
                        not_reached > 0,
                        "WavesFinished",
                        format!(
                            "the run after {tick}: {count} waves in {took:#}; {reached} idle claims backed up, {not_reached} not reached (they go first next time)"
                        ),
                    );
                }
                if now < deadline {
                    out.wake(deadline);
                }
            }
        }
    }

    fn schedule_event(&self, schedule: &Schedule, warning: bool, reason: &str, note: String) {
        let reference = schedule.reference();
        if warning {
            self.events.warn(reference, reason, "Waves", note);
        } else {
            self.events.normal(reference, reason, "Waves", note);
        }
    }
}

#[cfg(test)]
mod reported_tests {
    use super::Reported;

    /// What was reported once was kept for ever, a few keys a
    /// Schedule a night. Now each Schedule keeps its current run's only.
    #[test]
    fn reports_once_per_run_and_forgets_old_runs_and_gone_schedules() {
        let mut r = Reported::default();
        assert!(r.first("homes", 100, "finished"));
        assert!(!r.first("homes", 100, "finished"), "once per run");
        assert!(r.first("homes", 100, "started-1"));
        assert!(r.first("other", 100, "finished"), "per Schedule");
        // A year of nightly runs: the memory stays one run per Schedule.
        for night in 1..=365 {
            let tick = 100 + night * 86_400;
            assert!(r.first("homes", tick, "started-1"), "night {night}");
            assert!(r.first("homes", tick, "finished"));
            assert!(!r.first("homes", tick, "finished"));
        }
        assert_eq!(r.len(), 3, "homes' last run (2) and other's (1)");
        r.retain(|s| s == "homes");
        assert_eq!(r.len(), 2, "a Schedule that is gone is forgotten");
    }
}
