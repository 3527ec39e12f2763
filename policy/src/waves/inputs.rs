//! A run's inputs read from the cluster's objects: the Schedule's wave helpers among our
//! pods (and the claims other pods of ours hold), its wave Backups read back into
//! records, and the idle claims that are candidates for its next wave.

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;

use super::{HelperPhase, RunHelper, WaveBackup, WaveHelper, WaveRecord, read_claims};
use crate::PodFacts;
use crate::names;
use crate::plan::is_wave_helper;
use crate::record::PodRecord;
use crate::velero::backup_is_terminal;

/// What a Schedule's run knows of our pods.
#[derive(Debug, Default)]
pub struct OurPods<'a> {
    /// The run's wave helpers (not being deleted), each with its pod.
    pub helpers: Vec<(RunHelper<'a>, &'a PodRecord)>,
    /// Claims another helper of ours holds (a window's, another Schedule's).
    pub held: HashSet<(&'a str, &'a str)>,
    /// One of the run's helpers is being deleted (its volume still attached).
    pub terminating: bool,
}

/// Our pods as `schedule`'s run reads them (`schedule_label`: the Schedule's name as a
/// label value). A helper's wave labels that do not parse read as wave 0 of tick 0 (an
/// earlier run's: it goes); its creation time, if missing, as `now`.
pub fn our_pods<'a>(
    pods: impl IntoIterator<Item = &'a PodRecord>,
    schedule_label: &str,
    now: Timestamp,
) -> OurPods<'a> {
    let mut out = OurPods::default();
    for p in pods
        .into_iter()
        .filter(|p| p.label(names::MANAGED_BY) == Some(names::MANAGED_BY_US))
    {
        let Some(claim) = p.volumes().find_map(|(_, c)| c) else {
            continue;
        };
        let mine = is_wave_helper(p) && p.own_label(names::WAVE_SCHEDULE) == Some(schedule_label);
        if p.metadata.deletion_timestamp.is_some() {
            out.terminating |= mine;
            continue;
        }
        if !mine {
            out.held.insert((p.namespace(), claim));
            continue;
        }
        let phase = match p.phase() {
            Some("Running") => HelperPhase::Running,
            Some("Succeeded" | "Failed") => HelperPhase::Gone,
            _ => HelperPhase::Pending,
        };
        out.helpers.push((
            RunHelper {
                namespace: p.namespace(),
                claim,
                tick: p
                    .own_label(names::WAVE_TICK)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
                number: p
                    .own_label(names::WAVE_NUMBER)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
                helper: WaveHelper {
                    phase,
                    created: p.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0),
                },
            },
            p,
        ));
    }
    out
}

/// A Backup as the wave records read it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupFacts<'a> {
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub phase: Option<&'a str>,
    /// `status.completionTimestamp`.
    pub completed: Option<Timestamp>,
}

/// The wave Backups of `schedule`'s run after `tick`, read back into records: labelled
/// with the Schedule and the tick, numbered, with the claims they were made for. One
/// whose number does not parse is not a wave of this run.
pub fn wave_records<'a>(
    backups: &[BackupFacts<'a>],
    schedule_label: &str,
    tick: Timestamp,
) -> Vec<WaveRecord<'a>> {
    let tick_label = tick.as_second().to_string();
    backups
        .iter()
        .filter_map(|b| {
            let label = |key: &str| b.labels?.get(key).map(String::as_str);
            if label(names::WAVE_SCHEDULE) != Some(schedule_label)
                || label(names::WAVE_TICK) != Some(tick_label.as_str())
            {
                return None;
            }
            let number = label(names::WAVE_NUMBER)?.parse().ok()?;
            let backup = if backup_is_terminal(b.phase) {
                WaveBackup::Done(b.phase == Some("Completed"))
            } else {
                WaveBackup::Running
            };
            let list = |key: &str| {
                b.annotations
                    .and_then(|a| a.get(key))
                    .map(|v| read_claims(v))
                    .unwrap_or_default()
            };
            Some(WaveRecord {
                number,
                backup,
                finished: b.completed,
                claims: list(names::WAVE_CLAIMS),
                given_up: list(names::WAVE_GIVEN_UP),
            })
        })
        .collect()
}

/// A user claim of an opted-in namespace, as candidate selection reads it.
#[derive(Clone, Copy, Debug)]
pub struct ClaimFacts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub created: Option<Timestamp>,
}

