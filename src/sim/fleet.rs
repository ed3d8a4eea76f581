//! The fleet simulator: many simulated agents against one OpAMP server, for load tests and
//! sizing. Each agent is a task with its own connection (WebSocket) or poll loop (HTTP); it
//! reports its state, heartbeats, applies configs (a chosen fraction fails) and reports back.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::payload::{CollectorPayload, Payload};
use super::{AgentSpec, HttpClient, SimAgent, WsClient};
use crate::proto::AgentToServer;
use crate::protocol::Transport;

#[derive(Debug, Clone)]
pub struct FleetSimConfig {
    /// `ws://host:port/v1/opamp` or `http://…`.
    pub url: String,
    pub transport: Transport,
    pub agents: usize,
    pub heartbeat: Duration,
    /// New connections per second while ramping up.
    pub connect_rate: u32,
    /// Fraction (0..=1) of agents that report FAILED for every remote config.
    pub fail_fraction: f64,
    pub token: Option<String>,
    /// Stop after this long once every agent has connected (None: until interrupted).
    pub hold: Option<Duration>,
}

/// More of what a run simulates (the defaults: today's light agents).
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// What the agents report.
    pub payload: Payload,
    /// Agents whose connection ends (or cannot be made) connect again, keeping their state
    /// (uid, applied config, sequence numbers), with a jittered backoff from
    /// [`RECONNECT_MIN`] doubling to [`RECONNECT_MAX`], or as long as the server advised; the
    /// first message on each connection is the agent's full state. Without: an agent whose
    /// connection ends stops (an error).
    pub reconnect: bool,
    /// The trust root of `wss://` URLs (the connection set-up, then TCP + TLS + upgrade, is
    /// part of the first-reply time).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Bearer tokens: agent `i` presents token `i % k` (agents spread over namespaces); empty:
    /// every agent presents [`FleetSimConfig::token`].
    pub tokens: Vec<String>,
    /// Serve `GET /stats` here: the run's counters as JSON ([`StatsSnapshot`]).
    pub stats_addr: Option<SocketAddr>,
}

impl SimOptions {
    /// The token agent `i` presents, if any.
    fn token_for(&self, i: usize, config: &FleetSimConfig) -> Option<String> {
        match self.tokens.len() {
            0 => config.token.clone(),
            k => Some(self.tokens[i % k].clone()),
        }
    }
}

/// The first wait before reconnecting (then doubled, jittered, up to [`RECONNECT_MAX`]).
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// The longest wait before reconnecting (unless the server advised a longer one).
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The exponential backoff between reconnection attempts.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: RECONNECT_MIN }
    }

    /// The wait before the next attempt (between half and all of the current step), doubling
    /// the step.
    fn wait(&mut self) -> Duration {
        let wait = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(RECONNECT_MAX);
        wait
    }

    fn reset(&mut self) {
        self.next = RECONNECT_MIN;
    }
}

/// How often the simulator prints a progress line on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Stats {
    /// Agents that got their first reply (ever).
    connected: AtomicUsize,
    /// Agents connected now (WebSocket: from the first reply to the end of the connection;
    /// HTTP: from a successful poll until a failed one).
    live: AtomicUsize,
    /// Successful connections, reconnections included.
    connects: AtomicU64,
    /// Agents that stopped on an error.
    errors: AtomicUsize,
    /// Connections that failed or ended on an error, retried or not.
    connection_errors: AtomicU64,
    configs_received: AtomicU64,
    /// Remote configs received for the hash the agent already reported APPLIED.
    duplicate_configs: AtomicU64,
    messages_sent: AtomicU64,
    configs_applied: AtomicU64,
    configs_failed: AtomicU64,
    /// Times an agent was told to wait before retrying (and did).
    retries_advised: AtomicU64,
    first_reply: Mutex<Option<Histogram<u64>>>,
    reply: Mutex<Option<Histogram<u64>>>,
    last_error: std::sync::Mutex<Option<String>>,
}

