//! Backup windows: when idle users' claims must be mounted so a Schedule's Backup sees
//! them.
//!
//! A window opens `lead` before a Schedule's next tick and closes when the Backup that
//! Schedule created for the tick is terminal, or `max_window` after it opened. Everything
//! is derived from the objects as they are now, so a restarted controller (or the other
//! replica) reaches the same answer without remembering anything.
//!
//! Velero's part (pkg/controller/schedule_controller.go, v1.18): the next run is
//! `cron.Next(t)` from `status.lastBackup`, else the creation time, or `status.lastSkipped`
//! when that is later (`getNextRunTime`); when due it creates `<name>-<timestamp>` labelled
//! `velero.io/schedule-name` and sets `lastBackup` to now (`submitBackup`), so the next
//! tick moves on the moment the Backup exists. Paused Schedules are not run.
//!
//! A namespace can also open a window of its own ([`ManualWindow`]: its
//! `backup-window-until` annotation, set by `velero-jupyterhub backup` or by hand), open
//! until that time or until the Backup its `backup-window-backup` annotation names is
//! terminal.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use crate::cron::{CronError, CronSchedule};
use crate::names;
use crate::selector::{self, SelectorProblem};
use crate::velero::{self, ScheduleSpec, ScheduleStatus};

/// A Schedule as the decision needs it.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleView<'a> {
    pub name: &'a str,
    pub created: Timestamp,
    pub spec: &'a ScheduleSpec,
    pub status: Option<&'a ScheduleStatus>,
}

/// A Backup as the decision needs it.
#[derive(Clone, Copy, Debug)]
pub struct BackupView<'a> {
    pub name: &'a str,
    pub created: Timestamp,
    /// Its `velero.io/schedule-name` label.
    pub schedule: Option<&'a str>,
    pub phase: Option<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowOptions {
    /// How long before a tick helpers are started (`--lead-time`).
    pub lead: SignedDuration,
    /// The longest a window stays open (`--max-window`).
    pub max: SignedDuration,
}

/// The open windows of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceWindow {
    /// The Schedules with a window open over this namespace.
    pub schedules: Vec<String>,
    /// The Backups of those windows that exist and are not terminal yet: a helper's
    /// PodVolumeBackup in one of them is "the current one".
    pub backups: Vec<String>,
    /// Labels our helpers need beyond their own so every such Schedule selects them.
    pub labels: BTreeMap<String, String>,
}

/// A window a namespace's annotations open (`velero-jupyterhub backup`, or by hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManualWindow<'a> {
    pub namespace: &'a str,
    /// `velero-jupyterhub.io/backup-window-until`.
    pub until: Timestamp,
    /// `velero-jupyterhub.io/backup-window-backup`: the window also closes when this
    /// Backup is terminal.
    pub backup: Option<&'a str>,
}

impl<'a> ManualWindow<'a> {
    /// The window a namespace's annotations ask for; `Err` says what is wrong with them.
    pub fn read(
        namespace: &'a str,
        annotations: Option<&'a BTreeMap<String, String>>,
    ) -> Result<Option<Self>, String> {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let Some(until) = get(names::NAMESPACE_WINDOW_UNTIL) else {
            return Ok(None);
        };
        let until = until.trim().parse::<Timestamp>().map_err(|e| {
            format!(
                "{}: {until:?} is not an RFC 3339 time such as 2026-11-28T12:00:00Z: {e}",
                names::NAMESPACE_WINDOW_UNTIL
            )
        })?;
        let backup = get(names::NAMESPACE_WINDOW_BACKUP).filter(|b| !b.is_empty());
        Ok(Some(Self {
            namespace,
            until,
            backup,
        }))
    }

    /// Open at `now`: before `until`, and its Backup (if named) not terminal yet.
    pub fn is_open(&self, backups: &[BackupView<'_>], now: Timestamp) -> bool {
        let finished = self.backup.is_some_and(|name| {
            backups
                .iter()
                .any(|b| b.name == name && velero::backup_is_terminal(b.phase))
        });
        now < self.until && !finished
    }
}

/// Why a Schedule is left out, reported on the Schedule (an Event), never fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleProblem {
    Cron(CronError),
    Selector(SelectorProblem),
    /// No tick within Velero's horizon (e.g. `0 0 30 2 *`).
    NeverRuns,
    /// Its selector needs a label another open Schedule needs with another value.
    LabelConflict {
        key: String,
        other: String,
    },
}

