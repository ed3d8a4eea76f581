//! Callback receivers that fail under a serving fleet, end to end on the local control plane:
//! one that accepts connections and never answers, one that answers 500 to everything. A fleet
//! of WebSocket agents floods a CapabilitySlot whose callback is the bad receiver, first with
//! small messages (past the slot's queue bound in number, `QUEUE_LIMIT`), then with large ones
//! (past its bound in bytes, `QUEUE_BYTES_LIMIT`), while a probe agent measures the OpAMP round
//! trip (AgentToServer sent → ServerToAgent received), the same flood with a healthy receiver
//! first as the baseline. What must hold:
//!
//! - every probe round trip completes (none lost, none beyond its deadline): a bad receiver
//!   never reaches the agents' OpAMP traffic (the latencies are printed, not asserted);
//! - the slot's queue never holds more than `QUEUE_LIMIT` messages (read from the slot's status:
//!   received − delivered − failed, which may add the [`IN_TRANSIT`] messages being taken in
//!   at that moment), messages beyond it are refused and counted
//!   (`opamp_custom_messages_upstream_total{state="queue_full"}`, the status's `failed`, and its
//!   `lastError` naming the bound reached: "1024 messages", then, for the silent receiver,
//!   "16 MiB of messages");
//! - the process's RSS grows by less than `QUEUE_BYTES_LIMIT` plus [`RSS_SLACK`] during the bad
//!   phase (the operator runs in this process, see [`RSS_SLACK`] for what else the figure holds);
//! - failed deliveries are counted (`state="failed"`) and `lastError` says why: "timed out" for
//!   the silent receiver, "answered 500" for the failing one;
//! - healed, the receiver gets what is sent afterwards, and the queue drains.
//!
//! Each test prints a `[callbacks]` line with its figures (see docs/reliability.md, "Callback
//! receivers").
mod common;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::callback::{Behaviour, FaultyReceiver, MARK};
use common::env::TestEnv;
use common::{eventually, within};
use opamp_operator::api::{CapabilitySlot, CapabilitySlotStatus};
use opamp_operator::proto::{AgentToServer, CustomMessage};
use opamp_operator::routes::upstream::{QUEUE_BYTES_LIMIT, QUEUE_LIMIT};
use opamp_operator::sim::{AgentSpec, SimAgent, WsClient};
use tokio_util::sync::CancellationToken;

/// Deadline of every wait (and of one probe round trip).
const T: Duration = Duration::from_secs(60);
const CAP: &str = "com.example.flood";
const SLOT: &str = "flood";
/// Agents flooding the slot.
const FLEET: usize = 40;
/// Of them, those sending large messages in the second half of a phase.
const BIG_SENDERS: usize = 4;
/// Each agent sends a small message this often (40 agents: 800 messages/s).
const SMALL_EVERY: Duration = Duration::from_millis(50);
const SMALL_BYTES: usize = 200;
/// Each big sender sends a large message this often (4 agents: 20 messages/s, 10 MiB/s).
const BIG_EVERY: Duration = Duration::from_millis(200);
const BIG_BYTES: usize = 512 << 10;
/// How long each half of a phase (small messages, then large ones) lasts at least.
const HALF: Duration = Duration::from_secs(10);
/// The probe's heartbeat pace: 20 round trips a second, 400 in a phase.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Messages counted received and not yet queued or refused, at most: one per worker thread of
/// the runtime the operator runs on (the tests' `worker_threads`), where agents' messages are
/// taken in.
const IN_TRANSIT: u64 = 2;
/// What the process's RSS may grow by beyond `QUEUE_BYTES_LIMIT` while the receiver is bad.
/// The operator runs in the test process, so the figure also holds: the bodies of the
/// deliveries in flight (serialized from the queued messages: at most the queue's own bytes
/// again), the flooding agents' and the probe's buffers, the receiver's, the WebSocket
/// buffers of the server, and what the allocator keeps rather than returns.
const RSS_SLACK: usize = 64 << 20;

/// What the fleet sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Flood {
    Off = 0,
    Small = 1,
    Big = 2,
}

