//! What the scenarios are made of: the node `scripts/e2e-velero.sh up` brought up, driven
//! the way an operator drives it (kubectl, velero, velero-jupyterhub), JupyterHub homes on
//! `local` volumes of this machine, and checks of what is on those volumes.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where everything is: what `scripts/e2e-velero.sh scenario` exports.
pub struct E2e {
    pub run: PathBuf,
    kubectl: PathBuf,
    velero: PathBuf,
    vjh: PathBuf,
    kubeconfig: PathBuf,
    /// The image `fs-restore-action-config` names for Velero's `restore-wait`.
    pub restore_wait_image: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the scenarios run on the node scripts/e2e-velero.sh brings up \
             (scripts/e2e-velero.sh scenario NAME, or all)"
        )
    })
}

pub fn log(message: impl AsRef<str>) {
    eprintln!("e2e-velero: {}", message.as_ref());
}

/// Polls `f` once a second until it gives a value, for at most `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs its closure when dropped: a scenario that changes the cluster (our settings, our
/// install) puts it back even when it fails, so the next scenario finds it as usual.
pub struct Undo<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for Undo<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// A command's result.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl E2e {
    pub fn from_env() -> Self {
        Self {
            run: env("E2E_RUN").into(),
            kubectl: env("E2E_KUBECTL").into(),
            velero: env("E2E_VELERO").into(),
            vjh: env("E2E_VJH").into(),
            kubeconfig: env("KUBECONFIG").into(),
            restore_wait_image: env("E2E_RESTORE_HELPER_IMAGE"),
        }
    }

    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args).env("KUBECONFIG", &self.kubeconfig);
        c
    }

    fn ran(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Ran {
        let mut c = self.command(program, args);
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(input.as_bytes()).expect("stdin");
        }
        child.wait_with_output().expect("wait").into()
    }

    /// kubectl; `Err` with its stderr when it fails.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let r = self.ran(&self.kubectl, args, None);
        match r.code {
            Some(0) => Ok(r.stdout),
            _ => Err(r.stderr),
        }
    }

    /// kubectl that must succeed.
    pub fn kc(&self, args: &[&str]) -> String {
        self.kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        let r = self.ran(&self.kubectl, &["apply", "-f", "-"], Some(yaml));
        assert_eq!(r.code, Some(0), "kubectl apply: {}\n{yaml}", r.stderr);
    }

    /// `kubectl create -f -` of `object`; `Err` with kubectl's message when refused.
    pub fn create(&self, object: &Value) -> Result<String, String> {
        let r = self.ran(
            &self.kubectl,
            &["create", "-f", "-"],
            Some(&object.to_string()),
        );
        match r.code {
            Some(0) => Ok(r.stdout),
            _ => Err(r.stderr),
        }
    }

    /// An object (or list) as JSON; `None` if kubectl fails (e.g. not found).
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all).ok()?;
        serde_json::from_str(&out).ok()
    }

    pub fn velero(&self, args: &[&str]) -> Ran {
        let mut all = vec!["-n", "velero"];
        all.extend_from_slice(args);
        self.ran(&self.velero, &all, None)
    }

    pub fn vjh(&self, args: &[&str]) -> Ran {
        self.ran(&self.vjh, args, None)
    }

    pub fn vjh_spawn(&self, args: &[&str]) -> Child {
        self.command(&self.vjh, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("velero-jupyterhub")
    }

    /// `velero restore create NAME ARGS… --wait`; the Restore's phase after.
    pub fn velero_restore(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["restore", "create", name];
        all.extend_from_slice(args);
        all.push("--wait");
        let r = self.velero(&all);
        assert_eq!(
            r.code,
            Some(0),
            "velero restore create: {}{}",
            r.stdout,
            r.stderr
        );
        self.restore_phase(name)
    }

    pub fn restore_phase(&self, name: &str) -> String {
        self.get(&["-n", "velero", "restore", name])
            .and_then(|r| r["status"]["phase"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// `velero restore describe NAME --details`: what an operator reads.
    pub fn describe_restore(&self, name: &str) -> String {
        let r = self.velero(&["restore", "describe", name, "--details"]);
        format!("{}{}", r.stdout, r.stderr)
    }

    /// `velero-jupyterhub backup -n NS --wait`, which must back up every user claim; the
    /// Backup's name.
    pub fn backup(&self, ns: &str) -> String {
        let r = self.vjh(&["backup", "--namespace", ns, "--wait"]);
        log(format!("velero-jupyterhub backup -n {ns}:\n{}", r.stdout));
        assert_eq!(r.code, Some(0), "backup: {}\n{}", r.stdout, r.stderr);
        let name = r
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Backup "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no Backup line in {}", r.stdout));
        name.to_owned()
    }

    /// The summed value of a metric series over the pods of a Deployment of ours, read
    /// through the API server's pod proxy (`/metrics` on port 8080).
    pub fn metric(&self, deployment_label: &str, series: &str) -> f64 {
        let pods = self
            .get(&["-n", "velero-jupyterhub", "pods", "-l", deployment_label])
            .expect("our pods");
        let mut sum = 0.0;
        for p in pods["items"].as_array().into_iter().flatten() {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            let path =
                format!("/api/v1/namespaces/velero-jupyterhub/pods/{name}:8080/proxy/metrics");
            let Ok(text) = self.kubectl(&["get", "--raw", &path]) else {
                continue;
            };
            sum += text
                .lines()
                .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .filter_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    }

    /// Events about an object, as `kubectl describe` lists them: (reason, message).
    pub fn events(&self, ns: &str, name: &str) -> Vec<(String, String)> {
        let field = format!("involvedObject.name={name}");
        let list = self
            .get(&["-n", ns, "events", "--field-selector", &field])
            .unwrap_or_default();
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                (s("reason"), s("message"))
            })
            .collect()
    }
}

