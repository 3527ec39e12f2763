//! `velero-jupyterhub backup --namespace NS`: a Velero Backup of one namespace, now, with
//! every idle user's home in it.
//!
//! It opens the namespace's own backup window (annotations the controller honours, see
//! `policy::window::ManualWindow`), waits until the controller's helpers run, creates the
//! Backup and names it in the window (which then closes when the Backup is terminal). With
//! `--wait` it follows the Backup, closes the window itself and reports each user claim
//! (`policy::coverage`). The helpers are the controller's: this command only writes the
//! namespace's two annotations and the Backup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::report::{ClaimRow, claim_table, human_bytes};
use crate::cluster::velero::{Backup, DataUpload, PodVolumeBackup, list_data_uploads};
use crate::names;
use crate::policy::coverage::{self, ClaimState, Outcome, PvbFacts};
use crate::policy::leader::current_leader;
use crate::policy::window::{BackupView, ManualWindow};
use crate::policy::{ClaimGlobs, ClaimRecord, NamespacePolicy, PodRecord, velero};

/// What `backup`'s flags configure.
#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: String,
    pub velero_namespace: String,
    pub storage_location: Option<String>,
    pub ttl: Option<Duration>,
    /// Follow the Backup to its end, close the window, report each claim.
    pub wait: bool,
    /// Claim globs for a namespace without a `velero-jupyterhub.io/claims` annotation.
    pub default_claims: std::sync::Arc<ClaimGlobs>,
    /// How long to wait for helpers to run before backing up without the missing ones.
    pub helper_timeout: Duration,
    /// The window stays open at most this long, and `--wait` follows the Backup as long.
    pub timeout: Duration,
    /// Where the controller's Lease is (`--controller-namespace`, `--lease-name`).
    pub controller_namespace: String,
    pub lease_name: String,
    /// How often to look again while waiting.
    pub poll: Duration,
}

/// What a `--wait` run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub backup: String,
    pub phase: String,
    /// One row per user claim, by claim name.
    pub rows: Vec<(String, Outcome)>,
}

impl Report {
    /// Every user claim is in the Backup.
    pub fn complete(&self) -> bool {
        matches!(self.phase.as_str(), "Completed" | "PartiallyFailed")
            && self
                .rows
                .iter()
                .all(|(_, o)| matches!(o, Outcome::BackedUp { .. }))
    }

    /// The table `backup --wait` prints.
    pub fn table(&self) -> String {
        let mut out = claim_table(self.rows.iter().map(|(claim, outcome)| match outcome {
            Outcome::BackedUp { from, bytes } => ClaimRow {
                claim,
                result: "backed up",
                bytes: *bytes,
                detail: format!("from {from}"),
            },
            Outcome::NotBackedUp { reason } => ClaimRow {
                claim,
                result: "NOT backed up",
                bytes: None,
                detail: reason.clone(),
            },
        }));
        let missing = self
            .rows
            .iter()
            .filter(|(_, o)| !matches!(o, Outcome::BackedUp { .. }));
        let _ = writeln!(
            out,
            "Backup {} {}: {} of {} user claims backed up",
            self.backup,
            self.phase,
            self.rows.len() - missing.count(),
            self.rows.len()
        );
        out
    }
}

/// How `run` ended.
#[derive(Debug)]
pub enum Finished {
    /// The Backup was created; the controller closes the window when it ends.
    Started { backup: String },
    /// `--wait`: the Backup ended.
    Done(Report),
}

