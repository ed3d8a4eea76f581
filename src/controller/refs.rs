//! The content of the ConfigMaps and Secrets that AgentConfigs (`configMapKeyRef`,
//! `secretKeyRef`) and CapabilitySlots (`callback.signingSecretRef`, `dispatch.tokenSecretRef`)
//! reference, and of nothing else.
//!
//! Every other ConfigMap and Secret is known by its metadata only (the metadata watches of
//! [`super::watch`]): when planning a namespace finds a reference, the object is read with a
//! targeted GET (at most [`MAX_CONCURRENT_READS`] at a time), and read again whenever its
//! `resourceVersion` changes; its content is dropped once nothing references it any more.
//! A namespace is planned only once every object it references is read (or known to be
//! missing), so a new AgentConfig that references an existing ConfigMap never flaps through
//! `ReferenceNotFound`, nor sends a partial config. A read that fails (403, 5xx) is counted
//! (`opamp_controller_errors_total{category="read"}`) and retried with back-off (1 s doubling
//! up to [`MAX_RETRY_DELAY`]); until it succeeds the namespace keeps its previous plan.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::api::{AgentConfig, CapabilitySlot};

/// How many targeted reads are in flight at most.
pub const MAX_CONCURRENT_READS: usize = 8;
/// The longest wait before a failed read is tried again.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The two kinds a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ConfigMap,
    Secret,
}

impl Kind {
    /// The kind's name, as in messages (`ConfigMap "otel" not found`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
        }
    }
}

/// A referenced object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl Key {
    /// The object `name` of `kind` in `namespace`.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self { kind, namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

/// What is kept of a referenced object: its values by key (a ConfigMap's `data` and
/// `binaryData`, a Secret's `data`) and the version they are of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub resource_version: String,
    pub values: BTreeMap<String, Bytes>,
}

impl Content {
    /// What is kept of a ConfigMap read.
    pub fn of_config_map(cm: ConfigMap) -> Self {
        let mut values: BTreeMap<String, Bytes> =
            cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, Bytes::from(v.0))).collect();
        // `data` wins over `binaryData` for the same key (the API server refuses both anyway).
        values.extend(cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Bytes::from(v))));
        Self { resource_version: cm.metadata.resource_version.unwrap_or_default(), values }
    }

    /// What is kept of a Secret read.
    pub fn of_secret(s: Secret) -> Self {
        let values = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Bytes::from(v.0))).collect();
        Self { resource_version: s.metadata.resource_version.unwrap_or_default(), values }
    }
}

#[derive(Debug)]
enum State {
    /// A read is queued or in flight.
    Pending,
    Fetched(Arc<Content>),
    /// Not there (the metadata watch does not know it, or the read answered 404).
    Missing,
    /// The last read failed; it is tried again after a back-off.
    Failed,
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Bumped whenever a new read is wanted: the answer of an older one is dropped.
    generation: u64,
    failures: u32,
}

/// A read to make: the object, and the generation of the entry it is for.
pub type Request = (Key, u64);

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// What each namespace's AgentConfigs and CapabilitySlots reference.
    by_namespace: HashMap<String, BTreeSet<Key>>,
    /// Entries whose read is not answered yet (readiness waits until there are none).
    pending: usize,
}

/// The referenced objects' content, and the reads still to make.
pub struct Refs {
    inner: Mutex<Inner>,
    reads: mpsc::UnboundedSender<Request>,
    /// The number of reads not yet answered.
    outstanding: tokio::sync::watch::Sender<usize>,
}

