//! Wires the pieces into a running operator: the controller over the Kubernetes API, the
//! fleet, the OpAMP endpoint, and the API endpoint (health, readiness).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use kube::Client;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::controller::auth::TokenAuthenticator;
use crate::controller::leader::{self, LeaderElectionConfig};
use crate::controller::{Controller, Scope};
use crate::fleet::{Fleet, FleetConfig};
use crate::metrics::Metrics;
use crate::opamp::tls::TlsError;
use crate::opamp::{OpampServer, ServerConfig, TlsFiles};
use crate::routes::Routes;
use crate::routes::egress::EgressPolicy;

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The OpAMP endpoint (`/v1/opamp`).
    pub opamp_addr: SocketAddr,
    /// The API endpoint (`/healthz`, `/readyz`, `/api/v1/agents`, the dispatch API).
    pub api_addr: SocketAddr,
    /// The metrics endpoint (`/metrics`); `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// Admit agents without a token into this namespace.
    pub anonymous_namespace: Option<String>,
    /// Manage only these namespaces (default: all).
    pub namespaces: Option<Vec<String>>,
    /// Serve OpAMP over TLS with this certificate and key (reloaded when they change).
    pub tls: Option<TlsFiles>,
    /// Elect a leader among replicas (only the leader writes status); `None`: always lead.
    pub leader_election: Option<LeaderElectionConfig>,
    /// How long stopping waits for callbacks in flight.
    pub shutdown_grace: Duration,
    /// Where CapabilitySlot callbacks may go (default: not to loopback, link-local, metadata
    /// or the API server; see [`crate::routes::egress`]).
    pub callback_egress: EgressPolicy,
    pub fleet: FleetConfig,
    pub server: ServerConfig,
    /// Deadlines and connection cap of the API and metrics addresses (each).
    pub api_limits: crate::http_server::Limits,
}

impl Default for OperatorConfig {
    /// The defaults of `opamp-operator run`, without a metrics endpoint.
    fn default() -> Self {
        Self {
            opamp_addr: ([0, 0, 0, 0], 4320).into(),
            api_addr: ([0, 0, 0, 0], 8080).into(),
            metrics_addr: None,
            anonymous_namespace: None,
            namespaces: None,
            tls: None,
            leader_election: None,
            shutdown_grace: Duration::from_secs(10),
            callback_egress: EgressPolicy::default(),
            fleet: FleetConfig::default(),
            server: ServerConfig::default(),
            api_limits: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Kubernetes API: {0}")]
    Unreachable(#[source] kube::Error),
    #[error(
        "the opamp.dev CustomResourceDefinitions are not installed (kubectl apply -f crds/): {0} is missing"
    )]
    CrdsMissing(&'static str),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Unreachable(_) => "unreachable",
            Error::CrdsMissing(_) => "crds_missing",
            Error::Listen { .. } => "listen",
            Error::Tls(_) => "tls",
        }
    }
}

