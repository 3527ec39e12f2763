//! velero-jupyterhub: makes Velero file-system backups of JupyterHub users' home volumes
//! work for live and idle users alike, and makes restores put the data back.
//!
//! Layout (one module per part; the pure core has no I/O):
//! - [`names`]: every label and annotation we read or write.
//! - [`policy`]: the decisions, as pure functions over pod/namespace views.
//! - [`admission`]: AdmissionReview bytes in, bytes out (shared by `serve` and `review`).
//! - [`webhook`]: the HTTPS server (axum `Router` + rustls), health and metrics.
//! - [`tls`]: serving certificates: files reloaded on change, or self-signed.
//! - [`cluster`]: the Kubernetes side (namespace cache).
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logging.

pub mod admission;
pub mod cli;
pub mod cluster;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod webhook;
