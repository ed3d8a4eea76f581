//! `agents` in the aggregated API group `fleet.opamp.dev/v1alpha1`: namespaced, read-only
//! (`get`, `list`, `watch`), served from the fleet in memory behind an `APIService`, so that
//! kubectl, k9s, Lens and Headlamp see agents like pods.
//!
//! - Only the API server calls it ([`super::frontproxy`]); what the caller may do is the API
//!   server's RBAC (a SubjectAccessReview per verb, namespace and name, cached as in
//!   [`crate::access`]). Discovery and OpenAPI are served to any caller the API server
//!   authenticated, as Kubernetes does (`system:discovery`).
//! - Lists answer JSON (`AgentList`), a server-side `Table` (what `kubectl get` asks for; the
//!   columns of [`columns`], `-o wide` adds the host's), or `PartialObjectMetadataList`; label
//!   selectors match the agents' attributes ([`super::object`]), field selectors the fields of
//!   [`SELECTABLE_FIELDS`]; `limit`/`continue` page through agents in (namespace, uid) order.
//! - With several replicas, the replica the API server reached asks every other for its agents
//!   (the peer route [`OBJECTS`]) and merges them (an agent two replicas hold appears once: the
//!   connected one, then the most recently seen); a replica that does not answer is named in a
//!   `Warning` header (kubectl prints it).
//! - `watch` compares what the fleet holds every [`WATCH_EVERY`] and sends `ADDED`, `MODIFIED`
//!   (any change but `lastSeen`) and `DELETED` (forgotten after the offline retention) events;
//!   at most [`MAX_WATCHES`] at once on a replica, each ending after `timeoutSeconds` (at most
//!   [`MAX_WATCH`]). From `resourceVersion` unset or `0` (or `sendInitialEvents`) it starts with an
//!   `ADDED` event per agent; from a list's `resourceVersion` it starts with a `MODIFIED` event for
//!   each agent that changed since (an agent's resource version is when it last changed), so a
//!   change between the list and the watch is not missed. There is no history to replay: an
//!   agent forgotten in between is not told `DELETED`.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::frontproxy::FrontProxy;
use super::metrics::{AgentsApiMetrics, RequestLabels};
use super::object::{API_VERSION, Agent, GROUP, KIND, PLURAL, SELECTABLE_FIELDS, VERSION};
use super::selector::{FieldSelector, LabelSelector};
use crate::access::{Denied, KubeAccess, Request, User};
use crate::fleet::{AgentKey, Fleet};
use crate::http_server::ClientCertificates;
use crate::peers::Peers;
use crate::protocol::Uid;

/// The peer route answering a replica's agents as objects.
pub const OBJECTS: &str = "/agents/objects";
/// How often a watch compares what the fleet holds.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Watches open at once on a replica; more are refused with 429.
pub const MAX_WATCHES: usize = 32;
/// The longest a watch stays open (clients watch again, as with kube-apiserver's
/// `--min-request-timeout`).
pub const MAX_WATCH: Duration = Duration::from_secs(30 * 60);
/// Listings built at the same time on a replica (list and get; watches have their own bound).
pub const CONCURRENT_LISTINGS: usize = 4;

/// The aggregated API's state.
pub struct AggregatedApi {
    pub fleet: Fleet,
    pub access: Arc<KubeAccess>,
    pub peers: Peers,
    pub proxy: FrontProxy,
    pub shutdown: CancellationToken,
    turns: Semaphore,
    watches: Arc<Semaphore>,
    metrics: Arc<AgentsApiMetrics>,
}

impl AggregatedApi {
    pub fn new(
        fleet: Fleet,
        access: Arc<KubeAccess>,
        peers: Peers,
        proxy: FrontProxy,
        shutdown: CancellationToken,
        metrics: Arc<AgentsApiMetrics>,
    ) -> Self {
        Self {
            metrics,
            fleet,
            access,
            peers,
            proxy,
            shutdown,
            turns: Semaphore::new(CONCURRENT_LISTINGS),
            watches: Arc::new(Semaphore::new(MAX_WATCHES)),
        }
    }
}

/// The aggregated API's routes (served over TLS with [`FrontProxy`]).
pub fn router(api: Arc<AggregatedApi>) -> Router {
    let base = format!("/apis/{GROUP}/{VERSION}");
    Router::new()
        .route("/apis", get(api_group_list))
        .route(&format!("/apis/{GROUP}"), get(api_group))
        .route(&base, get(api_resource_list))
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_v3_paths))
        .route(&format!("/openapi/v3/apis/{GROUP}/{VERSION}"), get(openapi_v3))
        .route(&format!("{base}/{PLURAL}"), get(list_all).fallback(read_only))
        .route(&format!("{base}/namespaces/{{ns}}/{PLURAL}"), get(list_namespace).fallback(read_only))
        .route(&format!("{base}/namespaces/{{ns}}/{PLURAL}/{{name}}"), get(get_one).fallback(read_only))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(api.clone(), count))
        .with_state(api)
}

