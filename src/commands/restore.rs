//! `velero-jupyterhub restore --namespace NS (--from-backup B | --latest) [--user NAME …] [--wait]`:
//! a Velero Restore of users' homes, with the checks that keep it from silently restoring
//! nothing or writing over current data (`policy::restore_report`), and a row per claim.
//!
//! It creates only the Restore. Velero re-creates the users' pods and claims; our webhook
//! makes the pods restore helpers; the node-agent fills the volumes; the controller
//! deletes the helpers when their PodVolumeRestores end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::backup::backup_name;
use super::report::{ClaimRow, claim_table, human_bytes};
use crate::cluster::velero::{Backup, PodVolumeBackup, PodVolumeRestore, Restore};
use crate::names;
use crate::policy::restore_report::{
    self, ClaimNow, ClaimOutcome, PodNow, PvbOfBackup, PvrOfRestore, Users,
};
use crate::policy::{ClaimGlobs, NamespacePolicy, velero};

/// While bytes keep coming, a progress line at least this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// What `restore`'s flags configure.
#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: String,
    pub velero_namespace: String,
    /// Empty with `latest`: found from the users' claims.
    pub backup: String,
    /// Restore from the newest Backup holding the users' claims.
    pub latest: bool,
    /// Restore from this Schedule's tick: its own Backup and the wave Backups of it.
    pub schedule: Option<String>,
    /// With `schedule`: the newest tick at or before this time (default: the newest).
    pub at: Option<Timestamp>,
    /// `hub.jupyter.org/username` values; empty: every user of the namespace.
    pub users: Vec<String>,
    /// Follow the Restore to its end and report each claim.
    pub wait: bool,
    /// Restore into claims that exist (the backup's files written over theirs).
    pub into_existing: bool,
    /// `--wait` gives up after this long.
    pub timeout: Duration,
    pub default_claims: std::sync::Arc<ClaimGlobs>,
    /// How often to look again while waiting.
    pub poll: Duration,
}

/// What a `--wait` run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Each Restore made (name, its Backup, its phase at the end): the wave Backups'
    /// first, the main Backup's last.
    pub restores: Vec<(String, String, String)>,
    pub rows: Vec<(String, ClaimOutcome)>,
}

impl Report {
    pub fn complete(&self) -> bool {
        !self.rows.is_empty()
            && self
                .rows
                .iter()
                .all(|(_, o)| matches!(o, ClaimOutcome::Restored { .. }))
    }

    /// The table `restore --wait` prints.
    pub fn table(&self) -> String {
        let mut out = claim_table(self.rows.iter().map(|(claim, outcome)| {
            let (result, bytes, detail) = match outcome {
                ClaimOutcome::Restored { bytes } => ("restored", *bytes, String::new()),
                ClaimOutcome::InProgress => ("in progress", None, String::new()),
                ClaimOutcome::Failed { reason } => ("NOT restored", None, reason.clone()),
            };
            ClaimRow {
                claim,
                result,
                bytes,
                detail,
            }
        }));
        let restored = self
            .rows
            .iter()
            .filter(|(_, o)| matches!(o, ClaimOutcome::Restored { .. }))
            .count();
        let (last, waves) = self
            .restores
            .split_last()
            .map_or((None, &[][..]), |(l, w)| (Some(l), w));
        for (restore, backup, phase) in waves {
            let _ = writeln!(out, "Restore {restore} (wave Backup {backup}) {phase}");
        }
        if let Some((restore, _, phase)) = last {
            let _ = writeln!(
                out,
                "Restore {restore} {phase}: {restored} of {} claims restored",
                self.rows.len()
            );
        }
        out
    }
}

pub enum Finished {
    Started { restores: Vec<String> },
    Done(Report),
}

