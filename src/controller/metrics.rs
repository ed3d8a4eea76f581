//! The controller's metrics: re-planning durations and status patches (registered with the
//! others by [`crate::metrics`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

pub struct ControllerMetrics {
    pub reconcile_duration: Histogram,
    pub status_patches: Family<StateLabel, Counter>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            status_patches: Family::default(),
        }
    }
}

impl ControllerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "reconcile_duration_seconds",
            "Duration of re-planning one namespace",
            self.reconcile_duration.clone(),
        );
        registry.register("status_patches", "Status patches, by outcome", self.status_patches.clone());
    }
}
