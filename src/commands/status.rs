//! `velero-jupyterhub status [--namespace NS] [--output table|json] [--stale-after 26h]`:
//! is every user's home in a recent backup? Lists namespaces, claims, pods, Velero's
//! Backups and PodVolumeBackups once each (paged), and leaves the rest to
//! `policy::status`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use serde_json::json;

use super::report::{Table, bytes_cell};
use crate::cluster::list_all;
use crate::cluster::velero::{Backup, PodVolumeBackup};
use crate::names;
use crate::policy::status::{self, PvbDone, Row};
use crate::policy::{ClaimGlobs, ClaimRecord, NamespacePolicy, PodRecord};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// What `status`'s flags configure.
#[derive(Clone, Debug)]
pub struct Options {
    /// One namespace (it must have opted in), or every opted-in namespace.
    pub namespace: Option<String>,
    pub velero_namespace: String,
    pub stale_after: Duration,
    pub default_claims: Arc<ClaimGlobs>,
}

/// The rows, read from the cluster now.
pub async fn run(client: kube::Client, o: &Options) -> anyhow::Result<Vec<Row>> {
    for ns in o.namespace.iter().chain([&o.velero_namespace]) {
        if !names::is_dns1123_label(ns) {
            bail!("{ns:?} is not a namespace name (a DNS-1123 label)");
        }
    }
    let stale_after = SignedDuration::try_from(o.stale_after).context("--stale-after")?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace_objects = match &o.namespace {
        Some(ns) => vec![
            namespaces
                .get_opt(ns)
                .await
                .with_context(|| format!("reading namespace {ns}"))?
                .with_context(|| format!("namespace {ns} does not exist"))?,
        ],
        None => list_all(&namespaces, ListParams::default())
            .await
            .context("listing namespaces")?,
    };
    let mut globs: HashMap<String, Arc<ClaimGlobs>> = HashMap::new();
    for n in &namespace_objects {
        let m = &n.metadata;
        let policy =
            NamespacePolicy::read(m.labels.as_ref(), m.annotations.as_ref(), &o.default_claims);
        if policy.opted_in {
            globs.insert(m.name.clone().unwrap_or_default(), policy.claims);
        }
    }
    if let Some(ns) = &o.namespace
        && !globs.contains_key(ns)
    {
        bail!(
            "namespace {ns} has not opted in (label {}=true): velero-jupyterhub does not protect it",
            names::NAMESPACE_ENABLED
        );
    }
    let (claims, pods): (Api<ClaimRecord>, Api<PodRecord>) = match &o.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let claim_objects = list_all(&claims, ListParams::default())
        .await
        .context("listing claims")?;
    let pod_objects = list_all(&pods, ListParams::default())
        .await
        .context("listing pods")?;
    let vns = &o.velero_namespace;
    let backups = list_all(
        &Api::<Backup>::namespaced(client.clone(), vns),
        ListParams::default(),
    )
    .await
    .with_context(|| format!("listing Backups in {vns}"))?;
    let pvb_objects = list_all(
        &Api::<PodVolumeBackup>::namespaced(client.clone(), vns),
        ListParams::default(),
    )
    .await
    .with_context(|| format!("listing PodVolumeBackups in {vns}"))?;

    let restorable: BTreeMap<&str, bool> = backups
        .iter()
        .filter_map(|b| Some((b.metadata.name.as_deref()?, b.restorable())))
        .collect();
    let pvbs: Vec<PvbDone<'_>> = pvb_objects
        .iter()
        .filter_map(PodVolumeBackup::done)
        .collect();
    let claim_views: Vec<_> = claim_objects.iter().map(ClaimRecord::view).collect();
    let pod_refs: Vec<&PodRecord> = pod_objects.iter().collect();
    Ok(status::rows(
        |ns| globs.get(ns).cloned(),
        &claim_views,
        &pod_refs,
        &pvbs,
        |b| restorable.get(b).copied().unwrap_or(false),
        Timestamp::now(),
        stale_after,
    ))
}

/// The table, with a summary line.
pub fn table(rows: &[Row], stale_after: Duration) -> String {
    let mut table = Table::default()
        .left("NAMESPACE", 9)
        .left("USER", 4)
        .left("CLAIM", 5)
        .left("STATE", 13)
        .left("LAST BACKUP", 20)
        .left("BACKUP", 6)
        .right("BYTES", 9)
        .left("", 0);
    for r in rows {
        let (at, backup, bytes) = match &r.last {
            Some(l) => (
                l.at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                l.backup.clone(),
                bytes_cell(l.bytes),
            ),
            None => ("never".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        table.row(vec![
            r.namespace.clone(),
            r.user.clone().unwrap_or_else(|| "-".to_owned()),
            r.claim.clone(),
            r.holder.as_str().to_owned(),
            at,
            backup,
            bytes,
            if r.stale { "STALE" } else { "" }.to_owned(),
        ]);
    }
    let mut out = table.render();
    out.push_str(&summary(rows, stale_after));
    out.push('\n');
    out
}

/// `N user claims (a live, b idle, …); S stale (no backup in 26h or never)`.
pub fn summary(rows: &[Row], stale_after: Duration) -> String {
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *by_state.entry(r.holder.as_str()).or_default() += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let stale = rows.iter().filter(|r| r.stale).count();
    format!(
        "{} user claims ({}); {stale} stale (no completed backup in {} or never)",
        rows.len(),
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        },
        match stale_after.as_secs() {
            s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
            _ => humantime::format_duration(stale_after).to_string(),
        }
    )
}

/// The rows as JSON: `{"claims": [...], "stale": N, "staleAfterSeconds": S}`.
pub fn json(rows: &[Row], stale_after: Duration) -> serde_json::Value {
    let claims: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "namespace": r.namespace, "claim": r.claim, "user": r.user,
                "state": r.holder.as_str(), "stale": r.stale,
                "lastBackup": r.last.as_ref().map(|l| json!({
                    "time": l.at.to_string(), "backup": l.backup, "bytes": l.bytes})),
            })
        })
        .collect();
    json!({
        "claims": claims,
        "stale": rows.iter().filter(|r| r.stale).count(),
        "staleAfterSeconds": stale_after.as_secs(),
    })
}