impl std::fmt::Display for ScheduleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cron(e) => write!(f, "schedule: {e}"),
            Self::Selector(p) => write!(f, "idle users' helpers cannot match its selector: {p}"),
            Self::NeverRuns => f.write_str("its schedule has no next run"),
            Self::LabelConflict { key, other } => write!(
                f,
                "its selector needs label {key:?} with another value than Schedule {other:?} needs; its Backups miss idle users"
            ),
        }
    }
}

/// A Schedule whose backup hooks would run, and fail, in our helpers (`policy::hooks`).
/// Its helpers are still made (the hooks may be fixed before the tick), and this is said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HooksInHelpers {
    pub hooks: Vec<String>,
    /// Of those, the ones with a `pre` exec hook set to `onError: Fail`.
    pub skipping: Vec<String>,
    pub namespaces: Vec<String>,
}

impl std::fmt::Display for HooksInHelpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its backup hook(s) {} would run in the backup helpers of namespace(s) {}, where \
             the command fails (a pause image): Velero logs each failure as an error and its \
             Backups end PartiallyFailed",
            self.hooks.join(", "),
            self.namespaces.join(", ")
        )?;
        if !self.skipping.is_empty() {
            write!(
                f,
                "; with onError: Fail, pre hook(s) {} also make Velero skip the helpers' volumes",
                self.skipping.join(", ")
            )?;
        }
        f.write_str(
            ". Give the hooks a labelSelector the helpers do not match (e.g. \
             app.kubernetes.io/managed-by NotIn [velero-jupyterhub])",
        )
    }
}

/// Windows by namespace, what to wake up for next, and the Schedules left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    pub open: BTreeMap<String, NamespaceWindow>,
    /// The next time a window opens or reaches its `max` (a change no watch reports).
    pub next_change: Option<Timestamp>,
    pub problems: Vec<(String, ScheduleProblem)>,
    /// Schedules served, but whose hooks would make Velero skip the helpers' volumes.
    pub hooks_in_helpers: Vec<(String, HooksInHelpers)>,
}

/// How long after a Schedule's `lastBackup` its Backup is awaited when not seen yet
/// (watches deliver in seconds; a relisting one may take tens of seconds).
const AWAIT_BACKUP: SignedDuration = SignedDuration::from_mins(2);

/// One Schedule's window, if open now.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Open {
    backups: Vec<String>,
}

