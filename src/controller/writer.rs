//! The status writer: statuses computed on the leader go through a bounded queue to a task
//! that patches them, up to [`WRITERS`] at once (never two of one object), each under a
//! deadline, while this replica leads. A slow or failing API server delays status, never
//! planning: configs reach agents whatever the writer does.
//!
//! The queue holds one update per object (a newer one replaces a waiting one, keeping its
//! Events) and Events of their own, at most [`QUEUE_CAPACITY`] in all; beyond that updates are
//! dropped and counted, and their namespaces recomputed on the next pass. A patch that fails or
//! times out is recomputed the same way.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::FIELD_MANAGER;
use super::error::{Error, Errors};
use super::metrics::{ControllerMetrics, StateLabel};
use super::status;
use crate::api::{AgentConfig, AgentConfigStatus, CapabilitySlot, CapabilitySlotStatus};

/// Updates and Events waiting at most.
pub const QUEUE_CAPACITY: usize = 1024;
/// Patches (and Events) in flight at once: with an API server answering in `t`, at most
/// `WRITERS / t` status writes a second.
pub const WRITERS: usize = 8;
/// How long one status patch or Event may take.
pub const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A status as computed, of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Boxed: an AgentConfig's status is several times a slot's.
    Config(Box<AgentConfigStatus>),
    Slot(CapabilitySlotStatus),
}

impl Status {
    /// Whether `self` differs from `other` in anything but condition timestamps.
    pub fn differs(&self, other: Option<&Status>) -> bool {
        match (self, other) {
            (Status::Config(new), Some(Status::Config(cur))) => {
                let strip = |s: &AgentConfigStatus| AgentConfigStatus { conditions: vec![], ..s.clone() };
                status::changed(Some(&**cur), &**new, |s| &s.conditions, strip)
            }
            (Status::Slot(new), Some(Status::Slot(cur))) => {
                let strip =
                    |s: &CapabilitySlotStatus| CapabilitySlotStatus { conditions: vec![], ..s.clone() };
                status::changed(Some(cur), new, |s| &s.conditions, strip)
            }
            _ => true,
        }
    }
}

/// The object a status belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// An Event to record: (type, reason, note, action).
pub type Transition = (EventType, &'static str, String, String);

/// A status to write, with the Events its changes tell.
#[derive(Debug, Clone)]
pub struct StatusWrite {
    pub reference: ObjectReference,
    pub status: Status,
    pub events: Vec<Transition>,
}

enum Job {
    Status(ObjectKey),
    Event(Box<(ObjectReference, Event)>),
}

/// What the writer does next (a few at a time, short-lived: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Next {
    Status(ObjectKey, StatusWrite),
    Event(Box<(ObjectReference, Event)>),
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    waiting: HashMap<ObjectKey, StatusWrite>,
    /// The last status queued per object, until the watch shows it written (or it failed).
    sent: HashMap<ObjectKey, Status>,
    /// Namespaces to recompute (an update dropped, failed or timed out).
    retry: HashSet<String>,
    /// Objects with a patch in flight: their next update waits for it.
    in_flight: HashSet<ObjectKey>,
}

/// The bounded queue between status compute and the writer.
pub struct StatusQueue {
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
    metrics: Arc<ControllerMetrics>,
}

impl StatusQueue {
    pub fn new(capacity: usize, metrics: Arc<ControllerMetrics>) -> Self {
        Self { state: Mutex::default(), notify: Notify::new(), capacity, metrics }
    }

    /// The status last queued for an object and not yet seen written.
    pub fn last_sent(&self, key: &ObjectKey) -> Option<Status> {
        self.state.lock().sent.get(key).cloned()
    }

    /// The watch shows the object's status as computed: nothing is in flight for it.
    pub fn caught_up(&self, key: &ObjectKey) {
        self.state.lock().sent.remove(key);
    }

