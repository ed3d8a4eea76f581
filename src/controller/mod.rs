//! The control loop, in one direction: watch → plan (every replica) → status compute → status
//! writer (leader only).
//!
//! - Watches keep caches of AgentConfigs, CapabilitySlots and agent-token Secrets, and of the
//!   metadata only of every other ConfigMap and Secret ([`watch`]); the content of the ones
//!   AgentConfigs and CapabilitySlots reference is read on its own ([`refs`]). The gauge
//!   `opamp_controller_cached_objects{kind,content}` tells what is held.
//! - Planning: any change in a namespace (a resource, a referenced ConfigMap or Secret, the
//!   rollout progress the leader wrote into status) resolves it again into a
//!   [`NamespaceIndex`], published to the fleet as the namespace's plan; the fleet derives each
//!   agent's desired state from it. Every replica plans, from what every replica sees, so an
//!   agent gets the same files whichever replica it is connected to.
//! - Status compute (leader only, at most twice a second per namespace: at the tick, and when
//!   the other replicas' counts of a tick arrive): counts the fleet's
//!   agents against the index and adds what the other replicas count of theirs ([`peer`]),
//!   advances progressive rollouts (the only decision taken on the leader alone), and queues
//!   what changed for the [`writer`], which patches it with a deadline. A slow API server
//!   delays status, never configs.
pub mod auth;
pub mod components;
pub mod error;
pub mod index;
pub mod leader;
pub mod merge;
mod metrics;
pub mod peer;
pub mod refs;
pub mod revisions;
pub mod rollout;
pub mod status;
pub mod watch;
pub mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::auth::TokenAuthenticator;
pub use self::error::{Error, Errors};
use self::index::NamespaceIndex;
use self::merge::display_hash;
use self::metrics::CachedLabel;
pub use self::metrics::ControllerMetrics;
use self::refs::Refs;
use self::rollout::{AgentFacts, Tracker};
use self::status::NamespaceStatus;
use self::watch::Cache;
use self::writer::{ObjectKey, Status, StatusQueue, StatusWrite, Transition};
use crate::api::{AGENT_TOKEN_SECRET_TYPE, AgentConfig, AgentConfigStatus, CapabilitySlot, RETRY_ANNOTATION};
use crate::fleet::{Fleet, Plan};
use crate::peers::Peers;
use crate::protocol::Uid;
use crate::routes::Routes;
use kube::runtime::watcher;

