//! The controller's caches of the objects it watches, each kind watched cluster-wide, or with
//! `--namespaces` once per namespace (so the operator needs rights in those namespaces only, and
//! reads nothing outside them):
//!
//! - AgentConfigs and CapabilitySlots, in full;
//! - Secrets of type `opamp.dev/agent-token`, in full (a field selector on the type: no other
//!   Secret is listed with its content);
//! - every other ConfigMap and Secret by its metadata only (a watch of
//!   `PartialObjectMeta`, and only name,
//!   namespace and `resourceVersion` kept): the content of the ones AgentConfigs and
//!   CapabilitySlots reference is read on its own ([`super::refs`]).
//!
//! Custom resources are watched through [`DeserializeGuard`]: one stored under another schema,
//! that no longer reads as its type, is reported (a Warning Event on it, the
//! `invalid-object` error count) and left out of the cache, and the watch goes on.
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;

use super::error::{Error, Errors};
use super::writer::StatusQueue;
use super::{Dirty, Scope};

/// A kind as it is watched: the type read from the API server, and the object it is cached as.
pub trait Watched:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    type Object: Resource<DynamicType = ()> + Send + Sync + 'static;

    /// The object, or why it does not read as one.
    fn into_object(self) -> Result<Self::Object, Box<InvalidObject>>;
}

fn api<K: Resource<DynamicType = (), Scope = NamespaceResourceScope>>(
    client: Client,
    namespace: Option<&str>,
) -> Api<K> {
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

impl<K> Watched for DeserializeGuard<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    type Object = K;

    fn into_object(self) -> Result<K, Box<InvalidObject>> {
        self.0.map_err(Box::new)
    }
}

/// Built-in kinds: the API server validates them against the very types we read them as.
macro_rules! unguarded {
    ($($kind:ty),*) => {$(
        impl Watched for $kind {
            type Object = Self;

            fn into_object(self) -> Result<Self, Box<InvalidObject>> {
                Ok(self)
            }
        }
    )*};
}
unguarded!(ConfigMap, Secret, ControllerRevision);

/// Built-in kinds watched by their metadata only: what is kept of each is its name, namespace,
/// uid and `resourceVersion` (not its labels, annotations or managed fields).
macro_rules! metadata_only {
    ($($kind:ty),*) => {$(
        impl Watched for PartialObjectMeta<$kind> {
            type Object = Self;

            fn into_object(self) -> Result<Self, Box<InvalidObject>> {
                let ObjectMeta { name, namespace, uid, resource_version, .. } = self.metadata;
                let metadata = ObjectMeta { name, namespace, uid, resource_version, ..Default::default() };
                Ok(Self { metadata, ..Default::default() })
            }
        }
    )*};
}
metadata_only!(ConfigMap, Secret);

/// The objects of one kind, fed by one watch per namespace of the scope (or one cluster-wide).
pub struct Cache<K: Resource<DynamicType = ()>> {
    shards: Vec<Arc<Shard<K>>>,
}

impl<K: Resource<DynamicType = ()>> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self { shards: self.shards.clone() }
    }
}

/// The objects one watch has seen.
struct Shard<K: Resource<DynamicType = ()>> {
    /// `None`: every namespace.
    namespace: Option<String>,
    objects: RwLock<HashMap<ObjectRef<K>, Arc<K>>>,
    /// True once the first list is in.
    ready: tokio::sync::watch::Sender<bool>,
}

impl<K: Resource<DynamicType = ()>> Cache<K> {
    /// An empty cache for `scope`, and the writers its watches feed it through (one per
    /// namespace of the scope, or one for the whole cluster).
    pub fn new(scope: &Scope) -> (Self, Vec<Writer<K>>) {
        let namespaces: Vec<Option<String>> = match scope.namespaces() {
            Some(set) => {
                let mut list: Vec<_> = set.iter().cloned().map(Some).collect();
                list.sort();
                list
            }
            None => vec![None],
        };
        let shards: Vec<_> = namespaces
            .into_iter()
            .map(|namespace| {
                Arc::new(Shard {
                    namespace,
                    objects: RwLock::default(),
                    ready: tokio::sync::watch::Sender::new(false),
                })
            })
            .collect();
        let writers = shards.iter().map(|shard| Writer { shard: shard.clone(), relist: None }).collect();
        (Self { shards }, writers)
    }