/// A running operator.
pub struct Operator {
    pub fleet: Fleet,
    pub opamp_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    routes: Arc<Routes>,
    grace: Duration,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

/// Raises the process's open-file limit as far as allowed (each agent connection is one file):
/// the new soft limit, 0 when it cannot be read or raised.
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Checks the API server answers and our CRDs are served.
pub async fn preflight(client: &Client) -> Result<(), Error> {
    client.apiserver_version().await.map_err(Error::Unreachable)?;
    let resources = client.list_api_group_resources("opamp.dev/v1alpha1").await;
    let served = match resources {
        Ok(list) => list.resources.into_iter().map(|r| r.name).collect::<Vec<_>>(),
        Err(kube::Error::Api(e)) if e.code == 404 => vec![],
        Err(e) => return Err(Error::Unreachable(e)),
    };
    for plural in ["agentconfigs", "capabilityslots"] {
        if !served.iter().any(|n| n == plural) {
            return Err(Error::CrdsMissing(if plural == "agentconfigs" {
                "agentconfigs.opamp.dev"
            } else {
                "capabilityslots.opamp.dev"
            }));
        }
    }
    Ok(())
}

impl Operator {
    /// Starts everything; the OpAMP endpoint opens once the caches are synced (so agents'
    /// tokens are known).
    pub async fn start(client: Client, config: OperatorConfig) -> Result<Self, Error> {
        preflight(&client).await?;
        let listen = |addr| async move {
            TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
        };
        let opamp_listener = listen(config.opamp_addr).await?;
        let api_listener = listen(config.api_addr).await?;
        let opamp_addr = opamp_listener
            .local_addr()
            .map_err(|source| Error::Listen { addr: config.opamp_addr, source })?;
        let api_addr =
            api_listener.local_addr().map_err(|source| Error::Listen { addr: config.api_addr, source })?;

        let fleet = Fleet::new(config.fleet.clone());
        let auth = TokenAuthenticator::new(config.anonymous_namespace.as_deref());
        let shutdown = CancellationToken::new();
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();

        let metrics = Metrics::new();
        let egress = config.callback_egress.clone().resolve_api_server().await;
        let routes = Routes::new(fleet.clone(), metrics.routes.clone(), egress);
        fleet.set_custom_message_sink(routes.clone());
        tasks.spawn(routes.clone().run_expiry(shutdown.clone()));
        let scope = config.namespaces.clone().map(Scope::only).unwrap_or_default();
        let mut controller = Controller::new(
            client.clone(),
            fleet.clone(),
            auth.clone(),
            routes.clone(),
            scope,
            metrics.controller.clone(),
        );
        if let Some(election) = config.leader_election.clone() {
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
            controller = controller.with_leadership(leader_rx);
            tasks.spawn(leader::run(client.clone(), election, leader_tx, shutdown.clone()));
        }
        tasks.spawn(controller.run(shutdown.clone(), ready_tx));

        let ready = ready_rx.clone();
        let access = Arc::new(crate::access::KubeAccess::new(client.clone()));
        let api = crate::routes::dispatch::router(routes.clone())
            .merge(crate::agents_api::router(fleet.clone(), access))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = *ready.borrow();
                    async move {
                        if ready {
                            (StatusCode::OK, "ready")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                        }
                    }
                }),
            );
        let limits = config.api_limits.clone();
        tasks.spawn(crate::http_server::serve(api_listener, api, limits.clone(), shutdown.clone()));

        let metrics_addr = match config.metrics_addr {
            Some(addr) => {
                let listener = listen(addr).await?;
                let bound = listener.local_addr().map_err(|source| Error::Listen { addr, source })?;
                let (m, f, stop) = (metrics.clone(), fleet.clone(), shutdown.clone());
                let app = axum::Router::new().route(
                    "/metrics",
                    get(move || {
                        m.observe_fleet(&f);
                        let body = m.encode();
                        async move {
                            (
                                [(
                                    axum::http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )],
                                body,
                            )
                        }
                    }),
                );
                tasks.spawn(crate::http_server::serve(listener, app, limits, stop));
                Some(bound)
            }
            None => None,
        };
        if let Some(files) = &config.tls {
            files.load().await?; // fail at start, clearly, on a bad certificate
        }
        let tls = config.tls.clone();
        let server = OpampServer::with_auth(fleet.clone(), config.server.clone(), auth)
            .with_metrics(metrics.server.clone());
        let server_shutdown = server.shutdown_token();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = ready_rx.wait_for(|r| *r) => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            tracing::info!(addr = %opamp_addr, "serving OpAMP on /v1/opamp");
            tokio::spawn(async move {
                stop.cancelled().await;
                server_shutdown.cancel();
            });
            let result = match tls {
                Some(files) => server.serve_tls(opamp_listener, files).await.map_err(|e| e.to_string()),
                None => server.serve(opamp_listener).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "OpAMP endpoint failed");
            }
        });
        Ok(Self {
            fleet,
            opamp_addr,
            api_addr,
            metrics_addr,
            routes,
            grace: config.shutdown_grace,
            shutdown,
            tasks,
        })
    }

    /// Stops everything: no new connections, WebSockets close with 1001 so agents reconnect
    /// to another replica, callbacks in flight or queued get up to the grace period to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let pending = self.routes.drain(self.grace).await;
        if pending > 0 {
            tracing::warn!(pending, grace = ?self.grace, "callbacks not delivered before shutdown");
        }
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops at once without any cleanup, as a crash would (the Lease is not released).
    pub fn kill(mut self) {
        self.tasks.abort_all();
        self.shutdown.cancel();
    }

    /// Runs until `signal` resolves, then stops.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.stop().await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