pub const FIELD_MANAGER: &str = "opamp-operator";
type PeerAnswer = Result<peer::StatusAnswer, crate::peers::CallError>;
/// How often a namespace at its agent limit is told so again (an Event).
const REFUSALS_EVERY: Duration = Duration::from_secs(60);

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
            self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).insert(ns);
            self.notify.notify_one();
        }
    }

    fn mark_all(&self) {
        self.all.store(true, std::sync::atomic::Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// The caches of watched objects (see [`watch`]), and the referenced objects' content (see
/// [`refs`]).
#[derive(Clone)]
struct Stores {
    agent_configs: Cache<AgentConfig>,
    slots: Cache<CapabilitySlot>,
    /// Every ConfigMap and Secret, by its metadata.
    config_maps: Cache<PartialObjectMeta<ConfigMap>>,
    secrets: Cache<PartialObjectMeta<Secret>>,
    /// The Secrets of type `opamp.dev/agent-token`, in full.
    tokens: Cache<Secret>,
    /// Our ControllerRevisions (see [`revisions`]).
    revisions: Cache<ControllerRevision>,
    refs: Arc<Refs>,
}

impl Stores {
    /// The `resourceVersion` of `key` as the metadata watches know it (`None`: not there).
    fn version(&self, key: &refs::Key) -> Option<String> {
        fn at<K: Resource<DynamicType = ()>>(key: &refs::Key) -> kube::runtime::reflector::ObjectRef<K> {
            kube::runtime::reflector::ObjectRef::new(&key.name).within(&key.namespace)
        }
        match key.kind {
            refs::Kind::ConfigMap => refs::version_of(self.config_maps.get(&at(key))),
            refs::Kind::Secret => refs::version_of(self.secrets.get(&at(key))),
        }
    }

    /// Sets `opamp_controller_cached_objects`.
    fn observe(&self, metrics: &ControllerMetrics) {
        let set = |kind, content, n: usize| {
            metrics.cached_objects.get_or_create(&CachedLabel { kind, content }).set(n as i64);
        };
        set("ConfigMap", "metadata", self.config_maps.len());
        set("Secret", "metadata", self.secrets.len());
        set("ConfigMap", "full", self.refs.held(refs::Kind::ConfigMap));
        set("Secret", "full", self.refs.held(refs::Kind::Secret) + self.tokens.len());
    }
}

pub struct Controller {
    client: Client,
    fleet: Fleet,
    metrics: Arc<ControllerMetrics>,
    routes: Arc<Routes>,
    auth: Arc<TokenAuthenticator>,
    /// The plan of each namespace, as last published, and what changed when: shared with the
    /// peer route ([`peer`]).
    shared: Arc<peer::Shared>,
    /// The other replicas' counts, on the leader.
    gather: peer::Gather,
    answers: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<(crate::peers::Member, PeerAnswer)>>>,
    /// Progressive rollouts by `namespace/name`, on the leader (resumed from status).
    rollouts: HashMap<String, Tracker>,
    dirty: Arc<Dirty>,
    /// Counts and tells errors; records the controller's Events.
    errors: Errors,
    queue: Arc<StatusQueue>,
    status_dirty: HashSet<String>,
    /// When each namespace was last told (an Event) that it refused agents at its limit.
    refusals_told: HashMap<Arc<str>, tokio::time::Instant>,
    failure_since: HashMap<String, HashMap<(Uid, Bytes), Time>>,
    scope: Scope,
    /// Only the leader computes and writes status and events (always true without leader
    /// election).
    leader: tokio::sync::watch::Receiver<bool>,
    /// This replica led at the last tick (the gathering of the others' counts is its own).
    leading: bool,
    /// The revisions as watched, and the leader's writes of them (set by `run`).
    revisions: Option<(Cache<ControllerRevision>, revisions::Writer)>,
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
}

impl Controller {
    pub fn new(
        client: Client,
        fleet: Fleet,
        auth: Arc<TokenAuthenticator>,
        routes: Arc<Routes>,
        scope: Scope,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        let reporter =
            Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        let (gather, answers) = peer::Gather::new(Peers::solo());
        Self {
            errors: Errors::new(metrics.clone(), Recorder::new(client.clone(), reporter)),
            client,
            fleet,
            queue: Arc::new(StatusQueue::new(writer::QUEUE_CAPACITY, metrics.clone())),
            metrics,
            routes,
            auth,
            shared: Arc::default(),
            gather,
            answers: Some(answers),
            rollouts: HashMap::new(),
            dirty: Arc::default(),
            status_dirty: HashSet::new(),
            refusals_told: HashMap::new(),
            failure_since: HashMap::new(),
            scope,
            leader: tokio::sync::watch::channel(true).1,
            leading: false,
            revisions: None,
        }
    }

    /// Writes status only while `leader` says so (see [`leader::run`]).
    pub fn with_leadership(mut self, leader: tokio::sync::watch::Receiver<bool>) -> Self {
        self.leader = leader;
        self
    }

    /// Counts the agents of the other replicas `peers` too (see [`peer`]).
    pub fn with_peers(mut self, peers: Peers) -> Self {
        let (gather, answers) = peer::Gather::new(peers);
        (self.gather, self.answers) = (gather, Some(answers));
        self
    }

    /// The peer route answering this replica's counts to the leader (see [`peer`]), to merge
    /// into the peer router.
    pub fn peer_router(&self) -> axum::Router {
        peer::router(Arc::new(peer::Served {
            shared: self.shared.clone(),
            fleet: self.fleet.clone(),
            routes: self.routes.clone(),
            incarnation: self.gather.peers().me().incarnation.clone(),
            peers: self.gather.peers().clone(),
        }))
    }

    /// Runs until `shutdown`; `ready` flips to true once every cache is synced and every
    /// object the AgentConfigs and CapabilitySlots reference has been read (or failed to be).
    pub async fn run(mut self, shutdown: CancellationToken, ready: tokio::sync::watch::Sender<bool>) {
        let (agent_configs, w1) = Cache::new(&self.scope);
        let (slots, w2) = Cache::new(&self.scope);
        let (config_maps, w3) = Cache::new(&self.scope);
        let (secrets, w4) = Cache::new(&self.scope);
        let (tokens, w5) = Cache::new(&self.scope);
        let (revisions, w6) = Cache::new(&self.scope);
        let (refs, reads) = Refs::new();
        let stores = Stores { agent_configs, slots, config_maps, secrets, tokens, revisions, refs };
        let writer = revisions::Writer::start(self.client.clone(), self.errors.clone());
        self.revisions = Some((stores.revisions.clone(), writer));
        let watches = watch::Context {
            client: self.client.clone(),
            dirty: self.dirty.clone(),
            errors: self.errors.clone(),
            queue: self.queue.clone(),
            leader: self.leader.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        // Custom resources through a guard: one that does not read is reported and skipped.
        watches.spawn::<DeserializeGuard<AgentConfig>>(&mut tasks, w1, watch::Options::default());
        watches.spawn::<DeserializeGuard<CapabilitySlot>>(&mut tasks, w2, watch::Options::default());
        // ConfigMaps and Secrets by their metadata: a change plans a namespace again only when
        // it references the object (once its new version is read).
        let hook = self.metadata_hook(&stores, refs::Kind::ConfigMap, stores.config_maps.clone());
        let options = watch::Options { hook: Some(hook), replans: false, ..Default::default() };
        watches.spawn::<PartialObjectMeta<ConfigMap>>(&mut tasks, w3, options);
        let hook = self.metadata_hook(&stores, refs::Kind::Secret, stores.secrets.clone());
        let options = watch::Options { hook: Some(hook), replans: false, ..Default::default() };
        watches.spawn::<PartialObjectMeta<Secret>>(&mut tasks, w4, options);
        // Agent tokens: only Secrets of their type are listed, in full.
        let (auth, token_store, metrics, all) =
            (self.auth.clone(), stores.tokens.clone(), self.metrics.clone(), stores.clone());
        let on_token: watch::Hook<Secret> = Arc::new(move |_: Option<&Secret>| {
            auth.rebuild(&token_store.state());
            all.observe(&metrics);
        });
        let tokens = watcher::Config::default().fields(&format!("type={AGENT_TOKEN_SECRET_TYPE}"));
        let options = watch::Options { config: tokens, hook: Some(on_token), replans: false };
        watches.spawn::<Secret>(&mut tasks, w5, options);
        // Our revisions (a rollback plans from them).
        let (label, value) = revisions::MANAGED_BY;
        let ours = watcher::Config::default().labels(&format!("{label}={value}"));
        watches.spawn::<ControllerRevision>(
            &mut tasks,
            w6,
            watch::Options { config: ours, ..Default::default() },
        );
        // Targeted reads of the referenced objects.
        let (client, dirty, errors) = (self.client.clone(), self.dirty.clone(), self.errors.clone());
        let (all, metrics) = (stores.clone(), self.metrics.clone());
        tasks.spawn(stores.refs.clone().run(
            reads,
            move |key| refs::read(client.clone(), key),
            move |ns| {
                all.observe(&metrics);
                dirty.mark(Some(ns));
            },
            move |key, source| {
                let (kind, namespace, name) = (key.kind.as_str(), key.namespace.clone(), key.name.clone());
                errors.count(&Error::Read { kind, namespace, name, source: Box::new(source) });
            },
        ));

        let synced = async {
            let _ = tokio::join!(
                stores.agent_configs.wait_until_ready(),
                stores.slots.wait_until_ready(),
                stores.config_maps.wait_until_ready(),
                stores.secrets.wait_until_ready(),
                stores.tokens.wait_until_ready(),
                stores.revisions.wait_until_ready()
            );
        };
        tokio::select! {
            _ = synced => {}
            _ = shutdown.cancelled() => return,
        }
        self.auth.rebuild(&stores.tokens.state());
        // Planning every namespace asks for the referenced objects; ready once they are read.
        self.dirty.mark_all();
        self.replan(&stores);
        tokio::select! {
            _ = stores.refs.wait_until_answered() => {}
            _ = shutdown.cancelled() => return,
        }
        stores.observe(&self.metrics);
        // Namespaces without objects get an empty plan: agents that run a config of ours are
        // released. Managing every namespace, that is the plan of any namespace without one of
        // its own; managing some, each of them gets a plan (see `replan`), and agents of any
        // other namespace (the anonymous one outside the scope) are left alone.
        if self.scope.namespaces().is_none() {
            self.fleet.publish_fallback_plan(Arc::new(NamespaceIndex::default()));
        }
        self.dirty.mark_all();
        self.replan(&stores);
        tracing::info!(tokens = self.auth.len(), "caches synced");
        let _ = ready.send(true);
        tasks.spawn(writer::run(
            self.queue.clone(),
            self.client.clone(),
            self.errors.clone(),
            self.leader.clone(),
            shutdown.clone(),
        ));

        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let fleet = self.fleet.clone();
        let dirty = self.dirty.clone();
        let mut membership = self.gather.peers().changes();
        let mut answers = self.answers.take().expect("run once");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = dirty.notify.notified() => self.replan(&stores),
                _ = fleet.changed() => {
                    let changed: HashSet<String> =
                        self.fleet.take_changes().into_keys().map(|k| k.namespace.to_string()).collect();
                    self.changed(changed);
                }
                Ok(()) = membership.changed() => {
                    // A replica left (its agents stop counting) or joined: now, not next tick.
                    let gone = self.gather.membership();
                    if self.leading {
                        self.status_dirty.extend(gone);
                        self.compute_statuses();
                    }
                }
                Some(round) = answers.recv() => {
                    if self.leading {
                        let changed = self.gather.apply(round, &self.routes);
                        // What the peers counted is written now, not a tick later (a status
                        // is computed at most twice a tick: at the tick and at its answers).
                        if !changed.is_empty() {
                            self.status_dirty.extend(changed);
                            self.compute_statuses();
                        }
                    }
                }
                _ = tick.tick() => {
                    let moved = self.routes.take_changed();
                    self.changed(moved);
                    self.status_dirty.extend(self.queue.take_retry());
                    if !*self.leader.borrow() {
                        self.rollouts.clear(); // a new term resumes them from status
                        self.gather.clear();
                        self.leading = false;
                        continue; // followers plan and serve, and write nothing
                    }
                    if !self.leading || self.leader.has_changed().unwrap_or(false) {
                        // Just became the leader: everything may be stale.
                        self.leader.mark_unchanged();
                        if !self.leading {
                            let index = self.shared.index.read().clone();
                            self.gather.take_over(&index, &self.routes);
                            self.leading = true;
                        }
                        self.status_dirty.extend(self.shared.index.read().keys().cloned());
                    }
                    self.gather.membership();
                    self.gather.poll();
                    self.report_refusals();
                    self.compute_statuses();
                }
            }
        }
        tasks.abort_all();
    }

    /// What follows a change the metadata watch of `kind` saw: a referenced object is read
    /// again (or known gone), and its namespace planned again.
    fn metadata_hook<K>(
        &self,
        stores: &Stores,
        kind: refs::Kind,
        cache: Cache<PartialObjectMeta<K>>,
    ) -> watch::Hook<PartialObjectMeta<K>>
    where
        K: Resource<DynamicType = ()> + Send + Sync + 'static,
    {
        let (stores, dirty, metrics) = (stores.clone(), self.dirty.clone(), self.metrics.clone());
        Arc::new(move |object: Option<&PartialObjectMeta<K>>| {
            match object {
                Some(o) => {
                    let meta = o.meta();
                    let (ns, name) = (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref());
                    let key = refs::Key::new(kind, ns, name.unwrap_or_default());
                    let now = refs::version_of(cache.get(&watch::key(meta)));
                    dirty.mark(stores.refs.seen(&key, now.as_deref()));
                }
                None => {
                    for ns in stores.refs.relisted(kind, |k| stores.version(k)) {
                        dirty.mark(Some(ns));
                    }
                }
            }
            stores.observe(&metrics);
        })
    }

    /// Namespaces whose counts may have changed here: their status is dirty, and the peer
    /// route tells the leader.
    fn changed(&mut self, namespaces: HashSet<String>) {
        if namespaces.is_empty() {
            return;
        }
        self.shared.log.lock().note(&namespaces);
        self.status_dirty.extend(namespaces);
    }

    /// Re-resolves dirty namespaces and publishes their plans (and routes).
    fn replan(&mut self, stores: &Stores) {
        let all = self.dirty.all.swap(false, std::sync::atomic::Ordering::Relaxed);
        let mut namespaces: HashSet<String> =
            std::mem::take(&mut *self.dirty.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        if all {
            namespaces.extend(stores.agent_configs.state().iter().filter_map(|o| o.namespace()));
            namespaces.extend(stores.slots.state().iter().filter_map(|o| o.namespace()));
            namespaces.extend(self.shared.index.read().keys().cloned());
            namespaces.extend(self.scope.namespaces().into_iter().flatten().cloned());
        }
        namespaces.retain(|ns| self.scope.contains(ns));
        let mut plans: Vec<(Arc<str>, Arc<dyn Plan>)> = Vec::with_capacity(namespaces.len());
        // Told to the leader once the new plans are in place (a peer asking in between counts
        // against the old plan, and is asked again).
        let replanned: Vec<String> = namespaces.iter().cloned().collect();
        for ns in namespaces {
            let started = std::time::Instant::now();
            let in_ns = |o: &Option<String>| o.as_deref() == Some(ns.as_str());
            let configs: Vec<_> =
                stores.agent_configs.state().into_iter().filter(|o| in_ns(&o.namespace())).collect();
            let slots: Vec<_> = stores.slots.state().into_iter().filter(|o| in_ns(&o.namespace())).collect();
            // Planned once what it references is read (or known missing): until then it keeps
            // its plan, and the reads mark it dirty again when they are in.
            let wanted = refs::referenced(&ns, &configs, &slots);
            if !stores.refs.want(&ns, wanted, |k| stores.version(k)) {
                continue;
            }
            let revisions: Vec<_> =
                stores.revisions.state().into_iter().filter(|o| in_ns(&o.namespace())).collect();
            let idx = Arc::new(NamespaceIndex::resolve(configs, slots, &revisions, &stores.refs));
            let slot_routes = idx
                .slots
                .slots
                .iter()
                .filter(|s| !idx.slots.conflicting.contains_key(&s.name_any()))
                .map(|s| {
                    let st = s.status.clone().unwrap_or_default();
                    (index::slot_route(s, &stores.refs), st.upstream, st.downstream)
                })
                .collect();
            self.routes.publish(&ns, slot_routes);
            // Most changes the watches bring are status writes, which change no agent's desired
            // state: the plan is published only when it changed.
            let mut index = self.shared.index.write();
            if index.get(&ns).is_none_or(|old| !old.same_plan(&idx)) {
                plans.push((ns.as_str().into(), idx.clone()));
            }
            index.insert(ns.clone(), idx);
            drop(index);
            self.status_dirty.insert(ns);
            self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
        }
        self.fleet.publish_plans(plans);
        self.shared.log.lock().note(&replanned);
        stores.observe(&self.metrics); // content nothing references any more is dropped
    }

    /// Computes the status of every object of the namespaces that changed (one pass over the
    /// fleet, plus the other replicas' counts), advances their rollouts and queues what changed
    /// for the writer. A namespace whose peers' counts are not of its current plan yet waits.
    fn compute_statuses(&mut self) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let namespaces: Vec<(String, Arc<NamespaceIndex>)> = {
            let index = self.shared.index.read();
            std::mem::take(&mut self.status_dirty)
                .into_iter()
                .filter_map(|ns| index.get(&ns).cloned().map(|idx| (ns, idx)))
                .collect()
        };
        let mut counts: HashMap<&str, NamespaceStatus<'_>> =
            peer::count(&self.fleet, self.gather.peers(), &namespaces);
        // The revisions of those namespaces, gathered in one pass.
        let mut revisions: HashMap<String, Vec<Arc<ControllerRevision>>> = HashMap::new();
        if let Some((cache, _)) = &self.revisions
            && !namespaces.is_empty()
        {
            let wanted: HashSet<&str> = namespaces.iter().map(|(ns, _)| ns.as_str()).collect();
            for r in cache.state() {
                if let Some(ns) = r.metadata.namespace.as_deref().filter(|ns| wanted.contains(ns)) {
                    revisions.entry(ns.to_owned()).or_default().push(r);
                }
            }
        }
        let mut active = HashSet::new();
        for (ns, idx) in &namespaces {
            let Some(mut st) = counts.remove(ns.as_str()) else { continue };
            if let Err(why) = self.gather.merge_into(ns, &mut st) {
                tracing::debug!(namespace = %ns, "status waits: {why}");
                active.insert(ns.clone()); // tried again next tick
                continue;
            }
            if self.advance_rollouts(ns, idx, &st.facts) {
                active.insert(ns.clone());
            }
            let since = self.failure_since.entry(ns.clone()).or_default();
            let config_statuses = st.agent_configs(&now, since, &self.rollouts);
            self.write_revisions(idx, &config_statuses, revisions.get(ns).map_or(&[], Vec::as_slice));
            let slot_statuses = st.capability_slots(&now, &self.routes);
            for (config, status) in idx.configs.iter().zip(config_statuses) {
                let cached = config.object.status.clone().map(|s| Status::Config(Box::new(s)));
                self.offer(&*config.object, cached, Status::Config(Box::new(status)));
            }
            for (slot, status) in idx.slots.slots.iter().zip(slot_statuses) {
                self.offer(&**slot, slot.status.clone().map(Status::Slot), Status::Slot(status));
            }
        }
        // Rollouts in progress are re-evaluated every tick (minHealthySeconds is a time).
        self.status_dirty.extend(active);
    }

    /// Moves each rollout of a namespace forward (the leader's decision; the status written
    /// carries it to every replica's plan); true while one is in progress.
    fn advance_rollouts(
        &mut self,
        ns: &str,
        idx: &NamespaceIndex,
        facts: &BTreeMap<usize, Vec<AgentFacts>>,
    ) -> bool {
        let now = tokio::time::Instant::now();
        let mut present = HashSet::new();
        for (i, config) in idx.configs.iter().enumerate() {
            let (Some(source), Some(hash)) = (&config.source, config.own_hash) else { continue };
            present.insert(source.key.as_str());
            let generation = config.object.metadata.generation;
            let retry = config.object.annotations().get(RETRY_ANNOTATION).cloned();
            let status = config.object.status.as_ref();
            let tracker = self.rollouts.entry(source.key.clone()).or_insert_with(|| {
                Tracker::resume(hash, &display_hash(&hash), generation, retry.clone(), status)
            });
            // A new version, a retry, or a spec change after a halt or rollback starts over.
            if tracker.hash != hash
                || tracker.retry != retry
                || (tracker.stopped() && tracker.generation != generation)
            {
                *tracker = Tracker::new(hash, generation, retry);
            }
            tracker.generation = generation;
            let rollback_to = match &config.fallback {
                Some((name, Ok(_))) => Ok(name.as_str()),
                Some((_, Err(why))) => Err(why.as_str()),
                None => Err("no healthy revision to roll back to"),
            };
            let agents = facts.get(&i).map_or(&[][..], |f| f.as_slice());
            if tracker.advance(&config.object.spec.rollout, agents, now, rollback_to) {
                let stopped = match &tracker.end {
                    Some(rollout::End::Halted(gate)) => Some((gate, "Halted")),
                    Some(rollout::End::RolledBack(gate, _)) => Some((gate, "RolledBack")),
                    _ => None,
                };
                if let Some((gate, outcome)) = stopped {
                    let label = metrics::GateLabel { gate: gate.gate.clone(), outcome };
                    self.metrics.rollouts_stopped.get_or_create(&label).inc();
                    tracing::warn!(agent_config = %source.key, gate = %gate.gate, outcome, "{}", gate.message);
                }
            }
        }
        let prefix = format!("{ns}/");
        self.rollouts.retain(|key, _| !key.starts_with(&prefix) || present.contains(key.as_str()));
        present.iter().any(|key| self.rollouts.get(*key).is_some_and(|t| t.end.is_none()))
    }

    /// Brings the revisions of a namespace's AgentConfigs to what their statuses say (leader
    /// only; see [`revisions`]).
    fn write_revisions(
        &mut self,
        idx: &NamespaceIndex,
        statuses: &[AgentConfigStatus],
        in_ns: &[Arc<ControllerRevision>],
    ) {
        let Some((_, writer)) = self.revisions.as_mut() else { return };
        for (config, status) in idx.configs.iter().zip(statuses) {
            let (Some(source), Some(hash), Some(update)) =
                (&config.source, config.own_hash, &config.update_revision)
            else {
                continue;
            };
            let rolled_back_to = status.rollout.as_ref().and_then(|r| r.rolled_back_to.clone());
            let keep =
                [status.current_revision.clone(), status.last_healthy_revision.clone(), rolled_back_to];
            let wanted = revisions::Wanted {
                config: &config.object,
                update: (update.clone(), hash, &source.files),
                keep: keep.into_iter().flatten().collect(),
            };
            writer.reconcile(&wanted, in_ns);
        }
    }

    /// Queues an object's status when it differs from what the object has and from what is
    /// already on its way, with the Events its changes tell.
    fn offer<K: Resource<DynamicType = ()>>(&self, object: &K, cached: Option<Status>, new: Status) {
        let meta = object.meta();
        let key = ObjectKey {
            kind: if matches!(new, Status::Config(_)) { "AgentConfig" } else { "CapabilitySlot" },
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        };
        if !new.differs(cached.as_ref()) {
            self.queue.caught_up(&key);
            return;
        }
        let previous = self.queue.last_sent(&key).or(cached);
        if !new.differs(previous.as_ref()) {
            return; // already on its way
        }
        let events = events(previous.as_ref(), &new);
        self.queue.push_status(key, StatusWrite { reference: object.object_ref(&()), status: new, events });
    }

    /// A Warning Event in each namespace that refused new agents at its limit (at most one a
    /// minute per namespace; the refusals are counted in `opamp_agents_rejected`).
    fn report_refusals(&mut self) {
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
            self.queue.push_event(reference, ev);
        }
    }
}

