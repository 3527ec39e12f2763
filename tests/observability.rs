//! The alert rules and the dashboard in manifests/examples/ use only metric names the
//! binary really exports (webhook and controller), and the rules pass promtool.

use std::collections::BTreeSet;

use serde_json::Value;
use velero_jupyterhub::metrics::Metrics;

/// Every sample name the registries can produce, from their `# TYPE` lines. A family
/// with no children is not encoded at all, so each gets one first (a family added to
/// `metrics.rs` and used in the rules must be touched here too, or this test fails).
fn exported() -> BTreeSet<String> {
    use velero_jupyterhub::metrics::{ClaimLabels, StateLabels};
    let webhook = Metrics::new();
    webhook.admission("live", "annotated", 0.001);
    webhook.tls_reload(true);
    webhook.connection("webhook", "accepted");
    webhook.set_connections_open("webhook", 1);
    webhook.namespace_fetch("fetched");
    webhook.set_claims_problem("jhub", true);
    let controller = Metrics::for_controller();
    let c = &controller.controller;
    c.write("create", "pods");
    let state = StateLabels { state: "idle" };
    c.helpers.get_or_create(&state).set(1);
    c.restore_helpers.get_or_create(&state).set(1);
    c.claims.get_or_create(&state).set(1);
    let claim = ClaimLabels {
        namespace: "jhub".into(),
        claim: "claim-alice".into(),
    };
    c.claim_last_backup.get_or_create(&claim).set(1);
    c.certificate_steps
        .get_or_create(&velero_jupyterhub::metrics::StepLabels { step: "issue" })
        .inc();
    c.certificate_errors
        .get_or_create(&velero_jupyterhub::metrics::ReasonLabels { reason: "api" })
        .inc();
    let schedule = velero_jupyterhub::metrics::ScheduleLabels {
        schedule: "homes".into(),
    };
    for family in [&c.waves, &c.wave_claims, &c.wave_given_up] {
        family.get_or_create(&schedule).inc();
    }
    for family in [&c.run_waves, &c.run_not_reached, &c.run_duration] {
        family.get_or_create(&schedule).set(1);
    }
    let mut names = BTreeSet::new();
    for text in [webhook.encode(), controller.encode()] {
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("#") || words.next() != Some("TYPE") {
                continue;
            }
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// The `velero_jupyterhub_*` names a text mentions.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("velero_jupyterhub_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn rules_and_dashboard_use_exported_metrics_only() {
    let exported = exported();
    assert!(
        exported.contains("velero_jupyterhub_claims_stale"),
        "{exported:?}"
    );
    for path in [
        "manifests/examples/prometheusrule.yaml",
        "manifests/examples/grafana-dashboard.json",
    ] {
        let names = mentioned(&read(path));
        assert!(names.len() >= 5, "{path} mentions {names:?}");
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{path} uses metrics the binary does not export: {unknown:?}"
        );
    }
    // The dashboard is valid JSON with a query per panel.
    let dashboard: Value =
        serde_json::from_str(&read("manifests/examples/grafana-dashboard.json")).unwrap();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(panel["targets"][0]["expr"].is_string(), "{panel}");
    }
    // The fail-open alert names the live entry as manifests/webhook.yaml does.
    let rules = read("manifests/examples/prometheusrule.yaml");
    let webhook = testkit::cluster::manifest("MutatingWebhookConfiguration", "velero-jupyterhub");
    let live = webhook["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["clientConfig"]["service"]["path"] == "/mutate/live")
        .expect("the live entry");
    let name = live["name"].as_str().unwrap();
    assert!(rules.contains(&format!("name=\"{name}\"")), "{name}");
}

#[test]
fn the_rules_pass_promtool() {
    let rule: Value =
        serde_yaml_ng::from_str(&read("manifests/examples/prometheusrule.yaml")).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        serde_yaml_ng::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool (Debian package `prometheus`; scripts/test.sh installs it as root) did not run: {e}")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 11 rules found"), "{text}");
}