    /// The object `r` names, if cached.
    pub fn get(&self, r: &ObjectRef<K>) -> Option<Arc<K>> {
        let shard = self.shards.iter().find(|s| s.namespace.is_none() || s.namespace == r.namespace)?;
        shard.objects.read().get(r).cloned()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.objects.read().len()).sum()
    }

    /// Whether no object is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every cached object.
    pub fn state(&self) -> Vec<Arc<K>> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(shard.objects.read().values().cloned());
        }
        all
    }

    /// Waits until every watch has listed its objects once.
    pub async fn wait_until_ready(&self) {
        for shard in &self.shards {
            // The sender lives as long as the shard: this returns once it says ready.
            let _ = shard.ready.subscribe().wait_for(|ready| *ready).await;
        }
    }
}

/// What one watch writes into its part of a [`Cache`].
pub struct Writer<K: Resource<DynamicType = ()>> {
    shard: Arc<Shard<K>>,
    /// The objects of a list in progress: they replace the cached ones once it is complete.
    relist: Option<HashMap<ObjectRef<K>, Arc<K>>>,
}

/// What a watch event changed.
#[derive(Debug)]
pub enum Change<K> {
    /// Nothing readers see yet (a list in progress).
    Nothing,
    /// A list completed: anything may have changed.
    Listed,
    /// An object of this namespace was added, changed or removed; `Some` holds it as it is now
    /// (or, when removed, as it was).
    Object(Option<String>, Option<Arc<K>>),
}

impl<K: Resource<DynamicType = ()>> Writer<K> {
    /// The namespace this writer's watch covers (`None`: every namespace).
    pub fn namespace(&self) -> Option<&str> {
        self.shard.namespace.as_deref()
    }

    /// Applies one watch event to the cache. An object that does not read as `K` is removed
    /// (its earlier version no longer holds) and returned as an error, to be reported.
    pub fn apply<W: Watched<Object = K>>(&mut self, event: watcher::Event<W>) -> (Change<K>, Option<Error>) {
        match event {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                (Change::Nothing, None)
            }
            watcher::Event::InitApply(o) => {
                let (key, checked) = check(o);
                let invalid = match checked {
                    Ok(o) => {
                        self.relist.get_or_insert_default().insert(key, Arc::new(o));
                        None
                    }
                    Err(e) => Some(e),
                };
                (Change::Nothing, invalid)
            }
            watcher::Event::InitDone => {
                *self.shard.objects.write() = self.relist.take().unwrap_or_default();
                self.shard.ready.send_replace(true);
                (Change::Listed, None)
            }
            watcher::Event::Apply(o) => {
                let (key, checked) = check(o);
                let namespace = key.namespace.clone();
                let mut objects = self.shard.objects.write();
                match checked {
                    Ok(o) => {
                        let o = Arc::new(o);
                        objects.insert(key, o.clone());
                        (Change::Object(namespace, Some(o)), None)
                    }
                    Err(e) => {
                        objects.remove(&key);
                        (Change::Object(namespace, None), Some(e))
                    }
                }
            }
            watcher::Event::Delete(o) => {
                let (key, checked) = check(o);
                self.shard.objects.write().remove(&key);
                (Change::Object(key.namespace, checked.ok().map(Arc::new)), None)
            }
        }
    }
}

/// The cache key of a watched object, and the object or why it does not read.
fn check<W: Watched>(watched: W) -> (ObjectRef<W::Object>, Result<W::Object, Error>) {
    let key = key(watched.meta());
    (key, watched.into_object().map_err(Error::invalid::<W::Object>))
}

/// The cache key of an object with metadata `meta`.
pub fn key<K: Resource<DynamicType = ()>>(meta: &ObjectMeta) -> ObjectRef<K> {
    let r = ObjectRef::new(meta.name.as_deref().unwrap_or_default());
    match &meta.namespace {
        Some(ns) => r.within(ns),
        None => r,
    }
}

/// Called after each change of a cache: with the changed object (as it is now, or as it was
/// when deleted: the cache tells which), or `None` after a list.
pub type Hook<K> = Arc<dyn Fn(Option<&K>) + Send + Sync>;

/// How a kind is watched.
pub struct Options<K> {
    /// The list and watch parameters (e.g. a field selector).
    pub config: watcher::Config,
    pub hook: Option<Hook<K>>,
    /// Whether a changed object makes its namespace planned again (otherwise the hook decides).
    pub replans: bool,
}

impl<K> Default for Options<K> {
    fn default() -> Self {
        Self { config: watcher::Config::default(), hook: None, replans: true }
    }
}

/// What every watch task shares.
#[derive(Clone)]
pub(super) struct Context {
    pub client: Client,
    pub dirty: Arc<Dirty>,
    pub errors: Errors,
    /// Events go through the status writer's queue: a slow API server never holds a watch.
    pub queue: Arc<StatusQueue>,
    /// Only the leader records Events.
    pub leader: tokio::sync::watch::Receiver<bool>,
}

