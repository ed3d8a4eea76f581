//! The fleet for users:
//!
//! - [`aggregated`]: `agents` in the aggregated API group `fleet.opamp.dev/v1alpha1`, behind an
//!   `APIService`: `kubectl get agents`, with the API server's authentication ([`frontproxy`])
//!   and RBAC; each agent an object of [`object`], selected with [`selector`]s;
//! - [`listing`]: the same agents as plain JSON on the operator's API address, for callers
//!   with a Kubernetes token.
//!
//! Both answer for every replica's agents, through peer routes.
pub mod aggregated;
pub mod frontproxy;
pub mod listing;
mod metrics;
pub mod object;
pub mod selector;

pub use listing::{AgentRow, CONCURRENT_LISTINGS, LIST, peer_router, router};

/// One of each agent's records from several replicas, in agent order (`key` gives the agent,
/// whether that record is connected, and when it was last seen): the connected record wins,
/// then the most recently seen, then the first given.
fn one_per_agent<T, K: Ord>(records: Vec<T>, key: impl Fn(&T) -> (K, bool, i64)) -> Vec<T> {
    use std::cmp::Reverse;
    let mut keyed: Vec<_> = records
        .into_iter()
        .map(|r| {
            let (agent, connected, seen) = key(&r);
            ((agent, Reverse(connected), Reverse(seen)), r)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0)); // stable: of equals, the first given first
    keyed.dedup_by(|later, first| later.0.0 == first.0.0);
    keyed.into_iter().map(|(_, r)| r).collect()
}
pub use metrics::AgentsApiMetrics;
