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
//!
//! # Across replicas
//!
//! Any replica answers for the agents of every replica (the peer calls are in
//! [`super::peer`]):
//! - `POST`: the replica the caller reached checks the token, then asks every live peer at
//!   once (one call each, for all the targets not connected here) which of them it holds and
//!   how recently it saw them, which of its agents a `selector` picks, and whether the id is
//!   taken there. Each target then goes to one replica: this one when connected here, else one
//!   where it is connected, else the one that saw it last ([`Seen::beats`]); unknown
//!   everywhere, it is rejected as unknown. That replica queues the message under its own
//!   slot's settings (message types, queue limit, TTL), keeps a record of its part and answers
//!   the states (writing to its connected WebSocket agents first, as here); this replica
//!   records what it was told. Each replica counts what it decided in its slot counters.
//! - `GET`: the records of the id of every live replica, merged per agent ([`merge`]).
//! - A message still queued for an agent that starts a session on another replica moves there
//!   with its remaining TTL (a claim, see [`super::peer`]): the record here shows it moved, the
//!   new holder's record where it is, and the merge shows the latter.
//!
//! Every bound holds on every replica: a peer refuses more than [`MAX_AGENTS`] uids and keeps
//! its part within its own record store's limits. A peer that does not answer is left out: its
//! agents are unknown to a `POST` (or rejected, if the call to queue fails), its records
//! missing from a `GET`. Ids are unique per replica at once, and across replicas as far as
//! the lookup sees (two `POST`s of one id racing on two replicas both pass).
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

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

use super::{Routes, SlotCounters, StateLabel};
use crate::api::AgentSelector;
use crate::fleet::{AgentKey, EnqueueError, Ticket, TicketState};
use crate::peers::Member;
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
pub(crate) type Key = (String, String, String);

/// One target of a dispatch, compactly: records are many, and made by tenants.
#[derive(Clone)]
pub(crate) enum Target {
    /// Queued here, followed through its ticket.
    Accepted(Uid, Arc<Ticket>),
    /// Queued by another replica, in the state it answered (its own record follows it).
    Remote(Uid, Told),
    Rejected(Uid, Rejection),
    /// Not an instance uid: what was given, cut to [`MAX_AGENT_BYTES_KEPT`].
    NotUid(Box<str>),
}

impl Target {
    fn uid(&self) -> Option<Uid> {
        match self {
            Target::Accepted(uid, _) | Target::Remote(uid, _) | Target::Rejected(uid, _) => Some(*uid),
            Target::NotUid(_) => None,
        }
    }
}

/// The state another replica answered for a message it queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Told {
    Queued,
    Sent,
}

/// Why a target was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Rejection {
    Unknown,
    NoCapability,
    QueueFull(u32),
    /// The replica holding the agent did not take the message (unreachable, or it refused).
    Replica,
}

/// How much one replica's record tells of an agent's message, least first. Merging keeps, per
/// agent, the entry that tells most (the first of equals, the caller's replica's record
/// first): the holder's state beats what the caller's replica was told or decided (`Told`),
/// the new holder's state beats the old one's of a message that moved with its agent
/// (`Moved`, shown `queued`), and among holders `sent` beats `expired` beats `queued` (a
/// message sent anywhere reached the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Standing {
    Told,
    Moved,
    Queued,
    Expired,
    Sent,
}

/// One agent's state in one replica's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub agent: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub standing: Standing,
}

/// One replica's record of a dispatch, as merged by `GET`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Part {
    /// Whether it is the record of the replica that took the `POST` (its order of targets is
    /// the answer's).
    pub origin: bool,
    pub entries: Vec<Entry>,
}

pub(crate) struct Record {
    key: Arc<Key>,
    capability: Box<str>,
    targets: Box<[Target]>,
    /// Made by the replica that took the `POST` (not by a peer's part or a hand-over).
    origin: bool,
}

