//! The OpAMP endpoint: the two transports (WebSocket and plain HTTP) served on one path,
//! `/v1/opamp`, over the fleet, and with other replicas the peer route their forwarded HTTP
//! polls arrive on (`http.rs`, `forward.rs`). The wire codec and the session state machine are
//! in [`crate::protocol`].
pub mod auth;
mod forward;
pub mod frames;
mod http;
mod metrics;
pub mod pace;
mod request;
pub mod server;
pub mod tls;
mod ws;

pub use auth::{AuthError, Authenticator};
pub use forward::{FORWARDED_AUTHORIZATION, INSTANCE_UID, MAX_FORWARDS_DEFAULT, PEER_OPAMP_PATH};
pub use metrics::{KindLabel, MessageCounters, ResultLabel, ServerMetrics, TransportLabel};
pub use pace::{MAX_CONNECTS_PER_SECOND_DEFAULT, Pacer};
pub use server::{LISTEN_BACKLOG, OPAMP_PATH, OpampServer, ServerConfig, listen};
pub use tls::TlsFiles;
