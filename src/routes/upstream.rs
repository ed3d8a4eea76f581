//! Agent → service: CustomMessages are POSTed to the slot's callback as JSON, signed when a
//! signing key is set, retried with exponential back-off and jitter, in order per agent. Each
//! slot has one delivery task and a bounded queue: a slow or dead callback fills that queue
//! (and counts failures), never the agents' OpAMP traffic nor the operator's memory. The bound
//! covers every message the slot holds — in the channel, waiting behind an earlier message of
//! the same agent, and in flight — in number ([`QUEUE_LIMIT`]) and in bytes
//! ([`QUEUE_BYTES_LIMIT`]).
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Routes, SlotCounters, SlotRoute, egress};
use crate::fleet::{AgentKey, CustomMessageSink};
use crate::proto::CustomMessage;
use crate::protocol::{Uid, attributes_json};

/// Messages a slot holds at most (queued, waiting for the agent's previous message, or in
/// flight); beyond it new ones are refused, counted failed (`queue_full`).
pub const QUEUE_LIMIT: usize = 1024;
/// Bytes of messages a slot holds at most, counted as the size of their callback bodies
/// (base64 data, agent attributes, fields): 16 MiB. Beyond it new ones are refused like
/// beyond [`QUEUE_LIMIT`]. One message always fits: OpAMP messages are smaller (4 MiB by
/// default, `--max-message-bytes`).
pub const QUEUE_BYTES_LIMIT: usize = 16 << 20;
/// What a callback body costs beyond its data and attributes (field names, ids, times).
const ENVELOPE_OVERHEAD: usize = 512;
/// Deliveries in flight per slot (each to a different agent: order is per agent).
pub const CONCURRENCY: usize = 32;
pub const SIGNATURE_HEADER: &str = "X-OpAMP-Signature";
pub const MESSAGE_ID_HEADER: &str = "X-OpAMP-Message-Id";

pub(crate) struct Delivery {
    agent: Uid,
    id: String,
    envelope: serde_json::Map<String, serde_json::Value>,
    permit: Permit,
}

/// Which bound a full queue reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("{QUEUE_LIMIT} messages")]
    Messages,
    #[error("{} MiB of messages", QUEUE_BYTES_LIMIT >> 20)]
    Bytes,
}

/// What a slot holds: messages and their bytes, from acceptance until delivered or failed.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    held: Mutex<(usize, usize)>,
}

impl Queue {
    fn reserve(&self, bytes: usize) -> Result<(), QueueFull> {
        let mut held = self.held.lock();
        if held.0 >= QUEUE_LIMIT {
            return Err(QueueFull::Messages);
        }
        if held.1.saturating_add(bytes) > QUEUE_BYTES_LIMIT {
            return Err(QueueFull::Bytes);
        }
        held.0 += 1;
        held.1 += bytes;
        Ok(())
    }

    fn release(&self, bytes: usize) {
        let mut held = self.held.lock();
        held.0 -= 1;
        held.1 -= bytes;
    }

    /// Messages and bytes held.
    pub(crate) fn held(&self) -> (usize, usize) {
        *self.held.lock()
    }
}

/// A message's place in its slot's queue. Dropped, it gives the place back; dropped before
/// its delivery ended (the slot or its delivery task went away), it counts the message failed,
/// so that no accepted message disappears uncounted.
pub(crate) struct Permit {
    routes: Weak<Routes>,
    queue: Arc<Queue>,
    counters: Arc<SlotCounters>,
    namespace: Arc<str>,
    bytes: usize,
    settled: bool,
}

impl Permit {
    /// The delivery ended, delivered or failed, and was counted.
    fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queue.release(self.bytes);
        let Some(routes) = self.routes.upgrade() else { return };
        if !self.settled {
            self.counters.failed("a message was not delivered: its slot's callback was removed".into());
            routes.count_upstream("failed");
            routes.touch(&self.namespace);
        }
        routes.delivery_ended();
    }
}

/// Where `on_custom_message` puts a slot's messages.
#[derive(Clone)]
pub(crate) struct Sender {
    tx: mpsc::Sender<Delivery>,
    queue: Arc<Queue>,
}

