//! The decisions, as pure functions: no I/O, no async, no HTTP or Kubernetes client.
//!
//! Given a pod and what we know of its namespace, what should change? Everything here is
//! driven by table tests on real object shapes; the edges (`admission`, `webhook`,
//! `cluster`) only feed it and carry its answers out.

pub mod claims;
pub mod live;
pub mod namespace;
pub mod pod;
pub mod volume_list;

pub use claims::{ClaimGlobs, ClaimGlobsError};
pub use live::{LiveDecision, LiveVerdict, VolumeReason, VolumeReport, decide_live};
pub use namespace::{NamespaceDirectory, NamespaceScope, StaticNamespaces};
pub use pod::PodView;
