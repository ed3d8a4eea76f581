//! The OpenTelemetry collector under `opampsupervisor`, end to end on the local control plane:
//! the supervisor connects over WebSocket and HTTP and reports what the collector is; an
//! AgentConfig's collector config reaches the collector, which restarts with it (APPLIED); a
//! broken config ends FAILED with the collector's own error; health changes show in the
//! status; and a CapabilitySlot carries the custom messages of our test extension
//! (`tests/interop/otelcol/echoextension`, registered through the collector's
//! `opampcustommessages` registry) to a callback, and dispatched messages to the extension and
//! back. With two collectors: a Progressive rollout of a config the collector validates but
//! cannot run (its port is taken) trips a gate and is rolled back, the collector healthy again on
//! the last healthy revision and the other never sent it; and a config using an exporter the
//! build lacks is never sent, its collectors reported incompatible. Beyond configs: an HTTP
//! collector polls at the interval an AgentConfig declares, sends its own metrics to the OTLP/HTTP
//! receiver it names (a header from a Secret), and is restarted by the `opamp.dev/restartedAt`
//! annotation (its process replaced, once). Everything is built by
//! `make tools-otel` (collector and supervisor v0.149.0).
mod common;

use std::time::Duration;

use common::callback::{CallbackServer, b64encode};
use common::env::{TestEnv, TestEnvBuilder};
use common::supervisor::{DEBUG_LOGS, Supervisor};
use common::{eventually, poll_until, within};
use k8s_openapi::api::core::v1::Event as KubeEvent;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, RolloutState};
use opamp_operator::controller::rollout::rollout_key;
use opamp_operator::fleet::{AgentSnapshot, Fleet};
use opamp_operator::operator::OperatorConfig;
use opamp_operator::proto::{AvailableComponents, RemoteConfigStatuses, any_value};
use opamp_operator::protocol::{Transport, Uid};
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

    /// Waits for five HTTP polls of the namespace's one agent at least 1.5 s apart within 12 s,
    /// which a collector polling every 30 s cannot make (what it sends between polls, e.g. a
    /// status change, comes in bursts); else the number seen.
    async fn polls_every_2_seconds(&self) -> Result<(), usize> {
        let mut polls: Vec<std::time::SystemTime> = Vec::new();
        poll_until(Duration::from_secs(12), || {
            let agent = self.op.fleet.agents().into_iter().find(|a| a.namespace == self.ns.name);
            if let Some(seen) = agent.filter(|a| a.transport == Some(Transport::Http)).map(|a| a.last_seen) {
                let apart = |last: &std::time::SystemTime| {
                    seen.duration_since(*last).is_ok_and(|d| d >= Duration::from_millis(1500))
                };
                if polls.last().is_none_or(apart) {
                    polls.push(seen);
                }
            }
            std::future::ready(if polls.len() >= 5 { Ok(()) } else { Err(polls.len()) })
        })
        .await
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
    let desc = agent.report.description.as_ref()?.to_proto();
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
    let Some(map) = agent.report.effective_config.as_ref().and_then(|e| e.to_proto().config_map) else {
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
async fn an_http_collector_polls_at_the_declared_heartbeat_interval_and_sees_changes_within_it() {
    // The operator's default for HTTP agents (30 s between polls, as opamp-go's) stays; the
    // AgentConfig declares 2 s for its collectors.
    let http_polls = |c: &mut OperatorConfig| c.fleet.heartbeat_interval = Duration::from_secs(30);
    let env = Env::start(TestEnv::new("otel-heartbeat").operator(http_polls)).await;
    let mut sup = env.supervisor(Transport::Http);
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    let declared = |config: &str| {
        agent_config("collectors", config)
            .replace("  files:\n", "  connection:\n    heartbeatIntervalSeconds: 2\n  files:\n")
    };
    env.apply(&declared(&collector("127.0.0.1:0", "debug"))).await;
    let status = env
        .status_where(&sup, "collectors", "the config applied, the settings offered", |s| {
            s.applied_agents == 1 && s.connection.as_ref().is_some_and(|c| c.offered_agents == 1)
        })
        .await;
    let connection = status.connection.clone().unwrap();
    // The supervisor does not report ConnectionSettingsStatus: applied is unknown, not failed.
    assert_eq!((connection.failed_agents, connection.unsupported_agents), (0, 0), "{status:#?}");
    assert!(connection.hash.starts_with("sha256:"), "{connection:#?}");

    env.polls_every_2_seconds().await.unwrap_or_else(|n| {
        panic!("{n} polls seen in 12 s; the collector does not poll every 2 s\n{}", sup.logs())
    });

    // A change reaches the collector at its next poll, not 30 s later: it reports the new
    // config's hash (applying or applied) within two intervals and the time to report back.
    let agent =
        env.agent_where(&sup, "running the first config", |a| effective(a).contains("opampecho")).await;
    let before = desired_hash(&agent);
    let changed = std::time::Instant::now();
    env.apply(&declared(&collector("127.0.0.1:0", "debug").replace("verbosity: basic", "verbosity: normal")))
        .await;
    let agent = poll_until(Duration::from_secs(10), || async {
        let agent = env.op.fleet.agents().into_iter().find(|a| a.namespace == env.ns.name);
        match agent {
            Some(a)
                if desired_hash(&a) != before
                    && config_status(&a).is_some_and(|(_, h, _)| h == desired_hash(&a)) =>
            {
                Ok(a)
            }
            other => Err(other),
        }
    })
    .await
    .unwrap_or_else(|a| panic!("the change did not reach the collector within 10 s: {a:#?}\n{}", sup.logs()));
    eprintln!("config change reported back by the HTTP collector after {:?}", changed.elapsed());
    assert_eq!(agent.transport, Some(Transport::Http));
    sup.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn the_restart_annotation_replaces_the_collector_process_once() {
    let env = Env::new("otel-restart").await;
    // The configuration the README recommends accepts the restart command.
    let mut sup = env.supervisor(Transport::WebSocket);
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    let config = agent_config("collectors", &collector("127.0.0.1:0", "debug"));
    env.apply(&config).await;
    env.status_where(&sup, "collectors", "the config applied", |s| s.applied_agents == 1).await;
    let agent =
        env.agent_where(&sup, "healthy on it", |a| effective(a).contains("opampecho") && healthy(a)).await;
    let before = eventually(T, "the collector's pid", || std::future::ready(sup.collector_pid())).await;

    // `kubectl annotate agentconfig collectors opamp.dev/restartedAt=$(date -u +%FT%TZ)`, a
    // second after the collector's last start (the annotation has whole seconds).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let annotated = config.replace(
        "metadata: {name: collectors}",
        &format!("metadata: {{name: collectors, annotations: {{opamp.dev/restartedAt: '{now}'}}}}"),
    );
    env.apply(&annotated).await;
    let status = env
        .status_where(&sup, "collectors", "the collector restarted", |s| {
            s.restart.as_ref().is_some_and(|r| r.restarted_agents == 1 && r.pending_agents == 0)
        })
        .await;
    let restart = status.restart.clone().unwrap();
    assert_eq!(
        (restart.requested_at.as_str(), restart.message, restart.unsupported_agents),
        (now.as_str(), None, 0)
    );
    let after = eventually(T, "a new collector process", || {
        std::future::ready(sup.collector_pid().filter(|pid| *pid != before))
    })
    .await;
    assert_ne!(before, after);
    // Once: the collector keeps running (the same process) and is healthy on the same config.
    let agent = env
        .agent_where(&sup, "healthy again", |a| healthy(a) && desired_hash(a) == desired_hash(&agent))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sup.collector_pid(), Some(after), "restarted once, not again: {agent:#?}");
    sup.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn a_collector_that_accepts_opamp_settings_moves_to_the_server_it_is_given_once() {
    let env = Env::new("otel-opamp-settings").await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: reconnect}}\ntype: Opaque\nstringData: {{authorization: Bearer {}}}\n",
        env.token
    ))
    .await;
    let accepts = |yaml: String| {
        yaml.replace("capabilities:\n", "capabilities:\n  accepts_opamp_connection_settings: true\n")
    };
    let mut sup = Supervisor::spawn_with(&env.ws_url(), &env.token, accepts);
    env.agent_where(&sup, "the collector running over WebSocket", |a| {
        a.report.effective_config.is_some() && a.transport == Some(Transport::WebSocket)
    })
    .await;
    // The same operator, over HTTP polling every 2 s, with the agent's token from a Secret.
    let connection = format!(
        "  connection:\n    heartbeatIntervalSeconds: 2\n    server:\n      endpoint: {}\n      headers:\n      - name: Authorization\n        secretKeyRef: {{name: reconnect, key: authorization}}\n  files:\n",
        env.http_url()
    );
    env.apply(
        &agent_config("collectors", &collector("127.0.0.1:0", "debug")).replace("  files:\n", &connection),
    )
    .await;
    let agent = env
        .agent_where(&sup, "moved to HTTP, running the config", |a| {
            a.transport == Some(Transport::Http) && a.connected && effective(a).contains("opampecho")
        })
        .await;
    let status = env
        .status_where(&sup, "collectors", "the settings offered", |s| {
            s.connection.as_ref().is_some_and(|c| c.offered_agents == 1)
        })
        .await;
    assert_eq!(status.connection.as_ref().unwrap().message, None, "{status:#?}");
    // Offered once: the supervisor restarted its OpAMP client with the settings (a new
    // sequence, on another transport), and was not offered them again.
    let offered = env.op.fleet.connection_settings_offered();
    assert_eq!(offered, 1, "{agent:#?}");
    env.polls_every_2_seconds()
        .await
        .unwrap_or_else(|n| panic!("{n} polls in 12 s at the offered 2 s\n{}", sup.logs()));
    assert_eq!(env.op.fleet.connection_settings_offered(), 1, "still offered once");
    sup.stop().await;
    env.stop().await;
}

