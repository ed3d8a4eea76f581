//! What simulated agents report about themselves: the light default (a few attributes, a one-line
//! config), or what a real collector reports, from a capture of the collector the tests build
//! (`tests/bench/capture-collector` writes `capture/otelcol.binpb`).
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message as _;

use super::AgentSpec;
use crate::proto::{
    AgentConfigFile, AgentConfigMap, AgentDescription, AgentToServer, AnyValue, AvailableComponents,
    KeyValue, any_value,
};
use crate::protocol::{Description, Uid, attribute};

/// The captured report of `otelcol-opamp-test` under `opampsupervisor` (one `AgentToServer`).
pub static COLLECTOR_CAPTURE: &[u8] = include_bytes!("capture/otelcol.binpb");

/// The effective-config variants of the collector payload (agent `i` runs variant `i % 4`).
pub const CONFIG_VARIANTS: usize = 4;

/// What the simulated agents report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Payload {
    /// Four attributes and a one-line effective config (the benchmark's original agents).
    #[default]
    Light,
    /// What the captured collector reports: its description (with per-agent host and instance
    /// values), one of [`CONFIG_VARIANTS`] effective configs derived from its own, its health,
    /// capabilities and AvailableComponents.
    Collector,
}

impl std::str::FromStr for Payload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "light" => Ok(Payload::Light),
            "collector" => Ok(Payload::Collector),
            other => Err(format!("unknown payload {other:?} (light or collector)")),
        }
    }
}

impl Payload {
    /// The spec of agent `i` of a fleet.
    pub fn spec(self, i: usize) -> AgentSpec {
        match self {
            Payload::Light => {
                let mut spec = AgentSpec::new(&format!("sim-{}", i % 100));
                spec.non_identifying.push(("host.name".into(), format!("sim-host-{i}")));
                spec.non_identifying
                    .push(("deployment.environment".into(), ["prod", "staging"][i % 2].into()));
                spec
            }
            Payload::Collector => CollectorPayload::get().spec(i),
        }
    }
}

/// The collector capture, decoded once, with its config variants.
#[derive(Debug)]
pub struct CollectorPayload {
    capture: AgentToServer,
    variants: Vec<AgentConfigMap>,
    components: Arc<AvailableComponents>,
}

/// Encoded sizes of the collector payload, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadSizes {
    pub description: usize,
    pub effective_config: usize,
    pub components: usize,
    /// The first message an agent sends (components by hash only).
    pub first_message: usize,
}

impl std::fmt::Display for PayloadSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "description {} B, effective config {} B, components {} B, first message {} B",
            self.description, self.effective_config, self.components, self.first_message
        )
    }
}

/// Settings the variants change, one per variant after the first (the captured config itself):
/// (path in the YAML document, value).
const VARIANT_SETTINGS: [(&[&str], &str); CONFIG_VARIANTS - 1] = [
    (&["service", "telemetry", "logs", "level"], "debug"),
    (&["service", "telemetry", "logs", "encoding"], "console"),
    (&["extensions", "opamp", "ppid_poll_interval"], "10s"),
];