    /// Queues a status; replaces one still waiting for the same object (its Events are kept).
    /// Returns false when the queue is full (the update is dropped and its namespace retried).
    pub fn push_status(&self, key: ObjectKey, mut write: StatusWrite) -> bool {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        // Bounded by objects with a write in flight; a deleted object's entry costs at most
        // one redundant patch when this is cleared.
        if state.sent.len() > 4 * self.capacity {
            state.sent.clear();
        }
        if let Some(waiting) = state.waiting.get_mut(&key) {
            state.sent.insert(key, write.status.clone());
            write.events.splice(0..0, waiting.events.drain(..));
            *waiting = write;
            return true;
        }
        if state.jobs.len() >= self.capacity {
            state.retry.insert(key.namespace);
            drop(guard);
            self.metrics.status_updates_dropped.inc();
            return false;
        }
        state.sent.insert(key.clone(), write.status.clone());
        state.waiting.insert(key.clone(), write);
        state.jobs.push_back(Job::Status(key));
        self.queued(state.jobs.len());
        true
    }

    /// Queues an Event (dropped and counted when the queue is full).
    pub fn push_event(&self, reference: ObjectReference, event: Event) {
        let mut state = self.state.lock();
        if state.jobs.len() >= self.capacity {
            drop(state);
            self.metrics.status_updates_dropped.inc();
            return;
        }
        state.jobs.push_back(Job::Event(Box::new((reference, event))));
        self.queued(state.jobs.len());
    }

    fn queued(&self, depth: usize) {
        self.metrics.status_queue_depth.set(depth as i64);
        self.notify.notify_one();
    }

    /// The namespaces to recompute since the last call.
    pub fn take_retry(&self) -> HashSet<String> {
        std::mem::take(&mut self.state.lock().retry)
    }

    /// Forgets everything (leadership lost: the next leader computes anew).
    pub fn clear(&self) {
        *self.state.lock() = State::default();
        self.metrics.status_queue_depth.set(0);
    }

    fn failed(&self, key: &ObjectKey) {
        let mut state = self.state.lock();
        state.sent.remove(key);
        state.retry.insert(key.namespace.clone());
    }

    /// The next job; `None` when the queue is empty or holds only updates of objects with a
    /// patch in flight (they keep their place).
    fn pop(&self) -> Option<Next> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        loop {
            let position = state.jobs.iter().position(|job| match job {
                Job::Status(key) => !state.in_flight.contains(key),
                Job::Event(_) => true,
            })?;
            let job = state.jobs.remove(position)?;
            self.metrics.status_queue_depth.set(state.jobs.len() as i64);
            match job {
                Job::Status(key) => {
                    if let Some(write) = state.waiting.remove(&key) {
                        state.in_flight.insert(key.clone());
                        return Some(Next::Status(key, write));
                    }
                }
                Job::Event(event) => return Some(Next::Event(event)),
            }
        }
    }

    /// The patch of `key` is over: its next update may go.
    fn done(&self, key: &ObjectKey) {
        self.state.lock().in_flight.remove(key);
        self.notify.notify_one();
    }

    async fn next(&self) -> Next {
        loop {
            let notified = self.notify.notified();
            if let Some(job) = self.pop() {
                return job;
            }
            notified.await;
        }
    }
}

/// Writes what the queue holds while `leader` is true, until `shutdown`.
pub async fn run(
    queue: Arc<StatusQueue>,
    client: Client,
    errors: Errors,
    leader: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let writer = Arc::new(Writer { client, errors, metrics: queue.metrics.clone() });
    let mut running = tokio::task::JoinSet::new();
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            job = queue.next(), if running.len() < WRITERS => job,
        };
        if !*leader.borrow() {
            queue.clear(); // a follower writes nothing; the next leader computes anew
            continue;
        }
        let (writer, queue) = (writer.clone(), queue.clone());
        running.spawn(async move {
            match job {
                Next::Status(key, write) => {
                    if writer.status(&key, &write).await {
                        for (type_, reason, note, action) in write.events {
                            let ev = Event {
                                type_,
                                reason: reason.into(),
                                note: Some(note),
                                action,
                                secondary: None,
                            };
                            writer.event(&write.reference, &ev).await;
                        }
                    } else {
                        queue.failed(&key);
                    }
                    queue.done(&key);
                }
                Next::Event(event) => writer.event(&event.0, &event.1).await,
            }
        });
    }
}

