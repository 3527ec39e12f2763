//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it: the holder renews `spec.renewTime`; anyone may take the Lease once
//! `renewTime + leaseDurationSeconds` has passed or nobody holds it. The writes are
//! guarded by the Lease's resourceVersion at the edge, so two candidates cannot both win.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};

/// What the decision reads from a Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView<'a> {
    pub holder: Option<&'a str>,
    pub renewed: Option<Timestamp>,
    pub duration: SignedDuration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    Take,
    /// Someone else holds it until this time (unless they renew).
    Wait { until: Timestamp },
}

pub fn decide(lease: Option<&LeaseView<'_>>, me: &str, now: Timestamp) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    match lease.holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => LeaseAction::Renew,
        None => LeaseAction::Take,
        Some(_) => {
            let until = lease
                .renewed
                .and_then(|r| r.checked_add(lease.duration).ok());
            match until {
                Some(until) if until > now => LeaseAction::Wait { until },
                _ => LeaseAction::Take,
            }
        }
    }
}

/// What the decision reads from a Lease's spec (client-go's default duration: 15 s).
pub fn view(spec: &LeaseSpec) -> LeaseView<'_> {
    LeaseView {
        holder: spec.holder_identity.as_deref(),
        renewed: spec.renew_time.as_ref().map(|t| t.0),
        duration: SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into()),
    }
}

/// Who leads through this Lease at `now`, if anyone (a holder that stopped renewing does
/// not count).
pub fn current_leader(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    match decide(Some(&view(spec)), "", now) {
        LeaseAction::Wait { .. } => spec.holder_identity.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn table() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let d = SignedDuration::from_secs(15);
        let lease = |holder: Option<&'static str>, renewed: Option<i64>| LeaseView {
            holder,
            renewed: renewed.map(t),
            duration: d,
        };
        let cases = [
            ("no lease", None, t(0), LeaseAction::Create),
            (
                "ours",
                Some(lease(Some("me"), Some(0))),
                t(100),
                LeaseAction::Renew,
            ),
            (
                "released",
                Some(lease(Some(""), Some(0))),
                t(1),
                LeaseAction::Take,
            ),
            (
                "never held",
                Some(lease(None, None)),
                t(1),
                LeaseAction::Take,
            ),
            (
                "held by another, fresh",
                Some(lease(Some("other"), Some(0))),
                t(10),
                LeaseAction::Wait { until: t(15) },
            ),
            (
                "held by another, exactly expiring",
                Some(lease(Some("other"), Some(0))),
                t(15),
                LeaseAction::Take,
            ),
            (
                "held by another, expired",
                Some(lease(Some("other"), Some(0))),
                t(16),
                LeaseAction::Take,
            ),
            (
                "held by another, never renewed",
                Some(lease(Some("other"), None)),
                t(0),
                LeaseAction::Take,
            ),
        ];
        for (name, lease, now, want) in cases {
            assert_eq!(decide(lease.as_ref(), "me", now), want, "{name}");
        }
    }

    #[test]
    fn the_current_leader_is_a_holder_that_still_renews() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let lease = |holder: Option<&str>, renewed_ago: i64| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_ago))),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            current_leader(&lease(Some("a"), 5), now).as_deref(),
            Some("a")
        );
        assert_eq!(current_leader(&lease(Some("a"), 16), now), None, "expired");
        assert_eq!(current_leader(&lease(None, 1), now), None, "released");
        assert_eq!(current_leader(&Lease::default(), now), None);
    }
}
