//! The control loop: watches AgentConfigs, CapabilitySlots, ConfigMaps and Secrets into
//! reflector caches, turns them into each agent's desired state in the fleet, and writes what
//! the fleet did back into the resources' status.
//!
//! The unit of work is the namespace: an agent's config is the merge of every AgentConfig of
//! its namespace that selects it, so any change there (a resource, a referenced ConfigMap or
//! Secret) re-plans the namespace: resolve, then recompute the desired state of its agents.
//! Status is recomputed for namespaces whose agents or objects changed, at most once a second.
pub mod auth;
pub mod error;
pub mod index;
pub mod leader;
pub mod merge;
pub mod rollout;
pub mod status;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::auth::TokenAuthenticator;
use self::error::{Error, Errors};
use self::index::NamespaceIndex;
use self::rollout::{Rollouts, Tracker};
use self::status::NamespaceStatus;
use self::watch::Cache;
use crate::api::{
    AGENT_TOKEN_SECRET_TYPE, AgentConfig, AgentConfigStatus, CapabilitySlot, CapabilitySlotStatus,
};
use crate::fleet::{AgentKey, Changes, DesiredState, DesiredStateProvider, Fleet};
use crate::metrics::{Metrics, StateLabel};
use crate::opamp::Uid;
use crate::proto::AgentDescription;
use crate::routes::Routes;

pub const FIELD_MANAGER: &str = "opamp-operator";
/// How often a namespace at its agent limit is told so again (an Event).
const REFUSALS_EVERY: Duration = Duration::from_secs(60);
/// A status patch that takes longer is given up (the next change of the object retries it).
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

type SharedIndex = Arc<RwLock<HashMap<String, Arc<NamespaceIndex>>>>;

