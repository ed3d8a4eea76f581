//! The `opamp-operator` command: thin wiring over the library.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use opamp_operator::fleet::{Fleet, FleetConfig};
use opamp_operator::opamp::{OpampServer, ServerConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "opamp-operator",
    version,
    propagate_version = true,
    about = "Manages fleets of OpAMP agents from Kubernetes"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "OPAMP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: watch the custom resources, serve OpAMP, write status.
    Run(Box<RunArgs>),
    /// Serve the OpAMP endpoint alone, without Kubernetes (every agent in namespace `default`).
    Serve(ServeArgs),
    /// Print the CustomResourceDefinitions (or write one file per kind into a directory).
    Crds {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Simulate a fleet of agents against an OpAMP server (load testing, sizing).
    FleetSim(FleetSimArgs),
}

#[derive(clap::Args)]
struct FleetSimArgs {
    /// Server URL: ws://host:port/v1/opamp (WebSocket agents) or http://… (HTTP agents).
    #[arg(long, default_value = "ws://127.0.0.1:4320/v1/opamp")]
    url: String,
    /// Number of agents.
    #[arg(long, short = 'n', default_value_t = 1000)]
    agents: usize,
    /// Heartbeat (WebSocket) or poll (HTTP) interval, in seconds.
    #[arg(long, default_value_t = 30.0)]
    heartbeat_seconds: f64,
    /// New agents per second while ramping up.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,
    /// Fraction of agents that report FAILED for every config (0..=1).
    #[arg(long, default_value_t = 0.0)]
    fail_fraction: f64,
    /// Bearer token the agents present; repeated: agent i presents token i % k (agents spread
    /// over as many namespaces).
    #[arg(long, env = "OPAMP_AGENT_TOKEN")]
    token: Vec<String>,
    /// Seconds to keep the fleet connected once all are in (default: until Ctrl-C).
    #[arg(long)]
    hold_seconds: Option<f64>,
    /// What the agents report: `light` (a few attributes, a one-line config) or `collector`
    /// (what the collector the tests build reports under the supervisor, captured by
    /// tests/bench/capture-collector: its description, one of four effective configs, its
    /// health and AvailableComponents).
    #[arg(long, default_value = "light")]
    payload: opamp_operator::sim::payload::Payload,
    /// Agents whose connection ends (server restarted, closed) keep their state (uid, applied
    /// config, sequence numbers) and connect again with a backoff (0.5 s doubling to 5 s,
    /// jittered; as long as the server asks when it does), full state first. Without: an agent
    /// whose connection ends stops.
    #[arg(long)]
    reconnect: bool,
    /// PEM file of the certificate(s) to trust for a wss:// URL (the connection set-up time,
    /// TCP + TLS + upgrade + first reply, is the first-reply figure).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Serve `GET /stats` here while running: JSON {"agents", "connected" (now), "connects"
    /// (successful connections, reconnections included), "messages_sent", "configs_received",
    /// "duplicate_configs" (received for the hash the agent already reported APPLIED),
    /// "configs_applied", "configs_failed", "retries_advised", "errors" (connections that
    /// failed or ended on an error)}. Unauthenticated: bind it to loopback.
    #[arg(long)]
    stats_addr: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    opamp: OpampArgs,
    /// Serve the benchmark admin endpoint here (off by default; see `make bench`):
    /// `POST /admin/config` makes its body the remote config of every agent (one file
    /// `bench.yaml`, hash = sha256 of the body) and `GET /admin/stats` returns
    /// `{"connected", "applied", "messages"}`. Unauthenticated: bind it to loopback.
    #[arg(long, env = "OPAMP_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    opamp: OpampArgs,
    /// Address of the API endpoint (`/healthz`, `/readyz`, `/api/v1/agents`).
    #[arg(long, env = "OPAMP_API_ADDR", default_value = "0.0.0.0:8080")]
    api_addr: SocketAddr,
    /// Address of the metrics endpoint (`/metrics`, Prometheus text format).
    #[arg(long, env = "OPAMP_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Address of the aggregated API (HTTPS; `agents` of `fleet.opamp.dev/v1alpha1`, called by
    /// the API server through an APIService); `off` serves none.
    #[arg(long, env = "OPAMP_AGGREGATED_API_ADDR", default_value = "0.0.0.0:8443")]
    aggregated_api_addr: OptionalAddr,
    /// The aggregated API's serving certificate (PEM; reloaded when it changes). Without it, a
    /// self-signed one is made at start (the APIService then needs insecureSkipTLSVerify).
    #[arg(long, env = "OPAMP_AGGREGATED_API_CERT_FILE", requires = "aggregated_api_key_file")]
    aggregated_api_cert_file: Option<std::path::PathBuf>,
    /// The key of `--aggregated-api-cert-file` (PEM).
    #[arg(long, env = "OPAMP_AGGREGATED_API_KEY_FILE", requires = "aggregated_api_cert_file")]
    aggregated_api_key_file: Option<std::path::PathBuf>,
    /// Admit agents without a token into this namespace (off by default).
    #[arg(long, env = "OPAMP_ANONYMOUS_AGENTS_NAMESPACE")]
    anonymous_agents_namespace: Option<String>,
    /// Manage only these namespaces (comma-separated; default: all).
    #[arg(long, env = "OPAMP_NAMESPACES", value_delimiter = ',')]
    namespaces: Option<Vec<String>>,
    /// Elect a leader among replicas through a Lease (only the leader writes status).
    #[arg(long, env = "OPAMP_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Seconds the leader's Lease lasts without renewal: after a leader is killed, another
    /// replica takes over after at most this long (renewed every third of it).
    #[arg(long, env = "OPAMP_LEADER_ELECTION_LEASE_SECONDS", default_value_t = 15)]
    leader_election_lease_seconds: u64,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The uid of the pod this replica runs in (the chart sets it from the downward API). With
    /// `POD_NAME`, the Leases this replica holds are owned by its pod, and the cluster deletes
    /// them with it: after `helm uninstall` the replica may no longer delete them itself.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Act as one operator with the other replicas of `--peer-group`: a Lease per replica in
    /// the pod's namespace, merged status, dispatch and HTTP agents forwarded between them.
    #[arg(long, env = "OPAMP_PEERS")]
    peers: bool,
    /// The replicas' group (their Leases are `<group>-<identity>`).
    #[arg(long, env = "OPAMP_PEER_GROUP", default_value = "opamp-operator")]
    peer_group: String,
    /// Address of the peer endpoint (`/peer/v1/…`, for the other replicas only).
    #[arg(long, env = "OPAMP_PEER_ADDR", default_value = "0.0.0.0:8081")]
    peer_addr: SocketAddr,
    /// Where the other replicas reach this one (`host:port`; default: `$POD_IP` and the port
    /// of `--peer-addr`).
    #[arg(long, env = "OPAMP_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// This replica's token for its peers: a service-account token of audience
    /// `opamp-operator.opamp.dev/peers` (the chart projects one).
    #[arg(long, env = "OPAMP_PEER_TOKEN_FILE", default_value = "/var/run/secrets/opamp.dev/peers/token")]
    peer_token_file: std::path::PathBuf,
    /// Users whose peer tokens are accepted (comma-separated; default: this replica's own).
    #[arg(long, env = "OPAMP_PEER_USERS", value_delimiter = ',')]
    peer_users: Vec<String>,
    /// Seconds a replica's Lease lasts without renewal (a killed replica's agents stop
    /// counting after it; renewed every third of it).
    #[arg(long, env = "OPAMP_PEER_LEASE_SECONDS", default_value_t = 15)]
    peer_lease_seconds: u64,
    /// On SIGTERM, how long to wait for callbacks in flight before exiting.
    #[arg(long, env = "OPAMP_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    shutdown_grace_seconds: u64,
    /// Let CapabilitySlot callbacks reach these destinations, which are refused by default
    /// (loopback, link-local and metadata addresses, the API server): comma-separated CIDRs,
    /// addresses, host names or `*.domain`s.
    #[arg(long, env = "OPAMP_CALLBACK_ALLOW", value_delimiter = ',')]
    callback_allow: Vec<String>,
}

/// The OpAMP endpoint's settings, shared by `run` and `serve`.
#[derive(clap::Args)]
struct OpampArgs {
    /// Address of the OpAMP endpoint (`/v1/opamp`, WebSocket and HTTP).
    #[arg(long, env = "OPAMP_ADDR", default_value = "0.0.0.0:4320")]
    opamp_addr: SocketAddr,
    /// Connected agents beyond this are told to retry later.
    #[arg(long, env = "OPAMP_MAX_AGENTS")]
    max_agents: Option<usize>,
    /// Agents one namespace may have (connected, or offline and not yet forgotten); new ones
    /// beyond it are told to retry later. 0: no limit.
    #[arg(long, env = "OPAMP_MAX_AGENTS_PER_NAMESPACE", default_value_t = opamp_operator::fleet::MAX_AGENTS_PER_NAMESPACE_DEFAULT)]
    max_agents_per_namespace: usize,
    /// Bytes of reported state (description, health, effective config, statuses, components)
    /// kept per agent; larger parts are dropped and the agent flagged.
    #[arg(long, env = "OPAMP_MAX_REPORTED_BYTES_PER_AGENT", default_value_t = opamp_operator::fleet::MAX_REPORTED_BYTES_PER_AGENT_DEFAULT)]
    max_reported_bytes_per_agent: usize,
    /// Bytes of reported state kept per namespace, its agents together.
    #[arg(long, env = "OPAMP_MAX_REPORTED_BYTES_PER_NAMESPACE", default_value_t = opamp_operator::fleet::MAX_REPORTED_BYTES_PER_NAMESPACE_DEFAULT)]
    max_reported_bytes_per_namespace: usize,
    /// Largest accepted message, in bytes.
    #[arg(long, env = "OPAMP_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Heartbeat interval agents are expected to keep, in seconds (HTTP agents silent for three
    /// intervals count as disconnected).
    #[arg(long, env = "OPAMP_HEARTBEAT_SECONDS", default_value_t = 30)]
    heartbeat_seconds: u64,
    /// Threads serving the OpAMP endpoint, each a single-threaded event loop that owns the
    /// connections it accepts (default: half the CPUs, at least one).
    #[arg(long, env = "OPAMP_THREADS")]
    opamp_threads: Option<usize>,
    /// Connections open at once on the OpAMP endpoint; at the limit it stops accepting until one
    /// closes (default: the soft open-file limit less a reserve of 10 %, at least 256, for the
    /// rest of the process).
    #[arg(long, env = "OPAMP_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// New agent sessions let in per second (WebSocket upgrades, HTTP polls of agents not
    /// connected here), a burst of one second's worth; beyond it agents are refused with 503,
    /// Retry-After and UNAVAILABLE + retry_info (jittered, growing with the backlog, at most
    /// 30 s). 0: no pacing.
    #[arg(long, env = "OPAMP_MAX_CONNECTS_PER_SECOND", default_value_t = opamp_operator::opamp::MAX_CONNECTS_PER_SECOND_DEFAULT)]
    max_connects_per_second: u32,
    /// Seconds for a TLS handshake to finish.
    #[arg(long, env = "OPAMP_TLS_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = 10, value_parser = seconds())]
    tls_handshake_timeout_seconds: u64,
    /// Seconds for a request's head to arrive whole, from the accept or from its first byte on a
    /// kept-alive connection.
    #[arg(long, env = "OPAMP_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10, value_parser = seconds())]
    header_read_timeout_seconds: u64,
    /// Seconds for a request's body to arrive whole after its head.
    #[arg(long, env = "OPAMP_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30, value_parser = seconds())]
    body_read_timeout_seconds: u64,
    /// Seconds a kept-alive HTTP connection may wait for its next request; keep it above the
    /// agents' poll interval.
    #[arg(long, env = "OPAMP_IDLE_TIMEOUT_SECONDS", default_value_t = 90, value_parser = seconds())]
    idle_timeout_seconds: u64,
    /// Seconds after a WebSocket upgrade for the agent's first message.
    #[arg(long, env = "OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS", default_value_t = 30, value_parser = seconds())]
    ws_first_message_timeout_seconds: u64,
    /// Plain-HTTP polls forwarded to the replica that owns their agent at once (with --peers);
    /// beyond, a poll waits up to a second, then gets 503 with Retry-After.
    #[arg(long, env = "OPAMP_MAX_HTTP_FORWARDS", default_value_t = opamp_operator::opamp::MAX_FORWARDS_DEFAULT, value_parser = clap::value_parser!(usize))]
    max_http_forwards: usize,
    /// PEM certificate (chain) for TLS on the OpAMP endpoint (wss://, https://); reloaded when
    /// the file changes.
    #[arg(long, env = "OPAMP_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert-file.
    #[arg(long, env = "OPAMP_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
}

/// A whole number of seconds, at least one (a zero deadline would close every connection).
fn seconds() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Serve(args) => serve(args).await,
        Command::FleetSim(args) => fleet_sim(args).await,
        Command::Crds { out_dir } => crds(out_dir),
    }
}

