//! The routes across replicas: the peer calls behind the dispatch API (see "Across replicas"
//! in [`super::dispatch`]) and the claims that move an agent's queued messages with it.
//!
//! Peer routes (POST, JSON, under [`crate::peers::PREFIX`], callers authenticated as peers by
//! the peer address; bodies up to [`PEER_BODY_BYTES`]):
//! - [`LOOKUP`]: which of the given uids (at most [`MAX_AGENTS`]) of a namespace this replica
//!   holds, connected or not and last seen when, which of its agents a selector picks, and
//!   whether it has a record of the dispatch id;
//! - [`ENQUEUE`]: queue a dispatch's message for the given uids here. The peer is trusted for
//!   the slot's token, but the slot must exist here with dispatch settings and allow the
//!   message type; the capability, queue limit and TTL are this replica's slot's. This
//!   replica records its part and answers each uid's outcome;
//! - [`RECORD`]: this replica's record of a dispatch id, for `GET` to merge;
//! - [`CLAIMS`]: agents that started a session on the caller at a given time (at most
//!   [`MAX_CLAIMS_PER_CALL`]). This replica forgets its records of them that are offline or
//!   were last seen before that ([`crate::fleet::claims`]) and answers the messages still
//!   queued for them, with their dispatch id and remaining TTL, up to
//!   [`HANDOVER_BUDGET_BYTES`] of data per answer (the rest of the claims are asked again).
//!
//! The claimant's side is [`Routes::run_claims`]: a background task that takes the fleet's
//! claims in batches (every [`CLAIM_GATHER`] at most), tells every live peer at once, and
//! queues the handed-over messages here under new tickets, each recorded under its dispatch
//! id (so `GET` shows its state here). A peer that does not answer keeps its stale record
//! until its offline retention ends; the claims are not retried.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Routes;
use super::dispatch::{
    Key, MAX_AGENTS, Part, Rejection, SEND_WAIT, Seen, Target, enqueue_here, error, ticket, valid_id,
    wait_sent,
};
use crate::api::AgentSelector;
use crate::fleet::{AgentKey, Claim, Handed, TicketState};
use crate::peers::Member;
use crate::proto::CustomMessage;
use crate::protocol::{Uid, attribute};

/// Which targets a peer holds (see the module docs).
pub const LOOKUP: &str = "/dispatch/lookup";
/// Queue a dispatch's message on a peer.
pub const ENQUEUE: &str = "/dispatch/enqueue";
/// A peer's record of a dispatch.
pub const RECORD: &str = "/dispatch/record";
/// Agents claimed from a peer.
pub const CLAIMS: &str = "/agents/claims";
/// Largest body of a peer call here: a dispatch's data and uids, with room to spare.
pub const PEER_BODY_BYTES: usize = super::dispatch::MAX_BODY_BYTES + MAX_AGENTS * 64 + (64 << 10);
/// Claims told in one call.
pub const MAX_CLAIMS_PER_CALL: usize = 1000;
/// Message data one claims answer hands over at most (past it, the claims left are asked
/// again; an agent's messages are never split).
pub const HANDOVER_BUDGET_BYTES: usize = 16 << 20;
/// How long claims gather before they are told.
pub const CLAIM_GATHER: Duration = Duration::from_millis(20);

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LookupRequest {
    pub namespace: String,
    pub slot: String,
    pub id: String,
    pub uids: Vec<Uid>,
    pub selector: Option<AgentSelector>,
}