pub async fn run(
    client: kube::Client,
    options: &Options,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Finished> {
    validate(options)?;
    let ns = &options.namespace;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = namespaces
        .get_opt(ns)
        .await
        .with_context(|| format!("reading namespace {ns}"))?
        .with_context(|| format!("namespace {ns} does not exist"))?;
    let meta = &namespace.metadata;
    let policy = NamespacePolicy::read(
        meta.labels.as_ref(),
        meta.annotations.as_ref(),
        &options.default_claims,
    );
    if !policy.opted_in {
        bail!(
            "namespace {ns} has not opted in: label it {}=true (the controller manages opted-in namespaces only)",
            names::NAMESPACE_ENABLED
        );
    }
    let backups: Api<Backup> = Api::namespaced(client.clone(), &options.velero_namespace);
    refuse_open_window(ns, meta.annotations.as_ref(), &backups).await?;
    require_leader(&client, options).await?;

    // Signal handlers first: from the moment the window opens, a signal closes it.
    let mut signals = Signals::new()?;
    let until = Timestamp::now() + options.timeout;
    // Only over the namespace as read (and found without an open window): two runs at
    // once cannot both open one.
    open_window(
        &namespaces,
        ns,
        meta.resource_version.as_deref(),
        &until.to_string(),
    )
    .await?;
    let _ = writeln!(
        progress,
        "opened a backup window on namespace {ns} until {until}"
    );
    let outcome = tokio::select! {
        outcome = back_up(&client, options, &policy.claims, until, progress) => outcome,
        signal = signals.recv() => Err(anyhow::anyhow!("stopped by {signal}")),
    };
    // The window stays open for the controller only when the Backup runs on without us.
    if !matches!(outcome, Ok(Finished::Started { .. })) {
        let until_text = until.to_string();
        let closing = close_window(&namespaces, ns, &until_text, progress);
        if tokio::time::timeout(Duration::from_secs(30), closing)
            .await
            .is_err()
        {
            let _ = writeln!(
                progress,
                "closing the backup window timed out; it closes by itself at {until}"
            );
        }
    }
    outcome
}

async fn back_up(
    client: &kube::Client,
    options: &Options,
    globs: &ClaimGlobs,
    until: Timestamp,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Finished> {
    let ns = &options.namespace;
    let states = wait_for_helpers(client, options, globs, progress).await?;
    let backup = create_backup(client, options).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    name_backup(&namespaces, ns, &until.to_string(), &backup)
        .await
        .with_context(|| {
            format!(
                "Backup {}/{backup} was created and runs; naming it in the window failed",
                options.velero_namespace
            )
        })?;
    let _ = writeln!(
        progress,
        "created Backup {}/{backup} of namespace {ns}",
        options.velero_namespace
    );
    if !options.wait {
        let _ = writeln!(
            progress,
            "the controller closes the window when the Backup ends; follow it with `velero backup describe {backup}`"
        );
        return Ok(Finished::Started { backup });
    }
    let (phase, pvbs) = follow(client, options, &backup, until, progress).await?;
    // The data mover's copies (a claim no pod mounted, under a server default of
    // snapshotMoveData or a volume policy): a DataUpload per claim, in any namespace's
    // name, so only those of this one.
    let uploads = list_data_uploads(
        client,
        &options.velero_namespace,
        ListParams::default().labels(&format!(
            "{}={}",
            names::VELERO_BACKUP_NAME,
            velero::label_value(&backup)
        )),
    )
    .await
    .with_context(|| format!("listing the DataUploads of Backup {backup}"))?;
    let facts: Vec<PvbFacts<'_>> = pvbs
        .iter()
        .map(PodVolumeBackup::facts)
        .chain(
            uploads
                .iter()
                .filter(|u| u.spec.source_namespace == *ns)
                .map(DataUpload::facts),
        )
        .collect();
    Ok(Finished::Done(Report {
        rows: coverage::outcomes(&states, &phase, &facts),
        backup,
        phase,
    }))
}

fn validate(o: &Options) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--namespace", &o.namespace),
        ("--velero-namespace", &o.velero_namespace),
        ("--controller-namespace", &o.controller_namespace),
    ] {
        if !names::is_dns1123_label(value) {
            bail!("{flag} {value:?} is not a namespace name (a DNS-1123 label)");
        }
    }
    if let Some(l) = &o.storage_location
        && !names::is_dns1123_subdomain(l)
    {
        bail!("--storage-location {l:?} is not an object name (a DNS-1123 subdomain)");
    }
    if o.ttl.is_some_and(|t| t.is_zero()) {
        bail!("--ttl must be longer than zero");
    }
    Ok(())
}

