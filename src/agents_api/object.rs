//! An agent as a Kubernetes object: kind `Agent` of `fleet.opamp.dev/v1alpha1`, named by its
//! instance uid in its namespace, built from the fleet in memory (never stored in etcd).
//!
//! - `metadata.labels` are the agent's attributes (identifying and non-identifying) whose key
//!   and value are valid label keys and values, so label selectors work over them;
//! - `status` is what the agent reports and what the operator wants it to run; what a user
//!   would grep for has a field selector (see [`Agent::field`]).
use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fleet::AgentView;
use crate::proto::{
    AgentCapabilities, ComponentDetails, ComponentHealth, ConnectionSettingsStatuses, RemoteConfigStatuses,
};

/// The API group, version and kind.
pub const GROUP: &str = "fleet.opamp.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "fleet.opamp.dev/v1alpha1";
pub const KIND: &str = "Agent";
pub const PLURAL: &str = "agents";
/// Components described at most in `status.health.components` (the rest are counted).
pub const MAX_HEALTH_COMPONENTS: usize = 100;

/// An OpAMP agent connected to (or recently seen by) the operator.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(
    title = "Agent",
    description = "An OpAMP agent as the operator sees it: what it reports and what it is to run. Read-only; served from the operator's memory."
)]
pub struct Agent {
    /// `fleet.opamp.dev/v1alpha1`.
    pub api_version: String,
    /// `Agent`.
    pub kind: String,
    pub metadata: Metadata,
    pub status: AgentStatus,
}

/// Standard object metadata (the subset an agent has).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The agent's instance uid (a UUID).
    pub name: String,
    /// The namespace of the agent's token.
    pub namespace: String,
    /// The instance uid again (an agent's identity is its instance uid in its namespace).
    pub uid: String,
    /// When something of the agent other than `lastSeen` last changed, in microseconds since
    /// the epoch on the replica holding it (comparable to a list's resource version).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// The agent's attributes that are valid label keys and values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What the agent reports and what it is to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Whether the agent is connected now (WebSocket open, or HTTP polls within three heartbeats).
    pub connected: bool,
    /// `websocket` or `http`; absent for an agent remembered offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The `service.name` attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The `service.version` attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,
    /// Identifying attributes of the agent's description, as strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identifying_attributes: BTreeMap<String, String>,
    /// Non-identifying attributes (host, OS, …), as strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub non_identifying_attributes: BTreeMap<String, String>,
    /// The OpAMP capabilities the agent declares (e.g. `AcceptsRemoteConfig`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Whether the agent says it is healthy; absent when it does not report health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// The agent's health, with its components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Remote configuration: what the operator wants it to run, and what it reports.
    pub config: ConfigState,
    /// Connection settings: what the operator offers the agent, and what it reports of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionState>,
    /// The configuration the agent says it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_config: Option<EffectiveConfig>,
    /// How many components the agent says it has, by kind (e.g. `receivers: 12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_components: Option<BTreeMap<String, u32>>,
    /// Custom capabilities the agent declares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_capabilities: Vec<String>,
    /// The latest error: the remote config's, else the health's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Parts of the report the operator dropped because the report exceeded its bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_trimmed: Vec<String>,
    /// When the agent was last heard from (RFC 3339).
    pub last_seen: String,
}

/// The agent's health, as it reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// When the agent (or component) started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Components by name (e.g. `pipeline:traces`, `receiver:otlp`), flattened with `/`, at most
    /// [`MAX_HEALTH_COMPONENTS`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, ComponentState>,
    /// Components left out beyond the bound.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub components_omitted: u32,
}

/// One component's health.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentState {
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

/// Remote configuration: desired (the operator's) and reported (the agent's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigState {
    /// `APPLIED` (the agent runs the desired config), `APPLYING`, `FAILED`, `PENDING` (a config is
    /// desired that the agent does not report yet), or empty (no remote config either way).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The AgentConfigs of the namespace that select the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected_by: Vec<String>,
    /// Hash (hex) of the config the operator offers the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_hash: Option<String>,
    /// The file names of that config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub desired_files: Vec<String>,
    /// What the agent reported of the config.
    #[serde(flatten)]
    pub reported: Reported,
}

/// What an agent last reported of something offered to it (a config, connection settings).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Reported {
    /// Hash (hex) of what the agent last reported on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_hash: Option<String>,
    /// The agent's status for it (`APPLIED`, `APPLYING`, `FAILED`, `UNSET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_status: Option<String>,
    /// The agent's error message for it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

