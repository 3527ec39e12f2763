//! A Schedule's run of waves decided from records read back from wave Backups'
//! annotations (`velero-jupyterhub.io/wave-claims`, `…/wave-given-up`), helpers' labels,
//! claims and nodes, all taken from arbitrary bytes. The decision must never panic, and
//! every index it returns must point into what it was given, no claim placed twice and no
//! node given more than its room.
#![no_main]

use jiff::{SignedDuration, Timestamp};
use libfuzzer_sys::fuzz_target;
use velero_jupyterhub::policy::waves::{
    self, HelperPhase, IdleClaim, NodeRoom, RunHelper, RunInput, RunOptions, RunStep,
    WaveBackup, WaveHelper, WaveRecord,
};

/// Reads the input a byte or a line at a time.
struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.bytes.split_first() else {
            return 0;
        };
        self.bytes = rest;
        b
    }
    fn seconds(&mut self) -> i64 {
        i64::from(u16::from_le_bytes([self.byte(), self.byte()])) * 60
    }
    /// Up to the next newline, as text (an annotation value as read).
    fn line(&mut self) -> &'a str {
        let end = self.bytes.iter().position(|&b| b == b'\n').unwrap_or(self.bytes.len());
        let (line, rest) = self.bytes.split_at(end);
        self.bytes = rest.get(1..).unwrap_or_default();
        std::str::from_utf8(line).unwrap_or_default()
    }
}

const TICK: i64 = 1_764_298_800;

fuzz_target!(|data: &[u8]| {
    let mut input = Input { bytes: data };
    let at = |s: i64| Timestamp::from_second(TICK + s).unwrap_or(Timestamp::UNIX_EPOCH);
    let names: Vec<String> = (0..8).map(|i| format!("claim-{i}")).collect();
    let claims: Vec<IdleClaim<'_>> = (0..usize::from(input.byte() % 9))
        .map(|i| IdleClaim {
            namespace: "jhub",
            claim: &names[i],
            last_backup: (input.byte() % 2 == 0).then(|| at(-input.seconds())),
            driver: (input.byte() % 3 != 0).then_some("csi.example"),
            nodes: (input.byte() % 4 == 0).then(|| vec![usize::from(input.byte() % 4)]),
        })
        .collect();
    let node_names = ["node-a", "node-b", "node-c"];
    let nodes: Vec<NodeRoom<'_>> = (0..usize::from(input.byte() % 4))
        .map(|i| NodeRoom {
            name: node_names[i],
            free_pods: u32::from(input.byte() % 5),
            free_attach: vec![("csi.example", u32::from(input.byte() % 4))],
        })
        .collect();
    let backups = [
        WaveBackup::NotCreated,
        WaveBackup::Running,
        WaveBackup::Done(true),
        WaveBackup::Done(false),
    ];
    let lines: Vec<(&str, &str)> = (0..usize::from(input.byte() % 5))
        .map(|_| (input.line(), input.line()))
        .collect();
    let records: Vec<WaveRecord<'_>> = lines
        .iter()
        .enumerate()
        .map(|(i, (claims, given_up))| WaveRecord {
            number: u32::try_from(i).unwrap_or(0) + u32::from(input.byte() % 3),
            backup: backups[usize::from(input.byte() % 4)],
            finished: (input.byte() % 2 == 0).then(|| at(input.seconds())),
            claims: waves::read_claims(claims),
            given_up: waves::read_claims(given_up),
        })
        .collect();
    let phases = [HelperPhase::Pending, HelperPhase::Running, HelperPhase::Gone];
    let helpers: Vec<RunHelper<'_>> = (0..usize::from(input.byte() % 6))
        .map(|_| RunHelper {
            namespace: "jhub",
            claim: &names[usize::from(input.byte() % 8)],
            tick: if input.byte() % 4 == 0 { TICK - 86_400 } else { TICK },
            number: u32::from(input.byte() % 4),
            helper: WaveHelper {
                phase: phases[usize::from(input.byte() % 3)],
                created: at(input.seconds()),
            },
        })
        .collect();
    let run = RunInput {
        tick: at(0),
        tick_backup_done_since: (input.byte() % 5 != 0).then(|| at(input.seconds())),
        claims: &claims,
        waves: &records,
        helpers: &helpers,
        nodes: &nodes,
        helpers_up: usize::from(input.byte() % 8),
        settling: input.byte() % 3 == 0,
        now: at(input.seconds()),
        options: RunOptions {
            max_helpers: usize::from(input.byte() % 8) + 1,
            max_window: SignedDuration::from_hours(6),
            start_bound: SignedDuration::from_mins(5),
            settle: SignedDuration::from_secs(45),
        },
    };
    match waves::run_step(&run) {
        RunStep::Start { placed, .. } => {
            let mut taken = std::collections::HashSet::new();
            let mut per_node = vec![0u32; nodes.len()];
            for (c, n) in placed {
                assert!(c < claims.len() && n < nodes.len(), "indexes in range");
                assert!(taken.insert(c), "claim {c} placed twice");
                per_node[n] += 1;
            }
            for (n, node) in nodes.iter().enumerate() {
                assert!(per_node[n] <= node.free_pods, "node {n} given more than its room");
            }
        }
        RunStep::Back { running, given_up, .. } => {
            assert!(running.iter().chain(&given_up).all(|&h| h < helpers.len()));
        }
        RunStep::Clear { helpers: gone } => {
            assert!(gone.iter().all(|&h| h < helpers.len()));
        }
        RunStep::Finished { reached, not_reached, .. } => {
            assert!(reached + not_reached <= claims.len() + helpers.len() + records.len() * 64);
        }
        _ => {}
    }
});
