//! One agent's entry in the registry.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

use super::outbox::Outbox;
use super::{AgentKey, Connection, DesiredState, Wakeup};
use crate::protocol::session::{AgentReport, Session};
use crate::protocol::{Transport, Uid};

#[derive(Debug)]
pub(super) enum Link {
    WebSocket {
        conn: u64,
        wakeup: Arc<Wakeup>,
    },
    Http,
    /// `http`: it was a plain-HTTP agent when it went offline.
    Offline {
        since: Instant,
        http: bool,
    },
}

impl Link {
    pub(super) fn is_online(&self) -> bool {
        !matches!(self, Link::Offline { .. })
    }
}

pub(super) struct Agent {
    pub(super) session: Session,
    pub(super) link: Link,
    pub(super) connected_since: SystemTime,
    pub(super) last_seen: Instant,
    pub(super) last_seen_wall: SystemTime,
    /// When its link, report or desired state last changed (see `AgentView::changed`).
    pub(super) changed: SystemTime,
    pub(super) desired: DesiredState,
    /// The version of its namespace's plan `desired` was derived from (0: none yet).
    pub(super) plan_version: u64,
    pub(super) outbox: Outbox,
    /// The encoded size of the kept report, counted in its namespace's usage.
    pub(super) reported_bytes: usize,
}

impl Agent {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            session: Session::new(),
            link: Link::Offline { since: now, http: false },
            connected_since: SystemTime::now(),
            last_seen: now,
            last_seen_wall: SystemTime::now(),
            changed: SystemTime::now(),
            desired: DesiredState::default(),
            plan_version: 0,
            outbox: Outbox::default(),
            reported_bytes: 0,
        }
    }

    /// Whether the agent is reachable through this connection.
    pub(super) fn is_on(&self, conn: &Connection) -> bool {
        match &self.link {
            Link::WebSocket { conn: id, .. } => *id == conn.id,
            Link::Http => conn.transport == Transport::Http,
            Link::Offline { .. } => false,
        }
    }

    pub(super) fn attach(&mut self, conn: &Connection) {
        self.link = match &conn.wakeup {
            Some(wakeup) => Link::WebSocket { conn: conn.id, wakeup: wakeup.clone() },
            None => Link::Http,
        };
    }

    pub(super) fn go_offline(&mut self, now: Instant) {
        let http = matches!(self.link, Link::Http | Link::Offline { http: true, .. });
        self.link = Link::Offline { since: now, http };
        self.changed = SystemTime::now();
    }

    /// How long an HTTP agent may be silent before it counts as gone: three of its polls, at
    /// the server's interval (`deadline` is three of those) or at a longer one it was offered.
    pub(super) fn poll_deadline(&self, deadline: Duration) -> Duration {
        let offered = self.desired.connection_settings.as_ref().and_then(|o| o.opamp.as_ref());
        let polls_every = offered
            .and_then(|o| self.session.report.opamp_part(o))
            .map(|o| Duration::from_secs(o.heartbeat_interval_seconds));
        polls_every.map_or(deadline, |every| deadline.max(every.saturating_mul(3)))
    }

    pub(super) fn touch(&mut self, now: Instant) {
        self.last_seen = now;
        self.last_seen_wall = SystemTime::now();
    }

    /// Wakes the agent's WebSocket connection so it pushes what changed.
    pub(super) fn wake(&self) {
        if let Link::WebSocket { wakeup, .. } = &self.link {
            wakeup.raise(Wakeup::PUSH);
        }
    }

    pub(super) fn transport(&self) -> Option<Transport> {
        match self.link {
            Link::WebSocket { .. } => Some(Transport::WebSocket),
            Link::Http => Some(Transport::Http),
            Link::Offline { .. } => None,
        }
    }

    pub(super) fn view<'a>(&'a self, key: &'a AgentKey) -> super::AgentView<'a> {
        super::AgentView {
            namespace: &key.namespace,
            uid: key.uid,
            transport: self.transport(),
            report: &self.session.report,
            connected: self.link.is_online(),
            http: matches!(self.link, Link::Http | Link::Offline { http: true, .. }),
            awaiting_full_state: self.session.awaiting_full_state(),
            desired: &self.desired,
            last_seen: self.last_seen_wall,
            changed: self.changed,
        }
    }

    pub(super) fn snapshot(&self, key: &AgentKey) -> AgentSnapshot {
        AgentSnapshot {
            uid: key.uid,
            namespace: key.namespace.to_string(),
            transport: self.transport(),
            connected: self.link.is_online(),
            connected_since: self.connected_since,
            last_seen: self.last_seen_wall,
            report: self.session.report.clone(),
            awaiting_full_state: self.session.awaiting_full_state(),
            desired_config_hash: self.desired.remote_config.as_ref().map(|c| c.config_hash.clone()),
            queued_custom_messages: self.outbox.len(),
            reported_bytes: self.reported_bytes,
        }
    }
}

/// A copy of what the server knows of one agent.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    pub uid: Uid,
    pub namespace: String,
    /// The transport it is connected through, `None` when disconnected.
    pub transport: Option<Transport>,
    pub connected: bool,
    pub connected_since: SystemTime,
    pub last_seen: SystemTime,
    /// The last reported description, health, effective config, statuses, capabilities.
    pub report: AgentReport,
    pub awaiting_full_state: bool,
    pub desired_config_hash: Option<Bytes>,
    pub queued_custom_messages: usize,
    /// The encoded size of the kept report (bounded; see `AgentReport::trimmed`).
    pub reported_bytes: usize,
}
