//! `dispatch_json`: the body a service POSTs to the dispatch API, mostly valid JSON objects
//! with hostile field values (or raw bytes), through the dispatch router of a fresh replica
//! with three agents ([`super::http::FLEET_AGENTS`]).
use std::collections::HashSet;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use opamp_operator::protocol::Uid;
use opamp_operator::routes::dispatch::{MAX_AGENT_BYTES_KEPT, MAX_AGENTS, MAX_BODY_BYTES, MAX_ID_CHARS};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::http::{FLEET_AGENTS, MESSAGE_TYPES, SLOT, SLOT_TOKEN, TENANT, block_on, dispatch_routes};

/// A string field: one of a few good values, hostile text, or a long run of one character.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum Text {
    Good(u8),
    Hostile(String),
    /// `'a'` repeated (the id's bound is 253 characters).
    Long(u16),
}

impl Text {
    fn value(&self, good: &[&str]) -> String {
        match self {
            Text::Good(i) => good[*i as usize % good.len()].to_owned(),
            Text::Hostile(s) => s.clone(),
            Text::Long(n) => "a".repeat(*n as usize % 600),
        }
    }
}

/// The `data` field.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum Data {
    /// These bytes, base64.
    Bytes(Vec<u8>),
    /// Any text (base64 or not).
    Text(String),
    /// Base64 of so many bytes that the body exceeds its limit.
    Huge,
}

/// One entry of `agents`.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum Target {
    /// A fleet agent (index modulo 3, with two unknown uids), in one of the uid's spellings.
    Uid { agent: u8, spelling: u8 },
    /// Anything else.
    Other(String),
}

/// A `selector`: `matchAttributes` over `env` and a requirement.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct Selector {
    pub env: Option<u8>,
    /// (operator modulo 5: In, NotIn, Exists, DoesNotExist, or an unknown one; values).
    pub expression: Option<(u8, Vec<u8>)>,
}

/// A dispatch request body.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct DispatchInput {
    pub id: Option<Text>,
    pub r#type: Option<Text>,
    pub data: Option<Data>,
    pub agents: Option<Vec<Target>>,
    /// Pads `agents` past [`MAX_AGENTS`] when 0 (rarely, they are long).
    pub pad_agents: u8,
    pub selector: Option<Selector>,
    /// A field the request does not have.
    pub unknown_field: bool,
    /// 1: `type` a number; 2: `agents` a string; 3: `data` an array; else none.
    pub mistyped: u8,
    /// Sent instead of the JSON.
    pub raw: Option<Vec<u8>>,
}

const ENVS: [&str; 3] = ["a", "b", "c"];

fn uid_of(agent: u8) -> Uid {
    match agent % 5 {
        i @ 0..=2 => Uid(FLEET_AGENTS[i as usize].0),
        i => Uid([0xE0 + i; 16]),
    }
}

