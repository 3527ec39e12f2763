//! Idle users at scale: the idle claims a Schedule's own Backup did not reach are backed
//! up after it in waves, each as many helpers as the cluster can run at once.
//!
//! A Velero Backup copies a volume only while a pod mounting it is Running, so every
//! claim of a wave needs its helper up at the same time: an attached volume and a pod
//! slot on some node. The submodules, each pure (the edge reads Nodes, CSINodes, pods,
//! PersistentVolumes and Backups, and carries out what is decided here):
//!
//! - `placement`: which claims the next wave takes and the node each helper runs on,
//!   within the pod and volume-attach room the nodes have left;
//! - `backup`: a wave's identity, and the Backup made from its Schedule for it;
//! - `run`: the run's state machine, one step per pass: start a wave (placed by
//!   `placement`), wait for its helpers, make its Backup, clear its helpers, finish;
//! - [`inputs`]: the run's inputs, read from the cluster's objects (its wave Backups
//!   through `backup`'s [`read_claims`]).
//!
//! Everything public is re-exported here: callers name `waves::X`, whatever the file.

mod backup;
pub mod inputs;
mod placement;
mod run;
#[cfg(test)]
mod test_support;

pub use backup::{WaveId, read_claims, wave_backup};
pub use placement::{
    Headroom, IdleClaim, NodeRoom, PodOnNode, Wave, next_wave, node_rooms, volume_nodes,
};
pub use run::{
    HelperPhase, RunHelper, RunInput, RunOptions, RunStep, SETTLE, WaveBackup, WaveHelper,
    WaveRecord, WaveStep, run_step, wave_step,
};
