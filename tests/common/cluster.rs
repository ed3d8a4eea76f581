//! The e2e harness: a real kube-apiserver + etcd (`tests/tools/local-cluster`), shared by every
//! test of a test binary, a fresh namespace per test, server-side apply of YAML, and our CRDs.
//!
//! ```ignore
//! let ns = TestNamespace::new("rollout").await;
//! install_crds(&ns.client).await;
//! ns.apply_yaml("apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\n…").await.unwrap();
//! // …
//! ns.cleanup().await;
//! ```
//!
//! Suites build on it through [`super::env::TestEnv`] (namespaces with a token, an operator).
//!
//! The cluster is started on first use (a no-op when it is already up) and never stopped here:
//! `make test` takes it down after the whole run.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{GroupVersionKind, NamespaceResourceScope};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, Resource};
use rand::Rng;
use tokio::sync::OnceCell;

use super::within;

/// Field manager of everything the tests apply.
pub const FIELD_MANAGER: &str = "opamp-operator-tests";

/// Label put on every test namespace (to find leftovers: `kubectl get ns -l opamp.dev/test`).
pub const TEST_NAMESPACE_LABEL: &str = "opamp.dev/test";

/// Where and as whom to reach the local cluster (from `target/local-cluster/cluster.env`).
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// Kubeconfig with contexts `admin` (system:masters, current) and `operator` (no groups).
    pub kubeconfig_path: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The CA that signed the apiserver's serving certificate.
    pub ca_file: PathBuf,
    pub admin_token: String,
    pub operator_token: String,
}

static CLUSTER: OnceCell<Result<ClusterInfo, String>> = OnceCell::const_new();

/// The local cluster, started (`local-cluster up`) once per test binary. Panics with the
/// script's output if it cannot be started.
pub async fn cluster() -> &'static ClusterInfo {
    let result = CLUSTER
        .get_or_init(|| async {
            tokio::task::spawn_blocking(start_cluster)
                .await
                .unwrap_or_else(|e| Err(format!("local-cluster up panicked: {e}")))
        })
        .await;
    match result {
        Ok(info) => info,
        Err(message) => panic!("{message}"),
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tools_bin() -> PathBuf {
    std::env::var_os("LOCAL_CLUSTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/bin"))
}

/// Path of a binary built by `make tools` (kubectl, helm, the opamp-go agent, …).
pub fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(path.exists(), "{} is missing: run `make tools` first", path.display());
    path
}

fn start_cluster() -> Result<ClusterInfo, String> {
    let apiserver = tools_bin().join("kube-apiserver");
    if !apiserver.exists() {
        return Err(format!("{} not found: run `make tools` (or `make tools-k8s`)", apiserver.display()));
    }
    let script = repo_root().join("tests/tools/local-cluster");
    let run = |arg: &str| {
        std::process::Command::new(&script)
            .arg(arg)
            .current_dir(repo_root())
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {} {arg}: {e}", script.display()))
    };
    let up = run("up")?;
    if !up.status.success() {
        return Err(format!(
            "`tests/tools/local-cluster up` failed ({}):\n{}{}",
            up.status,
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        ));
    }
    // `env` prints cluster.env wherever LOCAL_CLUSTER_DIR put it.
    let env = run("env")?;
    if !env.status.success() {
        return Err(format!(
            "`tests/tools/local-cluster env` failed after `up` ({}):\n{}",
            env.status,
            String::from_utf8_lossy(&env.stderr)
        ));
    }
    let vars: HashMap<&str, &str> = std::str::from_utf8(&env.stdout)
        .map_err(|e| format!("cluster.env is not UTF-8: {e}"))?
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let var = |name: &str| {
        vars.get(name)
            .map(|v| v.to_string())
            .ok_or_else(|| format!("cluster.env lacks {name}:\n{}", String::from_utf8_lossy(&env.stdout)))
    };
    Ok(ClusterInfo {
        kubeconfig_path: var("KUBECONFIG")?.into(),
        server: var("LOCAL_CLUSTER_SERVER")?,
        ca_file: var("LOCAL_CLUSTER_CA_FILE")?.into(),
        admin_token: var("LOCAL_CLUSTER_ADMIN_TOKEN")?,
        operator_token: var("LOCAL_CLUSTER_OPERATOR_TOKEN")?,
    })
}

