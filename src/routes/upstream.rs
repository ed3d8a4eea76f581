//! Agent → service: CustomMessages are POSTed to the slot's callback as JSON, signed when a
//! signing key is set, retried with exponential back-off and jitter, in order per agent. Each
//! slot has one delivery task and a bounded queue: a slow or dead callback fills that queue
//! (and counts failures), never the agents' OpAMP traffic.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Routes, SlotCounters, SlotRoute};
use crate::controller::index::attributes_json;
use crate::fleet::{AgentKey, CustomMessageSink};
use crate::opamp::Uid;
use crate::proto::CustomMessage;

/// Messages waiting per slot before new ones are refused (counted failed).
pub const QUEUE_LIMIT: usize = 1024;
/// Deliveries in flight per slot (each to a different agent: order is per agent).
pub const CONCURRENCY: usize = 32;
pub const SIGNATURE_HEADER: &str = "X-OpAMP-Signature";
pub const MESSAGE_ID_HEADER: &str = "X-OpAMP-Message-Id";

pub(crate) struct Delivery {
    agent: Uid,
    id: String,
    envelope: serde_json::Map<String, serde_json::Value>,
}

pub(crate) type Sender = mpsc::Sender<Delivery>;

/// A slot's delivery task.
pub(crate) struct Worker {
    tx: Sender,
    route: Arc<RwLock<Arc<SlotRoute>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Worker {
    pub(crate) fn start(routes: Arc<Routes>, route: Arc<SlotRoute>, counters: Arc<SlotCounters>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        let route = Arc::new(RwLock::new(route));
        let task = tokio::spawn(run(routes, route.clone(), counters, rx)).abort_handle();
        Self { tx, route, task }
    }

    pub(crate) fn update(&self, route: Arc<SlotRoute>) {
        *self.route.write().unwrap() = route;
    }

    pub(crate) fn sender(&self) -> Sender {
        self.tx.clone()
    }
}

async fn run(
    routes: Arc<Routes>,
    route: Arc<RwLock<Arc<SlotRoute>>>,
    counters: Arc<SlotCounters>,
    mut rx: mpsc::Receiver<Delivery>,
) {
    let mut waiting: HashMap<Uid, VecDeque<Delivery>> = HashMap::new();
    let mut ready: VecDeque<Uid> = VecDeque::new();
    let mut in_flight: JoinSet<Uid> = JoinSet::new();
    let mut busy: std::collections::HashSet<Uid> = Default::default();
    loop {
        while in_flight.len() < CONCURRENCY {
            let Some(agent) = ready.pop_front() else { break };
            let Some(d) = waiting.get_mut(&agent).and_then(VecDeque::pop_front) else { continue };
            busy.insert(agent);
            let (r, c, http, routes) =
                (route.read().unwrap().clone(), counters.clone(), routes.http.clone(), routes.clone());
            in_flight.spawn(async move {
                let outcome = deliver(&http, &r, &c, &routes, d).await;
                routes.count_upstream(outcome);
                routes.delivery_ended();
                routes.touch(&r.namespace);
                agent
            });
        }
        tokio::select! {
            msg = rx.recv() => {
                let Some(d) = msg else { break };
                let agent = d.agent;
                let queue = waiting.entry(agent).or_default();
                queue.push_back(d);
                if queue.len() == 1 && !busy.contains(&agent) {
                    ready.push_back(agent);
                }
            }
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let Ok(agent) = done else { continue };
                busy.remove(&agent);
                match waiting.get(&agent) {
                    Some(q) if !q.is_empty() => ready.push_back(agent),
                    _ => { waiting.remove(&agent); }
                }
            }
        }
    }
}

