#!/usr/bin/env bash
# The test command (README): starts the test API server (a real kube-apiserver + etcd on
# loopback, current Kubernetes built from Go modules on first use; KUBE_ENVTEST_VERSION=1.20
# for the oldest supported one), runs every test (unit, HTTPS,
# attack, property, cluster; each bench once as a smoke test), and stops the server
# again, even on failure. Extra arguments go to `cargo test`, e.g.
# `scripts/test.sh --test https`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The https bench's smoke run drives Debian's wrk (an external load generator); it
# fails with a clear message if wrk is missing and cannot be installed here.
# wrk (the https benchmark's external client) and promtool (Debian's `prometheus`
# package: tests/observability.rs checks the alert rules with it).
missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v promtool >/dev/null || missing="$missing prometheus"
if [ -n "$missing" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "test.sh: installing$missing" >&2
  apt-get update -qq -o DPkg::Lock::Timeout=600 >&2 || true
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 $missing >&2 || true
fi

envtest=scripts/kube-envtest.sh   # KUBE_ENVTEST_VERSION picks the version (default current)
run_dir=$(bash "$envtest" run-dir)
# Several test.sh runs may share one API server: each registers itself under users/, and
# the last one out stops the server if a test.sh run started it (never one you started).
log=$(mktemp)
cleanup() {
  rc=$?
  rm -f "$run_dir/users/$$"
  if [ -e "$run_dir/users/.started-by-test.sh" ] && [ -z "$(ls "$run_dir/users" 2>/dev/null)" ]; then
    rm -f "$run_dir/users/.started-by-test.sh"
    bash "$envtest" stop 2>&1 || true
  fi
  # One closing line over every test binary cargo ran, printed last. A binary that
  # crashed or did not compile prints no "test result:" line: the exit code says it.
  awk -v rc="$rc" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
       END { printf "\ntests: %d passed, %d failed", p, f; if (rc != 0) printf " - FAILED (exit code %d)", rc; printf "\n" }' "$log"
  rm -f "$log"
  exit "$rc"
}
trap cleanup EXIT
mkdir -p "$run_dir/users"
# Forget registrations of runs that died without their cleanup (their process is gone).
for user in "$run_dir/users"/*; do
  [ -e "$user" ] && [ ! -e "/proc/${user##*/}" ] && rm -f "$user"
done
touch "$run_dir/users/$$"
if bash "$envtest" status >/dev/null 2>&1; then
  echo "test.sh: reusing the running test API server" >&2
else
  bash "$envtest" start >/dev/null
  touch "$run_dir/users/.started-by-test.sh"
fi
eval "$(bash "$envtest" env)"
export KUBECONFIG
# kubectl of the current version (tests/cluster/install.rs runs `kubectl apply -k`), built
# from the Go module proxy on first use and cached beside the server binaries.
KUBECTL=$(KUBE_ENVTEST_VERSION=current bash "$envtest" kubectl)
export KUBECTL

if [ $# -eq 0 ]; then set -- --workspace --all-targets --no-fail-fast; fi
cargo test --locked "$@" 2>&1 | tee "$log"