/// The counters of a running simulation, as `GET /stats` returns them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Agents simulated.
    pub agents: usize,
    /// Agents connected now.
    pub connected: usize,
    /// Successful connections, reconnections included.
    pub connects: u64,
    pub messages_sent: u64,
    /// Remote configs received.
    pub configs_received: u64,
    /// Remote configs received for the hash the agent already reported APPLIED.
    pub duplicate_configs: u64,
    pub configs_applied: u64,
    pub configs_failed: u64,
    /// Times the server told an agent to wait before trying again.
    pub retries_advised: u64,
    /// Connections that could not be made or ended on an error, retried or not.
    pub errors: u64,
}

impl Stats {
    fn snapshot(&self, agents: usize) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            agents,
            connected: self.live.load(Ordering::Relaxed),
            connects: get(&self.connects),
            messages_sent: get(&self.messages_sent),
            configs_received: get(&self.configs_received),
            duplicate_configs: get(&self.duplicate_configs),
            configs_applied: get(&self.configs_applied),
            configs_failed: get(&self.configs_failed),
            retries_advised: get(&self.retries_advised),
            errors: get(&self.connection_errors),
        }
    }

    /// One progress line: `t=12.3s connected 9000/10000 errors 0 messages 123 applied 0 failed 0`.
    fn progress(&self, agents: usize, started: Instant) -> String {
        format!(
            "t={:.1}s connected {}/{} errors {} messages {} applied {} failed {}",
            started.elapsed().as_secs_f64(),
            self.live.load(Ordering::Relaxed),
            agents,
            self.errors.load(Ordering::Relaxed),
            self.messages_sent.load(Ordering::Relaxed),
            self.configs_applied.load(Ordering::Relaxed),
            self.configs_failed.load(Ordering::Relaxed),
        )
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct FleetSimReport {
    pub agents: usize,
    pub connected: usize,
    pub errors: usize,
    pub ramp: Duration,
    pub messages_sent: u64,
    pub configs_applied: u64,
    pub configs_failed: u64,
    /// Times an agent was refused with retry advice (`Retry-After`, `RetryInfo`) and waited
    /// that long before trying again.
    pub retries_advised: u64,
    /// Percentiles (p50, p90, p99, max) of the first reply and of later replies, in µs.
    pub first_reply_us: [u64; 4],
    pub reply_us: [u64; 4],
    pub last_error: Option<String>,
}

impl std::fmt::Display for FleetSimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |v: &[u64; 4]| format!("p50 {} µs, p90 {} µs, p99 {} µs, max {} µs", v[0], v[1], v[2], v[3]);
        writeln!(
            f,
            "agents:            {} connected of {} ({} errors)",
            self.connected, self.agents, self.errors
        )?;
        writeln!(f, "ramp-up:           {:.2} s", self.ramp.as_secs_f64())?;
        writeln!(f, "messages sent:     {}", self.messages_sent)?;
        writeln!(f, "configs:           {} applied, {} failed", self.configs_applied, self.configs_failed)?;
        writeln!(f, "told to wait:      {}", self.retries_advised)?;
        writeln!(f, "first reply:       {}", p(&self.first_reply_us))?;
        write!(f, "replies:           {}", p(&self.reply_us))?;
        if let Some(e) = &self.last_error {
            write!(f, "\nlast error:        {e}")?;
        }
        Ok(())
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

fn percentiles(h: &Option<Histogram<u64>>) -> [u64; 4] {
    h.as_ref().map_or([0; 4], |h| {
        [h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.max()]
    })
}

/// Runs the simulation until every agent connected and `hold` passed (or `shutdown`).
pub async fn run(config: FleetSimConfig, shutdown: tokio_util::sync::CancellationToken) -> FleetSimReport {
    run_with(config, SimOptions::default(), shutdown).await
}

/// [`run`] with more options.
pub async fn run_with(
    config: FleetSimConfig,
    options: SimOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> FleetSimReport {
    if options.payload == Payload::Collector {
        eprintln!("payload: collector: {}", CollectorPayload::get().sizes());
    }
    let stats = Arc::new(Stats::default());
    if let Some(addr) = options.stats_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let (stats, stop, agents) = (stats.clone(), shutdown.clone(), config.agents);
                let router = axum::Router::new().route(
                    "/stats",
                    axum::routing::get(move || {
                        let snapshot = stats.snapshot(agents);
                        async move { axum::Json(snapshot) }
                    }),
                );
                tokio::spawn(async move {
                    let _ =
                        axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
                });
            }
            Err(e) => {
                let error = format!("cannot listen on {addr}: {e}");
                eprintln!("{error}");
                return FleetSimReport {
                    agents: config.agents,
                    connected: 0,
                    errors: config.agents,
                    ramp: Duration::ZERO,
                    messages_sent: 0,
                    configs_applied: 0,
                    configs_failed: 0,
                    retries_advised: 0,
                    first_reply_us: [0; 4],
                    reply_us: [0; 4],
                    last_error: Some(error),
                };
            }
        }
    }
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(config.connect_rate.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let fail_every =
        if config.fail_fraction > 0.0 { (1.0 / config.fail_fraction).round() as usize } else { 0 };
    let mut next = Instant::now();
    for i in 0..config.agents {
        if shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep_until(next).await;
        next += interval;
        let mut spec = options.payload.spec(i);
        if fail_every == 0 || i % fail_every != 0 {
            spec.fail_marker = None;
        } else {
            spec.fail_marker = Some(String::new()); // every config fails
        }
        let (mut cfg, opts, stats, stop) = (config.clone(), options.clone(), stats.clone(), shutdown.clone());
        cfg.token = options.token_for(i, &config);
        tasks.spawn(async move {
            let result = match cfg.transport {
                Transport::WebSocket => ws_agent(i, spec, &cfg, &opts, &stats, stop).await,
                Transport::Http => http_agent(spec, &cfg, &opts, &stats, stop).await,
            };
            if let Err(e) = result {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().unwrap() = Some(e);
            }
        });
    }
    // Wait until everyone connected (or failed), then hold.
    let mut progress = Instant::now() + PROGRESS_EVERY;
    while stats.connected.load(Ordering::Relaxed) + stats.errors.load(Ordering::Relaxed) < config.agents
        && !shutdown.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Instant::now() >= progress {
            progress += PROGRESS_EVERY;
            eprintln!("{}", stats.progress(config.agents, started));
        }
    }
    let ramp = started.elapsed();
    // The line to wait for in scripts.
    eprintln!(
        "ready: {} agents connected in {:.2} s ({} errors)",
        stats.connected.load(Ordering::Relaxed),
        ramp.as_secs_f64(),
        stats.errors.load(Ordering::Relaxed)
    );
    let hold = async {
        match config.hold {
            Some(hold) => tokio::time::sleep(hold).await,
            None => std::future::pending().await,
        }
    };
    let report_progress = async {
        // While holding: a line whenever agents drop or configs are applied, else once a minute.
        let mut last = (usize::MAX, u64::MAX, u64::MAX);
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            quiet += PROGRESS_EVERY;
            let now = (
                stats.live.load(Ordering::Relaxed),
                stats.configs_applied.load(Ordering::Relaxed),
                stats.configs_failed.load(Ordering::Relaxed),
            );
            if now != last || quiet >= Duration::from_secs(60) {
                eprintln!("{}", stats.progress(config.agents, started));
                (last, quiet) = (now, Duration::ZERO);
            }
        }
    };
    // Agents end early only on errors (the server went away, ...): then there is nothing to hold.
    let all_ended = async {
        while tasks.join_next().await.is_some() {}
        eprintln!("every agent ended: {}", stats.progress(config.agents, started));
    };
    tokio::select! {
        _ = hold => {},
        _ = shutdown.cancelled() => {},
        _ = report_progress => {},
        _ = all_ended => {},
    }
    let connected = stats.connected.load(Ordering::Relaxed);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    FleetSimReport {
        agents: config.agents,
        connected,
        errors: stats.errors.load(Ordering::Relaxed),
        ramp,
        messages_sent: stats.messages_sent.load(Ordering::Relaxed),
        configs_applied: stats.configs_applied.load(Ordering::Relaxed),
        configs_failed: stats.configs_failed.load(Ordering::Relaxed),
        retries_advised: stats.retries_advised.load(Ordering::Relaxed),
        first_reply_us: percentiles(&*stats.first_reply.lock().await),
        reply_us: percentiles(&*stats.reply.lock().await),
        last_error: stats.last_error.lock().unwrap().clone(),
    }
}

