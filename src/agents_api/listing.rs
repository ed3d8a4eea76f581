//! The fleet as JSON on the API address: `GET /api/v1/namespaces/{ns}/agents` and, across every
//! namespace, `GET /api/v1/agents`. Only for callers the Kubernetes API authenticates and
//! authorizes to `list agents.fleet.opamp.dev` in that namespace (or across all): what agents
//! report (attributes, error texts) is their tenant's business.
//!
//! A listing is built from the fleet in place, one agent at a time under its shard's lock,
//! without copying reports (an effective config can be large), and at most
//! [`CONCURRENT_LISTINGS`] are built at once.
//!
//! # Across replicas
//!
//! Any replica lists the agents of every live replica: the one the caller reached checks the
//! caller's access, then asks every peer at once for its rows of the namespace (or of all)
//! through the peer route [`LIST`], and merges them with its own, sorted by namespace and uid.
//! An agent two replicas hold (a race, before the claim of [`crate::fleet::claims`] settles
//! it) appears once: the connected row wins, then the most recently seen. A peer that does not
//! answer is named in `missingReplicas` (absent when every replica answered).
//!
//! Peers answer their rows as JSON lines, built like a listing here (at most
//! [`CONCURRENT_LISTINGS`] at once on each replica, apart from the listings its own callers
//! asked for, so that two replicas listing through each other never wait on each other). The
//! merging replica holds its own rows and the peers' answers (each at most
//! [`crate::peers::MAX_ANSWER_BYTES`]) while it writes the merged listing: about twice the
//! listing's size, for at most [`CONCURRENT_LISTINGS`] listings at once.
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::Semaphore;

use crate::access::{KubeAccess, Request};
use crate::fleet::{AgentKey, AgentView, Fleet};
use crate::peers::Peers;
use crate::protocol::{Uid, attributes_json};

/// Listings built at the same time; more wait their turn.
pub const CONCURRENT_LISTINGS: usize = 2;
/// The peer route answering a replica's rows (see the module docs).
pub const LIST: &str = "/agents/list";

struct Listing {
    fleet: Fleet,
    access: Arc<KubeAccess>,
    peers: Peers,
    turns: Semaphore,
}

/// The listing routes.
pub fn router(fleet: Fleet, access: Arc<KubeAccess>, peers: Peers) -> Router {
    let state = Arc::new(Listing { fleet, access, peers, turns: Semaphore::new(CONCURRENT_LISTINGS) });
    Router::new()
        .route("/api/v1/agents", get(all))
        .route("/api/v1/namespaces/{ns}/agents", get(namespaced))
        .with_state(state)
}

/// What a peer asks for: the rows of one namespace, or of all.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ListRequest {
    namespace: Option<String>,
}

struct PeerListing {
    fleet: Fleet,
    turns: Semaphore,
}

/// The peer route [`LIST`] (to be nested under [`crate::peers::PREFIX`], behind the peers'
/// authentication).
pub fn peer_router(fleet: Fleet) -> Router {
    let state = Arc::new(PeerListing { fleet, turns: Semaphore::new(CONCURRENT_LISTINGS) });
    Router::new().route(LIST, post(peer_rows)).with_state(state)
}

