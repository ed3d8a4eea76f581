//! Custom-message routes: each CapabilitySlot is a channel between agents' plugins and a
//! user's service. Upstream, agents' CustomMessages are POSTed to the slot's callback
//! ([`upstream`]); downstream, services dispatch messages to agents through the API
//! ([`dispatch`]). The controller publishes the slots' settings here ([`Routes::publish`]) and
//! reads the counters back into the slots' status. Slots are written by tenants, so every
//! route is bounded (queues, records) and callbacks only go where [`egress`] allows.
//!
//! With several replicas ([`crate::peers`]), the dispatch API answers from any of them for
//! agents on any of them, and messages queued for an agent follow it to the replica it moves
//! to ([`peer`]).
pub mod dispatch;
pub mod egress;
mod metrics;
pub mod peer;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{AgentSelector, DownstreamStatus, UpstreamStatus};
use crate::fleet::Fleet;
use crate::peers::Peers;
use egress::{EgressPolicy, Refusal};
pub use metrics::{RouteMetrics, StateLabel};

/// A slot's settings, resolved (Secrets read).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRoute {
    pub namespace: String,
    pub name: String,
    pub capability: String,
    pub selector: AgentSelector,
    pub message_types: Vec<String>,
    pub callback: Option<CallbackRoute>,
    pub dispatch: Option<DispatchRoute>,
}

impl SlotRoute {
    pub fn allows(&self, message_type: &str) -> bool {
        self.message_types.is_empty() || self.message_types.iter().any(|t| t == message_type)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallbackRoute {
    pub url: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    /// The signing key, `None` when not configured; `Err` names a missing Secret key.
    pub signing_key: Option<Result<Vec<u8>, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRoute {
    /// The token callers present; `Err` names a missing Secret key.
    pub token: Result<Vec<u8>, String>,
    pub queue_limit: usize,
    pub ttl: Duration,
}

/// A slot's counters, shared by deliveries, dispatches and the status writer.
///
/// With several replicas each one counts what passes through it; the leader writes the total
/// (see `controller::peer`): the others report their own increments ([`Self::local`]), which
/// the leader adds to its counters ([`Self::fold`]). What is not this replica's own (the seed
/// from status and what was folded in) is kept apart in `base`, so `local` never reports it.
#[derive(Debug)]
pub struct SlotCounters {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub accepted: AtomicU64,
    pub sent: AtomicU64,
    pub expired: AtomicU64,
    pub rejected: AtomicU64,
    last: Mutex<Last>,
    /// Unique in this process: a replica's counters of a slot that start again (the slot
    /// routed anew) are told apart from the ones before.
    id: u64,
    /// The part of each counter that is not this replica's own, in [`Self::all`] order.
    base: Mutex<[u64; 7]>,
}

impl Default for SlotCounters {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            received: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last: Mutex::default(),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            base: Mutex::new([0; 7]),
        }
    }
}

#[derive(Debug, Default)]
struct Last {
    delivery: Option<Time>,
    send: Option<Time>,
    error: Option<String>,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl SlotCounters {
    /// Counters continuing from what the status already shows (across operator restarts).
    pub fn seeded(up: &UpstreamStatus, down: &DownstreamStatus) -> Self {
        let c = Self::default();
        c.received.store(up.received, Ordering::Relaxed);
        c.delivered.store(up.delivered, Ordering::Relaxed);
        c.failed.store(up.failed, Ordering::Relaxed);
        c.accepted.store(down.accepted, Ordering::Relaxed);
        c.sent.store(down.sent, Ordering::Relaxed);
        c.expired.store(down.expired, Ordering::Relaxed);
        c.rejected.store(down.rejected, Ordering::Relaxed);
        *c.last.lock() = Last {
            delivery: up.last_delivery_time.clone(),
            send: down.last_send_time.clone(),
            error: up.last_error.clone(),
        };
        *c.base.lock() = c.values();
        c
    }

    fn all(&self) -> [&AtomicU64; 7] {
        [
            &self.received,
            &self.delivered,
            &self.failed,
            &self.accepted,
            &self.sent,
            &self.expired,
            &self.rejected,
        ]
    }

    fn values(&self) -> [u64; 7] {
        self.all().map(|a| a.load(Ordering::Relaxed))
    }

    /// Tells these counters apart from others of the same slot in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What this replica counted itself since the counters started (neither the seed nor what
    /// was folded in), with its last times and error.
    pub fn local(&self) -> (UpstreamStatus, DownstreamStatus) {
        let base = *self.base.lock();
        let v = self.values();
        let d: [u64; 7] = std::array::from_fn(|i| v[i].saturating_sub(base[i]));
        let last = self.last.lock();
        (
            UpstreamStatus {
                received: d[0],
                delivered: d[1],
                failed: d[2],
                last_delivery_time: last.delivery.clone(),
                last_error: last.error.clone(),
            },
            DownstreamStatus {
                accepted: d[3],
                sent: d[4],
                expired: d[5],
                rejected: d[6],
                last_send_time: last.send.clone(),
            },
        )
    }

    /// Adds another replica's increments (`up`, `down` hold deltas) to these counters, not
    /// to [`Self::local`]; the later of the times wins, and a new error replaces this one.
    pub fn fold(&self, up: &UpstreamStatus, down: &DownstreamStatus) {
        let delta =
            [up.received, up.delivered, up.failed, down.accepted, down.sent, down.expired, down.rejected];
        let mut base = self.base.lock();
        for ((counter, b), d) in self.all().into_iter().zip(base.iter_mut()).zip(delta) {
            counter.fetch_add(d, Ordering::Relaxed);
            *b = b.saturating_add(d);
        }
        drop(base);
        let mut last = self.last.lock();
        if up.last_delivery_time.as_ref().is_some_and(|t| last.delivery.as_ref().is_none_or(|l| t > l)) {
            last.delivery = up.last_delivery_time.clone();
        }
        if down.last_send_time.as_ref().is_some_and(|t| last.send.as_ref().is_none_or(|l| t > l)) {
            last.send = down.last_send_time.clone();
        }
        if up.last_error.is_some() {
            last.error = up.last_error.clone();
        }
    }

    /// Starts again from what the status shows, nothing of it local (a new leader: the status
    /// holds every replica's counts as the previous leader last folded them). Increments of
    /// this replica not yet in that status are lost.
    pub fn rebase(&self, up: &UpstreamStatus, down: &DownstreamStatus) {
        let v = [up.received, up.delivered, up.failed, down.accepted, down.sent, down.expired, down.rejected];
        let mut base = self.base.lock();
        for (counter, value) in self.all().into_iter().zip(v) {
            counter.store(value, Ordering::Relaxed);
        }
        *base = v;
    }

    pub fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last.lock().delivery = Some(now());
    }

