//! What the restore path looks up in the cluster: the claims a pod re-created by a
//! restore would write into, a Backup's waves, a Restore's namespace mapping. (The
//! restore guard reads the namespace's record of the claims being restored: the
//! namespace cache.)

use std::sync::Arc;

use kube::Api;

use crate::names;
use crate::policy::restore;

/// How long one claim lookup may take: the restore path answers within the webhook's
/// request timeout (2 s), and a lookup that does not answer refuses the pod.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// At most this many claims are looked up for one pod (a re-created user pod restores a
/// handful); beyond, the pod is refused rather than the API server asked without bound.
const MAX_LOOKUPS: usize = 16;

/// The claims a pod re-created by a restore writes into, looked up when it is created
/// (`policy::restore::overwrites` decides), and the Events on those a restore may not
/// write over. A GET of each claim's metadata: a restore re-creates a pod once per user.
#[derive(Clone)]
pub struct RestoreClaims {
    client: Option<kube::Client>,
    events: super::events::EventSink,
    /// Where Velero's Backups and Restores are (`--velero-namespace`).
    velero_namespace: String,
    /// The wave Backups of a Schedule's Backup (by its label form), and each Restore's
    /// namespace mapping (by its label form): a Restore re-creates claims by the hundred.
    waves: Arc<Kept<Waves>>,
    mappings: Arc<Kept<Mapping>>,
}

/// The wave Backups of one Backup: name, `velero-jupyterhub.io/wave-schedule`, phase,
/// `velero-jupyterhub.io/wave-claims`.
type Waves = Arc<Vec<(String, Option<String>, Option<String>, String)>>;
/// A Restore's `namespaceMapping`.
type Mapping = Arc<std::collections::BTreeMap<String, String>>;

/// Answers kept [`KEPT_FOR`], at most [`KEPT`] at once (failures are not kept).
struct Kept<V>(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, V)>>);
const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(30);
const KEPT: usize = 64;

impl<V: Clone> Default for Kept<V> {
    fn default() -> Self {
        Self(std::sync::Mutex::default())
    }
}

impl<V: Clone> Kept<V> {
    fn get(&self, key: &str) -> Option<V> {
        let kept = self.0.lock().ok()?;
        let (at, v) = kept.get(key)?;
        (at.elapsed() < KEPT_FOR).then(|| v.clone())
    }

    fn put(&self, key: &str, v: V) {
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() >= KEPT {
                kept.retain(|_, (at, _)| at.elapsed() < KEPT_FOR);
            }
            if kept.len() < KEPT {
                kept.insert(key.to_owned(), (std::time::Instant::now(), v));
            }
        }
    }
}

impl RestoreClaims {
    pub fn new(client: Option<kube::Client>, velero_namespace: &str) -> Self {
        Self {
            events: super::events::EventSink::new(client.clone()),
            client,
            velero_namespace: velero_namespace.to_owned(),
            waves: Arc::default(),
            mappings: Arc::default(),
        }
    }

    /// The claim entry's decision for a claim a Velero restore re-creates: refused when
    /// its home is in a wave Backup of the same tick (`policy::restore::home_in_a_wave`),
    /// or when that cannot be checked (the restore of that claim fails, loudly; running it
    /// again fixes it).
    pub async fn review_claim(
        &self,
        claim: &crate::admission::ClaimCreate,
    ) -> crate::admission::Reviewed {
        // Both at once: each may take LOOKUP_TIMEOUT, and the request has 2 s.
        let (waves, source) = futures::join!(
            self.waves_of(&claim.backup),
            self.source_namespace(&claim.restore, &claim.namespace)
        );
        let waves = match waves {
            Ok(waves) => waves,
            Err(why) => return claim.unchecked(&why),
        };
        if waves.is_empty() {
            return claim.decide(&[], &claim.namespace);
        }
        let source = match source {
            Ok(source) => source,
            Err(why) => return claim.unchecked(&why),
        };
        let read: Vec<restore::WaveOf<'_>> = waves
            .iter()
            .map(|(name, schedule, phase, claims)| {
                restore::WaveOf::read(name, schedule.as_deref(), phase.as_deref(), claims)
            })
            .collect();
        claim.decide(&read, &source)
    }

