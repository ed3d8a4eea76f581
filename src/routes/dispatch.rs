//! Service → agents: the dispatch API.
//!
//! `POST /api/v1/namespaces/{ns}/capabilityslots/{name}/messages` with the slot's bearer token
//! queues one custom message per target agent and answers each agent's state: `sent` (written
//! to a connected agent), `queued` (waits: offline, busy, or an HTTP agent until its next
//! poll), `rejected` (unknown agent, or it did not declare the capability). A queued message
//! not sent within the slot's TTL becomes `expired`. `GET …/messages/{id}` shows the current
//! states.
//!
//! Callers are tenants, so everything a request leaves behind is bounded: ids and agent lists
//! are short, the records `GET` reads are bounded per namespace and in all (oldest forgotten
//! first) and keep each target compactly. The token is checked before anything else, and an
//! unknown slot is refused like a wrong token: slot names cannot be probed.
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::{Routes, StateLabel};
use crate::api::AgentSelector;
use crate::fleet::{AgentKey, EnqueueError, Ticket, TicketState};
use crate::proto::CustomMessage;
use crate::protocol::{Transport, Uid, attribute, bearer_token};

/// Largest request body (base64 data included).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Longest `id`, in characters of `[A-Za-z0-9._:-]` (as long as a DNS name).
pub const MAX_ID_CHARS: usize = 253;
/// Most agents one request lists in `agents` (a `selector` picks among real agents only).
pub const MAX_AGENTS: usize = 10_000;
/// Dispatch records remembered for `GET` per namespace, and the targets they hold (oldest
/// forgotten first).
pub const MAX_RECORDS_PER_NAMESPACE: usize = 10_000;
pub const MAX_TARGETS_PER_NAMESPACE: usize = 100_000;
/// Dispatch records remembered for `GET` in all namespaces, and their targets.
pub const MAX_RECORDS: usize = 100_000;
pub const MAX_TARGETS: usize = 1_000_000;
/// Of a listed agent that is not an instance uid, the bytes kept (and shown in results).
pub const MAX_AGENT_BYTES_KEPT: usize = 64;
/// The answer to an unknown slot, a slot without dispatch settings and a wrong token alike.
const REFUSED: &str = "no such CapabilitySlot or wrong token";
/// How long `POST` waits for connected WebSocket agents to be written to.
pub const SEND_WAIT: Duration = Duration::from_secs(1);

/// Namespace, slot, id.
type Key = (String, String, String);

/// One target of a dispatch, compactly: records are many, and made by tenants.
enum Target {
    Accepted(Uid, Arc<Ticket>),
    Rejected(Uid, Rejection),
    /// Not an instance uid: what was given, cut to [`MAX_AGENT_BYTES_KEPT`].
    NotUid(Box<str>),
}

#[derive(Debug, Clone, Copy)]
enum Rejection {
    Unknown,
    NoCapability,
    QueueFull(u32),
}

struct Record {
    key: Arc<Key>,
    capability: Box<str>,
    targets: Box<[Target]>,
}

impl Record {
    fn view(&self) -> DispatchResponse {
        let results = self
            .targets
            .iter()
            .map(|t| match t {
                Target::Accepted(uid, ticket) => {
                    let state = match ticket.state() {
                        TicketState::Queued => "queued",
                        TicketState::Sent => "sent",
                        TicketState::Expired => "expired",
                    };
                    AgentResult { agent: uid.to_string(), state, reason: None }
                }
                Target::Rejected(uid, why) => {
                    let reason = match why {
                        Rejection::Unknown => EnqueueError::UnknownAgent.to_string(),
                        Rejection::NoCapability => {
                            format!("the agent did not declare capability {}", self.capability)
                        }
                        Rejection::QueueFull(n) => EnqueueError::QueueFull(*n as usize).to_string(),
                    };
                    AgentResult { agent: uid.to_string(), state: "rejected", reason: Some(reason) }
                }
                Target::NotUid(given) => AgentResult {
                    agent: given.to_string(),
                    state: "rejected",
                    reason: Some("not an instance uid".into()),
                },
            })
            .collect();
        DispatchResponse { id: self.key.2.clone(), results }
    }

