//! Idle users at scale against the real API server and the real scheduler: a
//! night in miniature. 60 idle claims on CSI volumes, 3 nodes whose CSINodes allow 5
//! attachments each, one of them kept free by the helpers. The test plays the kubelet (helpers Running once bound; one never
//! starts) and Velero: its schedule controller (pkg/controller/schedule_controller.go:
//! `<schedule>-<timestamp>` labelled `velero.io/schedule-name`, `status.lastBackup`) and
//! its file-system backup (pkg/podvolume/backupper.go: a PodVolumeBackup per volume named
//! in `backup.velero.io/backup-volumes` of each Running pod the Backup selects, labelled
//! `velero.io/backup-name`, annotated `velero.io/pvc-name`), each Backup taking a second.
//! The limits are asserted from a watch of the pods, not from the controller's counters.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::SignedDuration;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::core::DynamicObject;
use serde_json::{Value, json};
use testkit::cluster::{self, eventually, from_json};
use testkit::controller::{Setup, dynamic, restricted_user_pod, velero_creates_backup};
use testkit::night::{self, Play, Seen, claim_of, label, phase};
use velero_jupyterhub::metrics::sample;
use velero_jupyterhub::names;

const DRIVER: &str = "csi.vjh.test";
/// Each node's CSINode allows 5 attachments; helpers leave one free (the default
/// headroom, for a user's server): 4 helpers a node.
const ATTACH: usize = 5;
const PER_NODE: usize = ATTACH - 1;
const CLAIMS: usize = 60;

