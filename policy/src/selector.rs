//! Labels that make our helper pods match a Velero Schedule's `labelSelector` or
//! `orLabelSelectors`, so the Backup it creates includes them.
//!
//! Velero includes an item when it matches `labelSelector`, or any of `orLabelSelectors`
//! (it refuses a Backup that sets both: `FailedValidation`, in
//! pkg/controller/backup_controller.go `prepareBackupRequest`). A selector is satisfied by
//! adding labels: `matchLabels` and `In` (its first value) and `Exists` (an empty value)
//! add one; `NotIn` and `DoesNotExist` only have to hold for the labels we already set.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::names;

/// Labels a selector can never make us add: KubeSpawner's `component` (KubeSpawner and
/// our webhook would take the helper for a user server), the username (each helper
/// carries its own claim's, or none), and Velero's `velero.io/restore-name` (our webhook
/// would take the helper for a pod a restore re-creates, and the guard and the controller
/// its claim for one being restored).
const RESERVED: [&str; 3] = [
    names::JUPYTERHUB_COMPONENT,
    names::JUPYTERHUB_USERNAME,
    names::VELERO_RESTORE_NAME,
];

/// Why no set of labels can make our helpers match a Schedule's selectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectorProblem {
    /// `labelSelector` and `orLabelSelectors` both set: Velero fails such a Backup.
    BothSelectorKinds,
    /// A requirement contradicts a label our helpers must carry, or another requirement.
    Conflict { key: String, reason: String },
    /// A key or value that is not a valid label (the helper could not be created).
    InvalidLabel { key: String, value: String },
    /// An operator other than In, NotIn, Exists, DoesNotExist, or `In` with no values.
    Unsatisfiable { key: String, operator: String },
}

impl fmt::Display for SelectorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BothSelectorKinds => f.write_str(
                "the template sets both labelSelector and orLabelSelectors (Velero fails such backups)",
            ),
            Self::Conflict { key, reason } => write!(f, "label {key:?}: {reason}"),
            Self::InvalidLabel { key, value } => {
                write!(f, "{key:?}={value:?} is not a valid label")
            }
            Self::Unsatisfiable { key, operator } => {
                write!(
                    f,
                    "requirement {key:?} {operator} cannot be met by adding labels"
                )
            }
        }
    }
}