/// Namespaces with something new, coalesced.
#[derive(Default)]
struct Dirty {
    namespaces: Mutex<HashSet<String>>,
    all: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Dirty {
    fn mark(&self, ns: Option<String>) {
        if let Some(ns) = ns {
            self.namespaces.lock().unwrap().insert(ns);
            self.notify.notify_one();
        }
    }

    fn mark_all(&self) {
        self.all.store(true, std::sync::atomic::Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// The desired state of a connecting agent, from the index (called by the fleet).
struct Provider {
    index: SharedIndex,
    rollouts: Rollouts,
}

impl DesiredStateProvider for Provider {
    fn desired_state(
        &self,
        agent: &AgentKey,
        desc: Option<&AgentDescription>,
        has_rc: bool,
    ) -> Option<DesiredState> {
        let idx = self.index.read().unwrap().get(&*agent.namespace).cloned()?;
        let rollouts = self.rollouts.lock().unwrap();
        idx.desired(&agent.uid, desc, has_rc, &rollouts)
    }
}

/// The caches of watched objects (see [`watch`]).
#[derive(Clone)]
struct Stores {
    agent_configs: Cache<AgentConfig>,
    slots: Cache<CapabilitySlot>,
    config_maps: Cache<ConfigMap>,
    secrets: Cache<Secret>,
}

pub struct Controller {
    client: Client,
    fleet: Fleet,
    metrics: Arc<Metrics>,
    routes: Arc<Routes>,
    auth: Arc<TokenAuthenticator>,
    index: SharedIndex,
    rollouts: Rollouts,
    dirty: Arc<Dirty>,
    /// Counts and tells errors; records the controller's Events.
    errors: Errors,
    /// Agents by namespace, maintained from the fleet's changes.
    agents: HashMap<Arc<str>, HashSet<Uid>>,
    status_dirty: HashSet<String>,
    /// When each namespace was last told (an Event) that it refused agents at its limit.
    refusals_told: HashMap<Arc<str>, tokio::time::Instant>,
    failure_since: HashMap<String, HashMap<(Uid, Bytes), Time>>,
    scope: Scope,
    /// Only the leader writes status and events (always true without leader election).
    leader: tokio::sync::watch::Receiver<bool>,
}

/// The namespaces an operator manages (all by default).
#[derive(Debug, Clone, Default)]
pub struct Scope(Option<Arc<HashSet<String>>>);

impl Scope {
    pub fn only(namespaces: impl IntoIterator<Item = String>) -> Self {
        Self(Some(Arc::new(namespaces.into_iter().collect())))
    }

    pub fn contains(&self, namespace: &str) -> bool {
        self.0.as_ref().is_none_or(|set| set.contains(namespace))
    }

    /// `None`: every namespace.
    pub fn namespaces(&self) -> Option<&HashSet<String>> {
        self.0.as_deref()
    }

    fn secrets(&self, all: Vec<Arc<Secret>>) -> Vec<Arc<Secret>> {
        all.into_iter().filter(|s| self.contains(s.namespace().as_deref().unwrap_or_default())).collect()
    }
}

impl Controller {
    pub fn new(
        client: Client,
        fleet: Fleet,
        auth: Arc<TokenAuthenticator>,
        routes: Arc<Routes>,
        scope: Scope,
        metrics: Arc<Metrics>,
    ) -> Self {
        let index: SharedIndex = Arc::default();
        let rollouts: Rollouts = Arc::default();
        fleet.set_desired_state_provider(Arc::new(Provider {
            index: index.clone(),
            rollouts: rollouts.clone(),
        }));
        let reporter =
            Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            errors: Errors::new(metrics.clone(), Recorder::new(client.clone(), reporter)),
            client,
            fleet,
            metrics,
            routes,
            auth,
            index,
            rollouts,
            dirty: Arc::default(),
            agents: HashMap::new(),
            status_dirty: HashSet::new(),
            refusals_told: HashMap::new(),
            failure_since: HashMap::new(),
            scope,
            leader: tokio::sync::watch::channel(true).1,
        }
    }

    /// Writes status only while `leader` says so (see [`leader::run`]).
    pub fn with_leadership(mut self, leader: tokio::sync::watch::Receiver<bool>) -> Self {
        self.leader = leader;
        self
    }

    /// Runs until `shutdown`; `ready` flips to true once every cache is synced.
    pub async fn run(mut self, shutdown: CancellationToken, ready: tokio::sync::watch::Sender<bool>) {
        let (agent_configs, w1) = Cache::new(&self.scope);
        let (slots, w2) = Cache::new(&self.scope);
        let (config_maps, w3) = Cache::new(&self.scope);
        let (secrets, w4) = Cache::new(&self.scope);
        let stores = Stores { agent_configs, slots, config_maps, secrets };
        let watches = watch::Context {
            client: self.client.clone(),
            dirty: self.dirty.clone(),
            errors: self.errors.clone(),
            leader: self.leader.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        // Custom resources through a guard: one that does not read is reported and skipped.
        watches.spawn::<DeserializeGuard<AgentConfig>>(&mut tasks, w1, None);
        watches.spawn::<DeserializeGuard<CapabilitySlot>>(&mut tasks, w2, None);
        watches.spawn::<ConfigMap>(&mut tasks, w3, None);
        let (auth, secret_store, scope) = (self.auth.clone(), stores.secrets.clone(), self.scope.clone());
        let on_secret: watch::Hook<Secret> = Arc::new(move |s: Option<&Secret>| {
            if s.is_none_or(|s| s.type_.as_deref() == Some(AGENT_TOKEN_SECRET_TYPE)) {
                auth.rebuild(&scope.secrets(secret_store.state()));
            }
        });
        watches.spawn::<Secret>(&mut tasks, w4, Some(on_secret));

        let synced = async {
            let _ = tokio::join!(
                stores.agent_configs.wait_until_ready(),
                stores.slots.wait_until_ready(),
                stores.config_maps.wait_until_ready(),
                stores.secrets.wait_until_ready()
            );
        };
        tokio::select! {
            _ = synced => {}
            _ = shutdown.cancelled() => return,
        }
        self.auth.rebuild(&self.scope.secrets(stores.secrets.state()));
        self.dirty.mark_all();
        tracing::info!(tokens = self.auth.len(), "caches synced");
        let _ = ready.send(true);

        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let fleet = self.fleet.clone();
        let dirty = self.dirty.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = dirty.notify.notified() => {}
                _ = fleet.changed() => {}
                _ = tick.tick() => {
                    self.status_dirty.extend(self.routes.take_changed());
                    if !*self.leader.borrow() {
                        continue; // followers keep their caches and fleet, and write nothing
                    }
                    if self.leader.has_changed().unwrap_or(false) {
                        // Just became the leader: everything may be stale.
                        self.leader.mark_unchanged();
                        self.status_dirty.extend(self.index.read().unwrap().keys().cloned());
                    }
                    self.report_refusals().await;
                    self.write_statuses().await;
                    continue;
                }
            }
            self.track_agents();
            self.replan(&stores);
        }
        tasks.abort_all();
    }

    /// Folds the fleet's changes into the agents-by-namespace index.
    fn track_agents(&mut self) {
        let mut arrived = Vec::new();
        for (key, changes) in self.fleet.take_changes() {
            let known = self.agents.get(&key.namespace).is_some_and(|set| set.contains(&key.uid));
            let present = !changes.contains(Changes::REMOVED) && self.fleet.inspect(&key, |_| ()).is_some();
            if known && !present {
                if let Some(set) = self.agents.get_mut(&key.namespace) {
                    set.remove(&key.uid);
                    if set.is_empty() {
                        self.agents.remove(&key.namespace);
                    }
                }
            } else if !known && present {
                self.agents.entry(key.namespace.clone()).or_default().insert(key.uid);
                arrived.push(key.clone());
            }
            self.status_dirty.insert(key.namespace.to_string());
        }
        // An agent's desired state was computed when it connected, from the index of that moment.
        // A re-plan that ran since then did not know the agent yet: compute it again, now that
        // every later re-plan will include it.
        if arrived.is_empty() {
            return;
        }
        let rollouts = self.rollouts.lock().unwrap().clone();
        for key in arrived {
            let idx = self.index.read().unwrap().get(&*key.namespace).cloned();
            if let Some(idx) = idx {
                self.refresh_desired(&key, &idx, &rollouts);
            }
        }
    }

    /// Gives one agent the desired state `idx` plans for it.
    fn refresh_desired(&self, key: &AgentKey, idx: &NamespaceIndex, rollouts: &HashMap<String, Tracker>) {
        let desired = self.fleet.inspect(key, |a| {
            idx.desired(&key.uid, a.report.description.as_ref(), a.report.has_remote_config(), rollouts)
        });
        if let Some(Some(d)) = desired {
            self.fleet.set_desired_state(key, d);
        }
    }

    /// Re-resolves dirty namespaces and recomputes their agents' desired state.
    fn replan(&mut self, stores: &Stores) {
        let all = self.dirty.all.swap(false, std::sync::atomic::Ordering::Relaxed);
        let mut namespaces: HashSet<String> = std::mem::take(&mut *self.dirty.namespaces.lock().unwrap());
        if all {
            namespaces.extend(stores.agent_configs.state().iter().filter_map(|o| o.namespace()));
            namespaces.extend(stores.slots.state().iter().filter_map(|o| o.namespace()));
            namespaces.extend(self.agents.keys().map(|k| k.to_string()));
            namespaces.extend(self.index.read().unwrap().keys().cloned());
        }
        namespaces.retain(|ns| self.scope.contains(ns));
        for ns in namespaces {
            let started = std::time::Instant::now();
            let in_ns = |o: &Option<String>| o.as_deref() == Some(ns.as_str());
            let configs: Vec<_> =
                stores.agent_configs.state().into_iter().filter(|o| in_ns(&o.namespace())).collect();
            let slots: Vec<_> = stores.slots.state().into_iter().filter(|o| in_ns(&o.namespace())).collect();
            let idx = Arc::new(NamespaceIndex::resolve(configs, slots, &stores.config_maps, &stores.secrets));
            self.index.write().unwrap().insert(ns.clone(), idx.clone());
            let slot_routes = idx
                .slots
                .slots
                .iter()
                .filter(|s| !idx.slots.conflicting.contains_key(&s.name_any()))
                .map(|s| {
                    let st = s.status.clone().unwrap_or_default();
                    (index::slot_route(s, &stores.secrets), st.upstream, st.downstream)
                })
                .collect();
            self.routes.publish(&ns, slot_routes);
            let rollouts = self.rollouts.lock().unwrap().clone();
            let namespace: Arc<str> = ns.as_str().into();
            for uid in self.agents.get(ns.as_str()).into_iter().flatten() {
                self.refresh_desired(&AgentKey::new(namespace.clone(), *uid), &idx, &rollouts);
            }
            self.status_dirty.insert(ns);
            self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
        }
    }

    /// Writes the status of every object of the namespaces that changed.
    async fn write_statuses(&mut self) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut active = HashSet::new();
        for ns in std::mem::take(&mut self.status_dirty) {
            let Some(idx) = self.index.read().unwrap().get(&ns).cloned() else { continue };
            let before = self.rollouts.lock().unwrap().clone();
            let mut st = NamespaceStatus::new(&idx, &before);
            let namespace: Arc<str> = ns.as_str().into();
            for uid in self.agents.get(ns.as_str()).into_iter().flatten() {
                self.fleet.inspect(&AgentKey::new(namespace.clone(), *uid), |a| st.add(*uid, a));
            }
            if self.advance_rollouts(&idx, &st.facts) {
                self.dirty.mark(Some(ns.clone()));
            }
            let after = self.rollouts.lock().unwrap().clone();
            if after.values().any(|t| !t.complete && !t.halted) {
                active.insert(ns.clone());
            }
            let since = self.failure_since.entry(ns.clone()).or_default();
            let config_statuses = st.agent_configs(&now, since, &after);
            let slot_statuses = st.capability_slots(&now, &self.routes);
            for (config, status) in idx.configs.iter().zip(config_statuses) {
                self.publish_config(&config.object, status).await;
            }
            for (slot, status) in idx.slots.slots.iter().zip(slot_statuses) {
                self.publish_slot(slot, status).await;
            }
        }
        // Rollouts in progress are re-evaluated every tick (minHealthySeconds is a time).
        self.status_dirty.extend(active);
    }

    /// Moves each progressive rollout forward; true when agents were admitted (re-plan).
    fn advance_rollouts(
        &self,
        idx: &NamespaceIndex,
        facts: &std::collections::BTreeMap<usize, Vec<rollout::AgentFacts>>,
    ) -> bool {
        let mut rollouts = self.rollouts.lock().unwrap();
        let mut admitted = false;
        let now = tokio::time::Instant::now();
        for (i, config) in idx.configs.iter().enumerate() {
            let (Some(source), Some(hash), true) = (&config.source, config.own_hash, config.is_progressive())
            else {
                continue;
            };
            let generation = config.object.metadata.generation;
            let tracker =
                rollouts.entry(source.key.clone()).or_insert_with(|| Tracker::new(hash, generation));
            if tracker.hash != hash || tracker.generation != generation {
                *tracker = Tracker::new(hash, generation); // a new version, or a spec change resumes
            }
            let empty = Vec::new();
            admitted |= tracker.advance(&config.object.spec.rollout, facts.get(&i).unwrap_or(&empty), now);
        }
        admitted
    }

    /// A Warning Event in each namespace that refused new agents at its limit (at most one a
    /// minute per namespace; the refusals are counted in `opamp_agents_rejected`).
    async fn report_refusals(&mut self) {
        let now = tokio::time::Instant::now();
        for r in self.fleet.take_refusals() {
            if self.refusals_told.get(&r.namespace).is_some_and(|at| now.duration_since(*at) < REFUSALS_EVERY)
            {
                continue;
            }
            self.refusals_told.insert(r.namespace.clone(), now);
            let note = format!(
                "{} new agents refused: the namespace holds its maximum of {} agents \
                 (--max-agents-per-namespace); they were told to retry later",
                r.count, r.limit
            );
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Namespace".into()),
                name: Some(r.namespace.to_string()),
                namespace: Some(r.namespace.to_string()),
                ..Default::default()
            };
            let ev = Event {
                type_: EventType::Warning,
                reason: "AgentLimitReached".into(),
                note: Some(note),
                action: "AdmitAgent".into(),
                secondary: None,
            };
            self.errors.publish(&ev, &reference).await;
        }
    }