async fn record(h: &Mutex<Option<Histogram<u64>>>, since: Instant) {
    let us = since.elapsed().as_micros().max(1) as u64;
    let _ = h.lock().await.get_or_insert_with(histogram).record(us.min(60_000_000));
}

fn count_status(agent: &SimAgent, stats: &Stats) {
    use crate::proto::RemoteConfigStatuses;
    match agent.remote_config_status().map(|s| s.status) {
        Some(s) if s == RemoteConfigStatuses::Failed as i32 => {
            stats.configs_failed.fetch_add(1, Ordering::Relaxed)
        }
        _ => stats.configs_applied.fetch_add(1, Ordering::Relaxed),
    };
}

/// Spreads connections over 250 loopback source addresses (127.0.1.1-250, round robin) so one
/// machine can open more than one address's worth of ephemeral ports, and so the ports a
/// previous run left in TIME_WAIT do not run an address out of them (each holds at most
/// agents/250 of this run's).
fn source_addr(i: usize) -> SocketAddr {
    let n = (i % 250) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, n + 1)), 0)
}

/// The agent reacts to a server message (see [`SimAgent::on_message`]), counted: a remote config
/// received, a duplicate when the agent already reported its hash APPLIED, and the outcome
/// (applied or failed) when the agent took it in.
fn react(agent: &mut SimAgent, msg: &crate::proto::ServerToAgent, stats: &Stats) -> Option<AgentToServer> {
    use crate::proto::RemoteConfigStatuses;
    if let Some(rc) = &msg.remote_config {
        stats.configs_received.fetch_add(1, Ordering::Relaxed);
        if agent.remote_config_status().is_some_and(|s| {
            s.status == RemoteConfigStatuses::Applied as i32 && s.last_remote_config_hash == rc.config_hash
        }) {
            stats.duplicate_configs.fetch_add(1, Ordering::Relaxed);
        }
    }
    let taken = |a: &SimAgent| a.configs_received - a.duplicate_configs;
    let before = taken(agent);
    let out = agent.on_message(msg);
    if taken(agent) > before {
        count_status(agent, stats);
    }
    out
}

