//! The OpAMP protocol core, pure: the session state machine, the wire codec, instance uids, the
//! transports' names, and helpers reading agents' attributes and callers' bearer tokens. It
//! imports nothing of the operator but the generated [`crate::proto`] types, so every layer
//! above (transports, fleet, routes, controller, the simulator) can share it.
mod attributes;
pub mod codec;
mod headers;
pub mod session;
pub mod shared;
mod uid;

pub use attributes::{Description, attribute, attributes_json};
pub use headers::bearer_token;
pub use uid::{ParseUidError, Uid};

/// How an agent talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[serde(rename = "websocket")]
    WebSocket,
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        }
    }
}
