//! What the controller can fail at, and how a failure is told: every error is counted in
//! `opamp_controller_errors_total{category}`, logged, and — when it concerns one object and this
//! replica is the leader — reported as a Warning Event on that object, its reason taken from the
//! category.
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;

use super::metrics::{CategoryLabel, ControllerMetrics};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A watch failed (it is retried with back-off).
    #[error("watch of {kind} {}failed: {source}", in_namespace(.namespace))]
    Watch {
        kind: String,
        /// `None`: the cluster-wide watch.
        namespace: Option<String>,
        #[source]
        source: watcher::Error,
    },
    /// A stored custom resource that does not deserialize into its type (it was stored under
    /// another schema, or the schema lets through what the type refuses); it is left out.
    #[error("{} cannot be read, so it is ignored: {source}", describe(.object))]
    InvalidObject {
        object: Box<ObjectReference>,
        #[source]
        source: Box<InvalidObject>,
    },
    #[error("status patch of {} failed: {source}", describe(.object))]
    Patch {
        object: Box<ObjectReference>,
        #[source]
        source: kube::Error,
    },
    #[error("status patch of {} took longer than {after:?}", describe(.object))]
    PatchTimeout { object: Box<ObjectReference>, after: Duration },
    #[error("event {reason} about {} not recorded: {source}", describe(.object))]
    Event {
        reason: String,
        object: Box<ObjectReference>,
        #[source]
        source: kube::Error,
    },
    /// The read of a ConfigMap or Secret an AgentConfig or CapabilitySlot refers to failed (it
    /// is retried with back-off; see [`super::refs`]).
    #[error("read of {kind} {namespace}/{name} failed: {source}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A write of a revision (ControllerRevision) failed; it is tried again at a later pass.
    #[error("revision {revision} not written: {reason}")]
    Revision { revision: String, reason: String },
    /// A ConfigMap or Secret an AgentConfig or CapabilitySlot refers to, or its key, is missing.
    #[error("{kind} {name:?} {}", match .key { Some(key) => format!("has no key {key:?}"), None => "not found".into() })]
    Reference {
        kind: &'static str,
        name: String,
        /// `Some`: the object exists but lacks this key.
        key: Option<String>,
    },
}

impl Error {
    /// A short, stable name for the kind of failure: the label of
    /// `opamp_controller_errors_total` and (see [`Error::reason`]) the reason of its Events.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Watch { .. } => "watch",
            Error::Read { .. } => "read",
            Error::InvalidObject { .. } => "invalid-object",
            Error::Patch { .. } => "patch",
            Error::PatchTimeout { .. } => "timeout",
            Error::Event { .. } => "event",
            Error::Reference { .. } => "reference",
            Error::Revision { .. } => "revision",
        }
    }

    /// The category as an Event reason (Kubernetes wants UpperCamelCase): `invalid-object` →
    /// `InvalidObject`.
    pub fn reason(&self) -> String {
        self.category()
            .split('-')
            .flat_map(|word| {
                let mut chars = word.chars();
                chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars)
            })
            .collect()
    }

    /// The object a user would look at for this failure.
    pub fn regarding(&self) -> Option<&ObjectReference> {
        match self {
            Error::InvalidObject { object, .. }
            | Error::Patch { object, .. }
            | Error::PatchTimeout { object, .. } => Some(object),
            Error::Watch { .. }
            | Error::Read { .. }
            | Error::Event { .. }
            | Error::Reference { .. }
            | Error::Revision { .. } => None,
        }
    }

    /// What the controller was doing (the Event's action).
    fn action(&self) -> &'static str {
        match self {
            Error::Watch { .. } | Error::Read { .. } | Error::InvalidObject { .. } => "Read",
            Error::Patch { .. } | Error::PatchTimeout { .. } => "WriteStatus",
            Error::Event { .. } => "RecordEvent",
            Error::Reference { .. } => "Resolve",
            Error::Revision { .. } => "WriteRevision",
        }
    }

    /// A status patch of `object` the API server refused.
    /// The Warning Event that tells this error on the object it concerns, if any.
    pub fn warning(&self) -> Option<(ObjectReference, Event)> {
        let object = self.regarding()?.clone();
        let event = Event {
            type_: EventType::Warning,
            reason: self.reason(),
            note: Some(truncate(self.to_string(), NOTE_LIMIT)),
            action: self.action().into(),
            secondary: None,
        };
        Some((object, event))
    }

    pub fn patch<K: Resource<DynamicType = ()>>(object: &K, source: kube::Error) -> Self {
        Error::Patch { object: Box::new(object.object_ref(&())), source }
    }

    /// A status patch of `object` that got no answer within `after`.
    pub fn patch_timeout<K: Resource<DynamicType = ()>>(object: &K, after: Duration) -> Self {
        Error::PatchTimeout { object: Box::new(object.object_ref(&())), after }
    }

    /// The [`Error::InvalidObject`] of a `K` that did not deserialize.
    pub fn invalid<K: Resource<DynamicType = ()>>(source: Box<InvalidObject>) -> Self {
        let meta = &source.metadata;
        let object = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..Default::default()
        };
        Error::InvalidObject { object: Box::new(object), source }
    }
}

