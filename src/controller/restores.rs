//! The reconciler's restore part (SPEC §3.2): restore helpers whose volumes Velero has
//! filled are deleted, with an Event on each claim saying what came back; failed ones are
//! kept `--failed-helper-ttl` for inspection. The decision is `policy::cleanup`'s; this
//! file reads the stores, writes, and reports.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Preconditions};
use tracing::{info, warn};

use super::reconcile::claim_reference;
use super::snapshot::Snapshot;
use crate::cluster::events::EventSink;
use crate::metrics::{Metrics, StateLabels};
use crate::names;
use crate::policy::PodRecord;
use crate::policy::cleanup::{self, HelperState, PvrView, RestoreHelper, RestoreView};

/// A deletion made is not repeated (nor its Events) until the watch shows it, or this long.
const DELETED_FOR: Duration = Duration::from_secs(30);

pub struct RestoreCleanup {
    client: kube::Client,
    events: EventSink,
    metrics: Arc<Metrics>,
    failed_ttl: SignedDuration,
    /// Helpers whose failure has been reported (uid), so it is reported once.
    failed_reported: HashSet<String>,
    /// Helpers deleted (uid) and when.
    deleted: HashMap<String, Instant>,
}

impl RestoreCleanup {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>, failed_ttl: SignedDuration) -> Self {
        Self {
            events: EventSink::new(Some(client.clone())),
            client,
            metrics,
            failed_ttl,
            failed_reported: HashSet::new(),
            deleted: HashMap::new(),
        }
    }

    /// One pass over the restore helpers in `pods`; returns when a kept failed helper is
    /// next due for deletion.
    pub async fn pass(
        &mut self,
        snap: &Snapshot,
        pods: &[&PodRecord],
        claim_uids: &HashMap<(&str, &str), &str>,
        now: Timestamp,
    ) -> Option<Timestamp> {
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

        let present: HashSet<&str> = helpers.iter().map(|h| h.pod.uid()).collect();
        self.failed_reported
            .retain(|uid| present.contains(uid.as_str()));
        self.deleted
            .retain(|uid, at| present.contains(uid.as_str()) && at.elapsed() < DELETED_FOR);
        for helper in &helpers {
            if let HelperState::Failed { until } = helper.state {
                self.report_failed(helper, Some(until), claim_uids);
            }
            if helper.state.delete() && !self.deleted.contains_key(helper.pod.uid()) {
                self.delete(helper, claim_uids).await;
            }
        }
        next
    }

    /// A Warning on each claim whose volume failed, once per helper.
    fn report_failed(
        &mut self,
        helper: &RestoreHelper<'_>,
        until: Option<Timestamp>,
        uids: &HashMap<(&str, &str), &str>,
    ) {
        if !self.failed_reported.insert(helper.pod.uid().to_owned()) {
            return;
        }
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

    async fn delete(&mut self, helper: &RestoreHelper<'_>, uids: &HashMap<(&str, &str), &str>) {
        let (ns, name, uid) = (helper.pod.namespace(), helper.pod.name(), helper.pod.uid());
        if helper.state == HelperState::FailedExpired {
            // Reported now if it was never seen within its time (a restart).
            self.report_failed(helper, None, uids);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        self.metrics.controller.write("delete", "pods");
        self.deleted.insert(uid.to_owned(), Instant::now());
        let deleted =
            tokio::time::timeout(Duration::from_secs(10), api.delete(name, &params)).await;
        match deleted {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => return,
            Ok(Err(e)) => {
                self.metrics.controller.reconcile_errors.inc();
                warn!(namespace = ns, pod = name, error = %e, "could not delete a restore helper; retried later");
                return;
            }
            Err(_) => {
                warn!(
                    namespace = ns,
                    pod = name,
                    "deleting a restore helper timed out; retried later"
                );
                return;
            }
        }
        info!(
            namespace = ns,
            pod = name,
            restore = helper.restore,
            state = helper.state.as_str(),
            "deleted a restore helper"
        );
        match helper.state {
            HelperState::Completed => {
                for volume in &helper.volumes {
                    let bytes = volume.bytes_done.unwrap_or(0);
                    self.metrics
                        .controller
                        .restored_bytes
                        .inc_by(u64::try_from(bytes).unwrap_or(0));
                    if let Some(claim) = volume.claim {
                        let note = cleanup::restored_message(helper, volume);
                        let reference = claim_reference(ns, claim, uids);
                        self.events.normal(reference, "Restored", "Restore", note);
                    }
                }
            }
            HelperState::RestoreOver => {
                // restore-wait was to restore these, but Velero made no PodVolumeRestore
                // for them: the data did not come back.
                for volume in &helper.volumes {
                    let note = format!(
                        "restore {} ended without restoring volume {} of pod {name} (no PodVolumeRestore for it); restore helper deleted",
                        helper.restore, volume.volume
                    );
                    warn!(namespace = ns, pod = name, volume = volume.volume, "{note}");
                    self.metrics.controller.restores_failed.inc();
                    if let Some(claim) = volume.claim {
                        let reference = claim_reference(ns, claim, uids);
                        self.events
                            .warn(reference, "RestoreFailed", "Restore", note);
                    }
                }
            }
            _ => {}
        }
    }
}
