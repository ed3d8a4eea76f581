//! Status over every replica's agents: each replica counts its own agents ("partials"), the
//! leader gathers them and writes the sum.
//!
//! **Protocol.** Every tick (1 s; unless the previous round is still on its way) the leader
//! POSTs `/peer/v1/status` ([`PATH`]) to each live peer, concurrently, each call within the
//! peer call timeout: `{since, incarnation}`, where
//! `since` is the change epoch the peer last answered to this leader and `incarnation` the
//! peer's as membership tells it. The peer keeps a change log: each namespace with the epoch
//! of its last change (its agents changed, it planned the namespace again, a slot counter of
//! the namespace moved). It answers its current epoch and a [`Partial`] for each namespace that
//! changed after `since` (all of them, `full`, for `since` 0, for an epoch it never gave, or
//! for another incarnation). A partial says what the replica's own agents add to each object's
//! status (by object name): per AgentConfig the counts, up to [`MAX_FAILURES`] failures and,
//! while a Progressive rollout is not complete, each selected agent's rollout facts (the
//! leader's tracker steps over every replica's agents); the selections of several configs
//! (for file conflicts); per CapabilitySlot its supporting agents and the replica's own counter
//! increments. Each partial carries the [`fingerprint`] of the plan it was counted against.
//!
//! The leader caches the last partial per (peer incarnation, namespace) and marks the
//! namespaces a peer reports dirty. For a dirty namespace it counts its own agents and adds
//! the cached partials of the live peers; only partials of the same plan as its own are added.
//! A namespace for which a live peer has no partial of the leader's plan (the peer has not
//! planned the change yet, or has not answered since this replica became leader) stays dirty
//! and is tried again next tick: no status is written half-merged. A peer that does not answer
//! holds the namespaces back at most [`FIRST_ANSWER_GRACE`] after its last answer (or after
//! it joined), and a peer that does not come to the leader's plan (it does not manage the
//! namespace, say) at most that long after the plan changed; after that its partials of
//! other plans count as no agents.
//!
//! **Slot counters.** A replica reports its own increments since its counters started
//! ([`SlotCounters::local`](crate::routes::SlotCounters::local)) with the counters' id; the
//! leader folds the difference to what the same (incarnation, counters) reported before into
//! its own counters, which it writes (a new incarnation or new counters start from 0). What can
//! be lost: on a leader change, the increments the old leader had not folded and written yet
//! (the new leader starts from the status it sees and takes each peer's first report as the
//! baseline), at most about a tick and a status write of increments; increments of a replica
//! that dies before the leader asked it (at most a tick's).
//!
//! **Costs.** The request is ~60 bytes per peer per tick. The answer is ~40 bytes when nothing
//! changed; otherwise per changed namespace ~60 bytes + ~150 per AgentConfig + ~300 per
//! CapabilitySlot + ~150 per reported failure (plus its message, at most [`MAX_FAILURES`] per
//! config) + ~25 per agent selected by a Progressive AgentConfig whose rollout is not complete
//! (+ the names of each distinct multi-config selection). So a tick costs
//! O(peers × changed namespaces × objects) plus O(agents in progressive rollouts), and a
//! replica counts its fleet once per answer with changes. Answers are bounded by
//! [`MAX_ANSWER_BYTES`](crate::peers::MAX_ANSWER_BYTES).
//!
//! **Failures.** A peer that does not answer (timeout, error) keeps its last partials until it
//! leaves membership (its Lease lapses: lease duration; it stops: at once); then its partials
//! are dropped and its namespaces recomputed, so its agents stop counting, and count again
//! once they reconnect to another replica. The calls run in a task of their own: the control
//! loop never waits for a peer. A leader change starts the gathering afresh (full answers).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, Router};
use bytes::Bytes;
use kube::ResourceExt;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::index::{Admission, NamespaceIndex};
use super::rollout::AgentFacts;
use super::status::{MAX_FAILURES, NamespaceStatus};
use crate::api::{DownstreamStatus, UpstreamStatus};
use crate::fleet::Fleet;
use crate::peers::{CallError, Member, Peers};
use crate::protocol::Uid;
use crate::routes::Routes;

/// The peer route answering a replica's partials (under `/peer/v1`).
pub const PATH: &str = "/status";
/// How long a live peer that has not answered (yet, or since a plan change) holds the
/// namespaces' status back.
pub const FIRST_ANSWER_GRACE: Duration = Duration::from_secs(10);

