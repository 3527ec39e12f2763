//! `velero-jupyterhub status [--namespace NS] [--output table|json] [--stale-after 26h]`:
//! is every user's home in a recent backup? Lists namespaces, claims, pods, Velero's
//! Backups and PodVolumeBackups once each (paged), and leaves the rest to
//! `policy::status`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use serde_json::json;

use super::report::{Table, bytes_cell};
use crate::cluster::list_all;
use crate::cluster::velero::{Backup, DataUpload, PodVolumeBackup, Schedule, list_data_uploads};
use crate::names;
use crate::policy::datapath::{self, BackupSettings, PvFacts, ResourcePolicies, VolumeFacts};
use crate::policy::record::ClaimView;
use crate::policy::status::{self, CopiedBy, PvbDone, Row};
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
    // The claims whole, listed once: the rows read them as records, the data paths read
    // their labels.
    let (claims, pods): (Api<PersistentVolumeClaim>, Api<PodRecord>) = match &o.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let claim_objects = list_all(&claims, ListParams::default())
        .await
        .context("listing claims")?;
    let claim_records = claim_objects
        .iter()
        .map(|c| serde_json::to_value(c).and_then(serde_json::from_value::<ClaimRecord>))
        .collect::<Result<Vec<_>, _>>()
        .context("reading claims")?;
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

    // The data mover's copies count as much as a pod's (a DataUpload per claim).
    // A Velero without the data mover's CRD (before v1.12) has none.
    let uploads = list_data_uploads(&client, vns, ListParams::default())
        .await
        .with_context(|| format!("listing DataUploads in {vns}"))?;
    let ways = DataPaths::read(&client, vns, &globs, claim_objects).await?;

    // By the label form of the name, as copies name their Backup (`velero.io/backup-name`
    // is cut and hashed past 63 characters).
    let restorable: BTreeMap<String, bool> = backups
        .iter()
        .filter_map(|b| {
            let name = b.metadata.name.as_deref()?;
            Some((
                crate::policy::velero::label_value(name).into_owned(),
                b.restorable(),
            ))
        })
        .collect();
    let pvbs: Vec<PvbDone<'_>> = pvb_objects
        .iter()
        .filter_map(PodVolumeBackup::done)
        .chain(uploads.iter().filter_map(DataUpload::done))
        .collect();
    let claim_views: Vec<_> = claim_records.iter().map(ClaimRecord::view).collect();
    let pod_refs: Vec<&PodRecord> = pod_objects.iter().collect();
    Ok(status::rows(
        |ns| globs.get(ns).cloned(),
        &claim_views,
        &pod_refs,
        &pvbs,
        |b| restorable.get(b).copied().unwrap_or(false),
        |c| ways.copied_by(c),
        Timestamp::now(),
        stale_after,
    ))
}

/// What decides how Velero copies each claim: the Schedules covering each opted-in
/// namespace (not paused, by name), the resource policies they name, the volumes and the
/// claims' labels.
struct DataPaths {
    /// (Schedule, its template, its policies if it names a readable ConfigMap).
    schedules: Vec<(
        String,
        crate::policy::velero::BackupTemplate,
        Option<ResourcePolicies>,
    )>,
    volumes: HashMap<String, PersistentVolume>,
    claims: HashMap<(String, String), PersistentVolumeClaim>,
    velero_namespace: String,
}