/// The objects `configs` and `slots` (of one namespace) reference.
pub fn referenced(
    namespace: &str,
    configs: &[Arc<AgentConfig>],
    slots: &[Arc<CapabilitySlot>],
) -> BTreeSet<Key> {
    let mut keys = BTreeSet::new();
    for config in configs {
        for file in config.spec.files.values() {
            if file.inline.is_some() {
                continue;
            }
            if let Some(r) = &file.config_map_key_ref {
                keys.insert(Key::new(Kind::ConfigMap, namespace, &r.name));
            } else if let Some(r) = &file.secret_key_ref {
                keys.insert(Key::new(Kind::Secret, namespace, &r.name));
            }
        }
        let Some(c) = config.spec.connection.as_ref() else { continue };
        // The headers (Secrets) and CA (a ConfigMap) of each destination and of the server.
        let destinations = [&c.own_metrics, &c.own_logs, &c.own_traces].into_iter().flatten();
        let server = c.server.as_ref().map(|s| (&s.headers, &s.ca_config_map_key_ref));
        for (headers, ca) in destinations.map(|d| (&d.headers, &d.ca_config_map_key_ref)).chain(server) {
            for h in headers {
                keys.insert(Key::new(Kind::Secret, namespace, &h.secret_key_ref.name));
            }
            if let Some(ca) = ca {
                keys.insert(Key::new(Kind::ConfigMap, namespace, &ca.name));
            }
        }
    }
    for slot in slots {
        let callback = slot.spec.callback.as_ref().and_then(|c| c.signing_secret_ref.as_ref());
        let dispatch = slot.spec.dispatch.as_ref().map(|d| &d.token_secret_ref);
        for r in callback.into_iter().chain(dispatch) {
            keys.insert(Key::new(Kind::Secret, namespace, &r.name));
        }
    }
    keys
}