/// Sends `msg` and reads the reply, answering what the reply asks for (a full state) until
/// the server has nothing more to say. The round trip of `msg`'s own reply is returned.
async fn exchange(ws: &mut WsClient, agent: &mut SimAgent, msg: &AgentToServer) -> Result<Duration, String> {
    let started = Instant::now();
    ws.send(msg).await.map_err(|e| e.to_string())?;
    let mut rtt = None;
    loop {
        let reply = tokio::time::timeout(T, ws.recv())
            .await
            .map_err(|_| format!("no reply within {T:?}"))?
            .map_err(|e| e.to_string())?;
        rtt.get_or_insert(started.elapsed());
        match agent.on_message(&reply) {
            Some(out) => ws.send(&out).await.map_err(|e| e.to_string())?,
            None => return Ok(rtt.unwrap_or_default()),
        }
    }
}

/// Connects a simulated agent and sends its full state; panics when it cannot.
async fn connect(url: &str, token: &str, agent: &mut SimAgent) -> WsClient {
    let mut ws = within(T, "agent connects", WsClient::connect(url, Some(token)))
        .await
        .unwrap_or_else(|e| panic!("agent cannot connect: {e}"));
    let hello = agent.full_state();
    exchange(&mut ws, agent, &hello).await.unwrap_or_else(|e| panic!("first exchange: {e}"));
    ws
}

fn custom(data: Vec<u8>) -> CustomMessage {
    CustomMessage { capability: CAP.into(), r#type: "blob".into(), data: Bytes::from(data) }
}

/// The flooding agents: each sends what [`Flood`] says at its pace, one message per
/// AgentToServer, waiting for each reply.
struct Fleet {
    mode: Arc<AtomicU8>,
    /// Custom messages sent (replied to).
    sent: Arc<AtomicU64>,
    /// Exchanges that failed (an agent's connection lost).
    errors: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(env: &TestEnv) -> Fleet {
        let mode = Arc::new(AtomicU8::new(Flood::Off as u8));
        let (sent, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for i in 0..FLEET {
            let mut spec = AgentSpec::new(&format!("flood-{i}"));
            spec.custom_capabilities = vec![CAP.into()];
            let mut agent = SimAgent::new(spec);
            let mut ws = connect(&env.ws_url(), &env.token, &mut agent).await;
            let (mode, sent, errors, stop) = (mode.clone(), sent.clone(), errors.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                loop {
                    let flood = mode.load(Ordering::SeqCst);
                    let (every, data) = if flood == Flood::Small as u8 {
                        (SMALL_EVERY, Some(vec![b's'; SMALL_BYTES]))
                    } else if flood == Flood::Big as u8 && i < BIG_SENDERS {
                        (BIG_EVERY, Some(vec![b'b'; BIG_BYTES]))
                    } else {
                        (SMALL_EVERY, None)
                    };
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let Some(mut data) = data else { continue };
                    seq += 1;
                    data[..8].copy_from_slice(&seq.to_be_bytes());
                    let mut msg = agent.heartbeat();
                    msg.custom_message = Some(custom(data));
                    match exchange(&mut ws, &mut agent, &msg).await {
                        Ok(_) => {
                            sent.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                ws.close().await;
            }));
        }
        Fleet { mode, sent, errors, stop, tasks }
    }

    fn set(&self, flood: Flood) {
        self.mode.store(flood as u8, Ordering::SeqCst);
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = within(T, "flooding agent stops", t).await;
        }
    }
}

/// The probe agent: a heartbeat every [`PROBE_EVERY`] (or as soon as the previous one was
/// answered, when that took longer), its round trip recorded under the
/// current phase (0: not recorded).
struct Probe {
    phase: Arc<AtomicU8>,
    samples: Arc<Mutex<Vec<(u8, Duration)>>>,
    /// Round trips that did not complete (an error, or no reply within [`T`]).
    lost: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    async fn start(env: &TestEnv) -> Probe {
        let mut agent = SimAgent::new(AgentSpec::new("probe"));
        let mut ws = connect(&env.ws_url(), &env.token, &mut agent).await;
        let (phase, samples, lost, stop) = (
            Arc::new(AtomicU8::new(0)),
            Arc::<Mutex<Vec<_>>>::default(),
            Arc::<Mutex<Vec<_>>>::default(),
            CancellationToken::new(),
        );
        let (p, s, l, st) = (phase.clone(), samples.clone(), lost.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // A fixed pace: a slow round trip delays the next one, it does not thin the samples.
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = st.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let hb = agent.heartbeat();
                let phase = p.load(Ordering::SeqCst);
                match exchange(&mut ws, &mut agent, &hb).await {
                    Ok(rtt) if phase != 0 => s.lock().unwrap().push((phase, rtt)),
                    Ok(_) => {}
                    Err(e) => {
                        l.lock().unwrap().push(format!("phase {phase}: {e}"));
                        break;
                    }
                }
            }
            ws.close().await;
        });
        Probe { phase, samples, lost, stop, task }
    }

    fn record_as(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// The round trips of `phase`, sorted.
    fn of(&self, phase: u8) -> Vec<Duration> {
        let mut v: Vec<Duration> =
            self.samples.lock().unwrap().iter().filter(|(p, _)| *p == phase).map(|(_, d)| *d).collect();
        v.sort();
        v
    }

    fn lost(&self) -> Vec<String> {
        self.lost.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = within(T, "probe stops", self.task).await;
    }
}

/// `p50/p99/max` of sorted round trips, in milliseconds.
fn summary(sorted: &[Duration]) -> String {
    if sorted.is_empty() {
        return "no samples".into();
    }
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!("p50 {:.1} ms / p99 {:.1} ms / max {:.1} ms (n={})", at(0.5), at(0.99), at(1.0), sorted.len())
}

/// The process's resident set (VmRSS), in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS")
        * 1024
}