/// Why a connection of an agent ended.
enum SessionEnd {
    /// Stopped by the simulator.
    Stopped,
    /// Could not connect, or the connection ended: `advised` is the wait the server asked
    /// for, `connected` whether the connection had been made.
    Failed { error: String, advised: Option<Duration>, connected: bool },
}

/// Waits before reconnecting: as advised (counted) or the next backoff; false when stopped.
async fn wait_to_reconnect(
    agent: &mut SimAgent,
    stats: &Stats,
    backoff: &mut Backoff,
    advised: Option<Duration>,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    match advised {
        Some(wait) => wait_as_advised(agent, stats, wait, stop).await,
        None => {
            tokio::select! {
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(backoff.wait()) => true,
            }
        }
    }
}

async fn ws_agent(
    i: usize,
    spec: AgentSpec,
    cfg: &FleetSimConfig,
    opts: &SimOptions,
    stats: &Stats,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut agent = SimAgent::new(spec);
    let mut backoff = Backoff::new();
    let mut ever = false;
    loop {
        let (error, advised) = match ws_session(i, &mut agent, cfg, opts, stats, &stop, &mut ever).await {
            SessionEnd::Stopped => return Ok(()),
            SessionEnd::Failed { error, advised, connected } => {
                if connected {
                    backoff.reset();
                }
                (error, advised)
            }
        };
        stats.connection_errors.fetch_add(1, Ordering::Relaxed);
        if !opts.reconnect {
            return Err(error);
        }
        if !wait_to_reconnect(&mut agent, stats, &mut backoff, advised, &stop).await {
            return Ok(());
        }
    }
}

