//! Serving certificates: PEM files reloaded when their content changes, or a self-signed
//! CA and serving certificate made in memory for development.
//!
//! Every new TLS handshake asks [`CertStore`] for the current certificate, so swapping it
//! affects only handshakes that start afterwards: no restart, no failed request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use k8s_openapi::jiff;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};
use x509_parser::extensions::GeneralName;

use crate::policy::certs::Validity;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("certificate PEM: {0}")]
    CertPem(String),
    #[error("private key PEM: {0}")]
    KeyPem(String),
    #[error("certificate and key do not belong together, or the key is unusable: {0}")]
    Mismatch(rustls::Error),
    #[error("certificate validity: {0}")]
    Validity(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The crypto provider for everything TLS in this process (ring: small and fast to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider (the kube client relies on it).
/// Harmless when already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificate presented by the server; empty until the first one is loaded (the
/// handshake is then refused and `/readyz` says why).
#[derive(Default)]
pub struct CertStore {
    current: ArcSwapOption<CertifiedKey>,
    /// Where the expiry of the certificate in use is published, if anywhere.
    metrics: Option<Arc<Metrics>>,
}

impl CertStore {
    /// A store that publishes the expiry of each certificate it is given.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            metrics: Some(metrics),
        }
    }

    pub fn set(&self, key: CertifiedKey) {
        if let Some(metrics) = &self.metrics {
            match key.cert.first().and_then(|leaf| not_after(leaf)) {
                Some(expiry) => {
                    metrics.set_tls_expiry(expiry);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                    if expiry <= now {
                        warn!(
                            expiry,
                            "the serving certificate has expired: the API server will refuse it"
                        );
                    }
                }
                None => warn!("could not read the serving certificate's expiry"),
            }
        }
        self.current.store(Some(Arc::new(key)));
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// When a certificate expires (`notAfter`, Unix seconds).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// A rustls server configuration (TLS 1.2 and 1.3, HTTP/1.1) over a [`CertStore`].
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Parses a PEM certificate chain and private key, checking that they belong together.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::CertPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::KeyPem(e.to_string()))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(TlsError::Mismatch)
}

/// `--tls-cert`/`--tls-key`: PEM files, e.g. a Kubernetes Secret volume.
#[derive(Clone, Debug)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PemFiles {
    /// Reads both files through their paths (so a Secret volume's `..data` symlink swap is
    /// followed).
    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read = |path: &Path| {
            let path = path.to_owned();
            async move {
                tokio::fs::read(&path)
                    .await
                    .map_err(|source| TlsError::Read { path, source })
            }
        };
        Ok((read(&self.cert).await?, read(&self.key).await?))
    }
}

/// Loads certificate/key pairs into a [`CertStore`] as a source offers them (files,
/// a Secret): each distinct pair is handled once; a half-written or mismatched pair is
/// reported and the old certificate stays in use.
pub struct Loader {
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    /// The content last looked at (loaded or rejected).
    seen: Option<(Vec<u8>, Vec<u8>)>,
}

impl Loader {
    pub fn new(store: Arc<CertStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            seen: None,
        }
    }

    /// Returns whether a new certificate was loaded.
    pub fn offer(&mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<bool, TlsError> {
        let content = (cert_pem, key_pem);
        if self.seen.as_ref() == Some(&content) {
            return Ok(false);
        }
        let result = certified_key_from_pem(&content.0, &content.1);
        self.seen = Some(content);
        self.metrics.tls_reload(result.is_ok());
        self.store.set(result?);
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.store.is_loaded()
    }
}

/// Keeps a [`CertStore`] in step with PEM files: polls their content every `interval` and
/// swaps in a new certificate when it changes and parses.
pub struct FileReloader {
    files: PemFiles,
    loader: Loader,
}