/// How a claim's volume binds: `local` volumes wait for their first pod (the usual
/// class), or bind at once (as many provisioners' classes do).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    WaitForFirstConsumer,
    Immediate,
}

impl Binding {
    fn class(self) -> &'static str {
        match self {
            Self::WaitForFirstConsumer => "e2e-local",
            Self::Immediate => "e2e-immediate",
        }
    }
}

/// The user server's security context (KubeSpawner: `uid`/`gid` on the notebook
/// container, `fs_gid`/`supplemental_gids` on the pod; z2jh sets `uid: 1000`,
/// `fsGid: 100`).
pub struct Security {
    pub container: Value,
    pub pod: Value,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            container: serde_json::json!({"runAsUser": 1000, "allowPrivilegeEscalation": false}),
            pod: serde_json::json!({"fsGroup": 100}),
        }
    }
}

/// One hub's namespace, its users' homes on this machine's disk.
pub struct Hub<'e> {
    pub e: &'e E2e,
    pub ns: String,
    binding: Binding,
}

impl<'e> Hub<'e> {
    /// A fresh opted-in namespace `ns` (one left by an earlier run is deleted first).
    pub fn new(e: &'e E2e, ns: &str, binding: Binding) -> Self {
        let _ = e.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"]);
        e.apply(&format!(
            "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: {class}}}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: {binding}
---
apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels: {{velero-jupyterhub.io/enabled: \"true\"}}
",
            class = binding.class(),
            binding = match binding {
                Binding::WaitForFirstConsumer => "WaitForFirstConsumer",
                Binding::Immediate => "Immediate",
            }
        ));
        Self {
            e,
            ns: ns.to_owned(),
            binding,
        }
    }

    pub fn claim(user: &str) -> String {
        format!("claim-{user}")
    }

    /// An empty `local` PersistentVolume for `claim` in `ns` (pre-bound to its name: a
    /// claim of that name, made by us or re-created by Velero, binds to it).
    pub fn empty_volume(&self, ns: &str, claim: &str) -> PathBuf {
        let pv = format!("{ns}-{claim}-{}", unique());
        let dir = self.e.run.join("volumes").join(&pv);
        fs::create_dir_all(&dir).expect("volume dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        self.e.apply(&format!(
            "apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}, labels: {{e2e-hub: {ns}}}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {class}
  local: {{path: {path}}}
  claimRef: {{namespace: {ns}, name: {claim}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [localhost]}}]
",
            class = self.binding.class(),
            path = dir.display()
        ));
        dir
    }

