//! The Helm chart (`charts/opamp-operator`): it lints, renders what its values promise, carries
//! the same CRDs as `crds/`, installs and upgrades on a real kube-apiserver — and its RBAC is
//! enough: the operator runs as a user holding nothing but the chart's roles.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::cluster::{TestNamespace, apply_yaml, chart_rbac, cluster, install_crds, tool};
use common::env::TestEnv;
use common::eventually;
use common::operator::test_config;
use common::simrun::RunningAgent;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Client, ResourceExt};
use opamp_operator::api::{AgentConfig, AgentConfigStatus, CapabilitySlot, CapabilitySlotStatus};
use opamp_operator::controller::leader::LeaderElectionConfig;
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::peers::PeersConfig;
use opamp_operator::peers::membership::{ADDRESS_ANNOTATION, GROUP_LABEL};
use opamp_operator::sim::AgentSpec;
use serde_yaml::Value;

const T: Duration = Duration::from_secs(30);

/// The values the chart is rendered with besides its defaults.
const SET: &str = "serviceMonitor.enabled=true,tls.secretName=x,anonymousAgentsNamespace=public,replicas=2";

/// What the operator does in the namespaces it manages: in the ClusterRole by default, in a Role
/// of each namespace with `namespaces` set. (API group, resource, verb, resource name or "" for
/// any.)
const NAMESPACED_RULES: &[Grant] = &[
    ("opamp.dev", "agentconfigs", "list", ""),
    ("opamp.dev", "agentconfigs", "watch", ""),
    ("opamp.dev", "capabilityslots", "list", ""),
    ("opamp.dev", "capabilityslots", "watch", ""),
    ("opamp.dev", "agentconfigs/status", "patch", ""),
    ("opamp.dev", "capabilityslots/status", "patch", ""),
    ("", "configmaps", "get", ""),
    ("", "configmaps", "list", ""),
    ("", "configmaps", "watch", ""),
    ("", "secrets", "get", ""),
    ("", "secrets", "list", ""),
    ("", "secrets", "watch", ""),
    ("apps", "controllerrevisions", "list", ""),
    ("apps", "controllerrevisions", "watch", ""),
    ("apps", "controllerrevisions", "create", ""),
    ("apps", "controllerrevisions", "patch", ""),
    ("apps", "controllerrevisions", "delete", ""),
    ("events.k8s.io", "events", "create", ""),
    ("events.k8s.io", "events", "patch", ""),
];

/// What the ClusterRole grants whatever the namespaces: reviews of the fleet listing's callers.
const REVIEW_RULES: &[Grant] = &[
    ("authentication.k8s.io", "tokenreviews", "create", ""),
    ("authorization.k8s.io", "subjectaccessreviews", "create", ""),
];

/// What the aggregated API's delegation adds in kube-system: reading the API server's
/// authentication ConfigMap (the request-header CA and names), that one only.
const AUTHENTICATION_CONFIG_RULES: &[Grant] = &[
    ("", "configmaps", "get", "extension-apiserver-authentication"),
    ("", "configmaps", "list", "extension-apiserver-authentication"),
    ("", "configmaps", "watch", "extension-apiserver-authentication"),
];

/// Every permission the ClusterRole grants by default (all namespaces managed).
fn cluster_rules() -> Vec<Grant> {
    [NAMESPACED_RULES, REVIEW_RULES].concat()
}

/// Every permission the Role grants in the release namespace: Leases, for leader election (the
/// Lease `opamp-operator`) and membership of the replicas (a Lease per replica, named after its
/// pod, so not limited by name; watched, deleted when the replica stops or lapsed long ago).
const NAMESPACE_RULES: &[Grant] = &[
    ("coordination.k8s.io", "leases", "get", ""),
    ("coordination.k8s.io", "leases", "list", ""),
    ("coordination.k8s.io", "leases", "watch", ""),
    ("coordination.k8s.io", "leases", "create", ""),
    ("coordination.k8s.io", "leases", "update", ""),
    ("coordination.k8s.io", "leases", "patch", ""),
    ("coordination.k8s.io", "leases", "delete", ""),
];

/// The operator's leader-election Lease.
const LEASE: &str = "opamp-operator";

/// The aggregated API's APIService (cluster-wide, named after its group version).
const APISERVICE: &str = "v1alpha1.fleet.opamp.dev";

type Grant = (&'static str, &'static str, &'static str, &'static str);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/opamp-operator")
}

// ---- helm -------------------------------------------------------------------------------------

/// `helm <args>` with its cache, config and data homes under target/ (never the user's) and no
/// ambient KUBECONFIG (commands that need a cluster pass `--kubeconfig`).
fn helm_command(args: &[&str]) -> Command {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm");
    let mut cmd = Command::new(tool("helm"));
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    cmd
}

/// Runs helm; panics with its output unless it exits 0. Returns stdout.
fn helm(args: &[&str]) -> String {
    let out = helm_command(args).output().unwrap_or_else(|e| panic!("cannot run helm: {e}"));
    assert!(
        out.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// [`helm`] off the async runtime's threads.
async fn helm_async(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || helm(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The documents of a rendered chart.
struct Manifests(Vec<Value>);

impl Manifests {
    /// `helm template <release> <chart> --namespace <namespace> [--set <set>] [extra…]`.
    fn render(release: &str, namespace: &str, set: Option<&str>, extra: &[&str]) -> Self {
        let chart = chart_dir();
        let mut args = vec!["template", release, chart.to_str().unwrap(), "--namespace", namespace];
        if let Some(set) = set {
            args.extend(["--set", set]);
        }
        args.extend(extra);
        Self::parse(&helm(&args))
    }

    fn parse(yaml: &str) -> Self {
        let docs = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("helm renders valid YAML"))
            .filter(|v| !v.is_null())
            .collect();
        Self(docs)
    }

    /// (kind, name) of every document.
    fn objects(&self) -> BTreeSet<(String, String)> {
        self.0
            .iter()
            .map(|d| (text(&d["kind"]).to_owned(), text(&d["metadata"]["name"]).to_owned()))
            .collect()
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.0.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| panic!("no {kind} {name} among {:?}", self.objects()))
    }

    /// The object of a namespaced kind in `namespace` (several namespaces hold one of that name).
    fn get_in(&self, kind: &str, name: &str, namespace: &str) -> &Value {
        self.0
            .iter()
            .find(|d| {
                d["kind"] == kind && d["metadata"]["name"] == name && d["metadata"]["namespace"] == namespace
            })
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} among {:?}", self.objects()))
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.0.iter().filter(move |d| d["kind"] == kind)
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().map(|s| text(s).to_owned()).collect()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|items| items.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no item named {name} in {list:?}"))
}

/// (group, resource, verb, resource name or "") of every rule, after checking that no rule is
/// wider than that.
fn rules(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        assert!(rule["nonResourceURLs"].is_null(), "{rule:?}");
        let names = if rule["resourceNames"].is_null() {
            vec![String::new()]
        } else {
            strings(&rule["resourceNames"])
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in &names {
                        assert!(![&group, &resource, &verb].contains(&&"*".to_owned()), "wildcard: {rule:?}");
                        out.insert((group.clone(), resource.clone(), verb.clone(), name.clone()));
                    }
                }
            }
        }
    }
    out
}

fn expected(grants: &[Grant]) -> BTreeSet<(String, String, String, String)> {
    grants.iter().map(|(g, r, v, n)| (g.to_string(), r.to_string(), v.to_string(), n.to_string())).collect()
}