impl Refs {
    /// An empty store, and the receiving end of the reads it asks for (see [`Refs::run`]).
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Request>) {
        let (reads, rx) = mpsc::unbounded_channel();
        let refs = Self { inner: Mutex::default(), reads, outstanding: tokio::sync::watch::Sender::new(0) };
        (Arc::new(refs), rx)
    }

    /// Sets what `namespace` references; `version` tells an object's `resourceVersion` as the
    /// metadata watch knows it (`None`: not there). New references to existing objects are
    /// read; content nothing references any more is dropped. True when every reference is
    /// resolved (read, or missing): the namespace can be planned.
    pub fn want(
        &self,
        namespace: &str,
        keys: BTreeSet<Key>,
        version: impl Fn(&Key) -> Option<String>,
    ) -> bool {
        let mut inner = self.inner.lock();
        let old = inner.by_namespace.remove(namespace).unwrap_or_default();
        for gone in old.difference(&keys) {
            if let Some(entry) = inner.entries.remove(gone)
                && matches!(entry.state, State::Pending)
            {
                inner.pending -= 1;
            }
        }
        let mut resolved = true;
        for key in &keys {
            match inner.entries.get(key).map(|e| &e.state) {
                Some(State::Fetched(_) | State::Missing) => {}
                Some(State::Pending | State::Failed) => resolved = false,
                None => {
                    let state = if version(key).is_some() {
                        resolved = false;
                        State::Pending
                    } else {
                        State::Missing
                    };
                    let pending = matches!(state, State::Pending);
                    inner.entries.insert(key.clone(), Entry { state, generation: 0, failures: 0 });
                    if pending {
                        inner.pending += 1;
                        let _ = self.reads.send((key.clone(), 0));
                    }
                }
            }
        }
        if !keys.is_empty() {
            inner.by_namespace.insert(namespace.to_owned(), keys);
        }
        self.publish(&inner);
        resolved
    }

    /// The metadata watch saw `key` at `version` (`None`: deleted). Returns the namespace to
    /// plan again when that changes what is known (a referenced object gone); a new version is
    /// read first (the namespace is planned once it is in).
    pub fn seen(&self, key: &Key, version: Option<&str>) -> Option<String> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let entry = inner.entries.get_mut(key)?;
        let replan = match (&entry.state, version) {
            (State::Fetched(c), Some(v)) if c.resource_version == v => return None,
            (State::Missing, None) => return None,
            (_, None) => {
                if matches!(entry.state, State::Pending) {
                    inner.pending -= 1;
                }
                entry.state = State::Missing;
                entry.generation += 1;
                true
            }
            (_, Some(_)) => {
                // Also while a read is under way: it may have answered the older version.
                if !matches!(entry.state, State::Pending) {
                    inner.pending += 1;
                }
                entry.state = State::Pending;
                entry.generation += 1;
                entry.failures = 0;
                let _ = self.reads.send((key.clone(), entry.generation));
                false
            }
        };
        self.publish(inner);
        replan.then(|| key.namespace.clone())
    }

    /// After a relist of `kind`'s metadata: each referenced object of that kind as
    /// [`Refs::seen`]. Returns the namespaces to plan again.
    pub fn relisted(&self, kind: Kind, version: impl Fn(&Key) -> Option<String>) -> BTreeSet<String> {
        let keys: Vec<Key> = self.inner.lock().entries.keys().filter(|k| k.kind == kind).cloned().collect();
        keys.iter().filter_map(|k| self.seen(k, version(k).as_deref())).collect()
    }

    /// Whether the read `request` is still wanted (a newer one, or none, replaced it).
    pub fn wanted(&self, (key, generation): &Request) -> bool {
        let inner = self.inner.lock();
        inner
            .entries
            .get(key)
            .is_some_and(|e| e.generation == *generation && !matches!(e.state, State::Fetched(_)))
    }

    /// The answer of the read `request`: the content (`None`: not found) or why it failed.
    /// Returns the namespace to plan again once it is in, or, for a failure, when to try again.
    pub fn answered(&self, (key, generation): &Request, answer: Result<Option<Content>, ()>) -> Answered {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let Some(entry) = inner.entries.get_mut(key).filter(|e| e.generation == *generation) else {
            return Answered::Stale;
        };
        let was_pending = matches!(entry.state, State::Pending);
        let outcome = match answer {
            Ok(Some(content)) => {
                entry.state = State::Fetched(Arc::new(content));
                entry.failures = 0;
                Answered::Replan(key.namespace.clone())
            }
            Ok(None) => {
                entry.state = State::Missing;
                entry.failures = 0;
                Answered::Replan(key.namespace.clone())
            }
            Err(()) => {
                entry.state = State::Failed;
                entry.failures = entry.failures.saturating_add(1);
                let delay =
                    Duration::from_secs(1).saturating_mul(1 << entry.failures.min(7).saturating_sub(1));
                Answered::Retry(delay.min(MAX_RETRY_DELAY))
            }
        };
        if was_pending {
            inner.pending -= 1;
        }
        self.publish(inner);
        outcome
    }

    /// Asks again for a read that failed, if it is still wanted.
    pub fn retry(&self, (key, generation): &Request) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let Some(entry) = inner.entries.get_mut(key).filter(|e| e.generation == *generation) else { return };
        if matches!(entry.state, State::Failed) {
            entry.state = State::Pending;
            inner.pending += 1;
            let _ = self.reads.send((key.clone(), *generation));
            self.publish(inner);
        }
    }

    fn publish(&self, inner: &Inner) {
        self.outstanding.send_if_modified(|n| std::mem::replace(n, inner.pending) != inner.pending);
    }

    /// Waits until no read is pending (each has been answered, successfully or not).
    pub async fn wait_until_answered(&self) {
        let _ = self.outstanding.subscribe().wait_for(|n| *n == 0).await;
    }

    /// The value of `key` in the referenced object `object`: `None` without the object (or
    /// while it is not read), `Some(None)` without the key.
    pub fn value(&self, object: &Key, key: &str) -> Option<Option<Bytes>> {
        let inner = self.inner.lock();
        match &inner.entries.get(object)?.state {
            State::Fetched(content) => Some(content.values.get(key).cloned()),
            _ => None,
        }
    }

    /// How many objects of `kind` are held with their content.
    pub fn held(&self, kind: Kind) -> usize {
        let inner = self.inner.lock();
        inner.entries.iter().filter(|(k, e)| k.kind == kind && matches!(e.state, State::Fetched(_))).count()
    }

    /// Makes the reads asked for, at most [`MAX_CONCURRENT_READS`] at a time, through `read`;
    /// `replan` is told each namespace to plan again, `failed` each read that failed.
    pub async fn run<R, F>(
        self: Arc<Self>,
        mut requests: mpsc::UnboundedReceiver<Request>,
        read: R,
        replan: impl Fn(String) + Send + Sync + 'static,
        failed: impl Fn(&Key, kube::Error) + Send + Sync + 'static,
    ) where
        R: Fn(Key) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Option<Content>, kube::Error>> + Send + 'static,
    {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS));
        let (read, replan, failed) = (Arc::new(read), Arc::new(replan), Arc::new(failed));
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(request) = requests.recv().await {
            while tasks.try_join_next().is_some() {}
            if !self.wanted(&request) {
                continue;
            }
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            let (refs, read, replan, failed) = (self.clone(), read.clone(), replan.clone(), failed.clone());
            tasks.spawn(async move {
                let answer = read(request.0.clone()).await;
                drop(permit);
                let answer = answer.map_err(|e| failed(&request.0, e));
                match refs.answered(&request, answer) {
                    Answered::Replan(ns) => replan(ns),
                    Answered::Retry(after) => {
                        tokio::time::sleep(after).await;
                        refs.retry(&request);
                    }
                    Answered::Stale => {}
                }
            });
        }
    }
}

