#!/usr/bin/env bash
# kube-envtest.sh - velero-jupyterhub's test cluster: a real kube-apiserver + etcd
# (+ kube-controller-manager, kube-scheduler) on loopback, in the spirit of
# controller-runtime's envtest. No kubelet: tests play its part. Two versions:
#
#   current  Kubernetes v1.37.2 (the newest that builds here), built from the Go module
#            proxy: a small build module in the cache requires k8s.io/kubernetes and pins
#            its k8s.io/* staging modules to the matching v0.37.2 releases with replace
#            lines. Needs Go >= 1.26 (the machine's own). The default.
#   1.20     Debian bookworm's `kubernetes` source package (1.20.5+really1.20.2 = upstream
#            v1.20.2), built with Debian's Go: the oldest version we support.
#
#   kube-envtest.sh [--version current|1.20] COMMAND   (or KUBE_ENVTEST_VERSION)
#   kube-envtest.sh install    install Debian packages and build the binaries into the
#                              cache (skipped when cached, keyed by version and recipe)
#   kube-envtest.sh start      install if needed, start etcd + kube-apiserver on 127.0.0.1,
#                              print the kubeconfig path on stdout (idempotent: if already
#                              running and healthy, just prints the path again)
#   kube-envtest.sh stop       stop everything this script started (by pid file), wipe state
#   kube-envtest.sh status     exit 0 if the API server answers /readyz
#   kube-envtest.sh env        print `export KUBECONFIG=...` (for eval)
#   kube-envtest.sh kubectl    build kubectl of the current version into the cache (once)
#                              and print its path
#   kube-envtest.sh kubelet    the same for kubelet (the Velero end-to-end test's node)
#   kube-envtest.sh run-dir    print the runtime state dir of the chosen version
#   kube-envtest.sh restart-apiserver  stop and start kube-apiserver only (etcd keeps
#                              every object; clients' watches break and must resume)
#   kube-envtest.sh selftest   start (if needed), run a mutating-webhook + SSA smoke test, stop
#
# Environment (all optional):
#   KUBE_ENVTEST_VERSION  current (default) or 1.20. Each version has its own run dir and
#                         ports, so both can run side by side.
#   KUBE_ENVTEST_CACHE    binary cache      (default ${XDG_CACHE_HOME:-$HOME/.cache}/velero-jupyterhub/kube-envtest)
#   KUBE_ENVTEST_RUN      runtime state dir (default /tmp/velero-jupyterhub-envtest, -1.20 for 1.20)
#   KUBE_ENVTEST_API_PORT     secure port of kube-apiserver (default 16443; 16453 for 1.20)
#   KUBE_ENVTEST_ETCD_PORT    etcd client port (default 12379, 12389 for 1.20; peer port = +1)
#   KUBE_ENVTEST_SCHEDULER    run kube-scheduler (default 1; it schedules onto Node objects
#                             the tests create; with none, pods stay Pending)
#   KUBE_ENVTEST_SERVICE_CIDR service ClusterIP range (default 127.0.100.0/24: loopback,
#                             so nothing can ever dial a private-range address)
#   KUBE_ENVTEST_CONTROLLER_MANAGER  run kube-controller-manager (default 1): namespace
#                             deletion, garbage collection of ownerReferences, PV binding,
#                             ServiceAccounts + token secrets. 0 = API server + etcd only.
#   KUBE_ENVTEST_SA_ADMISSION=1  keep the ServiceAccount admission plugin (default off:
#                             pods then need no default ServiceAccount to exist first)
#   KUBE_ENVTEST_EXTRA_SANS   more subjectAltNames for the API server's certificate
#                             (e.g. IP:10.244.78.1: the `kubernetes` Service address pods use)
#   KUBE_ENVTEST_AUTHZ        --authorization-mode (default RBAC; admin token is system:masters)
#   KUBE_ENVTEST_EXTRA_APISERVER_FLAGS  extra flags appended to kube-apiserver
#   KUBE_ENVTEST_ATTACH_DETACH=1  run the attach/detach controller too (default off: no
#                             kubelet, no CSI driver; on: VolumeAttachments for CSI drivers
#                             that need attaching, as the Velero end-to-end test's node has)
#   KUBE_ENVTEST_EXTRA_KCM_FLAGS  extra flags for kube-controller-manager (e.g.
#                             --pvclaimbinder-sync-period=1s: PVCs bind in ~1 s, not ~15 s)
#   KUBE_ENVTEST_KEEP_BUILD=1 keep the ~1.8 GB source/build tree after building
#   KUBE_ENVTEST_REBUILD=1    rebuild even if binaries are cached
#
# Output files in $KUBE_ENVTEST_RUN: kubeconfig, pki/ca.crt (+ca.key: sign your webhook's
# serving cert with it, or use your own CA in caBundle), token, logs/*.log.
set -euo pipefail

