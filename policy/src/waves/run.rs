//! A Schedule's run of waves after a tick, as a state machine: each pass reads where the
//! run stands (its wave Backups, its helpers, the idle claims, room on the nodes) and
//! returns the one next step; the edge carries it out and asks again. Nothing is kept
//! between passes, so a new leader picks up where the old one stopped.

use std::collections::{HashMap, HashSet};

use jiff::Timestamp;

use super::placement::{IdleClaim, NodeRoom, next_wave};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waves::test_support::{claim, node, t};

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
}