/// The value of one sample of the operator's metrics, 0 when absent.
async fn metric(env: &TestEnv, sample: &str) -> u64 {
    let text = within(T, "GET /metrics", async {
        reqwest::get(env.metrics_url()).await.expect("metrics answer").text().await.expect("metrics body")
    })
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

async fn upstream(env: &TestEnv, state: &str) -> u64 {
    metric(env, &format!("opamp_custom_messages_upstream_total{{state=\"{state}\"}}")).await
}

/// The slot's status as it is now.
async fn slot(env: &TestEnv) -> CapabilitySlotStatus {
    env.status_where::<CapabilitySlot>(SLOT, "a status", |_| true).await
}

/// Messages the slot holds, as its status counts them: received and neither delivered nor
/// failed yet. That is the queue, plus the messages being taken in at the moment the counters
/// were read (a message counts received before it is queued or refused): at most one per
/// runtime worker thread, [`IN_TRANSIT`].
fn held(s: &CapabilitySlotStatus) -> u64 {
    let u = &s.upstream;
    u.received.saturating_sub(u.delivered + u.failed)
}

/// What was seen while sampling a phase.
#[derive(Debug, Default)]
struct Seen {
    /// The most messages the slot's status showed it held.
    peak_held: u64,
    /// The highest RSS.
    peak_rss: usize,
    /// `lastError`s naming a full queue, as seen.
    full_reasons: Vec<String>,
    samples: usize,
}

/// Samples the slot's status and the RSS every 250 ms for at least `min`, then until the
/// status's `lastError` has named a full queue with `reason` (at most [`T`] more).
async fn sample(env: &TestEnv, min: Duration, reason: Option<&str>, seen: &mut Seen) {
    let started = Instant::now();
    let mut last = None;
    loop {
        let s = slot(env).await;
        seen.samples += 1;
        seen.peak_held = seen.peak_held.max(held(&s));
        seen.peak_rss = seen.peak_rss.max(rss());
        let error = s.upstream.last_error.clone().unwrap_or_default();
        if error.contains("is full") && !seen.full_reasons.contains(&error) {
            seen.full_reasons.push(error);
        }
        let done = reason.is_none_or(|r| seen.full_reasons.iter().any(|e| e.contains(r)));
        if started.elapsed() >= min && done {
            return;
        }
        assert!(
            started.elapsed() < min + T,
            "lastError never named a full queue ({reason:?}) within {:?}: {seen:?}; last status: {last:#?}",
            min + T
        );
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A flood of small messages then of large ones while the probe records its round trips as
/// `phase`; the slot's status and the RSS are sampled throughout. With `bounds`, the first half
/// runs until `lastError` names the bound in number, and with `bytes_bound` the second until it
/// names the bound in bytes. The fleet is quiet again afterwards.
async fn flood(
    env: &TestEnv,
    fleet: &Fleet,
    probe: &Probe,
    phase: u8,
    bounds: bool,
    bytes_bound: bool,
) -> Seen {
    let mut seen = Seen::default();
    probe.record_as(phase);
    fleet.set(Flood::Small);
    sample(env, HALF, bounds.then_some(&format!("({QUEUE_LIMIT} messages)")), &mut seen).await;
    fleet.set(Flood::Big);
    sample(
        env,
        HALF,
        bytes_bound.then_some(&format!("({} MiB of messages)", QUEUE_BYTES_LIMIT >> 20)),
        &mut seen,
    )
    .await;
    fleet.set(Flood::Off);
    probe.record_as(0);
    seen
}

/// Waits until the slot holds nothing any more (every message received delivered or failed).
async fn drained(env: &TestEnv, what: &str) -> CapabilitySlotStatus {
    env.status_where::<CapabilitySlot>(SLOT, what, |s| s.upstream.received > 0 && held(s) == 0).await
}

async fn a_bad_receiver_leaves_agents_alone(bad: Behaviour) {
    let name = match bad {
        Behaviour::Silent => "silent",
        Behaviour::Fail => "500",
        Behaviour::Healthy => unreachable!("a bad receiver"),
    };
    let env = TestEnv::new(&format!("cb-{}", if bad == Behaviour::Silent { "silent" } else { "fail" }))
        .deadline(T)
        .start()
        .await;
    let receiver = FaultyReceiver::start(Behaviour::Healthy).await;
    env.apply(&format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: {SLOT}}}\nspec:\n  capability: {CAP}\n  callback:\n    url: {}\n    timeoutSeconds: 1\n    maxAttempts: 2\n",
        receiver.url("/hook")
    ))
    .await;
    let fleet = Fleet::start(&env).await;
    let probe = Probe::start(&env).await;
    env.status_where::<CapabilitySlot>(SLOT, "every flooding agent declared the capability", |s| {
        s.supporting_agents == FLEET as u32
    })
    .await;

    // Baseline: the same flood, a healthy receiver.
    let sent0 = fleet.sent();
    let base = flood(&env, &fleet, &probe, 1, false, false).await;
    let base_sent = fleet.sent() - sent0;
    drained(&env, "the baseline delivered").await;
    let base_full = upstream(&env, "queue_full").await;

    // The receiver goes bad.
    receiver.set(bad);
    let (failed0, full0, before) =
        (upstream(&env, "failed").await, upstream(&env, "queue_full").await, slot(&env).await.upstream);
    let rss0 = rss();
    let sent0 = fleet.sent();
    // A receiver answering 500 at once empties the queue as fast as it fills, so whether the
    // large messages reach the bound in bytes depends on the CPU: only the silent one surely
    // does (its deliveries hold their messages for the whole timeout).
    let bad_seen = flood(&env, &fleet, &probe, 2, true, bad == Behaviour::Silent).await;
    let bad_sent = fleet.sent() - sent0;
    let why = match bad {
        Behaviour::Silent => "callback timed out",
        _ => "callback answered 500",
    };
    let during = env
        .status_where::<CapabilitySlot>(SLOT, &format!("lastError: {why}"), |s| {
            s.upstream.last_error.as_deref().is_some_and(|e| e.contains(why))
        })
        .await;
    let failed = upstream(&env, "failed").await - failed0;
    let refused = upstream(&env, "queue_full").await - full0;
    let counts = receiver.counts();

    // Healed: what is held drains, what is sent afterwards arrives.
    receiver.set(Behaviour::Healthy);
    let healed = Instant::now();
    let after = drained(&env, "the queue drained once the receiver healed").await;
    let drain_time = healed.elapsed();
    let (mut agent, marks) = (SimAgent::new(AgentSpec::new("after")), 10);
    let mut ws = connect(&env.ws_url(), &env.token, &mut agent).await;
    for i in 0..marks {
        let mut msg = agent.heartbeat();
        msg.custom_message = Some(custom([MARK, format!("{i}").as_bytes()].concat()));
        exchange(&mut ws, &mut agent, &msg).await.unwrap_or_else(|e| panic!("marked message {i}: {e}"));
    }
    let expected: Vec<Vec<u8>> = (0..marks).map(|i| [MARK, format!("{i}").as_bytes()].concat()).collect();
    eventually(T, "the marked messages sent after healing arrived, in order", || async {
        (receiver.marked() == expected).then_some(())
    })
    .await;
    ws.close().await;

    let lost = probe.lost();
    let (base_rtt, bad_rtt) = (probe.of(1), probe.of(2));
    let errors = fleet.errors.load(Ordering::SeqCst);
    probe.stop().await;
    fleet.stop().await;
    let growth = bad_seen.peak_rss.saturating_sub(rss0);
    let ready = during.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone());
    println!(
        "[callbacks] receiver={name} baseline: {} | bad: {} | sent baseline {base_sent} (peak held {}, queue_full {base_full}), bad {bad_sent} | peak held {} (limit {QUEUE_LIMIT}) | queue_full +{refused}, failed +{failed} | receiver {counts:?} | RSS {} MiB, peak growth {:.1} MiB (bound {} MiB) | drained {drain_time:.1?} after healing | Ready={ready:?} | lastError {:?} | full reasons {:?}",
        summary(&base_rtt),
        summary(&bad_rtt),
        base.peak_held,
        bad_seen.peak_held,
        rss0 >> 20,
        growth as f64 / (1 << 20) as f64,
        (QUEUE_BYTES_LIMIT + RSS_SLACK) >> 20,
        during.upstream.last_error,
        bad_seen.full_reasons,
    );

    // The agents never noticed.
    assert!(lost.is_empty(), "probe round trips lost: {lost:?}");
    assert_eq!(errors, 0, "flooding agents lost their connection");
    assert!(!base_rtt.is_empty() && !bad_rtt.is_empty(), "round trips recorded in both phases");
    // The queue's bounds held, and what went beyond was refused and counted.
    assert!(bad_sent > QUEUE_LIMIT as u64, "the flood ({bad_sent} messages) exceeds the queue");
    assert!(
        bad_seen.peak_held <= QUEUE_LIMIT as u64 + IN_TRANSIT,
        "the slot held {} messages (its status says)",
        bad_seen.peak_held
    );
    assert!(refused > 0, "messages beyond the queue are counted queue_full");
    assert!(
        after.upstream.failed - before.failed >= refused,
        "status counts refused messages failed: {before:?} → {:?}",
        after.upstream
    );
    assert!(
        growth < QUEUE_BYTES_LIMIT + RSS_SLACK,
        "RSS grew by {growth} bytes (from {rss0}), more than the queue's bytes and the slack"
    );
    // Failed deliveries are counted, the receiver saw them.
    assert!(failed > 0, "failed deliveries are counted");
    match bad {
        Behaviour::Silent => assert!(counts.unanswered > 0, "{counts:?}"),
        _ => assert!(counts.failed > 0, "{counts:?}"),
    }
    env.stop().await;
}

/// A callback receiver that accepts each connection, reads the request and never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_receiver_leaves_agents_alone() {
    a_bad_receiver_leaves_agents_alone(Behaviour::Silent).await;
}

/// A callback receiver that answers 500 to every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_leaves_agents_alone() {
    a_bad_receiver_leaves_agents_alone(Behaviour::Fail).await;
}