/// The labels to add to `ours` (our helpers' own labels, which are not changed) so the
/// pod matches the template's selectors; empty when there are none. With
/// `orLabelSelectors`, the first one that can be met.
pub fn labels_to_match(
    label_selector: Option<&LabelSelector>,
    or_label_selectors: Option<&[LabelSelector]>,
    ours: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SelectorProblem> {
    // Velero tests both for nil, so an empty orLabelSelectors list beside a labelSelector
    // fails validation too.
    match (label_selector, or_label_selectors) {
        (Some(_), Some(_)) => Err(SelectorProblem::BothSelectorKinds),
        (Some(s), None) => satisfy(s, ours),
        (None, None | Some([])) => Ok(BTreeMap::new()),
        (None, Some(or)) => {
            let mut first_problem = None;
            for s in or {
                match satisfy(s, ours) {
                    Ok(extra) => return Ok(extra),
                    Err(p) => {
                        first_problem.get_or_insert(p);
                    }
                }
            }
            Err(first_problem.unwrap_or(SelectorProblem::BothSelectorKinds))
        }
    }
}

fn satisfy(
    selector: &LabelSelector,
    ours: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SelectorProblem> {
    let mut extra = BTreeMap::new();
    let current = |extra: &BTreeMap<String, String>, key: &str| -> Option<String> {
        ours.get(key).or_else(|| extra.get(key)).cloned()
    };
    let add = |extra: &mut BTreeMap<String, String>, key: &str, value: &str, why: &str| {
        if RESERVED.contains(&key) {
            return Err(SelectorProblem::Conflict {
                key: key.to_owned(),
                reason: format!(
                    "{why} {value:?}, a label our helpers must never carry (it would make them look like a user's server, or another user's)"
                ),
            });
        }
        if !names::is_label_key(key) || !names::is_label_value(value) {
            return Err(SelectorProblem::InvalidLabel {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
        match current(extra, key) {
            Some(have) if have != value => Err(SelectorProblem::Conflict {
                key: key.to_owned(),
                reason: format!("{why} {value:?}, but our helpers carry {have:?}"),
            }),
            Some(_) => Ok(()),
            None => {
                extra.insert(key.to_owned(), value.to_owned());
                Ok(())
            }
        }
    };
    for (key, value) in selector.match_labels.iter().flatten() {
        add(&mut extra, key, value, "matchLabels requires")?;
    }
    let requirements: &[LabelSelectorRequirement] =
        selector.match_expressions.as_deref().unwrap_or_default();
    // Requirements that add labels first, then those that only constrain them.
    for r in requirements {
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => match current(&extra, &r.key) {
                Some(have) if values.contains(&have) => {}
                Some(have) => {
                    return Err(SelectorProblem::Conflict {
                        key: r.key.clone(),
                        reason: format!("In {values:?} does not hold for {have:?}"),
                    });
                }
                None => match values.first() {
                    Some(v) => add(&mut extra, &r.key, v, "In requires")?,
                    None => {
                        return Err(SelectorProblem::Unsatisfiable {
                            key: r.key.clone(),
                            operator: "In []".to_owned(),
                        });
                    }
                },
            },
            "Exists" => {
                if current(&extra, &r.key).is_none() {
                    add(&mut extra, &r.key, "", "Exists requires")?;
                }
            }
            "NotIn" | "DoesNotExist" => {}
            other => {
                return Err(SelectorProblem::Unsatisfiable {
                    key: r.key.clone(),
                    operator: other.to_owned(),
                });
            }
        }
    }
    for r in requirements {
        let values = r.values.as_deref().unwrap_or_default();
        match (r.operator.as_str(), current(&extra, &r.key)) {
            ("NotIn", Some(have)) if values.contains(&have) => {
                return Err(SelectorProblem::Conflict {
                    key: r.key.clone(),
                    reason: format!("NotIn {values:?} does not hold for {have:?}"),
                });
            }
            ("DoesNotExist", Some(have)) => {
                return Err(SelectorProblem::Conflict {
                    key: r.key.clone(),
                    reason: format!("DoesNotExist, but the label is {have:?}"),
                });
            }
            _ => {}
        }
    }
    Ok(extra)
}

/// Whether `selector` selects an object with `labels` (metav1 `LabelSelectorAsSelector`):
/// every `matchLabels` pair and every requirement holds; an unknown operator selects
/// nothing (Velero fails to read such a selector).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let requirements = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && requirements
}

/// Whether `selector` may select an object whose label `key` is `value` (`None`: absent),
/// judging only its requirements on `key` (the others are taken as met: a caller that
/// knows one label of an object can only rule it out by that label).
pub fn may_select(selector: &LabelSelector, key: &str, value: Option<&str>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == key)
        .all(|(_, v)| value == Some(v.as_str()));
    let expressions_ok = selector
        .match_expressions
        .iter()
        .flatten()
        .filter(|r| r.key == key)
        .all(|r| {
            let values = r.values.as_deref().unwrap_or_default();
            match r.operator.as_str() {
                "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
                "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => true,
            }
        });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: serde_json::Value) -> LabelSelector {
        serde_json::from_value(yaml).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn table() {
        use serde_json::json;
        let ours = map(&[
            ("app.kubernetes.io/managed-by", "velero-jupyterhub"),
            ("app.kubernetes.io/component", "backup-helper"),
        ]);
        type Case = (
            &'static str,
            Option<serde_json::Value>,
            Option<Vec<serde_json::Value>>,
            Result<Vec<(&'static str, &'static str)>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            ("no selector", None, None, Ok(vec![])),
            (
                "matchLabels are added",
                Some(json!({"matchLabels": {"backup": "homes", "tier": "users"}})),
                None,
                Ok(vec![("backup", "homes"), ("tier", "users")]),
            ),
            (
                "matchLabels we already carry",
                Some(json!({"matchLabels": {"app.kubernetes.io/managed-by": "velero-jupyterhub"}})),
                None,
                Ok(vec![]),
            ),
            (
                "matchLabels contradicting ours",
                Some(json!({"matchLabels": {"app.kubernetes.io/component": "db"}})),
                None,
                Err("Conflict"),
            ),
            (
                "In takes its first value, Exists an empty one",
                Some(json!({"matchExpressions": [
                    {"key": "backup", "operator": "In", "values": ["homes", "all"]},
                    {"key": "velero-include", "operator": "Exists"}]})),
                None,
                Ok(vec![("backup", "homes"), ("velero-include", "")]),
            ),
            (
                "In already met by a matchLabel",
                Some(
                    json!({"matchLabels": {"backup": "all"}, "matchExpressions": [
                    {"key": "backup", "operator": "In", "values": ["homes", "all"]}]}),
                ),
                None,
                Ok(vec![("backup", "all")]),
            ),
            (
                "In contradicted by a matchLabel",
                Some(
                    json!({"matchLabels": {"backup": "none"}, "matchExpressions": [
                    {"key": "backup", "operator": "In", "values": ["homes"]}]}),
                ),
                None,
                Err("Conflict"),
            ),
            (
                "NotIn and DoesNotExist on labels we do not set",
                Some(json!({"matchExpressions": [
                    {"key": "skip-backup", "operator": "DoesNotExist"},
                    {"key": "tier", "operator": "NotIn", "values": ["system"]}]})),
                None,
                Ok(vec![]),
            ),
            (
                "NotIn our own value",
                Some(json!({"matchExpressions": [
                    {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["backup-helper"]}]})),
                None,
                Err("Conflict"),
            ),
            (
                "DoesNotExist on a label another requirement adds",
                Some(json!({"matchLabels": {"x": "1"}, "matchExpressions": [
                    {"key": "x", "operator": "DoesNotExist"}]})),
                None,
                Err("Conflict"),
            ),
            (
                "In with no values",
                Some(json!({"matchExpressions": [{"key": "x", "operator": "In", "values": []}]})),
                None,
                Err("Unsatisfiable"),
            ),
            (
                "unknown operator",
                Some(
                    json!({"matchExpressions": [{"key": "x", "operator": "Gt", "values": ["1"]}]}),
                ),
                None,
                Err("Unsatisfiable"),
            ),
            (
                "invalid label value",
                Some(json!({"matchLabels": {"x": "not valid!"}})),
                None,
                Err("InvalidLabel"),
            ),
            (
                "orLabelSelectors: the first that can be met",
                None,
                Some(vec![
                    json!({"matchLabels": {"app.kubernetes.io/component": "db"}}),
                    json!({"matchLabels": {"backup": "homes"}}),
                ]),
                Ok(vec![("backup", "homes")]),
            ),
            (
                "never KubeSpawner's component label (the fixture Schedule's first orLabelSelector)",
                None,
                Some(vec![
                    json!({"matchLabels": {"component": "singleuser-server"}}),
                    json!({"matchLabels": {"backup": "homes"}}),
                ]),
                Ok(vec![("backup", "homes")]),
            ),
            (
                "never a username",
                Some(json!({"matchExpressions": [
                    {"key": "hub.jupyter.org/username", "operator": "Exists"}]})),
                None,
                Err("Conflict"),
            ),
            (
                "never Velero's restore-name",
                Some(json!({"matchExpressions": [
                    {"key": "velero.io/restore-name", "operator": "Exists"}]})),
                None,
                Err("Conflict"),
            ),
            (
                "orLabelSelectors: none can be met",
                None,
                Some(vec![
                    json!({"matchLabels": {"app.kubernetes.io/component": "db"}}),
                ]),
                Err("Conflict"),
            ),
            (
                "both kinds",
                Some(json!({"matchLabels": {"a": "b"}})),
                Some(vec![json!({"matchLabels": {"c": "d"}})]),
                Err("BothSelectorKinds"),
            ),
            (
                "an empty orLabelSelectors beside a labelSelector",
                Some(json!({"matchLabels": {"a": "b"}})),
                Some(vec![]),
                Err("BothSelectorKinds"),
            ),
            (
                "an empty orLabelSelectors alone",
                None,
                Some(vec![]),
                Ok(vec![]),
            ),
        ];
        for (name, single, or, want) in cases {
            let single = single.map(selector);
            let or: Option<Vec<_>> = or.map(|or| or.into_iter().map(selector).collect());
            let got = labels_to_match(single.as_ref(), or.as_deref(), &ours);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, map(&want), "{name}"),
                (Err(got), Err(kind)) => {
                    assert!(format!("{got:?}").starts_with(kind), "{name}: {got:?}");
                    assert!(!got.to_string().is_empty());
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
