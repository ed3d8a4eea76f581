//! opamp-operator: a Kubernetes operator that manages fleets of OpAMP agents.
//!
//! - [`protocol`]: the pure OpAMP core (session state machine, codec, instance uids, attribute
//!   and bearer-token helpers);
//! - [`opamp`]: the OpAMP endpoint (the WebSocket and plain-HTTP transports, one request path);
//! - [`fleet`]: the registry of agents, their reported and desired state;
//! - [`controller`]: custom resources into the fleet's desired state, and status back;
//! - [`routes`]: custom-message routes (callbacks upstream, the dispatch API downstream);
//! - [`api`]: the custom resources; [`agents_api`]: the fleet for users (`kubectl get agents`
//!   through the aggregated API, and a JSON listing), with [`access`] deciding who may see it;
//!   [`http_server`]: the HTTP server of the API, aggregated-API and metrics addresses;
//! - [`metrics`]: the one registry of the layers' metrics; [`operator`]: the wiring;
//! - [`sim`]: a small OpAMP agent of our own, for tests and load.
//!
//! # Layers
//!
//! Dependencies point one way; `tests/layers.rs` reads every `use crate::…` and `crate::x::`
//! path under `src/` and fails on an edge outside this table (a file's layer is its top folder
//! or file under `src/`; [`proto`] may be imported by every layer):
//!
//! | layer | may import |
//! | --- | --- |
//! | `main.rs`, `operator` | anything |
//! | `metrics` | `fleet`, `opamp`, `routes`, `controller`, `peers`, `agents_api` (their metrics structs) |
//! | `controller` | `fleet`, `routes`, `api`, `protocol`, `opamp` (the `Authenticator` it implements), `peers` (status over every replica) |
//! | `routes` | `fleet`, `api`, `protocol`, `http_server` (the bounded body read), `peers` (dispatch across replicas) |
//! | `opamp` | `fleet`, `protocol`, `http_server` (the bounded body read), `peers` (HTTP polls routed to their owner) |
//! | `agents_api` | `access`, `fleet`, `protocol`, `peers` (the listing across replicas), `http_server` (TLS with client certificates) |
//! | `peers` | `protocol` |
//! | `access` | `protocol` |
//! | `sim` | `protocol` |
//! | `fleet` | `protocol` |
//! | `protocol`, `api`, `http_server` | nothing |
#![forbid(unsafe_code)]

pub mod access;
pub mod agents_api;
pub mod api;
pub mod controller;
pub mod fleet;
pub mod http_server;
pub mod metrics;
pub mod opamp;
pub mod operator;
pub mod peers;
pub mod protocol;
pub mod routes;
pub mod sim;

/// Types generated from `proto/opamp.proto` and `proto/anyvalue.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.rs"));

    /// The serialized `FileDescriptorSet` of our protos (for schema conformance checks).
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/opamp.fds"));
}
