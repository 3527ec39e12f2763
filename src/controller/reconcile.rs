//! The leader's loop: read the stores, plan (pure), apply, then sleep until a watch
//! reports a change or a window is due to open or close. Writes only what the plan
//! asks for, so a quiet cluster sees no writes at all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::heartbeat::Heartbeat;

use super::Config;
use super::restores::RestoreCleanup;
use super::snapshot::Snapshot;
use super::stores::Stores;
use super::waves::{WaveBackupToMake, Waves};
use crate::cluster::events::EventSink;
use crate::cluster::velero::Schedule;
use crate::metrics::Metrics;
use crate::names;
use crate::policy::helper;
use crate::policy::plan::{self, ClaimView, Deletion, NamespaceView, Plan, PlanInput, PvbView};
use crate::policy::restoring;
use crate::policy::waves::RunOptions;
use crate::policy::window::{self, BackupView, ManualWindow, ScheduleView, Windows};
use crate::policy::{ClaimGlobs, NamespacePolicy, PodFacts, PodRecord};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use std::collections::BTreeSet;

/// A write not yet seen by the watches is not repeated for this long.
const PENDING_FOR: Duration = Duration::from_secs(30);
/// A helper not running this long after its creation gets a Warning Event on its claim
/// (the default lead time, 10 minutes, leaves room to fix it before the tick).
const STUCK_AFTER: SignedDuration = SignedDuration::from_mins(2);
/// Writes in flight at once, and how long one may take before it is given up (the
/// pending set then retries it after `PENDING_FOR`).
const WRITES_IN_FLIGHT: usize = 16;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Helpers created between two looks at whether anything changed.
const CREATE_CHUNK: usize = 64;
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
    let restores = RestoreCleanup::new(client.clone(), metrics.clone(), config.failed_helper_ttl);
    let events = EventSink::new(Some(client.clone()));
    let waves = Waves::new(
        RunOptions {
            max_helpers: config.max_helpers,
            max_window: config.windows.max,
            start_bound: config.helper_start_timeout,
            settle: config.wave_settle,
        },
        config.helper.clone(),
        events.clone(),
        metrics.clone(),
    );
    let mut reconciler = Reconciler {
        restores,
        waves,
        backups_pending: HashMap::new(),
        coverage_at: None,
        coverage_series: HashSet::new(),
        coverage_generation: 0,
        client: client.clone(),
        events,
        config,
        metrics,
        pending: HashMap::new(),
        namespaces_pending: HashMap::new(),
        reported: HashSet::new(),
        stuck_reported: HashSet::new(),
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

/// The pending-set keys of the plan's writes: the same write planned again while the
/// first is not yet seen by the watches has the same key.
fn create_key(pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    format!("create/{ns}/{name}")
}

fn delete_key(d: &Deletion) -> String {
    format!("delete/{}", d.uid)
}

/// What the coverage metrics are worked out from: the pass's views of the stores.
struct CoverageInput<'a> {
    globs: &'a [(&'a str, Arc<ClaimGlobs>)],
    claims: &'a [ClaimView<'a>],
    pods: &'a [&'a PodRecord],
    pvbs: &'a [Arc<crate::cluster::velero::PodVolumeBackup>],
    backups: &'a [Arc<crate::cluster::velero::Backup>],
}

