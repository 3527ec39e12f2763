//! Self-managed webhook certificates (the default install): the leader keeps a private CA
//! in one Secret, the serving certificate in another (which the webhook replicas watch),
//! and the webhook configuration's `caBundle` in step. What to do next is
//! `policy::certs::next_step`; this file reads the objects, applies one step, and asks
//! again.
//!
//! - `--ca-secret` (`velero-jupyterhub-webhook-ca`, only the controller reads it):
//!   `ca.crt`/`ca.key` (signs), `next-ca.crt`/`next-ca.key` (introduced, not signing yet),
//!   `previous-ca.crt` (replaced, still trusted for the overlap).
//! - `--tls-secret` (`velero-jupyterhub-tls`, `kubernetes.io/tls`): `tls.crt`, `tls.key`,
//!   and `ca.crt`, the bundle.
//!
//! Secrets that exist without our `app.kubernetes.io/managed-by` label belong to someone
//! else (cert-manager, a hand-made certificate): they are never overwritten.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Resource as _};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::events::EventSink;
use crate::cluster::tls_secret::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::metrics::{Metrics, StepLabels};
use crate::names;
use crate::policy::certs::{self, CertOptions, CertState, CertStep, Serving, Validity};
use crate::tls::{Ca, CertInfo, TlsError};

pub const CA_SECRET: &str = "velero-jupyterhub-webhook-ca";
pub const TLS_SECRET: &str = "velero-jupyterhub-tls";
pub const WEBHOOK_CONFIGURATION: &str = "velero-jupyterhub";
pub const WEBHOOK_SERVICE: &str = "velero-jupyterhub";

const NEXT_CA_CRT: &str = "next-ca.crt";
const NEXT_CA_KEY: &str = "next-ca.key";
const PREVIOUS_CA_CRT: &str = "previous-ca.crt";
const CA_CRT: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
/// When the next CA entered the bundle, and when the current one replaced the previous.
const NEXT_INTRODUCED: &str = "velero-jupyterhub.io/next-ca-introduced";
const PROMOTED: &str = "velero-jupyterhub.io/ca-promoted";

#[derive(Clone, Debug)]
pub struct CertConfig {
    /// Where both Secrets live (the controller's namespace).
    pub namespace: String,
    pub ca_secret: String,
    pub tls_secret: String,
    pub webhook_configuration: String,
    /// The names the serving certificate carries (the Service's DNS names).
    pub names: Vec<String>,
    pub options: CertOptions,
    /// Check at least this often, even when nothing is due (a Secret deleted by hand).
    pub check_interval: Duration,
}

impl CertConfig {
    /// For the webhook reached through `service` in `namespace`.
    pub fn for_service(namespace: &str, service: &str, options: CertOptions) -> Self {
        Self {
            namespace: namespace.to_owned(),
            ca_secret: CA_SECRET.to_owned(),
            tls_secret: TLS_SECRET.to_owned(),
            webhook_configuration: WEBHOOK_CONFIGURATION.to_owned(),
            names: vec![
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ],
            options,
            check_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "Secret {0} exists but is not managed by velero-jupyterhub (no {label}={value} label): \
         it is left alone. Delete it to let the controller manage certificates, or run the \
         controller with --manage-certificates=false (e.g. with cert-manager, certs/)",
        label = names::MANAGED_BY, value = names::MANAGED_BY_US
    )]
    Foreign(String),
    #[error(
        "MutatingWebhookConfiguration {0} not found: install manifests/ (kubectl apply -k manifests/)"
    )]
    NoWebhookConfiguration(String),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Api(#[from] kube::Error),
}

/// Runs until `cancel`: checks, applies a step, and waits for the next due time, a
/// change of the webhook configuration (a re-apply of manifests/ that added an entry
/// without a `caBundle`), or `check_interval`.
pub async fn run(
    client: kube::Client,
    config: CertConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut keeper = Keeper::new(client.clone(), config.clone(), metrics.clone());
    let changed = Arc::new(tokio::sync::Notify::new());
    let watch = {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client);
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", config.webhook_configuration));
        let changed = changed.clone();
        async move {
            let mut stream = std::pin::pin!(watcher(api, config));
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    // Retried by the watcher; the periodic check covers the gap.
                    Err(_) => tokio::time::sleep(Duration::from_secs(5)).await,
                }
            }
        }
    };
    let watch = tokio::spawn(watch);
    let mut last_error: Option<String> = None;
    loop {
        let wait = match keeper.step().await {
            Ok(Some(until)) => {
                last_error = None;
                let left = until.duration_since(Timestamp::now());
                Duration::try_from(left)
                    .unwrap_or(Duration::ZERO)
                    .min(config.check_interval)
            }
            Ok(None) => continue,
            Err(e) => {
                metrics.controller.certificate_errors.inc();
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "self-managed certificates: check failed; retrying");
                    last_error = Some(msg);
                }
                Duration::from_secs(5).min(config.check_interval)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = changed.notified() => {}
            () = cancel.cancelled() => break,
        }
    }
    watch.abort();
}