VERSION=${KUBE_ENVTEST_VERSION:-current}
if [ "${1:-}" = --version ]; then VERSION=${2:?--version needs current or 1.20}; shift 2; fi
case "$VERSION" in
  current) KUBE_VERSION=1.37.2; RECIPE=m1; RUN_SUFFIX=; PORT_OFFSET=0 ;;
  1.20)    KUBE_VERSION=1.20.2; RECIPE=d5; RUN_SUFFIX=-1.20; PORT_OFFSET=10 ;;
  *) echo "kube-envtest: KUBE_ENVTEST_VERSION must be current or 1.20, not '$VERSION'" >&2; exit 2 ;;
esac
CACHE=${KUBE_ENVTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/velero-jupyterhub/kube-envtest}
RUN=${KUBE_ENVTEST_RUN:-/tmp/velero-jupyterhub-envtest$RUN_SUFFIX}
API_PORT=${KUBE_ENVTEST_API_PORT:-$((16443 + PORT_OFFSET))}
ETCD_PORT=${KUBE_ENVTEST_ETCD_PORT:-$((12379 + PORT_OFFSET))}
ETCD_PEER_PORT=$((ETCD_PORT + 1))
SERVICE_CIDR=${KUBE_ENVTEST_SERVICE_CIDR:-127.0.100.0/24}
WITH_CM=${KUBE_ENVTEST_CONTROLLER_MANAGER:-1}
SA_ADMISSION=${KUBE_ENVTEST_SA_ADMISSION:-0}
AUTHZ=${KUBE_ENVTEST_AUTHZ:-RBAC}
WITH_SCHED=${KUBE_ENVTEST_SCHEDULER:-1}
TOKEN=${KUBE_ENVTEST_TOKEN:-kube-envtest-admin-token}
BIN=$CACHE/$KUBE_VERSION-$RECIPE/bin   # keyed by version and recipe
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "kube-envtest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- packages
apt_updated=0
# Fresh cloud machines run unattended upgrades at boot: wait for the dpkg lock, do not fail.
APT_LOCK=(-o DPkg::Lock::Timeout=600)
apt_install() {   # install only what is missing, so warm runs never touch apt
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get "${APT_LOCK[@]}" update -qq >&2; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_LOCK[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2
}

ensure_deb_src() {
  if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then return 0; fi
  local f=/etc/apt/sources.list.d/debian-src.sources
  if [ ! -e "$f" ]; then
    # Mirror the machine's own binary sources (deb822 files) as deb-src entries, so the
    # source comes from the same archive the packages come from.
    log "adding deb-src entries ($f) from the machine's apt sources"
    local srcs; srcs=$(grep -l '^Types:.*\bdeb\b' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$srcs" ] || die "no deb822 apt sources found to mirror as deb-src"
    # shellcheck disable=SC2086
    awk 'BEGIN{RS="";ORS="\n\n"} /(^|\n)Types:[^\n]*deb/ {sub(/Types:[^\n]*/,"Types: deb-src"); print}' $srcs \
      | $SUDO tee "$f" >/dev/null
  fi
  $SUDO apt-get "${APT_LOCK[@]}" update -qq >&2; apt_updated=1
  apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes' \
    || die "apt-cache showsrc kubernetes finds nothing even with deb-src enabled"
}

# ---------------------------------------------------------------- build
binaries_ok() {
  [ "${KUBE_ENVTEST_REBUILD:-0}" = 1 ] && return 1
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ] \
    && [ "$(cat "$BIN/.recipe" 2>/dev/null)" = "$RECIPE" ]
}

cmd_install() {
  mkdir -p "$CACHE"; exec 7>"$CACHE/.lock"; flock 7   # one build at a time
  apt_install etcd-server openssl curl ca-certificates
  if binaries_ok; then log "binaries cached in $BIN ($(cat "$BIN/.version"))"; return 0; fi
  case "$VERSION" in
    current) build_from_modules ;;
    1.20) build_from_debian ;;
  esac
}

