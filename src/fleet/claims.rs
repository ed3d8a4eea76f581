//! Claims, for replicas acting as one: an agent that starts a session on this replica may
//! still be remembered by another one (offline, or connected over HTTP before it was routed
//! elsewhere), with custom messages queued for it there.
//!
//! - **Claiming**: when an agent's record is created here, or comes back online here, the
//!   fleet queues a [`Claim`] (its key and the time of the new session). The queue is bounded
//!   ([`MAX_PENDING_CLAIMS`], oldest dropped) and filled only once [`Fleet::enable_claims`] was
//!   called: whoever tells the other replicas (the routes' claim task) takes them in batches
//!   ([`Fleet::take_claims`]), off the agents' hot path.
//! - **Releasing**: a replica told of a claim forgets its record of the agent if it is offline,
//!   or was last seen before the new session started ([`Fleet::release`]), and hands over the
//!   messages still queued for it; their tickets become [`TicketState::Moved`].
//! - **Adopting**: the claiming replica queues the handed-over messages again
//!   ([`Fleet::adopt`]), without the capability check (the agent may not have declared its
//!   capabilities again yet; the first holder checked them).
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{AgentKey, EnqueueError, Fleet, Ticket};
use crate::proto::CustomMessage;
use crate::protocol::session::Changes;

#[cfg(doc)]
use super::TicketState;

/// Claims waiting to be told to the other replicas; beyond this the oldest are dropped (their
/// stale records elsewhere then last until that replica's offline retention ends).
pub const MAX_PENDING_CLAIMS: usize = 100_000;

/// An agent that started a session on this replica at `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: AgentKey,
    pub since: SystemTime,
}

/// A message handed over with its agent: the message, and the ticket that followed it here
/// (now [`TicketState::Moved`]), if it was tracked.
#[derive(Debug)]
pub struct Handed {
    pub message: CustomMessage,
    pub ticket: Option<Arc<Ticket>>,
}

#[derive(Default)]
pub(super) struct Claims {
    enabled: AtomicBool,
    queue: Mutex<VecDeque<Claim>>,
    notify: Notify,
    dropped: AtomicU64,
}

impl Claims {
    fn push(&self, claim: Claim) {
        let mut queue = self.queue.lock();
        if queue.len() >= MAX_PENDING_CLAIMS {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(claim);
        drop(queue);
        self.notify.notify_one();
    }
}

impl Fleet {
    /// Starts queueing claims (see the module docs); until then none are kept.
    pub fn enable_claims(&self) {
        self.inner.claims.enabled.store(true, Ordering::Relaxed);
    }

    /// Queues a claim for an agent whose session started here at `since` (called from
    /// [`Fleet::handle`], outside the shard lock: one short lock, nothing else).
    pub(super) fn claim(&self, key: &AgentKey, since: SystemTime) {
        let claims = &self.inner.claims;
        if claims.enabled.load(Ordering::Relaxed) {
            claims.push(Claim { key: key.clone(), since });
        }
    }

    /// Takes up to `max` waiting claims, oldest first.
    pub fn take_claims(&self, max: usize) -> Vec<Claim> {
        let mut queue = self.inner.claims.queue.lock();
        let n = max.min(queue.len());
        queue.drain(..n).collect()
    }

