//! Idle users at scale: which idle claims the next wave backs up, and on which
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

pub mod inputs;

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

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
/// (`useOwnerReferencesInBackup`). Then narrowed to the wave: only `namespaces` (those of
/// the wave's claims), only the wave's helpers (a label selector on [`WaveId::labels`]) with their claims and
/// volumes.
///
/// One difference, on purpose: no `velero.io/schedule-name` label. Velero's Schedule
/// controller lists Backups with that label and skips its own next tick while any of them
/// is New or InProgress (pkg/controller/schedule_controller.go
/// `checkIfBackupInNewOrProgress`), so a night of waves would make the Schedule skip
/// live users' Backup. Our labels say which Schedule a wave belongs to instead.
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
    // The wave: one namespace, our helpers of this wave, their claims and volumes.
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
        // Every helper gone (their users started servers): nothing to back up.
        None if !running && pending.is_empty() => WaveStep::Over { completed: false },
        // Everyone Running, gone, or past the bound. Even with nobody Running the Backup
        // is made (empty): it records the claims given up, so a run does not try them
        // again and again.
        None => WaveStep::Back { given_up: pending },
    }
}

/// Options of every run (`controller` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// At most this many helpers at once (`--max-helpers`).
    pub max_helpers: usize,
    /// A run stops starting waves this long after its tick (`--max-window`).
    pub max_window: jiff::SignedDuration,
    /// How long a helper may take to run before its wave goes on without it
    /// (`--helper-start-timeout`).
    pub start_bound: jiff::SignedDuration,
    /// The first wave waits this long after the tick's Backup is seen terminal
    /// (`--wave-settle`): PodVolumeBackups come on a watch of their own, which may lag
    /// (kube-runtime retries a broken watch after up to 30 s), and a claim whose copy is
    /// not seen yet would get a needless wave.
    pub settle: jiff::SignedDuration,
}

/// How often a run tries a claim whose helper never started: twice, then the next run.
const TRIES: usize = 2;

/// After a wave, the next waits this long at most for the last one's helpers to be gone
/// and their volumes detached (a cloud detach takes seconds to a minute): starting
/// sooner would find the nodes still full and make a small wave.
pub const SETTLE: jiff::SignedDuration = jiff::SignedDuration::from_mins(2);

/// A wave Backup of the run, as it records itself (its number label, its phase, and the
/// claims it was made for and those given up, in its annotations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveRecord<'a> {
    pub number: u32,
    pub backup: WaveBackup,
    /// When it became terminal (`status.completionTimestamp`), if it is.
    pub finished: Option<Timestamp>,
    /// `(namespace, claim)` of the helpers Running when it was made.
    pub claims: Vec<(&'a str, &'a str)>,
    pub given_up: Vec<(&'a str, &'a str)>,
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

/// A helper of the Schedule's runs (its wave labels read back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunHelper<'a> {
    pub namespace: &'a str,
    pub claim: &'a str,
    /// Its run's tick (Unix seconds) and its wave number.
    pub tick: i64,
    pub number: u32,
    pub helper: WaveHelper,
}

/// One Schedule's run of waves after a tick: everything the decision reads.
///
/// A run backs up what the Schedule's own Backup of the tick did not: when every idle
/// claim fits at once, the window's helpers put them all in that Backup and the run finds
/// nothing left; when they do not fit (or a helper did not start in time), the rest go in
/// waves. So a small hub keeps one Backup a night and a large one gets as many as it needs,
/// decided afresh from the cluster's objects on every pass (a new leader picks up where the
/// old one stopped).
#[derive(Clone, Debug)]
pub struct RunInput<'a> {
    /// The tick: the creation time of the Schedule's own Backup for it.
    pub tick: Timestamp,
    /// Since when that Backup is seen terminal (by this controller): the run starts after
    /// it (its window is over), and its first wave `options.settle` later.
    pub tick_backup_done_since: Option<Timestamp>,
    /// The idle user claims of the Schedule's namespaces: bound, mounted by no user pod,
    /// and not held by a helper outside this run. `last_backup` at or after `tick`: the
    /// claim is backed up in this run already.
    pub claims: &'a [IdleClaim<'a>],
    pub waves: &'a [WaveRecord<'a>],
    /// The Schedule's wave helpers, of this run and of older ones.
    pub helpers: &'a [RunHelper<'a>],
    /// Room on the nodes now (our own helpers already counted in).
    pub nodes: &'a [NodeRoom<'a>],
    /// Helpers of any kind up now, ours (towards `max_helpers`).
    pub helpers_up: usize,
    /// The last wave's helpers are still terminating or their volumes still attached.
    pub settling: bool,
    pub now: Timestamp,
    pub options: RunOptions,
}

