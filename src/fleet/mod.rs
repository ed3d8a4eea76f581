//! The fleet registry: every agent the server knows, its reported state, what it should have,
//! and how to reach it. It knows nothing of sockets: transports hand it decoded messages and a
//! [`Connection`] describing where they came from, and get back the reply.
//!
//! Desired state flows one way: the controller publishes one versioned [`Plan`] per namespace
//! ([`Fleet::publish_plan`]); the fleet derives each agent's desired state from its namespace's
//! current plan when the agent connects or changes its description, and for every agent of the
//! namespace when a new plan is published (waking its WebSocket agents). Both happen under the
//! agent's shard lock, so a connecting agent and a new plan cannot race: whichever comes second
//! sees the other.
//!
//! Built for a large fleet in one process: agents live in sharded maps behind short-lived
//! mutexes (never held across an await; the only code called under them is a plan, a pure
//! function), a connected WebSocket agent costs one [`Wakeup`] for pushes, HTTP agents cost no
//! task at all, and no operation on one agent touches the others.
//!
//! With several replicas, an agent starting a session here is claimed from the others, who
//! forget their record of it and hand over its queued messages ([`claims`]).
mod agent;
pub mod claims;
mod metrics;
mod outbox;
#[cfg(test)]
mod tests;
mod wakeup;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use agent::AgentSnapshot;
use agent::{Agent, Link};
pub use claims::{Claim, Handed};
pub use metrics::{FleetMetrics, TransportLabel};
pub use outbox::{EnqueueError, OUTBOX_LIMIT_DEFAULT, Ticket, TicketState};
pub use wakeup::Wakeup;

use crate::proto::{
    AgentIdentification, AgentRemoteConfig, AgentToServer, AgentToServerFlags, ConnectionSettingsOffers,
    CustomCapabilities, CustomMessage, ServerToAgent,
};
pub use crate::protocol::session::Changes;
use crate::protocol::session::{AgentReport, Desired, Ingested, Restart, server_message};
use crate::protocol::shared::SharedParts;
use crate::protocol::{Transport, Uid};

/// An agent's identity: the namespace of the token it presented, and its instance uid. The same
/// uid presented with another namespace's token is another agent, with a record of its own: no
/// token can read, move or write an agent of another namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    pub namespace: Arc<str>,
    pub uid: Uid,
}

impl AgentKey {
    pub fn new(namespace: impl Into<Arc<str>>, uid: Uid) -> Self {
        Self { namespace: namespace.into(), uid }
    }
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.uid)
    }
}

/// The namespace an authenticated agent belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    pub namespace: Arc<str>,
}

impl Tenant {
    pub fn new(namespace: &str) -> Self {
        Self { namespace: namespace.into() }
    }
}

/// Agents (connected, or offline and not yet forgotten) one namespace may have by default.
pub const MAX_AGENTS_PER_NAMESPACE_DEFAULT: usize = 20_000;
/// Bytes of reported state (description, health, effective config, statuses, capabilities,
/// components) kept per agent by default.
pub const MAX_REPORTED_BYTES_PER_AGENT_DEFAULT: usize = 512 << 10;
/// Bytes of reported state kept per namespace by default.
pub const MAX_REPORTED_BYTES_PER_NAMESPACE_DEFAULT: usize = 1 << 30;
/// Uids issued to HTTP agents with an invalid uid, remembered per namespace so retries get the
/// same one; wire uids longer than [`ISSUED_UID_KEY_MAX_BYTES`] are not remembered.
pub const ISSUED_UIDS_PER_NAMESPACE: usize = 1024;
pub const ISSUED_UID_KEY_MAX_BYTES: usize = 64;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Connected agents beyond this are refused with "unavailable, retry later".
    pub max_agents: Option<usize>,
    /// Agents one namespace may have, connected or remembered offline; new ones beyond it are
    /// refused with "unavailable, retry later". `None`: no limit.
    pub max_agents_per_namespace: Option<usize>,
    /// Bytes of reported state kept per agent; larger parts are dropped and the agent flagged.
    pub max_reported_bytes_per_agent: usize,
    /// Bytes of reported state kept per namespace, all its agents together.
    pub max_reported_bytes_per_namespace: usize,
    /// The heartbeat interval agents are expected to keep; HTTP agents silent for three of
    /// them count as disconnected.
    pub heartbeat_interval: Duration,
    /// How long a disconnected agent is remembered before it is forgotten.
    pub offline_retention: Duration,
    /// What refused agents are told to wait before retrying.
    pub retry_after: Duration,
    /// Custom messages held per agent.
    pub outbox_limit: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            max_agents: None,
            max_agents_per_namespace: Some(MAX_AGENTS_PER_NAMESPACE_DEFAULT),
            max_reported_bytes_per_agent: MAX_REPORTED_BYTES_PER_AGENT_DEFAULT,
            max_reported_bytes_per_namespace: MAX_REPORTED_BYTES_PER_NAMESPACE_DEFAULT,
            heartbeat_interval: Duration::from_secs(30),
            offline_retention: Duration::from_secs(600),
            retry_after: Duration::from_secs(30),
            outbox_limit: OUTBOX_LIMIT_DEFAULT,
        }
    }
}

