//! The OpAMP endpoint's metrics: messages, refusals, decode errors and connections (registered
//! with the others by [`crate::metrics`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use crate::fleet::TransportLabel;
use crate::proto::AgentToServer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// How forwarding a plain-HTTP poll to its owner went: `answered` (the owner's answer was
/// passed on), `owner_unreachable` (handled here instead), `busy` (every forwarding slot was
/// taken: refused with a Retry-After).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// What the transports count.
pub struct ServerMetrics {
    pub messages_in: Family<KindLabel, Counter>,
    pub messages_out: Family<KindLabel, Counter>,
    pub decode_errors: Family<TransportLabel, Counter>,
    pub rejected_agents: Family<KindLabel, Counter>,
    /// OpAMP connections open now (both transports, TLS handshakes included).
    pub connections_open: Gauge,
    /// Times the OpAMP endpoint stopped accepting at its connection limit.
    pub connection_accepts_paused: Counter,
    /// OpAMP connections closed at a deadline, by the phase they were in.
    pub connection_timeouts: Family<KindLabel, Counter>,
    /// Plain-HTTP polls for an agent another replica owns, by how forwarding them went.
    pub http_forwarded: Family<ResultLabel, Counter>,
    /// Plain-HTTP polls another replica forwarded here (this replica owns the agent).
    pub http_forwards_received: Counter,
    /// Plain-HTTP agents marked offline here because another replica owns them now.
    pub http_agents_released: Counter,
    /// The counters every message touches, resolved once.
    pub hot: MessageCounters,
}

/// Children of `messages_received` and `messages_sent` resolved up front: counting a message is
/// one atomic increment, not a label lookup.
pub struct MessageCounters {
    heartbeat: Counter,
    report: Counter,
    disconnect: Counter,
    custom_message: Counter,
    pub reply: Counter,
    pub push: Counter,
    pub error: Counter,
}

impl MessageCounters {
    fn new(received: &Family<KindLabel, Counter>, sent: &Family<KindLabel, Counter>) -> Self {
        let child =
            |family: &Family<KindLabel, Counter>, kind| family.get_or_create(&KindLabel { kind }).clone();
        Self {
            heartbeat: child(received, "heartbeat"),
            report: child(received, "report"),
            disconnect: child(received, "disconnect"),
            custom_message: child(received, "custom_message"),
            reply: child(sent, "reply"),
            push: child(sent, "push"),
            error: child(sent, "error"),
        }
    }

    /// The `messages_received` child counting this message's kind.
    pub fn received(&self, msg: &AgentToServer) -> &Counter {
        if msg.agent_disconnect.is_some() {
            &self.disconnect
        } else if msg.custom_message.is_some() {
            &self.custom_message
        } else if msg.agent_description.is_some()
            || msg.health.is_some()
            || msg.effective_config.is_some()
            || msg.remote_config_status.is_some()
            || msg.package_statuses.is_some()
            || msg.custom_capabilities.is_some()
            || msg.available_components.is_some()
        {
            &self.report
        } else {
            &self.heartbeat
        }
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let (messages_in, messages_out) = (Family::default(), Family::default());
        Self {
            hot: MessageCounters::new(&messages_in, &messages_out),
            messages_in,
            messages_out,
            decode_errors: Family::default(),
            rejected_agents: Family::default(),
            connections_open: Gauge::default(),
            connection_accepts_paused: Counter::default(),
            connection_timeouts: Family::default(),
            http_forwarded: Family::default(),
            http_forwards_received: Counter::default(),
            http_agents_released: Counter::default(),
        }
    }
}

impl ServerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("messages_received", "AgentToServer messages, by kind", self.messages_in.clone());
        registry.register("messages_sent", "ServerToAgent messages, by kind", self.messages_out.clone());
        registry.register(
            "decode_errors",
            "Undecodable or oversize agent messages",
            self.decode_errors.clone(),
        );
        registry.register(
            "agents_rejected",
            "Agents refused (unauthorized, at_capacity, namespace_limit, paced: a new session beyond --max-connects-per-second)",
            self.rejected_agents.clone(),
        );
        registry.register(
            "connections_open",
            "OpAMP connections open now (both transports, TLS handshakes included)",
            self.connections_open.clone(),
        );
        registry.register(
            "connection_accepts_paused",
            "Times the OpAMP endpoint stopped accepting because max connections were open",
            self.connection_accepts_paused.clone(),
        );
        registry.register(
            "connection_timeouts",
            "OpAMP connections closed at a deadline, by kind (tls_handshake, header, body, write, idle, websocket_first_message, websocket_silent)",
            self.connection_timeouts.clone(),
        );
        registry.register(
            "http_forwarded",
            "Plain-HTTP polls for an agent another replica owns, by result (answered, owner_unreachable, busy)",
            self.http_forwarded.clone(),
        );
        registry.register(
            "http_forwards_received",
            "Plain-HTTP polls another replica forwarded to this one, the agent's owner",
            self.http_forwards_received.clone(),
        );
        registry.register(
            "http_agents_released",
            "Plain-HTTP agents marked offline because another replica owns them now",
            self.http_agents_released.clone(),
        );
    }
}
