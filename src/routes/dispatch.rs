//! Service → agents: the dispatch API.
//!
//! `POST /api/v1/namespaces/{ns}/capabilityslots/{name}/messages` with the slot's bearer token
//! queues one custom message per target agent and answers each agent's state: `sent` (written
//! to a connected agent), `queued` (waits: offline, busy, or an HTTP agent until its next
//! poll), `rejected` (unknown agent, or it did not declare the capability). A queued message
//! not sent within the slot's TTL becomes `expired`. `GET …/messages/{id}` shows the current
//! states.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
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

use super::Routes;
use crate::api::AgentSelector;
use crate::controller::index::attribute;
use crate::fleet::{AgentKey, EnqueueError, Ticket, TicketState, Transport};
use crate::metrics::StateLabel;
use crate::opamp::Uid;
use crate::opamp::auth::bearer_token;
use crate::proto::CustomMessage;

/// Largest request body (base64 data included).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Dispatch records remembered for `GET` (oldest forgotten first).
pub const MAX_RECORDS: usize = 100_000;
/// How long `POST` waits for connected WebSocket agents to be written to.
pub const SEND_WAIT: Duration = Duration::from_secs(1);

type Key = (String, String, String);

struct Target {
    agent: String,
    ticket: Option<Arc<Ticket>>,
    reason: Option<String>,
}

struct Record {
    id: String,
    targets: Vec<Target>,
}

impl Record {
    fn view(&self) -> DispatchResponse {
        let results = self
            .targets
            .iter()
            .map(|t| {
                let state = match t.ticket.as_ref().map(|t| t.state()) {
                    None => "rejected",
                    Some(TicketState::Queued) => "queued",
                    Some(TicketState::Sent) => "sent",
                    Some(TicketState::Expired) => "expired",
                };
                AgentResult { agent: t.agent.clone(), state, reason: t.reason.clone() }
            })
            .collect();
        DispatchResponse { id: self.id.clone(), results }
    }
}

#[derive(Default)]
struct Records {
    by_key: HashMap<Key, Arc<Record>>,
    order: VecDeque<Key>,
}

#[derive(Default)]
pub(crate) struct Store {
    records: Mutex<Records>,
    deadlines: Mutex<BinaryHeap<Reverse<(Instant, usize)>>>,
    tickets: Mutex<HashMap<usize, Weak<Ticket>>>,
}

impl Store {
    fn insert(&self, key: Key, record: Arc<Record>) -> bool {
        let mut r = self.records.lock().unwrap();
        if r.by_key.contains_key(&key) {
            return false;
        }
        while r.order.len() >= MAX_RECORDS {
            if let Some(old) = r.order.pop_front() {
                r.by_key.remove(&old);
            }
        }
        r.order.push_back(key.clone());
        r.by_key.insert(key, record);
        true
    }

    fn get(&self, key: &Key) -> Option<Arc<Record>> {
        self.records.lock().unwrap().by_key.get(key).cloned()
    }

    fn track(&self, ticket: &Arc<Ticket>) {
        let id = Arc::as_ptr(ticket) as usize;
        self.tickets.lock().unwrap().insert(id, Arc::downgrade(ticket));
        self.deadlines.lock().unwrap().push(Reverse((ticket.expires_at, id)));
    }

    /// Expires every queued message past its deadline.
    pub(crate) fn expire(&self, now: Instant) {
        loop {
            let id = {
                let mut heap = self.deadlines.lock().unwrap();
                match heap.peek() {
                    Some(Reverse((at, _))) if *at <= now => heap.pop().map(|Reverse((_, id))| id),
                    _ => None,
                }
            };
            let Some(id) = id else { return };
            if let Some(t) = self.tickets.lock().unwrap().remove(&id).and_then(|w| w.upgrade()) {
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
    agents: Option<Vec<String>>,
    selector: Option<AgentSelector>,
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

/// Checks the caller's token against the slot's, in constant time.
fn authorize(
    routes: &Routes,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
) -> Result<(Arc<super::SlotRoute>, Arc<super::SlotCounters>), Refusal> {
    let refuse = |status, message: String| Err(Refusal(status, message));
    let Some((route, counters)) = routes.route(ns, name) else {
        return refuse(StatusCode::NOT_FOUND, format!("no CapabilitySlot {ns}/{name} routes messages"));
    };
    let Some(dispatch) = &route.dispatch else {
        return refuse(StatusCode::NOT_FOUND, format!("CapabilitySlot {ns}/{name} has no dispatch settings"));
    };
    let Some(token) = bearer_token(headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "missing bearer token".into());
    };
    match &dispatch.token {
        Ok(expected) if bool::from(token.as_bytes().ct_eq(expected.trim_ascii())) => Ok((route, counters)),
        Ok(_) => refuse(StatusCode::FORBIDDEN, "wrong token for this slot".into()),
        Err(missing) => {
            refuse(StatusCode::FORBIDDEN, format!("the slot's token is not available: {missing}"))
        }
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
    let body = match crate::opamp::read_body(body, MAX_BODY_BYTES).await {
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
    let mut results = Vec::with_capacity(targets.len());
    let mut full = 0;
    let mut wait_for = Vec::new();
    for agent in targets {
        let outcome = match agent.parse::<Uid>() {
            Err(_) => Err("not an instance uid".to_owned()),
            Ok(uid) => {
                let (c, r, n) = (counters.clone(), routes.clone(), ns.clone());
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
                        Ok(ticket)
                    }
                    Err(EnqueueError::UnknownAgent) => Err("unknown agent".to_owned()),
                    Err(EnqueueError::CapabilityNotSupported) => {
                        Err(format!("the agent did not declare capability {}", route.capability))
                    }
                    Err(e @ EnqueueError::QueueFull(_)) => {
                        full += 1;
                        Err(e.to_string())
                    }
                }
            }
        };
        match outcome {
            Ok(ticket) => {
                routes.dispatches.track(&ticket);
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                results.push(Target { agent, ticket: Some(ticket), reason: None });
            }
            Err(reason) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                results.push(Target { agent, ticket: None, reason: Some(reason) });
            }
        }
    }
    routes.touch(&ns);
    let accepted = results.iter().any(|t| t.ticket.is_some());
    if !accepted && full > 0 && full == results.len() {
        return error(StatusCode::TOO_MANY_REQUESTS, "every target agent's queue is full; retry later");
    }
    for t in &results {
        let state = if t.ticket.is_some() { "accepted" } else { "rejected" };
        routes.metrics.dispatch_results.get_or_create(&StateLabel { state }).inc();
    }
    let record = Arc::new(Record { id: id.clone(), targets: results });
    if !routes.dispatches.insert(key, record.clone()) {
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
