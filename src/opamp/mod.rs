//! The OpAMP endpoint: the two transports (WebSocket and plain HTTP) served on one path,
//! `/v1/opamp`, over the fleet. The wire codec and the session state machine are in
//! [`crate::protocol`].
pub mod auth;
mod http;
mod metrics;
mod request;
pub mod server;
pub mod tls;
mod ws;

pub use auth::{AuthError, Authenticator};
pub use metrics::{KindLabel, MessageCounters, ServerMetrics, TransportLabel};
pub use server::{OPAMP_PATH, OpampServer, ServerConfig};
pub use tls::TlsFiles;
