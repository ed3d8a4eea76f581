//! The OpenTelemetry collector under `opampsupervisor`, end to end on the local control plane:
//! the supervisor connects over WebSocket and HTTP and reports what the collector is; an
//! AgentConfig's collector config reaches the collector, which restarts with it (APPLIED); a
//! broken config ends FAILED with the collector's own error; health changes show in the
//! status; and a CapabilitySlot carries the custom messages of our test extension
//! (`tests/interop/otelcol/echoextension`, registered through the collector's
//! `opampcustommessages` registry) to a callback, and dispatched messages to the extension and
//! back. Everything is built by `make tools-otel` (collector and supervisor v0.149.0).
mod common;

use std::time::Duration;

use common::callback::{CallbackServer, b64encode};
use common::env::{TestEnv, TestEnvBuilder};
use common::supervisor::Supervisor;
use common::{eventually, poll_until, within};
use opamp_operator::api::{AgentConfig, AgentConfigStatus};
use opamp_operator::fleet::AgentSnapshot;
use opamp_operator::operator::OperatorConfig;
use opamp_operator::proto::{AvailableComponents, any_value};
use opamp_operator::protocol::Transport;
use serde_json::{Value, json};

/// Collectors start, restart and validate configs: generous, and only ever the upper bound.
const T: Duration = Duration::from_secs(60);
/// The `service.name` our collector reports (its build's name).
const SERVICE: &str = "otelcol-opamp-test";
/// The custom capability of the test extension.
const ECHO: &str = "io.opamp-operator.test.echo";
const DISPATCH_TOKEN: &str = "dispatch-token-for-the-echo-slot";

/// The harness's environment (one at a time: each test starts collectors and an operator, and
/// the machine has few cores), with the collectors' helpers.
struct Env(TestEnv);

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.0
    }
}

impl Env {
    async fn new(prefix: &str) -> Env {
        Self::start(TestEnv::new(prefix)).await
    }

    async fn start(builder: TestEnvBuilder) -> Env {
        Env(builder.deadline(T).start().await)
    }

    fn supervisor(&self, transport: Transport) -> Supervisor {
        let url = if transport == Transport::WebSocket { self.ws_url() } else { self.http_url() };
        Supervisor::spawn(&url, &self.token)
    }

    /// Waits until the namespace's one agent satisfies `pred`; on timeout shows the agents and
    /// the supervisor's and collector's logs.
    async fn agent_where(
        &self,
        sup: &Supervisor,
        what: &str,
        pred: impl Fn(&AgentSnapshot) -> bool,
    ) -> AgentSnapshot {
        poll_until(T, || async {
            let mut agents: Vec<_> =
                self.op.fleet.agents().into_iter().filter(|a| a.namespace == self.ns.name).collect();
            match agents.as_slice() {
                [agent] if pred(agent) => Ok(agents.remove(0)),
                _ => Err(agents),
            }
        })
        .await
        .unwrap_or_else(|agents| {
            panic!(
                "timed out after {T:?} waiting for the collector: {what}; agents: {agents:#?}\n{}",
                sup.logs()
            )
        })
    }

    /// Waits until the AgentConfig's status satisfies `pred`; on timeout shows the supervisor's
    /// and collector's logs too.
    async fn status_where(
        &self,
        sup: &Supervisor,
        name: &str,
        what: &str,
        pred: impl Fn(&AgentConfigStatus) -> bool,
    ) -> AgentConfigStatus {
        self.0.status_where_or::<AgentConfig>(name, what, pred, || sup.logs()).await
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// An AgentConfig giving every collector of the namespace `collector.yaml`.
fn agent_config(name: &str, collector_yaml: &str) -> String {
    let body: String = collector_yaml.lines().map(|l| format!("        {l}\n")).collect();
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: {name}}}\nspec:\n  selector:\n    matchAttributes: {{service.name: {SERVICE}}}\n  files:\n    collector.yaml:\n      contentType: text/yaml\n      inline: |\n{body}"
    )
}

/// A collector config: OTLP in (ports chosen by the OS unless given), debug out, and the echo
/// extension. The supervisor adds its own `opamp` extension, which the echo extension uses.
fn collector(grpc: &str, exporter: &str) -> String {
    format!(
        r#"receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {grpc}
exporters:
  {exporter}:
    verbosity: basic
extensions:
  opampecho: {{}}
service:
  extensions: [opampecho]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [{exporter}]
"#
    )
}

