//! The operator's watches against a real kube-apiserver: a stored custom resource that no
//! longer deserializes (stored while the CRD allowed it) is reported and skipped, and the watch
//! goes on.
//!
//! The test swaps the cluster's CRDs for permissive ones for a moment: it runs in a binary of
//! its own, so that no other test sees the CRDs without their validation.
mod common;

use std::time::Duration;

use common::cluster::{FIELD_MANAGER, TestNamespace, install_crds};
use common::eventually;
use common::simrun::RunningAgent;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use opamp_operator::api::{AgentConfig, AgentConfigStatus, CapabilitySlot};
use opamp_operator::sim::AgentSpec;

const T: Duration = Duration::from_secs(30);

fn agent_config(name: &str, file: &str, body: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: {name}}}\nspec:\n  \
         selector: {{matchAttributes: {{service.name: watches}}}}\n  files:\n    \
         {file}: {{contentType: text/yaml, inline: \"{body}\"}}\n"
    )
}

/// An AgentConfig whose priority is a string: the operator's type wants an integer.
fn bad_agent_config(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "opamp.dev/v1alpha1",
        "kind": "AgentConfig",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchAttributes": {"service.name": "watches"}},
            "priority": "high",
            "files": {"bad.yaml": {"inline": "once fixed"}},
        },
    })
}

/// A CapabilitySlot whose callback timeout is a string.
fn bad_slot(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "opamp.dev/v1alpha1",
        "kind": "CapabilitySlot",
        "metadata": {"name": name},
        "spec": {
            "capability": "com.example.watches",
            "callback": {"url": "http://127.0.0.1:9/never", "timeoutSeconds": "soon"},
        },
    })
}

fn api_of<K: Resource<DynamicType = ()>>(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<K>(&()))
}

/// Whether the API server accepts `object` now (a dry run).
async fn accepted<K: Resource<DynamicType = ()>>(
    client: &Client,
    ns: &str,
    object: &serde_json::Value,
) -> bool {
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let params = PostParams { dry_run: true, ..Default::default() };
    api_of::<K>(client, ns).create(&params, &object).await.is_ok()
}

/// Stores objects that do not deserialize, the way they come about: the CRDs allowed them
/// when they were written. Swaps our CRDs for ones that take any spec, creates the objects,
/// and puts the real CRDs back (waiting until the API server refuses such objects again).
async fn store_invalid(ns: &TestNamespace, configs: &[serde_json::Value], slots: &[serde_json::Value]) {
    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for name in ["agentconfigs.opamp.dev", "capabilityslots.opamp.dev"] {
        let mut crd = serde_json::to_value(crds.get(name).await.unwrap()).unwrap();
        for version in crd["spec"]["versions"].as_array_mut().unwrap() {
            version["schema"]["openAPIV3Schema"]["properties"]["spec"] =
                serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        }
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": crd["spec"],
        });
        crds.patch(name, &params, &Patch::Apply(&crd)).await.unwrap();
    }
    let create = |api: Api<DynamicObject>, object: &serde_json::Value| {
        let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
        async move { api.create(&PostParams::default(), &object).await.unwrap() }
    };
    for object in configs {
        eventually(T, "the permissive AgentConfig CRD in effect", || async {
            accepted::<AgentConfig>(&ns.client, &ns.name, object).await.then_some(())
        })
        .await;
        create(api_of::<AgentConfig>(&ns.client, &ns.name), object).await;
    }
    for object in slots {
        eventually(T, "the permissive CapabilitySlot CRD in effect", || async {
            accepted::<CapabilitySlot>(&ns.client, &ns.name, object).await.then_some(())
        })
        .await;
        create(api_of::<CapabilitySlot>(&ns.client, &ns.name), object).await;
    }
    install_crds(&ns.client).await;
    let (config, slot) = (bad_agent_config("probe"), bad_slot("probe"));
    eventually(T, "the real CRDs in effect again", || async {
        let refused = !accepted::<AgentConfig>(&ns.client, &ns.name, &config).await
            && !accepted::<CapabilitySlot>(&ns.client, &ns.name, &slot).await;
        refused.then_some(())
    })
    .await;
}

