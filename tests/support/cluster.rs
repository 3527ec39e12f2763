//! Cluster test support: the real kube-apiserver started by scripts/kube-envtest.sh
//! (scripts/test.sh starts it and sets KUBECONFIG). Cluster tests fail loudly without it.
//!
//! Each test works in its own namespaces and registers its own webhook configuration,
//! selected by a per-test label, so tests run in parallel against one API server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use velero_jupyterhub::metrics::sample;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::server::{self, Running, TlsSource};
use velero_jupyterhub::webhook::serve::ServeOptions;

pub const MANAGER: &str = "velero-jupyterhub-tests";

/// The label that ties a test's namespaces to that test's webhook registration.
pub const TEST_LABEL: &str = "tests.velero-jupyterhub.io/run";

tokio::task_local! {
    /// The kubeconfig of a test that runs an API server of its own (`OwnServer`), for the
    /// clients it makes: the cluster tests share one process, so the environment's
    /// KUBECONFIG (the shared server) must stay as it is for the tests beside it.
    static OWN_KUBECONFIG: String;
}

/// Runs `test` with every client it makes (`client`, `client_as_service_account`, a
/// `Setup`) talking to the API server of `kubeconfig`; tasks it spawns get the clients
/// it made, never the environment's.
pub async fn on_own_server<F: std::future::Future>(kubeconfig: &str, test: F) -> F::Output {
    OWN_KUBECONFIG.scope(kubeconfig.to_owned(), test).await
}

fn kubeconfig_or_die() -> String {
    if let Ok(path) = OWN_KUBECONFIG.try_with(Clone::clone) {
        return path;
    }
    match std::env::var("KUBECONFIG") {
        Ok(path) if std::path::Path::new(&path).exists() => path,
        other => panic!(
            "cluster tests need a running API server, and KUBECONFIG is {other:?}.\n\
             Run them with scripts/test.sh (starts one), or start one yourself:\n  \
             scripts/kube-envtest.sh start && eval \"$(scripts/kube-envtest.sh env)\""
        ),
    }
}

pub async fn config() -> Config {
    velero_jupyterhub::tls::install_default_provider();
    let path = kubeconfig_or_die();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig reads");
    Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kubeconfig loads")
}

/// An admin client (system:masters). Of the test's own API server inside
/// `on_own_server`, else the shared one: a task such a test spawns must be handed the
/// clients it made, never call this itself (a task-local is not inherited).
pub async fn client() -> Client {
    Client::try_from(config().await).expect("client")
}

/// A client that authenticates as `system:serviceaccount:<namespace>:<name>` with a real
/// token of that ServiceAccount (the TokenRequest API, as a kubelet gets one for a pod),
/// so authentication and RBAC are the API server's own, exactly as for the deployed
/// service. The namespace and the ServiceAccount are created if missing.
pub async fn client_as_service_account(namespace: &str, name: &str) -> Client {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let admin = client().await;
    let ns: Namespace = from_json(json!({"metadata": {"name": namespace}}));
    create_if_missing(&Api::all(admin.clone()), &ns).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
    let sa: ServiceAccount = from_json(json!({"metadata": {"name": name}}));
    create_if_missing(&accounts, &sa).await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"))
        .status
        .expect("a token")
        .token;
    let mut config = config().await;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Client::try_from(config).expect("client")
}

/// Creates `object` unless an object of its name exists (or appears meanwhile).
async fn create_if_missing<K>(api: &Api<K>, object: &K)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = object.meta().name.clone().expect("a name");
    if api.get_opt(&name).await.expect("get").is_some() {
        return;
    }
    match api.create(&PostParams::default(), object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create {name}: {e}"),
    }
}

/// A kubeconfig file for a child process (our binary) that acts as `user` (kubeconfig's
/// `as` and `as-groups`: impersonation), so RBAC is enforced as it would be for them.
pub fn kubeconfig_as(user: &str) -> tempfile::NamedTempFile {
    let path = kubeconfig_or_die();
    let mut config: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("kubeconfig"))
            .expect("kubeconfig yaml");
    for u in config["users"].as_array_mut().expect("users") {
        u["user"]["as"] = user.into();
        u["user"]["as-groups"] = json!(["system:authenticated"]);
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        file.path(),
        serde_yaml_ng::to_string(&config).expect("yaml"),
    )
    .expect("write");
    file
}

