//! The OpAMP session state machine, pure and socket-free.
//!
//! One [`Session`] per agent holds what the server remembers of it: the last reported
//! sub-messages (agents omit unchanged ones), the sequence number, and what was already offered
//! on the current connection. Handling a message is two steps, so the caller can recompute the
//! desired state between them without holding anything across foreign code:
//! [`Session::ingest`] folds an `AgentToServer` into the session and says what changed;
//! [`Session::reply`] builds the `ServerToAgent` for it from the desired state.
//! [`Session::push`] builds an unsolicited message when the desired state changed.
use std::sync::Arc;

use bytes::Bytes;

use super::Description;
use super::shared::{KeptConfig, SharedParts};
use crate::proto::{
    AgentCapabilities, AgentRemoteConfig, AgentToServer, AvailableComponents, CommandType, ComponentHealth,
    ConnectionSettingsOffers, ConnectionSettingsStatus, CustomCapabilities, CustomMessage,
    OpAmpConnectionSettings, PackageStatuses, RemoteConfigStatus, ServerCapabilities, ServerToAgent,
    ServerToAgentCommand, ServerToAgentFlags, TelemetryConnectionSettings,
};

/// What this server can do, sent in every reply (the specification requires the first).
pub const SERVER_CAPABILITIES: u64 = ServerCapabilities::AcceptsStatus as u64
    | ServerCapabilities::OffersRemoteConfig as u64
    | ServerCapabilities::AcceptsEffectiveConfig as u64
    | ServerCapabilities::AcceptsPackagesStatus as u64
    | ServerCapabilities::OffersConnectionSettings as u64;

bitflags::bitflags! {
    /// What a message changed in the server's view of an agent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Changes: u16 {
        const CONNECTED = 1 << 0;
        const DISCONNECTED = 1 << 1;
        const CAPABILITIES = 1 << 2;
        const DESCRIPTION = 1 << 3;
        const HEALTH = 1 << 4;
        const EFFECTIVE_CONFIG = 1 << 5;
        const REMOTE_CONFIG_STATUS = 1 << 6;
        const PACKAGE_STATUSES = 1 << 7;
        const CUSTOM_CAPABILITIES = 1 << 8;
        const AVAILABLE_COMPONENTS = 1 << 9;
        const REMOVED = 1 << 10;
        const CONNECTION_SETTINGS_STATUS = 1 << 11;
    }
}

impl Changes {
    /// The sub-messages of a report (what [`AgentReport::fit`] may drop).
    pub const REPORT_PARTS: Changes = Changes::DESCRIPTION
        .union(Changes::HEALTH)
        .union(Changes::EFFECTIVE_CONFIG)
        .union(Changes::REMOTE_CONFIG_STATUS)
        .union(Changes::PACKAGE_STATUSES)
        .union(Changes::CUSTOM_CAPABILITIES)
        .union(Changes::AVAILABLE_COMPONENTS);

    /// Names of the report parts in `self`, for users (`effectiveConfig`, …).
    pub fn part_names(self) -> Vec<&'static str> {
        SHED_ORDER.iter().filter(|(flag, _)| self.contains(*flag)).map(|(_, name)| *name).collect()
    }
}

/// Error texts agents report (remote config status, health) are kept up to this many bytes:
/// they end up in status objects and Events, which the API server bounds.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Config hashes agents report are kept up to this many bytes: the server's own are 32, so a
/// longer one is never a config it sent, and cut it cannot pass for one (it stays longer than 32).
pub const MAX_CONFIG_HASH_BYTES: usize = 64;

/// The parts [`AgentReport::fit`] drops first, in order: the largest and least needed go first;
/// the description (what selectors match) last.
const SHED_ORDER: [(Changes, &str); 6] = [
    (Changes::EFFECTIVE_CONFIG, "effectiveConfig"),
    (Changes::AVAILABLE_COMPONENTS, "availableComponents"),
    (Changes::PACKAGE_STATUSES, "packageStatuses"),
    (Changes::HEALTH, "health"),
    (Changes::CUSTOM_CAPABILITIES, "customCapabilities"),
    (Changes::DESCRIPTION, "description"),
];