/// Connection settings: offered (the operator's) and reported (the agent's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionState {
    /// Hash (hex) of the connection settings the operator offers the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_hash: Option<String>,
    /// The heartbeat interval offered, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<u64>,
    /// What the agent reported of the settings (agents with `ReportsConnectionSettingsStatus`).
    #[serde(flatten)]
    pub reported: Reported,
}

/// The configuration the agent says it runs: its files and their sizes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    /// Bytes of every file together.
    pub size_bytes: u64,
    /// File name → bytes.
    pub files: BTreeMap<String, u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Microseconds since the epoch (0 before it).
pub fn micros(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A time in nanoseconds since the epoch as RFC 3339 (`None` for 0, the protocol's unset).
fn rfc3339_nanos(nanos: u64) -> Option<String> {
    (nanos > 0).then(|| Timestamp::from_nanosecond(i128::from(nanos)).ok().map(|t| t.to_string())).flatten()
}

impl Agent {
    /// The object of one agent; `selected_by` names the AgentConfigs selecting it.
    pub fn of(a: &AgentView<'_>, selected_by: Vec<String>) -> Self {
        let report = a.report;
        let desc = report.description.as_ref();
        let attrs = |list: &mut dyn Iterator<Item = (&str, Cow<'_, str>)>| -> BTreeMap<String, String> {
            list.map(|(k, v)| (k.to_owned(), v.into_owned())).collect()
        };
        let identifying = desc.map(|d| attrs(&mut d.identifying())).unwrap_or_default();
        let non_identifying = desc.map(|d| attrs(&mut d.non_identifying())).unwrap_or_default();
        let labels = identifying
            .iter()
            .chain(&non_identifying)
            .filter(|(k, v)| valid_label_key(k) && valid_label_value(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let attribute = |key: &str| identifying.get(key).or_else(|| non_identifying.get(key)).cloned();
        let reported = report.remote_config_status.as_ref();
        let desired = a.desired.remote_config.as_ref();
        let desired_hash = desired.map(|c| hex::encode(&c.config_hash));
        let reported_hash =
            reported.map(|s| hex::encode(&s.last_remote_config_hash)).filter(|h| !h.is_empty());
        let reported_status = reported.map(|s| remote_config_status_name(s.status).to_owned());
        let status =
            config_status(desired_hash.as_deref(), reported_hash.as_deref(), reported_status.as_deref());
        let desired_files = desired
            .and_then(|c| c.config.as_ref())
            .map(|m| m.config_map.keys().cloned().collect())
            .unwrap_or_default();
        let config_error = reported.map(|s| s.error_message.clone()).unwrap_or_default();
        let health = report.health.as_ref().map(|h| health(&h.to_proto()));
        let last_error = Some(config_error.clone())
            .filter(|e| !e.is_empty())
            .or_else(|| health.as_ref().map(|h| h.last_error.clone()).filter(|e| !e.is_empty()));
        // Decoded from how it is kept (see `protocol::shared`): reads are rare.
        let effective_config =
            report.effective_config.as_ref().and_then(|e| e.to_proto().config_map).map(|m| {
                let files: BTreeMap<String, u64> =
                    m.config_map.iter().map(|(name, f)| (name.clone(), f.body.len() as u64)).collect();
                EffectiveConfig { size_bytes: files.values().sum(), files }
            });
        let available_components = report
            .available_components
            .as_ref()
            .map(|c| c.components.iter().map(|(kind, d)| (kind.clone(), count_components(d))).collect());
        let offered = a.desired.connection_settings.as_ref();
        let reported_settings = report.connection_settings_status.as_deref();
        let connection = (offered.is_some() || reported_settings.is_some()).then(|| ConnectionState {
            desired_hash: offered.map(|o| hex::encode(&o.hash)),
            heartbeat_interval_seconds: offered
                .and_then(|o| o.opamp.as_ref())
                .map(|o| o.heartbeat_interval_seconds),
            reported: Reported {
                reported_hash: reported_settings.map(|r| hex::encode(&r.last_connection_settings_hash)),
                reported_status: reported_settings
                    .map(|r| connection_settings_status_name(r.status).to_owned()),
                error_message: reported_settings.map(|r| r.error_message.clone()).unwrap_or_default(),
            },
        });
        let uid = a.uid.to_string();
        Agent {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            metadata: Metadata {
                name: uid.clone(),
                namespace: a.namespace.to_string(),
                uid,
                resource_version: micros(a.changed).to_string(),
                labels,
            },
            status: AgentStatus {
                connected: a.connected,
                transport: a.transport.map(|t| t.as_str().to_owned()),
                service_name: attribute("service.name"),
                service_version: attribute("service.version"),
                identifying_attributes: identifying,
                non_identifying_attributes: non_identifying,
                capabilities: capability_names(report.capabilities),
                healthy: report.health.as_ref().map(|h| h.healthy),
                health,
                config: ConfigState {
                    status,
                    selected_by,
                    desired_hash,
                    desired_files,
                    reported: Reported { reported_hash, reported_status, error_message: config_error },
                },
                connection,
                effective_config,
                available_components,
                custom_capabilities: report
                    .custom_capabilities
                    .as_ref()
                    .map(|c| c.capabilities.clone())
                    .unwrap_or_default(),
                last_error,
                report_trimmed: report.trimmed.part_names().into_iter().map(str::to_owned).collect(),
                last_seen: Timestamp::try_from(a.last_seen).map(|t| t.to_string()).unwrap_or_default(),
            },
        }
    }

    /// A digest of what users see of the agent, but for `lastSeen` and the resource version:
    /// it changes when something a watch reports does.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut status = serde_json::to_value(&self.status).expect("JSON serializes into memory");
        if let Some(map) = status.as_object_mut() {
            map.remove("lastSeen");
        }
        h.update(serde_json::to_vec(&(&self.metadata.labels, status)).expect("JSON serializes into memory"));
        h.finalize().into()
    }

    /// `lastSeen` in milliseconds since the epoch (0 if unreadable).
    pub fn last_seen_millis(&self) -> i64 {
        self.status.last_seen.parse::<Timestamp>().map_or(0, |t| t.as_millisecond())
    }

    /// The value of a field selector's field, or `None` for a field that cannot be selected on.
    pub fn field(&self, name: &str) -> Option<String> {
        let bool_str = |b: bool| b.to_string();
        Some(match name {
            "metadata.name" => self.metadata.name.clone(),
            "metadata.namespace" => self.metadata.namespace.clone(),
            "status.connected" => bool_str(self.status.connected),
            "status.healthy" => self.status.healthy.map(bool_str).unwrap_or_default(),
            "status.configStatus" | "status.config.status" => self.status.config.status.clone(),
            "status.transport" => self.status.transport.clone().unwrap_or_default(),
            "status.serviceName" => self.status.service_name.clone().unwrap_or_default(),
            _ => return None,
        })
    }
}

/// The fields [`Agent::field`] selects on.
pub const SELECTABLE_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "status.connected",
    "status.healthy",
    "status.configStatus",
    "status.transport",
    "status.serviceName",
];

/// `APPLIED` when the agent runs what is desired; else its own status for the desired config,
/// or `PENDING` while it has not reported on it.
fn config_status(desired: Option<&str>, reported: Option<&str>, reported_status: Option<&str>) -> String {
    match (desired, reported) {
        (Some(d), Some(r)) if d == r => reported_status.unwrap_or("PENDING").to_owned(),
        (Some(_), _) => match reported_status {
            // A failure or an apply in progress is of the config it was offered last, which
            // the report's hash names only once applied.
            Some(s @ ("FAILED" | "APPLYING")) => s.to_owned(),
            _ => "PENDING".to_owned(),
        },
        (None, Some(_)) => reported_status.unwrap_or_default().to_owned(),
        (None, None) => String::new(),
    }
}

/// A `RemoteConfigStatus.status` as users read it: `APPLIED`, `APPLYING`, `FAILED`, `UNSET`
/// (`UNKNOWN` for a value the protocol does not define).
pub fn remote_config_status_name(status: i32) -> &'static str {
    RemoteConfigStatuses::try_from(status)
        .map(|x| x.as_str_name().trim_start_matches("RemoteConfigStatuses_"))
        .unwrap_or("UNKNOWN")
}

fn connection_settings_status_name(status: i32) -> &'static str {
    ConnectionSettingsStatuses::try_from(status)
        .map(|x| x.as_str_name().trim_start_matches("ConnectionSettingsStatuses_"))
        .unwrap_or("UNKNOWN")
}

