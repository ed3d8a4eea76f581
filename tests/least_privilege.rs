//! Least privilege for data, against a real kube-apiserver: the operator holds in full only the
//! agent-token Secrets and the ConfigMaps and Secrets that AgentConfigs and CapabilitySlots
//! reference (the others by their metadata only, `opamp_controller_cached_objects` tells), and
//! with `--namespaces` it reads nothing outside those namespaces (run as an identity whose RBAC
//! covers them only).
mod common;

use std::time::Duration;

use common::cluster::{TestNamespace, apply_yaml, cluster, tool};
use common::env::{TestEnv, token_secret};
use common::eventually;
use common::operator::test_config;
use common::simrun::RunningAgent;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use opamp_operator::api::AgentConfig;
use opamp_operator::fleet::AgentKey;
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::sim::AgentSpec;
use serde_yaml::Value;

const T: Duration = Duration::from_secs(60);

/// Unrelated objects of each kind, with data, in the managed namespace.
const UNRELATED: usize = 50;

/// The value of one sample of the operator's metrics, 0 when absent.
async fn metric(op: &Operator, sample: &str) -> f64 {
    let url = format!("http://{}/metrics", op.metrics_addr.expect("a metrics address"));
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// How many objects of `kind` the operator holds with `content` (`full` or `metadata`).
async fn cached(op: &Operator, kind: &str, content: &str) -> usize {
    metric(op, &format!("opamp_controller_cached_objects{{kind=\"{kind}\",content=\"{content}\"}}")).await
        as usize
}

/// The operator's failures of `category` so far.
async fn errors(op: &Operator, category: &str) -> f64 {
    metric(op, &format!("opamp_controller_errors_total{{category=\"{category}\"}}")).await
}

/// An AgentConfig `name` for agents of service `lp`, its file `file` read from `key` of the
/// ConfigMap `config_map`.
fn agent_config(name: &str, file: &str, config_map: &str, key: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: {name}}}\nspec:\n  \
         selector: {{matchAttributes: {{service.name: lp}}}}\n  files:\n    \
         {file}: {{configMapKeyRef: {{name: {config_map}, key: {key}}}}}\n"
    )
}

/// `n` Secrets and `n` ConfigMaps of 1 KiB that nothing references, in `ns`.
async fn unrelated_objects(ns: &TestNamespace, n: usize) {
    let filler = "x".repeat(1024);
    let (secrets, config_maps) = (ns.api::<Secret>(), ns.api::<ConfigMap>());
    for i in 0..n {
        let meta = |kind: &str| kube::api::ObjectMeta {
            name: Some(format!("unrelated-{kind}-{i}")),
            ..Default::default()
        };
        let secret = Secret {
            metadata: meta("secret"),
            string_data: Some([("data".to_owned(), filler.clone())].into()),
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &secret).await.unwrap();
        let cm = ConfigMap {
            metadata: meta("cm"),
            data: Some([("data".to_owned(), format!("unrelated: {i}"))].into()),
            ..Default::default()
        };
        config_maps.create(&PostParams::default(), &cm).await.unwrap();
    }
}