/// The CAs as the CA Secret holds them.
#[derive(Default)]
struct Cas {
    current: Option<(CertInfo, String, String)>,
    next: Option<(CertInfo, String, String, Timestamp)>,
    previous: Option<(String, Timestamp)>,
}

impl Cas {
    fn read(secret: Option<&Secret>) -> Self {
        let Some(secret) = secret else {
            return Self::default();
        };
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let annotation = |key: &str| {
            secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .and_then(|v| v.parse::<Timestamp>().ok())
        };
        // A CA whose certificate or key does not parse counts as missing.
        let pair = |crt: &str, key: &str| {
            let (cert, key) = (text(crt)?, text(key)?);
            Ca::from_pem(&cert, &key).ok()?;
            Some((CertInfo::from_pem(cert.as_bytes())?, cert, key))
        };
        let current = pair(CA_CRT, CA_KEY_FILE);
        let next = pair(NEXT_CA_CRT, NEXT_CA_KEY).map(|(info, c, k)| {
            (
                info,
                c,
                k,
                annotation(NEXT_INTRODUCED).unwrap_or(Timestamp::UNIX_EPOCH),
            )
        });
        let previous = text(PREVIOUS_CA_CRT)
            .filter(|pem| CertInfo::from_pem(pem.as_bytes()).is_some())
            .map(|pem| (pem, annotation(PROMOTED).unwrap_or(Timestamp::UNIX_EPOCH)));
        Self {
            current,
            next,
            previous,
        }
    }

    /// What the API server must trust: previous, current and next CA, in that order.
    fn bundle(&self) -> String {
        let mut out = String::new();
        for pem in [
            self.previous.as_ref().map(|p| &p.0),
            self.current.as_ref().map(|c| &c.1),
            self.next.as_ref().map(|n| &n.1),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }

    fn secret_data(&self) -> (BTreeMap<String, ByteString>, BTreeMap<String, String>) {
        let mut data = BTreeMap::new();
        let mut annotations = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        };
        if let Some((_, cert, key)) = &self.current {
            put(CA_CRT, cert);
            put(CA_KEY_FILE, key);
        }
        if let Some((_, cert, key, at)) = &self.next {
            put(NEXT_CA_CRT, cert);
            put(NEXT_CA_KEY, key);
            annotations.insert(NEXT_INTRODUCED.to_owned(), at.to_string());
        }
        if let Some((cert, at)) = &self.previous {
            put(PREVIOUS_CA_CRT, cert);
            annotations.insert(PROMOTED.to_owned(), at.to_string());
        }
        (data, annotations)
    }
}

struct Keeper {
    secrets: Api<Secret>,
    webhooks: Api<MutatingWebhookConfiguration>,
    config: CertConfig,
    metrics: Arc<Metrics>,
    events: EventSink,
    /// The bundle every webhook entry was last seen holding, and since when (this
    /// leader's own observation: a new leader starts the overlap afresh).
    bundle_seen: Option<(String, Timestamp)>,
}

