//! The controller's in-memory index: per namespace, the AgentConfigs with their files resolved
//! and the CapabilitySlots, and from them the desired state of any agent (pure given the
//! watched objects; no API calls).
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::error::Error;
use super::merge::{self, File, Source};
use super::rollout::Tracker;
use super::watch::Cache;
use crate::api::RolloutStrategy;
use crate::api::{AgentConfig, CapabilitySlot, ConfigFile, KeyRef};
use crate::fleet::DesiredState;
use crate::opamp::Uid;
use crate::proto::{AgentDescription, AgentRemoteConfig, CustomCapabilities, any_value};

/// An attribute of an agent's description, identifying or not, as a string.
pub fn attribute<'a>(desc: Option<&'a AgentDescription>, key: &str) -> Option<Cow<'a, str>> {
    let desc = desc?;
    let kv = desc
        .identifying_attributes
        .iter()
        .chain(&desc.non_identifying_attributes)
        .find(|kv| kv.key == key)?;
    Some(match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Cow::Borrowed(s.as_str()),
        any_value::Value::BoolValue(b) => Cow::Owned(b.to_string()),
        any_value::Value::IntValue(i) => Cow::Owned(i.to_string()),
        any_value::Value::DoubleValue(d) => Cow::Owned(d.to_string()),
        _ => return None,
    })
}

/// Every attribute of an agent's description (identifying and not) as a JSON object of
/// strings, as users see them in APIs and callbacks.
pub fn attributes_json(desc: Option<&AgentDescription>) -> serde_json::Map<String, serde_json::Value> {
    desc.into_iter()
        .flat_map(|d| d.identifying_attributes.iter().chain(&d.non_identifying_attributes))
        .filter_map(|kv| Some((kv.key.clone(), attribute(desc, &kv.key)?.into_owned().into())))
        .collect()
}

/// One AgentConfig as the controller sees it.
#[derive(Debug)]
pub struct ResolvedConfig {
    pub object: Arc<AgentConfig>,
    /// `None` while a referenced ConfigMap/Secret key is missing: nothing is sent for it.
    pub source: Option<Source>,
    /// What is missing, e.g. `ConfigMap "otel" has no key "collector.yaml"`.
    pub missing: Vec<String>,
    /// Hash of the files this resource contributes.
    pub own_hash: Option<[u8; 32]>,
}

impl ResolvedConfig {
    pub fn selects(&self, desc: Option<&AgentDescription>) -> bool {
        self.object.spec.selector.matches(|k| attribute(desc, k))
    }

    pub fn is_progressive(&self) -> bool {
        self.object.spec.rollout.strategy == RolloutStrategy::Progressive
    }

    /// Whether `uid` may be given this resource's current version: always for Immediate
    /// rollouts, once admitted by the rollout's tracker for Progressive ones.
    pub fn admits(&self, uid: &Uid, rollouts: &HashMap<String, Tracker>) -> bool {
        if !self.is_progressive() {
            return true;
        }
        let (Some(source), Some(hash)) = (&self.source, &self.own_hash) else { return false };
        rollouts.get(&source.key).is_some_and(|t| t.hash == *hash && t.admits(uid))
    }
}

/// The custom capabilities of one namespace, with the slot that owns each.
#[derive(Debug, Default)]
pub struct ResolvedSlots {
    /// Slots in ownership order (oldest first); a slot whose capability an older slot already
    /// claims is in `conflicting`.
    pub slots: Vec<Arc<CapabilitySlot>>,
    /// slot name → name of the older slot that owns its capability.
    pub conflicting: BTreeMap<String, String>,
}

/// Everything the controller knows of one namespace.
#[derive(Debug, Default)]
pub struct NamespaceIndex {
    /// Sorted by name.
    pub configs: Vec<ResolvedConfig>,
    pub slots: ResolvedSlots,
    /// Merged remote configs by the set of contributing configs, shared by every agent with
    /// the same selection.
    merged: Mutex<HashMap<Vec<usize>, Arc<AgentRemoteConfig>>>,
    capabilities: Mutex<HashMap<Vec<usize>, Arc<CustomCapabilities>>>,
}

/// The hash of an empty file set: what an agent that no AgentConfig selects any more is
/// sent, so that it drops the config it got from us.
pub fn empty_config() -> Arc<AgentRemoteConfig> {
    Arc::new(merge::remote_config(&merge::merge(&[])))
}