pub async fn run(
    client: kube::Client,
    options: &Options,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Finished> {
    validate(options)?;
    let ns = &options.namespace;
    let vns = &options.velero_namespace;
    // The Backups to restore from: one, or a Schedule's tick (its own and its waves).
    let (main, waves) = if options.latest {
        let backup = latest_backup(&client, options).await?;
        let _ = writeln!(
            progress,
            "the newest Backup holding the users' claims: {backup}"
        );
        (backup, Vec::new())
    } else if let Some(schedule) = &options.schedule {
        let tick = tick_of(&client, options, schedule).await?;
        let _ = writeln!(
            progress,
            "Schedule {schedule}'s tick: Backup {}{}",
            tick.0,
            if tick.1.is_empty() {
                String::new()
            } else {
                format!(" and its wave Backups {}", tick.1.join(", "))
            }
        );
        tick
    } else {
        (options.backup.clone(), Vec::new())
    };
    let backups: Vec<String> = std::iter::once(main.clone())
        .chain(waves.iter().cloned())
        .collect();
    for name in &backups {
        let backup = Api::<Backup>::namespaced(client.clone(), vns)
            .get_opt(name)
            .await
            .with_context(|| format!("reading Backup {vns}/{name}"))?
            .with_context(|| format!("Backup {vns}/{name} does not exist"))?;
        if !backup.restorable() {
            let phase = backup
                .status
                .and_then(|s| s.phase)
                .unwrap_or_else(|| "New".to_owned());
            bail!(
                "Backup {name} is {phase}: only a Completed or PartiallyFailed Backup can be restored from"
            );
        }
    }
    // Room for the suffixes of a tick's Restores (`-w<N>`, `-ns`) within a label value
    // (Velero labels restored objects with the Restore's name).
    let base = backup_name(ns.get(..40).unwrap_or(ns), Timestamp::now());
    // A namespace that is gone (a disaster) comes back first, from the Backup, as it was
    // (its labels and annotations: the opt-in, the claim globs).
    let namespace = match Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .with_context(|| format!("reading namespace {ns}"))?
    {
        Some(namespace) => namespace,
        None => restore_namespace(&client, options, &main, &format!("{base}-ns"), progress).await?,
    };
    let policy = NamespacePolicy::read(
        namespace.metadata.labels.as_ref(),
        namespace.metadata.annotations.as_ref(),
        &options.default_claims,
    );
    if !policy.opted_in {
        bail!(
            "namespace {ns} has not opted in: label it {}=true first, or the restored pods would start as stale notebook servers instead of restore helpers",
            names::NAMESPACE_ENABLED
        );
    }
    webhook_converts(&client, ns).await?;

    let users = Users(options.users.clone());
    let pod_objects = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing pods in {ns}"))?
        .items;
    let claim_objects = list_claims(&client, ns).await?;
    let mut pvb_objects = Vec::new();
    for name in &backups {
        pvb_objects.push(list_pvbs(&client, vns, name).await?);
    }
    let pods: Vec<PodNow<'_>> = pod_objects.iter().map(pod_now).collect();
    let claims: Vec<ClaimNow<'_>> = claim_objects.iter().map(claim_now).collect();
    let pvbs: Vec<Vec<PvbOfBackup<'_>>> = pvb_objects.iter().map(|p| pvbs_of(p, ns)).collect();
    let all_pvbs: Vec<PvbOfBackup<'_>> = pvbs.iter().flatten().cloned().collect();
    let refusals =
        restore_report::preflight(&users, &pods, &claims, &all_pvbs, options.into_existing);
    if !refusals.is_empty() {
        let mut message = format!("not restoring into namespace {ns}:");
        for r in &refusals {
            let _ = write!(message, "\n  - {r}");
        }
        bail!(message);
    }

    // One Restore per Backup: the waves' first (their claims are theirs alone), then the
    // main Backup's once the waves' claims exist (Velero then leaves them be, instead of
    // re-creating them empty from the main Backup, which holds them without their data).
    let names: Vec<String> = std::iter::once(base.clone())
        .chain((1..=waves.len()).map(|n| format!("{base}-w{n}")))
        .collect();
    // The claims it writes, recorded on the namespace before any Restore exists: from
    // then on a ValidatingAdmissionPolicy refuses other pods that mount them (a user's
    // server spawned meanwhile), and the controller starts no backup helper for them.
    let written = restore_report::written_claims(&users, &claims, &all_pvbs);
    let written: Vec<String> = written.into_iter().map(str::to_owned).collect();
    record_restoring(&client, &namespace, &written, &names).await?;
    for ((name, backup), pvbs) in names.iter().zip(&backups).zip(&pvbs).skip(1) {
        create_restore(&client, options, backup, name).await?;
        let _ = writeln!(
            progress,
            "created Restore {vns}/{name} of wave Backup {backup} into namespace {ns}"
        );
        let theirs: Vec<&str> = restore_report::written_claims(&users, &claims, pvbs)
            .into_iter()
            .collect();
        claims_exist(&client, options, name, &theirs).await?;
    }
    create_restore(&client, options, &main, &base).await?;
    let _ = writeln!(
        progress,
        "created Restore {vns}/{base} of Backup {main} into namespace {ns}"
    );
    if !options.wait {
        let _ = writeln!(
            progress,
            "follow {} with `velero restore describe`, or run again with --wait",
            if names.len() > 1 { "them" } else { "it" }
        );
        return Ok(Finished::Started { restores: names });
    }
    // Followed in the order they were made: the waves', then the main Backup's.
    let order: Vec<usize> = (1..names.len()).chain([0]).collect();
    let mut followed = Vec::new();
    for &i in &order {
        followed.push((i, follow(&client, options, &names[i], progress).await?));
    }
    let claim_objects = list_claims(&client, ns).await?;
    let claims: Vec<ClaimNow<'_>> = claim_objects.iter().map(claim_now).collect();
    let mut parts: Vec<restore_report::RestoreOf<'_>> = followed
        .iter()
        .map(|(i, (phase, pvrs))| restore_report::RestoreOf {
            backup: &backups[*i],
            restore: &names[*i],
            phase: Some(phase.as_str()),
            pvbs: pvbs[*i].clone(),
            pvrs: pvrs.iter().map(pvr_of).collect(),
        })
        .collect();
    // The main Backup's first: a claim no Backup holds is reported against it.
    parts.rotate_right(1);
    let rows = restore_report::outcomes_of_many(&users, &claims, &parts);
    let restores = followed
        .iter()
        .map(|(i, (phase, _))| (names[*i].clone(), backups[*i].clone(), phase.clone()))
        .collect();
    Ok(Finished::Done(Report { restores, rows }))
}

/// `--from-schedule`: the tick's Backup and its waves (`policy::restore_report::schedule_tick`).
pub async fn tick_of(
    client: &kube::Client,
    o: &Options,
    schedule: &str,
) -> anyhow::Result<(String, Vec<String>)> {
    let backups = Api::<Backup>::namespaced(client.clone(), &o.velero_namespace)
        .list(&ListParams::default())
        .await
        .context("listing Backups")?
        .items;
    let views: Vec<restore_report::BackupOf<'_>> = backups
        .iter()
        .filter_map(|b| {
            let status = b.status.as_ref();
            Some(restore_report::BackupOf {
                name: b.metadata.name.as_deref()?,
                phase: status.and_then(|s| s.phase.as_deref()),
                started: status
                    .and_then(|s| s.start_timestamp.as_ref())
                    .or(b.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0),
                schedule: backup_label(b, names::VELERO_SCHEDULE_NAME),
                wave_of: backup_label(b, names::WAVE_OF),
                wave_schedule: backup_label(b, names::WAVE_SCHEDULE),
            })
        })
        .collect();
    let tick = restore_report::schedule_tick(schedule, o.at, &views).map_err(anyhow::Error::msg)?;
    if !tick.failed_waves.is_empty() {
        bail!(
            "wave Backups {} of Schedule {schedule}'s tick {} failed: their users' homes cannot come back from this tick (restore them from another with --at, one --user at a time from their newest Backup with --latest, or restore the rest with --user)",
            tick.failed_waves.join(", "),
            tick.backup
        );
    }
    Ok((
        tick.backup.to_owned(),
        tick.waves.iter().map(|w| (*w).to_owned()).collect(),
    ))
}

fn backup_label<'a>(b: &'a Backup, key: &str) -> Option<&'a str> {
    b.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// The namespace itself, restored from `backup` (a Restore of that one Namespace object:
/// Velero re-creates it with its backed-up labels and annotations, restore.go).
async fn restore_namespace(
    client: &kube::Client,
    o: &Options,
    backup: &str,
    name: &str,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Namespace> {
    let ns = &o.namespace;
    let _ = writeln!(
        progress,
        "namespace {ns} does not exist: restoring it first from Backup {backup} (Restore {name})"
    );
    // The Namespace object is cluster-scoped: with specific namespaces included, Velero
    // restores it only when told to include cluster resources, and then every namespace
    // of the Backup (restore.go `getOrderedResourceCollection`): the label every namespace
    // carries with its own name narrows it to this one.
    let spec = json!({
        "backupName": backup,
        "includedNamespaces": [ns],
        "includedResources": ["namespaces"],
        "includeClusterResources": true,
        "labelSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
    });
    create_restore_object(client, o, name, spec).await?;
    let (phase, _) = follow(client, o, name, progress).await?;
    Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .with_context(|| format!("reading namespace {ns}"))?
        .with_context(|| {
            format!("Restore {name} ended {phase} without namespace {ns}: is it in Backup {backup}? (`velero restore describe {name} --details`)")
        })
}

/// Waits until each of `claims` exists in the namespace (Velero has restored it) or the
/// Restore `restore` that makes them is over.
async fn claims_exist(
    client: &kube::Client,
    o: &Options,
    restore: &str,
    claims: &[&str],
) -> anyhow::Result<()> {
    let restores: Api<Restore> = Api::namespaced(client.clone(), &o.velero_namespace);
    let until = Timestamp::now() + o.timeout;
    loop {
        let there = list_claims(client, &o.namespace).await?;
        let missing: Vec<&&str> = claims
            .iter()
            .filter(|c| {
                !there
                    .iter()
                    .any(|t| t.metadata.name.as_deref() == Some(**c))
            })
            .collect();
        let phase = restores
            .get_opt(restore)
            .await?
            .and_then(|r| r.status.and_then(|s| s.phase));
        if missing.is_empty() || velero::restore_is_terminal(phase.as_deref()) {
            return Ok(());
        }
        if Timestamp::now() >= until {
            bail!("Restore {restore} has not re-created claims {missing:?} after --timeout");
        }
        tokio::time::sleep(o.poll).await;
    }
}

async fn list_pvbs(
    client: &kube::Client,
    vns: &str,
    backup: &str,
) -> anyhow::Result<Vec<PodVolumeBackup>> {
    Ok(Api::<PodVolumeBackup>::namespaced(client.clone(), vns)
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            names::VELERO_BACKUP_NAME,
            velero::label_value(backup)
        )))
        .await
        .with_context(|| format!("listing Backup {backup}'s PodVolumeBackups"))?
        .items)
}