    fn accepted(&self) -> bool {
        self.targets.iter().any(|t| matches!(t, Target::Accepted(..)))
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), marked with `…` when cut.
fn truncated(s: &str, max: usize) -> Box<str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// How many records and targets the store keeps, per namespace and in all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub records_per_namespace: usize,
    pub targets_per_namespace: usize,
    pub records: usize,
    pub targets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            records_per_namespace: MAX_RECORDS_PER_NAMESPACE,
            targets_per_namespace: MAX_TARGETS_PER_NAMESPACE,
            records: MAX_RECORDS,
            targets: MAX_TARGETS,
        }
    }
}

/// The records of one namespace, oldest first (by sequence number).
#[derive(Default)]
struct Space {
    order: BTreeMap<u64, Arc<Key>>,
    targets: usize,
}

#[derive(Default)]
struct Records {
    by_key: HashMap<Arc<Key>, (u64, Arc<Record>)>,
    order: BTreeMap<u64, Arc<Key>>,
    namespaces: HashMap<String, Space>,
    targets: usize,
    next: u64,
}

impl Records {
    fn remove(&mut self, key: &Key) {
        let Some((seq, record)) = self.by_key.remove(key) else { return };
        self.order.remove(&seq);
        self.targets -= record.targets.len();
        if let Some(space) = self.namespaces.get_mut(&key.0) {
            space.order.remove(&seq);
            space.targets -= record.targets.len();
            if space.order.is_empty() {
                self.namespaces.remove(&key.0);
            }
        }
    }

    /// The namespace's oldest record while it has too many records or targets for `adding`
    /// more targets.
    fn over_in_namespace(&self, ns: &str, adding: usize, limits: &Limits) -> Option<Arc<Key>> {
        let space = self.namespaces.get(ns)?;
        let over = space.order.len() >= limits.records_per_namespace
            || space.targets + adding > limits.targets_per_namespace;
        over.then(|| space.order.first_key_value().map(|(_, k)| k.clone())).flatten()
    }

    fn over_in_all(&self, adding: usize, limits: &Limits) -> Option<Arc<Key>> {
        let over = self.order.len() >= limits.records || self.targets + adding > limits.targets;
        over.then(|| self.order.first_key_value().map(|(_, k)| k.clone())).flatten()
    }
}

#[derive(Default)]
pub(crate) struct Store {
    limits: Limits,
    records: Mutex<Records>,
    deadlines: Mutex<BinaryHeap<Reverse<(Instant, usize)>>>,
    tickets: Mutex<HashMap<usize, Weak<Ticket>>>,
}

