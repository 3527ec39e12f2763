//! The reconciler's restore part: restore helpers whose volumes Velero has filled are
//! deleted, with an Event on each claim saying what came back; failed ones are kept
//! `--failed-helper-ttl` for inspection. The decision is `policy::cleanup`'s; this file
//! reads the pass's snapshot, reports failures, and asks the applier for the deletions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tracing::warn;

use super::apply::{Note, ReportOnce, Write, claim_reference};
use super::snapshot::Snapshot;
use crate::cluster::events::EventSink;
use crate::metrics::{Metrics, StateLabels};
use crate::names;
use crate::policy::PodRecord;
use crate::policy::cleanup::{self, HelperState, PvrView, RestoreHelper, RestoreView};
use crate::policy::plan::{DeleteReason, Deletion};

pub struct RestoreCleanup {
    events: EventSink,
    metrics: Arc<Metrics>,
    failed_ttl: SignedDuration,
    /// Helpers whose failure has been reported (uid), so it is reported once.
    failed_reported: ReportOnce<String>,
}

impl RestoreCleanup {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>, failed_ttl: SignedDuration) -> Self {
        Self {
            events: EventSink::new(Some(client.clone())),
            metrics,
            failed_ttl,
            failed_reported: ReportOnce::default(),
        }
    }

    /// One pass over the restore helpers in `pods`: the deletions to make, and when a kept
    /// failed helper is next due for deletion.
    pub fn pass(
        &mut self,
        snap: &Snapshot,
        pods: &[&PodRecord],
        claim_uids: &HashMap<(&str, &str), &str>,
        now: Timestamp,
    ) -> (Vec<Write>, Option<Timestamp>) {
        let pvrs: Vec<PvrView<'_>> = snap
            .pvrs
            .iter()
            .filter_map(|p| {
                let labels = p.metadata.labels.as_ref()?;
                let status = p.status.as_ref();
                Some(PvrView {
                    pod_uid: labels.get(names::VELERO_POD_UID)?,
                    volume: &p.spec.volume,
                    phase: status.and_then(|s| s.phase.as_deref()),
                    bytes_done: status.and_then(|s| s.progress.bytes_done),
                    message: status.and_then(|s| s.message.as_deref()),
                    completed: status.and_then(|s| s.completion_timestamp.as_ref().map(|t| t.0)),
                })
            })
            .collect();
        let restores: Vec<RestoreView<'_>> = snap
            .restores
            .iter()
            .filter_map(|r| {
                let status = r.status.as_ref();
                Some(RestoreView {
                    name: r.metadata.name.as_deref()?,
                    backup: &r.spec.backup_name,
                    phase: status.and_then(|s| s.phase.as_deref()),
                    completed: status.and_then(|s| s.completion_timestamp.as_ref().map(|t| t.0)),
                })
            })
            .collect();
        let (helpers, next) =
            cleanup::restore_helpers(pods, &pvrs, &restores, now, self.failed_ttl);

        let mut by_state: BTreeMap<&'static str, i64> =
            [("restoring", 0), ("failed", 0), ("done", 0)].into();
        for h in &helpers {
            let state = match h.state {
                HelperState::Restoring => "restoring",
                HelperState::Failed { .. } => "failed",
                _ => "done",
            };
            *by_state.entry(state).or_default() += 1;
        }
        for (state, n) in by_state {
            let gauge = &self.metrics.controller.restore_helpers;
            gauge.get_or_create(&StateLabels { state }).set(n);
        }

        // Failed helpers are reported once each (one kept past its time, never seen
        // within it, say after a restart, too).
        let failed = |h: &&RestoreHelper<'_>| {
            matches!(
                h.state,
                HelperState::Failed { .. } | HelperState::FailedExpired
            )
        };
        let fresh: HashSet<String> = self
            .failed_reported
            .fresh(
                helpers
                    .iter()
                    .filter(failed)
                    .map(|h| h.pod.uid().to_owned()),
            )
            .into_iter()
            .collect();
        for helper in helpers.iter().filter(|h| fresh.contains(h.pod.uid())) {
            let until = match helper.state {
                HelperState::Failed { until } => Some(until),
                _ => None,
            };
            self.report_failed(helper, until, claim_uids);
        }
        let mut writes = Vec::new();
        for helper in &helpers {
            if helper.state.delete() {
                writes.push(Write::DeletePod {
                    deletion: Deletion {
                        namespace: helper.pod.namespace().to_owned(),
                        name: helper.pod.name().to_owned(),
                        uid: helper.pod.uid().to_owned(),
                        claim: String::new(),
                        reason: DeleteReason::RestoreDone,
                    },
                    done: done_notes(helper),
                });
            }
        }
        (writes, next)
    }

    /// A Warning on each claim whose volume failed, once per helper.
    fn report_failed(
        &self,
        helper: &RestoreHelper<'_>,
        until: Option<Timestamp>,
        uids: &HashMap<(&str, &str), &str>,
    ) {
        for volume in helper
            .volumes
            .iter()
            .filter(|v| v.phase != Some("Completed"))
        {
            self.metrics.controller.restores_failed.inc();
            let message = cleanup::failed_message(helper, volume, until);
            warn!(
                namespace = helper.pod.namespace(),
                pod = helper.pod.name(),
                restore = helper.restore,
                volume = volume.volume,
                "{message}"
            );
            if let Some(claim) = volume.claim {
                let reference = claim_reference(helper.pod.namespace(), claim, uids);
                self.events
                    .warn(reference, "RestoreFailed", "Restore", message);
            }
        }
    }
}

/// What a done restore helper's deletion reports on each claim: what came back (a
/// Completed restore), or that nothing did (its Restore ended without a PodVolumeRestore
/// for a volume restore-wait was waiting for).
fn done_notes(helper: &RestoreHelper<'_>) -> Vec<Note> {
    let (ns, name) = (helper.pod.namespace(), helper.pod.name());
    match helper.state {
        HelperState::Completed => helper
            .volumes
            .iter()
            .map(|volume| Note {
                namespace: ns.to_owned(),
                claim: volume.claim.map(str::to_owned),
                warning: false,
                reason: "Restored",
                action: "Restore",
                message: cleanup::restored_message(helper, volume),
                restored_bytes: u64::try_from(volume.bytes_done.unwrap_or(0)).unwrap_or(0),
                restore_failed: false,
            })
            .collect(),
        HelperState::RestoreOver => helper
            .volumes
            .iter()
            .map(|volume| Note {
                namespace: ns.to_owned(),
                claim: volume.claim.map(str::to_owned),
                warning: true,
                reason: "RestoreFailed",
                action: "Restore",
                message: format!(
                    "restore {} ended without restoring volume {} of pod {name} (no PodVolumeRestore for it); restore helper deleted",
                    helper.restore, volume.volume
                ),
                restored_bytes: 0,
                restore_failed: true,
            })
            .collect(),
        _ => Vec::new(),
    }
}