impl Context {
    /// Starts one watch per writer of a cache of `W::Object`s.
    pub fn spawn<W: Watched>(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        writers: Vec<Writer<W::Object>>,
        options: Options<W::Object>,
    ) {
        for writer in writers {
            let api: Api<W> = api(self.client.clone(), writer.namespace());
            let stream = watcher(api, options.config.clone()).boxed();
            let (hook, replans) = (options.hook.clone(), options.replans);
            tasks.spawn(self.clone().reflect(stream, writer, hook, replans));
        }
    }

    /// Keeps a writer's part of a cache and marks the namespaces of changed objects dirty.
    async fn reflect<W: Watched>(
        self,
        stream: BoxStream<'static, watcher::Result<watcher::Event<W>>>,
        mut writer: Writer<W::Object>,
        hook: Option<Hook<W::Object>>,
        replans: bool,
    ) {
        let stream = stream.default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(source) => {
                    let kind = W::kind(&()).into_owned();
                    let namespace = writer.namespace().map(str::to_owned);
                    self.errors.count(&Error::Watch { kind, namespace, source });
                    continue;
                }
            };
            let (change, invalid) = writer.apply(event);
            if let Some(error) = invalid {
                self.errors.count(&error);
                if let Some((object, event)) = error.warning().filter(|_| *self.leader.borrow()) {
                    self.queue.push_event(object, event);
                }
            }
            match change {
                Change::Nothing => {}
                Change::Listed => {
                    if replans {
                        self.dirty.mark_all();
                    }
                    if let Some(hook) = &hook {
                        hook(None);
                    }
                }
                Change::Object(namespace, object) => {
                    if replans {
                        self.dirty.mark(namespace);
                    }
                    if let (Some(hook), Some(object)) = (&hook, object) {
                        hook(Some(&object));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentConfig;

    type Guarded = DeserializeGuard<AgentConfig>;

    fn config_map(ns: &str, name: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            data: Some([("k".to_owned(), value.to_owned())].into()),
            ..Default::default()
        }
    }

    fn agent_config(ns: &str, name: &str, priority: serde_json::Value) -> DeserializeGuard<AgentConfig> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "opamp.dev/v1alpha1",
            "kind": "AgentConfig",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"selector": {}, "priority": priority, "files": {}},
        }))
        .expect("a guard reads anything with metadata")
    }

    fn names<K: Resource<DynamicType = ()>>(cache: &Cache<K>) -> Vec<String> {
        let mut names: Vec<_> = cache.state().iter().map(|o| o.meta().name.clone().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_relist_replaces_the_cached_objects_once_complete() {
        let (cache, mut writers) = Cache::<ConfigMap>::new(&Scope::default());
        let w = &mut writers[0];
        assert_eq!(w.namespace(), None);
        w.apply(watcher::Event::<ConfigMap>::Init);
        w.apply(watcher::Event::InitApply(config_map("a", "one", "1")));
        w.apply(watcher::Event::InitApply(config_map("b", "two", "2")));
        assert!(cache.state().is_empty(), "nothing is visible before the list completes");
        assert!(matches!(w.apply(watcher::Event::<ConfigMap>::InitDone).0, Change::Listed));
        assert_eq!(names(&cache), ["one", "two"]);

        // Watch events change objects one at a time.
        let (change, _) = w.apply(watcher::Event::Apply(config_map("a", "one", "1b")));
        assert!(matches!(change, Change::Object(Some(ns), Some(_)) if ns == "a"));
        let one = cache.get(&ObjectRef::new("one").within("a")).unwrap();
        assert_eq!(one.data.as_ref().unwrap()["k"], "1b");
        assert!(cache.get(&ObjectRef::new("one").within("b")).is_none());

        // A relist (after the watch lost its place): `two` was deleted meanwhile.
        w.apply(watcher::Event::<ConfigMap>::Init);
        w.apply(watcher::Event::InitApply(config_map("a", "one", "1b")));
        assert_eq!(names(&cache), ["one", "two"], "the old list holds until the new one is complete");
        w.apply(watcher::Event::<ConfigMap>::InitDone);
        assert_eq!(names(&cache), ["one"]);
        w.apply(watcher::Event::Delete(config_map("a", "one", "1b")));
        assert!(cache.state().is_empty());
    }

    #[tokio::test]
    async fn one_watch_per_namespace_of_the_scope() {
        let (cache, mut writers) = Cache::<ConfigMap>::new(&Scope::only(["y".to_owned(), "x".to_owned()]));
        let namespaces: Vec<_> = writers.iter().map(|w| w.namespace().map(str::to_owned)).collect();
        assert_eq!(namespaces, [Some("x".to_owned()), Some("y".to_owned())]);
        for w in &mut writers {
            let ns = w.namespace().unwrap().to_owned();
            w.apply(watcher::Event::<ConfigMap>::Init);
            w.apply(watcher::Event::InitApply(config_map(&ns, "cm", &ns)));
        }
        let ready = tokio::time::timeout(std::time::Duration::from_millis(50), cache.wait_until_ready());
        assert!(ready.await.is_err(), "not ready before every watch listed");
        writers[0].apply(watcher::Event::<ConfigMap>::InitDone);
        let ready = tokio::time::timeout(std::time::Duration::from_millis(50), cache.wait_until_ready());
        assert!(ready.await.is_err(), "not ready before every watch listed");
        writers[1].apply(watcher::Event::<ConfigMap>::InitDone);
        cache.wait_until_ready().await;
        assert_eq!(cache.state().len(), 2);
        for ns in ["x", "y"] {
            let cm = cache.get(&ObjectRef::new("cm").within(ns)).expect("cached");
            assert_eq!(cm.data.as_ref().unwrap()["k"], ns);
        }
        assert!(cache.get(&ObjectRef::new("cm").within("z")).is_none());

        // A relist in one namespace leaves the other's objects alone.
        writers[0].apply(watcher::Event::<ConfigMap>::Init);
        writers[0].apply(watcher::Event::<ConfigMap>::InitDone);
        assert!(cache.get(&ObjectRef::new("cm").within("x")).is_none());
        assert!(cache.get(&ObjectRef::new("cm").within("y")).is_some());
    }

    #[test]
    fn of_other_config_maps_and_secrets_only_name_and_version_are_kept() {
        let (cache, mut writers) = Cache::<PartialObjectMeta<Secret>>::new(&Scope::default());
        let w = &mut writers[0];
        let big = "x".repeat(10_000);
        let meta: PartialObjectMeta<Secret> = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "s", "namespace": "a", "resourceVersion": "7", "uid": "u",
                "labels": {"l": big}, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": big},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
        }))
        .unwrap();
        w.apply(watcher::Event::<PartialObjectMeta<Secret>>::Init);
        w.apply(watcher::Event::InitApply(meta));
        w.apply(watcher::Event::<PartialObjectMeta<Secret>>::InitDone);
        let kept = cache.get(&ObjectRef::new("s").within("a")).unwrap();
        let expected = ObjectMeta {
            name: Some("s".into()),
            namespace: Some("a".into()),
            resource_version: Some("7".into()),
            uid: Some("u".into()),
            ..Default::default()
        };
        assert_eq!(kept.metadata, expected);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn an_object_that_does_not_read_is_left_out_and_reported() {
        let (cache, mut writers) = Cache::<AgentConfig>::new(&Scope::default());
        let w = &mut writers[0];
        w.apply(watcher::Event::<Guarded>::Init);
        let (_, invalid) = w.apply(watcher::Event::InitApply(agent_config("ns", "bad", "high".into())));
        let error = invalid.expect("reported");
        assert_eq!(error.category(), "invalid-object");
        let object = error.regarding().unwrap();
        assert_eq!((object.name.as_deref(), object.uid.as_deref()), (Some("bad"), Some("uid-bad")));
        let (_, invalid) = w.apply(watcher::Event::InitApply(agent_config("ns", "good", 1.into())));
        assert!(invalid.is_none());
        w.apply(watcher::Event::<Guarded>::InitDone);
        assert_eq!(names(&cache), ["good"]);

        // A valid object rewritten into one that does not read: its old version goes too.
        let (change, invalid) = w.apply(watcher::Event::Apply(agent_config("ns", "good", "x".into())));
        assert!(invalid.is_some());
        assert!(matches!(change, Change::Object(Some(ns), None) if ns == "ns"));
        assert!(cache.state().is_empty());
        // Fixed: back in.
        let (_, invalid) = w.apply(watcher::Event::Apply(agent_config("ns", "good", 2.into())));
        assert!(invalid.is_none());
        assert_eq!(cache.state()[0].spec.priority, 2);
        // Deleting one that does not read is no error.
        let (_, invalid) = w.apply(watcher::Event::Delete(agent_config("ns", "bad", "x".into())));
        assert!(invalid.is_none());
    }
}