/// An agent a peer holds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Held {
    pub uid: Uid,
    #[serde(flatten)]
    pub seen: Seen,
    /// Picked by the request's selector.
    pub selected: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct LookupAnswer {
    /// The peer has a record of the dispatch id.
    pub taken: bool,
    pub agents: Vec<Held>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EnqueueRequest {
    pub namespace: String,
    pub slot: String,
    pub id: String,
    pub r#type: String,
    /// Base64, as the caller gave it.
    pub data: String,
    pub uids: Vec<Uid>,
}

/// What a peer did with one target's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Outcome {
    Queued,
    Sent,
    Rejected(Rejection),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EnqueueAnswer {
    pub results: Vec<(Uid, Outcome)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RecordRequest {
    pub namespace: String,
    pub slot: String,
    pub id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RecordAnswer {
    pub part: Option<Part>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireClaim {
    pub namespace: String,
    pub uid: Uid,
    /// When the agent's session started on the claimant, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ClaimRequest {
    pub claims: Vec<WireClaim>,
}

/// A message handed over with its agent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedMessage {
    /// The slot and id of the dispatch it belongs to, if it was tracked here.
    pub dispatch: Option<(String, String)>,
    pub capability: String,
    pub r#type: String,
    /// Base64.
    pub data: String,
    /// What is left of its TTL, if it was tracked here.
    pub remaining_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedAgent {
    pub namespace: String,
    pub uid: Uid,
    pub messages: Vec<HandedMessage>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ClaimAnswer {
    pub handed: Vec<HandedAgent>,
    /// The claims from this index on were not looked at (the budget ran out): ask again.
    pub rest_from: Option<usize>,
}

/// What the peers hold of a dispatch's targets.
#[derive(Debug, Default)]
pub(crate) struct Located {
    /// A peer has a record of the id.
    pub taken: bool,
    /// Per uid, the peer that should get its message (by [`Seen::beats`]) and how it saw it.
    pub held: HashMap<Uid, (Member, Seen)>,
    /// The uids the selector picked on peers.
    pub selected: Vec<Uid>,
}

/// Asks every live peer at once which of `uids` it holds, which of its agents `selector`
/// picks, and whether the dispatch `key` is taken there. Peers that do not answer are left
/// out.
pub(crate) async fn locate(
    routes: &Routes,
    key: &Key,
    uids: Vec<Uid>,
    selector: Option<&AgentSelector>,
) -> Located {
    let mut located = Located::default();
    if routes.peers.others().is_empty() {
        return located;
    }
    let request = LookupRequest {
        namespace: key.0.clone(),
        slot: key.1.clone(),
        id: key.2.clone(),
        uids,
        selector: selector.cloned(),
    };
    let mut selected = HashSet::new();
    for (member, answer) in routes.peers.call_all::<_, LookupAnswer>(LOOKUP, &request).await {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "a replica did not say which dispatch targets it holds");
                continue;
            }
        };
        located.taken |= answer.taken;
        for held in answer.agents {
            if held.selected && selector.is_some() && selected.insert(held.uid) {
                located.selected.push(held.uid);
            }
            match located.held.get(&held.uid) {
                Some((_, best)) if !held.seen.beats(best) => {}
                _ => {
                    located.held.insert(held.uid, (member.clone(), held.seen));
                }
            }
        }
    }
    located
}

/// Has `member` queue a dispatch's message for `request.uids`; the outcome of each.
pub(crate) async fn enqueue_there(
    routes: &Routes,
    member: &Member,
    request: &EnqueueRequest,
) -> Result<Vec<(Uid, Outcome)>, ()> {
    match routes.peers.call::<_, EnqueueAnswer>(member, ENQUEUE, request).await {
        Ok(answer) => Ok(answer.results),
        Err(e) => {
            tracing::warn!(error = %e, peer = %member.identity, "a replica did not queue a dispatch");
            Err(())
        }
    }
}

/// The live peers' records of dispatch `key`.
pub(crate) async fn parts(routes: &Routes, key: &Key) -> Vec<Part> {
    if routes.peers.others().is_empty() {
        return Vec::new();
    }
    let request = RecordRequest { namespace: key.0.clone(), slot: key.1.clone(), id: key.2.clone() };
    let mut parts = Vec::new();
    for (_, answer) in routes.peers.call_all::<_, RecordAnswer>(RECORD, &request).await {
        match answer {
            Ok(RecordAnswer { part: Some(part) }) => parts.push(part),
            Ok(RecordAnswer { part: None }) => {}
            Err(e) => tracing::warn!(error = %e, "a replica did not answer its record of a dispatch"),
        }
    }
    parts
}

/// The peer routes of the dispatch API and of claims (to be nested under
/// [`crate::peers::PREFIX`], behind the peers' authentication).
pub fn router(routes: Arc<Routes>) -> Router {
    Router::new()
        .route(LOOKUP, post(lookup))
        .route(ENQUEUE, post(enqueue))
        .route(RECORD, post(record))
        .route(CLAIMS, post(claims))
        .layer(axum::extract::DefaultBodyLimit::max(PEER_BODY_BYTES))
        .with_state(routes)
}

async fn lookup(State(routes): State<Arc<Routes>>, axum::Json(req): axum::Json<LookupRequest>) -> Response {
    if req.uids.len() > MAX_AGENTS {
        return error(StatusCode::BAD_REQUEST, format!("more than {MAX_AGENTS} uids"));
    }
    let taken = routes.dispatches.get(&(req.namespace.clone(), req.slot, req.id)).is_some();
    let ns = req.namespace.as_str();
    let mut agents = Vec::new();
    let mut listed = HashSet::new();
    for uid in req.uids {
        let key = AgentKey::new(ns, uid);
        if let Some(seen) = routes.fleet.inspect(&key, |a| Seen::of(a.connected, a.last_seen)) {
            listed.insert(uid);
            agents.push(Held { uid, seen, selected: false });
        }
    }
    if let Some(selector) = &req.selector {
        routes.fleet.for_each_view(|a| {
            let desc = a.report.description.as_ref();
            if **a.namespace == *ns && selector.matches(|k| attribute(desc, k)) && !listed.contains(&a.uid) {
                agents.push(Held { uid: a.uid, seen: Seen::of(a.connected, a.last_seen), selected: true });
            }
        });
    }
    axum::Json(LookupAnswer { taken, agents }).into_response()
}

async fn enqueue(State(routes): State<Arc<Routes>>, axum::Json(req): axum::Json<EnqueueRequest>) -> Response {
    if req.uids.len() > MAX_AGENTS || !valid_id(&req.id) {
        return error(StatusCode::BAD_REQUEST, format!("a valid id and at most {MAX_AGENTS} uids"));
    }
    let Some((route, counters)) = routes.route(&req.namespace, &req.slot) else {
        return error(StatusCode::NOT_FOUND, "no such CapabilitySlot here");
    };
    let Some(dispatch) = route.dispatch.clone() else {
        return error(StatusCode::NOT_FOUND, "the CapabilitySlot has no dispatch settings here");
    };
    if !route.allows(&req.r#type) {
        return error(StatusCode::BAD_REQUEST, "the message type is not in the slot's messageTypes");
    }
    let Ok(data) = base64::engine::general_purpose::STANDARD.decode(req.data.as_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "data is not valid base64");
    };
    let message =
        CustomMessage { capability: route.capability.clone(), r#type: req.r#type, data: data.into() };
    let key = Arc::new((req.namespace, req.slot, req.id));
    let now = Instant::now();
    let (expires_at, deadline) = (now + dispatch.ttl, now + SEND_WAIT);
    let mut seen = HashSet::new();
    let mut results = Vec::with_capacity(req.uids.len());
    let mut accepted = Vec::new();
    let mut tickets = Vec::new();
    let mut wait_for = Vec::new();
    let mut rejected = 0;
    for uid in req.uids.into_iter().filter(|u| seen.insert(*u)) {
        match enqueue_here(&routes, &key, &counters, dispatch.queue_limit, expires_at, message.clone(), uid) {
            Ok((ticket, ws)) => {
                results.push((uid, None));
                if ws {
                    wait_for.push(ticket.clone());
                }
                tickets.push(ticket.clone());
                accepted.push(Target::Accepted(uid, ticket));
            }
            Err(why) => {
                rejected += 1;
                results.push((uid, Some(why)));
            }
        }
    }
    routes.count_results(accepted.len() as u64, rejected);
    routes.touch(&key.0);
    if !accepted.is_empty() {
        routes.dispatches.extend(key, &route.capability, accepted);
    }
    // Connected WebSocket agents are written to at once: answer them sent, not queued.
    wait_sent(&wait_for, deadline).await;
    let mut tickets = tickets.into_iter();
    let results = results
        .into_iter()
        .map(|(uid, why)| match why {
            Some(why) => (uid, Outcome::Rejected(why)),
            None => match tickets.next().map(|t| t.state()) {
                Some(TicketState::Sent) => (uid, Outcome::Sent),
                _ => (uid, Outcome::Queued),
            },
        })
        .collect();
    axum::Json(EnqueueAnswer { results }).into_response()
}

async fn record(State(routes): State<Arc<Routes>>, axum::Json(req): axum::Json<RecordRequest>) -> Response {
    routes.dispatches.expire(Instant::now());
    let part = routes.dispatches.get(&(req.namespace, req.slot, req.id)).map(|r| r.part());
    axum::Json(RecordAnswer { part }).into_response()
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn claims(State(routes): State<Arc<Routes>>, axum::Json(req): axum::Json<ClaimRequest>) -> Response {
    if req.claims.len() > MAX_CLAIMS_PER_CALL {
        return error(StatusCode::BAD_REQUEST, format!("more than {MAX_CLAIMS_PER_CALL} claims"));
    }
    axum::Json(release(&routes, req.claims)).into_response()
}

/// Forgets the claimed agents held here (see [`crate::fleet::Fleet::release`]) and answers
/// their queued messages, within [`HANDOVER_BUDGET_BYTES`].
fn release(routes: &Routes, claims: Vec<WireClaim>) -> ClaimAnswer {
    let b64 = base64::engine::general_purpose::STANDARD;
    let now = Instant::now();
    let mut answer = ClaimAnswer::default();
    let mut used = 0;
    for (i, claim) in claims.into_iter().enumerate() {
        if used >= HANDOVER_BUDGET_BYTES {
            answer.rest_from = Some(i);
            break;
        }
        let key = AgentKey::new(claim.namespace.as_str(), claim.uid);
        let since = SystemTime::UNIX_EPOCH + Duration::from_millis(claim.since_ms);
        let Some(handed) = routes.fleet.release(&key, since) else { continue };
        tracing::debug!(agent = %key, messages = handed.len(), "an agent claimed by another replica");
        if handed.is_empty() {
            continue;
        }
        let messages = handed
            .into_iter()
            .map(|h| {
                used += h.message.data.len() + h.message.r#type.len() + h.message.capability.len();
                let dispatch = h.ticket.as_ref().and_then(|t| routes.dispatches.key_of(t));
                let remaining = h.ticket.as_ref().map(|t| {
                    u64::try_from(t.expires_at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
                });
                HandedMessage {
                    dispatch: dispatch.map(|k| (k.1.clone(), k.2.clone())),
                    capability: h.message.capability,
                    r#type: h.message.r#type,
                    data: b64.encode(&h.message.data),
                    remaining_ms: remaining,
                }
            })
            .collect();
        answer.handed.push(HandedAgent { namespace: claim.namespace, uid: claim.uid, messages });
    }
    answer
}

impl Routes {
    /// Tells the other replicas of the agents that start sessions here, in batches, and
    /// queues the messages they hand over (see the module docs), until `shutdown`.
    pub async fn run_claims(self: Arc<Self>, shutdown: CancellationToken) {
        self.fleet.enable_claims();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fleet.claims_waiting() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CLAIM_GATHER) => {}
            }
            loop {
                let batch = self.fleet.take_claims(MAX_CLAIMS_PER_CALL);
                if batch.is_empty() {
                    break;
                }
                if self.peers.others().is_empty() {
                    continue; // nobody else to hold them
                }
                self.tell_claims(batch).await;
            }
        }
    }

    async fn tell_claims(&self, batch: Vec<Claim>) {
        let request = ClaimRequest {
            claims: batch
                .iter()
                .map(|c| WireClaim {
                    namespace: c.key.namespace.to_string(),
                    uid: c.key.uid,
                    since_ms: millis(c.since),
                })
                .collect(),
        };
        let mut again = usize::MAX;
        for (member, answer) in self.peers.call_all::<_, ClaimAnswer>(CLAIMS, &request).await {
            match answer {
                Ok(answer) => {
                    if let Some(i) = answer.rest_from.filter(|i| *i > 0) {
                        again = again.min(i);
                    }
                    for agent in answer.handed {
                        self.adopt(agent);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, peer = %member.identity, claims = batch.len(), "a replica was not told of agents claimed here")
                }
            }
        }
        if again < batch.len() {
            self.fleet.requeue_claims(batch.into_iter().skip(again).collect());
        }
    }

    /// Queues the messages handed over with an agent here, each under a new ticket recorded
    /// under its dispatch (what cannot be queued is recorded expired).
    fn adopt(&self, agent: HandedAgent) {
        let Some(routes) = self.me.upgrade() else { return };
        let key = AgentKey::new(agent.namespace.as_str(), agent.uid);
        let now = Instant::now();
        for m in agent.messages {
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(m.data.as_bytes()) else {
                continue;
            };
            let message = CustomMessage { capability: m.capability, r#type: m.r#type, data: data.into() };
            let default_limit = self.fleet.config().outbox_limit;
            let (Some((slot, id)), Some(remaining)) = (m.dispatch, m.remaining_ms) else {
                if let Err(e) = self.fleet.adopt(&key, Handed { message, ticket: None }, default_limit) {
                    tracing::debug!(error = %e, agent = %key, "a handed-over message was not queued");
                }
                continue;
            };
            let route = self.route(&agent.namespace, &slot);
            let limit = route
                .as_ref()
                .and_then(|(r, _)| r.dispatch.as_ref())
                .map_or(default_limit, |d| d.queue_limit);
            let ticket = ticket(
                &routes,
                route.map(|(_, c)| c),
                &agent.namespace,
                now + Duration::from_millis(remaining),
            );
            let capability = message.capability.clone();
            let record = Arc::new((agent.namespace.clone(), slot, id));
            if let Err(e) = self.fleet.adopt(&key, Handed { message, ticket: Some(ticket.clone()) }, limit) {
                tracing::debug!(error = %e, agent = %key, "a handed-over message was not queued");
                ticket.expire_if_due(ticket.expires_at);
            }
            self.dispatches.track(&ticket, &record);
            self.dispatches.extend(record, &capability, vec![Target::Accepted(agent.uid, ticket)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DownstreamStatus, UpstreamStatus};
    use crate::fleet::{Fleet, FleetConfig, Tenant};
    use crate::proto::{AgentToServer, CustomCapabilities};
    use crate::protocol::Transport;
    use crate::routes::dispatch::{Standing, merge};
    use crate::routes::egress::EgressPolicy;
    use crate::routes::{DispatchRoute, SlotRoute};

    const NS: &str = "tenant";
    const CAP: &str = "com.example.jobs";

    fn replica() -> Arc<Routes> {
        let routes = Routes::new(Fleet::new(FleetConfig::default()), Arc::default(), EgressPolicy::default());
        let slot = SlotRoute {
            namespace: NS.into(),
            name: "jobs".into(),
            capability: CAP.into(),
            selector: AgentSelector::default(),
            message_types: vec![],
            callback: None,
            dispatch: Some(DispatchRoute {
                token: Ok(b"t".to_vec()),
                queue_limit: 8,
                ttl: Duration::from_secs(300),
            }),
        };
        routes.publish(NS, vec![(slot, UpstreamStatus::default(), DownstreamStatus::default())]);
        routes
    }

    fn hello(uid: Uid) -> AgentToServer {
        AgentToServer {
            instance_uid: uid.to_wire(),
            custom_capabilities: Some(CustomCapabilities { capabilities: vec![CAP.into()] }),
            ..Default::default()
        }
    }

    fn state(parts: Vec<Part>) -> String {
        let merged = serde_json::to_value(merge("d1", parts)).unwrap();
        merged["results"][0]["state"].as_str().unwrap().to_owned()
    }

    /// B holds an offline agent with a queued message; the agent starts a session on C, which
    /// claims it: B forgets it and hands the message over (JSON, as between replicas), C queues
    /// it with its remaining TTL and records it; the merged state follows it to `sent`.
    #[test]
    fn a_queued_message_follows_its_agent_to_the_replica_that_claims_it() {
        let (b, c) = (replica(), replica());
        let uid = Uid::new_v7();
        let mut on_b = b.fleet.connection(Transport::WebSocket, Tenant::new(NS));
        b.fleet.handle(&mut on_b, hello(uid)).unwrap();
        b.fleet.connection_closed(&on_b);
        let key = Arc::new((NS.to_owned(), "jobs".to_owned(), "d1".to_owned()));
        let (_, counters) = b.route(NS, "jobs").unwrap();
        let expires_at = Instant::now() + Duration::from_secs(300);
        let message = CustomMessage { capability: CAP.into(), r#type: "start".into(), data: "go".into() };
        let (ticket, ws) = enqueue_here(&b, &key, &counters, 8, expires_at, message.clone(), uid).unwrap();
        assert!(!ws, "offline");
        b.dispatches.extend(key.clone(), CAP, vec![Target::Accepted(uid, ticket.clone())]);
        let part_b = || b.dispatches.get(&key).unwrap().part();
        assert_eq!(part_b().entries[0].standing, Standing::Queued);

        // The agent comes back on C, without its capabilities yet (a bare heartbeat).
        let mut on_c = c.fleet.connection(Transport::WebSocket, Tenant::new(NS));
        c.fleet
            .handle(&mut on_c, AgentToServer { instance_uid: uid.to_wire(), ..Default::default() })
            .unwrap();
        let since = c.fleet.agent(&AgentKey::new(NS, uid)).unwrap().connected_since;
        let claim = WireClaim { namespace: NS.into(), uid, since_ms: millis(since) };
        let answer = release(&b, vec![claim]);
        let answer: ClaimAnswer = serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
        assert!(b.fleet.agent(&AgentKey::new(NS, uid)).is_none(), "B forgot it");
        assert_eq!(ticket.state(), TicketState::Moved);
        let handed = &answer.handed[0].messages[0];
        assert_eq!(handed.dispatch, Some(("jobs".into(), "d1".into())));
        assert!(handed.remaining_ms.is_some_and(|ms| ms > 290_000 && ms <= 300_000), "{handed:?}");
        for agent in answer.handed {
            c.adopt(agent);
        }
        let part_c = || c.dispatches.get(&key).expect("C records the message").part();
        assert_eq!(part_b().entries[0].standing, Standing::Moved);
        assert_eq!(state(vec![part_b(), part_c()]), "queued");

        let pushed = c.fleet.poll_push(&on_c).and_then(|m| m.custom_message);
        assert_eq!(pushed, Some(message));
        assert_eq!(state(vec![part_b(), part_c()]), "sent");
        assert_eq!(state(vec![part_c(), part_b()]), "sent");
        let (_, on_c_counters) = c.route(NS, "jobs").unwrap();
        let total = |f: fn(&crate::api::DownstreamStatus) -> u64| {
            f(&counters.downstream()) + f(&on_c_counters.downstream())
        };
        assert_eq!(
            (total(|d| d.accepted), total(|d| d.sent), total(|d| d.expired)),
            (1, 1, 0),
            "counted once"
        );
        // Told again (a retry): nothing more to hand over.
        assert!(
            release(&b, vec![WireClaim { namespace: NS.into(), uid, since_ms: millis(since) }])
                .handed
                .is_empty()
        );
    }

    /// An answer stops handing over at the budget (never splitting an agent's messages, never
    /// empty when the first agent alone is over it) and says where to ask again.
    #[test]
    fn a_claims_answer_stays_within_its_budget() {
        let b = replica();
        let uids: Vec<Uid> = (0..3).map(|_| Uid::new_v7()).collect();
        let big = bytes::Bytes::from(vec![b'x'; HANDOVER_BUDGET_BYTES / 2 + 1]);
        for uid in &uids {
            let mut conn = b.fleet.connection(Transport::Http, Tenant::new(NS));
            b.fleet.handle(&mut conn, hello(*uid)).unwrap();
            let m = CustomMessage { capability: CAP.into(), r#type: "t".into(), data: big.clone() };
            b.fleet.enqueue_custom_message(&AgentKey::new(NS, *uid), m).unwrap();
        }
        let claim = |uid: &Uid| WireClaim { namespace: NS.into(), uid: *uid, since_ms: u64::MAX / 2 };
        let answer = release(&b, uids.iter().map(claim).collect());
        assert_eq!(answer.handed.len(), 2);
        assert_eq!(answer.rest_from, Some(2));
        assert!(b.fleet.agent(&AgentKey::new(NS, uids[2])).is_some(), "the third is kept for the next ask");
    }

    async fn call(app: &Router, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        use tower::ServiceExt;
        let req = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// The peer route trusts the peer for the token, not for the slot: an unknown slot, a
    /// message type the slot does not allow and too many uids are refused; otherwise each
    /// uid gets its outcome and the part is recorded.
    #[tokio::test]
    async fn the_enqueue_route_checks_the_slot_and_its_bounds() {
        let routes = replica();
        let app = router(routes.clone());
        let uid = Uid::new_v7();
        let mut conn = routes.fleet.connection(Transport::Http, Tenant::new(NS));
        routes.fleet.handle(&mut conn, hello(uid)).unwrap();
        let body = |slot: &str, t: &str, uids: Vec<Uid>| serde_json::json!({ "namespace": NS, "slot": slot, "id": "d1", "type": t, "data": "Z28=", "uids": uids });
        assert_eq!(call(&app, ENQUEUE, body("nope", "start", vec![uid])).await.0, 404);
        let too_many = (0..=MAX_AGENTS).map(|_| uid).collect();
        assert_eq!(call(&app, ENQUEUE, body("jobs", "start", too_many)).await.0, 400);
        let mut strict = routes.route(NS, "jobs").unwrap().0.as_ref().clone();
        strict.message_types = vec!["stop".into()];
        routes.publish(NS, vec![(strict, UpstreamStatus::default(), DownstreamStatus::default())]);
        assert_eq!(call(&app, ENQUEUE, body("jobs", "start", vec![uid])).await.0, 400);
        assert!(routes.dispatches.get(&(NS.into(), "jobs".into(), "d1".into())).is_none());

        let other = Uid::new_v7();
        let (status, answer) = call(&app, ENQUEUE, body("jobs", "stop", vec![uid, other, uid])).await;
        assert_eq!(status, 200, "{answer}");
        let answer: EnqueueAnswer = serde_json::from_value(answer).unwrap();
        assert_eq!(answer.results, [(uid, Outcome::Queued), (other, Outcome::Rejected(Rejection::Unknown))]);
        let part = routes.dispatches.get(&(NS.into(), "jobs".into(), "d1".into())).unwrap().part();
        assert!(!part.origin && part.entries.len() == 1, "{part:?}");

        let lookup = serde_json::json!({ "namespace": NS, "slot": "jobs", "id": "d1", "uids": [uid, other],
                                         "selector": { "matchAttributes": {} } });
        let (status, answer) = call(&app, LOOKUP, lookup).await;
        assert_eq!(status, 200, "{answer}");
        let answer: LookupAnswer = serde_json::from_value(answer).unwrap();
        assert!(answer.taken);
        assert_eq!(answer.agents.iter().map(|h| (h.uid, h.selected)).collect::<Vec<_>>(), [(uid, false)]);
    }
}