/// What the server wants one agent to have, as computed by the controller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    pub remote_config: Option<Arc<AgentRemoteConfig>>,
    pub custom_capabilities: Option<Arc<CustomCapabilities>>,
    pub connection_settings: Option<Arc<ConnectionSettingsOffers>>,
    pub restart: Option<Restart>,
}

impl DesiredState {
    pub fn as_desired(&self) -> Desired<'_> {
        Desired {
            remote_config: self.remote_config.as_ref(),
            custom_capabilities: self.custom_capabilities.as_ref(),
            connection_settings: self.connection_settings.as_ref(),
            restart_at: self.restart.filter(|r| r.due <= unix_nanos(SystemTime::now())).map(|r| r.at),
        }
    }
}

/// What [`Fleet::shared_parts`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCounts {
    pub effective_configs: usize,
    pub available_components: usize,
    /// Keys and string values of descriptions.
    pub description_strings: usize,
}

/// A borrowed view of one agent (see [`Fleet::inspect`]).
pub struct AgentView<'a> {
    pub namespace: &'a Arc<str>,
    pub uid: Uid,
    pub transport: Option<Transport>,
    pub report: &'a AgentReport,
    pub connected: bool,
    /// A plain-HTTP agent (connected, or when it went offline).
    pub http: bool,
    pub awaiting_full_state: bool,
    pub desired: &'a DesiredState,
    pub last_seen: SystemTime,
    /// When something users see of the agent last changed: its link, its report or its
    /// desired state (not a bare heartbeat).
    pub changed: SystemTime,
}

/// What the server wants the agents of one namespace to have: a pure function of the
/// cluster's objects (the controller's, the same on every replica) and of the agent itself.
///
/// Called under the agent's shard lock: it must be quick and must not call into the fleet.
pub trait Plan: Send + Sync {
    /// The desired state of one agent, given what it reports and what it was to have so far
    /// (`current`; a plan may keep it, e.g. while a progressive rollout has not admitted the
    /// agent yet).
    fn desired(&self, uid: &Uid, report: &AgentReport, current: &DesiredState) -> DesiredState;

    /// The names of the resources that select an agent reporting `report` (for users to see;
    /// none by default).
    fn selected_by(&self, report: &AgentReport) -> Vec<String> {
        let _ = report;
        Vec::new()
    }
}

/// A plan as published, with its version (versions grow with every publication).
#[derive(Clone)]
struct Published {
    version: u64,
    plan: Arc<dyn Plan>,
}

/// The current plan of each namespace, and the one of namespaces without their own.
#[derive(Default)]
struct Plans {
    by_namespace: HashMap<Arc<str>, Published, FastHash>,
    fallback: Option<Published>,
}

impl Plans {
    fn of(&self, namespace: &str) -> Option<&Published> {
        self.by_namespace.get(namespace).or(self.fallback.as_ref())
    }
}

/// Receives the custom messages agents send. Must not block: queue and return.
pub trait CustomMessageSink: Send + Sync {
    fn on_custom_message(&self, agent: &AgentKey, message: CustomMessage);
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the server holds its maximum of {limit} agents")]
    AtCapacity { limit: usize, retry_after: Duration },
    #[error("namespace {namespace} holds its maximum of {limit} agents")]
    NamespaceFull { namespace: Arc<str>, limit: usize, retry_after: Duration },
}

impl Rejection {
    /// What the agent is told to wait before retrying.
    pub fn retry_after(&self) -> Duration {
        match self {
            Rejection::AtCapacity { retry_after, .. } | Rejection::NamespaceFull { retry_after, .. } => {
                *retry_after
            }
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::AtCapacity { .. } => "at_capacity",
            Rejection::NamespaceFull { .. } => "namespace_limit",
        }
    }
}

/// What one namespace holds, for its bounds.
#[derive(Debug, Default)]
struct Usage {
    /// Agents remembered (connected or not).
    agents: AtomicUsize,
    /// Bytes of reported state kept, all its agents together.
    reported_bytes: AtomicUsize,
    /// New agents refused at the namespace's limit since [`Fleet::take_refusals`] last looked.
    refused: AtomicU64,
    /// Uids issued to HTTP agents with an invalid uid, by the wire uid they sent.
    issued: Mutex<HashMap<Bytes, Uid>>,
}