/// `--latest`: the newest restorable Backup with a Completed PodVolumeBackup of each
/// user's claim (their claims now, by the username label, else `claim-<user>`); the same
/// Backup for every user, or an error saying which user's is which.
pub async fn latest_backup(client: &kube::Client, o: &Options) -> anyhow::Result<String> {
    let ns = &o.namespace;
    let vns = &o.velero_namespace;
    let claims = list_claims(client, ns).await?;
    let backups = Api::<Backup>::namespaced(client.clone(), vns)
        .list(&ListParams::default())
        .await
        .context("listing Backups")?
        .items;
    // By the label form PodVolumeBackups carry (hashed beyond 63 characters) → the name.
    let restorable: BTreeMap<String, &str> = backups
        .iter()
        .filter(|b| b.restorable())
        .filter_map(|b| b.metadata.name.as_deref())
        .map(|n| (velero::label_value(n).into_owned(), n))
        .collect();
    let pvbs = Api::<PodVolumeBackup>::namespaced(client.clone(), vns)
        .list(&ListParams::default())
        .await
        .context("listing PodVolumeBackups")?
        .items;
    let done: Vec<_> = pvbs.iter().filter_map(PodVolumeBackup::done).collect();
    let mut found: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for user in &o.users {
        let mut names: Vec<String> = claims
            .iter()
            .filter(|c| label(c.metadata.labels.as_ref(), names::JUPYTERHUB_USERNAME) == Some(user))
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        if names.is_empty() {
            names.push(format!("claim-{user}"));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let newest = crate::policy::status::newest_backup_of(
            &done,
            |b| restorable.contains_key(b),
            ns,
            &refs,
        )
        .with_context(|| {
            format!(
                "no Completed or PartiallyFailed Backup holds user {user}'s claim ({}) in namespace {ns}: `velero-jupyterhub status -n {ns}` shows each claim's last backup",
                names.join(", ")
            )
        })?;
        let backup = restorable
            .get(&newest.backup)
            .map_or(newest.backup.clone(), |n| (*n).to_owned());
        found.entry(backup).or_default().push(user);
    }
    if found.len() > 1 {
        let each: Vec<String> = found
            .iter()
            .map(|(b, users)| format!("{} in {b}", users.join(", ")))
            .collect();
        bail!(
            "the users' newest backups are in different Backups ({}): restore them one --user at a time",
            each.join("; ")
        );
    }
    found.into_keys().next().context("--latest needs --user")
}

fn validate(o: &Options) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--namespace", &o.namespace),
        ("--velero-namespace", &o.velero_namespace),
    ] {
        if !names::is_dns1123_label(value) {
            bail!("{flag} {value:?} is not a namespace name (a DNS-1123 label)");
        }
    }
    if o.latest && o.users.is_empty() {
        bail!("--latest needs --user: each user's newest Backup is found from their claim");
    }
    if let Some(schedule) = &o.schedule {
        if !names::is_dns1123_subdomain(schedule) {
            bail!("--from-schedule {schedule:?} is not an object name (a DNS-1123 subdomain)");
        }
    } else if !o.latest && !names::is_dns1123_subdomain(&o.backup) {
        bail!(
            "--from-backup {:?} is not an object name (a DNS-1123 subdomain)",
            o.backup
        );
    }
    for user in &o.users {
        if user.is_empty() || !names::is_label_value(user) {
            bail!(
                "--user {user:?} is not a label value: give the user's {} label, as on their pods and claims",
                names::JUPYTERHUB_USERNAME
            );
        }
    }
    Ok(())
}

