//! An operator for the suites that run it against the local control plane: as the Helm chart's
//! RBAC identity (a missing permission fails the test), managing only the given namespaces.
//! Suites start it through [`super::env::TestEnv`]; [`test_config`] is for the tests that start
//! an operator of their own (another identity, several replicas, no cluster at all).
use std::time::Duration;

use opamp_operator::fleet::FleetConfig;
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::routes::egress::EgressPolicy;

use super::{eventually, within};

const T: Duration = Duration::from_secs(30);

/// The configuration of a test operator: every address on loopback at a port the OS picks
/// (metrics included), heartbeats every second, callbacks allowed to 127.0.0.1 (where the
/// suites' callback servers listen), every namespace (set `namespaces` to narrow it), no TLS,
/// no leader election; the rest as `opamp-operator run` has it.
pub fn test_config() -> OperatorConfig {
    OperatorConfig {
        opamp_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        callback_egress: loopback_callbacks(),
        fleet: FleetConfig { heartbeat_interval: Duration::from_secs(1), ..Default::default() },
        ..Default::default()
    }
}

/// The callback egress policy of the suites: callbacks may go to 127.0.0.1, where the suites'
/// callback servers listen (refused by default).
pub fn loopback_callbacks() -> EgressPolicy {
    EgressPolicy::new(vec!["127.0.0.1/32".parse().expect("a CIDR")])
}

/// Starts an operator with `config` as the chart's identity (bound in the first of
/// `config.namespaces`), and waits until it is ready.
pub async fn start(config: OperatorConfig) -> Operator {
    let home = config.namespaces.as_ref().and_then(|n| n.first()).expect("a test operator's namespaces");
    let client = super::cluster::cluster().await.client_as_chart_identity(home).await;
    start_as(client, config).await
}

/// Starts an operator with `config` as `client`, and waits until it is ready.
pub async fn start_as(client: kube::Client, config: OperatorConfig) -> Operator {
    let op = within(T, "operator start", Operator::start(client, config)).await.expect("operator starts");
    let ready = format!("http://{}/readyz", op.api_addr);
    eventually(T, "operator ready", || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    op
}
