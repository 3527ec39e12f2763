#!/usr/bin/env bash
# The demo (README "run it"): one command on a fresh machine.
#  1. starts the local test API server (scripts/kube-envtest.sh; built on first use),
#  2. runs `velero-jupyterhub serve --self-signed` against it and registers the webhook
#     from manifests/webhook.yaml (url + caBundle rewritten for loopback),
#  3. opts the `jhub` namespace in, leaves `sandbox` out, creates KubeSpawner-shaped user
#     pods and claims (tests/fixtures), and prints what happened to each pod and why,
#  4. runs `velero-jupyterhub controller` with a Velero Schedule: idle users get backup
#     helpers before the tick, and a user who starts her server takes her claim back.
# Everything it started is stopped at the end; `scripts/demo.sh --keep` leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0; [ "${1:-}" = "--keep" ] && keep=1
envtest=scripts/kube-envtest.sh
work=$(mktemp -d /tmp/velero-jupyterhub-demo.XXXXXX)
port=${DEMO_WEBHOOK_PORT:-18443}; mport=${DEMO_OPS_PORT:-18080}
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
t0=$(date +%s)

apt=(apt-get -o DPkg::Lock::Timeout=600)   # fresh machines run unattended upgrades at boot
command -v kubectl >/dev/null || { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq kubernetes-client; }
command -v curl >/dev/null || { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq curl; }

say "building velero-jupyterhub (release)"
cargo build --release --locked -q
# Wherever cargo puts it (CARGO_TARGET_DIR, build.target-dir in a cargo config, ...).
target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release/velero-jupyterhub

started_here=0
if ! bash "$envtest" status >/dev/null 2>&1; then
  say "starting the local API server (first run builds current Kubernetes from Go modules: ~8 min)"
  bash "$envtest" start >/dev/null
  started_here=1
fi
eval "$(bash "$envtest" env)"; export KUBECONFIG
server_pid=; controller_pid=
cleanup() {
  [ "$keep" = 1 ] && { echo "left running: webhook pid $server_pid (https://127.0.0.1:$port), KUBECONFIG=$KUBECONFIG"; return; }
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null || true
  kubectl delete mutatingwebhookconfiguration velero-jupyterhub-demo --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete namespace jhub sandbox --ignore-not-found --wait=false >/dev/null 2>&1 || true
  [ "$started_here" = 1 ] && bash "$envtest" stop || true
  rm -rf "$work"
}
trap cleanup EXIT

say "velero-jupyterhub serve --self-signed (https://127.0.0.1:$port, probes and metrics http://127.0.0.1:$mport)"
"$bin" serve --self-signed --ca-out "$work/ca.pem" --listen "127.0.0.1:$port" --ops-listen "127.0.0.1:$mport" \
  --shutdown-delay 0s --log-level info > "$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null || { cat "$work/serve.log"; echo "webhook did not become ready"; exit 1; }

say "registering the webhook from manifests/webhook.yaml"
kubectl create --dry-run=client -o json -f manifests/webhook.yaml | python3 -c '
import base64, json, sys
wh = json.load(sys.stdin)
wh["metadata"]["name"] = "velero-jupyterhub-demo"
ca = base64.b64encode(open(sys.argv[1], "rb").read()).decode()
for h in wh["webhooks"]:
    path = h["clientConfig"]["service"]["path"]
    h["clientConfig"] = {"url": "https://127.0.0.1:%s%s" % (sys.argv[2], path), "caBundle": ca}
print(json.dumps(wh))' "$work/ca.pem" "$port" | kubectl apply -f - >/dev/null

say "namespace jhub opted in (velero-jupyterhub.io/enabled=true); namespace sandbox not"
kubectl delete namespace jhub sandbox --ignore-not-found --timeout=120s >/dev/null   # a previous --keep run
kubectl create namespace jhub >/dev/null; kubectl label namespace jhub velero-jupyterhub.io/enabled=true >/dev/null
kubectl create namespace sandbox >/dev/null

say "the README's check: a server-side dry run of a user pod in jhub (prints the annotation)"
# Taken from README.md itself, so the documented line is the one that is run.
check=$(grep -m1 '^kubectl -n jhub run vjh-check' README.md)
got=""
for _ in $(seq 1 50); do   # until the API server has picked the registration up
  got=$(eval "$check" 2>/dev/null || true); [ "$got" = home ] && break; sleep 0.2
done
echo "  $got"
[ "$got" = home ] || { echo "the README's check did not print 'home'"; exit 1; }