/// Checks the rendered arguments with the operator binary itself: clap refuses an unknown flag
/// or a bad value before it gets to `--help`.
fn assert_binary_accepts(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_opamp-operator"))
        .arg("run")
        .args(args)
        .arg("--help")
        .output()
        .expect("run the operator binary");
    assert!(
        out.status.success(),
        "`opamp-operator run {}` is refused:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- offline: lint, render, CRDs --------------------------------------------------------------

#[test]
fn chart_lints() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let out = helm(&["lint", chart]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    helm(&["lint", "--strict", chart]);
    helm(&["lint", "--strict", chart, "--set", SET]);
    for aggregated in ["aggregatedApi.certManager.enabled=true", "aggregatedApi.enabled=false"] {
        helm(&["lint", "--strict", chart, "--set", aggregated]);
    }
}

#[test]
fn chart_version_follows_the_crate() {
    let meta: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "opamp-operator");
    assert_eq!(text(&meta["appVersion"]), env!("CARGO_PKG_VERSION"), "Chart.yaml appVersion vs Cargo.toml");
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let read = |dir: &Path| -> BTreeMap<String, String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
            })
            .collect()
    };
    let top = read(&repo().join("crds"));
    let chart = read(&chart_dir().join("crds"));
    assert!(!top.is_empty());
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "charts/opamp-operator/crds/ lists other files than crds/: run `make crds`"
    );
    for (file, yaml) in &top {
        assert!(
            chart[file] == *yaml,
            "charts/opamp-operator/crds/{file} differs from crds/{file}: run `make crds`"
        );
    }
}

#[test]
fn renders_defaults() {
    let m = Manifests::render("rel", "ops", None, &[]);
    let full = "rel-opamp-operator";
    let want: BTreeSet<(String, String)> = [
        ("ServiceAccount", full.to_owned()),
        ("ClusterRole", full.to_owned()),
        ("ClusterRoleBinding", full.to_owned()),
        ("Role", full.to_owned()),
        ("RoleBinding", full.to_owned()),
        ("Service", full.to_owned()),
        ("Service", format!("{full}-api")),
        ("Service", format!("{full}-peers")),
        ("Service", format!("{full}-metrics")),
        ("Deployment", full.to_owned()),
        ("PodDisruptionBudget", full.to_owned()),
        // The aggregated API.
        ("Service", format!("{full}-aggregated-api")),
        ("Secret", format!("{full}-aggregated-api-tls")),
        ("APIService", APISERVICE.to_owned()),
        ("ClusterRoleBinding", format!("{full}-auth-delegator")),
        ("RoleBinding", format!("{full}-authentication-reader")),
        ("ClusterRole", format!("{full}-agents-viewer")),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(m.objects(), want, "no ServiceMonitor unless enabled");
    for d in &m.0 {
        let cluster_scoped = matches!(text(&d["kind"]), "ClusterRole" | "ClusterRoleBinding" | "APIService");
        // The API server's authentication ConfigMap is read through a binding in kube-system.
        let namespace = if d["metadata"]["name"] == format!("{full}-authentication-reader").as_str() {
            "kube-system"
        } else {
            "ops"
        };
        assert_eq!(d["metadata"]["namespace"].as_str(), (!cluster_scoped).then_some(namespace), "{d:?}");
        assert_eq!(d["metadata"]["labels"]["app.kubernetes.io/instance"], "rel");
    }

    // The Deployment.
    let deploy = m.get("Deployment", full);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"];
    let selector = deploy["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    for (k, v) in selector {
        assert_eq!(&pod["metadata"]["labels"][k.as_str().unwrap()], v, "pod labels match the selector");
    }
    assert_eq!(pod["spec"]["serviceAccountName"], full);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    // The peer token: the pod's ServiceAccount's, for the peer audience only.
    let volumes = pod["spec"]["volumes"].as_sequence().expect("volumes");
    assert_eq!(volumes.len(), 2, "the peer token and the aggregated API's certificate: {volumes:?}");
    let sources = named(&pod["spec"]["volumes"], "peer-token")["projected"]["sources"].as_sequence().unwrap();
    assert_eq!(sources.len(), 1, "{sources:?}");
    let sat = &sources[0]["serviceAccountToken"];
    assert_eq!(sat["audience"], opamp_operator::peers::AUDIENCE);
    assert_eq!(sat["expirationSeconds"], 3600);
    assert_eq!(sat["path"], "token");
    let c = named(&pod["spec"]["containers"], "operator");
    assert_eq!(
        text(&c["image"]),
        format!("ghcr.io/opamp-operator/opamp-operator:{}", env!("CARGO_PKG_VERSION"))
    );
    let args = strings(&c["args"]);
    for arg in ["--opamp-addr=0.0.0.0:4320", "--api-addr=0.0.0.0:8080", "--metrics-addr=0.0.0.0:9090"] {
        assert!(args.iter().any(|a| a == arg), "{arg} not in {args:?}");
    }
    assert!(args.contains(&"--leader-election".to_owned()), "{args:?}");
    // Peers on: the group is the release, the token where the volume is mounted.
    for arg in [
        "--peers",
        "--peer-group=rel-opamp-operator",
        "--peer-addr=0.0.0.0:8081",
        "--peer-token-file=/var/run/secrets/opamp.dev/peers/token",
        "--peer-lease-seconds=15",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} not in {args:?}");
    }
    let mount = named(&c["volumeMounts"], "peer-token");
    assert_eq!(
        (&mount["mountPath"], &mount["readOnly"]),
        (&Value::from("/var/run/secrets/opamp.dev/peers"), &Value::from(true))
    );
    assert_eq!(c["volumeMounts"].as_sequence().unwrap().len(), 2);
    for flag in ["--tls-", "--anonymous-agents-namespace", "--namespaces", "--max-agents", "--callback-allow"]
    {
        assert!(!args.iter().any(|a| a.starts_with(flag)), "{flag} in {args:?}");
    }
    assert_binary_accepts(&args);
    assert_eq!(named(&c["env"], "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(named(&c["env"], "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(named(&c["env"], "POD_UID")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.uid");
    assert_eq!(named(&c["env"], "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(named(&c["env"], "RUST_LOG")["value"], "info");
    for (port, number) in
        [("opamp", 4320), ("api", 8080), ("metrics", 9090), ("peers", 8081), ("aggregated-api", 8443)]
    {
        assert_eq!(named(&c["ports"], port)["containerPort"], number);
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "api");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "api");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);

    // The Services select the pods and target the named container ports.
    let pod_labels = &pod["metadata"]["labels"];
    for (name, port, number) in [
        (full.to_owned(), "opamp", 4320),
        (format!("{full}-api"), "api", 8080),
        (format!("{full}-peers"), "peers", 8081),
        (format!("{full}-metrics"), "metrics", 9090),
    ] {
        let svc = m.get("Service", &name);
        for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(&pod_labels[k.as_str().unwrap()], v, "Service {name} selects the pods");
        }
        let p = named(&svc["spec"]["ports"], port);
        assert_eq!((&p["port"], &p["targetPort"]), (&Value::from(number), &Value::from(port)), "{name}");
    }
    assert_eq!(m.get("Service", full)["spec"]["type"], "ClusterIP");
    assert_eq!(m.get("Service", &format!("{full}-api"))["spec"]["type"], "ClusterIP");
    let peers = m.get("Service", &format!("{full}-peers"));
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["ports"].as_sequence().unwrap().len(), 1, "the peer port only");
    // The aggregated API: port 443 (what the APIService names) to the container's HTTPS port.
    let aggregated = m.get("Service", &format!("{full}-aggregated-api"));
    for (k, v) in aggregated["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v, "the aggregated API's Service selects the pods");
    }
    assert_eq!(aggregated["spec"]["type"], "ClusterIP");
    let p = named(&aggregated["spec"]["ports"], "https");
    assert_eq!((&p["port"], &p["targetPort"]), (&Value::from(443), &Value::from("aggregated-api")));
    assert_eq!(p["appProtocol"], "https");

    // Several replicas: spread over nodes when possible, evicted one at a time.
    let spread = pod["spec"]["topologySpreadConstraints"].as_sequence().expect("topologySpreadConstraints");
    assert_eq!(spread.len(), 1, "{spread:?}");
    assert_eq!(spread[0]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway");
    assert_eq!(spread[0]["maxSkew"], 1);
    assert_eq!(&spread[0]["labelSelector"]["matchLabels"], &deploy["spec"]["selector"]["matchLabels"]);
    let pdb = m.get("PodDisruptionBudget", full);
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"]["minAvailable"].is_null());
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], &deploy["spec"]["selector"]["matchLabels"]);

    // RBAC: exactly the permissions the operator needs, bound to its ServiceAccount.
    assert_eq!(rules(m.get("ClusterRole", full)), expected(&cluster_rules()));
    assert_eq!(rules(m.get("Role", full)), expected(NAMESPACE_RULES));
    for (kind, role) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let b = m.get(kind, full);
        assert_eq!((text(&b["roleRef"]["kind"]), text(&b["roleRef"]["name"])), (role, full));
        let s = &b["subjects"][0];
        assert_eq!(
            (text(&s["kind"]), text(&s["name"]), text(&s["namespace"])),
            ("ServiceAccount", full, "ops")
        );
        assert_eq!(b["subjects"].as_sequence().unwrap().len(), 1);
    }

    // Without RBAC and ServiceAccount: only the workload and its Services.
    let bare = Manifests::render("rel", "ops", Some("rbac.create=false,serviceAccount.create=false"), &[]);
    let kinds: BTreeSet<String> = bare.objects().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        ["APIService", "Deployment", "PodDisruptionBudget", "Secret", "Service"].map(String::from).into()
    );
    assert_eq!(bare.get("Deployment", full)["spec"]["template"]["spec"]["serviceAccountName"], "default");
}

