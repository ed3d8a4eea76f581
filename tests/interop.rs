//! Interop with the reference client: an agent on opamp-go's `client` package v0.23.0
//! (tests/interop/agent), over WebSocket and plain HTTP, with compression.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::goagent::GoAgent;
use common::{Everyone, TestServer, eventually, remote_config};
use opamp_operator::fleet::{AgentKey, Fleet, FleetConfig};
use opamp_operator::opamp::ServerConfig;
use opamp_operator::proto::{AgentDescription, RemoteConfigStatuses, any_value};
use opamp_operator::protocol::Uid;

const T: Duration = Duration::from_secs(20);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fleet() -> Fleet {
    Fleet::new(FleetConfig { heartbeat_interval: Duration::from_millis(500), ..Default::default() })
}

fn attribute(d: &AgentDescription, key: &str) -> Option<String> {
    d.identifying_attributes.iter().chain(&d.non_identifying_attributes).find(|kv| kv.key == key).and_then(
        |kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        },
    )
}

/// The whole life of an opamp-go agent against our server, on one transport.
async fn lifecycle(scheme: &str) {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = TestServer::start_at(addr, fleet(), ServerConfig::default(), None).await;
    let uid = Uid::new_v7();
    let url = format!("{scheme}://{}/v1/opamp", server.addr);
    let mut agent = GoAgent::spawn(&[
        "-url",
        &url,
        "-uid",
        &uid.to_string(),
        "-heartbeat",
        "500ms",
        "-compression",
        "-attr",
        "service.name=checkout",
    ]);
    agent.wait_event(T, "connected").await;

    // It reports its description, health and effective config.
    let snap = eventually(T, "agent state", || async {
        server
            .fleet
            .agent(&AgentKey::new("default", uid))
            .filter(|a| a.report.effective_config.is_some() && a.report.health.is_some())
    })
    .await;
    assert!(snap.connected);
    let desc = &snap.report.description.as_ref().unwrap().to_proto();
    assert_eq!(attribute(desc, "service.name").as_deref(), Some("checkout"));
    assert_eq!(attribute(desc, "os.type").as_deref(), Some("linux"));
    assert!(snap.report.health.as_ref().unwrap().healthy);
    let effective = snap.report.effective_config.unwrap().to_proto().config_map.unwrap();
    assert_eq!(effective.config_map["agent.yaml"].body, Bytes::from_static(b"initial: true"));

    // A config set by the server reaches it (pushed on WebSocket, on the next poll on HTTP)...
    let cfg = remote_config("receivers: {otlp: {}}");
    assert!(server.fleet.set_remote_config(&AgentKey::new("default", uid), Some(cfg.clone())));
    let got = agent.wait_event(T, "remote_config").await;
    assert_eq!(got["hash"], hex(&cfg.config_hash));
    assert_eq!(got["files"]["collector.yaml"], "receivers: {otlp: {}}");
    // ...and it reports APPLIED with the hash, and the new effective config.
    eventually(T, "APPLIED reported", || async {
        let a = server.fleet.agent(&AgentKey::new("default", uid))?;
        let s = a.report.remote_config_status?;
        let eff = a.report.effective_config?.to_proto().config_map?;
        (s.status == RemoteConfigStatuses::Applied as i32
            && s.last_remote_config_hash == cfg.config_hash
            && eff.config_map.get("collector.yaml").map(|f| &f.body)
                == Some(&Bytes::from("receivers: {otlp: {}}")))
        .then_some(())
    })
    .await;

    // The server restarts, losing everything; the controller still wants the same config.
    let addr = server.stop().await;
    let restarted = fleet();
    restarted.publish_plan("default", Arc::new(Everyone(cfg.clone())));
    let server = TestServer::start_at(addr, restarted, ServerConfig::default(), None).await;
    let back = eventually(T, "agent back with its full state", || async {
        let a = server.fleet.agent(&AgentKey::new("default", uid))?;
        let s = a.report.remote_config_status.as_ref()?;
        (a.connected
            && s.status == RemoteConfigStatuses::Applied as i32
            && s.last_remote_config_hash == cfg.config_hash)
            .then_some(a)
    })
    .await;
    assert!(back.report.description.is_some());
    // A few more heartbeats go by: the agent is never sent the config again.
    let later = SystemTime::now() + Duration::from_millis(1600);
    eventually(T, "three more heartbeats", || async {
        (server.fleet.agent(&AgentKey::new("default", uid))?.last_seen > later).then_some(())
    })
    .await;
    assert_eq!(agent.count("remote_config"), 1, "events: {:#?}", agent.events);
    assert_eq!(agent.count("remote_config_duplicate"), 0);

    // A changed config still gets through after the restart.
    let cfg2 = remote_config("receivers: {otlp: {protocols: {grpc: {}}}}");
    server.fleet.set_remote_config(&AgentKey::new("default", uid), Some(cfg2.clone()));
    let got = agent.wait_event(T, "remote_config").await;
    assert_eq!(got["hash"], hex(&cfg2.config_hash));
    agent
        .wait_for(T, "APPLIED of the new config", |e| {
            e["event"] == "remote_config_status"
                && e["status"] == "APPLIED"
                && e["hash"] == hex(&cfg2.config_hash)
        })
        .await;

    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agent_over_websocket() {
    lifecycle("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agent_over_http() {
    lifecycle("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agent_reports_a_failed_config_with_its_error() {
    let server =
        TestServer::start_at("127.0.0.1:0".parse().unwrap(), fleet(), ServerConfig::default(), None).await;
    let uid = Uid::new_v7();
    let mut agent = GoAgent::spawn(&["-url", &server.ws_url(), "-uid", &uid.to_string(), "-heartbeat", "1s"]);
    agent.wait_event(T, "connected").await;
    eventually(T, "agent known", || async {
        server.fleet.agent(&AgentKey::new("default", uid)).filter(|a| a.report.description.is_some())
    })
    .await;
    let bad = remote_config("FAIL_ME");
    server.fleet.set_remote_config(&AgentKey::new("default", uid), Some(bad.clone()));
    let s = eventually(T, "FAILED reported", || async {
        server
            .fleet
            .agent(&AgentKey::new("default", uid))?
            .report
            .remote_config_status
            .filter(|s| s.status == RemoteConfigStatuses::Failed as i32)
    })
    .await;
    assert_eq!(s.last_remote_config_hash, bad.config_hash);
    assert_eq!(s.error_message, "config rejected: contains FAIL_ME");
    agent.stop().await;
    // WebSocket agents say goodbye on stop.
    eventually(T, "disconnected", || async {
        (!server.fleet.agent(&AgentKey::new("default", uid))?.connected).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agent_refused_at_capacity_gets_in_when_a_place_frees() {
    let limited = Fleet::new(FleetConfig {
        max_agents: Some(1),
        retry_after: Duration::from_secs(1),
        heartbeat_interval: Duration::from_millis(500),
        ..Default::default()
    });
    let server =
        TestServer::start_at("127.0.0.1:0".parse().unwrap(), limited, ServerConfig::default(), None).await;
    // Our own agent takes the only place.
    let mut occupant = opamp_operator::sim::SimAgent::new(opamp_operator::sim::AgentSpec::new("occupant"));
    let mut ws = opamp_operator::sim::WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send(&occupant.full_state()).await.unwrap();
    ws.recv().await.unwrap();

    let uid = Uid::new_v7();
    let mut agent =
        GoAgent::spawn(&["-url", &server.ws_url(), "-uid", &uid.to_string(), "-heartbeat", "500ms"]);
    let refusal = agent.wait_event(T, "server_error").await;
    assert_eq!(refusal["type"], "UNAVAILABLE");
    assert_eq!(refusal["retry_after_ns"], 1_000_000_000u64);
    assert!(server.fleet.agent(&AgentKey::new("default", uid)).is_none());

    // The occupant leaves; the refused agent retries, gets in and reports its full state.
    ws.close().await;
    let admitted = eventually(T, "refused agent admitted", || async {
        server
            .fleet
            .agent(&AgentKey::new("default", uid))
            .filter(|a| a.connected && a.report.description.is_some())
    })
    .await;
    assert!(admitted.report.health.is_some());
    assert_eq!(server.fleet.connected_count(), 1);
    agent.stop().await;
    server.stop().await;
}
