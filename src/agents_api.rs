//! The fleet as JSON on the API address: `GET /api/v1/namespaces/{ns}/agents` and, across every
//! namespace, `GET /api/v1/agents`. Only for callers the Kubernetes API authenticates and
//! authorizes to `list agents.fleet.opamp.dev` in that namespace (or across all): what agents
//! report (attributes, error texts) is their tenant's business.
//!
//! A listing is built from the fleet in place, one agent at a time under its shard's lock,
//! without copying reports (an effective config can be large), and at most
//! [`CONCURRENT_LISTINGS`] are built at once.
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use crate::access::{AGENTS_GROUP, KubeAccess, Request};
use crate::fleet::{AgentView, Fleet};
use crate::proto::RemoteConfigStatuses;
use crate::protocol::attributes_json;

/// Listings built at the same time; more wait their turn.
pub const CONCURRENT_LISTINGS: usize = 2;

struct Listing {
    fleet: Fleet,
    access: Arc<KubeAccess>,
    turns: Semaphore,
}

/// The listing routes.
pub fn router(fleet: Fleet, access: Arc<KubeAccess>) -> Router {
    let state = Arc::new(Listing { fleet, access, turns: Semaphore::new(CONCURRENT_LISTINGS) });
    Router::new()
        .route("/api/v1/agents", get(all))
        .route("/api/v1/namespaces/{ns}/agents", get(namespaced))
        .with_state(state)
}

async fn all(State(l): State<Arc<Listing>>, headers: HeaderMap) -> Response {
    list(&l, &headers, None).await
}

async fn namespaced(State(l): State<Arc<Listing>>, Path(ns): Path<String>, headers: HeaderMap) -> Response {
    list(&l, &headers, Some(&ns)).await
}

async fn list(l: &Listing, headers: &HeaderMap, namespace: Option<&str>) -> Response {
    let request = Request { verb: "list", group: AGENTS_GROUP, resource: "agents", namespace };
    if let Err(denied) = l.access.check(headers, &request).await {
        let body = serde_json::json!({ "error": denied.to_string() });
        return (denied.status(), axum::Json(body)).into_response();
    }
    let Ok(_turn) = l.turns.acquire().await else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    // The keys first (small), sorted; then each agent written straight into the body under its
    // shard's lock: a listing costs about its own size, not a tree of JSON values per agent.
    let mut keys = Vec::new();
    l.fleet.for_each(|key, _| {
        if namespace.is_none_or(|ns| *key.namespace == *ns) {
            keys.push(key.clone());
        }
    });
    keys.sort();
    let mut body = Vec::with_capacity(64 + keys.len() * 320);
    body.extend_from_slice(b"{\"agents\":[");
    let mut first = true;
    for key in &keys {
        l.fleet.inspect(key, |a| {
            if !std::mem::take(&mut first) {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, &AgentRow::of(a)).expect("JSON serializes into memory");
        });
    }
    body.extend_from_slice(b"]}");
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What users see of one agent.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow<'a> {
    instance_uid: crate::protocol::Uid,
    namespace: &'a str,
    connected: bool,
    transport: Option<&'static str>,
    attributes: serde_json::Map<String, serde_json::Value>,
    healthy: Option<bool>,
    remote_config: Option<RemoteConfigRow<'a>>,
    desired_hash: Option<String>,
    report_trimmed: Vec<&'static str>,
    last_seen: String,
}

#[derive(serde::Serialize)]
pub struct RemoteConfigRow<'a> {
    status: &'static str,
    hash: String,
    error: &'a str,
}

impl<'a> AgentRow<'a> {
    pub fn of(a: &'a AgentView<'_>) -> Self {
        let status = a.report.remote_config_status.as_ref();
        Self {
            instance_uid: a.uid,
            namespace: a.namespace,
            connected: a.connected,
            transport: a.transport.map(|t| t.as_str()),
            attributes: attributes_json(a.report.description.as_ref()),
            healthy: a.report.health.as_ref().map(|h| h.healthy),
            remote_config: status.map(|s| RemoteConfigRow {
                status: RemoteConfigStatuses::try_from(s.status)
                    .map(|x| x.as_str_name().trim_start_matches("RemoteConfigStatuses_"))
                    .unwrap_or("UNKNOWN"),
                hash: hex::encode(&s.last_remote_config_hash),
                error: &s.error_message,
            }),
            desired_hash: a.desired.remote_config.as_ref().map(|c| hex::encode(&c.config_hash)),
            report_trimmed: a.report.trimmed.part_names(),
            last_seen: k8s_openapi::jiff::Timestamp::try_from(a.last_seen)
                .map(|t| t.to_string())
                .unwrap_or_default(),
        }
    }
}
