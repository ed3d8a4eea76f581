//! AgentConfig: "these agents run this configuration".
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::{AgentSelector, KeyRef};

/// The files a set of agents should run, and how to roll them out.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[kube(
    group = "opamp.dev",
    version = "v1alpha1",
    kind = "AgentConfig",
    doc = "The files a set of OpAMP agents should run (their remote config), how to roll them out, and what the fleet did with them.",
    namespaced,
    status = "AgentConfigStatus",
    shortname = "agentcfg",
    category = "opamp",
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selectedAgents"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.appliedAgents"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedAgents"}"#,
    printcolumn = r#"{"name":"Unhealthy","type":"integer","jsonPath":".status.unhealthyAgents"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfigSpec {
    /// Which agents of this namespace get these files. Empty: all of them.
    #[serde(default)]
    pub selector: AgentSelector,
    /// When two AgentConfigs set the same file for one agent, the higher priority wins (ties go
    /// to the alphabetically first namespace/name); the loser gets condition Conflict.
    #[serde(default)]
    pub priority: i32,
    /// The files, by name; they become the agent's remote config (`AgentConfigMap`).
    #[schemars(extend("minProperties" = 1, "maxProperties" = 100))]
    pub files: BTreeMap<String, ConfigFile>,
    /// How the files reach the selected agents.
    #[serde(default)]
    pub rollout: Rollout,
}

/// One file of the remote config: exactly one of `inline`, `configMapKeyRef`, `secretKeyRef`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "[has(self.inline), has(self.configMapKeyRef), has(self.secretKeyRef)].filter(x, x).size() == 1",
        "message": "exactly one of inline, configMapKeyRef or secretKeyRef must be set"
    }
]))]
pub struct ConfigFile {
    /// MIME type of the content, e.g. `text/yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The content itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// The content from a ConfigMap key of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// The content from a Secret key of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

/// How a new configuration reaches the selected agents.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.steps) || self.steps.isSorted()",
        "message": "rollout steps must ascend, e.g. [10, 50, 100]"
    }
]))]
pub struct Rollout {
    /// `Immediate` (every selected agent at once) or `Progressive` (in steps).
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Progressive: the percentage of selected agents offered the config at each step,
    /// ascending within 1..100; the last step is taken to be 100 if it is lower.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), inner(range(min = 1, max = 100)), length(max = 100))]
    pub steps: Vec<u8>,
    /// Progressive: a step is done when its agents applied the config and stayed healthy
    /// this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_healthy_seconds: Option<u32>,
    /// Progressive: more FAILED agents than this halt the rollout (condition Degraded) until
    /// the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_failures: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutStrategy {
    #[default]
    Immediate,
    Progressive,
}

/// What the fleet did with this configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfigStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hash of the files this resource contributes (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Agents of this namespace that match the selector now.
    #[serde(default)]
    pub selected_agents: u32,
    /// Selected agents that report APPLIED for their current config.
    #[serde(default)]
    pub applied_agents: u32,
    /// Selected agents that were offered their config and are applying it.
    #[serde(default)]
    pub applying_agents: u32,
    /// Selected agents that report FAILED for their current config.
    #[serde(default)]
    pub failed_agents: u32,
    /// Selected agents not offered the config yet (rollout gate, disconnected, or another
    /// resource's failure).
    #[serde(default)]
    pub pending_agents: u32,
    /// Selected agents, connected, whose last health report says they are not healthy.
    #[serde(default)]
    pub unhealthy_agents: u32,
    /// Progress of the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The most recent failures, newest first (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<AgentFailure>,
    /// Ready, Progressing, Degraded, Conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The current step (1-based; Immediate rollouts have one step).
    pub step: u32,
    pub state: RolloutState,
    /// Which agents the rollout of `configHash` admitted so far, the same on every replica: an
    /// agent is admitted when its rollout key is at most this (16 hex digits). The rollout key
    /// of an agent is the first 8 bytes (big-endian) of SHA-256 over `<namespace>/<name>` of
    /// this AgentConfig followed by the agent's 16-byte instance uid: a stable order, so the
    /// first steps always go to the same agents. Written by the operator's leader as the
    /// rollout advances; unset before the first step and for Immediate rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_up_to: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutState {
    #[default]
    Progressing,
    Paused,
    Halted,
    Complete,
}

/// An agent that failed to apply its config.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentFailure {
    /// The agent's instance uid (a UUID).
    pub instance_uid: String,
    /// The agent's error message.
    pub message: String,
    /// When the operator first saw this failure.
    pub since: Time,
}