/// One WebSocket connection of an agent: connect, send the full state, then heartbeats and
/// answers until it ends. Refusals with retry advice are waited out and retried here.
async fn ws_session(
    i: usize,
    agent: &mut SimAgent,
    cfg: &FleetSimConfig,
    opts: &SimOptions,
    stats: &Stats,
    stop: &tokio_util::sync::CancellationToken,
    ever: &mut bool,
) -> SessionEnd {
    let failed = |error: String| SessionEnd::Failed { error, advised: None, connected: false };
    // Refused (paced, at capacity) with retry advice: wait that long, then connect again.
    let (mut ws, first, t0) = loop {
        let t0 = Instant::now();
        let source = Some(source_addr(i));
        let refused =
            match WsClient::connect_tls(&cfg.url, cfg.token.as_deref(), source, opts.tls.as_ref()).await {
                Ok(mut ws) => {
                    if let Err(e) = ws.send(&agent.full_state()).await {
                        return failed(e.to_string());
                    }
                    let first = match ws.recv().await {
                        Ok(first) => first,
                        Err(e) => return failed(e.to_string()),
                    };
                    match crate::sim::retry_info(&first) {
                        None => break (ws, first, t0),
                        Some(wait) => {
                            ws.close().await;
                            wait
                        }
                    }
                }
                Err(e) => match e.retry_after() {
                    Some(wait) => wait,
                    None => return failed(e.to_string()),
                },
            };
        if !wait_as_advised(agent, stats, refused, stop).await {
            return SessionEnd::Stopped;
        }
    };
    record(&stats.first_reply, t0).await;
    if !std::mem::replace(ever, true) {
        stats.connected.fetch_add(1, Ordering::Relaxed);
    }
    stats.connects.fetch_add(1, Ordering::Relaxed);
    stats.live.fetch_add(1, Ordering::Relaxed);
    stats.messages_sent.fetch_add(1, Ordering::Relaxed);
    let mut pending = react(agent, &first, stats);
    let mut beat = tokio::time::interval_at(Instant::now() + cfg.heartbeat, cfg.heartbeat);
    let mut sent_at = None;
    let ended = |error: String, advised| SessionEnd::Failed { error, advised, connected: true };
    let end = loop {
        if let Some(out) = pending.take() {
            if let Err(e) = ws.send(&out).await {
                break ended(e.to_string(), None);
            }
            sent_at = Some(Instant::now());
            stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.cancelled() => break SessionEnd::Stopped,
            _ = beat.tick() => pending = Some(agent.heartbeat()),
            msg = ws.recv() => match msg {
                Ok(m) => {
                    if let Some(t) = sent_at.take() {
                        record(&stats.reply, t).await;
                    }
                    pending = react(agent, &m, stats);
                    // An UNAVAILABLE error with RetryInfo on a connection: the server wants the
                    // agent to come back after that long.
                    if let Some(wait) = agent.take_retry_advice() {
                        break ended("told to come back later".into(), Some(wait));
                    }
                }
                Err(e) => break ended(e.to_string(), None),
            },
        }
    };
    stats.live.fetch_sub(1, Ordering::Relaxed);
    ws.close().await;
    end
}