/// Counts each request by verb and the code answered.
async fn count(
    State(api): State<Arc<AggregatedApi>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let watch = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let resource = path.split('/').skip(4).collect::<Vec<_>>();
    let verb = if path.starts_with("/openapi") || !path.contains(&format!("/{PLURAL}")) {
        if path.starts_with("/apis") || path.starts_with("/openapi") { "discovery" } else { "other" }
    } else if watch {
        "watch"
    } else if resource.len() == 4 {
        "get" // namespaces/{ns}/agents/{name}
    } else {
        "list"
    };
    let response = next.run(req).await;
    api.metrics.requests.get_or_create(&RequestLabels { verb, code: response.status().as_u16() }).inc();
    response
}

/// The peer route [`OBJECTS`] (nested under [`crate::peers::PREFIX`], behind the peers'
/// authentication).
pub fn peer_router(fleet: Fleet) -> Router {
    let state = Arc::new(PeerObjects { fleet, turns: Semaphore::new(CONCURRENT_LISTINGS) });
    Router::new().route(OBJECTS, post(peer_objects)).with_state(state)
}

struct PeerObjects {
    fleet: Fleet,
    turns: Semaphore,
}

// ---------------------------------------------------------------------------------------------
// Requests and answers in Kubernetes terms.

/// The query parameters Kubernetes clients send.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    label_selector: Option<String>,
    field_selector: Option<String>,
    watch: Option<String>,
    resource_version: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    timeout_seconds: Option<u64>,
    send_initial_events: Option<String>,
    include_object: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1"))
}

/// A Kubernetes `Status` answer.
fn status(code: StatusCode, reason: &str, message: impl Into<String>, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (code, axum::Json(body)).into_response()
}

fn denied(d: Denied) -> Response {
    let (code, reason) = match d {
        Denied::Forbidden { .. } => (StatusCode::FORBIDDEN, "Forbidden"),
        Denied::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        Denied::MissingToken | Denied::Unauthenticated => (StatusCode::UNAUTHORIZED, "Unauthorized"),
    };
    let message = match &d {
        Denied::Forbidden { .. } => format!("{PLURAL}.{GROUP} is forbidden: {d}"),
        _ => d.to_string(),
    };
    status(code, reason, message, Some(json!({"group": GROUP, "kind": PLURAL})))
}

/// Agents are read-only: what they run is said by AgentConfigs.
async fn read_only() -> Response {
    let message = format!(
        "{PLURAL}.{GROUP} are read-only (get, list, watch): change what agents run with AgentConfigs"
    );
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        message,
        Some(json!({"group": GROUP, "kind": PLURAL})),
    )
}

async fn not_found() -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource", None)
}

/// A refusal, answered as a `Status`.
#[derive(Debug)]
struct Refusal {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        status(self.code, self.reason, self.message, None)
    }
}

/// The caller the front proxy names, or the 401 to answer.
fn caller(
    api: &AggregatedApi,
    certs: Option<&ClientCertificates>,
    headers: &HeaderMap,
) -> Result<User, Refusal> {
    let none = ClientCertificates::default();
    api.proxy.authenticate(certs.unwrap_or(&none), headers).map_err(|e| Refusal {
        code: StatusCode::UNAUTHORIZED,
        reason: "Unauthorized",
        message: e.to_string(),
    })
}

type Certs = Option<axum::Extension<ClientCertificates>>;

/// `doc()` to any caller the API server authenticated: discovery and OpenAPI, as Kubernetes
/// serves them to `system:authenticated`.
fn to_authenticated(
    api: &AggregatedApi,
    certs: Certs,
    headers: &HeaderMap,
    doc: impl FnOnce() -> Value,
) -> Response {
    match caller(api, certs.as_deref(), headers) {
        Ok(_) => json_response(&doc()),
        Err(r) => r.into_response(),
    }
}

/// What the caller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Object,
    /// `meta.k8s.io` `Table` of this version.
    Table(&'static str),
    /// `PartialObjectMetadata(List)`.
    Metadata,
}