struct Writer {
    client: Client,
    errors: Errors,
    metrics: Arc<ControllerMetrics>,
}

impl Writer {
    /// Patches one status through the status subresource (server-side apply); false when it
    /// failed or timed out.
    async fn status(&self, key: &ObjectKey, write: &StatusWrite) -> bool {
        let result = match &write.status {
            Status::Config(s) => self.patch::<AgentConfig, _>(key, s).await,
            Status::Slot(s) => self.patch::<CapabilitySlot, _>(key, s).await,
        };
        let state = match &result {
            Ok(Ok(())) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        self.metrics.status_patches.get_or_create(&StateLabel { state }).inc();
        let object = Box::new(write.reference.clone());
        let error = match result {
            Ok(Ok(())) => return true,
            Ok(Err(source)) => Error::Patch { object, source },
            Err(_) => Error::PatchTimeout { object, after: PATCH_TIMEOUT },
        };
        // Deleted meanwhile: counted, but there is nobody to tell.
        let gone = matches!(&error, Error::Patch { source: kube::Error::Api(s), .. } if s.code == 404);
        if gone {
            self.errors.count(&error);
        } else if tokio::time::timeout(PATCH_TIMEOUT, self.errors.report(&error)).await.is_err() {
            tracing::debug!("event not recorded: timed out");
        }
        false
    }

    async fn patch<K, S>(
        &self,
        key: &ObjectKey,
        status: &S,
    ) -> Result<Result<(), kube::Error>, tokio::time::error::Elapsed>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        S: serde::Serialize,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&patch);
        let call = api.patch_status(&key.name, &params, &patch);
        tokio::time::timeout(PATCH_TIMEOUT, call).await.map(|r| r.map(drop))
    }

    async fn event(&self, reference: &ObjectReference, event: &Event) {
        if tokio::time::timeout(PATCH_TIMEOUT, self.errors.publish(event, reference)).await.is_err() {
            tracing::debug!("event not recorded: timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey { kind: "AgentConfig", namespace: "ns".into(), name: name.into() }
    }

    fn write(applied: u32, event: &'static str) -> StatusWrite {
        StatusWrite {
            reference: ObjectReference::default(),
            status: Status::Config(Box::new(AgentConfigStatus {
                applied_agents: applied,
                ..Default::default()
            })),
            events: vec![(EventType::Normal, event, String::new(), String::new())],
        }
    }

    #[test]
    fn a_newer_status_replaces_a_waiting_one_and_keeps_its_events() {
        let q = StatusQueue::new(4, Arc::new(ControllerMetrics::default()));
        assert!(q.push_status(key("a"), write(1, "first")));
        assert!(q.push_status(key("a"), write(2, "second")));
        let Some(Next::Status(k, w)) = q.pop() else { panic!("a status") };
        assert_eq!(k, key("a"));
        assert_eq!(w.status, write(2, "").status);
        assert_eq!(w.events.iter().map(|e| e.1).collect::<Vec<_>>(), ["first", "second"]);
        assert!(q.pop().is_none());
        assert_eq!(q.last_sent(&key("a")), Some(write(2, "").status));
    }

    #[test]
    fn a_full_queue_drops_counts_and_retries_the_namespace() {
        let metrics = Arc::new(ControllerMetrics::default());
        let q = StatusQueue::new(2, metrics.clone());
        assert!(q.push_status(key("a"), write(1, "e")));
        assert!(q.push_status(key("b"), write(1, "e")));
        assert!(!q.push_status(key("c"), write(1, "e")));
        assert_eq!(metrics.status_updates_dropped.get(), 1);
        assert_eq!(metrics.status_queue_depth.get(), 2);
        assert_eq!(q.take_retry(), HashSet::from(["ns".to_owned()]));
        assert_eq!(q.last_sent(&key("c")), None, "a dropped update is not in flight");
        // A failed write is recomputed too.
        q.failed(&key("a"));
        assert_eq!(q.last_sent(&key("a")), None);
        assert_eq!(q.take_retry().len(), 1);
    }

    #[test]
    fn an_objects_next_update_waits_for_its_patch_in_flight_others_do_not() {
        let q = StatusQueue::new(8, Arc::new(ControllerMetrics::default()));
        assert!(q.push_status(key("a"), write(1, "e")));
        let Some(Next::Status(first, _)) = q.pop() else { panic!("a status") };
        assert_eq!(first, key("a"));
        assert!(q.push_status(key("a"), write(2, "e")));
        assert!(q.push_status(key("b"), write(1, "e")));
        let Some(Next::Status(other, _)) = q.pop() else { panic!("b's status") };
        assert_eq!(other, key("b"), "b goes while a is in flight");
        assert!(q.pop().is_none(), "a's next update waits for its patch");
        q.done(&key("a"));
        let Some(Next::Status(again, w)) = q.pop() else { panic!("a's next status") };
        assert_eq!((again, w.status), (key("a"), write(2, "").status));
    }

    #[test]
    fn statuses_differ_in_more_than_timestamps() {
        let a = write(1, "").status;
        assert!(!a.differs(Some(&a)));
        assert!(write(2, "").status.differs(Some(&a)));
        assert!(a.differs(None));
    }

    /// A writer against an API server that never answers, leading or not; with a status queued.
    struct Hanging {
        metrics: Arc<ControllerMetrics>,
        queue: Arc<StatusQueue>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        _leader: tokio::sync::watch::Sender<bool>,
    }

    impl Hanging {
        fn start(leading: bool) -> Self {
            let service = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
                std::future::pending::<Result<http::Response<kube::client::Body>, std::convert::Infallible>>()
                    .await
            });
            let client = Client::new(service, "default");
            let metrics = Arc::new(ControllerMetrics::default());
            let queue = Arc::new(StatusQueue::new(4, metrics.clone()));
            let reporter = kube::runtime::events::Reporter { controller: "test".into(), instance: None };
            let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter);
            let errors = Errors::new(metrics.clone(), recorder);
            let shutdown = CancellationToken::new();
            let (leader, leadership) = tokio::sync::watch::channel(leading);
            let task = tokio::spawn(run(queue.clone(), client, errors, leadership, shutdown.clone()));
            assert!(queue.push_status(key("a"), write(1, "e")));
            Self { metrics, queue, shutdown, task, _leader: leader }
        }

        fn timeouts(&self) -> u64 {
            self.metrics.status_patches.get_or_create(&StateLabel { state: "timeout" }).get()
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_patch_that_never_returns_times_out_is_counted_and_retried() {
        let w = Hanging::start(true);
        let mut retry = HashSet::new();
        while retry.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            retry = w.queue.take_retry();
        }
        assert_eq!(retry, HashSet::from(["ns".to_owned()]));
        assert_eq!(w.timeouts(), 1);
        let category = super::super::metrics::CategoryLabel { category: "timeout" };
        assert_eq!(w.metrics.controller_errors.get_or_create(&category).get(), 1);
        assert_eq!(w.queue.last_sent(&key("a")), None, "recomputed on the next pass");
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_api_server_gets_several_patches_at_once() {
        let w = Hanging::start(true);
        for name in ["b", "c", "d"] {
            assert!(w.queue.push_status(key(name), write(1, "e")));
        }
        tokio::time::sleep(PATCH_TIMEOUT + Duration::from_secs(1)).await;
        assert_eq!(w.timeouts(), 4, "the four patches waited side by side, not one after another");
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_writes_nothing() {
        let w = Hanging::start(false);
        tokio::time::sleep(PATCH_TIMEOUT * 2).await;
        assert_eq!(w.metrics.status_queue_depth.get(), 0);
        assert_eq!(w.timeouts(), 0);
        assert_eq!(w.queue.last_sent(&key("a")), None, "the queue was cleared");
        w.stop().await;
    }
}
