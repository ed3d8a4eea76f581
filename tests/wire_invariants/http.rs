//! `http_request`: requests of any method, path, query, headers and body through the real
//! routers, in memory (`tower::ServiceExt::oneshot`): the OpAMP endpoint's
//! (`OpampServer::router`, `POST /v1/opamp` and the WebSocket `GET`) and the API address's
//! dispatch and listing routes (`routes::dispatch::router`, `agents_api::router`, the latter
//! with a Kubernetes client answered in memory). `/healthz` and `/readyz` are closures inside
//! `Operator::start`, which needs a cluster: on these routers they are 404.
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, Request, header};
use opamp_operator::api::{AgentSelector, DownstreamStatus, UpstreamStatus};
use opamp_operator::controller::auth::TokenAuthenticator;
use opamp_operator::fleet::{Fleet, FleetConfig, Tenant};
use opamp_operator::opamp::{OpampServer, ServerConfig};
use opamp_operator::peers::Peers;
use opamp_operator::proto::{
    AgentDescription, AgentToServer, AnyValue, CustomCapabilities, KeyValue, ServerErrorResponseType,
    ServerToAgent, any_value,
};
use opamp_operator::protocol::{Transport, Uid, codec};
use opamp_operator::routes::egress::EgressPolicy;
use opamp_operator::routes::{DispatchRoute, Routes, SlotRoute};
use prost::Message;
use serde_json::json;
use tower::ServiceExt;

/// The OpAMP endpoint's `max_message_bytes` here (small, so that inputs reach it).
pub const OPAMP_LIMIT: usize = 16 << 10;
/// The dispatch API's body limit.
pub const DISPATCH_LIMIT: usize = opamp_operator::routes::dispatch::MAX_BODY_BYTES;
/// The agents' token (namespace [`TENANT`]).
pub const AGENT_TOKEN: &str = "agent-token";
/// The dispatch token of slot [`SLOT`].
pub const SLOT_TOKEN: &str = "slot-token";
/// A Kubernetes token the fake API server authenticates and allows to list agents.
pub const ADMIN_TOKEN: &str = "admin-token";
/// A Kubernetes token the fake API server authenticates but does not allow anything.
pub const VIEWER_TOKEN: &str = "viewer-token";
/// A token whose review the fake API server fails (500).
pub const OUTAGE_TOKEN: &str = "outage-token";
/// The tenant namespace of the agents and the slots.
pub const TENANT: &str = "tenant";
/// The slot with dispatch settings.
pub const SLOT: &str = "jobs";
/// A slot without dispatch settings.
pub const QUIET_SLOT: &str = "quiet";
/// The message types slot [`SLOT`] allows.
pub const MESSAGE_TYPES: [&str; 2] = ["run", "stop"];
/// The capability of slot [`SLOT`].
pub const CAPABILITY: &str = "com.example.jobs";
/// The streamed chunk size of oversized bodies.
pub const CHUNK: usize = 8 << 10;

/// One tokio runtime per thread, current-thread (what a test or a fuzz iteration blocks on).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// The agents in the dispatch fleet: uid, whether it declared [`CAPABILITY`], its `env`.
pub const FLEET_AGENTS: [([u8; 16], bool, &str); 3] =
    [([1; 16], true, "a"), ([2; 16], false, "a"), ([3; 16], true, "b")];

