//! The command line: `serve` (the webhook server) and `review` (one AdmissionReview from
//! stdin or a file, answered exactly as `serve` would). Every flag is also an env var.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::policy::{ClaimGlobs, StaticNamespaces};
use crate::server::{self, TlsSource};
use crate::telemetry::{self, LogFormat};
use crate::tls::PemFiles;
use crate::webhook::serve::ServeOptions;
use crate::{admission, names};

#[derive(Debug, Parser)]
#[command(
    name = "velero-jupyterhub",
    version,
    about = "Velero file-system backups that work for JupyterHub users' home volumes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(
        long,
        env = "VJH_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter: a level or tracing directives (e.g. `info,kube=warn`).
    #[arg(long, env = "VJH_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the admission webhook server (HTTPS) and its health/metrics endpoints (HTTP).
    Serve(ServeArgs),
    /// Answer one AdmissionReview (JSON) from stdin or a file, exactly as `serve` would.
    Review(ReviewArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("tls").required(true).args(["tls_cert", "self_signed"])))]
pub struct ServeArgs {
    /// HTTPS address for `POST /mutate`.
    #[arg(long, env = "VJH_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain HTTP address for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "VJH_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when its content changes.
    #[arg(long, env = "VJH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the serving certificate (PEM); reloaded with the certificate.
    #[arg(long, env = "VJH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often to check the certificate files for changes.
    #[arg(long, env = "VJH_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
    /// Development: make a CA and a serving certificate for localhost, 127.0.0.1 and
    /// `--dns-name` in memory.
    #[arg(long, env = "VJH_SELF_SIGNED", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub self_signed: bool,
    /// Extra names for the self-signed certificate (repeat or comma-separate).
    #[arg(
        long = "dns-name",
        env = "VJH_DNS_NAMES",
        value_delimiter = ',',
        requires = "self_signed"
    )]
    pub dns_names: Vec<String>,
    /// With `--self-signed`: write the CA bundle (PEM) here, for `caBundle` or `curl --cacert`.
    #[arg(long, env = "VJH_CA_OUT", requires = "self_signed")]
    pub ca_out: Option<PathBuf>,
    /// Claim-name globs used when a namespace has no `velero-jupyterhub.io/claims` annotation.
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// Run without any API server (webhook only; every namespace uses `--claims`).
    #[arg(long, env = "VJH_NO_CLUSTER")]
    pub no_cluster: bool,
    /// Close connections that send no complete request head for this long (slow or idle
    /// clients, including idle keep-alive connections).
    #[arg(long, env = "VJH_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// AdmissionReviews read and reviewed at once; more wait (each may be up to 3 MiB, so
    /// this bounds memory).
    #[arg(long, env = "VJH_MAX_CONCURRENT_REVIEWS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_reviews: u32,
    /// Open connections at most; past it, new ones wait in the listen backlog.
    #[arg(long, env = "VJH_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// After SIGTERM, keep serving (reporting not ready) this long before closing the listener.
    #[arg(long, env = "VJH_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// After closing the listener, how long in-flight requests may take to finish.
    #[arg(long, env = "VJH_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// Read the AdmissionReview from this file instead of stdin (`-` is stdin).
    #[arg(short = 'f', long = "file", env = "VJH_REVIEW_FILE")]
    pub file: Option<PathBuf>,
    /// Claim-name globs for namespaces without `--namespace-claims`.
    #[arg(long, env = "VJH_CLAIMS", default_value = names::DEFAULT_CLAIM_GLOBS)]
    pub claims: ClaimGlobs,
    /// Claim globs for one namespace, as its `velero-jupyterhub.io/claims` annotation
    /// would give them: `NS=GLOBS` (repeatable).
    #[arg(long = "namespace-claims", value_parser = parse_namespace_claims)]
    pub namespace_claims: Vec<(String, ClaimGlobs)>,
    /// The input is a Pod (JSON, e.g. `kubectl get pod NAME -o json`), not an
    /// AdmissionReview: review it as if it were being created.
    #[arg(long)]
    pub pod: bool,
    /// Also explain on stderr, per volume, why it was or was not listed.
    #[arg(long)]
    pub explain: bool,
}