impl FileReloader {
    pub fn new(files: PemFiles, store: Arc<CertStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            files,
            loader: Loader::new(store, metrics),
        }
    }

    /// Checks the files once; returns whether a new certificate was loaded.
    pub async fn poll(&mut self) -> Result<bool, TlsError> {
        let (cert, key) = self.files.read().await?;
        self.loader.offer(cert, key)
    }

    /// Polls forever (until the task is dropped).
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            match self.poll().await {
                Ok(true) => {
                    info!(cert = %self.files.cert.display(), "loaded serving certificate");
                    last_error = None;
                }
                Ok(false) => {}
                Err(e) => {
                    // Say it once per distinct problem, not every few seconds.
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(&msg) {
                        warn!(error = %msg, loaded = self.loader.is_loaded(), "serving certificate not (re)loaded; will retry");
                        last_error = Some(msg);
                    }
                }
            }
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl PemPair {
    pub fn certified_key(&self) -> Result<CertifiedKey, TlsError> {
        certified_key_from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// A private certificate authority that issues serving certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    /// A new CA with rcgen's default validity (development and tests).
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        Self::generate_valid(common_name, None)
    }

    /// A new CA, valid for `validity` when given.
    pub fn generate_valid(common_name: &str, validity: Option<Validity>) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA kept as PEM (a Secret), to sign with again. The key must be the
    /// certificate's (else what it signs would never verify).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::KeyPem(e.to_string()))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::CertPem(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| TlsError::CertPem(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::KeyPem(
                "the CA key does not belong to the CA certificate".to_owned(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| TlsError::CertPem(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A serving certificate for `names` (DNS names or IP addresses), with a fresh key and
    /// rcgen's default validity.
    pub fn issue_serving(&self, names: &[String]) -> Result<PemPair, TlsError> {
        self.issue_serving_valid(names, None)
    }

    /// A serving certificate for `names`, valid for `validity` when given.
    pub fn issue_serving_valid(
        &self,
        names: &[String],
        validity: Option<Validity>,
    ) -> Result<PemPair, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name =
            distinguished_name(names.first().map_or("velero-jupyterhub", String::as_str));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn set_validity(
    params: &mut CertificateParams,
    validity: Option<Validity>,
) -> Result<(), TlsError> {
    let Some(v) = validity else { return Ok(()) };
    let date = |t: jiff::Timestamp| {
        time::OffsetDateTime::from_unix_timestamp(t.as_second())
            .map_err(|e| TlsError::Validity(e.to_string()))
    };
    params.not_before = date(v.not_before)?;
    params.not_after = date(v.not_after)?;
    Ok(())
}

/// What the certificate planner reads from a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub validity: Validity,
    /// Subject alternative names: DNS names, and IP addresses as text.
    pub names: Vec<String>,
    pub der: CertificateDer<'static>,
}

impl CertInfo {
    /// The first certificate of PEM text; `None` when there is none or it does not parse.
    pub fn from_pem(pem: &[u8]) -> Option<Self> {
        let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let timestamp =
            |t: x509_parser::time::ASN1Time| jiff::Timestamp::from_second(t.timestamp()).ok();
        let validity = Validity {
            not_before: timestamp(cert.validity().not_before)?,
            not_after: timestamp(cert.validity().not_after)?,
        };
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => names.push((*n).to_owned()),
                    GeneralName::IPAddress(ip) => {
                        let ip = match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                            _ => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        drop(cert);
        Some(Self {
            validity,
            names,
            der: der.into_owned(),
        })
    }

    /// Whether `ca`'s key signed this certificate.
    pub fn signed_by(&self, ca: &CertInfo) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(self.der.as_ref()) else {
            return false;
        };
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca.der.as_ref()) else {
            return false;
        };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// `--self-signed`: a CA and a serving certificate for `localhost`, `127.0.0.1` and
/// `extra_names`, in memory. Returns the serving pair and the CA bundle (PEM).
pub fn self_signed(extra_names: &[String]) -> Result<(PemPair, String), TlsError> {
    let ca = Ca::generate("velero-jupyterhub development CA")?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(
        extra_names
            .iter()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let pair = ca.issue_serving(&names)?;
    Ok((pair, ca.cert_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_pair_loads_and_mismatched_pair_is_refused() {
        let ca = Ca::generate("test").unwrap();
        let a = ca.issue_serving(&["localhost".into()]).unwrap();
        let b = ca.issue_serving(&["localhost".into()]).unwrap();
        assert!(a.certified_key().is_ok());
        let err = certified_key_from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch(_)), "{err}");
        assert!(matches!(
            certified_key_from_pem(b"", a.key_pem.as_bytes()),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            certified_key_from_pem(a.cert_pem.as_bytes(), b"junk"),
            Err(TlsError::KeyPem(_))
        ));
    }

    /// A CA read back from its PEM (as from a Secret) signs again, its certificates
    /// verify against it and not against another CA, and validity and names read back.
    #[test]
    fn a_stored_ca_signs_again_and_its_certificates_say_so() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let validity = Validity {
            not_before: t("2026-01-01T00:00:00Z"),
            not_after: t("2027-01-01T00:00:00Z"),
        };
        let ca = Ca::generate_valid("stored", Some(validity)).unwrap();
        let stored = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let other = Ca::generate("other").unwrap();
        let names = vec![
            "svc.ns.svc".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let serving_validity = Validity {
            not_before: t("2026-02-01T00:00:00Z"),
            not_after: t("2026-05-01T00:00:00Z"),
        };
        let pair = stored
            .issue_serving_valid(&names, Some(serving_validity))
            .unwrap();
        assert!(pair.certified_key().is_ok());
        let cert = CertInfo::from_pem(pair.cert_pem.as_bytes()).unwrap();
        let ca_info = CertInfo::from_pem(ca.cert_pem().as_bytes()).unwrap();
        let other_info = CertInfo::from_pem(other.cert_pem().as_bytes()).unwrap();
        assert_eq!(cert.validity, serving_validity);
        assert_eq!(ca_info.validity, validity);
        assert_eq!(cert.names, names);
        assert!(cert.signed_by(&ca_info));
        assert!(!cert.signed_by(&other_info));
        assert!(CertInfo::from_pem(b"not a certificate").is_none());
        // A CA certificate with someone else's key would sign certificates that never
        // verify: refused.
        assert!(matches!(
            Ca::from_pem(&ca.cert_pem(), &other.key_pem()),
            Err(TlsError::KeyPem(_))
        ));
    }

    #[tokio::test]
    async fn reloader_swaps_only_on_valid_change() {
        let dir = tempfile::tempdir().unwrap();
        let files = PemFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let ca = Ca::generate("test").unwrap();
        let first = ca.issue_serving(&["localhost".into()]).unwrap();
        std::fs::write(&files.cert, &first.cert_pem).unwrap();
        std::fs::write(&files.key, &first.key_pem).unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(CertStore::new(metrics.clone()));
        let mut reloader = FileReloader::new(files.clone(), store.clone(), metrics.clone());
        assert!(reloader.poll().await.unwrap());
        assert!(
            !reloader.poll().await.unwrap(),
            "unchanged content is not reloaded"
        );
        let before = store.current.load_full().unwrap();

        // A half-written pair (new cert, old key) is refused; the old certificate stays.
        let second = ca.issue_serving(&["localhost".into()]).unwrap();
        std::fs::write(&files.cert, &second.cert_pem).unwrap();
        assert!(reloader.poll().await.is_err());
        assert!(Arc::ptr_eq(&before, &store.current.load_full().unwrap()));
        std::fs::write(&files.key, &second.key_pem).unwrap();
        assert!(reloader.poll().await.unwrap());
        assert!(!Arc::ptr_eq(&before, &store.current.load_full().unwrap()));
        let text = metrics.encode();
        let errors = r#"velero_jupyterhub_tls_reloads_total{result="error"}"#;
        assert_eq!(crate::metrics::sample(&text, errors), Some(1.0));
        // The expiry of the certificate in use is published (rcgen's default notAfter is
        // 4096-01-01).
        let expiry = "velero_jupyterhub_tls_certificate_expiry_timestamp_seconds";
        assert_eq!(
            crate::metrics::sample(&text, expiry),
            Some(67_090_118_400.0)
        );
    }
}