fn spelled(uid: Uid, spelling: u8) -> String {
    let u = uuid::Uuid::from_bytes(uid.0);
    match spelling % 5 {
        0 => u.hyphenated().to_string(),
        1 => u.hyphenated().to_string().to_uppercase(),
        2 => u.simple().to_string(),
        3 => u.braced().to_string(),
        _ => u.urn().to_string(),
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The JSON object of a structured input.
pub fn request_json(input: &DispatchInput) -> Value {
    let mut v = serde_json::Map::new();
    if let Some(id) = &input.id {
        v.insert("id".into(), json!(id.value(&["req-1", "a.b_c:d-E9", "x"])));
    }
    if let Some(t) = &input.r#type {
        v.insert("type".into(), json!(t.value(&["run", "stop", "other"])));
    }
    if let Some(data) = &input.data {
        let text = match data {
            Data::Bytes(b) => base64_of(b),
            Data::Text(s) => s.clone(),
            Data::Huge => base64_of(&vec![7u8; MAX_BODY_BYTES * 3 / 4 + 1]),
        };
        v.insert("data".into(), json!(text));
    }
    if let Some(agents) = &input.agents {
        let mut list: Vec<String> = agents
            .iter()
            .map(|t| match t {
                Target::Uid { agent, spelling } => spelled(uid_of(*agent), *spelling),
                Target::Other(s) => s.clone(),
            })
            .collect();
        if input.pad_agents == 0 && !list.is_empty() {
            list.extend((0..=MAX_AGENTS).map(|i| format!("pad-{i}")));
        }
        v.insert("agents".into(), json!(list));
    }
    if let Some(s) = &input.selector {
        let mut sel = serde_json::Map::new();
        if let Some(env) = s.env {
            sel.insert("matchAttributes".into(), json!({ "env": ENVS[env as usize % 3] }));
        }
        if let Some((op, values)) = &s.expression {
            let operator = ["In", "NotIn", "Exists", "DoesNotExist", "Near"][*op as usize % 5];
            let values: Vec<&str> = values.iter().map(|v| ENVS[*v as usize % 3]).collect();
            sel.insert(
                "matchExpressions".into(),
                json!([{ "key": "env", "operator": operator, "values": values }]),
            );
        }
        v.insert("selector".into(), Value::Object(sel));
    }
    if input.unknown_field {
        v.insert("priority".into(), json!(1));
    }
    match input.mistyped % 8 {
        1 => {
            v.insert("type".into(), json!(7));
        }
        2 => {
            v.insert("agents".into(), json!("all"));
        }
        3 => {
            v.insert("data".into(), json!([1, 2]));
        }
        _ => {}
    }
    Value::Object(v)
}

/// The dispatch status and body of `body` POSTed to slot [`SLOT`] with its token.
async fn post(app: &Router, body: Vec<u8>) -> (u16, Value) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/api/v1/namespaces/{TENANT}/capabilityslots/{SLOT}/messages"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {SLOT_TOKEN}"))
        .body(Body::from(body))
        .expect("a request");
    call(app, req).await
}

async fn get(app: &Router, id: &str) -> (u16, Value) {
    let req = Request::builder()
        .uri(format!("/api/v1/namespaces/{TENANT}/capabilityslots/{SLOT}/messages/{id}"))
        .header("authorization", format!("Bearer {SLOT_TOKEN}"))
        .body(Body::empty())
        .expect("a request");
    call(app, req).await
}

async fn call(app: &Router, req: Request<Body>) -> (u16, Value) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("a body");
    (status, serde_json::from_slice(&body).expect("every dispatch answer is JSON"))
}

/// Whether `id` is 1 to [`MAX_ID_CHARS`] of `[A-Za-z0-9._:-]` (the documented rule).
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
}

/// The (agent, state) pairs a valid request's answer must list, in order.
fn expected_results(req: &Value) -> Vec<(String, &'static str)> {
    let state = |uid: &Uid| {
        let known = FLEET_AGENTS.iter().find(|(u, _, _)| Uid(*u) == *uid);
        if known.is_some_and(|(_, capable, _)| *capable) { "queued" } else { "rejected" }
    };
    if let Some(agents) = req["agents"].as_array() {
        let (mut uids, mut others) = (HashSet::new(), HashSet::new());
        let mut out = Vec::new();
        for a in agents.iter().filter_map(Value::as_str) {
            match uuid::Uuid::parse_str(a) {
                Ok(u) => {
                    let uid = Uid(*u.as_bytes());
                    if uids.insert(uid) {
                        out.push((uid.to_string(), state(&uid)));
                    }
                }
                Err(_) => {
                    // Shown cut short, and each shown string once.
                    let shown = if a.len() <= MAX_AGENT_BYTES_KEPT {
                        a.to_owned()
                    } else {
                        let mut end = MAX_AGENT_BYTES_KEPT;
                        while !a.is_char_boundary(end) {
                            end -= 1;
                        }
                        format!("{}…", &a[..end])
                    };
                    if others.insert(shown.clone()) {
                        out.push((shown, "rejected"));
                    }
                }
            }
        }
        return out;
    }
    let selector: opamp_operator::api::AgentSelector =
        serde_json::from_value(req["selector"].clone()).expect("a valid selector");
    let mut picked: Vec<Uid> = FLEET_AGENTS
        .iter()
        .filter(|(_, _, env)| selector.matches(|k| (k == "env").then_some(std::borrow::Cow::Borrowed(*env))))
        .map(|(u, _, _)| Uid(*u))
        .collect();
    picked.sort();
    picked.iter().map(|u| (u.to_string(), state(u))).collect()
}