/// The claims being restored in each opted-in namespace (`policy::restoring`), from the
/// pass's snapshot of the stores, and when claims the `restore` command listed stop
/// counting by themselves (a pass is due then).
#[allow(clippy::too_many_arguments)]
fn claims_being_restored<'a>(
    opted_in: &'a [(&'a str, Arc<ClaimGlobs>)],
    namespaces: &'a [Arc<PartialObjectMeta<Namespace>>],
    claims: &'a [Arc<crate::policy::ClaimRecord>],
    pods: &[&'a PodRecord],
    pvbs: &'a [Arc<crate::cluster::velero::PodVolumeBackup>],
    restores: &'a [Arc<crate::cluster::velero::Restore>],
    backups: &'a [Arc<crate::cluster::velero::Backup>],
    now: Timestamp,
) -> (BTreeMap<&'a str, BTreeSet<&'a str>>, Option<Timestamp>) {
    use crate::policy::restoring::{BackedUpClaim, Input, LabelledClaim, Listed, RestoreSpecView};
    let opted: Vec<&str> = opted_in.iter().map(|(n, _)| *n).collect();
    let scheduled: Vec<crate::policy::velero::ScheduledBackup<'_>> = backups
        .iter()
        .filter_map(|b| {
            let status = b.status.as_ref();
            Some((
                b.metadata.name.as_deref()?,
                b.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(names::VELERO_SCHEDULE_NAME))
                    .map(String::as_str),
                status.and_then(|s| s.phase.as_deref()),
                status.and_then(|s| s.start_timestamp.as_ref()).map(|t| t.0),
            ))
        })
        .collect();
    let restores: Vec<RestoreSpecView<'_>> = restores
        .iter()
        .filter_map(|r| {
            // A Restore made `--from-schedule` names its Backup only once Velero has
            // validated it; until then it is the one Velero will take.
            let backup = match (r.spec.backup_name.as_str(), r.spec.schedule_name.as_str()) {
                ("", schedule) if !schedule.is_empty() => {
                    crate::policy::velero::backup_for_schedule(schedule, &scheduled)
                        .unwrap_or_default()
                }
                (backup, _) => backup,
            };
            Some(RestoreSpecView {
                name: r.metadata.name.as_deref()?,
                backup,
                phase: r.status.as_ref().and_then(|s| s.phase.as_deref()),
                included_namespaces: &r.spec.included_namespaces,
                excluded_namespaces: &r.spec.excluded_namespaces,
                namespace_mapping: &r.spec.namespace_mapping,
                label_selector: r.spec.label_selector.as_ref(),
                or_label_selectors: &r.spec.or_label_selectors,
                included_resources: &r.spec.included_resources,
                excluded_resources: &r.spec.excluded_resources,
                updates_existing: r.spec.existing_resource_policy == "update",
            })
        })
        .collect();
    let backed_up: Vec<BackedUpClaim<'_>> = pvbs
        .iter()
        .filter_map(|p| {
            Some(BackedUpClaim {
                backup: p.metadata.labels.as_ref()?.get(names::VELERO_BACKUP_NAME)?,
                pod_namespace: &p.spec.pod.namespace,
                claim: p.facts().pvc_name?,
            })
        })
        .collect();
    let labelled: Vec<LabelledClaim<'_>> = claims
        .iter()
        .filter_map(|c| {
            Some(LabelledClaim {
                namespace: c.metadata.namespace.as_deref()?,
                name: c.metadata.name.as_deref()?,
                restore: c.label(names::VELERO_RESTORE_NAME),
                username: c.label(names::JUPYTERHUB_USERNAME),
            })
        })
        .collect();
    let helpers: Vec<(&str, &str)> = pods
        .iter()
        .filter(|p| {
            p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US)
                && p.label(names::COMPONENT) == Some(names::RESTORE_HELPER)
                && p.metadata.deletion_timestamp.is_none()
        })
        .flat_map(|p| {
            p.volumes()
                .filter_map(|(_, c)| c)
                .map(|c| (p.namespace(), c))
        })
        .collect();
    let listed: Vec<Listed<'_>> = namespaces
        .iter()
        .filter_map(|n| {
            let a = n.metadata.annotations.as_ref()?;
            Some(Listed {
                namespace: n.metadata.name.as_deref()?,
                claims: restoring::parse_annotation(a.get(names::NAMESPACE_RESTORING_CLAIMS)?),
                since: a
                    .get(names::NAMESPACE_RESTORING_SINCE)
                    .and_then(|t| t.parse().ok()),
                restores: a
                    .get(names::NAMESPACE_RESTORING_RESTORES)
                    .map(|r| restoring::parse_annotation(r))
                    .unwrap_or_default(),
            })
        })
        .collect();
    let input = Input {
        namespaces: &opted,
        restores: &restores,
        backed_up: &backed_up,
        claims: &labelled,
        restore_helpers: &helpers,
        listed: &listed,
        now,
    };
    let next = listed
        .iter()
        .filter_map(Listed::until)
        .filter(|until| *until > now)
        .min();
    (restoring::claims_being_restored(&input), next)
}