/// Two runs at once would close each other's window: refuse while one is open.
async fn refuse_open_window(
    ns: &str,
    annotations: Option<&BTreeMap<String, String>>,
    backups: &Api<Backup>,
) -> anyhow::Result<()> {
    let window = ManualWindow::read(ns, annotations).map_err(anyhow::Error::msg)?;
    let Some(window) = window else {
        return Ok(());
    };
    let backup = match window.backup {
        Some(name) => backups.get_opt(name).await?,
        None => None,
    };
    let views: Vec<BackupView<'_>> = backup
        .iter()
        .filter_map(|b| {
            Some(BackupView {
                name: b.metadata.name.as_deref()?,
                created: b.metadata.creation_timestamp.as_ref()?.0,
                schedule: None,
                phase: b.status.as_ref().and_then(|s| s.phase.as_deref()),
            })
        })
        .collect();
    if window.is_open(&views, Timestamp::now()) {
        bail!(
            "a backup window is already open on namespace {ns} (until {}{}); wait for it, or remove the namespace's {} annotation",
            window.until,
            window
                .backup
                .map(|b| format!(", Backup {b}"))
                .unwrap_or_default(),
            names::NAMESPACE_WINDOW_UNTIL
        );
    }
    Ok(())
}

/// Without a leading controller no helper would ever start: say so instead of waiting.
async fn require_leader(client: &kube::Client, o: &Options) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &o.controller_namespace);
    let lease = leases.get_opt(&o.lease_name).await.with_context(|| {
        format!(
            "reading the controller's Lease {}/{}",
            o.controller_namespace, o.lease_name
        )
    })?;
    if lease
        .as_ref()
        .and_then(|l| current_leader(l, Timestamp::now()))
        .is_some()
    {
        return Ok(());
    }
    // Stale by our clock: maybe our clock is off. A leader renews every 2 s (2/15 of the
    // Lease): a renewal seen within a few seconds proves it alive.
    let renewed = |l: &Option<Lease>| {
        l.as_ref()
            .and_then(|l| l.spec.as_ref())
            .filter(|s| s.holder_identity.as_deref().is_some_and(|h| !h.is_empty()))
            .and_then(|s| s.renew_time.clone())
    };
    let before = renewed(&lease);
    tokio::time::sleep(o.poll.max(Duration::from_secs(3))).await;
    let after = renewed(&leases.get_opt(&o.lease_name).await?);
    match (before, after) {
        (b, Some(a)) if b.as_ref() != Some(&a) => Ok(()),
        _ => bail!(
            "no velero-jupyterhub controller is running (Lease {}/{} is missing or not renewed): idle users' helpers would never start; \
             start the controller, or pass --controller-namespace/--lease-name if it runs elsewhere",
            o.controller_namespace,
            o.lease_name
        ),
    }
}

/// SIGINT (Ctrl-C), SIGTERM (a CI job cancelled) and SIGHUP (terminal closed): the
/// window is closed before exiting.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

async fn open_window(
    namespaces: &Api<Namespace>,
    ns: &str,
    resource_version: Option<&str>,
    until: &str,
) -> anyhow::Result<()> {
    let patch = json!({"metadata": {
        "resourceVersion": resource_version,
        "annotations": {
            (names::NAMESPACE_WINDOW_UNTIL): until,
            (names::NAMESPACE_WINDOW_BACKUP): null,
        },
    }});
    match namespaces
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => bail!(
            "namespace {ns} changed while the backup window was being opened (another backup run?); try again"
        ),
        Err(e) => {
            Err(e).with_context(|| format!("annotating namespace {ns} with the backup window"))
        }
    }
}