/// A short unique id: process id, a per-process salt and a counter (tests in parallel,
/// test binaries in parallel, process ids reused).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    // Process ids come round again while an earlier run's namespaces still terminate: a
    // per-process salt from the clock keeps names apart.
    static SALT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let salt = SALT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() & 0xffff)
    });
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}{salt:04x}-{n}", std::process::id())
}

pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates a namespace carrying `run_label` (and the opt-in label when `opted_in`).
    pub async fn create(
        client: &Client,
        run_label: &str,
        opted_in: bool,
        annotations: BTreeMap<String, String>,
    ) -> Self {
        let name = unique("vjh");
        let mut labels = BTreeMap::from([(TEST_LABEL.to_owned(), run_label.to_owned())]);
        if server_minor(client).await < 21 {
            // Before v1.21 the API server does not add this label itself.
            labels.insert("kubernetes.io/metadata.name".to_owned(), name.clone());
        }
        if opted_in {
            labels.insert(
                velero_jupyterhub::names::NAMESPACE_ENABLED.to_owned(),
                "true".to_owned(),
            );
        }
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations}
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Self {
            name,
            client: client.clone(),
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub async fn merge_metadata(&self, metadata: Value) {
        Api::<Namespace>::all(self.client.clone())
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": metadata})),
            )
            .await
            .expect("patch namespace");
    }

    pub async fn delete(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// The API server's minor version (20 for the v1.20 test server, 37 for current).
pub async fn server_minor(client: &Client) -> u32 {
    static MINOR: tokio::sync::OnceCell<u32> = tokio::sync::OnceCell::const_new();
    *MINOR
        .get_or_init(|| async {
            let info = client
                .apiserver_version()
                .await
                .expect("API server version");
            info.minor
                .trim_end_matches('+')
                .parse()
                .unwrap_or_else(|_| panic!("minor version {:?}", info.minor))
        })
        .await
}

/// Applies Velero's CRDs (tests/fixtures/velero-crds; BackupStorageLocation only from
/// v1.21: v1.20 rejects its `default: ""`) and waits until they are established.
/// Idempotent.
pub async fn install_velero_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = super::fixtures::path("velero-crds");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("crd dir") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_owned();
        let old_server = server_minor(client).await < 21;
        if !file.ends_with(".yaml") || (old_server && file.contains("backupstoragelocations")) {
            continue;
        }
        for doc in super::fixtures::yaml_docs(&format!("velero-crds/{file}")) {
            let name = doc["metadata"]["name"]
                .as_str()
                .expect("crd name")
                .to_owned();
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            names.push(name);
        }
    }
    for name in names {
        eventually(Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await
        .unwrap_or_else(|| panic!("CRD {name} not established"));
    }
}

