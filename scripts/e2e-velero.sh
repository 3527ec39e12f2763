#!/usr/bin/env bash
# e2e-velero.sh - velero-jupyterhub against the real thing: a real kubelet with Debian's
# containerd, real Velero (server, node-agent and its hosting pods, the restore helper)
# backing up to a real S3 store (MinIO), and velero-jupyterhub installed with
# `kubectl apply -k manifests/`. Everything is built here from published Go modules and
# cached outside the repo, keyed by version; nothing of another project is committed.
#
#   scripts/e2e-velero.sh [all]    build (cached), bring the node up, run every scenario,
#                                  take everything down again (also on failure)
#   scripts/e2e-velero.sh build    build binaries, images and the scenarios only
#   scripts/e2e-velero.sh up       build, then start the cluster, the node, MinIO
#   scripts/e2e-velero.sh scenario [NAME...]
#                                  on a node that is up: install Velero and
#                                  velero-jupyterhub (once), run the named scenarios
#                                  (tests/e2e_velero/main.rs; none named: all of them)
#   scripts/e2e-velero.sh down     stop and remove everything `up` started
#
# What is real and what stands in for what: README, "End to end with real Velero".
#
# Environment (optional):
#   E2E_CACHE   build cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/velero-jupyterhub/e2e)
#   E2E_RUN     runtime state: containerd, kubelet config, MinIO data, volumes, logs, CSI volumes
#               (default /tmp/velero-jupyterhub-e2e)
#   E2E_KEEP=1  `all` leaves the cluster up after the scenario (for a look around)
#   E2E_CSI_SRC source trees of the csi-driver-host-path and node-driver-registrar releases
#               (NAME-VERSION/, each the release tag's tree with its vendor/), used while
#               the Go module proxy refuses both (default $E2E_CACHE/src; build_csi_node)
#   E2E_LOCK    one run per machine (the node is machine-wide): up, scenario, all and down
#               refuse while another holds it (default /run/lock/velero-jupyterhub-e2e.lock)
set -euo pipefail
shopt -s inherit_errexit   # die inside $(...) must stop the run too
cd "$(dirname "$0")/.."

VELERO_VERSION=v1.18.3              # the newest v1.x release served by the Go module proxy
VELERO_AWS_PLUGIN_VERSION=v1.14.3   # the plugin release made for Velero v1.18
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c   # MinIO's newest module version (RELEASE.2026-02-12)
# Kubernetes' CSI components (github.com/kubernetes-csi): the newest release of each that the
# Go module proxy serves (it refuses others with 403 "This module version is not available").
CSI_SNAPSHOTTER_VERSION=v8.6.0     # csi-snapshotter, snapshot-controller, the snapshot CRDs
CSI_PROVISIONER_VERSION=v6.3.0     # external-provisioner (module .../external-provisioner/v6)
CSI_ATTACHER_VERSION=v4.12.0       # external-attacher
# The driver and the registrar: the module proxy refuses every release of both (403 for
# csi-driver-host-path v1.9.0 to v1.18.0 and node-driver-registrar v1.2.0 to v2.17.0, tags
# and pseudo-versions alike; the registrar's module path has no /v2 either, so its v2 tags
# are no module versions at all). build_csi_node builds them from a source tree of the
# release (the project's own tag, with its vendor/), put in $E2E_CSI_SRC by whoever runs
# this; with none there, the CSI node part is off and the scenarios that need it say so.
CSI_HOSTPATH_VERSION=v1.18.0       # csi-driver-host-path: hostpathplugin
CSI_REGISTRAR_VERSION=v2.17.0      # node-driver-registrar
CSI_MAX_VOLUMES=6                  # the driver's --maxvolumespernode: CSINode allocatable.count

CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/velero-jupyterhub/e2e}
CSI_SRC=${E2E_CSI_SRC:-$CACHE/src}
RUN=${E2E_RUN:-/tmp/velero-jupyterhub-e2e}
case "$RUN" in /*/*) ;; *) echo "e2e-velero: E2E_RUN must be an absolute path two levels deep or more, not '$RUN'" >&2; exit 2 ;; esac

log() { echo "e2e-velero: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

GO_ENV=(env -u GOFLAGS -u GO111MODULE -u GOPATH -u GOBIN GOFLAGS=-mod=mod CGO_ENABLED=0)

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
apt_install() {   # only what is missing; apt sources are the machine's own
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# ---------------------------------------------------------------- build
# go_module_build DIR MODULE@VERSION LDFLAGS PKG...: a module of ours in DIR that requires
# MODULE@VERSION (and $EXTRA_REQUIRE: module@version ..., raising a dependency whose
# exact version the module proxy does not serve to the next one it does) and repeats the
# `replace` lines of MODULE's own go.mod (Velero replaces kopia with its fork: `go install`
# refuses a module with replace lines, and a module that requires it must repeat them),
# then builds PKG... into DIR/out.
go_module_build() {
  local dir=$1 modver=$2 ldflags=$3; shift 3
  local mod=${modver%@*} ver=${modver#*@}
  rm -rf "$dir"; mkdir -p "$dir"
  ( cd "$dir" && "${GO_ENV[@]}" go mod download -json "$modver" ) > "$dir/download.json" 2>&1 || true
  local src; src=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' "$dir/download.json")
  [ -f "$src/go.mod" ] || { cat "$dir/download.json" >&2; die "$modver did not download from the Go module proxy ($(go env GOPROXY))"; }
  {
    printf 'module velero-jupyterhub-e2e-build\n\ngo %s\n\nrequire %s %s\n' "$(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')" "$mod" "$ver"
    local r; for r in ${EXTRA_REQUIRE:-}; do printf 'require %s %s\n' "${r%@*}" "${r#*@}"; done
    # single-line `replace a => b v` and the lines of a `replace ( ... )` block
    # (not a replace by a local directory: external-snapshotter points its client module
    # at ./client, which a requiring module cannot; EXTRA_REQUIRE names the published one)
    awk '/^replace \(/ {blk=1; next} blk && /^\)/ {blk=0; next}
         blk && $2 == "=>" && $3 !~ /^\.\.?\// {print "replace " $0; next}
         /^replace [^(]/ && $4 !~ /^\.\.?\// {print}' "$src/go.mod"
  } > "$dir/go.mod"
  { printf '//go:build tools\n\npackage tools\n\nimport (\n'; printf '\t_ "%s"\n' "$@"; printf ')\n'; } > "$dir/tools.go"
  ( cd "$dir" && "${GO_ENV[@]}" go mod tidy && mkdir -p out \
      && "${GO_ENV[@]}" go build -trimpath -ldflags "-s -w $ldflags" -o out/ "$@"
  ) > "$dir/build.log" 2>&1 || { tail -40 "$dir/build.log" >&2; die "building $modver failed, full log: $dir/build.log"; }
}

# cached NAME: true when $CACHE/NAME/bin holds a finished build
cached() { [ -f "$CACHE/$1/bin/.done" ]; }
finish_build() { local name=$1; mkdir -p "$CACHE/$name/bin"; install -m 0755 "$CACHE/$name/build/out/"* "$CACHE/$name/bin/"; date -u +%FT%TZ > "$CACHE/$name/bin/.done"; rm -rf "$CACHE/$name/build"; }

build_velero() {
  local name=velero-$VELERO_VERSION t0; t0=$(now)
  cached "$name" && return 0
  log "building Velero $VELERO_VERSION (velero, velero-restore-helper, velero-helper) from Go modules; ~8 min on 2 cores"
  local pkg=github.com/vmware-tanzu/velero
  # Velero v1.18.3 requires k8s.io/cli-runtime v0.33.12, which the module proxy refuses
  # (403: "This module version is not available"); v0.33.13 is the next patch release.
  EXTRA_REQUIRE=k8s.io/cli-runtime@v0.33.13 \
  go_module_build "$CACHE/$name/build" "$pkg@$VELERO_VERSION" \
    "-X $pkg/pkg/buildinfo.Version=$VELERO_VERSION -X $pkg/pkg/buildinfo.GitTreeState=clean" \
    "$pkg/cmd/velero" "$pkg/cmd/velero-restore-helper" "$pkg/cmd/velero-helper"
  finish_build "$name"; log "Velero built in $(since "$t0") s"
}

build_aws_plugin() {
  local name=velero-plugin-for-aws-$VELERO_AWS_PLUGIN_VERSION t0; t0=$(now)
  cached "$name" && return 0
  log "building velero-plugin-for-aws $VELERO_AWS_PLUGIN_VERSION from Go modules; ~4 min on 2 cores"
  local pkg=github.com/vmware-tanzu/velero-plugin-for-aws
  go_module_build "$CACHE/$name/build" "$pkg@$VELERO_AWS_PLUGIN_VERSION" "" \
    "$pkg/velero-plugin-for-aws" "$pkg/hack/cp-plugin"
  finish_build "$name"; log "velero-plugin-for-aws built in $(since "$t0") s"
}

build_minio() {
  local name=minio-$MINIO_VERSION t0; t0=$(now)
  cached "$name" && return 0
  log "building MinIO $MINIO_VERSION from Go modules; ~8 min on 2 cores"
  go_module_build "$CACHE/$name/build" "github.com/minio/minio@$MINIO_VERSION" "" github.com/minio/minio
  finish_build "$name"; log "MinIO built in $(since "$t0") s"
}

# The CSI side: Kubernetes' CSI sidecars and the snapshot controller, each built from
# its published module (their release tags) and cached under its own name and version.
# (csi-driver-host-path and node-driver-registrar: see build_csi_node below.)
build_csi() {
  local t0 name; t0=$(now)
  name=external-snapshotter-$CSI_SNAPSHOTTER_VERSION
  if ! cached "$name"; then
    log "building external-snapshotter $CSI_SNAPSHOTTER_VERSION (csi-snapshotter, snapshot-controller) from Go modules"
    local pkg=github.com/kubernetes-csi/external-snapshotter/v8
    # Its go.mod replaces its client module by ./client: the published client of the same
    # release instead.
    EXTRA_REQUIRE=github.com/kubernetes-csi/external-snapshotter/client/v8@$CSI_SNAPSHOTTER_VERSION \
    go_module_build "$CACHE/$name/build" "$pkg@$CSI_SNAPSHOTTER_VERSION" "-X main.version=$CSI_SNAPSHOTTER_VERSION" \
      "$pkg/cmd/csi-snapshotter" "$pkg/cmd/snapshot-controller"
    finish_build "$name"; log "external-snapshotter built in $(since "$t0") s"
  fi
  name=external-provisioner-$CSI_PROVISIONER_VERSION
  if ! cached "$name"; then
    log "building external-provisioner $CSI_PROVISIONER_VERSION from Go modules"
    local pkg=github.com/kubernetes-csi/external-provisioner/v6
    go_module_build "$CACHE/$name/build" "$pkg@$CSI_PROVISIONER_VERSION" "-X main.version=$CSI_PROVISIONER_VERSION" \
      "$pkg/cmd/csi-provisioner"
    finish_build "$name"; log "external-provisioner built at $(since "$t0") s"
  fi
  name=external-attacher-$CSI_ATTACHER_VERSION
  if ! cached "$name"; then
    log "building external-attacher $CSI_ATTACHER_VERSION from Go modules"
    local pkg=github.com/kubernetes-csi/external-attacher/v4
    go_module_build "$CACHE/$name/build" "$pkg@$CSI_ATTACHER_VERSION" "-X main.version=$CSI_ATTACHER_VERSION" \
      "$pkg/cmd/csi-attacher"
    finish_build "$name"; log "external-attacher built at $(since "$t0") s"
  fi
}

# build_csi_node: hostpathplugin and csi-node-driver-registrar, each from the module proxy
# if it serves the release, else from $CSI_SRC/NAME-VERSION (a source tree of that release
# tag; built as its Makefile does, with its own vendor/ and -mod=vendor). Neither: CSI_NODE=0.
build_csi_node() {
  CSI_NODE=1
  local t0 spec name mod cmd ver src; t0=$(now)
  for spec in "csi-driver-host-path github.com/kubernetes-csi/csi-driver-host-path cmd/hostpathplugin $CSI_HOSTPATH_VERSION" \
              "node-driver-registrar github.com/kubernetes-csi/node-driver-registrar cmd/csi-node-driver-registrar $CSI_REGISTRAR_VERSION"; do
    read -r name mod cmd ver <<<"$spec"
    cached "$name-$ver" && continue
    log "building $name $ver"
    local err=""
    if [ "$name" != node-driver-registrar ]; then   # (its v2 tags are no versions of its module path)
      mkdir -p "$CACHE/$name-$ver/probe"
      err=$( { ( cd "$CACHE/$name-$ver/probe" && "${GO_ENV[@]}" go mod download -json "$mod@$ver" ) | sed -n 's/^[[:space:]]*"Error": "\(.*\)",*$/\1/p'; } 2>&1 || true)
      rm -rf "$CACHE/$name-$ver/probe"
      if [ -z "$err" ]; then
        go_module_build "$CACHE/$name-$ver/build" "$mod@$ver" "-X main.version=$ver" "$mod/$cmd"
        finish_build "$name-$ver"; log "$name built from its module at $(since "$t0") s"; continue
      fi
    fi
    src=$CSI_SRC/$name-$ver
    if [ ! -f "$src/go.mod" ] || ! grep -qx "module $mod" "$src/go.mod" || [ ! -d "$src/vendor" ]; then
      local why="has no module version $ver of $mod"; [ -z "$err" ] || why="refuses it ($err)"
      log "no $name $ver: the Go module proxy $why, and there is no source tree of the release in $src (E2E_CSI_SRC)"
      CSI_NODE=0; continue
    fi
    log "$name $ver: ${err:+the Go module proxy refuses it ($err); }building the release's source tree $src"
    local dir=$CACHE/$name-$ver/build; rm -rf "$dir"; mkdir -p "$dir/out"
    ( cd "$src" && "${GO_ENV[@]}" GOFLAGS=-mod=vendor go build -trimpath -ldflags "-s -w -X main.version=$ver" -o "$dir/out/" "./$cmd" ) \
      > "$dir/build.log" 2>&1 || { tail -40 "$dir/build.log" >&2; die "building $name from $src failed"; }
    finish_build "$name-$ver"; log "$name built at $(since "$t0") s"
  done
}

# ---------------------------------------------------------------- images
# No registry is reachable: every image is built here from binaries with buildah (FROM
# scratch, no RUN step, nothing pulled) and written as a docker-archive for containerd.
# image_from_context NAME:TAG DIR: DIR holds a Dockerfile and its inputs.
image_from_context() {
  local ref=$1 ctx=$2 out=$CACHE/images/${1//[\/:]/_}.tar
  local store=$CACHE/images/.buildah
  mkdir -p "$CACHE/images"
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs \
    bud --quiet --isolation chroot --pull=never -t "$ref" "$ctx" >&2
  rm -f "$out"
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs \
    push --quiet "$ref" "docker-archive:$out:$ref" >&2
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs rmi --all >/dev/null 2>&1 || true
  echo "$out"
}

# The images, each a docker-archive in $CACHE/images (names as the manifests use them):
#   registry.k8s.io/pause:3.10   Kubernetes' own pause.c (from the k8s.io/kubernetes module),
#                                static: the sandbox image and our helpers' default image
#   localhost/busybox:e2e         Debian's busybox-static: the stand-in notebook server
#   velero/velero:VERSION         velero, velero-restore-helper, velero-helper at / (as
#                                 Velero's Dockerfile lays them out)
#   velero/velero-plugin-for-aws:VERSION  the plugin and cp-plugin (as its Dockerfile)
build_images() {
  local stamp=$CACHE/images/.done-$VELERO_VERSION-$VELERO_AWS_PLUGIN_VERSION-r3
  [ -f "$stamp" ] && return 0
  local t0 ctx; t0=$(now); ctx=$(mktemp -d)
  local k8s; k8s=$( ("${GO_ENV[@]}" go mod download -json "k8s.io/kubernetes@v$(kube_version)") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -f "$k8s/build/pause/linux/pause.c" ] || die "no build/pause/linux/pause.c in k8s.io/kubernetes ($k8s)"
  mkdir -p "$ctx/pause"
  gcc -Os -static -o "$ctx/pause/pause" "$k8s/build/pause/linux/pause.c" -DVERSION=3.10-e2e && strip "$ctx/pause/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$ctx/pause/Dockerfile"
  image_from_context registry.k8s.io/pause:3.10 "$ctx/pause" >/dev/null

  # Each image's files are staged as a root file system, so that modes (/tmp 1777) survive
  # COPY, which creates the destination of a directory's contents with its own defaults.
  local fs=$ctx/busybox/rootfs
  mkdir -p "$fs/bin" "$fs/tmp"; chmod 1777 "$fs/tmp"
  cp /bin/busybox "$fs/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$fs/bin/$a"; done
  printf 'FROM scratch\nCOPY rootfs /\nCMD ["sh"]\n' > "$ctx/busybox/Dockerfile"
  image_from_context localhost/busybox:e2e "$ctx/busybox" >/dev/null

  fs=$ctx/velero/rootfs
  mkdir -p "$fs/etc" "$fs/tmp" "$ctx/velero/home"; chmod 1777 "$fs/tmp"   # kopia and the plugins write to /tmp
  cp "$CACHE/velero-$VELERO_VERSION/bin/"velero* "$fs/"
  printf 'root:x:0:0:root:/:/sbin/nologin\ncnb:x:1002:1000:cnb:/home/cnb:/sbin/nologin\n' > "$fs/etc/passwd"
  printf 'root:x:0:\ncnb:x:1000:\n' > "$fs/etc/group"
  printf 'FROM scratch\nCOPY rootfs /\nCOPY --chown=1002:1000 home /home/cnb\nUSER 1002:1000\n' > "$ctx/velero/Dockerfile"
  image_from_context "velero/velero:$VELERO_VERSION" "$ctx/velero" >/dev/null

  mkdir -p "$ctx/plugin/plugins" "$ctx/plugin/bin"
  cp "$CACHE/velero-plugin-for-aws-$VELERO_AWS_PLUGIN_VERSION/bin/velero-plugin-for-aws" "$ctx/plugin/plugins/"
  cp "$CACHE/velero-plugin-for-aws-$VELERO_AWS_PLUGIN_VERSION/bin/cp-plugin" "$ctx/plugin/bin/"
  printf 'FROM scratch\nCOPY plugins /plugins\nCOPY bin /bin\nUSER 65532:65532\nENTRYPOINT ["cp-plugin", "/plugins/velero-plugin-for-aws", "/target/velero-plugin-for-aws"]\n' > "$ctx/plugin/Dockerfile"
  image_from_context "velero/velero-plugin-for-aws:$VELERO_AWS_PLUGIN_VERSION" "$ctx/plugin" >/dev/null
  rm -rf "$ctx"
  touch "$stamp"
  log "images built in $(since "$t0") s"
}
kube_version() { sed -n 's/^  current) KUBE_VERSION=\([0-9.]*\);.*/\1/p' scripts/kube-envtest.sh; }

