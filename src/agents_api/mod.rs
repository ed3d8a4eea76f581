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
pub use metrics::AgentsApiMetrics;