/// Polls `f` until it returns Some, or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Objects of `manifests/`, in kustomization order (the base has no patches).
pub fn manifest_objects() -> Vec<Value> {
    let root = crate::repo_root().join("manifests");
    let kustomization: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("kustomization.yaml")).expect("kustomization"),
    )
    .expect("yaml");
    let mut out = Vec::new();
    for file in kustomization["resources"].as_array().expect("resources") {
        let text = std::fs::read_to_string(root.join(file.as_str().expect("file")))
            .expect("manifest file");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("manifest yaml");
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

pub fn manifest(kind: &str, name: &str) -> Value {
    manifest_objects()
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in manifests/"))
}

/// The webhook under test: the real server in-process on loopback with a fresh CA,
/// watching namespaces as the manifests' service account, and registered with the API
/// server from manifests/webhook.yaml (url and caBundle rewritten, selected to this
/// test's namespaces).
pub struct Webhook {
    pub server: Running,
    pub run_label: String,
    pub configuration: String,
    /// An opted-in namespace of this test where (dry-run) probe pods show whether the API
    /// server calls the webhook yet.
    probe: TestNamespace,
    client: Client,
}

impl Webhook {
    pub async fn start(client: &Client) -> Self {
        Self::start_with(client, ServeOptions::default()).await
    }

    pub async fn start_with(client: &Client, serve: ServeOptions) -> Self {
        Self::start_for(client, serve, "velero").await
    }

    /// With Velero's objects in `velero_namespace` (a test's own).
    pub async fn start_for(client: &Client, serve: ServeOptions, velero_namespace: &str) -> Self {
        apply_rbac(client).await;
        let sa = manifest("ServiceAccount", "velero-jupyterhub");
        let webhook_client = client_as_service_account(
            sa["metadata"]["namespace"].as_str().expect("ns"),
            sa["metadata"]["name"].as_str().expect("name"),
        )
        .await;
        let server = server::start(server::Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ops_listen: "127.0.0.1:0".parse().expect("addr"),
            tls: TlsSource::SelfSigned {
                dns_names: vec![],
                ca_out: None,
            },
            default_claims: ClaimGlobs::parse("claim-*").expect("globs"),
            helper: velero_jupyterhub::policy::helper::HelperOptions::with_image(
                velero_jupyterhub::policy::helper::DEFAULT_IMAGE,
            ),
            velero_namespace: velero_namespace.to_owned(),
            cluster: Some(webhook_client),
            serve,
            shutdown_delay: Duration::ZERO,
        })
        .await
        .expect("webhook server starts");
        let health = server.health.clone();
        eventually(Duration::from_secs(20), || {
            let ready = health.problems().is_empty();
            async move { ready.then_some(()) }
        })
        .await
        .expect("namespace cache and restore helper watch sync (RBAC lets the service account list and watch namespaces)");

        let run_label = unique("run");
        let configuration = format!("velero-jupyterhub-{run_label}");
        let probe = TestNamespace::create(client, &run_label, true, BTreeMap::new()).await;
        let webhook = Self {
            server,
            run_label,
            configuration,
            probe,
            client: client.clone(),
        };
        webhook.register().await;
        webhook
    }

    /// Registers (again) from manifests/webhook.yaml: url and caBundle of this server,
    /// namespaceSelector narrowed to this test's namespaces.
    pub async fn register(&self) {
        self.register_at(&self.url(), self.ca_pem()).await;
        self.wait_until_called(true).await;
    }

    /// This server's base URL (each entry's path comes from the manifest) and CA.
    pub fn url(&self) -> String {
        format!("https://{}", self.server.addr)
    }

    pub fn ca_pem(&self) -> &str {
        self.server.ca_pem.as_deref().expect("ca")
    }

    /// Registers this test's configuration with another endpoint (a stand-in server, a
    /// black hole), without waiting for the API server to use it.
    pub async fn register_at(&self, base: &str, ca_pem: &str) {
        self.register_edited(base, ca_pem, |_| ()).await;
    }

    /// Registers this test's configuration with `edit` applied to each webhook entry
    /// (e.g. `matchConditions`), without waiting for the API server to use it. `base` is
    /// `https://host:port`; each entry keeps its path from the manifest.
    pub async fn register_edited(&self, base: &str, ca_pem: &str, edit: impl Fn(&mut Value)) {
        let mut wh = manifest("MutatingWebhookConfiguration", "velero-jupyterhub");
        wh["metadata"]["name"] = self.configuration.clone().into();
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        for hook in wh["webhooks"].as_array_mut().expect("webhooks") {
            let path = hook["clientConfig"]["service"]["path"]
                .as_str()
                .expect("a path");
            let url = format!("{base}{path}");
            hook["clientConfig"] = json!({"url": url, "caBundle": ca});
            hook["namespaceSelector"]["matchLabels"][TEST_LABEL] = self.run_label.clone().into();
            edit(hook);
        }
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        api.patch(
            &self.configuration,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&wh),
        )
        .await
        .expect("register webhook");
    }

    /// Waits until the API server does (or no longer does) call a webhook for this test's
    /// namespaces, judged by server-side dry-run creates of a user pod: a test that
    /// relies on the webhook never passes merely because registration had not landed.
    pub async fn wait_until_called(&self, called: bool) {
        let pods = self.probe.pods();
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        eventually(Duration::from_secs(20), || {
            let pods = pods.clone();
            let params = params.clone();
            async move {
                let created = pods.create(&params, &user_pod("probe")).await.ok()?;
                (backup_volumes(&created).is_some() == called).then_some(())
            }
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the API server did not {}call the webhook within 20 s",
                if called { "" } else { "stop to " }
            )
        });
    }

    pub async fn namespace(&self, opted_in: bool) -> TestNamespace {
        TestNamespace::create(&self.client, &self.run_label, opted_in, BTreeMap::new()).await
    }

    pub async fn namespace_with_claims(&self, claims: &str) -> TestNamespace {
        let annotations = BTreeMap::from([(
            velero_jupyterhub::names::NAMESPACE_CLAIMS.to_owned(),
            claims.to_owned(),
        )]);
        TestNamespace::create(&self.client, &self.run_label, true, annotations).await
    }

    /// Stops the server but leaves the registration in place (the webhook is "down").
    /// Waits until the port refuses connections and every open connection is closed (the
    /// drain lets an idle keep-alive connection live a moment after its last response).
    pub async fn stop_server(&self) {
        self.server.shutdown();
        let open = r#"velero_jupyterhub_connections_open{listener="webhook"}"#;
        eventually(Duration::from_secs(10), || async {
            let closed = tokio::net::TcpStream::connect(self.server.addr)
                .await
                .is_err();
            let drained = sample(&self.server.metrics.encode(), open) == Some(0.0);
            (closed && drained).then_some(())
        })
        .await
        .expect("the webhook stopped and closed its connections");
    }

    /// Removes the registration and waits until the API server no longer calls it.
    pub async fn unregister(&self) {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let _ = api
            .delete(&self.configuration, &DeleteParams::default())
            .await;
        self.wait_until_called(false).await;
    }

    pub async fn finish(self) {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let _ = api
            .delete(&self.configuration, &DeleteParams::default())
            .await;
        self.server.shutdown();
        self.server.stopped().await;
        self.probe.delete().await;
    }
}

