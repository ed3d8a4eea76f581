//! Prometheus metrics (prefix `opamp_`), served on the metrics address at `/metrics`: the one
//! registry of the layers' metrics. Each layer owns its struct and knows nothing of this one.
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::agents_api::AgentsApiMetrics;
use crate::controller::ControllerMetrics;
use crate::fleet::{Fleet, FleetMetrics};
use crate::opamp::ServerMetrics;
use crate::peers::PeerMetrics;
use crate::routes::RouteMetrics;

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub fleet: FleetMetrics,
    pub server: Arc<ServerMetrics>,
    pub routes: Arc<RouteMetrics>,
    pub controller: Arc<ControllerMetrics>,
    pub peers: Arc<PeerMetrics>,
    pub agents_api: Arc<AgentsApiMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("opamp");
        let m = Self {
            registry: Registry::default(),
            fleet: FleetMetrics::default(),
            server: Arc::default(),
            routes: Arc::default(),
            controller: Arc::default(),
            peers: Arc::default(),
            agents_api: Arc::default(),
        };
        m.fleet.register(&mut registry);
        m.server.register(&mut registry);
        m.routes.register(&mut registry);
        m.controller.register(&mut registry);
        m.peers.register(&mut registry);
        m.agents_api.register(&mut registry);
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Refreshes the fleet gauges (one pass over the fleet; call at scrape time).
    pub fn observe_fleet(&self, fleet: &Fleet) {
        self.fleet.observe(fleet);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layers_metrics_are_in_the_one_registry() {
        let metrics = Metrics::new();
        metrics.observe_fleet(&Fleet::default());
        let text = metrics.encode();
        // Families without children are not shown: these are the metrics shown from the start.
        for name in [
            "agents_connected",
            "agents_known",
            "agents_report_trimmed",
            "remote_config_statuses",
            "messages_received",
            "messages_sent",
            "connections_open",
            "connection_accepts_paused",
            "callback_duration_seconds",
            "reconcile_duration_seconds",
        ] {
            assert!(text.contains(&format!("# HELP opamp_{name} ")), "opamp_{name} is missing:\n{text}");
        }
    }
}