/// Routes with slot [`SLOT`] (dispatch, token [`SLOT_TOKEN`], types [`MESSAGE_TYPES`]) and
/// [`QUIET_SLOT`] (none), and the [`FLEET_AGENTS`] polling over HTTP in [`TENANT`]; with
/// their fleet.
pub fn dispatch_routes() -> (Arc<Routes>, Fleet) {
    let fleet = Fleet::new(FleetConfig::default());
    for (uid, capable, env) in FLEET_AGENTS {
        let mut conn = fleet.connection(Transport::Http, Tenant::new(TENANT));
        let value = Some(AnyValue { value: Some(any_value::Value::StringValue(env.into())) });
        let hello = AgentToServer {
            instance_uid: Uid(uid).to_wire(),
            capabilities: 0x7,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue { key: "env".into(), value }],
                non_identifying_attributes: vec![],
            }),
            custom_capabilities: capable
                .then(|| CustomCapabilities { capabilities: vec![CAPABILITY.into()] }),
            ..Default::default()
        };
        fleet.handle(&mut conn, hello).expect("an agent");
        fleet.connection_closed(&conn);
    }
    let routes = Routes::new(fleet.clone(), Arc::default(), EgressPolicy::default());
    let slot = |name: &str, dispatch: bool| {
        let route = SlotRoute {
            namespace: TENANT.into(),
            name: name.into(),
            capability: if dispatch { CAPABILITY.into() } else { format!("com.example.{name}") },
            selector: AgentSelector::default(),
            message_types: MESSAGE_TYPES.iter().map(|t| t.to_string()).collect(),
            callback: None,
            dispatch: dispatch.then(|| DispatchRoute {
                token: Ok(SLOT_TOKEN.as_bytes().to_vec()),
                queue_limit: 64,
                ttl: Duration::from_secs(300),
            }),
        };
        (route, UpstreamStatus::default(), DownstreamStatus::default())
    };
    routes.publish(TENANT, vec![slot(SLOT, true), slot(QUIET_SLOT, false)]);
    (routes, fleet)
}

/// A Kubernetes client answered in memory: TokenReviews authenticate [`ADMIN_TOKEN`] and
/// [`VIEWER_TOKEN`] (as users `admin` and `viewer`), fail for [`OUTAGE_TOKEN`] and refuse
/// the rest; SubjectAccessReviews allow `admin` only.
pub fn fake_kube() -> kube::Client {
    let service = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect_bytes().await.unwrap_or_default();
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let (status, answer) = if path.ends_with("/tokenreviews") {
            match review["spec"]["token"].as_str() {
                Some(OUTAGE_TOKEN) => (500, json!({ "kind": "Status", "status": "Failure", "code": 500 })),
                Some(t @ (ADMIN_TOKEN | VIEWER_TOKEN)) => {
                    let user = t.trim_end_matches("-token");
                    (201, json!({ "status": { "authenticated": true, "user": { "username": user } } }))
                }
                _ => (201, json!({ "status": { "authenticated": false } })),
            }
        } else if path.ends_with("/subjectaccessreviews") {
            let allowed = review["spec"]["user"] == "admin";
            (201, json!({ "status": { "allowed": allowed } }))
        } else {
            (404, json!({ "kind": "Status", "status": "Failure", "code": 404 }))
        };
        let mut answer = answer;
        if status == 201 {
            answer["apiVersion"] = json!(if path.contains("authentication") {
                "authentication.k8s.io/v1"
            } else {
                "authorization.k8s.io/v1"
            });
            answer["kind"] =
                json!(if path.ends_with("/tokenreviews") { "TokenReview" } else { "SubjectAccessReview" });
            answer["spec"] = review["spec"].clone();
        }
        let resp = http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(serde_json::to_vec(&answer).expect("JSON")))
            .expect("a response");
        Ok::<_, Infallible>(resp)
    });
    kube::Client::new(service, "default")
}

/// The OpAMP endpoint: agents with [`AGENT_TOKEN`] in [`TENANT`], at most four agents (so
/// that refusals at capacity happen), messages up to [`OPAMP_LIMIT`].
pub fn opamp_app() -> Router {
    let fleet = Fleet::new(FleetConfig { max_agents: Some(4), ..Default::default() });
    let auth = TokenAuthenticator::new(None);
    auth.rebuild(&[Arc::new(
        serde_json::from_value(json!({
            "metadata": { "name": "agents", "namespace": TENANT },
            "type": opamp_operator::api::AGENT_TOKEN_SECRET_TYPE,
            "data": { "token": base64_of(AGENT_TOKEN.as_bytes()) },
        }))
        .expect("a Secret"),
    )]);
    let config = ServerConfig { max_message_bytes: OPAMP_LIMIT, ..Default::default() };
    OpampServer::with_auth(fleet, config, auth).router()
}