/// The Events a status change tells: condition transitions, and for AgentConfigs the start
/// and completion of each rollout.
fn events(previous: Option<&Status>, new: &Status) -> Vec<Transition> {
    let (old_config, new_config) = match (previous, new) {
        (Some(Status::Config(old)), Status::Config(new)) => (Some(old), new),
        (_, Status::Config(new)) => (None, new),
        (previous, Status::Slot(new)) => {
            let old = match previous {
                Some(Status::Slot(old)) => old.conditions.as_slice(),
                _ => &[],
            };
            return transitions(old, &new.conditions);
        }
    };
    config_events(old_config.map(|b| &**b), new_config)
}

fn config_events(current: Option<&AgentConfigStatus>, status: &AgentConfigStatus) -> Vec<Transition> {
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
    if complete(Some(status)) && (new_version || !complete(current)) {
        let note = format!("{} of {} agents applied {hash}", status.applied_agents, status.selected_agents);
        events.push((EventType::Normal, "RolloutComplete", note, version));
    }
    events
}

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
            ("Degraded", "True", "RolledBack") => Some((EventType::Warning, "RolledBack")),
            ("Degraded", "True", "RolloutHalted") => Some((EventType::Warning, "RolloutHalted")),
            ("Degraded", "True", "ComponentsMissing") => Some((EventType::Warning, "ComponentsMissing")),
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
