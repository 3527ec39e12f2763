//! Table tests of backup windows: Schedules and Backups shaped as in
//! tests/fixtures/velero-backup-schedule-restore.example.yaml, the times Velero's
//! schedule controller would produce (pkg/controller/schedule_controller.go, v1.18).

use std::collections::BTreeMap;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use testkit::fixtures;
use velero_jupyterhub_policy::helper;
use velero_jupyterhub_policy::names;
use velero_jupyterhub_policy::velero::{ScheduleSpec, ScheduleStatus};
use velero_jupyterhub_policy::window::{
    BackupView, ManualWindow, ScheduleProblem, ScheduleView, WindowOptions, is_tick_backup,
    tick_backup, windows,
};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The fixture's Schedule, with `edit` applied to its spec.
fn schedule_spec(edit: impl Fn(&mut Value)) -> ScheduleSpec {
    let mut doc = fixtures::yaml_docs("velero-backup-schedule-restore.example.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Schedule")
        .expect("a Schedule in the fixture");
    // Our helpers' labels satisfy a plain matchLabels; the fixture's orLabelSelectors
    // (KubeSpawner's component, or another helper label) is a case of its own below.
    let template = doc["spec"]["template"].as_object_mut().expect("template");
    template.remove("orLabelSelectors");
    template.insert(
        "labelSelector".into(),
        json!({"matchLabels": {"backup": "homes"}}),
    );
    edit(&mut doc["spec"]);
    serde_json::from_value(doc["spec"].clone()).expect("spec")
}

fn status(last_backup: Option<&str>, last_skipped: Option<&str>) -> ScheduleStatus {
    serde_json::from_value(
        json!({"phase": "Enabled", "lastBackup": last_backup, "lastSkipped": last_skipped}),
    )
    .expect("status")
}

const OPTIONS: WindowOptions = WindowOptions {
    lead: SignedDuration::from_mins(10),
    max: SignedDuration::from_hours(6),
};
const CREATED: &str = "2026-11-27T12:00:00Z";

struct Want {
    open: bool,
    backups: Vec<&'static str>,
    next_change: Option<&'static str>,
}

fn run(
    name: &str,
    specs: &[(&str, ScheduleSpec, ScheduleStatus)],
    backups: &[(&str, &str, &str, Option<&str>)],
    now: &str,
    want: Want,
) -> Vec<(String, ScheduleProblem)> {
    let schedules: Vec<ScheduleView<'_>> = specs
        .iter()
        .map(|(n, spec, status)| ScheduleView {
            name: n,
            created: ts(CREATED),
            spec,
            status: Some(status),
        })
        .collect();
    let backups: Vec<BackupView<'_>> = backups
        .iter()
        .map(|(n, schedule, created, phase)| BackupView {
            name: n,
            created: ts(created),
            schedule: Some(schedule),
            phase: *phase,
        })
        .collect();
    let own = helper::own_labels(None);
    let got = windows(
        ["jhub", "sandbox"],
        &schedules,
        &[],
        &backups,
        &own,
        ts(now),
        OPTIONS,
    );
    let window = got.open.get("jhub");
    assert_eq!(window.is_some(), want.open, "{name}: open");
    if let Some(w) = window {
        assert_eq!(w.backups, want.backups, "{name}: backups");
        assert_eq!(
            w.labels.get("backup").map(String::as_str),
            Some("homes"),
            "{name}"
        );
    }
    assert!(
        !got.open.contains_key("sandbox"),
        "{name}: the Schedule names jhub only"
    );
    assert_eq!(
        got.next_change,
        want.next_change.map(ts),
        "{name}: next change"
    );
    got.problems
}