/// The restore is only safe if our webhook turns the pods Velero re-creates into restore
/// helpers: a server-side dry run of such a pod must come back converted.
async fn webhook_converts(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    let probe: Pod = serde_json::from_value(json!({
        // generateName: a pod that happens to have the name cannot fail the dry run.
        "metadata": {"generateName": "vjh-restore-probe-", "labels": {
            (names::VELERO_RESTORE_NAME): "vjh-restore-probe",
            (names::JUPYTERHUB_COMPONENT): names::SINGLEUSER_SERVER}},
        "spec": {"containers": [{"name": "notebook", "image": crate::policy::helper::DEFAULT_IMAGE}]},
    }))?;
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let converted = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&params, &probe)
        .await
        .with_context(|| {
            format!(
                "a dry run of a restored pod in {ns} failed (is the velero-jupyterhub webhook up?)"
            )
        })?;
    let component = converted
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::COMPONENT))
        .map(String::as_str);
    if component != Some(names::RESTORE_HELPER) {
        bail!(
            "the velero-jupyterhub webhook did not convert a restored pod in {ns} (a dry run came back as it went in): is its restore entry installed (manifests/webhook.yaml)?"
        );
    }
    Ok(())
}

async fn list_claims(
    client: &kube::Client,
    ns: &str,
) -> anyhow::Result<Vec<PersistentVolumeClaim>> {
    Ok(Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing claims in {ns}"))?
        .items)
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels?.get(key).map(String::as_str)
}

