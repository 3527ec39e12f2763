//! Kubernetes Events: what a platform engineer should see with `kubectl get events`.
//!
//! Published in the background (never holding up a watch or a request), each with a
//! timeout; a failure to publish is logged, never fatal.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

/// The `reportingController` of our Events.
pub const REPORTING_CONTROLLER: &str = "velero-jupyterhub";
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// An Event's `regarding` for a PersistentVolumeClaim (its uid when known).
pub fn claim_reference(namespace: &str, claim: &str, uid: Option<&str>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("PersistentVolumeClaim".to_owned()),
        name: Some(claim.to_owned()),
        namespace: Some(namespace.to_owned()),
        uid: uid.map(str::to_owned),
        ..Default::default()
    }
}

/// Where Events go: a recorder when there is a cluster, nowhere otherwise.
#[derive(Clone)]
pub struct EventSink {
    recorder: Option<Recorder>,
}

impl EventSink {
    /// The reporting instance is the pod name (`POD_NAME`, from the downward API), else
    /// the host name, so Events from two replicas can be told apart.
    pub fn new(client: Option<kube::Client>) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()),
        };
        let reporter = match reporter.instance {
            Some(_) => reporter,
            None => Reporter::from(REPORTING_CONTROLLER),
        };
        Self {
            recorder: client.map(|c| Recorder::new(c, reporter)),
        }
    }

    /// A Warning Event about `regarding`.
    pub fn warn(&self, regarding: ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(EventType::Warning, regarding, reason, action, note);
    }

    /// A Normal Event about `regarding`.
    pub fn normal(&self, regarding: ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(EventType::Normal, regarding, reason, action, note);
    }

    fn publish(
        &self,
        type_: EventType,
        regarding: ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            let published =
                tokio::time::timeout(PUBLISH_TIMEOUT, recorder.publish(&event, &regarding)).await;
            let error = match published {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {PUBLISH_TIMEOUT:?}"),
            };
            warn!(reason = %event.reason, object = ?regarding.name, %error, "could not publish an Event");
        });
    }
}
