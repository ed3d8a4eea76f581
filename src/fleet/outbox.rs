//! A bounded per-agent queue of custom messages waiting to be sent, each with an optional
//! ticket through which the sender follows it (queued → sent, expired, or moved: handed over
//! to another replica with its agent, see [`super::claims`]).
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::time::Instant;

use crate::proto::CustomMessage;

pub const OUTBOX_LIMIT_DEFAULT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("unknown agent")]
    UnknownAgent,
    #[error("the agent did not declare this custom capability")]
    CapabilityNotSupported,
    #[error("the agent's queue holds its limit of {0} messages")]
    QueueFull(usize),
}

/// Where a tracked message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketState {
    Queued,
    Sent,
    Expired,
    /// Handed over, still queued, to the replica the agent moved to (which follows it with a
    /// ticket of its own); never sent nor expired here.
    Moved,
}

/// Follows one queued message. Transitions happen once (queued → sent, expired or moved), and
/// the observer hears each.
pub struct Ticket {
    state: AtomicU8,
    pub expires_at: Instant,
    observer: Option<Box<dyn Fn(TicketState) + Send + Sync>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("state", &self.state()).field("expires_at", &self.expires_at).finish()
    }
}

impl Ticket {
    pub fn new(expires_at: Instant, observer: Option<Box<dyn Fn(TicketState) + Send + Sync>>) -> Arc<Self> {
        Arc::new(Self { state: AtomicU8::new(0), expires_at, observer })
    }

    pub fn state(&self) -> TicketState {
        match self.state.load(Ordering::Acquire) {
            0 => TicketState::Queued,
            1 => TicketState::Sent,
            2 => TicketState::Expired,
            _ => TicketState::Moved,
        }
    }

    fn transition(&self, to: TicketState) -> bool {
        let code = match to {
            TicketState::Queued => return false,
            TicketState::Sent => 1,
            TicketState::Expired => 2,
            TicketState::Moved => 3,
        };
        let moved = self.state.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if moved {
            if let Some(o) = &self.observer {
                o(to);
            }
        }
        moved
    }

    /// Expires the message if it is still queued past its deadline; true when it did now.
    pub fn expire_if_due(&self, now: Instant) -> bool {
        now >= self.expires_at && self.transition(TicketState::Expired)
    }
}

#[derive(Debug)]
struct Outgoing {
    message: CustomMessage,
    ticket: Option<Arc<Ticket>>,
}

#[derive(Debug, Default)]
pub(super) struct Outbox {
    queue: VecDeque<Outgoing>,
}

impl Outbox {
    /// Appends a message; returns the queue depth.
    pub(super) fn push(
        &mut self,
        message: CustomMessage,
        ticket: Option<Arc<Ticket>>,
        limit: usize,
    ) -> Result<usize, EnqueueError> {
        self.queue.retain(|o| o.ticket.as_ref().is_none_or(|t| t.state() == TicketState::Queued));
        if self.queue.len() >= limit {
            return Err(EnqueueError::QueueFull(limit));
        }
        self.queue.push_back(Outgoing { message, ticket });
        Ok(self.queue.len())
    }

    /// The next message to send, skipping expired ones; its ticket becomes sent.
    pub(super) fn pop(&mut self) -> Option<CustomMessage> {
        // Asked at every message, with nothing queued most of the time: no clock read then.
        if self.queue.is_empty() {
            return None;
        }
        let now = Instant::now();
        while let Some(o) = self.queue.pop_front() {
            match &o.ticket {
                None => return Some(o.message),
                Some(t) if t.expire_if_due(now) => continue,
                Some(t) if t.transition(TicketState::Sent) => return Some(o.message),
                Some(_) => continue, // expired by a sweep already
            }
        }
        None
    }

    /// Empties the queue for a hand-over: the messages still to be sent, in order, their
    /// tickets moved (untracked messages go along as they are); expired ones stay behind.
    pub(super) fn hand_over(&mut self, now: Instant) -> Vec<(CustomMessage, Option<Arc<Ticket>>)> {
        let mut out = Vec::with_capacity(self.queue.len());
        for o in self.queue.drain(..) {
            match &o.ticket {
                None => out.push((o.message, None)),
                Some(t) if t.expire_if_due(now) => {}
                Some(t) if t.transition(TicketState::Moved) => out.push((o.message, o.ticket)),
                Some(_) => {}
            }
        }
        out
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