/// An OTLP/HTTP receiver on loopback: what arrives at `/v1/metrics`, with its Authorization.
struct OtlpReceiver {
    url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    async fn start() -> Self {
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = received.clone();
        let app = axum::Router::new().route(
            "/v1/metrics",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let auth =
                    headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                seen.lock().unwrap().push((auth, body.len()));
                // An empty ExportMetricsServiceResponse: everything accepted.
                std::future::ready(([("content-type", "application/x-protobuf")], Vec::<u8>::new()))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/metrics", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, received, task }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn the_collector_sends_its_own_metrics_where_the_agent_config_says() {
    let env = Env::new("otel-own-metrics").await;
    let receiver = OtlpReceiver::start().await;
    env.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: otlp}\ntype: Opaque\nstringData: {authorization: Bearer own-metrics-token}\n")
        .await;
    // The supervisor's defaults for own metrics (the tests otherwise turn them off), exported
    // every second rather than every minute.
    let own_metrics = |yaml: String| {
        yaml.replace("reports_own_metrics: false", "reports_own_metrics: true").replace(
            "  args: [\"--set=service.telemetry.metrics.level=none\"]\n",
            "  env: {OTEL_METRIC_EXPORT_INTERVAL: \"1000\"}\n",
        )
    };
    let mut sup = Supervisor::spawn_with(&env.ws_url(), &env.token, own_metrics);
    env.agent_where(&sup, "the collector running", |a| a.report.effective_config.is_some()).await;
    let connection = format!(
        "  connection:\n    ownMetrics:\n      endpoint: {}\n      headers:\n      - name: Authorization\n        secretKeyRef: {{name: otlp, key: authorization}}\n  files:\n",
        receiver.url
    );
    env.apply(
        &agent_config("collectors", &collector("127.0.0.1:0", "debug")).replace("  files:\n", &connection),
    )
    .await;
    let status = env
        .status_where(&sup, "collectors", "the settings offered, the config applied", |s| {
            s.applied_agents == 1 && s.connection.as_ref().is_some_and(|c| c.offered_agents == 1)
        })
        .await;
    assert_eq!(status.connection.as_ref().unwrap().message, None, "{status:#?}");
    let (auth, bytes) = eventually(T, "the collector's own metrics at the receiver", || {
        std::future::ready(receiver.received.lock().unwrap().first().cloned())
    })
    .await;
    assert_eq!(auth, "Bearer own-metrics-token", "the header from the Secret");
    assert!(bytes > 0, "an OTLP export with metrics");
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

// ---------------------------------------------------------------------------------------------
// Several collectors: rollouts, rollback and the compatibility check.

/// A Progressive rollout to half the collectors first that rolls back on a tripped gate.
const ROLLBACK: &str = "  rollout: {strategy: Progressive, steps: [50], onFailure: Rollback}\n";

/// [`agent_config`] with `rollout` (an indented `rollout:` line of the spec).
fn agent_config_with(name: &str, collector_yaml: &str, rollout: &str) -> String {
    agent_config(name, collector_yaml).replacen("spec:\n", &format!("spec:\n{rollout}"), 1)
}

fn healthy(agent: &AgentSnapshot) -> bool {
    agent.report.health.as_ref().is_some_and(|h| h.healthy)
}

/// The hex of the config hash the operator wants the agent to run.
fn desired_hash(agent: &AgentSnapshot) -> String {
    agent.desired_config_hash.as_ref().map(hex::encode).unwrap_or_default()
}

/// The agent's RemoteConfigStatus on the wire: status, hash (hex) and error.
fn config_status(agent: &AgentSnapshot) -> Option<(RemoteConfigStatuses, String, String)> {
    let s = agent.report.remote_config_status.as_ref()?;
    let status = RemoteConfigStatuses::try_from(s.status).unwrap_or(RemoteConfigStatuses::Unset);
    Some((status, hex::encode(&s.last_remote_config_hash), s.error_message.clone()))
}

fn rollout_state(s: &AgentConfigStatus) -> Option<RolloutState> {
    s.rollout.as_ref().map(|r| r.state)
}

fn condition<'a>(s: &'a AgentConfigStatus, t: &str) -> (&'a str, &'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no condition {t}: {s:#?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

/// Every supervisor's and collector's logs, for failure messages.
fn all_logs(sups: &[Supervisor]) -> String {
    sups.iter().enumerate().map(|(i, s)| format!("=== collector {i} ===\n{}\n", s.logs())).collect()
}

impl Env {
    /// A WebSocket supervisor that logs the remote configs it receives
    /// ([`Supervisor::received_config_hashes`]) and gives its collector the README's 5 s to
    /// come up healthy after a config (`config_apply_timeout`; APPLIED then, FAILED at once if
    /// the collector exits): 2 s is short for a collector restarting on two busy cores.
    fn logged_supervisor(&self) -> Supervisor {
        Supervisor::spawn_with(&self.ws_url(), &self.token, |c| {
            c.replace("config_apply_timeout: 2s", "config_apply_timeout: 5s") + DEBUG_LOGS
        })
    }

    /// Waits until the namespace holds one agent per supervisor, each satisfying `pred`;
    /// returns them in the supervisors' order (matched by the instance uid each supervisor
    /// keeps in its storage).
    async fn collectors_where(
        &self,
        sups: &[Supervisor],
        what: &str,
        pred: impl Fn(&AgentSnapshot) -> bool,
    ) -> Vec<AgentSnapshot> {
        poll_until(T, || async {
            let agents: Vec<_> =
                self.op.fleet.agents().into_iter().filter(|a| a.namespace == self.ns.name).collect();
            let mut ours = Vec::new();
            for sup in sups {
                let id = sup.persistent_state().map(|p| p.instance_id).unwrap_or_default();
                match agents.iter().find(|a| a.uid.to_string().eq_ignore_ascii_case(&id)) {
                    Some(a) if pred(a) => ours.push(a.clone()),
                    _ => return Err(agents),
                }
            }
            if agents.len() == sups.len() { Ok(ours) } else { Err(agents) }
        })
        .await
        .unwrap_or_else(|agents| {
            panic!(
                "timed out after {T:?} waiting for the collectors: {what}; agents: {agents:#?}\n{}",
                all_logs(sups)
            )
        })
    }

    /// [`Env::status_where`] showing every collector's logs on timeout.
    async fn status_of_all(
        &self,
        sups: &[Supervisor],
        name: &str,
        what: &str,
        pred: impl Fn(&AgentConfigStatus) -> bool,
    ) -> AgentConfigStatus {
        self.0.status_where_or::<AgentConfig>(name, what, pred, || all_logs(sups)).await
    }

    /// The names `kubectl get controllerrevisions` lists in the namespace.
    async fn kubectl_revisions(&self) -> Vec<String> {
        let out = common::cluster::cluster()
            .await
            .kubectl()
            .args(["get", "controllerrevisions", "-n", &self.ns.name, "-o", "name"])
            .output()
            .await
            .expect("run kubectl");
        assert!(out.status.success(), "kubectl: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_start_matches("controllerrevision.apps/").to_owned())
            .collect()
    }

    /// The namespace's rows of the operator's agents listing (`GET
    /// /api/v1/namespaces/{ns}/agents`, as a cluster admin), by instance uid.
    async fn listed_agents(&self) -> std::collections::BTreeMap<String, Value> {
        let url = self.api_url(&format!("/api/v1/namespaces/{}/agents", self.ns.name));
        let admin = common::cluster::cluster().await.admin_token.clone();
        let resp = reqwest::Client::new().get(&url).bearer_auth(admin).send().await.expect("GET agents");
        assert_eq!(resp.status(), 200, "{url}");
        let body: Value = serde_json::from_slice(&resp.bytes().await.expect("a listing")).expect("JSON");
        let rows = body["agents"].as_array().cloned().unwrap_or_default();
        rows.into_iter().map(|r| (r["instanceUid"].as_str().unwrap_or_default().to_owned(), r)).collect()
    }

    /// The Events of the namespace with this reason: (type, message).
    async fn events(&self, reason: &str) -> Vec<(String, String)> {
        let events: kube::Api<KubeEvent> = self.ns.api();
        let list = events.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        list.into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| (e.type_.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }
}

/// What the operator saw of one agent at a moment (consecutive duplicates dropped): the hash
/// it wanted the agent to run, the RemoteConfigStatus and health the supervisor reported, and
/// whether the effective config holds `marker`.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    desired: String,
    config_status: Option<(RemoteConfigStatuses, String, String)>,
    healthy: Option<bool>,
    last_error: String,
    effective_has_marker: bool,
}

/// Records, every 20 ms until dropped, what the fleet holds of some agents ([`Seen`]).
struct Recorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<Seen>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(fleet: Fleet, ns: String, uids: Vec<Uid>, marker: String) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![Vec::new(); uids.len()]));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let agents = fleet.agents();
                for (i, uid) in uids.iter().enumerate() {
                    let Some(a) = agents.iter().find(|a| a.namespace == ns && a.uid == *uid) else {
                        continue;
                    };
                    let now = Seen {
                        desired: desired_hash(a),
                        config_status: config_status(a),
                        healthy: a.report.health.as_ref().map(|h| h.healthy),
                        last_error: a
                            .report
                            .health
                            .as_ref()
                            .map(|h| h.last_error.clone())
                            .unwrap_or_default(),
                        effective_has_marker: effective(a).contains(&marker),
                    };
                    let mut seen = into.lock().unwrap();
                    if seen[i].last() != Some(&now) {
                        seen[i].push(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { seen, task }
    }

    fn seen(&self, i: usize) -> Vec<Seen> {
        self.seen.lock().unwrap()[i].clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Prints what an agent reported over time, shortening hashes (for the test's log).
fn show(what: &str, seen: &[Seen]) -> String {
    let short = |h: &str| h.chars().take(10).collect::<String>();
    let mut out = format!("{what}:\n");
    for s in seen {
        let status = match &s.config_status {
            Some((st, hash, err)) => format!("{} {} {err:?}", st.as_str_name(), short(hash)),
            None => "none".into(),
        };
        out.push_str(&format!(
            "  desired {} | remote config status {status} | healthy {:?} {:?} | effective has marker: {}\n",
            short(&s.desired),
            s.healthy,
            s.last_error,
            s.effective_has_marker
        ));
    }
    out
}

#[tokio::test]
async fn a_config_the_collector_cannot_run_is_rolled_back_and_the_collector_is_healthy_again() {
    let started = std::time::Instant::now();
    let env = Env::new("otel-rb").await;
    // The port v2's receiver binds: held by the test throughout.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let v2_endpoint = format!("127.0.0.1:{port}");
    let sups = [env.logged_supervisor(), env.logged_supervisor()];
    // Configs are given once the supervisors run their collectors (see
    // collector_health_changes_show_in_the_status).
    env.collectors_where(&sups, "both running", |a| a.report.effective_config.is_some()).await;

    // v1: OTLP on a port the OS picks (`127.0.0.1:0`, which the collector accepts): one config
    // for two collectors on one host, each listening on a port of its own.
    env.apply(&agent_config_with("collectors", &collector("127.0.0.1:0", "debug"), ROLLBACK)).await;
    let v1 = env
        .status_of_all(&sups, "collectors", "v1 complete on both", |s| {
            s.applied_agents == 2 && rollout_state(s) == Some(RolloutState::Complete)
        })
        .await;
    let healthy_revision = v1.last_healthy_revision.clone().expect("a last healthy revision");
    assert_eq!(v1.update_revision.as_ref(), Some(&healthy_revision));
    assert_eq!(v1.current_revision.as_ref(), Some(&healthy_revision));
    assert_eq!((v1.failed_agents, v1.unhealthy_agents), (0, 0), "{v1:#?}");
    let runs_v1 = |a: &AgentSnapshot| {
        let e = effective(a);
        e.contains("endpoint: 127.0.0.1:0") && !e.contains(&v2_endpoint)
    };
    let agents = env.collectors_where(&sups, "both healthy on v1", |a| healthy(a) && runs_v1(a)).await;
    let v1_hash = desired_hash(&agents[0]);
    assert_eq!(desired_hash(&agents[1]), v1_hash);
    eprintln!("v1 complete on both collectors after {:?}", started.elapsed());

    // The first step (half of two) takes the collector with the lower rollout key.
    let key = |a: &AgentSnapshot| rollout_key(&format!("{}/collectors", env.ns.name), &a.uid);
    let (first, other) = if key(&agents[0]) < key(&agents[1]) { (0, 1) } else { (1, 0) };
    let received_before: Vec<usize> = sups.iter().map(|s| s.received_config_hashes().len()).collect();
    let recorder = Recorder::start(
        env.op.fleet.clone(),
        env.ns.name.clone(),
        vec![agents[first].uid, agents[other].uid],
        v2_endpoint.clone(),
    );

    // v2: valid (the supervisor's validation passes), but the collector cannot bind its port.
    env.apply(&agent_config_with("collectors", &collector(&v2_endpoint, "debug"), ROLLBACK)).await;
    let back = env
        .status_of_all(
            &sups,
            "collectors",
            "rolled back, and the collector that took v2 applied v1 again",
            |s| rollout_state(s) == Some(RolloutState::RolledBack) && s.applied_agents == 2,
        )
        .await;
    let agents = env
        .collectors_where(&sups, "both healthy on v1 again", |a| {
            healthy(a)
                && runs_v1(a)
                && desired_hash(a) == v1_hash
                && config_status(a)
                    .is_some_and(|(s, h, _)| s == RemoteConfigStatuses::Applied && h == v1_hash)
        })
        .await;
    eprintln!("rolled back and healthy again after {:?}", started.elapsed());
    let took = recorder.seen(0);
    let spared = recorder.seen(1);
    drop(recorder);
    eprintln!("{}", show("the collector of the first step (v2, then v1 again)", &took));
    eprintln!("{}", show("the other collector", &spared));

    // The collector of the first step was given v2, reported it, and was given v1 again.
    let v2_hash = took.iter().map(|s| s.desired.clone()).find(|h| *h != v1_hash).expect("v2 was sent");
    assert_ne!(v2_hash, v1_hash);
    let v2_failed = took.iter().any(|s| {
        s.config_status
            .as_ref()
            .is_some_and(|(st, h, _)| *st == RemoteConfigStatuses::Failed && *h == v2_hash)
    });
    let v2_unhealthy = took.iter().any(|s| s.healthy == Some(false));
    assert!(v2_failed || v2_unhealthy, "v2 neither failed nor made the collector unhealthy");
    let received: Vec<Vec<String>> =
        sups.iter().zip(&received_before).map(|(s, n)| s.received_config_hashes().split_off(*n)).collect();
    assert_eq!(
        received[first],
        [v2_hash.clone(), v1_hash.clone()],
        "configs the collector of the first step received since v1"
    );
    // The other collector was never sent anything: v2 never in its effective config, nor
    // wanted for it.
    assert_eq!(received[other], Vec::<String>::new(), "configs the other collector received since v1");
    assert!(spared.iter().all(|s| s.desired == v1_hash && !s.effective_has_marker), "{spared:#?}");
    assert!(healthy(&agents[other]) && runs_v1(&agents[other]));
    // What the operator's agents listing shows: both healthy, both running v1.
    let listed = env.listed_agents().await;
    assert_eq!(listed.len(), 2, "{listed:#?}");
    for a in &agents {
        let row = &listed[&a.uid.to_string()];
        assert_eq!(row["healthy"], true, "{row:#}");
        assert_eq!(row["remoteConfig"]["status"], "APPLIED", "{row:#}");
        assert_eq!(row["remoteConfig"]["hash"], v1_hash.as_str(), "{row:#}");
        assert_eq!(row["desiredHash"], v1_hash.as_str(), "{row:#}");
    }

    // Status: which gate tripped (the one the supervisor's reports decide), what runs where.
    let r = back.rollout.as_ref().unwrap();
    let gate = r.tripped.as_ref().expect("the tripped gate").gate.clone();
    assert_eq!(gate, if v2_failed { "FailedRatio" } else { "UnhealthyRatio" }, "{r:#?}");
    assert_eq!(r.rolled_back_to.as_ref(), Some(&healthy_revision));
    assert_eq!(back.last_healthy_revision.as_ref(), Some(&healthy_revision));
    assert_eq!(back.current_revision.as_ref(), Some(&healthy_revision));
    let update_revision = back.update_revision.clone().expect("an update revision");
    assert_ne!(update_revision, healthy_revision);
    assert_eq!(back.updated_agents, 0, "{back:#?}");
    let (status, reason, message) = condition(&back, "Degraded");
    assert_eq!((status, reason), ("True", "RolledBack"), "{message}");
    assert!(message.contains(&format!("gate {gate}")) && message.contains(&healthy_revision), "{message}");
    // A Warning Event says so.
    let events = eventually(T, "a RolledBack event", || async {
        let events = env.events("RolledBack").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(events.iter().all(|(t, _)| t == "Warning"), "{events:?}");
    // `kubectl get controllerrevisions` lists both revisions.
    let mut revisions = env.kubectl_revisions().await;
    revisions.sort();
    let mut want = vec![healthy_revision.clone(), update_revision];
    want.sort();
    assert_eq!(revisions, want);
    // Argo CD shows it Degraded, saying why.
    let object = env.ns.api::<AgentConfig>().get("collectors").await.unwrap();
    let health = common::argocd::health(&serde_json::to_value(object).unwrap());
    assert_eq!(health.status, "Degraded");
    assert!(health.message.starts_with(&format!("RolledBack: gate {gate}")), "{}", health.message);

    drop(taken);
    for mut sup in sups {
        sup.stop().await;
    }
    env.stop().await;
    eprintln!("test took {:?}", started.elapsed());
}

/// A collector config whose pipeline exports with `exporter` (configured by `settings`).
fn collector_exporting(exporter: &str, settings: &str) -> String {
    format!(
        r#"receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:0
exporters:
  {exporter}: {settings}
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [{exporter}]
"#
    )
}

#[tokio::test]
async fn a_config_using_an_exporter_the_build_lacks_is_never_sent_and_reported_incompatible() {
    let started = std::time::Instant::now();
    let env = Env::new("otel-compat").await;
    let sups = [env.logged_supervisor(), env.logged_supervisor()];
    let agents = env
        .collectors_where(&sups, "both running, their components reported", |a| {
            a.report.effective_config.is_some()
                && a.report.available_components.as_ref().is_some_and(|c| !c.components.is_empty())
        })
        .await;
    for a in &agents {
        let available = a.report.available_components.as_ref().unwrap();
        assert!(!components(available, "exporters").contains(&"otlphttp".to_owned()), "{available:#?}");
    }
    // A config the build can run first.
    env.apply(&agent_config("collectors", &collector_exporting("debug", "{sampling_initial: 3}"))).await;
    env.status_of_all(&sups, "collectors", "applied by both", |s| s.applied_agents == 2).await;
    let agents = env
        .collectors_where(&sups, "both healthy on it", |a| {
            healthy(a)
                && effective(a).contains("sampling_initial: 3")
                && config_status(a)
                    .is_some_and(|(s, h, _)| s == RemoteConfigStatuses::Applied && h == desired_hash(a))
        })
        .await;
    let good_hash = desired_hash(&agents[0]);
    let good_effective: Vec<String> = agents.iter().map(effective).collect();
    let received_before: Vec<usize> = sups.iter().map(|s| s.received_config_hashes().len()).collect();
    let saved_before: Vec<_> =
        sups.iter().map(|s| s.persistent_state().unwrap().last_remote_config_status).collect();

    // The build has no otlphttp exporter: the config is not sent, and the status says why.
    env.apply(&agent_config(
        "collectors",
        &collector_exporting("otlphttp", "{endpoint: http://127.0.0.1:9}"),
    ))
    .await;
    let status = env
        .status_of_all(&sups, "collectors", "both collectors incompatible", |s| {
            s.observed_generation == Some(2) && s.incompatible_agents == 2
        })
        .await;
    assert_eq!(
        (status.selected_agents, status.applied_agents, status.failed_agents),
        (2, 0, 0),
        "{status:#?}"
    );
    let uids: std::collections::BTreeSet<String> = agents.iter().map(|a| a.uid.to_string()).collect();
    let named: std::collections::BTreeSet<String> = status
        .failures
        .iter()
        .filter(|f| f.message.contains("exporters/otlphttp"))
        .map(|f| f.instance_uid.clone())
        .collect();
    assert_eq!(named, uids, "each collector is named with the missing exporter: {:#?}", status.failures);
    let (degraded, reason, message) = condition(&status, "Degraded");
    assert_eq!((degraded, reason), ("True", "ComponentsMissing"), "{message}");
    assert!(message.contains("exporters/otlphttp"), "{message}");
    // The collectors keep running the previous config: nothing was sent, nothing changed.
    let agents = env.collectors_where(&sups, "still healthy", healthy).await;
    for (i, a) in agents.iter().enumerate() {
        assert_eq!(effective(a), good_effective[i], "the effective config is unchanged");
        assert_eq!(
            config_status(a).map(|(s, h, _)| (s, h)),
            Some((RemoteConfigStatuses::Applied, good_hash.clone()))
        );
        assert_eq!(sups[i].received_config_hashes().len(), received_before[i], "nothing was sent");
        assert_eq!(sups[i].persistent_state().unwrap().last_remote_config_status, saved_before[i]);
    }
    // The operator's agents listing: APPLIED with the previous hash, and no other config wanted
    // for them.
    let listed = env.listed_agents().await;
    for a in &agents {
        let row = &listed[&a.uid.to_string()];
        assert_eq!(row["healthy"], true, "{row:#}");
        assert_eq!(row["remoteConfig"]["status"], "APPLIED", "{row:#}");
        assert_eq!(row["remoteConfig"]["hash"], good_hash.as_str(), "{row:#}");
        assert_eq!(row["desiredHash"], good_hash.as_str(), "{row:#}");
    }

    // Fixed: it reaches both collectors.
    env.apply(&agent_config("collectors", &collector_exporting("debug", "{sampling_initial: 7}"))).await;
    let status = env
        .status_of_all(&sups, "collectors", "the fixed config applied by both", |s| {
            s.observed_generation == Some(3) && s.applied_agents == 2 && s.incompatible_agents == 0
        })
        .await;
    assert_eq!(condition(&status, "Degraded").0, "False", "{status:#?}");
    env.collectors_where(&sups, "both healthy on the fixed config", |a| {
        healthy(a) && effective(a).contains("sampling_initial: 7")
    })
    .await;
    for mut sup in sups {
        sup.stop().await;
    }
    env.stop().await;
    eprintln!("test took {:?}", started.elapsed());
}