    async fn waves_of(&self, backup: &str) -> Result<Waves, String> {
        use crate::cluster::velero::Backup;
        let Some(client) = &self.client else {
            return Ok(Waves::default());
        };
        if let Some(waves) = self.waves.get(backup) {
            return Ok(waves);
        }
        if !names::is_label_value(backup) {
            return Err("its Backup label is not a label value".to_owned());
        }
        let api: Api<Backup> = Api::namespaced(client.clone(), &self.velero_namespace);
        let params =
            kube::api::ListParams::default().labels(&format!("{}={backup}", names::WAVE_OF));
        let listed = tokio::time::timeout(LOOKUP_TIMEOUT, api.list(&params))
            .await
            .map_err(|_| format!("no answer listing wave Backups within {LOOKUP_TIMEOUT:?}"))?
            .map_err(|e| format!("listing wave Backups: {e}"))?;
        let waves: Waves = Arc::new(
            listed
                .items
                .into_iter()
                .filter_map(|b| {
                    let claims = b
                        .metadata
                        .annotations
                        .as_ref()?
                        .get(names::WAVE_CLAIMS)?
                        .clone();
                    let schedule = b
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(names::WAVE_SCHEDULE))
                        .cloned();
                    Some((
                        b.metadata.name?,
                        schedule,
                        b.status.and_then(|s| s.phase),
                        claims,
                    ))
                })
                .collect(),
        );
        self.waves.put(backup, waves.clone());
        Ok(waves)
    }

    /// The namespace a claim came from in its Backup: the Restore's namespace mapping
    /// read backwards (`restore` is the label form of its name: found by name, or, for a
    /// name too long to be its own label, among the Restores).
    async fn source_namespace(&self, restore: &str, target: &str) -> Result<String, String> {
        use crate::cluster::velero::Restore;
        let Some(client) = &self.client else {
            return Ok(target.to_owned());
        };
        let from = |mapping: &Mapping| {
            mapping
                .iter()
                .find(|(_, to)| *to == target)
                .map_or_else(|| target.to_owned(), |(from, _)| from.clone())
        };
        if let Some(mapping) = self.mappings.get(restore) {
            return Ok(from(&mapping));
        }
        let api: Api<Restore> = Api::namespaced(client.clone(), &self.velero_namespace);
        let found = if restore.len() < 63 && names::is_dns1123_subdomain(restore) {
            tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(restore))
                .await
                .map_err(|_| {
                    format!("no answer reading Restore {restore} within {LOOKUP_TIMEOUT:?}")
                })?
                .map_err(|e| format!("reading Restore {restore}: {e}"))?
        } else {
            tokio::time::timeout(LOOKUP_TIMEOUT, api.list(&Default::default()))
                .await
                .map_err(|_| format!("no answer listing Restores within {LOOKUP_TIMEOUT:?}"))?
                .map_err(|e| format!("listing Restores: {e}"))?
                .items
                .into_iter()
                .find(|r| {
                    r.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| crate::policy::velero::label_value(n) == restore)
                })
        };
        let mapping: Mapping = Arc::new(
            found
                .ok_or_else(|| format!("Restore {restore} not found"))?
                .spec
                .namespace_mapping,
        );
        self.mappings.put(restore, mapping.clone());
        Ok(from(&mapping))
    }

    /// Each of `claims` in `namespace` as it is now (without a cluster: unknown).
    pub async fn look_up(
        &self,
        namespace: &str,
        claims: &[String],
    ) -> Vec<(String, restore::ClaimNow)> {
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        use restore::ClaimNow;
        let lookups = claims.iter().enumerate().map(|(i, claim)| async move {
            let now = match &self.client {
                None => ClaimNow::Unknown("no cluster to look it up in".to_owned()),
                Some(_) if i >= MAX_LOOKUPS => {
                    ClaimNow::Unknown(format!("the pod restores more than {MAX_LOOKUPS} claims"))
                }
                Some(_) if !names::is_dns1123_subdomain(claim) => {
                    ClaimNow::Unknown("not a claim name".to_owned())
                }
                Some(client) => {
                    let api: Api<PersistentVolumeClaim> =
                        Api::namespaced(client.clone(), namespace);
                    match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_metadata_opt(claim)).await {
                        Ok(Ok(None)) => ClaimNow::Absent,
                        Ok(Ok(Some(meta))) => ClaimNow::Present {
                            restore: meta
                                .metadata
                                .labels
                                .and_then(|mut l| l.remove(names::VELERO_RESTORE_NAME)),
                        },
                        Ok(Err(e)) => ClaimNow::Unknown(e.to_string()),
                        Err(_) => ClaimNow::Unknown(format!("no answer within {LOOKUP_TIMEOUT:?}")),
                    }
                }
            };
            (claim.clone(), now)
        });
        futures::future::join_all(lookups).await
    }

    /// A Warning Event on each claim a restore was refused to write over.
    pub fn refused(&self, namespace: &str, claims: &[String], message: &str) {
        for claim in claims {
            let regarding = super::events::claim_reference(namespace, claim, None);
            self.events
                .warn(regarding, "RestoreRefused", "Restore", message.to_owned());
        }
    }
}