impl Store {
    #[cfg(test)]
    fn with_limits(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// Remembers a record, forgetting the oldest of its namespace, then of all, to stay within
    /// the limits (a record larger than a limit alone is kept alone); `false` if its key is
    /// taken.
    fn insert(&self, record: Arc<Record>) -> bool {
        let mut r = self.records.lock();
        let key = record.key.clone();
        if r.by_key.contains_key(&*key) {
            return false;
        }
        let n = record.targets.len();
        while let Some(old) = r.over_in_namespace(&key.0, n, &self.limits) {
            r.remove(&old);
        }
        while let Some(old) = r.over_in_all(n, &self.limits) {
            r.remove(&old);
        }
        let seq = r.next;
        r.next += 1;
        r.order.insert(seq, key.clone());
        r.targets += n;
        let space = r.namespaces.entry(key.0.clone()).or_default();
        space.order.insert(seq, key.clone());
        space.targets += n;
        r.by_key.insert(key, (seq, record));
        true
    }

    fn get(&self, key: &Key) -> Option<Arc<Record>> {
        self.records.lock().by_key.get(key).map(|(_, r)| r.clone())
    }

    /// Records and targets held: in all, and in `namespace`.
    #[cfg(test)]
    fn held(&self, namespace: &str) -> ((usize, usize), (usize, usize)) {
        let r = self.records.lock();
        let ns = r.namespaces.get(namespace).map_or((0, 0), |s| (s.order.len(), s.targets));
        ((r.by_key.len(), r.targets), ns)
    }

    fn track(&self, ticket: &Arc<Ticket>) {
        let id = Arc::as_ptr(ticket) as usize;
        self.tickets.lock().insert(id, Arc::downgrade(ticket));
        self.deadlines.lock().push(Reverse((ticket.expires_at, id)));
    }

    /// Expires every queued message past its deadline.
    pub(crate) fn expire(&self, now: Instant) {
        loop {
            let id = {
                let mut heap = self.deadlines.lock();
                match heap.peek() {
                    Some(Reverse((at, _))) if *at <= now => heap.pop().map(|Reverse((_, id))| id),
                    _ => None,
                }
            };
            let Some(id) = id else { return };
            if let Some(t) = self.tickets.lock().remove(&id).and_then(|w| w.upgrade()) {
                t.expire_if_due(now);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchRequest {
    id: Option<String>,
    r#type: String,
    #[serde(default)]
    data: String,
    #[serde(default, deserialize_with = "at_most_max_agents")]
    agents: Option<Vec<String>>,
    selector: Option<AgentSelector>,
}

/// `agents`, refused while parsing once longer than [`MAX_AGENTS`] (not after building it).
fn at_most_max_agents<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_AGENTS} instance uids")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(agent) = seq.next_element::<String>()? {
                if out.len() == MAX_AGENTS {
                    return Err(serde::de::Error::custom(format!(
                        "agents lists more than {MAX_AGENTS} agents"
                    )));
                }
                out.push(agent);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded).map(Some)
}

/// Whether `id` is a valid dispatch id: 1 to [`MAX_ID_CHARS`] of `[A-Za-z0-9._:-]`.
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[derive(Debug, Serialize)]
struct AgentResult {
    agent: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct DispatchResponse {
    id: String,
    results: Vec<AgentResult>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// An API error: a status and a message, answered as `{"error": message}`.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// The dispatch API routes.
pub fn router(routes: Arc<Routes>) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{ns}/capabilityslots/{name}/messages", post(dispatch))
        .route("/api/v1/namespaces/{ns}/capabilityslots/{name}/messages/{id}", get(status))
        .layer(axum::extract::DefaultBodyLimit::disable()) // MAX_BODY_BYTES is enforced by hand
        .with_state(routes)
}

/// Checks the caller's token against the slot's, in constant time. A request without a token
/// is refused before the slot is looked up; an unknown slot, one without dispatch settings
/// or without its token Secret, and a wrong token get one and the same answer, so that
/// nobody learns which slots exist. (The slot's status says what is missing.)
fn authorize(
    routes: &Routes,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
) -> Result<(Arc<super::SlotRoute>, Arc<super::SlotCounters>), Refusal> {
    let Some(token) = bearer_token(headers) else {
        return Err(Refusal(StatusCode::UNAUTHORIZED, "missing bearer token".into()));
    };
    let refused = || Refusal(StatusCode::FORBIDDEN, REFUSED.into());
    let (route, counters) = routes.route(ns, name).ok_or_else(refused)?;
    match route.dispatch.as_ref().map(|d| &d.token) {
        Some(Ok(expected)) if bool::from(token.as_bytes().ct_eq(expected.trim_ascii())) => {
            Ok((route, counters))
        }
        _ => Err(refused()),
    }
}

async fn dispatch(
    State(routes): State<Arc<Routes>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (route, counters) = match authorize(&routes, &ns, &name, &headers) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let dispatch = route.dispatch.clone().expect("checked by authorize");
    let body = match crate::http_server::read_body(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            let mut resp =
                error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds {MAX_BODY_BYTES} bytes"));
            e.close_if_undrained(&mut resp);
            return resp;
        }
    };
    let req: DispatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    drop(body);
    if req.id.as_deref().is_some_and(|id| !valid_id(id)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("id must be 1 to {MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"),
        );
    }
    if !route.allows(&req.r#type) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("message type {:?} is not in the slot's messageTypes", req.r#type),
        );
    }
    let Ok(data) = base64::engine::general_purpose::STANDARD.decode(req.data.as_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "data is not valid base64");
    };
    let targets: Vec<String> = match (req.agents, &req.selector) {
        (Some(agents), None) if !agents.is_empty() => agents,
        (None, Some(selector)) => {
            let mut uids = Vec::new();
            routes.fleet.for_each(|agent, report| {
                let desc = report.description.as_ref();
                if *agent.namespace == *ns && selector.matches(|k| attribute(desc, k)) {
                    uids.push(agent.uid.to_string());
                }
            });
            uids.sort();
            uids
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of agents (a non-empty list) or selector",
            );
        }
    };
    let id = req.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let key = (ns.clone(), name.clone(), id.clone());
    if routes.dispatches.get(&key).is_some() {
        return error(StatusCode::CONFLICT, format!("a dispatch with id {id:?} exists already"));
    }
    let expires_at = Instant::now() + dispatch.ttl;
    let message =
        CustomMessage { capability: route.capability.clone(), r#type: req.r#type, data: data.into() };
    let namespace: Arc<str> = ns.as_str().into();
    let mut results = Vec::with_capacity(targets.len());
    let mut full = 0;
    let mut wait_for = Vec::new();
    // A target listed twice (a uid in any of its spellings) is one target.
    let mut seen_uids = HashSet::new();
    let mut seen_others = HashSet::new();
    for agent in &targets {
        let outcome = match agent.parse::<Uid>() {
            Err(_) if !seen_others.insert(agent.as_str()) => continue,
            Err(_) => Err(Target::NotUid(truncated(agent, MAX_AGENT_BYTES_KEPT))),
            Ok(uid) if !seen_uids.insert(uid) => continue,
            Ok(uid) => {
                let (c, r, n) = (counters.clone(), routes.clone(), namespace.clone());
                let ticket = Ticket::new(
                    expires_at,
                    Some(Box::new(move |s| {
                        match s {
                            TicketState::Sent => c.sent(),
                            TicketState::Expired => {
                                c.expired.fetch_add(1, Ordering::Relaxed);
                                r.metrics
                                    .dispatch_results
                                    .get_or_create(&StateLabel { state: "expired" })
                                    .inc();
                            }
                            TicketState::Queued => {}
                        }
                        r.touch(&n);
                    })),
                );
                let key = AgentKey::new(ns.as_str(), uid);
                match routes.fleet.enqueue_tracked(
                    &key,
                    message.clone(),
                    Some(ticket.clone()),
                    dispatch.queue_limit,
                ) {
                    Ok(_) => {
                        if routes.fleet.inspect(&key, |a| a.transport == Some(Transport::WebSocket))
                            == Some(true)
                        {
                            wait_for.push(ticket.clone());
                        }
                        Ok((uid, ticket))
                    }
                    Err(EnqueueError::UnknownAgent) => Err(Target::Rejected(uid, Rejection::Unknown)),
                    Err(EnqueueError::CapabilityNotSupported) => {
                        Err(Target::Rejected(uid, Rejection::NoCapability))
                    }
                    Err(EnqueueError::QueueFull(n)) => {
                        full += 1;
                        let n = u32::try_from(n).unwrap_or(u32::MAX);
                        Err(Target::Rejected(uid, Rejection::QueueFull(n)))
                    }
                }
            }
        };
        match outcome {
            Ok((uid, ticket)) => {
                routes.dispatches.track(&ticket);
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                results.push(Target::Accepted(uid, ticket));
            }
            Err(rejected) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                results.push(rejected);
            }
        }
    }
    drop(targets);
    routes.touch(&ns);
    let record = Arc::new(Record {
        key: Arc::new(key),
        capability: route.capability.as_str().into(),
        targets: results.into_boxed_slice(),
    });
    if !record.accepted() && full > 0 && full == record.targets.len() {
        return error(StatusCode::TOO_MANY_REQUESTS, "every target agent's queue is full; retry later");
    }
    for t in record.targets.iter() {
        let state = if matches!(t, Target::Accepted(..)) { "accepted" } else { "rejected" };
        routes.metrics.dispatch_results.get_or_create(&StateLabel { state }).inc();
    }
    if !routes.dispatches.insert(record.clone()) {
        return error(StatusCode::CONFLICT, format!("a dispatch with id {id:?} exists already"));
    }
    // Connected WebSocket agents are written to at once: report them sent, not queued.
    let deadline = Instant::now() + SEND_WAIT;
    while wait_for.iter().any(|t| t.state() == TicketState::Queued) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    axum::Json(record.view()).into_response()
}

