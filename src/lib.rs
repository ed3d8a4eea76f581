//! opamp-operator: a Kubernetes operator that manages fleets of OpAMP agents.
//!
//! - [`opamp`]: the OpAMP endpoint (wire codec, session state machine, transports);
//! - [`fleet`]: the registry of agents, their reported and desired state;
//! - [`sim`]: a small OpAMP agent of our own, for tests and load.
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
