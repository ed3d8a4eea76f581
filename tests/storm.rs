//! Reconnect storm: new agent sessions are paced (`--max-connects-per-second`), and a fleet
//! reconnecting at once after an operator restart comes back without the server falling over.
//!
//! - the wire: a WebSocket upgrade beyond the rate is refused before upgrading with 503, a
//!   `Retry-After` and an `UNAVAILABLE` `ServerErrorResponse` whose `RetryInfo` holds the same
//!   duration; a plain-HTTP poll of a new agent beyond the rate gets the same, polls of live
//!   agents never (in-process server, no cluster);
//! - the storm (on the local control plane): as many WebSocket agents as the open-file limit
//!   allows apply a config, the operator restarts, and all reconnect at once. Every agent comes
//!   back, pacing happened and agents waited as told, `/healthz` and `/metrics` answered every
//!   probe, and no agent was sent a config again. `STORM_AGENTS=<n>` runs a smaller fleet.
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::env::TestEnv;
use common::simrun::{Reconnect, RunningAgent};
use common::{TestServer, eventually};
use opamp_operator::api::AgentConfig;
use opamp_operator::fleet::FleetConfig;
use opamp_operator::opamp::ServerConfig;
use opamp_operator::proto::{RemoteConfigStatuses, ServerErrorResponseType};
use opamp_operator::sim::{AgentSpec, ClientError, HttpClient, SimAgent, WsClient, retry_info};

/// Deadline of every wait.
const T: Duration = Duration::from_secs(120);

/// New sessions per second in the storm: small, so that pacing surely engages (500/s, a tenth
/// of the fleet per second for a smaller one).
fn storm_rate(agents: usize) -> u32 {
    (agents / 10).clamp(10, 500) as u32
}

fn paced_server(rate: u32) -> ServerConfig {
    ServerConfig { max_connects_per_second: rate, ..Default::default() }
}

#[tokio::test]
async fn upgrades_beyond_the_rate_are_refused_with_retry_after_and_retry_info() {
    let server = TestServer::start(FleetConfig::default(), paced_server(2)).await;
    // The burst: two sessions.
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(WsClient::connect(&server.ws_url(), None).await.expect("within the burst"));
    }
    // The third, at once: refused before the upgrade.
    let refused = WsClient::connect(&server.ws_url(), None).await.err().expect("refused");
    let ClientError::Refused { status, retry_after } = refused else { panic!("{refused}") };
    assert_eq!(status, 503);
    let retry_after = retry_after.expect("retry advice");
    assert!(retry_after >= Duration::from_secs(1) && retry_after <= Duration::from_secs(30));

    // What a client that does not speak WebSocket sees of the same refusal: the header and the
    // protobuf body agree.
    let resp = reqwest::Client::new()
        .get(server.ws_url().replace("ws://", "http://"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
    let header: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let body = resp.bytes().await.unwrap();
    let msg = <opamp_operator::proto::ServerToAgent as prost::Message>::decode(body).unwrap();
    let error = msg.error_response.as_ref().expect("an error response");
    assert_eq!(error.r#type, ServerErrorResponseType::Unavailable as i32);
    assert_eq!(retry_info(&msg), Some(Duration::from_secs(header)), "RetryInfo = Retry-After");

    // The bucket refills: after the advice a new session is let in.
    tokio::time::sleep(Duration::from_secs(header)).await;
    open.push(WsClient::connect(&server.ws_url(), None).await.expect("let in after the advice"));
    for ws in open {
        ws.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn http_polls_of_new_agents_are_paced_and_polls_of_live_ones_never() {
    let server = TestServer::start(FleetConfig::default(), paced_server(1)).await;
    let client = HttpClient::new(&server.http_url(), None, false);
    let mut live = SimAgent::new(AgentSpec::new("paced"));
    let first = client.send(&live.full_state()).await.unwrap();
    assert_eq!(first.status, 200, "the burst lets the first agent in");

    let mut newcomer = SimAgent::new(AgentSpec::new("paced"));
    let refused = client.send(&newcomer.full_state()).await.unwrap();
    assert_eq!(refused.status, 503);
    let header: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    let msg = refused.message.as_ref().expect("a protobuf reply");
    assert_eq!(msg.instance_uid, newcomer.uid().to_wire(), "addressed to the refused agent");
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(header)), "RetryInfo = Retry-After");

    // The live agent polls many times a second: never paced.
    for i in 0..20 {
        let reply = client.send(&live.heartbeat()).await.unwrap();
        assert_eq!(reply.status, 200, "poll {i} of a live agent");
    }
    // The newcomer, after the advice: let in.
    tokio::time::sleep(refused.retry_after().unwrap()).await;
    let again = client.send(&newcomer.full_state()).await.unwrap();
    assert_eq!(again.status, 200);
    server.stop().await;
}

/// The agents the open-file limit allows (`STORM_AGENTS` overrides): this process holds both
/// ends of each WebSocket (two descriptors), and keeps a margin for the operator's own files,
/// refused attempts in flight and the probes.
fn storm_agents() -> usize {
    if let Some(n) = std::env::var("STORM_AGENTS").ok().and_then(|v| v.parse().ok()) {
        return n;
    }
    let soft = opamp_operator::operator::raise_fd_limit();
    let soft = if soft == 0 { 1024 } else { soft as usize };
    soft.saturating_sub(soft / 10 + 1000) / 2
}

/// A loopback source address of its own for agent `i` (127.0.2.1-250, round robin): the ports
/// of refused attempts left in TIME_WAIT do not run one address out of them.
fn source(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 2, (i % 250) as u8 + 1)), 0)
}