/// A slot's delivery task.
pub(crate) struct Worker {
    tx: mpsc::Sender<Delivery>,
    queue: Arc<Queue>,
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
        // Reserving a place in `queue` comes first, so the channel never holds more.
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        let route = Arc::new(RwLock::new(route));
        let task = tokio::spawn(run(routes, route.clone(), counters, rx)).abort_handle();
        Self { tx, queue: Arc::default(), route, task }
    }

    pub(crate) fn update(&self, route: Arc<SlotRoute>) {
        *self.route.write() = route;
    }

    pub(crate) fn sender(&self) -> Sender {
        Sender { tx: self.tx.clone(), queue: self.queue.clone() }
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
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
            let Some(mut d) = waiting.get_mut(&agent).and_then(VecDeque::pop_front) else { continue };
            busy.insert(agent);
            let (r, c, http, routes) =
                (route.read().clone(), counters.clone(), routes.http.clone(), routes.clone());
            in_flight.spawn(async move {
                let outcome = deliver(&http, &r, &c, &routes, &mut d).await;
                routes.count_upstream(outcome);
                routes.touch(&r.namespace);
                d.permit.settle();
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
    d: &mut Delivery,
) -> &'static str {
    let Some(cb) = &route.callback else {
        counters.failed("the slot has no callback".into());
        return "failed";
    };
    // Checked again here, not only when the slot was published: the route may have changed
    // since this message was queued, and a literal address never reaches the resolver.
    if let Err(why) = routes.egress.check_url(&cb.url) {
        counters.failed(refused_message(&route.name, &why));
        return "callback_refused";
    }
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
            Ok(resp) if resp.status().is_redirection() => {
                last_error =
                    format!("callback answered {} (redirects are not followed)", resp.status().as_u16())
            }
            Ok(resp) => last_error = format!("callback answered {}", resp.status()),
            // Says nothing of what the name resolved to: what is there is not the tenant's to know.
            Err(e) if egress::is_refused(&e) => {
                counters.failed(format!(
                    "message {} not delivered: callback refused by the callback egress policy",
                    d.id
                ));
                return "callback_refused";
            }
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

fn refused_message(slot: &str, why: &egress::Refusal) -> String {
    format!(
        "the callback of slot {slot} is refused by the callback egress policy: {why} (an operator flag, --callback-allow, can allow it)"
    )
}

/// What a message's callback body costs, about: its base64 data, attributes and fields.
fn envelope_bytes(message: &CustomMessage, attributes: &serde_json::Map<String, serde_json::Value>) -> usize {
    let attributes: usize =
        attributes.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len) + 8).sum();
    message.data.len().div_ceil(3) * 4
        + message.r#type.len()
        + message.capability.len()
        + attributes
        + ENVELOPE_OVERHEAD
}