#[test]
fn renders_what_the_values_promise() {
    let m = Manifests::render(
        "rel",
        "ops",
        Some(SET),
        &[
            "--set",
            "namespaces={a,b}",
            "--set",
            "log.level=debug",
            "--set",
            "serviceMonitor.labels.release=prom",
            "--set",
            "maxAgentsPerNamespace=500",
            "--set",
            "callbackAllow={10.0.0.0/8,hooks.example.com}",
        ],
    );
    let full = "rel-opamp-operator";
    let deploy = m.get("Deployment", full);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    let c = named(&pod["containers"], "operator");
    let args = strings(&c["args"]);
    let pos =
        |flag: &str| args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    assert_eq!(args[pos("--tls-cert-file") + 1], "/etc/opamp/tls/tls.crt");
    assert_eq!(args[pos("--tls-key-file") + 1], "/etc/opamp/tls/tls.key");
    pos("--anonymous-agents-namespace=public");
    pos("--namespaces=a,b");
    pos("--max-agents-per-namespace=500");
    pos("--callback-allow=10.0.0.0/8,hooks.example.com");
    assert_binary_accepts(&args);
    assert_eq!(named(&c["env"], "RUST_LOG")["value"], "debug");
    let mount = named(&c["volumeMounts"], "tls");
    assert_eq!(
        (&mount["mountPath"], &mount["readOnly"]),
        (&Value::from("/etc/opamp/tls"), &Value::from(true))
    );
    assert_eq!(named(&pod["volumes"], "tls")["secret"]["secretName"], "x");

    // The ServiceMonitor scrapes the metrics Service (and only it) on its named port.
    let sm = m.get("ServiceMonitor", full);
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(strings(&sm["spec"]["namespaceSelector"]["matchNames"]), ["ops"]);
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!((text(&endpoint["port"]), text(&endpoint["path"])), ("metrics", "/metrics"));
    assert_eq!(endpoint["interval"], "30s");
    let selected: Vec<&str> = m
        .of_kind("Service")
        .filter(|svc| {
            sm["spec"]["selector"]["matchLabels"]
                .as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &svc["metadata"]["labels"][k.as_str().unwrap()] == v)
        })
        .map(|svc| text(&svc["metadata"]["name"]))
        .collect();
    assert_eq!(selected, [format!("{full}-metrics")]);
    // TLS: the OpAMP Service says so to meshes and ingress controllers.
    assert_eq!(named(&m.get("Service", full)["spec"]["ports"], "opamp")["appProtocol"], "https");

    // RBAC with namespaces: the namespaced work is granted in those namespaces only.
    assert_eq!(rules(m.get("ClusterRole", full)), expected(REVIEW_RULES));
    assert_eq!(rules(m.get_in("Role", full, "ops")), expected(NAMESPACE_RULES), "leader election");
    let scoped = format!("{full}-resources");
    for ns in ["a", "b"] {
        assert_eq!(rules(m.get_in("Role", &scoped, ns)), expected(NAMESPACED_RULES), "in {ns}");
        let b = m.get_in("RoleBinding", &scoped, ns);
        assert_eq!((text(&b["roleRef"]["kind"]), text(&b["roleRef"]["name"])), ("Role", scoped.as_str()));
        let s = &b["subjects"][0];
        assert_eq!(
            (text(&s["kind"]), text(&s["name"]), text(&s["namespace"])),
            ("ServiceAccount", full, "ops")
        );
    }
    assert_eq!(m.of_kind("Role").count(), 3, "{:?}", m.objects());
    assert_eq!(m.of_kind("RoleBinding").count(), 4, "with kube-system's: {:?}", m.objects());
}

#[test]
fn renders_replicas_peers_and_spread_as_set() {
    let full = "rel-opamp-operator";
    let pod_of = |m: &Manifests| m.get("Deployment", full)["spec"]["template"]["spec"].clone();

    // One replica: no PodDisruptionBudget (maxUnavailable 1 would let a drain take the only
    // pod, and minAvailable 1 would block it); none either when disabled.
    for set in ["replicas=1", "replicas=3,podDisruptionBudget.enabled=false"] {
        let m = Manifests::render("rel", "ops", Some(set), &[]);
        assert!(m.find("PodDisruptionBudget", full).is_none(), "{set}");
    }
    assert!(
        Manifests::render("rel", "ops", Some("replicas=3"), &[]).find("PodDisruptionBudget", full).is_some()
    );

    // Peers elsewhere: another port, an IPv6 bind address, another Lease duration.
    let m =
        Manifests::render("rel", "ops", Some("peers.port=9443,bindAddress=::,peers.leaseSeconds=30"), &[]);
    let pod = pod_of(&m);
    let c = named(&pod["containers"], "operator");
    let args = strings(&c["args"]);
    for arg in ["--peer-addr=[::]:9443", "--peer-lease-seconds=30"] {
        assert!(args.iter().any(|a| a == arg), "{arg} not in {args:?}");
    }
    assert_binary_accepts(&args);
    assert_eq!(named(&c["ports"], "peers")["containerPort"], 9443);
    let svc = m.get("Service", &format!("{full}-peers"));
    assert_eq!(named(&svc["spec"]["ports"], "peers")["port"], 9443);

    // Peers off: no flag, no port, no token, no peers Service; TLS still mounted.
    let m = Manifests::render("rel", "ops", Some("peers.enabled=false,tls.secretName=x"), &[]);
    let pod = pod_of(&m);
    let c = named(&pod["containers"], "operator");
    let args = strings(&c["args"]);
    assert!(!args.iter().any(|a| a.starts_with("--peer")), "{args:?}");
    assert!(args.contains(&"--leader-election".to_owned()), "{args:?}");
    assert_binary_accepts(&args);
    let ports: Vec<&str> = c["ports"].as_sequence().unwrap().iter().map(|p| text(&p["name"])).collect();
    assert_eq!(ports, ["opamp", "api", "metrics", "aggregated-api"]);
    let volumes: Vec<&str> = pod["volumes"].as_sequence().unwrap().iter().map(|v| text(&v["name"])).collect();
    assert_eq!(volumes, ["tls", "aggregated-api-tls"]);
    let mounts: Vec<&str> =
        c["volumeMounts"].as_sequence().unwrap().iter().map(|v| text(&v["name"])).collect();
    assert_eq!(mounts, ["tls", "aggregated-api-tls"]);
    assert!(m.find("Service", &format!("{full}-peers")).is_none());

    // Spread constraints: replaced as given (a labelSelector given is kept, one left out is the
    // release's pods), or none at all.
    let zones = r#"topologySpreadConstraints=[
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"},
        {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"team": "obs"}}}]"#;
    let m = Manifests::render("rel", "ops", None, &["--set-json", zones]);
    let pod = pod_of(&m);
    let spread = pod["topologySpreadConstraints"].as_sequence().unwrap();
    assert_eq!(spread.len(), 2, "{spread:?}");
    assert_eq!(
        (text(&spread[0]["topologyKey"]), text(&spread[0]["whenUnsatisfiable"])),
        ("topology.kubernetes.io/zone", "DoNotSchedule")
    );
    assert_eq!(spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "rel");
    assert_eq!(spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/name"], "opamp-operator");
    let own = spread[1]["labelSelector"]["matchLabels"].as_mapping().unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(spread[1]["labelSelector"]["matchLabels"]["team"], "obs");
    assert_eq!(spread[1]["maxSkew"], 2);
    let m = Manifests::render("rel", "ops", None, &["--set-json", "topologySpreadConstraints=[]"]);
    assert!(pod_of(&m)["topologySpreadConstraints"].is_null());

    // Host network and the update strategy: absent by default, as set otherwise (a single node
    // with host networking replaces its one pod in place; tests/node.rs).
    let m = Manifests::render("rel", "ops", None, &[]);
    assert!(pod_of(&m)["hostNetwork"].is_null() && pod_of(&m)["dnsPolicy"].is_null());
    assert!(m.get("Deployment", full)["spec"]["strategy"].is_null());
    let in_place =
        r#"strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}"#;
    let m = Manifests::render("rel", "ops", Some("hostNetwork=true"), &["--set-json", in_place]);
    let pod = pod_of(&m);
    assert_eq!(
        (&pod["hostNetwork"], text(&pod["dnsPolicy"])),
        (&Value::Bool(true), "ClusterFirstWithHostNet")
    );
    let strategy = &m.get("Deployment", full)["spec"]["strategy"];
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 0);
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
}