    /// `user`'s home: a claim (KubeSpawner's name and labels) on a new volume holding a
    /// few files of random content (`size` bytes in the largest), owned 1000:100.
    pub fn make_home(&self, user: &str, size: usize) {
        let claim = Self::claim(user);
        let dir = self.empty_volume(&self.ns, &claim);
        self.e.apply(&format!(
            "apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {claim}
  namespace: {ns}
  labels: {{hub.jupyter.org/username: {user}, app: jupyterhub, component: singleuser-storage}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: {class}
  resources: {{requests: {{storage: 1Gi}}}}
",
            ns = self.ns,
            class = self.binding.class()
        ));
        let files: [(&str, usize); 4] = [
            ("work/data/big.bin", size),
            ("work/notebook.ipynb", 512 * 1024 + rand_len()),
            (".local/share/history.sqlite", 64 * 1024),
            ("README.md", 0),
        ];
        for (name, len) in files {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            let content = if len == 0 {
                format!("hello from {user}\n").into_bytes()
            } else {
                random_bytes(len)
            };
            fs::write(&path, content).expect("write");
        }
        chown_tree(&dir, 1000, 100);
    }

    /// The directory of the volume `user`'s claim is bound to now.
    pub fn home(&self, user: &str) -> PathBuf {
        self.home_in(&self.ns, user)
    }

    pub fn home_in(&self, ns: &str, user: &str) -> PathBuf {
        let claim = Self::claim(user);
        let pv = wait_for(120, &format!("{ns}/{claim} bound"), || {
            let c = self.e.get(&["-n", ns, "pvc", &claim])?;
            (c["status"]["phase"] == "Bound")
                .then(|| c["spec"]["volumeName"].as_str().map(str::to_owned))
                .flatten()
        });
        let v = self.e.get(&["pv", &pv]).expect("the volume");
        PathBuf::from(v["spec"]["local"]["path"].as_str().expect("a local volume"))
    }

    /// A KubeSpawner-shaped server for `user` (z2jh 4's pod, busybox for the notebook
    /// image), Running; the webhook must have annotated it.
    pub fn start_server(&self, user: &str, security: &Security) {
        let pod = self.server_pod(user, security);
        self.e.apply(&pod.to_string());
        let name = format!("jupyter-{user}");
        wait_for(120, &format!("{name} Running"), || {
            let p = self.e.get(&["-n", &self.ns, "pod", &name])?;
            (p["status"]["phase"] == "Running").then_some(())
        });
        let p = self.e.get(&["-n", &self.ns, "pod", &name]).expect("pod");
        assert_eq!(
            p["metadata"]["annotations"]["backup.velero.io/backup-volumes"],
            format!("volume-{user}"),
            "the webhook annotates {name}"
        );
    }

    /// The pod KubeSpawner (z2jh 4.x) makes for `user`.
    pub fn server_pod(&self, user: &str, security: &Security) -> Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("jupyter-{user}"), "namespace": self.ns,
                "labels": {
                    "app": "jupyterhub", "app.kubernetes.io/name": "jupyterhub",
                    "release": "jupyterhub", "app.kubernetes.io/instance": "jupyterhub",
                    "app.kubernetes.io/managed-by": "kubespawner",
                    "hub.jupyter.org/network-access-hub": "true",
                    "hub.jupyter.org/username": user,
                    "app.kubernetes.io/component": "singleuser-server",
                    "component": "singleuser-server", "hub.jupyter.org/servername": "",
                },
                "annotations": {"hub.jupyter.org/username": user},
            },
            "spec": {
                "restartPolicy": "OnFailure",
                "automountServiceAccountToken": false,
                "securityContext": security.pod,
                "tolerations": [{"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user", "effect": "NoSchedule"}],
                "initContainers": [{"name": "block-cloud-metadata", "image": "localhost/busybox:e2e",
                                    "imagePullPolicy": "Never", "command": ["true"]}],
                "containers": [{
                    "name": "notebook", "image": "localhost/busybox:e2e", "imagePullPolicy": "Never",
                    "command": ["sleep", "86400"],
                    "resources": {"requests": {"memory": "32Mi"}},
                    "securityContext": security.container,
                    "volumeMounts": [{"name": format!("volume-{user}"), "mountPath": "/home/jovyan"}],
                }],
                "volumes": [{"name": format!("volume-{user}"),
                             "persistentVolumeClaim": {"claimName": Self::claim(user)}}],
            },
        })
    }

    /// The user stops their server (the hub deletes the pod).
    pub fn stop_server(&self, user: &str) {
        self.e.kc(&[
            "-n",
            &self.ns,
            "delete",
            "pod",
            &format!("jupyter-{user}"),
            "--grace-period=1",
            "--wait=true",
        ]);
    }

    /// The home is lost: claim, volume and data. A new empty volume waits for a claim of
    /// the same name (the restore re-creates it).
    pub fn lose_home(&self, user: &str) {
        let dir = self.home(user);
        let claim = Self::claim(user);
        let pv = self
            .e
            .get(&["-n", &self.ns, "pvc", &claim])
            .and_then(|c| c["spec"]["volumeName"].as_str().map(str::to_owned))
            .expect("bound");
        self.e
            .kc(&["-n", &self.ns, "delete", "pvc", &claim, "--wait=true"]);
        self.e.kc(&["delete", "pv", &pv, "--wait=true"]);
        fs::remove_dir_all(&dir).expect("remove the data");
        self.empty_volume(&self.ns.clone(), &claim);
    }

    /// Every backup helper of ours gone (a window closed).
    pub fn no_helpers(&self, secs: u64) {
        wait_for(
            secs,
            &format!("no helper of ours left in {}", self.ns),
            || {
                let l = self.e.get(&[
                    "-n",
                    &self.ns,
                    "pods",
                    "-l",
                    "app.kubernetes.io/managed-by=velero-jupyterhub",
                ])?;
                l["items"].as_array()?.is_empty().then_some(())
            },
        );
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or_default();
    format!("{t}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom");
    buf
}

