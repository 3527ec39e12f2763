#!/usr/bin/env bash
# Recomputes tests/fixtures/robfig-cron-v3.0.1-next.tsv with robfig/cron v3.0.1 itself
# (from the Go module proxy; built in a temporary copy, nothing vendored) and fails if any
# answer differs from the fixture. `--write` rewrites the fixture instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fixture=$here/../../tests/fixtures/robfig-cron-v3.0.1-next.tsv
command -v go >/dev/null || { echo "robfig-truth: needs Go (none on PATH)" >&2; exit 1; }
build=$(mktemp -d); trap 'rm -rf "$build"' EXIT
cp "$here/main.go" "$here/go.mod" "$here/go.sum" "$build/"
(cd "$build" && env -u GOFLAGS GOFLAGS=-mod=mod CGO_ENABLED=0 go build -o robfig-truth .)
TZ=UTC "$build/robfig-truth" < "$fixture" > "$build/out.tsv"
if [ "${1:-}" = --write ]; then cp "$build/out.tsv" "$fixture"; echo "robfig-truth: rewrote $fixture"; exit 0; fi
if ! diff -q "$fixture" "$build/out.tsv" >/dev/null; then
  diff "$fixture" "$build/out.tsv" | head -20 >&2
  echo "robfig-truth: the fixture no longer matches robfig/cron v3.0.1" >&2; exit 1
fi
echo "robfig-truth: $(grep -vc '^#' "$fixture") rows match robfig/cron v3.0.1"