impl Record {
    fn entry(&self, target: &Target) -> Entry {
        let told = |agent: String, state: &str, reason: Option<String>| Entry {
            agent,
            state: state.into(),
            reason,
            standing: Standing::Told,
        };
        match target {
            Target::Accepted(uid, ticket) => {
                let (state, standing) = match ticket.state() {
                    TicketState::Queued => ("queued", Standing::Queued),
                    TicketState::Sent => ("sent", Standing::Sent),
                    TicketState::Expired => ("expired", Standing::Expired),
                    TicketState::Moved => ("queued", Standing::Moved),
                };
                Entry { agent: uid.to_string(), state: state.into(), reason: None, standing }
            }
            Target::Remote(uid, Told::Queued) => told(uid.to_string(), "queued", None),
            Target::Remote(uid, Told::Sent) => told(uid.to_string(), "sent", None),
            Target::Rejected(uid, why) => {
                let reason = match why {
                    Rejection::Unknown => EnqueueError::UnknownAgent.to_string(),
                    Rejection::NoCapability => {
                        format!("the agent did not declare capability {}", self.capability)
                    }
                    Rejection::QueueFull(n) => EnqueueError::QueueFull(*n as usize).to_string(),
                    Rejection::Replica => "the replica holding the agent did not take the message".into(),
                };
                told(uid.to_string(), "rejected", Some(reason))
            }
            Target::NotUid(given) => told(given.to_string(), "rejected", Some("not an instance uid".into())),
        }
    }

    /// This replica's part, for merging.
    pub(crate) fn part(&self) -> Part {
        Part { origin: self.origin, entries: self.targets.iter().map(|t| self.entry(t)).collect() }
    }

    /// The record alone, as `POST` answers it.
    fn view(&self) -> DispatchResponse {
        let results = self.targets.iter().map(|t| self.entry(t).into()).collect();
        DispatchResponse { id: self.key.2.clone(), results }
    }

    fn accepted(&self) -> bool {
        self.targets.iter().any(|t| matches!(t, Target::Accepted(..) | Target::Remote(..)))
    }
}