/// The last state an agent reported. Agents omit sub-messages that did not change, so each
/// field keeps its last value until the agent sends a new one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub capabilities: u64,
    /// Its keys and string values shared with every agent reporting the same text
    /// ([`AgentReport::share`]).
    pub description: Option<Description>,
    pub health: Option<ReportedHealth>,
    /// Shared with every agent reporting the same content, else kept as its difference against
    /// a config like it ([`AgentReport::share`]).
    pub effective_config: Option<Arc<KeptConfig>>,
    pub remote_config_status: Option<RemoteConfigStatus>,
    pub package_statuses: Option<PackageStatuses>,
    pub custom_capabilities: Option<CustomCapabilities>,
    /// Shared with every agent reporting the same content ([`AgentReport::share`]).
    pub available_components: Option<Arc<AvailableComponents>>,
    /// What the agent made of the last connection settings offered (agents with
    /// `ReportsConnectionSettingsStatus`); small, and rare, so boxed.
    pub connection_settings_status: Option<Box<ConnectionSettingsStatus>>,
    /// Parts dropped because the report exceeded its bound of bytes (see [`AgentReport::fit`]);
    /// a part is kept again once the agent reports a new value that fits.
    pub trimmed: Changes,
}

impl AgentReport {
    pub fn has_capability(&self, cap: AgentCapabilities) -> bool {
        self.capabilities & cap as u64 != 0
    }

    /// Whether the agent reports running a remote config (a non-empty hash).
    pub fn has_remote_config(&self) -> bool {
        self.remote_config_status.as_ref().is_some_and(|s| !s.last_remote_config_hash.is_empty())
    }

    /// The encoded size of what is kept of the report, in bytes.
    pub fn encoded_len(&self) -> usize {
        use prost::Message;
        fn len<M: Message>(m: Option<&M>) -> usize {
            m.map_or(0, Message::encoded_len)
        }
        self.description.as_ref().map_or(0, Description::encoded_len)
            + self.health.as_ref().map_or(0, ReportedHealth::encoded_len)
            + self.effective_config.as_ref().map_or(0, |c| c.encoded_len())
            + len(self.remote_config_status.as_ref())
            + len(self.package_statuses.as_ref())
            + len(self.custom_capabilities.as_ref())
            + len(self.available_components.as_deref())
            + len(self.connection_settings_status.as_deref())
    }

    /// Drops parts (largest and least needed first) until the report takes at most `limit`
    /// bytes; returns its size and the parts dropped now (also added to `trimmed`). Of the
    /// available components only the hash is kept, so the server does not ask for components
    /// it would drop again.
    pub fn fit(&mut self, limit: usize) -> (usize, Changes) {
        let mut size = self.encoded_len();
        let mut dropped = Changes::empty();
        for (part, _) in SHED_ORDER {
            if size <= limit {
                break;
            }
            let present = if part == Changes::EFFECTIVE_CONFIG {
                self.effective_config.take().is_some()
            } else if part == Changes::AVAILABLE_COMPONENTS {
                let c = self.available_components.as_mut().filter(|c| !c.components.is_empty());
                c.map(|c| *c = Arc::new(AvailableComponents { hash: c.hash.clone(), ..Default::default() }))
                    .is_some()
            } else if part == Changes::PACKAGE_STATUSES {
                self.package_statuses.take().is_some()
            } else if part == Changes::HEALTH {
                self.health.take().is_some()
            } else if part == Changes::CUSTOM_CAPABILITIES {
                self.custom_capabilities.take().is_some()
            } else {
                self.description.take().is_some()
            };
            if present {
                dropped |= part;
                size = self.encoded_len();
            }
        }
        self.trimmed |= dropped;
        (size, dropped)
    }

    /// Replaces the parts in `changed` that other agents report too with the copy they share;
    /// an effective config like another's is kept as its difference against it, and a
    /// description's text is shared attribute by attribute.
    pub fn share(&mut self, changed: Changes, parts: &SharedParts) {
        if changed.contains(Changes::DESCRIPTION) {
            if let Some(description) = &mut self.description {
                description.share(&parts.strings);
            }
        }
        if changed.contains(Changes::EFFECTIVE_CONFIG) {
            self.effective_config = self.effective_config.take().map(|c| parts.effective_config.keep(c));
        }
        if changed.contains(Changes::AVAILABLE_COMPONENTS) {
            self.available_components =
                self.available_components.take().map(|c| parts.available_components.share(c));
        }
    }