/// A merge patch to apply to a pod, with its pending-set key.
struct PodPatch<'a> {
    key: String,
    namespace: &'a str,
    name: &'a str,
    patch: serde_json::Value,
    backfill: bool,
}

struct Reconciler {
    client: kube::Client,
    events: EventSink,
    config: Config,
    metrics: Arc<Metrics>,
    /// Writes made and not yet reflected by the watches, by key, with when they were made.
    pending: HashMap<String, Instant>,
    /// The same for the namespaces' claims-being-restored annotation (`restoring/<ns>/<value>`).
    namespaces_pending: HashMap<String, Instant>,
    /// Schedule problems already reported (Event sent), so each is reported once.
    reported: HashSet<(String, String)>,
    /// Helpers reported as not running, by uid.
    stuck_reported: HashSet<String>,
    /// Restore helpers done with.
    restores: RestoreCleanup,
    /// Idle claims beyond what fits at once: runs of waves.
    waves: Waves,
    /// Wave Backups created and not yet seen by the watch, by name.
    backups_pending: HashMap<String, Instant>,
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
        let namespace_objects = &snap.namespaces;
        let policies: Vec<(String, NamespacePolicy)> = namespace_objects
            .iter()
            .map(|n| {
                let m = &n.metadata;
                let policy = NamespacePolicy::read(
                    m.labels.as_ref(),
                    m.annotations.as_ref(),
                    &self.config.default_claims,
                );
                (m.name.clone().unwrap_or_default(), policy)
            })
            .filter(|(_, p)| p.opted_in)
            .collect();
        let globs: Vec<(&str, Arc<ClaimGlobs>)> = policies
            .iter()
            .map(|(n, p)| (n.as_str(), p.claims.clone()))
            .collect();
        let namespaces: Vec<NamespaceView<'_>> = globs
            .iter()
            .map(|(name, claims)| NamespaceView { name, claims })
            .collect();
        let opted_in = |ns: Option<&str>| ns.is_some_and(|ns| globs.iter().any(|(n, _)| *n == ns));
        // Windows the namespaces open themselves (`velero-jupyterhub backup`, or by hand).
        let mut manual = Vec::new();
        let mut namespace_problems = Vec::new();
        for n in namespace_objects
            .iter()
            .filter(|n| opted_in(n.metadata.name.as_deref()))
        {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            match ManualWindow::read(name, n.metadata.annotations.as_ref()) {
                Ok(Some(window)) => {
                    if window.until.duration_since(now) > self.config.windows.max {
                        namespace_problems.push((name.to_owned(), format!(
                            "{} is {}, more than --max-window ahead: helpers stay up until then",
                            names::NAMESPACE_WINDOW_UNTIL, window.until
                        )));
                    }
                    manual.push(window);
                }
                Ok(None) => {}
                Err(problem) => namespace_problems.push((name.to_owned(), problem)),
            }
        }

        let claim_objects = &snap.claims;
        let claims: Vec<ClaimView<'_>> = claim_objects
            .iter()
            .filter(|c| opted_in(c.metadata.namespace.as_deref()))
            .map(|c| c.view())
            .collect();
        // Every namespace the watch shows (our --namespace-selector): helpers left in one
        // that opted out are deleted.
        let managed: HashSet<&str> = namespace_objects
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        let pods: Vec<&PodRecord> = snap
            .pods
            .iter()
            .filter(|p| managed.contains(p.namespace()))
            .map(Arc::as_ref)
            .collect();

