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

use crate::agents_api::aggregated::AggregatedApi;
use crate::agents_api::frontproxy::{FrontProxy, ServingFiles};
use crate::controller::auth::TokenAuthenticator;
use crate::controller::leader::{self, LeaderElectionConfig};
use crate::controller::{Controller, Scope};
use crate::fleet::{Fleet, FleetConfig};
use crate::metrics::Metrics;
use crate::opamp::tls::TlsError;
use crate::opamp::{OpampServer, ServerConfig, TlsFiles};
use crate::peers::{Peers, PeersConfig};
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
    /// The aggregated API (`agents` of `fleet.opamp.dev/v1alpha1`); `None` serves none.
    pub aggregated_api: Option<AggregatedApiConfig>,
    /// Admit agents without a token into this namespace.
    pub anonymous_namespace: Option<String>,
    /// Manage only these namespaces (default: all).
    pub namespaces: Option<Vec<String>>,
    /// Serve OpAMP over TLS with this certificate and key (reloaded when they change).
    pub tls: Option<TlsFiles>,
    /// Elect a leader among replicas (only the leader writes status); `None`: always lead.
    pub leader_election: Option<LeaderElectionConfig>,
    /// Act as one operator with the other replicas of the group (membership, merged status,
    /// forwarding; see [`crate::peers`]); `None`: alone. An empty `address` is filled with the
    /// peer address's bound one.
    pub peers: Option<PeersConfig>,
    /// The peer address (`/peer/v1/…`, for the other replicas only), served with `peers`.
    pub peer_addr: SocketAddr,
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
            aggregated_api: None,
            anonymous_namespace: None,
            namespaces: None,
            tls: None,
            leader_election: None,
            peers: None,
            peer_addr: ([0, 0, 0, 0], 8081).into(),
            shutdown_grace: Duration::from_secs(10),
            callback_egress: EgressPolicy::default(),
            fleet: FleetConfig::default(),
            server: ServerConfig::default(),
            api_limits: Default::default(),
        }
    }
}

/// Where and how the aggregated API is served (see [`crate::agents_api::aggregated`]).
#[derive(Debug, Clone)]
pub struct AggregatedApiConfig {
    pub addr: SocketAddr,
    /// The serving certificate; `None`: self-signed for `names`.
    pub files: Option<ServingFiles>,
    /// DNS names and IPs of a self-signed certificate.
    pub names: Vec<String>,
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
    #[error("cannot tell which user peers run as (a SelfSubjectReview): {0}")]
    PeerIdentity(#[source] kube::Error),
    #[error(transparent)]
    AggregatedApi(#[from] crate::agents_api::frontproxy::ServingError),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Unreachable(_) => "unreachable",
            Error::CrdsMissing(_) => "crds_missing",
            Error::Listen { .. } => "listen",
            Error::Tls(_) => "tls",
            Error::PeerIdentity(_) => "peer_identity",
            Error::AggregatedApi(_) => "aggregated_api",
        }
    }
}

/// Connections the peer address holds open at once (from the other replicas only).
pub const PEER_CONNECTIONS: usize = 1024;

/// A running operator.
pub struct Operator {
    pub fleet: Fleet,
    pub opamp_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The aggregated API's address, when served.
    pub aggregated_api_addr: Option<SocketAddr>,
    /// The peer address, when replicas act as one.
    pub peer_addr: Option<SocketAddr>,
    /// This replica's view of the others.
    pub peers: Peers,
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
        let opamp_listener = crate::opamp::listen(config.opamp_addr)
            .map_err(|source| Error::Listen { addr: config.opamp_addr, source })?;
        let api_listener = listen(config.api_addr).await?;
        let opamp_addr = opamp_listener
            .local_addr()
            .map_err(|source| Error::Listen { addr: config.opamp_addr, source })?;
        let api_addr =
            api_listener.local_addr().map_err(|source| Error::Listen { addr: config.api_addr, source })?;

