//! The pass's views: the snapshot's objects as the planners read them (borrowed, only the
//! fields a decision reads), built once per pass.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::snapshot::Snapshot;
use crate::names;
use crate::policy::datapath::{self, DataPath, VolumeFacts};
use crate::policy::plan::{ClaimView, NamespaceView, PvbView};
use crate::policy::restoring;
use crate::policy::velero::BackupTemplate;
use crate::policy::window::{BackupView, ManualWindow, NamespaceWindow, ScheduleView};
use crate::policy::{ClaimGlobs, NamespacePolicy, PodFacts, PodRecord, VolumeRecord};

/// The opted-in namespaces of the snapshot, each with its claim globs.
pub struct OptedIn(Vec<(String, Arc<ClaimGlobs>)>);

impl OptedIn {
    pub fn read(snap: &Snapshot, default_claims: &Arc<ClaimGlobs>) -> Self {
        Self(
            snap.namespaces
                .iter()
                .filter_map(|n| {
                    let m = &n.metadata;
                    let policy = NamespacePolicy::read(
                        m.labels.as_ref(),
                        m.annotations.as_ref(),
                        default_claims,
                    );
                    policy
                        .opted_in
                        .then(|| (m.name.clone().unwrap_or_default(), policy.claims))
                })
                .collect(),
        )
    }
}

pub struct Views<'a> {
    pub now: Timestamp,
    /// Opted-in namespaces and their claim globs.
    pub globs: Vec<(&'a str, Arc<ClaimGlobs>)>,
    pub namespaces: Vec<NamespaceView<'a>>,
    /// Windows the namespaces open themselves (`velero-jupyterhub backup`, or by hand),
    /// and what is wrong with a namespace's window annotations (namespace, problem).
    pub manual: Vec<ManualWindow<'a>>,
    pub namespace_problems: Vec<(String, String)>,
    /// The claims of opted-in namespaces, and their uids by (namespace, name).
    pub claims: Vec<ClaimView<'a>>,
    pub claim_uids: HashMap<(&'a str, &'a str), &'a str>,
    /// The pods of every namespace the controller manages (its --namespace-selector):
    /// helpers left in one that opted out are deleted.
    pub pods: Vec<&'a PodRecord>,
    pub schedules: Vec<ScheduleView<'a>>,
    pub backups: Vec<BackupView<'a>>,
    pub pvbs: Vec<PvbView<'a>>,
    /// The claims being restored in each opted-in namespace, the same as pairs, and when
    /// claims the `restore` command listed stop counting by themselves.
    pub being_restored: BTreeMap<&'a str, BTreeSet<&'a str>>,
    pub restoring: HashSet<(&'a str, &'a str)>,
    pub listed_until: Option<Timestamp>,
}

