#!/usr/bin/env bash
# Fuzz the /mutate handler with cargo-fuzz (libFuzzer) on the stable toolchain.
#   scripts/fuzz.sh [SECONDS]   default 600
# Seeds: fuzz/seeds (committed). Crashes land in fuzz/artifacts/mutate/; copy each into
# fuzz/regressions/ so that tests/fuzz_regressions.rs replays it on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/mutate
cp -n fuzz/seeds/* fuzz/corpus/mutate/ 2>/dev/null || true
# cargo-fuzz needs nightly-only flags (-Z sanitizer); RUSTC_BOOTSTRAP lets stable accept them.
RUSTC_BOOTSTRAP=1 cargo fuzz run mutate fuzz/corpus/mutate -- \
  -max_total_time="$secs" -max_len=65536 -print_final_stats=1