async fn status(
    State(routes): State<Arc<Routes>>,
    Path((ns, name, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&routes, &ns, &name, &headers) {
        return refusal.into_response();
    }
    routes.dispatches.expire(Instant::now());
    match routes.dispatches.get(&(ns, name, id.clone())) {
        Some(record) => axum::Json(record.view()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no dispatch with id {id:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DownstreamStatus, UpstreamStatus};
    use crate::fleet::{Fleet, FleetConfig};
    use crate::routes::egress::EgressPolicy;
    use crate::routes::{DispatchRoute, SlotRoute};
    use axum::http::{Method, Request};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    const NS: &str = "tenant";
    const TOKEN: &str = "the-token";

    fn slot(name: &str, dispatch: bool) -> (SlotRoute, UpstreamStatus, DownstreamStatus) {
        let route = SlotRoute {
            namespace: NS.into(),
            name: name.into(),
            capability: format!("com.example.{name}"),
            selector: AgentSelector::default(),
            message_types: vec![],
            callback: None,
            dispatch: dispatch.then(|| DispatchRoute {
                token: Ok(TOKEN.as_bytes().to_vec()),
                queue_limit: 64,
                ttl: Duration::from_secs(300),
            }),
        };
        (route, UpstreamStatus::default(), DownstreamStatus::default())
    }

    /// Routes with slot `jobs` (dispatch), `quiet` (no dispatch settings), and no agents.
    fn app() -> (Arc<Routes>, Router) {
        let routes = Routes::new(Fleet::new(FleetConfig::default()), Arc::default(), EgressPolicy::default());
        routes.publish(NS, vec![slot("jobs", true), slot("quiet", false)]);
        (routes.clone(), router(routes))
    }

    fn path(slot: &str) -> String {
        format!("/api/v1/namespaces/{NS}/capabilityslots/{slot}/messages")
    }

    async fn call(
        app: &Router,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp =
            app.clone().oneshot(req.body(Body::from(body)).expect("a request")).await.expect("infallible");
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("a body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn post(app: &Router, slot: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        call(app, Method::POST, &path(slot), token, serde_json::to_vec(body).expect("JSON")).await
    }

    fn bogus(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("bogus-{i}")).collect()
    }

    #[tokio::test]
    async fn ids_are_short_and_plain() {
        let (_, app) = app();
        let with_id = |id: &str| json!({ "id": id, "type": "t", "agents": ["x"] });
        let (status, reply) = post(&app, "jobs", Some(TOKEN), &with_id(&"i".repeat(1 << 20))).await;
        assert_eq!(status, 400, "an id of 1 MiB");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("253")), "{:.200}", reply.to_string());
        assert_eq!(post(&app, "jobs", Some(TOKEN), &with_id(&"i".repeat(254))).await.0, 400);
        for bad in ["a/b", "a b", "", "ü", "a\nb"] {
            assert_eq!(post(&app, "jobs", Some(TOKEN), &with_id(bad)).await.0, 400, "{bad:?}");
        }
        let longest = "i".repeat(253);
        for good in [longest.as_str(), "req-42", "a.b_c:d-E9"] {
            let (status, reply) = post(&app, "jobs", Some(TOKEN), &with_id(good)).await;
            assert_eq!(status, 200, "{good:?}: {reply}");
        }
    }

    #[tokio::test]
    async fn agents_lists_are_bounded_and_deduplicated() {
        let (_, app) = app();
        let too_many = json!({ "type": "t", "agents": bogus(MAX_AGENTS + 1) });
        let (status, reply) = post(&app, "jobs", Some(TOKEN), &too_many).await;
        let shown = format!("{:.300}", reply.to_string());
        assert_eq!(status, 400, "{shown}");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains(&MAX_AGENTS.to_string())), "{shown}");
        let (status, _) =
            post(&app, "jobs", Some(TOKEN), &json!({ "type": "t", "agents": bogus(MAX_AGENTS) })).await;
        assert_eq!(status, 200);

        let uid = Uid::new_v7().to_string();
        let dup = json!({ "type": "t", "agents": ["x", uid, "x", uid.to_uppercase(), uid] });
        let (status, reply) = post(&app, "jobs", Some(TOKEN), &dup).await;
        assert_eq!(status, 200, "{reply}");
        let agents: Vec<&str> = reply["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter_map(|r| r["agent"].as_str())
            .collect();
        assert_eq!(agents, ["x", uid.as_str()], "{reply}");

        // A long string that is not a uid is kept (and shown) cut short.
        let long = "y".repeat(100_000);
        let (status, reply) =
            post(&app, "jobs", Some(TOKEN), &json!({ "type": "t", "agents": [long] })).await;
        assert_eq!(status, 200);
        let shown = reply["results"][0]["agent"].as_str().expect("agent");
        assert_eq!(shown, format!("{}…", "y".repeat(MAX_AGENT_BYTES_KEPT)));
        assert_eq!(reply["results"][0]["reason"], "not an instance uid");
    }

    fn record(ns: &str, id: &str, targets: usize) -> Arc<Record> {
        Arc::new(Record {
            key: Arc::new((ns.into(), "jobs".into(), id.into())),
            capability: "c".into(),
            targets: (0..targets).map(|_| Target::NotUid("x".into())).collect(),
        })
    }

    fn key(ns: &str, id: &str) -> Key {
        (ns.into(), "jobs".into(), id.into())
    }

    #[test]
    fn the_store_forgets_the_oldest_records_beyond_its_limits() {
        let limits = Limits { records_per_namespace: 3, targets_per_namespace: 10, records: 5, targets: 12 };
        let store = Store::with_limits(limits);
        for i in 0..10 {
            assert!(store.insert(record("a", &i.to_string(), 1)));
        }
        assert!(!store.insert(record("a", "9", 1)), "a taken key");
        assert_eq!(store.held("a"), ((3, 3), (3, 3)));
        assert!(store.get(&key("a", "6")).is_none() && store.get(&key("a", "7")).is_some());
        // Targets per namespace: room is made for a large record.
        assert!(store.insert(record("a", "big", 9)));
        assert_eq!(store.held("a").1, (2, 10), "9 and big");
        // In all: records and targets.
        assert!(store.insert(record("b", "1", 3)));
        assert_eq!(store.held("b"), ((2, 12), (1, 3)), "10 + 3 targets are too many: a/9 goes");
        assert!(store.get(&key("a", "9")).is_none(), "the oldest of all went first");
        for i in 2..6 {
            assert!(store.insert(record("b", &i.to_string(), 0)));
        }
        assert_eq!(store.held("b"), ((4, 9), (3, 0)), "b keeps its newest 3: a/big and b/3..5");
        // A record larger than a limit is kept alone.
        assert!(store.insert(record("c", "huge", 50)));
        assert_eq!(store.held("c"), ((1, 50), (1, 50)));
    }

    /// The attack: many dispatches listing many bogus agents. What is remembered stays within
    /// the namespace's bounds (the oldest dispatches are forgotten).
    #[tokio::test]
    async fn records_stay_bounded_under_many_dispatches() {
        let (routes, app) = app();
        let rounds = MAX_TARGETS_PER_NAMESPACE / MAX_AGENTS + 2;
        for i in 0..rounds {
            let body = json!({ "id": format!("d{i}"), "type": "t", "agents": bogus(MAX_AGENTS) });
            assert_eq!(post(&app, "jobs", Some(TOKEN), &body).await.0, 200);
        }
        let ((_, targets), (ns_records, ns_targets)) = routes.dispatches.held(NS);
        assert!(ns_targets <= MAX_TARGETS_PER_NAMESPACE && targets == ns_targets, "{ns_targets}");
        assert!(ns_records < rounds);
        let get = |id: String| {
            let app = app.clone();
            async move { call(&app, Method::GET, &format!("{}/{id}", path("jobs")), Some(TOKEN), vec![]).await.0 }
        };
        assert_eq!(get("d0".into()).await, 404, "the oldest is forgotten");
        assert_eq!(get(format!("d{}", rounds - 1)).await, 200);
    }

    /// Without a token nothing else is looked at; with one, an unknown slot, a slot without
    /// dispatch settings and a wrong token are the same refusal: slot names cannot be probed.
    #[tokio::test]
    async fn authentication_comes_first_and_refusals_look_alike() {
        let (_, app) = app();
        let body = json!({ "type": "t", "agents": ["x"] });
        for slot in ["jobs", "no-such-slot", "quiet"] {
            let (status, reply) = post(&app, slot, None, &body).await;
            assert_eq!(status, 401, "{slot}: {reply}");
            let get = call(&app, Method::GET, &format!("{}/some-id", path(slot)), None, vec![]).await;
            assert_eq!(get.0, 401, "GET {slot}: {}", get.1);
        }
        let refusals = [
            post(&app, "no-such-slot", Some(TOKEN), &body).await,
            post(&app, "quiet", Some(TOKEN), &body).await,
            post(&app, "jobs", Some("wrong"), &body).await,
            call(&app, Method::GET, &format!("{}/x", path("no-such-slot")), Some(TOKEN), vec![]).await,
            call(&app, Method::GET, &format!("{}/x", path("jobs")), Some("wrong"), vec![]).await,
        ];
        for r in &refusals {
            assert_eq!(r, &(403, json!({ "error": "no such CapabilitySlot or wrong token" })));
        }
        // An unknown id, once authenticated, is still 404.
        let (status, _) = call(&app, Method::GET, &format!("{}/x", path("jobs")), Some(TOKEN), vec![]).await;
        assert_eq!(status, 404);
    }
}