impl<'a> Views<'a> {
    pub fn build(snap: &'a Snapshot, opted: &'a OptedIn, max_window: SignedDuration) -> Self {
        let now = snap.now;
        let globs: Vec<(&str, Arc<ClaimGlobs>)> = opted
            .0
            .iter()
            .map(|(n, g)| (n.as_str(), g.clone()))
            .collect();
        let namespaces: Vec<NamespaceView<'_>> = opted
            .0
            .iter()
            .map(|(name, claims)| NamespaceView { name, claims })
            .collect();
        let opted_in = |ns: Option<&str>| ns.is_some_and(|ns| globs.iter().any(|(n, _)| *n == ns));
        let mut manual = Vec::new();
        let mut namespace_problems = Vec::new();
        for n in snap
            .namespaces
            .iter()
            .filter(|n| opted_in(n.metadata.name.as_deref()))
        {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            match ManualWindow::read(name, n.metadata.annotations.as_ref()) {
                Ok(Some(window)) => {
                    if window.until.duration_since(now) > max_window {
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
        let claims: Vec<ClaimView<'_>> = snap
            .claims
            .iter()
            .filter(|c| opted_in(c.metadata.namespace.as_deref()))
            .map(|c| c.view())
            .collect();
        let claim_uids = claims
            .iter()
            .map(|c| ((c.namespace, c.name), c.uid))
            .collect();
        let managed: HashSet<&str> = snap
            .namespaces
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        let pods: Vec<&PodRecord> = snap
            .pods
            .iter()
            .filter(|p| managed.contains(p.namespace()))
            .map(Arc::as_ref)
            .collect();
        let schedules = snap
            .schedules
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
        let backups = snap
            .backups
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
        let pvbs = snap
            .pvbs
            .iter()
            .filter_map(|p| {
                Some(PvbView {
                    backup: label(&p.metadata.labels, names::VELERO_BACKUP_NAME)?,
                    pod_namespace: &p.spec.pod.namespace,
                    pod_uid: &p.spec.pod.uid,
                    claim: p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(names::VELERO_PVC_NAME))
                        .map(String::as_str),
                    phase: p.status.as_ref().and_then(|s| s.phase.as_deref()),
                })
            })
            .collect();
        let (being_restored, listed_until) = claims_being_restored(&globs, snap, &pods, now);
        let restoring = being_restored
            .iter()
            .flat_map(|(ns, claims)| claims.iter().map(move |c| (*ns, *c)))
            .collect();
        Self {
            now,
            globs,
            namespaces,
            manual,
            namespace_problems,
            claims,
            claim_uids,
            pods,
            schedules,
            backups,
            pvbs,
            being_restored,
            restoring,
            listed_until,
        }
    }
}

fn label<'a>(
    labels: &'a Option<std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// The claims being restored in each opted-in namespace (`policy::restoring`), from the
/// pass's snapshot of the stores, and when claims the `restore` command listed stop
/// counting by themselves (a pass is due then).
fn claims_being_restored<'a>(
    opted_in: &[(&'a str, Arc<ClaimGlobs>)],
    snap: &'a Snapshot,
    pods: &[&'a PodRecord],
    now: Timestamp,
) -> (BTreeMap<&'a str, BTreeSet<&'a str>>, Option<Timestamp>) {
    let (namespaces, claims, pvbs, restores, backups) = (
        &snap.namespaces,
        &snap.claims,
        &snap.pvbs,
        &snap.restores,
        &snap.backups,
    );
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

impl<'a> Views<'a> {
    /// The opted-in claims the open windows' Schedules copy without a pod, with the
    /// Schedule and the way (`datapath::without_pod`): they get no window helper.
    pub fn without_pod(
        &self,
        snap: &'a Snapshot,
        open: &BTreeMap<String, NamespaceWindow>,
    ) -> HashMap<(&'a str, &'a str), (&'a str, DataPath)> {
        let volumes: HashMap<&str, &VolumeRecord> = snap
            .volumes
            .iter()
            .filter_map(|v| Some((v.metadata.name.as_deref()?, v.as_ref())))
            .collect();
        let templates: HashMap<&str, (&'a str, &'a BackupTemplate)> = self
            .schedules
            .iter()
            .map(|s| (s.name, (s.name, &s.spec.template)))
            .collect();
        let manual: HashSet<&str> = self
            .manual
            .iter()
            .filter(|m| m.is_open(&self.backups, self.now))
            .map(|m| m.namespace)
            .collect();
        let mut out = HashMap::new();
        for claim in &snap.claims {
            let view = claim.view();
            let Some(window) = open.get(view.namespace) else {
                continue;
            };
            // User claims only (the namespace's globs), bound (else no helper anyway).
            let user_claim = self
                .globs
                .iter()
                .any(|(ns, g)| *ns == view.namespace && g.matches(view.name));
            if !user_claim || !view.bound {
                continue;
            }
            let schedules: Vec<(&'a str, &'a BackupTemplate)> = window
                .schedules
                .iter()
                .filter_map(|name| templates.get(name.as_str()).copied())
                .collect();
            let pv = claim.volume_name.as_deref().and_then(|n| volumes.get(n));
            let volume = VolumeFacts {
                pv: pv.map(|v| v.path_facts()),
                ..Default::default()
            };
            let manual = manual.contains(view.namespace);
            if let Some(way) = datapath::without_pod(&schedules, manual, &volume) {
                out.insert((view.namespace, view.name), way);
            }
        }
        out
    }
}