fn string_attr(agent: &AgentSnapshot, key: &str) -> Option<String> {
    let desc = agent.report.description.as_ref()?;
    desc.identifying_attributes
        .iter()
        .chain(&desc.non_identifying_attributes)
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

/// `kind` → component names (`receivers` → [`otlp`], …) of an AvailableComponents report.
fn components(available: &AvailableComponents, kind: &str) -> Vec<String> {
    let mut names: Vec<String> = available
        .components
        .get(kind)
        .map(|d| d.sub_component_map.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The text of the collector's effective config (all files).
fn effective(agent: &AgentSnapshot) -> String {
    let Some(map) = agent.report.effective_config.as_ref().and_then(|e| e.config_map.as_ref()) else {
        return String::new();
    };
    map.config_map
        .values()
        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn websocket_collector_reports_itself_applies_its_config_and_reports_a_broken_one_failed() {
    let env = Env::new("otel-ws").await;
    let mut sup = env.supervisor(Transport::WebSocket);

    // What the supervisor reports before any config: who the collector is, that it is healthy,
    // what it runs, and what it is built of.
    let agent = env
        .agent_where(&sup, "connected with description, health, effective config and components", |a| {
            a.transport == Some(Transport::WebSocket)
                && a.report.health.as_ref().is_some_and(|h| h.healthy)
                && a.report.effective_config.is_some()
                && a.report.available_components.as_ref().is_some_and(|c| !c.components.is_empty())
        })
        .await;
    assert_eq!(string_attr(&agent, "service.name").as_deref(), Some(SERVICE));
    assert!(string_attr(&agent, "service.version").is_some_and(|v| v.contains("0.149.0")), "{agent:#?}");
    let available = agent.report.available_components.as_ref().unwrap();
    assert_eq!(components(available, "receivers"), ["nop", "otlp"]);
    assert_eq!(components(available, "exporters"), ["debug", "nop"]);
    assert_eq!(components(available, "extensions"), ["opamp", "opampecho"]);

    // A collector config reaches the collector, which restarts with it.
    env.apply(&agent_config("collectors", &collector("127.0.0.1:0", "debug"))).await;
    let status = env
        .status_where(&sup, "collectors", "the collector applied it", |s| {
            s.selected_agents == 1 && s.applied_agents == 1
        })
        .await;
    assert_eq!((status.failed_agents, status.unhealthy_agents), (0, 0), "{status:#?}");
    let agent = env.agent_where(&sup, "running the new config", |a| effective(a).contains("opampecho")).await;
    assert!(agent.report.health.as_ref().is_some_and(|h| h.healthy));

    // A broken config is refused by the collector: FAILED, with the collector's own words. (A
    // component the build lacks is never sent at all: see the compatibility test.)
    // (An option the debug exporter does not have.)
    let broken = collector("127.0.0.1:0", "debug").replace("verbosity: basic", "nosuchoption: basic");
    env.apply(&agent_config("collectors", &broken)).await;
    let status = env
        .status_where(&sup, "collectors", "the collector refused the broken config", |s| {
            s.failed_agents == 1 && !s.failures.is_empty()
        })
        .await;
    let failure = &status.failures[0];
    assert_eq!(failure.instance_uid, agent.uid.to_string());
    assert!(failure.message.contains("nosuchoption"), "the collector's error is in failures: {failure:#?}");
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").expect("a Degraded condition");
    assert_eq!(degraded.status, "True", "{:#?}", status.conditions);
    // The last good config keeps running.
    let agent =
        env.agent_where(&sup, "still healthy", |a| a.report.health.as_ref().is_some_and(|h| h.healthy)).await;
    assert!(!effective(&agent).contains("nosuchoption"), "{}", effective(&agent));

    // Stopping the supervisor disconnects the agent.
    sup.stop().await;
    env.agent_where(&sup, "disconnected", |a| !a.connected).await;
    env.stop().await;
}

#[tokio::test]
async fn http_collector_polls_for_its_config_and_applies_it() {
    // HTTP collectors poll every 30 s (opamp-go's default), which the operator expects by
    // default too: between two polls a collector is not gone.
    let http_polls = |c: &mut OperatorConfig| c.fleet.heartbeat_interval = Duration::from_secs(30);
    let env = Env::start(TestEnv::new("otel-http").operator(http_polls)).await;
    let mut sup = env.supervisor(Transport::Http);
    // The config is given once the supervisor runs its collector (see
    // collector_health_changes_show_in_the_status): a config in the reply to its first poll can
    // be reported APPLIED while the collector keeps running its initial, empty config. It comes
    // in the reply to a later poll.
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    env.apply(&agent_config("collectors", &collector("127.0.0.1:0", "debug"))).await;
    let status = env
        .status_where(&sup, "collectors", "the HTTP collector applied it", |s| {
            s.selected_agents == 1 && s.applied_agents == 1
        })
        .await;
    assert_eq!(status.failed_agents, 0);
    let agent =
        env.agent_where(&sup, "over HTTP, running the config", |a| effective(a).contains("opampecho")).await;
    assert_eq!(agent.transport, Some(Transport::Http));
    assert_eq!(string_attr(&agent, "service.name").as_deref(), Some(SERVICE));
    sup.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn collector_health_changes_show_in_the_status() {
    let env = Env::new("otel-health").await;
    // A config the collector accepts but cannot run: its OTLP port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut sup = env.supervisor(Transport::WebSocket);
    // The config is given once the supervisor runs its collector: opampsupervisor v0.149.0 can
    // report a config that comes in the reply to its first message APPLIED without restarting
    // the collector on it (it connects before it writes its initial config); that is not what
    // this test is about.
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    env.apply(&agent_config("collectors", &collector(&format!("127.0.0.1:{port}"), "debug"))).await;
    let status =
        env.status_where(&sup, "collectors", "the collector unhealthy", |s| s.unhealthy_agents == 1).await;
    assert_eq!(status.selected_agents, 1);
    // The supervisor's first unhealthy report may come before it knows why (an empty
    // last_error); the report asserted on is the one that says why.
    let agent = env
        .agent_where(&sup, "reported unhealthy, saying why", |a| {
            a.report.health.as_ref().is_some_and(|h| !h.healthy && !h.last_error.is_empty())
        })
        .await;
    let health = agent.report.health.as_ref().unwrap();
    assert!(!health.healthy && !health.last_error.is_empty(), "the supervisor says why: {health:#?}");

    // The port frees up: the supervisor's next restart of the collector succeeds.
    drop(taken);
    env.status_where(&sup, "collectors", "the collector healthy again", |s| s.unhealthy_agents == 0).await;
    env.agent_where(&sup, "reported healthy", |a| a.report.health.as_ref().is_some_and(|h| h.healthy)).await;
    sup.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn capability_slot_routes_the_collector_extensions_messages_both_ways() {
    let env = Env::new("otel-echo").await;
    let callback = CallbackServer::start().await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: dispatch}}\ntype: Opaque\nstringData: {{token: {DISPATCH_TOKEN}}}\n"
    ))
    .await;
    env.apply(&format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: echo}}\nspec:\n  capability: {ECHO}\n  callback:\n    url: {}\n  dispatch:\n    tokenSecretRef: {{name: dispatch, key: token}}\n",
        callback.url("/echo")
    ))
    .await;
    let mut sup = env.supervisor(Transport::WebSocket);
    // Once the supervisor runs its collector (see collector_health_changes_show_in_the_status).
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    env.apply(&agent_config("collectors", &collector("127.0.0.1:0", "debug"))).await;

    // The extension registers its capability and says hello when the collector starts.
    let agent = env
        .agent_where(&sup, "declared the echo capability", |a| a.report.supports_custom_capability(ECHO))
        .await;
    let hello = wait_callback(&callback, &sup, "the extension's hello", |b| b["type"] == "hello").await;
    assert_eq!(hello["capability"], ECHO);
    assert_eq!(hello["agent"]["instanceUid"], agent.uid.to_string());
    assert_eq!(hello["data"], b64encode(b"started"));

    // A dispatched message reaches the extension, which echoes it back to the callback.
    let url = env.api_url(&format!("/api/v1/namespaces/{}/capabilityslots/echo/messages", env.ns.name));
    let body =
        json!({ "type": "ping", "data": b64encode(b"from the test"), "agents": [agent.uid.to_string()] });
    let reply: Value = within(T, "dispatch", async {
        let resp = reqwest::Client::new()
            .post(&url)
            .bearer_auth(DISPATCH_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    })
    .await;
    assert_eq!(reply["results"][0]["state"], "sent", "{reply:#}");
    let echo = wait_callback(&callback, &sup, "the extension's echo", |b| b["type"] == "echo").await;
    assert_eq!(echo["data"], b64encode(b"from the test"));
    assert_eq!(echo["agent"]["instanceUid"], agent.uid.to_string());

    let slot = env.ns.api::<opamp_operator::api::CapabilitySlot>();
    eventually(T, "the slot counts the messages", || async {
        let s = slot.get("echo").await.ok()?.status?;
        (s.supporting_agents == 1 && s.upstream.delivered >= 2 && s.downstream.sent >= 1).then_some(())
    })
    .await;
    sup.stop().await;
    env.stop().await;
}

/// Waits for a callback request whose JSON body satisfies `pred`.
async fn wait_callback(
    callback: &CallbackServer,
    sup: &Supervisor,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    poll_until(T, || async {
        let requests = callback.requests();
        match requests.iter().find(|r| r.json.as_ref().is_some_and(&pred)) {
            Some(r) => Ok(r.body_json().clone()),
            None => Err(requests.into_iter().map(|r| r.json).collect::<Vec<_>>()),
        }
    })
    .await
    .unwrap_or_else(|seen| {
        panic!("timed out after {T:?} waiting for {what}; callbacks so far: {seen:#?}\n{}", sup.logs())
    })
}