/// Computes the open windows over `namespaces` (the opted-in ones) at `now`: the
/// Schedules' and the namespaces' own (`manual`, for opted-in namespaces only).
pub fn windows<'a>(
    namespaces: impl IntoIterator<Item = &'a str> + Clone,
    schedules: &[ScheduleView<'_>],
    manual: &[ManualWindow<'_>],
    backups: &[BackupView<'_>],
    own_labels: &BTreeMap<String, String>,
    now: Timestamp,
    options: WindowOptions,
) -> Windows {
    let mut out = Windows::default();
    let mut wake = |t: Timestamp| {
        if t > now && out.next_change.is_none_or(|n| t < n) {
            out.next_change = Some(t);
        }
    };
    let mut open_schedules = Vec::new();
    let mut problems = Vec::new();
    let mut hooks_in_helpers = Vec::new();
    for s in schedules {
        let covered: Vec<&str> = namespaces
            .clone()
            .into_iter()
            .filter(|ns| s.spec.template.covers_namespace(ns))
            .collect();
        if covered.is_empty() {
            continue;
        }
        let labels = match selector::labels_to_match(
            s.spec.template.label_selector.as_ref(),
            s.spec.template.or_label_selectors.as_deref(),
            own_labels,
        ) {
            Ok(l) => l,
            // A paused Schedule backs nobody up: nothing to report of it.
            Err(p) => {
                if !s.spec.paused {
                    problems.push((s.name.to_owned(), ScheduleProblem::Selector(p)));
                }
                continue;
            }
        };
        if !s.spec.paused {
            // A helper carries these labels, and its user's name when its claim has one.
            let mut helper_labels = own_labels.clone();
            helper_labels.extend(labels.clone());
            let mut with_user = helper_labels.clone();
            with_user.insert(
                crate::names::JUPYTERHUB_USERNAME.to_owned(),
                "user".to_owned(),
            );
            let mut warning = HooksInHelpers {
                hooks: Vec::new(),
                skipping: Vec::new(),
                namespaces: Vec::new(),
            };
            for ns in &covered {
                let found = crate::hooks::in_helpers(
                    &s.spec.template.hooks,
                    ns,
                    &[&helper_labels, &with_user],
                );
                if !found.is_empty() {
                    warning.namespaces.push((*ns).to_owned());
                }
                for h in found {
                    if h.skips_volumes && !warning.skipping.contains(&h.name) {
                        warning.skipping.push(h.name.clone());
                    }
                    if !warning.hooks.contains(&h.name) {
                        warning.hooks.push(h.name);
                    }
                }
            }
            if !warning.hooks.is_empty() {
                hooks_in_helpers.push((s.name.to_owned(), warning));
            }
        }
        let cron = match CronSchedule::parse(&s.spec.schedule) {
            Ok(c) => c,
            Err(e) => {
                if !s.spec.paused {
                    problems.push((s.name.to_owned(), ScheduleProblem::Cron(e)));
                }
                continue;
            }
        };
        match schedule_window(s, &cron, backups, now, options, &mut wake) {
            Ok(Some(open)) => open_schedules.push((s.name, covered, labels, open)),
            Ok(None) => {}
            Err(_) if s.spec.paused => {}
            Err(p) => problems.push((s.name.to_owned(), p)),
        }
    }
    // By name, so which of two conflicting Schedules is reported does not depend on the
    // order a watch delivered them in.
    open_schedules.sort_by_key(|(name, ..)| *name);
    for (name, covered, labels, open) in open_schedules {
        for ns in covered {
            let w = out.open.entry(ns.to_owned()).or_default();
            let conflict = labels
                .iter()
                .find(|(k, v)| w.labels.get(*k).is_some_and(|have| have != *v));
            if let Some((key, _)) = conflict {
                let other = w.schedules.first().cloned().unwrap_or_default();
                let problem = ScheduleProblem::LabelConflict {
                    key: key.clone(),
                    other,
                };
                if !problems.iter().any(|(n, p)| n == name && *p == problem) {
                    problems.push((name.to_owned(), problem));
                }
                continue;
            }
            w.labels.extend(labels.clone());
            w.schedules.push(name.to_owned());
            w.backups.extend(open.backups.iter().cloned());
        }
    }
    for m in manual {
        if !namespaces.clone().into_iter().any(|ns| ns == m.namespace) || !m.is_open(backups, now) {
            continue;
        }
        wake(m.until);
        let w = out.open.entry(m.namespace.to_owned()).or_default();
        w.backups.extend(m.backup.map(str::to_owned));
    }
    out.problems = problems;
    out.hooks_in_helpers = hooks_in_helpers;
    out
}

/// The name of the Backup Velero's Schedule controller creates at `at`, if its server
/// runs in UTC: `<schedule>-<yyyymmddhhmmss>` (pkg/apis/velero/v1/schedule_types.go
/// `TimestampedName`), the same `at` it then writes to `status.lastBackup`. Only a
/// placeholder for a Backup not seen yet: [`is_tick_backup`] finds the real one.
pub fn tick_backup_name(schedule: &str, at: Timestamp) -> String {
    format!(
        "{schedule}-{}",
        at.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%Y%m%d%H%M%S")
    )
}

/// How much earlier than its tick (`lastBackup`) a tick's Backup may have been created:
/// Velero creates it right after taking `now` (pkg/controller/schedule_controller.go),
/// so only the clock skew between Velero and the API server can put it before.
const TICK_CREATED_BEFORE: i64 = 5 * 60;

/// Of `backups` (name, creation time), the one Velero's Schedule controller made at `at`
/// (its `status.lastBackup`): named as [`is_tick_backup`] says, not created before `at`
/// (but for clock skew), the one created closest to `at` if several. The ticks of a
/// Schedule that runs every hour share their seconds, so a name alone matches the
/// previous tick's Backup too; that one was created an hour before.
pub fn tick_backup<'b>(
    schedule: &str,
    at: Timestamp,
    backups: impl IntoIterator<Item = (&'b str, Timestamp)>,
) -> Option<&'b str> {
    backups
        .into_iter()
        .filter(|(name, _)| is_tick_backup(schedule, at, name))
        .map(|(name, created)| (created.as_second() - at.as_second(), name))
        .filter(|(after, _)| *after >= -TICK_CREATED_BEFORE)
        .min_by_key(|(after, name)| (after.abs(), *name))
        .map(|(_, name)| name)
}

/// Whether `name` can be the name of the Backup Velero's Schedule controller made at
/// `at`. Velero formats the time in its server's local time zone (`time.Now()`, Go's
/// `Local`: a `TZ` set on Velero's pod changes it), which we do not know; every zone in
/// use is a whole number of quarter hours from UTC, within 14 hours. The seconds, which
/// `lastBackup` keeps, must be the same. ([`tick_backup`] also checks when it was made.)
pub fn is_tick_backup(schedule: &str, at: Timestamp, name: &str) -> bool {
    let Some(stamp) = name
        .strip_prefix(schedule)
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Ok(local) = jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", stamp) else {
        return false;
    };
    let Ok(as_utc) = local.to_zoned(jiff::tz::TimeZone::UTC) else {
        return false;
    };
    let offset = as_utc.timestamp().as_second() - at.as_second();
    offset % (15 * 60) == 0 && offset.abs() <= 14 * 3600
}