fn parse_namespace_claims(s: &str) -> Result<(String, ClaimGlobs), String> {
    let (ns, globs) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NS=GLOBS, got {s:?}"))?;
    if ns.is_empty() {
        return Err(format!("empty namespace in {s:?}"));
    }
    Ok((
        ns.to_owned(),
        ClaimGlobs::parse(globs).map_err(|e| e.to_string())?,
    ))
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(cli.log_format, &cli.log_level)?;
            serve(args).await.map(|()| 0)
        }
        Command::Review(args) => review(args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let signalled = shutdown_signal()?;
    crate::tls::install_default_provider();
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => TlsSource::Files {
            files: PemFiles { cert, key },
            reload_interval: args.tls_reload_interval,
        },
        _ => TlsSource::SelfSigned {
            dns_names: args.dns_names,
            ca_out: args.ca_out,
        },
    };
    let cluster = if args.no_cluster {
        None
    } else {
        let client = crate::cluster::try_client()
            .await
            .context("connecting to the Kubernetes API")?;
        if client.is_none() {
            tracing::warn!(
                "no kubeconfig or in-cluster config found: running without a cluster (as with --no-cluster)"
            );
        }
        client
    };
    let running = server::start(server::Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls,
        default_claims: args.claims,
        cluster,
        serve: ServeOptions {
            idle_timeout: args.idle_timeout,
            shutdown_grace: args.shutdown_grace,
            max_concurrent_reviews: args.max_concurrent_reviews as usize,
            max_connections: args.max_connections as usize,
            ..Default::default()
        },
        shutdown_delay: args.shutdown_delay,
    })
    .await?;
    signalled.await;
    running.shutdown();
    running.stopped().await;
    Ok(())
}

/// Registers for SIGTERM and SIGINT now (before the server starts, so an early signal is
/// not lost to the default action) and resolves when one arrives.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn review(args: ReviewArgs) -> anyhow::Result<i32> {
    let mut body = Vec::new();
    match args.file.as_deref() {
        Some(path) if path.as_os_str() != "-" => {
            body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading stdin")?;
        }
    }
    if args.pod {
        body = match admission::pod_create_review(&body) {
            Ok(review) => review,
            Err(e) => {
                eprintln!("velero-jupyterhub review --pod: {e}");
                return Ok(2);
            }
        };
    }
    let mut namespaces = StaticNamespaces::new(args.claims);
    namespaces.overrides = args
        .namespace_claims
        .into_iter()
        .map(|(ns, g)| (ns, Arc::new(g)))
        .collect::<HashMap<_, _>>();

    let reviewed = match admission::review(&body, &namespaces, args.explain) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("velero-jupyterhub review: {e}");
            return Ok(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&reviewed.body)?;
    stdout.write_all(b"\n")?;
    if args.explain {
        eprint!("{}", explain_text(&reviewed));
    }
    Ok(0)
}

/// The `--explain` report: the verdict, then one line per volume.
pub fn explain_text(r: &admission::Reviewed) -> String {
    let mut out = format!(
        "{} {}: {}\n",
        r.object.as_deref().unwrap_or("(not a pod)"),
        r.uid,
        r.outcome.as_str()
    );
    if let Some(detail) = &r.detail {
        out.push_str(&format!("  {detail}\n"));
    }
    for v in &r.explanation {
        let claim = v
            .claim
            .as_deref()
            .map(|c| format!(" (claim {c})"))
            .unwrap_or_default();
        out.push_str(&format!("  {}{}: {}\n", v.volume, claim, v.reason));
    }
    if let Ok(Some(patch)) = admission::decode_patch(&r.body) {
        out.push_str(&format!(
            "  patch: {}\n",
            serde_json::to_string(&patch).unwrap_or_default()
        ));
    }
    out
}