fn pod_now(p: &Pod) -> PodNow<'_> {
    let labels = p.metadata.labels.as_ref();
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    PodNow {
        name: p.metadata.name.as_deref().unwrap_or_default(),
        username: label(labels, names::JUPYTERHUB_USERNAME),
        user_server: label(labels, names::JUPYTERHUB_COMPONENT) == Some(names::SINGLEUSER_SERVER)
            && label(labels, names::VELERO_RESTORE_NAME).is_none(),
        stopped: matches!(phase, Some("Succeeded" | "Failed")),
    }
}

fn claim_now(c: &PersistentVolumeClaim) -> ClaimNow<'_> {
    ClaimNow {
        name: c.metadata.name.as_deref().unwrap_or_default(),
        uid: c.metadata.uid.as_deref().unwrap_or_default(),
        username: label(c.metadata.labels.as_ref(), names::JUPYTERHUB_USERNAME),
    }
}

fn pvbs_of<'a>(pvbs: &'a [PodVolumeBackup], ns: &str) -> Vec<PvbOfBackup<'a>> {
    pvbs.iter()
        .filter(|p| p.spec.pod.namespace == ns)
        .map(|p| {
            let facts = p.facts();
            PvbOfBackup {
                pod: &p.spec.pod.name,
                volume: &p.spec.volume,
                claim: facts.pvc_name,
                phase: facts.phase,
            }
        })
        .collect()
}

fn pvr_of(p: &PodVolumeRestore) -> PvrOfRestore<'_> {
    let status = p.status.as_ref();
    PvrOfRestore {
        claim_uid: label(p.metadata.labels.as_ref(), names::VELERO_PVC_UID),
        phase: status.and_then(|s| s.phase.as_deref()),
        bytes_done: status.and_then(|s| s.progress.bytes_done),
        message: status.and_then(|s| s.message.as_deref()),
    }
}

/// Adds `claims` to the namespace's claims being restored (`velero-jupyterhub.io/
/// restoring-claims`, kept by the controller, which drops them once the restore is over)
/// and stamps when (`…/restoring-since`): a merge patch guarded by the resourceVersion
/// read, so a concurrent change by the controller is not lost (one retry, re-read).
async fn record_restoring(
    client: &kube::Client,
    namespace: &Namespace,
    claims: &[String],
    restores: &[String],
) -> anyhow::Result<()> {
    use crate::policy::restoring;
    let api = Api::<Namespace>::all(client.clone());
    let name = namespace.metadata.name.clone().unwrap_or_default();
    let mut current = namespace.clone();
    for attempt in 0..2 {
        // What is listed already, with ours added.
        let merged = |key: &str, ours: &[String]| {
            let listed = current
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str)
                .unwrap_or("");
            let mut all: Vec<&str> = restoring::parse_annotation(listed);
            all.extend(ours.iter().map(String::as_str));
            restoring::annotation_value(all)
        };
        let value = merged(names::NAMESPACE_RESTORING_CLAIMS, claims);
        let listed_restores = merged(names::NAMESPACE_RESTORING_RESTORES, restores);
        let patch = json!({"metadata": {
            "resourceVersion": current.metadata.resource_version,
            "annotations": {
                (names::NAMESPACE_RESTORING_CLAIMS): value,
                (names::NAMESPACE_RESTORING_SINCE): Timestamp::now().to_string(),
                (names::NAMESPACE_RESTORING_RESTORES): listed_restores,
            },
        }});
        match api
            .patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => {
                current = api
                    .get(&name)
                    .await
                    .with_context(|| format!("reading namespace {name}"))?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "recording the claims being restored on namespace {name} ({} annotation)",
                        names::NAMESPACE_RESTORING_CLAIMS
                    )
                });
            }
        }
    }
    bail!(
        "namespace {name} kept changing while the claims being restored were recorded on it: run again"
    )
}

