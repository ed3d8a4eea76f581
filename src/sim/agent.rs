//! The behaviour of a simple agent, transport-agnostic: it builds the messages an agent sends
//! and reacts to what the server sends, as a well-behaved OpAMP client does.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::proto::{
    AgentCapabilities, AgentConfigMap, AgentDescription, AgentToServer, AnyValue, AvailableComponents,
    ComponentHealth, CustomCapabilities, EffectiveConfig, KeyValue, RemoteConfigStatus, RemoteConfigStatuses,
    ServerToAgent, ServerToAgentFlags, any_value,
};
use crate::protocol::Uid;

/// What an agent is.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub uid: Uid,
    pub identifying: Vec<(String, String)>,
    pub non_identifying: Vec<(String, String)>,
    pub capabilities: u64,
    pub custom_capabilities: Vec<String>,
    /// A remote config containing this string is reported FAILED (an empty one: every config).
    pub fail_marker: Option<String>,
    /// The description reported instead of one made of `identifying`/`non_identifying`.
    pub description: Option<AgentDescription>,
    /// The effective config before any remote config (default: one small `agent.yaml`).
    pub initial_config: Option<AgentConfigMap>,
    /// The AvailableComponents reported (by hash first, in full when the server asks), shared
    /// by the agents of one build.
    pub components: Option<Arc<AvailableComponents>>,
    /// The health reported while healthy (default: `ok`).
    pub health: Option<ComponentHealth>,
}

impl AgentSpec {
    pub fn new(service: &str) -> Self {
        Self {
            uid: Uid::new_v7(),
            identifying: vec![("service.name".into(), service.into())],
            non_identifying: vec![("os.type".into(), "linux".into())],
            capabilities: [
                AgentCapabilities::ReportsStatus,
                AgentCapabilities::AcceptsRemoteConfig,
                AgentCapabilities::ReportsEffectiveConfig,
                AgentCapabilities::ReportsRemoteConfig,
                AgentCapabilities::ReportsHealth,
                AgentCapabilities::ReportsHeartbeat,
            ]
            .iter()
            .fold(0, |acc, c| acc | *c as u64),
            custom_capabilities: Vec::new(),
            fail_marker: Some("FAIL_ME".into()),
            description: None,
            initial_config: None,
            components: None,
            health: None,
        }
    }
}

/// A running agent's protocol state.
#[derive(Debug)]
pub struct SimAgent {
    pub spec: AgentSpec,
    seq: u64,
    effective: AgentConfigMap,
    status: Option<RemoteConfigStatus>,
    /// Remote configs received (including any duplicates of an applied one).
    pub configs_received: usize,
    /// Remote configs received whose hash was already applied.
    pub duplicate_configs: usize,
    /// Custom messages received, in order (the first [`MAX_KEPT_MESSAGES`]).
    pub custom_messages: Vec<crate::proto::CustomMessage>,
    pub healthy: bool,
    /// Times the server told the agent to wait before trying again (a refused upgrade or poll
    /// with `Retry-After`, an `UNAVAILABLE` error with `RetryInfo`).
    pub retries_advised: usize,
    /// The last wait the server asked for, until taken ([`SimAgent::take_retry_advice`]).
    retry_advice: Option<Duration>,
}

/// Custom messages a simulated agent keeps.
pub const MAX_KEPT_MESSAGES: usize = 100;

fn kv(pairs: &[(String, String)]) -> Vec<KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.clone())) }),
        })
        .collect()
}

impl SimAgent {
    pub fn new(spec: AgentSpec) -> Self {
        let effective = spec.initial_config.clone().unwrap_or_else(|| {
            let mut effective = AgentConfigMap::default();
            effective.config_map.insert(
                "agent.yaml".into(),
                crate::proto::AgentConfigFile {
                    body: Bytes::from_static(b"initial: true\n"),
                    content_type: "text/yaml".into(),
                },
            );
            effective
        });
        Self {
            spec,
            seq: 0,
            effective,
            status: None,
            configs_received: 0,
            duplicate_configs: 0,
            custom_messages: Vec::new(),
            healthy: true,
            retries_advised: 0,
            retry_advice: None,
        }
    }

    pub fn uid(&self) -> Uid {
        self.spec.uid
    }

    pub fn remote_config_status(&self) -> Option<&RemoteConfigStatus> {
        self.status.as_ref()
    }

    pub fn effective_files(&self) -> BTreeMap<String, Bytes> {
        self.effective.config_map.iter().map(|(k, v)| (k.clone(), v.body.clone())).collect()
    }

    fn base(&mut self) -> AgentToServer {
        let msg = AgentToServer {
            instance_uid: self.spec.uid.to_wire(),
            sequence_num: self.seq,
            capabilities: self.spec.capabilities,
            ..Default::default()
        };
        self.seq += 1;
        msg
    }