fn otel(body: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: otel}}\ndata: {{collector.yaml: '{body}'}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agent_tokens_and_referenced_objects_are_held_in_full() {
    let tenants = TestEnv::new("lp-held").deadline(T).prepare().await;
    let ns = &tenants.ns;
    unrelated_objects(ns, UNRELATED).await;
    tenants.apply(&otel("v: 1")).await;
    tenants.apply(&agent_config("lp", "collector.yaml", "otel", "collector.yaml")).await;

    let op =
        common::operator::start(OperatorConfig { namespaces: Some(tenants.names()), ..test_config() }).await;
    // Ready means the referenced ConfigMap is read: nothing else is held with its content.
    assert_eq!(cached(&op, "ConfigMap", "full").await, 1, "only the referenced ConfigMap");
    assert_eq!(cached(&op, "Secret", "full").await, 1, "only the agent token");
    assert!(cached(&op, "ConfigMap", "metadata").await > UNRELATED);
    assert!(cached(&op, "Secret", "metadata").await > UNRELATED);

    let url = format!("ws://{}/v1/opamp", op.opamp_addr);
    let agent = RunningAgent::spawn(url.clone(), Some(tenants.token.clone()), AgentSpec::new("lp"));
    eventually(T, "the agent runs the referenced ConfigMap's file", || async {
        (agent.effective("collector.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;

    // A change of the referenced ConfigMap reaches the agent (read again on its new version).
    tenants.apply(&otel("v: 2")).await;
    eventually(T, "the agent runs the ConfigMap's new version", || async {
        (agent.effective("collector.yaml").as_deref() == Some("v: 2")).then_some(())
    })
    .await;

    // A token Secret created later admits an agent.
    let later = format!("tok-later-{}", ns.name);
    tenants.apply(&token_secret("later", &later)).await;
    let second = RunningAgent::spawn(url.clone(), Some(later), AgentSpec::new("lp"));
    let key = AgentKey::new(ns.name.as_str(), second.uid);
    eventually(T, "the agent with the new token admitted", || async {
        op.fleet.agent(&key).is_some_and(|a| a.connected).then_some(())
    })
    .await;
    assert_eq!(cached(&op, "Secret", "full").await, 2, "the two agent tokens");

    // A new AgentConfig referencing an existing (unrelated until now) ConfigMap: read, then
    // planned: no ReferenceNotFound on the way, every selected agent gets the whole config.
    tenants.apply(&agent_config("more", "more.yaml", "unrelated-cm-7", "data")).await;
    tenants
        .status_where::<AgentConfig>("more", "applied by both agents", |s| {
            s.applied_agents == 2 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .await;
    for a in [&agent, &second] {
        assert_eq!(a.effective("more.yaml").as_deref(), Some("unrelated: 7"));
        assert_eq!(a.effective("collector.yaml").as_deref(), Some("v: 2"));
    }
    let events: Api<KubeEvent> = ns.api();
    let flapped: Vec<_> = (events.list(&Default::default()).await.unwrap().items.into_iter())
        .filter(|e| e.reason.as_deref() == Some("ReferenceNotFound"))
        .map(|e| e.note)
        .collect();
    assert!(flapped.is_empty(), "{flapped:?}");
    assert_eq!(cached(&op, "ConfigMap", "full").await, 2);

    // Nothing references it any more: its content is dropped.
    ns.api::<AgentConfig>().delete("more", &DeleteParams::default()).await.unwrap();
    eventually(T, "the unreferenced ConfigMap's content dropped", || async {
        (cached(&op, "ConfigMap", "full").await == 1).then_some(())
    })
    .await;
    eventually(T, "the agent without the removed file", || async {
        agent.effective("more.yaml").is_none().then_some(())
    })
    .await;
    assert_eq!(errors(&op, "read").await, 0.0);

    agent.stop().await;
    second.stop().await;
    op.stop().await;
    tenants.cleanup().await;
}

/// A client as `user`: the admin's credentials, impersonating a user no other test binds (the
/// API server authorizes each request as `user`, with only the group system:authenticated).
async fn client_impersonating(user: &str) -> Client {
    let mut config = cluster().await.config_for("admin").await;
    config.auth_info.impersonate = Some(user.to_owned());
    Client::try_from(config).expect("a kube client")
}

/// Binds the chart's Role for a release managing only `ns` (`namespaces={ns}`) to `user`;
/// `without_get`: less the `get` of ConfigMaps and Secrets (their targeted reads are refused).
async fn bind_namespace_role(ns: &TestNamespace, user: &str, without_get: bool) {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/opamp-operator");
    let out = tokio::process::Command::new(tool("helm"))
        .args(["template", &ns.name, chart.to_str().unwrap(), "--namespace", &ns.name])
        .args(["--set", &format!("namespaces={{{}}}", ns.name)])
        .args(["--show-only", "templates/namespace-rbac.yaml"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("helm runs");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8(out.stdout).unwrap();
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        use serde::Deserialize as _;
        let mut object = Value::deserialize(doc).unwrap();
        if object.is_null() {
            continue;
        }
        kinds.push(object["kind"].as_str().unwrap().to_owned());
        if object["kind"] == "Role" && without_get {
            for rule in object["rules"].as_sequence_mut().unwrap() {
                if rule["resources"].as_sequence().unwrap().iter().any(|r| r == "configmaps") {
                    rule["verbs"] = serde_yaml::from_str("[list, watch]").unwrap();
                }
            }
        }
        if object["kind"] == "RoleBinding" {
            object["subjects"] = serde_yaml::from_str(&format!(
                "[{{kind: User, name: {user}, apiGroup: rbac.authorization.k8s.io}}]"
            ))
            .unwrap();
        }
        apply_yaml(&ns.client, Some(&ns.name), &serde_yaml::to_string(&object).unwrap()).await.unwrap();
    }
    assert_eq!(kinds, ["Role", "RoleBinding"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_namespaces_nothing_outside_them_is_read() {
    let tenants = TestEnv::new("lp-scoped").deadline(T).prepare().await;
    let ns = &tenants.ns;
    // Another namespace with a token, a ConfigMap and an AgentConfig of its own.
    let outside = TestNamespace::new("lp-outside").await;
    let outside_token = format!("tok-{}", outside.name);
    outside.apply_yaml(&token_secret("agents", &outside_token)).await.unwrap();
    outside.apply_yaml(&otel("outside: true")).await.unwrap();
    outside.apply_yaml(&agent_config("lp", "collector.yaml", "otel", "collector.yaml")).await.unwrap();
    unrelated_objects(&outside, 5).await;

    let user = format!("lp-{}", ns.name);
    let client = client_impersonating(&user).await;
    bind_namespace_role(ns, &user, false).await;
    let (mine, theirs) =
        (Api::<Secret>::namespaced(client.clone(), &ns.name), Api::<Secret>::all(client.clone()));
    eventually(T, "the Role to take effect", || async { mine.list(&Default::default()).await.ok() }).await;
    // The identity can read nothing outside the namespace: had the operator tried, it would
    // never be ready, or count the refusals.
    assert!(theirs.list(&Default::default()).await.is_err(), "{user} may list Secrets cluster-wide");
    let there = Api::<ConfigMap>::namespaced(client.clone(), &outside.name);
    assert!(there.get("otel").await.is_err(), "{user} may read ConfigMaps in {}", outside.name);

    unrelated_objects(ns, 5).await;
    tenants.apply(&otel("v: 1")).await;
    tenants.apply(&agent_config("lp", "collector.yaml", "otel", "collector.yaml")).await;
    let config = OperatorConfig { namespaces: Some(vec![ns.name.clone()]), ..test_config() };
    let op = common::operator::start_as(client, config).await;
    assert_eq!(cached(&op, "ConfigMap", "full").await, 1);
    assert_eq!(cached(&op, "Secret", "full").await, 1);

    let url = format!("ws://{}/v1/opamp", op.opamp_addr);
    let agent = RunningAgent::spawn(url.clone(), Some(tenants.token.clone()), AgentSpec::new("lp"));
    eventually(T, "the agent runs the referenced ConfigMap's file", || async {
        (agent.effective("collector.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    tenants
        .status_where::<AgentConfig>("lp", "applied", |s| {
            s.applied_agents == 1 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .await;
    // The other namespace's token is unknown here, and its AgentConfig untouched.
    let stranger = RunningAgent::spawn(url, Some(outside_token), AgentSpec::new("lp"));
    tenants.apply(&otel("v: 2")).await;
    eventually(T, "the agent runs the ConfigMap's new version", || async {
        (agent.effective("collector.yaml").as_deref() == Some("v: 2")).then_some(())
    })
    .await;
    assert_eq!(op.fleet.connected_count(), 1, "only the managed namespace's agent");
    assert!(stranger.effective("collector.yaml").is_none());
    let status = outside.api::<AgentConfig>().get("lp").await.unwrap().status;
    assert!(status.is_none(), "{status:?}");
    for category in ["watch", "read", "event", "patch"] {
        assert_eq!(errors(&op, category).await, 0.0, "{category} errors");
    }

    stranger.stop().await;
    agent.stop().await;
    op.stop().await;
    outside.cleanup().await;
    tenants.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_read_is_counted_and_retried_until_it_succeeds() {
    let tenants = TestEnv::new("lp-refused").deadline(T).prepare().await;
    let ns = &tenants.ns;
    let user = format!("lp-{}", ns.name);
    let client = client_impersonating(&user).await;
    // The chart's Role less `get` on ConfigMaps and Secrets: the watches work, the reads not.
    bind_namespace_role(ns, &user, true).await;
    let (secrets, config_maps) = (
        Api::<Secret>::namespaced(client.clone(), &ns.name),
        Api::<ConfigMap>::namespaced(client.clone(), &ns.name),
    );
    eventually(T, "the Role to take effect", || async { secrets.list(&Default::default()).await.ok() }).await;
    tenants.apply(&otel("v: 1")).await;
    assert!(config_maps.get("otel").await.is_err(), "{user} may get ConfigMaps");
    tenants.apply(&agent_config("lp", "collector.yaml", "otel", "collector.yaml")).await;

    // Ready all the same (the first read was answered, with a refusal), nothing held in full
    // but the token, the failure counted, and tried again.
    let config = OperatorConfig { namespaces: Some(vec![ns.name.clone()]), ..test_config() };
    let op = common::operator::start_as(client, config).await;
    assert_eq!(cached(&op, "ConfigMap", "full").await, 0);
    eventually(T, "the refused read counted, then retried", || async {
        (errors(&op, "read").await >= 2.0).then_some(())
    })
    .await;
    let url = format!("ws://{}/v1/opamp", op.opamp_addr);
    let agent = RunningAgent::spawn(url, Some(tenants.token.clone()), AgentSpec::new("lp"));
    let key = AgentKey::new(ns.name.as_str(), agent.uid);
    eventually(T, "the agent connected", || async {
        op.fleet.agent(&key).is_some_and(|a| a.connected).then_some(())
    })
    .await;
    assert!(agent.effective("collector.yaml").is_none(), "no config before the ConfigMap is read");

    // Granted: a retry reads it, and the agent gets its config.
    bind_namespace_role(ns, &user, false).await;
    eventually(T, "the agent runs the ConfigMap's file once it can be read", || async {
        (agent.effective("collector.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    assert_eq!(cached(&op, "ConfigMap", "full").await, 1);
    tenants
        .status_where::<AgentConfig>("lp", "applied", |s| {
            s.applied_agents == 1 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .await;

    agent.stop().await;
    op.stop().await;
    tenants.cleanup().await;
}