fn rand_len() -> usize {
    usize::from(u16::from_le_bytes([random_bytes(1)[0], random_bytes(1)[0]]) >> 1)
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            chown_tree(&path, uid, gid);
        } else {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
        }
    }
}

/// Every file and directory under a home (Velero's own `.velero` marker directory aside):
/// mode, owner, and each file's bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Tree(BTreeMap<String, Entry>);

/// A file's or directory's mode, owner, group, and (a file's) bytes.
type Entry = (u32, u32, u32, Option<Vec<u8>>);

impl Tree {
    pub fn of(dir: &Path) -> Self {
        let mut entries = BTreeMap::new();
        walk(dir, dir, &mut entries);
        Self(entries)
    }

    /// What differs from `other`, one line each (empty: the same, byte for byte).
    pub fn differences(&self, other: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        for (path, (mode, uid, gid, bytes)) in &self.0 {
            match other.0.get(path) {
                None => out.push(format!("{path}: missing")),
                Some((m, u, g, b)) => {
                    if (m, u, g) != (mode, uid, gid) {
                        out.push(format!(
                            "{path}: mode/owner {m:o} {u}:{g}, want {mode:o} {uid}:{gid}"
                        ));
                    }
                    if b != bytes {
                        out.push(format!("{path}: content differs"));
                    }
                }
            }
        }
        for path in other.0.keys().filter(|p| !self.0.contains_key(*p)) {
            out.push(format!("{path}: not expected"));
        }
        out
    }