say "creating user claims and KubeSpawner-shaped pods"
kubectl create --dry-run=client -o json -f tests/fixtures/z2jh-4.x-kubespawner-7-singleuser-pod.example.yaml -f tests/fixtures/singleuser-pod-variants.yaml > "$work/objects.json"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
text = open(f"{work}/objects.json").read()
dec, i, objs = json.JSONDecoder(), 0, []
while i < len(text):
    if text[i].isspace(): i += 1; continue
    o, i = dec.raw_decode(text, i); objs.append(o)
pods = []
for o in objs:
    o["metadata"].pop("uid", None); o.pop("status", None)
    if o["kind"] == "Pod":
        o["spec"].pop("nodeName", None)
        pods.append(o)
# One user pod in the namespace that is not opted in.
sandbox = json.loads(json.dumps(next(p for p in pods if p["metadata"]["name"] == "jupyter-bob")))
sandbox["metadata"]["namespace"] = "sandbox"
pods.append(sandbox)
json.dump([o for o in objs if o["kind"] != "Pod"], open(f"{work}/claims.json", "w"))
json.dump(pods, open(f"{work}/pods.json", "w"))
PY
python3 -c 'import json,sys; [print(json.dumps(o)) for o in json.load(open(sys.argv[1]))]' "$work/claims.json" | kubectl apply -f - >/dev/null
python3 -c 'import json,sys; [print(json.dumps(o)) for o in json.load(open(sys.argv[1]))]' "$work/pods.json" | kubectl create -f - >/dev/null

say "what the API server stored, and why (velero-jupyterhub review --pod --explain on each pod as sent)"
kubectl get pods -A -o json > "$work/stored.json"
python3 - "$work" "$bin" <<'PY'
import json, subprocess, sys
work, binary = sys.argv[1], sys.argv[2]
sent = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in json.load(open(f"{work}/pods.json"))}
stored = json.load(open(f"{work}/stored.json"))["items"]
namespaces = {"jhub": True, "sandbox": False}
rows = []
for p in sorted(stored, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
    ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
    if ns not in namespaces: continue
    value = (p["metadata"].get("annotations") or {}).get("backup.velero.io/backup-volumes", "")
    before = (sent[(ns, name)]["metadata"].get("annotations") or {}).get("backup.velero.io/backup-volumes", "")
    if not namespaces[ns]:
        why = ["namespace not opted in: the API server never called the webhook"]
    else:
        r = subprocess.run([binary, "review", "--pod", "--explain"], input=json.dumps(sent[(ns, name)]).encode(), capture_output=True)
        lines = r.stderr.decode().splitlines()
        verdict = lines[0].rsplit(": ", 1)[-1] if lines else "?"
        why = [{"annotated": "annotated", "nothing_to_add": "nothing to add",
                "skipped": "velero-jupyterhub.io/skip=true", "not_user_server": "not a JupyterHub user server (component label)",
                "restored_pod": "re-created by a Velero restore (handled by the restore webhook, coming later)"}.get(verdict, verdict)]
        why += [l.strip() for l in lines[1:] if not l.strip().startswith("patch:")]
    change = "" if value == before else "  (was: %s)" % (before or "none")
    rows.append((ns, name, (value or "-") + change, why))
w = max(len(r[1]) for r in rows)
print("%-8s %-*s %s" % ("NS", w, "POD", "backup.velero.io/backup-volumes"))
for ns, name, value, why in rows:
    print("%-8s %-*s %s" % (ns, w, name, value))
    for line in why:
        print("%-8s %-*s   \u2514 %s" % ("", w, "", line))
PY

say "metrics (http://127.0.0.1:$mport/metrics)"
curl -s "http://127.0.0.1:$mport/metrics" | grep -E '^velero_jupyterhub_admission_requests_total' || true
# ---------------------------------------------------------------- idle users
say "idle users: velero-jupyterhub controller, a Velero Schedule, and two users with no server"
cport=${DEMO_CONTROLLER_OPS_PORT:-18081}
kubectl apply -f tests/fixtures/velero-crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/schedules.velero.io crd/backups.velero.io crd/podvolumebackups.velero.io >/dev/null
kubectl create namespace velero --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# A user node for the real scheduler (no kubelet here: the demo plays its part).
echo '{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "demo-user-node", "labels": {"kubernetes.io/hostname": "demo-user-node"}},
  "spec": {"taints": [{"key": "hub.jupyter.org/dedicated", "value": "user", "effect": "NoSchedule"}]}}' | kubectl apply -f - >/dev/null