cmd_build() {
  command -v go >/dev/null || die "needs Go (the machine's golang; the same one kube-envtest.sh uses)"
  mkdir -p "$CACHE"; exec 8>"$CACHE/.lock"; flock 8   # one build at a time
  KUBELET=$(bash scripts/kube-envtest.sh kubelet)
  KUBECTL=$(bash scripts/kube-envtest.sh kubectl)
  build_velero
  build_aws_plugin
  build_minio
  build_csi
  build_csi_node
  apt_install buildah busybox-static gcc libc6-dev
  build_images
  OUR_IMAGE=$(bash scripts/image.sh "$RUN/image")
  # The scenarios (tests/e2e_velero/), compiled now so that a compile error fails the
  # build step, not a half-made node.
  cargo test --locked --test e2e_velero --no-run >&2
  exec 8>&-
  BUILT=1
}

# ---------------------------------------------------------------- the node
# Addresses. Pods live on a bridge of their own; the host is its gateway (10.244.77.1)
# and MinIO listens there. Pods get no default route: only the Service range is routed,
# through the host, so nothing in a pod reaches beyond this machine. There is no
# kube-proxy: the one Service pods dial, `kubernetes` (its ClusterIP is the first address
# of the range), is a host address where socat forwards to the API server. The API server
# reaches webhook pods through their endpoints (--enable-aggregator-routing).
BRIDGE=vjh-e2e0
POD_SUBNET=10.244.77.0/24 HOST_IP=10.244.77.1
SERVICE_CIDR=10.244.78.0/24 API_SERVICE_IP=10.244.78.1
API_PORT=${E2E_API_PORT:-16463} ETCD_PORT=${E2E_ETCD_PORT:-12399}
KUBELET_ROOT=/var/lib/kubelet   # where Velero's node-agent looks for pod volumes (host-pods)
SOCK=$RUN/containerd/containerd.sock
KUBECONFIG_FILE=$RUN/cluster/kubeconfig
RESTORE_HELPER_IMAGE=docker.io/velero/velero-restore-helper:$VELERO_VERSION
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward"   # the kubelet and the CNI bridge change them
OURS=.velero-jupyterhub-e2e   # marks the kubelet root as this script's