    /// Puts claims back at the front (to be taken again first), within the bound.
    pub fn requeue_claims(&self, claims: Vec<Claim>) {
        let bound = &self.inner.claims;
        let mut queue = bound.queue.lock();
        for claim in claims.into_iter().rev() {
            if queue.len() >= MAX_PENDING_CLAIMS {
                bound.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push_front(claim);
        }
    }

    /// Claims waiting, and claims dropped at the bound so far.
    pub fn claims_pending(&self) -> (usize, u64) {
        let claims = &self.inner.claims;
        (claims.queue.lock().len(), claims.dropped.load(Ordering::Relaxed))
    }

    /// Resolves when claims may be waiting in [`Fleet::take_claims`].
    pub async fn claims_waiting(&self) {
        self.inner.claims.notify.notified().await
    }

    /// Another replica claims `key`, whose session there started at `since`: forgets this
    /// replica's record if it is offline or was last seen before `since`, and answers the
    /// messages still queued for it (their tickets moved); `None` when the record is kept or
    /// there is none.
    pub fn release(&self, key: &AgentKey, since: SystemTime) -> Option<Vec<Handed>> {
        let now = Instant::now();
        let mut shard = self.shard(&key.uid);
        let agent = shard.agents.get(key)?;
        if agent.link.is_online() && agent.last_seen_wall >= since {
            return None;
        }
        let mut agent = shard.agents.remove(key).expect("looked up under the same lock");
        let handed = agent.outbox.hand_over(now);
        drop(shard);
        if agent.link.is_online() {
            self.inner.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.inner.known.fetch_sub(1, Ordering::Relaxed);
        if let Some(u) = self.inner.tenants.read().get(&key.namespace) {
            u.agents.fetch_sub(1, Ordering::Relaxed);
            u.reported_bytes.fetch_sub(agent.reported_bytes, Ordering::Relaxed);
        }
        self.record(key, Changes::REMOVED);
        Some(handed.into_iter().map(|(message, ticket)| Handed { message, ticket }).collect())
    }

    /// Queues a message handed over by another replica for an agent held here (followed
    /// through its ticket), holding at most `limit` messages; unlike
    /// [`Fleet::enqueue_tracked`], whether the agent declared the capability is not checked.
    pub fn adopt(&self, key: &AgentKey, handed: Handed, limit: usize) -> Result<usize, EnqueueError> {
        self.push_message(key, handed.message, handed.ticket, limit, false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::fleet::{Connection, FleetConfig, Tenant, TicketState};
    use crate::proto::{AgentToServer, CustomCapabilities};
    use crate::protocol::{Transport, Uid};

    const CAP: &str = "com.example.jobs";

    fn hello(uid: Uid, seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: uid.to_wire(),
            sequence_num: seq,
            custom_capabilities: Some(CustomCapabilities { capabilities: vec![CAP.into()] }),
            ..Default::default()
        }
    }

    fn conn(fleet: &Fleet, transport: Transport) -> Connection {
        fleet.connection(transport, Tenant::new("team-a"))
    }

    fn message(t: &str) -> CustomMessage {
        CustomMessage { capability: CAP.into(), r#type: t.into(), data: Bytes::from_static(b"x") }
    }

    #[test]
    fn a_new_or_returning_session_is_claimed_once_and_the_queue_is_bounded() {
        let fleet = Fleet::new(FleetConfig::default());
        let uid = Uid::new_v7();
        let key = AgentKey::new("team-a", uid);
        let mut ws = conn(&fleet, Transport::WebSocket);
        fleet.handle(&mut ws, hello(uid, 0)).unwrap();
        assert!(fleet.take_claims(10).is_empty(), "nothing is kept until claims are enabled");
        fleet.enable_claims();
        let mut ws = conn(&fleet, Transport::WebSocket);
        fleet.handle(&mut ws, hello(uid, 1)).unwrap();
        fleet.handle(&mut ws, hello(uid, 2)).unwrap();
        assert!(fleet.take_claims(10).is_empty(), "another connection of an online agent is no new session");
        fleet.connection_closed(&ws);
        let mut back = conn(&fleet, Transport::Http);
        fleet.handle(&mut back, hello(uid, 3)).unwrap();
        fleet.handle(&mut back, hello(uid, 4)).unwrap();
        let claims = fleet.take_claims(10);
        assert_eq!(claims.len(), 1, "{claims:?}");
        assert_eq!(claims[0].key, key);
        assert_eq!(Some(claims[0].since), fleet.agent(&key).map(|a| a.connected_since));
        let other = Uid::new_v7();
        fleet.handle(&mut conn(&fleet, Transport::Http), hello(other, 0)).unwrap();
        assert_eq!(fleet.take_claims(10).len(), 1, "a new agent is claimed");

        for i in 0..MAX_PENDING_CLAIMS + 5 {
            fleet.claim(
                &AgentKey::new("team-a", Uid::from_wire(&(i as u128).to_be_bytes()).unwrap()),
                SystemTime::now(),
            );
        }
        assert_eq!(fleet.claims_pending(), (MAX_PENDING_CLAIMS, 5), "the oldest dropped");
        let first = fleet.take_claims(2);
        assert_eq!(first[0].key.uid, Uid::from_wire(&5u128.to_be_bytes()).unwrap());
        fleet.requeue_claims(first.clone());
        assert_eq!(fleet.take_claims(2), first, "put back in front");
    }

    #[test]
    fn a_claimed_agent_is_forgotten_and_its_queued_messages_handed_over() {
        let fleet = Fleet::new(FleetConfig::default());
        let uid = Uid::new_v7();
        let key = AgentKey::new("team-a", uid);
        let mut ws = conn(&fleet, Transport::WebSocket);
        fleet.handle(&mut ws, hello(uid, 0)).unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let queued = Ticket::new(later, None);
        let due = Ticket::new(Instant::now(), None);
        fleet.enqueue_custom_message(&key, message("untracked")).unwrap();
        fleet.enqueue_tracked(&key, message("due"), Some(due.clone()), 8).unwrap();
        fleet.enqueue_tracked(&key, message("queued"), Some(queued.clone()), 8).unwrap();
        assert_eq!(
            (fleet.known_count(), fleet.connected_count(), fleet.namespace_count("team-a")),
            (1, 1, 1)
        );

        let before = SystemTime::now() - Duration::from_secs(60);
        assert!(fleet.release(&key, before).is_none(), "seen here after the claimed session started");
        assert!(fleet.release(&AgentKey::new("team-b", uid), SystemTime::now()).is_none(), "not held");
        fleet.take_changes();
        let handed = fleet.release(&key, SystemTime::now() + Duration::from_secs(1)).expect("released");
        let types: Vec<_> = handed.iter().map(|h| h.message.r#type.as_str()).collect();
        assert_eq!(types, ["untracked", "queued"], "in order, the expired one left behind");
        assert!(handed[1].ticket.as_ref().is_some_and(|t| Arc::ptr_eq(t, &queued)));
        assert_eq!(queued.state(), TicketState::Moved);
        assert_eq!(due.state(), TicketState::Expired);
        assert!(!queued.expire_if_due(later + Duration::from_secs(1)), "a moved message never expires here");
        assert!(fleet.agent(&key).is_none());
        assert_eq!(
            (fleet.known_count(), fleet.connected_count(), fleet.namespace_count("team-a")),
            (0, 0, 0)
        );
        assert_eq!(fleet.namespace_reported_bytes("team-a"), 0);
        assert!(fleet.take_changes()[&key].contains(Changes::REMOVED));
        assert!(fleet.poll_push(&ws).is_none(), "the stale connection reaches nothing");
        fleet.connection_closed(&ws);
        assert_eq!(fleet.connected_count(), 0);

        // An offline record goes whatever the time.
        let mut http = conn(&fleet, Transport::Http);
        fleet.handle(&mut http, hello(uid, 0)).unwrap();
        fleet.sweep(Instant::now() + Duration::from_secs(3600));
        assert!(fleet.agent(&key).is_some_and(|a| !a.connected));
        assert!(fleet.release(&key, SystemTime::UNIX_EPOCH).is_some_and(|h| h.is_empty()));
        assert_eq!(fleet.known_count(), 0);
    }

    #[test]
    fn adopted_messages_skip_the_capability_check_but_not_the_limit() {
        let fleet = Fleet::new(FleetConfig::default());
        let uid = Uid::new_v7();
        let key = AgentKey::new("team-a", uid);
        assert_eq!(
            fleet.adopt(&key, Handed { message: message("a"), ticket: None }, 1),
            Err(EnqueueError::UnknownAgent)
        );
        let mut ws = conn(&fleet, Transport::WebSocket);
        fleet.handle(&mut ws, AgentToServer { instance_uid: uid.to_wire(), ..Default::default() }).unwrap();
        assert_eq!(
            fleet.enqueue_custom_message(&key, message("a")),
            Err(EnqueueError::CapabilityNotSupported)
        );
        assert_eq!(fleet.adopt(&key, Handed { message: message("a"), ticket: None }, 1), Ok(1));
        assert_eq!(
            fleet.adopt(&key, Handed { message: message("b"), ticket: None }, 1),
            Err(EnqueueError::QueueFull(1))
        );
        assert_eq!(fleet.poll_push(&ws).and_then(|m| m.custom_message), Some(message("a")));
    }
}