/// The API address's routes that need no cluster: dispatch and the agents listing; with
/// their fleet.
pub fn api_app() -> (Router, Fleet) {
    let (routes, fleet) = dispatch_routes();
    let access = Arc::new(opamp_operator::access::KubeAccess::new(fake_kube()));
    let listing = opamp_operator::agents_api::router(fleet.clone(), access, Peers::solo());
    (opamp_operator::routes::dispatch::router(routes).merge(listing), fleet)
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A body of the request.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum BodyInput {
    Empty,
    Raw(Vec<u8>),
    /// A valid `AgentToServer` (uid `[uid % 6; 16]`), optionally gzipped.
    Agent {
        uid: u8,
        seq: u64,
        describe: bool,
        gzip: bool,
    },
    /// A dispatch request for the slot's agents.
    Dispatch {
        r#type: u8,
        data: Vec<u8>,
        agent: u8,
    },
    /// Streamed, `extra` bytes over the limit of the route's address.
    Oversized {
        extra: u16,
    },
    /// A gzip body that inflates beyond the OpAMP limit.
    Bomb,
}

/// One request.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct HttpInput {
    /// The OpAMP address (else the API address).
    pub opamp: bool,
    /// GET, POST, HEAD, PUT, DELETE, PATCH, OPTIONS, TRACE, or an extension method.
    pub method: u8,
    /// Which path (see [`path_of`]); `segment` fills its variable part.
    pub path: u8,
    pub segment: String,
    pub query: Option<String>,
    /// protobuf, protobuf with parameters, JSON, text, or none.
    pub content_type: Option<u8>,
    /// gzip, identity, br, or an invalid value.
    pub content_encoding: Option<u8>,
    /// The agent token, the slot token, the admin, viewer or outage token, a wrong one, a
    /// malformed header.
    pub authorization: Option<u8>,
    /// The body's length, less, more, or not a number.
    pub content_length: Option<u8>,
    pub body: BodyInput,
}

/// Escapes what cannot appear in a URI's path or query, keeping `%`, `/`, `?`, `=`, `&`
/// when `query`: hostile segments still reach the router (bad escapes, extra slashes).
fn escape(s: &str, query: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        let plain =
            b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%/".contains(&b) || (query && b"?".contains(&b));
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path of a request: `/v1/opamp`, the dispatch route of [`SLOT`], its status route with
/// `segment` as id, the listings, a slot named `segment`, `/healthz`, or `/<segment>`.
fn path_of(input: &HttpInput) -> String {
    let seg = escape(&input.segment, false);
    match input.path % 8 {
        0 => "/v1/opamp".to_owned(),
        1 => format!("/api/v1/namespaces/{TENANT}/capabilityslots/{SLOT}/messages"),
        2 => format!("/api/v1/namespaces/{TENANT}/capabilityslots/{SLOT}/messages/{seg}"),
        3 => "/api/v1/agents".to_owned(),
        4 => format!("/api/v1/namespaces/{seg}/agents"),
        5 => format!("/api/v1/namespaces/{TENANT}/capabilityslots/{seg}/messages"),
        6 => "/healthz".to_owned(),
        _ => format!("/{seg}"),
    }
}

/// The streamed body: `len` bytes in chunks of [`CHUNK`], counting what the server pulls.
fn streamed(len: usize, pulled: Arc<AtomicUsize>) -> Body {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| Bytes::from(vec![0u8; CHUNK])).clone();
    let chunks = (0..len.div_ceil(CHUNK)).map(move |i| {
        let n = CHUNK.min(len - i * CHUNK);
        pulled.fetch_add(n, Ordering::Relaxed);
        Ok::<_, Infallible>(zeros.slice(..n))
    });
    Body::from_stream(futures_util::stream::iter(chunks))
}

