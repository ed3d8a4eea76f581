//! Serves `/v1/opamp`: a `GET` with an upgrade becomes a WebSocket, a `POST` is the plain-HTTP
//! transport.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::auth::{AdmitAll, Authenticator};
use super::tls::{TlsError, TlsFiles};
use crate::fleet::{Fleet, Tenant};
use crate::metrics::Metrics;
use crate::proto::AgentToServer;

/// The metrics label of an incoming message.
pub(super) fn kind(msg: &AgentToServer) -> &'static str {
    if msg.agent_disconnect.is_some() {
        "disconnect"
    } else if msg.custom_message.is_some() {
        "custom_message"
    } else if msg.agent_description.is_some()
        || msg.health.is_some()
        || msg.effective_config.is_some()
        || msg.remote_config_status.is_some()
        || msg.package_statuses.is_some()
        || msg.custom_capabilities.is_some()
        || msg.available_components.is_some()
    {
        "report"
    } else {
        "heartbeat"
    }
}

pub const OPAMP_PATH: &str = "/v1/opamp";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted message (WebSocket message or HTTP body, after gunzip).
    pub max_message_bytes: usize,
    /// Initial read buffer of each WebSocket. Small: it is allocated per connection up front
    /// and grows only for larger messages.
    pub ws_read_buffer_bytes: usize,
    /// A WebSocket silent for this long is pinged; silent for three times this long, closed.
    pub ws_ping_interval: Duration,
    /// A write that cannot complete in this time closes the connection.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            ws_read_buffer_bytes: 1 << 10,
            ws_ping_interval: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

pub(super) struct State {
    pub(super) fleet: Fleet,
    pub(super) metrics: Arc<Metrics>,
    pub(super) auth: Arc<dyn Authenticator>,
    pub(super) config: ServerConfig,
    pub(super) shutdown: CancellationToken,
}

/// The OpAMP endpoint over a fleet.
#[derive(Clone)]
pub struct OpampServer {
    state: Arc<State>,
}

impl OpampServer {
    /// A server admitting every agent into the `default` namespace (see [`Self::with_auth`]).
    pub fn new(fleet: Fleet, config: ServerConfig) -> Self {
        Self::with_auth(fleet, config, Arc::new(AdmitAll(Tenant::new("default"))))
    }

    pub fn with_auth(fleet: Fleet, config: ServerConfig, auth: Arc<dyn Authenticator>) -> Self {
        let metrics = Arc::default();
        Self { state: Arc::new(State { fleet, metrics, auth, config, shutdown: CancellationToken::new() }) }
    }

    /// Counts into these metrics (each server has its own otherwise).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        Arc::get_mut(&mut self.state).expect("set before the server is cloned or served").metrics = metrics;
        self
    }

    pub fn fleet(&self) -> &Fleet {
        &self.state.fleet
    }

    /// Cancelled when the server shuts down; WebSockets then close with 1001 (going away).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// The routes, to be merged into a larger router or served alone.
    pub fn router(&self) -> Router {
        Router::new()
            .route(OPAMP_PATH, get(super::ws::upgrade).post(super::http::post))
            // max_message_bytes is enforced by hand (axum's default would cap bodies at 2 MB)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(self.state.clone())
    }

    /// Serves until the shutdown token is cancelled, then closes every connection.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        let sweeper = tokio::spawn(self.state.fleet.clone().run_sweeper(shutdown.clone()));
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        sweeper.abort();
        result
    }

    /// Serves over TLS (wss:// and https://), reloading the certificate when its files change.
    pub async fn serve_tls(self, listener: TcpListener, tls: TlsFiles) -> Result<(), TlsError> {
        let config = tls.load().await?;
        let shutdown = self.state.shutdown.clone();
        let sweeper = tokio::spawn(self.state.fleet.clone().run_sweeper(shutdown.clone()));
        let watcher =
            tokio::spawn(tls.clone().watch(config.clone(), Duration::from_secs(2), shutdown.clone()));
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            h.graceful_shutdown(Some(Duration::from_secs(10)));
        });
        let listener = listener.into_std().map_err(|e| tls.error(e))?;
        let result = axum_server::from_tcp_rustls(listener, config)
            .map_err(|e| tls.error(e))?
            .handle(handle)
            .serve(self.router().into_make_service())
            .await;
        sweeper.abort();
        watcher.abort();
        result.map_err(|e| tls.error(e))
    }
}
