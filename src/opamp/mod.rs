//! The OpAMP endpoint: wire codec, the pure session state machine, and the two transports
//! (WebSocket and plain HTTP) served on one path, `/v1/opamp`.
pub mod auth;
pub mod codec;
mod http;
pub mod server;
pub mod session;
pub mod tls;
mod uid;
mod ws;

pub use auth::{AuthError, Authenticator};
pub(crate) use http::read_body;
pub use server::{OPAMP_PATH, OpampServer, ServerConfig};
pub use tls::TlsFiles;
pub use uid::{ParseUidError, Uid};