/// What an answered read leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// The namespace to plan again.
    Replan(String),
    /// The read failed: try again after this.
    Retry(Duration),
    /// A newer read replaced it, or nothing references the object any more.
    Stale,
}

/// Reads a referenced object with a targeted GET (`None`: not found).
pub async fn read(client: Client, key: Key) -> Result<Option<Content>, kube::Error> {
    Ok(match key.kind {
        Kind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client, &key.namespace);
            api.get_opt(&key.name).await?.map(Content::of_config_map)
        }
        Kind::Secret => {
            let api: Api<Secret> = Api::namespaced(client, &key.namespace);
            api.get_opt(&key.name).await?.map(Content::of_secret)
        }
    })
}

/// The `resourceVersion` of an object's metadata, as a [`Refs::want`] answer.
pub fn version_of<K: kube::Resource>(object: Option<Arc<K>>) -> Option<String> {
    object.map(|o| o.resource_version().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, name: &str) -> Key {
        Key::new(kind, "team-a", name)
    }

    fn content(rv: &str, value: &str) -> Content {
        Content {
            resource_version: rv.into(),
            values: [("k".to_owned(), Bytes::from(value.to_owned()))].into(),
        }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Request>) -> Vec<Request> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn the_references_are_the_files_sources_and_the_slots_secrets() {
        let config: AgentConfig = serde_yaml::from_str(
            "
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: c, namespace: team-a}
spec:
  selector: {}
  files:
    a.yaml: {inline: 'a: 1'}
    b.yaml: {configMapKeyRef: {name: otel, key: b}}
    c.yaml: {configMapKeyRef: {name: otel, key: c}}
    d.yaml: {secretKeyRef: {name: creds, key: d}}
    e.yaml: {inline: 'e: 1', configMapKeyRef: {name: shadowed, key: e}}
",
        )
        .unwrap();
        let slot: CapabilitySlot = serde_yaml::from_str(
            "
apiVersion: opamp.dev/v1alpha1
kind: CapabilitySlot
metadata: {name: s, namespace: team-a}
spec:
  capability: com.example.s
  callback: {url: 'http://x', signingSecretRef: {name: signing, key: k}}
  dispatch: {tokenSecretRef: {name: dispatch, key: k}}
",
        )
        .unwrap();
        let keys = referenced("team-a", &[Arc::new(config)], &[Arc::new(slot)]);
        let expected: BTreeSet<Key> = [
            key(Kind::ConfigMap, "otel"),
            key(Kind::Secret, "creds"),
            key(Kind::Secret, "signing"),
            key(Kind::Secret, "dispatch"),
        ]
        .into();
        assert_eq!(keys, expected, "an inline file reads nothing");
    }

    #[test]
    fn a_reference_to_an_existing_object_is_read_before_the_namespace_is_planned() {
        let (refs, mut rx) = Refs::new();
        let (otel, absent) = (key(Kind::ConfigMap, "otel"), key(Kind::Secret, "absent"));
        let exists = |k: &Key| (k.name == "otel").then(|| "1".to_owned());
        let wanted: BTreeSet<Key> = [otel.clone(), absent.clone()].into();
        assert!(!refs.want("team-a", wanted.clone(), exists), "not before otel is read");
        let reads = drain(&mut rx);
        assert_eq!(reads, [(otel.clone(), 0)], "only the existing object is read");
        assert_eq!(refs.value(&absent, "k"), None);
        assert!(!refs.want("team-a", wanted.clone(), exists), "asking again waits too");
        assert!(drain(&mut rx).is_empty(), "and reads nothing twice");
        assert_eq!(refs.answered(&reads[0], Ok(Some(content("1", "v1")))), Answered::Replan("team-a".into()));
        assert!(refs.want("team-a", wanted, exists));
        assert_eq!(refs.value(&otel, "k"), Some(Some(Bytes::from("v1"))));
        assert_eq!(refs.value(&otel, "other"), Some(None));
        assert_eq!(refs.held(Kind::ConfigMap), 1);
        assert_eq!(refs.held(Kind::Secret), 0);
    }

    #[test]
    fn a_new_version_is_read_again_and_a_deleted_object_is_missing() {
        let (refs, mut rx) = Refs::new();
        let otel = key(Kind::ConfigMap, "otel");
        refs.want("team-a", [otel.clone()].into(), |_| Some("1".into()));
        let first = drain(&mut rx).remove(0);
        refs.answered(&first, Ok(Some(content("1", "v1"))));
        assert_eq!(refs.seen(&otel, Some("1")), None, "the same version: nothing to do");
        assert!(drain(&mut rx).is_empty());

        assert_eq!(refs.seen(&otel, Some("2")), None, "planned once the new version is in");
        let second = drain(&mut rx);
        assert_eq!(second, [(otel.clone(), 1)]);
        assert!(!refs.want("team-a", [otel.clone()].into(), |_| Some("2".into())), "waits for it");
        // The answer of the older read, had it come late, would be dropped.
        assert_eq!(refs.answered(&first, Ok(Some(content("1", "v1")))), Answered::Stale);
        refs.answered(&second[0], Ok(Some(content("2", "v2"))));
        assert_eq!(refs.value(&otel, "k"), Some(Some(Bytes::from("v2"))));

        assert_eq!(refs.seen(&otel, None), Some("team-a".into()), "deleted: planned again at once");
        assert_eq!(refs.value(&otel, "k"), None);
        assert!(refs.want("team-a", [otel.clone()].into(), |_| None), "missing is resolved");
        // It comes back: read again, then planned.
        assert_eq!(refs.seen(&otel, Some("3")), None);
        let third = drain(&mut rx);
        assert_eq!(refs.answered(&third[0], Ok(Some(content("3", "v3")))), Answered::Replan("team-a".into()));
        assert_eq!(refs.value(&otel, "k"), Some(Some(Bytes::from("v3"))));
    }

    #[test]
    fn after_a_relist_what_changed_meanwhile_is_read_again_or_missing() {
        let (refs, mut rx) = Refs::new();
        let (kept, changed, gone) =
            (key(Kind::Secret, "kept"), key(Kind::Secret, "changed"), key(Kind::Secret, "gone"));
        let cm = key(Kind::ConfigMap, "cm");
        let all: BTreeSet<Key> = [kept.clone(), changed.clone(), gone.clone(), cm.clone()].into();
        refs.want("team-a", all, |_| Some("1".into()));
        for r in drain(&mut rx) {
            refs.answered(&r, Ok(Some(content("1", "x"))));
        }
        // The Secrets' watch relisted: one changed, one was deleted while it was away.
        let now = |k: &Key| match k.name.as_str() {
            "changed" => Some("2".to_owned()),
            "gone" => None,
            _ => Some("1".to_owned()),
        };
        assert_eq!(refs.relisted(Kind::Secret, now), ["team-a".to_owned()].into());
        assert_eq!(drain(&mut rx), [(changed.clone(), 1)], "only the changed one is read again");
        assert_eq!(refs.value(&gone, "k"), None);
        assert_eq!(refs.value(&kept, "k"), Some(Some(Bytes::from("x"))));
        assert_eq!(refs.value(&cm, "k"), Some(Some(Bytes::from("x"))), "another kind's relist");
    }

    #[test]
    fn content_nothing_references_is_dropped_and_unreferenced_objects_are_never_read() {
        let (refs, mut rx) = Refs::new();
        let (a, b) = (key(Kind::Secret, "a"), key(Kind::Secret, "b"));
        refs.want("team-a", [a.clone(), b.clone()].into(), |_| Some("1".into()));
        for r in drain(&mut rx) {
            refs.answered(&r, Ok(Some(content("1", "x"))));
        }
        assert_eq!(refs.held(Kind::Secret), 2);
        assert!(refs.want("team-a", [a.clone()].into(), |_| Some("1".into())));
        assert_eq!(refs.held(Kind::Secret), 1);
        assert_eq!(refs.value(&b, "k"), None);
        assert_eq!(refs.seen(&b, Some("2")), None, "b is not referenced: not read");
        assert_eq!(refs.seen(&key(Kind::Secret, "unrelated"), Some("1")), None);
        assert!(drain(&mut rx).is_empty());
        assert!(refs.want("team-a", BTreeSet::new(), |_| None));
        assert_eq!(refs.held(Kind::Secret), 0);
    }

    #[test]
    fn a_failed_read_is_retried_with_back_off_and_the_namespace_waits() {
        let (refs, mut rx) = Refs::new();
        let otel = key(Kind::ConfigMap, "otel");
        let exists = |_: &Key| Some("1".to_owned());
        refs.want("team-a", [otel.clone()].into(), exists);
        let request = drain(&mut rx).remove(0);
        let mut delays = Vec::new();
        for _ in 0..9 {
            match refs.answered(&request, Err(())) {
                Answered::Retry(after) => delays.push(after.as_secs()),
                other => panic!("{other:?}"),
            }
            assert!(!refs.want("team-a", [otel.clone()].into(), exists), "keeps its previous plan");
            refs.retry(&request);
            assert_eq!(drain(&mut rx), std::slice::from_ref(&request));
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        refs.answered(&request, Ok(Some(content("1", "v1"))));
        assert!(refs.want("team-a", [otel].into(), exists));
    }

    #[tokio::test]
    async fn readiness_waits_for_every_read_to_be_answered() {
        let (refs, mut rx) = Refs::new();
        let keys: BTreeSet<Key> = (0..3).map(|i| key(Kind::ConfigMap, &format!("cm-{i}"))).collect();
        refs.want("team-a", keys, |_| Some("1".into()));
        let wait = |refs: Arc<Refs>| {
            tokio::time::timeout(Duration::from_millis(20), async move { refs.wait_until_answered().await })
        };
        assert!(wait(refs.clone()).await.is_err());
        let reads = drain(&mut rx);
        refs.answered(&reads[0], Ok(None));
        refs.answered(&reads[1], Err(()));
        assert!(wait(refs.clone()).await.is_err());
        refs.answered(&reads[2], Ok(Some(content("1", "x"))));
        assert!(wait(refs.clone()).await.is_ok(), "a failed read counts as answered");
    }

    #[tokio::test]
    async fn reads_run_at_most_eight_at_a_time() {
        let (refs, rx) = Refs::new();
        let keys: BTreeSet<Key> = (0..40).map(|i| key(Kind::Secret, &format!("s-{i}"))).collect();
        let (now, most) = (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(Mutex::new(0usize)));
        let (n, m) = (now.clone(), most.clone());
        let read = move |_key: Key| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let current = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                {
                    let mut most = m.lock();
                    *most = (*most).max(current);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Some(content("1", "x")))
            }
        };
        refs.want("team-a", keys.clone(), |_| Some("1".into()));
        tokio::spawn(refs.clone().run(rx, read, |_| {}, |_, _| {}));
        tokio::time::timeout(Duration::from_secs(10), refs.wait_until_answered()).await.unwrap();
        assert!(refs.want("team-a", keys, |_| Some("1".into())));
        assert_eq!(refs.held(Kind::Secret), 40);
        let most = *most.lock();
        assert!((1..=MAX_CONCURRENT_READS).contains(&most), "{most} at once");
    }
}