/// Sets the window's annotations to `annotations` if the window is still ours (its
/// `until` as we wrote it): a patch conditional on the namespace as read, read again when
/// something else changed it meanwhile. `Ok(false)`: not ours any more.
async fn patch_own_window(
    namespaces: &Api<Namespace>,
    ns: &str,
    until: &str,
    annotations: serde_json::Value,
) -> Result<bool, kube::Error> {
    for _ in 0..3 {
        let current = namespaces.get(ns).await?;
        let ours = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(names::NAMESPACE_WINDOW_UNTIL))
            .map(String::as_str)
            == Some(until);
        if !ours {
            return Ok(false);
        }
        let patch = json!({"metadata": {
            "resourceVersion": current.metadata.resource_version,
            "annotations": annotations,
        }});
        match namespaces
            .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Names the Backup in the window, if the window is still ours.
async fn name_backup(
    namespaces: &Api<Namespace>,
    ns: &str,
    until: &str,
    backup: &str,
) -> anyhow::Result<()> {
    let named = patch_own_window(
        namespaces,
        ns,
        until,
        json!({(names::NAMESPACE_WINDOW_BACKUP): backup}),
    )
    .await?;
    if !named {
        bail!("the backup window on namespace {ns} was changed or removed by someone else");
    }
    Ok(())
}

/// Removes the window's annotations if they are still ours (another run may have opened
/// its own since).
async fn close_window(
    namespaces: &Api<Namespace>,
    ns: &str,
    until: &str,
    progress: &mut (dyn Write + Send),
) {
    let closed = patch_own_window(
        namespaces,
        ns,
        until,
        json!({(names::NAMESPACE_WINDOW_UNTIL): null, (names::NAMESPACE_WINDOW_BACKUP): null}),
    );
    match closed.await {
        Ok(true) => {
            let _ = writeln!(progress, "closed the backup window on namespace {ns}");
        }
        Ok(false) => {
            let _ = writeln!(
                progress,
                "the backup window on namespace {ns} is no longer ours: left as it is"
            );
        }
        Err(e) => {
            let _ = writeln!(
                progress,
                "could not close the backup window on namespace {ns} ({e}); it closes by itself at {until}"
            );
        }
    }
}

/// Waits until every user claim is held by a Running pod (or cannot be: not Bound), or
/// `--helper-timeout`; returns who held each claim at that moment.
async fn wait_for_helpers(
    client: &kube::Client,
    o: &Options,
    globs: &ClaimGlobs,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<ClaimState>> {
    let claims: Api<ClaimRecord> = Api::namespaced(client.clone(), &o.namespace);
    let pods: Api<PodRecord> = Api::namespaced(client.clone(), &o.namespace);
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let claim_list = claims
            .list(&ListParams::default())
            .await
            .context("listing claims")?;
        let pod_list = pods
            .list(&ListParams::default())
            .await
            .context("listing pods")?;
        let views: Vec<_> = claim_list.items.iter().map(ClaimRecord::view).collect();
        let pod_refs: Vec<&PodRecord> = pod_list.items.iter().collect();
        let states = coverage::claim_states(globs, &views, &pod_refs);
        let waiting: Vec<String> = states
            .iter()
            .filter_map(|s| Some(format!("{} ({})", s.claim, s.waiting_for()?)))
            .collect();
        if waiting.is_empty() {
            let _ = writeln!(
                progress,
                "all {} user claims are mounted by running pods",
                states.len()
            );
            return Ok(states);
        }
        if started.elapsed() >= o.helper_timeout {
            let _ = writeln!(
                progress,
                "backing up without {} of {} user claims after --helper-timeout {}: {}",
                waiting.len(),
                states.len(),
                humantime::format_duration(o.helper_timeout),
                waiting.join(", ")
            );
            return Ok(states);
        }
        let line = format!(
            "waiting for {} of {} user claims: {}",
            waiting.len(),
            states.len(),
            waiting.join(", ")
        );
        if line != last_line {
            let _ = writeln!(progress, "{line}");
            last_line = line;
        }
        tokio::time::sleep(o.poll).await;
    }
}

fn backup_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("velero.io", "v1", "Backup"),
        "backups",
    )
}

