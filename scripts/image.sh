#!/usr/bin/env bash
# Builds velero-jupyterhub's container image and writes it as an OCI archive:
#   scripts/image.sh [OUT_DIR]      (default: <target dir>/image)
# -> OUT_DIR/velero-jupyterhub-<version>.oci.tar, image velero-jupyterhub:<version> (the
# name manifests/ use; `kustomize edit set image` points them at your registry).
#
# The binary is the static musl release build; the image is Dockerfile's FROM scratch
# plus that binary and a passwd entry, built by Debian's buildah with chroot isolation
# and vfs storage in a private directory: no daemon, no registry, nothing pulled. Then the
# archive is checked: its config (user, entrypoint, version label) and the binary in its
# one layer, which must be static and run.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "image.sh: $*" >&2; }
fail() { log "$*"; exit 1; }

need=""
command -v buildah >/dev/null || need="$need buildah"
command -v musl-gcc >/dev/null || need="$need musl-tools"   # ring's C and assembly
if [ -n "$need" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "installing$need"
    apt-get update -qq -o DPkg::Lock::Timeout=600 >&2 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 $need >&2
  else
    fail "needs$need (Debian packages)"
  fi
fi
target=x86_64-unknown-linux-musl
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
  log "adding the Rust target $target"
  rustup target add "$target" >&2
fi

meta=$(cargo metadata --no-deps --format-version 1)
version=$(python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["version"] for p in m["packages"] if p["name"]=="velero-jupyterhub"))' <<<"$meta")
target_dir=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
out=${1:-$target_dir/image}
mkdir -p "$out"
archive="$out/velero-jupyterhub-$version.oci.tar"

log "building the static release binary ($target)"
cargo build --locked --release --target "$target" --bin velero-jupyterhub >&2
bin="$target_dir/$target/release/velero-jupyterhub"
if readelf -d "$bin" 2>/dev/null | grep -q NEEDED; then
  fail "$bin is not static: $(readelf -d "$bin" | grep NEEDED | tr -s ' ' | tr '\n' ';')"
fi

work=$(mktemp -d)
store="$work/store"
buildah_() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }
cleanup() { buildah_ rm --all >/dev/null 2>&1 || true; rm -rf "$work" 2>/dev/null || true; }
trap cleanup EXIT
context="$work/context"
mkdir -p "$context"
cp Dockerfile "$context/"
cp "$bin" "$context/velero-jupyterhub"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$context/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$context/group"

log "building velero-jupyterhub:$version with buildah"
buildah_ bud --quiet --isolation chroot --pull=never --build-arg "VERSION=$version" \
  -t "velero-jupyterhub:$version" -f "$context/Dockerfile" "$context" >&2
rm -f "$archive"
buildah_ push --quiet "velero-jupyterhub:$version" "oci-archive:$archive:velero-jupyterhub:$version" >&2

# Check what was written, from the archive alone.
check="$work/check"
mkdir -p "$check"
tar -xf "$archive" -C "$check"
python3 - "$check" "$version" <<'PY'
import json, os, subprocess, sys, tarfile
root, version = sys.argv[1], sys.argv[2]
def blob(digest):
    return os.path.join(root, "blobs", *digest.split(":"))
index = json.load(open(os.path.join(root, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))["config"]
problems = []
if config.get("User") != "65532:65532": problems.append(f"user {config.get('User')!r}")
if config.get("Entrypoint") != ["/usr/local/bin/velero-jupyterhub"]: problems.append(f"entrypoint {config.get('Entrypoint')!r}")
if config.get("Labels", {}).get("org.opencontainers.image.version") != version: problems.append(f"labels {config.get('Labels')!r}")
files = {}
for layer in manifest["layers"]:
    with tarfile.open(blob(layer["digest"])) as t:
        for m in t.getmembers():
            name = m.name.lstrip("./")
            files[name] = t.extractfile(m).read() if name == "usr/local/bin/velero-jupyterhub" else b""
for want in ["usr/local/bin/velero-jupyterhub", "etc/passwd", "etc/group"]:
    if want not in files: problems.append(f"{want} missing")
if problems:
    sys.exit("image.sh: the image is wrong: " + "; ".join(problems))
path = os.path.join(root, "binary")
with open(path, "wb") as f:
    f.write(files["usr/local/bin/velero-jupyterhub"])
os.chmod(path, 0o755)
out = subprocess.run([path, "--version"], capture_output=True, text=True)
if out.returncode != 0 or version not in out.stdout:
    sys.exit(f"image.sh: the image's binary does not run: {out.stdout}{out.stderr}")
size = sum(l["size"] for l in manifest["layers"])
print(f"image.sh: ok: user 65532, {len(files)} files, layers {size / 1048576:.1f} MiB, binary says {out.stdout.strip()!r}", file=sys.stderr)
PY
log "wrote $archive ($(du -h "$archive" | cut -f1)); load it with \`podman load -i\` or \`ctr -n k8s.io images import\`, or push it with \`skopeo copy oci-archive:$archive docker://<your registry>/velero-jupyterhub:$version\`"
echo "$archive"