/// The window of one Schedule at `now`: open while one of its Backups created less than
/// `max` ago is not terminal, or from `lead` before its next tick for at most `max`.
fn schedule_window(
    s: &ScheduleView<'_>,
    cron: &CronSchedule,
    backups: &[BackupView<'_>],
    now: Timestamp,
    options: WindowOptions,
    wake: &mut impl FnMut(Timestamp),
) -> Result<Option<Open>, ScheduleProblem> {
    let mut open = None::<Open>;
    for b in backups.iter().filter(|b| b.schedule == Some(s.name)) {
        let until = b.created.saturating_add(options.max).unwrap_or(b.created);
        if !velero::backup_is_terminal(b.phase) && now < until {
            wake(until);
            open.get_or_insert_with(|| Open { backups: vec![] })
                .backups
                .push(b.name.to_owned());
        }
    }
    let status = s.status.cloned().unwrap_or_default();
    // Velero creates `<schedule>-<now>` and then sets `lastBackup` to that `now`; the two
    // reach us on separate watches. Seeing `lastBackup` first must not close the window
    // under the Backup that is starting: until it is seen (for `AWAIT_BACKUP`; a Backup
    // still unseen after that was deleted), it is the open window's Backup.
    if let Some(last_backup) = status.last_backup.as_ref().map(|t| t.0) {
        let name = tick_backup_name(s.name, last_backup);
        let until = last_backup
            .saturating_add(AWAIT_BACKUP)
            .unwrap_or(last_backup);
        let this_schedules = backups
            .iter()
            .filter(|b| b.schedule == Some(s.name))
            .map(|b| (b.name, b.created));
        if now < until && tick_backup(s.name, last_backup, this_schedules).is_none() {
            wake(until);
            let open = open.get_or_insert_with(|| Open { backups: vec![] });
            open.backups.push(name);
        }
    }
    // A paused Schedule makes no Backup: its window stays open only while one it made
    // runs (pausing it then must not take the helpers away from under that Backup).
    if s.spec.paused {
        return Ok(open);
    }
    let mut last = status.last_backup.map_or(s.created, |t| t.0);
    if let Some(skipped) = status.last_skipped.map(|t| t.0) {
        last = last.max(skipped);
    }
    let tick = cron.next_after(last).ok_or(ScheduleProblem::NeverRuns)?;
    let opens = tick.saturating_sub(options.lead).unwrap_or(tick);
    let closes = opens.saturating_add(options.max).unwrap_or(opens);
    if now < opens {
        wake(opens);
    } else if now < closes {
        wake(closes);
        open.get_or_insert_with(|| Open { backups: vec![] });
    }
    Ok(open)
}