envtest() {
  KUBE_ENVTEST_RUN=$RUN/cluster KUBE_ENVTEST_API_PORT=$API_PORT KUBE_ENVTEST_ETCD_PORT=$ETCD_PORT \
  KUBE_ENVTEST_SERVICE_CIDR=$SERVICE_CIDR KUBE_ENVTEST_SA_ADMISSION=1 KUBE_ENVTEST_ATTACH_DETACH=1 \
  KUBE_ENVTEST_EXTRA_SANS=IP:$API_SERVICE_IP \
  KUBE_ENVTEST_EXTRA_APISERVER_FLAGS=--enable-aggregator-routing=true \
    bash scripts/kube-envtest.sh "$@" 7>&- 8>&-   # its servers outlive us: no locks held
}
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
ctr_() { ctr -a "$SOCK" -n k8s.io "$@"; }

# start_bg NAME CMD...: a process of ours, its pid in $RUN/NAME.pid, its log in $RUN/logs
start_bg() {
  local name=$1; shift
  nohup "$@" </dev/null >"$RUN/logs/$name.log" 2>&1 7>&- 8>&- &   # holding neither lock
  echo $! > "$RUN/$name.pid"
}
stop_bg() {
  local pid; pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 0
  # Only a process started with our run dir in its command line (a stale pid may be reused).
  if grep -qaF -- "$RUN" "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$1.pid"
}
# wait_for SECONDS WHAT CMD...: poll CMD every second
wait_for() {
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$what: not within $secs s"
}

start_network() {
  # A fixed MAC: a bridge otherwise takes its ports' lowest one, changes it when that port
  # goes (a pod deleted), and pods' ARP entries for the gateway go stale: 30 s without the
  # API server (the controller lost its Lease, the webhook its probes: seen here).
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" address 02:00:0a:f4:4d:01 type bridge
  ip addr replace "$HOST_IP/24" dev "$BRIDGE"
  ip addr replace "$API_SERVICE_IP/32" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  mkdir -p "$RUN/cni/net.d" "$RUN/cni/ipam"
  cat > "$RUN/cni/net.d/10-e2e.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "vjh-e2e", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": false, "ipMasq": false,
   "hairpinMode": false,
   "ipam": {"type": "host-local", "dataDir": "$RUN/cni/ipam", "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$HOST_IP"}]],
            "routes": [{"dst": "$SERVICE_CIDR"}]}},
  {"type": "loopback"}]}
EOF
}