    /// The part of an offer's OpAMP connection settings this agent is sent, if any. An agent
    /// that accepts OpAMP connection settings reconnects with exactly what it is offered, so it
    /// gets all of them, and only when they name the server to reconnect to; one that only
    /// reports heartbeats gets the interval alone. Never without a non-zero interval: clients
    /// take a missing one for 0 and stop heartbeating.
    pub fn opamp_part(&self, opamp: &OpAmpConnectionSettings) -> Option<OpAmpConnectionSettings> {
        if opamp.heartbeat_interval_seconds == 0 {
            return None;
        }
        if self.has_capability(AgentCapabilities::AcceptsOpAmpConnectionSettings) {
            return (!opamp.destination_endpoint.is_empty()).then(|| opamp.clone());
        }
        self.has_capability(AgentCapabilities::ReportsHeartbeat).then(|| OpAmpConnectionSettings {
            heartbeat_interval_seconds: opamp.heartbeat_interval_seconds,
            ..Default::default()
        })
    }

    /// Whether the agent reports having started at or after `at` (ns since the epoch): its
    /// health's start time.
    pub fn started_since(&self, at: u64) -> bool {
        self.health.as_ref().is_some_and(|h| h.start_time_unix_nano >= at)
    }

    /// Whether the agent declared a custom capability in `AgentToServer.custom_capabilities`.
    pub fn supports_custom_capability(&self, capability: &str) -> bool {
        self.custom_capabilities.as_ref().is_some_and(|c| c.capabilities.iter().any(|c| c == capability))
    }
}

/// An agent's health as kept: the top level read, the health of its components (a tree that is
/// only ever shown) as its protobuf encoding, which takes a fraction of the memory of the
/// decoded tree (a collector's, decoded: ~4 KB; encoded: ~0.5 KB).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportedHealth {
    pub healthy: bool,
    pub start_time_unix_nano: u64,
    pub last_error: String,
    pub status: String,
    pub status_time_unix_nano: u64,
    /// A `ComponentHealth` holding only `component_health_map`, encoded (maps are `BTreeMap`s,
    /// so equal trees encode equally).
    components: Bytes,
}

impl ReportedHealth {
    pub fn new(mut health: ComponentHealth) -> Self {
        use prost::Message;
        let components = std::mem::take(&mut health.component_health_map);
        let components = if components.is_empty() {
            Bytes::new()
        } else {
            ComponentHealth { component_health_map: components, ..Default::default() }.encode_to_vec().into()
        };
        Self {
            healthy: health.healthy,
            start_time_unix_nano: health.start_time_unix_nano,
            last_error: health.last_error,
            status: health.status,
            status_time_unix_nano: health.status_time_unix_nano,
            components,
        }
    }

    /// The health as the agent reported it, with its components.
    pub fn to_proto(&self) -> ComponentHealth {
        use prost::Message;
        // Encoded by `new` from a decoded tree: it decodes.
        let mut health = ComponentHealth::decode(&self.components[..]).unwrap_or_default();
        health.healthy = self.healthy;
        health.start_time_unix_nano = self.start_time_unix_nano;
        health.last_error.clone_from(&self.last_error);
        health.status.clone_from(&self.status);
        health.status_time_unix_nano = self.status_time_unix_nano;
        health
    }

    /// The size of the reported `ComponentHealth`, encoded.
    pub fn encoded_len(&self) -> usize {
        use prost::Message;
        let top = ComponentHealth {
            healthy: self.healthy,
            start_time_unix_nano: self.start_time_unix_nano,
            status_time_unix_nano: self.status_time_unix_nano,
            ..Default::default()
        };
        // The text fields as the generated code counts them (proto3: empty ones are not sent).
        let text =
            |tag, s: &String| if s.is_empty() { 0 } else { prost::encoding::string::encoded_len(tag, s) };
        top.encoded_len() + text(3, &self.last_error) + text(4, &self.status) + self.components.len()
    }
}

/// A restart an agent is to make: it started before `at` (ns since the epoch), and is commanded
/// from `due` on (later than `at` for the later waves of a paced restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restart {
    pub at: u64,
    pub due: u64,
}