#[test]
fn window_table() {
    let daily = schedule_spec(|_| {});
    let none = status(None, None);
    let after_tick = status(Some("2026-11-28T03:00:12Z"), None);
    let closed = |next| Want {
        open: false,
        backups: vec![],
        next_change: Some(next),
    };
    // From the Schedule's creation, the next tick is 03:00: the window opens at 02:50.
    run(
        "before the lead time",
        &[("daily", daily.clone(), none.clone())],
        &[],
        "2026-11-28T02:00:00Z",
        closed("2026-11-28T02:50:00Z"),
    );
    run(
        "within the lead time: open until max",
        &[("daily", daily.clone(), none.clone())],
        &[],
        "2026-11-28T02:50:00Z",
        Want {
            open: true,
            backups: vec![],
            next_change: Some("2026-11-28T08:50:00Z"),
        },
    );
    run(
        "tick passed, Velero has not created the Backup yet: still open",
        &[("daily", daily.clone(), none.clone())],
        &[],
        "2026-11-28T03:00:40Z",
        Want {
            open: true,
            backups: vec![],
            next_change: Some("2026-11-28T08:50:00Z"),
        },
    );
    run(
        "lastBackup seen before its Backup (separate watches): open, that Backup is awaited",
        &[("daily", daily.clone(), after_tick.clone())],
        &[],
        "2026-11-28T03:00:13Z",
        Want {
            open: true,
            backups: vec!["daily-20261128030012"],
            next_change: Some("2026-11-28T03:02:12Z"),
        },
    );
    run(
        "its Backup still unseen two minutes on (deleted): closed",
        &[("daily", daily.clone(), after_tick.clone())],
        &[],
        "2026-11-28T03:02:12Z",
        closed("2026-11-29T02:50:00Z"),
    );
    let in_progress = [(
        "daily-20261128030012",
        "daily",
        "2026-11-28T03:00:12Z",
        Some("InProgress"),
    )];
    run(
        "the Backup exists (lastBackup moved on): open while it runs",
        &[("daily", daily.clone(), after_tick.clone())],
        &in_progress,
        "2026-11-28T03:20:00Z",
        Want {
            open: true,
            backups: vec!["daily-20261128030012"],
            next_change: Some("2026-11-28T09:00:12Z"),
        },
    );
    run(
        "a Backup with no phase yet (New) keeps it open",
        &[("daily", daily.clone(), after_tick.clone())],
        &[(
            "daily-20261128030012",
            "daily",
            "2026-11-28T03:00:12Z",
            None,
        )],
        "2026-11-28T03:00:20Z",
        Want {
            open: true,
            backups: vec!["daily-20261128030012"],
            next_change: Some("2026-11-28T09:00:12Z"),
        },
    );
    for phase in ["Completed", "PartiallyFailed", "Failed", "FailedValidation"] {
        run(
            phase,
            &[("daily", daily.clone(), after_tick.clone())],
            &[(
                "daily-20261128030012",
                "daily",
                "2026-11-28T03:00:12Z",
                Some(phase),
            )],
            "2026-11-28T03:20:00Z",
            closed("2026-11-29T02:50:00Z"),
        );
    }
    run(
        "a Backup still running after max: closed",
        &[("daily", daily.clone(), after_tick.clone())],
        &in_progress,
        "2026-11-28T09:00:12Z",
        closed("2026-11-29T02:50:00Z"),
    );
    run(
        "another Schedule's Backup does not count",
        &[("daily", daily.clone(), after_tick.clone())],
        &[(
            "weekly-20261128030012",
            "weekly",
            "2026-11-28T03:00:12Z",
            Some("InProgress"),
        )],
        "2026-11-28T03:20:00Z",
        closed("2026-11-29T02:50:00Z"),
    );
    run(
        "lastSkipped later than lastBackup counts (skipImmediately)",
        &[(
            "daily",
            daily.clone(),
            status(Some("2026-11-20T03:00:00Z"), Some("2026-11-28T03:30:00Z")),
        )],
        &[],
        "2026-11-28T04:00:00Z",
        closed("2026-11-29T02:50:00Z"),
    );
    let paused = schedule_spec(|s| s["paused"] = true.into());
    run(
        "paused",
        &[("daily", paused, none.clone())],
        &[],
        "2026-11-28T02:55:00Z",
        Want {
            open: false,
            backups: vec![],
            next_change: None,
        },
    );
    let paused_after_tick = schedule_spec(|s| s["paused"] = true.into());
    run(
        "paused while its Backup runs: open until that Backup ends",
        &[("daily", paused_after_tick.clone(), after_tick.clone())],
        &in_progress,
        "2026-11-28T03:20:00Z",
        Want {
            open: true,
            backups: vec!["daily-20261128030012"],
            next_change: Some("2026-11-28T09:00:12Z"),
        },
    );
    run(
        "paused, its Backup done: closed, and no tick to wake up for",
        &[("daily", paused_after_tick, after_tick.clone())],
        &[(
            "daily-20261128030012",
            "daily",
            "2026-11-28T03:00:12Z",
            Some("Completed"),
        )],
        "2026-11-28T03:20:00Z",
        Want {
            open: false,
            backups: vec![],
            next_change: None,
        },
    );
    // Velero names a Schedule's Backup in its server's local time: with TZ=Europe/Berlin
    // on Velero's pod, the 03:00:12 UTC tick's Backup is daily-20261128040012.
    let berlin_named = |phase| {
        [(
            "daily-20261128040012",
            "daily",
            "2026-11-28T03:00:12Z",
            Some(phase),
        )]
    };
    run(
        "a Backup named in Velero's local time is the tick's: no other one awaited",
        &[("daily", daily.clone(), after_tick.clone())],
        &berlin_named("InProgress"),
        "2026-11-28T03:01:00Z",
        Want {
            open: true,
            backups: vec!["daily-20261128040012"],
            next_change: Some("2026-11-28T09:00:12Z"),
        },
    );
    run(
        "and once it is done the window closes",
        &[("daily", daily.clone(), after_tick.clone())],
        &berlin_named("Completed"),
        "2026-11-28T03:01:00Z",
        closed("2026-11-29T02:50:00Z"),
    );
    let elsewhere =
        schedule_spec(|s| s["template"]["excludedNamespaces"] = json!(["jhub", "sandbox"]));
    run(
        "excluded",
        &[("daily", elsewhere, none.clone())],
        &[],
        "2026-11-28T02:55:00Z",
        Want {
            open: false,
            backups: vec![],
            next_change: None,
        },
    );
    let berlin = schedule_spec(|s| s["schedule"] = "CRON_TZ=Europe/Berlin 0 3 * * *".into());
    run(
        "CRON_TZ: 03:00 in Berlin is 02:00 UTC",
        &[("daily", berlin, none.clone())],
        &[],
        "2026-11-28T01:50:00Z",
        Want {
            open: true,
            backups: vec![],
            next_change: Some("2026-11-28T07:50:00Z"),
        },
    );
    let every = schedule_spec(|s| s["schedule"] = "@every 5m".into());
    run(
        "@every shorter than the lead time: always open (lastBackup's Backup awaited)",
        &[("daily", every, status(Some("2026-11-28T03:00:00Z"), None))],
        &[],
        "2026-11-28T03:01:00Z",
        Want {
            open: true,
            backups: vec!["daily-20261128030000"],
            next_change: Some("2026-11-28T03:02:00Z"),
        },
    );
}