/// Waits as the server advised (counted); false when stopped meanwhile.
async fn wait_as_advised(
    agent: &mut SimAgent,
    stats: &Stats,
    wait: Duration,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    agent.told_to_wait(wait);
    stats.retries_advised.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

async fn http_agent(
    spec: AgentSpec,
    cfg: &FleetSimConfig,
    opts: &SimOptions,
    stats: &Stats,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let client = HttpClient::new(&cfg.url, cfg.token.as_deref(), true);
    let mut agent = SimAgent::new(spec);
    let mut backoff = Backoff::new();
    let mut next = Some(agent.full_state());
    // No successful poll yet since the start or the last failure.
    let mut first = true;
    let mut ever = false;
    loop {
        let out = next.take().unwrap_or_else(|| agent.heartbeat());
        let t0 = Instant::now();
        let error = match client.send(&out).await {
            Err(e) => e.to_string(),
            Ok(reply) if reply.status.is_success() => {
                stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                if first {
                    record(&stats.first_reply, t0).await;
                    if !std::mem::replace(&mut ever, true) {
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    stats.live.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    first = false;
                } else {
                    record(&stats.reply, t0).await;
                }
                next = reply.message.and_then(|m| react(&mut agent, &m, stats));
                if next.is_some() {
                    continue; // answer at once, as agents do after applying a config
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(cfg.heartbeat) => {}
                }
                continue;
            }
            Ok(reply) => {
                stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                match reply.retry_after() {
                    // Refused with retry advice: the same message again after that long.
                    Some(wait) => {
                        next = Some(out);
                        if !wait_as_advised(&mut agent, stats, wait, &stop).await {
                            return Ok(());
                        }
                        continue;
                    }
                    None => format!("HTTP {}", reply.status),
                }
            }
        };
        stats.connection_errors.fetch_add(1, Ordering::Relaxed);
        if !std::mem::replace(&mut first, true) {
            stats.live.fetch_sub(1, Ordering::Relaxed);
        }
        if !opts.reconnect {
            return Err(error);
        }
        if !wait_to_reconnect(&mut agent, stats, &mut backoff, None, &stop).await {
            return Ok(());
        }
        // As after a reconnection: everything first.
        next = Some(agent.full_state());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_json_has_the_documented_keys() {
        let stats = Stats::default();
        stats.live.fetch_add(3, Ordering::Relaxed);
        stats.duplicate_configs.fetch_add(2, Ordering::Relaxed);
        let json = serde_json::to_value(stats.snapshot(5)).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = [
            "agents",
            "connected",
            "connects",
            "messages_sent",
            "configs_received",
            "duplicate_configs",
            "configs_applied",
            "configs_failed",
            "retries_advised",
            "errors",
        ];
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        assert_eq!((json["agents"].as_u64(), json["connected"].as_u64()), (Some(5), Some(3)));
        assert_eq!(json["duplicate_configs"].as_u64(), Some(2));
    }

    #[test]
    fn agents_take_the_tokens_in_turn() {
        let config = FleetSimConfig {
            url: "ws://127.0.0.1:1/v1/opamp".into(),
            transport: Transport::WebSocket,
            agents: 6,
            heartbeat: Duration::from_secs(1),
            connect_rate: 1,
            fail_fraction: 0.0,
            token: Some("only".into()),
            hold: None,
        };
        let none = SimOptions::default();
        assert_eq!(none.token_for(5, &config).as_deref(), Some("only"));
        let three = SimOptions { tokens: vec!["a".into(), "b".into(), "c".into()], ..Default::default() };
        let got: Vec<_> = (0..6).map(|i| three.token_for(i, &config).unwrap()).collect();
        assert_eq!(got, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn the_reconnect_backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let steps: Vec<Duration> = (0..8).map(|_| b.wait()).collect();
        let caps = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0].map(Duration::from_secs_f64);
        for (wait, cap) in steps.iter().zip(caps) {
            assert!(*wait >= cap / 2 && *wait <= cap, "{wait:?} within [{:?}, {cap:?}]", cap / 2);
        }
        b.reset();
        assert!(b.wait() <= RECONNECT_MIN);
    }
}
