//! Backup hooks of a Schedule that would run in our helpers.
//!
//! Velero runs a Backup's resource hooks (`spec.hooks.resources`) as `exec` in every pod
//! they select: the namespaces, the resources (pods) and the label selector of the hook
//! (internal/hook/item_hook_handler.go `ResourceHookSelector.applicableTo`; an empty list
//! of either kind takes all, pkg/backup/backup.go `getResourceHook`). A helper runs a
//! pause image with no shell, so any command fails there, and Velero logs each failure as
//! an error (`HandleHooks`; pkg/backup/backup.go `handleItemBlockPostHooks`), which makes
//! the Backup PartiallyFailed (pkg/controller/backup_controller.go counts the errors). A
//! `pre` hook whose `onError` is `Fail` (set so in the spec: `HandleHooks` reads the
//! spec's own value; the executor's default of Fail applies to its copy only,
//! pkg/podexec/pod_command_executor.go) also makes Velero skip the pod: it is marked
//! backed up and its volumes are not copied (pkg/backup/backup.go, after
//! `handleItemBlockPreHooks`).

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
    pub post: Vec<Hook>,
}

/// A hook: Velero runs only `exec` ones in pods.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Hook {
    pub exec: Option<ExecHook>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ExecHook {
    #[serde(rename = "onError")]
    pub on_error: String,
}

/// A resource hook that would run in helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookInHelpers {
    /// Its name, or `resources[i]` without one.
    pub name: String,
    /// A `pre` exec hook with `onError: Fail`: Velero skips the helpers' volumes.
    pub skips_volumes: bool,
}

/// The resource hooks with an exec hook that would run in a helper of `namespace`
/// carrying one of `helper_labels` (helpers differ by their user's label).
pub fn in_helpers(
    hooks: &BackupHooks,
    namespace: &str,
    helper_labels: &[&BTreeMap<String, String>],
) -> Vec<HookInHelpers> {
    let execs = |hooks: &[Hook]| hooks.iter().filter_map(|h| h.exec.as_ref()).count();
    hooks
        .resources
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            includes_namespace(&r.included_namespaces, &r.excluded_namespaces, namespace)
                && takes_pods(&r.included_resources, &r.excluded_resources)
                && r.label_selector.as_ref().is_none_or(|s| {
                    helper_labels
                        .iter()
                        .any(|labels| selector::selects(s, labels))
                })
                && execs(&r.pre) + execs(&r.post) > 0
        })
        .map(|(i, r)| HookInHelpers {
            name: if r.name.is_empty() {
                format!("resources[{i}]")
            } else {
                r.name.clone()
            },
            skips_volumes: r
                .pre
                .iter()
                .filter_map(|h| h.exec.as_ref())
                .any(|e| e.on_error == "Fail"),
        })
        .collect()
}

/// Whether resource includes and excludes take pods, as Velero resolves them through
/// discovery (pkg/util/collections `GetResourceIncludesExcludes`: `*` or an empty list
/// includes all, `*` among the excludes is ignored; names resolve by plural, singular or
/// short name, any case).
fn takes_pods(included: &[String], excluded: &[String]) -> bool {
    let names_pods = |r: &String| matches!(r.to_ascii_lowercase().as_str(), "pods" | "pod" | "po");
    !excluded.iter().any(names_pods)
        && (included.is_empty() || included.iter().any(|r| r == "*" || names_pods(r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hooks_that_would_run_in_helpers() {
        let labels: BTreeMap<String, String> = [
            ("app.kubernetes.io/managed-by", "velero-jupyterhub"),
            ("backup", "homes"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut with_user = labels.clone();
        with_user.insert("hub.jupyter.org/username".to_owned(), "x".to_owned());
        let exec =
            |on_error: &str| json!([{"exec": {"command": ["/bin/sync"], "onError": on_error}}]);
        // (case, resource hook, runs in helpers, skips their volumes)
        let cases = [
            (
                "no selector, onError unset: runs, fails, logged",
                json!({"name": "sync", "pre": [{"exec": {"command": ["sync"]}}]}),
                true,
                false,
            ),
            (
                "pre, onError Fail: the volume is skipped",
                json!({"name": "sync", "pre": exec("Fail")}),
                true,
                true,
            ),
            (
                "pre, onError Continue: logged",
                json!({"name": "sync", "pre": exec("Continue")}),
                true,
                false,
            ),
            (
                "post, onError Fail: logged",
                json!({"name": "sync", "post": exec("Fail")}),
                true,
                false,
            ),
            (
                "another namespace",
                json!({"includedNamespaces": ["db"], "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "excluded namespace",
                json!({"excludedNamespaces": ["jh*"], "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "not pods",
                json!({"includedResources": ["deployments"], "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "pods by short name",
                json!({"includedResources": ["po"], "pre": exec("Fail")}),
                true,
                true,
            ),
            (
                "pods excluded",
                json!({"excludedResources": ["Pods"], "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "* among the excludes is ignored",
                json!({"excludedResources": ["*"], "pre": exec("Fail")}),
                true,
                true,
            ),
            (
                "selects user servers only",
                json!({"labelSelector": {"matchLabels": {"component": "singleuser-server"}}, "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "excludes helpers",
                json!({"labelSelector": {"matchExpressions": [{"key": "app.kubernetes.io/managed-by", "operator": "NotIn", "values": ["velero-jupyterhub"]}]}, "pre": exec("Fail")}),
                false,
                false,
            ),
            (
                "selects by the Schedule's label, as helpers carry it",
                json!({"labelSelector": {"matchLabels": {"backup": "homes"}}, "pre": exec("Fail")}),
                true,
                true,
            ),
            (
                "selects pods with a username, as helpers of a user's claim have",
                json!({"labelSelector": {"matchExpressions": [{"key": "hub.jupyter.org/username", "operator": "Exists"}]}, "post": exec("")}),
                true,
                false,
            ),
            ("no exec", json!({"pre": [{}]}), false, false),
        ];
        for (why, spec, runs, skips) in cases {
            let hooks: BackupHooks =
                serde_json::from_value(json!({"resources": [spec]})).expect(why);
            let got = in_helpers(&hooks, "jhub", &[&labels, &with_user]);
            assert_eq!(!got.is_empty(), runs, "{why}: {got:?}");
            assert_eq!(got.iter().any(|h| h.skips_volumes), skips, "{why}: {got:?}");
        }
        let hooks: BackupHooks = serde_json::from_value(
            json!({"resources": [{"pre": exec("Fail")}, {"name": "freeze", "post": exec("")}]}),
        )
        .expect("hooks");
        let names: Vec<String> = in_helpers(&hooks, "jhub", &[&labels])
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["resources[0]", "freeze"]);
    }
}
