//! Serves `/v1/opamp`: a `GET` with an upgrade becomes a WebSocket, a `POST` is the plain-HTTP
//! transport.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{AdmitAll, Authenticator};
use super::tls::{TlsError, TlsFiles};
use crate::fleet::{Fleet, Tenant};
use crate::metrics::Metrics;

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
    /// Threads serving the endpoint, each an event loop of its own (`--opamp-threads`; default:
    /// half the CPUs, at least one).
    pub event_loops: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            ws_read_buffer_bytes: 1 << 10,
            ws_ping_interval: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            event_loops: default_event_loops(),
        }
    }
}

/// Half the CPUs, at least one. Each event loop parks and is woken on its own, so a second
/// loop costs wake-ups (at 5,000 heartbeats/s on 2 CPUs: 23 instead of 17 µs of CPU per
/// message, `tests/bench/probe`), while one loop handles tens of thousands of messages per
/// second; the other half is left to the kernel's network stack and the controller.
fn default_event_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

pub(super) struct State {
    pub(super) fleet: Fleet,
    pub(super) metrics: Arc<Metrics>,
    pub(super) auth: Arc<dyn Authenticator>,
    pub(super) config: ServerConfig,
    pub(super) shutdown: CancellationToken,
    /// The WebSocket connections: upgraded connections are tasks of their own that the HTTP
    /// server's graceful shutdown does not wait for, so the event loops wait for these.
    pub(super) websockets: TaskTracker,
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
        let (shutdown, websockets) = (CancellationToken::new(), TaskTracker::new());
        Self { state: Arc::new(State { fleet, metrics, auth, config, shutdown, websockets }) }
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
        let router = self.router();
        self.on_event_loops(listener.into_std()?, move |listener| {
            let (router, shutdown) = (router.clone(), shutdown.clone());
            async move {
                axum::serve(TcpListener::from_std(listener)?, router)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
        })
        .await
    }

    /// Serves over TLS (wss:// and https://), reloading the certificate when its files change.
    pub async fn serve_tls(self, listener: TcpListener, tls: TlsFiles) -> Result<(), TlsError> {
        let config = tls.load().await?;
        let shutdown = self.state.shutdown.clone();
        let watcher =
            tokio::spawn(tls.clone().watch(config.clone(), Duration::from_secs(2), shutdown.clone()));
        let router = self.router();
        let listener = listener.into_std().map_err(|e| tls.error(e))?;
        let result = self
            .on_event_loops(listener, move |listener| {
                let (router, shutdown, config) = (router.clone(), shutdown.clone(), config.clone());
                async move {
                    let handle = axum_server::Handle::new();
                    let h = handle.clone();
                    tokio::spawn(async move {
                        shutdown.cancelled().await;
                        h.graceful_shutdown(Some(Duration::from_secs(10)));
                    });
                    axum_server::from_tcp_rustls(listener, config)?
                        .handle(handle)
                        .serve(router.into_make_service())
                        .await
                }
            })
            .await;
        watcher.abort();
        result.map_err(|e| tls.error(e))
    }

    /// Runs `serve` on [`ServerConfig::event_loops`] threads, each a single-threaded runtime
    /// accepting from its own handle of the listener, and the fleet's sweeper meanwhile. A
    /// connection then lives on one thread, and handling a message wakes no other: on a
    /// multi-threaded runtime the wake-ups of idle workers cost more CPU than the message itself.
    async fn on_event_loops<F, Fut>(&self, listener: std::net::TcpListener, serve: F) -> std::io::Result<()>
    where
        F: Fn(std::net::TcpListener) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = std::io::Result<()>>,
    {
        // Dropping this future (the server's task aborted, its runtime shut down) stops the loops.
        let abort = CancellationToken::new();
        let _abort_on_drop = abort.clone().drop_guard();
        let sweeper = tokio::spawn(self.state.fleet.clone().run_sweeper(abort.clone()));
        let mut loops = Vec::new();
        for i in 0..self.state.config.event_loops.max(1) {
            let (listener, serve, abort) = (listener.try_clone()?, serve.clone(), abort.clone());
            let websockets = self.state.websockets.clone();
            let (done, finished) = tokio::sync::oneshot::channel();
            std::thread::Builder::new().name(format!("opamp-{i}")).spawn(move || {
                let served =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
                        rt.block_on(async move {
                            tokio::select! {
                                served = async {
                                    let served = serve(listener).await;
                                    // Each WebSocket closes with 1001 (bounded by the write timeout)
                                    // before the runtime, and its tasks with it, goes away.
                                    websockets.close();
                                    websockets.wait().await;
                                    served
                                } => served,
                                _ = abort.cancelled() => Ok(()),
                            }
                        })
                    });
                let _ = done.send(served);
            })?;
            loops.push(finished);
        }
        drop(listener);
        let mut result = Ok(());
        for finished in loops {
            let served =
                finished.await.unwrap_or_else(|_| Err(std::io::Error::other("an OpAMP event loop panicked")));
            result = result.and(served);
        }
        sweeper.abort();
        result
    }
}