        let schedule_objects = &snap.schedules;
        let schedules: Vec<ScheduleView<'_>> = schedule_objects
            .iter()
            .filter_map(|s| {
                Some(ScheduleView {
                    name: s.metadata.name.as_deref()?,
                    created: s.metadata.creation_timestamp.as_ref()?.0,
                    spec: &s.spec,
                    status: s.status.as_ref(),
                })
            })
            .collect();
        let backup_objects = &snap.backups;
        let backups: Vec<BackupView<'_>> = backup_objects
            .iter()
            .filter_map(|b| {
                Some(BackupView {
                    name: b.metadata.name.as_deref()?,
                    created: b.metadata.creation_timestamp.as_ref()?.0,
                    schedule: label(&b.metadata.labels, names::VELERO_SCHEDULE_NAME),
                    phase: b.status.as_ref().and_then(|s| s.phase.as_deref()),
                })
            })
            .collect();
        let pvb_objects = &snap.pvbs;
        let pvbs: Vec<PvbView<'_>> = pvb_objects
            .iter()
            .filter_map(|p| {
                Some(PvbView {
                    backup: label(&p.metadata.labels, names::VELERO_BACKUP_NAME)?,
                    pod_namespace: &p.spec.pod.namespace,
                    pod_uid: &p.spec.pod.uid,
                    phase: p.status.as_ref().and_then(|s| s.phase.as_deref()),
                })
            })
            .collect();

        let restore_objects = &snap.restores;
        let (being_restored, listed_until) = claims_being_restored(
            &globs,
            namespace_objects,
            claim_objects,
            &pods,
            pvb_objects,
            restore_objects,
            backup_objects,
            now,
        );
        let restoring: HashSet<(&str, &str)> = being_restored
            .iter()
            .flat_map(|(ns, claims)| claims.iter().map(move |c| (*ns, *c)))
            .collect();