#[test]
fn problems_are_reported_per_schedule_and_never_fatal() {
    let none = status(None, None);
    // The fixture as written: orLabelSelectors asks for KubeSpawner's component label or
    // another tool's helper label, neither of which our helpers may carry.
    let mut doc = fixtures::yaml_docs("velero-backup-schedule-restore.example.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Schedule")
        .expect("schedule");
    let as_written: ScheduleSpec = serde_json::from_value(doc["spec"].take()).expect("spec");
    let bad_cron = schedule_spec(|s| s["schedule"] = "0 3 * *".into());
    let never = schedule_spec(|s| s["schedule"] = "0 0 30 2 *".into());
    let daily = schedule_spec(|_| {});
    let other_value = schedule_spec(|s| {
        s["template"]["labelSelector"] = json!({"matchLabels": {"backup": "all"}})
    });
    let problems = run(
        "one good Schedule among bad ones",
        &[
            ("as-written", as_written, none.clone()),
            ("bad-cron", bad_cron, none.clone()),
            ("never", never, none.clone()),
            ("daily", daily, none.clone()),
            ("other-value", other_value, none.clone()),
        ],
        &[],
        "2026-11-28T02:55:00Z",
        Want {
            open: true,
            backups: vec![],
            next_change: Some("2026-11-28T08:50:00Z"),
        },
    );
    let by_name: BTreeMap<&str, String> = problems
        .iter()
        .map(|(n, p)| (n.as_str(), p.to_string()))
        .collect();
    assert!(
        by_name["as-written"].contains("\"component\""),
        "{by_name:?}"
    );
    assert!(
        by_name["bad-cron"].contains("expected exactly 5 fields"),
        "{by_name:?}"
    );
    assert!(by_name["never"].contains("no next run"), "{by_name:?}");
    assert!(by_name["other-value"].contains("\"backup\""), "{by_name:?}");
    assert_eq!(by_name.len(), 4, "{by_name:?}");

    // Paused, the same Schedules back nobody up: nothing is reported of them.
    let paused = |mut spec: ScheduleSpec| {
        spec.paused = true;
        spec
    };
    let problems = run(
        "paused bad Schedules",
        &[
            (
                "bad-cron",
                paused(schedule_spec(|s| s["schedule"] = "0 3 * *".into())),
                none.clone(),
            ),
            (
                "never",
                paused(schedule_spec(|s| s["schedule"] = "0 0 30 2 *".into())),
                none.clone(),
            ),
            ("daily", schedule_spec(|_| {}), none.clone()),
        ],
        &[],
        "2026-11-28T02:55:00Z",
        Want {
            open: true,
            backups: vec![],
            next_change: Some("2026-11-28T08:50:00Z"),
        },
    );
    assert!(problems.is_empty(), "{problems:?}");
}

