//! Backup hooks of a Schedule that would run in our helpers.
//!
//! Velero runs a Backup's resource hooks (`spec.hooks.resources`) as `exec` in every pod
//! they select: the namespaces, the resources (pods) and the label selector of the hook
//! (internal/hook/item_hook_handler.go `ResourceHookSelector.applicableTo`; an empty list
//! of either kind takes all, pkg/backup/backup.go `getResourceHook`). A helper runs a
//! pause image with no shell, so any command fails there, and a `pre` hook that fails
//! with `onError: Fail` (the default, pkg/podexec/pod_command_executor.go) makes Velero
//! skip the pod: it is marked backed up and its volumes are not copied
//! (pkg/backup/backup.go, after `handleItemBlockPreHooks`). A `post` hook only logs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Deserialize;

use crate::selector;
use crate::velero::includes_namespace;

/// `spec.hooks` of a Backup (a Schedule's template).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct BackupHooks {
    pub resources: Vec<ResourceHookSpec>,
}

/// One entry of `spec.hooks.resources`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceHookSpec {
    pub name: String,
    pub included_namespaces: Vec<String>,
    pub excluded_namespaces: Vec<String>,
    pub included_resources: Vec<String>,
    pub excluded_resources: Vec<String>,
    pub label_selector: Option<LabelSelector>,
    pub pre: Vec<Hook>,
}

/// A hook: Velero runs only `exec` ones in pods.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Hook {
    pub exec: Option<ExecHook>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ExecHook {
    #[serde(rename = "onError")]
    pub on_error: String,
}

/// The names of the resource hooks with a `pre` exec hook that fails the pod
/// (`onError` Fail or unset) and that would run in a helper of `namespace` carrying
/// `helper_labels`. A hook without a name is named by its place, `resources[i]`.
pub fn failing_in_helpers(
    hooks: &BackupHooks,
    namespace: &str,
    helper_labels: &BTreeMap<String, String>,
) -> Vec<String> {
    hooks
        .resources
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            includes_namespace(&r.included_namespaces, &r.excluded_namespaces, namespace)
                && takes_pods(&r.included_resources, &r.excluded_resources)
                && r.label_selector
                    .as_ref()
                    .is_none_or(|s| selector::selects(s, helper_labels))
                && r.pre
                    .iter()
                    .any(|h| h.exec.as_ref().is_some_and(|e| e.on_error != "Continue"))
        })
        .map(|(i, r)| {
            if r.name.is_empty() {
                format!("resources[{i}]")
            } else {
                r.name.clone()
            }
        })
        .collect()
}

/// Whether resource includes and excludes take pods, as Velero resolves them through
/// discovery (pkg/util/collections `GetResourceIncludesExcludes`: `*` or an empty list
/// includes all; names resolve by plural, singular or short name, any case).
fn takes_pods(included: &[String], excluded: &[String]) -> bool {
    let names_pods = |r: &String| {
        let r = r.to_ascii_lowercase();
        matches!(r.as_str(), "*" | "pods" | "pod" | "po")
    };
    !excluded.iter().any(names_pods) && (included.is_empty() || included.iter().any(names_pods))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hooks_that_would_fail_helpers() {
        let labels: BTreeMap<String, String> = [
            ("app.kubernetes.io/managed-by", "velero-jupyterhub"),
            ("backup", "homes"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let exec =
            |on_error: &str| json!([{"exec": {"command": ["/bin/sync"], "onError": on_error}}]);
        let cases = [
            (
                "no selector, default onError",
                json!({"name": "sync", "pre": [{"exec": {"command": ["sync"]}}]}),
                true,
            ),
            (
                "onError Fail",
                json!({"name": "sync", "pre": exec("Fail")}),
                true,
            ),
            (
                "onError Continue",
                json!({"name": "sync", "pre": exec("Continue")}),
                false,
            ),
            (
                "post only: logged, the volume copied",
                json!({"name": "sync", "post": exec("Fail")}),
                false,
            ),
            (
                "another namespace",
                json!({"includedNamespaces": ["db"], "pre": exec("Fail")}),
                false,
            ),
            (
                "excluded namespace",
                json!({"excludedNamespaces": ["jh*"], "pre": exec("Fail")}),
                false,
            ),
            (
                "not pods",
                json!({"includedResources": ["deployments"], "pre": exec("Fail")}),
                false,
            ),
            (
                "pods by short name",
                json!({"includedResources": ["po"], "pre": exec("Fail")}),
                true,
            ),
            (
                "pods excluded",
                json!({"excludedResources": ["Pods"], "pre": exec("Fail")}),
                false,
            ),
            (
                "selects user servers only",
                json!({"labelSelector": {"matchLabels": {"component": "singleuser-server"}}, "pre": exec("Fail")}),
                false,
            ),
            (
                "excludes helpers",
                json!({"labelSelector": {"matchExpressions": [{"key": "app.kubernetes.io/managed-by", "operator": "NotIn", "values": ["velero-jupyterhub"]}]}, "pre": exec("Fail")}),
                false,
            ),
            (
                "selects by the Schedule's label, as helpers carry it",
                json!({"labelSelector": {"matchLabels": {"backup": "homes"}}, "pre": exec("Fail")}),
                true,
            ),
            ("no exec", json!({"pre": [{}]}), false),
        ];
        for (why, spec, fails) in cases {
            let hooks: BackupHooks =
                serde_json::from_value(json!({"resources": [spec]})).expect(why);
            let got = failing_in_helpers(&hooks, "jhub", &labels);
            assert_eq!(!got.is_empty(), fails, "{why}: {got:?}");
        }
        let hooks: BackupHooks = serde_json::from_value(
            json!({"resources": [{"pre": exec("Fail")}, {"name": "freeze", "pre": exec("")}]}),
        )
        .expect("hooks");
        assert_eq!(
            failing_in_helpers(&hooks, "jhub", &labels),
            ["resources[0]", "freeze"]
        );
    }
}
