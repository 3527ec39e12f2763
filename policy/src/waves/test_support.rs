//! Times, claims and nodes the waves tests share.

use jiff::Timestamp;

use super::{IdleClaim, NodeRoom};

pub(super) fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

pub(super) fn claim(name: &str, last: Option<&str>) -> IdleClaim<'static> {
    IdleClaim {
        namespace: "jhub",
        claim: Box::leak(name.to_owned().into_boxed_str()),
        last_backup: last.map(t),
        driver: Some("csi.hetzner.cloud"),
        nodes: None,
    }
}

pub(super) fn node(name: &'static str, pods: u32, attach: u32) -> NodeRoom<'static> {
    NodeRoom {
        name,
        free_pods: pods,
        free_attach: vec![("csi.hetzner.cloud", attach)],
    }
}