/// What the server wants an agent to have.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desired<'a> {
    pub remote_config: Option<&'a Arc<AgentRemoteConfig>>,
    pub custom_capabilities: Option<&'a Arc<CustomCapabilities>>,
    /// Every part the plan offers, with the hash over all of them; each agent is sent the parts
    /// its capabilities take ([`Session::settings_to_offer`]).
    pub connection_settings: Option<&'a Arc<ConnectionSettingsOffers>>,
    /// Agents that started before this time (ns since the epoch) are to restart now (a restart
    /// that is not due yet is not here).
    pub restart_at: Option<u64>,
}

/// The outcome of [`Session::ingest`].
#[derive(Debug, Default, PartialEq)]
pub struct Ingested {
    pub changes: Changes,
    /// A custom message the agent sent, to be routed.
    pub custom_message: Option<CustomMessage>,
    /// The agent said goodbye (`AgentDisconnect`).
    pub disconnect: bool,
    /// The server lost track of the agent's state and asks for all of it.
    pub request_full_state: bool,
    /// The agent reported a components hash the server has no components for.
    pub request_available_components: bool,
}

#[derive(Debug, Default)]
pub struct Session {
    pub report: AgentReport,
    last_seq: Option<u64>,
    /// `ReportFullState` was requested and the full report has not arrived yet; until then
    /// the server does not know what config the agent has, so it offers none.
    awaiting_full_state: bool,
    /// Per connection: the config hash already offered, and the custom capabilities sent.
    offered_config_hash: Option<Bytes>,
    sent_custom_capabilities: Option<Arc<CustomCapabilities>>,
    /// A fingerprint of the hash of the connection settings last offered (0: none). Kept
    /// across connections, unlike the above: an agent keeps settings it was given when it
    /// reconnects, and a client that takes OpAMP settings reconnects to apply them, so offering
    /// them again on each connection would never end. Forgotten when the agent restarts (a new
    /// sequence: it lost what it was given).
    offered_settings: u64,
    /// The restart time (`Desired::restart_at`) last commanded (0: none): each is commanded at
    /// most once per agent, kept across connections.
    restart_sent: u64,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new transport connection: what was offered on the previous one is forgotten.
    pub fn on_connect(&mut self) {
        self.offered_config_hash = None;
        self.sent_custom_capabilities = None;
    }

    /// Whether the server is waiting for the agent's full state.
    pub fn awaiting_full_state(&self) -> bool {
        self.awaiting_full_state
    }

