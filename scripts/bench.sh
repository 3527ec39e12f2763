#!/usr/bin/env bash
# All benchmarks (README "Performance"): starts the test API server for the pod-creation
# overhead bench, runs `cargo bench`, stops the server. Extra arguments go to cargo bench.
set -euo pipefail
cd "$(dirname "$0")/.."
# The https bench drives Debian's wrk (an external load generator).
if ! command -v wrk >/dev/null; then
  apt-get update -qq -o DPkg::Lock::Timeout=600
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 wrk
fi
envtest=scripts/kube-envtest.sh
started_here=0
if ! bash "$envtest" status >/dev/null 2>&1; then bash "$envtest" start >/dev/null; started_here=1; fi
cleanup() { if [ "$started_here" = 1 ]; then bash "$envtest" stop || true; fi; }
trap cleanup EXIT
eval "$(bash "$envtest" env)"; export KUBECONFIG
cargo bench --locked "$@"