/// The gzip body of [`BodyInput::Bomb`]: `OPAMP_LIMIT + 1` zeros compressed.
fn bomb() -> Bytes {
    static BOMB: OnceLock<Bytes> = OnceLock::new();
    BOMB.get_or_init(|| codec::gzip(&vec![0u8; OPAMP_LIMIT + 1])).clone()
}

/// The statuses a route answers, by what the handlers return (and axum's extractors: 400 for
/// an undecodable path parameter, 405 for another method, 404 for another path; the
/// WebSocket `GET` is 400 without upgrade headers, 426 when the connection cannot be upgraded,
/// as in memory).
pub mod statuses {
    /// `POST /v1/opamp`: a reply, undecodable, no or an unknown token, too large, not
    /// protobuf, refused at capacity.
    pub const OPAMP_POST: &[u16] = &[200, 400, 401, 413, 415, 503];
    /// `GET /v1/opamp` without a real connection to upgrade (`HEAD` is routed to the `GET`
    /// handler, whose upgrade refuses it as not a `GET`: 405).
    pub const OPAMP_GET: &[u16] = &[400, 405, 426];
    /// `POST …/messages`: a dispatch, a bad request, no token, wrong token or unknown slot,
    /// an id taken, too large, every queue full.
    pub const DISPATCH_POST: &[u16] = &[200, 400, 401, 403, 409, 413, 429];
    /// `GET …/messages/{id}`.
    pub const DISPATCH_GET: &[u16] = &[200, 400, 401, 403, 404];
    /// `GET` the agents listing: the listing, no or an unauthenticated token, not allowed,
    /// the API server unavailable.
    pub const LISTING: &[u16] = &[200, 400, 401, 403, 503];
}