/// Applies the namespace, service account and RBAC objects of manifests/.
pub async fn apply_rbac(client: &Client) {
    // The controller's ValidatingAdmissionPolicy (v1 since Kubernetes 1.30) goes with its
    // RBAC: the tests run the controller under both.
    let policies = server_minor(client).await >= 30;
    for obj in manifest_objects() {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let rbac = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ]
        .contains(&kind);
        let policy = kind.starts_with("ValidatingAdmissionPolicy");
        if rbac || (policy && policies) {
            apply_dynamic(client, &obj).await;
        }
    }
    // The helpers' ConfigMap, which the controller's pod policy reads: the controller
    // tests' helpers also tolerate a taint of their own run (tests/support/controller.rs),
    // under one key.
    let mut helper = manifest("ConfigMap", "velero-jupyterhub-helper");
    let keys = helper["data"]["tolerationKeys"]
        .as_str()
        .unwrap_or_default();
    helper["data"]["tolerationKeys"] = format!("{keys},{TEST_TOLERATION_KEY}").into();
    apply_dynamic(client, &helper).await;
}

/// The taint key of the controller tests' own nodes (one value per run).
pub const TEST_TOLERATION_KEY: &str = "velero-jupyterhub-test";

/// Server-side apply of any object (by its apiVersion/kind), optionally as a dry run.
pub async fn apply_dynamic_with(
    client: &Client,
    obj: &Value,
    dry_run: bool,
) -> Result<Value, kube::Error> {
    use kube::discovery::ApiResource;
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let ar: ApiResource = ar;
    let name = obj["metadata"]["name"].as_str().expect("name");
    let api: Api<kube::core::DynamicObject> =
        match (caps.scope, obj["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            _ => Api::all_with(client.clone(), &ar),
        };
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = dry_run;
    let applied = api.patch(name, &params, &Patch::Apply(obj)).await?;
    Ok(serde_json::to_value(applied).expect("json"))
}

pub async fn apply_dynamic(client: &Client, obj: &Value) -> Value {
    apply_dynamic_with(client, obj, false)
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", obj["metadata"]["name"]))
}

/// Plays the scheduler: binds a pod to a node (`pods/binding`).
pub async fn bind(pods: &Api<Pod>, name: &str, node: &str) {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}
    });
    pods.create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
        .await
        .expect("bind pod");
}

