//! The soak: a simulated fleet with churn against one operator process for a long time
//! (`make soak`; not part of `make test`: the test is `#[ignore]`d). Agents restart (reconnect
//! with the same uid), are replaced (a new uid, the old one left to the offline retention),
//! the AgentConfig changes, and a service dispatches messages to agents, all the time. The
//! operator's RSS and open files are sampled every minute; at the end they must not have grown
//! beyond what the fleet itself holds.
//!
//! Knobs (environment): `SOAK_SECONDS` (default 1800), `SOAK_AGENTS` WebSocket agents (default
//! 500), `SOAK_HTTP_AGENTS` plain-HTTP agents polling every second (default 20).
mod common;

use std::time::{Duration, Instant};

use common::callback::b64encode;
use common::env::{Tenant, TestEnv};
use common::eventually;
use common::replica::Group;
use common::simrun::RunningAgent;
use opamp_operator::api::AgentConfig;
use opamp_operator::protocol::Uid;
use opamp_operator::sim::AgentSpec;
use rand::seq::IndexedRandom;

const CAP: &str = "io.example.soak";
const DISPATCH_TOKEN: &str = "dispatch-token-of-the-soak";
/// Deadline of every wait (convergence of a fleet of hundreds on a shared 2-core machine).
const T: Duration = Duration::from_secs(300);
/// How often the plain-HTTP agents poll: the operator's heartbeat (`--heartbeat-seconds 1` in
/// `common::replica`); an HTTP agent silent for three heartbeats is taken for gone.
const POLL: Duration = Duration::from_secs(1);
/// One churn tick.
const TICK: Duration = Duration::from_secs(10);
/// Of the WebSocket agents, per tick: restarted (same uid), replaced (new uid).
const RESTART_PERCENT: usize = 2;
const REPLACE_PERCENT: usize = 1;
/// A config change every this many ticks, a dispatch every tick.
const CONFIG_EVERY: u32 = 6;
const DISPATCH_TARGETS: usize = 10;
/// What the end may exceed the start by: open files (listeners, API server and peer
/// connections come and go) and RSS (allocator slack, and the offline agents the retention
/// keeps: replaced agents are remembered for 10 minutes).
const FD_SLACK: usize = 32;
const RSS_SLACK_KIB: u64 = 64 << 10;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn edge_config(version: u32) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: edge}}\nspec:\n  \
         selector: {{matchAttributes: {{service.name: edge}}}}\n  \
         files:\n    edge.yaml:\n      inline: 'v: {version}'\n"
    )
}

fn spec(uid: Uid) -> AgentSpec {
    AgentSpec { uid, custom_capabilities: vec![CAP.into()], ..AgentSpec::new("edge") }
}

/// What is sampled of the operator process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    open_files: usize,
    threads: u64,
    connected: f64,
    known: f64,
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

async fn sample(replica: &common::replica::Replica, started: Instant) -> Sample {
    let pid = replica.pid();
    Sample {
        at: started.elapsed(),
        rss_kib: proc_status(pid, "VmRSS:"),
        open_files: std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
        threads: proc_status(pid, "Threads:"),
        connected: replica.metric("opamp_agents_connected").await,
        known: replica.metric("opamp_agents_known").await,
    }
}

fn row(s: &Sample) -> String {
    format!(
        "| {:>5.0} s | {:>7.1} MiB | {:>5} | {:>3} | {:>5} | {:>5} |",
        s.at.as_secs_f64(),
        s.rss_kib as f64 / 1024.0,
        s.open_files,
        s.threads,
        s.connected,
        s.known
    )
}

