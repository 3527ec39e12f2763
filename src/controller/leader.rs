//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it (kube-runtime has none). The decision is `policy::leader::decide`; every write
//! carries the resourceVersion it was decided on, so of two candidates only one wins.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tracing::{debug, info, warn};

use super::Config;
use crate::policy::leader::{LeaseAction, LeaseView, decide, view};

/// The Lease's default name in the controller's namespace.
pub const LEASE_NAME: &str = "velero-jupyterhub-controller";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseOptions {
    /// The Lease's name (`--lease-name`).
    pub name: String,
    /// How long a Lease holds without renewal (client-go's default: 15 s).
    pub duration: Duration,
    /// How often the leader renews, and a candidate retries (client-go: 2 s).
    pub retry: Duration,
    /// A leader that could not renew for this long stops leading (client-go: 10 s).
    pub renew_deadline: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self::with_duration(LEASE_NAME, Duration::from_secs(15))
    }
}

impl LeaseOptions {
    /// client-go's proportions: renew every 2/15 and give up after 2/3 of the duration.
    pub fn with_duration(name: &str, duration: Duration) -> Self {
        Self {
            name: name.to_owned(),
            duration,
            retry: duration * 2 / 15,
            renew_deadline: duration * 2 / 3,
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    identity: String,
    options: LeaseOptions,
    /// The Lease as last read (its resourceVersion) and when we first saw it so: expiry
    /// is measured on our own clock from then, as client-go does, so a holder whose clock
    /// runs behind or ahead of ours neither loses the Lease early nor keeps it late.
    observed: std::sync::Mutex<Option<(String, Instant)>>,
}

/// Held leadership: [`Leading::keep`] renews until it cannot.
pub struct Leading<'a> {
    elector: &'a Elector,
}

impl Elector {
    pub fn new(client: kube::Client, config: &Config) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            identity: config.identity.clone(),
            options: config.lease.clone(),
            observed: std::sync::Mutex::new(None),
        }
    }

    /// How long ago the Lease last changed, as seen from here.
    fn unchanged_for(&self, lease: Option<&Lease>) -> Duration {
        let version = lease
            .and_then(|l| l.metadata.resource_version.clone())
            .unwrap_or_default();
        let mut observed = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match observed.as_ref() {
            Some((seen, at)) if *seen == version => at.elapsed(),
            _ => {
                *observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Tries once: `Ok(true)` when we hold the Lease afterwards, `Ok(false)` when someone
    /// else does (or won a race), with how long to wait before trying again.
    async fn try_once(&self) -> Result<(bool, Duration), kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.options.name).await?;
        let unchanged_for = self.unchanged_for(current.as_ref());
        let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        // The holder's renewTime is its clock's; ours says when the renewal was seen.
        let view = spec.as_ref().map(|spec| LeaseView {
            renewed: spec.renew_time.as_ref().map(|_| {
                now.checked_sub(SignedDuration::try_from(unchanged_for).unwrap_or_default())
                    .unwrap_or(now)
            }),
            ..view(spec)
        });
        let action = decide(view.as_ref(), &self.identity, now);
        let seconds = i32::try_from(self.options.duration.as_secs()).unwrap_or(15);
        let written = match (action, current) {
            (LeaseAction::Wait { until }, _) => {
                let left = until.duration_since(now).unsigned_abs();
                return Ok((false, left.min(self.options.retry)));
            }
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.options.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (action, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if action == LeaseAction::Take {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(seconds);
                // The resourceVersion read above makes this a compare-and-swap.
                self.api
                    .replace(&self.options.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => return Ok((false, Duration::ZERO)),
        };
        match written {
            Ok(_) => Ok((true, self.options.retry)),
            // Someone else wrote first: read again.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, Duration::ZERO)),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> anyhow::Result<Leading<'_>> {
        loop {
            match self.try_once().await {
                Ok((true, _)) => return Ok(Leading { elector: self }),
                Ok((false, wait)) => tokio::time::sleep(wait.max(Duration::from_millis(100))).await,
                Err(e) => {
                    warn!(error = %e, "reading or writing the Lease failed; retrying");
                    tokio::time::sleep(self.options.retry).await;
                }
            }
        }
    }

    /// Gives the Lease up (at shutdown), so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.options.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.options.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the Lease"),
            Err(e) => warn!(error = %e, "could not release the Lease; it expires by itself"),
        }
    }
}

impl Leading<'_> {
    /// Renews every `retry` until renewing fails for `renew_deadline` or the Lease is
    /// someone else's; returns why leadership ended.
    pub async fn keep(self) -> String {
        let options = self.elector.options.clone();
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(options.retry).await;
            // A renewal that hangs must not keep an expired leader reconciling: it gets
            // until the renew deadline, like the time since the last renewal.
            let left = options
                .renew_deadline
                .saturating_sub(last_renewed.elapsed());
            let attempt = match tokio::time::timeout(left, self.elector.try_once()).await {
                Ok(attempt) => attempt,
                Err(_) => {
                    return format!(
                        "could not renew it for {:?}: the API server did not answer",
                        options.renew_deadline
                    );
                }
            };
            match attempt {
                Ok((true, _)) => {
                    debug!("renewed the Lease");
                    last_renewed = Instant::now();
                }
                // A write that lost a race: read again at once.
                Ok((false, Duration::ZERO)) => {}
                Ok((false, _)) => return "another replica holds the Lease".to_owned(),
                Err(e) => {
                    warn!(error = %e, "renewing the Lease failed");
                    if last_renewed.elapsed() >= options.renew_deadline {
                        return format!("could not renew it for {:?}: {e}", options.renew_deadline);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timings_are_client_gos() {
        let o = LeaseOptions::default();
        assert_eq!(
            (o.duration, o.retry, o.renew_deadline),
            (
                Duration::from_secs(15),
                Duration::from_secs(2),
                Duration::from_secs(10)
            )
        );
    }
}