impl DataPaths {
    async fn read(
        client: &kube::Client,
        velero_namespace: &str,
        opted_in: &HashMap<String, Arc<ClaimGlobs>>,
        listed_claims: Vec<PersistentVolumeClaim>,
    ) -> anyhow::Result<Self> {
        let listed = list_all(
            &Api::<Schedule>::namespaced(client.clone(), velero_namespace),
            ListParams::default(),
        )
        .await
        .with_context(|| format!("listing Schedules in {velero_namespace}"))?;
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), velero_namespace);
        let mut schedules = Vec::new();
        for s in listed.into_iter().filter(|s| !s.spec.paused) {
            let name = s.metadata.name.clone().unwrap_or_default();
            let template = s.spec.template;
            if !opted_in.keys().any(|ns| template.covers_namespace(ns)) {
                continue;
            }
            let policies = match template
                .resource_policy
                .as_ref()
                .and_then(|r| r.config_map())
            {
                None => None,
                Some(cm) => match read_policies(&config_maps, cm).await {
                    Ok(p) => Some(p),
                    // Read its claims as if it named none, and say why.
                    Err(e) => {
                        eprintln!(
                            "velero-jupyterhub status: Schedule {name}: resource policies ConfigMap {velero_namespace}/{cm}: {e:#}"
                        );
                        None
                    }
                },
            };
            schedules.push((name, template, policies));
        }
        schedules.sort_by(|a, b| a.0.cmp(&b.0));
        // Volumes (hostPath ones Velero never copies, what policies match on) and the
        // claims' labels: read when some Schedule covers an opted-in namespace.
        let (mut volumes, mut claims) = (HashMap::new(), HashMap::new());
        if !schedules.is_empty() {
            for pv in list_all(
                &Api::<PersistentVolume>::all(client.clone()),
                ListParams::default(),
            )
            .await
            .context("listing PersistentVolumes")?
            {
                volumes.insert(pv.metadata.name.clone().unwrap_or_default(), pv);
            }
            for pvc in listed_claims {
                let m = &pvc.metadata;
                let key = (
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                );
                if opted_in.contains_key(&key.0) {
                    claims.insert(key, pvc);
                }
            }
        }
        Ok(Self {
            schedules,
            volumes,
            claims,
            velero_namespace: velero_namespace.to_owned(),
        })
    }

    fn copied_by(&self, claim: &ClaimView<'_>) -> Option<CopiedBy> {
        let covering: Vec<(&str, BackupSettings<'_>)> = self
            .schedules
            .iter()
            .filter(|(_, t, _)| t.covers_namespace(claim.namespace))
            .map(|(name, t, policies)| (name.as_str(), BackupSettings::of(t, policies.as_ref())))
            .collect();
        let pvc = self
            .claims
            .get(&(claim.namespace.to_owned(), claim.name.to_owned()));
        let pv = pvc
            .and_then(|c| c.spec.as_ref()?.volume_name.as_deref())
            .and_then(|v| self.volumes.get(v));
        let volume = VolumeFacts {
            pvc_labels: pvc.and_then(|c| c.metadata.labels.as_ref()),
            pvc_phase: pvc.and_then(|c| c.status.as_ref()?.phase.as_deref()),
            pv: pv.map(PvFacts::of),
        };
        let (schedule, path) = datapath::schedules_path(&covering, &volume)?;
        let config_map = self
            .schedules
            .iter()
            .find(|(n, ..)| n == schedule)
            .and_then(|(_, t, _)| t.resource_policy.as_ref()?.config_map())
            .map(|cm| format!("{}/{cm}", self.velero_namespace));
        Some(CopiedBy {
            schedule: schedule.to_owned(),
            detail: path.describe(config_map.as_deref()),
            path,
        })
    }
}

/// A resource policies ConfigMap as Velero reads it: exactly one data key, YAML
/// (internal/resourcepolicies `getResourcePoliciesFromConfig`).
async fn read_policies(api: &Api<ConfigMap>, name: &str) -> anyhow::Result<ResourcePolicies> {
    let cm = match api.get_opt(name).await {
        Ok(cm) => cm.context("it does not exist")?,
        Err(kube::Error::Api(e)) if e.code == 403 => anyhow::bail!(
            "not allowed to read it, so claims are shown as if it named no policies; grant `get configmaps` in Velero's namespace (README, \"status\")"
        ),
        Err(e) => return Err(anyhow::Error::new(e).context("reading it")),
    };
    let data = cm.data.unwrap_or_default();
    let [(_, text)] = <[(String, String); 1]>::try_from(data.into_iter().collect::<Vec<_>>())
        .map_err(|d| anyhow::anyhow!("it has {} data keys; Velero reads exactly one", d.len()))?;
    let document: serde_json::Value =
        serde_yaml_ng::from_str(&text).context("its value is not YAML")?;
    ResourcePolicies::parse(document)
        .map_err(|e| anyhow::anyhow!("{e}; Velero fails the Schedule's Backups (FailedValidation)"))
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
            note(r),
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

/// The last column: STALE, and how Velero copies the claim when not through a pod.
fn note(r: &Row) -> String {
    let how = r
        .copied_by
        .as_ref()
        .map(|c| format!("{} (Schedule {})", c.detail, c.schedule));
    match (r.stale, how) {
        (true, Some(how)) => format!("{how}  STALE"),
        (true, None) => "STALE".to_owned(),
        (false, how) => how.unwrap_or_default(),
    }
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
                "copiedBy": r.copied_by.as_ref().map(|c| json!({
                    "schedule": c.schedule, "detail": c.detail})),
            })
        })
        .collect();
    json!({
        "claims": claims,
        "stale": rows.iter().filter(|r| r.stale).count(),
        "staleAfterSeconds": stale_after.as_secs(),
    })
}
