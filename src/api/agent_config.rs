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
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.state"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","priority":1,"jsonPath":".status.currentRevision"}"#,
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
    /// How many revisions (ControllerRevisions `<name>-<hash>`, one per distinct set of files)
    /// are kept; the current, updating and last healthy ones are never removed. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub revision_history_limit: Option<u32>,
    /// How the selected agents talk to this server, and where they send their own telemetry.
    /// Applied to every selected agent at once (not through the rollout); where several
    /// AgentConfigs set it for one agent, the one with the highest priority wins, the whole block
    /// (ties go to the alphabetically first name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
}

/// OpAMP connection settings offered to the selected agents (`ConnectionSettingsOffers.opamp`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// Seconds between an agent's heartbeats over WebSocket, and between its polls over HTTP
    /// (so also how soon a polling agent sees a new config). Offered to agents that report
    /// heartbeats (capability `ReportsHeartbeat`; the collector's supervisor does by default),
    /// and with `server` to agents that accept OpAMP connection settings. Agents keep their own
    /// default (30 s) when it is not set; 30 is offered with `server` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub heartbeat_interval_seconds: Option<u32>,
    /// The OpAMP server agents that accept OpAMP connection settings
    /// (`AcceptsOpAMPConnectionSettings`) are to connect to. Such agents reconnect with exactly
    /// what they are offered (endpoint, headers, CA), so they are offered the heartbeat interval
    /// only together with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<OpampServer>,
    /// Where agents that report their own metrics (`ReportsOwnMetrics`; the supervisor does by
    /// default) send them, over OTLP/HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_metrics: Option<TelemetryDestination>,
    /// Where agents that report their own logs (`ReportsOwnLogs`) send them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_logs: Option<TelemetryDestination>,
    /// Where agents that report their own traces (`ReportsOwnTraces`) send them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_traces: Option<TelemetryDestination>,
}

/// Where agents that accept OpAMP connection settings connect (`ConnectionSettingsOffers.opamp`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpampServer {
    /// The operator's OpAMP URL as agents reach it: `wss://…/v1/opamp` or `ws://…` (WebSocket),
    /// `https://…/v1/opamp` or `http://…` (HTTP polling).
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(wss?|https?)://[^\s\x22'\\]+$"))]
    pub endpoint: String,
    /// Headers agents send when connecting: at least `Authorization` with an agent token
    /// (`Bearer <token>`), each value from a key of a Secret of this namespace. They replace
    /// the headers the agent has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub headers: Vec<TelemetryHeader>,
    /// The CA (PEM) agents verify the operator's certificate with, from a ConfigMap key of this
    /// namespace; required for `wss://` and `https://` (without one the supervisor would skip
    /// verifying the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_key_ref: Option<KeyRef>,
}

/// An OTLP/HTTP destination for an agent's own telemetry
/// (`ConnectionSettingsOffers.own_metrics` / `own_logs` / `own_traces`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryDestination {
    /// The full OTLP/HTTP URL, with the signal's path, e.g.
    /// `https://otlp.example.com:4318/v1/metrics`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s\x22'\\]+$"))]
    pub endpoint: String,
    /// Headers sent with every export (e.g. `Authorization`), each value from a key of a Secret
    /// of this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub headers: Vec<TelemetryHeader>,
    /// The CA (PEM) to verify an `https://` endpoint with, from a ConfigMap key of this
    /// namespace (`tls.ca_pem_contents` of the offer, with the system's CAs too). The
    /// collector's supervisor (v0.149.0) does not apply TLS settings of own telemetry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_key_ref: Option<KeyRef>,
}

/// One header of a telemetry destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryHeader {
    /// The header's name, e.g. `Authorization`.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// The Secret key holding its value.
    pub secret_key_ref: KeyRef,
}

/// Revisions kept per AgentConfig when `revisionHistoryLimit` is not set.
pub const REVISION_HISTORY_LIMIT_DEFAULT: u32 = 10;

/// The annotation that retries a halted or rolled back rollout of the same spec: set it (or
/// change its value) and the rollout starts over at its first step.
pub const RETRY_ANNOTATION: &str = "opamp.dev/retry";

/// The annotation that restarts the selected agents, like `kubectl rollout restart`: set it to
/// the current time (RFC 3339, e.g. `2026-12-03T10:00:00Z`) and every selected agent that accepts
/// the restart command and started before that time is sent one, once.
pub const RESTART_ANNOTATION: &str = "opamp.dev/restartedAt";

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
    /// More FAILED agents than this trip the failed gate; when set it replaces
    /// `gates.maxFailedPercent` (a count instead of a share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_failures: Option<u32>,
    /// What a tripped gate does: `Halt` (no more agents are given this version; those that have
    /// it keep it) or `Rollback` (those that took it are sent the files of
    /// `status.lastHealthyRevision`; the spec is left as it is). Default `Halt`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// The health gates, watched at every step and during the soak; see each for its default.
    #[serde(default)]
    pub gates: Gates,
    /// Holds the rollout at its current step: no more agents are given the new version (the
    /// gates are still watched) until it is set back to false. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// How long the gates are still watched once the last step is done, before the rollout is
    /// complete and its revision becomes the last healthy one. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub soak_seconds: Option<u32>,
}

