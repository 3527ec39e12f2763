//! velero-jupyterhub: makes Velero file-system backups of JupyterHub users' home volumes
//! work for live and idle users alike, and makes restores put the data back.
//!
//! Layout (one module per part; the pure core is a crate of its own, with no I/O):
//! - [`policy`] (crate `velero-jupyterhub-policy`): the decisions, as pure functions over
//!   pods and namespaces; [`names`]: every label and annotation we read or write.
//! - [`admission`]: AdmissionReview bytes in, bytes out (shared by `serve` and `review`).
//! - [`webhook`]: the HTTP edge: admission `Router`, operations `Router`, and the accept
//!   loop that bounds connections, time and memory.
//! - [`tls`]: serving certificates: files reloaded on change, or self-signed.
//! - [`cluster`]: the Kubernetes side (namespace cache, Events, Velero's objects).
//! - [`controller`]: `controller`, the reconciler for idle users (Lease, watches, plan
//!   applied); [`backup`]: `backup`, one Backup of a namespace now, idle users included.
//! - [`server`]: puts `serve` together; [`cli`]: the command line.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logging.

pub use velero_jupyterhub_policy as policy;
pub use velero_jupyterhub_policy::names;

pub mod admission;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod controller;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod webhook;