impl NamespaceIndex {
    /// Resolves a namespace's objects against the ConfigMaps and Secrets they reference.
    pub fn resolve(
        mut configs: Vec<Arc<AgentConfig>>,
        mut slots: Vec<Arc<CapabilitySlot>>,
        config_maps: &Cache<ConfigMap>,
        secrets: &Cache<Secret>,
    ) -> Self {
        configs.sort_by_key(|c| c.name_any());
        let configs =
            configs.into_iter().map(|object| resolve_config(object, config_maps, secrets)).collect();
        slots.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .cmp(&b.metadata.creation_timestamp)
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let mut owners: BTreeMap<&str, String> = BTreeMap::new();
        let mut conflicting = BTreeMap::new();
        for slot in &slots {
            match owners.get(slot.spec.capability.as_str()) {
                Some(owner) => {
                    conflicting.insert(slot.name_any(), owner.clone());
                }
                None => {
                    owners.insert(&slot.spec.capability, slot.name_any());
                }
            }
        }
        let slots = ResolvedSlots { slots: slots.clone(), conflicting };
        Self { configs, slots, merged: Mutex::default(), capabilities: Mutex::default() }
    }

    /// Indices of the resolved configs selecting an agent.
    pub fn selecting(&self, desc: Option<&AgentDescription>) -> Vec<usize> {
        (0..self.configs.len())
            .filter(|&i| self.configs[i].source.is_some() && self.configs[i].selects(desc))
            .collect()
    }

    /// The desired state of an agent, or `None` to leave it as it is (a progressive rollout
    /// has not admitted it yet). `has_remote_config` says whether the agent runs a remote config
    /// now (then an agent no longer selected is sent the empty config, releasing it).
    pub fn desired(
        &self,
        uid: &Uid,
        desc: Option<&AgentDescription>,
        has_remote_config: bool,
        rollouts: &HashMap<String, Tracker>,
    ) -> Option<DesiredState> {
        let selected = self.selecting(desc);
        if selected.iter().any(|&i| !self.configs[i].admits(uid, rollouts)) {
            return None;
        }
        Some(self.desired_ungated(selected, desc, has_remote_config))
    }

    /// The desired state with every selecting resource at its current version.
    pub fn desired_ungated(
        &self,
        selected: Vec<usize>,
        desc: Option<&AgentDescription>,
        has_remote_config: bool,
    ) -> DesiredState {
        let remote_config = if selected.is_empty() {
            has_remote_config.then(empty_config)
        } else {
            let mut cache = self.merged.lock().unwrap();
            Some(
                cache
                    .entry(selected.clone())
                    .or_insert_with(|| {
                        let sources: Vec<&Source> =
                            selected.iter().filter_map(|&i| self.configs[i].source.as_ref()).collect();
                        Arc::new(merge::remote_config(&merge::merge(&sources)))
                    })
                    .clone(),
            )
        };
        DesiredState { remote_config, custom_capabilities: self.custom_capabilities(desc) }
    }

    fn custom_capabilities(&self, desc: Option<&AgentDescription>) -> Option<Arc<CustomCapabilities>> {
        let owning: Vec<usize> = (0..self.slots.slots.len())
            .filter(|&i| {
                let slot = &self.slots.slots[i];
                !self.slots.conflicting.contains_key(&slot.name_any())
                    && slot.spec.selector.matches(|k| attribute(desc, k))
            })
            .collect();
        if owning.is_empty() {
            return None;
        }
        let mut cache = self.capabilities.lock().unwrap();
        let caps = cache.entry(owning.clone()).or_insert_with(|| {
            let mut capabilities: Vec<String> =
                owning.iter().map(|&i| self.slots.slots[i].spec.capability.clone()).collect();
            capabilities.sort();
            capabilities.dedup();
            Arc::new(CustomCapabilities { capabilities })
        });
        Some(caps.clone())
    }

