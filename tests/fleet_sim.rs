//! The fleet simulator against an in-process server: every agent connects, applies or fails
//! the config as told, and the report counts what the server saw.
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Everyone, TestServer, eventually};
use opamp_operator::fleet::{Fleet, FleetConfig};
use opamp_operator::opamp::ServerConfig;
use opamp_operator::proto::{AgentRemoteConfig, RemoteConfigStatuses};
use opamp_operator::protocol::Transport;
use opamp_operator::sim::fleet::{FleetSimConfig, run};
use tokio_util::sync::CancellationToken;

async fn simulate(transport: Transport) {
    let fleet = Fleet::new(FleetConfig::default());
    let cfg = Arc::new(AgentRemoteConfig {
        config: Some(Default::default()),
        config_hash: Bytes::from_static(b"h1"),
    });
    fleet.publish_plan("default", Arc::new(Everyone(cfg)));
    let server =
        TestServer::start_at("127.0.0.1:0".parse().unwrap(), fleet, ServerConfig::default(), None).await;
    let url = match transport {
        Transport::WebSocket => server.ws_url(),
        Transport::Http => server.http_url(),
    };
    let config = FleetSimConfig {
        url,
        transport,
        agents: 40,
        heartbeat: Duration::from_millis(200),
        connect_rate: 1000,
        fail_fraction: 0.5,
        token: None,
        hold: None,
    };
    let stop = CancellationToken::new();
    let sim = tokio::spawn(run(config, stop.clone()));
    let count = |status: RemoteConfigStatuses| {
        server
            .fleet
            .agents()
            .iter()
            .filter(|a| a.report.remote_config_status.as_ref().is_some_and(|s| s.status == status as i32))
            .count()
    };
    eventually(Duration::from_secs(20), "20 applied and 20 failed", || async {
        (count(RemoteConfigStatuses::Applied) == 20 && count(RemoteConfigStatuses::Failed) == 20)
            .then_some(())
    })
    .await;
    stop.cancel();
    let report = sim.await.unwrap();
    assert_eq!((report.connected, report.errors), (40, 0), "{report}");
    assert_eq!((report.configs_applied, report.configs_failed), (20, 20), "{report}");
    assert!(report.first_reply_us[3] > 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_websocket_fleet_applies_and_fails_as_told() {
    simulate(Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_http_fleet_applies_and_fails_as_told() {
    simulate(Transport::Http).await;
}