impl ClusterInfo {
    /// A new client as `admin` (system:masters). A new one per call: a kube Client drives its
    /// connections from the runtime that created it, and every `#[tokio::test]` has its own.
    pub async fn client(&self) -> Client {
        self.client_for("admin").await
    }

    /// A new client as `operator` (authenticated, no groups: only what RBAC grants it).
    pub async fn client_as_operator(&self) -> Client {
        self.client_for("operator").await
    }

    /// A new client as `e2e-operator`, bound to exactly the Helm chart's RBAC (cluster role,
    /// and the leader-election Role in `namespace`): the e2e suite runs the operator as the
    /// chart's identity, so a missing permission fails a test. (`operator` stays for the chart
    /// test, which checks it starts without any rights.)
    pub async fn client_as_chart_identity(&self, namespace: &str) -> Client {
        let admin = self.client().await;
        let mut rbac = chart_rbac("e2e", namespace, "e2e-operator").await;
        rbac.extend(chart_delegation_rbac("e2e", namespace, "e2e-operator").await);
        for rbac in rbac {
            apply_yaml(&admin, Some(namespace), &serde_yaml::to_string(&rbac).unwrap())
                .await
                .unwrap_or_else(|e| panic!("cannot bind the chart's RBAC: {e}"));
        }
        let client = self.client_for("e2e-operator").await;
        // The authorizer follows within moments.
        let probe: Api<k8s_openapi::api::core::v1::Secret> = Api::all(client.clone());
        within(Duration::from_secs(30), "the chart's RBAC to take effect", async {
            while probe.list(&Default::default()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        client
    }

    /// The kube Config of a kubeconfig context (`admin` or `operator`), e.g. to start the
    /// operator in-process.
    pub async fn config_for(&self, context: &str) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.kubeconfig_path.display()));
        let options = KubeConfigOptions { context: Some(context.to_owned()), ..Default::default() };
        Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .unwrap_or_else(|e| panic!("kubeconfig context {context}: {e}"))
    }

    async fn client_for(&self, context: &str) -> Client {
        let config = self.config_for(context).await;
        Client::try_from(config).unwrap_or_else(|e| panic!("kube client for context {context}: {e}"))
    }

