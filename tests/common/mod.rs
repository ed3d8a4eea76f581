//! Shared test harness: an in-process OpAMP server on a free loopback port, and waiting on
//! conditions with deadlines (never sleep-and-hope).
#![allow(dead_code)]

pub mod aggregated;
pub mod argocd;
pub mod callback;
pub mod cluster;
pub mod env;
pub mod goagent;
pub mod operator;
pub mod peers;
pub mod replica;
pub mod service;
pub mod simrun;
pub mod supervisor;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opamp_operator::fleet::{DesiredState, Fleet, FleetConfig, Plan};
use opamp_operator::opamp::{Authenticator, OpampServer, ServerConfig};
use opamp_operator::protocol::Uid;
use opamp_operator::protocol::session::AgentReport;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A remote config with one file, `collector.yaml`, and a hash derived from the body.
pub fn remote_config(body: &str) -> Arc<opamp_operator::proto::AgentRemoteConfig> {
    use opamp_operator::proto::{AgentConfigFile, AgentConfigMap, AgentRemoteConfig};
    let mut files = AgentConfigMap::default();
    files.config_map.insert(
        "collector.yaml".into(),
        AgentConfigFile { body: bytes::Bytes::from(body.to_owned()), content_type: "text/yaml".into() },
    );
    Arc::new(AgentRemoteConfig {
        config: Some(files),
        config_hash: bytes::Bytes::from(format!("hash:{body}")),
    })
}

/// Gives every agent the same config, as the controller does for a matching AgentConfig.
pub struct Everyone(pub Arc<opamp_operator::proto::AgentRemoteConfig>);

impl Plan for Everyone {
    fn desired(&self, _: &Uid, _: &AgentReport, _: &DesiredState) -> DesiredState {
        DesiredState {
            remote_config: Some(self.0.clone()),
            custom_capabilities: None,
            connection_settings: None,
            restart: None,
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub fleet: Fleet,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(fleet: FleetConfig, server: ServerConfig) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), Fleet::new(fleet), server, None).await
    }

    pub async fn start_default() -> Self {
        Self::start(FleetConfig::default(), ServerConfig::default()).await
    }

    pub async fn start_at(
        addr: SocketAddr,
        fleet: Fleet,
        config: ServerConfig,
        auth: Option<Arc<dyn Authenticator>>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let server = match auth {
            Some(auth) => OpampServer::with_auth(fleet.clone(), config, auth),
            None => OpampServer::new(fleet.clone(), config),
        };
        let shutdown = server.shutdown_token();
        let task = tokio::spawn(server.serve(listener));
        Self { addr, fleet, shutdown, task }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.addr)
    }

    /// Stops the server and waits until it has let go of its port.
    pub async fn stop(self) -> SocketAddr {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("server stops");
        self.addr
    }
}

/// Waits until `check` returns `Some`, polling, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(deadline, || {
        let checked = check();
        async move { checked.await.ok_or(()) }
    })
    .await
    .unwrap_or_else(|()| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// Polls `probe` until it returns `Ok`; after `deadline`, returns its last `Err` (what it saw
/// last, for the caller's failure message).
pub async fn poll_until<T, L, F, Fut>(deadline: Duration, mut probe: F) -> Result<T, L>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, L>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(last) if tokio::time::Instant::now() > end => return Err(last),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Runs a future with a deadline, naming it on timeout.
pub async fn within<T>(deadline: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {deadline:?}: {what}"))
}
