//! Prometheus metrics (prefix `opamp_`), served on the metrics address at `/metrics`.
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::fleet::{Fleet, Transport};
use crate::proto::{AgentToServer, RemoteConfigStatuses};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub agents_connected: Family<TransportLabel, Gauge>,
    pub agents_known: Gauge,
    /// Agents whose report lost parts to its bound of bytes (`AgentReport::trimmed`).
    pub agents_report_trimmed: Gauge,
    pub remote_config_statuses: Family<StatusLabel, Gauge>,
    pub messages_in: Family<KindLabel, Counter>,
    pub messages_out: Family<KindLabel, Counter>,
    pub decode_errors: Family<TransportLabel, Counter>,
    pub rejected_agents: Family<KindLabel, Counter>,
    pub custom_messages_upstream: Family<StateLabel, Counter>,
    pub callback_duration: Histogram,
    pub dispatch_results: Family<StateLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub status_patches: Family<StateLabel, Counter>,
    /// The controller's failures, by `controller::Error::category`.
    pub controller_errors: Family<CategoryLabel, Counter>,
    /// OpAMP connections open now (both transports, TLS handshakes included).
    pub connections_open: Gauge,
    /// Times the OpAMP endpoint stopped accepting at its connection limit.
    pub connection_accepts_paused: Counter,
    /// OpAMP connections closed at a deadline, by the phase they were in.
    pub connection_timeouts: Family<KindLabel, Counter>,
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

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("opamp");
        let (messages_in, messages_out) = (Family::default(), Family::default());
        let m = Self {
            agents_connected: Family::default(),
            agents_known: Gauge::default(),
            agents_report_trimmed: Gauge::default(),
            remote_config_statuses: Family::default(),
            hot: MessageCounters::new(&messages_in, &messages_out),
            messages_in,
            messages_out,
            decode_errors: Family::default(),
            rejected_agents: Family::default(),
            custom_messages_upstream: Family::default(),
            callback_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            dispatch_results: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            status_patches: Family::default(),
            controller_errors: Family::default(),
            connections_open: Gauge::default(),
            connection_accepts_paused: Counter::default(),
            connection_timeouts: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "agents_connected",
            "Agents connected now, by transport",
            m.agents_connected.clone(),
        );
        registry.register("agents_known", "Agents remembered, connected or not", m.agents_known.clone());
        registry.register(
            "agents_report_trimmed",
            "Agents whose reported state exceeded its bound of bytes (parts dropped)",
            m.agents_report_trimmed.clone(),
        );
        registry.register(
            "remote_config_statuses",
            "Agents by the status they last reported for their remote config",
            m.remote_config_statuses.clone(),
        );
        registry.register("messages_received", "AgentToServer messages, by kind", m.messages_in.clone());
        registry.register("messages_sent", "ServerToAgent messages, by kind", m.messages_out.clone());
        registry.register("decode_errors", "Undecodable or oversize agent messages", m.decode_errors.clone());
        registry.register(
            "agents_rejected",
            "Agents refused (unauthorized, at_capacity, namespace_limit)",
            m.rejected_agents.clone(),
        );
        registry.register(
            "custom_messages_upstream",
            "Agents' custom messages by outcome (delivered, failed, refused, callback_refused, queue_full, unrouted)",
            m.custom_messages_upstream.clone(),
        );
        registry.register(
            "callback_duration_seconds",
            "Duration of one callback delivery attempt",
            m.callback_duration.clone(),
        );
        registry.register(
            "dispatch_results",
            "Dispatched messages per agent, by state",
            m.dispatch_results.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of re-planning one namespace",
            m.reconcile_duration.clone(),
        );
        registry.register("status_patches", "Status patches, by outcome", m.status_patches.clone());
        registry.register(
            "controller_errors",
            "Controller failures, by category (watch, invalid-object, patch, timeout, event, reference)",
            m.controller_errors.clone(),
        );
        registry.register(
            "connections_open",
            "OpAMP connections open now (both transports, TLS handshakes included)",
            m.connections_open.clone(),
        );
        registry.register(
            "connection_accepts_paused",
            "Times the OpAMP endpoint stopped accepting because max connections were open",
            m.connection_accepts_paused.clone(),
        );
        registry.register(
            "connection_timeouts",
            "OpAMP connections closed at a deadline, by kind (tls_handshake, header, body, write, idle, websocket_first_message, websocket_silent)",
            m.connection_timeouts.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Refreshes the fleet gauges (one pass over the fleet; call at scrape time).
    pub fn observe_fleet(&self, fleet: &Fleet) {
        let (mut ws, mut http, mut known, mut trimmed) = (0i64, 0i64, 0i64, 0i64);
        let mut statuses = [0i64; 4];
        fleet.for_each_view(|view| {
            known += 1;
            trimmed += i64::from(!view.report.trimmed.is_empty());
            match view.transport {
                Some(Transport::WebSocket) => ws += 1,
                Some(Transport::Http) => http += 1,
                None => {}
            }
            if let Some(s) = &view.report.remote_config_status {
                statuses[(s.status.clamp(0, 3)) as usize] += 1;
            }
        });
        self.agents_connected.get_or_create(&TransportLabel { transport: "websocket" }).set(ws);
        self.agents_connected.get_or_create(&TransportLabel { transport: "http" }).set(http);
        self.agents_known.set(known);
        self.agents_report_trimmed.set(trimmed);
        for (i, s) in [
            RemoteConfigStatuses::Unset,
            RemoteConfigStatuses::Applied,
            RemoteConfigStatuses::Applying,
            RemoteConfigStatuses::Failed,
        ]
        .iter()
        .enumerate()
        {
            let status = match s {
                RemoteConfigStatuses::Unset => "unset",
                RemoteConfigStatuses::Applied => "applied",
                RemoteConfigStatuses::Applying => "applying",
                RemoteConfigStatuses::Failed => "failed",
            };
            self.remote_config_statuses.get_or_create(&StatusLabel { status }).set(statuses[i]);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
