//! Shared test support: fixtures, an HTTPS client, and (cluster tests) the real API server.
#![allow(dead_code)]

pub mod baseline;
pub mod cluster;
pub mod controller;
pub mod fixtures;
pub mod https;
pub mod night;