/// What a tripped gate does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum OnFailure {
    #[default]
    Halt,
    Rollback,
}

/// The gates of a rollout: shares (percent) of the agents given the new version that may go
/// wrong before the rollout stops. A share above the limit trips the gate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gates {
    /// Agents reporting FAILED, of those given the version. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_failed_percent: Option<u8>,
    /// Agents unhealthy, of the connected ones that applied the version. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_unhealthy_percent: Option<u8>,
    /// Agents gone for 30 s or more, of those that applied the version. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_disconnected_percent: Option<u8>,
    /// Connected agents that still do not report the version applied (or failed)
    /// `applyDeadlineSeconds` after their step began. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_not_applied_percent: Option<u8>,
    /// How long agents have to apply a version before they count as not applying it. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub apply_deadline_seconds: Option<u32>,
}

impl Gates {
    pub fn failed_percent(&self) -> u8 {
        self.max_failed_percent.unwrap_or(20)
    }
    pub fn unhealthy_percent(&self) -> u8 {
        self.max_unhealthy_percent.unwrap_or(10)
    }
    pub fn disconnected_percent(&self) -> u8 {
        self.max_disconnected_percent.unwrap_or(20)
    }
    pub fn not_applied_percent(&self) -> u8 {
        self.max_not_applied_percent.unwrap_or(20)
    }
    pub fn apply_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.apply_deadline_seconds.unwrap_or(600)))
    }
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
    /// Selected agents that lack a collector component these files use (by their
    /// AvailableComponents): they are not sent the config, and are named in `failures`.
    #[serde(default)]
    pub incompatible_agents: u32,
    /// Selected agents that report `updateRevision` applied.
    #[serde(default)]
    pub updated_agents: u32,
    /// The revision most selected agents run (`updateRevision` once more than half of them
    /// applied it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The revision of the files the spec asks for now (ControllerRevision `<name>-<hash>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// The last revision whose rollout completed with every gate passing: what a rollback
    /// sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healthy_revision: Option<String>,
    /// Progress of the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The connection settings of `spec.connection`, among the selected agents it wins for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionStatus>,
    /// The restart the `opamp.dev/restartedAt` annotation asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartStatus>,
    /// The most recent failures, newest first (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<AgentFailure>,
    /// Ready, Progressing, Degraded, Conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// What became of `spec.connection`, counted over the selected agents whose connection settings
/// come from this AgentConfig (another one of higher priority may win for some).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The hash of the offer (`ConnectionSettingsOffers.hash`, as agents report it back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Why the settings are not offered (e.g. a header value that cannot be sent as it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Agents offered these settings: they take at least one part (the heartbeat interval:
    /// `ReportsHeartbeat`; the server: `AcceptsOpAMPConnectionSettings`; own metrics, logs,
    /// traces: `ReportsOwnMetrics`, …).
    #[serde(default)]
    pub offered_agents: u32,
    /// Offered agents that report these settings applied (`ConnectionSettingsStatus`, sent by
    /// agents with `ReportsConnectionSettingsStatus`; the collector's supervisor does not).
    #[serde(default)]
    pub applied_agents: u32,
    /// Offered agents that report these settings failed.
    #[serde(default)]
    pub failed_agents: u32,
    /// Agents these settings are for that can take no part of them (agents that accept OpAMP
    /// connection settings are offered the heartbeat interval only with `server`: they
    /// reconnect with exactly what they are offered).
    #[serde(default)]
    pub unsupported_agents: u32,
}

/// What became of the restart the `opamp.dev/restartedAt` annotation asks for, over the
/// selected agents.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartStatus {
    /// The annotation's value.
    pub requested_at: String,
    /// Why the value is not acted on (not an RFC 3339 time, or in the future); nothing is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Agents that accept the restart command (`AcceptsRestartCommand`) and report having
    /// started since (their health's start time).
    #[serde(default)]
    pub restarted_agents: u32,
    /// Agents that accept the command and have not reported a start since: sent the command (or
    /// about to be), or not connected.
    #[serde(default)]
    pub pending_agents: u32,
    /// Agents that do not accept the restart command: never sent one.
    #[serde(default)]
    pub unsupported_agents: u32,
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
    /// The gate that stopped this rollout (Halted or RolledBack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped: Option<TrippedGate>,
    /// RolledBack: the revision the agents that took this one were sent instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
    /// The value of the `opamp.dev/retry` annotation this rollout started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
}

/// A gate that tripped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrippedGate {
    /// `FailedRatio`, `UnhealthyRatio`, `DisconnectedRatio` or `NotAppliedRatio`.
    pub gate: String,
    /// What was seen, e.g. "3 of 10 agents failed (more than 20%)".
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutState {
    #[default]
    Progressing,
    Paused,
    Halted,
    /// A gate tripped and the agents that took this version were sent the last healthy one.
    RolledBack,
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