    pub fn files(&self) -> usize {
        self.0.values().filter(|e| e.3.is_some()).count()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        if rel == ".velero" {
            continue;
        }
        let meta = fs::symlink_metadata(&path).expect("metadata");
        let bytes = meta.is_file().then(|| fs::read(&path).expect("read"));
        out.insert(rel, (meta.mode() & 0o7777, meta.uid(), meta.gid(), bytes));
        if meta.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Asserts that `dir` holds exactly `want`.
pub fn assert_same(what: &str, want: &Tree, dir: &Path) {
    let got = Tree::of(dir);
    let diff = want.differences(&got);
    assert!(
        diff.is_empty(),
        "{what} ({}): {}",
        dir.display(),
        diff.join("; ")
    );
    log(format!(
        "{what}: {} files identical, byte for byte ({})",
        want.files(),
        dir.display()
    ));
}

/// The watch events (type, object) of `kubectl get ARGS --watch` while it runs.
pub struct EventWatch {
    child: Child,
    path: PathBuf,
}

impl EventWatch {
    pub fn start(e: &E2e, args: &[&str]) -> Self {
        let path = e.run.join(format!("events-{}.json", unique()));
        let out = fs::File::create(&path).expect("watch file");
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--watch", "--output-watch-events", "-o", "json"]);
        let child = e
            .command(&e.kubectl, &all)
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl watch");
        std::thread::sleep(Duration::from_secs(2));
        Self { child, path }
    }

    pub fn stop(mut self) -> Vec<(String, Value)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["object"].clone(),
                )
            })
            .collect()
    }
}

/// The most objects at once that `holds` says hold something, over a watch's events
/// (an object counts from the event where it holds until one where it does not, or its
/// deletion).
pub fn most_at_once(events: &[(String, Value)], holds: impl Fn(&Value) -> bool) -> usize {
    let mut now = std::collections::BTreeSet::new();
    let mut most = 0;
    for (kind, object) in events {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if kind != "DELETED" && holds(object) {
            now.insert(name);
        } else {
            now.remove(&name);
        }
        most = most.max(now.len());
    }
    most
}

/// Every pod a namespace sees while it runs, as the API server reports it (`kubectl get
/// pods --watch`).
pub struct PodWatch(EventWatch);

impl PodWatch {
    pub fn start(e: &E2e, ns: &str) -> Self {
        Self(EventWatch::start(e, &["-n", ns, "pods"]))
    }

    /// The pods seen (each event's object).
    pub fn stop(self) -> Vec<Value> {
        self.0
            .stop()
            .into_iter()
            .map(|(_, object)| object)
            .collect()
    }
}

/// What every pod a restore made must be: no notebook (or z2jh's privileged init
/// container) ever ran; Velero's restore-wait, when there is one, from the image
/// `fs-restore-action-config` names; restore helpers marked so that autoscalers leave
/// them alone. Returns the names of the pods that had restore-wait.
pub fn check_restore_pods(e: &E2e, pods: &[Value]) -> Vec<String> {
    let mut with_wait = std::collections::BTreeSet::new();
    let mut bad = Vec::new();
    for pod in pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        if pod["metadata"]["labels"]["velero.io/restore-name"].is_null() {
            continue;
        }
        let names: Vec<&str> = ["containers", "initContainers"]
            .iter()
            .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
            .chain(
                pod["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
            .filter_map(|c| c["name"].as_str())
            .collect();
        if names
            .iter()
            .any(|n| ["notebook", "block-cloud-metadata"].contains(n))
        {
            bad.push(format!("{name}: a workload container {names:?}"));
        }
        let labels = &pod["metadata"]["labels"];
        if labels["app.kubernetes.io/component"] != "restore-helper" {
            bad.push(format!(
                "{name}: not a restore helper ({})",
                labels["app.kubernetes.io/component"]
            ));
        }
        let annotations = &pod["metadata"]["annotations"];
        if annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] != "false"
            || annotations["karpenter.sh/do-not-disrupt"] != "true"
        {
            bad.push(format!("{name}: autoscalers may evict it ({annotations})"));
        }
        for c in pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if c["name"] == "restore-wait" {
                with_wait.insert(name.to_owned());
                if c["image"] != e.restore_wait_image.as_str() {
                    bad.push(format!("{name}: restore-wait image {}", c["image"]));
                }
            }
        }
    }
    assert!(bad.is_empty(), "pods the restore made: {bad:?}");
    with_wait.into_iter().collect()
}