        let windows = window::windows(
            namespaces.iter().map(|n| n.name),
            &schedules,
            &manual,
            &backups,
            &helper::own_labels(None),
            now,
            self.config.windows,
        );
        self.report_problems(&windows, schedule_objects, namespace_problems);
        self.count_helpers(&pods, windows.open.len());
        let mut plan = plan::plan(&PlanInput {
            namespaces: &namespaces,
            claims: &claims,
            pods: &pods,
            windows: &windows.open,
            pvbs: &pvbs,
            helper: &self.config.helper,
            restoring: &restoring,
        });
        let uids: HashMap<(&str, &str), &str> = claims
            .iter()
            .map(|c| ((c.namespace, c.name), c.uid))
            .collect();
        let (stuck, next_stuck) = plan::stuck_helpers(&pods, now, STUCK_AFTER);
        self.report_stuck(&stuck, &uids);
        let next_failed_expiry = self.restores.pass(&snap, &pods, &uids, now).await;
        let coverage = CoverageInput {
            globs: &globs,
            claims: &claims,
            pods: &pods,
            pvbs: pvb_objects,
            backups: backup_objects,
        };
        let coverage_due = self.report_coverage(&coverage, snap.generation, now);
        // Within the helpers' limits: the window's helpers that fit, then the waves.
        let unserved: HashSet<&str> = windows.problems.iter().map(|(n, _)| n.as_str()).collect();
        let waves = self
            .waves
            .plan(&snap, &globs, &unserved, &restoring, &mut plan.create);
        plan.create.extend(waves.create);
        plan.delete.extend(waves.delete);
        self.apply(plan, &uids, stores).await;
        self.make_wave_backups(&waves.backups).await;
        self.record_restoring(namespace_objects, &globs, &being_restored)
            .await;
        // A write that timed out or failed is retried when its pending entry expires:
        // wake then, even if nothing else happens.
        let retry = self
            .pending
            .values()
            .chain(self.namespaces_pending.values())
            .map(|at| (*at + PENDING_FOR).saturating_duration_since(Instant::now()))
            .min()
            .and_then(|d| SignedDuration::try_from(d).ok())
            .map(|d| Timestamp::now() + d);
        [
            windows.next_change,
            next_stuck,
            retry,
            next_failed_expiry,
            coverage_due,
            waves.next_change,
            listed_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Keeps each opted-in namespace's `velero-jupyterhub.io/restoring-claims` annotation
    /// (which a ValidatingAdmissionPolicy reads: manifests/restore-guard.yaml) equal to
    /// the claims being restored there. A merge patch of that annotation (and, once none
    /// is left, of the `restore` command's `…/restoring-since`), guarded by the
    /// resourceVersion read: the command may be adding claims at the same time.
    async fn record_restoring(
        &mut self,
        namespaces: &[Arc<PartialObjectMeta<Namespace>>],
        opted_in: &[(&str, Arc<ClaimGlobs>)],
        restoring: &BTreeMap<&str, BTreeSet<&str>>,
    ) {
        self.namespaces_pending
            .retain(|_, at| at.elapsed() < PENDING_FOR);
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
            let key = format!("restoring/{name}/{}", want.as_deref().unwrap_or(""));
            if self
                .namespaces_pending
                .get(&key)
                .is_some_and(|at| at.elapsed() < PENDING_FOR)
            {
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
            let patch = json!({"metadata": {
                "resourceVersion": m.resource_version,
                "annotations": set,
            }});
            self.namespaces_pending.insert(key, Instant::now());
            let api: Api<Namespace> = Api::all(self.client.clone());
            let done = tokio::time::timeout(
                WRITE_TIMEOUT,
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
            self.metrics.controller.write("patch", "namespaces");
            match done {
                Ok(Ok(_)) => info!(
                    namespace = name,
                    claims = want.as_deref().unwrap_or(""),
                    "claims being restored recorded on the namespace"
                ),
                Ok(Err(e)) => {
                    warn!(namespace = name, error = %e, "could not record the claims being restored on the namespace; retrying")
                }
                Err(_) => warn!(
                    namespace = name,
                    "recording the claims being restored timed out; retrying"
                ),
            }
        }
    }

    /// A Warning Event on the claim of each helper not running `STUCK_AFTER` after its
    /// creation, once per helper.
    fn report_stuck(&mut self, stuck: &[&PodRecord], uids: &HashMap<(&str, &str), &str>) {
        let now: HashSet<String> = stuck.iter().map(|p| p.uid().to_owned()).collect();
        for pod in stuck
            .iter()
            .filter(|p| !self.stuck_reported.contains(p.uid()))
        {
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
        self.stuck_reported = now;
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
        let restorable: HashSet<&str> = backups
            .iter()
            .filter(|b| b.restorable())
            .filter_map(|b| b.metadata.name.as_deref())
            .collect();
        let done: Vec<_> = pvbs.iter().filter_map(|p| p.done()).collect();
        let rows = crate::policy::status::rows(
            |ns| globs.iter().find(|(n, _)| *n == ns).map(|(_, g)| g.clone()),
            claims,
            pods,
            &done,
            |b| restorable.contains(b),
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
        let now: HashSet<(String, String)> = windows
            .problems
            .iter()
            .map(|(n, p)| (n.clone(), p.to_string()))
            .chain(namespace_problems.iter().cloned())
            .collect();
        for (name, message) in now.difference(&self.reported) {
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
            if let Some(s) = schedules
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
            {
                self.events.warn(
                    s.reference(),
                    "IdleUsersNotCovered",
                    "Plan",
                    message.clone(),
                );
            }
        }
        self.reported = now;
    }

    /// Applies the plan, skipping writes made recently that the watches have not shown yet.
    async fn apply(
        &mut self,
        plan: Plan,
        claim_uids: &HashMap<(&str, &str), &str>,
        stores: &Stores,
    ) {
        // Patches: backfilled annotations and helpers' labels.
        let patches: Vec<PodPatch> = plan
            .backfill
            .iter()
            .map(|b| PodPatch {
                key: format!("backfill/{}/{}", b.uid, b.resource_version),
                namespace: &b.namespace,
                name: &b.name,
                // Guarded by the resourceVersion read: applies only to the pod as planned.
                patch: json!({"metadata": {
                    "resourceVersion": b.resource_version,
                    "annotations": {(names::VELERO_BACKUP_VOLUMES): b.value},
                }}),
                backfill: true,
            })
            .chain(plan.relabel.iter().map(|r| PodPatch {
                key: format!(
                    "relabel/{}/{}",
                    r.uid,
                    serde_json::to_string(&r.labels).unwrap_or_default()
                ),
                namespace: &r.namespace,
                name: &r.name,
                // Guarded by the uid (immutable: another uid is refused).
                patch: json!({"metadata": {"uid": r.uid, "labels": r.labels}}),
                backfill: false,
            }))
            .collect();
        let wanted: HashSet<String> = plan
            .create
            .iter()
            .map(create_key)
            .chain(plan.delete.iter().map(delete_key))
            .chain(patches.iter().map(|p| p.key.clone()))
            .collect();
        // What the plan no longer asks for has been seen done (or undone): forget it.
        self.pending
            .retain(|k, at| wanted.contains(k) && at.elapsed() < PENDING_FOR);
        if plan.is_empty() {
            return;
        }
        debug!(
            create = plan.create.len(),
            delete = plan.delete.len(),
            backfill = plan.backfill.len(),
            "applying a plan"
        );
        // Deletions first (a user waits on those), all at once, each bounded in time.
        let deletes: Vec<&Deletion> = plan
            .delete
            .iter()
            .filter(|d| self.begin(delete_key(d)))
            .collect();
        let this = &*self;
        futures::stream::iter(deletes)
            .for_each_concurrent(WRITES_IN_FLIGHT, |d| async move {
                if tokio::time::timeout(WRITE_TIMEOUT, this.delete(d, claim_uids))
                    .await
                    .is_err()
                {
                    warn!(namespace = %d.namespace, helper = %d.name, "delete timed out; retried later");
                }
            })
            .await;
        // Creates in chunks: when anything changed meanwhile (a user started?), stop and
        // plan again, so a window opening over thousands of claims never holds up a user
        // for longer than one chunk.
        let generation = stores.generation();
        for chunk in plan.create.chunks(CREATE_CHUNK) {
            if stores.generation() != generation {
                debug!("the cluster changed while creating helpers: planning again");
                break;
            }
            let todo: Vec<&Pod> = chunk
                .iter()
                .filter(|pod| self.begin(create_key(pod)))
                .collect();
            let this = &*self;
            futures::stream::iter(todo)
                .for_each_concurrent(WRITES_IN_FLIGHT, |pod| async move {
                    if tokio::time::timeout(WRITE_TIMEOUT, this.create(pod, claim_uids))
                        .await
                        .is_err()
                    {
                        warn!(helper = ?pod.metadata.name, "create timed out; retried later");
                    }
                })
                .await;
        }
        // In chunks, bounded, and not past a change (the next pass plans them again).
        for chunk in patches.chunks(CREATE_CHUNK) {
            if stores.generation() != generation {
                break;
            }
            let todo: Vec<&PodPatch> = chunk.iter().filter(|p| self.begin(p.key.clone())).collect();
            let this = &*self;
            futures::stream::iter(todo)
                .for_each_concurrent(WRITES_IN_FLIGHT, |p| async move {
                    let patched = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        this.patch_pod(p.namespace, p.name, &p.patch),
                    )
                    .await;
                    match patched {
                        Ok(true) if p.backfill => {
                            this.metrics.controller.backfilled.inc();
                            info!(
                                namespace = p.namespace,
                                pod = p.name,
                                "backfilled the backup annotation"
                            );
                        }
                        Ok(true) => {
                            info!(
                                namespace = p.namespace,
                                helper = p.name,
                                "labelled a backup helper for an open window's Schedule"
                            );
                        }
                        Ok(false) => {}
                        Err(_) => warn!(
                            namespace = p.namespace,
                            pod = p.name,
                            "patch timed out; retried later"
                        ),
                    }
                })
                .await;
        }
    }

    /// Creates each wave's Backup from its Schedule as it is now (read whole: the
    /// template's every field goes into the Backup).
    async fn make_wave_backups(&mut self, backups: &[WaveBackupToMake]) {
        let velero = self.config.velero_namespace.clone();
        // Their own pending set: the plan's (`apply`) forgets what it did not plan this
        // pass, and a Backup is planned again until the watch shows it.
        self.backups_pending
            .retain(|_, at| at.elapsed() < PENDING_FOR);
        let todo: Vec<&WaveBackupToMake> = backups
            .iter()
            .filter(|b| {
                let name = b.id(&velero).backup_name();
                if self.backups_pending.contains_key(&name) {
                    return false;
                }
                self.backups_pending.insert(name, Instant::now());
                true
            })
            .collect();
        let this = &*self;
        futures::stream::iter(todo)
            .for_each_concurrent(WRITES_IN_FLIGHT, |b| {
                let velero = velero.clone();
                async move {
                    if tokio::time::timeout(WRITE_TIMEOUT, this.make_wave_backup(b, &velero))
                        .await
                        .is_err()
                    {
                        warn!(schedule = %b.schedule, wave = b.number, "creating a wave Backup timed out; retried later");
                    }
                }
            })
            .await;
    }

    async fn make_wave_backup(&self, b: &WaveBackupToMake, velero: &str) {
        let resource = kube::api::ApiResource::erase::<crate::cluster::velero::Backup>(&());
        let schedules: Api<kube::core::DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            velero,
            &kube::api::ApiResource::erase::<Schedule>(&()),
        );
        let backups: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), velero, &resource);
        let id = b.id(velero);
        let name = id.backup_name();
        let schedule = match schedules.get(&b.schedule).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(schedule = %b.schedule, error = %e, "could not read the Schedule for a wave Backup; retried later");
                return;
            }
        };
        let schedule = serde_json::to_value(&schedule).unwrap_or_default();
        let namespaces: Vec<&str> = b.namespaces.iter().map(String::as_str).collect();
        let mut backup = crate::policy::waves::wave_backup(&schedule, &id, &b.follows, &namespaces);
        backup["metadata"]["annotations"][names::WAVE_CLAIMS] = b.claims.join(",").into();
        backup["metadata"]["annotations"][names::WAVE_GIVEN_UP] = b.given_up.join(",").into();
        let object: kube::core::DynamicObject = match serde_json::from_value(backup) {
            Ok(o) => o,
            Err(e) => {
                warn!(backup = %name, error = %e, "a wave Backup did not encode");
                return;
            }
        };
        self.metrics.controller.write("create", "backups");
        match backups.create(&PostParams::default(), &object).await {
            Ok(_) => {
                let labels = crate::metrics::ScheduleLabels {
                    schedule: b.schedule.clone(),
                };
                let m = &self.metrics.controller;
                m.waves.get_or_create(&labels).inc();
                m.wave_claims
                    .get_or_create(&labels)
                    .inc_by(b.claims.len() as u64);
                m.wave_given_up
                    .get_or_create(&labels)
                    .inc_by(b.given_up.len() as u64);
                info!(backup = %name, claims = b.claims.len(), given_up = b.given_up.len(), "created a wave Backup");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => debug!(backup = %name, "already exists"),
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(backup = %name, error = %e, "could not create a wave Backup; retried later");
                let reference = crate::cluster::velero::schedule_reference(
                    Some(b.schedule.clone()),
                    Some(velero.to_owned()),
                    None,
                );
                self.events.warn(
                    reference,
                    "WaveBackupFailed",
                    "Create",
                    format!("could not create wave Backup {name} (retried): {e}"),
                );
            }
        }
    }

    /// A merge patch of a pod, counted; false (logged, counted as an error) if refused.
    async fn patch_pod(&self, ns: &str, name: &str, patch: &serde_json::Value) -> bool {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        self.metrics.controller.write("patch", "pods");
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = ns, pod = name, error = %e, "patch failed; retried when the pod changes");
                false
            }
        }
    }

    /// Marks a write as made now; false if it was made recently and is still pending.
    fn begin(&mut self, key: String) -> bool {
        if self.pending.contains_key(&key) {
            return false;
        }
        self.pending.insert(key, Instant::now());
        true
    }

    async fn create(&self, pod: &Pod, claim_uids: &HashMap<(&str, &str), &str>) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let claim = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(names::HELPER_CLAIM))
            .map(String::as_str)
            .unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        self.metrics.controller.write("create", "pods");
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => {
                info!(
                    namespace = ns,
                    helper = name,
                    claim,
                    "created a backup helper"
                );
                self.claim_event(
                    ns,
                    claim,
                    claim_uids,
                    "BackupHelperCreated",
                    "Create",
                    format!(
                        "backup helper {name} mounts this idle claim for the next Velero backup"
                    ),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Ours, not seen by the watch yet; or someone else's pod has the name.
                let existing = api.get_opt(name).await.ok().flatten();
                let ours = existing.as_ref().is_some_and(|p| {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    let mounts_claim =
                        p.spec
                            .iter()
                            .flat_map(|s| s.volumes.iter().flatten())
                            .any(|v| {
                                v.persistent_volume_claim
                                    .as_ref()
                                    .is_some_and(|c| c.claim_name == claim)
                            });
                    labels.get(names::MANAGED_BY).map(String::as_str) == Some(names::MANAGED_BY_US)
                        && mounts_claim
                });
                if ours || existing.is_none() {
                    debug!(namespace = ns, helper = name, "already exists");
                } else {
                    self.metrics.controller.reconcile_errors.inc();
                    warn!(
                        namespace = ns,
                        helper = name,
                        claim,
                        "a pod that is not this claim's backup helper has its name"
                    );
                    self.claim_warning(
                        ns,
                        claim,
                        claim_uids,
                        format!("cannot create backup helper {name}: a pod of that name exists and is not this claim's helper; this claim misses Backups until it is gone"),
                    );
                }
            }
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = ns, helper = name, error = %e, "could not create a backup helper");
                self.claim_warning(
                    ns,
                    claim,
                    claim_uids,
                    format!("could not create backup helper {name}: {e}"),
                );
            }
        }
    }

    async fn delete(&self, d: &Deletion, claim_uids: &HashMap<(&str, &str), &str>) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &d.namespace);
        let params = DeleteParams {
            grace_period_seconds: d.reason.immediate().then_some(0),
            preconditions: Some(Preconditions {
                uid: Some(d.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        self.metrics.controller.write("delete", "pods");
        match api.delete(&d.name, &params).await {
            Ok(_) => {
                info!(namespace = %d.namespace, helper = %d.name, reason = d.reason.as_str(), "deleted a backup helper");
                self.claim_event(
                    &d.namespace,
                    &d.claim,
                    claim_uids,
                    "BackupHelperDeleted",
                    "Delete",
                    format!(
                        "backup helper {} deleted: {}",
                        d.name,
                        d.reason.as_str().replace('_', " ")
                    ),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                debug!(helper = %d.name, "already gone")
            }
            Err(e) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = %d.namespace, helper = %d.name, error = %e, "could not delete a backup helper")
            }
        }
    }

    fn claim_event(
        &self,
        ns: &str,
        claim: &str,
        uids: &HashMap<(&str, &str), &str>,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.events
            .normal(claim_reference(ns, claim, uids), reason, action, note);
    }

    fn claim_warning(
        &self,
        ns: &str,
        claim: &str,
        uids: &HashMap<(&str, &str), &str>,
        note: String,
    ) {
        self.events.warn(
            claim_reference(ns, claim, uids),
            "BackupHelperFailed",
            "Create",
            note,
        );
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// An Event's reference to a user claim (its uid when the watch has it).
pub(super) fn claim_reference(
    ns: &str,
    claim: &str,
    uids: &HashMap<(&str, &str), &str>,
) -> ObjectReference {
    crate::cluster::events::claim_reference(ns, claim, uids.get(&(ns, claim)).copied())
}