/// The base64 value of `key` in a Secret's `data`, decoded.
fn secret_data(secret: &Value, key: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text(&secret["data"][key]))
        .unwrap_or_else(|e| panic!("{key} is not base64: {e}"))
}

/// Checks with openssl that `cert` (PEM) is signed by `ca` (PEM), valid for `host`, and the
/// certificate of `key` (PEM). `dir` (created) holds the files.
fn assert_serving_certificate(dir: &Path, ca: &[u8], cert: &[u8], key: &[u8], host: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, pem) in [("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)] {
        std::fs::write(dir.join(file), pem).unwrap();
    }
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    openssl(&["verify", "-CAfile", "ca.crt", "-verify_hostname", host, "-purpose", "sslserver", "tls.crt"]);
    assert_eq!(
        openssl(&["x509", "-in", "tls.crt", "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", "tls.key", "-pubout"]),
        "tls.key is not the key of tls.crt"
    );
}

#[test]
fn renders_the_aggregated_api() {
    let full = "rel-opamp-operator";
    let svc = format!("{full}-aggregated-api");
    let tmp =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-aggregated-api-{}", std::process::id()));

    // By default: the APIService routes fleet.opamp.dev/v1alpha1 to the Service on 443, and
    // trusts the CA of the Secret the pods serve with.
    let m = Manifests::render("rel", "ops", None, &[]);
    let api = m.get("APIService", APISERVICE);
    assert_eq!(api["apiVersion"], "apiregistration.k8s.io/v1");
    let spec = &api["spec"];
    assert_eq!((text(&spec["group"]), text(&spec["version"])), ("fleet.opamp.dev", "v1alpha1"));
    assert_eq!(
        (text(&spec["service"]["namespace"]), text(&spec["service"]["name"]), &spec["service"]["port"]),
        ("ops", svc.as_str(), &Value::from(443))
    );
    assert_eq!(
        (&spec["groupPriorityMinimum"], &spec["versionPriority"]),
        (&Value::from(1000), &Value::from(15))
    );
    assert!(spec["insecureSkipTLSVerify"].is_null() || spec["insecureSkipTLSVerify"] == false, "{spec:?}");
    assert!(api["metadata"]["annotations"].is_null(), "no cert-manager injection: {api:?}");
    let secret = m.get("Secret", &format!("{svc}-tls"));
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(spec["caBundle"], secret["data"]["ca.crt"], "the caBundle is the Secret's CA");
    let (ca, cert, key) =
        (secret_data(secret, "ca.crt"), secret_data(secret, "tls.crt"), secret_data(secret, "tls.key"));
    // The API server checks the certificate for <service>.<namespace>.svc; in-cluster clients
    // may use the other names.
    for host in
        [svc.clone(), format!("{svc}.ops"), format!("{svc}.ops.svc"), format!("{svc}.ops.svc.cluster.local")]
    {
        assert_serving_certificate(&tmp.join("default"), &ca, &cert, &key, &host);
    }
    // The pods serve it on the port the Service targets.
    let pod = &m.get("Deployment", full)["spec"]["template"]["spec"];
    let c = named(&pod["containers"], "operator");
    let args = strings(&c["args"]);
    for arg in [
        "--aggregated-api-addr=0.0.0.0:8443",
        "--aggregated-api-cert-file=/etc/opamp/aggregated-api/tls.crt",
        "--aggregated-api-key-file=/etc/opamp/aggregated-api/tls.key",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} not in {args:?}");
    }
    assert_eq!(named(&c["ports"], "aggregated-api")["containerPort"], 8443);
    let mount = named(&c["volumeMounts"], "aggregated-api-tls");
    assert_eq!(
        (&mount["mountPath"], &mount["readOnly"]),
        (&Value::from("/etc/opamp/aggregated-api"), &Value::from(true))
    );
    assert_eq!(
        named(&pod["volumes"], "aggregated-api-tls")["secret"]["secretName"],
        format!("{svc}-tls").as_str()
    );
    assert_binary_accepts(&args);
    // `helm template` cannot look the Secret up: each render makes a new pair (an install or
    // upgrade reuses the stored one: `installs_and_upgrades_on_a_cluster`).
    let again = Manifests::render("rel", "ops", None, &[]);
    assert_ne!(again.get("Secret", &format!("{svc}-tls"))["data"]["tls.crt"], secret["data"]["tls.crt"]);

    // The delegation: reviews as system:auth-delegator, and the API server's authentication
    // ConfigMap through the Role kube-system grants for it; both to the operator's account.
    for (kind, name, namespace, role_kind, role) in [
        (
            "ClusterRoleBinding",
            format!("{full}-auth-delegator"),
            None,
            "ClusterRole",
            "system:auth-delegator",
        ),
        (
            "RoleBinding",
            format!("{full}-authentication-reader"),
            Some("kube-system"),
            "Role",
            "extension-apiserver-authentication-reader",
        ),
    ] {
        let b = m.get(kind, &name);
        assert_eq!(b["metadata"]["namespace"].as_str(), namespace);
        assert_eq!((text(&b["roleRef"]["kind"]), text(&b["roleRef"]["name"])), (role_kind, role));
        let subjects = b["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1, "{b:?}");
        assert_eq!(
            (text(&subjects[0]["kind"]), text(&subjects[0]["name"]), text(&subjects[0]["namespace"])),
            ("ServiceAccount", full, "ops")
        );
    }
    // For people: read agents, aggregated into view, edit and admin.
    let viewer = m.get("ClusterRole", &format!("{full}-agents-viewer"));
    assert_eq!(
        rules(viewer),
        expected(&[
            ("fleet.opamp.dev", "agents", "get", ""),
            ("fleet.opamp.dev", "agents", "list", ""),
            ("fleet.opamp.dev", "agents", "watch", ""),
        ])
    );
    for role in ["view", "edit", "admin"] {
        assert_eq!(
            viewer["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{role}")],
            "true"
        );
    }
    // The operator's own ClusterRole keeps the reviews (the fleet listing needs them too).
    assert_eq!(rules(m.get("ClusterRole", full)), expected(&cluster_rules()));

    // Other port and priorities; no certificate check (then no caBundle: the API rejects both).
    let m = Manifests::render(
        "rel",
        "ops",
        Some(
            "aggregatedApi.port=9443,aggregatedApi.groupPriorityMinimum=2000,aggregatedApi.versionPriority=20,\
             aggregatedApi.insecureSkipTLSVerify=true,bindAddress=::",
        ),
        &[],
    );
    let spec = &m.get("APIService", APISERVICE)["spec"];
    assert_eq!(
        (&spec["groupPriorityMinimum"], &spec["versionPriority"]),
        (&Value::from(2000), &Value::from(20))
    );
    assert_eq!(spec["insecureSkipTLSVerify"], true);
    assert!(spec["caBundle"].is_null(), "{spec:?}");
    assert_eq!(spec["service"]["port"], 443, "the Service's port, whatever the container's");
    let c = named(&m.get("Deployment", full)["spec"]["template"]["spec"]["containers"], "operator").clone();
    let args = strings(&c["args"]);
    assert!(args.contains(&"--aggregated-api-addr=[::]:9443".to_owned()), "{args:?}");
    assert_eq!(named(&c["ports"], "aggregated-api")["containerPort"], 9443);
    assert_binary_accepts(&args);
    m.get("Secret", &format!("{svc}-tls"));

    // cert-manager: a self-signed Issuer, a Certificate for the Service's names into the Secret
    // the pods mount, and the CA injected into the APIService.
    let m = Manifests::render("rel", "ops", Some("aggregatedApi.certManager.enabled=true"), &[]);
    assert!(m.find("Secret", &format!("{svc}-tls")).is_none(), "{:?}", m.objects());
    let issuer = m.get("Issuer", &svc);
    assert_eq!(issuer["apiVersion"], "cert-manager.io/v1");
    assert!(issuer["spec"]["selfSigned"].is_mapping(), "{issuer:?}");
    let certificate = m.get("Certificate", &svc);
    assert_eq!(certificate["apiVersion"], "cert-manager.io/v1");
    assert_eq!(certificate["metadata"]["namespace"], "ops");
    let secret_name = format!("{svc}-cert-manager-tls");
    assert_eq!(certificate["spec"]["secretName"], secret_name.as_str());
    assert_eq!(
        strings(&certificate["spec"]["dnsNames"]),
        [svc.clone(), format!("{svc}.ops"), format!("{svc}.ops.svc"), format!("{svc}.ops.svc.cluster.local")]
    );
    assert_eq!(
        (text(&certificate["spec"]["issuerRef"]["name"]), text(&certificate["spec"]["issuerRef"]["kind"])),
        (svc.as_str(), "Issuer")
    );
    let api = m.get("APIService", APISERVICE);
    assert_eq!(
        api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("ops/{svc}").as_str()
    );
    assert!(api["spec"]["caBundle"].is_null() && api["spec"]["insecureSkipTLSVerify"].is_null(), "{api:?}");
    let pod = &m.get("Deployment", full)["spec"]["template"]["spec"];
    assert_eq!(named(&pod["volumes"], "aggregated-api-tls")["secret"]["secretName"], secret_name.as_str());
    // … or the issuer given (then no Issuer of the chart's).
    let m = Manifests::render(
        "rel",
        "ops",
        Some("aggregatedApi.certManager.enabled=true"),
        &["--set-json", r#"aggregatedApi.certManager.issuerRef={"name":"corp-ca","kind":"ClusterIssuer"}"#],
    );
    assert!(m.of_kind("Issuer").next().is_none(), "{:?}", m.objects());
    let issuer_ref = &m.get("Certificate", &svc)["spec"]["issuerRef"];
    assert_eq!((text(&issuer_ref["name"]), text(&issuer_ref["kind"])), ("corp-ca", "ClusterIssuer"));

    // A long release name: the Service's name stays a DNS label.
    let long = "a-release-name-of-fifty-characters-for-the-service";
    let m = Manifests::render(long, "ops", None, &[]);
    let name = text(&m.get("APIService", APISERVICE)["spec"]["service"]["name"]).to_owned();
    assert!(name.len() <= 63 && name.ends_with("-aggregated-api"), "{name}");
    m.get("Service", &name);

    // Off: none of it.
    let m = Manifests::render("rel", "ops", Some("aggregatedApi.enabled=false"), &[]);
    let objects = m.objects();
    assert!(
        objects
            .iter()
            .all(|(kind, name)| kind != "APIService" && kind != "Secret" && !name.contains("aggregated")),
        "{objects:?}"
    );
    assert!(m.find("ClusterRoleBinding", &format!("{full}-auth-delegator")).is_none());
    assert!(m.find("ClusterRole", &format!("{full}-agents-viewer")).is_none());
    let c = named(&m.get("Deployment", full)["spec"]["template"]["spec"]["containers"], "operator").clone();
    let aggregated: Vec<_> =
        strings(&c["args"]).into_iter().filter(|a| a.starts_with("--aggregated-api")).collect();
    assert_eq!(aggregated, ["--aggregated-api-addr=off"], "the operator serves no aggregated API either");
    assert!(c["ports"].as_sequence().unwrap().iter().all(|p| p["name"] != "aggregated-api"));
    assert!(c["volumeMounts"].as_sequence().unwrap().iter().all(|v| v["name"] != "aggregated-api-tls"));
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---- on the local cluster ---------------------------------------------------------------------

/// Runs a closure when dropped — also while a failing test unwinds: cluster-scoped objects
/// outlive the test's namespace, and a leftover binding would grant rights to later tests.
struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl OnDrop {
    fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// `kubectl delete` of cluster-scoped objects (`clusterrole/<name>` …), when dropped.
fn delete_on_drop(kubeconfig: PathBuf, objects: Vec<String>) -> OnDrop {
    let kubectl = tool("kubectl");
    OnDrop::new(move || {
        let status = Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["delete", "--ignore-not-found", "--wait=false"])
            .args(&objects)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("could not delete {objects:?}: {status:?}");
        }
    })
}