/// `opamp_controller_errors_total{category="<category>"}` on the operator's metrics endpoint.
async fn errors_counted(metrics: &str, category: &str) -> u64 {
    let text = reqwest::get(metrics).await.expect("metrics").text().await.unwrap();
    let series = format!("opamp_controller_errors_total{{category=\"{category}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.parse().unwrap())
}

/// Warning Events with `reason` about the object `name` of `kind`, from the operator.
async fn warnings(ns: &TestNamespace, kind: &str, name: &str, reason: &str) -> Vec<KubeEvent> {
    let events: Api<KubeEvent> = ns.api();
    let list = events.list(&Default::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| {
            let regarding = e.regarding.as_ref();
            e.reporting_controller.as_deref() == Some("opamp-operator")
                && e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && regarding.and_then(|r| r.kind.as_deref()) == Some(kind)
                && regarding.and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

async fn applied(ns: &TestNamespace, name: &str, what: &str) -> AgentConfigStatus {
    let api = ns.api::<AgentConfig>();
    eventually(T, what, || async {
        let s = api.get(name).await.ok()?.status?;
        let ready = s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && s.applied_agents == 1).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_object_that_does_not_deserialize_is_reported_and_skipped() {
    let ns = TestNamespace::new("watch-invalid").await;
    install_crds(&ns.client).await;
    ns.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: agents}}\ntype: opamp.dev/agent-token\n\
         stringData: {{token: tok-{}}}\n",
        ns.name
    ))
    .await
    .unwrap();
    ns.apply_yaml(&agent_config("first", "first.yaml", "one")).await.unwrap();
    // Stored before the operator starts: it meets them in its first list.
    store_invalid(&ns, &[bad_agent_config("broken")], &[bad_slot("broken-slot")]).await;

    let config = opamp_operator::operator::OperatorConfig {
        namespaces: Some(vec![ns.name.clone()]),
        ..common::operator::test_config()
    };
    let op = common::operator::start(config).await;
    let metrics = format!("http://{}/metrics", op.metrics_addr.expect("a metrics address"));
    let agent = RunningAgent::spawn(
        format!("ws://{}/v1/opamp", op.opamp_addr),
        Some(format!("tok-{}", ns.name)),
        AgentSpec::new("watches"),
    );

    // The valid config is served and its status written …
    applied(&ns, "first", "the valid AgentConfig applied and Ready").await;
    assert_eq!(agent.effective("first.yaml").as_deref(), Some("one"));
    assert_eq!(agent.effective("bad.yaml"), None, "nothing of the invalid one is sent");
    // … the invalid ones are told about, on themselves, and counted.
    for (kind, name) in [("AgentConfig", "broken"), ("CapabilitySlot", "broken-slot")] {
        let event = eventually(T, &format!("a Warning Event InvalidObject on {kind} {name}"), || async {
            warnings(&ns, kind, name, "InvalidObject").await.into_iter().next()
        })
        .await;
        let note = event.note.unwrap_or_default();
        assert!(note.contains(&format!("{kind} {}/{name} cannot be read", ns.name)), "{note}");
        assert_eq!(event.action.as_deref(), Some("Read"));
    }
    let counted = errors_counted(&metrics, "invalid-object").await;
    assert!(counted >= 2, "{counted} invalid objects counted");
    let stored = api_of::<AgentConfig>(&ns.client, &ns.name).get("broken").await.unwrap();
    assert!(
        stored.data.get("status").is_none(),
        "no status is written to an object the operator cannot read"
    );

    // One more while the operator runs: the watch reports it and goes on.
    store_invalid(&ns, &[bad_agent_config("broken-later")], &[]).await;
    eventually(T, "a Warning Event InvalidObject on broken-later", || async {
        warnings(&ns, "AgentConfig", "broken-later", "InvalidObject").await.into_iter().next()
    })
    .await;
    eventually(T, "the invalid objects counted", || async {
        (errors_counted(&metrics, "invalid-object").await > counted).then_some(())
    })
    .await;
    // New and edited configs are still seen and served.
    ns.apply_yaml(&agent_config("second", "second.yaml", "two")).await.unwrap();
    ns.apply_yaml(&agent_config("first", "first.yaml", "one again")).await.unwrap();
    applied(&ns, "second", "a config created after the invalid ones applied").await;
    eventually(T, "both configs on the agent", || async {
        let files = (agent.effective("first.yaml"), agent.effective("second.yaml"));
        (files == (Some("one again".into()), Some("two".into()))).then_some(())
    })
    .await;
    let first = applied(&ns, "first", "the edit applied").await;
    assert_eq!(first.observed_generation, Some(2));

    // Fixed (its priority an integer): served like any other.
    let fix = serde_json::json!({"spec": {"priority": 0}});
    let params = PatchParams::default();
    api_of::<AgentConfig>(&ns.client, &ns.name).patch("broken", &params, &Patch::Merge(&fix)).await.unwrap();
    applied(&ns, "broken", "the fixed AgentConfig applied").await;
    eventually(T, "the fixed config's file on the agent", || async {
        (agent.effective("bad.yaml").as_deref() == Some("once fixed")).then_some(())
    })
    .await;
    for name in ["first", "second"] {
        let events = warnings(&ns, "AgentConfig", name, "InvalidObject").await;
        assert!(events.is_empty(), "{name} is valid and told otherwise: {events:?}");
    }

    agent.stop().await;
    op.stop().await;
    ns.cleanup().await;
}