    /// `kubectl --kubeconfig <ours> --cache-dir <ours>` (context `admin`); add arguments and run.
    pub fn kubectl(&self) -> tokio::process::Command {
        let cache = self.kubeconfig_path.parent().unwrap_or(Path::new(".")).join("kubectl-cache");
        let mut cmd = tokio::process::Command::new(tool("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig_path).arg("--cache-dir").arg(cache);
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        cmd
    }
}

/// The Helm chart's RBAC (ClusterRole, ClusterRoleBinding, Role, RoleBinding) as `helm template
/// <release>` renders it for `namespace`, bound to the user `user` instead of the chart's
/// ServiceAccount.
pub async fn chart_rbac(release: &str, namespace: &str, user: &str) -> Vec<serde_yaml::Value> {
    let templates = ["clusterrole.yaml", "clusterrolebinding.yaml", "role.yaml", "rolebinding.yaml"];
    chart_templates(release, namespace, user, &templates).await
}

/// The chart's RBAC for the aggregated API's delegation (aggregated-api-rbac.yaml: the
/// auth-delegator and authentication-reader bindings, the agents-viewer ClusterRole), bound to
/// `user`.
pub async fn chart_delegation_rbac(release: &str, namespace: &str, user: &str) -> Vec<serde_yaml::Value> {
    chart_templates(release, namespace, user, &["aggregated-api-rbac.yaml"]).await
}

/// The chart's `templates` as `helm template <release>` renders them for `namespace`, bindings
/// bound to the user `user`.
async fn chart_templates(
    release: &str,
    namespace: &str,
    user: &str,
    templates: &[&str],
) -> Vec<serde_yaml::Value> {
    let mut helm = tokio::process::Command::new(tool("helm"));
    helm.args(["template", release, "charts/opamp-operator", "--namespace", namespace]);
    for t in templates {
        helm.arg("--show-only").arg(format!("templates/{t}"));
    }
    let rendered =
        helm.current_dir(repo_root()).stdin(std::process::Stdio::null()).output().await.expect("helm runs");
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    let text = String::from_utf8(rendered.stdout).unwrap();
    let subjects = format!("[{{kind: User, name: {user}, apiGroup: rbac.authorization.k8s.io}}]");
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        if value["kind"].as_str().is_some_and(|k| k.ends_with("Binding")) {
            value["subjects"] = serde_yaml::from_str(&subjects).unwrap();
        }
        docs.push(value);
    }
    docs
}

/// A uniquely named namespace for one test. Call [`TestNamespace::cleanup`] at the end (there is
/// no Drop: deleting needs the runtime). Without a controller-manager a deleted namespace stays
/// Terminating; nobody waits for it.
pub struct TestNamespace {
    pub name: String,
    /// An admin client.
    pub client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` (the prefix lowercased and trimmed to a valid name).
    pub async fn new(prefix: &str) -> TestNamespace {
        let client = cluster().await.client().await;
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        TestNamespace { name, client }
    }

    /// An Api of a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Server-side applies one or more YAML documents (`---`-separated), in order, into this
    /// namespace (a document's own `metadata.namespace` wins; cluster-scoped kinds are applied
    /// cluster-wide). Returns the applied objects, or the first error (later documents are then
    /// not applied). Panics on YAML that is not Kubernetes objects: that is a bug in the test.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<DynamicObject>, kube::Error> {
        apply_yaml(&self.client, Some(&self.name), yaml).await
    }

    /// Deletes the namespace (not waiting for it to go away).
    pub async fn cleanup(self) {
        match Api::<Namespace>::all(self.client).delete(&self.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("cannot delete namespace {}: {e}", self.name),
        }
    }
}

fn unique_name(prefix: &str) -> String {
    let mut base: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(50);
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "test" } else { base };
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..8).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{base}-{suffix}")
}

/// Server-side applies YAML documents (field manager [`FIELD_MANAGER`], forced); namespaced
/// objects without a namespace go to `namespace`. See [`TestNamespace::apply_yaml`].
pub async fn apply_yaml(
    client: &Client,
    namespace: Option<&str>,
    yaml: &str,
) -> Result<Vec<DynamicObject>, kube::Error> {
    let mut applied = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
            .unwrap_or_else(|e| panic!("apply_yaml: invalid YAML: {e}\n{yaml}"));
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let mut object: DynamicObject = serde_yaml::from_value(value)
            .unwrap_or_else(|e| panic!("apply_yaml: not a Kubernetes object: {e}\n{yaml}"));
        let types = object
            .types
            .clone()
            .unwrap_or_else(|| panic!("apply_yaml: a document lacks apiVersion/kind\n{yaml}"));
        let gvk = GroupVersionKind::try_from(&types)
            .unwrap_or_else(|e| panic!("apply_yaml: bad apiVersion {:?}: {e}", types.api_version));
        let name = object
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| panic!("apply_yaml: a {} lacks metadata.name", gvk.kind));
        let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk).await?;
        let api: Api<DynamicObject> =
            match (capabilities.scope, object.metadata.namespace.clone().or(namespace.map(str::to_owned))) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => {
                    object.metadata.namespace = Some(ns.clone());
                    Api::namespaced_with(client.clone(), &ns, &resource)
                }
                (kube::discovery::Scope::Namespaced, None) => {
                    panic!("apply_yaml: {} {name} needs a namespace", gvk.kind)
                }
                (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
            };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        // etcd on two busy cores sometimes answers a write late: the API server says so with a
        // timeout. A server-side apply is idempotent: it is sent again, a few times.
        let mut attempt = 1;
        let object = loop {
            match api.patch(&name, &params, &Patch::Apply(&object)).await {
                Err(kube::Error::Api(s)) if attempt < 4 && storage_timed_out(&s) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                result => break result?,
            }
        };
        applied.push(object);
    }
    Ok(applied)
}

/// The API server's answer when etcd did not answer a request in time.
fn storage_timed_out(s: &kube::core::Status) -> bool {
    s.code == 504 || (s.code == 500 && s.message.contains("etcdserver: request timed out"))
}

/// Applies every CRD in `crds/` (server-side, forced) and waits until each is Established.
/// Idempotent; call it from every test that needs the CRDs.
pub async fn install_crds(client: &Client) {
    let dir = repo_root().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("crds/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRDs in {}: run `make crds`", dir.display());
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not a CRD: {e}", file.display()));
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("cannot apply {}: {e}", file.display()));
        names.push(name);
    }
    within(Duration::from_secs(30), "CRDs to become Established", async {
        for name in &names {
            await_condition(api.clone(), name, conditions::is_crd_established())
                .await
                .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
        }
    })
    .await;
}
