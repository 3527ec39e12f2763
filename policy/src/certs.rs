//! Self-managed webhook certificates: which single step the controller's leader takes
//! next, given what the Secrets and the webhook configuration hold now.
//!
//! A private CA signs the serving certificate; the API server trusts the CA through the
//! webhook configuration's `caBundle`. Renewing the serving certificate under the same CA
//! needs nothing else. Replacing the CA must never leave a moment where the certificate a
//! replica serves is signed by a CA the API server does not trust, so it goes in three
//! steps, each waiting `overlap` after the one before:
//!
//! 1. **Introduce**: a new CA is made and added to the bundle (old + new); the serving
//!    certificate stays signed by the old CA.
//! 2. **Promote**: once every webhook entry's `caBundle` has held both CAs for `overlap`
//!    (so every API server trusts the new one), the new CA signs a new serving
//!    certificate; the old CA stays in the bundle for replicas still serving the old one.
//! 3. **Retire**: `overlap` after the promotion (replicas load the new certificate through
//!    a watch, in well under a second), the old CA leaves the bundle.
//!
//! One step per call: the edge applies it, writes it down, and asks again, so a crash or a
//! lost leadership between steps resumes where it stopped.

use jiff::{SignedDuration, Timestamp};

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Validity {
    /// When it should be replaced: once two thirds of its lifetime have passed (as
    /// cert-manager's default `renewBefore` does).
    pub fn renew_at(&self) -> Timestamp {
        let lifetime = self.not_after.duration_since(self.not_before);
        self.not_before
            .checked_add(lifetime * 2 / 3)
            .unwrap_or(self.not_after)
    }

    /// Not expired. A `notBefore` in the future is tolerated: it means clock skew between
    /// replicas (certificates are backdated a little for that), not a bad certificate.
    pub fn usable_at(&self, now: Timestamp) -> bool {
        now < self.not_after
    }
}

/// What the certificate Secrets hold, as read (a part that is missing or does not parse
/// is `None`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertState {
    /// The CA that signs serving certificates.
    pub current: Option<Validity>,
    /// A CA introduced into the bundle, to take over, and since when.
    pub next: Option<(Validity, Timestamp)>,
    /// The CA `current` replaced, kept in the bundle until it is retired, and when the
    /// replacement happened.
    pub previous: Option<Timestamp>,
    pub serving: Option<Serving>,
    /// Since when every webhook entry's `caBundle` has held exactly the bundle the
    /// Secrets describe (known to this leader only; `None` when not, or not yet seen).
    pub bundle_in_place_since: Option<Timestamp>,
    /// With no usable current CA: the certificate served now is unexpired and signed by
    /// a CA the webhook configuration still trusts (whose key is lost). Kept trusted
    /// (as `previous`) until a new CA has taken over.
    pub orphan_trusted: bool,
}

/// The serving certificate, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub validity: Validity,
    /// Signed by `current` (its signature verifies with the current CA's key).
    pub signed_by_current: bool,
    /// Carries exactly the names the webhook is reached by.
    pub names_match: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertOptions {
    pub ca_validity: SignedDuration,
    pub cert_validity: SignedDuration,
    /// How long a new CA is trusted before it signs (the API servers catch up).
    pub overlap: SignedDuration,
    /// How long the old CA stays trusted after the new one signs (replicas catch up; an
    /// extra CA in the bundle costs nothing, so this is long).
    pub retire_after: SignedDuration,
}

impl Default for CertOptions {
    fn default() -> Self {
        Self {
            // Replaced after ~8 months: often enough that the rollover is exercised.
            ca_validity: SignedDuration::from_hours(365 * 24),
            // cert-manager's usual 90 days, renewed with 30 left.
            cert_validity: SignedDuration::from_hours(90 * 24),
            overlap: SignedDuration::from_mins(5),
            retire_after: SignedDuration::from_hours(24),
        }
    }
}

