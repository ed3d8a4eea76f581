//! The routes' metrics: custom messages upstream, callback durations, dispatch results
//! (registered with the others by [`crate::metrics`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

pub struct RouteMetrics {
    pub custom_messages_upstream: Family<StateLabel, Counter>,
    pub callback_duration: Histogram,
    pub dispatch_results: Family<StateLabel, Counter>,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            custom_messages_upstream: Family::default(),
            callback_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            dispatch_results: Family::default(),
        }
    }
}

impl RouteMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "custom_messages_upstream",
            "Agents' custom messages by outcome (delivered, failed, refused, callback_refused, queue_full, unrouted)",
            self.custom_messages_upstream.clone(),
        );
        registry.register(
            "callback_duration_seconds",
            "Duration of one callback delivery attempt",
            self.callback_duration.clone(),
        );
        registry.register(
            "dispatch_results",
            "Dispatched messages per agent, by state",
            self.dispatch_results.clone(),
        );
    }
}
