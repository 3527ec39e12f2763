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
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Resource as _};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::events::EventSink;
use crate::cluster::tls_secret::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::metrics::{Metrics, ReasonLabels, StepLabels};
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
    #[error(
        "the webhook configuration {configuration} calls Service {called}, but the serving \
         certificate would be for {ours}: set --webhook-service and --namespace to match"
    )]
    WrongService {
        configuration: String,
        called: String,
        ours: String,
    },
    #[error(
        "the same step ({0}) was needed {CHURN_LIMIT} times in a row: something else keeps \
         changing the certificates or the caBundle (a cert-manager CA injector annotation, a \
         GitOps tool reverting the webhook configuration?); backing off"
    )]
    Churn(&'static str),
    #[error("building the caBundle patch: {0}")]
    Patch(String),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Api(#[from] kube::Error),
}

impl CertError {
    /// The `reason` label of `certificate_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::Foreign(_) => "foreign_secret",
            CertError::NoWebhookConfiguration(_) => "no_webhook_configuration",
            CertError::WrongService { .. } => "wrong_service",
            CertError::Churn(_) => "churn",
            CertError::Patch(_) | CertError::Tls(_) => "tls",
            CertError::Api(_) => "api",
        }
    }
}

/// A step needed this many times in a row (no wait between) means a fight with another
/// writer, or a bug: stop writing and back off.
const CHURN_LIMIT: u32 = 8;
/// At least this long between two writing steps.
const STEP_GAP: Duration = Duration::from_millis(100);

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
    let mut errors_in_a_row = 0u32;
    let mut repeats: (Option<&'static str>, u32) = (None, 0);
    loop {
        let result = match keeper.step().await {
            Ok(Stepped::Took(step)) if repeats.0 == Some(step) && repeats.1 + 1 >= CHURN_LIMIT => {
                repeats = (None, 0);
                Err(CertError::Churn(step))
            }
            other => other,
        };
        let wait = match result {
            Ok(Stepped::Wait(until)) => {
                last_error = None;
                errors_in_a_row = 0;
                repeats = (None, 0);
                let left = until.duration_since(Timestamp::now());
                Duration::try_from(left)
                    .unwrap_or(Duration::ZERO)
                    .min(config.check_interval)
            }
            Ok(Stepped::Took(step)) => {
                repeats = match repeats {
                    (Some(last), n) if last == step => (Some(step), n + 1),
                    _ => (Some(step), 1),
                };
                STEP_GAP
            }
            Err(e) => {
                // Fixed by a change we watch (the configuration created, or pointed at
                // our Service): act on it at once.
                let cured_by_change = matches!(
                    e,
                    CertError::NoWebhookConfiguration(_) | CertError::WrongService { .. }
                );
                metrics
                    .controller
                    .certificate_errors
                    .get_or_create(&ReasonLabels { reason: e.reason() })
                    .inc();
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "self-managed certificates: check failed; retrying");
                    last_error = Some(msg);
                }
                errors_in_a_row = errors_in_a_row.saturating_add(1);
                let wait = certs::retry_after(errors_in_a_row);
                if !cured_by_change {
                    // Not cut short by changes: a writer fighting over the caBundle must
                    // not set our pace.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancel.cancelled() => break,
                    }
                    continue;
                }
                wait
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

/// What one check did.
enum Stepped {
    /// Wrote something (check again at once, after a short gap).
    Took(&'static str),
    /// Nothing is due before this time.
    Wait(Timestamp),
}

/// The CAs as the CA Secret holds them.
#[derive(Default)]
struct Cas {
    current: Option<(CertInfo, String, String)>,
    next: Option<(CertInfo, String, String, Timestamp)>,
    previous: Option<(String, Timestamp)>,
}

impl Cas {
    /// `future`: timestamps read from the annotations that lay in the future, and when
    /// this leader first saw each (a time in the future would put
    /// a promotion or a retirement off for as long). Such a time counts from when it was
    /// first seen; entries no longer read are dropped.
    fn read(
        secret: Option<&Secret>,
        now: Timestamp,
        future: &mut std::collections::HashMap<String, Timestamp>,
    ) -> Self {
        let Some(secret) = secret else {
            future.clear();
            return Self::default();
        };
        let mut still_read = std::collections::HashSet::new();
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let mut annotation = |key: &str| {
            let value = secret.metadata.annotations.as_ref()?.get(key)?;
            let at = value.parse::<Timestamp>().ok()?;
            let seen = format!("{key}={value}");
            // Kept while the same value is stored, so the time does not jump forward
            // once the written one is reached.
            let first = match future.get(&seen) {
                Some(first) => *first,
                None if at > now => *future.entry(seen.clone()).or_insert(now),
                None => return Some(at),
            };
            still_read.insert(seen);
            Some(at.min(first))
        };
        // A CA whose certificate or key does not parse counts as missing.
        let pair = |crt: &str, key: &str| {
            let (cert, key) = (text(crt)?, text(key)?);
            Ca::from_pem(&cert, &key).ok()?;
            Some((CertInfo::from_pem(cert.as_bytes())?, cert, key))
        };
        let current = pair(CA_CRT, CA_KEY_FILE);
        let introduced = annotation(NEXT_INTRODUCED);
        let promoted = annotation(PROMOTED);
        future.retain(|k, _| still_read.contains(k));
        let next = pair(NEXT_CA_CRT, NEXT_CA_KEY)
            .map(|(info, c, k)| (info, c, k, introduced.unwrap_or(Timestamp::UNIX_EPOCH)));
        let previous = text(PREVIOUS_CA_CRT)
            .filter(|pem| CertInfo::from_pem(pem.as_bytes()).is_some())
            .map(|pem| (pem, promoted.unwrap_or(Timestamp::UNIX_EPOCH)));
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
    /// Annotation times in the future, and when first seen (`Cas::read`).
    future_seen: std::collections::HashMap<String, Timestamp>,
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
            future_seen: Default::default(),
        }
    }

    /// One check: read, decide, apply at most one step.
    async fn step(&mut self) -> Result<Stepped, CertError> {
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
        self.check_service(&webhook)?;
        let mut cas = Cas::read(ca_secret.as_ref(), now, &mut self.future_seen);
        // The CA is lost (Secret deleted, unreadable) but what replicas serve is still
        // trusted: keep trusting its CA (without its key) until a new one took over.
        let mut orphan_trusted = false;
        if cas.current.is_none()
            && cas.previous.is_none()
            && let Some(orphan) = orphan_ca(tls_secret.as_ref(), &webhook, now)
        {
            cas.previous = Some((orphan, now));
            orphan_trusted = true;
        }
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
            orphan_trusted,
        };
        // The TLS Secret's ca.crt (for clients such as `curl --cacert`) follows the bundle
        // once it is in place; not a step of its own.
        if let (true, Some(secret)) = (in_place, &tls_secret) {
            let stored = secret.data.as_ref().and_then(|d| d.get(CA_KEY));
            if stored.is_some_and(|b| b.0 != bundle.as_bytes()) {
                let mut data = secret.data.clone().unwrap_or_default();
                data.insert(CA_KEY.to_owned(), ByteString(bundle.clone().into_bytes()));
                self.put(
                    Some(secret.clone()),
                    &self.config.tls_secret,
                    "kubernetes.io/tls",
                    data,
                    BTreeMap::new(),
                )
                .await?;
                return Ok(Stepped::Took("bundle_copy"));
            }
        }
        let step = certs::next_step(&state, now, &self.config.options);
        let opts = self.config.options;
        let (label, note) = match step {
            CertStep::Wait { until } => return Ok(Stepped::Wait(until)),
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
                    return Ok(Stepped::Wait(now));
                };
                // The CA that signed what is served now stays trusted: the current one,
                // or (the CA lost) the one kept from the bundle.
                let previous = cas
                    .current
                    .map(|(_, pem, _)| (pem, now))
                    .or(cas.previous.map(|(pem, _)| (pem, now)));
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
                    return Ok(Stepped::Wait(now));
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
        Ok(Stepped::Took(label))
    }

    /// The names the certificate carries must be those the API server calls: compare
    /// with the Service the webhook entries name (entries with a `url` are left alone).
    fn check_service(&self, webhook: &MutatingWebhookConfiguration) -> Result<(), CertError> {
        for entry in webhook.webhooks.iter().flatten() {
            if let Some(service) = &entry.client_config.service {
                let called = format!("{}.{}.svc", service.name, service.namespace);
                if !self.config.names.contains(&called) {
                    return Err(CertError::WrongService {
                        configuration: self.config.webhook_configuration.clone(),
                        called,
                        ours: self.config.names.join(", "),
                    });
                }
            }
        }
        Ok(())
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

    /// Creates the Secret, or replaces the one read, keeping its other metadata (labels,
    /// annotations, finalizers someone added); its resourceVersion guards against a
    /// concurrent writer (a conflict fails this check; the next one starts afresh).
    /// Both Secrets are excluded from Velero backups: a backup must not carry the CA's
    /// private key to object storage, and a restored old certificate helps nobody.
    async fn put(
        &self,
        existing: Option<Secret>,
        name: &str,
        type_: &str,
        data: BTreeMap<String, ByteString>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), CertError> {
        let create = existing.is_none();
        let mut secret = existing.unwrap_or_else(|| Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            type_: Some(type_.to_owned()),
            ..Secret::default()
        });
        let labels = secret.metadata.labels.get_or_insert_default();
        for (k, v) in [
            (names::MANAGED_BY, names::MANAGED_BY_US),
            ("app.kubernetes.io/name", "velero-jupyterhub"),
            ("velero.io/exclude-from-backup", "true"),
        ] {
            labels.insert(k.to_owned(), v.to_owned());
        }
        // Our annotations are rewritten whole; anyone else's stay.
        let kept = secret.metadata.annotations.get_or_insert_default();
        kept.retain(|k, _| k != NEXT_INTRODUCED && k != PROMOTED);
        kept.extend(annotations);
        secret.data = Some(data);
        let pp = PostParams::default();
        if create {
            self.secrets.create(&pp, &secret).await?;
            self.metrics.controller.write("create", "secrets");
        } else {
            self.secrets.replace(name, &pp, &secret).await?;
            self.metrics.controller.write("update", "secrets");
        }
        Ok(())
    }

    /// Sets every entry's `caBundle` with a JSON patch (only that field, guarded by the
    /// resourceVersion read), so fields this build's API types do not know survive.
    async fn write_bundle(
        &self,
        webhook: MutatingWebhookConfiguration,
        bundle: &str,
    ) -> Result<(), CertError> {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
        let mut ops = vec![serde_json::json!({
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": webhook.metadata.resource_version,
        })];
        for i in 0..webhook.webhooks.as_ref().map_or(0, Vec::len) {
            ops.push(serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": encoded,
            }));
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| CertError::Patch(e.to_string()))?;
        self.webhooks
            .patch(
                &self.config.webhook_configuration,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await?;
        self.metrics
            .controller
            .write("patch", "mutatingwebhookconfigurations");
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

/// The CA, among those the webhook configuration trusts now (what the API server
/// verifies against: the TLS Secret's `ca.crt` is a copy for other clients, and no
/// source of trust), that signed the unexpired certificate in the TLS Secret (PEM), if
/// any.
fn orphan_ca(
    tls: Option<&Secret>,
    webhook: &MutatingWebhookConfiguration,
    now: Timestamp,
) -> Option<String> {
    let data = tls?.data.as_ref()?;
    let serving = CertInfo::from_pem(&data.get(CERT_KEY)?.0)?;
    if !serving.validity.usable_at(now) {
        return None;
    }
    let trusted = webhook
        .webhooks
        .iter()
        .flatten()
        .filter_map(|w| w.client_config.ca_bundle.as_ref());
    for bundle in trusted {
        for der in CertificateDer::pem_slice_iter(&bundle.0).flatten() {
            let pem = pem_of(&der);
            if CertInfo::from_pem(pem.as_bytes()).is_some_and(|ca| serving.signed_by(&ca)) {
                return Some(pem);
            }
        }
    }
    None
}

/// A certificate as PEM text.
fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;

    fn secret(data: &[(&str, String)], annotations: &[(&str, String)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.clone().into_bytes())))
                    .collect(),
            ),
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A time in the future in the CA Secret's annotations put a
    /// promotion (or a retirement) off for as long. It now counts from when this leader
    /// first saw it, so the overlap runs out as if it had been written then.
    #[test]
    fn future_annotation_times_count_from_when_first_seen() {
        let ca = Ca::generate("current").expect("ca");
        let next = Ca::generate("next").expect("ca");
        let now: Timestamp = "2026-12-07T10:00:00Z".parse().expect("time");
        let far = "2099-01-01T00:00:00Z".to_owned();
        let past = "2026-12-01T00:00:00Z".to_owned();
        let stored = secret(
            &[
                (CA_CRT, ca.cert_pem()),
                (CA_KEY_FILE, ca.key_pem()),
                (NEXT_CA_CRT, next.cert_pem()),
                (NEXT_CA_KEY, next.key_pem()),
                (PREVIOUS_CA_CRT, ca.cert_pem()),
            ],
            &[(NEXT_INTRODUCED, far.clone()), (PROMOTED, past.clone())],
        );
        let mut seen = std::collections::HashMap::new();
        let cas = Cas::read(Some(&stored), now, &mut seen);
        assert_eq!(cas.next.as_ref().map(|n| n.3), Some(now), "clamped to now");
        assert_eq!(
            cas.previous.as_ref().map(|p| p.1),
            past.parse().ok(),
            "a past time as written"
        );
        // Ten minutes later the same value still counts from when it was first seen, so
        // the overlap (5 minutes by default) has run out.
        let later = now + SignedDuration::from_mins(10);
        let cas = Cas::read(Some(&stored), later, &mut seen);
        assert_eq!(cas.next.as_ref().map(|n| n.3), Some(now));
        // Once the written time is reached it does not jump forward to it.
        let beyond = "2099-06-01T00:00:00Z".parse().expect("time");
        let cas = Cas::read(Some(&stored), beyond, &mut seen);
        assert_eq!(cas.next.as_ref().map(|n| n.3), Some(now));
        // Another future value starts afresh; what is no longer read is forgotten.
        let rewritten = secret(
            &[(CA_CRT, ca.cert_pem()), (CA_KEY_FILE, ca.key_pem())],
            &[(PROMOTED, far)],
        );
        let cas = Cas::read(Some(&rewritten), later, &mut seen);
        assert!(cas.next.is_none());
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(Cas::read(None, later, &mut seen).current.is_none());
        assert!(seen.is_empty());
    }

    /// The TLS Secret's `ca.crt` is a copy for other clients; only
    /// what the webhook configuration trusts (the API server verifies against it) makes a
    /// served certificate whose CA is lost worth keeping trusted.
    #[test]
    fn only_the_webhook_configurations_bundle_is_trusted() {
        let now = Timestamp::now();
        let ca = Ca::generate("lost").expect("ca");
        let serving = ca
            .issue_serving(&["velero-jupyterhub.velero-jupyterhub.svc".to_owned()])
            .expect("serving");
        let tls = secret(
            &[
                (CERT_KEY, serving.cert_pem.clone()),
                (KEY_KEY, serving.key_pem.clone()),
                (CA_KEY, ca.cert_pem()),
            ],
            &[],
        );
        let configuration = |bundle: Option<String>| MutatingWebhookConfiguration {
            webhooks: Some(vec![MutatingWebhook {
                client_config: k8s_openapi::api::admissionregistration::v1::WebhookClientConfig {
                    ca_bundle: bundle.map(|b| ByteString(b.into_bytes())),
                    ..Default::default()
                },
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            orphan_ca(Some(&tls), &configuration(None), now),
            None,
            "ca.crt alone is no trust"
        );
        let other = Ca::generate("other").expect("ca");
        assert_eq!(
            orphan_ca(Some(&tls), &configuration(Some(other.cert_pem())), now),
            None
        );
        let trusted = orphan_ca(Some(&tls), &configuration(Some(ca.cert_pem())), now)
            .expect("the configuration's bundle holds its CA");
        assert!(trusted.contains("BEGIN CERTIFICATE"));
    }
}