fn crds(out_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let crds = opamp_operator::api::crds();
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            for (file, yaml) in crds {
                let path = dir.join(file);
                std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        None => {
            let docs: Vec<String> = crds.into_iter().map(|(_, yaml)| yaml).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

async fn fleet_sim(args: FleetSimArgs) -> anyhow::Result<()> {
    use opamp_operator::operator::raise_fd_limit;
    use opamp_operator::protocol::Transport;
    use opamp_operator::sim::fleet::{FleetSimConfig, SimOptions, run_with};
    let transport = match args.url.split("://").next() {
        Some("ws" | "wss") => Transport::WebSocket,
        Some("http" | "https") => Transport::Http,
        _ => anyhow::bail!("--url must start with ws://, wss://, http:// or https://"),
    };
    anyhow::ensure!((0.0..=1.0).contains(&args.fail_fraction), "--fail-fraction must be within 0..=1");
    let limit = raise_fd_limit();
    anyhow::ensure!(
        limit as usize > args.agents + 64,
        "the open-file limit is {limit}: too low for {} agents (raise it with ulimit -n)",
        args.agents
    );
    let config = FleetSimConfig {
        url: args.url,
        transport,
        agents: args.agents,
        heartbeat: Duration::from_secs_f64(args.heartbeat_seconds),
        connect_rate: args.connect_rate,
        fail_fraction: args.fail_fraction,
        token: args.token.first().cloned(),
        hold: args.hold_seconds.map(Duration::from_secs_f64),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    let tls = match &args.ca_file {
        Some(path) => Some(opamp_operator::sim::tls_trusting(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    anyhow::ensure!(
        !config.url.starts_with("https://"),
        "https:// agents are not supported yet (the HTTP client is built without TLS): use wss://"
    );
    anyhow::ensure!(!config.url.starts_with("wss://") || tls.is_some(), "wss:// needs --ca-file");
    let options = SimOptions {
        payload: args.payload,
        reconnect: args.reconnect,
        tls,
        tokens: args.token,
        stats_addr: args.stats_addr,
    };
    let report = run_with(config, options, shutdown).await;
    println!("{report}");
    anyhow::ensure!(report.errors == 0, "{} agents failed", report.errors);
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use opamp_operator::operator::{AggregatedApiConfig, Operator, OperatorConfig};
    opamp_operator::operator::raise_fd_limit();
    // Empty entries (an empty OPAMP_CALLBACK_ALLOW) allow nothing.
    let allow = args.callback_allow.iter().filter(|a| !a.trim().is_empty()).map(|a| a.parse());
    let allow = allow.collect::<Result<Vec<_>, _>>().context("invalid --callback-allow")?;
    let kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found (set KUBECONFIG, or run in a cluster)")?;
    // Callbacks must not reach the API server we talk to, whatever its address.
    let callback_egress = opamp_operator::routes::egress::EgressPolicy::new(allow)
        .with_api_server(kube_config.cluster_url.host().unwrap_or_default());
    let api_server = kube_config.cluster_url.to_string();
    let client = kube::Client::try_from(kube_config).context("cannot build the Kubernetes client")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), uuid::Uuid::new_v4().simple())
    });
    let lease_owner = args.identity.clone().zip(args.pod_uid.clone()).map(|(name, uid)| OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name,
        uid,
        ..Default::default()
    });
    let peers = if args.peers {
        let advertise = match (&args.peer_advertise, std::env::var("POD_IP")) {
            (Some(a), _) => a.clone(),
            (None, Ok(ip)) if ip.contains(':') => format!("[{ip}]:{}", args.peer_addr.port()),
            (None, Ok(ip)) => format!("{ip}:{}", args.peer_addr.port()),
            (None, Err(_)) => String::new(), // the bound address
        };
        let mut p = opamp_operator::peers::PeersConfig::new(
            &args.leader_election_namespace,
            &identity,
            &advertise,
            args.peer_token_file.clone(),
        );
        p.group = args.peer_group.clone();
        p.allowed_users = args.peer_users.iter().filter(|u| !u.trim().is_empty()).cloned().collect();
        p.lease_duration = Duration::from_secs(args.peer_lease_seconds.max(3));
        p.renew_every = p.lease_duration / 3;
        p.owner = lease_owner.clone();
        Some(p)
    } else {
        None
    };
    let config = OperatorConfig {
        peers,
        peer_addr: args.peer_addr,
        opamp_addr: args.opamp.opamp_addr,
        api_addr: args.api_addr,
        metrics_addr: Some(args.metrics_addr),
        aggregated_api: args.aggregated_api_addr.0.map(|addr| AggregatedApiConfig {
            addr,
            files: args
                .aggregated_api_cert_file
                .clone()
                .zip(args.aggregated_api_key_file.clone())
                .map(|(cert, key)| opamp_operator::agents_api::frontproxy::ServingFiles { cert, key }),
            names: vec!["localhost".into(), "127.0.0.1".into()],
        }),
        anonymous_namespace: args.anonymous_agents_namespace,
        namespaces: args.namespaces,
        tls: args.opamp.tls(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
        callback_egress,
        leader_election: args.leader_election.then(|| {
            let mut election = opamp_operator::controller::leader::LeaderElectionConfig::new(
                &args.leader_election_namespace,
                &identity,
            );
            election.lease_duration = Duration::from_secs(args.leader_election_lease_seconds.max(3));
            election.owner = lease_owner.clone();
            election.renew_every = election.lease_duration / 3;
            election
        }),
        fleet: args.opamp.fleet_config(),
        server: args.opamp.server_config(),
        api_limits: Default::default(),
    };
    // An API server that is not there yet (a control plane starting, a network blip) is waited
    // for, with one clear line per try, rather than exiting. Meanwhile the API address answers
    // `/healthz` (alive: a liveness probe must not restart a process that is only waiting) and
    // `/readyz` with 503.
    let waiting = WaitingApi::serve(args.api_addr).await?;
    let mut wait = Duration::from_secs(1);
    loop {
        match opamp_operator::operator::preflight(&client).await {
            Ok(()) => break,
            Err(e) => {
                let why = match &e {
                    opamp_operator::operator::Error::Unreachable(cause) => {
                        format!("cannot reach the Kubernetes API server at {api_server}: {}", causes(cause))
                    }
                    other => other.to_string(),
                };
                tracing::warn!(
                    category = e.category(),
                    "the Kubernetes API is not ready; retrying in {}s: {why}",
                    wait.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown_signal() => return Ok(()),
                }
                // At most 10 s between tries: the operator serves soon after the API server is back.
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    waiting.stop().await;
    let operator = Operator::start(client, config).await?;
    tracing::info!(opamp = %operator.opamp_addr, api = %operator.api_addr, "operator started");
    operator.run_until(shutdown_signal()).await;
    Ok(())
}

/// `error` and its sources, each once (`outer: inner: …`), down to the root cause (say,
/// "Connection refused").
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// The API address while `run` waits for the Kubernetes API server: `/healthz` answers,
/// `/readyz` says what it waits for (503).
struct WaitingApi {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl WaitingApi {
    async fn serve(addr: SocketAddr) -> anyhow::Result<Self> {
        use axum::routing::get;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let app = axum::Router::new().route("/healthz", get(|| async { "ok" })).route(
            "/readyz",
            get(|| async {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "waiting for the Kubernetes API server")
            }),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let serve = opamp_operator::http_server::serve(listener, app, Default::default(), stop.clone());
        Ok(Self { stop, task: tokio::spawn(serve) })
    }

    /// Stops serving and lets go of the address (the operator binds it next).
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl OpampArgs {
    fn tls(&self) -> Option<opamp_operator::opamp::TlsFiles> {
        Some(opamp_operator::opamp::TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
        })
    }

    fn fleet_config(&self) -> FleetConfig {
        FleetConfig {
            max_agents: self.max_agents,
            max_agents_per_namespace: Some(self.max_agents_per_namespace).filter(|n| *n > 0),
            max_reported_bytes_per_agent: self.max_reported_bytes_per_agent,
            max_reported_bytes_per_namespace: self.max_reported_bytes_per_namespace,
            heartbeat_interval: Duration::from_secs(self.heartbeat_seconds),
            ..Default::default()
        }
    }

    fn server_config(&self) -> ServerConfig {
        if self.idle_timeout_seconds <= self.heartbeat_seconds {
            tracing::warn!(
                idle_timeout_seconds = self.idle_timeout_seconds,
                heartbeat_seconds = self.heartbeat_seconds,
                "the idle timeout does not exceed the heartbeat interval: HTTP agents' kept-alive \
                 connections may close between two polls and fail the next one"
            );
        }
        ServerConfig {
            max_message_bytes: self.max_message_bytes,
            ws_ping_interval: Duration::from_secs(self.heartbeat_seconds),
            event_loops: self.opamp_threads.unwrap_or(ServerConfig::default().event_loops),
            tls_handshake_timeout: Duration::from_secs(self.tls_handshake_timeout_seconds),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_seconds),
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
            ws_first_message_timeout: Duration::from_secs(self.ws_first_message_timeout_seconds),
            max_connections: self.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_forwards: self.max_http_forwards.max(1),
            max_connects_per_second: self.max_connects_per_second,
            ..Default::default()
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs { opamp: args, admin_addr } = args;
    let fleet = Fleet::new(args.fleet_config());
    let metrics = std::sync::Arc::new(opamp_operator::opamp::ServerMetrics::default());
    let server = OpampServer::new(fleet.clone(), args.server_config()).with_metrics(metrics.clone());
    opamp_operator::operator::raise_fd_limit();
    let listener = opamp_operator::opamp::listen(args.opamp_addr)
        .with_context(|| format!("cannot listen on {}", args.opamp_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving OpAMP on /v1/opamp");
    let shutdown = server.shutdown_token();
    if let Some(addr) = admin_addr {
        let admin =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(addr = %admin.local_addr()?, "serving /admin/config and /admin/stats");
        let router = bench_admin::router(fleet, metrics);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(admin, router).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    match args.tls() {
        Some(files) => server.serve_tls(listener, files).await?,
        None => server.serve(listener).await?,
    }
    Ok(())
}

/// `serve --admin-addr`: the admin endpoint of the side-by-side benchmark (`make bench`,
/// tests/bench/run), the same one the opamp-go baseline (tests/bench/server) serves.
mod bench_admin {
    use std::sync::{Arc, RwLock};

    use axum::Json;
    use axum::extract::State;
    use axum::routing::{get, post};
    use bytes::Bytes;
    use opamp_operator::fleet::{DesiredState, Fleet, Plan};
    use opamp_operator::opamp::{KindLabel, ServerMetrics};
    use opamp_operator::proto::{AgentConfigFile, AgentConfigMap, AgentRemoteConfig, RemoteConfigStatuses};
    use sha2::{Digest, Sha256};

    /// The one remote config every agent gets: the plan of the namespace anonymous agents are
    /// in, published on every `POST /admin/config`.
    struct Everyone(Arc<AgentRemoteConfig>);

    impl Plan for Everyone {
        fn desired(
            &self,
            _: &opamp_operator::protocol::Uid,
            _: &opamp_operator::protocol::session::AgentReport,
            _: &DesiredState,
        ) -> DesiredState {
            DesiredState {
                remote_config: Some(self.0.clone()),
                custom_capabilities: None,
                connection_settings: None,
                restart: None,
            }
        }
    }

    struct Admin {
        fleet: Fleet,
        metrics: Arc<ServerMetrics>,
        config: RwLock<Option<Arc<AgentRemoteConfig>>>,
    }

    pub(super) fn router(fleet: Fleet, metrics: Arc<ServerMetrics>) -> axum::Router {
        let config = RwLock::default();
        axum::Router::new()
            .route("/admin/config", post(set_config))
            .route("/admin/stats", get(stats))
            .with_state(Arc::new(Admin { fleet, metrics, config }))
    }

    /// Agents connecting from now on get the config from the plan; known agents get it at once
    /// (connected WebSocket agents pushed, HTTP agents on their next poll).
    async fn set_config(State(admin): State<Arc<Admin>>, body: Bytes) -> Json<serde_json::Value> {
        let hash = Sha256::digest(&body);
        let mut files = AgentConfigMap::default();
        files
            .config_map
            .insert("bench.yaml".into(), AgentConfigFile { body, content_type: "text/yaml".into() });
        let config =
            Arc::new(AgentRemoteConfig { config: Some(files), config_hash: Bytes::copy_from_slice(&hash) });
        *admin.config.write().unwrap() = Some(config.clone());
        admin.fleet.publish_plan("default", Arc::new(Everyone(config)));
        let pushed = admin.fleet.known_count();
        Json(serde_json::json!({ "hash": hex::encode(hash), "pushed": pushed }))
    }

    async fn stats(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
        let current = admin.config.read().unwrap().as_ref().map(|c| c.config_hash.clone());
        let mut applied = 0usize;
        if let Some(hash) = &current {
            admin.fleet.for_each_view(|view| {
                let status = view.report.remote_config_status.as_ref();
                if status.is_some_and(|s| {
                    s.status == RemoteConfigStatuses::Applied as i32 && s.last_remote_config_hash == *hash
                }) {
                    applied += 1;
                }
            });
        }
        let messages: u64 = ["heartbeat", "report", "custom_message", "disconnect"]
            .into_iter()
            .map(|kind| admin.metrics.messages_in.get_or_create(&KindLabel { kind }).get())
            .sum();
        Json(serde_json::json!({
            "connected": admin.fleet.connected_count(),
            "applied": applied,
            "messages": messages,
        }))
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A socket address, or `off` (also `none`, empty) for none.
#[derive(Debug, Clone, Copy)]
struct OptionalAddr(Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "off" | "none" => Ok(Self(None)),
            addr => addr.parse().map(|a| Self(Some(a))).map_err(|e| format!("{addr:?}: {e} (or `off`)")),
        }
    }
}
