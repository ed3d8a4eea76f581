//! The controller's metrics: re-planning durations, status patches, the status writer's queue
//! and the objects held in memory (registered with the others by [`crate::metrics`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use crate::routes::StateLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

/// The objects the controller holds: `kind` (`ConfigMap`, `Secret`) and `content` (`full`: with
/// their data; `metadata`: name, namespace and version only).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CachedLabel {
    pub kind: &'static str,
    pub content: &'static str,
}

/// A rollout a gate stopped: the gate (`FailedRatio`, …) and what followed (`Halted`,
/// `RolledBack`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabel {
    pub gate: String,
    pub outcome: &'static str,
}

pub struct ControllerMetrics {
    pub reconcile_duration: Histogram,
    pub status_patches: Family<StateLabel, Counter>,
    /// Status updates and Events dropped because the writer's queue was full.
    pub status_updates_dropped: Counter,
    pub status_queue_depth: Gauge,
    /// The controller's failures, by `controller::Error::category`.
    pub controller_errors: Family<CategoryLabel, Counter>,
    /// ConfigMaps and Secrets held in memory, with their content or by their metadata only.
    pub cached_objects: Family<CachedLabel, Gauge>,
    /// Rollouts stopped by a gate, on the leader that decided it.
    pub rollouts_stopped: Family<GateLabel, Counter>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            status_patches: Family::default(),
            status_updates_dropped: Counter::default(),
            status_queue_depth: Gauge::default(),
            controller_errors: Family::default(),
            cached_objects: Family::default(),
            rollouts_stopped: Family::default(),
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
        registry.register(
            "status_patches",
            "Status patches, by outcome (ok, error, timeout)",
            self.status_patches.clone(),
        );
        registry.register(
            "status_updates_dropped",
            "Status updates and Events dropped because the status writer's queue was full (recomputed later)",
            self.status_updates_dropped.clone(),
        );
        registry.register(
            "status_queue_depth",
            "Status updates and Events waiting for the status writer",
            self.status_queue_depth.clone(),
        );
        registry.register(
            "controller_errors",
            "Controller failures, by category (watch, read, invalid-object, patch, timeout, event, reference, revision)",
            self.controller_errors.clone(),
        );
        registry.register(
            "controller_cached_objects",
            "ConfigMaps and Secrets held in memory, by kind and content (full: with their data, \
             only agent-token Secrets and referenced objects; metadata: name and version only)",
            self.cached_objects.clone(),
        );
        registry.register(
            "rollouts_stopped",
            "Rollouts a gate stopped, by gate (FailedRatio, UnhealthyRatio, DisconnectedRatio, \
             NotAppliedRatio) and outcome (Halted, RolledBack)",
            self.rollouts_stopped.clone(),
        );
    }
}