#[tokio::test]
async fn a_night_of_waves_backs_up_every_idle_claim_within_the_limits() {
    let mut setup = Setup::configured(Duration::from_secs(4), |c| {
        c.helper_start_timeout = SignedDuration::from_secs(8);
    })
    .await;
    setup.replica("replica-b");
    setup.add_node().await;
    setup.csinodes(DRIVER, ATTACH).await;
    let claims: Vec<String> = (0..CLAIMS).map(|i| format!("claim-u{i:02}")).collect();
    setup
        .csi_claims(&claims, DRIVER, Duration::from_secs(300))
        .await;

    // The limits, from a watch of the helpers.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watching = tokio::spawn(night::watch_limits(setup.pods(), seen.clone()));
    // The kubelet and Velero.
    let stuck = "claim-u15";
    let played = tokio::spawn(night::play_kubelet_and_velero(
        setup.client.clone(),
        setup.users.clone(),
        setup.velero.clone(),
        Play {
            stuck: Some(stuck.to_owned()),
            failing: Some("-wave2-".to_owned()),
            backup_takes: Duration::from_secs(1),
        },
    ));

    // The window before the tick: as many helpers as fit (3 nodes x 4 attachments free), the
    // never-backed-up claims by name.
    let tick = setup.schedule("homes").await;
    let window = eventually(Duration::from_secs(60), || async {
        let hs = setup.helpers().await;
        let running = hs.iter().filter(|h| phase(h) == "Running").count();
        (hs.len() == 12 && running == 12).then_some(hs)
    })
    .await;
    let Some(window) = window else {
        let hs = setup.helpers().await;
        let states: Vec<String> = hs
            .iter()
            .map(|h| {
                format!(
                    "{} {} {:?}",
                    claim_of(h),
                    phase(h),
                    h.spec.as_ref().and_then(|s| s.node_name.clone())
                )
            })
            .collect();
        panic!("12 window helpers, Running: {states:#?}");
    };
    let window_claims: BTreeSet<String> = window.iter().map(claim_of).collect();
    assert_eq!(window_claims, claims[..12].iter().cloned().collect());
    let own = velero_creates_backup(&setup, "homes", tick, "InProgress").await;

    // The run: waves until every claim is reached or tried. A user starts in wave 3;
    // the leader is stopped in wave 4.
    let mut user_claim = None;
    // When the user's pod was made, and when their helper was seen gone.
    let mut user_started: Option<std::time::Instant> = None;
    let mut user_waited: Option<Duration> = None;
    let mut stopped = false;
    let mut finished = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while finished.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let hs = setup.helpers().await;
        let in_wave = |n: &str| {
            hs.iter()
                .find(|h| label(h, names::WAVE_NUMBER).as_deref() == Some(n))
        };
        if user_claim.is_none()
            && let Some(h) = in_wave("3")
        {
            let claim = claim_of(h);
            let user = claim.trim_start_matches("claim-").to_owned();
            let mut pod = serde_json::to_value(restricted_user_pod(&user)).expect("json");
            pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = claim.clone().into();
            setup.start_server(&from_json(pod)).await;
            user_claim = Some(claim);
            user_started = Some(std::time::Instant::now());
        }
        if let (Some(claim), Some(at), None) = (&user_claim, user_started, user_waited)
            && !hs.iter().any(|h| claim_of(h) == *claim)
        {
            user_waited = Some(at.elapsed());
        }
        if !stopped
            && hs.iter().any(|h| {
                label(h, names::WAVE_NUMBER)
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n >= 4)
            })
            && let Some(leader) = setup.controllers.iter().position(|r| r.leads())
        {
            setup.controllers[leader].stop.cancel();
            stopped = true;
        }
        let text: String = setup
            .controllers
            .iter()
            .map(|r| r.metrics.encode())
            .collect();
        let waves = sample(&text, "velero_jupyterhub_run_waves{schedule=\"homes\"}");
        let not_reached = sample(
            &text,
            "velero_jupyterhub_run_claims_not_reached{schedule=\"homes\"}",
        );
        if let (Some(waves), Some(not_reached)) = (waves, not_reached)
            && waves > 0.0
        {
            finished = Some((waves, not_reached));
        }
    }
    let backups = dynamic(&setup, "Backup", "backups")
        .list(&ListParams::default())
        .await
        .expect("backups")
        .items;
    let waves: Vec<&DynamicObject> = backups
        .iter()
        .filter(|b| {
            b.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(names::WAVE_NUMBER))
        })
        .collect();
    let summary: Vec<String> = waves
        .iter()
        .map(|b| {
            format!(
                "{} {} {:?}",
                b.metadata.name.as_deref().unwrap_or_default(),
                b.data["status"]["phase"],
                annotation(b, names::WAVE_CLAIMS)
            )
        })
        .collect();
    let (wave_count, not_reached) =
        finished.unwrap_or_else(|| panic!("the run did not finish: {summary:#?}"));
    assert!(
        stopped,
        "the leader was stopped from wave 4 on: {summary:#?}"
    );
    let user_claim = user_claim.expect("a user started in wave 3");
    let waited = user_waited.expect("the user's helper went");
    println!("a user starting mid-wave: their helper gone {waited:?} later (as polled)");
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // Every wave is a Backup of the Schedule narrowed to its helpers, and not labelled as
    // the Schedule's (Velero would skip its next tick while one runs).
    for b in &waves {
        let labels = b.metadata.labels.clone().unwrap_or_default();
        assert!(
            !labels.contains_key(names::VELERO_SCHEDULE_NAME),
            "{summary:#?}"
        );
        assert_eq!(b.data["spec"]["includedNamespaces"], json!([setup.users]));
        assert_eq!(
            b.data["spec"]["labelSelector"]["matchLabels"][names::WAVE_NUMBER],
            json!(labels[names::WAVE_NUMBER])
        );
    }
    // Numbers 1..=n, each once: no duplicate wave across the failover.
    let mut numbers: Vec<u32> = waves
        .iter()
        .filter_map(|b| {
            b.metadata
                .labels
                .as_ref()?
                .get(names::WAVE_NUMBER)?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u32).collect::<Vec<_>>(),
        "{summary:#?}"
    );
    assert_eq!(wave_count as usize, numbers.len());
    // Each claim in at most one wave, but the one given up (tried again).
    let mut times: BTreeMap<String, usize> = BTreeMap::new();
    for b in &waves {
        for c in annotation(b, names::WAVE_CLAIMS)
            .split(',')
            .filter(|c| !c.is_empty())
        {
            *times
                .entry(c.rsplit('/').next().unwrap_or(c).to_owned())
                .or_default() += 1;
        }
    }
    assert!(times.values().all(|&n| n == 1), "{times:?}");
    let given_up: Vec<String> = waves
        .iter()
        .flat_map(|b| {
            annotation(b, names::WAVE_GIVEN_UP)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        given_up,
        [format!("{}/{stuck}", setup.users)],
        "{summary:#?}"
    );
    assert!(
        times.contains_key(stuck),
        "the claim given up is tried again: {summary:#?}"
    );
    // Wave 2 failed: its claims are not reached tonight, and only they (and the user's,
    // now live) are missing.
    let failed: BTreeSet<String> = waves
        .iter()
        .filter(|b| b.data["status"]["phase"] == "Failed")
        .flat_map(|b| {
            annotation(b, names::WAVE_CLAIMS)
                .split(',')
                .map(|c| c.rsplit('/').next().unwrap_or(c).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(failed.len(), 12, "{summary:#?}");
    assert_eq!(not_reached as usize, failed.len(), "{summary:#?}");
    let backed_up = backed_up_claims(&setup).await;
    for c in &claims {
        // The user's claim is in the wave's Backup if Velero reached their helper before
        // it went, else in the Schedule's next one (their server is annotated).
        if *c != user_claim {
            assert_eq!(
                backed_up.contains(c),
                !failed.contains(c),
                "{c}: {summary:#?}"
            );
        }
    }
    {
        let seen = seen.lock().expect("seen");
        println!(
            "{} waves; at most {} helpers on a node, {} at once",
            numbers.len(),
            seen.max_on_node,
            seen.max_total
        );
        assert!(
            seen.max_on_node <= PER_NODE,
            "a node held {} helpers: its last attachment was not left free",
            seen.max_on_node
        );
        assert_eq!(
            seen.max_on_node, PER_NODE,
            "the waves filled the nodes up to the headroom"
        );
        assert!(seen.max_total <= PER_NODE * 3);
    }

    // `status` shows each claim's last backup whichever Backup took it; `restore
    // --latest` finds it.
    let wave1 = waves
        .iter()
        .find(|b| {
            b.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::WAVE_NUMBER))
                .map(String::as_str)
                == Some("1")
        })
        .and_then(|b| b.metadata.name.clone())
        .expect("wave 1");
    let in_wave1 = annotation(
        waves
            .iter()
            .find(|b| b.metadata.name.as_deref() == Some(&wave1))
            .expect("wave 1"),
        names::WAVE_CLAIMS,
    );
    let wave1_claim = in_wave1
        .split(',')
        .next()
        .and_then(|c| c.rsplit('/').next())
        .expect("a claim")
        .to_owned();
    let rows = velero_jupyterhub::commands::status::run(
        setup.client.clone(),
        &velero_jupyterhub::commands::status::Options {
            namespace: Some(setup.users.clone()),
            velero_namespace: setup.velero.clone(),
            stale_after: Duration::from_secs(3600),
            default_claims: setup.config.default_claims.clone(),
        },
    )
    .await
    .expect("status");
    let last_of = |claim: &str| {
        rows.iter()
            .find(|r| r.claim == claim)
            .and_then(|r| r.last.as_ref())
            .map(|l| l.backup.clone())
    };
    assert_eq!(
        last_of("claim-u00"),
        Some(own.clone()),
        "the window's claims: the Schedule's own Backup"
    );
    assert_eq!(last_of(&wave1_claim), Some(wave1.clone()));
    let failed_claim = failed.iter().next().expect("a failed claim").clone();
    assert_eq!(last_of(&failed_claim), None, "a failed wave is no backup");
    let latest = |users: &[&str]| {
        let options = velero_jupyterhub::commands::restore::Options {
            namespace: setup.users.clone(),
            velero_namespace: setup.velero.clone(),
            backup: String::new(),
            latest: true,
            schedule: None,
            at: None,
            users: users.iter().map(|u| (*u).to_owned()).collect(),
            wait: false,
            into_existing: false,
            timeout: Duration::from_secs(60),
            default_claims: setup.config.default_claims.clone(),
            poll: Duration::from_secs(1),
        };
        let client = setup.client.clone();
        async move {
            velero_jupyterhub::commands::restore::latest_backup(&client, &options)
                .await
                .map_err(|e| format!("{e:#}"))
        }
    };
    let user_of = |claim: &str| claim.trim_start_matches("claim-").to_owned();
    assert_eq!(latest(&["u00"]).await, Ok(own.clone()));
    assert_eq!(latest(&[&user_of(&wave1_claim)]).await, Ok(wave1.clone()));
    let both = latest(&["u00", &user_of(&wave1_claim)])
        .await
        .expect_err("two Backups");
    assert!(both.contains("different Backups"), "{both}");
    let none = latest(&[&user_of(&failed_claim)])
        .await
        .expect_err("no backup");
    assert!(
        none.contains("no Completed or PartiallyFailed Backup"),
        "{none}"
    );

    // `restore --from-schedule` finds the tick's waves by the label each carries (the
    // Schedule's Backup it follows); one of them failed, so it refuses, naming it.
    for w in &waves {
        assert_eq!(
            w.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::WAVE_OF)),
            Some(&own),
            "{:?}",
            w.metadata.name
        );
    }
    let options = velero_jupyterhub::commands::restore::Options {
        namespace: setup.users.clone(),
        velero_namespace: setup.velero.clone(),
        backup: String::new(),
        latest: false,
        schedule: Some("homes".to_owned()),
        at: None,
        users: vec![],
        wait: false,
        into_existing: false,
        timeout: Duration::from_secs(60),
        default_claims: setup.config.default_claims.clone(),
        poll: Duration::from_secs(1),
    };
    let refused = velero_jupyterhub::commands::restore::tick_of(&setup.client, &options, "homes")
        .await
        .expect_err("a failed wave");
    let failed_wave = waves
        .iter()
        .filter(|b| b.data["status"]["phase"] == "Failed")
        .filter_map(|b| b.metadata.name.clone())
        .next()
        .expect("the failed wave");
    assert!(
        refused.to_string().contains(&failed_wave) && refused.to_string().contains(&own),
        "{refused}"
    );

    // The user stops their server (its pod held a slot and an attachment on its node);
    // the next run starts with the claims the failed wave missed.
    let user_pod = format!("jupyter-{}", user_claim.trim_start_matches("claim-"));
    setup
        .pods()
        .delete(
            &user_pod,
            &kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .expect("the user's server stopped");
    // Its tick is now (Velero names and dates a tick's Backup when it makes it); the
    // Schedule moved to the minute before, so its next tick is an hour away.
    let now = k8s_openapi::jiff::Timestamp::now();
    let minute = (now - SignedDuration::from_mins(1))
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
        .minute();
    dynamic(&setup, "Schedule", "schedules")
        .patch(
            "homes",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"schedule": format!("CRON_TZ=UTC {minute} * * * *")}}),
            ),
        )
        .await
        .expect("the Schedule's next tick an hour away");
    velero_creates_backup(&setup, "homes", now, "Completed").await;
    let first = eventually(Duration::from_secs(60), || async {
        let hs = setup.helpers().await;
        let next: BTreeSet<String> = hs
            .iter()
            .filter(|h| label(h, names::WAVE_NUMBER).as_deref() == Some("1"))
            .map(claim_of)
            .collect();
        (next.len() == 12).then_some(next)
    })
    .await
    .expect("wave 1 of the next run");
    assert_eq!(first, failed);

    // The Schedule deleted mid-run: its wave helpers go.
    dynamic(&setup, "Schedule", "schedules")
        .delete("homes", &Default::default())
        .await
        .expect("delete the Schedule");
    eventually(Duration::from_secs(30), || async {
        let hs = setup.helpers().await;
        hs.iter()
            .all(|h| label(h, names::WAVE_NUMBER).is_none())
            .then_some(())
    })
    .await
    .expect("the deleted Schedule's wave helpers deleted");

    played.abort();
    watching.abort();
    setup.finish().await;
}