    async fn publish_config(&self, object: &AgentConfig, status: AgentConfigStatus) {
        let current = object.status.as_ref();
        let strip = |s: &AgentConfigStatus| AgentConfigStatus { conditions: vec![], ..s.clone() };
        if !status::changed(current, &status, |s| &s.conditions, strip) {
            return;
        }
        let old = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let mut events = transitions(old, &status.conditions);
        let hash = status.config_hash.as_deref().unwrap_or_default();
        // Events are grouped by reason and action: the version in the action keeps each
        // rollout's events apart.
        let version = format!("Rollout-{}", hash.trim_start_matches("sha256:").get(..12).unwrap_or_default());
        let old_hash = current.and_then(|c| c.config_hash.as_deref());
        let new_version = old_hash != status.config_hash.as_deref() && status.config_hash.is_some();
        if new_version {
            let note = format!("rolling out {hash} to {} agents", status.selected_agents);
            events.insert(0, (EventType::Normal, "RolloutStarted", note, version.clone()));
        }
        let complete = |s: Option<&AgentConfigStatus>| {
            s.and_then(|s| s.rollout.as_ref()).is_some_and(|r| r.state == crate::api::RolloutState::Complete)
        };
        if complete(Some(&status)) && (new_version || !complete(current)) {
            let note =
                format!("{} of {} agents applied {hash}", status.applied_agents, status.selected_agents);
            events.push((EventType::Normal, "RolloutComplete", note, version));
        }
        self.patch_status::<AgentConfig, _>(object, &status).await;
        for (type_, reason, note, action) in events {
            self.event(object, type_, reason, note, action).await;
        }
    }