fn health(h: &ComponentHealth) -> Health {
    let mut components = BTreeMap::new();
    let mut omitted = 0u32;
    flatten_health("", &h.component_health_map, &mut components, &mut omitted, 0);
    Health {
        healthy: h.healthy,
        status: h.status.clone(),
        last_error: h.last_error.clone(),
        start_time: rfc3339_nanos(h.start_time_unix_nano),
        components,
        components_omitted: omitted,
    }
}

/// Components depth-first, named by their path (`pipeline:traces/receiver:otlp`), at most
/// [`MAX_HEALTH_COMPONENTS`] and eight levels deep.
fn flatten_health(
    prefix: &str,
    map: &BTreeMap<String, ComponentHealth>,
    out: &mut BTreeMap<String, ComponentState>,
    omitted: &mut u32,
    depth: usize,
) {
    for (name, c) in map {
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        if out.len() >= MAX_HEALTH_COMPONENTS || depth >= 8 {
            *omitted = omitted.saturating_add(1);
        } else {
            let state = ComponentState {
                healthy: c.healthy,
                status: c.status.clone(),
                last_error: c.last_error.clone(),
            };
            out.insert(path.clone(), state);
        }
        if depth < 8 {
            flatten_health(&path, &c.component_health_map, out, omitted, depth + 1);
        }
    }
}