/// The first acceptable media type of `Accept` (JSON only; a missing header means JSON).
fn negotiate(headers: &HeaderMap) -> Result<Format, Refusal> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Object);
    };
    for clause in accept.split(',') {
        let mut parts = clause.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        if !matches!(media, "application/json" | "application/*" | "*/*") {
            continue;
        }
        match (params.get("as"), params.get("g"), params.get("v")) {
            (None, _, _) => return Ok(Format::Object),
            (Some(&"Table"), Some(&"meta.k8s.io"), Some(&"v1")) => return Ok(Format::Table("v1")),
            (Some(&"Table"), Some(&"meta.k8s.io"), Some(&"v1beta1")) => return Ok(Format::Table("v1beta1")),
            (
                Some(&("PartialObjectMetadata" | "PartialObjectMetadataList")),
                Some(&"meta.k8s.io"),
                Some(v),
            ) if matches!(*v, "v1" | "v1beta1") => {
                return Ok(Format::Metadata);
            }
            _ => continue,
        }
    }
    Err(Refusal {
        code: StatusCode::NOT_ACCEPTABLE,
        reason: "NotAcceptable",
        message: "only application/json is served (objects, meta.k8s.io Table or PartialObjectMetadata)"
            .into(),
    })
}

fn json_response(value: &impl Serialize) -> Response {
    formatted(Format::Object, value)
}

/// The media type an answer in `format` is (what kube-apiserver says of its own).
fn content_type(format: Format) -> &'static str {
    match format {
        Format::Object => "application/json",
        Format::Table("v1beta1") => "application/json;as=Table;v=v1beta1;g=meta.k8s.io",
        Format::Table(_) => "application/json;as=Table;v=v1;g=meta.k8s.io",
        Format::Metadata => "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
    }
}

/// `value` in `format`'s media type.
fn formatted(format: Format, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("JSON serializes into memory");
    ([(header::CONTENT_TYPE, content_type(format))], body).into_response()
}

// ---------------------------------------------------------------------------------------------
// Discovery and OpenAPI.

fn group_doc() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"name": GROUP, "versions": [gv], "preferredVersion": gv})
}

async fn api_group_list(State(api): State<Arc<AggregatedApi>>, certs: Certs, headers: HeaderMap) -> Response {
    to_authenticated(
        &api,
        certs,
        &headers,
        || json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc()]}),
    )
}

async fn api_group(State(api): State<Arc<AggregatedApi>>, certs: Certs, headers: HeaderMap) -> Response {
    to_authenticated(&api, certs, &headers, || {
        let mut doc = group_doc();
        doc["kind"] = "APIGroup".into();
        doc["apiVersion"] = "v1".into();
        doc
    })
}

/// The resources of `fleet.opamp.dev/v1alpha1`: `agents`.
pub fn api_resource_list_doc() -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [{
            "name": PLURAL, "singularName": "agent", "namespaced": true, "kind": KIND,
            "verbs": ["get", "list", "watch"], "shortNames": ["ag"],
        }],
    })
}

async fn api_resource_list(
    State(api): State<Arc<AggregatedApi>>,
    certs: Certs,
    headers: HeaderMap,
) -> Response {
    to_authenticated(&api, certs, &headers, api_resource_list_doc)
}

/// The name of the Agent schema in the OpenAPI documents.
const SCHEMA_NAME: &str = "dev.opamp.fleet.v1alpha1.Agent";
const LIST_SCHEMA_NAME: &str = "dev.opamp.fleet.v1alpha1.AgentList";

/// The schemas of `Agent` and `AgentList`, inlined (OpenAPI 3.0 flavour), with the GVK
/// extension `kubectl explain` looks for.
fn schemas() -> (Value, Value) {
    let generator =
        schemars::generate::SchemaSettings::openapi3().with(|s| s.inline_subschemas = true).into_generator();
    let mut agent = generator.into_root_schema_for::<Agent>().to_value();
    if let Some(map) = agent.as_object_mut() {
        map.remove("$schema");
        map.remove("title");
        map.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([{"group": GROUP, "version": VERSION, "kind": KIND}]),
        );
    }
    let list = json!({
        "description": "A list of agents.",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {
                "resourceVersion": {"type": "string"}, "continue": {"type": "string"}}},
            "items": {"type": "array", "items": agent.clone()},
        },
        "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": "AgentList"}],
    });
    (agent, list)
}

/// The paths of the group version, for an OpenAPI 3 (`v3`) or Swagger 2 document.
fn paths(v3: bool) -> Value {
    let base = format!("/apis/{GROUP}/{VERSION}");
    let refs = if v3 { "#/components/schemas/" } else { "#/definitions/" };
    let param = |name: &str, ty: &str| {
        if v3 {
            json!({"name": name, "in": "query", "schema": {"type": ty}})
        } else {
            json!({"name": name, "in": "query", "type": ty})
        }
    };
    let params = json!([
        param("labelSelector", "string"),
        param("fieldSelector", "string"),
        param("watch", "boolean"),
        param("limit", "integer"),
        param("continue", "string"),
    ]);
    let op = |id: &str, schema: &str| {
        let reference = json!({"$ref": format!("{refs}{schema}")});
        let ok = if v3 {
            json!({"description": "OK", "content": {"application/json": {"schema": reference}}})
        } else {
            json!({"description": "OK", "schema": reference})
        };
        json!({"get": {
            "operationId": id, "tags": ["fleetOpampDev_v1alpha1"], "parameters": params,
            "responses": {"200": ok},
            "x-kubernetes-action": if id.starts_with("read") { "get" } else { "list" },
            "x-kubernetes-group-version-kind": {"group": GROUP, "version": VERSION, "kind": KIND},
        }})
    };
    json!({
        format!("{base}/{PLURAL}"): op("listFleetOpampDevV1alpha1AgentForAllNamespaces", LIST_SCHEMA_NAME),
        format!("{base}/namespaces/{{namespace}}/{PLURAL}"): op("listFleetOpampDevV1alpha1NamespacedAgent", LIST_SCHEMA_NAME),
        format!("{base}/namespaces/{{namespace}}/{PLURAL}/{{name}}"): op("readFleetOpampDevV1alpha1NamespacedAgent", SCHEMA_NAME),
    })
}