/// Back-off before attempt `n + 1`: 200 ms doubling, at most 30 s, with jitter (50–100 %).
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_millis(200)
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(Duration::from_secs(30));
    base.mul_f64(rand::random_range(0.5..=1.0))
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers one message with retries; returns the outcome's metrics label.
async fn deliver(
    http: &reqwest::Client,
    route: &SlotRoute,
    counters: &SlotCounters,
    routes: &Routes,
    mut d: Delivery,
) -> &'static str {
    let Some(cb) = &route.callback else {
        counters.failed("the slot has no callback".into());
        return "failed";
    };
    let key = match &cb.signing_key {
        None => None,
        Some(Ok(k)) => Some(k.as_slice()),
        Some(Err(missing)) => {
            counters.failed(format!("cannot sign: {missing}"));
            return "failed";
        }
    };
    let mut last_error = String::new();
    for attempt in 1..=cb.max_attempts.max(1) {
        d.envelope.insert("attempt".into(), attempt.into());
        let body = serde_json::to_vec(&d.envelope).expect("JSON serializes");
        let mut req = http
            .post(&cb.url)
            .timeout(cb.timeout)
            .header("content-type", "application/json")
            .header(MESSAGE_ID_HEADER, &d.id);
        if let Some(key) = key {
            req = req.header(SIGNATURE_HEADER, signature(key, &body));
        }
        let started = std::time::Instant::now();
        let result = req.body(body).send().await;
        routes.metrics.callback_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(resp) if resp.status().is_success() => {
                counters.delivered();
                return "delivered";
            }
            Ok(resp) => last_error = format!("callback answered {}", resp.status()),
            Err(e) if e.is_timeout() => last_error = format!("callback timed out after {:?}", cb.timeout),
            Err(e) if e.is_connect() => last_error = format!("cannot connect to the callback: {e}"),
            Err(e) => last_error = format!("callback failed: {e}"),
        }
        if attempt < cb.max_attempts {
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
    tracing::info!(slot = %route.name, namespace = %route.namespace, id = %d.id, error = %last_error, "custom message not delivered");
    counters
        .failed(format!("message {} not delivered after {} attempts: {last_error}", d.id, cb.max_attempts));
    "failed"
}

impl CustomMessageSink for Routes {
    fn on_custom_message(&self, agent: &AgentKey, message: CustomMessage) {
        let (uid, namespace) = (agent.uid, &agent.namespace);
        let Some((route, counters, sender)) = self.by_capability(namespace, &message.capability) else {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
            self.count_upstream("unrouted");
            tracing::debug!(agent = %uid, capability = %message.capability, "custom message of a capability no slot routes");
            return;
        };
        counters.received.fetch_add(1, Ordering::Relaxed);
        self.touch(namespace);
        if !route.allows(&message.r#type) {
            self.count_upstream("refused");
            counters.failed(format!(
                "message type {:?} is not in messageTypes of slot {}",
                message.r#type, route.name
            ));
            return;
        }
        let Some(sender) = sender else {
            counters.failed(format!("slot {} has no callback", route.name));
            return;
        };
        let attributes: serde_json::Map<String, serde_json::Value> =
            self.fleet.inspect(agent, |a| attributes_json(a.report.description.as_ref())).unwrap_or_default();
        let id = uuid::Uuid::now_v7().to_string();
        let envelope = serde_json::json!({
            "id": id,
            "namespace": route.namespace,
            "slot": route.name,
            "capability": message.capability,
            "type": message.r#type,
            "agent": { "instanceUid": uid, "attributes": attributes },
            "data": base64::engine::general_purpose::STANDARD.encode(&message.data),
            "receivedTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        });
        let serde_json::Value::Object(envelope) = envelope else { unreachable!("a JSON object") };
        self.delivery_started();
        if sender.try_send(Delivery { agent: uid, id, envelope }).is_err() {
            self.delivery_ended();
            self.count_upstream("queue_full");
            counters.failed(format!(
                "the callback queue of slot {} is full ({QUEUE_LIMIT} messages)",
                route.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for n in 1..40 {
            let b = backoff(n);
            let base =
                Duration::from_millis(200).saturating_mul(1 << (n - 1).min(16)).min(Duration::from_secs(30));
            assert!(b >= base / 2 && b <= base, "attempt {n}: {b:?} not within [{:?}, {base:?}]", base / 2);
        }
    }
}
