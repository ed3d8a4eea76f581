//! The aggregated API's metrics: requests by verb and status code, and the watches open
//! (registered with the others by `crate::metrics`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `get`, `list`, `watch`, `discovery` (discovery and OpenAPI) or `other`.
    pub verb: &'static str,
    /// The HTTP status code answered.
    pub code: u16,
}

#[derive(Default)]
pub struct AgentsApiMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub watches: Gauge,
}

impl AgentsApiMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agents_api_requests",
            "Requests to the aggregated API (agents.fleet.opamp.dev), by verb and status code",
            self.requests.clone(),
        );
        registry.register(
            "agents_api_watches",
            "Watches of agents open on this replica",
            self.watches.clone(),
        );
    }
}