fn describe(object: &ObjectReference) -> String {
    let field = |f: &Option<String>| f.clone().unwrap_or_default();
    format!("{} {}/{}", field(&object.kind), field(&object.namespace), field(&object.name))
}

fn in_namespace(namespace: &Option<String>) -> String {
    namespace.as_ref().map(|ns| format!("in namespace {ns} ")).unwrap_or_default()
}

/// The API server refuses an Event note over 1 kB.
const NOTE_LIMIT: usize = 1000;

/// Counts, logs and tells controller errors (cheap to clone: one per watch task).
#[derive(Clone)]
pub struct Errors {
    metrics: Arc<ControllerMetrics>,
    recorder: Recorder,
}

impl Errors {
    pub fn new(metrics: Arc<ControllerMetrics>, recorder: Recorder) -> Self {
        Self { metrics, recorder }
    }

    /// Counts and logs `error`.
    pub fn count(&self, error: &Error) {
        count(&self.metrics, error);
    }

    /// Counts and logs `error`, and records a Warning Event on the object it concerns. Only the
    /// leader calls this; followers only [`Errors::count`].
    pub async fn report(&self, error: &Error) {
        self.count(error);
        if let Some((object, event)) = error.warning() {
            self.publish(&event, &object).await;
        }
    }

    /// Records an Event about `object`; a failure is counted and logged (not retried).
    pub async fn publish(&self, event: &Event, object: &ObjectReference) {
        if let Err(source) = self.recorder.publish(event, object).await {
            let object = Box::new(object.clone());
            let error = Error::Event { reason: event.reason.clone(), object, source };
            self.count(&error);
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn count(metrics: &ControllerMetrics, error: &Error) {
    let category = error.category();
    metrics.controller_errors.get_or_create(&CategoryLabel { category }).inc();
    match error {
        // Logged at debug: the failure to tell about something else is the lesser news.
        Error::Event { .. } => tracing::debug!(category, error = %error, "event not recorded"),
        Error::Watch { .. } => tracing::warn!(category, error = %error, "watch error (retrying)"),
        Error::Read { .. } => tracing::warn!(category, error = %error, "read error (retrying)"),
        Error::Patch { .. } | Error::PatchTimeout { .. } => {
            tracing::warn!(category, error = %error, "status patch failed")
        }
        Error::InvalidObject { object, .. } => tracing::warn!(
            category,
            namespace = object.namespace.as_deref().unwrap_or_default(),
            name = object.name.as_deref().unwrap_or_default(),
            error = %error,
            "invalid object ignored"
        ),
        Error::Reference { .. } => tracing::debug!(category, error = %error, "reference not found"),
        Error::Revision { .. } => {
            tracing::warn!(category, error = %error, "revision write failed (retrying)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentConfig;

    fn reference() -> Box<ObjectReference> {
        Box::new(ObjectReference {
            kind: Some("AgentConfig".into()),
            namespace: Some("ns".into()),
            name: Some("a".into()),
            ..Default::default()
        })
    }

    fn api_error() -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("no", "Forbidden").with_code(403).boxed())
    }

    fn invalid() -> Box<InvalidObject> {
        let meta = kube::api::ObjectMeta {
            name: Some("a".into()),
            namespace: Some("ns".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        Box::new(InvalidObject { error: "invalid type: string \"x\", expected i32".into(), metadata: meta })
    }

    #[test]
    fn every_error_has_its_category_and_reason() {
        let cases = [
            (
                Error::Watch {
                    kind: "AgentConfig".into(),
                    namespace: Some("ns".into()),
                    source: watcher::Error::NoResourceVersion,
                },
                "watch",
                "Watch",
            ),
            (Error::invalid::<AgentConfig>(invalid()), "invalid-object", "InvalidObject"),
            (Error::Patch { object: reference(), source: api_error() }, "patch", "Patch"),
            (
                Error::PatchTimeout { object: reference(), after: Duration::from_secs(10) },
                "timeout",
                "Timeout",
            ),
            (Error::Event { reason: "X".into(), object: reference(), source: api_error() }, "event", "Event"),
            (
                Error::Reference { kind: "Secret", name: "s".into(), key: Some("k".into()) },
                "reference",
                "Reference",
            ),
        ];
        for (error, category, reason) in cases {
            assert_eq!(error.category(), category, "{error}");
            assert_eq!(error.reason(), reason, "{error}");
            // Metric labels: short, lowercase, no spaces.
            assert!(category.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{category}");
        }
    }

    #[test]
    fn errors_about_one_object_name_it() {
        let error = Error::invalid::<AgentConfig>(invalid());
        let object = error.regarding().expect("an object");
        assert_eq!(object.api_version.as_deref(), Some("opamp.dev/v1alpha1"));
        assert_eq!(object.kind.as_deref(), Some("AgentConfig"));
        assert_eq!(object.uid.as_deref(), Some("u1"));
        assert_eq!(
            error.to_string(),
            "AgentConfig ns/a cannot be read, so it is ignored: invalid type: string \"x\", expected i32"
        );
        let timeout = Error::PatchTimeout { object: reference(), after: Duration::from_secs(10) };
        assert_eq!(timeout.to_string(), "status patch of AgentConfig ns/a took longer than 10s");
        let watch = Error::Watch {
            kind: "Secret".into(),
            namespace: None,
            source: watcher::Error::NoResourceVersion,
        };
        assert!(watch.regarding().is_none());
        assert!(watch.to_string().starts_with("watch of Secret failed: "), "{watch}");
        let missing = Error::Reference { kind: "ConfigMap", name: "otel".into(), key: None };
        assert_eq!(missing.to_string(), "ConfigMap \"otel\" not found");
        let no_key = Error::Reference { kind: "Secret", name: "s".into(), key: Some("k".into()) };
        assert_eq!(no_key.to_string(), "Secret \"s\" has no key \"k\"");
    }

    #[test]
    fn errors_are_counted_by_category() {
        let metrics = ControllerMetrics::default();
        count(&metrics, &Error::invalid::<AgentConfig>(invalid()));
        count(&metrics, &Error::invalid::<AgentConfig>(invalid()));
        count(&metrics, &Error::PatchTimeout { object: reference(), after: Duration::from_secs(1) });
        let by = |category| metrics.controller_errors.get_or_create(&CategoryLabel { category }).get();
        assert_eq!((by("invalid-object"), by("timeout"), by("patch")), (2, 1, 0));
    }

    #[test]
    fn event_notes_are_cut_to_what_the_api_server_takes() {
        assert_eq!(truncate("short".into(), NOTE_LIMIT), "short");
        let long = "é".repeat(NOTE_LIMIT);
        let cut = truncate(long, NOTE_LIMIT);
        assert!(cut.len() <= NOTE_LIMIT && cut.ends_with("..."), "{}", cut.len());
    }
}