/// Agents refused at a namespace's limit (see [`Fleet::take_refusals`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals {
    pub namespace: Arc<str>,
    pub count: u64,
    pub limit: usize,
}

/// One transport connection as the fleet sees it. WebSocket connections live as long as the
/// socket; an HTTP request makes a short-lived one.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    transport: Transport,
    tenant: Tenant,
    usage: Arc<Usage>,
    wakeup: Option<Arc<Wakeup>>,
    /// The agent this connection speaks for, once it said so.
    bound: Option<Uid>,
    /// A uid issued on this connection for an agent whose own uid was invalid (rare: boxed, as
    /// a WebSocket connection's task holds its `Connection` for the agent's lifetime).
    issued: Option<Box<(Bytes, Uid)>>,
}

impl Connection {
    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The agent bound to this connection by its last message.
    pub fn agent(&self) -> Option<Uid> {
        self.bound
    }

    /// Raised when a WebSocket agent has something to be pushed (see [`Fleet::poll_push`]).
    pub fn wakeup(&self) -> Option<&Arc<Wakeup>> {
        self.wakeup.as_ref()
    }

    /// This connection's number, unique in its fleet.
    pub fn id(&self) -> u64 {
        self.id
    }
}

const SHARDS: usize = 64;

/// The hasher of the maps every message looks up: keyed per map (a random seed, so agents
/// cannot choose colliding uids), and several times cheaper than the standard SipHash.
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct Shard {
    /// Boxed: a map keeps room for about twice its entries, and an agent is ~570 bytes, so
    /// inline it cost ~1 KiB of map per agent; boxed, ~600 bytes in all.
    agents: HashMap<AgentKey, Box<Agent>, FastHash>,
}

struct Inner {
    config: FleetConfig,
    shards: Box<[Mutex<Shard>]>,
    connected: AtomicUsize,
    known: AtomicUsize,
    /// Connection settings offers sent.
    settings_offered: AtomicU64,
    next_conn: AtomicU64,
    changes: Mutex<HashMap<AgentKey, Changes>>,
    changes_notify: Notify,
    tenants: RwLock<HashMap<Arc<str>, Arc<Usage>>>,
    plans: RwLock<Plans>,
    plan_versions: AtomicU64,
    sink: RwLock<Option<Arc<dyn CustomMessageSink>>>,
    claims: claims::Claims,
    /// Report parts many agents share (effective configs, component lists), held once.
    shared: SharedParts,
}

/// The registry of agents. Cheap to clone; all clones share one fleet.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new(FleetConfig::default())
    }
}