/// What a run does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunStep {
    /// The Schedule's own Backup of the tick is still running (its window's helpers are
    /// in it): the run has not started.
    NotStarted,
    /// Create wave `number`'s helpers: (claim index, node index) pairs. `waiting`: claims
    /// left for later waves.
    Start {
        number: u32,
        placed: Vec<(usize, usize)>,
        waiting: usize,
    },
    WaitForHelpers {
        until: Timestamp,
    },
    /// The last wave's helpers are going and their volumes detaching: the next wave waits
    /// for that (a change wakes it) until `until` at most.
    Settle {
        until: Timestamp,
    },
    /// Delete the `given_up` helpers (indexes into the helpers) and create wave `number`'s
    /// Backup, recording `running` (helper indexes) and `given_up`.
    Back {
        number: u32,
        running: Vec<usize>,
        given_up: Vec<usize>,
    },
    WaitForBackup,
    /// Delete these helpers (indexes): their wave is over, or their run is.
    Clear {
        helpers: Vec<usize>,
    },
    /// Claims are left and no node has room for any: wait for a change.
    NoRoom {
        waiting: usize,
    },
    /// The run is over: every claim reached, or tried as often as it may be, or the
    /// window's end reached. `not_reached`: claims without a backup in this run.
    Finished {
        waves: usize,
        reached: usize,
        not_reached: usize,
        /// When its last wave's Backup finished (the tick, if it had no wave).
        ended: Timestamp,
    },
}