        let fleet = Fleet::new(config.fleet.clone());
        let metrics = Metrics::new();
        let (peers, peer_listener) = match &config.peers {
            Some(p) => {
                let listener = listen(config.peer_addr).await?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| Error::Listen { addr: config.peer_addr, source })?;
                let mut p = p.clone();
                if p.address.is_empty() {
                    p.address = bound.to_string();
                }
                let mut verifier = crate::peers::auth::Verifier::new(client.clone(), p.allowed_users.clone())
                    .await
                    .map_err(Error::PeerIdentity)?;
                verifier.refused = Some(metrics.peers.clone());
                let peers = crate::peers::membership::peers(&p, metrics.peers.clone());
                (peers, Some((listener, bound, p, Arc::new(verifier))))
            }
            None => (Peers::solo(), None),
        };
        let auth = TokenAuthenticator::new(config.anonymous_namespace.as_deref());
        let shutdown = CancellationToken::new();
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();

        let egress = config.callback_egress.clone().resolve_api_server().await;
        let routes = Routes::with_peers(fleet.clone(), metrics.routes.clone(), egress, peers.clone());
        fleet.set_custom_message_sink(routes.clone());
        tasks.spawn(routes.clone().run_expiry(shutdown.clone()));
        if config.peers.is_some() {
            tasks.spawn(routes.clone().run_claims(shutdown.clone()));
        }
        let scope = config.namespaces.clone().map(Scope::only).unwrap_or_default();
        let mut controller = Controller::new(
            client.clone(),
            fleet.clone(),
            auth.clone(),
            routes.clone(),
            scope,
            metrics.controller.clone(),
        )
        .with_peers(peers.clone());
        if let Some(election) = config.leader_election.clone() {
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
            controller = controller.with_leadership(leader_rx);
            tasks.spawn(leader::run(client.clone(), election, leader_tx, shutdown.clone()));
        }
        let status_api = controller.peer_router();
        tasks.spawn(controller.run(shutdown.clone(), ready_tx));

        let ready = ready_rx.clone();
        let access = Arc::new(crate::access::KubeAccess::new(client.clone()));
        let aggregated_api_addr = match &config.aggregated_api {
            Some(agg) => {
                let listener = listen(agg.addr).await?;
                let bound =
                    listener.local_addr().map_err(|source| Error::Listen { addr: agg.addr, source })?;
                let proxy = FrontProxy::new(agg.files.clone(), &agg.names)?;
                tasks.spawn(proxy.clone().run(client.clone(), shutdown.clone()));
                let tls = proxy.tls();
                let state = AggregatedApi::new(
                    fleet.clone(),
                    access.clone(),
                    peers.clone(),
                    proxy,
                    shutdown.clone(),
                    metrics.agents_api.clone(),
                );
                let app = crate::agents_api::aggregated::router(Arc::new(state));
                let limits = config.api_limits.clone();
                tasks.spawn(crate::http_server::serve_tls(listener, app, limits, shutdown.clone(), tls));
                Some(bound)
            }
            None => None,
        };
        let api = crate::routes::dispatch::router(routes.clone())
            .merge(crate::agents_api::router(fleet.clone(), access, peers.clone()))
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

        let server = OpampServer::with_auth(fleet.clone(), config.server.clone(), auth)
            .with_metrics(metrics.server.clone());
        let server = if peer_listener.is_some() { server.with_peers(peers.clone()) } else { server };
        let peer_addr = match peer_listener {
            Some((listener, bound, peer_config, verifier)) => {
                let me = peers.me().identity.clone();
                let api = axum::Router::new()
                    .route("/ping", axum::routing::post(move || async move { axum::Json(me.to_string()) }))
                    .merge(server.peer_router())
                    .merge(crate::routes::peer::router(routes.clone()))
                    .merge(crate::agents_api::peer_router(fleet.clone()))
                    .merge(crate::agents_api::aggregated::peer_router(fleet.clone()))
                    .merge(status_api);
                let app = axum::Router::new()
                    .nest(crate::peers::PREFIX, api)
                    .layer(axum::middleware::from_fn_with_state(verifier, crate::peers::auth::require_peer));
                // Each peer may forward up to --max-http-forwards polls at once, each on a
                // connection of its own: room for several peers' worth.
                let peer_limits =
                    crate::http_server::Limits { max_connections: PEER_CONNECTIONS, ..limits.clone() };
                tasks.spawn(crate::http_server::serve(listener, app, peer_limits, shutdown.clone()));
                // Join once the caches are synced: until then this replica cannot authenticate
                // the agents routed to it.
                let (client, peers, stop, mut ready) =
                    (client.clone(), peers.clone(), shutdown.clone(), ready_rx.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        r = ready.wait_for(|r| *r) => if r.is_err() { return },
                        _ = stop.cancelled() => return,
                    }
                    crate::peers::membership::run(client, peer_config, peers, stop).await;
                });
                Some(bound)
            }
            None => None,
        };
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
            aggregated_api_addr,
            peer_addr,
            peers,
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
