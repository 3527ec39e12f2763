//! The leader's loop: read the stores, plan (pure), apply, then sleep until a watch
//! reports a change or a window is due to open or close. Writes only what the plan
//! asks for, so a quiet cluster sees no writes at all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::heartbeat::Heartbeat;

use super::Config;
use super::apply::{Applier, PodPatch, PodPatchKind, ReportOnce, Write, claim_reference};
use super::cleanup::RestoreCleanup;
use super::snapshot::Snapshot;
use super::stores::Stores;
use super::views::{OptedIn, Views};
use super::waves::Waves;
use crate::cluster::events::EventSink;
use crate::cluster::velero::Schedule;
use crate::metrics::Metrics;
use crate::names;
use crate::policy::datapath::DataPath;
use crate::policy::helper;
use crate::policy::plan::{self, ClaimView, PlanInput};
use crate::policy::restoring;
use crate::policy::waves::RunOptions;
use crate::policy::window::{self, Windows};
use crate::policy::{ClaimGlobs, PodFacts, PodRecord};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use std::collections::BTreeSet;

/// A helper not running this long after its creation gets a Warning Event on its claim
/// (the default lead time, 10 minutes, leaves room to fix it before the tick).
const STUCK_AFTER: SignedDuration = SignedDuration::from_mins(2);
/// Changes arriving together are planned together.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// The coverage metrics (a row per user claim, `policy::status`) are worked out at most
/// this often: scrapes are slower, and it reads every PodVolumeBackup.
const COVERAGE_EVERY: Duration = Duration::from_secs(10);
/// Even with nothing to wake for, plan again this often (a safety net, not a poll: a
/// plan with nothing to do writes nothing).
const AT_LEAST_EVERY: Duration = Duration::from_secs(300);

pub async fn run(
    client: kube::Client,
    config: Config,
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    stop: CancellationToken,
) {
    let stores = Stores::start(
        &client,
        &config.velero_namespace,
        config.namespace_selector.as_deref(),
        &heartbeat,
        &stop,
    );
    tokio::select! {
        ready = stores.ready() => if let Err(e) = ready {
            warn!(error = %e, "watches stopped before they listed");
            return;
        },
        () = stop.cancelled() => return,
    }
    info!("watches listed: reconciling");
    heartbeat.listed();
    let cleanup = RestoreCleanup::new(client.clone(), metrics.clone(), config.failed_helper_ttl);
    let events = EventSink::new(Some(client.clone()));
    let waves = Waves::new(
        RunOptions {
            max_helpers: config.max_helpers,
            max_window: config.windows.max,
            start_bound: config.helper_start_timeout,
            settle: config.wave_settle,
        },
        config.helper.clone(),
        config.headroom,
        events.clone(),
        metrics.clone(),
    );
    let mut reconciler = Reconciler {
        cleanup,
        waves,
        coverage_at: None,
        coverage_series: HashSet::new(),
        coverage_generation: 0,
        applier: Applier::new(
            client.clone(),
            config.velero_namespace.clone(),
            events.clone(),
            metrics.clone(),
        ),
        events,
        config,
        metrics,
        reported: ReportOnce::default(),
        stuck_reported: ReportOnce::default(),
        without_pod_reported: ReportOnce::default(),
        held_reported: ReportOnce::default(),
        squatted_reported: ReportOnce::default(),
    };
    loop {
        // Leadership lost (or shutdown) stops a pass where it is: no more writes.
        let next_change = tokio::select! {
            next = reconciler.pass(&stores) => next,
            () = stop.cancelled() => return,
        };
        heartbeat.passed();
        reconciler
            .metrics
            .controller
            .last_pass
            .set(Timestamp::now().as_second());
        let wake = next_change
            .and_then(|t| t.duration_since(Timestamp::now()).try_into().ok())
            .map_or(AT_LEAST_EVERY, |d: Duration| d.min(AT_LEAST_EVERY));
        tokio::select! {
            () = stores.changed.notified() => tokio::time::sleep(DEBOUNCE).await,
            () = tokio::time::sleep(wake) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// What the coverage metrics are worked out from: the pass's views of the stores.
struct CoverageInput<'a> {
    globs: &'a [(&'a str, Arc<ClaimGlobs>)],
    claims: &'a [ClaimView<'a>],
    pods: &'a [&'a PodRecord],
    pvbs: &'a [Arc<crate::cluster::velero::PodVolumeBackup>],
    uploads: &'a [Arc<crate::cluster::velero::DataUpload>],
    backups: &'a [Arc<crate::cluster::velero::Backup>],
}