    pub fn failed(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.last.lock().error = Some(error);
    }

    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.last.lock().send = Some(now());
    }

    pub fn upstream(&self) -> UpstreamStatus {
        let last = self.last.lock();
        UpstreamStatus {
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            last_delivery_time: last.delivery.clone(),
            last_error: last.error.clone(),
        }
    }

    pub fn downstream(&self) -> DownstreamStatus {
        DownstreamStatus {
            accepted: self.accepted.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_send_time: self.last.lock().send.clone(),
        }
    }
}

type Key = (String, String);

struct Slot {
    route: Arc<SlotRoute>,
    counters: Arc<SlotCounters>,
    deliveries: Option<upstream::Worker>,
    /// Why the egress policy refuses the callback's URL, if it does: nothing is sent.
    refused: Option<Refusal>,
}

/// A routed slot, as a custom message needs it.
type Routed = (Arc<SlotRoute>, Arc<SlotCounters>, Option<upstream::Sender>, Option<Refusal>);

/// The routes of every slot, by namespace and name and by namespace and capability.
pub struct Routes {
    /// This, for what outlives a call (a queued message's permit).
    me: Weak<Routes>,
    fleet: Fleet,
    pub(crate) metrics: Arc<RouteMetrics>,
    egress: Arc<EgressPolicy>,
    /// The callbacks' client: resolves through the egress policy, follows no redirect (a
    /// redirect would lead past the policy's static check) and uses no proxy (the proxy, not
    /// the resolver, would pick the address).
    http: reqwest::Client,
    slots: RwLock<HashMap<Key, Slot>>,
    by_capability: RwLock<HashMap<Key, Key>>,
    /// Namespaces whose slots' counters moved since the status writer last looked.
    changed: Mutex<HashSet<String>>,
    /// Custom messages of capabilities no slot routes, refused.
    pub unrouted: AtomicU64,
    /// Messages accepted for delivery and not yet delivered or failed.
    pending: AtomicU64,
    pub(crate) dispatches: dispatch::Store,
    /// The other replicas (see [`peer`]).
    peers: Peers,
}

impl Routes {
    /// The routes of a replica alone.
    pub fn new(fleet: Fleet, metrics: Arc<RouteMetrics>, egress: EgressPolicy) -> Arc<Self> {
        Self::with_peers(fleet, metrics, egress, Peers::solo())
    }

