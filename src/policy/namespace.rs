//! What a namespace asks of us: opted in or not, and which claims are user data.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::claims::{ClaimGlobs, ClaimGlobsError};
use crate::names;

#[derive(Clone, Debug)]
pub enum NamespaceScope {
    /// Opted in; these globs name the user claims.
    OptedIn(Arc<ClaimGlobs>),
    /// Known, and not opted in: its pods are left alone.
    NotOptedIn,
}

/// Where the admission path looks a namespace up. Implemented by a static table (the
/// `review` command, `--no-cluster`) and by the live namespace cache.
pub trait NamespaceDirectory: Send + Sync {
    fn scope(&self, namespace: &str) -> NamespaceScope;
}

/// A namespace read from the cluster: its scope, and what was wrong with its claims
/// annotation (the valid globs are still used; see [`ClaimGlobs::parse_lenient`]).
pub fn scope_from_metadata(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
    default_claims: &Arc<ClaimGlobs>,
) -> (NamespaceScope, Vec<ClaimGlobsError>) {
    let enabled = labels
        .and_then(|l| l.get(names::NAMESPACE_ENABLED))
        .is_some_and(|v| v == "true");
    if !enabled {
        return (NamespaceScope::NotOptedIn, Vec::new());
    }
    match annotations.and_then(|a| a.get(names::NAMESPACE_CLAIMS)) {
        None => (NamespaceScope::OptedIn(default_claims.clone()), Vec::new()),
        Some(list) => {
            let (globs, errors) = ClaimGlobs::parse_lenient(list);
            let globs = globs
                .map(Arc::new)
                .unwrap_or_else(|| default_claims.clone());
            (NamespaceScope::OptedIn(globs), errors)
        }
    }
}

/// Every namespace is opted in, with the default globs unless overridden by name.
/// Namespaces are filtered by the webhook registration's namespaceSelector when there is
/// no cluster to ask.
#[derive(Clone, Debug)]
pub struct StaticNamespaces {
    pub default_claims: Arc<ClaimGlobs>,
    pub overrides: HashMap<String, Arc<ClaimGlobs>>,
}

impl StaticNamespaces {
    pub fn new(default_claims: ClaimGlobs) -> Self {
        Self {
            default_claims: Arc::new(default_claims),
            overrides: HashMap::new(),
        }
    }
}

impl NamespaceDirectory for StaticNamespaces {
    fn scope(&self, namespace: &str) -> NamespaceScope {
        let globs = self
            .overrides
            .get(namespace)
            .unwrap_or(&self.default_claims);
        NamespaceScope::OptedIn(globs.clone())
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

    fn globs_of(scope: &NamespaceScope) -> Option<String> {
        match scope {
            NamespaceScope::OptedIn(g) => Some(g.to_string()),
            NamespaceScope::NotOptedIn => None,
        }
    }

    #[test]
    fn table() {
        let default = Arc::new(ClaimGlobs::parse("claim-*").unwrap());
        let on = map(&[(names::NAMESPACE_ENABLED, "true")]);
        type Map = Option<BTreeMap<String, String>>;
        let cases: Vec<(Map, Map, Option<&str>, usize)> = vec![
            (None, None, None, 0),
            (
                Some(map(&[(names::NAMESPACE_ENABLED, "false")])),
                None,
                None,
                0,
            ),
            (
                Some(map(&[(names::NAMESPACE_ENABLED, "True")])),
                None,
                None,
                0,
            ),
            (Some(on.clone()), None, Some("claim-*"), 0),
            (
                Some(on.clone()),
                Some(map(&[(names::NAMESPACE_CLAIMS, "home-*, data-*")])),
                Some("home-*,data-*"),
                0,
            ),
            (
                Some(on.clone()),
                Some(map(&[(names::NAMESPACE_CLAIMS, "home-*,[")])),
                Some("home-*"),
                1,
            ),
            (
                Some(on.clone()),
                Some(map(&[(names::NAMESPACE_CLAIMS, "")])),
                Some("claim-*"),
                0,
            ),
            (
                Some(on),
                Some(map(&[(names::NAMESPACE_CLAIMS, "[")])),
                Some("claim-*"),
                1,
            ),
        ];
        for (labels, annotations, want, want_errors) in cases {
            let (scope, errors) =
                scope_from_metadata(labels.as_ref(), annotations.as_ref(), &default);
            assert_eq!(
                globs_of(&scope).as_deref(),
                want,
                "{labels:?} {annotations:?}"
            );
            assert_eq!(errors.len(), want_errors);
        }
    }

    #[test]
    fn static_overrides() {
        let mut dir = StaticNamespaces::new(ClaimGlobs::parse("claim-*").unwrap());
        dir.overrides
            .insert("lab".into(), Arc::new(ClaimGlobs::parse("home-*").unwrap()));
        assert_eq!(globs_of(&dir.scope("jhub")).as_deref(), Some("claim-*"));
        assert_eq!(globs_of(&dir.scope("lab")).as_deref(), Some("home-*"));
    }
}
