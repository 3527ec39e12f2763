//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it: the holder renews `spec.renewTime`; anyone may take the Lease once
//! `renewTime + leaseDurationSeconds` has passed or nobody holds it. The writes are
//! guarded by the Lease's resourceVersion at the edge, so two candidates cannot both win.

use jiff::{SignedDuration, Timestamp};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
