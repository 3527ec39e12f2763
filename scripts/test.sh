#!/usr/bin/env bash
# The test command (README): starts the test API server (a real kube-apiserver + etcd on
# loopback, built from Debian's archive on first use), runs every test (unit, HTTPS,
# property, cluster; each bench once as a smoke test), and stops the server again, even on
# failure. Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test https`.
set -euo pipefail
cd "$(dirname "$0")/.."

envtest=scripts/kube-envtest.sh
started_here=0
if bash "$envtest" status >/dev/null 2>&1; then
  echo "test.sh: reusing the running test API server" >&2
else
  bash "$envtest" start >/dev/null
  started_here=1
fi
log=$(mktemp)
cleanup() {
  if [ "$started_here" = 1 ]; then bash "$envtest" stop 2>&1 || true; fi
  # One closing line over every test binary cargo ran, printed last.
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
       END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
  rm -f "$log"
}
trap cleanup EXIT
eval "$(bash "$envtest" env)"
export KUBECONFIG

if [ $# -eq 0 ]; then set -- --all-targets; fi
cargo test --locked "$@" 2>&1 | tee "$log"