kubectl taint node demo-user-node node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
# Its status through the API (Debian's kubectl 1.20 has no `patch --subresource`).
run_dir=$(bash "$envtest" run-dir)
curl -sf --cacert "$run_dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$run_dir/token")" \
  -X PATCH -H 'Content-Type: application/merge-patch+json' \
  "$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')/api/v1/nodes/demo-user-node/status" \
  -d '{"status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}, "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"}, "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the demo"}]}}' >/dev/null
# Olivia and Peggy have homes but no server; every claim gets a volume so it binds.
for user in olivia peggy; do
  echo "{\"apiVersion\": \"v1\", \"kind\": \"PersistentVolumeClaim\", \"metadata\": {\"name\": \"claim-$user\", \"labels\": {\"hub.jupyter.org/username\": \"$user\"}},
    \"spec\": {\"accessModes\": [\"ReadWriteOnce\"], \"resources\": {\"requests\": {\"storage\": \"1Gi\"}}}}" | kubectl -n jhub create -f - >/dev/null
done
kubectl -n jhub get pvc -o json | python3 -c '
import json, sys
for c in json.load(sys.stdin)["items"]:
    name = c["metadata"]["name"]
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "demo-" + name, "labels": {"demo": "velero-jupyterhub"}},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": c["spec"].get("storageClassName") or "",
                   "hostPath": {"path": "/tmp/demo-" + name}, "claimRef": {"namespace": "jhub", "name": name}}}
    print(json.dumps(pv))' | kubectl apply -f - >/dev/null
POD_NAMESPACE=velero POD_NAME=demo-controller "$bin" controller --velero-namespace velero --manage-certificates=false \
  --ops-listen "127.0.0.1:$cport" --log-level info > "$work/controller.log" 2>&1 &
controller_pid=$!
minute=$(date -u -d '+5 min' +%M); minute=$((10#$minute))
say "a Schedule backing up jhub at minute $minute of every hour (UTC): its window opens 10 minutes before"
echo "{\"apiVersion\": \"velero.io/v1\", \"kind\": \"Schedule\", \"metadata\": {\"name\": \"user-homes\", \"namespace\": \"velero\"},
  \"spec\": {\"schedule\": \"CRON_TZ=UTC $minute * * * *\", \"template\": {\"includedNamespaces\": [\"jhub\"], \"ttl\": \"720h0m0s\"}}}" \
  | kubectl apply -f - >/dev/null
helpers() { kubectl -n jhub get pods -l app.kubernetes.io/component=backup-helper -o custom-columns='HELPER:.metadata.name,CLAIM:.spec.volumes[0].persistentVolumeClaim.claimName,NODE:.spec.nodeName,ANNOTATION:.metadata.annotations.backup\.velero\.io/backup-volumes' "$@"; }
for _ in $(seq 1 150); do [ "$(helpers --no-headers 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.2; done
helpers
say "Peggy starts her server: her helper goes at once (the user always wins)"
kubectl -n jhub get pod jupyter-bob -o json | python3 -c '
import json, sys
p = json.load(sys.stdin)
meta = {"name": "jupyter-peggy", "labels": {**p["metadata"]["labels"], "hub.jupyter.org/username": "peggy"}}
spec = p["spec"]; spec.pop("nodeName", None)
for v in spec["volumes"]:
    if "persistentVolumeClaim" in v: v["persistentVolumeClaim"]["claimName"] = "claim-peggy"
print(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}))' | kubectl -n jhub create -f - >/dev/null
for _ in $(seq 1 50); do kubectl -n jhub get pod vjh-backup-claim-peggy >/dev/null 2>&1 || break; sleep 0.1; done
helpers
kubectl -n jhub get events.events.k8s.io --field-selector regarding.name=claim-peggy -o custom-columns='REASON:.reason,NOTE:.note'
say "controller metrics (http://127.0.0.1:$cport/metrics)"
curl -s "http://127.0.0.1:$cport/metrics" | grep -E '^velero_jupyterhub_(backup_helpers|backup_windows_open|api_writes_total|leader)' || true
kill "$controller_pid" 2>/dev/null; wait "$controller_pid" 2>/dev/null || true
kubectl delete schedule -n velero user-homes --ignore-not-found >/dev/null 2>&1 || true
kubectl delete node demo-user-node --ignore-not-found >/dev/null 2>&1 || true
kubectl delete pv -l demo=velero-jupyterhub --ignore-not-found --wait=false >/dev/null 2>&1 || true

say "done in $(( $(date +%s) - t0 )) s"