/// The replicas' records of dispatch `id` as one answer: per agent the entry that tells most
/// ([`Standing`]); agents in the order of the caller's replica's record, then the others'
/// agents sorted.
pub(crate) fn merge(id: &str, mut parts: Vec<Part>) -> DispatchResponse {
    parts.sort_by_key(|p| !p.origin); // stable: the origin's first, the rest as they came
    let mut best: HashMap<String, Entry> = HashMap::new();
    let mut order = Vec::new();
    let mut others = BTreeSet::new();
    for part in parts {
        for e in part.entries {
            match best.get_mut(&e.agent) {
                Some(b) if e.standing > b.standing => *b = e,
                Some(_) => {}
                None => {
                    if part.origin {
                        order.push(e.agent.clone());
                    } else {
                        others.insert(e.agent.clone());
                    }
                    best.insert(e.agent.clone(), e);
                }
            }
        }
    }
    let results = order.into_iter().chain(others).filter_map(|a| best.remove(&a)).map(Into::into).collect();
    DispatchResponse { id: id.to_owned(), results }
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

/// `targets` with `newer` laid over them: an agent's newer target replaces its older one in
/// place, the other newer ones are appended.
fn overlay(mut targets: Vec<Target>, newer: Vec<Target>) -> Vec<Target> {
    let mut at: HashMap<Uid, usize> =
        targets.iter().enumerate().filter_map(|(i, t)| Some((t.uid()?, i))).collect();
    for t in newer {
        match t.uid().and_then(|u| at.get(&u)) {
            Some(&i) => targets[i] = t,
            None => {
                if let Some(u) = t.uid() {
                    at.insert(u, targets.len());
                }
                targets.push(t);
            }
        }
    }
    targets
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

    /// Remembers a record as the newest, forgetting the oldest of its namespace, then of all,
    /// to stay within the limits (a record larger than a limit alone is kept alone); `false` if
    /// its key is taken.
    fn insert(&mut self, record: Arc<Record>, limits: &Limits) -> bool {
        let key = record.key.clone();
        if self.by_key.contains_key(&*key) {
            return false;
        }
        let n = record.targets.len();
        while let Some(old) = self.over_in_namespace(&key.0, n, limits) {
            self.remove(&old);
        }
        while let Some(old) = self.over_in_all(n, limits) {
            self.remove(&old);
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, key.clone());
        self.targets += n;
        let space = self.namespaces.entry(key.0.clone()).or_default();
        space.order.insert(seq, key.clone());
        space.targets += n;
        self.by_key.insert(key, (seq, record));
        true
    }
}

/// A ticket the store follows, and the record it belongs to.
type Tracked = (Weak<Ticket>, Arc<Key>);

#[derive(Default)]
pub(crate) struct Store {
    limits: Limits,
    records: Mutex<Records>,
    deadlines: Mutex<BinaryHeap<Reverse<(Instant, usize)>>>,
    /// Tickets not yet past their deadline, with the record they belong to.
    tickets: Mutex<HashMap<usize, Tracked>>,
}

impl Store {
    #[cfg(test)]
    fn with_limits(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// Remembers a record, forgetting the oldest of its namespace, then of all, to stay within
    /// the limits (a record larger than a limit alone is kept alone); `false` if its key is
    /// taken.
    #[cfg(test)]
    fn insert(&self, record: Arc<Record>) -> bool {
        self.records.lock().insert(record, &self.limits)
    }

    /// Remembers the record of the replica that took the `POST`; a record of its key made
    /// meanwhile by a peer's part or a hand-over is folded into it (theirs are the newer
    /// targets). `false` if another `POST`'s record has the key.
    fn insert_origin(&self, record: Arc<Record>) -> bool {
        let mut r = self.records.lock();
        let old = match r.by_key.get(&*record.key) {
            None => return r.insert(record, &self.limits),
            Some((_, old)) if old.origin => return false,
            Some((_, old)) => old.clone(),
        };
        let targets = overlay(record.targets.to_vec(), old.targets.to_vec()).into_boxed_slice();
        r.remove(&record.key);
        let folded =
            Record { key: record.key.clone(), capability: record.capability.clone(), targets, origin: true };
        r.insert(Arc::new(folded), &self.limits)
    }

    /// Adds `targets` to the record of `key` (made, not as the origin's, if there is none): an
    /// agent's new target replaces the one it had there. The record becomes the newest, and the
    /// store stays within its limits.
    pub(crate) fn extend(&self, key: Arc<Key>, capability: &str, targets: Vec<Target>) {
        let mut r = self.records.lock();
        let (origin, capability, all) = match r.by_key.get(&*key) {
            Some((_, old)) => (old.origin, old.capability.clone(), overlay(old.targets.to_vec(), targets)),
            None => (false, capability.into(), overlay(Vec::new(), targets)),
        };
        r.remove(&key);
        r.insert(Arc::new(Record { key, capability, targets: all.into_boxed_slice(), origin }), &self.limits);
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Record>> {
        self.records.lock().by_key.get(key).map(|(_, r)| r.clone())
    }

    /// Records and targets held: in all, and in `namespace`.
    #[cfg(test)]
    fn held(&self, namespace: &str) -> ((usize, usize), (usize, usize)) {
        let r = self.records.lock();
        let ns = r.namespaces.get(namespace).map_or((0, 0), |s| (s.order.len(), s.targets));
        ((r.by_key.len(), r.targets), ns)
    }

    pub(crate) fn track(&self, ticket: &Arc<Ticket>, key: &Arc<Key>) {
        let id = Arc::as_ptr(ticket) as usize;
        self.tickets.lock().insert(id, (Arc::downgrade(ticket), key.clone()));
        self.deadlines.lock().push(Reverse((ticket.expires_at, id)));
    }

    /// The record a ticket tracked here belongs to.
    pub(crate) fn key_of(&self, ticket: &Arc<Ticket>) -> Option<Arc<Key>> {
        let tickets = self.tickets.lock();
        let (weak, key) = tickets.get(&(Arc::as_ptr(ticket) as usize))?;
        weak.upgrade().filter(|t| Arc::ptr_eq(t, ticket)).map(|_| key.clone())
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
            if let Some(t) = self.tickets.lock().remove(&id).and_then(|(w, _)| w.upgrade()) {
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
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct AgentResult {
    agent: String,
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl From<Entry> for AgentResult {
    fn from(e: Entry) -> Self {
        Self { agent: e.agent, state: e.state, reason: e.reason }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct DispatchResponse {
    id: String,
    results: Vec<AgentResult>,
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
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
) -> Result<(Arc<super::SlotRoute>, Arc<SlotCounters>), Refusal> {
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

/// How recently a replica saw an agent, to choose where a message for it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Seen {
    pub connected: bool,
    /// Milliseconds since the Unix epoch.
    pub last_seen_ms: i64,
}

impl Seen {
    pub(crate) fn of(connected: bool, last_seen: SystemTime) -> Self {
        let ms = last_seen.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Self { connected, last_seen_ms: i64::try_from(ms).unwrap_or(i64::MAX) }
    }

    /// Whether a replica that saw the agent so should get its message rather than one that saw
    /// it as `other` did: a connected agent's replica wins, then the most recent sighting.
    pub(crate) fn beats(&self, other: &Seen) -> bool {
        (self.connected, self.last_seen_ms) > (other.connected, other.last_seen_ms)
    }
}

/// Where a target's message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Here,
    There(Member),
    Nowhere,
}

/// Where the message for an agent seen `here` and (best) on a peer goes: here on a tie.
fn place(here: Option<Seen>, there: Option<(&Member, Seen)>) -> Place {
    match (here, there) {
        (Some(h), _) if h.connected => Place::Here,
        (Some(h), Some((m, t))) if t.beats(&h) => Place::There(m.clone()),
        (Some(_), _) => Place::Here,
        (None, Some((m, _))) => Place::There(m.clone()),
        (None, None) => Place::Nowhere,
    }
}

/// A ticket for a message of a slot (whose `counters` hear sent and expired) in `namespace`.
pub(crate) fn ticket(
    routes: &Arc<Routes>,
    counters: Option<Arc<SlotCounters>>,
    namespace: &str,
    expires_at: Instant,
) -> Arc<Ticket> {
    // Weakly: the routes keep the ticket (in the dispatch's record), so a strong reference
    // here would keep them, and their fleet, alive for good.
    let (r, n) = (Arc::downgrade(routes), namespace.to_owned());
    Ticket::new(
        expires_at,
        Some(Box::new(move |s| {
            let Some(r) = r.upgrade() else { return };
            match s {
                TicketState::Sent => {
                    if let Some(c) = &counters {
                        c.sent();
                    }
                }
                TicketState::Expired => {
                    if let Some(c) = &counters {
                        c.expired.fetch_add(1, Ordering::Relaxed);
                    }
                    r.metrics.dispatch_results.get_or_create(&StateLabel { state: "expired" }).inc();
                }
                TicketState::Queued | TicketState::Moved => {}
            }
            r.touch(&n);
        })),
    )
}

/// Queues `message` for agent `uid` of the record's namespace here, its ticket tracked under
/// the record's `key`, and counts it accepted or rejected. Answers the ticket and whether the
/// agent is a connected WebSocket agent (written to at once).
pub(crate) fn enqueue_here(
    routes: &Arc<Routes>,
    key: &Arc<Key>,
    counters: &Arc<SlotCounters>,
    limit: usize,
    expires_at: Instant,
    message: CustomMessage,
    uid: Uid,
) -> Result<(Arc<Ticket>, bool), Rejection> {
    let ticket = ticket(routes, Some(counters.clone()), &key.0, expires_at);
    let agent = AgentKey::new(key.0.as_str(), uid);
    let outcome = match routes.fleet.enqueue_tracked(&agent, message, Some(ticket.clone()), limit) {
        Ok(_) => {
            let ws =
                routes.fleet.inspect(&agent, |a| a.transport == Some(Transport::WebSocket)) == Some(true);
            routes.dispatches.track(&ticket, key);
            Ok((ticket, ws))
        }
        Err(EnqueueError::UnknownAgent) => Err(Rejection::Unknown),
        Err(EnqueueError::CapabilityNotSupported) => Err(Rejection::NoCapability),
        Err(EnqueueError::QueueFull(n)) => Err(Rejection::QueueFull(u32::try_from(n).unwrap_or(u32::MAX))),
    };
    match &outcome {
        Ok(_) => counters.accepted.fetch_add(1, Ordering::Relaxed),
        Err(_) => counters.rejected.fetch_add(1, Ordering::Relaxed),
    };
    outcome
}

/// Waits until none of `tickets` is queued, at most until `deadline`.
pub(crate) async fn wait_sent(tickets: &[Arc<Ticket>], deadline: Instant) {
    while tickets.iter().any(|t| t.state() == TicketState::Queued) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
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
    // The targets, each once: the listed agents in order (a uid in any of its spellings is one
    // target), or the agents the selector picks here (the peers' are added below).
    let mut planned: Vec<Result<Uid, Box<str>>> = Vec::new();
    let selector = match (req.agents, req.selector) {
        (Some(agents), None) if !agents.is_empty() => {
            // What is not a uid is kept as shown (cut short), and each shown string once: two
            // strings that differ only beyond the cut are one entry, in this answer and in `GET`.
            let mut seen_uids = HashSet::new();
            let mut seen_others = HashSet::new();
            for agent in &agents {
                match agent.parse::<Uid>() {
                    Ok(uid) if seen_uids.insert(uid) => planned.push(Ok(uid)),
                    Ok(_) => {}
                    Err(_) => {
                        let shown = truncated(agent, MAX_AGENT_BYTES_KEPT);
                        if seen_others.insert(shown.clone()) {
                            planned.push(Err(shown));
                        }
                    }
                }
            }
            None
        }
        (None, Some(selector)) => {
            routes.fleet.for_each(|agent, report| {
                let desc = report.description.as_ref();
                if *agent.namespace == *ns && selector.matches(|k| attribute(desc, k)) {
                    planned.push(Ok(agent.uid));
                }
            });
            Some(selector)
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of agents (a non-empty list) or selector",
            );
        }
    };
    let id = req.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let key = Arc::new((ns.clone(), name.clone(), id.clone()));
    if routes.dispatches.get(&key).is_some() {
        return error(StatusCode::CONFLICT, format!("a dispatch with id {id:?} exists already"));
    }
    // Where each target is: here when connected here, else wherever the peers say.
    let seen_here = |uid: &Uid| {
        routes.fleet.inspect(&AgentKey::new(ns.as_str(), *uid), |a| Seen::of(a.connected, a.last_seen))
    };
    let asked: Vec<Uid> = planned
        .iter()
        .filter_map(|t| t.as_ref().ok())
        .filter(|uid| !seen_here(uid).is_some_and(|s| s.connected))
        .copied()
        .collect();
    let located = super::peer::locate(&routes, &key, asked, selector.as_ref()).await;
    if located.taken {
        return error(StatusCode::CONFLICT, format!("a dispatch with id {id:?} exists already"));
    }
    if selector.is_some() {
        let mut all: HashSet<Uid> = planned.iter().filter_map(|t| t.as_ref().ok().copied()).collect();
        planned.extend(located.selected.iter().filter(|u| all.insert(**u)).map(|u| Ok(*u)));
        planned.sort_by(|a, b| a.as_ref().ok().cmp(&b.as_ref().ok()));
    }

    let expires_at = Instant::now() + dispatch.ttl;
    let deadline = Instant::now() + SEND_WAIT;
    let message =
        CustomMessage { capability: route.capability.clone(), r#type: req.r#type.clone(), data: data.into() };
    let mut there: HashMap<Member, Vec<Uid>> = HashMap::new();
    let mut decided: HashMap<Uid, Target> = HashMap::with_capacity(planned.len());
    let mut wait_for = Vec::new();
    let (mut accepted_here, mut rejected_here) = (0u64, 0u64);
    for uid in planned.iter().filter_map(|t| t.as_ref().ok()) {
        let target = match place(seen_here(uid), located.held.get(uid).map(|(m, s)| (m, *s))) {
            Place::There(member) => {
                there.entry(member).or_default().push(*uid);
                continue;
            }
            Place::Nowhere => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                rejected_here += 1;
                Target::Rejected(*uid, Rejection::Unknown)
            }
            Place::Here => {
                match enqueue_here(
                    &routes,
                    &key,
                    &counters,
                    dispatch.queue_limit,
                    expires_at,
                    message.clone(),
                    *uid,
                ) {
                    Ok((ticket, ws)) => {
                        if ws {
                            wait_for.push(ticket.clone());
                        }
                        accepted_here += 1;
                        Target::Accepted(*uid, ticket)
                    }
                    Err(why) => {
                        rejected_here += 1;
                        Target::Rejected(*uid, why)
                    }
                }
            }
        };
        decided.insert(*uid, target);
    }
    drop(message);
    // The targets held elsewhere, queued there (one call per replica, all at once).
    let calls = there.into_iter().map(|(member, uids)| {
        let request = super::peer::EnqueueRequest {
            namespace: ns.clone(),
            slot: name.clone(),
            id: id.clone(),
            r#type: req.r#type.clone(),
            data: req.data.clone(),
            uids,
        };
        let routes = routes.clone();
        async move {
            let answer = super::peer::enqueue_there(&routes, &member, &request).await;
            (request.uids, answer)
        }
    });
    for (uids, answer) in futures_util::future::join_all(calls).await {
        let mut outcomes: HashMap<Uid, super::peer::Outcome> = match answer {
            Ok(results) => results.into_iter().collect(),
            Err(_) => HashMap::new(),
        };
        for uid in uids {
            let target = match outcomes.remove(&uid) {
                Some(super::peer::Outcome::Queued) => Target::Remote(uid, Told::Queued),
                Some(super::peer::Outcome::Sent) => Target::Remote(uid, Told::Sent),
                Some(super::peer::Outcome::Rejected(why)) => Target::Rejected(uid, why),
                None => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    rejected_here += 1;
                    Target::Rejected(uid, Rejection::Replica)
                }
            };
            decided.insert(uid, target);
        }
    }
    let targets: Vec<Target> = planned
        .into_iter()
        .filter_map(|t| match t {
            Ok(uid) => decided.remove(&uid),
            Err(given) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                rejected_here += 1;
                Some(Target::NotUid(given))
            }
        })
        .collect();
    routes.touch(&ns);
    let full = targets.iter().filter(|t| matches!(t, Target::Rejected(_, Rejection::QueueFull(_)))).count();
    let record = Arc::new(Record {
        key,
        capability: route.capability.as_str().into(),
        targets: targets.into_boxed_slice(),
        origin: true,
    });
    if !record.accepted() && full > 0 && full == record.targets.len() {
        return error(StatusCode::TOO_MANY_REQUESTS, "every target agent's queue is full; retry later");
    }
    routes.count_results(accepted_here, rejected_here);
    if !routes.dispatches.insert_origin(record.clone()) {
        return error(StatusCode::CONFLICT, format!("a dispatch with id {id:?} exists already"));
    }
    // Connected WebSocket agents are written to at once: report them sent, not queued.
    wait_sent(&wait_for, deadline).await;
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
    let key = (ns, name, id);
    let mut parts: Vec<Part> = routes.dispatches.get(&key).map(|r| r.part()).into_iter().collect();
    parts.extend(super::peer::parts(&routes, &key).await);
    if parts.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no dispatch with id {:?}", key.2));
    }
    axum::Json(merge(&key.2, parts)).into_response()
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

        // Two that differ only beyond the cut are shown once, by POST and by GET alike.
        let (a, b) = ("é".repeat(39), "é".repeat(33));
        let body = json!({ "id": "cut", "type": "t", "agents": [a, b] });
        let (status, reply) = post(&app, "jobs", Some(TOKEN), &body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["results"].as_array().map(Vec::len), Some(1), "{reply}");
        let (status, again) =
            call(&app, Method::GET, &format!("{}/cut", path("jobs")), Some(TOKEN), vec![]).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["results"], reply["results"]);
    }

    fn record(ns: &str, id: &str, targets: usize) -> Arc<Record> {
        Arc::new(Record {
            key: Arc::new((ns.into(), "jobs".into(), id.into())),
            capability: "c".into(),
            targets: (0..targets).map(|_| Target::NotUid("x".into())).collect(),
            origin: true,
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

    fn entry(agent: &str, state: &str, standing: Standing) -> Entry {
        Entry { agent: agent.into(), state: state.into(), reason: None, standing }
    }

    fn states(r: &DispatchResponse) -> Vec<(&str, &str)> {
        r.results.iter().map(|a| (a.agent.as_str(), a.state.as_str())).collect()
    }

    /// The merge rule: the holder's state beats what the caller's replica was told, the new
    /// holder's beats a moved message, sent beats expired beats queued; the caller's replica's
    /// order first, then the other agents sorted, and replicas may answer in any order.
    #[test]
    fn merged_states_tell_the_most_of_each_agent() {
        use Standing::*;
        let origin = Part {
            origin: true,
            entries: vec![
                entry("c-remote-queued", "queued", Told),
                entry("a-rejected", "rejected", Told),
                entry("b-moved", "queued", Told),
                entry("d-here", "queued", Queued),
            ],
        };
        let holder = Part {
            origin: false,
            entries: vec![entry("c-remote-queued", "sent", Sent), entry("b-moved", "queued", Moved)],
        };
        let new_holder = Part {
            origin: false,
            entries: vec![entry("b-moved", "queued", Queued), entry("a-extra", "expired", Expired)],
        };
        let want = vec![
            ("c-remote-queued", "sent"),
            ("a-rejected", "rejected"),
            ("b-moved", "queued"),
            ("d-here", "queued"),
            ("a-extra", "expired"),
        ];
        let parts = [origin.clone(), holder.clone(), new_holder.clone()];
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]] {
            let merged = merge("x", order.iter().map(|i| parts[*i].clone()).collect());
            assert_eq!(states(&merged), want, "{order:?}");
        }
        // The new holder sends it: sent; an old holder's expired message loses to a send.
        let sent = Part { origin: false, entries: vec![entry("b-moved", "sent", Sent)] };
        let expired = Part { origin: false, entries: vec![entry("b-moved", "expired", Expired)] };
        let merged = merge("x", vec![expired.clone(), origin.clone(), sent, holder.clone()]);
        assert_eq!(states(&merged)[2], ("b-moved", "sent"));
        // A moved message whose new holder does not answer is still queued; an expired one on a
        // holder beats its queued placeholder.
        let merged = merge("x", vec![holder, origin.clone(), expired]);
        assert_eq!(states(&merged)[2], ("b-moved", "expired"));
        // Without the caller's replica's record, agents come sorted.
        let merged =
            merge("x", vec![new_holder, Part { origin: false, entries: vec![entry("0", "queued", Told)] }]);
        assert_eq!(states(&merged), [("0", "queued"), ("a-extra", "expired"), ("b-moved", "queued")]);
        assert_eq!(merged.id, "x");
        // A reason goes with the entry that wins.
        let mut told = origin.entries[1].clone();
        told.reason = Some("unknown agent".into());
        let merged = merge("x", vec![Part { origin: true, entries: vec![told] }]);
        assert_eq!(merged.results[0].reason.as_deref(), Some("unknown agent"));
    }

    #[test]
    fn a_connected_agent_wins_then_the_latest_sighting_and_here_on_a_tie() {
        let m = Member { identity: "b".into(), incarnation: "1".into(), address: "b:1".into() };
        let seen = |connected, last_seen_ms| Seen { connected, last_seen_ms };
        assert_eq!(place(Some(seen(true, 1)), Some((&m, seen(true, 9)))), Place::Here, "connected here");
        assert_eq!(place(Some(seen(false, 9)), Some((&m, seen(true, 1)))), Place::There(m.clone()));
        assert_eq!(place(Some(seen(false, 5)), Some((&m, seen(false, 6)))), Place::There(m.clone()));
        assert_eq!(place(Some(seen(false, 6)), Some((&m, seen(false, 5)))), Place::Here);
        assert_eq!(place(Some(seen(false, 5)), Some((&m, seen(false, 5)))), Place::Here, "a tie");
        assert_eq!(place(None, Some((&m, seen(false, 1)))), Place::There(m));
        assert_eq!(place(Some(seen(false, 1)), None), Place::Here);
        assert_eq!(place(None, None), Place::Nowhere);
        assert!(seen(true, 0).beats(&seen(false, i64::MAX)));
    }

    /// A peer's part or a hand-over adds targets to a record: an agent's new target replaces
    /// its old one, the record stays the origin's if it was, and the tickets lead back to it.
    #[test]
    fn records_grow_by_parts_and_hand_overs() {
        let store = Store::default();
        let k = Arc::new(key("a", "d1"));
        let (u1, u2) = (Uid::new_v7(), Uid::new_v7());
        let t = |s: &Store| {
            let t = Ticket::new(Instant::now() + Duration::from_secs(60), None);
            s.track(&t, &k);
            t
        };
        let first = t(&store);
        store.extend(k.clone(), "c", vec![Target::Accepted(u1, first.clone())]);
        assert_eq!(store.key_of(&first).as_deref(), Some(&*k));
        let record = store.get(&k).expect("a record made");
        assert!(!record.origin && record.targets.len() == 1);
        let second = t(&store);
        store.extend(k.clone(), "c", vec![Target::Accepted(u2, second), Target::Accepted(u1, t(&store))]);
        let record = store.get(&k).expect("the record");
        let uids: Vec<_> = record.targets.iter().filter_map(Target::uid).collect();
        assert_eq!(uids, [u1, u2], "u1 replaced in place");
        assert!(matches!(&record.targets[0], Target::Accepted(_, t) if !Arc::ptr_eq(t, &first)));
        assert_eq!(store.held("a"), ((1, 2), (1, 2)));
        let origin = Arc::new(Record {
            key: Arc::new(key("a", "d2")),
            capability: "c".into(),
            targets: Box::new([Target::Rejected(u1, Rejection::Unknown)]),
            origin: true,
        });
        assert!(store.insert(origin));
        store.extend(Arc::new(key("a", "d2")), "c", vec![Target::NotUid("x".into())]);
        let record = store.get(&key("a", "d2")).expect("the record");
        assert!(record.origin && record.targets.len() == 2);
        assert!(store.key_of(&Ticket::new(Instant::now(), None)).is_none(), "an untracked ticket");
        // A hand-over made a record before the POST's own: folded in, the POST's order first.
        let moved = t(&store);
        store.extend(Arc::new(key("a", "d3")), "c", vec![Target::Accepted(u2, moved.clone())]);
        let post = Arc::new(Record {
            key: Arc::new(key("a", "d3")),
            capability: "c".into(),
            targets: Box::new([Target::Remote(u1, Told::Queued), Target::Remote(u2, Told::Queued)]),
            origin: true,
        });
        assert!(store.insert_origin(post.clone()));
        let record = store.get(&key("a", "d3")).expect("the record");
        assert!(record.origin);
        assert!(
            matches!(&record.targets[..], [Target::Remote(a, _), Target::Accepted(b, t)] if *a == u1 && *b == u2 && Arc::ptr_eq(t, &moved))
        );
        assert!(!store.insert_origin(post), "another POST of the id");
    }

    /// A record made under small limits by parts stays within them like any other.
    #[test]
    fn parts_stay_within_the_store_limits() {
        let limits = Limits { records_per_namespace: 2, targets_per_namespace: 3, records: 10, targets: 10 };
        let store = Store::with_limits(limits);
        for i in 0..5 {
            let targets = (0..2).map(|_| Target::Rejected(Uid::new_v7(), Rejection::Unknown)).collect();
            store.extend(Arc::new(key("a", &i.to_string())), "c", targets);
        }
        assert_eq!(store.held("a").1, (1, 2), "the newest only: 2 records of 2 targets would be 4");
    }
}