/// Waits until every agent runs `version` and status counts them all applied (replaced agents
/// stay selected, offline, until the retention forgets them).
async fn converged(ns: &Tenant, agents: &[RunningAgent], version: u32) {
    let want = format!("v: {version}");
    eventually(T, &format!("every agent runs v: {version}"), || async {
        agents.iter().all(|a| a.effective("edge.yaml").as_deref() == Some(want.as_str())).then_some(())
    })
    .await;
    let n = agents.len() as u32;
    ns.status_where::<AgentConfig>("edge", &format!("status counts {n} agents applied"), |s| {
        s.applied_agents == n && s.selected_agents >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a 30-minute soak: make soak"]
async fn a_fleet_with_churn_for_half_an_hour_holds_memory_and_open_files_steady() {
    let seconds = knob("SOAK_SECONDS", 1800);
    let ws_agents = knob("SOAK_AGENTS", 500) as usize;
    let http_agents = knob("SOAK_HTTP_AGENTS", 20) as usize;
    let tenants = TestEnv::new("soak").deadline(T).prepare().await;
    let ns: &Tenant = &tenants;
    let group = Group::new(&ns.ns.name, tenants.names()).await;
    let replica = group.start("soak-0").await;
    let ws_url = format!("ws://{}/v1/opamp", replica.opamp_addr);
    let http_url = format!("http://{}/v1/opamp", replica.opamp_addr);
    let token = ns.token.clone();
    ns.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: dispatch}}\ntype: Opaque\nstringData: {{token: {DISPATCH_TOKEN}}}\n"
    ))
    .await;
    ns.apply(&format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: jobs}}\nspec:\n  capability: {CAP}\n  \
         dispatch:\n    tokenSecretRef: {{name: dispatch, key: token}}\n"
    ))
    .await;
    let mut version = 1;
    ns.apply(&edge_config(version)).await;
    let ws = |uid| RunningAgent::spawn_with_heartbeat(ws_url.clone(), Some(token.clone()), spec(uid), TICK);
    let mut agents: Vec<RunningAgent> = (0..ws_agents).map(|_| ws(Uid::new_v7())).collect();
    let mut pollers: Vec<RunningAgent> = (0..http_agents)
        .map(|_| RunningAgent::spawn_http(http_url.clone(), Some(token.clone()), spec(Uid::new_v7()), POLL))
        .collect();
    let everyone = |agents: &Vec<RunningAgent>, pollers: &Vec<RunningAgent>| -> Vec<Uid> {
        agents.iter().chain(pollers.iter()).map(|a| a.uid).collect()
    };
    {
        let all: Vec<&RunningAgent> = agents.iter().chain(pollers.iter()).collect();
        eventually(T, "the fleet runs v: 1", || async {
            all.iter().all(|a| a.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
        })
        .await;
    }
    let started = Instant::now();
    let first = sample(&replica, started).await;
    eprintln!("[soak] {ws_agents} WebSocket + {http_agents} HTTP agents, {seconds} s of churn");
    eprintln!("[soak] |     t |         RSS | files | thr | conn. | known |");
    eprintln!("[soak] {}", row(&first));
    let mut samples = vec![first];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let dispatch_url =
        replica.api_url(&format!("/api/v1/namespaces/{}/capabilityslots/jobs/messages", ns.ns.name));
    let (mut restarted, mut replaced, mut dispatched, mut delivered_or_queued, mut changes) = (0, 0, 0, 0, 0);
    let mut tick = 0u32;
    let mut next_sample = Duration::from_secs(60);
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(TICK).await;
        tick += 1;
        // Restarts: the same uid reconnects with everything it had.
        let n = (ws_agents * RESTART_PERCENT).div_ceil(100);
        for _ in 0..n {
            let i = rand::random_range(0..agents.len());
            let old = agents.swap_remove(i);
            let uid = old.uid;
            old.stop().await;
            agents.push(ws(uid));
            restarted += 1;
        }
        // Replacements: a new agent instead of an old one (a pod replaced).
        for _ in 0..(ws_agents * REPLACE_PERCENT).div_ceil(100) {
            let i = rand::random_range(0..agents.len());
            agents.swap_remove(i).stop().await;
            agents.push(ws(Uid::new_v7()));
            replaced += 1;
        }
        if tick.is_multiple_of(CONFIG_EVERY) {
            let i = rand::random_range(0..pollers.len().max(1));
            if i < pollers.len() {
                let old = pollers.swap_remove(i);
                let uid = old.uid;
                old.stop().await;
                pollers.push(RunningAgent::spawn_http(
                    http_url.clone(),
                    Some(token.clone()),
                    spec(uid),
                    POLL,
                ));
            }
            version += 1;
            ns.apply(&edge_config(version)).await;
            changes += 1;
        }
        // A dispatch to a few agents, by uid.
        let targets: Vec<String> = everyone(&agents, &pollers)
            .choose_multiple(&mut rand::rng(), DISPATCH_TARGETS)
            .map(Uid::to_string)
            .collect();
        let body = serde_json::json!({ "type": "ping", "data": b64encode(b"soak"), "agents": targets });
        let reply = http
            .post(&dispatch_url)
            .bearer_auth(DISPATCH_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        if let Ok(reply) = reply
            && reply.status() == 200
            && let Ok(bytes) = reply.bytes().await
            && let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            dispatched += 1;
            delivered_or_queued += json["results"]
                .as_array()
                .map(|r| r.iter().filter(|r| r["state"] == "sent" || r["state"] == "queued").count())
                .unwrap_or(0);
        }
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(60);
            let s = sample(&replica, started).await;
            eprintln!("[soak] {}", row(&s));
            samples.push(s);
        }
    }
    // The churn stops; the fleet settles on the last version.
    let all: Vec<RunningAgent> = agents.into_iter().chain(pollers).collect();
    converged(ns, &all, version).await;
    let last = sample(&replica, started).await;
    eprintln!("[soak] {} (settled)", row(&last));
    let peak = samples.iter().chain(std::iter::once(&last)).map(|s| s.rss_kib).max().unwrap_or(0);
    eprintln!(
        "[soak] churn: {restarted} restarts, {replaced} replacements, {changes} config changes, {dispatched} \
         dispatches ({delivered_or_queued} messages sent or queued); RSS start {:.1} MiB, peak {:.1} MiB, end \
         {:.1} MiB; open files start {}, end {}",
        first.rss_kib as f64 / 1024.0,
        peak as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0,
        first.open_files,
        last.open_files
    );
    assert!(dispatched > 0, "dispatches were answered");
    assert!(
        last.open_files <= first.open_files + FD_SLACK,
        "open files grew from {} to {} with the same fleet connected",
        first.open_files,
        last.open_files
    );
    assert!(
        last.rss_kib <= first.rss_kib + RSS_SLACK_KIB,
        "RSS grew from {} KiB to {} KiB (more than {} MiB) with the same fleet connected",
        first.rss_kib,
        last.rss_kib,
        RSS_SLACK_KIB >> 10
    );
    for a in all {
        a.stop().await;
    }
    replica.terminate().await;
    tenants.cleanup().await;
}