/// Claims a run must leave alone, whatever else it finds.
#[derive(Debug)]
pub struct NotForWaves<'a> {
    /// Mounted by a pod that is not ours: a user's server.
    pub live: &'a HashSet<(&'a str, &'a str)>,
    /// Held by another helper of ours.
    pub held: &'a HashSet<(&'a str, &'a str)>,
    /// Being restored: Velero may re-create a pod for it.
    pub restoring: &'a HashSet<(&'a str, &'a str)>,
    /// Getting a window helper this pass.
    pub creating: &'a HashSet<(&'a str, &'a str)>,
    /// Copied without a pod by the run's Schedule (`datapath::without_pod`).
    pub without_pod: &'a HashSet<(&'a str, &'a str)>,
}

/// The claims a run after `tick` may put in a wave: in a namespace the Schedule covers,
/// made before the tick (later ones are the next tick's), and none of `not`.
pub fn candidates<'a>(
    claims: impl IntoIterator<Item = ClaimFacts<'a>>,
    covered: &[&str],
    tick: Timestamp,
    not: &NotForWaves<'_>,
) -> Vec<(&'a str, &'a str)> {
    claims
        .into_iter()
        .filter(|c| {
            let key = (c.namespace, c.name);
            c.created.is_none_or(|t| t < tick)
                && covered.contains(&c.namespace)
                && !not.live.contains(&key)
                && !not.held.contains(&key)
                && !not.restoring.contains(&key)
                && !not.creating.contains(&key)
                && !not.without_pod.contains(&key)
        })
        .map(|c| (c.namespace, c.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(
        name: &str,
        labels: Value,
        claim: Option<&str>,
        phase: &str,
        deleting: bool,
    ) -> PodRecord {
        let volumes = claim.map_or(
            json!([]),
            |c| json!([{"name": "home", "persistentVolumeClaim": {"claimName": c}}]),
        );
        let mut meta = json!({"name": name, "namespace": "jhub", "uid": format!("uid-{name}"),
            "labels": labels, "creationTimestamp": "2026-12-07T03:00:00Z"});
        if deleting {
            meta["deletionTimestamp"] = "2026-12-07T03:10:00Z".into();
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"volumes": volumes, "containers": [{"name": "c", "volumeMounts": [{"name": "home", "mountPath": "/h"}]}]},
            "status": {"phase": phase},
        }))
        .expect("a pod")
    }

    fn ours(component: &str, wave: Option<(&str, &str, &str)>) -> Value {
        let mut l =
            json!({(names::MANAGED_BY): names::MANAGED_BY_US, (names::COMPONENT): component});
        if let Some((schedule, tick, number)) = wave {
            l[names::WAVE_SCHEDULE] = schedule.into();
            l[names::WAVE_TICK] = tick.into();
            l[names::WAVE_NUMBER] = number.into();
        }
        l
    }

    #[test]
    fn our_pods_as_a_schedules_run_reads_them() {
        let now: Timestamp = "2026-12-07T04:00:00Z".parse().unwrap();
        let helper = names::BACKUP_HELPER;
        let pods = [
            pod(
                "w-a",
                ours(helper, Some(("homes", "1765076400", "2"))),
                Some("claim-a"),
                "Running",
                false,
            ),
            pod(
                "w-b",
                ours(helper, Some(("homes", "1765076400", "two"))),
                Some("claim-b"),
                "Pending",
                false,
            ),
            pod(
                "w-c",
                ours(helper, Some(("homes", "1765076400", "1"))),
                Some("claim-c"),
                "Failed",
                false,
            ),
            pod(
                "w-gone",
                ours(helper, Some(("homes", "1765076400", "1"))),
                Some("claim-d"),
                "Running",
                true,
            ),
            pod(
                "other",
                ours(helper, Some(("scratch", "1765076400", "1"))),
                Some("claim-e"),
                "Running",
                false,
            ),
            pod(
                "window",
                ours(helper, None),
                Some("claim-f"),
                "Running",
                false,
            ),
            pod(
                "restore",
                ours("restore-helper", None),
                Some("claim-g"),
                "Pending",
                false,
            ),
            pod(
                "empty",
                ours(helper, Some(("homes", "1765076400", "3"))),
                None,
                "Running",
                false,
            ),
            pod(
                "jupyter-h",
                json!({"component": "singleuser-server"}),
                Some("claim-h"),
                "Running",
                false,
            ),
        ];
        let read = our_pods(pods.iter(), "homes", now);
        let got: Vec<(&str, i64, u32, HelperPhase)> = read
            .helpers
            .iter()
            .map(|(h, _)| (h.claim, h.tick, h.number, h.helper.phase))
            .collect();
        assert_eq!(
            got,
            [
                ("claim-a", 1765076400, 2, HelperPhase::Running),
                ("claim-b", 1765076400, 0, HelperPhase::Pending),
                ("claim-c", 1765076400, 1, HelperPhase::Gone),
            ],
            "the run's helpers, a number that does not parse read as 0"
        );
        let mut held: Vec<&str> = read.held.iter().map(|(_, c)| *c).collect();
        held.sort();
        assert_eq!(
            held,
            ["claim-e", "claim-f", "claim-g"],
            "held by our other pods; a user's pod is not ours (it makes a claim live, not held)"
        );
        assert!(read.terminating, "w-gone is being deleted");
        assert!(!our_pods(pods[..3].iter(), "homes", now).terminating);
    }

    #[test]
    fn wave_records_read_back_from_a_runs_backups() {
        let tick: Timestamp = "2026-12-07T03:00:00Z".parse().unwrap();
        let t = tick.as_second().to_string();
        let labels = |schedule: &str, tick: &str, number: Option<&str>| {
            let mut l = BTreeMap::from([
                (names::WAVE_SCHEDULE.to_owned(), schedule.to_owned()),
                (names::WAVE_TICK.to_owned(), tick.to_owned()),
            ]);
            if let Some(n) = number {
                l.insert(names::WAVE_NUMBER.to_owned(), n.to_owned());
            }
            l
        };
        let claims = BTreeMap::from([
            (
                names::WAVE_CLAIMS.to_owned(),
                "jhub/claim-a, jhub/claim-b,nonsense".to_owned(),
            ),
            (names::WAVE_GIVEN_UP.to_owned(), "jhub/claim-c".to_owned()),
        ]);
        let done: Timestamp = "2026-12-07T03:30:00Z".parse().unwrap();
        let ls = [
            labels("homes", &t, Some("1")),
            labels("homes", &t, Some("2")),
            labels("homes", &t, Some("3")),
            labels("homes", "1", Some("1")),
            labels("scratch", &t, Some("1")),
            labels("homes", &t, None),
            labels("homes", &t, Some("x")),
        ];
        let facts = |i: usize, phase: Option<&'static str>| BackupFacts {
            labels: Some(&ls[i]),
            annotations: (i == 0).then_some(&claims),
            phase,
            completed: phase.filter(|p| *p != "InProgress").map(|_| done),
        };
        let backups = [
            facts(0, Some("Completed")),
            facts(1, Some("InProgress")),
            facts(2, Some("PartiallyFailed")),
            facts(3, Some("Completed")),
            facts(4, Some("Completed")),
            facts(5, Some("Completed")),
            facts(6, Some("Completed")),
            BackupFacts::default(),
        ];
        let records = wave_records(&backups, "homes", tick);
        let got: Vec<(u32, WaveBackup, Option<Timestamp>)> = records
            .iter()
            .map(|r| (r.number, r.backup, r.finished))
            .collect();
        assert_eq!(
            got,
            [
                (1, WaveBackup::Done(true), Some(done)),
                (2, WaveBackup::Running, None),
                (3, WaveBackup::Done(false), Some(done)),
            ],
            "another tick's, another Schedule's, and unnumbered ones are not this run's"
        );
        assert_eq!(
            records[0].claims,
            [("jhub", "claim-a"), ("jhub", "claim-b")]
        );
        assert_eq!(records[0].given_up, [("jhub", "claim-c")]);
        assert!(records[1].claims.is_empty());
    }

    #[test]
    fn candidates_are_idle_claims_of_covered_namespaces_from_before_the_tick() {
        let tick: Timestamp = "2026-12-07T03:00:00Z".parse().unwrap();
        let before = Some("2026-12-01T00:00:00Z".parse().unwrap());
        let after = Some("2026-12-07T03:00:01Z".parse().unwrap());
        let claim = |namespace, name, created| ClaimFacts {
            namespace,
            name,
            created,
        };
        let claims = [
            claim("jhub", "claim-idle", before),
            claim("jhub", "claim-no-time", None),
            claim("jhub", "claim-new", after),
            claim("other", "claim-elsewhere", before),
            claim("jhub", "claim-live", before),
            claim("jhub", "claim-held", before),
            claim("jhub", "claim-restoring", before),
            claim("jhub", "claim-window", before),
            claim("jhub", "claim-data-mover", before),
        ];
        let set = |c: &'static str| HashSet::from([("jhub", c)]);
        let (live, held, restoring, creating, without_pod) = (
            set("claim-live"),
            set("claim-held"),
            set("claim-restoring"),
            set("claim-window"),
            set("claim-data-mover"),
        );
        let not = NotForWaves {
            live: &live,
            held: &held,
            restoring: &restoring,
            creating: &creating,
            without_pod: &without_pod,
        };
        assert_eq!(
            candidates(claims, &["jhub"], tick, &not),
            [("jhub", "claim-idle"), ("jhub", "claim-no-time")]
        );
    }
}