async fn peer_rows(State(p): State<Arc<PeerListing>>, axum::Json(req): axum::Json<ListRequest>) -> Response {
    let Ok(_turn) = p.turns.acquire().await else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (body, _) = rows(&p.fleet, req.namespace.as_deref());
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn all(State(l): State<Arc<Listing>>, headers: HeaderMap) -> Response {
    list(&l, &headers, None).await
}

async fn namespaced(State(l): State<Arc<Listing>>, Path(ns): Path<String>, headers: HeaderMap) -> Response {
    list(&l, &headers, Some(&ns)).await
}

async fn list(l: &Listing, headers: &HeaderMap, namespace: Option<&str>) -> Response {
    let request = Request::agents("list", namespace, None);
    if let Err(denied) = l.access.check(headers, &request).await {
        let body = serde_json::json!({ "error": denied.to_string() });
        return (denied.status(), axum::Json(body)).into_response();
    }
    let Ok(_turn) = l.turns.acquire().await else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    if !l.peers.others().is_empty() {
        return merged(l, namespace).await;
    }
    // The keys first (small), sorted; then each agent written straight into the body under its
    // shard's lock: a listing costs about its own size, not a tree of JSON values per agent.
    let keys = keys(&l.fleet, namespace);
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

/// The keys of the fleet's agents (of `namespace`, or all), sorted.
fn keys(fleet: &Fleet, namespace: Option<&str>) -> Vec<AgentKey> {
    let mut keys = Vec::new();
    fleet.for_each(|key, _| {
        if namespace.is_none_or(|ns| *key.namespace == *ns) {
            keys.push(key.clone());
        }
    });
    keys.sort();
    keys
}

/// Where one row of a merged listing is, and what decides between two rows of one agent.
struct Row {
    namespace: Arc<str>,
    uid: Uid,
    connected: bool,
    /// Milliseconds since the Unix epoch.
    last_seen: i64,
    /// Which body: 0 this replica's, then the peers' answers.
    source: usize,
    range: Range<usize>,
}

/// The rows of the fleet's agents (of `namespace`, or all) as JSON lines, sorted, and where
/// each is.
fn rows(fleet: &Fleet, namespace: Option<&str>) -> (Vec<u8>, Vec<Row>) {
    let keys = keys(fleet, namespace);
    let mut body = Vec::with_capacity(keys.len() * 320);
    let mut rows = Vec::with_capacity(keys.len());
    for key in keys {
        let start = body.len();
        let seen = fleet.inspect(&key, |a| {
            serde_json::to_writer(&mut body, &AgentRow::of(a)).expect("JSON serializes into memory");
            body.push(b'\n');
            (a.connected, Timestamp::try_from(a.last_seen).map_or(0, |t| t.as_millisecond()))
        });
        if let Some((connected, last_seen)) = seen {
            let range = start..body.len() - 1;
            rows.push(Row { namespace: key.namespace, uid: key.uid, connected, last_seen, source: 0, range });
        }
    }
    (body, rows)
}

/// What a merged listing reads of a peer's row.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RowHead {
    instance_uid: Uid,
    namespace: String,
    connected: bool,
    last_seen: String,
}

/// The rows of a peer's answer (JSON lines); lines that do not read are left out.
fn peer_rows_of(body: &[u8], source: usize, names: &mut HashMap<String, Arc<str>>, out: &mut Vec<Row>) {
    let mut start = 0;
    for line in body.split(|b| *b == b'\n') {
        let range = start..start + line.len();
        start += line.len() + 1;
        if line.is_empty() {
            continue;
        }
        let Ok(head) = serde_json::from_slice::<RowHead>(line) else {
            tracing::debug!(source, "a peer's agent row does not read");
            continue;
        };
        let namespace = match names.get(&head.namespace) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = head.namespace.as_str().into();
                names.insert(head.namespace, n.clone());
                n
            }
        };
        let last_seen = head.last_seen.parse::<Timestamp>().map_or(0, |t| t.as_millisecond());
        out.push(Row {
            namespace,
            uid: head.instance_uid,
            connected: head.connected,
            last_seen,
            source,
            range,
        });
    }
}

