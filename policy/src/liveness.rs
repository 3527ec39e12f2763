//! Whether the controller is ready and live (its `/readyz` and `/healthz`), from what its
//! loop and watches last reported. Pure: the caller says how long ago each thing happened.
//!
//! A replica that is not leading has nothing to list and nothing to do: it is ready (a
//! rollout must not wait for it) and live. The leader is ready once its watches have
//! listed, and live as long as its loop finishes a pass within the deadline (passes come
//! at least every five minutes) and no watch has been failing without a break for longer
//! than the deadline. A leader that is neither keeps its Lease and backs nobody up: the
//! kubelet should restart it, and the other replica takes over.

use std::time::Duration;

/// What the loop and the watches last reported, as ages (time since).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopFacts {
    /// Since this replica started leading; `None` while it is not leading.
    pub leading_for: Option<Duration>,
    /// Whether every watch has listed once since it started leading.
    pub listed: bool,
    /// Since the loop last finished a pass; `None` before the first.
    pub last_pass: Option<Duration>,
    /// Watches failing without a success in between: `(watch, since the first failure,
    /// since the last failure)`.
    pub failing: Vec<(&'static str, Duration, Duration)>,
}

/// How long the loop and the watches may be stuck before the replica is not live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// A pass must finish within this (since the last pass, or since leading began).
    pub pass: Duration,
    /// A watch failing for this long without a success is broken…
    pub watch: Duration,
    /// …as long as it failed again within this (the watcher's back-off retries well
    /// inside it; a watch that stopped failing has recovered, even if its resource has
    /// been quiet since).
    pub retrying: Duration,
}

/// Why the replica is not ready, if it is not.
pub fn not_ready(facts: &LoopFacts) -> Option<String> {
    match (facts.leading_for, facts.listed) {
        (Some(_), false) => Some("leading, and the watches have not listed yet".to_owned()),
        _ => None,
    }
}

/// Why the replica is not live (the kubelet should restart it), if it is not.
pub fn not_live(facts: &LoopFacts, deadlines: &Deadlines) -> Option<String> {
    let leading_for = facts.leading_for?;
    let mut why = Vec::new();
    let since_pass = facts.last_pass.map_or(leading_for, |p| p.min(leading_for));
    if since_pass > deadlines.pass {
        why.push(format!(
            "no reconcile pass finished for {}s (the limit is {}s)",
            since_pass.as_secs(),
            deadlines.pass.as_secs()
        ));
    }
    for (watch, first, last) in &facts.failing {
        if *first > deadlines.watch && *last <= deadlines.retrying {
            why.push(format!(
                "the {watch} watch has been failing for {}s",
                first.as_secs()
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Deadlines = Deadlines {
        pass: Duration::from_secs(900),
        watch: Duration::from_secs(300),
        retrying: Duration::from_secs(120),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn table() {
        let standby = LoopFacts::default();
        let listing = LoopFacts {
            leading_for: Some(s(10)),
            ..Default::default()
        };
        let passing = LoopFacts {
            leading_for: Some(s(5000)),
            listed: true,
            last_pass: Some(s(60)),
            failing: vec![],
        };
        let cases: Vec<(&str, LoopFacts, Option<&str>, Option<&str>)> = vec![
            ("standby", standby, None, None),
            (
                "leading, listing",
                listing.clone(),
                Some("not listed yet"),
                None,
            ),
            (
                "leading, never listed",
                LoopFacts {
                    leading_for: Some(s(901)),
                    ..listing.clone()
                },
                Some("not listed yet"),
                Some("no reconcile pass finished for 901s"),
            ),
            ("passing", passing.clone(), None, None),
            (
                "wedged",
                LoopFacts {
                    last_pass: Some(s(901)),
                    ..passing.clone()
                },
                None,
                Some("no reconcile pass finished for 901s (the limit is 900s)"),
            ),
            (
                "a pass long ago, but leading only lately (a new term)",
                LoopFacts {
                    leading_for: Some(s(30)),
                    last_pass: Some(s(5000)),
                    ..passing.clone()
                },
                None,
                None,
            ),
            (
                "a watch failing, still within its deadline",
                LoopFacts {
                    failing: vec![("pods", s(299), s(5))],
                    ..passing.clone()
                },
                None,
                None,
            ),
            (
                "a watch broken",
                LoopFacts {
                    failing: vec![("pods", s(301), s(5))],
                    ..passing.clone()
                },
                None,
                Some("the pods watch has been failing for 301s"),
            ),
            (
                "a watch that failed long ago and has been quiet since",
                LoopFacts {
                    failing: vec![("schedules", s(4000), s(3000))],
                    ..passing.clone()
                },
                None,
                None,
            ),
        ];
        for (name, facts, ready, live) in cases {
            let got = not_ready(&facts);
            match ready {
                None => assert_eq!(got, None, "{name}"),
                Some(want) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(want)),
                    "{name}: {got:?}"
                ),
            }
            let got = not_live(&facts, &D);
            match live {
                None => assert_eq!(got, None, "{name}"),
                Some(want) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(want)),
                    "{name}: {got:?}"
                ),
            }
        }
    }
}
