//! velero-jupyterhub's decisions, as pure functions: no I/O, no async, no HTTP or
//! Kubernetes client (this crate cannot depend on one).
//!
//! Given a pod and what its namespace asks for, what should change? Everything here is
//! driven by table tests on real object shapes; the edges (admission, webhook, cluster in
//! the `velero-jupyterhub` crate) only feed it and carry its answers out.
//!
//! Kept pure by the compiler, not by convention: no client or runtime among its
//! dependencies, no `unsafe`, and clippy refuses the clock, files, the network and the
//! environment (`policy/clippy.toml`).

#![forbid(unsafe_code)]

pub mod certs;
pub mod claims;
pub mod cleanup;
pub mod coverage;
pub mod cron;
pub mod datapath;
pub mod helper;
pub mod hooks;
pub mod leader;
pub mod live;
pub mod liveness;
pub mod names;
pub mod namespace;
pub mod plan;
pub mod pod;
pub mod record;
pub mod restore;
pub mod restore_report;
pub mod restoring;
pub mod selector;
pub mod status;
pub mod velero;
pub mod volume_list;
pub mod waves;
pub mod window;

pub use claims::{ClaimGlobs, ClaimGlobsError};
pub use live::{LiveDecision, LiveVerdict, VolumeReason, VolumeReport, decide_live};
pub use namespace::{ClaimsProblem, NamespacePolicy};
pub use pod::{PodFacts, PodView};
pub use record::{ClaimRecord, PodRecord, VolumeRecord};