/// The documented answer to a structured request: `None` when it is valid (200).
fn expected_refusal(req: &Value, body_len: usize) -> Option<u16> {
    if body_len > MAX_BODY_BYTES {
        return Some(413);
    }
    let obj = req.as_object().expect("an object");
    let known = ["id", "type", "data", "agents", "selector"];
    let bad_shape = obj.keys().any(|k| !known.contains(&k.as_str()))
        || obj.get("type").is_some_and(|v| !v.is_string())
        || obj.get("id").is_some_and(|v| !v.is_string())
        || obj.get("data").is_some_and(|v| !v.is_string())
        || obj
            .get("agents")
            .is_some_and(|v| !v.is_array() || v.as_array().is_some_and(|a| a.len() > MAX_AGENTS))
        || obj.get("selector").is_some_and(|s| {
            serde_json::from_value::<opamp_operator::api::AgentSelector>(s.clone()).is_err()
        });
    if !obj.contains_key("type") || bad_shape {
        return Some(400);
    }
    if obj.get("id").and_then(Value::as_str).is_some_and(|id| !valid_id(id)) {
        return Some(400);
    }
    if !MESSAGE_TYPES.contains(&obj.get("type").and_then(Value::as_str).unwrap_or_default()) {
        return Some(400);
    }
    let data = obj.get("data").and_then(Value::as_str).unwrap_or_default();
    {
        use base64::Engine;
        if base64::engine::general_purpose::STANDARD.decode(data).is_err() {
            return Some(400);
        }
    }
    let agents = obj.get("agents").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
    if agents == obj.contains_key("selector") || (obj.contains_key("agents") && !agents) {
        return Some(400);
    }
    None
}

/// Checks one dispatch body on a fresh replica: any bytes get a JSON answer, 200 or a clear
/// 400 (413 beyond the body limit); a structured request gets the documented status (its id,
/// type, data, agents and selector checked against their bounds); a valid one lists each
/// target once with its state, and the same request re-serialised (another id, keys in
/// another order) is accepted with the same results, which `GET` then shows.
pub fn dispatch_json(input: &DispatchInput) {
    let (routes, _fleet) = dispatch_routes();
    block_on(check(input, opamp_operator::routes::dispatch::router(routes)));
}

async fn check(input: &DispatchInput, app: Router) {
    {
        if let Some(raw) = &input.raw {
            let (status, answer) = post(&app, raw.clone()).await;
            assert!(status == 200 || status == 400 || status == 413, "raw body: {status} {answer}");
            if status != 200 {
                assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
            }
            return;
        }
        let req = request_json(input);
        let body = serde_json::to_vec(&req).expect("JSON");
        let (status, answer) = post(&app, body.clone()).await;
        let shown =
            || format!("{:.400} -> {status} {:.400}", String::from_utf8_lossy(&body), answer.to_string());
        match expected_refusal(&req, body.len()) {
            Some(expected) => {
                assert_eq!(status, expected, "{}", shown());
                assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", shown());
                return;
            }
            None => assert_eq!(status, 200, "{}", shown()),
        }
        let results = |answer: &Value| -> Vec<(String, String)> {
            answer["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|r| {
                    (
                        r["agent"].as_str().unwrap_or_default().to_owned(),
                        r["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        };
        let got = results(&answer);
        let expected: Vec<(String, String)> =
            expected_results(&req).into_iter().map(|(a, s)| (a, s.to_owned())).collect();
        assert_eq!(got, expected, "{}", shown());
        if let Some(id) = req["id"].as_str() {
            assert_eq!(answer["id"], id);
            let (status, again) = get(&app, id).await;
            assert_eq!(status, 200, "GET {id}: {again}");
            assert_eq!(results(&again), got, "GET {id}");
            // The same id again is taken.
            assert_eq!(post(&app, body.clone()).await.0, 409, "{}", shown());
        }
        // Re-serialised: keys sorted, another id; the same targets and states.
        let mut copy = req.clone();
        let other_id = if req["id"] == "round-trip" { "round-trip-2" } else { "round-trip" };
        copy["id"] = json!(other_id);
        let reserialised = serde_json::to_vec_pretty(&copy).expect("JSON");
        let (status, second) = post(&app, reserialised).await;
        assert_eq!(status, 200, "re-serialised: {second}");
        assert_eq!(results(&second), got, "re-serialised");
        assert!(got.iter().all(|(_, s)| s == "queued" || s == "rejected"));
    }
}