    /// A message carrying the agent's whole state, as the first one on a connection: the
    /// AvailableComponents by their hash only (as opamp-go's client sends them).
    pub fn full_state(&mut self) -> AgentToServer {
        let mut msg = self.base();
        msg.agent_description = Some(self.spec.description.clone().unwrap_or_else(|| AgentDescription {
            identifying_attributes: kv(&self.spec.identifying),
            non_identifying_attributes: kv(&self.spec.non_identifying),
        }));
        msg.available_components = self
            .spec
            .components
            .as_ref()
            .map(|c| AvailableComponents { components: Default::default(), hash: c.hash.clone() });
        msg.health = Some(self.health());
        msg.effective_config = Some(EffectiveConfig { config_map: Some(self.effective.clone()) });
        msg.remote_config_status = self.status.clone();
        if !self.spec.custom_capabilities.is_empty() {
            msg.custom_capabilities =
                Some(CustomCapabilities { capabilities: self.spec.custom_capabilities.clone() });
        }
        msg
    }

    /// A heartbeat: nothing changed.
    pub fn heartbeat(&mut self) -> AgentToServer {
        self.base()
    }

    /// The AvailableComponents in full (when the agent reports any).
    fn all_components(&self) -> Option<AvailableComponents> {
        self.spec.components.as_deref().cloned()
    }

    fn health(&self) -> ComponentHealth {
        if let Some(h) = self.spec.health.as_ref().filter(|_| self.healthy) {
            return h.clone();
        }
        ComponentHealth {
            healthy: self.healthy,
            status: if self.healthy { "ok" } else { "degraded" }.into(),
            ..Default::default()
        }
    }

    /// Notes that the server asked the agent to wait `wait` before trying again.
    pub fn told_to_wait(&mut self, wait: Duration) {
        self.retries_advised += 1;
        self.retry_advice = Some(wait);
    }

    /// The wait the server asked for since the last call, if it did.
    pub fn take_retry_advice(&mut self) -> Option<Duration> {
        self.retry_advice.take()
    }

    /// Reacts to a server message; returns what the agent sends in response, if anything. An
    /// `UNAVAILABLE` error with `RetryInfo` is noted ([`SimAgent::take_retry_advice`]) and
    /// answered with nothing. `ReportFullState` is answered with everything, the components in
    /// full; `ReportAvailableComponents` with the components.
    pub fn on_message(&mut self, msg: &ServerToAgent) -> Option<AgentToServer> {
        if let Some(wait) = super::client::retry_info(msg) {
            self.told_to_wait(wait);
            return None;
        }
        if let Some(id) = &msg.agent_identification {
            if let Some(uid) = Uid::from_wire(&id.new_instance_uid) {
                self.spec.uid = uid;
            }
        }
        if let Some(m) = &msg.custom_message
            && self.custom_messages.len() < MAX_KEPT_MESSAGES
        {
            self.custom_messages.push(m.clone());
        }
        if msg.flags & ServerToAgentFlags::ReportFullState as u64 != 0 {
            // Apply a config that came with the flag first, then report everything.
            if let Some(rc) = &msg.remote_config {
                self.apply(rc);
            }
            let mut out = self.full_state();
            out.available_components = self.all_components();
            return Some(out);
        }
        let wants_components = msg.flags & ServerToAgentFlags::ReportAvailableComponents as u64 != 0
            && self.spec.components.is_some();
        let applied = msg.remote_config.as_ref().is_some_and(|rc| self.apply(rc));
        if !applied && !wants_components {
            return None;
        }
        let mut out = self.base();
        if applied {
            out.remote_config_status = self.status.clone();
            out.effective_config = Some(EffectiveConfig { config_map: Some(self.effective.clone()) });
        }
        if wants_components {
            out.available_components = self.all_components();
        }
        Some(out)
    }

    /// Applies a remote config; false when it was a duplicate of the applied one.
    fn apply(&mut self, rc: &crate::proto::AgentRemoteConfig) -> bool {
        self.configs_received += 1;
        if self.status.as_ref().is_some_and(|s| s.last_remote_config_hash == rc.config_hash) {
            self.duplicate_configs += 1;
            return false;
        }
        let files = rc.config.clone().unwrap_or_default();
        let contains = |marker: &str| {
            marker.is_empty()
                || files
                    .config_map
                    .values()
                    .any(|f| f.body.windows(marker.len()).any(|w| w == marker.as_bytes()))
        };
        let failed = self.spec.fail_marker.as_deref().filter(|m| contains(m)).map(|marker| match marker {
            "" => "config rejected (simulated failure)".to_owned(),
            m => format!("config rejected: contains {m}"),
        });
        self.status = Some(RemoteConfigStatus {
            last_remote_config_hash: rc.config_hash.clone(),
            status: if failed.is_some() {
                RemoteConfigStatuses::Failed
            } else {
                RemoteConfigStatuses::Applied
            } as i32,
            error_message: failed.clone().unwrap_or_default(),
        });
        if failed.is_none() {
            self.effective = files;
        }
        true
    }
}