struct Reconciler {
    events: EventSink,
    config: Config,
    metrics: Arc<Metrics>,
    /// Every write the pass asks for goes through it.
    applier: Applier,
    /// Schedule problems already reported (Event sent), so each is reported once.
    reported: ReportOnce<(String, String)>,
    /// Helpers reported as not running, by uid.
    stuck_reported: ReportOnce<String>,
    /// Claims told they get no window helper (namespace, claim).
    without_pod_reported: ReportOnce<(String, String)>,
    /// Claims told a Backup under way misses them (namespace, claim, its Backups).
    held_reported: ReportOnce<(String, String, String)>,
    /// Claims told another pod has their helper's name (namespace, claim, pod uid).
    squatted_reported: ReportOnce<(String, String, String)>,
    /// Restore helpers done with.
    cleanup: RestoreCleanup,
    /// Idle claims beyond what fits at once: runs of waves.
    waves: Waves,
    /// When the coverage metrics were last worked out, and the claims they have series for.
    coverage_at: Option<Instant>,
    coverage_series: HashSet<crate::metrics::ClaimLabels>,
    coverage_generation: u64,
}

impl Reconciler {
    /// One plan-and-apply; returns when a window next opens or closes.
    async fn pass(&mut self, stores: &Stores) -> Option<Timestamp> {
        let snap = Snapshot::take(stores, Timestamp::now());
        let now = snap.now;
        let opted = OptedIn::read(&snap, &self.config.default_claims);
        let v = Views::build(&snap, &opted, self.config.windows.max);
        let windows = window::windows(
            v.namespaces.iter().map(|n| n.name),
            &v.schedules,
            &v.manual,
            &v.backups,
            &helper::own_labels(None),
            now,
            self.config.windows,
        );
        self.report_problems(&windows, &snap.schedules, v.namespace_problems.clone());
        self.count_helpers(&v.pods, windows.open.len());
        let without_pod = v.without_pod(&snap, &windows.open);
        self.report_without_pod(&without_pod, &v.claim_uids);
        let without_pod: HashSet<(&str, &str)> = without_pod.into_keys().collect();
        let mut plan = plan::plan(&PlanInput {
            namespaces: &v.namespaces,
            claims: &v.claims,
            pods: &v.pods,
            windows: &windows.open,
            pvbs: &v.pvbs,
            helper: &self.config.helper,
            restoring: &v.restoring,
            without_pod: &without_pod,
            now,
            user_pod_grace: self.config.user_pod_grace,
        });
        self.report_held(&plan.held, &snap.backups, &v.claim_uids);
        self.report_squatted(&plan.squatted, &v.claim_uids);
        let uids = &v.claim_uids;
        let (stuck, next_stuck) = plan::stuck_helpers(&v.pods, now, STUCK_AFTER);
        self.report_stuck(&stuck, uids);
        let (restore_deletes, next_failed_expiry) = self.cleanup.pass(&snap, &v.pods, uids, now);
        let coverage = CoverageInput {
            globs: &v.globs,
            claims: &v.claims,
            pods: &v.pods,
            pvbs: &snap.pvbs,
            uploads: &snap.uploads,
            backups: &snap.backups,
        };
        let coverage_due = self.report_coverage(&coverage, snap.generation, now);
        // Within the helpers' limits: the window's helpers that fit, then the waves.
        let unserved: HashSet<&str> = windows.problems.iter().map(|(n, _)| n.as_str()).collect();
        let waves = self
            .waves
            .plan(&snap, &v.globs, &unserved, &v.restoring, &mut plan.create);
        plan.create.extend(waves.create);
        plan.delete.extend(waves.delete);
        let mut writes = restore_deletes;
        writes.extend(restoring_records(
            &snap.namespaces,
            &v.globs,
            &v.being_restored,
        ));
        writes.extend(plan.delete.into_iter().map(|deletion| Write::DeletePod {
            deletion,
            done: Vec::new(),
        }));
        writes.extend(waves.backups.into_iter().map(Write::CreateBackup));
        writes.extend(
            plan.create
                .into_iter()
                .map(|pod| Write::CreateHelper(Box::new(pod))),
        );
        writes.extend(pod_patches(&plan.backfill, &plan.relabel));
        // A write that timed out or failed is retried when its pending entry expires:
        // wake then, even if nothing else happens.
        let retry = self
            .applier
            .apply(writes, uids, || stores.generation())
            .await;
        [
            windows.next_change,
            next_stuck,
            retry,
            next_failed_expiry,
            coverage_due,
            waves.next_change,
            v.listed_until,
            plan.wake,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A Normal Event on each claim that gets no window helper because Velero copies it
    /// some other way (or never), once while that lasts.
    fn report_without_pod(
        &mut self,
        without_pod: &HashMap<(&str, &str), (&str, DataPath)>,
        uids: &HashMap<(&str, &str), &str>,
    ) {
        let fresh = self.without_pod_reported.fresh(
            without_pod
                .keys()
                .map(|(ns, claim)| (ns.to_string(), claim.to_string())),
        );
        for (ns, claim) in fresh {
            let Some((schedule, path)) = without_pod.get(&(ns.as_str(), claim.as_str())) else {
                continue;
            };
            info!(
                namespace = ns,
                claim, schedule, "no backup helper: Velero copies this claim without a pod"
            );
            let note = match path {
                DataPath::Skipped(_) => format!(
                    "no backup helper: Schedule {schedule}'s Backups will not copy this claim ({})",
                    path.describe(None)
                ),
                _ => format!(
                    "no backup helper: Schedule {schedule}'s Backups copy this claim without a pod ({})",
                    path.describe(None)
                ),
            };
            self.events.normal(
                claim_reference(&ns, &claim, uids),
                "NoBackupHelper",
                "Skip",
                note,
            );
        }
    }

    /// A Warning Event on each idle claim whose helper's name another pod has, once per
    /// such pod.
    fn report_squatted(
        &mut self,
        squatted: &[(String, String, String)],
        uids: &HashMap<(&str, &str), &str>,
    ) {
        for (ns, claim, _) in self.squatted_reported.fresh(squatted.iter().cloned()) {
            let name = helper::helper_name(&claim);
            warn!(
                namespace = ns,
                claim,
                pod = name,
                "another pod has this claim's backup helper name"
            );
            self.events.warn(
                claim_reference(&ns, &claim, uids),
                "BackupHelperNameTaken",
                "Create",
                format!(
                    "cannot create backup helper {name}: a pod of that name exists and is not this claim's helper; this claim misses Backups until it is gone (kubectl describe pod {name})"
                ),
            );
        }
    }

    /// A Warning Event on each claim a Backup under way will have no copy of, because only
    /// pods that do not run hold it; once per claim and Backup.
    fn report_held(
        &mut self,
        held: &[plan::Held],
        backups: &[Arc<crate::cluster::velero::Backup>],
        uids: &HashMap<(&str, &str), &str>,
    ) {
        // The Backups seen (a window awaits its tick's Backup under a name it guesses
        // until the watch shows it), in order: the key does not change with the store's.
        let seen: HashSet<&str> = backups
            .iter()
            .filter_map(|b| b.metadata.name.as_deref())
            .collect();
        let held: Vec<plan::Held> = held
            .iter()
            .filter_map(|h| {
                let mut backups: Vec<String> = h
                    .backups
                    .iter()
                    .filter(|b| seen.contains(b.as_str()))
                    .cloned()
                    .collect();
                backups.sort();
                (!backups.is_empty()).then(|| plan::Held {
                    backups,
                    ..h.clone()
                })
            })
            .collect();
        let key = |h: &plan::Held| (h.namespace.clone(), h.claim.clone(), h.backups.join(", "));
        let fresh: HashSet<(String, String, String)> = self
            .held_reported
            .fresh(held.iter().map(key))
            .into_iter()
            .collect();
        for h in held.iter().filter(|h| fresh.contains(&key(h))) {
            let pods: Vec<String> = h
                .pods
                .iter()
                .map(|(name, state)| format!("{name} ({state})"))
                .collect();
            warn!(
                namespace = h.namespace,
                claim = h.claim,
                pods = %pods.join(", "),
                backups = %h.backups.join(", "),
                "a claim held by pods that do not run misses the Backup under way"
            );
            self.events.warn(
                claim_reference(&h.namespace, &h.claim, uids),
                "BackupMissedClaim",
                "Backup",
                format!(
                    "Backup {} has no copy of this claim: it is mounted only by pod(s) that do not run, {}; Velero copies a volume only from a Running pod, and a backup helper cannot mount it while they hold it",
                    h.backups.join(", "),
                    pods.join(", ")
                ),
            );
        }
    }

    /// A Warning Event on the claim of each helper not running `STUCK_AFTER` after its
    /// creation, once per helper.
    fn report_stuck(&mut self, stuck: &[&PodRecord], uids: &HashMap<(&str, &str), &str>) {
        let fresh: HashSet<String> = self
            .stuck_reported
            .fresh(stuck.iter().map(|p| p.uid().to_owned()))
            .into_iter()
            .collect();
        for pod in stuck.iter().filter(|p| fresh.contains(p.uid())) {
            let (ns, name) = (pod.namespace(), pod.name());
            let claim = pod.annotation(names::HELPER_CLAIM).unwrap_or_default();
            let phase = pod.phase().unwrap_or("not scheduled");
            warn!(
                namespace = ns,
                helper = name,
                claim,
                phase,
                "a backup helper is not running"
            );
            self.events.warn(
                claim_reference(ns, claim, uids),
                "BackupHelperNotRunning",
                "Wait",
                format!(
                    "backup helper {name} is still {phase} {} after it was created: this claim misses Backups until it runs (kubectl describe pod {name})",
                    humantime::format_duration(STUCK_AFTER.unsigned_abs())
                ),
            );
        }
    }

    /// The coverage metrics: per user claim its last backup, claims by holder, stale ones.
    /// Worked out when the watches changed (at most every `COVERAGE_EVERY`: returns when
    /// it is due if it had to wait) or, as time makes claims stale, on the loop's safety
    /// net.
    fn report_coverage(
        &mut self,
        input: &CoverageInput<'_>,
        generation: u64,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let CoverageInput {
            globs,
            claims,
            pods,
            pvbs,
            uploads,
            backups,
        } = *input;
        if let Some(at) = self.coverage_at {
            let changed = generation != self.coverage_generation;
            if !changed && at.elapsed() < AT_LEAST_EVERY {
                return None;
            }
            if at.elapsed() < COVERAGE_EVERY {
                let wait = COVERAGE_EVERY.saturating_sub(at.elapsed());
                return SignedDuration::try_from(wait).ok().map(|d| now + d);
            }
        }
        self.coverage_at = Some(Instant::now());
        self.coverage_generation = generation;
        // By the label form of the name, as copies name their Backup.
        let restorable: HashSet<std::borrow::Cow<'_, str>> = backups
            .iter()
            .filter(|b| b.restorable())
            .filter_map(|b| b.metadata.name.as_deref())
            .map(crate::policy::velero::label_value)
            .collect();
        // A claim's copy by a pod (PodVolumeBackup) or by the data mover (DataUpload).
        let done: Vec<_> = pvbs
            .iter()
            .filter_map(|p| p.done())
            .chain(uploads.iter().filter_map(|u| u.done()))
            .collect();
        let rows = crate::policy::status::rows(
            |ns| globs.iter().find(|(n, _)| *n == ns).map(|(_, g)| g.clone()),
            claims,
            pods,
            &done,
            |b| restorable.contains(b),
            |_| None,
            now,
            self.config.stale_after,
        );
        let m = &self.metrics.controller;
        let mut by_state: BTreeMap<&'static str, i64> = [
            ("live", 0),
            ("idle", 0),
            ("backup-helper", 0),
            ("restoring", 0),
        ]
        .into();
        let mut series = HashSet::new();
        for r in &rows {
            *by_state.entry(r.holder.as_str()).or_default() += 1;
            let labels = crate::metrics::ClaimLabels {
                namespace: r.namespace.clone(),
                claim: r.claim.clone(),
            };
            let at = r.last.as_ref().map_or(0, |l| l.at.as_second());
            m.claim_last_backup.get_or_create(&labels).set(at);
            series.insert(labels);
        }
        // Claims gone (deleted, or their namespace opted out) leave the metric.
        for old in std::mem::replace(&mut self.coverage_series, series)
            .into_iter()
            .filter(|l| !self.coverage_series.contains(l))
        {
            m.claim_last_backup.remove(&old);
        }
        for (state, n) in by_state {
            m.claims
                .get_or_create(&crate::metrics::StateLabels { state })
                .set(n);
        }
        let stale = rows.iter().filter(|r| r.stale).count();
        m.claims_stale.set(i64::try_from(stale).unwrap_or(i64::MAX));
        None
    }

    fn count_helpers(&self, pods: &[&PodRecord], windows_open: usize) {
        let m = &self.metrics.controller;
        let mut by_state: BTreeMap<&'static str, i64> =
            [("Pending", 0), ("Running", 0), ("other", 0)].into();
        for p in pods.iter().filter(|p| {
            p.label(names::COMPONENT) == Some(names::BACKUP_HELPER)
                && p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
        }) {
            let state = match p.phase() {
                Some("Running") => "Running",
                Some("Pending") | None => "Pending",
                Some(_) => "other",
            };
            *by_state.entry(state).or_default() += 1;
        }
        for (state, n) in by_state {
            m.helpers
                .get_or_create(&crate::metrics::StateLabels { state })
                .set(n);
        }
        m.windows_open
            .set(i64::try_from(windows_open).unwrap_or(i64::MAX));
    }

    /// Reports each Schedule's and namespace's problem once (a log line and a Warning
    /// Event), again only after it went away and came back.
    fn report_problems(
        &mut self,
        windows: &Windows,
        schedules: &[Arc<Schedule>],
        namespaces: Vec<(String, String)>,
    ) {
        let namespace_problems: HashSet<(String, String)> = namespaces
            .into_iter()
            .map(|(n, p)| (format!("namespace/{n}"), p))
            .collect();
        let hooks: HashSet<(String, String)> = windows
            .hooks_in_helpers
            .iter()
            .map(|(n, h)| (n.clone(), h.to_string()))
            .collect();
        let now: HashSet<(String, String)> = windows
            .problems
            .iter()
            .map(|(n, p)| (n.clone(), p.to_string()))
            .chain(namespace_problems.iter().cloned())
            .chain(hooks.iter().cloned())
            .collect();
        for (name, message) in self.reported.fresh(now) {
            if let Some(namespace) = name.strip_prefix("namespace/") {
                warn!(namespace, problem = %message, "a namespace's backup-window annotation needs attention");
                // In the namespace itself, where `kubectl describe namespace` finds it.
                let reference = ObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Namespace".to_owned()),
                    name: Some(namespace.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..Default::default()
                };
                self.events
                    .warn(reference, "BackupWindowAnnotation", "Plan", message.clone());
                continue;
            }
            warn!(schedule = %name, problem = %message, "a Schedule's Backups will miss idle users");
            let reason = if hooks.contains(&(name.clone(), message.clone())) {
                "BackupHooksInHelpers"
            } else {
                "IdleUsersNotCovered"
            };
            if let Some(s) = schedules
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name.as_str()))
            {
                self.events
                    .warn(s.reference(), reason, "Plan", message.clone());
            }
        }
    }
}