    /// Folds one message into the session. Sub-messages are moved out of `msg`.
    pub fn ingest(&mut self, msg: &mut AgentToServer) -> Ingested {
        let mut out = Ingested::default();
        let seq = msg.sequence_num;
        // A message is in sequence when it follows the previous one, or starts a new sequence
        // (a restarted agent begins at 0 and sends everything in its first message).
        let in_sequence = match self.last_seq {
            Some(prev) => seq == prev.wrapping_add(1) || seq == 0,
            None => seq == 0,
        };
        // A full report replaces what the agent reported before: the first message of a
        // restarted agent (a new sequence), or the full state the server asked for. A part it
        // does not carry, the agent does not have (e.g. a restarted agent that lost its remote
        // config must be offered it again, not taken to still run it).
        // A new sequence after one that did not end at the wrap-around: the agent restarted.
        let restarted = seq == 0 && self.last_seq.is_some_and(|prev| prev != u64::MAX);
        let full_report = msg.agent_description.is_some() && (restarted || self.awaiting_full_state);
        // Not for an agent that accepts OpAMP connection settings: the offer restarts its OpAMP
        // client, which begins a new sequence; offering them again would never end.
        let accepts_opamp = msg.capabilities & AgentCapabilities::AcceptsOpAmpConnectionSettings as u64 != 0;
        if restarted && !accepts_opamp {
            self.offered_settings = 0;
        }
        self.last_seq = Some(seq);
        if !in_sequence {
            self.awaiting_full_state = true;
            self.offered_config_hash = None;
            out.request_full_state = true;
        } else if msg.agent_description.is_some() {
            // Every full report carries the description (it is mandatory at start).
            self.awaiting_full_state = false;
        }

        if msg.capabilities != self.report.capabilities {
            self.report.capabilities = msg.capabilities;
            out.changes |= Changes::CAPABILITIES;
        }
        let r = &mut self.report;
        // A part that arrives anew is kept again if it fits (see `AgentReport::fit`).
        for (part, present) in [
            (Changes::DESCRIPTION, msg.agent_description.is_some()),
            (Changes::HEALTH, msg.health.is_some()),
            (Changes::EFFECTIVE_CONFIG, msg.effective_config.is_some()),
            (Changes::PACKAGE_STATUSES, msg.package_statuses.is_some()),
            (Changes::CUSTOM_CAPABILITIES, msg.custom_capabilities.is_some()),
        ] {
            if present {
                r.trimmed.remove(part);
            }
        }
        if let Some(s) = &mut msg.remote_config_status {
            truncate_utf8(&mut s.error_message, MAX_ERROR_MESSAGE_BYTES);
            s.last_remote_config_hash.truncate(MAX_CONFIG_HASH_BYTES);
        }
        if let Some(h) = &mut msg.health {
            truncate_utf8(&mut h.last_error, MAX_ERROR_MESSAGE_BYTES);
        }
        if full_report {
            forget_absent(&mut r.health, msg.health.is_some(), Changes::HEALTH, &mut out.changes);
            forget_absent(
                &mut r.effective_config,
                msg.effective_config.is_some(),
                Changes::EFFECTIVE_CONFIG,
                &mut out.changes,
            );
            forget_absent(
                &mut r.remote_config_status,
                msg.remote_config_status.is_some(),
                Changes::REMOTE_CONFIG_STATUS,
                &mut out.changes,
            );
            forget_absent(
                &mut r.package_statuses,
                msg.package_statuses.is_some(),
                Changes::PACKAGE_STATUSES,
                &mut out.changes,
            );
            forget_absent(
                &mut r.custom_capabilities,
                msg.custom_capabilities.is_some(),
                Changes::CUSTOM_CAPABILITIES,
                &mut out.changes,
            );
        }
        keep_latest(
            &mut r.description,
            msg.agent_description.take().map(Description::new),
            Changes::DESCRIPTION,
            &mut out.changes,
        );
        keep_latest(
            &mut r.health,
            msg.health.take().map(ReportedHealth::new),
            Changes::HEALTH,
            &mut out.changes,
        );
        keep_latest(
            &mut r.effective_config,
            msg.effective_config.take().map(|c| Arc::new(KeptConfig::new(&c))),
            Changes::EFFECTIVE_CONFIG,
            &mut out.changes,
        );
        keep_latest(
            &mut r.remote_config_status,
            msg.remote_config_status.take(),
            Changes::REMOTE_CONFIG_STATUS,
            &mut out.changes,
        );
        keep_latest(
            &mut r.package_statuses,
            msg.package_statuses.take().map(|p| *p),
            Changes::PACKAGE_STATUSES,
            &mut out.changes,
        );
        keep_latest(
            &mut r.custom_capabilities,
            msg.custom_capabilities.take(),
            Changes::CUSTOM_CAPABILITIES,
            &mut out.changes,
        );
        if let Some(components) = msg.available_components.take() {
            // Agents send only the hash while it is unchanged; for a hash the server holds no
            // components of (a new agent, a restarted server), it asks for them in the reply.
            let same_hash = r.available_components.as_ref().is_some_and(|c| c.hash == components.hash);
            if !same_hash {
                r.trimmed.remove(Changes::AVAILABLE_COMPONENTS);
            }
            if components.components.is_empty() && !components.hash.is_empty() {
                let same_hash = r.available_components.as_ref().filter(|c| c.hash == components.hash);
                // Components dropped for size are not asked for again (they would be dropped again).
                out.request_available_components = same_hash.is_none_or(|c| c.components.is_empty())
                    && !r.trimmed.contains(Changes::AVAILABLE_COMPONENTS);
                if same_hash.is_none() {
                    r.available_components = Some(Arc::new(components));
                    out.changes |= Changes::AVAILABLE_COMPONENTS;
                }
            } else {
                keep_latest(
                    &mut r.available_components,
                    Some(Arc::new(components)),
                    Changes::AVAILABLE_COMPONENTS,
                    &mut out.changes,
                );
            }
        }

        keep_latest(
            &mut r.connection_settings_status,
            msg.connection_settings_status.take().map(|mut s| {
                truncate_utf8(&mut s.error_message, MAX_ERROR_MESSAGE_BYTES);
                s.last_connection_settings_hash.truncate(MAX_CONFIG_HASH_BYTES);
                Box::new(s)
            }),
            Changes::CONNECTION_SETTINGS_STATUS,
            &mut out.changes,
        );
        out.custom_message = msg.custom_message.take();
        if msg.agent_disconnect.is_some() {
            out.disconnect = true;
            out.changes |= Changes::DISCONNECTED;
        }
        out
    }