impl Fleet {
    pub fn new(config: FleetConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                connected: AtomicUsize::new(0),
                known: AtomicUsize::new(0),
                settings_offered: AtomicU64::new(0),
                next_conn: AtomicU64::new(1),
                changes: Mutex::default(),
                changes_notify: Notify::new(),
                tenants: RwLock::default(),
                plans: RwLock::default(),
                plan_versions: AtomicU64::new(0),
                sink: RwLock::new(None),
                claims: claims::Claims::default(),
                shared: SharedParts::default(),
            }),
        }
    }

    pub fn config(&self) -> &FleetConfig {
        &self.inner.config
    }

    /// Publishes the plan of one namespace: its agents' desired state is derived from it from
    /// now on, at once for those the fleet holds (WebSocket agents get it pushed, HTTP agents
    /// on their next poll). Returns the plan's version.
    pub fn publish_plan(&self, namespace: &str, plan: Arc<dyn Plan>) -> u64 {
        self.publish_plans(vec![(namespace.into(), plan)])
    }

    /// Publishes the plans of several namespaces (one pass over the fleet); returns the
    /// version of the last.
    pub fn publish_plans(&self, plans: Vec<(Arc<str>, Arc<dyn Plan>)>) -> u64 {
        if plans.is_empty() {
            return self.inner.plan_versions.load(Ordering::Relaxed);
        }
        let mut version = 0;
        {
            let mut published = self.inner.plans.write();
            for (namespace, plan) in plans {
                version = self.next_plan_version();
                published.by_namespace.insert(namespace, Published { version, plan });
            }
        }
        self.apply_plans();
        version
    }

    /// Publishes the plan of every namespace that has none of its own.
    pub fn publish_fallback_plan(&self, plan: Arc<dyn Plan>) -> u64 {
        let version = self.next_plan_version();
        self.inner.plans.write().fallback = Some(Published { version, plan });
        self.apply_plans();
        version
    }

    fn next_plan_version(&self) -> u64 {
        self.inner.plan_versions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Derives the desired state of every agent whose namespace has a newer plan than the one
    /// it was derived from. Plans are installed before this runs: an agent that connects
    /// meanwhile derives from the new plan itself (under its shard lock).
    fn apply_plans(&self) {
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock();
            let plans = self.inner.plans.read();
            for (key, agent) in shard.agents.iter_mut() {
                if let Some(p) = plans.of(&key.namespace).filter(|p| agent.plan_version < p.version) {
                    derive(agent, &key.uid, p);
                }
            }
        }
    }

    /// The version of a namespace's current plan.
    pub fn plan_version(&self, namespace: &str) -> Option<u64> {
        self.inner.plans.read().of(namespace).map(|p| p.version)
    }

    pub fn set_custom_message_sink(&self, sink: Arc<dyn CustomMessageSink>) {
        *self.inner.sink.write() = Some(sink);
    }

    /// A new connection for an authenticated agent.
    pub fn connection(&self, transport: Transport, tenant: Tenant) -> Connection {
        let usage = self.usage(&tenant.namespace);
        Connection {
            id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            transport,
            tenant,
            usage,
            wakeup: (transport == Transport::WebSocket).then(Arc::default),
            bound: None,
            issued: None,
        }
    }

    /// Agents connected now.
    pub fn connected_count(&self) -> usize {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Agents remembered, connected or not.
    pub fn known_count(&self) -> usize {
        self.inner.known.load(Ordering::Relaxed)
    }

    fn usage(&self, namespace: &Arc<str>) -> Arc<Usage> {
        if let Some(u) = self.inner.tenants.read().get(namespace) {
            return u.clone();
        }
        self.inner.tenants.write().entry(namespace.clone()).or_default().clone()
    }

    /// Agents remembered in one namespace.
    pub fn namespace_count(&self, namespace: &str) -> usize {
        self.inner.tenants.read().get(namespace).map_or(0, |u| u.agents.load(Ordering::Relaxed))
    }

    /// Bytes of reported state kept for one namespace's agents.
    pub fn namespace_reported_bytes(&self, namespace: &str) -> usize {
        let tenants = self.inner.tenants.read();
        tenants.get(namespace).map_or(0, |u| u.reported_bytes.load(Ordering::Relaxed))
    }

    /// The namespaces that refused new agents at their limit since the last call.
    pub fn take_refusals(&self) -> Vec<Refusals> {
        let limit = self.inner.config.max_agents_per_namespace.unwrap_or(usize::MAX);
        let tenants = self.inner.tenants.read();
        let mut out: Vec<Refusals> = tenants
            .iter()
            .filter_map(|(ns, u)| {
                let count = u.refused.swap(0, Ordering::Relaxed);
                (count > 0).then(|| Refusals { namespace: ns.clone(), count, limit })
            })
            .collect();
        out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        out
    }

    fn shard(&self, uid: &Uid) -> MutexGuard<'_, Shard> {
        // Uids are random (v4) or random after their timestamp (v7): the last byte spreads well.
        // parking_lot locks do not poison: a panic under one shard's lock (a bug) does not fail
        // every later message of 1/64 of the fleet.
        self.inner.shards[uid.0[15] as usize % SHARDS].lock()
    }

    /// Handles one message from an agent and returns the reply.
    pub fn handle(&self, conn: &mut Connection, mut msg: AgentToServer) -> Result<ServerToAgent, Rejection> {
        let mut reply = ServerToAgent::default();
        self.handle_in_place(conn, &mut msg, &mut reply, Instant::now())?;
        Ok(reply)
    }

    /// [`Fleet::handle`] for a message the caller decoded and keeps (the transports' path): it
    /// is not moved (an `AgentToServer` is over 500 bytes), and the parts the registry keeps are
    /// taken out of it; once it is answered, so is its `instance_uid` (into the reply). A
    /// refused message keeps its `instance_uid`, for the error reply. The reply is written into
    /// `reply`, an empty message (over 300 bytes: returned, it was copied at every call).
    /// `now` is when the message arrived: the transport read the clock already.
    pub fn handle_in_place(
        &self,
        conn: &mut Connection,
        msg: &mut AgentToServer,
        reply: &mut ServerToAgent,
        now: Instant,
    ) -> Result<(), Rejection> {
        let (uid, issued) = self.resolve_uid(conn, msg);
        let key = AgentKey { namespace: conn.tenant.namespace.clone(), uid };
        // One WebSocket is one agent: when it speaks for another uid (one the server issued, or
        // a new one it took), the previous uid goes offline, or it would stay "connected" with
        // no connection left to close it.
        if let Some(previous) = conn.bound.filter(|b| *b != uid) {
            self.detach(conn, previous);
        }

        let mut claim = None;
        let ingested = {
            let mut shard = self.shard(&uid);
            let (agent, admitted) = match shard.agents.entry(key.clone()) {
                Entry::Occupied(e) => (e.into_mut(), false),
                Entry::Vacant(v) => {
                    self.admit_new(conn)?;
                    self.inner.known.fetch_add(1, Ordering::Relaxed);
                    (v.insert(Box::new(Agent::new(now))), true)
                }
            };
            let mut changes = Changes::empty();
            if !agent.is_on(conn) {
                if !agent.link.is_online() {
                    // A known agent coming back counts against the limit like a new one.
                    if !admitted {
                        self.admit()?;
                    }
                    agent.connected_since = SystemTime::now();
                    claim = Some(agent.connected_since);
                }
                // Otherwise the same agent moved to another connection: the old one is stale.
                agent.attach(conn);
                agent.session.on_connect();
                changes |= Changes::CONNECTED;
            }
            agent.touch(now);
            let mut ingested = agent.session.ingest(msg);
            ingested.changes |= changes;
            if !ingested.changes.is_empty() {
                agent.changed = SystemTime::now();
            }
            if ingested.changes.intersects(Changes::REPORT_PARTS) {
                agent.session.report.share(ingested.changes, &self.inner.shared);
                self.bound_report(agent, &conn.usage);
            }
            conn.bound = Some(uid);
            // A new connection or description, or a plan published since this agent's desired
            // state was derived: derive it again, under this lock (see the module docs).
            let rederive = ingested.changes.intersects(Changes::CONNECTED | Changes::DESCRIPTION);
            if let Some(p) = self.inner.plans.read().of(&key.namespace) {
                if rederive || agent.plan_version < p.version {
                    derive(agent, &uid, p);
                }
            }
            // Taken, not cloned: a clone of a freshly decoded `Bytes` allocates.
            let reply_uid = std::mem::take(&mut msg.instance_uid);
            self.respond(agent, conn, reply, reply_uid, &ingested, now);
            ingested
        };
        if let Some(new_uid) = issued {
            reply.agent_identification = Some(AgentIdentification { new_instance_uid: new_uid.to_wire() });
        }
        let custom = ingested.custom_message;
        if let Some(since) = claim {
            self.claim(&key, since);
        }
        self.record(&key, ingested.changes);
        if let Some(message) = custom {
            self.route(&key, message);
        }
        Ok(())
    }

    /// Keeps an agent's report within its bound and its namespace's: parts beyond are dropped
    /// (largest first) and the agent is flagged (`AgentReport::trimmed`).
    fn bound_report(&self, agent: &mut Agent, usage: &Usage) {
        let config = &self.inner.config;
        let before = agent.reported_bytes;
        let others = usage.reported_bytes.load(Ordering::Relaxed).saturating_sub(before);
        let room = config.max_reported_bytes_per_namespace.saturating_sub(others);
        let (size, dropped) = agent.session.report.fit(config.max_reported_bytes_per_agent.min(room));
        if !dropped.is_empty() {
            tracing::debug!(parts = ?dropped.part_names(), size, "agent report over its bound: parts dropped");
        }
        agent.reported_bytes = size;
        if size >= before {
            usage.reported_bytes.fetch_add(size - before, Ordering::Relaxed);
        } else {
            usage.reported_bytes.fetch_sub(before - size, Ordering::Relaxed);
        }
    }

    /// The reply to an ingested message, with the next queued custom message.
    fn respond(
        &self,
        agent: &mut Agent,
        conn: &mut Connection,
        reply: &mut ServerToAgent,
        reply_uid: Bytes,
        ingested: &Ingested,
        now: Instant,
    ) {
        agent.session.reply(reply, reply_uid, ingested, agent.desired.as_desired());
        self.count_offer(reply);
        if ingested.disconnect {
            agent.go_offline(now);
            self.inner.connected.fetch_sub(1, Ordering::Relaxed);
            conn.bound = None;
        } else if reply.command.is_some() {
            agent.wake(); // a command goes alone: WebSocket agents get the rest pushed at once
        } else {
            reply.custom_message = agent.outbox.pop();
            if !agent.outbox.is_empty() {
                agent.wake(); // WebSocket agents get the rest pushed, one per message
            }
        }
    }

    /// The uid to file a message under, and the uid to announce if the server issued one.
    fn resolve_uid(&self, conn: &mut Connection, msg: &AgentToServer) -> (Uid, Option<Uid>) {
        let wants_new = msg.flags & AgentToServerFlags::RequestInstanceUid as u64 != 0;
        if let (Some(uid), false) = (Uid::from_wire(&msg.instance_uid), wants_new) {
            return (uid, None);
        }
        // Invalid uid (an old 26-character ULID, empty, ...) or the agent asked for a new one:
        // issue a UUIDv7 once per wire uid, so retries keep the one already issued.
        if let Some((wire, uid)) = conn.issued.as_deref() {
            if *wire == msg.instance_uid {
                return (*uid, Some(*uid));
            }
        }
        // HTTP agents retry on new connections: remember what was issued, per namespace and
        // bounded (a wire uid longer than any real one is not remembered).
        let uid = if conn.transport == Transport::Http && msg.instance_uid.len() <= ISSUED_UID_KEY_MAX_BYTES {
            let mut issued = conn.usage.issued.lock();
            if issued.len() >= ISSUED_UIDS_PER_NAMESPACE {
                issued.clear();
            }
            *issued.entry(msg.instance_uid.clone()).or_insert_with(Uid::new_v7)
        } else {
            Uid::new_v7()
        };
        if msg.instance_uid.len() <= ISSUED_UID_KEY_MAX_BYTES {
            // Copied, not cloned: on WebSocket the wire uid is a slice of the frame's buffer
            // (`codec::decode_ws_into`), which the connection would otherwise keep.
            conn.issued = Some(Box::new((Bytes::copy_from_slice(&msg.instance_uid), uid)));
        }
        (uid, Some(uid))
    }

    /// Admits a new agent record: within its namespace's limit, then the server's.
    fn admit_new(&self, conn: &Connection) -> Result<(), Rejection> {
        let usage = &conn.usage;
        let count = usage.agents.fetch_add(1, Ordering::Relaxed);
        if let Some(limit) = self.inner.config.max_agents_per_namespace.filter(|l| count >= *l) {
            usage.agents.fetch_sub(1, Ordering::Relaxed);
            usage.refused.fetch_add(1, Ordering::Relaxed);
            let namespace = conn.tenant.namespace.clone();
            return Err(Rejection::NamespaceFull {
                namespace,
                limit,
                retry_after: self.inner.config.retry_after,
            });
        }
        self.admit().inspect_err(|_| {
            usage.agents.fetch_sub(1, Ordering::Relaxed);
        })
    }

    fn admit(&self) -> Result<(), Rejection> {
        let connected = self.inner.connected.fetch_add(1, Ordering::Relaxed);
        match self.inner.config.max_agents {
            Some(limit) if connected >= limit => {
                self.inner.connected.fetch_sub(1, Ordering::Relaxed);
                Err(Rejection::AtCapacity { limit, retry_after: self.inner.config.retry_after })
            }
            _ => Ok(()),
        }
    }

    fn route(&self, key: &AgentKey, message: CustomMessage) {
        match self.inner.sink.read().clone() {
            Some(sink) => sink.on_custom_message(key, message),
            None => {
                tracing::debug!(agent = %key, capability = %message.capability, "custom message with no route")
            }
        }
    }

    fn count_offer(&self, msg: &ServerToAgent) {
        if msg.connection_settings.is_some() {
            self.inner.settings_offered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connection settings offers sent since the fleet began.
    pub fn connection_settings_offered(&self) -> u64 {
        self.inner.settings_offered.load(Ordering::Relaxed)
    }

    /// What to push to a WebSocket agent after its connection was notified, if anything.
    pub fn poll_push(&self, conn: &Connection) -> Option<ServerToAgent> {
        let key = AgentKey { namespace: conn.tenant.namespace.clone(), uid: conn.bound? };
        let mut shard = self.shard(&key.uid);
        let agent = shard.agents.get_mut(&key).filter(|a| a.is_on(conn))?;
        let mut msg = agent.session.push(key.uid.to_wire(), agent.desired.as_desired());
        if let Some(m) = &msg {
            self.count_offer(m);
        }
        if msg.as_ref().is_some_and(|m| m.command.is_some()) {
            // A command goes alone; come back for the rest.
            if let Some(w) = &conn.wakeup {
                w.raise(Wakeup::PUSH);
            }
            return msg;
        }
        if let Some(custom) = agent.outbox.pop() {
            let msg = msg.get_or_insert_with(|| server_message(key.uid.to_wire()));
            msg.custom_message = Some(custom);
            if !agent.outbox.is_empty() {
                // One custom message per frame; come back for the next.
                if let Some(w) = &conn.wakeup {
                    w.raise(Wakeup::PUSH);
                }
            }
        }
        msg
    }

    /// The transport closed this connection.
    pub fn connection_closed(&self, conn: &Connection) {
        if let Some(uid) = conn.bound {
            self.detach(conn, uid);
        }
    }

    /// Takes `uid` of the connection's namespace offline if it is reached through `conn`.
    fn detach(&self, conn: &Connection, uid: Uid) {
        let key = AgentKey { namespace: conn.tenant.namespace.clone(), uid };
        let mut shard = self.shard(&uid);
        let Some(agent) = shard.agents.get_mut(&key).filter(|a| a.is_on(conn)) else { return };
        agent.go_offline(Instant::now());
        drop(shard);
        self.inner.connected.fetch_sub(1, Ordering::Relaxed);
        self.record(&key, Changes::DISCONNECTED);
    }

    /// Marks one plain-HTTP agent offline, keeping its record (its report, desired state and
    /// queued custom messages): another replica serves it now. Whether it was connected over
    /// HTTP.
    pub fn release_http_agent(&self, key: &AgentKey) -> bool {
        let mut shard = self.shard(&key.uid);
        let Some(agent) = shard.agents.get_mut(key).filter(|a| matches!(a.link, Link::Http)) else {
            return false;
        };
        agent.go_offline(Instant::now());
        drop(shard);
        self.inner.connected.fetch_sub(1, Ordering::Relaxed);
        self.record(key, Changes::DISCONNECTED);
        true
    }

    /// Marks offline, as [`Fleet::release_http_agent`] does, every plain-HTTP agent whose uid
    /// `keep` refuses (called under each shard's lock: keep it quick); how many.
    pub fn release_http_agents(&self, mut keep: impl FnMut(&Uid) -> bool) -> usize {
        let now = Instant::now();
        let mut released = Vec::new();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock();
            for (key, agent) in shard.agents.iter_mut() {
                if matches!(agent.link, Link::Http) && !keep(&key.uid) {
                    agent.go_offline(now);
                    released.push(key.clone());
                }
            }
        }
        self.inner.connected.fetch_sub(released.len(), Ordering::Relaxed);
        for key in &released {
            self.record(key, Changes::DISCONNECTED);
        }
        released.len()
    }

    /// Sets what one agent should have, by hand (tests, tools): in a namespace with a plan, the
    /// next derivation from the plan replaces it. Connected WebSocket agents get it pushed at
    /// once, HTTP agents on their next poll. Returns whether anything changed.
    pub fn set_desired_state(&self, key: &AgentKey, desired: DesiredState) -> bool {
        let mut shard = self.shard(&key.uid);
        let Some(agent) = shard.agents.get_mut(key) else { return false };
        set_desired(agent, desired)
    }

    /// Sets only the remote config of one agent (see [`Fleet::set_desired_state`]).
    pub fn set_remote_config(&self, key: &AgentKey, config: Option<Arc<AgentRemoteConfig>>) -> bool {
        let current = self.desired_state(key).unwrap_or_default();
        self.set_desired_state(key, DesiredState { remote_config: config, ..current })
    }

    pub fn desired_state(&self, key: &AgentKey) -> Option<DesiredState> {
        self.shard(&key.uid).agents.get(key).map(|a| a.desired.clone())
    }

    /// Queues a custom message for an agent; it goes out one per message, in order.
    pub fn enqueue_custom_message(
        &self,
        key: &AgentKey,
        message: CustomMessage,
    ) -> Result<usize, EnqueueError> {
        self.enqueue_tracked(key, message, None, self.inner.config.outbox_limit)
    }

    /// Queues a custom message for an agent, followed through `ticket`, holding at most
    /// `limit` messages.
    pub fn enqueue_tracked(
        &self,
        key: &AgentKey,
        message: CustomMessage,
        ticket: Option<Arc<Ticket>>,
        limit: usize,
    ) -> Result<usize, EnqueueError> {
        self.push_message(key, message, ticket, limit, true)
    }

    /// Queues a message in an agent's outbox and wakes it; with `declared`, only if the agent
    /// declared the message's capability.
    fn push_message(
        &self,
        key: &AgentKey,
        message: CustomMessage,
        ticket: Option<Arc<Ticket>>,
        limit: usize,
        declared: bool,
    ) -> Result<usize, EnqueueError> {
        let mut shard = self.shard(&key.uid);
        let agent = shard.agents.get_mut(key).ok_or(EnqueueError::UnknownAgent)?;
        if declared && !agent.session.report.supports_custom_capability(&message.capability) {
            return Err(EnqueueError::CapabilityNotSupported);
        }
        let depth = agent.outbox.push(message, ticket, limit)?;
        agent.wake();
        Ok(depth)
    }

    /// Distinct reported parts held, each once for all the agents reporting it.
    pub fn shared_parts(&self) -> SharedCounts {
        let shared = &self.inner.shared;
        SharedCounts {
            effective_configs: shared.effective_config.live(),
            available_components: shared.available_components.live(),
            description_strings: shared.strings.live(),
        }
    }

    /// A copy of what the server knows of one agent.
    pub fn agent(&self, key: &AgentKey) -> Option<AgentSnapshot> {
        self.shard(&key.uid).agents.get(key).map(|a| a.snapshot(key))
    }

    /// Copies of every agent (for tests and small fleets; the controller uses [`Fleet::for_each`]).
    pub fn agents(&self) -> Vec<AgentSnapshot> {
        let mut out = Vec::with_capacity(self.known_count());
        for shard in self.inner.shards.iter() {
            out.extend(shard.lock().agents.iter().map(|(key, a)| a.snapshot(key)));
        }
        out
    }

    /// Reads one agent under its shard's lock, without copying: keep the closure short.
    pub fn inspect<R>(&self, key: &AgentKey, f: impl FnOnce(&AgentView<'_>) -> R) -> Option<R> {
        let shard = self.shard(&key.uid);
        Some(f(&shard.agents.get(key)?.view(key)))
    }

    /// The plan the agents of `namespace` follow now, if any.
    pub fn plan(&self, namespace: &str) -> Option<Arc<dyn Plan>> {
        self.inner.plans.read().of(namespace).map(|p| p.plan.clone())
    }

    /// Visits every agent's view under its shard's lock: keep the closure short.
    pub fn for_each_view(&self, mut f: impl FnMut(&AgentView<'_>)) {
        for shard in self.inner.shards.iter() {
            let shard = shard.lock();
            shard.agents.iter().for_each(|(key, a)| f(&a.view(key)));
        }
    }

    /// Visits every agent under its shard's lock: keep the closure short.
    pub fn for_each(&self, mut f: impl FnMut(&AgentKey, &AgentReport)) {
        for shard in self.inner.shards.iter() {
            let shard = shard.lock();
            for (key, agent) in &shard.agents {
                f(key, &agent.session.report);
            }
        }
    }

    /// Marks HTTP agents that missed three heartbeats (the server's interval, or a longer one
    /// they were offered) as disconnected and forgets agents
    /// offline for longer than the retention. Run periodically (see [`Fleet::run_sweeper`]).
    pub fn sweep(&self, now: Instant) {
        let http_deadline = self.inner.config.heartbeat_interval * 3;
        let retention = self.inner.config.offline_retention;
        let mut changed = Vec::new();
        let mut forgotten = Vec::new();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock();
            shard.agents.retain(|key, agent| {
                match agent.link {
                    Link::Http
                        if now.saturating_duration_since(agent.last_seen)
                            > agent.poll_deadline(http_deadline) =>
                    {
                        agent.go_offline(now);
                        self.inner.connected.fetch_sub(1, Ordering::Relaxed);
                        changed.push((key.clone(), Changes::DISCONNECTED));
                    }
                    Link::Offline { since, .. } if now.saturating_duration_since(since) > retention => {
                        self.inner.known.fetch_sub(1, Ordering::Relaxed);
                        forgotten.push((key.namespace.clone(), agent.reported_bytes));
                        changed.push((key.clone(), Changes::REMOVED));
                        return false;
                    }
                    _ => {}
                }
                true
            });
        }
        if !forgotten.is_empty() {
            let tenants = self.inner.tenants.read();
            for (ns, bytes) in forgotten {
                if let Some(u) = tenants.get(&ns) {
                    u.agents.fetch_sub(1, Ordering::Relaxed);
                    u.reported_bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
            }
        }
        for (key, c) in changed {
            self.record(&key, c);
        }
    }

    /// Sweeps every second until `shutdown` is cancelled.
    pub async fn run_sweeper(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                now = tick.tick() => self.sweep(now),
            }
        }
    }

    fn record(&self, key: &AgentKey, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let mut pending = self.inner.changes.lock();
        match pending.get_mut(key) {
            Some(c) => *c |= changes,
            None => {
                pending.insert(key.clone(), changes);
            }
        }
        drop(pending);
        self.inner.changes_notify.notify_one();
    }

    /// Takes the agents that changed since the last call, with what changed (coalesced:
    /// memory is bounded by the fleet size, however fast agents change).
    pub fn take_changes(&self) -> HashMap<AgentKey, Changes> {
        std::mem::take(&mut *self.inner.changes.lock())
    }

    /// Resolves when changes may be waiting in [`Fleet::take_changes`].
    pub async fn changed(&self) {
        self.inner.changes_notify.notified().await
    }
}

/// Nanoseconds since the epoch (0 before it).
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Gives an agent the desired state `plan` derives for it; wakes it when that changed.
fn derive(agent: &mut Agent, uid: &Uid, plan: &Published) {
    let desired = plan.plan.desired(uid, &agent.session.report, &agent.desired);
    agent.plan_version = plan.version;
    set_desired(agent, desired);
}

fn set_desired(agent: &mut Agent, desired: DesiredState) -> bool {
    if agent.desired == desired {
        return false;
    }
    agent.desired = desired;
    agent.changed = SystemTime::now();
    agent.wake();
    true
}