impl Keeper {
    fn new(client: kube::Client, config: CertConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), &config.namespace),
            webhooks: Api::all(client.clone()),
            events: EventSink::new(Some(client)),
            config,
            metrics,
            bundle_seen: None,
        }
    }

    /// One check: `Ok(None)` after applying a step (check again at once), `Ok(Some(t))`
    /// when nothing is due before `t`.
    async fn step(&mut self) -> Result<Option<Timestamp>, CertError> {
        let now = Timestamp::now();
        let ca_secret = self.owned(&self.config.ca_secret).await?;
        let tls_secret = self.owned(&self.config.tls_secret).await?;
        let webhook = self
            .webhooks
            .get_opt(&self.config.webhook_configuration)
            .await?
            .ok_or_else(|| {
                CertError::NoWebhookConfiguration(self.config.webhook_configuration.clone())
            })?;
        let cas = Cas::read(ca_secret.as_ref());
        if let Some((info, ..)) = &cas.current {
            self.metrics
                .controller
                .ca_expiry
                .set(info.validity.not_after.as_second());
        }
        let bundle = cas.bundle();
        let in_place = webhook
            .webhooks
            .as_deref()
            .unwrap_or_default()
            .iter()
            .all(|w| {
                w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                    == Some(bundle.as_bytes())
            });
        self.bundle_seen = match self.bundle_seen.take() {
            Some((seen, since)) if in_place && seen == bundle => Some((seen, since)),
            _ if in_place => Some((bundle.clone(), now)),
            _ => None,
        };
        let serving = tls_secret
            .as_ref()
            .and_then(|s| s.data.as_ref()?.get(CERT_KEY))
            .and_then(|pem| CertInfo::from_pem(&pem.0))
            .map(|cert| {
                let mut have = cert.names.clone();
                let mut want = self.config.names.clone();
                have.sort();
                want.sort();
                Serving {
                    validity: cert.validity,
                    signed_by_current: cas
                        .current
                        .as_ref()
                        .is_some_and(|(ca, ..)| cert.signed_by(ca)),
                    names_match: have == want,
                }
            });
        let state = CertState {
            current: cas.current.as_ref().map(|c| c.0.validity),
            next: cas.next.as_ref().map(|n| (n.0.validity, n.3)),
            previous: cas.previous.as_ref().map(|p| p.1),
            serving,
            bundle_in_place_since: self.bundle_seen.as_ref().map(|b| b.1),
        };
        let step = certs::next_step(&state, now, &self.config.options);
        let opts = self.config.options;
        let (label, note) = match step {
            CertStep::Wait { until } => return Ok(Some(until)),
            CertStep::Create => {
                let ca = new_ca(now, opts.ca_validity)?;
                let info = ca_info(&ca)?;
                let cas = Cas {
                    current: Some((info.clone(), ca.cert_pem(), ca.key_pem())),
                    ..Cas::default()
                };
                self.write_ca(ca_secret, &cas).await?;
                // The API server trusts the CA before any replica serves what it signed
                // (a replica is ready as soon as it has a certificate).
                self.write_bundle(webhook, &cas.bundle()).await?;
                self.write_serving(tls_secret, &ca, &info.validity, &cas.bundle(), now)
                    .await?;
                ("create", "made a new CA and serving certificate".to_owned())
            }
            CertStep::Introduce => {
                let ca = new_ca(now, opts.ca_validity)?;
                let next = Some((ca_info(&ca)?, ca.cert_pem(), ca.key_pem(), now));
                self.write_ca(ca_secret, &Cas { next, ..cas }).await?;
                (
                    "introduce",
                    "made the next CA; trusting it alongside the current one".to_owned(),
                )
            }
            CertStep::Promote => {
                let Some((info, cert, key, _)) = cas.next else {
                    return Ok(None);
                };
                let previous = cas.current.map(|(_, pem, _)| (pem, now));
                let cas = Cas {
                    current: Some((info.clone(), cert.clone(), key.clone())),
                    next: None,
                    previous,
                };
                self.write_ca(ca_secret, &cas).await?;
                let ca = Ca::from_pem(&cert, &key)?;
                self.write_serving(tls_secret, &ca, &info.validity, &cas.bundle(), now)
                    .await?;
                ("promote", "the next CA now signs the serving certificate; the previous one stays trusted for the overlap".to_owned())
            }
            CertStep::Issue(reason) => {
                let Some((info, cert, key)) = &cas.current else {
                    return Ok(None);
                };
                let ca = Ca::from_pem(cert, key)?;
                self.write_serving(tls_secret, &ca, &info.validity, &bundle, now)
                    .await?;
                (
                    "issue",
                    format!(
                        "issued a new serving certificate (the old one was {})",
                        reason.as_str()
                    ),
                )
            }
            CertStep::Retire => {
                self.write_ca(
                    ca_secret,
                    &Cas {
                        previous: None,
                        ..cas
                    },
                )
                .await?;
                ("retire", "the previous CA is no longer trusted".to_owned())
            }
            CertStep::WriteBundle => {
                self.write_bundle(webhook, &bundle).await?;
                if let Some(mut secret) = tls_secret {
                    let data = secret.data.get_or_insert_default();
                    if data.get(CA_KEY).map(|b| b.0.as_slice()) != Some(bundle.as_bytes()) {
                        data.insert(CA_KEY.to_owned(), ByteString(bundle.into_bytes()));
                        self.secrets
                            .replace(&self.config.tls_secret, &PostParams::default(), &secret)
                            .await?;
                        self.metrics.controller.write("update", "secrets");
                    }
                }
                (
                    "write_bundle",
                    format!("caBundle of {} updated", self.config.webhook_configuration),
                )
            }
        };
        self.metrics
            .controller
            .certificate_steps
            .get_or_create(&StepLabels { step: label })
            .inc();
        info!(step = label, "self-managed certificates: {note}");
        if label != "write_bundle" {
            self.events
                .normal(self.tls_reference(), "Certificates", label, note);
        }
        Ok(None)
    }

    /// The Secret, if it exists and is ours; a Secret of someone else's is an error.
    async fn owned(&self, name: &str) -> Result<Option<Secret>, CertError> {
        let secret = self.secrets.get_opt(name).await?;
        match secret {
            Some(s) if !is_ours(&s) => Err(CertError::Foreign(format!(
                "{}/{name}",
                self.config.namespace
            ))),
            other => Ok(other),
        }
    }

    async fn write_ca(&self, existing: Option<Secret>, cas: &Cas) -> Result<(), CertError> {
        let (data, annotations) = cas.secret_data();
        self.put(
            existing,
            &self.config.ca_secret,
            "Opaque",
            data,
            annotations,
        )
        .await
    }

    async fn write_serving(
        &self,
        existing: Option<Secret>,
        ca: &Ca,
        ca_validity: &Validity,
        bundle: &str,
        now: Timestamp,
    ) -> Result<(), CertError> {
        let validity = certs::issue_validity(now, self.config.options.cert_validity, ca_validity);
        let pair = ca.issue_serving_valid(&self.config.names, Some(validity))?;
        let data = BTreeMap::from([
            (CERT_KEY.to_owned(), ByteString(pair.cert_pem.into_bytes())),
            (KEY_KEY.to_owned(), ByteString(pair.key_pem.into_bytes())),
            (CA_KEY.to_owned(), ByteString(bundle.as_bytes().to_vec())),
        ]);
        self.put(
            existing,
            &self.config.tls_secret,
            "kubernetes.io/tls",
            data,
            BTreeMap::new(),
        )
        .await
    }

    /// Creates the Secret, or replaces the one read (its resourceVersion guards against a
    /// concurrent writer: a conflict fails this check, and the next one starts afresh).
    async fn put(
        &self,
        existing: Option<Secret>,
        name: &str,
        type_: &str,
        data: BTreeMap<String, ByteString>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), CertError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (
                        names::MANAGED_BY.to_owned(),
                        names::MANAGED_BY_US.to_owned(),
                    ),
                    (
                        "app.kubernetes.io/name".to_owned(),
                        "velero-jupyterhub".to_owned(),
                    ),
                ])),
                annotations: Some(annotations),
                resource_version: existing
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            type_: Some(
                existing
                    .as_ref()
                    .and_then(|s| s.type_.clone())
                    .unwrap_or_else(|| type_.to_owned()),
            ),
            data: Some(data),
            ..Secret::default()
        };
        let pp = PostParams::default();
        if existing.is_some() {
            self.secrets.replace(name, &pp, &secret).await?;
            self.metrics.controller.write("update", "secrets");
        } else {
            self.secrets.create(&pp, &secret).await?;
            self.metrics.controller.write("create", "secrets");
        }
        Ok(())
    }

    async fn write_bundle(
        &self,
        mut webhook: MutatingWebhookConfiguration,
        bundle: &str,
    ) -> Result<(), CertError> {
        for entry in webhook.webhooks.iter_mut().flatten() {
            entry.client_config.ca_bundle = Some(ByteString(bundle.as_bytes().to_vec()));
        }
        self.webhooks
            .replace(
                &self.config.webhook_configuration,
                &PostParams::default(),
                &webhook,
            )
            .await?;
        self.metrics
            .controller
            .write("update", "mutatingwebhookconfigurations");
        Ok(())
    }

    fn tls_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(Secret::api_version(&()).into_owned()),
            kind: Some(Secret::kind(&()).into_owned()),
            namespace: Some(self.config.namespace.clone()),
            name: Some(self.config.tls_secret.clone()),
            ..ObjectReference::default()
        }
    }
}

fn is_ours(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::MANAGED_BY))
        .is_some_and(|v| v == names::MANAGED_BY_US)
}

fn new_ca(now: Timestamp, validity: SignedDuration) -> Result<Ca, TlsError> {
    // The CA's own validity is bounded by nothing but itself.
    let unbounded = Validity {
        not_before: now,
        not_after: Timestamp::MAX,
    };
    let validity = certs::issue_validity(now, validity, &unbounded);
    let name = format!("velero-jupyterhub webhook CA {}", now.as_second());
    Ca::generate_valid(&name, Some(validity))
}

fn ca_info(ca: &Ca) -> Result<CertInfo, TlsError> {
    CertInfo::from_pem(ca.cert_pem().as_bytes()).ok_or(TlsError::NoCertificate)
}