    async fn publish_slot(&self, object: &CapabilitySlot, status: CapabilitySlotStatus) {
        let current = object.status.as_ref();
        let strip = |s: &CapabilitySlotStatus| CapabilitySlotStatus { conditions: vec![], ..s.clone() };
        if !status::changed(current, &status, |s| &s.conditions, strip) {
            return;
        }
        let old = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let events = transitions(old, &status.conditions);
        self.patch_status::<CapabilitySlot, _>(object, &status).await;
        for (type_, reason, note, action) in events {
            self.event(object, type_, reason, note, action).await;
        }
    }

    async fn patch_status<K, S>(&self, object: &K, status: &S)
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
        S: serde::Serialize,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &object.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let (name, patch) = (object.name_any(), Patch::Apply(&patch));
        let result = match tokio::time::timeout(PATCH_TIMEOUT, api.patch_status(&name, &params, &patch)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(Error::patch(object, source)),
            Err(_) => Err(Error::patch_timeout(object, PATCH_TIMEOUT)),
        };
        let state = if result.is_ok() { "ok" } else { "error" };
        self.metrics.status_patches.get_or_create(&StateLabel { state }).inc();
        if let Err(e) = result {
            // Deleted meanwhile: counted, but there is nobody to tell.
            let gone = matches!(&e, Error::Patch { source: kube::Error::Api(s), .. } if s.code == 404);
            if gone { self.errors.count(&e) } else { self.errors.report(&e).await }
        }
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: String,
        action: String,
    ) {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action, secondary: None };
        self.errors.publish(&ev, &object.object_ref(&())).await;
    }
}

type Transition = (EventType, &'static str, String, String);

/// Events for condition transitions worth telling users about (rollout completion is told by
/// the rollout state, not by Ready).
fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    let status_of = |cs: &[Condition], t: &str| {
        cs.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut out = Vec::new();
    for c in new {
        if status_of(old, &c.type_) == Some((c.status.clone(), c.reason.clone())) {
            continue;
        }
        let event = match (c.type_.as_str(), c.status.as_str(), c.reason.as_str()) {
            ("Ready", _, "ReferenceNotFound") => Some((EventType::Warning, "ReferenceNotFound")),
            ("Degraded", "True", _) => Some((EventType::Warning, "AgentsFailed")),
            ("Conflict", "True", _) => Some((EventType::Warning, "Conflict")),
            _ => None,
        };
        if let Some((t, reason)) = event {
            out.push((t, reason, c.message.clone(), reason.to_owned()));
        }
    }
    out
}
