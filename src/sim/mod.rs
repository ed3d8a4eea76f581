//! Our own OpAMP agent: transport clients and the behaviour of a simple agent (report state,
//! apply remote configs, answer `ReportFullState`). Used by the tests and the fleet simulator;
//! interop with third-party agents is proven separately against opamp-go.
mod agent;
mod client;
pub mod fleet;
pub mod payload;

pub use agent::{AgentSpec, SimAgent};
pub use client::{ClientError, HttpClient, HttpReply, WsClient, WsEvent, retry_info, tls_trusting};