/// Plays the kubelet: sets a pod's phase (`pods/status`).
pub async fn set_phase(pods: &Api<Pod>, name: &str, phase: &str) {
    let status = json!({"status": {"phase": phase, "conditions": [{"type": "Ready", "status": if phase == "Running" {"True"} else {"False"}}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("set pod phase");
}

/// Plays the kubelet for a pod that may be deleted meanwhile (a helper the controller
/// removes between a list and this call): a pod that is gone is no error.
pub async fn set_phase_if_present(pods: &Api<Pod>, name: &str, phase: &str) {
    let status = json!({"status": {"phase": phase, "conditions": [{"type": "Ready", "status": if phase == "Running" {"True"} else {"False"}}]}});
    match pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("set pod phase of {name}: {e}"),
    }
}

/// A KubeSpawner-shaped user pod (the z2jh fixture) renamed for `user`, ready to create.
pub fn user_pod(user: &str) -> Pod {
    let mut pod = super::fixtures::z2jh_pod();
    let v = format!("volume-{user}");
    pod["metadata"]["name"] = format!("jupyter-{user}").into();
    pod["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("namespace");
    pod["metadata"]["labels"]["hub.jupyter.org/username"] = user.into();
    pod["spec"]["containers"][0]["volumeMounts"][0]["name"] = v.clone().into();
    pod["spec"]["volumes"][0] =
        json!({"name": v, "persistentVolumeClaim": {"claimName": format!("claim-{user}")}});
    // z2jh's user-scheduler (the fixture's schedulerName) does not run on the test server,
    // so nothing schedules user pods there: the kube-scheduler that does run leaves them
    // alone (tests bind them by hand, and its load stays out of the benchmarks).
    assert!(
        pod["spec"]["schedulerName"].is_string(),
        "the fixture names z2jh's user-scheduler"
    );
    serde_json::from_value(pod).expect("pod")
}

pub fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("object")
}

pub fn backup_volumes(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(velero_jupyterhub::names::VELERO_BACKUP_VOLUMES)
        .map(String::as_str)
}

/// A hand-made Node the real scheduler places pods on: allocatable set, Ready, and the
/// `node.kubernetes.io/not-ready` taint that admission adds at CREATE removed (the test
/// server runs no node lifecycle controller, so it would stay forever), plus `taints`.
pub async fn ready_node(client: &Client, name: &str, taints: Value) {
    use k8s_openapi::api::core::v1::Node;
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = from_json(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }));
    api.create(&PostParams::default(), &node)
        .await
        .expect("create node");
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": taints}})),
    )
    .await
    .expect("set the node's taints");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "played by the test", "lastHeartbeatTime": now, "lastTransitionTime": now}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("node status");
}

pub async fn delete_node(client: &Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// A claim bound to a PersistentVolume made for it (the controller manager's binder binds
/// them within about a second), with KubeSpawner's username label.
pub async fn bound_claim(client: &Client, namespace: &str, claim: &str, user: &str) {
    bound_claim_with(client, namespace, claim, user, None).await;
}

/// The same, its volume from CSI `driver` (whose attach limit the scheduler counts) when
/// given, else an NFS volume (no limit, no node; Velero copies it through a pod).
pub async fn bound_claim_with(
    client: &Client,
    namespace: &str,
    claim: &str,
    user: &str,
    driver: Option<&str>,
) {
    let source = driver.map_or(Source::Nfs, Source::Csi);
    make_claim(client, namespace, claim, user, source, true).await;
}

/// A claim bound to a hostPath volume (k3s's local-path provisioner makes such): Velero
/// never copies it.
pub async fn bound_host_path_claim(client: &Client, namespace: &str, claim: &str, user: &str) {
    make_claim(client, namespace, claim, user, Source::HostPath, true).await;
}

/// What a test claim's PersistentVolume is.
#[derive(Clone, Copy)]
enum Source<'a> {
    Nfs,
    Csi(&'a str),
    HostPath,
}

async fn make_claim(
    client: &Client,
    namespace: &str,
    claim: &str,
    user: &str,
    source: Source<'_>,
    wait: bool,
) -> String {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let pv_name = unique("pv");
    // The claim first: the volume's claimRef then names its uid, a pair bound in full
    // that the binder only confirms.
    let pvc: PersistentVolumeClaim = from_json(json!({
        "metadata": {"name": claim, "labels": {"hub.jupyter.org/username": user}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "1Gi"}}},
    }));
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let made = api
        .create(&PostParams::default(), &pvc)
        .await
        .expect("create pvc");
    let mut pv = json!({
        "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                 "claimRef": {"namespace": namespace, "name": claim, "uid": made.metadata.uid}},
    });
    let (key, value) = match source {
        Source::Nfs => (
            "nfs",
            json!({"server": "nfs.invalid", "path": format!("/{pv_name}")}),
        ),
        Source::Csi(driver) => ("csi", json!({"driver": driver, "volumeHandle": pv_name})),
        Source::HostPath => ("hostPath", json!({"path": format!("/tmp/{pv_name}")})),
    };
    pv["spec"][key] = value;
    let pv: PersistentVolume = from_json(pv);
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("create pv");
    if wait {
        bound(client, namespace, 1, Duration::from_secs(30), &[claim]).await;
    }
    pv_name
}

