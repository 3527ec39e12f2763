//! What the tests and benches share: fixtures (always), and with the `cluster` feature an
//! HTTPS client, a plain TLS baseline server and the real test API server.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod fixtures;

#[cfg(feature = "cluster")]
pub mod baseline;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "cluster")]
pub mod controller;
#[cfg(feature = "cluster")]
pub mod https;
#[cfg(feature = "cluster")]
pub mod night;

/// The repository's root (this crate lives in tests/support).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