/// `vjh-<namespace>-<UTC time>`, like Velero's `<schedule>-<time>`, at most 63 characters
/// (Velero copies the name into label values).
pub fn backup_name(namespace: &str, now: Timestamp) -> String {
    let stamp = now
        .to_zoned(TimeZone::UTC)
        .strftime("%Y%m%d%H%M%S")
        .to_string();
    let room = 63 - "vjh-".len() - 1 - stamp.len();
    let ns = namespace
        .get(..room.min(namespace.len()))
        .unwrap_or(namespace);
    format!("vjh-{}-{stamp}", ns.trim_end_matches('-'))
}

async fn create_backup(client: &kube::Client, o: &Options) -> anyhow::Result<String> {
    let name = backup_name(&o.namespace, Timestamp::now());
    let mut spec = json!({"includedNamespaces": [o.namespace]});
    if let Some(l) = &o.storage_location {
        spec["storageLocation"] = json!(l);
    }
    if let Some(ttl) = o.ttl {
        // A Go duration, as Velero's metav1.Duration reads it.
        spec["ttl"] = json!(format!("{}s", ttl.as_secs()));
    }
    let ar = backup_resource();
    let mut object = DynamicObject::new(&name, &ar).data(json!({"spec": spec}));
    object.metadata.namespace = Some(o.velero_namespace.clone());
    object.metadata.labels = Some(BTreeMap::from([(
        names::MANAGED_BY.to_owned(),
        names::MANAGED_BY_US.to_owned(),
    )]));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &o.velero_namespace, &ar);
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Backup {}/{name}", o.velero_namespace))?;
    Ok(name)
}

/// Follows the Backup until it is terminal, a line each time a PodVolumeBackup ends;
/// returns its phase and its PodVolumeBackups.
async fn follow(
    client: &kube::Client,
    o: &Options,
    backup: &str,
    until: Timestamp,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<(String, Vec<PodVolumeBackup>)> {
    let backups: Api<Backup> = Api::namespaced(client.clone(), &o.velero_namespace);
    let pvbs: Api<PodVolumeBackup> = Api::namespaced(client.clone(), &o.velero_namespace);
    let selector = format!("{}={backup}", names::VELERO_BACKUP_NAME);
    let mut last = (String::new(), usize::MAX, usize::MAX);
    loop {
        let b = backups
            .get_opt(backup)
            .await?
            .with_context(|| format!("Backup {backup} was deleted while it ran"))?;
        let phase = b.status.and_then(|s| s.phase).unwrap_or_default();
        let list = pvbs
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        let facts: Vec<PvbFacts<'_>> = list.iter().map(PodVolumeBackup::facts).collect();
        let (done, total, bytes) = coverage::progress(&facts);
        if (phase.as_str(), done, total) != (last.0.as_str(), last.1, last.2) {
            let _ = writeln!(
                progress,
                "Backup {backup}: {}; {done} of {total} volumes done, {}",
                if phase.is_empty() { "New" } else { &phase },
                human_bytes(bytes)
            );
            last = (phase.clone(), done, total);
        }
        if velero::backup_is_terminal(Some(&phase)) {
            return Ok((phase, list));
        }
        if Timestamp::now() >= until {
            bail!(
                "Backup {backup} is still {phase} after --timeout; it goes on without us (the window closes now)"
            );
        }
        tokio::time::sleep(o.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_fit_label_values() {
        let now: Timestamp = "2026-11-28T10:15:00Z".parse().unwrap();
        assert_eq!(backup_name("jhub", now), "vjh-jhub-20261128101500");
        let long = "a".repeat(40) + "-" + &"b".repeat(22);
        let name = backup_name(&long, now);
        assert_eq!(name.len(), 63, "{name}");
        assert!(
            names::is_label_value(&name) && names::is_dns1123_label(&name),
            "{name}"
        );
        // Cut where the namespace has a dash: no double dash.
        let dashed = "a".repeat(43) + "-bbbb";
        assert!(!backup_name(&dashed, now).contains("--"));
    }
}