/// The controller's service account may create wave Backups and nothing else in Velero
/// (controller-backups-policy.yaml): not one that takes Secrets along, not one labelled
/// as a Schedule's own.
#[tokio::test]
async fn the_controller_creates_only_wave_backups() {
    let client = cluster::client().await;
    if cluster::server_minor(&client).await < 30 {
        panic!(
            "needs ValidatingAdmissionPolicy v1 (Kubernetes 1.30+): run on the current test server"
        );
    }
    let setup = Setup::new().await;
    let api = Api::<DynamicObject>::namespaced_with(
        setup.as_controller.clone(),
        &setup.velero,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("velero.io", "v1", "Backup"),
            "backups",
        ),
    );
    let wave = |i: usize, edit: &dyn Fn(&mut Value)| {
        let mut b = json!({
            "apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": format!("homes-wave{i}-20261128030000"), "namespace": setup.velero,
                "labels": {"app.kubernetes.io/managed-by": "velero-jupyterhub",
                    (names::WAVE_SCHEDULE): "homes", (names::WAVE_TICK): "1795834800", (names::WAVE_NUMBER): "1"}},
            "spec": {"includedNamespaces": [setup.users],
                "includedResources": ["pods", "persistentvolumeclaims", "persistentvolumes"],
                "labelSelector": {"matchLabels": {(names::WAVE_SCHEDULE): "homes",
                    (names::WAVE_TICK): "1795834800", (names::WAVE_NUMBER): "1"}},
                "storageLocation": "default", "ttl": "720h0m0s"},
        });
        edit(&mut b);
        from_json::<DynamicObject>(b)
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, bool)> = vec![
        ("a wave Backup", Box::new(|_| {}), true),
        (
            "with Secrets",
            Box::new(|b| b["spec"]["includedResources"] = json!(["pods", "secrets"])),
            false,
        ),
        (
            "every resource",
            Box::new(|b| {
                b["spec"]
                    .as_object_mut()
                    .expect("spec")
                    .remove("includedResources");
            }),
            false,
        ),
        (
            "every namespace",
            Box::new(|b| b["spec"]["includedNamespaces"] = json!(["*"])),
            false,
        ),
        (
            "cluster resources",
            Box::new(|b| b["spec"]["includeClusterResources"] = json!(true)),
            false,
        ),
        (
            "another name",
            Box::new(|b| b["metadata"]["name"] = json!("nightly-copy")),
            false,
        ),
        (
            "as the Schedule's own",
            Box::new(|b| b["metadata"]["labels"][names::VELERO_SCHEDULE_NAME] = json!("homes")),
            false,
        ),
        (
            "selecting other pods",
            Box::new(|b| b["spec"]["labelSelector"] = json!({"matchLabels": {"app": "db"}})),
            false,
        ),
    ];
    for (i, (name, edit, allowed)) in cases.into_iter().enumerate() {
        let made = api.create(&PostParams::default(), &wave(i, &*edit)).await;
        assert_eq!(made.is_ok(), allowed, "{name}: {made:?}");
    }
    setup.finish().await;
}

fn annotation(b: &DynamicObject, key: &str) -> String {
    b.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

/// Claims with a Completed PodVolumeBackup in a Backup Velero restores from (Completed
/// or PartiallyFailed), as `status` counts them.
async fn backed_up_claims(setup: &Setup) -> HashSet<String> {
    let restorable: HashSet<String> = dynamic(setup, "Backup", "backups")
        .list(&ListParams::default())
        .await
        .expect("backups")
        .items
        .into_iter()
        .filter(|b| {
            matches!(
                b.data["status"]["phase"].as_str(),
                Some("Completed" | "PartiallyFailed")
            )
        })
        .filter_map(|b| b.metadata.name)
        .collect();
    dynamic(setup, "PodVolumeBackup", "podvolumebackups")
        .list(&ListParams::default())
        .await
        .expect("pvbs")
        .items
        .iter()
        .filter(|p| p.data["status"]["phase"] == "Completed")
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::VELERO_BACKUP_NAME))
                .is_some_and(|b| restorable.contains(b))
        })
        .filter_map(|p| {
            p.metadata
                .annotations
                .as_ref()?
                .get(names::VELERO_PVC_NAME)
                .cloned()
        })
        .collect()
}