/// The next step of the run after `input.tick`.
pub fn run_step(input: &RunInput<'_>) -> RunStep {
    let Some(tick_backup_done) = input.tick_backup_done_since else {
        return RunStep::NotStarted;
    };
    let tick = input.tick.as_second();
    let deadline = input
        .tick
        .checked_add(input.options.max_window)
        .unwrap_or(Timestamp::MAX);
    // Helpers of older runs: their run is over.
    let stale: Vec<usize> = (0..input.helpers.len())
        .filter(|&i| input.helpers[i].tick != tick)
        .collect();
    if !stale.is_empty() {
        return RunStep::Clear { helpers: stale };
    }
    let current = input
        .helpers
        .iter()
        .map(|h| h.number)
        .chain(input.waves.iter().map(|w| w.number))
        .max();
    // What is left: the claims not backed up in this run yet, not in one of its finished
    // waves already, given up fewer than `TRIES` times, and without a helper now.
    // Claims in a finished wave, times given up, claims with a helper: sets, once.
    let made: HashSet<(&str, &str)> = input
        .waves
        .iter()
        .flat_map(|w| w.claims.iter().copied())
        .collect();
    let mut given_up: HashMap<(&str, &str), usize> = HashMap::new();
    for key in input.waves.iter().flat_map(|w| w.given_up.iter().copied()) {
        *given_up.entry(key).or_default() += 1;
    }
    let held: HashSet<(&str, &str)> = input
        .helpers
        .iter()
        .map(|h| (h.namespace, h.claim))
        .collect();
    let tried = |c: &IdleClaim<'_>| {
        let key = (c.namespace, c.claim);
        made.contains(&key) || given_up.get(&key).copied().unwrap_or(0) >= TRIES
    };
    let reached = |c: &IdleClaim<'_>| c.last_backup.is_some_and(|l| l >= input.tick);
    // No node it can attach on now (a zone without a usable node at night): not this run.
    let nowhere = |c: &IdleClaim<'_>| c.nodes.as_ref().is_some_and(Vec::is_empty);
    let left: Vec<usize> = (0..input.claims.len())
        .filter(|&i| !reached(&input.claims[i]))
        .collect();
    let todo: Vec<usize> = left
        .iter()
        .copied()
        .filter(|&i| {
            let c = &input.claims[i];
            !tried(c) && !held.contains(&(c.namespace, c.claim)) && !nowhere(c)
        })
        .collect();
    // Two waves in a row failed: Velero or the storage is failing, not a claim. Stop
    // rather than churn through everyone (the claims go first the next run).
    let mut by_number: Vec<&WaveRecord<'_>> = input.waves.iter().collect();
    by_number.sort_by_key(|w| w.number);
    let failing = matches!(
        by_number.as_slice(),
        [.., a, b] if a.backup == WaveBackup::Done(false) && b.backup == WaveBackup::Done(false)
    );
    let past = input.now >= deadline;
    // The claims of `todo` that fit now, as (claim, node) pairs, and how many do not.
    let place = || {
        let candidates: Vec<IdleClaim<'_>> =
            todo.iter().map(|&i| input.claims[i].clone()).collect();
        let budget = input.options.max_helpers.saturating_sub(input.helpers_up);
        let wave = next_wave(&candidates, input.nodes, budget);
        let placed: Vec<(usize, usize)> =
            wave.placed.into_iter().map(|(c, n)| (todo[c], n)).collect();
        (placed, wave.waiting)
    };
    if let Some(number) = current {
        let backup = input
            .waves
            .iter()
            .find(|w| w.number == number)
            .map_or(WaveBackup::NotCreated, |w| w.backup);
        // Helpers of earlier waves (a new leader finds them), and of this one once over.
        let earlier: Vec<usize> = (0..input.helpers.len())
            .filter(|&i| input.helpers[i].number < number)
            .collect();
        if !earlier.is_empty() {
            return RunStep::Clear { helpers: earlier };
        }
        // A wave is made in chunks (the reconciler stops creating and plans again when
        // the cluster changes): until its Backup is made, it takes whatever else fits.
        // Only while its first helpers may still be starting: a claim whose helper
        // cannot be created (a quota, a policy) must not keep the wave open.
        let forming = input
            .helpers
            .iter()
            .map(|h| h.helper.created)
            .min()
            .and_then(|t| t.checked_add(input.options.start_bound).ok())
            .is_some_and(|until| input.now < until);
        if backup == WaveBackup::NotCreated && forming && !past {
            let (placed, waiting) = place();
            if !placed.is_empty() {
                return RunStep::Start {
                    number,
                    placed,
                    waiting,
                };
            }
        }
        let ours: Vec<usize> = (0..input.helpers.len()).collect();
        let helpers: Vec<WaveHelper> = input.helpers.iter().map(|h| h.helper).collect();
        match wave_step(&helpers, backup, input.now, input.options.start_bound) {
            WaveStep::WaitForHelpers { until } => return RunStep::WaitForHelpers { until },
            WaveStep::Back { given_up } => {
                let running = ours
                    .into_iter()
                    .filter(|&i| helpers[i].phase == HelperPhase::Running)
                    .collect();
                return RunStep::Back {
                    number,
                    running,
                    given_up,
                };
            }
            WaveStep::WaitForBackup => return RunStep::WaitForBackup,
            WaveStep::Over { .. } if !ours.is_empty() => {
                return RunStep::Clear { helpers: ours };
            }
            WaveStep::Over { .. } => {}
        }
    }
    if todo.is_empty() || past || failing {
        let ended = input
            .waves
            .iter()
            .filter_map(|w| w.finished)
            .max()
            .unwrap_or(input.tick);
        return RunStep::Finished {
            waves: input.waves.len(),
            reached: input.claims.len() - left.len(),
            not_reached: left.len(),
            ended,
        };
    }
    let last_ended = input.waves.iter().filter_map(|w| w.finished).max();
    if input.settling
        && let Some(until) = last_ended.and_then(|t| t.checked_add(SETTLE).ok())
        && input.now < until
    {
        return RunStep::Settle { until };
    }
    if current.is_none()
        && let Some(until) = tick_backup_done.checked_add(input.options.settle).ok()
        && input.now < until
    {
        return RunStep::Settle { until };
    }
    let (placed, waiting) = place();
    if placed.is_empty() {
        return RunStep::NoRoom { waiting };
    }
    RunStep::Start {
        number: current.map_or(1, |n| n + 1),
        placed,
        waiting,
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
/// NodeVolumeLimits for volumes). Left out: nodes that are unschedulable (cordoned), not
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
            let free_pods = allocatable.saturating_sub(pods_on.get(name).copied().unwrap_or(0));
            let free_attach = csinodes
                .iter()
                .filter(|c| c.metadata.name.as_deref() == Some(name))
                .flat_map(|c| c.spec.drivers.iter())
                .map(|d| {
                    let limit = d
                        .allocatable
                        .as_ref()
                        .and_then(|a| a.count)
                        .map_or(u32::MAX, |c| u32::try_from(c).unwrap_or(0));
                    let used = used.get(&(name, d.name.as_str())).copied().unwrap_or(0);
                    (d.name.as_str(), limit.saturating_sub(used))
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
                "nobody ran: back up nothing, recording who was given up",
                vec![
                    h(Pending, "2026-11-28T03:00:00Z"),
                    h(Gone, "2026-11-28T03:08:00Z"),
                ],
                WaveBackup::NotCreated,
                WaveStep::Back { given_up: vec![0] },
            ),
            (
                "every user took theirs over: over, nothing to back up",
                vec![h(Gone, "2026-11-28T03:08:00Z")],
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
        let rooms = node_rooms(&nodes, &csinodes, &pods, &elsewhere, &attachments, &helper);
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
        let rooms = node_rooms(&nodes, &csinodes, &pods, &[], &attachments, &helper);
        let names: Vec<&str> = rooms.iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "b", "gpu"]);
    }

    fn options(max_helpers: usize) -> RunOptions {
        RunOptions {
            max_helpers,
            max_window: jiff::SignedDuration::from_hours(6),
            start_bound: jiff::SignedDuration::from_mins(5),
            settle: jiff::SignedDuration::from_secs(45),
        }
    }

    fn run_helper(
        claim: &'static str,
        number: u32,
        phase: HelperPhase,
        created: &str,
    ) -> RunHelper<'static> {
        RunHelper {
            namespace: "jhub",
            claim,
            tick: t("2026-11-28T03:00:00Z").as_second(),
            number,
            helper: WaveHelper {
                phase,
                created: t(created),
            },
        }
    }

    fn record(
        number: u32,
        backup: WaveBackup,
        claims: &[&'static str],
        given_up: &[&'static str],
    ) -> WaveRecord<'static> {
        WaveRecord {
            number,
            backup,
            finished: matches!(backup, WaveBackup::Done(_)).then(|| t("2026-11-28T03:40:00Z")),
            claims: claims.iter().map(|c| ("jhub", *c)).collect(),
            given_up: given_up.iter().map(|c| ("jhub", *c)).collect(),
        }
    }

    #[test]
    fn run_steps_table() {
        use HelperPhase::*;
        let tick = t("2026-11-28T03:00:00Z");
        let claims = vec![
            claim("claim-a", Some("2026-11-20T03:00:00Z")),
            claim("claim-b", None),
            claim("claim-c", Some("2026-11-28T03:05:00Z")), // in the Schedule's own Backup
            claim("claim-d", Some("2026-11-21T03:00:00Z")),
        ];
        let nodes = vec![node("n1", 110, 1), node("n2", 110, 1)];
        struct Case {
            name: &'static str,
            done: bool,
            waves: Vec<WaveRecord<'static>>,
            helpers: Vec<RunHelper<'static>>,
            now: &'static str,
            max: usize,
            up: usize,
            settling: bool,
            /// The nodes have room left (by default only when no helper is up).
            room: bool,
            want: RunStep,
        }
        let case = |name, waves, helpers: Vec<RunHelper<'static>>, now, want| Case {
            name,
            done: true,
            waves,
            room: helpers.is_empty(),
            helpers,
            now,
            max: 10,
            up: 0,
            settling: false,
            want,
        };
        let mut cases = vec![
            Case {
                done: false,
                ..case(
                    "the Schedule's own Backup still runs",
                    vec![],
                    vec![],
                    "2026-11-28T03:10:00Z",
                    RunStep::NotStarted,
                )
            },
            case(
                "wave 1: the least recently backed up first, one per node (attach room 1)",
                vec![],
                vec![],
                "2026-11-28T03:10:00Z",
                RunStep::Start {
                    number: 1,
                    placed: vec![(1, 0), (0, 1)],
                    waiting: 1,
                },
            ),
            Case {
                max: 3,
                up: 2,
                ..case(
                    "--max-helpers counts the helpers up already",
                    vec![],
                    vec![],
                    "2026-11-28T03:10:00Z",
                    RunStep::Start {
                        number: 1,
                        placed: vec![(1, 0)],
                        waiting: 2,
                    },
                )
            },
            Case {
                max: 2,
                up: 2,
                ..case(
                    "no budget left",
                    vec![],
                    vec![],
                    "2026-11-28T03:10:00Z",
                    RunStep::NoRoom { waiting: 3 },
                )
            },
            case(
                "helpers starting",
                vec![],
                vec![
                    run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z"),
                    run_helper("claim-a", 1, Pending, "2026-11-28T03:10:00Z"),
                ],
                "2026-11-28T03:11:00Z",
                RunStep::WaitForHelpers {
                    until: t("2026-11-28T03:15:00Z"),
                },
            ),
            Case {
                room: true,
                ..case(
                    "a wave made in part (the reconciler stopped at a change): it takes what else fits",
                    vec![],
                    vec![run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z")],
                    "2026-11-28T03:11:00Z",
                    RunStep::Start {
                        number: 1,
                        placed: vec![(0, 0), (3, 1)],
                        waiting: 0,
                    },
                )
            },
            Case {
                room: true,
                ..case(
                    "past the forming time (a create refused, say) the wave takes no more: back up",
                    vec![],
                    vec![run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z")],
                    "2026-11-28T03:16:00Z",
                    RunStep::Back {
                        number: 1,
                        running: vec![0],
                        given_up: vec![],
                    },
                )
            },
            case(
                "two waves in a row failed: the run stops",
                vec![
                    record(1, WaveBackup::Done(false), &["claim-b"], &[]),
                    record(2, WaveBackup::Done(false), &["claim-a"], &[]),
                ],
                vec![],
                "2026-11-28T03:50:00Z",
                RunStep::Finished {
                    waves: 2,
                    reached: 1,
                    not_reached: 3,
                    ended: t("2026-11-28T03:40:00Z"),
                },
            ),
            case(
                "one stuck past the bound: back up the other, give it up",
                vec![],
                vec![
                    run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z"),
                    run_helper("claim-a", 1, Pending, "2026-11-28T03:10:00Z"),
                ],
                "2026-11-28T03:16:00Z",
                RunStep::Back {
                    number: 1,
                    running: vec![0],
                    given_up: vec![1],
                },
            ),
            case(
                "the wave's Backup runs",
                vec![record(1, WaveBackup::Running, &["claim-b"], &["claim-a"])],
                vec![run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z")],
                "2026-11-28T03:20:00Z",
                RunStep::WaitForBackup,
            ),
            case(
                "the wave's Backup finished: its helpers go",
                vec![record(
                    1,
                    WaveBackup::Done(true),
                    &["claim-b"],
                    &["claim-a"],
                )],
                vec![run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z")],
                "2026-11-28T03:40:00Z",
                RunStep::Clear { helpers: vec![0] },
            ),
            case(
                "wave 2: the given-up claim is tried again; b failed in wave 1, so not again tonight",
                vec![record(
                    1,
                    WaveBackup::Done(false),
                    &["claim-b"],
                    &["claim-a"],
                )],
                vec![],
                "2026-11-28T03:41:00Z",
                RunStep::Start {
                    number: 2,
                    placed: vec![(0, 0), (3, 1)],
                    waiting: 0,
                },
            ),
            Case {
                settling: true,
                ..case(
                    "the last wave's volumes still detaching: wait (at most SETTLE after it ended)",
                    vec![record(
                        1,
                        WaveBackup::Done(true),
                        &["claim-b"],
                        &["claim-a"],
                    )],
                    vec![],
                    "2026-11-28T03:41:00Z",
                    RunStep::Settle {
                        until: t("2026-11-28T03:42:00Z"),
                    },
                )
            },
            Case {
                settling: true,
                ..case(
                    "detaching for longer than SETTLE: go on",
                    vec![record(1, WaveBackup::Done(true), &["claim-b"], &[])],
                    vec![],
                    "2026-11-28T03:43:00Z",
                    RunStep::Start {
                        number: 2,
                        placed: vec![(0, 0), (3, 1)],
                        waiting: 0,
                    },
                )
            },
            case(
                "given up twice: next run",
                vec![
                    record(1, WaveBackup::Done(true), &["claim-b"], &["claim-a"]),
                    record(2, WaveBackup::Done(true), &[], &["claim-a"]),
                ],
                vec![],
                "2026-11-28T03:50:00Z",
                RunStep::Start {
                    number: 3,
                    placed: vec![(3, 0)],
                    waiting: 0,
                },
            ),
            case(
                "a new leader finds helpers of an earlier wave and of an older run",
                vec![
                    record(1, WaveBackup::Done(true), &["claim-b"], &[]),
                    record(2, WaveBackup::Running, &["claim-a"], &[]),
                ],
                vec![
                    run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z"),
                    RunHelper {
                        tick: t("2026-11-27T03:00:00Z").as_second(),
                        ..run_helper("claim-d", 4, Running, "2026-11-27T05:00:00Z")
                    },
                ],
                "2026-11-28T03:50:00Z",
                RunStep::Clear { helpers: vec![1] },
            ),
            case(
                "then the earlier wave's",
                vec![
                    record(1, WaveBackup::Done(true), &["claim-b"], &[]),
                    record(2, WaveBackup::Running, &["claim-a"], &[]),
                ],
                vec![
                    run_helper("claim-b", 1, Running, "2026-11-28T03:10:00Z"),
                    run_helper("claim-a", 2, Running, "2026-11-28T03:40:00Z"),
                ],
                "2026-11-28T03:50:00Z",
                RunStep::Clear { helpers: vec![0] },
            ),
            case(
                "past the window: no new wave, what is left is reported",
                vec![record(1, WaveBackup::Done(true), &["claim-b"], &[])],
                vec![],
                "2026-11-28T09:00:00Z",
                RunStep::Finished {
                    waves: 1,
                    reached: 1,
                    not_reached: 3,
                    ended: t("2026-11-28T03:40:00Z"),
                },
            ),
        ];
        // Everyone backed up in the Schedule's own Backup: nothing to do.
        let all_in: Vec<IdleClaim<'static>> = claims
            .iter()
            .map(|c| IdleClaim {
                last_backup: Some(t("2026-11-28T03:05:00Z")),
                ..c.clone()
            })
            .collect();
        let full = vec![node("n1", 110, 0), node("n2", 110, 0)];
        for c in cases.drain(..) {
            let input = RunInput {
                tick,
                // Seen terminal at the tick: the cases are all past its settle.
                tick_backup_done_since: c.done.then_some(tick),
                claims: &claims,
                waves: &c.waves,
                helpers: &c.helpers,
                nodes: if c.room { &nodes } else { &full },
                helpers_up: c.up,
                settling: c.settling,
                now: t(c.now),
                options: options(c.max),
            };
            assert_eq!(run_step(&input), c.want, "{}", c.name);
        }
        // The tick's Backup seen terminal a moment ago: the first wave waits for the
        // PodVolumeBackups' watch to catch up; a later wave does not.
        let just_done = RunInput {
            tick,
            tick_backup_done_since: Some(t("2026-11-28T03:09:50Z")),
            claims: &claims,
            waves: &[],
            helpers: &[],
            nodes: &nodes,
            helpers_up: 0,
            settling: false,
            now: t("2026-11-28T03:10:00Z"),
            options: options(10),
        };
        assert_eq!(
            run_step(&just_done),
            RunStep::Settle {
                until: t("2026-11-28T03:10:35Z")
            }
        );
        let later = RunInput {
            now: t("2026-11-28T03:10:35Z"),
            ..just_done.clone()
        };
        assert!(
            matches!(run_step(&later), RunStep::Start { number: 1, .. }),
            "{:?}",
            run_step(&later)
        );
        let second = [record(1, WaveBackup::Done(true), &["claim-b"], &[])];
        let after_a_wave = RunInput {
            waves: &second,
            ..just_done.clone()
        };
        assert!(
            matches!(run_step(&after_a_wave), RunStep::Start { number: 2, .. }),
            "{:?}",
            run_step(&after_a_wave)
        );
        let input = RunInput {
            tick_backup_done_since: Some(tick),
            claims: &all_in,
            ..just_done.clone()
        };
        assert_eq!(
            run_step(&input),
            RunStep::Finished {
                waves: 0,
                reached: 4,
                not_reached: 0,
                ended: tick
            },
            "a small hub: the window took everyone"
        );
        // A zonal claim whose zone has no usable node tonight: not reached, and the run
        // ends instead of waiting for room all night.
        let mut stranded = all_in.clone();
        stranded[1] = IdleClaim {
            last_backup: None,
            nodes: Some(vec![]),
            ..claims[1].clone()
        };
        let input = RunInput {
            claims: &stranded,
            ..input
        };
        assert_eq!(
            run_step(&input),
            RunStep::Finished {
                waves: 0,
                reached: 3,
                not_reached: 1,
                ended: tick
            }
        );
    }

    /// The night's idle claims, each with its last backup.
    fn idle<'a>(names: &'a [String], last: &[Option<Timestamp>]) -> Vec<IdleClaim<'a>> {
        names
            .iter()
            .zip(last)
            .map(|(n, l)| IdleClaim {
                namespace: "jhub",
                claim: n,
                last_backup: *l,
                driver: Some("csi.hetzner.cloud"),
                nodes: None,
            })
            .collect()
    }

    /// A night in miniature, pure, driven by [`run_step`] as the reconciler drives it: 60
    /// idle claims, 3 nodes with room for 4 attachments each; Velero's part played (a
    /// wave's Backup takes 10 minutes and backs up the Running helpers; wave 3's fails).
    /// One helper of wave 2 never starts. Everyone is reached but wave 3's claims, which go
    /// first in the next run; never more than 4 helpers on a node; the stuck claim is
    /// tried again in the wave after.
    #[test]
    fn a_night_of_waves_reaches_everyone_within_the_limits() {
        let names: Vec<String> = (0..60).map(|i| format!("claim-{i:02}")).collect();
        let mut last: Vec<Option<Timestamp>> = (0..60)
            .map(|i| (i % 2 == 0).then(|| t("2026-11-20T03:00:00Z")))
            .collect();
        let tick = t("2026-11-28T03:00:00Z");
        let mut now = tick;
        // (number, phase, made at, claims, given up)
        type Played = (u32, WaveBackup, Timestamp, Vec<String>, Vec<String>);
        let mut waves: Vec<Played> = vec![];
        // (claim index, node, phase, created, number)
        let mut helpers: Vec<(usize, usize, HelperPhase, Timestamp, u32)> = vec![];
        let mut stuck: Option<usize> = None;
        let mut failed: Vec<String> = vec![];
        let mut steps = 0;
        let result = loop {
            steps += 1;
            assert!(steps < 200, "the night does not end");
            // Velero: a running wave Backup finishes 10 minutes after it was made.
            for w in waves.iter_mut().filter(|w| w.1 == WaveBackup::Running) {
                if now >= w.2 + jiff::SignedDuration::from_mins(10) {
                    let ok = w.0 != 3;
                    w.1 = WaveBackup::Done(ok);
                    for c in &w.3 {
                        let i = names.iter().position(|n| n == c).unwrap();
                        if ok {
                            last[i] = Some(now);
                        } else {
                            failed.push(c.clone());
                        }
                    }
                }
            }
            let claims = idle(&names, &last);
            let records: Vec<WaveRecord<'_>> = waves
                .iter()
                .map(|(number, backup, made, claims, given_up)| WaveRecord {
                    number: *number,
                    backup: *backup,
                    finished: matches!(backup, WaveBackup::Done(_))
                        .then(|| *made + jiff::SignedDuration::from_mins(10)),
                    claims: claims.iter().map(|c| ("jhub", c.as_str())).collect(),
                    given_up: given_up.iter().map(|c| ("jhub", c.as_str())).collect(),
                })
                .collect();
            let run_helpers: Vec<RunHelper<'_>> = helpers
                .iter()
                .map(|&(c, _, phase, created, number)| RunHelper {
                    namespace: "jhub",
                    claim: &names[c],
                    tick: tick.as_second(),
                    number,
                    helper: WaveHelper { phase, created },
                })
                .collect();
            // Room: 4 attachments a node, minus our helpers there.
            let nodes: Vec<NodeRoom<'_>> = ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(n, name)| {
                    let on = helpers.iter().filter(|h| h.1 == n).count() as u32;
                    node(name, 110, 4 - on)
                })
                .collect();
            let step = run_step(&RunInput {
                tick,
                tick_backup_done_since: Some(tick),
                claims: &claims,
                waves: &records,
                helpers: &run_helpers,
                nodes: &nodes,
                helpers_up: helpers.len(),
                settling: false,
                now,
                options: options(100),
            });
            match step {
                RunStep::Start { number, placed, .. } => {
                    for (k, &(c, n)) in placed.iter().enumerate() {
                        // The first helper of wave 2 never starts.
                        let phase = if number == 2 && k == 0 {
                            stuck = Some(c);
                            HelperPhase::Pending
                        } else {
                            HelperPhase::Running
                        };
                        helpers.push((c, n, phase, now, number));
                    }
                    for n in 0..3 {
                        assert!(
                            helpers.iter().filter(|h| h.1 == n).count() <= 4,
                            "wave {number}: node {n}"
                        );
                    }
                    if number == 3 {
                        assert!(
                            placed.iter().any(|&(c, _)| Some(c) == stuck),
                            "the stuck claim is tried again in wave 3"
                        );
                    }
                    now += jiff::SignedDuration::from_mins(1);
                }
                RunStep::WaitForHelpers { until } => now = until,
                RunStep::Back {
                    number,
                    running,
                    given_up,
                } => {
                    let claim = |i: &usize| names[helpers[*i].0].clone();
                    waves.push((
                        number,
                        WaveBackup::Running,
                        now,
                        running.iter().map(claim).collect(),
                        given_up.iter().map(claim).collect(),
                    ));
                    let gone: Vec<usize> = given_up.iter().map(|&i| helpers[i].0).collect();
                    helpers.retain(|h| !gone.contains(&h.0));
                }
                RunStep::WaitForBackup => now += jiff::SignedDuration::from_mins(1),
                RunStep::Settle { until } => now = until,
                RunStep::Clear { helpers: gone } => {
                    let gone: Vec<usize> = gone.iter().map(|&i| helpers[i].0).collect();
                    helpers.retain(|h| !gone.contains(&h.0));
                }
                RunStep::Finished {
                    waves,
                    reached,
                    not_reached,
                    ended,
                } => break (waves, reached, not_reached, ended),
                other => panic!("{other:?}"),
            }
        };
        let (wave_count, reached, not_reached, ended) = result;
        assert_eq!(failed.len(), 12, "wave 3 held 12 claims");
        assert_eq!(
            (reached, not_reached),
            (48, 12),
            "everyone but wave 3's claims"
        );
        assert_eq!(
            wave_count, 6,
            "60 claims, 12 at a time, one tried again: 6 waves"
        );
        assert!(
            ended.duration_since(tick) < jiff::SignedDuration::from_mins(90),
            "{ended}"
        );
        // Next night the failed ones come first (their last backup is the oldest).
        let claims = idle(&names, &last);
        let wave = next_wave(&claims, &[node("a", 110, 12)], 12);
        let mut first: Vec<String> = wave
            .placed
            .iter()
            .map(|&(c, _)| claims[c].claim.to_owned())
            .collect();
        first.sort();
        failed.sort();
        assert_eq!(first, failed);
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