/// Sends `input` to the router of its address and checks: a response whose status is one its
/// route documents; an OpAMP reply is a protobuf `ServerToAgent` (an error response unless
/// 200, naming the agent when 200); a body over the limit is 413 when the request got that
/// far, and is read at most up to eight times the limit (the drain) and not at all when
/// refused before; the statuses that follow from the headers alone are the expected ones.
/// Answers the status (`None`: not a valid URI, nothing sent).
pub fn http_request(input: &HttpInput) -> Option<u16> {
    let method = match input.method % 10 {
        0 => Method::GET,
        1 | 9 => Method::POST,
        2 => Method::HEAD,
        3 => Method::PUT,
        4 => Method::DELETE,
        5 => Method::PATCH,
        6 => Method::OPTIONS,
        7 => Method::TRACE,
        _ => Method::from_bytes(b"PURGE").expect("a method"),
    };
    let path = path_of(input);
    let uri = match &input.query {
        Some(q) => format!("{path}?{}", escape(q, true)),
        None => path.clone(),
    };
    let limit = if input.opamp { OPAMP_LIMIT } else { DISPATCH_LIMIT };
    let pulled = Arc::new(AtomicUsize::new(0));
    let (body, len, oversized) = match &input.body {
        BodyInput::Empty => (Body::empty(), 0, false),
        BodyInput::Raw(b) => (Body::from(b.clone()), b.len(), false),
        BodyInput::Agent { uid, seq, describe, gzip } => {
            let msg = AgentToServer {
                instance_uid: Uid([uid % 6; 16]).to_wire(),
                sequence_num: *seq,
                agent_description: describe.then(AgentDescription::default),
                ..Default::default()
            }
            .encode_to_vec();
            let b = if *gzip { codec::gzip(&msg).to_vec() } else { msg };
            (Body::from(b.clone()), b.len(), false)
        }
        BodyInput::Dispatch { r#type, data, agent } => {
            let message_type = ["run", "stop", "other"][*r#type as usize % 3];
            let b = serde_json::to_vec(&json!({
                "type": message_type,
                "data": base64_of(data),
                "agents": [Uid(FLEET_AGENTS[*agent as usize % 3].0).to_string()],
            }))
            .expect("JSON");
            (Body::from(b.clone()), b.len(), false)
        }
        BodyInput::Oversized { extra } => {
            let len = limit + 1 + *extra as usize;
            (streamed(len, pulled.clone()), len, true)
        }
        BodyInput::Bomb => {
            let b = bomb();
            (Body::from(b.clone()), b.len(), false)
        }
    };
    let mut req = Request::builder().method(method.clone());
    let Ok(uri) = uri.parse::<axum::http::Uri>() else { return None };
    req = req.uri(uri);
    let content_type = input.content_type.map(|c| {
        ["application/x-protobuf", "application/x-protobuf; charset=binary", "application/json", "text/plain"]
            [c as usize % 4]
    });
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let encoding = input.content_encoding.map(|e| ["gzip", "identity", "br", "gzip, gzip"][e as usize % 4]);
    if let Some(enc) = encoding {
        req = req.header(header::CONTENT_ENCODING, enc);
    }
    if matches!(input.body, BodyInput::Bomb) && encoding.is_none() {
        req = req.header(header::CONTENT_ENCODING, "gzip");
    }
    let token = input.authorization.map(|a| {
        [AGENT_TOKEN, SLOT_TOKEN, ADMIN_TOKEN, VIEWER_TOKEN, OUTAGE_TOKEN, "wrong", ""][a as usize % 7]
    });
    if let Some(t) = token {
        let value = if t.is_empty() { "Basic Zm9vOmJhcg==".to_owned() } else { format!("Bearer {t}") };
        req = req.header(header::AUTHORIZATION, value);
    }
    if let Some(cl) = input.content_length {
        let value = match cl % 4 {
            0 => HeaderValue::from(len),
            1 => HeaderValue::from(len.saturating_sub(1)),
            2 => HeaderValue::from(len + 1_000_000),
            _ => HeaderValue::from_static("many"),
        };
        req = req.header(header::CONTENT_LENGTH, value);
    }
    let Ok(req) = req.body(body) else { return None };
    let opamp = input.opamp;
    let (status, headers, body) = block_on(async move {
        // Inside the runtime: the Kubernetes client spawns its buffer task.
        let app = if opamp { opamp_app() } else { api_app().0 };
        let resp = app.oneshot(req).await.expect("routers are infallible");
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.expect("a response body");
        (parts.status, parts.headers, body)
    });
    let code = status.as_u16();
    let which = input.path % 8;

    // The route and what it may answer.
    let plain_segment = !input.segment.is_empty()
        && input.segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let get_like = method == Method::GET || method == Method::HEAD;
    let route: Option<&[u16]> = match (input.opamp, which) {
        (true, 0) if method == Method::POST => Some(statuses::OPAMP_POST),
        (true, 0) if get_like => Some(statuses::OPAMP_GET),
        (true, 0) => Some(&[405]),
        (false, 1) if method == Method::POST => Some(statuses::DISPATCH_POST),
        (false, 1) => Some(&[405]),
        (false, 2) if plain_segment && get_like => Some(statuses::DISPATCH_GET),
        (false, 2) if plain_segment => Some(&[405]),
        (false, 3) if get_like => Some(statuses::LISTING),
        (false, 3) => Some(&[405]),
        (false, 4) if plain_segment && get_like => Some(statuses::LISTING),
        (false, 5) if plain_segment && method == Method::POST => Some(statuses::DISPATCH_POST),
        (_, 0 | 1 | 3 | 6) => Some(&[404]),
        (true, _) if !input.segment.contains("v1") => Some(&[404]),
        _ => None,
    };
    let any: Vec<u16> = [
        statuses::OPAMP_POST,
        statuses::OPAMP_GET,
        statuses::DISPATCH_POST,
        statuses::DISPATCH_GET,
        statuses::LISTING,
        &[404, 405],
    ]
    .concat();
    let allowed = route.unwrap_or(&any);
    assert!(allowed.contains(&code), "{method} {path}: status {code} is not one of {allowed:?}");

    // The body limit: read at most to the drain bound; 413 when the request got to reading it.
    let read = pulled.load(Ordering::Relaxed);
    assert!(read <= limit * 8 + CHUNK, "{read} bytes read of a body over the limit of {limit}");

    if input.opamp && which == 0 && method == Method::POST {
        let admitted = token == Some(AGENT_TOKEN);
        let protobuf = content_type.is_some_and(|c| c.starts_with("application/x-protobuf"));
        let expected_first = if !admitted {
            Some(401)
        } else if !protobuf {
            Some(415)
        } else if oversized || matches!(input.body, BodyInput::Bomb) && encoding.is_none_or(|e| e == "gzip") {
            Some(413)
        } else {
            None
        };
        if let Some(expected) = expected_first {
            assert_eq!(code, expected, "POST /v1/opamp with token {token:?}, {content_type:?}");
        }
        if code != 413 {
            assert!(!oversized || read == 0, "a refused request's body was read ({read} bytes)");
        }
        // Every OpAMP reply is a ServerToAgent.
        assert_eq!(
            headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/x-protobuf"[..])
        );
        let plain = match headers.get(header::CONTENT_ENCODING) {
            Some(e) if e == "gzip" => codec::gunzip(&body, OPAMP_LIMIT).expect("a gzipped reply").to_vec(),
            _ => body.to_vec(),
        };
        let reply = ServerToAgent::decode(&plain[..]).expect("an OpAMP reply decodes as a ServerToAgent");
        if code == 200 {
            assert!(reply.error_response.is_none(), "a 200 reply with an error response");
            if let BodyInput::Agent { uid, .. } = input.body {
                assert_eq!(reply.instance_uid, Uid([uid % 6; 16]).to_wire());
            }
        } else {
            let error = reply.error_response.expect("an error status carries an error response");
            let kind = if code == 503 {
                ServerErrorResponseType::Unavailable
            } else {
                ServerErrorResponseType::BadRequest
            };
            assert_eq!(error.r#type, kind as i32, "status {code}");
        }
        if let (BodyInput::Agent { gzip, .. }, true) = (&input.body, admitted && protobuf) {
            let decodable = match encoding {
                None | Some("identity") => !gzip,
                Some("gzip") => *gzip,
                _ => false,
            };
            if decodable {
                assert!(code == 200 || code == 503, "a valid message got {code}");
            }
        }
    }
    if !input.opamp && which == 1 && method == Method::POST {
        let expected_first = match token {
            None | Some("") => Some(401),
            Some(t) if t != SLOT_TOKEN => Some(403),
            _ if oversized => Some(413),
            _ => None,
        };
        if let Some(expected) = expected_first {
            assert_eq!(code, expected, "POST dispatch with token {token:?}");
        }
        if code != 413 {
            assert!(!oversized || read == 0, "a refused dispatch's body was read ({read} bytes)");
        }
        if code != 200 {
            let error: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
            assert!(error["error"].is_string(), "{error}");
        }
    }
    if !input.opamp && which == 3 && get_like {
        let expected = match token {
            None | Some("") => 401,
            Some(ADMIN_TOKEN) => 200,
            Some(VIEWER_TOKEN) => 403,
            Some(OUTAGE_TOKEN) => 503,
            Some(_) => 401,
        };
        assert_eq!(code, expected, "GET /api/v1/agents with token {token:?}");
        if code == 200 && method == Method::GET {
            let listing: serde_json::Value = serde_json::from_slice(&body).expect("a JSON listing");
            assert_eq!(listing["agents"].as_array().map(Vec::len), Some(FLEET_AGENTS.len()), "{listing}");
        }
    }
    Some(code)
}
