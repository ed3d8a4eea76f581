//! The fleet's gauges, refreshed from the fleet at scrape time (registered with the others by
//! [`crate::metrics`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Fleet;
use crate::proto::RemoteConfigStatuses;
use crate::protocol::Transport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

/// How many agents there are, connected, trimmed and by the status of their remote config.
#[derive(Default)]
pub struct FleetMetrics {
    pub agents_connected: Family<TransportLabel, Gauge>,
    pub agents_known: Gauge,
    /// Agents whose report lost parts to its bound of bytes (`AgentReport::trimmed`).
    pub agents_report_trimmed: Gauge,
    pub remote_config_statuses: Family<StatusLabel, Gauge>,
    /// Distinct report parts held once for every agent reporting them, by part.
    pub report_parts_shared: Family<PartLabel, Gauge>,
    /// Connection settings offers sent since the start (a gauge read from the fleet's count).
    pub connection_settings_offers: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabel {
    pub part: &'static str,
}

impl FleetMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agents_connected",
            "Agents connected now, by transport",
            self.agents_connected.clone(),
        );
        registry.register("agents_known", "Agents remembered, connected or not", self.agents_known.clone());
        registry.register(
            "agents_report_trimmed",
            "Agents whose reported state exceeded its bound of bytes (parts dropped)",
            self.agents_report_trimmed.clone(),
        );
        registry.register(
            "remote_config_statuses",
            "Agents by the status they last reported for their remote config",
            self.remote_config_statuses.clone(),
        );
        registry.register(
            "connection_settings_offers",
            "Connection settings offers (heartbeat interval, own telemetry, OpAMP server) sent to agents since the start",
            self.connection_settings_offers.clone(),
        );
        registry.register(
            "report_parts_shared",
            "Distinct reported parts (effectiveConfig, availableComponents, descriptionStrings: keys and values) held once for all the agents reporting them",
            self.report_parts_shared.clone(),
        );
    }

    /// Refreshes the fleet gauges (one pass over the fleet; call at scrape time).
    pub fn observe(&self, fleet: &Fleet) {
        self.connection_settings_offers
            .set(i64::try_from(fleet.connection_settings_offered()).unwrap_or(i64::MAX));
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
        let shared = fleet.shared_parts();
        for (part, held) in [
            ("effectiveConfig", shared.effective_configs),
            ("availableComponents", shared.available_components),
            ("descriptionStrings", shared.description_strings),
        ] {
            self.report_parts_shared.get_or_create(&PartLabel { part }).set(held as i64);
        }
    }
}
