//! The peers' metrics: calls between replicas by route and outcome, their duration and bytes,
//! the live replicas, refused callers (registered with the others by `crate::metrics`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The peer route (a fixed path of the code, e.g. `/status`).
    pub path: String,
    /// `ok`, `status` (the peer answered an error), `unreachable`, `unreadable`, `token`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The peer route.
    pub path: String,
    /// `sent` or `received`.
    pub direction: &'static str,
}

pub struct PeerMetrics {
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Histogram,
    pub bytes: Family<BytesLabels, Counter>,
    pub members: Gauge,
    pub refused: Counter,
}

impl Default for PeerMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            call_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            bytes: Family::default(),
            members: Gauge::default(),
            refused: Counter::default(),
        }
    }
}

impl PeerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "peer_calls",
            "Calls to other replicas, by peer route and result",
            self.calls.clone(),
        );
        registry.register(
            "peer_call_duration_seconds",
            "Duration of one call to another replica",
            self.call_duration.clone(),
        );
        registry.register(
            "peer_bytes",
            "Bytes of calls to other replicas (bodies), by peer route and direction",
            self.bytes.clone(),
        );
        registry.register(
            "peer_members",
            "Live replicas of the group, this one included",
            self.members.clone(),
        );
        registry.register(
            "peer_calls_refused",
            "Calls to the peer address refused (no token, or not a peer's)",
            self.refused.clone(),
        );
    }
}
