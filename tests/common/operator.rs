//! An operator for the suites that run it against the local control plane: as the Helm chart's
//! RBAC identity (a missing permission fails the test), managing only the given namespaces.
use std::net::SocketAddr;
use std::time::Duration;

use opamp_operator::fleet::FleetConfig;
use opamp_operator::opamp::ServerConfig;
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::routes::egress::EgressPolicy;

use super::{eventually, within};

const T: Duration = Duration::from_secs(30);

/// Starts an operator serving OpAMP on `opamp_addr` (port 0: any) and waits until it is ready.
/// `namespaces[0]` is where the chart's identity is bound. Callbacks may go to 127.0.0.1, where
/// the suites' callback servers listen (refused by default).
pub async fn start(opamp_addr: SocketAddr, namespaces: &[String]) -> Operator {
    start_with(opamp_addr, namespaces, |c| c.callback_egress = loopback_callbacks()).await
}

/// The callback egress policy of the suites: callbacks may go to 127.0.0.1, where the suites'
/// callback servers listen (refused by default).
pub fn loopback_callbacks() -> EgressPolicy {
    EgressPolicy::new(vec!["127.0.0.1/32".parse().expect("a CIDR")])
}

/// [`start`] (with the default, strict callback egress policy), with the configuration changed
/// by `tweak` first.
pub async fn start_with(
    opamp_addr: SocketAddr,
    namespaces: &[String],
    tweak: impl FnOnce(&mut OperatorConfig),
) -> Operator {
    let client = super::cluster::cluster().await.client_as_chart_identity(&namespaces[0]).await;
    let mut config = OperatorConfig { opamp_addr, ..config(namespaces) };
    tweak(&mut config);
    let op = within(T, "operator start", Operator::start(client, config)).await.expect("operator starts");
    let ready = format!("http://{}/readyz", op.api_addr);
    eventually(T, "operator ready", || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    op
}

/// The configuration of the suites' operators: any free ports, managing only `namespaces`,
/// callbacks to 127.0.0.1 allowed, heartbeats every second.
pub fn config(namespaces: &[String]) -> OperatorConfig {
    OperatorConfig {
        opamp_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        anonymous_namespace: None,
        tls: None,
        leader_election: None,
        shutdown_grace: Duration::from_secs(10),
        callback_egress: EgressPolicy::default(),
        namespaces: Some(namespaces.to_vec()),
        fleet: FleetConfig { heartbeat_interval: Duration::from_secs(1), ..Default::default() },
        server: ServerConfig::default(),
        api_limits: Default::default(),
    }
}
