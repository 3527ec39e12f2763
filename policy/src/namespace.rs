//! What a namespace asks of us: opted in or not, and which claims are user data.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::claims::{ClaimGlobs, ClaimGlobsError};
use crate::names;

/// A namespace's labels and annotations, read.
#[derive(Clone, Debug)]
pub struct NamespacePolicy {
    /// Labelled `velero-jupyterhub.io/enabled=true` (exactly: the webhook registration's
    /// namespaceSelector matches exactly, and so do we).
    pub opted_in: bool,
    /// The globs that name its user claims: its annotation's valid globs, else the default.
    pub claims: Arc<ClaimGlobs>,
    /// What was wrong with its claims annotation, if anything (reported, never silent).
    pub claims_problem: Option<ClaimsProblem>,
    /// The claims being restored there (`velero-jupyterhub.io/restoring-claims`, kept by
    /// the controller and the `restore` command): the restore guard's record.
    pub restoring: Arc<[String]>,
}

/// A `velero-jupyterhub.io/claims` annotation that cannot be used as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimsProblem {
    /// Present but empty: the default globs apply.
    Empty,
    /// Some globs are invalid and were left out (`all`: none was valid, so the default
    /// globs apply).
    Invalid {
        errors: Vec<ClaimGlobsError>,
        all: bool,
    },
}

impl fmt::Display for ClaimsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "{} is empty", names::NAMESPACE_CLAIMS),
            Self::Invalid { errors, all } => {
                let which = if *all { "every glob" } else { "some globs" };
                write!(
                    f,
                    "{} has invalid globs ({which}): ",
                    names::NAMESPACE_CLAIMS
                )?;
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

/// Whether a namespace's labels opt it in (`velero-jupyterhub.io/enabled: "true"`).
pub fn is_opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(names::NAMESPACE_ENABLED))
        .is_some_and(|v| v == "true")
}

impl NamespacePolicy {
    /// Reads a namespace's labels and annotations (as a watch or GET returns them).
    pub fn read(
        labels: Option<&BTreeMap<String, String>>,
        annotations: Option<&BTreeMap<String, String>>,
        default_claims: &Arc<ClaimGlobs>,
    ) -> Self {
        let opted_in = is_opted_in(labels);
        let annotation = annotations.and_then(|a| a.get(names::NAMESPACE_CLAIMS));
        let (claims, claims_problem) = match annotation {
            None => (default_claims.clone(), None),
            Some(list) => {
                let (globs, errors) = ClaimGlobs::parse_lenient(list);
                let problem = match (&globs, errors.is_empty()) {
                    (None, true) => Some(ClaimsProblem::Empty),
                    (_, true) => None,
                    (globs, false) => Some(ClaimsProblem::Invalid {
                        errors,
                        all: globs.is_none(),
                    }),
                };
                let globs = globs.map_or_else(|| default_claims.clone(), Arc::new);
                (globs, problem)
            }
        };
        let restoring = annotations
            .and_then(|a| a.get(names::NAMESPACE_RESTORING_CLAIMS))
            .map(|v| crate::restoring::parse_annotation(v))
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect();
        Self {
            opted_in,
            claims,
            claims_problem,
            restoring,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn table() {
        let default = Arc::new(ClaimGlobs::parse("claim-*").unwrap());
        let on = Some(map(&[(names::NAMESPACE_ENABLED, "true")]));
        let claims = |v: &str| Some(map(&[(names::NAMESPACE_CLAIMS, v)]));
        type Map = Option<BTreeMap<String, String>>;
        // (labels, annotations, opted in, globs in use, problem)
        let cases: Vec<(Map, Map, bool, &str, Option<&str>)> = vec![
            (None, None, false, "claim-*", None),
            (
                Some(map(&[(names::NAMESPACE_ENABLED, "false")])),
                None,
                false,
                "claim-*",
                None,
            ),
            (
                Some(map(&[(names::NAMESPACE_ENABLED, "True")])),
                None,
                false,
                "claim-*",
                None,
            ),
            (on.clone(), None, true, "claim-*", None),
            (
                on.clone(),
                claims("home-*, data-*"),
                true,
                "home-*,data-*",
                None,
            ),
            (
                on.clone(),
                claims("home-*,["),
                true,
                "home-*",
                Some(
                    "velero-jupyterhub.io/claims has invalid globs (some globs): claim glob \"[\" is invalid",
                ),
            ),
            (
                on.clone(),
                claims(""),
                true,
                "claim-*",
                Some("velero-jupyterhub.io/claims is empty"),
            ),
            (
                on.clone(),
                claims(" , "),
                true,
                "claim-*",
                Some("velero-jupyterhub.io/claims is empty"),
            ),
            (
                on.clone(),
                claims("["),
                true,
                "claim-*",
                Some("velero-jupyterhub.io/claims has invalid globs (every glob)"),
            ),
            // Not opted in: the annotation is still read (and reported).
            (None, claims("home-*"), false, "home-*", None),
        ];
        // The claims being restored: read whatever else the namespace says.
        let restoring = |v: &str| Some(map(&[(names::NAMESPACE_RESTORING_CLAIMS, v)]));
        for (annotations, want) in [
            (None, vec![]),
            (restoring(""), vec![]),
            (restoring("claim-a"), vec!["claim-a"]),
            (restoring(" claim-a, ,claim-b "), vec!["claim-a", "claim-b"]),
        ] {
            let p = NamespacePolicy::read(on.as_ref(), annotations.as_ref(), &default);
            assert_eq!(&*p.restoring, want.as_slice(), "{annotations:?}");
        }
        for (labels, annotations, opted_in, globs, problem) in cases {
            let p = NamespacePolicy::read(labels.as_ref(), annotations.as_ref(), &default);
            let case = format!("{labels:?} {annotations:?}");
            assert_eq!(p.opted_in, opted_in, "{case}");
            assert_eq!(p.claims.to_string(), globs, "{case}");
            let got = p.claims_problem.as_ref().map(ToString::to_string);
            match (problem, got) {
                (None, None) => {}
                (Some(want), Some(got)) => assert!(got.starts_with(want), "{case}: {got}"),
                (want, got) => panic!("{case}: want {want:?}, got {got:?}"),
            }
        }
    }
}