/// The cluster's APIServices (apiregistration.k8s.io/v1; not among k8s-openapi's types).
fn apiservices(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    Api::all_with(client.clone(), &ApiResource::from_gvk_with_plural(&gvk, "apiservices"))
}

/// The installed aggregated API's serving certificate (tls.crt of the Secret), after checking
/// that the APIService names the chart's Service and trusts the Secret's CA.
async fn serving_certificate(ns: &TestNamespace, apiservices: &Api<DynamicObject>, full: &str) -> Vec<u8> {
    use base64::Engine as _;
    let secret = ns
        .api::<Secret>()
        .get(&format!("{full}-aggregated-api-tls"))
        .await
        .expect("the certificate's Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap_or_default();
    let ca = &data.get("ca.crt").expect("ca.crt in the Secret").0;
    let api = apiservices.get(APISERVICE).await.expect("the APIService exists");
    let spec = &api.data["spec"];
    assert_eq!(spec["service"]["name"], format!("{full}-aggregated-api").as_str(), "{spec}");
    assert_eq!(spec["service"]["namespace"], ns.name.as_str(), "{spec}");
    let bundle = spec["caBundle"].as_str().expect("a caBundle");
    let bundle = base64::engine::general_purpose::STANDARD.decode(bundle).expect("caBundle is base64");
    assert_eq!(&bundle, ca, "the APIService's caBundle is the Secret's ca.crt");
    data.get("tls.crt").expect("tls.crt in the Secret").0.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_and_upgrades_on_a_cluster() {
    let cluster = cluster().await;
    let tenants = TestEnv::new("chart-install").prepare().await;
    let ns = &tenants.ns;
    let release = ns.name.clone();
    let full = format!("{release}-opamp-operator");
    let kubeconfig = cluster.kubeconfig_path.to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    let helm_args = |verb: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec![verb.into(), release.clone()];
        if verb != "uninstall" {
            args.push(chart.clone());
        }
        args.extend(
            ["--namespace", &ns.name, "--kubeconfig", &kubeconfig, "--kube-context", "admin"]
                .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // The APIService is cluster-wide and named after its group version: helm refuses to install
    // over one it does not own (another suite's, or one left behind). Wait until there is none.
    let apiservices = apiservices(&ns.client);
    eventually(Duration::from_secs(60), "no APIService v1alpha1.fleet.opamp.dev in the cluster", || async {
        apiservices.get_opt(APISERVICE).await.expect("get APIService").is_none().then_some(())
    })
    .await;
    let uninstall_args = helm_args("uninstall", &[]);
    let mut uninstall = OnDrop::new(move || {
        let args: Vec<&str> = uninstall_args.iter().map(String::as_str).collect();
        let _ = helm_command(&args).stdout(Stdio::null()).stderr(Stdio::null()).status();
    });

    let started = std::time::Instant::now();
    let out = helm_async(helm_args("install", &[])).await;
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(out.contains(&format!("ws://{full}.{}.svc:4320/v1/opamp", ns.name)), "NOTES:\n{out}");
    assert!(out.contains(&format!("get leases -l opamp.dev/peer-group={full}")), "NOTES:\n{out}");
    assert!(out.contains("kubectl get agents -A"), "NOTES:\n{out}");
    eprintln!("helm install: {:?}", started.elapsed());

    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get(&full).await.expect("the Deployment exists");
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let budgets: Api<PodDisruptionBudget> = ns.api();
    let pdb = budgets.get(&full).await.expect("the PodDisruptionBudget exists");
    assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    let services: Api<Service> = ns.api();
    for name in [
        full.clone(),
        format!("{full}-api"),
        format!("{full}-peers"),
        format!("{full}-metrics"),
        format!("{full}-aggregated-api"),
    ] {
        services.get(&name).await.unwrap_or_else(|e| panic!("Service {name}: {e}"));
    }
    ns.api::<ServiceAccount>().get(&full).await.expect("the ServiceAccount exists");
    ns.api::<Role>().get(&full).await.expect("the Role exists");
    ns.api::<RoleBinding>().get(&full).await.expect("the RoleBinding exists");
    let cluster_roles: Api<ClusterRole> = Api::all(ns.client.clone());
    let role = cluster_roles.get(&full).await.expect("the ClusterRole exists");
    assert_eq!(role.rules.as_ref().map(Vec::len), Some(7));
    Api::<ClusterRoleBinding>::all(ns.client.clone())
        .get(&full)
        .await
        .expect("the ClusterRoleBinding exists");

    // The aggregated API: the APIService trusts the CA of the certificate in the Secret …
    let serving = serving_certificate(ns, &apiservices, &full).await;
    // … and the chart's identity holds what the delegation needs: reviews, and the API server's
    // authentication ConfigMap (kube-system's Role grants that name only: list and watch it
    // with a metadata.name field selector).
    let sa = client_impersonating(&format!("system:serviceaccount:{}:{full}", ns.name)).await;
    let cm = "extension-apiserver-authentication";
    let delegation: Vec<(Grant, Option<&str>)> = vec![
        (("", "configmaps", "get", cm), Some("kube-system")),
        (("", "configmaps", "list", cm), Some("kube-system")),
        (("", "configmaps", "watch", cm), Some("kube-system")),
        (("authorization.k8s.io", "subjectaccessreviews", "create", ""), None),
        (("authentication.k8s.io", "tokenreviews", "create", ""), None),
    ];
    eventually(T, "the chart's identity to hold the delegation's rights", || async {
        all_allowed(&sa, &delegation).await.then_some(())
    })
    .await;
    // Really read, as the chart's identity: the request-header CA the operator verifies with.
    let by_name = ListParams::default().fields(&format!("metadata.name={cm}"));
    let found =
        Api::<ConfigMap>::namespaced(sa.clone(), "kube-system").list(&by_name).await.expect("list by name");
    let data = found.items.first().and_then(|c| c.data.clone()).unwrap_or_default();
    assert!(data.contains_key("requestheader-client-ca-file"), "{:?}", data.keys());
    let role = |name: &str| format!("{full}-{name}");
    Api::<ClusterRole>::all(ns.client.clone())
        .get(&role("agents-viewer"))
        .await
        .expect("the viewer ClusterRole");

    // An upgrade with changed values reaches the objects.
    let started = std::time::Instant::now();
    let out = helm_async(helm_args(
        "upgrade",
        &[
            "--set",
            "replicas=3",
            "--set",
            "anonymousAgentsNamespace=public",
            "--set",
            "service.type=NodePort",
        ],
    ))
    .await;
    assert!(out.contains("REVISION: 2") && out.contains("STATUS: deployed"), "{out}");
    eprintln!("helm upgrade: {:?}", started.elapsed());
    let d = deployments.get(&full).await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let args = spec.template.spec.unwrap().containers[0].args.clone().unwrap_or_default();
    assert!(args.contains(&"--anonymous-agents-namespace=public".to_owned()), "{args:?}");
    assert_eq!(services.get(&full).await.unwrap().spec.unwrap().type_.as_deref(), Some("NodePort"));
    // The serving certificate and the APIService's caBundle are kept (helm looks the Secret up).
    assert_eq!(
        serving_certificate(ns, &apiservices, &full).await,
        serving,
        "the certificate changed on upgrade"
    );

    // Uninstall takes the cluster-scoped objects along.
    helm_async(helm_args("uninstall", &[])).await;
    uninstall.0 = None;
    let gone = cluster_roles.get_opt(&full).await.expect("get ClusterRole");
    assert!(gone.is_none(), "the ClusterRole outlives the release");
    assert!(
        apiservices.get_opt(APISERVICE).await.expect("get APIService").is_none(),
        "the APIService outlives the release"
    );
    let bindings = Api::<ClusterRoleBinding>::all(ns.client.clone());
    assert!(bindings.get_opt(&role("auth-delegator")).await.expect("get ClusterRoleBinding").is_none());
    let kube_system = Api::<RoleBinding>::namespaced(ns.client.clone(), "kube-system");
    assert!(kube_system.get_opt(&role("authentication-reader")).await.expect("get RoleBinding").is_none());
    tenants.cleanup().await;
}

// ---- the RBAC proof ---------------------------------------------------------------------------

/// The operator's log lines, captured for the RBAC test (a denied request is only logged).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("opamp_operator=debug"))
        .with_writer(|| LogWriter)
        .with_ansi(false)
        .try_init();
}

/// The captured log lines that tell of a request the API server refused (the operator logs
/// and retries: a missing permission shows here first, or only here).
fn denials() -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["forbidden", "watch error", "status patch failed", "event not recorded"]
                .iter()
                .any(|p| l.contains(p))
        })
        .map(str::to_owned)
        .collect()
}