    /// The routes of a replica acting as one with `peers` (see [`peer`]).
    pub fn with_peers(
        fleet: Fleet,
        metrics: Arc<RouteMetrics>,
        egress: EgressPolicy,
        peers: Peers,
    ) -> Arc<Self> {
        let egress = Arc::new(egress);
        let http = reqwest::Client::builder()
            .dns_resolver(egress::Resolver(egress.clone()))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("HTTP client builds");
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            fleet,
            metrics,
            egress,
            http,
            slots: RwLock::default(),
            by_capability: RwLock::default(),
            changed: Mutex::default(),
            unrouted: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            dispatches: dispatch::Store::default(),
            peers,
        })
    }

    /// Replaces the routes of one namespace with `routes` (the slots that own their
    /// capability), keeping counters and delivery queues of slots that stay.
    pub fn publish(
        self: &Arc<Self>,
        namespace: &str,
        routes: Vec<(SlotRoute, UpstreamStatus, DownstreamStatus)>,
    ) {
        let mut slots = self.slots.write();
        let mut by_cap = self.by_capability.write();
        let keep: HashSet<Key> =
            routes.iter().map(|(r, _, _)| (r.namespace.clone(), r.name.clone())).collect();
        slots.retain(|k, _| k.0 != namespace || keep.contains(k));
        by_cap.retain(|k, _| k.0 != namespace);
        for (route, up, down) in routes {
            let key = (route.namespace.clone(), route.name.clone());
            let refused = route.callback.as_ref().and_then(|c| self.egress.check_url(&c.url).err());
            by_cap.insert((route.namespace.clone(), route.capability.clone()), key.clone());
            let route = Arc::new(route);
            match slots.get_mut(&key) {
                Some(slot) => {
                    if let Some(w) = &slot.deliveries {
                        w.update(route.clone());
                    } else if route.callback.is_some() {
                        slot.deliveries =
                            Some(upstream::Worker::start(self.clone(), route.clone(), slot.counters.clone()));
                    }
                    slot.route = route;
                    slot.refused = refused;
                }
                None => {
                    let counters = Arc::new(SlotCounters::seeded(&up, &down));
                    let deliveries = route
                        .callback
                        .is_some()
                        .then(|| upstream::Worker::start(self.clone(), route.clone(), counters.clone()));
                    slots.insert(key, Slot { route, counters, deliveries, refused });
                }
            }
        }
    }

    pub fn route(&self, namespace: &str, name: &str) -> Option<(Arc<SlotRoute>, Arc<SlotCounters>)> {
        let slots = self.slots.read();
        slots.get(&(namespace.to_owned(), name.to_owned())).map(|s| (s.route.clone(), s.counters.clone()))
    }

    fn by_capability(&self, namespace: &str, capability: &str) -> Option<Routed> {
        let key = self.by_capability.read().get(&(namespace.to_owned(), capability.to_owned())).cloned()?;
        let slots = self.slots.read();
        let s = slots.get(&key)?;
        Some((
            s.route.clone(),
            s.counters.clone(),
            s.deliveries.as_ref().map(|w| w.sender()),
            s.refused.clone(),
        ))
    }

    /// Why the egress policy refuses a slot's callback, if it does (the slot is not Ready).
    pub fn callback_refused(&self, namespace: &str, name: &str) -> Option<String> {
        let slots = self.slots.read();
        let slot = slots.get(&(namespace.to_owned(), name.to_owned()))?;
        let url = slot.route.callback.as_ref().map(|c| c.url.as_str()).unwrap_or_default();
        slot.refused
            .as_ref()
            .map(|why| format!("callback {url} is refused by the callback egress policy: {why}"))
    }

    /// The messages and bytes a slot's callback queue holds (queued, waiting and in flight).
    pub fn queued(&self, namespace: &str, name: &str) -> Option<(usize, usize)> {
        let slots = self.slots.read();
        let slot = slots.get(&(namespace.to_owned(), name.to_owned()))?;
        Some(slot.deliveries.as_ref().map_or((0, 0), |w| w.queue().held()))
    }

    /// The counters of a slot, if it is routed.
    pub fn counters(&self, namespace: &str, name: &str) -> Option<Arc<SlotCounters>> {
        self.route(namespace, name).map(|(_, c)| c)
    }

    pub(crate) fn count_upstream(&self, state: &'static str) {
        self.metrics.custom_messages_upstream.get_or_create(&StateLabel { state }).inc();
    }

    /// Counts dispatch targets accepted and rejected by this replica.
    pub(crate) fn count_results(&self, accepted: u64, rejected: u64) {
        for (state, n) in [("accepted", accepted), ("rejected", rejected)] {
            if n > 0 {
                self.metrics.dispatch_results.get_or_create(&StateLabel { state }).inc_by(n);
            }
        }
    }

    pub(crate) fn touch(&self, namespace: &str) {
        self.changed.lock().insert(namespace.to_owned());
    }

    /// Namespaces whose counters moved since the last call.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(&mut *self.changed.lock())
    }

    pub(crate) fn delivery_started(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn delivery_ended(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Waits until every accepted message was delivered or failed, at most `grace`; returns
    /// how many were still pending.
    pub async fn drain(&self, grace: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let pending = self.pending.load(Ordering::Acquire);
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                return pending;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Expires overdue dispatched messages; run every second (see [`Routes::run_expiry`]).
    pub async fn run_expiry(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                now = tick.tick() => self.dispatches.expire(now),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_under_the_routes_lock_does_not_fail_later_lookups() {
        let routes = Routes::new(Fleet::default(), Arc::default(), egress::EgressPolicy::default());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = routes.slots.write();
            panic!("a bug while the routes are locked");
        }));
        assert!(panicked.is_err());
        assert!(routes.route("team-a", "pprof").is_none());
        routes.publish("team-a", vec![]);
        assert!(routes.take_changed().is_empty());
    }
}