/// The OpenAPI 3.0 document of `fleet.opamp.dev/v1alpha1`.
pub fn openapi_v3_doc() -> Value {
    openapi_doc(true)
}

/// The Swagger 2.0 document (the aggregator still merges `/openapi/v2`).
pub fn openapi_v2_doc() -> Value {
    openapi_doc(false)
}

fn openapi_doc(v3: bool) -> Value {
    let (agent, list) = schemas();
    let schemas = json!({SCHEMA_NAME: agent, LIST_SCHEMA_NAME: list});
    let mut doc =
        json!({"info": {"title": "opamp-operator fleet API", "version": VERSION}, "paths": paths(v3)});
    if v3 {
        doc["openapi"] = "3.0.0".into();
        doc["components"] = json!({"schemas": schemas});
    } else {
        doc["swagger"] = "2.0".into();
        doc["definitions"] = schemas;
    }
    doc
}

async fn openapi_v2(State(api): State<Arc<AggregatedApi>>, certs: Certs, headers: HeaderMap) -> Response {
    to_authenticated(&api, certs, &headers, openapi_v2_doc)
}

async fn openapi_v3_paths(
    State(api): State<Arc<AggregatedApi>>,
    certs: Certs,
    headers: HeaderMap,
) -> Response {
    to_authenticated(&api, certs, &headers, || {
        use sha2::{Digest, Sha256};
        let hash = hex::encode(&Sha256::digest(openapi_v3_doc().to_string().as_bytes())[..16]);
        let path = format!("apis/{GROUP}/{VERSION}");
        json!({"paths": {path.clone(): {"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}}})
    })
}

async fn openapi_v3(State(api): State<Arc<AggregatedApi>>, certs: Certs, headers: HeaderMap) -> Response {
    to_authenticated(&api, certs, &headers, openapi_v3_doc)
}

// ---------------------------------------------------------------------------------------------
// Collecting agents across replicas.

/// What to collect: of one namespace (or all), optionally one agent, after a position, at most
/// `limit`, matching the selectors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectsQuery {
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Only agents after this (namespace, name).
    pub after: Option<(String, String)>,
    pub limit: Option<usize>,
    #[serde(default)]
    pub label_selector: String,
    #[serde(default)]
    pub field_selector: String,
}

/// A query with its selectors read.
struct Compiled {
    query: ObjectsQuery,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Compiled {
    fn new(query: ObjectsQuery) -> Result<Self, String> {
        let labels =
            LabelSelector::parse(&query.label_selector).map_err(|e| format!("labelSelector: {e}"))?;
        let fields = FieldSelector::parse(&query.field_selector, SELECTABLE_FIELDS)
            .map_err(|e| format!("fieldSelector: {e}"))?;
        Ok(Self { query, labels, fields })
    }

    fn matches(&self, a: &Agent) -> bool {
        self.labels.matches(&a.metadata.labels) && self.fields.matches(|f| a.field(f))
    }
}

/// This replica's agents for `q`, sorted by (namespace, name).
fn local_objects(fleet: &Fleet, q: &Compiled) -> Vec<Agent> {
    let mut keys: Vec<AgentKey> = Vec::new();
    let uid = q.query.name.as_deref().map(|n| n.parse::<Uid>());
    if let Some(uid) = uid {
        // One agent: straight to its key (a name that is no uid names no agent).
        if let (Ok(uid), Some(ns)) = (uid, q.query.namespace.as_deref()) {
            keys.push(AgentKey { namespace: ns.into(), uid });
        }
    } else {
        fleet.for_each(|key, _| {
            if q.query.namespace.as_deref().is_none_or(|ns| *key.namespace == *ns) {
                keys.push(key.clone());
            }
        });
        keys.sort();
    }
    let mut plans: HashMap<Arc<str>, Option<Arc<dyn crate::fleet::Plan>>> = HashMap::new();
    let mut out = Vec::new();
    for key in keys {
        if let Some((ns, name)) = &q.query.after {
            if (&*key.namespace, key.uid.to_string()) <= (ns.as_str(), name.clone()) {
                continue;
            }
        }
        if q.query.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let plan = plans.entry(key.namespace.clone()).or_insert_with(|| fleet.plan(&key.namespace)).clone();
        let agent = fleet.inspect(&key, |view| {
            let selected_by = plan.as_ref().map(|p| p.selected_by(view.report)).unwrap_or_default();
            Agent::of(view, selected_by)
        });
        if let Some(agent) = agent.filter(|a| q.matches(a)) {
            out.push(agent);
        }
    }
    out
}

async fn peer_objects(
    State(p): State<Arc<PeerObjects>>,
    axum::Json(query): axum::Json<ObjectsQuery>,
) -> Response {
    let Ok(_turn) = p.turns.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    match Compiled::new(query) {
        Ok(q) => json_response(&local_objects(&p.fleet, &q)),
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

/// Agents of every live replica for `q`, merged; and the replicas that did not answer.
async fn collect(api: &AggregatedApi, q: &Compiled) -> (Vec<Agent>, Vec<String>) {
    let others = api.peers.others();
    let calls = others.iter().map(|m| api.peers.call::<_, Vec<Agent>>(m, OBJECTS, &q.query));
    let answers = futures_util::future::join_all(calls).await;
    let mut all = local_objects(&api.fleet, q);
    let mut missing = Vec::new();
    for (member, answer) in others.iter().zip(answers) {
        match answer {
            Ok(mut agents) => all.append(&mut agents),
            Err(e) => {
                tracing::warn!(peer = %member.identity, error = %e, "a replica did not list its agents");
                missing.push(member.identity.to_string());
            }
        }
    }
    (merge(all), missing)
}

/// One object per agent, sorted by (namespace, name): of two, the connected one, then the
/// most recently seen.
fn merge(all: Vec<Agent>) -> Vec<Agent> {
    super::one_per_agent(all, |a| {
        let agent = (a.metadata.namespace.clone(), a.metadata.name.clone());
        (agent, a.status.connected, a.last_seen_millis())
    })
}

fn warning(missing: &[String]) -> Option<(header::HeaderName, HeaderValue)> {
    if missing.is_empty() {
        return None;
    }
    let text = format!("299 - \"replicas {} did not answer: their agents are missing\"", missing.join(", "));
    HeaderValue::from_str(&text).ok().map(|v| (header::WARNING, v))
}

/// A list's resource version: microseconds since the epoch on the serving replica (an agent's
/// is when it last changed, on the same scale).
fn now_version() -> String {
    super::object::micros(std::time::SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// The columns of `kubectl get agents` (priority 1: `-o wide`).
pub fn columns() -> Value {
    let col = |name: &str, ty: &str, format: &str, priority: u8, description: &str| json!({"name": name, "type": ty, "format": format, "priority": priority, "description": description});
    json!([
        col("Name", "string", "name", 0, "The agent's instance uid."),
        col("Service", "string", "", 0, "The service.name attribute."),
        col("Version", "string", "", 0, "The service.version attribute."),
        col("Transport", "string", "", 0, "websocket or http."),
        col("Connected", "boolean", "", 0, "Whether the agent is connected now."),
        col("Healthy", "string", "", 0, "Whether the agent reports itself healthy."),
        col("Config", "string", "", 0, "APPLIED, APPLYING, FAILED or PENDING: the desired config's status."),
        col("AgentConfigs", "string", "", 0, "The AgentConfigs selecting the agent."),
        col("Last Seen", "string", "", 0, "When the agent was last heard from."),
        col("Host", "string", "", 1, "The host.name attribute."),
        col("OS", "string", "", 1, "The os.type attribute."),
        col("Arch", "string", "", 1, "The host.arch attribute."),
    ])
}

/// How long ago, as kubectl prints ages (`45s`, `3m12s`, `5h`, `2d`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..28_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        28_800..172_800 => format!("{}h", s / 3600),
        172_800..691_200 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn cells(a: &Agent, now_ms: i64) -> Value {
    let attr = |k: &str| {
        a.status
            .identifying_attributes
            .get(k)
            .or_else(|| a.status.non_identifying_attributes.get(k))
            .cloned()
            .unwrap_or_else(|| "<none>".into())
    };
    let or_none =
        |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned().unwrap_or_else(|| "<none>".into());
    let seen = u64::try_from(now_ms.saturating_sub(a.last_seen_millis())).unwrap_or(0);
    let configs = if a.status.config.selected_by.is_empty() {
        "<none>".to_owned()
    } else {
        a.status.config.selected_by.join(",")
    };
    json!([
        a.metadata.name,
        or_none(a.status.service_name.as_ref()),
        or_none(a.status.service_version.as_ref()),
        or_none(a.status.transport.as_ref()),
        a.status.connected,
        a.status.healthy.map_or("<unknown>".to_owned(), |h| h.to_string()),
        or_none(Some(&a.status.config.status)),
        configs,
        human_duration(Duration::from_millis(seen)),
        attr("host.name"),
        attr("os.type"),
        attr("host.arch"),
    ])
}

fn partial_metadata(a: &Agent) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": a.metadata})
}

/// A `Table` of `agents` (with `includeObject`: `None`, `Metadata` (the default) or `Object`).
fn table(version: &str, agents: &[Agent], include: Option<&str>, list_meta: Value) -> Value {
    let now_ms = Timestamp::now().as_millisecond();
    let rows: Vec<Value> = agents
        .iter()
        .map(|a| {
            let mut row = json!({"cells": cells(a, now_ms)});
            match include {
                Some("None") => {}
                Some("Object") => row["object"] = serde_json::to_value(a).expect("JSON serializes"),
                _ => row["object"] = partial_metadata(a),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": format!("meta.k8s.io/{version}"), "metadata": list_meta,
        "columnDefinitions": columns(), "rows": rows,
    })
}

// ---------------------------------------------------------------------------------------------
// get, list, watch.

async fn list_all(
    State(api): State<Arc<AggregatedApi>>,
    certs: Certs,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    serve_list(api, certs, headers, params, None).await
}

async fn list_namespace(
    State(api): State<Arc<AggregatedApi>>,
    Path(ns): Path<String>,
    certs: Certs,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    serve_list(api, certs, headers, params, Some(ns)).await
}

async fn get_one(
    State(api): State<Arc<AggregatedApi>>,
    Path((ns, name)): Path<(String, String)>,
    certs: Certs,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let format = match admit(&api, certs, &headers, Request::agents("get", Some(&ns), Some(&name))).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Ok(_turn) = api.turns.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let query = ObjectsQuery { namespace: Some(ns.clone()), name: Some(name.clone()), ..Default::default() };
    let q = Compiled::new(query).expect("no selectors");
    let (agents, missing) = collect(&api, &q).await;
    let Some(agent) = agents.into_iter().next() else {
        let message = format!("{PLURAL}.{GROUP} \"{name}\" not found");
        let r = status(
            StatusCode::NOT_FOUND,
            "NotFound",
            message,
            Some(json!({"name": name, "group": GROUP, "kind": PLURAL})),
        );
        return with_warning(r, &missing);
    };
    let body = match format {
        Format::Object => serde_json::to_value(&agent).expect("JSON serializes"),
        Format::Metadata => partial_metadata(&agent),
        Format::Table(v) => {
            table(v, std::slice::from_ref(&agent), params.include_object.as_deref(), json!({}))
        }
    };
    with_warning(formatted(format, &body), &missing)
}

/// Who calls (the front proxy's user), what it accepts, and whether RBAC lets it do `request`:
/// the format to answer in, or the refusal.
async fn admit(
    api: &AggregatedApi,
    certs: Certs,
    headers: &HeaderMap,
    request: Request<'_>,
) -> Result<Format, Response> {
    let user = caller(api, certs.as_deref(), headers).map_err(IntoResponse::into_response)?;
    let format = negotiate(headers).map_err(IntoResponse::into_response)?;
    api.access.check_user(&user, &request).await.map_err(denied)?;
    Ok(format)
}

/// `r` with a `Warning` naming the replicas that did not answer, if any.
fn with_warning(mut r: Response, missing: &[String]) -> Response {
    if let Some((k, v)) = warning(missing) {
        r.headers_mut().insert(k, v);
    }
    r
}

async fn serve_list(
    api: Arc<AggregatedApi>,
    certs: Certs,
    headers: HeaderMap,
    params: Params,
    ns: Option<String>,
) -> Response {
    let watch = truthy(&params.watch);
    let verb = if watch { "watch" } else { "list" };
    let format = match admit(&api, certs, &headers, Request::agents(verb, ns.as_deref(), None)).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let after = match params.continue_token.as_deref().filter(|c| !c.is_empty()).map(read_continue) {
        Some(Ok(pos)) => Some(pos),
        Some(Err(())) => {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token", None);
        }
        None => None,
    };
    let query = ObjectsQuery {
        namespace: ns,
        name: None,
        after,
        limit: params.limit.filter(|l| *l > 0 && !watch),
        label_selector: params.label_selector.clone().unwrap_or_default(),
        field_selector: params.field_selector.clone().unwrap_or_default(),
    };
    let q = match Compiled::new(query) {
        Ok(q) => q,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e, None),
    };
    if watch {
        return serve_watch(api, q, format, params);
    }
    let Ok(_turn) = api.turns.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (mut agents, missing) = collect(&api, &q).await;
    let mut list_meta = json!({"resourceVersion": now_version()});
    if let Some(limit) = q.query.limit {
        // Each replica gave at most `limit`: beyond the merged first `limit`, or when some
        // replica may have more, there is a next page.
        if agents.len() >= limit {
            agents.truncate(limit);
            if let Some(last) = agents.last() {
                list_meta["continue"] = write_continue(&last.metadata.namespace, &last.metadata.name).into();
            }
        }
    }
    let body = match format {
        Format::Object => {
            json!({"kind": "AgentList", "apiVersion": API_VERSION, "metadata": list_meta, "items": agents})
        }
        Format::Metadata => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
            "items": agents.iter().map(partial_metadata).collect::<Vec<_>>(),
        }),
        Format::Table(v) => table(v, &agents, params.include_object.as_deref(), list_meta),
    };
    with_warning(formatted(format, &body), &missing)
}

fn write_continue(ns: &str, name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&(ns, name)).expect("JSON"))
}

fn read_continue(token: &str) -> Result<(String, String), ()> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| ())?;
    serde_json::from_slice(&bytes).map_err(|_| ())
}

/// Counts a watch open until dropped.
struct OpenWatch(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One watch event as a JSON line.
fn event(kind: &str, a: &Agent, format: Format, include: Option<&str>) -> Bytes {
    let object = match format {
        Format::Object => serde_json::to_value(a).expect("JSON serializes"),
        Format::Metadata => partial_metadata(a),
        Format::Table(v) => table(
            v,
            std::slice::from_ref(a),
            include,
            json!({"resourceVersion": a.metadata.resource_version}),
        ),
    };
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON serializes");
    line.push(b'\n');
    Bytes::from(line)
}

/// What a watch knows of each agent: the object last sent and its digest.
type Known = HashMap<(String, String), (Agent, [u8; 32])>;

fn known(agents: Vec<Agent>) -> Known {
    agents
        .into_iter()
        .map(|a| {
            let digest = a.digest();
            ((a.metadata.namespace.clone(), a.metadata.name.clone()), (a, digest))
        })
        .collect()
}

/// What changed between two looks, as events (in (namespace, name) order, the deleted last).
fn diff(before: &Known, now: &Known) -> Vec<(&'static str, Agent)> {
    let mut keys: Vec<_> = now.keys().collect();
    keys.sort();
    let mut events = Vec::new();
    for key in keys {
        let (a, digest) = &now[key];
        match before.get(key) {
            None => events.push(("ADDED", a.clone())),
            Some((_, old)) if old != digest => events.push(("MODIFIED", a.clone())),
            Some(_) => {}
        }
    }
    let mut gone: Vec<_> = before.iter().filter(|(k, _)| !now.contains_key(*k)).collect();
    gone.sort_by(|a, b| a.0.cmp(b.0));
    events.extend(gone.into_iter().map(|(_, (a, _))| ("DELETED", a.clone())));
    events
}

fn serve_watch(api: Arc<AggregatedApi>, q: Compiled, format: Format, params: Params) -> Response {
    let Ok(permit) = api.watches.clone().try_acquire_owned() else {
        let mut r = status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            format!("at most {MAX_WATCHES} watches of agents at once on a replica"),
            Some(json!({"retryAfterSeconds": 5})),
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r.into_response();
    };
    let initial = truthy(&params.send_initial_events)
        || matches!(params.resource_version.as_deref(), None | Some("" | "0"));
    // From a list's resource version: what changed since (an agent's resource version says
    // when it last changed), so that nothing between the list and this watch is missed.
    let since: Option<u64> =
        params.resource_version.as_deref().and_then(|v| v.parse().ok()).filter(|_| !initial);
    let bookmark = truthy(&params.send_initial_events);
    let timeout = params.timeout_seconds.map_or(MAX_WATCH, |s| Duration::from_secs(s).min(MAX_WATCH));
    let include = params.include_object.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let open = api.metrics.watches.clone();
    tokio::spawn(async move {
        let _permit = permit;
        open.inc();
        let _open = OpenWatch(open);
        let deadline = tokio::time::Instant::now() + timeout;
        let (first, _) = collect(&api, &q).await;
        let changed_since = |a: &Agent| {
            since.is_some_and(|s| a.metadata.resource_version.parse::<u64>().is_ok_and(|v| v > s))
        };
        for a in &first {
            let kind = if initial {
                "ADDED"
            } else if changed_since(a) {
                "MODIFIED"
            } else {
                continue;
            };
            if tx.send(event(kind, a, format, include.as_deref())).await.is_err() {
                return;
            }
        }
        if bookmark {
            let mark = json!({"type": "BOOKMARK", "object": {
                "kind": KIND, "apiVersion": API_VERSION,
                "metadata": {"resourceVersion": now_version(), "annotations": {"k8s.io/initial-events-end": "true"}},
            }});
            let mut line = serde_json::to_vec(&mark).expect("JSON serializes");
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        let mut seen = known(first);
        loop {
            tokio::select! {
                _ = api.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            let (now, missing) = collect(&api, &q).await;
            if !missing.is_empty() {
                // A replica that did not answer: its agents are not gone, only unseen this time.
                continue;
            }
            let now = known(now);
            for (kind, a) in diff(&seen, &now) {
                if tx.send(event(kind, &a, format, include.as_deref())).await.is_err() {
                    return;
                }
            }
            seen = now;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [(header::CONTENT_TYPE, content_type(format)), (header::CACHE_CONTROL, "no-cache, private")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(ns: &str, name: &str, connected: bool, rv: &str) -> Agent {
        Agent {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: super::super::object::Metadata {
                name: name.into(),
                namespace: ns.into(),
                uid: name.into(),
                resource_version: rv.into(),
                labels: Default::default(),
            },
            status: super::super::object::AgentStatus {
                connected,
                last_seen: "2026-01-01T00:00:00Z".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn accept_headers_choose_table_metadata_or_objects() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, v.parse().unwrap());
            m
        };
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(&h(kubectl)).unwrap(), Format::Table("v1"));
        assert_eq!(
            negotiate(&h("application/json;as=Table;v=v1beta1;g=meta.k8s.io")).unwrap(),
            Format::Table("v1beta1")
        );
        assert_eq!(
            negotiate(&h("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io")).unwrap(),
            Format::Metadata
        );
        assert_eq!(negotiate(&h("application/json")).unwrap(), Format::Object);
        assert_eq!(negotiate(&HeaderMap::new()).unwrap(), Format::Object);
        assert_eq!(negotiate(&h("application/vnd.kubernetes.protobuf")).unwrap_err().code, 406);
    }

    #[test]
    fn merged_agents_appear_once_connected_first() {
        let merged = merge(vec![
            agent("b", "1", false, "x"),
            agent("a", "2", false, "x"),
            agent("a", "2", true, "y"),
            agent("a", "1", false, "z"),
        ]);
        let got: Vec<_> = merged
            .iter()
            .map(|a| (a.metadata.namespace.as_str(), a.metadata.name.as_str(), a.status.connected))
            .collect();
        assert_eq!(got, [("a", "1", false), ("a", "2", true), ("b", "1", false)]);
    }

    #[test]
    fn watch_events_follow_changes() {
        let before = known(vec![agent("a", "1", true, "r1"), agent("a", "2", true, "r1")]);
        let mut unchanged = agent("a", "4", true, "r1");
        let now = known(vec![agent("a", "1", false, "r2"), agent("a", "3", true, "r1"), unchanged.clone()]);
        let events: Vec<_> = diff(&before, &now).into_iter().map(|(k, a)| (k, a.metadata.name)).collect();
        assert_eq!(
            events,
            [("MODIFIED", "1".into()), ("ADDED", "3".into()), ("ADDED", "4".into()), ("DELETED", "2".into())]
        );
        // Only lastSeen moved: nothing to tell.
        let before = known(vec![unchanged.clone()]);
        unchanged.status.last_seen = "2026-01-01T00:00:09Z".into();
        assert!(diff(&before, &known(vec![unchanged])).is_empty());
    }

    #[test]
    fn continue_tokens_round_trip_and_refuse_garbage() {
        let t = write_continue("team-a", "0193");
        assert_eq!(read_continue(&t).unwrap(), ("team-a".into(), "0193".into()));
        assert!(read_continue("not base64!").is_err());
        assert!(read_continue(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("[1]")).is_err());
    }

    #[test]
    fn ages_print_like_kubectl() {
        let s = |n| human_duration(Duration::from_secs(n));
        assert_eq!(
            [s(5), s(150), s(900), s(4 * 3600 + 60), s(10 * 3600), s(3 * 86_400 + 7200), s(30 * 86_400)],
            ["5s", "2m30s", "15m", "4h1m", "10h", "3d2h", "30d"]
        );
    }

    #[test]
    fn openapi_names_the_kind_for_kubectl_explain() {
        let doc = openapi_v3_doc();
        let schema = &doc["components"]["schemas"][SCHEMA_NAME];
        assert_eq!(schema["x-kubernetes-group-version-kind"][0]["kind"], KIND);
        assert!(schema["properties"]["status"]["properties"]["config"].is_object(), "{schema}");
        assert!(!doc.to_string().contains("\"$ref\":\"#/$defs"), "inlined");
        assert!(openapi_v2_doc()["definitions"][SCHEMA_NAME].is_object());
    }
}