    /// For each config, the (file, winner) pairs it lost among agents selecting both; computed
    /// over the distinct selections seen in `selections`.
    pub fn conflicts<'a>(
        &self,
        selections: impl IntoIterator<Item = &'a Vec<usize>>,
    ) -> BTreeMap<usize, BTreeMap<String, String>> {
        let mut out: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
        for selected in selections {
            let sources: Vec<&Source> =
                selected.iter().filter_map(|&i| self.configs[i].source.as_ref()).collect();
            for (loser, file, winner) in merge::merge(&sources).conflicts {
                out.entry(selected[loser]).or_default().insert(file, sources[winner].key.clone());
            }
        }
        out
    }
}

/// The route of a slot, with its Secrets read.
pub fn slot_route(slot: &CapabilitySlot, secrets: &Cache<Secret>) -> crate::routes::SlotRoute {
    use std::time::Duration;
    let ns = slot.namespace().unwrap_or_default();
    let secret = |r: &KeyRef| -> Result<Vec<u8>, String> {
        let s = secrets.get(&ObjectRef::new(&r.name).within(&ns));
        let value = s.map(|s| s.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone()));
        lookup("Secret", r, value).map_err(|e| e.to_string())
    };
    crate::routes::SlotRoute {
        namespace: ns.clone(),
        name: slot.name_any(),
        capability: slot.spec.capability.clone(),
        selector: slot.spec.selector.clone(),
        message_types: slot.spec.message_types.clone(),
        callback: slot.spec.callback.as_ref().map(|c| crate::routes::CallbackRoute {
            url: c.url.clone(),
            timeout: Duration::from_secs(u64::from(c.timeout_seconds)),
            max_attempts: c.max_attempts,
            signing_key: c.signing_secret_ref.as_ref().map(&secret),
        }),
        dispatch: slot.spec.dispatch.as_ref().map(|d| crate::routes::DispatchRoute {
            token: secret(&d.token_secret_ref),
            queue_limit: d.queue_limit as usize,
            ttl: Duration::from_secs(u64::from(d.ttl_seconds)),
        }),
    }
}

fn resolve_config(
    object: Arc<AgentConfig>,
    config_maps: &Cache<ConfigMap>,
    secrets: &Cache<Secret>,
) -> ResolvedConfig {
    let ns = object.namespace().unwrap_or_default();
    let mut files = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, file) in &object.spec.files {
        match read_file(&ns, file, config_maps, secrets) {
            Ok(body) => {
                let content_type = file.content_type.clone().unwrap_or_default();
                files.insert(name.clone(), File { content_type, body });
            }
            Err(what) => missing.push(what),
        }
    }
    let own_hash = missing.is_empty().then(|| merge::hash_files(files.iter()));
    let source = missing.is_empty().then(|| Source {
        key: format!("{ns}/{}", object.name_any()),
        priority: object.spec.priority,
        files: Arc::new(files),
    });
    ResolvedConfig { object, source, missing, own_hash }
}

fn read_file(
    ns: &str,
    file: &ConfigFile,
    config_maps: &Cache<ConfigMap>,
    secrets: &Cache<Secret>,
) -> Result<bytes::Bytes, String> {
    if let Some(inline) = &file.inline {
        return Ok(bytes::Bytes::from(inline.clone()));
    }
    if let Some(r) = &file.config_map_key_ref {
        let cm = config_maps.get(&ObjectRef::new(&r.name).within(ns));
        let value = cm.map(|cm| {
            cm.data.as_ref().and_then(|d| d.get(&r.key)).map(|s| bytes::Bytes::from(s.clone())).or_else(
                || {
                    cm.binary_data
                        .as_ref()
                        .and_then(|d| d.get(&r.key))
                        .map(|b| bytes::Bytes::from(b.0.clone()))
                },
            )
        });
        return lookup("ConfigMap", r, value).map_err(|e| e.to_string());
    }
    if let Some(r) = &file.secret_key_ref {
        let secret = secrets.get(&ObjectRef::new(&r.name).within(ns));
        let value = secret
            .map(|s| s.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| bytes::Bytes::from(b.0.clone())));
        return lookup("Secret", r, value).map_err(|e| e.to_string());
    }
    Err("no source set".into())
}

/// A referenced key's value: `found` is `None` without the object, `Some(None)` without the key.
fn lookup<T>(kind: &'static str, r: &KeyRef, found: Option<Option<T>>) -> Result<T, Error> {
    let missing = |key| Error::Reference { kind, name: r.name.clone(), key };
    found.ok_or_else(|| missing(None))?.ok_or_else(|| missing(Some(r.key.clone())))
}