    /// The reply to an ingested message. Every message gets one.
    ///
    /// Written into `msg`, an empty (`Default`) message the caller holds: the reply is over 300
    /// bytes, and returned it was copied at each of the calls it passed through.
    pub fn reply(
        &mut self,
        msg: &mut ServerToAgent,
        instance_uid: Bytes,
        ingested: &Ingested,
        desired: Desired<'_>,
    ) {
        msg.instance_uid = instance_uid;
        msg.capabilities = SERVER_CAPABILITIES;
        if ingested.request_full_state {
            msg.flags |= ServerToAgentFlags::ReportFullState as u64;
        }
        if ingested.request_available_components {
            msg.flags |= ServerToAgentFlags::ReportAvailableComponents as u64;
        }
        if !ingested.disconnect {
            self.add_offers(msg, desired);
        }
    }

    /// An unsolicited message for a connected agent, if the desired state has something new.
    pub fn push(&mut self, instance_uid: Bytes, desired: Desired<'_>) -> Option<ServerToAgent> {
        let mut msg = server_message(instance_uid);
        self.add_offers(&mut msg, desired).then_some(msg)
    }

    /// The config the agent should be offered now, if any.
    pub fn config_to_offer<'d>(&self, desired: Desired<'d>) -> Option<&'d Arc<AgentRemoteConfig>> {
        let config = desired.remote_config?;
        let has_it = |hash: &Bytes| *hash == config.config_hash;
        let accepts = self.report.has_capability(AgentCapabilities::AcceptsRemoteConfig);
        let reported = self.report.remote_config_status.as_ref().map(|s| &s.last_remote_config_hash);
        (accepts
            && !self.awaiting_full_state
            && !reported.is_some_and(has_it)
            && !self.offered_config_hash.as_ref().is_some_and(has_it))
        .then_some(config)
    }

    fn add_offers(&mut self, msg: &mut ServerToAgent, desired: Desired<'_>) -> bool {
        // A command goes alone (with the uid and capabilities only, as the specification asks);
        // the offers follow in the next message.
        if let Some(at) = self.restart_to_command(desired).filter(|_| msg.flags == 0) {
            self.restart_sent = at;
            msg.command = Some(Box::new(ServerToAgentCommand { r#type: CommandType::Restart as i32 }));
            return true;
        }
        let mut added = false;
        if let Some(config) = self.config_to_offer(desired) {
            self.offered_config_hash = Some(config.config_hash.clone());
            msg.remote_config = Some(AgentRemoteConfig::clone(config));
            added = true;
        }
        let sent = self.sent_custom_capabilities.as_deref().map_or(&[][..], |c| &c.capabilities[..]);
        let wanted = desired.custom_capabilities.map_or(&[][..], |c| &c.capabilities[..]);
        if sent != wanted {
            self.sent_custom_capabilities = desired.custom_capabilities.cloned();
            msg.custom_capabilities = Some(CustomCapabilities { capabilities: wanted.to_vec() });
            added = true;
        }
        if let Some(offer) = self.settings_to_offer(desired) {
            self.offered_settings = fingerprint(&offer.hash);
            msg.connection_settings = Some(Box::new(offer));
            added = true;
        }
        added
    }

    /// The restart to command now, if any: the agent accepts the command, has not reported a
    /// start since the requested time, and was not commanded this one yet.
    pub fn restart_to_command(&self, desired: Desired<'_>) -> Option<u64> {
        let at = desired.restart_at?;
        (at != self.restart_sent
            && self.report.has_capability(AgentCapabilities::AcceptsRestartCommand)
            && !self.report.started_since(at))
        .then_some(at)
    }

    /// The connection settings to offer the agent now, if any: the parts of the plan's offer
    /// its capabilities take, once per offer (see `offered_settings`), and not when it reports
    /// having had this one (applied or failed: offering it again would not change that).
    ///
    /// `opamp` (the heartbeat interval) goes to agents that report heartbeats, unless they also
    /// accept OpAMP connection settings: those reconnect with exactly what is offered (endpoint,
    /// headers, TLS), which this server does not offer, so such an offer would cut them off.
    /// Every `opamp` part carries `heartbeat_interval_seconds` (the plan only offers one that
    /// sets it): clients take a missing one for 0 and stop heartbeating.
    pub fn settings_to_offer(&self, desired: Desired<'_>) -> Option<ConnectionSettingsOffers> {
        let offer = desired.connection_settings?;
        if self.offered_settings == fingerprint(&offer.hash) {
            return None;
        }
        let reported = self.report.connection_settings_status.as_ref();
        if reported.is_some_and(|s| s.last_connection_settings_hash == offer.hash) {
            return None;
        }
        settings_for(&self.report, offer)
    }
}

/// The parts of `offer` an agent reporting `report` takes, with the offer's hash; `None` when it
/// takes none: `opamp` as [`AgentReport::opamp_part`] says, own metrics, logs and traces to
/// agents that report them.
pub fn settings_for(
    report: &AgentReport,
    offer: &ConnectionSettingsOffers,
) -> Option<ConnectionSettingsOffers> {
    let part = |cap: AgentCapabilities, p: &Option<TelemetryConnectionSettings>| {
        p.as_ref().filter(|_| report.has_capability(cap)).cloned()
    };
    let out = ConnectionSettingsOffers {
        hash: offer.hash.clone(),
        opamp: offer.opamp.as_ref().and_then(|o| report.opamp_part(o)),
        own_metrics: part(AgentCapabilities::ReportsOwnMetrics, &offer.own_metrics),
        own_logs: part(AgentCapabilities::ReportsOwnLogs, &offer.own_logs),
        own_traces: part(AgentCapabilities::ReportsOwnTraces, &offer.own_traces),
        other_connections: Default::default(),
    };
    let any = out.opamp.is_some()
        || out.own_metrics.is_some()
        || out.own_logs.is_some()
        || out.own_traces.is_some();
    any.then_some(out)
}

/// A hash of an offer's hash, as a number that is never 0 (0 stands for "none").
fn fingerprint(hash: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    hash.hash(&mut h);
    h.finish().max(1)
}

/// A `ServerToAgent` for an agent, with the server's capabilities and nothing else yet.
pub fn server_message(instance_uid: Bytes) -> ServerToAgent {
    ServerToAgent { instance_uid, capabilities: SERVER_CAPABILITIES, ..Default::default() }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
    }
}

/// Drops a kept part a full report does not carry.
fn forget_absent<T>(slot: &mut Option<T>, present: bool, flag: Changes, changes: &mut Changes) {
    if !present && slot.take().is_some() {
        *changes |= flag;
    }
}

fn keep_latest<T: PartialEq>(slot: &mut Option<T>, new: Option<T>, flag: Changes, changes: &mut Changes) {
    if let Some(new) = new {
        if slot.as_ref() != Some(&new) {
            *changes |= flag;
            *slot = Some(new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(status: &str, children: &[(&str, ComponentHealth)]) -> ComponentHealth {
        ComponentHealth {
            healthy: status == "StatusOK",
            status: status.into(),
            status_time_unix_nano: 1_796_280_865_723_060_163,
            component_health_map: children.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn kept_health_reads_back_as_reported_and_counts_its_encoded_size() {
        let receiver = component("StatusOK", &[]);
        let exporter = component("StatusRecoverableError", &[]);
        let pipeline = component("StatusOK", &[("receiver:otlp", receiver), ("exporter:debug", exporter)]);
        let mut reported = component("StatusOK", &[("pipeline:traces", pipeline)]);
        reported.start_time_unix_nano = 1_796_280_800_000_000_000;
        reported.last_error = "exporter:debug: connection refused".into();
        let kept = ReportedHealth::new(reported.clone());
        assert_eq!(kept.to_proto(), reported);
        assert_eq!(kept.encoded_len(), prost::Message::encoded_len(&reported));
        assert!(kept.healthy);
        // Without components.
        let plain = ComponentHealth { healthy: false, status: "degraded".into(), ..Default::default() };
        let kept = ReportedHealth::new(plain.clone());
        assert_eq!(
            (kept.to_proto(), kept.encoded_len()),
            (plain.clone(), prost::Message::encoded_len(&plain))
        );
    }
}