/// The listing of every live replica's agents, merged (see the module docs).
async fn merged(l: &Listing, namespace: Option<&str>) -> Response {
    let others = l.peers.others();
    let request = serde_json::to_vec(&ListRequest { namespace: namespace.map(str::to_owned) })
        .expect("JSON serializes into memory");
    let headers: HeaderMap =
        [(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"))]
            .into_iter()
            .collect();
    let calls = others.iter().map(|m| l.peers.send(m, LIST, headers.clone(), Bytes::from(request.clone())));
    let answers = futures_util::future::join_all(calls).await;
    let (mine, mut rows) = rows(&l.fleet, namespace);
    let mut bodies = vec![Bytes::from(mine)];
    let mut missing = Vec::new();
    let mut names: HashMap<String, Arc<str>> =
        rows.iter().map(|r| (r.namespace.to_string(), r.namespace.clone())).collect();
    for (member, answer) in others.iter().zip(answers) {
        match answer {
            Ok((200, _, body)) => {
                peer_rows_of(&body, bodies.len(), &mut names, &mut rows);
                bodies.push(body);
            }
            Ok((status, _, _)) => {
                tracing::warn!(peer = %member.identity, status, "a replica did not list its agents");
                missing.push(member.identity.to_string());
            }
            Err(e) => {
                tracing::warn!(peer = %member.identity, error = %e, "a replica did not list its agents");
                missing.push(member.identity.to_string());
            }
        }
    }
    drop(names);
    let rows = winners(rows);
    let size = rows.iter().map(|r| r.range.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(64 + size);
    body.extend_from_slice(b"{\"agents\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&bodies[row.source][row.range.clone()]);
    }
    body.push(b']');
    if !missing.is_empty() {
        body.extend_from_slice(b",\"missingReplicas\":");
        serde_json::to_writer(&mut body, &missing).expect("JSON serializes into memory");
    }
    body.push(b'}');
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// One row per agent, sorted by namespace and uid: of an agent's rows, the connected one wins,
/// then the most recently seen, then the first given.
fn winners(rows: Vec<Row>) -> Vec<Row> {
    super::one_per_agent(rows, |r| ((r.namespace.clone(), r.uid), r.connected, r.last_seen))
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
                status: super::object::remote_config_status_name(s.status),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetConfig, Tenant};
    use crate::proto::AgentToServer;
    use crate::protocol::Transport;

    fn row(ns: &str, uid: Uid, connected: bool, last_seen: i64, source: usize) -> Row {
        Row { namespace: ns.into(), uid, connected, last_seen, source, range: 0..0 }
    }

    /// An agent on two replicas appears once: connected first, then the latest seen, then
    /// this replica's row; rows come sorted by namespace and uid.
    #[test]
    fn an_agent_on_two_replicas_is_listed_once() {
        let (u1, u2) = (Uid::from_wire(&[1; 16]).unwrap(), Uid::from_wire(&[2; 16]).unwrap());
        let rows = vec![
            row("b", u1, false, 9, 0),
            row("a", u2, false, 5, 0),
            row("a", u2, true, 1, 1),
            row("a", u1, false, 3, 2),
            row("a", u1, false, 4, 1),
            row("a", u2, true, 1, 2),
            row("b", u1, false, 9, 2),
        ];
        let won: Vec<_> =
            winners(rows).iter().map(|r| (r.namespace.to_string(), r.uid, r.connected, r.source)).collect();
        assert_eq!(
            won,
            [("a".into(), u1, false, 1), ("a".into(), u2, true, 1), ("b".into(), u1, false, 0)],
            "per agent: connected, then the latest, then the first given"
        );
    }

    /// This replica's rows, read back as a peer's: every row found, the keys right.
    #[test]
    fn rows_read_back_as_a_peers_answer() {
        let fleet = Fleet::new(FleetConfig::default());
        let uids = [Uid::new_v7(), Uid::new_v7()];
        for (uid, ns) in uids.iter().zip(["team-a", "team-b"]) {
            let mut conn = fleet.connection(Transport::Http, Tenant::new(ns));
            fleet
                .handle(&mut conn, AgentToServer { instance_uid: uid.to_wire(), ..Default::default() })
                .unwrap();
        }
        let (body, mine) = rows(&fleet, None);
        let mut read = Vec::new();
        peer_rows_of(&body, 1, &mut HashMap::new(), &mut read);
        assert_eq!(read.len(), 2);
        for (a, b) in mine.iter().zip(&read) {
            assert_eq!(
                (&a.namespace, a.uid, a.connected, a.last_seen, &a.range),
                (&b.namespace, b.uid, b.connected, b.last_seen, &b.range)
            );
            serde_json::from_slice::<serde_json::Value>(&body[b.range.clone()]).expect("a row is JSON");
        }
        let (body, only_b) = rows(&fleet, Some("team-b"));
        assert_eq!(only_b.len(), 1);
        assert!(String::from_utf8_lossy(&body).contains(&uids[1].to_string()));
    }
}