impl CollectorPayload {
    /// The payload (decoded on first use).
    pub fn get() -> &'static CollectorPayload {
        static PAYLOAD: OnceLock<CollectorPayload> = OnceLock::new();
        PAYLOAD.get_or_init(|| Self::decode(COLLECTOR_CAPTURE).expect("the compiled-in capture decodes"))
    }

    /// Decodes a capture and derives its variants.
    pub fn decode(capture: &[u8]) -> Result<Self, String> {
        let capture = AgentToServer::decode(capture).map_err(|e| e.to_string())?;
        let config = capture
            .effective_config
            .as_ref()
            .and_then(|e| e.config_map.clone())
            .ok_or("the capture has no effective config")?;
        let components =
            capture.available_components.clone().ok_or("the capture has no AvailableComponents")?;
        if capture.agent_description.is_none() {
            return Err("the capture has no AgentDescription".into());
        }
        let mut variants = vec![config.clone()];
        for (path, value) in VARIANT_SETTINGS {
            variants.push(variant(&config, path, value)?);
        }
        Ok(Self { capture, variants, components: Arc::new(components) })
    }

    /// The effective config of variant `v` (`0..CONFIG_VARIANTS`).
    pub fn variant(&self, v: usize) -> &AgentConfigMap {
        &self.variants[v % CONFIG_VARIANTS]
    }

    /// The spec of agent `i`: the captured description with this agent's values, config
    /// variant `i % CONFIG_VARIANTS`, the captured components, health and capabilities.
    pub fn spec(&self, i: usize) -> AgentSpec {
        let uid = Uid::new_v7();
        let mut description = self.capture.agent_description.clone().unwrap_or_default();
        let unique = |key: &str, value: &mut AnyValue| {
            let v = match key {
                "service.instance.id" => uid.to_string(),
                "host.name" => format!("sim-host-{i}"),
                "host.id" => format!("{:032x}", i),
                "process.pid" => (1000 + i).to_string(),
                _ => return,
            };
            *value = AnyValue { value: Some(any_value::Value::StringValue(v)) };
        };
        for KeyValue { key, value } in description
            .identifying_attributes
            .iter_mut()
            .chain(description.non_identifying_attributes.iter_mut())
        {
            if let Some(value) = value {
                unique(key, value);
            }
        }
        AgentSpec {
            uid,
            capabilities: self.capture.capabilities,
            initial_config: Some(self.own_config(i, &description)),
            description: Some(description),
            components: Some(self.components.clone()),
            health: self.capture.health.clone(),
            fail_marker: None,
            ..AgentSpec::new("otelcol")
        }
    }

    /// Variant `i % CONFIG_VARIANTS` as agent `i`'s supervisor reports it: the supervisor writes
    /// the agent's own values into the collector's config (its instance uid, its parent's pid,
    /// the port of its local OpAMP server, and the resource attributes of its description), so
    /// in a real fleet no two agents report the same effective config.
    fn own_config(&self, i: usize, description: &AgentDescription) -> AgentConfigMap {
        let captured = self.capture.agent_description.as_ref();
        let value = |d: Option<&AgentDescription>, key: &str| {
            attribute(d.cloned().map(Description::new).as_ref(), key).map(Cow::into_owned)
        };
        let mut out = self.variant(i).clone();
        for file in out.config_map.values_mut() {
            let mut body = String::from_utf8_lossy(&file.body).into_owned();
            for key in ["service.instance.id", "host.name"] {
                if let (Some(from), Some(to)) = (value(captured, key), value(Some(description), key)) {
                    body = body.replace(&format!(": {from}\n"), &format!(": {to}\n"));
                }
            }
            let body: String = body
                .lines()
                .map(|line| {
                    let key = line.trim_start();
                    let indent = &line[..line.len() - key.len()];
                    if key.starts_with("ppid: ") {
                        format!("{indent}ppid: {}\n", 1000 + i)
                    } else if let Some(endpoint) = key.strip_prefix("endpoint: ws://127.0.0.1:") {
                        let path = endpoint.find('/').map_or("", |at| &endpoint[at..]);
                        format!("{indent}endpoint: ws://127.0.0.1:{}{path}\n", 20_000 + i % 40_000)
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            file.body = Bytes::from(body);
        }
        out
    }

    /// The encoded sizes of what agents report.
    pub fn sizes(&self) -> PayloadSizes {
        let mut agent = super::SimAgent::new(self.spec(0));
        PayloadSizes {
            description: self.capture.agent_description.as_ref().map_or(0, |d| d.encoded_len()),
            effective_config: self.capture.effective_config.as_ref().map_or(0, |e| e.encoded_len()),
            components: self.components.encoded_len(),
            first_message: agent.full_state().encoded_len(),
        }
    }
}

/// `config` with `path` set to `value` in each of its YAML files.
fn variant(config: &AgentConfigMap, path: &[&str], value: &str) -> Result<AgentConfigMap, String> {
    let mut out = config.clone();
    for file in out.config_map.values_mut() {
        let mut doc: serde_yaml::Value = serde_yaml::from_slice(&file.body).map_err(|e| e.to_string())?;
        set_path(&mut doc, path, value);
        let body = serde_yaml::to_string(&doc).map_err(|e| e.to_string())?;
        *file = AgentConfigFile { body: Bytes::from(body), content_type: file.content_type.clone() };
    }
    Ok(out)
}

/// Sets `path` in a YAML document to `value`, creating the mappings on the way.
fn set_path(doc: &mut serde_yaml::Value, path: &[&str], value: &str) {
    let mut node = doc;
    for key in path {
        if !node.is_mapping() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("a mapping");
        node = map.entry((*key).into()).or_insert(serde_yaml::Value::Null);
    }
    *node = value.into();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentDescription, ServerToAgent, ServerToAgentFlags};

    fn description_value(d: &AgentDescription, key: &str) -> Option<String> {
        Description::new(d.clone()).attribute(key).map(Cow::into_owned)
    }

    /// What the server keeps of these agents' effective configs: each one's own values, against
    /// a reference of its kind (`protocol::shared`).
    #[test]
    fn sim_collector_configs_keep_a_small_difference() {
        use crate::protocol::shared::{Configs, KeptConfig};
        use crate::sim::SimAgent;
        use std::sync::Arc;
        let configs = Configs::default();
        let mut held = Vec::new();
        // The first agent is kept whole, as a reference; so is the first of a variant unlike the
        // references so far. Every other agent is kept as a small difference.
        for i in 0..3 * CONFIG_VARIANTS {
            let reported = SimAgent::new(Payload::Collector.spec(i)).full_state().effective_config.unwrap();
            let kept = configs.keep(Arc::new(KeptConfig::new(&reported)));
            assert_eq!(kept.to_proto(), reported, "reads back as reported");
            println!(
                "sim collector agent {i}: raw {} B, kept {} B ({kept:?})",
                kept.encoded_len(),
                kept.kept_len()
            );
            let small = kept.is_delta() && kept.kept_len() < kept.encoded_len() / 8;
            assert!(small || (i < CONFIG_VARIANTS && !kept.is_delta()), "agent {i}: {kept:?}");
            held.push(kept);
        }
        assert!(configs.live_references() <= CONFIG_VARIANTS);
    }

    #[test]
    fn the_capture_decodes_with_everything_a_collector_reports() {
        let p = CollectorPayload::get();
        let sizes = p.sizes();
        assert!(sizes.description > 0 && sizes.effective_config > 0 && sizes.components > 0, "{sizes}");
        assert!(!p.components.components.is_empty() && !p.components.hash.is_empty());
    }

    #[test]
    fn the_config_variants_differ() {
        let p = CollectorPayload::get();
        let bodies: std::collections::BTreeSet<Vec<Bytes>> = (0..CONFIG_VARIANTS)
            .map(|v| p.variant(v).config_map.values().map(|f| f.body.clone()).collect())
            .collect();
        assert_eq!(bodies.len(), CONFIG_VARIANTS, "every variant is its own config");
    }

    #[test]
    fn each_agent_reports_its_own_values_in_its_effective_config_as_supervisors_do() {
        let p = CollectorPayload::get();
        let body = |spec: &AgentSpec| {
            let files = crate::sim::SimAgent::new(spec.clone()).effective_files();
            String::from_utf8(files.into_values().next().unwrap().to_vec()).unwrap()
        };
        // Agents 0 and 4 run the same variant, yet their configs differ in their own values only.
        let (a, b) = (p.spec(0), p.spec(4));
        let (ca, cb) = (body(&a), body(&b));
        assert_ne!(ca, cb);
        assert!(ca.contains(&format!("instance_uid: {}\n", a.uid)), "{ca}");
        assert!(ca.contains(&format!("service.instance.id: {}\n", a.uid)));
        assert!(ca.contains("host.name: sim-host-0\n") && cb.contains("host.name: sim-host-4\n"));
        assert!(ca.contains("ppid: 1000\n") && cb.contains("ppid: 1004\n"));
        assert!(ca.contains("endpoint: ws://127.0.0.1:20000/v1/opamp\n"), "{ca}");
        let differing = ca.lines().zip(cb.lines()).filter(|(x, y)| x != y).count();
        assert_eq!((ca.lines().count(), differing), (cb.lines().count(), 5), "{ca}\n---\n{cb}");
        // Agents 0 and 1 run different variants.
        assert!(ca.lines().zip(body(&p.spec(1)).lines()).filter(|(x, y)| x != y).count() > 5);
    }

    #[test]
    fn each_agent_has_its_own_host_and_instance_id() {
        let p = CollectorPayload::get();
        let (a, b) = (p.spec(1), p.spec(2));
        let (da, db) = (a.description.unwrap(), b.description.unwrap());
        assert_eq!(description_value(&da, "host.name").as_deref(), Some("sim-host-1"));
        assert_eq!(description_value(&db, "host.name").as_deref(), Some("sim-host-2"));
        assert_eq!(description_value(&da, "service.instance.id"), Some(a.uid.to_string()));
        assert_ne!(
            description_value(&da, "service.instance.id"),
            description_value(&db, "service.instance.id")
        );
        assert_eq!(description_value(&da, "service.name"), description_value(&db, "service.name"));
    }

    #[test]
    fn the_first_message_carries_the_components_hash_only_and_the_rest_in_full() {
        let p = CollectorPayload::get();
        let mut agent = crate::sim::SimAgent::new(p.spec(3));
        let first = agent.full_state();
        let components = first.available_components.as_ref().expect("components reported");
        assert!(components.components.is_empty(), "hash only");
        assert_eq!(components.hash, p.components.hash);
        assert!(first.agent_description.is_some() && first.health.is_some());
        let reported = first.effective_config.and_then(|e| e.config_map).expect("an effective config");
        assert_eq!(
            reported.config_map.keys().collect::<Vec<_>>(),
            p.variant(3).config_map.keys().collect::<Vec<_>>()
        );
        assert_eq!(first.capabilities, p.capture.capabilities);
    }

    #[test]
    fn components_are_sent_in_full_when_the_server_asks() {
        let p = CollectorPayload::get();
        let mut agent = crate::sim::SimAgent::new(p.spec(0));
        agent.full_state();
        let ask = ServerToAgent {
            flags: ServerToAgentFlags::ReportAvailableComponents as u64,
            ..Default::default()
        };
        let reply = agent.on_message(&ask).expect("the components are sent");
        assert_eq!(reply.available_components.as_ref(), Some(&*p.components));
        assert!(reply.agent_description.is_none(), "only what was asked for");
        // ReportFullState: everything, the components in full too.
        let full = ServerToAgent { flags: ServerToAgentFlags::ReportFullState as u64, ..Default::default() };
        let reply = agent.on_message(&full).expect("the full state is sent");
        assert!(reply.agent_description.is_some());
        assert_eq!(reply.available_components.as_ref(), Some(&*p.components));
        // Light agents report no components and are not asked.
        let mut light = crate::sim::SimAgent::new(Payload::Light.spec(0));
        assert!(light.full_state().available_components.is_none());
        assert!(light.on_message(&ask).is_none());
    }
}