/// Keeps each opted-in namespace's `velero-jupyterhub.io/restoring-claims` annotation
/// (which a ValidatingAdmissionPolicy reads: manifests/restore-guard.yaml) equal to the
/// claims being restored there: a merge patch of that annotation (and, once none is left,
/// of the `restore` command's `…/restoring-since` and `…/restoring-restores`), guarded by
/// the resourceVersion read: the command may be adding claims at the same time.
fn restoring_records(
    namespaces: &[Arc<PartialObjectMeta<Namespace>>],
    opted_in: &[(&str, Arc<ClaimGlobs>)],
    restoring: &BTreeMap<&str, BTreeSet<&str>>,
) -> Vec<Write> {
    let mut writes = Vec::new();
    for n in namespaces {
        let m = &n.metadata;
        let Some(name) = m
            .name
            .as_deref()
            .filter(|n| opted_in.iter().any(|(o, _)| o == n))
        else {
            continue;
        };
        let annotations = m.annotations.as_ref();
        let have = annotations
            .and_then(|a| a.get(names::NAMESPACE_RESTORING_CLAIMS))
            .map(String::as_str);
        let want = restoring
            .get(name)
            .map(|c| restoring::annotation_value(c.iter().copied()))
            .filter(|v| !v.is_empty());
        let since_left = annotations.is_some_and(|a| {
            a.contains_key(names::NAMESPACE_RESTORING_SINCE)
                || a.contains_key(names::NAMESPACE_RESTORING_RESTORES)
        });
        if have == want.as_deref() && (want.is_some() || !since_left) {
            continue;
        }
        let mut set = serde_json::Map::new();
        set.insert(names::NAMESPACE_RESTORING_CLAIMS.into(), json!(want));
        if want.is_none() {
            for key in [
                names::NAMESPACE_RESTORING_SINCE,
                names::NAMESPACE_RESTORING_RESTORES,
            ] {
                set.insert(key.into(), serde_json::Value::Null);
            }
        }
        writes.push(Write::RecordRestoring {
            namespace: name.to_owned(),
            patch: json!({"metadata": {
                "resourceVersion": m.resource_version,
                "annotations": set,
            }}),
            claims: want,
        });
    }
    writes
}

/// The plan's pod patches: backfilled annotations, and helpers' labels.
fn pod_patches(backfill: &[plan::Backfill], relabel: &[plan::Relabel]) -> Vec<Write> {
    let backfills = backfill.iter().map(|b| PodPatch {
        kind: PodPatchKind::Backfill,
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        uid: b.uid.clone(),
        version: b.resource_version.clone(),
        // Guarded by the resourceVersion read: applies only to the pod as planned.
        patch: json!({"metadata": {
            "resourceVersion": b.resource_version,
            "annotations": {(names::VELERO_BACKUP_VOLUMES): b.value},
        }}),
    });
    let relabels = relabel.iter().map(|r| PodPatch {
        kind: PodPatchKind::Relabel,
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        uid: r.uid.clone(),
        version: serde_json::to_string(&r.labels).unwrap_or_default(),
        // Guarded by the uid (immutable: another uid is refused).
        patch: json!({"metadata": {"uid": r.uid, "labels": r.labels}}),
    });
    backfills.chain(relabels).map(Write::PatchPod).collect()
}