impl CertOptions {
    /// Refuses settings that would make the keeper churn: each certificate must outlive
    /// the waits around it many times over.
    pub fn check(&self) -> Result<(), String> {
        if self.overlap <= SignedDuration::ZERO {
            return Err("the CA overlap must be positive".to_owned());
        }
        if self.retire_after < self.overlap {
            return Err("the old CA must stay trusted at least as long as the overlap".to_owned());
        }
        if self.cert_validity < self.overlap * 3 {
            return Err(
                "the certificate validity must be at least 3 times the CA overlap".to_owned(),
            );
        }
        if self.ca_validity < self.cert_validity
            || self.ca_validity < (self.overlap + self.retire_after) * 3
        {
            return Err("the CA validity must be at least the certificate validity, and 3 times overlap + retire-after".to_owned());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Expiring,
    /// Signed by a CA other than the current one.
    OtherCa,
    /// For other names than the webhook's.
    Names,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing or unreadable",
            Reason::Expiring => "due for renewal",
            Reason::OtherCa => "not signed by the current CA",
            Reason::Names => "issued for other names",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStep {
    /// No usable CA: make a CA and a serving certificate from scratch (first install, or
    /// the CA Secret was deleted or expired; nothing else can be trusted then).
    Create,
    /// The current CA is due for replacement: make the next CA and add it to the bundle.
    Introduce,
    /// The next CA has been trusted long enough: it becomes current and signs a new
    /// serving certificate; the old one stays in the bundle.
    Promote,
    /// Issue a new serving certificate from the current CA.
    Issue(Reason),
    /// The old CA has served its overlap: drop it from the bundle.
    Retire,
    /// Make every webhook entry's `caBundle` the bundle the Secrets describe.
    WriteBundle,
    /// Nothing to do before `until` (unless something changes).
    Wait { until: Timestamp },
}

/// The next step. `bundle_current`: every webhook entry's `caBundle` is the bundle the
/// Secrets describe right now.
pub fn next_step(state: &CertState, now: Timestamp, opts: &CertOptions) -> CertStep {
    let Some(current) = state.current.filter(|ca| ca.usable_at(now)) else {
        return without_current(state, now, opts);
    };
    let Some(trusted_since) = state.bundle_in_place_since else {
        return CertStep::WriteBundle;
    };
    let mut wake = Vec::new();
    let mut promote_due = None;
    match state.next {
        None if now >= current.renew_at() => return CertStep::Introduce,
        None => wake.push(current.renew_at()),
        Some((_, introduced)) => {
            // Trusted for `overlap` since both the introduction and the bundle landing.
            let due = plus(introduced.max(trusted_since), opts.overlap);
            if now >= due {
                return CertStep::Promote;
            }
            promote_due = Some(due);
            wake.push(due);
        }
    }
    match &state.serving {
        None => return CertStep::Issue(Reason::Missing),
        Some(s) if !s.signed_by_current => return CertStep::Issue(Reason::OtherCa),
        Some(s) if !s.names_match => return CertStep::Issue(Reason::Names),
        Some(s) if now >= s.validity.renew_at() || !s.validity.usable_at(now) => {
            // A certificate issued now would be cut at the current CA's end: when even
            // that would be due at once, the CA is nearly over, and issuing again and
            // again would not help. The next CA takes over instead (at once if the
            // served certificate is about to expire, else when it is due).
            let fresh = issue_validity(now, opts.cert_validity, &current);
            if now < fresh.renew_at() {
                return CertStep::Issue(Reason::Expiring);
            }
            match promote_due {
                Some(due) if s.validity.usable_at(now) && due < s.validity.not_after => {}
                Some(_) => return CertStep::Promote,
                None => return CertStep::Issue(Reason::Expiring),
            }
        }
        Some(s) => wake.push(s.validity.renew_at()),
    }
    if let Some(promoted) = state.previous {
        let due = plus(promoted, opts.retire_after);
        if now >= due {
            return CertStep::Retire;
        }
        wake.push(due);
    }
    CertStep::Wait {
        until: wake
            .into_iter()
            .filter(|&t| t > now)
            .min()
            .unwrap_or(plus(now, SignedDuration::from_secs(1))),
    }
}

/// No usable current CA (a first install; the CA Secret deleted, unreadable or expired).
fn without_current(state: &CertState, now: Timestamp, opts: &CertOptions) -> CertStep {
    match state.next {
        // A next CA takes over once trusted for the overlap, as in a rollover.
        Some((next, introduced)) if next.usable_at(now) => {
            let Some(trusted_since) = state.bundle_in_place_since else {
                return CertStep::WriteBundle;
            };
            let due = plus(introduced.max(trusted_since), opts.overlap);
            if now >= due {
                CertStep::Promote
            } else {
                CertStep::Wait { until: due }
            }
        }
        // What replicas serve is still trusted (its CA is in the bundle, its key lost):
        // keep trusting it, and introduce a new CA beside it, as in a rollover.
        _ if state.orphan_trusted => CertStep::Introduce,
        // Nothing served can be trusted anyway: start afresh.
        _ => CertStep::Create,
    }
}

/// How long the certificate keeper waits after its `n`th failed check in a row (n ≥ 1):
/// 5 s, doubling, at most 5 minutes. A check that keeps failing (the API server
/// refusing, another writer fighting over the caBundle) is retried less and less often,
/// and the first retry still comes soon (a write conflict, a moment's outage).
pub fn retry_after(n: u32) -> std::time::Duration {
    const FIRST: u64 = 5;
    const MAX: u64 = 300;
    let doublings = n.saturating_sub(1).min(16);
    std::time::Duration::from_secs((FIRST << doublings).min(MAX))
}

/// The validity of a certificate issued now: `validity` long, but never beyond the CA
/// that signs it (a certificate outliving its CA would stop verifying first). Backdated
/// by a tenth of `validity`, at most 5 minutes, for clocks a little behind ours.
pub fn issue_validity(now: Timestamp, validity: SignedDuration, ca: &Validity) -> Validity {
    let skew = (validity / 10).min(SignedDuration::from_mins(5));
    Validity {
        not_before: now.checked_sub(skew).unwrap_or(Timestamp::MIN),
        not_after: plus(now, validity).min(ca.not_after),
    }
}

fn plus(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_to_five_minutes() {
        let waits: Vec<u64> = [1, 2, 3, 4, 5, 6, 7, 8, 100, u32::MAX]
            .into_iter()
            .map(|n| retry_after(n).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
        assert_eq!(retry_after(0).as_secs(), 5, "never less than the first");
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn valid(from: &str, to: &str) -> Validity {
        Validity {
            not_before: t(from),
            not_after: t(to),
        }
    }

    fn opts() -> CertOptions {
        CertOptions {
            ca_validity: SignedDuration::from_hours(24 * 300),
            cert_validity: SignedDuration::from_hours(24 * 90),
            overlap: SignedDuration::from_mins(5),
            retire_after: SignedDuration::from_mins(30),
        }
    }

    /// A settled installation: CA for 2026, serving certificate Jan–Apr, bundle in place.
    fn settled() -> CertState {
        CertState {
            current: Some(valid("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")),
            next: None,
            previous: None,
            serving: Some(Serving {
                validity: valid("2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z"),
                signed_by_current: true,
                names_match: true,
            }),
            bundle_in_place_since: Some(t("2026-01-01T00:00:10Z")),
            orphan_trusted: false,
        }
    }

    #[test]
    fn steps_follow_the_state() {
        let now = t("2026-02-01T00:00:00Z");
        let with = |f: &dyn Fn(&mut CertState)| {
            let mut s = settled();
            f(&mut s);
            next_step(&s, now, &opts())
        };
        let cases: Vec<(&str, CertStep)> = vec![
            (
                "settled: wait for the serving certificate's renewal (2/3 of Jan–Apr)",
                with(&|_| ()),
            ),
            ("nothing at all", with(&|s| *s = CertState::default())),
            (
                "CA not yet valid (clock skew): kept",
                with(&|s| s.current = Some(valid("2026-03-01T00:00:00Z", "2027-01-01T00:00:00Z"))),
            ),
            (
                "CA expired",
                with(&|s| s.current = Some(valid("2025-01-01T00:00:00Z", "2026-01-15T00:00:00Z"))),
            ),
            (
                "bundle not in place",
                with(&|s| s.bundle_in_place_since = None),
            ),
            ("serving missing", with(&|s| s.serving = None)),
            (
                "serving from another CA",
                with(&|s| s.serving.as_mut().unwrap().signed_by_current = false),
            ),
            (
                "serving for other names",
                with(&|s| s.serving.as_mut().unwrap().names_match = false),
            ),
            (
                "serving due",
                with(&|s| {
                    s.serving.as_mut().unwrap().validity =
                        valid("2025-11-01T00:00:00Z", "2026-02-15T00:00:00Z")
                }),
            ),
            (
                "CA due (2/3 of its year passed)",
                with(&|s| s.current = Some(valid("2025-05-01T00:00:00Z", "2026-05-01T00:00:00Z"))),
            ),
            (
                "next introduced 1 min ago: wait",
                with(&|s| {
                    s.next = Some((
                        valid("2026-01-31T00:00:00Z", "2027-01-31T00:00:00Z"),
                        t("2026-01-31T23:59:00Z"),
                    ))
                }),
            ),
            (
                "next introduced 10 min ago",
                with(&|s| {
                    s.next = Some((
                        valid("2026-01-31T00:00:00Z", "2027-01-31T00:00:00Z"),
                        t("2026-01-31T23:50:00Z"),
                    ))
                }),
            ),
            (
                "next introduced long ago, bundle landed 1 min ago",
                with(&|s| {
                    s.next = Some((
                        valid("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
                        t("2026-01-01T00:00:00Z"),
                    ));
                    s.bundle_in_place_since = Some(t("2026-01-31T23:59:00Z"));
                }),
            ),
            (
                "promoted 10 min ago: wait for retire-after (30 min)",
                with(&|s| s.previous = Some(t("2026-01-31T23:50:00Z"))),
            ),
            (
                "promoted an hour ago",
                with(&|s| s.previous = Some(t("2026-01-31T23:00:00Z"))),
            ),
            (
                "promoted long ago but serving still from the old CA: issue first",
                with(&|s| {
                    s.previous = Some(t("2026-01-01T00:00:00Z"));
                    s.serving.as_mut().unwrap().signed_by_current = false;
                }),
            ),
            (
                "current expired, next trusted: promote",
                with(&|s| {
                    s.current = Some(valid("2025-01-01T00:00:00Z", "2026-01-15T00:00:00Z"));
                    s.next = Some((
                        valid("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
                        t("2026-01-01T00:00:00Z"),
                    ));
                }),
            ),
            (
                "current expired, next, bundle not in place: write it, keep next",
                with(&|s| {
                    s.current = Some(valid("2025-01-01T00:00:00Z", "2026-01-15T00:00:00Z"));
                    s.next = Some((
                        valid("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
                        t("2026-01-01T00:00:00Z"),
                    ));
                    s.bundle_in_place_since = None;
                }),
            ),
            (
                "CA Secret lost, what is served still trusted: introduce beside it",
                with(&|s| {
                    s.current = None;
                    s.orphan_trusted = true;
                }),
            ),
            (
                "CA lost, orphan kept, next introduced 1 min ago: wait",
                with(&|s| {
                    s.current = None;
                    s.orphan_trusted = true;
                    s.next = Some((
                        valid("2026-01-31T23:59:00Z", "2027-01-31T00:00:00Z"),
                        t("2026-01-31T23:59:00Z"),
                    ));
                }),
            ),
            (
                "CA nearly over, served certificate due, next not yet trusted long enough: wait",
                with(&|s| {
                    s.current = Some(valid("2025-02-01T00:00:00Z", "2026-02-01T00:00:30Z"));
                    s.next = Some((
                        valid("2026-01-31T23:59:00Z", "2027-01-31T00:00:00Z"),
                        t("2026-01-31T23:59:00Z"),
                    ));
                    s.serving.as_mut().unwrap().validity =
                        valid("2026-01-31T00:00:00Z", "2026-02-01T00:10:00Z");
                }),
            ),
            (
                "CA nearly over, served certificate expires before promotion: promote now",
                with(&|s| {
                    s.current = Some(valid("2025-02-01T00:00:00Z", "2026-02-01T00:00:30Z"));
                    s.next = Some((
                        valid("2026-01-31T23:59:00Z", "2027-01-31T00:00:00Z"),
                        t("2026-01-31T23:59:00Z"),
                    ));
                    s.serving.as_mut().unwrap().validity =
                        valid("2026-01-31T00:00:00Z", "2026-02-01T00:00:20Z");
                }),
            ),
        ];
        let got: Vec<String> = cases.iter().map(|(n, s)| format!("{n}: {s:?}")).collect();
        let want = vec![
            "settled: wait for the serving certificate's renewal (2/3 of Jan–Apr): Wait { until: 2026-03-02T00:00:00Z }",
            "nothing at all: Create",
            "CA not yet valid (clock skew): kept: Wait { until: 2026-03-02T00:00:00Z }",
            "CA expired: Create",
            "bundle not in place: WriteBundle",
            "serving missing: Issue(Missing)",
            "serving from another CA: Issue(OtherCa)",
            "serving for other names: Issue(Names)",
            "serving due: Issue(Expiring)",
            "CA due (2/3 of its year passed): Introduce",
            "next introduced 1 min ago: wait: Wait { until: 2026-02-01T00:04:00Z }",
            "next introduced 10 min ago: Promote",
            "next introduced long ago, bundle landed 1 min ago: Wait { until: 2026-02-01T00:04:00Z }",
            "promoted 10 min ago: wait for retire-after (30 min): Wait { until: 2026-02-01T00:20:00Z }",
            "promoted an hour ago: Retire",
            "promoted long ago but serving still from the old CA: issue first: Issue(OtherCa)",
            "current expired, next trusted: promote: Promote",
            "current expired, next, bundle not in place: write it, keep next: WriteBundle",
            "CA Secret lost, what is served still trusted: introduce beside it: Introduce",
            "CA lost, orphan kept, next introduced 1 min ago: wait: Wait { until: 2026-02-01T00:04:00Z }",
            "CA nearly over, served certificate due, next not yet trusted long enough: wait: Wait { until: 2026-02-01T00:04:00Z }",
            "CA nearly over, served certificate expires before promotion: promote now: Promote",
        ];
        assert_eq!(got, want);
    }

    /// Walks a whole year of CA life one step at a time, as the edge would (apply the
    /// step, then ask again): the bundle always trusts the CA that signed the certificate
    /// being served, old and new overlap, and the CA is replaced before it expires.
    #[test]
    fn a_year_of_rollovers_never_serves_an_untrusted_certificate() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        struct Ca(u32, Validity);
        let o = opts();
        let mut now = t("2026-01-01T00:00:00Z");
        let mut ids = 0;
        let mut new_ca = |now: Timestamp| {
            ids += 1;
            Ca(
                ids,
                issue_validity(
                    now,
                    o.ca_validity,
                    &valid("2026-01-01T00:00:00Z", "2100-01-01T00:00:00Z"),
                ),
            )
        };
        let mut current: Option<Ca> = None;
        let mut next: Option<(Ca, Timestamp)> = None;
        let mut previous: Option<(Ca, Timestamp)> = None;
        let mut serving: Option<(u32, Validity)> = None;
        let mut bundle: Vec<u32> = Vec::new();
        let mut bundle_since: Option<Timestamp> = None;
        let (mut promotions, mut issued) = (0, 0);
        let end = t("2027-06-01T00:00:00Z");
        while now < end {
            let want: Vec<u32> = previous
                .iter()
                .map(|p| p.0.0)
                .chain(current.map(|c| c.0))
                .chain(next.iter().map(|n| n.0.0))
                .collect();
            let state = CertState {
                current: current.map(|c| c.1),
                next: next.map(|(c, at)| (c.1, at)),
                previous: previous.map(|(_, at)| at),
                serving: serving.map(|(by, v)| Serving {
                    validity: v,
                    signed_by_current: Some(by) == current.map(|c| c.0),
                    names_match: true,
                }),
                bundle_in_place_since: if bundle == want { bundle_since } else { None },
                orphan_trusted: false,
            };
            let step = next_step(&state, now, &o);
            match step {
                CertStep::Create => {
                    let ca = new_ca(now);
                    current = Some(ca);
                    serving = Some((ca.0, issue_validity(now, o.cert_validity, &ca.1)));
                }
                CertStep::Introduce => next = Some((new_ca(now), now)),
                CertStep::Promote => {
                    let (n, _) = next.take().unwrap();
                    previous = current.map(|c| (c, now));
                    current = Some(n);
                    serving = Some((n.0, issue_validity(now, o.cert_validity, &n.1)));
                    promotions += 1;
                }
                CertStep::Issue(_) => {
                    let c = current.unwrap();
                    serving = Some((c.0, issue_validity(now, o.cert_validity, &c.1)));
                    issued += 1;
                }
                CertStep::Retire => previous = None,
                CertStep::WriteBundle => {
                    bundle = want.clone();
                    bundle_since = Some(now);
                }
                CertStep::Wait { until } => {
                    assert!(until > now, "{state:?}");
                    now = until;
                }
            }
            // The API server trusts whatever signed the certificate being served, from the
            // first bundle on (right after Create nothing was served yet), and the
            // certificate being served has not expired.
            if let (Some((by, v)), Some(_)) = (serving, bundle_since) {
                if step != CertStep::Create {
                    assert!(
                        bundle.contains(&by),
                        "{step:?} at {now}: serving from CA {by}, bundle {bundle:?}"
                    );
                }
                assert!(v.not_after > now, "expired serving certificate at {now}");
            }
            if let Some(c) = current {
                assert!(c.1.not_after > now, "CA {} expired at {now}", c.0);
            }
        }
        assert_eq!(
            promotions, 2,
            "300-day CAs are replaced after 200 days: in July 2026 and February 2027"
        );
        assert!(
            issued >= 5,
            "serving certificates renewed every ~60 days: {issued}"
        );
    }

    #[test]
    fn issued_certificates_never_outlive_their_ca() {
        let ca = valid("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
        let v = issue_validity(
            t("2026-01-20T00:00:00Z"),
            SignedDuration::from_hours(24 * 90),
            &ca,
        );
        assert_eq!(v.not_after, ca.not_after);
        assert_eq!(ca.renew_at(), t("2026-01-21T16:00:00Z"));
    }
}
