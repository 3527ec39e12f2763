#!/usr/bin/env bash
# Fuzz with cargo-fuzz (libFuzzer) on the stable toolchain.
#   scripts/fuzz.sh [TARGET] [SECONDS]   TARGET: mutate (default), restore, waves, certs;
#                                         SECONDS: default 600
# Targets (fuzz/fuzz_targets/): mutate, the /mutate Router on arbitrary bodies; restore,
# the restore path's decision and conversion on arbitrary reviews; waves, a run of waves
# from wave records read back from annotations; certs, the certificate keeper's decision
# from its Secrets' annotation times and validities.
# Seeds: fuzz/seeds (committed; the JSON reviews seed mutate and restore). Crashes land in
# fuzz/artifacts/TARGET/; copy each into fuzz/regressions/ so that
# tests/fuzz_regressions.rs replays it on every test run (the Router's), or add it as a
# case to the target's table test.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-mutate}
secs=${2:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "fuzz/corpus/$target"
case $target in
  mutate|restore) cp -n fuzz/seeds/* "fuzz/corpus/$target/" 2>/dev/null || true ;;
esac
# cargo-fuzz needs nightly-only flags (-Z sanitizer); RUSTC_BOOTSTRAP lets stable accept them.
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" -- \
  -max_total_time="$secs" -max_len=65536 -print_final_stats=1