/// A namespace's own window (`velero-jupyterhub backup`, or set by hand): open until its
/// time, or until the Backup it names is terminal; only for opted-in namespaces.
#[test]
fn manual_window_table() {
    struct Case {
        name: &'static str,
        until: &'static str,
        backup: Option<&'static str>,
        /// The named Backup's phase, if it exists.
        phase: Option<&'static str>,
        namespace: &'static str,
        open: bool,
        next_change: Option<&'static str>,
    }
    let now = "2026-11-28T10:00:00Z";
    let cases = [
        Case {
            name: "until later, no Backup yet: open, wakes at until",
            until: "2026-11-28T16:00:00Z",
            backup: None,
            phase: None,
            namespace: "jhub",
            open: true,
            next_change: Some("2026-11-28T16:00:00Z"),
        },
        Case {
            name: "its Backup in progress: open, the Backup is the current one",
            until: "2026-11-28T16:00:00Z",
            backup: Some("vjh-jhub-20261128095500"),
            phase: Some("InProgress"),
            namespace: "jhub",
            open: true,
            next_change: Some("2026-11-28T16:00:00Z"),
        },
        Case {
            name: "named Backup not created yet: open",
            until: "2026-11-28T16:00:00Z",
            backup: Some("vjh-jhub-20261128095500"),
            phase: None,
            namespace: "jhub",
            open: true,
            next_change: Some("2026-11-28T16:00:00Z"),
        },
        Case {
            name: "its Backup PartiallyFailed: closed",
            until: "2026-11-28T16:00:00Z",
            backup: Some("vjh-jhub-20261128095500"),
            phase: Some("PartiallyFailed"),
            namespace: "jhub",
            open: false,
            next_change: None,
        },
        Case {
            name: "until passed: closed",
            until: "2026-11-28T10:00:00Z",
            backup: None,
            phase: None,
            namespace: "jhub",
            open: false,
            next_change: None,
        },
        Case {
            name: "a namespace that has not opted in: nothing",
            until: "2026-11-28T16:00:00Z",
            backup: None,
            phase: None,
            namespace: "elsewhere",
            open: false,
            next_change: None,
        },
    ];
    for case in cases {
        let annotations = BTreeMap::from_iter(
            [
                (names::NAMESPACE_WINDOW_UNTIL, Some(case.until)),
                (names::NAMESPACE_WINDOW_BACKUP, case.backup),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
        let manual = ManualWindow::read(case.namespace, Some(&annotations))
            .expect("valid")
            .expect("a window");
        let backups: Vec<BackupView<'_>> = case
            .phase
            .map(|phase| BackupView {
                name: case.backup.expect("named"),
                created: ts("2026-11-28T09:55:00Z"),
                schedule: None,
                phase: Some(phase),
            })
            .into_iter()
            .collect();
        let got = windows(
            ["jhub"],
            &[],
            &[manual],
            &backups,
            &helper::own_labels(None),
            ts(now),
            OPTIONS,
        );
        let window = got.open.get("jhub");
        assert_eq!(window.is_some(), case.open, "{}: open", case.name);
        if let Some(w) = window {
            let want: Vec<&str> = case.backup.into_iter().collect();
            assert_eq!(w.backups, want, "{}: backups", case.name);
            assert!(w.labels.is_empty(), "{}: no Schedule labels", case.name);
        }
        assert_eq!(got.next_change, case.next_change.map(ts), "{}", case.name);
    }
}

#[test]
fn a_manual_window_that_cannot_be_read_says_why() {
    let bad = BTreeMap::from([(
        names::NAMESPACE_WINDOW_UNTIL.to_owned(),
        "tomorrow".to_owned(),
    )]);
    let err = ManualWindow::read("jhub", Some(&bad)).expect_err("not a time");
    assert!(
        err.contains("RFC 3339") && err.contains("tomorrow"),
        "{err}"
    );
    assert_eq!(ManualWindow::read("jhub", None), Ok(None));
    let other = BTreeMap::from([(names::NAMESPACE_WINDOW_BACKUP.to_owned(), "b".to_owned())]);
    assert_eq!(
        ManualWindow::read("jhub", Some(&other)),
        Ok(None),
        "a Backup without a time opens nothing"
    );
}

/// The tick's Backup is found whatever time zone Velero's server formats its name in
/// (pkg/apis/velero/v1/schedule_types.go `TimestampedName`: Go's local time).
#[test]
fn the_ticks_backup_is_found_in_any_time_zone() {
    let at = ts("2026-11-28T03:00:12Z");
    let cases = [
        ("daily-20261128030012", true, "UTC"),
        ("daily-20261128040012", true, "Europe/Berlin (+01:00)"),
        ("daily-20261128084512", true, "Asia/Kathmandu (+05:45)"),
        ("daily-20261128170012", true, "Pacific/Kiritimati (+14:00)"),
        ("daily-20261127150012", true, "Etc/GMT+12 (-12:00)"),
        ("daily-20261128030712", false, "seven minutes off: no zone"),
        (
            "daily-20261128030013",
            false,
            "another second: another Backup",
        ),
        ("daily-20261128180012", false, "fifteen hours off: no zone"),
        ("daily-x-20261128030012", false, "Schedule daily-x's"),
        ("daily-2026112803001", false, "thirteen digits"),
        ("daily-20261328030012", false, "month 13"),
        ("nightly-20261128030012", false, "another Schedule's"),
    ];
    for (name, want, why) in cases {
        assert_eq!(is_tick_backup("daily", at, name), want, "{name}: {why}");
    }
}

/// A Schedule whose hooks would run in the helpers (no selector) is named, with the
/// namespaces and the hooks that make Velero skip the helpers' volumes (a `pre` hook with
/// `onError: Fail`); one whose hooks select user servers only is not. Both are still
/// served: their windows open as usual.
#[test]
fn hooks_that_would_fail_in_helpers_are_named() {
    let hook = |selector: Value| {
        schedule_spec(|s| {
            s["template"]["hooks"] = json!({"resources": [{
                "name": "fsfreeze",
                "labelSelector": selector,
                "pre": [{"exec": {"container": "notebook", "command": ["/sbin/fsfreeze", "--freeze", "/home/jovyan"], "onError": "Fail"}}],
                "post": [{"exec": {"container": "notebook", "command": ["/sbin/fsfreeze", "--unfreeze", "/home/jovyan"]}}]
            }]})
        })
    };
    let everywhere = hook(Value::Null);
    let servers_only = hook(json!({"matchLabels": {"component": "singleuser-server"}}));
    let none = status(None, None);
    let schedules = [("daily", &everywhere), ("servers", &servers_only)];
    let views: Vec<ScheduleView<'_>> = schedules
        .iter()
        .map(|(name, spec)| ScheduleView {
            name,
            created: ts(CREATED),
            spec,
            status: Some(&none),
        })
        .collect();
    let got = windows(
        ["jhub", "sandbox"],
        &views,
        &[],
        &[],
        &helper::own_labels(None),
        ts("2026-11-28T02:55:00Z"),
        OPTIONS,
    );
    assert_eq!(got.hooks_in_helpers.len(), 1, "{:?}", got.hooks_in_helpers);
    let (name, warning) = &got.hooks_in_helpers[0];
    assert_eq!(name, "daily");
    assert_eq!(warning.hooks, ["fsfreeze"]);
    assert_eq!(
        warning.namespaces,
        ["jhub"],
        "the Schedule includes jhub only"
    );
    assert_eq!(warning.skipping, ["fsfreeze"]);
    let said = warning.to_string();
    assert!(
        said.contains("Backups end PartiallyFailed")
            && said.contains("skip the helpers' volumes")
            && said.contains("NotIn [velero-jupyterhub]"),
        "{said}"
    );
    assert!(got.problems.is_empty(), "{:?}", got.problems);
    assert_eq!(
        got.open.get("jhub").map(|w| w.schedules.clone()),
        Some(vec!["daily".to_owned(), "servers".to_owned()])
    );
}

/// An hourly Schedule's ticks share their seconds, so the previous tick's Backup has a
/// name that fits this tick in some time zone: the tick's Backup is the one made at the
/// tick (not before it, but for clock skew), the closest one if several.
#[test]
fn the_previous_ticks_backup_is_not_this_ticks() {
    let at = ts("2026-12-08T10:00:37Z");
    // Velero in Kathmandu (+05:45): this tick's name, and the 09:00:37 tick's.
    let this = ("homes-20261208154537", ts("2026-12-08T10:00:37Z"));
    let previous = ("homes-20261208144537", ts("2026-12-08T09:00:37Z"));
    assert!(
        is_tick_backup("homes", at, previous.0),
        "the name alone fits"
    );
    assert_eq!(
        tick_backup("homes", at, [previous]),
        None,
        "made an hour before"
    );
    assert_eq!(tick_backup("homes", at, [previous, this]), Some(this.0));
    assert_eq!(tick_backup("homes", at, [this, previous]), Some(this.0));
    // Velero's clock a minute ahead of the API server's: still this tick's.
    let skewed = ("homes-20261208154537", ts("2026-12-08T09:59:40Z"));
    assert_eq!(tick_backup("homes", at, [previous, skewed]), Some(skewed.0));
    // A window awaiting this tick's Backup is not closed by the previous one.
    let spec = schedule_spec(|s| s["schedule"] = "@hourly".into());
    let st = status(Some("2026-12-08T10:00:37Z"), None);
    let views = [ScheduleView {
        name: "homes",
        created: ts(CREATED),
        spec: &spec,
        status: Some(&st),
    }];
    let backups = [BackupView {
        name: previous.0,
        created: previous.1,
        schedule: Some("homes"),
        phase: Some("Completed"),
    }];
    let got = windows(
        ["jhub"],
        &views,
        &[],
        &backups,
        &helper::own_labels(None),
        ts("2026-12-08T10:00:40Z"),
        OPTIONS,
    );
    assert_eq!(
        got.open.get("jhub").map(|w| w.backups.clone()),
        Some(vec!["homes-20261208100037".to_owned()]),
        "this tick's Backup is awaited"
    );
}