/// [`common::eventually`] that also fails as soon as the operator was refused something.
async fn wait_for<R, F, Fut>(what: &str, mut check: F) -> R
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<R>>,
{
    let end = tokio::time::Instant::now() + T;
    loop {
        let denied = denials();
        assert!(
            denied.is_empty(),
            "while waiting for {what}, the operator was refused:\n{}",
            denied.join("\n")
        );
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out after {T:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the client's user may `verb` the resource (`resource` or `resource/subresource`; the
/// object `name`, "" for any), in `namespace` or cluster-wide.
async fn allowed(client: &Client, (group, resource, verb, name): Grant, namespace: Option<&str>) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: namespace.map(Into::into),
                name: (!name.is_empty()).then(|| name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

/// Applies the chart's RBAC `rbac` with its bindings' subjects replaced by `user`.
async fn bind_to_user(rbac: &mut Manifests, user: &str, ns: &TestNamespace) {
    for doc in &mut rbac.0 {
        if text(&doc["kind"]).ends_with("Binding") {
            let subject = format!("[{{kind: User, name: {user}, apiGroup: rbac.authorization.k8s.io}}]");
            doc["subjects"] = serde_yaml::from_str(&subject).unwrap();
        }
        apply_yaml(&ns.client, Some(&ns.name), &serde_yaml::to_string(doc).unwrap())
            .await
            .unwrap_or_else(|e| panic!("cannot apply {doc:?}: {e}"));
    }
}

/// Starts the operator as `client`, managing `namespaces`, with leader election in
/// `lease_namespace` (its Leases are what the chart's Role is for) and `peers` if given, and
/// waits until it is ready: every cache listed (agentconfigs, capabilityslots, the metadata of
/// configmaps and secrets, agent-token secrets of each namespace) and the referenced objects read.
async fn start_operator(
    client: Client,
    namespaces: Vec<String>,
    lease_namespace: &str,
    peers: Option<PeersConfig>,
) -> Operator {
    // (The test configuration lets a slot's callback go to loopback, refused by default.)
    let config = OperatorConfig {
        namespaces: Some(namespaces),
        leader_election: Some(LeaderElectionConfig::new(lease_namespace, IDENTITY)),
        peers,
        peer_addr: "127.0.0.1:0".parse().unwrap(),
        ..test_config()
    };
    let op = tokio::time::timeout(T, Operator::start(client, config))
        .await
        .expect("operator starts in time")
        .expect("operator starts with the chart's RBAC");
    let readyz = format!("http://{}/readyz", op.api_addr);
    wait_for("operator ready (caches synced with the chart's RBAC)", || async {
        reqwest::get(&readyz).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    op
}

/// Whether every grant is allowed, each in its namespace (`None`: cluster-wide).
async fn all_allowed(client: &Client, grants: &[(Grant, Option<&str>)]) -> bool {
    for (grant, namespace) in grants {
        if !allowed(client, *grant, *namespace).await {
            return false;
        }
    }
    true
}

/// The in-process operator's identity in the Lease.
const IDENTITY: &str = "chart-rbac-test";

fn agent_config(name: &str, inline: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: {name}}}\nspec:\n  \
         selector: {{matchAttributes: {{service.name: rbac}}}}\n  files:\n    \
         collector.yaml: {{configMapKeyRef: {{name: otel, key: collector.yaml}}}}\n    \
         extra.yaml: {{contentType: text/yaml, inline: \"{inline}\"}}\n"
    )
}

/// The aggregated API's RBAC of release `release` in `namespace` (aggregated-api-rbac.yaml:
/// the delegation's two bindings and the agents-viewer ClusterRole), and a guard deleting it
/// when dropped (it lies outside the test's namespace).
async fn aggregated_api_rbac(release: &str, namespace: &str) -> (Manifests, [OnDrop; 2]) {
    let chart = chart_dir();
    let args = ["template", release, chart.to_str().unwrap(), "--namespace", namespace]
        .into_iter()
        .chain(["--show-only", "templates/aggregated-api-rbac.yaml"])
        .map(String::from)
        .collect();
    let rbac = Manifests::parse(&helm_async(args).await);
    assert_eq!(rbac.0.len(), 3, "{:?}", rbac.objects());
    let full = format!("{release}-opamp-operator");
    let kubeconfig = cluster().await.kubeconfig_path.clone();
    let guards = [
        delete_on_drop(
            kubeconfig.clone(),
            vec![
                format!("clusterrolebinding/{full}-auth-delegator"),
                format!("clusterrole/{full}-agents-viewer"),
            ],
        ),
        delete_on_drop(
            kubeconfig,
            vec!["--namespace=kube-system".into(), format!("rolebinding/{full}-authentication-reader")],
        ),
    ];
    (rbac, guards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_with_the_charts_rbac() {
    capture_logs();
    let cluster = cluster().await;
    let tenants = TestEnv::new("chart-rbac").prepare().await;
    let ns = &tenants.ns;
    let release = ns.name.clone();
    let full = format!("{release}-opamp-operator");
    let operator = cluster.client_as_operator().await;
    assert!(
        !allowed(&operator, ("", "secrets", "list", ""), None).await,
        "the `operator` user may list Secrets before the chart's roles are bound: something else grants it \
         rights, and this test would prove nothing"
    );

    // The chart's RBAC, bound to the `operator` user instead of the ServiceAccount.
    let rbac = chart_rbac(&release, &ns.name, "operator").await;
    let kinds: Vec<&str> = rbac.iter().map(|d| text(&d["kind"])).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let _delete = delete_on_drop(
        cluster.kubeconfig_path.clone(),
        vec![format!("clusterrole/{full}"), format!("clusterrolebinding/{full}")],
    );
    for doc in &rbac {
        apply_yaml(&ns.client, Some(&ns.name), &serde_yaml::to_string(doc).unwrap())
            .await
            .unwrap_or_else(|e| panic!("cannot apply {doc:?}: {e}"));
    }
    // The aggregated API's delegation, to the same user.
    let (mut delegation, _delete_delegation) = aggregated_api_rbac(&release, &ns.name).await;
    bind_to_user(&mut delegation, "operator", ns).await;
    // The authorizer's caches follow within moments; then the grants are exactly the chart's.
    let granted: Vec<_> = (cluster_rules().into_iter().map(|g| (g, None)))
        .chain(NAMESPACE_RULES.iter().map(|g| (*g, Some(ns.name.as_str()))))
        .chain(AUTHENTICATION_CONFIG_RULES.iter().map(|g| (*g, Some("kube-system"))))
        .collect();
    eventually(T, "the chart's roles to take effect", || async {
        all_allowed(&operator, &granted).await.then_some(())
    })
    .await;
    // … and nothing beyond them.
    for (grant, namespace) in [
        (("", "secrets", "delete", ""), Some(ns.name.as_str())),
        (("", "secrets", "create", ""), None),
        (("", "configmaps", "update", ""), None),
        (("opamp.dev", "agentconfigs", "update", ""), None),
        (("opamp.dev", "agentconfigs/status", "update", ""), None),
        (("events.k8s.io", "events", "delete", ""), None),
        (("", "events", "create", ""), None),
        (("coordination.k8s.io", "leases", "create", ""), Some("default")),
        (("coordination.k8s.io", "leases", "list", ""), Some("default")),
        (("coordination.k8s.io", "leases", "delete", ""), Some("default")),
        (("coordination.k8s.io", "leases", "list", ""), None),
        (("coordination.k8s.io", "leases", "deletecollection", ""), Some(ns.name.as_str())),
    ] {
        assert!(!allowed(&operator, grant, namespace).await, "{grant:?} in {namespace:?} is granted");
    }
    // Peers learn their own user (to accept their own tokens) with a SelfSubjectReview, which
    // every authenticated user may create (system:basic-user): the chart need not grant it.
    let whoami = ("authentication.k8s.io", "selfsubjectreviews", "create", "");
    assert!(allowed(&operator, whoami, None).await, "SelfSubjectReview is refused");

    // What the operator works with: a token (the harness's), a ConfigMap, an AgentConfig, a
    // CapabilitySlot.
    let token = tenants.token.clone();
    ns.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: otel}\ndata: {collector.yaml: 'receivers: {}'}\n---\n\
         apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {name: rbac}\nspec:\n  \
         capability: com.example.rbac\n  callback: {url: 'http://127.0.0.1:9/never'}\n",
    )
    .await
    .unwrap();
    ns.apply_yaml(&agent_config("rbac", "a")).await.unwrap();

    // The operator, as the `operator` user, with peers on as the chart runs it (the group is
    // the release's full name; the token a service account's, for the peer audience; the
    // accepted user that service account, as the chart's pods accept their own).
    let peer = common::peers::identity(&ns.name).await;
    let mut peers = common::peers::peers_config(&ns.name, IDENTITY, &peer);
    peers.group = full.clone();
    let started = std::time::Instant::now();
    let op = start_operator(operator.clone(), vec![ns.name.clone()], &ns.name, Some(peers)).await;
    eprintln!("operator ready as `operator` in {:?}", started.elapsed());
    let leases: Api<Lease> = ns.api();
    let holder = |lease: Option<Lease>| lease?.spec?.holder_identity;
    wait_for("the operator to hold the Lease", || async {
        (holder(leases.get_opt(LEASE).await.ok()?).as_deref() == Some(IDENTITY)).then_some(())
    })
    .await;
    // Its own Lease carries its peer address; the peer address takes the peer token (a
    // TokenReview, with the chart's ClusterRole) and refuses an agent's.
    let peer_addr = op.peer_addr.expect("a peer address");
    let member = format!("{full}-{IDENTITY}");
    let own = wait_for("the replica's own Lease with its peer address", || async {
        let lease = leases.get_opt(&member).await.ok()??;
        (lease.annotations().get(ADDRESS_ANNOTATION) == Some(&peer_addr.to_string())).then_some(lease)
    })
    .await;
    assert_eq!(own.labels().get(GROUP_LABEL), Some(&full));
    assert_eq!(own.spec.and_then(|s| s.holder_identity).as_deref(), Some(IDENTITY));
    let ping = |token: String| async move {
        let url = format!("http://{peer_addr}/peer/v1/ping");
        let resp = reqwest::Client::new().post(url).bearer_auth(token).send().await;
        resp.expect("the peer address answers").status().as_u16()
    };
    assert_eq!(ping(peer.token.clone()).await, 200, "the peer token");
    assert_eq!(ping(tenants.token.clone()).await, 403, "an agent's token");

    let mut spec = AgentSpec::new("rbac");
    spec.custom_capabilities = vec!["com.example.rbac".into()];
    let agent = RunningAgent::spawn(format!("ws://{}/v1/opamp", op.opamp_addr), Some(token), spec);

    // Status written (agentconfigs/status, capabilityslots/status: patch).
    let configs: Api<AgentConfig> = ns.api();
    let ready = |s: &AgentConfigStatus| {
        s.applied_agents == 1 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let wait_applied = |what: &'static str, not: Option<String>| {
        let configs = configs.clone();
        async move {
            wait_for(what, || async {
                let s = configs.get("rbac").await.ok()?.status?;
                (ready(&s) && s.config_hash != not).then_some(s)
            })
            .await
        }
    };
    let first = wait_applied("AgentConfig applied and Ready", None).await;
    assert_eq!(agent.effective("collector.yaml").as_deref(), Some("receivers: {}"));
    let slots: Api<CapabilitySlot> = ns.api();
    let slot_ready = |s: &CapabilitySlotStatus| {
        s.supporting_agents == 1 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    };
    wait_for("CapabilitySlot Ready with its agent", || async {
        slots.get("rbac").await.ok()?.status.filter(slot_ready)
    })
    .await;

    // Events (events.k8s.io: create) …
    let events: Api<KubeEvent> = ns.api();
    let ours = |e: &KubeEvent| {
        e.reporting_controller.as_deref() == Some("opamp-operator")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rbac")
    };
    wait_for("RolloutStarted and RolloutComplete events", || async {
        let list = events.list(&Default::default()).await.ok()?;
        let reasons: BTreeSet<String> =
            list.items.iter().filter(|e| ours(e)).filter_map(|e| e.reason.clone()).collect();
        (reasons.contains("RolloutStarted") && reasons.contains("RolloutComplete")).then_some(())
    })
    .await;
    // … and patch: the recorder patches an event that repeats (the same rollout again: A, B, A).
    ns.apply_yaml(&agent_config("rbac", "b")).await.unwrap();
    let second = wait_applied("the edit applied", first.config_hash.clone()).await;
    ns.apply_yaml(&agent_config("rbac", "a")).await.unwrap();
    let third = wait_applied("the first version again", second.config_hash.clone()).await;
    assert_eq!(third.config_hash, first.config_hash);
    let repeated = wait_for("a repeated event (patched series)", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| ours(e) && e.series.as_ref().is_some_and(|s| s.count >= 2))
    })
    .await;
    eprintln!("repeated event: {} {:?}", repeated.name_any(), repeated.reason);

    agent.stop().await;
    op.stop().await;
    // A replica that stops deletes the leader Lease it holds, and its own: nothing is left.
    assert_eq!(holder(leases.get_opt(LEASE).await.unwrap()), None, "the leader Lease is released");
    assert!(leases.get_opt(LEASE).await.unwrap().is_none(), "the leader Lease is deleted");
    wait_for("the replica's own Lease deleted", || async {
        leases.get_opt(&member).await.ok()?.is_none().then_some(())
    })
    .await;
    // Anything the API server refused shows up in the operator's log.
    let denied = denials();
    assert!(denied.is_empty(), "the operator was refused something:\n{}", denied.join("\n"));
    tenants.cleanup().await;
}

/// A client as `user`: the admin's credentials, impersonating a user no other test binds (the
/// API server authorizes each request as `user`, with only the group system:authenticated).
async fn client_impersonating(user: &str) -> Client {
    let mut config = cluster().await.config_for("admin").await;
    config.auth_info.impersonate = Some(user.to_owned());
    Client::try_from(config).expect("a kube client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_scoped_to_namespaces_runs_with_roles_there_only() {
    capture_logs();
    let cluster = cluster().await;
    // The release namespace and a second managed one; a third the operator does not manage.
    let home = TestNamespace::new("chart-scoped").await;
    let other = TestNamespace::new("chart-scoped-other").await;
    let outside = TestNamespace::new("chart-scoped-outside").await;
    install_crds(&home.client).await;
    let release = home.name.clone();
    let full = format!("{release}-opamp-operator");
    let user = format!("scoped-{release}");
    let operator = client_impersonating(&user).await;
    assert!(
        !allowed(&operator, ("", "secrets", "list", ""), Some(&other.name)).await,
        "{user} has rights already"
    );

    // The chart's RBAC for `namespaces={home,other}`, bound to `user`.
    let chart = chart_dir();
    let mut args: Vec<String> =
        ["template", &release, chart.to_str().unwrap(), "--namespace", &home.name].map(String::from).to_vec();
    args.extend(["--set".into(), format!("namespaces={{{},{}}}", home.name, other.name)]);
    for template in ["clusterrole", "clusterrolebinding", "role", "rolebinding", "namespace-rbac"] {
        args.extend(["--show-only".into(), format!("templates/{template}.yaml")]);
    }
    let mut rbac = Manifests::parse(&helm_async(args).await);
    assert_eq!(rbac.0.len(), 8, "{:?}", rbac.objects());
    let _delete = delete_on_drop(
        cluster.kubeconfig_path.clone(),
        vec![format!("clusterrole/{full}"), format!("clusterrolebinding/{full}")],
    );
    bind_to_user(&mut rbac, &user, &home).await;
    // The aggregated API's delegation, to the same user.
    let (mut delegation, _delete_delegation) = aggregated_api_rbac(&release, &home.name).await;
    bind_to_user(&mut delegation, &user, &home).await;
    let granted: Vec<_> = [home.name.as_str(), other.name.as_str()]
        .into_iter()
        .flat_map(|ns| NAMESPACED_RULES.iter().map(move |g| (*g, Some(ns))))
        .chain(REVIEW_RULES.iter().map(|g| (*g, None)))
        .chain(NAMESPACE_RULES.iter().map(|g| (*g, Some(home.name.as_str()))))
        .chain(AUTHENTICATION_CONFIG_RULES.iter().map(|g| (*g, Some("kube-system"))))
        .collect();
    eventually(T, "the chart's roles to take effect", || async {
        all_allowed(&operator, &granted).await.then_some(())
    })
    .await;
    // Leases only in the release namespace, not in the other managed one.
    for grant in NAMESPACE_RULES {
        assert!(
            !allowed(&operator, *grant, Some(&other.name)).await,
            "{grant:?} is granted in {}",
            other.name
        );
    }
    // Nothing on the namespaced resources cluster-wide, nor in a namespace it does not manage.
    for grant in NAMESPACED_RULES {
        assert!(!allowed(&operator, *grant, None).await, "{grant:?} is granted cluster-wide");
        assert!(
            !allowed(&operator, *grant, Some(&outside.name)).await,
            "{grant:?} is granted in {}",
            outside.name
        );
    }

    // A token and an AgentConfig in the second namespace; one outside.
    let token = format!("tok-{}", other.name);
    other
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: agents}}\ntype: opamp.dev/agent-token\n\
             stringData: {{token: {token}}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: otel}}\ndata: {{collector.yaml: 'receivers: {{}}'}}\n"
        ))
        .await
        .unwrap();
    other.apply_yaml(&agent_config("rbac", "a")).await.unwrap();
    outside.apply_yaml(&agent_config("rbac", "a")).await.unwrap();

    let op =
        start_operator(operator.clone(), vec![home.name.clone(), other.name.clone()], &home.name, None).await;
    let agent =
        RunningAgent::spawn(format!("ws://{}/v1/opamp", op.opamp_addr), Some(token), AgentSpec::new("rbac"));

    // Served, status written and Events recorded in the managed namespace …
    let configs: Api<AgentConfig> = other.api();
    wait_for("AgentConfig applied and Ready", || async {
        let s = configs.get("rbac").await.ok()?.status?;
        let ready = s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && s.applied_agents == 1).then_some(())
    })
    .await;
    assert_eq!(agent.effective("collector.yaml").as_deref(), Some("receivers: {}"));
    let events: Api<KubeEvent> = other.api();
    wait_for("a RolloutComplete event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reporting_controller.as_deref() == Some("opamp-operator")
                    && e.reason.as_deref() == Some("RolloutComplete")
            })
            .then_some(())
    })
    .await;
    // … and nothing outside it.
    let outside_status = outside.api::<AgentConfig>().get("rbac").await.unwrap().status;
    assert!(outside_status.is_none(), "{outside_status:?}");

    agent.stop().await;
    op.stop().await;
    let denied = denials();
    assert!(denied.is_empty(), "the operator was refused something:\n{}", denied.join("\n"));
    for ns in [home, other, outside] {
        ns.cleanup().await;
    }
}