/// `opamp_agents_rejected_total{kind="paced"}` (0 when absent).
async fn paced_refusals(metrics_url: &str) -> u64 {
    let text = reqwest::get(metrics_url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("opamp_agents_rejected_total{") && l.contains("kind=\"paced\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// This process's resident set peak (MiB) and open files now.
fn process_usage() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let files = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (hwm_kib / 1024, files)
}

/// What the probes of `/healthz` and `/metrics` saw during the storm.
#[derive(Default)]
struct Probes {
    sent: usize,
    failed: Vec<String>,
    max_latency: Duration,
    peak_files: usize,
}

/// Probes `/healthz` and `/metrics` every 100 ms until `done`; samples the open files once a
/// second.
async fn probe(urls: [String; 2], done: Arc<AtomicBool>) -> Probes {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut probes = Probes::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sampled = Instant::now() - Duration::from_secs(1);
    while !done.load(Ordering::Relaxed) {
        tick.tick().await;
        for url in &urls {
            let started = Instant::now();
            let result = client.get(url).send().await;
            let took = started.elapsed();
            probes.sent += 1;
            probes.max_latency = probes.max_latency.max(took);
            match result {
                Ok(resp) if resp.status().is_success() => {
                    let _ = resp.bytes().await;
                }
                Ok(resp) => probes.failed.push(format!("{url}: HTTP {}", resp.status())),
                Err(e) => probes.failed.push(format!("{url}: {e}")),
            }
        }
        if sampled.elapsed() >= Duration::from_secs(1) {
            sampled = Instant::now();
            probes.peak_files = probes.peak_files.max(process_usage().1);
        }
    }
    probes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_reconnecting_at_once_is_paced_and_all_come_back_without_configs_resent() {
    let (n, rate) = (storm_agents(), storm_rate(storm_agents()));
    let env = TestEnv::new("storm")
        .deadline(T)
        .operator(move |c| c.server.max_connects_per_second = rate)
        .start()
        .await;
    env.apply(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {name: storm}\nspec:\n  selector: {matchAttributes: {service.name: storm}}\n  files:\n    storm.yaml:\n      inline: 'v: 1'\n",
    )
    .await;
    // While the operator is away agents back off up to 5 s (jittered), so all are back at the
    // door within a few seconds of its return; told to wait, they wait as told.
    let reconnect = Reconnect { first: Duration::from_millis(500), max: Duration::from_secs(5) };
    let agents: Vec<RunningAgent> = (0..n)
        .map(|i| {
            let mut spec = AgentSpec::new("storm");
            spec.fail_marker = None;
            let heartbeat = Duration::from_secs(30);
            let token = Some(env.token.clone());
            RunningAgent::spawn_reconnecting(env.ws_url(), token, spec, heartbeat, Some(source(i)), reconnect)
        })
        .collect();
    let applied = |a: &RunningAgent| {
        a.remote_config_status().is_some_and(|s| s.status == RemoteConfigStatuses::Applied as i32)
    };
    eventually(T, "every agent applied v1", || async { agents.iter().all(applied).then_some(()) }).await;
    env.status_where::<AgentConfig>("storm", "every agent applied", |s| {
        s.selected_agents == n as u32 && s.applied_agents == n as u32
    })
    .await;
    let configs_before: usize = agents.iter().map(RunningAgent::configs_received).sum();
    let waits_before: usize = agents.iter().map(RunningAgent::retries_advised).sum();

    // The restart: every agent is cut off, and reconnects as soon as the operator is back.
    let started = Instant::now();
    let env = env.restart().await;
    let restarted_in = started.elapsed();
    let done = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(probe([env.api_url("/healthz"), env.metrics_url()], done.clone()));
    let fleet = env.op.fleet.clone();
    let half_back = std::sync::Mutex::new(None);
    eventually(T, "every agent is back", || async {
        let back = fleet.connected_count();
        if back * 2 >= n {
            half_back.lock().unwrap().get_or_insert_with(|| started.elapsed());
        }
        (back == n).then_some(())
    })
    .await;
    let back_in = started.elapsed();
    let half_back = half_back.lock().unwrap().unwrap_or(back_in);
    done.store(true, Ordering::Relaxed);
    let probes = probes.await.unwrap();

    let paced = paced_refusals(&env.metrics_url()).await;
    assert!(paced > 0, "the reconnecting fleet was paced");
    let waits: usize = agents.iter().map(RunningAgent::retries_advised).sum::<usize>() - waits_before;
    assert!(waits > 0, "agents were told to wait (Retry-After / RetryInfo) and did");
    assert!(probes.sent > 0 && probes.failed.is_empty(), "every probe answered: {:?}", probes.failed);
    // Every agent reported its applied config to the new operator, and none was sent it again.
    env.status_where::<AgentConfig>("storm", "every agent applied after the restart", |s| {
        s.selected_agents == n as u32 && s.applied_agents == n as u32
    })
    .await;
    let configs_after: usize = agents.iter().map(RunningAgent::configs_received).sum();
    assert_eq!(configs_after, configs_before, "no agent was sent a config after the restart");

    let (rss_mib, files_now) = process_usage();
    println!(
        "[storm] agents {n} at {rate}/s: operator restarted in {:.1} s, half back in {:.1} s, \
         all back in {:.1} s; paced refusals {paced}, waits as told {waits}; probes {} (all \
         answered, max latency {} ms); peak RSS {rss_mib} MiB (operator and agents), open files \
         peak {} (now {files_now})",
        restarted_in.as_secs_f64(),
        half_back.as_secs_f64(),
        back_in.as_secs_f64(),
        probes.sent,
        probes.max_latency.as_millis(),
        probes.peak_files,
    );
    for a in agents {
        a.stop().await;
    }
    env.stop().await;
}
