//! Every test that needs the test API server (a real kube-apiserver + etcd; `scripts/test.sh`
//! starts it), one module per part, in one binary: the kube client, rustls and tokio are
//! linked once. Tests run side by side as they always did within a file, so each keeps to
//! its own namespaces, labels and object names; the two that restart or install into an
//! API server (`restart`, `install`) start one of their own.

mod certs;
mod controller;
mod current;
mod install;
mod restart;
mod restore;
mod status;
mod waves;
mod webhook;
