//! CapabilitySlot: "a custom-message route for one capability".
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::{AgentSelector, KeyRef};

/// Declares an OpAMP custom capability for the agents of this namespace, where the agents'
/// messages go (callback) and how services send messages to agents (dispatch).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[kube(
    group = "opamp.dev",
    version = "v1alpha1",
    kind = "CapabilitySlot",
    doc = "A route for one OpAMP custom capability: advertised to agents, their messages POSTed to a callback, messages dispatched to them through the API.",
    namespaced,
    status = "CapabilitySlotStatus",
    shortname = "capslot",
    category = "opamp",
    printcolumn = r#"{"name":"Capability","type":"string","jsonPath":".spec.capability"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.supportingAgents"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitySlotSpec {
    /// The custom capability, a reverse-DNS name optionally followed by a version, e.g.
    /// `com.example.pprof` or `io.opentelemetry.custom-capability/v2`. Advertised to agents in
    /// `ServerToAgent.custom_capabilities`.
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+(/v[0-9]+)?$')",
            "message": "capability must be a reverse-DNS name such as com.example.pprof, optionally with a version suffix such as /v2"
        }
    ]), length(max = 253))]
    pub capability: String,
    /// Which agents of this namespace it is advertised to. Empty: all of them.
    #[serde(default)]
    pub selector: AgentSelector,
    /// Allowed message types, both directions. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub message_types: Vec<String>,
    /// Where the agents' messages for this capability are POSTed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// How services send messages to agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Callback {
    /// An http(s) URL.
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self.startsWith('http://') || self.startsWith('https://')", "message": "callback url must be http:// or https://" }
    ]))]
    pub url: String,
    /// Timeout of one delivery attempt.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: u32,
    /// Attempts before a message counts as failed (exponential back-off between them).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// A Secret key whose value signs each body (HMAC-SHA256, hex, in header
    /// `X-OpAMP-Signature: sha256=<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<KeyRef>,
}

fn default_timeout() -> u32 {
    5
}

fn default_attempts() -> u32 {
    6
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dispatch {
    /// A Secret key holding the bearer token callers present.
    pub token_secret_ref: KeyRef,
    /// Pending messages held per agent.
    #[serde(default = "default_queue_limit")]
    #[schemars(range(min = 1, max = 10000))]
    pub queue_limit: u32,
    /// How long a message waits for an agent that is offline or busy.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 1))]
    pub ttl_seconds: u32,
}

fn default_queue_limit() -> u32 {
    64
}

fn default_ttl() -> u32 {
    300
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitySlotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Agents of this namespace that declared the capability.
    #[serde(default)]
    pub supporting_agents: u32,
    #[serde(default)]
    pub upstream: UpstreamStatus,
    #[serde(default)]
    pub downstream: DownstreamStatus,
    /// Ready, Conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Agent → callback.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub received: u64,
    pub delivered: u64,
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Dispatch API → agents.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownstreamStatus {
    pub accepted: u64,
    pub sent: u64,
    pub expired: u64,
    pub rejected: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_send_time: Option<Time>,
}