/// The Restore of `backup`: the users' pods and claims (and their volumes: Velero makes
/// PodVolumeRestores only when PersistentVolumes and claims are included, restore.go),
/// chosen by KubeSpawner's username label, which our backup helpers carry too.
async fn create_restore(
    client: &kube::Client,
    o: &Options,
    backup: &str,
    name: &str,
) -> anyhow::Result<()> {
    let selector = if o.users.is_empty() {
        json!({"matchExpressions": [{"key": names::JUPYTERHUB_USERNAME, "operator": "Exists"}]})
    } else {
        json!({"matchExpressions": [{"key": names::JUPYTERHUB_USERNAME, "operator": "In", "values": o.users}]})
    };
    let mut spec = json!({
        "backupName": backup,
        "includedNamespaces": [o.namespace],
        "includedResources": ["pods", "persistentvolumeclaims", "persistentvolumes"],
        "labelSelector": selector,
    });
    // Writing into claims that exist is what Velero calls updating what exists: it labels
    // each existing claim with this Restore, which our webhook then lets its pods restore
    // into (and warns that it could not update the claim's spec, which is immutable).
    if o.into_existing {
        spec["existingResourcePolicy"] = json!("update");
    }
    create_restore_object(client, o, name, spec).await
}

async fn create_restore_object(
    client: &kube::Client,
    o: &Options,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("velero.io", "v1", "Restore"),
        "restores",
    );
    let mut object = DynamicObject::new(name, &ar).data(json!({"spec": spec}));
    object.metadata.namespace = Some(o.velero_namespace.clone());
    object.metadata.labels = Some(BTreeMap::from([(
        names::MANAGED_BY.to_owned(),
        names::MANAGED_BY_US.to_owned(),
    )]));
    Api::<DynamicObject>::namespaced_with(client.clone(), &o.velero_namespace, &ar)
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Restore {}/{name}", o.velero_namespace))?;
    Ok(())
}

/// Follows the Restore until it is terminal, a line each time a volume ends.
async fn follow(
    client: &kube::Client,
    o: &Options,
    restore: &str,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<(String, Vec<PodVolumeRestore>)> {
    let restores: Api<Restore> = Api::namespaced(client.clone(), &o.velero_namespace);
    let pvrs: Api<PodVolumeRestore> = Api::namespaced(client.clone(), &o.velero_namespace);
    let selector = format!("{}={restore}", names::VELERO_RESTORE_NAME);
    let until = Timestamp::now() + o.timeout;
    let mut last = (String::new(), usize::MAX, usize::MAX);
    let (mut last_bytes, mut last_line) = (0, std::time::Instant::now());
    loop {
        let r = restores
            .get_opt(restore)
            .await?
            .with_context(|| format!("Restore {restore} was deleted while it ran"))?;
        let phase = r.status.and_then(|s| s.phase).unwrap_or_default();
        let list = pvrs
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        let done = list
            .iter()
            .filter(|p| {
                velero::pod_volume_restore_is_terminal(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                )
            })
            .count();
        let bytes: i64 = list
            .iter()
            .filter_map(|p| p.status.as_ref()?.progress.bytes_done)
            .sum();
        // A line when a volume ends, and every 30 s while bytes keep coming (one large
        // home can take hours).
        let moved = bytes != last_bytes && last_line.elapsed() >= PROGRESS_EVERY;
        if moved || (phase.as_str(), done, list.len()) != (last.0.as_str(), last.1, last.2) {
            let _ = writeln!(
                progress,
                "Restore {restore}: {}; {done} of {} volumes done, {}",
                if phase.is_empty() { "New" } else { &phase },
                list.len(),
                human_bytes(bytes)
            );
            last = (phase.clone(), done, list.len());
            (last_bytes, last_line) = (bytes, std::time::Instant::now());
        }
        if velero::restore_is_terminal(Some(&phase)) {
            return Ok((phase, list));
        }
        if Timestamp::now() >= until {
            bail!(
                "Restore {restore} is still {phase} after --timeout; it goes on without us (`velero restore describe {restore}`)"
            );
        }
        tokio::time::sleep(o.poll).await;
    }
}