/// The components under one kind (its sub-components, or 1 for a leaf), bounded in depth.
fn count_components(d: &ComponentDetails) -> u32 {
    fn count(d: &ComponentDetails, depth: usize) -> u32 {
        if d.sub_component_map.is_empty() || depth >= 8 {
            return 1;
        }
        d.sub_component_map.values().map(|s| count(s, depth + 1)).fold(0u32, u32::saturating_add)
    }
    if d.sub_component_map.is_empty() { 0 } else { count(d, 0) }
}

fn capability_names(bits: u64) -> Vec<String> {
    (0..64)
        .map(|i| 1u64 << i)
        .filter(|bit| bits & bit != 0)
        .filter_map(|bit| i32::try_from(bit).ok().and_then(|b| AgentCapabilities::try_from(b).ok()))
        .map(|c| c.as_str_name().trim_start_matches("AgentCapabilities_").to_owned())
        .collect()
}

/// A valid label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A valid label value: empty, or at most 63 alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for ok in ["service.name", "host.name", "example.com/team", "a", "k8s.pod.name"] {
            assert!(valid_label_key(ok), "{ok}");
        }
        for bad in ["", "/x", "Example.com/x", "a b", "-a", &"x".repeat(64), "a/b/c"] {
            assert!(!valid_label_key(bad), "{bad}");
        }
        for ok in ["", "checkout", "1.2.3", "a_b-c"] {
            assert!(valid_label_value(ok), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "ü", &"x".repeat(64)] {
            assert!(!valid_label_value(bad), "{bad}");
        }
    }

    #[test]
    fn config_status_says_whether_the_agent_runs_what_is_desired() {
        assert_eq!(config_status(Some("a"), Some("a"), Some("APPLIED")), "APPLIED");
        assert_eq!(config_status(Some("a"), Some("b"), Some("APPLIED")), "PENDING");
        assert_eq!(config_status(Some("a"), None, None), "PENDING");
        assert_eq!(config_status(Some("a"), Some("b"), Some("FAILED")), "FAILED");
        assert_eq!(config_status(Some("a"), Some("a"), Some("APPLYING")), "APPLYING");
        assert_eq!(config_status(None, None, None), "");
        assert_eq!(config_status(None, Some("b"), Some("APPLIED")), "APPLIED");
    }

    #[test]
    fn capabilities_are_named() {
        let bits = AgentCapabilities::ReportsStatus as u64 | AgentCapabilities::AcceptsRemoteConfig as u64;
        assert_eq!(capability_names(bits), ["ReportsStatus", "AcceptsRemoteConfig"]);
    }

    #[test]
    fn health_components_are_flattened_and_bounded() {
        let leaf = |healthy| ComponentHealth { healthy, ..Default::default() };
        let mut pipeline = ComponentHealth { healthy: false, ..Default::default() };
        pipeline.component_health_map.insert("receiver:otlp".into(), leaf(false));
        let mut top = ComponentHealth { healthy: false, last_error: "boom".into(), ..Default::default() };
        top.component_health_map.insert("pipeline:traces".into(), pipeline);
        for i in 0..150 {
            top.component_health_map.insert(format!("x{i:03}"), leaf(true));
        }
        let h = health(&top);
        assert_eq!(h.components.len(), MAX_HEALTH_COMPONENTS);
        assert_eq!(h.components_omitted, 52);
        assert!(!h.components["pipeline:traces/receiver:otlp"].healthy);
    }
}