start_containerd() {
  mkdir -p "$RUN/containerd/root" "$RUN/containerd/state" "$RUN/containerd/opt"
  cat > "$RUN/containerd/config.toml" <<EOF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.10"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # This machine has no CAP_SYS_RESOURCE: the CRI may not lower oom_score_adj.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$RUN/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "$RUN/containerd/opt"
EOF
  start_bg containerd containerd --config "$RUN/containerd/config.toml"
  wait_for 30 "containerd answering on $SOCK" ctr -a "$SOCK" version
  local tar
  for tar in "$CACHE"/images/*.tar; do ctr_ images import "$tar" >/dev/null; done
  # Our own image: image.sh's OCI archive, imported by digest and tagged with the name the
  # manifests use (velero-jupyterhub:VERSION, as the CRI spells it).
  local version; version=$(basename "$OUR_IMAGE" .oci.tar); version=${version#velero-jupyterhub-}
  ctr_ images import --base-name docker.io/library/velero-jupyterhub --digests "$OUR_IMAGE" >/dev/null
  local ours; ours=$(ctr_ images ls -q | grep -m1 '^docker.io/library/velero-jupyterhub@sha256:' || true)
  [ -n "$ours" ] || die "our image did not import ($(ctr_ images ls -q | tr '\n' ' '))"
  ctr_ images tag --force "$ours" "docker.io/library/velero-jupyterhub:$version" >/dev/null
  # The restore helper image under a name of its own, so that the scenario can tell that
  # Velero took it from fs-restore-action-config (its default is the server's image).
  ctr_ images tag --force "docker.io/velero/velero:$VELERO_VERSION" "$RESTORE_HELPER_IMAGE" >/dev/null
}

start_kubelet() {
  mkdir -p "$RUN/kubelet/static" "$RUN/kubelet/pki"
  cat > "$RUN/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$SOCK
address: 127.0.0.1
port: 30250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 30248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}, x509: {}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
# These machines run cgroup v1 (a hybrid with an empty v2): current kubelets refuse it
# unless told otherwise.
failCgroupV1: false
failSwapOn: false
staticPodPath: $RUN/kubelet/static
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
nodeStatusUpdateFrequency: 5s
makeIPTablesUtilChains: false
EOF
  # Named localhost: the kubelet refuses a loopback --node-ip, and the API server then
  # reaches it (logs, exec) at the Hostname address without exposing it beyond loopback.
  start_bg kubelet "$KUBELET" --kubeconfig="$KUBECONFIG_FILE" --config="$RUN/kubelet/config.yaml" \
    --root-dir="$KUBELET_ROOT" --cert-dir="$RUN/kubelet/pki" --hostname-override=localhost --v=2
  wait_for 120 "node localhost Ready (kubelet log: $RUN/logs/kubelet.log)" \
    sh -c "'$KUBECTL' --kubeconfig '$KUBECONFIG_FILE' get node localhost -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  # The node lifecycle controller is off in the test cluster, so the not-ready taint that
  # admission puts on every new Node is never lifted by it.
  kc taint node localhost node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
}

start_minio() {
  mkdir -p "$RUN/minio/data"
  [ -f "$RUN/minio/secret" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$RUN/minio/secret"
  MINIO_ROOT_USER=velero-e2e MINIO_ROOT_PASSWORD=$(cat "$RUN/minio/secret") \
    start_bg minio "$CACHE/minio-$MINIO_VERSION/bin/minio" server --quiet --anonymous \
      --address "$HOST_IP:9000" --console-address 127.0.0.1:19001 "$RUN/minio/data"
  wait_for 60 "MinIO live on $HOST_IP:9000" curl -sf "http://$HOST_IP:9000/minio/health/live"
  # The bucket, made with a signed S3 request (curl speaks AWS SigV4).
  local auth=(--aws-sigv4 "aws:amz:minio:s3" --user "velero-e2e:$(cat "$RUN/minio/secret")")
  curl -sf -X PUT "${auth[@]}" "http://$HOST_IP:9000/velero" >/dev/null \
    || curl -sf "${auth[@]}" "http://$HOST_IP:9000/velero" >/dev/null \
    || die "could not create the bucket velero in MinIO"
  printf '[default]\naws_access_key_id = velero-e2e\naws_secret_access_key = %s\n' "$(cat "$RUN/minio/secret")" > "$RUN/minio/credentials-velero"
}

# The CSI side of the node. Everything runs as a host process of ours, like the kubelet
# and MinIO: no registry means no driver images, and a driver in a pod would need
# privileged containers with Bidirectional mount propagation into a kubelet root that is
# the host's own directory anyway. As processes on the host, the driver's bind mounts are
# where the kubelet looks; the sidecars use the admin kubeconfig (no RBAC of theirs to
# install), and node-driver-registrar registers the driver with the kubelet through
# $KUBELET_ROOT/plugins_registry exactly as its DaemonSet container would.
CSI_DRIVER=hostpath.csi.k8s.io
CSI_SOCK=$KUBELET_ROOT/plugins/$CSI_DRIVER/csi.sock
snapshot_crds() {   # the CRDs of external-snapshotter's client module, as published
  local dir; dir=$( ("${GO_ENV[@]}" go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$CSI_SNAPSHOTTER_VERSION") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -f "$dir/config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml" ] || die "no snapshot CRDs in external-snapshotter/client/v8@$CSI_SNAPSHOTTER_VERSION ($dir)"
  echo "$dir/config/crd"
}
start_csi() {
  local crds; crds=$(snapshot_crds)
  kc apply -f "$crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" -f "$crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" \
    -f "$crds/snapshot.storage.k8s.io_volumesnapshots.yaml" >/dev/null
  kc wait --for=condition=Established crd volumesnapshots.snapshot.storage.k8s.io volumesnapshotcontents.snapshot.storage.k8s.io \
    volumesnapshotclasses.snapshot.storage.k8s.io --timeout=60s >/dev/null
  local snap=$CACHE/external-snapshotter-$CSI_SNAPSHOTTER_VERSION/bin
  start_bg snapshot-controller "$snap/snapshot-controller" --kubeconfig="$KUBECONFIG_FILE" --v=3
  if [ "${CSI_NODE:-0}" != 1 ]; then
    log "CSI node part off (no csi-driver-host-path or node-driver-registrar built: see build_csi_node's message above)"
    return 0
  fi
  mkdir -p "$RUN/csi/hostpath" "$(dirname "$CSI_SOCK")"
  # Attach required: external-attacher turns the attach/detach controller's
  # VolumeAttachments into ControllerPublishVolume calls (--enable-attach gives the driver
  # that capability), as a driver of real disks needs.
  kc apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: $CSI_DRIVER
spec:
  attachRequired: true
  podInfoOnMount: true
  fsGroupPolicy: File
  volumeLifecycleModes: [Persistent]
---
# WaitForFirstConsumer: a host-path volume lives on one node (the driver reports its
# topology), so it is made where the first pod that mounts it is scheduled, as any
# node-local storage is used; the claim stays Pending until then.
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: csi-hostpath
provisioner: $CSI_DRIVER
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
---
# The class Velero's CSI actions pick for this driver (the label). Delete: the snapshot
# made for a backup goes with its VolumeSnapshot; the data mover has copied it to the
# object store by then, and Velero removes the VolumeSnapshot once it has.
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: csi-hostpath-snapclass
  labels:
    velero.io/csi-volumesnapshot-class: "true"
driver: $CSI_DRIVER
deletionPolicy: Delete
EOF
  start_bg csi-hostpath "$CACHE/csi-driver-host-path-$CSI_HOSTPATH_VERSION/bin/hostpathplugin" \
    --drivername="$CSI_DRIVER" --endpoint="unix://$CSI_SOCK" --nodeid=localhost \
    --statedir="$RUN/csi/hostpath" --maxvolumespernode="$CSI_MAX_VOLUMES" --enable-attach=true --v=3
  wait_for 30 "the CSI driver's socket $CSI_SOCK" test -S "$CSI_SOCK"
  # (It dials the socket through a link in our run dir: stop_bg stops only a process
  # whose command line names that dir, and nothing else of the registrar's does.)
  ln -sfn "$CSI_SOCK" "$RUN/csi/csi.sock"
  start_bg csi-registrar "$CACHE/node-driver-registrar-$CSI_REGISTRAR_VERSION/bin/csi-node-driver-registrar" \
    --csi-address="$RUN/csi/csi.sock" --kubelet-registration-path="$CSI_SOCK" \
    --plugin-registration-path="$KUBELET_ROOT/plugins_registry" --v=3
  # Topology: the driver reports topology.hostpath.csi/node; the provisioner places a
  # volume on the selected node's segment.
  start_bg csi-provisioner "$CACHE/external-provisioner-$CSI_PROVISIONER_VERSION/bin/csi-provisioner" \
    --kubeconfig="$KUBECONFIG_FILE" --csi-address="$CSI_SOCK" --feature-gates=Topology=true --extra-create-metadata --v=3
  start_bg csi-attacher "$CACHE/external-attacher-$CSI_ATTACHER_VERSION/bin/csi-attacher" \
    --kubeconfig="$KUBECONFIG_FILE" --csi-address="$CSI_SOCK" --v=3
  start_bg csi-snapshotter "$snap/csi-snapshotter" --kubeconfig="$KUBECONFIG_FILE" --csi-address="$CSI_SOCK" \
    --extra-create-metadata --v=3
  wait_for 60 "CSINode localhost with $CSI_DRIVER, allocatable.count $CSI_MAX_VOLUMES (log: $RUN/logs/csi-registrar.log)" \
    sh -c "'$KUBECTL' --kubeconfig '$KUBECONFIG_FILE' get csinode localhost -o jsonpath='{.spec.drivers[?(@.name==\"$CSI_DRIVER\")].allocatable.count}' | grep -qx '$CSI_MAX_VOLUMES'"
  touch "$RUN/csi-node"
}
stop_csi() {
  local p; for p in csi-snapshotter csi-attacher csi-provisioner csi-registrar csi-hostpath snapshot-controller; do stop_bg "$p"; done
  rm -f "$RUN/csi-node"
}

# The lock covers one command; between `up` and `down` the node is someone's session.
# (`all` asks before it arms its teardown: a refusal must not take that node down.)
refuse_if_up() {
  if [ -e "$RUN/.up" ] || [ -e "$KUBELET_ROOT/$OURS" ]; then
    die "a node of this script is up already (E2E_RUN $RUN, or another one): run '$0 down' with its E2E_RUN first"
  fi
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "the node needs root (containerd, kubelet, a bridge)"
  [ "${BUILT:-0}" = 1 ] || cmd_build
  apt_install containerd runc containernetworking-plugins socat iproute2 curl procps
  mkdir -p "$RUN/logs"
  # The kubelet's root must be /var/lib/kubelet (Velero's node-agent mounts it): never
  # take over, or later delete, one that a real kubelet on this machine uses.
  if [ -e "$KUBELET_ROOT" ] && [ ! -e "$KUBELET_ROOT/$OURS" ]; then
    die "$KUBELET_ROOT exists and is not ours: is a kubelet running on this machine? (remove it if not)"
  fi
  refuse_if_up
  mkdir -p "$KUBELET_ROOT"; touch "$KUBELET_ROOT/$OURS"
  [ -e /var/log/pods ] || touch "$RUN/made-var-log"   # the kubelet makes /var/log/pods whatever its root
  touch "$RUN/.up"   # down acts only on a run dir that was brought up
  local k; for k in $SYSCTLS; do [ -f "$RUN/sysctl.$k" ] || sysctl -n "$k" > "$RUN/sysctl.$k"; done
  local t0; t0=$(now)
  start_network
  start_containerd
  log "containerd up, images imported at $(since "$t0") s"
  envtest start >/dev/null
  start_bg api-forward socat "TCP-LISTEN:443,bind=$API_SERVICE_IP,fork,reuseaddr" "TCP:127.0.0.1:$API_PORT"
  start_minio
  log "API server, forward and MinIO up at $(since "$t0") s"
  start_kubelet
  log "node localhost Ready at $(since "$t0") s"
  start_csi
  log "CSI $( [ -e "$RUN/csi-node" ] && echo "driver $CSI_DRIVER registered, sidecars and snapshot-controller" || echo "snapshot-controller (no driver)") up at $(since "$t0") s"
}

cmd_down() {
  [ -e "$RUN/.up" ] || { log "nothing to take down in $RUN"; return 0; }
  local t0 kl=/nonexistent-kubelet-root; t0=$(now)
  [ -e "$KUBELET_ROOT/$OURS" ] && kl=$KUBELET_ROOT   # only ever touch our own kubelet's state
  if [ -f "$KUBECONFIG_FILE" ] && [ -n "${KUBECTL:-}" ] && [ -f "$RUN/kubelet.pid" ]; then
    # While the kubelet runs, so that volumes are unmounted and CNI DEL happens.
    kc delete pods --all -A --grace-period=1 --timeout=60s --request-timeout=10s >/dev/null 2>&1 || true
  fi
  stop_bg kubelet
  stop_csi   # after the kubelet: its volume teardown calls the driver
  stop_bg minio
  stop_bg api-forward
  envtest stop >/dev/null 2>&1 || true
  if [ -S "$SOCK" ]; then
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
    sleep 1
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
  fi
  stop_bg containerd
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $SOCK" 2>/dev/null || true
  # Mounts left under our directories, deepest first.
  local m
  for m in $(awk -v run="$RUN" -v kl="$kl" '$2 == run || index($2, run "/") == 1 || $2 == kl || index($2, kl "/") == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for k in $SYSCTLS; do [ -f "$RUN/sysctl.$k" ] && sysctl -qw "$k=$(cat "$RUN/sysctl.$k")" && rm -f "$RUN/sysctl.$k"; done
  # Pod network namespaces containerd left (pods killed, not torn down by CNI): ours are
  # the ones with an address on our pod subnet; deleting one removes its veth pair.
  local n
  local ours_ips; ours_ips=$(ls "$RUN/cni/ipam/vjh-e2e" 2>/dev/null | grep -E '^[0-9.]+$' || true)
  for n in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do
    local ip; ip=$(ip -n "$n" -4 -o addr show 2>/dev/null | awk '{split($4, a, "/"); print a[1]}' | grep -vx 127.0.0.1 || true)
    [ -n "$ip" ] && echo "$ours_ips" | grep -qx "$ip" && { ip netns delete "$n" 2>/dev/null || true; }
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf --one-file-system "$RUN/containerd" "$RUN/cni" "$RUN/kubelet" "$RUN/minio" "$RUN/volumes" "$RUN/csi" || true
  rm -f /var/lib/cni/results/vjh-e2e-* 2>/dev/null || true
  if [ "$kl" = "$KUBELET_ROOT" ]; then
    rm -rf --one-file-system "$KUBELET_ROOT" || true
    [ -e "$RUN/made-var-log" ] && { rm -rf /var/log/pods /var/log/containers || true; }
    local c; for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io; do
      [ -d "$c" ] && { find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; }
    done
  fi
  rm -f "$RUN/.up" "$RUN/made-var-log"
  log "down in $(since "$t0") s"
}

# ---------------------------------------------------------------- the scenarios
# The scenarios themselves are Rust test code (tests/e2e_velero/: the restore matrix),
# run by `cargo test` on the node brought up here, with Velero and velero-jupyterhub
# installed once per node.

# EnableCSI: Velero's CSI actions (built into the server since v1.14) run only with it
# (pkg/util/csi/util.go, pkg/backup/item_backupper.go), so the CSI snapshot data mover
# (`snapshotMoveData`: a DataUpload, which the node-agent serves with a pod of the velero
# image mounting a claim made from the snapshot) needs it; `velero install` gives the
# flag to the server and the node-agent alike. File-system backups are unchanged by it.
install_velero() {
  # The node-agent's data path settings (pkg/types/node_agent.go), read once at its start.
  # restorePVC.ignoreDelayBinding: a DataDownload into a claim of a WaitForFirstConsumer
  # class otherwise waits for a pod that mounts the claim (pkg/exposer/generic_restore.go,
  # kube.WaitPVCConsumed) before it writes anything, for up to --data-mover-prepare-timeout
  # (30 min). An idle home has no such pod, and the one a user would start is refused
  # while the claim is restored (velero-jupyterhub-restoring-claims): the two wait for each
  # other until Velero gives up. With it, Velero puts the claim where its own pod runs.
  # (`velero install` checks that the ConfigMap exists, even with --dry-run: made first.)
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: velero
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: node-agent-config
  namespace: velero
data:
  node-agent-config.json: '{"restorePVC": {"ignoreDelayBinding": true}}'
EOF
  "$VELERO" --kubeconfig "$KUBECONFIG_FILE" install --dry-run -o yaml \
    --image "velero/velero:$VELERO_VERSION" \
    --provider aws --plugins "velero/velero-plugin-for-aws:$VELERO_AWS_PLUGIN_VERSION" \
    --bucket velero --secret-file "$RUN/minio/credentials-velero" \
    --backup-location-config "region=minio,s3ForcePathStyle=true,s3Url=http://$HOST_IP:9000" \
    --use-volume-snapshots=false --use-node-agent --features=EnableCSI --node-agent-configmap node-agent-config \
    --velero-pod-cpu-request 50m --velero-pod-mem-request 128Mi \
    --node-agent-pod-cpu-request 50m --node-agent-pod-mem-request 128Mi \
    > "$RUN/velero-install.yaml"
  # As `velero install` does without --dry-run: the CRDs first, established, then the rest.
  kc apply -f "$RUN/velero-install.yaml" >/dev/null 2>&1 || true
  kc wait --for=condition=Established crd -l component=velero --timeout=60s >/dev/null
  kc apply -f "$RUN/velero-install.yaml" >/dev/null
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: fs-restore-action-config
  namespace: velero
  labels:
    velero.io/plugin-config: ""
    velero.io/pod-volume-restore: RestoreItemAction
data:
  image: $RESTORE_HELPER_IMAGE
EOF
  kc -n velero rollout status deploy/velero --timeout=180s >/dev/null \
    || { kc -n velero describe pods >&2; die "Velero's server did not start"; }
  kc -n velero rollout status ds/node-agent --timeout=180s >/dev/null \
    || { kc -n velero describe pods >&2; die "Velero's node-agent did not start"; }
  wait_for 120 "BackupStorageLocation default Available" \
    sh -c "'$KUBECTL' --kubeconfig '$KUBECONFIG_FILE' -n velero get bsl default -o jsonpath='{.status.phase}' | grep -qx Available"
}

# velero-jupyterhub as users install it: `kubectl apply -k manifests/`, our image, the
# certificates made by the controller.
install_ours() {
  kc apply -k manifests/ >/dev/null
  kc -n velero-jupyterhub rollout status deploy --timeout=180s >/dev/null \
    || { kc -n velero-jupyterhub describe pods >&2; die "velero-jupyterhub did not start"; }
}

# Whether `up`'s node has Velero and velero-jupyterhub installed (the first `scenario`
# installs both; the scenarios leave them installed as they found them).
installed() {
  kc -n velero get deploy/velero >/dev/null 2>&1 && kc get mutatingwebhookconfiguration velero-jupyterhub >/dev/null 2>&1
}

# The scenario names, as tests/e2e_velero/main.rs names them (`cargo test -- --list`).
scenario_names() {
  cargo test --locked --quiet --test e2e_velero -- --ignored --list 2>/dev/null | sed -n 's/: test$//p'
}

cmd_scenario() {
  KUBECTL=${KUBECTL:-$(bash scripts/kube-envtest.sh kubectl)}
  VELERO=$CACHE/velero-$VELERO_VERSION/bin/velero
  local target_dir; target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  VJH=$target_dir/x86_64-unknown-linux-musl/release/velero-jupyterhub   # image.sh's binary
  [ -x "$VJH" ] || die "no $VJH: run '$0 build' first"
  local t0; t0=$(now)
  if ! installed; then
    install_velero;  log "Velero installed at $(since "$t0") s"
    install_ours;    log "velero-jupyterhub installed at $(since "$t0") s"
  fi
  local known; known=$(scenario_names)
  [ -n "$known" ] || die "no scenarios listed by cargo test --test e2e_velero"
  local name names=("$@") not_run=()
  if [ ${#names[@]} -eq 0 ]; then
    mapfile -t names <<<"$known"
    # The scenarios on a CSI driver (named *csi*) need the driver `up` started; without it
    # they are not run, and said so (never counted as passed).
    if [ ! -e "$RUN/csi-node" ]; then
      local kept=()
      for name in "${names[@]}"; do
        case "$name" in *csi*) not_run+=("$name") ;; *) kept+=("$name") ;; esac
      done
      names=("${kept[@]}")
    fi
  fi
  for name in "${names[@]}"; do
    echo "$known" | grep -qx "$name" || die "no scenario '$name'; there are: $(echo $known)"
  done
  local failed=()
  for name in "${names[@]}"; do
    local s0; s0=$(now)
    log "scenario $name"
    if E2E_RUN=$RUN E2E_KUBECTL=$KUBECTL E2E_VELERO=$VELERO E2E_VJH=$VJH KUBECONFIG=$KUBECONFIG_FILE \
       E2E_RESTORE_HELPER_IMAGE=$RESTORE_HELPER_IMAGE E2E_CSI_MAX_VOLUMES=$CSI_MAX_VOLUMES \
       cargo test --locked --quiet --test e2e_velero -- --ignored --exact --nocapture "$name" 7>&- 8>&-; then
      log "scenario $name PASSED in $(since "$s0") s"
    else
      log "scenario $name FAILED after $(since "$s0") s"
      failed+=("$name")
      dump_state; DUMPED=1
    fi
  done
  [ ${#failed[@]} -eq 0 ] || die "scenarios failed: ${failed[*]}"
  log "PASSED: ${#names[@]} scenarios against real Velero $VELERO_VERSION in $(since "$t0") s"
  if [ ${#not_run[@]} -gt 0 ]; then
    log "NOT RUN: ${not_run[*]}: this node has no CSI driver. csi-driver-host-path $CSI_HOSTPATH_VERSION and node-driver-registrar $CSI_REGISTRAR_VERSION are refused by the Go module proxy (403 \"This module version is not available\") and no source tree of their releases is in $CSI_SRC (E2E_CSI_SRC); the CSI sidecars and snapshot-controller were built and started"
  fi
}

# On failure: what a reader of CI's log needs to see, before everything is taken down.
dump_state() {
  log "state at the failure:"
  kc get pods -A -o wide >&2 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -30 >&2 || true
  local ns pod
  for ns in velero velero-jupyterhub $(kc get namespaces -o name 2>/dev/null | sed -n 's#^namespace/\(e2e-.*\|jhub\)$#\1#p'); do
    for pod in $(kc -n "$ns" get pods -o name 2>/dev/null); do
      log "--- $ns/$pod (last 15 lines of each container)"
      kc -n "$ns" logs "$pod" --all-containers --tail=15 >&2 2>&1 || true
    done
  done
  log "--- kubelet (last 30 lines)"; tail -30 "$RUN/logs/kubelet.log" >&2 2>/dev/null || true
}
on_exit() {
  local rc=$?
  [ "$rc" = 0 ] || [ "${DUMPED:-0}" = 1 ] || dump_state
  [ "${E2E_KEEP:-0}" = 1 ] || cmd_down
  exit "$rc"
}

cmd_all() {
  local t0; t0=$(now)
  cmd_build
  log "builds ready at $(since "$t0") s"
  refuse_if_up
  trap on_exit EXIT
  cmd_up
  cmd_scenario
  log "all done in $(since "$t0") s (builds, node, scenarios)"
}

# The node is machine-wide (/var/lib/kubelet, the bridge, fixed ports): a second run
# would tear down the first one's pods. Held until this script exits.
one_run_at_a_time() {
  local lock=${E2E_LOCK:-/run/lock/velero-jupyterhub-e2e.lock}
  mkdir -p "$(dirname "$lock")"
  exec 7>"$lock"
  flock -n 7 || die "another e2e-velero run holds $lock; wait for it, or run 'down' after it is gone"
}

# One line: bash has read all of it before it runs, so editing this file cannot disturb
# a run in progress.
main() {
  case "${1:-all}" in
    up|scenario|all|down) one_run_at_a_time ;;
  esac
  case "${1:-all}" in
    build) cmd_build ;;
    up) cmd_up ;;
    scenario) shift; cmd_scenario "$@" ;;
    all) cmd_all ;;
    down) KUBECTL=$(bash scripts/kube-envtest.sh kubectl 2>/dev/null) || KUBECTL=""; cmd_down ;;
    *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
}
main "$@"; exit $?