# current: k8s.io/kubernetes from the Go module proxy. Its go.mod points the k8s.io/*
# staging modules at ./staging/...; a module that requires it must pin them to the
# published v0.x releases of the same version instead: one replace line each, derived
# from its own go.mod. Nothing is vendored; the module cache and build cache are Go's.
# Writes $1/go.mod: a module that requires k8s.io/kubernetes@v$KUBE_VERSION, with its
# staging modules pinned to the matching published releases; prints the module's source dir.
prepare_module() {
  local build=$1 staging=0.${KUBE_VERSION#1.}
  command -v go >/dev/null || die "building Kubernetes $KUBE_VERSION needs Go >= 1.26 (none on PATH)"
  local gov; gov=$(go env GOVERSION); gov=${gov#go}
  [ "$(printf '%s\n1.26\n' "${gov%%[!0-9.]*}" | sort -V | head -1)" = 1.26 ] \
    || die "building Kubernetes $KUBE_VERSION needs Go >= 1.26, this machine has $gov"
  rm -rf "$build"; mkdir -p "$build"
  log "go mod download k8s.io/kubernetes@v$KUBE_VERSION"
  # go mod download -json reports a failure on stdout (an "Error" field): keep it all.
  (cd "$build" && "${GO_ENV[@]}" go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION") > "$build/download.json" 2>&1 || true
  local src; src=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' "$build/download.json")
  [ -f "$src/go.mod" ] || { cat "$build/download.json" >&2; die "k8s.io/kubernetes@v$KUBE_VERSION did not download from the Go module proxy (GOPROXY=$(go env GOPROXY))"; }
  {
    printf 'module kube-envtest-build\n\ngo 1.26\n\nrequire k8s.io/kubernetes v%s\n\nreplace (\n' "$KUBE_VERSION"
    awk -v v="v$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, v }' "$src/go.mod"
    printf ')\n'
  } > "$build/go.mod"
}
GO_ENV=(env -u GOFLAGS -u GO111MODULE -u GOPATH -u GOBIN GOFLAGS=-mod=mod CGO_ENABLED=0)

# Builds the given k8s.io/kubernetes/cmd/... packages (the tools.go lines name them) from
# the module prepared in $1 into $1/out.
go_build_cmds() {
  local build=$1; shift
  local pkg=k8s.io/component-base/version minor=${KUBE_VERSION#1.}; minor=${minor%%.*}
  local ldflags="-s -w -X $pkg.gitVersion=v$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  { printf '//go:build tools\n\npackage tools\n\nimport (\n'; printf '\t_ "%s"\n' "$@"; printf ')\n'; } > "$build/tools.go"
  ( cd "$build" && "${GO_ENV[@]}" go mod tidy && mkdir -p out \
      && "${GO_ENV[@]}" go build -trimpath -ldflags "$ldflags" -o out/ "$@"
  ) > "$build/build.log" 2>&1 || { tail -40 "$build/build.log" >&2; die "build failed, full log: $build/build.log"; }
}

# current: k8s.io/kubernetes from the Go module proxy. Its go.mod points the k8s.io/*
# staging modules at ./staging/...; a module that requires it must pin them to the
# published v0.x releases of the same version instead: one replace line each, derived
# from its own go.mod. Nothing is vendored; the module cache and build cache are Go's.
build_from_modules() {
  local t0; t0=$(now)
  local build=$CACHE/build-$KUBE_VERSION
  prepare_module "$build"
  log "building kube-apiserver, kube-controller-manager, kube-scheduler v$KUBE_VERSION from Go modules ($(go version | cut -d' ' -f3)); ~8 min on 2 cores"
  go_build_cmds "$build" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  mkdir -p "$BIN"
  install -m 0755 "$build/out/"* "$BIN/"
  echo "$RECIPE" > "$BIN/.recipe"
  echo "$("$BIN/kube-apiserver" --version) from the Go module proxy (staging modules v0.${KUBE_VERSION#1.})" > "$BIN/.version"
  rm -rf "$build"
  log "built in $(since "$t0") s: $(cat "$BIN/.version")"
}

# kubectl and kubelet of the same version (the install tests run `kubectl apply -k`; the
# Velero end-to-end test runs a real kubelet), each built on first use into its own cache
# directory, so the server binaries are not rebuilt for them.
cmd_tool() {
  local tool=$1 minutes=$2
  [ "$VERSION" = current ] || die "$tool is built for the current version only"
  local dir=$CACHE/$tool-$KUBE_VERSION
  if [ ! -x "$dir/$tool" ] || [ "${KUBE_ENVTEST_REBUILD:-0}" = 1 ]; then
    mkdir -p "$CACHE"; exec 7>"$CACHE/.lock"; flock 7
    if [ ! -x "$dir/$tool" ] || [ "${KUBE_ENVTEST_REBUILD:-0}" = 1 ]; then
      local t0; t0=$(now) build=$CACHE/build-$tool-$KUBE_VERSION
      prepare_module "$build"
      log "building $tool v$KUBE_VERSION from Go modules; ~$minutes min on 2 cores"
      go_build_cmds "$build" "k8s.io/kubernetes/cmd/$tool"
      mkdir -p "$dir"; install -m 0755 "$build/out/$tool" "$dir/$tool"
      rm -rf "$build"
      log "$tool built in $(since "$t0") s"
    fi
  fi
  echo "$dir/$tool"
}

# 1.20: Debian bookworm's source package, with its complete vendor/.
build_from_debian() {
  local t0; t0=$(now)
  apt_install golang-go make rsync dpkg-dev golang-github-modern-go-reflect2-dev
  ensure_deb_src
  local build=$CACHE/build
  rm -rf "$build"; mkdir -p "$build"
  log "apt-get source kubernetes -> $build"
  ( cd "$build" && apt-get source -qq --only-source kubernetes >&2 2>&1 ) || die "apt-get source kubernetes failed"
  local src; src=$(find "$build" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
  [ -d "$src/cmd/kube-apiserver" ] && [ -d "$src/vendor" ] || die "unexpected source layout in $build"
  local debver; debver=$(cd "$src" && dpkg-parsechangelog -S Version)

  # Go >= 1.18 fix: the vendored github.com/modern-go/reflect2 v1.0.1 makes kube-apiserver
  # SIGSEGV ("fatal error: fault" in runtime.mapiternext via json-iterator) e.g. while
  # recording the JSONPatch audit annotation of a mutating webhook. Debian's
  # golang-github-modern-go-reflect2-dev 1.0.2 is the upstream fix.
  local r2=$src/vendor/github.com/modern-go/reflect2 deb_r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -f "$deb_r2/go_above_118.go" ] || die "$deb_r2 does not look like reflect2 >= 1.0.2"
  rm -f "$r2"/*.go "$r2"/*.s
  cp "$deb_r2"/*.go "$deb_r2"/*.s "$r2"/

  cat > "$build/version.env" <<'EOF'
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='archive'
KUBE_GIT_VERSION='v1.20.2'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  log "building kube-apiserver, kube-controller-manager, kube-scheduler (Debian $debver, $(/usr/lib/go/bin/go version | cut -d' ' -f3)); ~6 min on 2 cores"
  # The build needs no network (GOPATH mode + vendor/); where possible prove it with a
  # private network namespace. SOURCE_DATE_EPOCH pins the embedded buildDate.
  local nonet=(); if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then nonet=(unshare -n); fi
  ( cd "$src" && "${nonet[@]}" env -u GOFLAGS -u GO111MODULE -u GOPATH -u GOROOT -u GOBIN \
      PATH=/usr/lib/go/bin:$PATH KUBE_GIT_VERSION_FILE="$build/version.env" KUBE_VERBOSE=1 \
      SOURCE_DATE_EPOCH="$(dpkg-parsechangelog -l "$src/debian/changelog" -S Timestamp)" \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" ) > "$build/make.log" 2>&1 \
    || { tail -40 "$build/make.log" >&2; die "build failed, full log: $build/make.log"; }
  mkdir -p "$BIN"
  install -m 0755 "$src/_output/bin/kube-apiserver" "$src/_output/bin/kube-controller-manager" "$src/_output/bin/kube-scheduler" "$BIN/"
  echo "$RECIPE" > "$BIN/.recipe"
  echo "kubernetes $debver (Debian bookworm source), $("$BIN/kube-apiserver" --version), reflect2 1.0.2" > "$BIN/.version"
  if [ "${KUBE_ENVTEST_KEEP_BUILD:-0}" != 1 ]; then rm -rf "$build"; fi
  log "built in $(since "$t0") s: $(cat "$BIN/.version")"
}

# ---------------------------------------------------------------- processes
pid_alive() {   # alive and not a zombie (orphans may linger as zombies if nobody reaps)
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  local st; st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$st" != Z ] && [ "$st" != X ]
}
pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_one() {
  local name=$1 pid; pid=$(pid_of "$name")
  [ -n "$pid" ] || return 0
  if pid_alive "$pid" && grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    pid_alive "$pid" && { log "$name ($pid) ignored SIGTERM, sending SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$RUN/$name.pid"
}

apiserver_ready() {
  [ -f "$RUN/pki/ca.crt" ] || return 1
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$RUN/pki/ca.crt" \
        -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$API_PORT/readyz")" = 200 ]
}

gen_pki() {
  local p=$RUN/pki; mkdir -p "$p"; chmod 700 "$p"
  [ -f "$p/done" ] && return 0
  ( cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -keyout ca.key -out ca.crt -subj "/CN=kube-envtest-ca"
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "${KUBE_ENVTEST_EXTRA_SANS:+,$KUBE_ENVTEST_EXTRA_SANS}" > apiserver.ext
    openssl x509 -req -sha256 -days 3650 -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -extfile apiserver.ext -out apiserver.crt
    # client cert alternative to the token (CN=user, O=group)
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kube-envtest-admin"
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' > admin.ext
    openssl x509 -req -sha256 -days 3650 -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -extfile admin.ext -out admin.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    echo "$TOKEN,kube-envtest-admin,kube-envtest-admin,system:masters" > tokens.csv
    rm -f ./*.csr ./*.ext
    touch done ) >/dev/null 2>&1 || die "openssl failed"
}

write_kubeconfig() {
  local ca; ca=$(base64 -w0 < "$RUN/pki/ca.crt")
  cat > "$RUN/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-envtest
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca
users:
- name: kube-envtest-admin
  user:
    token: $TOKEN
- name: kube-envtest-admin-cert
  user:
    client-certificate: $RUN/pki/admin.crt
    client-key: $RUN/pki/admin.key
contexts:
- name: kube-envtest
  context: {cluster: kube-envtest, user: kube-envtest-admin, namespace: default}
- name: kube-envtest-cert
  context: {cluster: kube-envtest, user: kube-envtest-admin-cert, namespace: default}
current-context: kube-envtest
EOF
  chmod 600 "$RUN/kubeconfig"
  echo "$TOKEN" > "$RUN/token"
}

# kube-apiserver on the running etcd (start, restart-apiserver).
start_apiserver() {
  local p=$RUN/pki admission=(--disable-admission-plugins=ServiceAccount)
  if [ "$SA_ADMISSION" = 1 ]; then admission=(); fi
  # shellcheck disable=SC2086
  nohup "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --advertise-address=127.0.0.1 --bind-address=127.0.0.1 --secure-port="$API_PORT" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" --token-auth-file="$p/tokens.csv" \
    --authorization-mode="$AUTHZ" \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --endpoint-reconciler-type=none \
    --allow-privileged=true \
    "${admission[@]}" ${KUBE_ENVTEST_EXTRA_APISERVER_FLAGS:-} \
    7>&- 8>&- 9>&- </dev/null >"$RUN/logs/kube-apiserver.log" 2>&1 &
  echo $! > "$RUN/kube-apiserver.pid"
  local t1; t1=$(now)
  for _ in $(seq 1 900); do
    apiserver_ready && break
    pid_alive "$(pid_of kube-apiserver)" || fail_start "kube-apiserver exited" "$RUN/logs/kube-apiserver.log"
    sleep 0.1
  done
  apiserver_ready || fail_start "kube-apiserver not ready after 90 s" "$RUN/logs/kube-apiserver.log"
  log "kube-apiserver ready after $(since "$t1") s (https://127.0.0.1:$API_PORT)"
}

fail_start() { log "$1; last lines of $2:"; tail -20 "$2" >&2 || true; cmd_stop_locked; exit 1; }

cmd_start() {
  cmd_install
  mkdir -p "$RUN/logs"
  exec 9>"$RUN/.lock"; flock 9
  if pid_alive "$(pid_of kube-apiserver)" && apiserver_ready; then
    # One run dir, one version: never hand out (or stop) a server of another version.
    local running; running=$(cut -d' ' -f1 "$RUN/version" 2>/dev/null || true)
    [ "$running" = "$VERSION" ] \
      || die "a '${running:-unknown}' test API server runs in $RUN; stop it (KUBE_ENVTEST_VERSION=${running:-...} $0 stop) or use another KUBE_ENVTEST_RUN"
    log "already running on https://127.0.0.1:$API_PORT"; echo "$RUN/kubeconfig"; return 0
  fi
  cmd_stop_locked   # leftovers from a crashed run
  mkdir -p "$RUN/logs"
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT"; do
    if port_busy "$port"; then die "127.0.0.1:$port is already in use (set KUBE_ENVTEST_*_PORT)"; fi
  done
  gen_pki
  local t0; t0=$(now)
  local data=$RUN/etcd-data
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then   # tmpfs: etcd fsyncs are free
    data=/dev/shm/kube-envtest-etcd-$ETCD_PORT; echo "$data" > "$RUN/etcd-data.path"
  fi
  rm -rf "$data"; mkdir -m 700 -p "$data"
  nohup etcd --name kube-envtest --data-dir "$data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kube-envtest=http://127.0.0.1:$ETCD_PEER_PORT" \
    --logger=zap --log-level=warn --quota-backend-bytes=$((2*1024*1024*1024)) \
    7>&- 8>&- 9>&- </dev/null >"$RUN/logs/etcd.log" 2>&1 &
  echo $! > "$RUN/etcd.pid"
  for _ in $(seq 1 300); do
    curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && break
    pid_alive "$(pid_of etcd)" || fail_start "etcd exited" "$RUN/logs/etcd.log"
    sleep 0.1
  done
  curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null || fail_start "etcd not healthy after 30 s" "$RUN/logs/etcd.log"
  log "etcd healthy after $(since "$t0") s"

  start_apiserver
  write_kubeconfig
  local p=$RUN/pki

  if [ "$WITH_CM" = 1 ]; then
    # Off: node IPAM and the cloud parts; node lifecycle (tests keep their hand-made Nodes
    # Ready without a kubelet's heartbeat), attach/detach (unless KUBE_ENVTEST_ATTACH_DETACH),
    # TTL, CSR signing.
    local kcm_flags=(--secure-port=0) controllers
    case "$VERSION" in
      current) controllers='*,-node-ipam-controller,-node-lifecycle-controller,-persistentvolume-attach-detach-controller,-ttl-controller,-certificatesigningrequest-signing-controller,-certificatesigningrequest-approving-controller,-certificatesigningrequest-cleaner-controller' ;;
      1.20) controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-ttl,-csrsigning,-csrapproving,-csrcleaner'
            kcm_flags+=(--port=0) ;;   # v1.20 still has an insecure port
    esac
    if [ "${KUBE_ENVTEST_ATTACH_DETACH:-0}" = 1 ]; then
      controllers=${controllers/,-persistentvolume-attach-detach-controller/}
      controllers=${controllers/,-attachdetach/}
    fi
    nohup "$BIN/kube-controller-manager" --kubeconfig="$RUN/kubeconfig" \
      --leader-elect=false "${kcm_flags[@]}" \
      --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
      --use-service-account-credentials=true \
      --controllers="$controllers" \
      ${KUBE_ENVTEST_EXTRA_KCM_FLAGS:---pvclaimbinder-sync-period=1s} \
      7>&- 8>&- 9>&- </dev/null >"$RUN/logs/kube-controller-manager.log" 2>&1 &
    echo $! > "$RUN/kube-controller-manager.pid"
    local t2; t2=$(now) code=
    for _ in $(seq 1 600); do   # ready = default ServiceAccount exists in "default"
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$p/ca.crt" -H "Authorization: Bearer $TOKEN" \
        "https://127.0.0.1:$API_PORT/api/v1/namespaces/default/serviceaccounts/default")
      [ "$code" = 200 ] && break
      pid_alive "$(pid_of kube-controller-manager)" || fail_start "kube-controller-manager exited" "$RUN/logs/kube-controller-manager.log"
      sleep 0.1
    done
    [ "$code" = 200 ] || fail_start "kube-controller-manager did not create default/default SA in 60 s" "$RUN/logs/kube-controller-manager.log"
    log "kube-controller-manager working after $(since "$t2") s"
  fi
  if [ "$WITH_SCHED" = 1 ]; then
    local sched_flags=(--secure-port=0)
    [ "$VERSION" = 1.20 ] && sched_flags+=(--port=0)
    nohup "$BIN/kube-scheduler" --kubeconfig="$RUN/kubeconfig" --leader-elect=false "${sched_flags[@]}" \
      7>&- 8>&- 9>&- </dev/null >"$RUN/logs/kube-scheduler.log" 2>&1 &
    echo $! > "$RUN/kube-scheduler.pid"
    sleep 0.5
    pid_alive "$(pid_of kube-scheduler)" || fail_start "kube-scheduler exited" "$RUN/logs/kube-scheduler.log"
  fi
  echo "$VERSION $("$BIN/kube-apiserver" --version | cut -d' ' -f2)" > "$RUN/version"
  log "Kubernetes $(cut -d' ' -f2 "$RUN/version") ($VERSION) started in $(since "$t0") s; export KUBECONFIG=$RUN/kubeconfig"
  echo "$RUN/kubeconfig"
}

# Stops and starts kube-apiserver alone (etcd, and so every object, stays): what a
# control-plane upgrade or crash looks like to clients; their watches break and resume.
cmd_restart_apiserver() {
  exec 9>"$RUN/.lock"; flock 9
  apiserver_ready || die "no test API server runs in $RUN"
  local t0; t0=$(now)
  stop_one kube-apiserver kube-apiserver
  start_apiserver
  log "kube-apiserver restarted in $(since "$t0") s"
}

cmd_stop_locked() {
  stop_one kube-scheduler kube-scheduler
  stop_one kube-controller-manager kube-controller-manager
  stop_one kube-apiserver kube-apiserver
  stop_one etcd etcd
  local data; data=$(cat "$RUN/etcd-data.path" 2>/dev/null || echo "$RUN/etcd-data")
  rm -rf "$data" "$RUN/etcd-data" "$RUN/etcd-data.path" "$RUN/kubeconfig" "$RUN/token" "$RUN/version"
}

cmd_stop() {
  [ -d "$RUN" ] || return 0
  exec 8>"$RUN/.lock"; flock 8
  local running; running=$(cut -d' ' -f1 "$RUN/version" 2>/dev/null || true)
  if [ -n "$running" ] && [ "$running" != "$VERSION" ] && apiserver_ready; then
    die "the test API server in $RUN is '$running', not '$VERSION': stop it with KUBE_ENVTEST_VERSION=$running"
  fi
  cmd_stop_locked
  rm -rf "$RUN/pki" "$RUN/logs"
  log "stopped"
}

cmd_selftest() {
  local started=0 kc
  if ! apiserver_ready; then kc=$(cmd_start); started=1; else kc=$RUN/kubeconfig; fi
  export KUBECONFIG=$kc
  command -v kubectl >/dev/null || apt_install kubernetes-client
  local d; d=$(mktemp -d); local p=$RUN/pki whport=${KUBE_ENVTEST_WEBHOOK_PORT:-18443}
  ( cd "$d"
    openssl req -newkey rsa:2048 -nodes -keyout wh.key -out wh.csr -subj "/CN=webhook"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > wh.ext
    openssl x509 -req -sha256 -days 30 -in wh.csr -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -extfile wh.ext -out wh.crt ) >/dev/null 2>&1
  cat > "$d/webhook.py" <<'PY'
import base64, json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        req = review["request"]
        ann = (req.get("object") or {}).get("metadata", {}).get("annotations")
        patch = ([{"op": "add", "path": "/metadata/annotations/envtest.example.com~1mutated", "value": "true"}] if ann
                 else [{"op": "add", "path": "/metadata/annotations", "value": {"envtest.example.com/mutated": "true"}}])
        out = json.dumps({"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": {
            "uid": req["uid"], "allowed": True, "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(patch).encode()).decode()}}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True); srv.serve_forever()
PY
  python3 "$d/webhook.py" "$whport" "$d/wh.crt" "$d/wh.key" 2>"$d/webhook.log" &
  local whpid=$!
  local rc=0
  {
    kubectl create ns envtest-on && kubectl label ns envtest-on envtest.example.com/inject=enabled && kubectl create ns envtest-off
    kubectl apply -f - <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: kube-envtest-selftest}
webhooks:
- name: pods.envtest.example.com
  admissionReviewVersions: ["v1"]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
  clientConfig:
    url: https://127.0.0.1:$whport/mutate
    caBundle: $(base64 -w0 < "$p/ca.crt")
  namespaceSelector: {matchLabels: {envtest.example.com/inject: enabled}}
  rules: [{apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE"], resources: ["pods"], scope: Namespaced}]
EOF
    kubectl -n envtest-on apply -f - <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
EOF
    for ns in envtest-on envtest-off; do
      kubectl -n "$ns" run probe --image=registry.invalid/busybox --restart=Never --command -- sleep 3600
    done
  } >&2 || rc=1
  local on off
  on=$(kubectl -n envtest-on get pod probe -o jsonpath='{.metadata.annotations.envtest\.example\.com/mutated}' 2>/dev/null || true)
  off=$(kubectl -n envtest-off get pod probe -o jsonpath='{.metadata.annotations.envtest\.example\.com/mutated}' 2>/dev/null || true)
  log "labelled ns annotation='$on' (want true), unlabelled ns annotation='$off' (want empty)"
  [ "$on" = true ] && [ -z "$off" ] || rc=1
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa, namespace: envtest-on}\ndata: {k: v}\n' \
    | kubectl apply --server-side --field-manager=selftest -f - >&2 || rc=1
  log "pod phase: $(kubectl -n envtest-on get pod probe -o jsonpath='{.status.phase}') (Pending expected: no Node, no kubelet)"
  kill "$whpid" 2>/dev/null || true; wait "$whpid" 2>/dev/null || true
  kubectl delete mutatingwebhookconfiguration kube-envtest-selftest >&2 || true
  rm -rf "$d"
  if [ "$started" = 1 ]; then cmd_stop; fi
  if [ "$rc" = 0 ]; then echo "selftest: 1 passed, 0 failed"; else echo "selftest: 0 passed, 1 failed"; fi
  return $rc
}

case "${1:-}" in
  install)  cmd_install ;;
  start)    cmd_start ;;
  stop)     cmd_stop ;;
  restart-apiserver) cmd_restart_apiserver ;;
  status)   apiserver_ready && { echo "running: $(cat "$RUN/version" 2>/dev/null) $RUN/kubeconfig"; exit 0; } || { echo "not running ($VERSION)"; exit 1; } ;;
  env)      echo "export KUBECONFIG=$RUN/kubeconfig" ;;
  kubectl)  cmd_tool kubectl 3 ;;
  kubelet)  cmd_tool kubelet 5 ;;
  run-dir)  echo "$RUN" ;;
  selftest) cmd_selftest ;;
  *) sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