impl CustomMessageSink for Routes {
    fn on_custom_message(&self, agent: &AgentKey, message: CustomMessage) {
        let (uid, namespace) = (agent.uid, &agent.namespace);
        let Some((route, counters, sender, refused)) = self.by_capability(namespace, &message.capability)
        else {
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
        if let Some(why) = refused {
            self.count_upstream("callback_refused");
            counters.failed(refused_message(&route.name, &why));
            return;
        }
        let Some(sender) = sender else {
            counters.failed(format!("slot {} has no callback", route.name));
            return;
        };
        let attributes: serde_json::Map<String, serde_json::Value> =
            self.fleet.inspect(agent, |a| attributes_json(a.report.description.as_ref())).unwrap_or_default();
        let bytes = envelope_bytes(&message, &attributes);
        if let Err(full) = sender.queue.reserve(bytes) {
            self.count_upstream("queue_full");
            counters.failed(format!("the callback queue of slot {} is full ({full})", route.name));
            return;
        }
        self.delivery_started();
        let permit = Permit {
            routes: self.me.clone(),
            queue: sender.queue.clone(),
            counters: counters.clone(),
            namespace: namespace.clone(),
            bytes,
            settled: false,
        };
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
        // The reservation keeps the channel from filling: it fails only when the delivery task
        // is gone, and then the message's permit, dropped with it, counts it failed.
        let _ = sender.tx.try_send(Delivery { agent: uid, id, envelope, permit });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentSelector, DownstreamStatus, UpstreamStatus};
    use crate::fleet::{Fleet, FleetConfig};
    use crate::routes::CallbackRoute;
    use crate::routes::egress::EgressPolicy;
    use crate::routes::{RouteMetrics, StateLabel};

    const NS: &str = "tenant";
    const CAP: &str = "com.example.big";

    /// A callback that accepts connections and never answers; closes them when dropped.
    struct Hanging {
        url: String,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Hanging {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn hanging_callback() -> Hanging {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/cb", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Hanging { url, task }
    }

    fn route(url: &str) -> (SlotRoute, UpstreamStatus, DownstreamStatus) {
        let route = SlotRoute {
            namespace: NS.into(),
            name: "big".into(),
            capability: CAP.into(),
            selector: AgentSelector::default(),
            message_types: vec![],
            callback: Some(CallbackRoute {
                url: url.into(),
                timeout: Duration::from_secs(60),
                max_attempts: 3,
                signing_key: None,
            }),
            dispatch: None,
        };
        (route, UpstreamStatus::default(), DownstreamStatus::default())
    }

    fn message(size: usize) -> CustomMessage {
        CustomMessage { capability: CAP.into(), r#type: "blob".into(), data: vec![7u8; size].into() }
    }

    fn queue_full(metrics: &RouteMetrics) -> u64 {
        metrics.custom_messages_upstream.get_or_create(&StateLabel { state: "queue_full" }).get()
    }

    /// A loopback HTTP server that counts requests and answers `status` (with `location`).
    struct Server {
        url: String,
        hits: Arc<std::sync::atomic::AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server(status: u16, location: Option<String>) -> Server {
        use axum::http::{HeaderMap, StatusCode, header};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/cb", listener.local_addr().expect("address"));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut headers = HeaderMap::new();
            if let Some(l) = &location {
                headers.insert(header::LOCATION, l.parse().expect("a header value"));
            }
            async move { (StatusCode::from_u16(status).expect("a status"), headers, "") }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { url, hits, task }
    }

    fn hits(s: &Server) -> usize {
        s.hits.load(Ordering::SeqCst)
    }

    async fn settled(counters: &SlotCounters, n: u64) -> UpstreamStatus {
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let up = counters.upstream();
            if up.delivered + up.failed >= n || tokio::time::Instant::now() > end {
                return up;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn with_attempts(url: &str, attempts: u32) -> (SlotRoute, UpstreamStatus, DownstreamStatus) {
        let mut r = route(url);
        if let Some(cb) = &mut r.0.callback {
            cb.max_attempts = attempts;
            cb.timeout = Duration::from_secs(5);
        }
        r
    }

    /// A tenant pointing its callback at the operator's own host: refused when published
    /// (the slot says why), nothing is sent, each message counts failed with the reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loopback_callback_is_refused_by_default_and_allowed_when_listed() {
        let target = server(200, None).await;
        let metrics = Arc::new(RouteMetrics::default());
        let routes =
            Routes::new(Fleet::new(FleetConfig::default()), metrics.clone(), EgressPolicy::default());
        routes.publish(NS, vec![with_attempts(&target.url, 1)]);
        let why = routes.callback_refused(NS, "big").expect("refused");
        assert!(why.contains("refused by the callback egress policy") && why.contains("loopback"), "{why}");
        let ns: Arc<str> = NS.into();
        routes.on_custom_message(&AgentKey::new(ns.clone(), Uid::new_v7()), message(10));
        let counters = routes.counters(NS, "big").expect("routed");
        let up = counters.upstream();
        assert_eq!((up.received, up.failed), (1, 1), "{up:?}");
        assert!(up.last_error.as_deref().is_some_and(|e| e.contains("egress policy")), "{up:?}");
        let refused =
            metrics.custom_messages_upstream.get_or_create(&StateLabel { state: "callback_refused" }).get();
        assert_eq!(refused, 1);
        assert_eq!(routes.queued(NS, "big"), Some((0, 0)), "a refused message is not queued");
        for url in ["http://localhost:1/x", "http://[::ffff:127.0.0.1]:1/x", "http://2130706433:1/x"] {
            routes.publish(NS, vec![with_attempts(url, 1)]);
            assert!(routes.callback_refused(NS, "big").is_some(), "{url}");
        }
        // Names are checked again when resolved: the callbacks' client never connects to a
        // refused address, whatever the URL (here straight through the client).
        let e =
            routes.http.post(target.url.replace("127.0.0.1", "localhost")).send().await.expect_err("refused");
        assert!(egress::is_refused(&e), "{e:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(hits(&target), 0, "the refused callback received nothing");

        // Listed, it is allowed.
        let allowing = EgressPolicy::new(vec!["127.0.0.1/32".parse().expect("a CIDR")]);
        let routes = Routes::new(Fleet::new(FleetConfig::default()), Arc::default(), allowing);
        routes.publish(NS, vec![with_attempts(&target.url, 1)]);
        assert_eq!(routes.callback_refused(NS, "big"), None);
        routes.on_custom_message(&AgentKey::new(ns.clone(), Uid::new_v7()), message(10));
        let up = settled(&routes.counters(NS, "big").expect("routed"), 1).await;
        assert_eq!((up.delivered, up.failed), (1, 0), "{up:?}");
        assert_eq!(hits(&target), 1);
    }

    /// A callback answering 303 or 307 towards another address is not followed: the
    /// redirect's target receives nothing, and the attempt failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redirects_are_not_followed() {
        let target = server(200, None).await;
        let allowing = EgressPolicy::new(vec!["127.0.0.1/32".parse().expect("a CIDR")]);
        let routes = Routes::new(Fleet::new(FleetConfig::default()), Arc::default(), allowing);
        let ns: Arc<str> = NS.into();
        for status in [303, 307, 308, 301] {
            let redirecting = server(status, Some(target.url.clone())).await;
            routes.publish(NS, vec![]);
            routes.publish(NS, vec![with_attempts(&redirecting.url, 1)]);
            routes.on_custom_message(&AgentKey::new(ns.clone(), Uid::new_v7()), message(10));
            let up = settled(&routes.counters(NS, "big").expect("routed"), 1).await;
            assert_eq!((up.delivered, up.failed), (0, 1), "{status}: {up:?}");
            let expected = format!("callback answered {status} (redirects are not followed)");
            assert!(up.last_error.as_deref().is_some_and(|e| e.contains(&expected)), "{up:?}");
            assert_eq!(hits(&redirecting), 1);
            assert_eq!(hits(&target), 0, "{status}: the redirect's target received a request");
        }
    }

    /// The attack: a callback that never answers, and agents sending large messages. What a
    /// slot holds stays within its bounds (messages and bytes, waiting and in flight); the
    /// rest is refused and counted, and removing the slot releases and counts what it held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_callback_holds_no_more_than_the_queue_bounds() {
        let metrics = Arc::new(RouteMetrics::default());
        let loopback = EgressPolicy::new(vec!["127.0.0.1/32".parse().expect("a CIDR")]);
        let routes = Routes::new(Fleet::new(FleetConfig::default()), metrics.clone(), loopback);
        let callback = hanging_callback().await;
        routes.publish(NS, vec![route(&callback.url)]);
        let ns: Arc<str> = NS.into();
        let counters = routes.counters(NS, "big").expect("routed");

        // 64 agents × 1 message of 1 MiB: at most QUEUE_BYTES_LIMIT of them are held.
        let sent = 64u64;
        for _ in 0..sent {
            routes.on_custom_message(&AgentKey::new(ns.clone(), Uid::new_v7()), message(1 << 20));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let up = counters.upstream();
        assert_eq!(up.received, sent);
        let held_max = (QUEUE_BYTES_LIMIT >> 20) as u64;
        assert!(up.failed >= sent - held_max, "only {} of {sent} refused: {up:?}", up.failed);
        assert_eq!(queue_full(&metrics), up.failed, "refusals are counted queue_full");
        let error = up.last_error.clone().unwrap_or_default();
        assert!(error.contains("queue") && error.contains("MiB"), "lastError names the byte bound: {error}");
        let (messages, bytes) = routes.queued(NS, "big").expect("queue");
        assert!(bytes <= QUEUE_BYTES_LIMIT && messages as u64 == sent - up.failed, "{messages} {bytes}");

        // Small messages: at most QUEUE_LIMIT of them, counting those already held.
        let held = sent - up.failed;
        let agent = Uid::new_v7();
        for _ in 0..2 * QUEUE_LIMIT {
            routes.on_custom_message(&AgentKey::new(ns.clone(), agent), message(16));
        }
        let after = counters.upstream();
        let (messages, bytes) = routes.queued(NS, "big").expect("queue");
        assert_eq!(messages, QUEUE_LIMIT, "held: {messages} messages, {bytes} bytes");
        assert!(bytes <= QUEUE_BYTES_LIMIT);
        let refused = after.failed - up.failed;
        assert_eq!(refused, 2 * QUEUE_LIMIT as u64 - (QUEUE_LIMIT as u64 - held), "{after:?}");
        assert!(after.last_error.as_deref().is_some_and(|e| e.contains("1024 messages")), "{after:?}");
        assert_eq!(queue_full(&metrics), after.failed);

        // Removing the slot releases what it held and counts it failed.
        routes.publish(NS, vec![]);
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while metrics.custom_messages_upstream.get_or_create(&StateLabel { state: "failed" }).get()
            < QUEUE_LIMIT as u64
        {
            assert!(tokio::time::Instant::now() < end, "the removed slot's messages are not counted failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counters.upstream().failed, counters.upstream().received, "{:?}", counters.upstream());
        assert_eq!(routes.drain(Duration::from_secs(1)).await, 0, "nothing pending any more");
    }

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