/// Many claims as [`bound_claim_with`] makes one, `(claim, user)`, made side by side;
/// then waits until the controller manager's binder has bound them all (it takes its
/// time with thousands: its API client is rate-limited, about 0.3 s a claim here).
/// Marking them Bound ourselves races with it: it writes back what it last read.
pub async fn bound_claims(
    client: &Client,
    namespace: &str,
    claims: &[(String, String)],
    driver: Option<&str>,
    timeout: Duration,
) {
    use futures::StreamExt as _;
    futures::stream::iter(claims)
        .for_each_concurrent(16, |(claim, user)| async move {
            let source = driver.map_or(Source::Nfs, Source::Csi);
            make_claim(client, namespace, claim, user, source, false).await;
        })
        .await;
    let names: Vec<&str> = claims.iter().map(|(c, _)| c.as_str()).collect();
    bound(client, namespace, claims.len(), timeout, &names).await;
}

/// Waits until `count` claims of the namespace are Bound.
async fn bound(client: &Client, namespace: &str, count: usize, timeout: Duration, which: &[&str]) {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    eventually(timeout, || {
        let api = api.clone();
        async move {
            let list = api.list(&kube::api::ListParams::default()).await.ok()?;
            let n = list
                .items
                .iter()
                .filter(|c| which.contains(&c.metadata.name.as_deref().unwrap_or_default()))
                .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                .count();
            (n >= count).then_some(())
        }
    })
    .await
    .unwrap_or_else(|| panic!("claims {which:?} in {namespace} did not bind"));
}

/// Creates a namespace named `<prefix>-<unique>` with `labels`; returns its name.
pub async fn labelled_namespace(client: &Client, prefix: &str, labels: Value) -> String {
    let name = unique(prefix);
    let ns: Namespace = from_json(json!({"metadata": {"name": name, "labels": labels}}));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// Velero's ServiceAccount (`velero install`'s name), allowed to create pods in
/// `namespace`: only Velero may create restore helpers (manifests/restore-guard.yaml).
pub async fn velero_pods(client: &kube::Client, namespace: &str) -> Api<Pod> {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "velero", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get"]}],
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "velero", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "velero"},
        "subjects": [{"kind": "ServiceAccount", "name": "velero", "namespace": "velero"}],
    });
    apply_dynamic(client, &role).await;
    apply_dynamic(client, &binding).await;
    let velero = client_as_service_account("velero", "velero").await;
    Api::namespaced(velero, namespace)
}

/// A test API server of its own (its own run dir and ports, `scripts/kube-envtest.sh`),
/// for a test that restarts it or installs cluster-wide objects the shared one must not
/// see. Stopped on drop.
pub struct OwnServer {
    script: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
}

impl OwnServer {
    /// Ports apart from the shared server's (16443/12379), 1.20's and each other's.
    pub fn start(name: &str, api_port: u16, etcd_port: u16) -> (Self, String) {
        let server = Self {
            script: crate::repo_root().join("scripts/kube-envtest.sh"),
            env: vec![
                (
                    "KUBE_ENVTEST_RUN",
                    format!("/tmp/velero-jupyterhub-envtest-{name}"),
                ),
                ("KUBE_ENVTEST_API_PORT", api_port.to_string()),
                ("KUBE_ENVTEST_ETCD_PORT", etcd_port.to_string()),
            ],
        };
        let kubeconfig = server.run("start");
        (server, kubeconfig.trim().to_owned())
    }

    pub fn run(&self, command: &str) -> String {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run kube-envtest.sh");
        assert!(
            out.status.success(),
            "kube-envtest.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output();
    }
}

/// A webhook replica as installed: its certificate from the controller's Secret in
/// `velero-jupyterhub` (a watch, `serve --tls-secret`), the cluster through `client`.
pub async fn webhook_from_secret(client: Client) -> Running {
    server::start(server::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ops_listen: "127.0.0.1:0".parse().expect("addr"),
        tls: TlsSource::Secret {
            namespace: "velero-jupyterhub".to_owned(),
            name: velero_jupyterhub::controller::certs::TLS_SECRET.to_owned(),
        },
        default_claims: ClaimGlobs::parse("claim-*").expect("globs"),
        helper: velero_jupyterhub::policy::helper::HelperOptions::with_image(
            velero_jupyterhub::policy::helper::DEFAULT_IMAGE,
        ),
        velero_namespace: "velero".to_owned(),
        cluster: Some(client),
        serve: Default::default(),
        shutdown_delay: Duration::ZERO,
    })
    .await
    .expect("webhook replica starts")
}
