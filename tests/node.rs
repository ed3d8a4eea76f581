//! The chart for real: `helm install` on a node (kubelet, containerd, runc; `local-cluster up
//! --node`) with the image `make image` built. The operator pod becomes Ready through the chart's
//! probes, as a non-root user on a read-only root file system with its service-account token; an
//! opamp-go agent connects and gets its config; `kubectl get agents` lists it through the
//! aggregated API; `helm upgrade` with a changed value rolls the pod and the agent reconnects
//! without being re-sent its config; `helm uninstall` leaves nothing behind but the CRDs.
//!
//! Ignored in `cargo test`: `make test-node` brings the node up, loads the image and runs it
//! (`--ignored`) inside the node's network namespace, where 127.0.0.1 is the node's loopback.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::{TestNamespace, cluster, tool};
use common::env::token_secret;
use common::eventually;
use common::goagent::GoAgent;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::discovery::{Discovery, Scope, verbs};
use opamp_operator::api::AgentConfig;
use serde_json::Value;

const T: Duration = Duration::from_secs(180);
const RELEASE: &str = "opamp";
const LABEL: &str = "app.kubernetes.io/instance=opamp";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `make image`'s image, split into repository and tag.
fn image() -> (String, String) {
    let file = repo().join("target/image/name");
    let name = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make image` first", file.display()));
    let (repository, tag) = name.trim().rsplit_once(':').expect("image name with a tag");
    (repository.to_string(), tag.to_string())
}

/// Runs a command, panicking with its output unless it exits 0; returns stdout.
fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("HELM_CACHE_HOME", helm_home().join("cache"))
        .env("HELM_CONFIG_HOME", helm_home().join("config"))
        .env("HELM_DATA_HOME", helm_home().join("data"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm_home() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-node")
}

/// The operator's pods, Ready or not.
async fn pods(api: &Api<Pod>) -> Vec<Pod> {
    api.list(&ListParams::default().labels(LABEL)).await.map(|l| l.items).unwrap_or_default()
}

fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits for exactly one operator pod, Ready, and none other (an old one terminated); returns
/// its uid. On timeout, says what the pods, their events and the operator's log show.
async fn one_ready_pod(api: &Api<Pod>, namespace: &str, not: Option<&str>) -> String {
    let found = common::poll_until(T, || async {
        let pods = pods(api).await;
        match pods.as_slice() {
            [pod] if ready(pod) && pod.uid().as_deref() != not => Ok(pod.uid().unwrap()),
            _ => Err(pods),
        }
    })
    .await;
    found.unwrap_or_else(|pods| {
        let kubectl = tool("kubectl");
        let kubeconfig = cluster_kubeconfig();
        let describe = Command::new(&kubectl)
            .args(["--kubeconfig", &kubeconfig, "-n", namespace, "describe", "pods", "-l", LABEL])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let logs = Command::new(&kubectl)
            .args(["--kubeconfig", &kubeconfig, "-n", namespace, "logs", "-l", LABEL, "--tail", "40"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!("no single Ready operator pod after {T:?} ({} pods):\n{describe}\nlogs:\n{logs}", pods.len())
    })
}

fn cluster_kubeconfig() -> String {
    std::env::var("KUBECONFIG").ok().filter(|k| !k.is_empty()).unwrap_or_else(|| {
        let env = run(&repo().join("tests/tools/local-cluster"), &["env"]);
        env.lines()
            .find_map(|l| l.strip_prefix("KUBECONFIG="))
            .expect("KUBECONFIG in cluster.env")
            .to_string()
    })
}

/// The operator's process on this node (the test shares the node's process view): its uid and
/// whether its root file system is mounted read-only.
fn operator_process() -> Option<(u32, bool)> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first() != Some(&&b"/opamp-operator"[..]) || args.get(1) != Some(&&b"run"[..]) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        let uid =
            status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()?;
        let mountinfo = std::fs::read_to_string(entry.path().join("mountinfo")).ok()?;
        // "<id> <parent> <dev> <root> <mount point> <options> ...": the line of "/".
        let root_ro = mountinfo.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(4) == Some(&"/") && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))
        });
        return Some((uid, root_ro));
    }
    None
}

/// `kubectl get agent <uid> -n <ns> -o json`, through the aggregated API.
fn agent_object(kubeconfig: &str, namespace: &str, uid: &str) -> Option<Value> {
    let out = Command::new(tool("kubectl"))
        .args([
            "--kubeconfig",
            kubeconfig,
            "-n",
            namespace,
            "get",
            "agents.fleet.opamp.dev",
            uid,
            "-o",
            "json",
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

#[tokio::test]
#[ignore = "needs a node: `make test-node`"]
async fn the_chart_runs_on_a_node_rolls_without_resending_configs_and_uninstalls_cleanly() {
    let info = cluster().await;
    let client = info.client().await;
    let kubeconfig = info.kubeconfig_path.to_string_lossy().into_owned();
    let operator_ns = TestNamespace::new("node-operator").await;
    let tenant = TestNamespace::new("node-tenant").await;
    let (repository, tag) = image();
    let api_port = info.server.rsplit(':').next().unwrap().to_string();

    // Host network (there is no pod network here), one replica that is replaced in place on
    // upgrade (its ports are on the node), and the API server at the node's loopback: there is
    // no kube-proxy to route the `kubernetes` Service's address.
    let values = helm_home().join(format!("values-{}.yaml", operator_ns.name));
    std::fs::create_dir_all(helm_home()).unwrap();
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\nreplicas: 1\n\
             hostNetwork: true\nstrategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 0, maxUnavailable: 1}}}}\n\
             extraEnv:\n- {{name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1}}\n\
             - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n"
        ),
    )
    .unwrap();
    let chart = repo().join("charts/opamp-operator");
    let (helm, ns) = (tool("helm"), operator_ns.name.as_str());
    let values = values.to_string_lossy().into_owned();
    run(
        &helm,
        &["install", RELEASE, chart.to_str().unwrap(), "--kubeconfig", &kubeconfig, "-n", ns, "-f", &values],
    );

    // 1. Ready through the chart's probes, as the chart's security context says.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let first = one_ready_pod(&pods_api, ns, None).await;
    let (uid, root_ro) = operator_process().expect("the operator's process runs on this node");
    assert_eq!(uid, 65532, "the operator runs as the chart's non-root user");
    assert!(root_ro, "the operator's root file system is read-only");
    let pod = pods_api.get(&pods(&pods_api).await[0].name_any()).await.unwrap();
    let spec = pod.spec.unwrap();
    assert!(
        spec.volumes
            .unwrap_or_default()
            .iter()
            .any(|v| v.projected.is_some() && v.name.starts_with("kube-api-access")),
        "the pod has its service-account token"
    );

    // The Leases the pod holds (the leader's, its own) are owned by it: they go with it, even when
    // `helm uninstall` has taken the pod's right to delete them.
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    eventually(T, "two Leases owned by the pod", || async {
        let list = leases.list(&ListParams::default()).await.ok()?.items;
        let owned =
            list.iter().filter(|l| l.owner_references().iter().any(|o| o.kind == "Pod" && o.uid == first));
        (owned.count() == 2).then_some(())
    })
    .await;

    // 2. An agent with a token connects to the pod and gets its config.
    let token = "node-agent-token-0123456789abcdef";
    tenant.apply_yaml(&token_secret("agents", token)).await.unwrap();
    tenant
        .apply_yaml(
            "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {name: node}\nspec:\n  \
             selector: {matchAttributes: {service.name: node-agent}}\n  files:\n    \
             agent.yaml: {contentType: text/yaml, inline: \"receivers: {otlp: {}}\"}\n",
        )
        .await
        .unwrap();
    let agent_uid = uuid::Uuid::now_v7().to_string();
    let mut agent = GoAgent::spawn(&[
        "-url",
        "ws://127.0.0.1:4320/v1/opamp",
        "-token",
        token,
        "-uid",
        &agent_uid,
        "-heartbeat",
        "1s",
        "-attr",
        "service.name=node-agent",
    ]);
    agent.wait_event(T, "connected").await;
    let config = agent.wait_event(T, "remote_config").await;
    eprintln!("config received: {config}");
    let configs: Api<AgentConfig> = Api::namespaced(client.clone(), &tenant.name);
    eventually(T, "AgentConfig status: 1 agent applied", || async {
        let status = configs.get("node").await.ok()?.status?;
        (status.applied_agents == 1).then_some(())
    })
    .await;

    // 3. kubectl sees the agent through the aggregated API, served by the pod.
    let seen = eventually(T, "kubectl get agent: connected, config applied", || async {
        let agent = agent_object(&kubeconfig, &tenant.name, &agent_uid)?;
        (agent["status"]["connected"] == true && agent["status"]["config"]["status"] == "APPLIED")
            .then_some(agent)
    })
    .await;
    eprintln!("kubectl get agent: {}", seen["status"]);

    // 4. An upgrade that changes a value rolls the pod; the agent reconnects to the new one and
    //    is not sent its config again: it already runs it.
    let before = agent.count("remote_config") + agent.count("remote_config_duplicate");
    let connects = agent.count("connected");
    run(
        &helm,
        &[
            "upgrade",
            RELEASE,
            chart.to_str().unwrap(),
            "--kubeconfig",
            &kubeconfig,
            "-n",
            ns,
            "-f",
            &values,
            "--set",
            "log.level=debug",
        ],
    );
    let second = one_ready_pod(&pods_api, ns, Some(&first)).await;
    assert_ne!(first, second, "the upgrade replaced the pod");
    // (Events up to the upgrade were drained by `count`: the next `connected` is the new pod.)
    agent.wait_event(T, "connected").await;
    assert!(agent.count("connected") > connects);
    // The new pod knows the agent as connected and applied…
    eventually(T, "the new pod lists the agent connected and applied", || async {
        let agent = agent_object(&kubeconfig, &tenant.name, &agent_uid)?;
        (agent["status"]["connected"] == true && agent["status"]["config"]["status"] == "APPLIED")
            .then_some(())
    })
    .await;
    // …and a few heartbeats later has still not sent the config again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.drain();
    let after = agent.count("remote_config") + agent.count("remote_config_duplicate");
    assert_eq!(after, before, "the agent was sent its config again after the rollout: {:#?}", agent.events);
    agent.stop().await;

    // 5. Uninstall: nothing of the release is left but the CRDs, in its namespace or the cluster.
    run(&helm, &["uninstall", RELEASE, "--kubeconfig", &kubeconfig, "-n", ns, "--wait", "--timeout", "3m"]);
    let discovery = Discovery::new(client.clone()).run().await.expect("discovery");
    let listable: Vec<(ApiResource, Scope)> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .filter(|(_, caps)| caps.supports_operation(verbs::LIST))
        .map(|(ar, caps)| (ar, caps.scope))
        .collect();
    let left = common::poll_until(T, || async {
        let mut left = BTreeSet::new();
        for (ar, scope) in &listable {
            let api: Api<DynamicObject> = match scope {
                Scope::Namespaced => Api::namespaced_with(client.clone(), ns, ar),
                Scope::Cluster => Api::all_with(client.clone(), ar),
            };
            let Ok(list) = api.list(&ListParams::default()).await else { continue };
            for o in list.items {
                if leftover(ar, scope, &o, ns) {
                    left.insert(format!("{}/{}", ar.plural, o.name_any()));
                }
            }
        }
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    if let Err(left) = left {
        panic!("helm uninstall left these behind: {left:#?}");
    }
    assert!(operator_process().is_none(), "the operator's process is gone");
    for crd in ["agentconfigs.opamp.dev", "capabilityslots.opamp.dev"] {
        let crds: Api<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        > = Api::all(client.clone());
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "the CRD {crd} stays (Helm never deletes CRDs)");
    }
    tenant.cleanup().await;
    operator_ns.cleanup().await;
}

/// Whether `o` is something of the release left behind: anything in its namespace but what
/// Kubernetes puts in every namespace (the default ServiceAccount, kube-root-ca.crt) and Events;
/// cluster-wide, anything labelled with the release or named after it.
fn leftover(ar: &ApiResource, scope: &Scope, o: &DynamicObject, namespace: &str) -> bool {
    let name = o.name_any();
    match scope {
        Scope::Namespaced => {
            o.namespace().as_deref() == Some(namespace)
                && !(ar.kind == "Event"
                    || (ar.kind == "ServiceAccount" && name == "default")
                    || (ar.kind == "ConfigMap" && name == "kube-root-ca.crt"))
        }
        Scope::Cluster => {
            let labelled = o.labels().get("app.kubernetes.io/instance").is_some_and(|i| i == RELEASE)
                && o.labels().get("app.kubernetes.io/name").is_some_and(|n| n == "opamp-operator");
            labelled || ar.kind == "APIService" && name == "v1alpha1.fleet.opamp.dev"
        }
    }
}
