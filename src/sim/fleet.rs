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
}

/// How often the simulator prints a progress line on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Stats {
    /// Agents that got their first reply (ever; see `disconnected`).
    connected: AtomicUsize,
    /// Agents whose connection ended after they connected.
    disconnected: AtomicUsize,
    errors: AtomicUsize,
    messages_sent: AtomicU64,
    configs_applied: AtomicU64,
    configs_failed: AtomicU64,
    /// Times an agent was told to wait before retrying (and did).
    retries_advised: AtomicU64,
    first_reply: Mutex<Option<Histogram<u64>>>,
    reply: Mutex<Option<Histogram<u64>>>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Stats {
    /// One progress line: `t=12.3s connected 9000/10000 errors 0 messages 123 applied 0 failed 0`.
    fn progress(&self, agents: usize, started: Instant) -> String {
        format!(
            "t={:.1}s connected {}/{} errors {} messages {} applied {} failed {}",
            started.elapsed().as_secs_f64(),
            self.connected.load(Ordering::Relaxed).saturating_sub(self.disconnected.load(Ordering::Relaxed)),
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
        let (cfg, stats, stop) = (config.clone(), stats.clone(), shutdown.clone());
        tasks.spawn(async move {
            let result = match cfg.transport {
                Transport::WebSocket => ws_agent(i, spec, &cfg, &stats, stop).await,
                Transport::Http => http_agent(spec, &cfg, &stats, stop).await,
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
                stats
                    .connected
                    .load(Ordering::Relaxed)
                    .saturating_sub(stats.disconnected.load(Ordering::Relaxed)),
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

async fn ws_agent(
    i: usize,
    spec: AgentSpec,
    cfg: &FleetSimConfig,
    stats: &Stats,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut agent = SimAgent::new(spec);
    // Refused (paced, at capacity) with retry advice: wait that long, then connect again.
    let (mut ws, first, t0) = loop {
        let t0 = Instant::now();
        let refused = match WsClient::connect_from(&cfg.url, cfg.token.as_deref(), Some(source_addr(i))).await
        {
            Ok(mut ws) => {
                ws.send(&agent.full_state()).await.map_err(|e| e.to_string())?;
                let first = ws.recv().await.map_err(|e| e.to_string())?;
                match crate::sim::retry_info(&first) {
                    None => break (ws, first, t0),
                    Some(wait) => {
                        ws.close().await;
                        wait
                    }
                }
            }
            Err(e) => e.retry_after().ok_or_else(|| e.to_string())?,
        };
        if !wait_as_advised(&mut agent, stats, refused, &stop).await {
            return Ok(());
        }
    };
    record(&stats.first_reply, t0).await;
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats.messages_sent.fetch_add(1, Ordering::Relaxed);
    let mut pending = agent.on_message(&first);
    let mut beat = tokio::time::interval_at(Instant::now() + cfg.heartbeat, cfg.heartbeat);
    let mut sent_at = None;
    let result = loop {
        if let Some(out) = pending.take() {
            let applied = out.remote_config_status.is_some();
            if let Err(e) = ws.send(&out).await {
                break Err(e.to_string());
            }
            sent_at = Some(Instant::now());
            stats.messages_sent.fetch_add(1, Ordering::Relaxed);
            if applied {
                count_status(&agent, stats);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = beat.tick() => pending = Some(agent.heartbeat()),
            msg = ws.recv() => match msg {
                Ok(m) => {
                    if let Some(t) = sent_at.take() {
                        record(&stats.reply, t).await;
                    }
                    pending = agent.on_message(&m);
                }
                Err(e) => break Err(e.to_string()),
            },
        }
    };
    stats.disconnected.fetch_add(1, Ordering::Relaxed);
    ws.close().await;
    result
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
    stats: &Stats,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let client = HttpClient::new(&cfg.url, cfg.token.as_deref(), true);
    let mut agent = SimAgent::new(spec);
    let mut next = Some(agent.full_state());
    let mut first = true;
    loop {
        let out = next.take().unwrap_or_else(|| agent.heartbeat());
        let applied = out.remote_config_status.is_some() && !first;
        let t0 = Instant::now();
        let reply = client.send(&out).await.map_err(|e| e.to_string())?;
        stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        if !reply.status.is_success() {
            // Refused with retry advice: the same message again after that long.
            let wait = reply.retry_after().ok_or_else(|| format!("HTTP {}", reply.status))?;
            next = Some(out);
            if !wait_as_advised(&mut agent, stats, wait, &stop).await {
                return Ok(());
            }
            continue;
        }
        if first {
            record(&stats.first_reply, t0).await;
            stats.connected.fetch_add(1, Ordering::Relaxed);
            first = false;
        } else {
            record(&stats.reply, t0).await;
        }
        if applied {
            count_status(&agent, stats);
        }
        next = reply.message.and_then(|m| agent.on_message(&m));
        if next.is_some() {
            continue; // answer at once, as agents do after applying a config
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(cfg.heartbeat) => {}
        }
    }
}