/// What one replica's agents add to the status of one namespace's objects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// The [`fingerprint`] of the plan counted against.
    pub plan: u64,
    /// By AgentConfig name.
    #[serde(default)]
    pub configs: BTreeMap<String, ConfigPart>,
    /// Agents selected by several AgentConfigs: each distinct selection, by names.
    #[serde(default)]
    pub selections: Vec<Vec<String>>,
    /// By CapabilitySlot name.
    #[serde(default)]
    pub slots: BTreeMap<String, SlotPart>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigPart {
    pub selected: u32,
    pub applied: u32,
    pub applying: u32,
    pub failed: u32,
    pub pending: u32,
    pub unhealthy: u32,
    #[serde(default)]
    pub incompatible: u32,
    #[serde(default)]
    pub updated: u32,
    /// At most [`MAX_FAILURES`] (the lowest uids).
    #[serde(default)]
    pub failures: Vec<FailurePart>,
    /// Rollout facts of each selected agent (rollouts not over).
    #[serde(default)]
    pub facts: Vec<Fact>,
    /// The connection settings' counts: offered, applied, failed, unsupported.
    #[serde(default)]
    pub connection: [u32; 4],
    /// The restart's counts: restarted, pending, unsupported.
    #[serde(default)]
    pub restart: [u32; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailurePart {
    /// Hex of the 16 bytes.
    pub uid: String,
    pub message: String,
    /// Hex of the config hash the agent failed.
    pub hash: String,
}

/// [`AgentFacts`] on the wire: the rollout key and flags (1 applied, 2 failed, 4 healthy,
/// 8 has the version, 16 disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fact(pub u64, pub u8);

impl From<&AgentFacts> for Fact {
    fn from(f: &AgentFacts) -> Self {
        let flags = u8::from(f.applied)
            | u8::from(f.failed) << 1
            | u8::from(f.healthy) << 2
            | u8::from(f.has_version) << 3
            | u8::from(f.disconnected) << 4;
        Fact(f.key, flags)
    }
}

impl From<Fact> for AgentFacts {
    fn from(Fact(key, flags): Fact) -> Self {
        AgentFacts {
            key,
            applied: flags & 1 != 0,
            failed: flags & 2 != 0,
            healthy: flags & 4 != 0,
            has_version: flags & 8 != 0,
            disconnected: flags & 16 != 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotPart {
    pub supporting: u32,
    /// The replica's own increments (`None`: the slot is not routed there).
    #[serde(default)]
    pub counters: Option<SlotIncrements>,
}

/// A replica's own slot counter increments since its counters (`id`) started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotIncrements {
    pub id: u64,
    pub upstream: UpstreamStatus,
    pub downstream: DownstreamStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRequest {
    /// The change epoch last answered (0: everything).
    pub since: u64,
    /// The incarnation the asker knows the peer by.
    pub incarnation: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub incarnation: String,
    pub epoch: u64,
    /// Every namespace is in `partials` (the asker drops what it cached of the others).
    pub full: bool,
    pub partials: Vec<NamespacePartial>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamespacePartial {
    pub namespace: String,
    pub partial: Partial,
}

/// The plan a partial is counted against: AgentConfig names, generations, hashes and
/// admissions, CapabilitySlot names, generations and ownership. Replicas with the same plan
/// count the same agent the same way.
pub fn fingerprint(idx: &NamespaceIndex) -> u64 {
    let mut h = Sha256::new();
    for c in &idx.configs {
        h.update(c.object.name_any().as_bytes());
        h.update([0]);
        h.update(c.object.metadata.generation.unwrap_or(0).to_be_bytes());
        h.update(c.own_hash.unwrap_or([0; 32]));
        match c.admission {
            Admission::All => h.update([1]),
            Admission::UpTo(t) => {
                h.update([2]);
                h.update(t.to_be_bytes());
            }
            Admission::Nobody => h.update([3]),
        }
        h.update([u8::from(c.source.is_some()), u8::from(c.tracking), u8::from(c.rolled_back)]);
        if let Some(revision) = c.rollback() {
            h.update(revision.hash);
        }
        if let Some(at) = c.restart_at() {
            h.update(at.to_be_bytes());
        }
        if let Some(Ok(offer)) = &c.connection {
            h.update(&offer.hash);
        }
    }
    h.update([0xff]);
    for s in &idx.slots.slots {
        h.update(s.name_any().as_bytes());
        h.update([0]);
        h.update(s.metadata.generation.unwrap_or(0).to_be_bytes());
        h.update([u8::from(idx.slots.conflicting.contains_key(&s.name_any()))]);
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Counts this replica's agents of `namespaces` (one pass over the fleet). An offline record of
/// a plain-HTTP agent that another replica owns is left out: the agent polled here while its
/// owner did not answer, and is counted by the owner (otherwise it would count twice, once
/// pending, until this record is forgotten).
pub(super) fn count<'a>(
    fleet: &Fleet,
    peers: &Peers,
    namespaces: &'a [(String, Arc<NamespaceIndex>)],
) -> HashMap<&'a str, NamespaceStatus<'a>> {
    let mut counts: HashMap<&str, NamespaceStatus<'_>> =
        namespaces.iter().map(|(ns, idx)| (ns.as_str(), NamespaceStatus::new(idx))).collect();
    if !counts.is_empty() {
        fleet.for_each_view(|agent| {
            if agent.http && !agent.connected && peers.owner(&agent.uid).is_some() {
                return;
            }
            if let Some(st) = counts.get_mut(&**agent.namespace) {
                st.add(agent);
            }
        });
    }
    counts
}

impl NamespaceStatus<'_> {
    /// This replica's partial; `routes` adds its own slot counter increments.
    pub fn to_partial(&self, namespace: &str, routes: Option<&Routes>) -> Partial {
        let idx = self.index;
        let configs = idx
            .configs
            .iter()
            .zip(&self.configs)
            .enumerate()
            .map(|(i, (config, c))| {
                let mut failures: Vec<&(Uid, String, Bytes)> = c.failures.iter().collect();
                failures.sort_by_key(|f| f.0);
                failures.truncate(MAX_FAILURES);
                let facts = match config.tracking {
                    false => Vec::new(), // over: the tracker needs no facts
                    true => self.facts.get(&i).map_or_else(Vec::new, |f| f.iter().map(Fact::from).collect()),
                };
                let part = ConfigPart {
                    selected: c.selected,
                    applied: c.applied,
                    applying: c.applying,
                    failed: c.failed,
                    pending: c.pending,
                    unhealthy: c.unhealthy,
                    incompatible: c.incompatible,
                    updated: c.updated,
                    failures: failures
                        .into_iter()
                        .map(|(uid, message, hash)| FailurePart {
                            uid: hex::encode(uid.as_bytes()),
                            message: message.clone(),
                            hash: hex::encode(hash),
                        })
                        .collect(),
                    facts,
                    connection: c.connection.to_array(),
                    restart: c.restart.to_array(),
                };
                (config.object.name_any(), part)
            })
            .collect();
        let mut selections: Vec<Vec<String>> = self
            .selections
            .iter()
            .map(|s| s.iter().map(|&i| idx.configs[i].object.name_any()).collect())
            .collect();
        selections.sort();
        let slots = idx
            .slots
            .slots
            .iter()
            .zip(&self.supporting)
            .map(|(slot, &supporting)| {
                let counters = routes.and_then(|r| r.counters(namespace, &slot.name_any())).map(|c| {
                    let (upstream, downstream) = c.local();
                    SlotIncrements { id: c.id(), upstream, downstream }
                });
                (slot.name_any(), SlotPart { supporting, counters })
            })
            .collect();
        Partial { plan: fingerprint(idx), configs, selections, slots }
    }

    /// Adds another replica's partial (of the same plan: see [`fingerprint`]). What does not
    /// read (an unknown name, a malformed uid) is skipped.
    pub fn merge(&mut self, p: &Partial) {
        let idx = self.index;
        let config_at =
            |name: &str| idx.configs.binary_search_by(|c| c.object.name_any().as_str().cmp(name)).ok();
        for (name, part) in &p.configs {
            let Some(i) = config_at(name) else { continue };
            let c = &mut self.configs[i];
            c.selected = c.selected.saturating_add(part.selected);
            c.applied = c.applied.saturating_add(part.applied);
            c.applying = c.applying.saturating_add(part.applying);
            c.failed = c.failed.saturating_add(part.failed);
            c.pending = c.pending.saturating_add(part.pending);
            c.unhealthy = c.unhealthy.saturating_add(part.unhealthy);
            c.incompatible = c.incompatible.saturating_add(part.incompatible);
            c.connection.add(part.connection);
            c.restart.add(part.restart);
            c.updated = c.updated.saturating_add(part.updated);
            for f in part.failures.iter().take(MAX_FAILURES) {
                let uid = hex::decode(&f.uid).ok().and_then(|b| Uid::from_wire(&b));
                let (Some(uid), Ok(hash)) = (uid, hex::decode(&f.hash)) else { continue };
                c.failures.push((uid, f.message.clone(), Bytes::from(hash)));
            }
            if !part.facts.is_empty() {
                self.facts.entry(i).or_default().extend(part.facts.iter().map(|&f| AgentFacts::from(f)));
            }
        }
        for names in &p.selections {
            let mut selection: Vec<usize> = names.iter().filter_map(|n| config_at(n)).collect();
            selection.sort_unstable();
            selection.dedup();
            if selection.len() > 1 && selection.len() == names.len() {
                self.selections.insert(selection);
            }
        }
        for (i, slot) in idx.slots.slots.iter().enumerate() {
            if let Some(part) = p.slots.get(&slot.name_any()) {
                self.supporting[i] = self.supporting[i].saturating_add(part.supporting);
            }
        }
    }
}

/// Each namespace with the epoch of its last change, on every replica.
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    epoch: u64,
    changed: HashMap<String, u64>,
}

impl ChangeLog {
    /// Records that `namespaces` changed (one new epoch for them all).
    pub(super) fn note<'a>(&mut self, namespaces: impl IntoIterator<Item = &'a String>) {
        let mut namespaces = namespaces.into_iter().peekable();
        if namespaces.peek().is_none() {
            return;
        }
        self.epoch += 1;
        for ns in namespaces {
            match self.changed.get_mut(ns.as_str()) {
                Some(e) => *e = self.epoch,
                None => {
                    self.changed.insert(ns.clone(), self.epoch);
                }
            }
        }
    }
}

/// What the controller shares with the peer route: the plans and the change log.
#[derive(Default)]
pub(super) struct Shared {
    /// The plan of each namespace, as last published.
    pub(super) index: RwLock<HashMap<String, Arc<NamespaceIndex>>>,
    pub(super) log: Mutex<ChangeLog>,
}

/// Answers the peer route.
pub(super) struct Served {
    pub(super) shared: Arc<Shared>,
    pub(super) fleet: Fleet,
    pub(super) routes: Arc<Routes>,
    pub(super) incarnation: Arc<str>,
    /// Who owns which agent (see [`count`]).
    pub(super) peers: Peers,
}

impl Served {
    fn answer(&self, req: &StatusRequest) -> StatusAnswer {
        let (epoch, changed) = {
            let log = self.shared.log.lock();
            let full = req.since == 0 || req.since > log.epoch || req.incarnation != *self.incarnation;
            let changed: Option<HashSet<String>> = (!full).then(|| {
                log.changed.iter().filter(|(_, e)| **e > req.since).map(|(ns, _)| ns.clone()).collect()
            });
            (log.epoch, changed)
        };
        let namespaces: Vec<(String, Arc<NamespaceIndex>)> = self
            .shared
            .index
            .read()
            .iter()
            .filter(|(ns, _)| changed.as_ref().is_none_or(|c| c.contains(*ns)))
            .map(|(ns, idx)| (ns.clone(), idx.clone()))
            .collect();
        let counts = count(&self.fleet, &self.peers, &namespaces);
        let partials = namespaces
            .iter()
            .filter_map(|(ns, _)| {
                let st = counts.get(ns.as_str())?;
                Some(NamespacePartial {
                    namespace: ns.clone(),
                    partial: st.to_partial(ns, Some(&self.routes)),
                })
            })
            .collect();
        StatusAnswer { incarnation: self.incarnation.to_string(), epoch, full: changed.is_none(), partials }
    }
}

/// The peer route ([`PATH`]): this replica's partials.
pub(super) fn router(served: Arc<Served>) -> Router {
    Router::new().route(PATH, axum::routing::post(answer)).with_state(served)
}

async fn answer(
    State(served): State<Arc<Served>>,
    Json(req): Json<StatusRequest>,
) -> Result<Json<StatusAnswer>, (StatusCode, String)> {
    // Counting walks the fleet: off the async workers.
    tokio::task::spawn_blocking(move || served.answer(&req))
        .await
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("counting failed: {e}")))
}

type Answers = Vec<(Member, Result<StatusAnswer, CallError>)>;

/// The last partials of one peer incarnation, on the leader.
#[derive(Default)]
struct PeerCache {
    epoch: u64,
    namespaces: HashMap<String, Partial>,
    /// The last answer.
    answered: Option<Instant>,
}

/// What a peer incarnation last reported of one slot's counters.
struct Folded {
    id: u64,
    counters: SlotIncrements,
}

/// The leader's side: asks the peers, caches their partials, folds their slot counters.
pub(super) struct Gather {
    peers: Peers,
    tx: mpsc::UnboundedSender<Answers>,
    in_flight: Arc<AtomicBool>,
    cache: HashMap<Arc<str>, PeerCache>,
    /// Live peers that have not answered yet, since when.
    waiting: HashMap<Arc<str>, Instant>,
    /// By (namespace, slot), per peer incarnation.
    folds: HashMap<(String, String), HashMap<Arc<str>, Folded>>,
    /// Peers whose first answer is the baseline of their slot counters (alive when this
    /// replica became leader: what they reported before is in status already).
    baseline: HashSet<Arc<str>>,
    /// Each namespace's plan fingerprint here, since when.
    plans: HashMap<String, (u64, Instant)>,
}

impl Gather {
    /// And the receiver of the answers, for the control loop.
    pub(super) fn new(peers: Peers) -> (Self, mpsc::UnboundedReceiver<Answers>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let g = Self {
            peers,
            tx,
            in_flight: Arc::default(),
            cache: HashMap::new(),
            waiting: HashMap::new(),
            folds: HashMap::new(),
            baseline: HashSet::new(),
            plans: HashMap::new(),
        };
        (g, rx)
    }

    pub(super) fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Asks every live peer for what changed since its last answer, unless a round is still
    /// on its way; the answers come through the receiver.
    pub(super) fn poll(&mut self) {
        let others = self.peers.others();
        if others.is_empty() || self.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let asks: Vec<(Member, StatusRequest)> = others
            .iter()
            .map(|m| {
                let since = self.cache.get(&m.incarnation).map_or(0, |c| c.epoch);
                (m.clone(), StatusRequest { since, incarnation: m.incarnation.to_string() })
            })
            .collect();
        let (peers, tx, in_flight) = (self.peers.clone(), self.tx.clone(), self.in_flight.clone());
        tokio::spawn(async move {
            let calls = asks.iter().map(|(m, req)| {
                let peers = &peers;
                async move { (m.clone(), peers.call::<_, StatusAnswer>(m, PATH, req).await) }
            });
            let answers = futures_util::future::join_all(calls).await;
            let _ = tx.send(answers);
            in_flight.store(false, Ordering::Release);
        });
    }

    /// Takes a round of answers in; the namespaces they change.
    pub(super) fn apply(&mut self, answers: Answers, routes: &Routes) -> HashSet<String> {
        let live: HashSet<Arc<str>> = self.peers.others().iter().map(|m| m.incarnation.clone()).collect();
        let mut dirty = HashSet::new();
        for (member, answer) in answers {
            if !live.contains(&member.incarnation) {
                continue; // left meanwhile
            }
            let answer = match answer {
                Ok(a) if a.incarnation == *member.incarnation => a,
                Ok(a) => {
                    tracing::debug!(peer = %member.identity, incarnation = %a.incarnation, "status from another incarnation");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(peer = %member.identity, error = %e, "no status from peer; its last counts stay");
                    continue;
                }
            };
            self.waiting.remove(&member.incarnation);
            let baseline = self.baseline.remove(&member.incarnation);
            let inc = member.incarnation.clone();
            let entry = self.cache.entry(inc.clone()).or_default();
            if answer.full {
                dirty.extend(entry.namespaces.drain().map(|(ns, _)| ns));
            }
            for np in answer.partials {
                fold(&mut self.folds, &inc, &np.namespace, &np.partial, baseline, routes);
                dirty.insert(np.namespace.clone());
                entry.namespaces.insert(np.namespace, np.partial);
            }
            entry.epoch = answer.epoch;
            entry.answered = Some(Instant::now());
        }
        dirty
    }

    /// Follows membership: drops what is cached of peers that left; the namespaces that
    /// changes.
    pub(super) fn membership(&mut self) -> HashSet<String> {
        let live: HashSet<Arc<str>> = self.peers.others().iter().map(|m| m.incarnation.clone()).collect();
        let mut dirty = HashSet::new();
        self.cache.retain(|inc, c| {
            let keep = live.contains(inc);
            if !keep {
                dirty.extend(c.namespaces.keys().cloned());
            }
            keep
        });
        self.waiting.retain(|inc, _| live.contains(inc));
        self.baseline.retain(|inc| live.contains(inc));
        for per in self.folds.values_mut() {
            per.retain(|inc, _| live.contains(inc));
        }
        self.folds.retain(|_, per| !per.is_empty());
        let now = Instant::now();
        for inc in live {
            if !self.cache.contains_key(&inc) {
                self.waiting.entry(inc).or_insert(now);
            }
        }
        dirty
    }

    /// This replica became the leader: gathers afresh, its slot counters starting from the
    /// status it sees.
    pub(super) fn take_over(&mut self, index: &HashMap<String, Arc<NamespaceIndex>>, routes: &Routes) {
        self.clear();
        self.baseline = self.peers.others().iter().map(|m| m.incarnation.clone()).collect();
        for (ns, idx) in index {
            for slot in &idx.slots.slots {
                if let Some(c) = routes.counters(ns, &slot.name_any()) {
                    let st = slot.status.clone().unwrap_or_default();
                    c.rebase(&st.upstream, &st.downstream);
                }
            }
        }
        self.membership();
    }

    /// Forgets everything (no longer the leader).
    pub(super) fn clear(&mut self) {
        self.cache.clear();
        self.waiting.clear();
        self.folds.clear();
        self.baseline.clear();
        self.plans.clear();
    }

    /// Adds the live peers' partials of `ns` to `st`; `Err` says why the namespace must wait
    /// (a peer's partial is of another plan, or missing).
    pub(super) fn merge_into(&mut self, ns: &str, st: &mut NamespaceStatus<'_>) -> Result<(), String> {
        let plan = fingerprint(st.index);
        let now = Instant::now();
        let since = match self.plans.get_mut(ns) {
            Some((fp, since)) if *fp == plan => *since,
            Some(entry) => {
                *entry = (plan, now);
                now
            }
            None => {
                self.plans.insert(ns.to_owned(), (plan, now));
                now
            }
        };
        // A peer that does not come to this plan (it does not answer, or does not manage the
        // namespace) holds it back no longer than the grace.
        let plan_is_old = now.duration_since(since) >= FIRST_ANSWER_GRACE;
        for m in self.peers.others().iter() {
            let Some(cache) = self.cache.get(&m.incarnation) else {
                if self
                    .waiting
                    .get(&m.incarnation)
                    .is_none_or(|at| now.duration_since(*at) < FIRST_ANSWER_GRACE)
                {
                    return Err(format!("waiting for peer {}'s first answer", m.identity));
                }
                continue; // silent too long: counts as no agents
            };
            let silent = cache.answered.is_none_or(|at| now.duration_since(at) >= FIRST_ANSWER_GRACE);
            match cache.namespaces.get(ns) {
                Some(p) if p.plan == plan => st.merge(p),
                // Silent for long, or behind for long: its agents count as none.
                _ if silent || plan_is_old => {}
                Some(_) => return Err(format!("peer {} counted against another plan", m.identity)),
                None => return Err(format!("peer {} has not planned the namespace", m.identity)),
            }
        }
        Ok(())
    }
}

/// Folds what a peer's partial says of its slot counters into this replica's counters.
fn fold(
    folds: &mut HashMap<(String, String), HashMap<Arc<str>, Folded>>,
    incarnation: &Arc<str>,
    ns: &str,
    partial: &Partial,
    baseline: bool,
    routes: &Routes,
) {
    for (slot, part) in &partial.slots {
        let Some(now) = &part.counters else { continue };
        let Some(counters) = routes.counters(ns, slot) else { continue }; // folded once routed
        let per = folds.entry((ns.to_owned(), slot.clone())).or_default();
        let delta = match per.get(incarnation) {
            Some(prev) if prev.id == now.id => Some(increments(&prev.counters, now)),
            Some(_) => Some(now.clone()), // new counters: from 0
            None if baseline => None,
            None => Some(now.clone()),
        };
        if let Some(delta) = delta {
            counters.fold(&delta.upstream, &delta.downstream);
        }
        per.insert(incarnation.clone(), Folded { id: now.id, counters: now.clone() });
    }
}

/// What `now` adds to `prev` (the same counters, later), its error only when new.
fn increments(prev: &SlotIncrements, now: &SlotIncrements) -> SlotIncrements {
    let (p, n) = (&prev.upstream, &now.upstream);
    let (pd, nd) = (&prev.downstream, &now.downstream);
    SlotIncrements {
        id: now.id,
        upstream: UpstreamStatus {
            received: n.received.saturating_sub(p.received),
            delivered: n.delivered.saturating_sub(p.delivered),
            failed: n.failed.saturating_sub(p.failed),
            last_delivery_time: n.last_delivery_time.clone(),
            last_error: n.last_error.clone().filter(|_| n.last_error != p.last_error),
        },
        downstream: DownstreamStatus {
            accepted: nd.accepted.saturating_sub(pd.accepted),
            sent: nd.sent.saturating_sub(pd.sent),
            expired: nd.expired.saturating_sub(pd.expired),
            rejected: nd.rejected.saturating_sub(pd.rejected),
            last_send_time: nd.last_send_time.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentConfig, CapabilitySlot};
    use crate::controller::refs::Refs;
    use crate::controller::rollout::Tracker;
    use crate::fleet::{AgentKey, Tenant};
    use crate::proto::{
        AgentDescription, AgentToServer, AnyValue, CustomCapabilities, KeyValue, RemoteConfigStatus,
        RemoteConfigStatuses, any_value,
    };
    use crate::protocol::Transport;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const OBJECTS: &str = "
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: base, namespace: team-a, generation: 1}
spec:
  selector: {matchAttributes: {service.name: edge}}
  files: {shared.yaml: {inline: 'from: base'}}
---
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: override, namespace: team-a, generation: 1}
spec:
  selector: {matchAttributes: {tier: gold}}
  files: {shared.yaml: {inline: 'from: override'}}
---
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: rolled, namespace: team-a, generation: 1}
spec:
  selector: {matchAttributes: {service.name: edge}}
  files: {rolled.yaml: {inline: 'v: 1'}}
  rollout: {strategy: Progressive, steps: [50]}
";
    #[test]
    fn an_offline_http_agent_another_replica_owns_is_counted_there_only() {
        let idx = Arc::new(index());
        let fleet = Fleet::default();
        fleet.publish_plan("team-a", idx.clone());
        let peers = Peers::solo();
        let other =
            Member { identity: "replica-b".into(), incarnation: "1".into(), address: "127.0.0.1:9".into() };
        peers.set_others(vec![other]);
        let uid = (1..=255u8).map(|i| Uid([i; 16])).find(|u| peers.owner(u).is_some()).expect("one of them");
        let mut conn = fleet.connection(Transport::Http, Tenant::new("team-a"));
        let desc = AgentDescription {
            identifying_attributes: vec![attr("service.name", "edge")],
            non_identifying_attributes: vec![],
        };
        let hello = AgentToServer {
            instance_uid: uid.to_wire(),
            capabilities: 0x7,
            agent_description: Some(desc),
            ..Default::default()
        };
        fleet.handle(&mut conn, hello).unwrap();
        let namespaces = vec![("team-a".to_owned(), idx.clone())];
        let selected = |peers: &Peers| count(&fleet, peers, &namespaces)["team-a"].configs[0].selected;
        // Polled here while its owner did not answer: counted here while online.
        assert_eq!(selected(&peers), 1);
        // The owner answers again (a membership change): released here, counted by the owner.
        fleet.release_http_agents(|uid| peers.owner(uid).is_none());
        assert_eq!(selected(&peers), 0, "the owner counts it");
        assert_eq!(selected(&Peers::solo()), 1, "alone, an offline agent counts (pending)");
    }

    const SLOT: &str = "
apiVersion: opamp.dev/v1alpha1
kind: CapabilitySlot
metadata: {name: pprof, namespace: team-a, generation: 1}
spec:
  capability: com.example.pprof
";

    /// The objects; the progressive rollout admits about half of the key space.
    fn index() -> NamespaceIndex {
        use serde::Deserialize as _;
        let mut configs: Vec<AgentConfig> = serde_yaml::Deserializer::from_str(OBJECTS)
            .map(|d| AgentConfig::deserialize(d).unwrap())
            .collect();
        let slot: CapabilitySlot = serde_yaml::from_str(SLOT).unwrap();
        let refs = Refs::new().0;
        let resolve = |configs: &[AgentConfig]| {
            let configs = configs.iter().cloned().map(Arc::new).collect();
            NamespaceIndex::resolve(configs, vec![Arc::new(slot.clone())], &[], &refs)
        };
        let hash = resolve(&configs).configs[2].own_hash.unwrap();
        configs[2].status = Some(crate::api::AgentConfigStatus {
            observed_generation: Some(1),
            config_hash: Some(crate::controller::merge::display_hash(&hash)),
            rollout: Some(crate::api::RolloutStatus {
                step: 1,
                state: crate::api::RolloutState::Progressing,
                admitted_up_to: Some("7fffffffffffffff".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let idx = resolve(&configs);
        assert!(matches!(idx.configs[2].admission, Admission::UpTo(_)));
        idx
    }

    fn attr(key: &str, value: &str) -> KeyValue {
        let value = Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) });
        KeyValue { key: key.into(), value }
    }

    /// Agent `i`: every third one gold (two configs conflict on a file), every fourth one
    /// declares the slot's capability, every fifth one fails what it is sent.
    fn connect(fleet: &Fleet, i: u8) {
        let uid = Uid([i + 1; 16]);
        let mut attrs = vec![attr("service.name", "edge")];
        if i % 3 == 0 {
            attrs.push(attr("tier", "gold"));
        }
        let desc = AgentDescription { identifying_attributes: attrs, non_identifying_attributes: vec![] };
        let caps =
            (i % 4 == 0).then(|| CustomCapabilities { capabilities: vec!["com.example.pprof".into()] });
        let mut conn = fleet.connection(Transport::WebSocket, Tenant::new("team-a"));
        let hello = AgentToServer {
            instance_uid: uid.to_wire(),
            capabilities: 0x7,
            agent_description: Some(desc.clone()),
            custom_capabilities: caps.clone(),
            ..Default::default()
        };
        fleet.handle(&mut conn, hello).unwrap();
        let desired = fleet.desired_state(&AgentKey::new("team-a", uid)).unwrap();
        // Not admitted yet by the rollout: it has nothing to apply.
        let hash = desired.remote_config.map(|c| c.config_hash.clone()).unwrap_or_default();
        let (status, error_message) = match i % 5 {
            0 => (RemoteConfigStatuses::Failed, format!("agent {i} cannot")),
            1 => (RemoteConfigStatuses::Applying, String::new()),
            _ => (RemoteConfigStatuses::Applied, String::new()),
        };
        let report = AgentToServer {
            instance_uid: uid.to_wire(),
            sequence_num: 1,
            capabilities: 0x7,
            agent_description: Some(desc),
            custom_capabilities: caps,
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: status as i32,
                error_message,
            }),
            ..Default::default()
        };
        fleet.handle(&mut conn, report).unwrap();
        std::mem::forget(conn); // stays connected
    }

    fn fleet_with(idx: &Arc<NamespaceIndex>, agents: impl IntoIterator<Item = u8>) -> Fleet {
        let fleet = Fleet::default();
        fleet.publish_plan("team-a", idx.clone());
        for i in agents {
            connect(&fleet, i);
        }
        fleet
    }

    fn statuses(st: &NamespaceStatus<'_>, routes: &Routes) -> String {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let configs = st.agent_configs(&now, &mut HashMap::new(), &HashMap::new());
        let slots = st.capability_slots(&now, routes);
        serde_json::to_string_pretty(&(configs, slots)).unwrap()
    }

    fn sorted_facts(st: &NamespaceStatus<'_>) -> BTreeMap<usize, Vec<(u64, u8)>> {
        st.facts
            .iter()
            .map(|(i, f)| {
                let mut f: Vec<(u64, u8)> = f.iter().map(|a| (Fact::from(a).0, Fact::from(a).1)).collect();
                f.sort_unstable();
                (*i, f)
            })
            .collect()
    }

    #[test]
    fn two_replicas_merged_count_as_one_replica_holding_every_agent() {
        let idx = Arc::new(index());
        let namespaces = vec![("team-a".to_owned(), idx.clone())];
        let routes =
            Routes::new(Fleet::default(), Arc::default(), crate::routes::egress::EgressPolicy::default());
        let one = fleet_with(&idx, 0..24);
        let (a, b) = (
            fleet_with(&idx, (0..24).filter(|i| i % 2 == 0)),
            fleet_with(&idx, (0..24).filter(|i| i % 2 == 1)),
        );

        let whole = count(&one, &Peers::solo(), &namespaces).remove("team-a").unwrap();
        let mut leader = count(&a, &Peers::solo(), &namespaces).remove("team-a").unwrap();
        let follower = count(&b, &Peers::solo(), &namespaces).remove("team-a").unwrap();
        // The follower's partial travels as JSON.
        let wire = serde_json::to_vec(&follower.to_partial("team-a", None)).unwrap();
        let partial: Partial = serde_json::from_slice(&wire).unwrap();
        assert_eq!(partial.plan, fingerprint(&idx));
        leader.merge(&partial);

        let expected = statuses(&whole, &routes);
        assert_eq!(statuses(&leader, &routes), expected);
        assert!(expected.contains("\"selectedAgents\": 24"), "{expected}");
        assert!(expected.contains("FileConflict"), "the gold agents' selections conflict: {expected}");
        assert!(expected.contains("\"supportingAgents\": 6"), "{expected}");
        assert!(expected.contains("cannot"), "failures: {expected}");
        // The rollout tracker steps the same over both.
        assert_eq!(sorted_facts(&leader), sorted_facts(&whole));
        let config = &idx.configs[2];
        let (mut t1, mut t2) = (
            Tracker::new(config.own_hash.unwrap(), Some(1), None),
            Tracker::new(config.own_hash.unwrap(), Some(1), None),
        );
        let now = Instant::now();
        let mut rollout = config.object.spec.rollout.clone();
        rollout.steps = vec![90]; // more than the agents that run the version already
        rollout.max_failures = Some(0);
        assert!(t1.advance(&rollout, &whole.facts[&2], now, Err("none")));
        t2.advance(&rollout, &leader.facts[&2], now, Err("none"));
        assert_eq!(t1, t2);
        assert!(t1.stopped(), "failed agents of both replicas are more than maxFailures (0)");
        rollout.max_failures = Some(24);
        let (mut t1, mut t2) = (
            Tracker::new(config.own_hash.unwrap(), Some(1), None),
            Tracker::new(config.own_hash.unwrap(), Some(1), None),
        );
        assert!(t1.advance(&rollout, &whole.facts[&2], now, Err("none")));
        t2.advance(&rollout, &leader.facts[&2], now, Err("none"));
        assert_eq!(t1, t2);
        assert!(t1.admitted_up_to.is_some(), "the first step admitted agents");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peers_partial_counts_against_the_same_plan_only_and_while_the_peer_is_a_member() {
        let idx = Arc::new(index());
        let fleet = fleet_with(&idx, 0..4);
        let namespaces = vec![("team-a".to_owned(), idx.clone())];
        let mut partial = count(&fleet, &Peers::solo(), &namespaces)["team-a"].to_partial("team-a", None);
        let peers = Peers::solo();
        let (mut gather, _rx) = Gather::new(peers.clone());
        let peer = Member { identity: "b".into(), incarnation: "b1".into(), address: "b:1".into() };
        peers.set_others(vec![peer.clone()]);
        gather.membership();
        let mut st = NamespaceStatus::new(&idx);
        assert!(gather.merge_into("team-a", &mut st).is_err(), "no answer yet");

        partial.plan ^= 1;
        let answer = |partial: &Partial| StatusAnswer {
            incarnation: "b1".into(),
            epoch: 7,
            full: true,
            partials: vec![NamespacePartial { namespace: "team-a".into(), partial: partial.clone() }],
        };
        let routes =
            Routes::new(Fleet::default(), Arc::default(), crate::routes::egress::EgressPolicy::default());
        let dirty = gather.apply(vec![(peer.clone(), Ok(answer(&partial)))], &routes);
        assert!(dirty.contains("team-a"));
        assert!(gather.merge_into("team-a", &mut NamespaceStatus::new(&idx)).is_err(), "another plan");
        // A peer that stays on another plan holds the status back no longer than the grace.
        tokio::time::advance(FIRST_ANSWER_GRACE).await;
        gather.apply(vec![(peer.clone(), Ok(answer(&partial)))], &routes);
        let mut st = NamespaceStatus::new(&idx);
        gather.merge_into("team-a", &mut st).unwrap();
        assert_eq!(st.configs[0].selected, 0, "its agents count as none");
        partial.plan ^= 1;
        gather.apply(vec![(peer.clone(), Ok(answer(&partial)))], &routes);
        let mut st = NamespaceStatus::new(&idx);
        gather.merge_into("team-a", &mut st).unwrap();
        assert_eq!(st.configs[0].selected, 4);
        // The peer does not answer: its last partial stays while it is a member.
        let silent = Err(CallError::Token("unreachable".into()));
        assert!(gather.apply(vec![(peer.clone(), silent)], &routes).is_empty());
        let mut st = NamespaceStatus::new(&idx);
        gather.merge_into("team-a", &mut st).unwrap();
        assert_eq!(st.configs[0].selected, 4);
        // The peer leaves: its agents stop counting.
        peers.set_others(vec![]);
        assert!(gather.membership().contains("team-a"));
        let mut st = NamespaceStatus::new(&idx);
        gather.merge_into("team-a", &mut st).unwrap();
        assert_eq!(st.configs[0].selected, 0);
    }

    #[test]
    fn a_peers_slot_counters_are_folded_once_and_a_new_incarnation_starts_from_zero() {
        use crate::routes::SlotCounters;
        let idx = Arc::new(index());
        let routes =
            Routes::new(Fleet::default(), Arc::default(), crate::routes::egress::EgressPolicy::default());
        let slot = crate::controller::index::slot_route(&idx.slots.slots[0], &Refs::new().0);
        let seed = UpstreamStatus { received: 100, ..Default::default() };
        routes.publish("team-a", vec![(slot, seed.clone(), DownstreamStatus::default())]);
        let mine = routes.counters("team-a", "pprof").unwrap();
        assert_eq!(mine.local().0.received, 0, "the seed is not this replica's");
        mine.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);

        let peer_counters = SlotCounters::default();
        let report = |c: &SlotCounters, inc: &str| {
            let (upstream, downstream) = c.local();
            let partial = Partial {
                slots: [(
                    "pprof".to_owned(),
                    SlotPart {
                        supporting: 0,
                        counters: Some(SlotIncrements { id: c.id(), upstream, downstream }),
                    },
                )]
                .into(),
                ..Default::default()
            };
            let answer = StatusAnswer {
                incarnation: inc.into(),
                epoch: 1,
                full: false,
                partials: vec![NamespacePartial { namespace: "team-a".into(), partial }],
            };
            let member = Member { identity: "b".into(), incarnation: inc.into(), address: "b:1".into() };
            (member, Ok(answer))
        };
        let peers = Peers::solo();
        let (mut gather, _rx) = Gather::new(peers.clone());
        peers.set_others(vec![report(&peer_counters, "b1").0]);
        peer_counters.received.fetch_add(5, std::sync::atomic::Ordering::Relaxed);
        gather.apply(vec![report(&peer_counters, "b1")], &routes);
        gather.apply(vec![report(&peer_counters, "b1")], &routes); // the same again: nothing new
        assert_eq!(mine.upstream().received, 106);
        peer_counters.received.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        gather.apply(vec![report(&peer_counters, "b1")], &routes);
        assert_eq!(mine.upstream().received, 108);
        assert_eq!(mine.local().0.received, 1, "folded increments are not this replica's own");
        // The peer restarts: its new counters count from 0.
        let restarted = SlotCounters::default();
        restarted.received.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        peers.set_others(vec![report(&restarted, "b2").0]);
        gather.membership();
        gather.apply(vec![report(&restarted, "b2")], &routes);
        assert_eq!(mine.upstream().received, 111);
        // A new leader starts from the status and takes the peers' first report as baseline.
        let mut plans = HashMap::new();
        let mut slot = (*idx.slots.slots[0]).clone();
        slot.status = Some(crate::api::CapabilitySlotStatus {
            upstream: UpstreamStatus { received: 120, ..Default::default() },
            ..Default::default()
        });
        let mut taken = index();
        taken.slots.slots = vec![Arc::new(slot)];
        plans.insert("team-a".to_owned(), Arc::new(taken));
        gather.take_over(&plans, &routes);
        gather.apply(vec![report(&restarted, "b2")], &routes);
        assert_eq!(mine.upstream().received, 120);
        restarted.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        gather.apply(vec![report(&restarted, "b2")], &routes);
        assert_eq!(mine.upstream().received, 121);
    }

    #[test]
    fn a_peer_answers_only_the_namespaces_changed_since_the_askers_epoch() {
        let idx = Arc::new(index());
        let fleet = fleet_with(&idx, 0..3);
        let shared = Arc::new(Shared::default());
        let names = ["team-a".to_owned(), "team-b".to_owned()];
        shared.index.write().extend(names.iter().map(|ns| (ns.clone(), idx.clone())));
        shared.log.lock().note(&names);
        let routes =
            Routes::new(fleet.clone(), Arc::default(), crate::routes::egress::EgressPolicy::default());
        let served =
            Served { shared: shared.clone(), fleet, routes, incarnation: "me1".into(), peers: Peers::solo() };
        let ask = |since: u64, incarnation: &str| {
            let a = served.answer(&StatusRequest { since, incarnation: incarnation.into() });
            let mut namespaces: Vec<String> = a.partials.iter().map(|p| p.namespace.clone()).collect();
            namespaces.sort();
            (a.epoch, a.full, namespaces)
        };
        let (epoch, full, all) = ask(0, "me1");
        assert!(full);
        assert_eq!(all, names);
        assert_eq!(ask(epoch, "me1"), (epoch, false, vec![]), "nothing changed: nothing but the epoch");
        shared.log.lock().note(&["team-b".to_owned()]);
        let (later, full, changed) = ask(epoch, "me1");
        assert!(later > epoch && !full);
        assert_eq!(changed, ["team-b"]);
        assert!(ask(later, "me0").1, "asked as another incarnation: everything");
        assert!(ask(later + 10, "me1").1, "an epoch never given: everything");
        let a = served.answer(&StatusRequest { since: 0, incarnation: "me1".into() });
        let selected: BTreeMap<&str, u32> =
            a.partials.iter().map(|p| (p.namespace.as_str(), p.partial.configs["base"].selected)).collect();
        assert_eq!(selected, [("team-a", 3), ("team-b", 0)].into(), "its own agents, by namespace");
        assert!(a.partials.iter().all(|p| p.partial.plan == fingerprint(&idx)));
    }
}
