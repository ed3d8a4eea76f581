//! Custom-message routes end to end, on a real kube-apiserver + etcd: what agents send for a
//! CapabilitySlot's capability is POSTed to its callback (signed, retried with back-off,
//! counted), and the dispatch API sends messages to agents (sent / queued / rejected /
//! expired), with our own WebSocket agent and the opamp-go agent; the slot's status counts it
//! all. The callback is a real HTTP server inside the test (`common::callback`).
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::callback::{CallbackServer, Recorded, b64decode, b64encode, dead_url, hmac_sha256, signature};
use common::env::{TestEnv, TestEnvBuilder};
use common::goagent::GoAgent;
use common::{eventually, within};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use opamp_operator::api::{CapabilitySlot, CapabilitySlotStatus};
use opamp_operator::proto::{CustomMessage, ServerToAgent};
use opamp_operator::protocol::Uid;
use opamp_operator::routes::egress::EgressPolicy;
use opamp_operator::sim::{AgentSpec, HttpClient, SimAgent, WsClient};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(500);

const CAP: &str = "com.example.pprof";
const SIGNING_KEY: &str = "s3cr3t-signing-key";
const DISPATCH_TOKEN: &str = "dispatch-token-0123456789";

// ---------------------------------------------------------------------------------------------
// The harness's environment (an operator over a fresh namespace), the dispatch API, slot
// status.

struct Env {
    env: TestEnv,
    http: reqwest::Client,
}

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl Env {
    async fn new(prefix: &str) -> Env {
        Self::start(TestEnv::new(prefix)).await
    }

    /// An operator under the default callback egress policy (loopback refused).
    async fn strict(prefix: &str) -> Env {
        Self::start(TestEnv::new(prefix).operator(|c| c.callback_egress = EgressPolicy::default())).await
    }

    async fn start(builder: TestEnvBuilder) -> Env {
        let env = builder.start().await;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        Env { env, http }
    }

    /// Stops the operator and starts a new one on the same OpAMP address (agents reconnect).
    async fn restart(self) -> Env {
        Env { env: self.env.restart().await, http: self.http }
    }

    fn agent(&self, spec: AgentSpec) -> CapAgent {
        CapAgent::new(self.ws_url(), self.token.clone(), spec)
    }

    /// The agent with `uid`, in whichever namespace (test fleets are small).
    fn find(&self, uid: Uid) -> Option<opamp_operator::fleet::AgentSnapshot> {
        self.op.fleet.agents().into_iter().find(|a| a.uid == uid)
    }

    /// Waits until the fleet knows `uid` declared `cap` (in AgentToServer.custom_capabilities).
    async fn wait_declared(&self, uid: Uid, cap: &str) {
        eventually(T, &format!("agent {uid} declared {cap}"), || async {
            self.find(uid).filter(|a| a.report.supports_custom_capability(cap)).map(|_| ())
        })
        .await;
    }

    async fn wait_connected(&self, uid: Uid, connected: bool) {
        eventually(T, &format!("agent {uid} connected={connected}"), || async {
            self.find(uid).filter(|a| a.connected == connected).map(|_| ())
        })
        .await;
    }

    fn messages_url(&self, slot: &str) -> String {
        self.api_url(&format!("/api/v1/namespaces/{}/capabilityslots/{slot}/messages", self.ns.name))
    }

    async fn call(&self, what: &str, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp =
            within(T, what, req.send()).await.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
        let status = resp.status().as_u16();
        let body = within(T, what, resp.bytes()).await.unwrap_or_default();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|_| json!({ "<not JSON>": String::from_utf8_lossy(&body) }));
        (status, json)
    }

    /// POSTs a dispatch request; returns the status and the JSON reply.
    async fn dispatch(&self, slot: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        self.dispatch_raw(slot, token, serde_json::to_vec(body).unwrap()).await
    }

    async fn dispatch_raw(&self, slot: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut req =
            self.http.post(self.messages_url(slot)).header("content-type", "application/json").body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.call(&format!("POST {slot}/messages"), req).await
    }

    /// POSTs a dispatch request; a transport error is returned, not a panic.
    async fn try_dispatch(&self, slot: &str, token: &str, body: Vec<u8>) -> Result<(u16, Value), String> {
        let req = self
            .http
            .post(self.messages_url(slot))
            .header("content-type", "application/json")
            .bearer_auth(token)
            .body(body);
        let resp = within(T, "POST", req.send()).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let body = within(T, "POST body", resp.bytes()).await.map_err(|e| format!("{e:?}"))?;
        Ok((
            status,
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| json!({ "<not JSON>": String::from_utf8_lossy(&body) })),
        ))
    }

    /// POSTs with a raw HTTP/1.1 client that keeps reading while it writes (and stops writing
    /// when the server stops reading): what the server answers, whatever it does with the rest
    /// of the body.
    async fn raw_dispatch(&self, slot: &str, token: &str, body: Vec<u8>) -> (u16, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.op.api_addr;
        let path = format!("/api/v1/namespaces/{}/capabilityslots/{slot}/messages", self.ns.name);
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the API");
        let (mut rd, mut wr) = stream.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // The write half is handed back, not dropped: dropping it would half-close the
        // connection, which HTTP servers may take for the client going away.
        let writer = tokio::spawn(async move {
            if wr.write_all(head.as_bytes()).await.is_ok() {
                for chunk in body.chunks(64 << 10) {
                    if wr.write_all(chunk).await.is_err() {
                        break;
                    }
                }
            }
            wr
        });
        let mut buf = Vec::new();
        let complete = |buf: &[u8]| -> bool {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len = head.lines().find_map(|l| {
                l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            len.is_some_and(|n| buf.len() >= end + 4 + n)
        };
        let _ = within(T, "the raw reply", async {
            let mut tmp = [0u8; 8192];
            while !complete(&buf) {
                match rd.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
        })
        .await;
        writer.abort();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or_else(|_| json!({ "<raw reply>": text })))
    }

    /// POSTs a dispatch request that must be answered 200 with one result per target.
    async fn dispatch_ok(&self, slot: &str, body: &Value) -> Value {
        let (status, reply) = self.dispatch(slot, Some(DISPATCH_TOKEN), body).await;
        assert_eq!(status, 200, "dispatch {body} → {reply}");
        reply
    }

    /// The first dispatch of a test: the slot (and its token Secret, watched separately) reach
    /// the routes a moment after the apply, so a refusal for an unknown slot or token (404, 401,
    /// 403) is retried until the deadline; then it must be answered 200.
    async fn first_dispatch_ok(&self, slot: &str, body: &Value) -> Value {
        self.first_dispatch_with(slot, DISPATCH_TOKEN, body).await
    }

    async fn first_dispatch_with(&self, slot: &str, token: &str, body: &Value) -> Value {
        let end = tokio::time::Instant::now() + T;
        loop {
            let (status, reply) = self.dispatch(slot, Some(token), body).await;
            if ![401, 403, 404].contains(&status) || tokio::time::Instant::now() > end {
                assert_eq!(status, 200, "dispatch {body} → {reply}");
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get_message(&self, slot: &str, token: Option<&str>, id: &str) -> (u16, Value) {
        let mut req = self.http.get(format!("{}/{id}", self.messages_url(slot)));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.call(&format!("GET {slot}/messages/{id}"), req).await
    }

    /// Polls `GET …/messages/{id}` until the agent's state is `state`.
    async fn wait_state(&self, slot: &str, id: &str, agent: Uid, state: &str) -> Value {
        let mut last = Value::Null;
        let end = tokio::time::Instant::now() + T;
        loop {
            let (status, reply) = self.get_message(slot, Some(DISPATCH_TOKEN), id).await;
            if status == 200 && state_of(&reply, agent).is_some_and(|(s, _)| s == state) {
                return reply;
            }
            last = json!({ "status": status, "reply": reply, "previous": last.get("reply") });
            if tokio::time::Instant::now() > end {
                panic!(
                    "timed out after {T:?} waiting for message {id} to be {state} for {agent}; last: {last:#}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the slot's status satisfies `pred`; on timeout shows the last status seen.
    async fn slot_status_where(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&CapabilitySlotStatus) -> bool,
    ) -> CapabilitySlotStatus {
        self.status_where::<CapabilitySlot>(name, what, pred).await
    }

    async fn stop(self) {
        self.env.stop().await;
    }
}

fn opaque_secret(name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: Opaque\nstringData: {{{key}: {value}}}\n"
    )
}

/// A CapabilitySlot; `spec` is the YAML under `spec:` (indented two spaces).
fn slot_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

/// `callback:` with a URL and extra fields (`timeoutSeconds: 1\n    maxAttempts: 3\n`…).
fn callback_spec(url: &str, extra: &str) -> String {
    format!("  callback:\n    url: {url}\n{extra}")
}

fn dispatch_spec(extra: &str) -> String {
    format!("  dispatch:\n    tokenSecretRef: {{name: dispatch, key: token}}\n{extra}")
}

fn spec_with(service: &str, caps: &[&str]) -> AgentSpec {
    let mut s = AgentSpec::new(service);
    s.custom_capabilities = caps.iter().map(|c| c.to_string()).collect();
    s
}

/// The state and reason of `agent` in a dispatch reply.
fn state_of(reply: &Value, agent: Uid) -> Option<(String, Option<String>)> {
    let uid = agent.to_string();
    reply["results"].as_array()?.iter().find(|r| r["agent"] == uid.as_str()).map(|r| {
        (r["state"].as_str().unwrap_or("<none>").to_owned(), r["reason"].as_str().map(str::to_owned))
    })
}

fn expect_state(reply: &Value, agent: Uid, states: &[&str], what: &str) -> (String, Option<String>) {
    let got = state_of(reply, agent).unwrap_or_else(|| panic!("{what}: no result for {agent} in {reply:#}"));
    assert!(
        states.contains(&got.0.as_str()),
        "{what}: {agent} is {:?}, wanted one of {states:?}: {reply:#}",
        got.0
    );
    got
}

fn expect_error(got: (u16, Value), status: u16, what: &str) {
    assert_eq!(got.0, status, "{what}: {:#}", got.1);
    assert!(
        got.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: errors are JSON {{\"error\": \"…\"}}, got {:#}",
        got.1
    );
}

fn condition<'a>(s: &'a CapabilitySlotStatus, t: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

fn has_condition(s: &CapabilitySlotStatus, t: &str, status: &str) -> bool {
    condition(s, t).is_some_and(|c| c.status == status)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The body without `attempt`: what must not change between attempts.
fn without_attempt(r: &Recorded) -> Value {
    let mut v = r.body_json().clone();
    v.as_object_mut().unwrap().remove("attempt");
    v
}

// ---------------------------------------------------------------------------------------------
// Our WebSocket agent with custom messages: declares custom capabilities (AgentSpec), sends
// CustomMessages on demand, records the ones it receives and the capabilities the server
// advertises; connects and disconnects on demand, keeping its state (uid, sequence numbers).

#[derive(Default)]
struct Seen {
    custom: Vec<CustomMessage>,
    advertised: Option<Vec<String>>,
    /// ServerToAgent messages received, over all connections.
    frames: usize,
}

struct Link {
    stop: CancellationToken,
    tx: mpsc::UnboundedSender<CustomMessage>,
    task: tokio::task::JoinHandle<()>,
}

struct CapAgent {
    uid: Uid,
    url: String,
    token: String,
    state: Arc<Mutex<SimAgent>>,
    seen: Arc<Mutex<Seen>>,
    /// Whether the full state went out once (later connections start with a bare message,
    /// like opamp-go).
    introduced: Arc<AtomicBool>,
    link: Option<Link>,
}

impl CapAgent {
    fn new(url: String, token: String, spec: AgentSpec) -> Self {
        Self {
            uid: spec.uid,
            url,
            token,
            state: Arc::new(Mutex::new(SimAgent::new(spec))),
            seen: Arc::default(),
            introduced: Arc::default(),
            link: None,
        }
    }

    /// Connects (and keeps reconnecting every 100 ms until [`CapAgent::disconnect`]).
    fn connect(&mut self) {
        assert!(self.link.is_none(), "already connected");
        let (tx, mut rx) = mpsc::unbounded_channel::<CustomMessage>();
        let stop = CancellationToken::new();
        let (url, token, state, seen, introduced, st) = (
            self.url.clone(),
            self.token.clone(),
            self.state.clone(),
            self.seen.clone(),
            self.introduced.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            while !st.is_cancelled() {
                let connected = tokio::select! {
                    _ = st.cancelled() => break,
                    c = WsClient::connect(&url, Some(&token)) => c,
                };
                if let Ok(mut ws) = connected {
                    let hello = if introduced.swap(true, Ordering::SeqCst) {
                        state.lock().unwrap().heartbeat()
                    } else {
                        state.lock().unwrap().full_state()
                    };
                    let mut stopping = false;
                    if ws.send(&hello).await.is_ok() {
                        loop {
                            tokio::select! {
                                _ = st.cancelled() => { stopping = true; break }
                                msg = ws.recv() => match msg {
                                    Ok(m) => {
                                        {
                                            let mut seen = seen.lock().unwrap();
                                            seen.frames += 1;
                                            if let Some(c) = &m.custom_capabilities {
                                                seen.advertised = Some(c.capabilities.clone());
                                            }
                                            if let Some(c) = &m.custom_message {
                                                seen.custom.push(c.clone());
                                            }
                                        }
                                        let out = state.lock().unwrap().on_message(&m);
                                        if let Some(out) = out {
                                            if ws.send(&out).await.is_err() { break }
                                        }
                                    }
                                    Err(_) => break,
                                },
                                Some(custom) = rx.recv() => {
                                    let mut msg = state.lock().unwrap().heartbeat();
                                    msg.custom_message = Some(custom);
                                    if ws.send(&msg).await.is_err() { break }
                                }
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                    let hb = state.lock().unwrap().heartbeat();
                                    if ws.send(&hb).await.is_err() { break }
                                }
                            }
                        }
                    }
                    ws.close().await;
                    if stopping {
                        break;
                    }
                }
                tokio::select! { _ = st.cancelled() => {}, _ = tokio::time::sleep(Duration::from_millis(100)) => {} }
            }
        });
        self.link = Some(Link { stop, tx, task });
    }

    /// Closes the connection (the agent stays known to the server, offline).
    async fn disconnect(&mut self) {
        if let Some(link) = self.link.take() {
            link.stop.cancel();
            let _ = within(T, "agent task stops", link.task).await;
        }
    }

    /// Sends a custom message in the agent's next AgentToServer (in order).
    fn send_custom(&self, capability: &str, typ: &str, data: &[u8]) {
        let link = self.link.as_ref().expect("connected");
        link.tx
            .send(CustomMessage {
                capability: capability.into(),
                r#type: typ.into(),
                data: Bytes::copy_from_slice(data),
            })
            .expect("agent task running");
    }

    fn received(&self) -> Vec<CustomMessage> {
        self.seen.lock().unwrap().custom.clone()
    }

    fn frames(&self) -> usize {
        self.seen.lock().unwrap().frames
    }

    async fn wait_received(&self, n: usize, what: &str) -> Vec<CustomMessage> {
        let end = tokio::time::Instant::now() + T;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::Instant::now() > end {
                panic!(
                    "timed out after {T:?} waiting for {what}: agent received {} of {n}: {got:?}",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts the agent receives nothing beyond `n` custom messages within [`QUIET`].
    async fn assert_no_more(&self, n: usize, what: &str) {
        let end = tokio::time::Instant::now() + QUIET;
        while tokio::time::Instant::now() < end {
            let got = self.received();
            assert!(got.len() <= n, "{what}: expected {n} custom messages, got {}: {got:?}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server advertised `cap` to this agent (ServerToAgent.custom_capabilities).
    async fn wait_advertised(&self, cap: &str) {
        eventually(T, &format!("{cap} advertised to agent {}", self.uid), || async {
            let seen = self.seen.lock().unwrap();
            seen.advertised.as_ref().filter(|c| c.iter().any(|x| x == cap)).map(|_| ())
        })
        .await;
    }

    async fn stop(mut self) {
        self.disconnect().await;
    }
}

fn msg_bytes(m: &CustomMessage) -> (&str, &str, &[u8]) {
    (m.capability.as_str(), m.r#type.as_str(), &m.data[..])
}

// ---------------------------------------------------------------------------------------------
// The test helpers themselves (no cluster needed).

#[test]
fn hmac_and_base64_helpers_are_right() {
    // RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
    assert_eq!(
        hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
    assert_eq!(
        hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        hex::encode(hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
    ] {
        assert_eq!(b64encode(plain.as_bytes()), encoded);
        assert_eq!(b64decode(encoded).as_deref(), Some(plain.as_bytes()));
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(b64decode(&b64encode(&all)), Some(all));
    assert_eq!(b64decode("Zm9v!"), None);
    assert_eq!(b64decode("Zg=a"), None);
}

// ---------------------------------------------------------------------------------------------
// Upstream: agent → callback.

/// 1. One agent message reaches the callback once, signed, with every body field right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_message_reaches_the_callback_signed() {
    let env = Env::new("routes-upstream").await;
    let cb = CallbackServer::start().await;
    env.apply(&opaque_secret("signing", "key", SIGNING_KEY)).await;
    env.apply(&slot_yaml(
        "pprof",
        &format!(
            "  capability: {CAP}\n  messageTypes: [start, profile]\n{}",
            callback_spec(&cb.url("/hooks/pprof"), "    signingSecretRef: {name: signing, key: key}\n")
        ),
    ))
    .await;
    let mut spec = spec_with("checkout", &[CAP]);
    spec.non_identifying.push(("host.name".into(), "node-1".into()));
    let mut agent = env.agent(spec);
    agent.connect();
    agent.wait_advertised(CAP).await;
    env.slot_status_where("pprof", "Ready with 1 supporting agent", |s| {
        s.supporting_agents == 1 && has_condition(s, "Ready", "True")
    })
    .await;

    let payload: &[u8] = b"\x00\x01profile\xff\xfe{\"quoted\": true}\n";
    let before = unix_seconds(SystemTime::now());
    agent.send_custom(CAP, "profile", payload);
    let got = cb.wait_for(1, T, "the agent's message at the callback").await;
    let after = unix_seconds(SystemTime::now());
    cb.assert_no_more(1, QUIET, "a delivered message is POSTed once").await;

    let r = &got[0];
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(r.path, "/hooks/pprof");
    assert!(
        r.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "content-type: {:?}",
        r.header("content-type")
    );
    let body = r.body_json();
    let id = body["id"].as_str().filter(|i| !i.is_empty()).unwrap_or_else(|| panic!("no id: {body:#}"));
    assert_eq!(r.header("x-opamp-message-id"), Some(id), "X-OpAMP-Message-Id is the body's id");
    assert_eq!(
        r.header("x-opamp-signature"),
        Some(signature(SIGNING_KEY.as_bytes(), &r.body).as_str()),
        "X-OpAMP-Signature is sha256=<hex HMAC-SHA256 of the exact body>; body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(body["namespace"], env.ns.name.as_str(), "{body:#}");
    assert_eq!(body["slot"], "pprof", "{body:#}");
    assert_eq!(body["capability"], CAP, "{body:#}");
    assert_eq!(body["type"], "profile", "{body:#}");
    assert_eq!(body["agent"]["instanceUid"], agent.uid.to_string().as_str(), "{body:#}");
    let attrs = &body["agent"]["attributes"];
    assert_eq!(attrs["service.name"], "checkout", "identifying attributes: {body:#}");
    assert_eq!(attrs["os.type"], "linux", "non-identifying attributes: {body:#}");
    assert_eq!(attrs["host.name"], "node-1", "non-identifying attributes: {body:#}");
    assert_eq!(body["data"], b64encode(payload).as_str(), "data is standard base64: {body:#}");
    assert_eq!(r.data(), payload);
    let received: Timestamp = body["receivedTime"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("receivedTime is not RFC 3339: {body:#}"));
    assert!(
        (before - 1..=after + 1).contains(&received.as_second()),
        "receivedTime {received} not within the send ({before}..{after})"
    );
    assert_eq!(body["attempt"], 1, "{body:#}");

    let s = env
        .slot_status_where("pprof", "1 received, 1 delivered", |s| {
            s.upstream.received == 1 && s.upstream.delivered == 1
        })
        .await;
    assert_eq!(s.upstream.failed, 0, "{s:#?}");
    assert!(s.upstream.last_delivery_time.is_some(), "{s:#?}");
    assert!(s.upstream.last_error.is_none(), "{s:#?}");

    agent.stop().await;
    env.stop().await;
}

/// 2. A callback failing twice gets the message 3 times with one id (attempts 1, 2, 3) and it
/// counts delivered once; an attempt that times out is retried too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_slow_callbacks_are_retried_with_one_id() {
    let env = Env::new("routes-retry").await;
    let cb = CallbackServer::start().await;
    let slow = CallbackServer::start().await;
    const SLOW_CAP: &str = "com.example.slow";
    env.apply(&slot_yaml("retry", &format!("  capability: {CAP}\n{}", callback_spec(&cb.url("/hook"), ""))))
        .await;
    env.apply(&slot_yaml(
        "slow",
        &format!(
            "  capability: {SLOW_CAP}\n{}",
            callback_spec(&slow.url("/hook"), "    timeoutSeconds: 1\n    maxAttempts: 3\n")
        ),
    ))
    .await;
    let mut agent = env.agent(spec_with("checkout", &[CAP, SLOW_CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    agent.wait_advertised(SLOW_CAP).await;

    // Fails twice (500), then succeeds.
    cb.fail_next(2);
    agent.send_custom(CAP, "profile", b"retry me");
    let got = cb.wait_for(3, T, "three attempts").await;
    cb.assert_no_more(3, QUIET, "delivered on the third attempt: no fourth").await;
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [500, 500, 200]);
    let id = got[0].body_json()["id"].as_str().expect("id").to_owned();
    for (i, r) in got.iter().enumerate() {
        let body = r.body_json();
        assert_eq!(body["id"], id.as_str(), "the id is stable across retries: {body:#}");
        assert_eq!(r.header("x-opamp-message-id"), Some(id.as_str()));
        assert_eq!(body["attempt"], i as u64 + 1, "{body:#}");
        assert_eq!(without_attempt(r), without_attempt(&got[0]), "only attempt changes between attempts");
        assert_eq!(r.data(), b"retry me");
    }
    // Back-off starting ~200 ms, doubling, jittered (read as: at least half of 200 ms, 400 ms).
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(100), "back-off before attempt 2: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(200), "back-off before attempt 3 doubles: {gaps:?}");
    assert!(gaps.iter().all(|g| *g < Duration::from_secs(5)), "back-off starts around 200 ms: {gaps:?}");
    let s = env.slot_status_where("retry", "delivered once", |s| s.upstream.delivered == 1).await;
    assert_eq!((s.upstream.received, s.upstream.failed), (1, 0), "{s:#?}");

    // Order is kept per agent: messages sent while the first is being retried wait for it.
    cb.fail_next(2);
    for data in [&b"first"[..], b"second", b"third"] {
        agent.send_custom(CAP, "profile", data);
    }
    let got = cb.wait_for(3 + 5, T, "first (3 attempts), second, third").await;
    cb.assert_no_more(8, QUIET, "each delivered once").await;
    let seen: Vec<(Vec<u8>, u16, u64)> = got[3..]
        .iter()
        .map(|r| (r.data(), r.answered, r.body_json()["attempt"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(
        seen,
        [
            (b"first".to_vec(), 500, 1),
            (b"first".to_vec(), 500, 2),
            (b"first".to_vec(), 200, 3),
            (b"second".to_vec(), 200, 1),
            (b"third".to_vec(), 200, 1),
        ],
        "in order per agent, retries included"
    );
    let s = env.slot_status_where("retry", "4 delivered", |s| s.upstream.delivered == 4).await;
    assert_eq!((s.upstream.received, s.upstream.failed), (4, 0), "{s:#?}");

    // An attempt that outlives timeoutSeconds (1 s) is abandoned and retried; the second is
    // answered in time.
    slow.hang_next(1, Duration::from_secs(4));
    agent.send_custom(SLOW_CAP, "profile", b"slow");
    let got = slow.wait_for(2, T, "a retry after the timeout").await;
    assert_eq!(got[0].body_json()["id"], got[1].body_json()["id"]);
    assert_eq!(
        (got[0].body_json()["attempt"].as_u64(), got[1].body_json()["attempt"].as_u64()),
        (Some(1), Some(2))
    );
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(900), "the retry came after the 1 s timeout, not before: {gap:?}");
    let s = env.slot_status_where("slow", "delivered after a timeout", |s| s.upstream.delivered == 1).await;
    assert_eq!((s.upstream.received, s.upstream.failed), (1, 0), "{s:#?}");
    slow.assert_no_more(2, QUIET, "no third attempt").await;

    agent.stop().await;
    env.stop().await;
}

/// 3. A dead callback (connection refused) ends `failed` after maxAttempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_callback_ends_failed_after_max_attempts() {
    let env = Env::new("routes-dead").await;
    env.apply(&slot_yaml(
        "dead",
        &format!(
            "  capability: {CAP}\n{}",
            callback_spec(&dead_url("/hook"), "    timeoutSeconds: 1\n    maxAttempts: 3\n")
        ),
    ))
    .await;
    let mut agent = env.agent(spec_with("checkout", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    agent.send_custom(CAP, "profile", b"nobody listens");
    let s = env.slot_status_where("dead", "1 failed", |s| s.upstream.failed == 1).await;
    assert_eq!((s.upstream.received, s.upstream.delivered), (1, 0), "{s:#?}");
    let err = s.upstream.last_error.clone().unwrap_or_default();
    assert!(!err.is_empty(), "lastError set: {s:#?}");
    assert!(!err.contains(SIGNING_KEY) && !err.contains(DISPATCH_TOKEN));
    assert!(s.upstream.last_delivery_time.is_none(), "nothing was delivered: {s:#?}");

    agent.stop().await;
    env.stop().await;
}

/// Under the default egress policy a callback on the operator's own host (loopback) is refused:
/// the slot is not Ready (CallbackRefused, saying why), the agent's message is counted failed,
/// and the callback server receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_callback_is_refused_by_default() {
    let env = Env::strict("routes-egress").await;
    let cb = CallbackServer::start().await;
    env.apply(&slot_yaml(
        "local",
        &format!(
            "  capability: {CAP}
{}",
            callback_spec(&cb.url("/hook"), "")
        ),
    ))
    .await;
    let s = env
        .slot_status_where("local", "Ready=False CallbackRefused", |s| {
            condition(s, "Ready").is_some_and(|c| c.status == "False" && c.reason == "CallbackRefused")
        })
        .await;
    let ready = condition(&s, "Ready").unwrap();
    assert!(ready.message.contains("loopback"), "{ready:?}");
    let mut agent = env.agent(spec_with("checkout", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    agent.send_custom(CAP, "profile", b"to the operator's own host");
    let s = env.slot_status_where("local", "1 failed", |s| s.upstream.failed == 1).await;
    let err = s.upstream.last_error.clone().unwrap_or_default();
    assert!(err.contains("refused by the callback egress policy"), "{s:#?}");
    cb.assert_no_more(0, QUIET, "a refused callback receives nothing").await;

    agent.stop().await;
    env.stop().await;
}

/// Messages of a type outside messageTypes, or of a capability no slot claims, never reach a
/// callback; the valid message sent after them does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_never_posted() {
    let env = Env::new("routes-refused").await;
    let cb = CallbackServer::start().await;
    const NO_SLOT: &str = "com.example.noslot";
    env.apply(&slot_yaml(
        "typed",
        &format!("  capability: {CAP}\n  messageTypes: [start]\n{}", callback_spec(&cb.url("/hook"), "")),
    ))
    .await;
    let mut agent = env.agent(spec_with("checkout", &[CAP, NO_SLOT]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    agent.send_custom(CAP, "bogus", b"type not allowed");
    agent.send_custom(NO_SLOT, "start", b"no slot");
    agent.send_custom(CAP, "start", b"valid");
    let got = cb.wait_for(1, T, "the valid message").await;
    cb.assert_no_more(1, QUIET, "refused messages are never POSTed").await;
    assert_eq!(got[0].body_json()["type"], "start", "{:#}", got[0].body_json());
    assert_eq!(got[0].data(), b"valid");
    // Read as: the refused message counts for its slot as received and failed, and says why.
    let s = env
        .slot_status_where("typed", "1 delivered, the refused one counted", |s| {
            s.upstream.delivered == 1 && s.upstream.failed == 1
        })
        .await;
    assert_eq!(s.upstream.received, 2, "{s:#?}");
    let err = s.upstream.last_error.unwrap_or_default();
    assert!(err.contains("bogus"), "lastError names the refused type: {err:?}");

    agent.stop().await;
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Downstream: the dispatch API → agents.

/// 4. One dispatch to a connected agent (sent), a known offline one (queued, sent when it
/// reconnects), one without the capability and an unknown one (rejected); then by selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_sent_queued_rejected_and_delivered_on_reconnect() {
    let env = Env::new("routes-dispatch").await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml(
        "jobs",
        &format!("  capability: {CAP}\n  messageTypes: [start, stop]\n{}", dispatch_spec("")),
    ))
    .await;
    let mut online = env.agent(spec_with("frontend", &[CAP]));
    let mut offline = env.agent(spec_with("backend", &[CAP]));
    let mut nocap = env.agent(spec_with("payments", &[]));
    online.connect();
    offline.connect();
    nocap.connect();
    env.wait_declared(online.uid, CAP).await;
    env.wait_declared(offline.uid, CAP).await;
    online.wait_advertised(CAP).await;
    env.wait_connected(nocap.uid, true).await;
    offline.disconnect().await;
    env.wait_connected(offline.uid, false).await;
    let unknown = Uid::new_v7();

    let reply = env
        .first_dispatch_ok(
            "jobs",
            &json!({
                "id": "req-42", "type": "start", "data": b64encode(b"go!"),
                "agents": [online.uid.to_string(), offline.uid.to_string(), nocap.uid.to_string(), unknown.to_string()],
            }),
        )
        .await;
    assert_eq!(reply["id"], "req-42", "{reply:#}");
    assert_eq!(reply["results"].as_array().map(Vec::len), Some(4), "one result per agent: {reply:#}");
    expect_state(&reply, online.uid, &["sent"], "connected WebSocket agent with the capability");
    expect_state(&reply, offline.uid, &["queued"], "known agent, offline");
    let (_, why) = expect_state(&reply, nocap.uid, &["rejected"], "agent without the capability");
    let why = why.unwrap_or_default().to_lowercase();
    assert!(why.contains("capabilit"), "the reason says the capability was not declared: {why:?}");
    let (_, why) = expect_state(&reply, unknown, &["rejected"], "unknown agent");
    let why = why.unwrap_or_default().to_lowercase();
    assert!(why.contains("unknown"), "the reason says the agent is unknown: {why:?}");

    let got = online.wait_received(1, "the message at the connected agent").await;
    assert_eq!(msg_bytes(&got[0]), (CAP, "start", &b"go!"[..]));
    online.assert_no_more(1, "one message").await;
    assert!(nocap.received().is_empty(), "the agent without the capability gets nothing");

    // The offline agent gets it when it comes back; the request then shows it sent.
    offline.connect();
    let got = offline.wait_received(1, "the queued message after reconnecting").await;
    assert_eq!(msg_bytes(&got[0]), (CAP, "start", &b"go!"[..]));
    let now = env.wait_state("jobs", "req-42", offline.uid, "sent").await;
    expect_state(&now, online.uid, &["sent"], "GET req-42");
    expect_state(&now, nocap.uid, &["rejected"], "GET req-42");
    expect_state(&now, unknown, &["rejected"], "GET req-42");
    assert_eq!(now["id"], "req-42");
    offline.assert_no_more(1, "delivered once").await;

    // By selector, without an id: one is generated.
    let reply = env
        .dispatch_ok(
            "jobs",
            &json!({ "type": "stop", "data": b64encode(b"halt"),
                     "selector": { "matchAttributes": { "service.name": "frontend" },
                                   "matchExpressions": [{ "key": "os.type", "operator": "In", "values": ["linux"] }] } }),
        )
        .await;
    let id =
        reply["id"].as_str().filter(|i| !i.is_empty()).unwrap_or_else(|| panic!("generated id: {reply:#}"));
    assert_eq!(reply["results"].as_array().map(Vec::len), Some(1), "the selector picks one agent: {reply:#}");
    expect_state(&reply, online.uid, &["sent"], "selected agent");
    let got = online.wait_received(2, "the selector's message").await;
    assert_eq!(msg_bytes(&got[1]), (CAP, "stop", &b"halt"[..]));
    let (status, again) = env.get_message("jobs", Some(DISPATCH_TOKEN), id).await;
    assert_eq!(status, 200, "{again:#}");
    assert_eq!(again["id"], id);
    expect_state(&again, online.uid, &["sent"], "GET of a generated id");
    assert!(offline.received().len() == 1 && nocap.received().is_empty(), "only the selected agent");

    for a in [online, offline, nocap] {
        a.stop().await;
    }
    env.stop().await;
}

/// Tenancy: a slot never reaches agents of another namespace (by uid or by selector), and their
/// messages never reach its callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_never_cross_namespaces() {
    let env = Env::start(TestEnv::new("routes-tenant-a").tenant("routes-tenant-b")).await;
    let other = &env.tenant(1).ns;
    let other_token = env.tenant(1).token.clone();
    let cb = CallbackServer::start().await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml(
        "jobs",
        &format!("  capability: {CAP}\n{}{}", callback_spec(&cb.url("/hook"), ""), dispatch_spec("")),
    ))
    .await;
    let mut mine = env.agent(spec_with("frontend", &[CAP]));
    let mut theirs = CapAgent::new(env.ws_url(), other_token, spec_with("frontend", &[CAP]));
    mine.connect();
    theirs.connect();
    mine.wait_advertised(CAP).await;
    env.wait_declared(theirs.uid, CAP).await;
    assert_eq!(env.find(theirs.uid).unwrap().namespace, other.name);

    let reply = env
        .first_dispatch_ok(
            "jobs",
            &json!({ "id": "by-uid", "type": "start", "data": b64encode(b"a"),
                     "agents": [mine.uid.to_string(), theirs.uid.to_string()] }),
        )
        .await;
    expect_state(&reply, mine.uid, &["sent"], "an agent of the slot's namespace");
    let (_, why) = expect_state(&reply, theirs.uid, &["rejected"], "an agent of another namespace");
    let why = why.unwrap_or_default().to_lowercase();
    assert!(why.contains("unknown"), "another namespace's agent is unknown here (no more said): {why:?}");
    let reply = env
        .dispatch_ok(
            "jobs",
            &json!({ "id": "by-selector", "type": "start", "data": b64encode(b"b"), "selector": {} }),
        )
        .await;
    assert!(state_of(&reply, theirs.uid).is_none(), "a selector only sees the slot's namespace: {reply:#}");
    expect_state(&reply, mine.uid, &["sent"], "selected by an empty selector");
    assert_eq!(mine.wait_received(2, "both dispatches").await.len(), 2);

    // Upstream: the other namespace has no slot for CAP; its agent's message goes nowhere.
    theirs.send_custom(CAP, "profile", b"from b");
    mine.send_custom(CAP, "profile", b"from a");
    let got = cb.wait_for(1, T, "the message of the slot's own namespace").await;
    cb.assert_no_more(1, QUIET, "nothing from the other namespace").await;
    assert_eq!(got[0].data(), b"from a");
    assert!(theirs.received().is_empty(), "the other namespace's agent got nothing");

    mine.stop().await;
    theirs.stop().await;
    env.stop().await;
}

/// An HTTP agent cannot be pushed to: a dispatched message is queued until its next poll and
/// rides in that poll's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_to_an_http_agent_rides_its_next_poll() {
    let env = Env::new("routes-http").await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml("jobs", &format!("  capability: {CAP}\n{}", dispatch_spec("")))).await;
    let http = HttpClient::new(&env.http_url(), Some(&env.token), false);
    let mut sim = SimAgent::new(spec_with("poller", &[CAP]));
    let uid = sim.uid();
    // One poll: sends what the agent owes (its full state first), returns the server's reply.
    let mut next = Some(sim.full_state());
    let mut poll = async |sim: &mut SimAgent| -> ServerToAgent {
        let msg = next.take().unwrap_or_else(|| sim.heartbeat());
        let reply = within(T, "poll", http.send(&msg)).await.expect("poll");
        assert_eq!(reply.status, 200);
        let m = reply.message.expect("a ServerToAgent");
        next = sim.on_message(&m);
        m
    };
    let end = tokio::time::Instant::now() + T;
    loop {
        let m = poll(&mut sim).await;
        let advertised =
            m.custom_capabilities.as_ref().is_some_and(|c| c.capabilities.iter().any(|x| x == CAP));
        let declared = env.find(uid).is_some_and(|a| a.report.supports_custom_capability(CAP));
        if advertised && declared {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "{CAP} never advertised to the HTTP agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let reply = env
        .first_dispatch_ok(
            "jobs",
            &json!({ "id": "poll-1", "type": "start", "data": b64encode(b"polled"), "agents": [uid.to_string()] }),
        )
        .await;
    expect_state(&reply, uid, &["queued"], "an HTTP agent until its next poll");
    let m = poll(&mut sim).await;
    let got = m.custom_message.expect("the next poll's reply carries the message");
    assert_eq!(msg_bytes(&got), (CAP, "start", &b"polled"[..]));
    env.wait_state("jobs", "poll-1", uid, "sent").await;
    let m = poll(&mut sim).await;
    assert!(m.custom_message.is_none(), "sent once: {m:?}");

    env.stop().await;
}

/// 5. A burst of 20 dispatches to one agent arrives complete, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_dispatches_arrives_complete_and_in_order() {
    let env = Env::new("routes-burst").await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml("jobs", &format!("  capability: {CAP}\n{}", dispatch_spec("")))).await;
    let mut agent = env.agent(spec_with("frontend", &[CAP]));
    agent.connect();
    env.wait_declared(agent.uid, CAP).await;
    agent.wait_advertised(CAP).await;

    for i in 0..20 {
        let body = json!({ "id": format!("burst-{i:02}"), "type": "start",
                           "data": b64encode(format!("msg-{i:02}").as_bytes()), "agents": [agent.uid.to_string()] });
        let reply = if i == 0 {
            env.first_dispatch_ok("jobs", &body).await
        } else {
            env.dispatch_ok("jobs", &body).await
        };
        expect_state(&reply, agent.uid, &["sent", "queued"], &format!("burst-{i:02}"));
    }
    let got = agent.wait_received(20, "20 messages").await;
    let datas: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(&m.data).into_owned()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("msg-{i:02}")).collect();
    assert_eq!(datas, want, "complete and in order");
    assert!(got.iter().all(|m| m.capability == CAP && m.r#type == "start"));
    agent.assert_no_more(20, "nothing after the 20th").await;
    for i in 0..20 {
        env.wait_state("jobs", &format!("burst-{i:02}"), agent.uid, "sent").await;
    }
    env.slot_status_where("jobs", "20 sent", |s| s.downstream.sent == 20).await;

    agent.stop().await;
    env.stop().await;
}

/// 6. A message waiting longer than ttlSeconds for an offline agent expires and is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_expires_after_ttl() {
    let env = Env::new("routes-expiry").await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml("jobs", &format!("  capability: {CAP}\n{}", dispatch_spec("    ttlSeconds: 1\n"))))
        .await;
    let mut agent = env.agent(spec_with("backend", &[CAP]));
    agent.connect();
    env.wait_declared(agent.uid, CAP).await;
    agent.wait_advertised(CAP).await;
    agent.disconnect().await;
    env.wait_connected(agent.uid, false).await;

    let reply = env
        .first_dispatch_ok(
            "jobs",
            &json!({ "id": "late", "type": "start", "data": b64encode(b"too late"), "agents": [agent.uid.to_string()] }),
        )
        .await;
    expect_state(&reply, agent.uid, &["queued"], "offline agent");
    env.wait_state("jobs", "late", agent.uid, "expired").await;
    let s = env.slot_status_where("jobs", "1 expired", |s| s.downstream.expired == 1).await;
    assert_eq!(s.downstream.sent, 0, "{s:#?}");

    // Coming back, the agent does not get the expired message.
    let frames = agent.frames();
    agent.connect();
    env.wait_connected(agent.uid, true).await;
    eventually(T, "the server answered the reconnected agent", || async {
        (agent.frames() > frames).then_some(())
    })
    .await;
    agent.assert_no_more(0, "an expired message is never sent").await;
    let (status, reply) = env.get_message("jobs", Some(DISPATCH_TOKEN), "late").await;
    assert_eq!(status, 200);
    expect_state(&reply, agent.uid, &["expired"], "still expired");

    agent.stop().await;
    env.stop().await;
}

/// 7. The dispatch API's errors: 401, 403, 404, 400, 429, all JSON (413: see below). An
/// unknown slot, a slot without dispatch settings and a wrong token answer the same 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_api_errors() {
    let env = Env::new("routes-errors").await;
    const SMALL_CAP: &str = "com.example.small";
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&opaque_secret("small-dispatch", "token", "small-token-0123456789")).await;
    env.apply(&slot_yaml(
        "jobs",
        &format!("  capability: {CAP}\n  messageTypes: [start]\n{}", dispatch_spec("")),
    ))
    .await;
    env.apply(&slot_yaml(
        "small",
        &format!(
            "  capability: {SMALL_CAP}\n  dispatch:\n    tokenSecretRef: {{name: small-dispatch, key: token}}\n    queueLimit: 2\n"
        ),
    ))
    .await;
    env.apply(&slot_yaml("nodispatch", "  capability: com.example.nodispatch\n")).await;
    env.apply(&slot_yaml(
        "late",
        "  capability: com.example.late\n  dispatch:\n    tokenSecretRef: {name: late-dispatch, key: token}\n",
    ))
    .await;
    let mut agent = env.agent(spec_with("frontend", &[CAP]));
    agent.connect();
    env.wait_declared(agent.uid, CAP).await;
    agent.wait_advertised(CAP).await;
    let good = json!({ "type": "start", "data": b64encode(b"x"), "agents": [agent.uid.to_string()] });
    let mut fine = good.clone();
    fine["id"] = "fine".into();
    let reply = env.first_dispatch_ok("jobs", &fine).await;
    expect_state(&reply, agent.uid, &["sent"], "the valid request");

    expect_error(env.dispatch("jobs", None, &good).await, 401, "no token");
    expect_error(env.dispatch("no-such-slot", None, &good).await, 401, "no token, unknown slot");
    let refused = json!({ "error": "no such CapabilitySlot or wrong token" });
    assert_eq!(env.dispatch("jobs", Some("wrong-token"), &good).await, (403, refused.clone()), "wrong token");
    assert_eq!(env.dispatch("no-such-slot", Some(DISPATCH_TOKEN), &good).await, (403, refused.clone()));
    assert_eq!(env.dispatch("nodispatch", Some(DISPATCH_TOKEN), &good).await, (403, refused.clone()));
    let mut bad_type = good.clone();
    bad_type["type"] = "stop".into();
    expect_error(
        env.dispatch("jobs", Some(DISPATCH_TOKEN), &bad_type).await,
        400,
        "type not in messageTypes",
    );
    let mut bad_b64 = good.clone();
    bad_b64["data"] = "not base64 !!".into();
    expect_error(env.dispatch("jobs", Some(DISPATCH_TOKEN), &bad_b64).await, 400, "bad base64");
    expect_error(
        env.dispatch_raw("jobs", Some(DISPATCH_TOKEN), b"{\"type\": ".to_vec()).await,
        400,
        "a body that is not JSON",
    );
    expect_error(
        env.get_message("jobs", Some(DISPATCH_TOKEN), "no-such-id").await,
        404,
        "GET of an unknown id",
    );
    expect_error(env.get_message("jobs", None, "fine").await, 401, "GET without a token");
    expect_error(env.get_message("jobs", Some("wrong-token"), "fine").await, 403, "GET with a wrong token");
    assert_eq!(agent.wait_received(1, "the one valid dispatch").await.len(), 1);
    agent.assert_no_more(1, "refused requests send nothing").await;

    // queueLimit 2: an offline agent's queue takes two, the third is refused with 429.
    let mut sleeper = env.agent(spec_with("backend", &[SMALL_CAP]));
    sleeper.connect();
    env.wait_declared(sleeper.uid, SMALL_CAP).await;
    sleeper.wait_advertised(SMALL_CAP).await;
    sleeper.disconnect().await;
    env.wait_connected(sleeper.uid, false).await;
    const SMALL_TOKEN: &str = "small-token-0123456789";
    let to_sleeper = json!({ "type": "any", "data": b64encode(b"zz"), "agents": [sleeper.uid.to_string()] });
    let reply = env.first_dispatch_with("small", SMALL_TOKEN, &to_sleeper).await;
    expect_state(&reply, sleeper.uid, &["queued"], "message 1 to the offline agent");
    let (status, reply) = env.dispatch("small", Some(SMALL_TOKEN), &to_sleeper).await;
    assert_eq!(status, 200, "message 2: {reply:#}");
    expect_state(&reply, sleeper.uid, &["queued"], "message 2 to the offline agent");
    expect_error(env.dispatch("small", Some(SMALL_TOKEN), &to_sleeper).await, 429, "queue full");
    // Each slot has its own token.
    expect_error(env.dispatch("small", Some(DISPATCH_TOKEN), &to_sleeper).await, 403, "another slot's token");

    // A token Secret created after its slot takes effect without touching the slot.
    let to_late = json!({ "type": "x", "data": b64encode(b"x"), "agents": [agent.uid.to_string()] });
    let before = env.dispatch("late", Some("late-token-0123456789"), &to_late).await;
    assert_ne!(before.0, 200, "no token Secret yet: {:#}", before.1);
    expect_error(before.clone(), before.0, "while the token Secret is missing");
    let waiting = env
        .slot_status_where("late", "Ready=False ReferenceNotFound", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "ReferenceNotFound")
        })
        .await;
    let ready = waiting.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("late-dispatch"), "{ready:?}");
    env.apply(&opaque_secret("late-dispatch", "token", "late-token-0123456789")).await;
    let end = tokio::time::Instant::now() + T;
    let reply = loop {
        let (status, reply) = env.dispatch("late", Some("late-token-0123456789"), &to_late).await;
        if status == 200 {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the late token Secret never took effect: {status} {reply:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, why) = expect_state(&reply, agent.uid, &["rejected"], "an agent without com.example.late");
    assert!(why.is_some(), "{reply:#}");

    agent.stop().await;
    sleeper.stop().await;
    env.stop().await;
}

/// An env with slot `jobs` (dispatch) and one connected agent that got one valid dispatch.
async fn env_for_413(prefix: &str) -> (Env, CapAgent, Vec<u8>) {
    let env = Env::new(prefix).await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml("jobs", &format!("  capability: {CAP}\n{}", dispatch_spec("")))).await;
    let mut agent = env.agent(spec_with("frontend", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    env.first_dispatch_ok("jobs", &json!({ "type": "start", "data": "", "agents": [agent.uid.to_string()] }))
        .await;
    let big = serde_json::to_vec(
        &json!({ "type": "start", "data": b64encode(&vec![7u8; 6 << 20]), "agents": [agent.uid.to_string()] }),
    )
    .unwrap();
    (env, agent, big)
}

/// 413 for a body over the limit (an 8 MiB body), as the server answers it on the wire (a client
/// that reads while it writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_dispatch_gets_413() {
    let (env, agent, big) = env_for_413("routes-413").await;
    expect_error(env.raw_dispatch("jobs", DISPATCH_TOKEN, big).await, 413, "an 8 MiB body");
    assert_eq!(agent.wait_received(1, "the valid dispatch").await.len(), 1);
    agent.assert_no_more(1, "an oversized request sends nothing").await;
    agent.stop().await;
    env.stop().await;
}

/// The same 413 as an ordinary HTTP client (reqwest/hyper, which writes the whole body before
/// reading the reply) sees it, ten times: the server drains oversized bodies (bounded) before
/// answering, so the client reads the 413 instead of a broken pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_dispatch_gets_413_at_an_ordinary_client() {
    let (env, agent, big) = env_for_413("routes-413-client").await;
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.push(match env.try_dispatch("jobs", DISPATCH_TOKEN, big.clone()).await {
            Ok((status, reply)) => format!("{status} {reply}"),
            Err(e) => format!("transport error: {e}"),
        });
    }
    assert!(
        outcomes.iter().all(|o| o.starts_with("413 ")),
        "an 8 MiB body, reqwest, 10 times: {outcomes:#?}"
    );
    agent.stop().await;
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The opamp-go agent, both directions.

/// 8. opamp-go sends 5 messages in a row (looping on ErrCustomMessagePending): all 5 reach the
/// callback in order; a dispatch to it arrives as a custom_message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agent_both_directions() {
    let env = Env::new("routes-go").await;
    let cb = CallbackServer::start().await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml(
        "go",
        &format!(
            "  capability: {CAP}\n  messageTypes: [start, profile]\n{}{}",
            callback_spec(&cb.url("/go"), ""),
            dispatch_spec("")
        ),
    ))
    .await;
    let uid = Uid::new_v7();
    let mut go = GoAgent::spawn(&[
        "-url",
        &env.ws_url(),
        "-uid",
        &uid.to_string(),
        "-token",
        &env.token,
        "-heartbeat",
        "1s",
        "-attr",
        "service.name=go-svc",
        "-custom-capability",
        CAP,
    ]);
    go.wait_event(T, "connected").await;
    go.wait_for(T, "the capability advertised", |e| {
        e["event"] == "server_custom_capabilities"
            && e["capabilities"].as_array().is_some_and(|c| c.iter().any(|x| x == CAP))
    })
    .await;
    env.wait_declared(uid, CAP).await;

    let types = ["start", "profile", "start", "profile", "start"];
    for (i, t) in types.iter().enumerate() {
        go.command(json!({ "cmd": "send_custom", "capability": CAP, "type": t,
                           "data": b64encode(format!("go-{i}").as_bytes()) }))
            .await;
    }
    for i in 0..5 {
        let ev = go
            .wait_for(T, &format!("custom_sent #{}", i + 1), |e| {
                e["event"] == "custom_sent" || e["event"] == "custom_send_error"
            })
            .await;
        assert_eq!(ev["event"], "custom_sent", "{ev}");
    }
    let got = cb.wait_for(5, T, "the opamp-go agent's 5 messages").await;
    cb.assert_no_more(5, QUIET, "each once").await;
    let seen: Vec<(String, Vec<u8>)> =
        got.iter().map(|r| (r.body_json()["type"].as_str().unwrap_or("").to_owned(), r.data())).collect();
    let want: Vec<(String, Vec<u8>)> =
        types.iter().enumerate().map(|(i, t)| (t.to_string(), format!("go-{i}").into_bytes())).collect();
    assert_eq!(seen, want, "all 5, in order");
    for r in &got {
        let body = r.body_json();
        assert_eq!(body["agent"]["instanceUid"], uid.to_string().as_str(), "{body:#}");
        assert_eq!(body["agent"]["attributes"]["service.name"], "go-svc", "{body:#}");
        assert_eq!(body["attempt"], 1, "{body:#}");
    }
    let ids: std::collections::HashSet<&str> =
        got.iter().filter_map(|r| r.body_json()["id"].as_str()).collect();
    assert_eq!(ids.len(), 5, "each message its own id");

    let reply = env
        .first_dispatch_ok(
            "go",
            &json!({ "id": "to-go", "type": "start", "data": b64encode(b"hello opamp-go"), "agents": [uid.to_string()] }),
        )
        .await;
    expect_state(&reply, uid, &["sent"], "connected opamp-go agent");
    let ev = go.wait_event(T, "custom_message").await;
    assert_eq!(ev["capability"], CAP, "{ev}");
    assert_eq!(ev["type"], "start", "{ev}");
    assert_eq!(ev["data"], b64encode(b"hello opamp-go").as_str(), "{ev}");
    env.wait_state("go", "to-go", uid, "sent").await;
    let s = env
        .slot_status_where("go", "5 delivered, 1 sent", |s| {
            s.upstream.delivered == 5 && s.downstream.sent == 1
        })
        .await;
    assert_eq!((s.upstream.received, s.upstream.failed), (5, 0), "{s:#?}");

    go.stop().await;
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Status.

/// 9. The slot's counters match what happened, both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_what_happened() {
    let env = Env::new("routes-status").await;
    let cb = CallbackServer::start().await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml(
        "counted",
        &format!(
            "  capability: {CAP}\n{}{}",
            callback_spec(&cb.url("/hook"), "    timeoutSeconds: 1\n    maxAttempts: 2\n"),
            dispatch_spec("    ttlSeconds: 2\n")
        ),
    ))
    .await;
    let mut a = env.agent(spec_with("frontend", &[CAP]));
    let mut b = env.agent(spec_with("backend", &[CAP]));
    let mut c = env.agent(spec_with("payments", &[]));
    for x in [&mut a, &mut b, &mut c] {
        x.connect();
    }
    a.wait_advertised(CAP).await;
    env.wait_declared(b.uid, CAP).await;
    env.wait_connected(c.uid, true).await;
    let s = env
        .slot_status_where("counted", "2 supporting agents, Ready", |s| {
            s.supporting_agents == 2 && has_condition(s, "Ready", "True")
        })
        .await;
    assert!(has_condition(&s, "Conflict", "False"), "{s:#?}");
    assert_eq!(s.upstream, Default::default(), "nothing happened yet: {s:#?}");
    assert_eq!(s.downstream, Default::default(), "nothing happened yet: {s:#?}");
    b.disconnect().await;
    env.wait_connected(b.uid, false).await;

    // Upstream: 2 delivered, then 1 failed (both attempts answered 500).
    a.send_custom(CAP, "profile", b"one");
    a.send_custom(CAP, "profile", b"two");
    cb.wait_for(2, T, "two delivered").await;
    env.slot_status_where("counted", "2 delivered", |s| s.upstream.delivered == 2).await;
    cb.fail_next(2);
    a.send_custom(CAP, "profile", b"three");
    cb.wait_for(4, T, "two failing attempts").await;
    cb.assert_no_more(4, QUIET, "maxAttempts 2").await;

    // Downstream: sent to a, queued for b (then expired after 2 s), rejected for c.
    let reply = env
        .first_dispatch_ok(
            "counted",
            &json!({ "id": "count-me", "type": "start", "data": b64encode(b"d"),
                     "agents": [a.uid.to_string(), b.uid.to_string(), c.uid.to_string()] }),
        )
        .await;
    expect_state(&reply, a.uid, &["sent"], "a");
    expect_state(&reply, b.uid, &["queued"], "b");
    expect_state(&reply, c.uid, &["rejected"], "c");
    env.wait_state("counted", "count-me", b.uid, "expired").await;

    let s = env
        .slot_status_where("counted", "every counter", |s| {
            let (u, d) = (&s.upstream, &s.downstream);
            (u.received, u.delivered, u.failed) == (3, 2, 1)
                && (d.accepted, d.sent, d.expired, d.rejected) == (2, 1, 1, 1)
        })
        .await;
    assert!(s.upstream.last_delivery_time.is_some(), "{s:#?}");
    assert!(s.upstream.last_error.as_deref().is_some_and(|e| !e.is_empty()), "{s:#?}");
    assert!(s.downstream.last_send_time.is_some(), "{s:#?}");
    assert!(has_condition(&s, "Ready", "True"), "{s:#?}");

    for x in [a, b, c] {
        x.stop().await;
    }
    env.stop().await;
}

/// Beyond the contract's list: the counters in status are not reset when the operator restarts
/// (a new operator continues from what the status says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_an_operator_restart() {
    let env = Env::new("routes-restart").await;
    let cb = CallbackServer::start().await;
    env.apply(&opaque_secret("dispatch", "token", DISPATCH_TOKEN)).await;
    env.apply(&slot_yaml(
        "counted",
        &format!("  capability: {CAP}\n{}{}", callback_spec(&cb.url("/hook"), ""), dispatch_spec("")),
    ))
    .await;
    let mut agent = env.agent(spec_with("frontend", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    env.wait_declared(agent.uid, CAP).await;
    agent.send_custom(CAP, "profile", b"before");
    cb.wait_for(1, T, "the first message").await;
    env.first_dispatch_ok(
        "counted",
        &json!({ "type": "start", "data": b64encode(b"d"), "agents": [agent.uid.to_string()] }),
    )
    .await;
    agent.wait_received(1, "the first dispatch").await;
    env.slot_status_where("counted", "1 delivered, 1 sent", |s| {
        s.upstream.delivered == 1 && s.downstream.sent == 1
    })
    .await;

    let env = env.restart().await;
    env.wait_connected(agent.uid, true).await;
    agent.wait_advertised(CAP).await;
    agent.send_custom(CAP, "profile", b"after");
    cb.wait_for(2, T, "the message after the restart").await;
    env.first_dispatch_ok(
        "counted",
        &json!({ "type": "start", "data": b64encode(b"e"), "agents": [agent.uid.to_string()] }),
    )
    .await;
    agent.wait_received(2, "the dispatch after the restart").await;
    let s = env
        .slot_status_where("counted", "counting on from the status", |s| {
            s.upstream.delivered == 2 && s.downstream.sent == 2
        })
        .await;
    assert_eq!((s.upstream.received, s.downstream.accepted), (2, 2), "{s:#?}");

    agent.stop().await;
    env.stop().await;
}

/// Two slots claiming one capability: the older wins (even when the newer sorts first by
/// name), the newer gets Conflict=True and Ready=False, and agents' messages go to the older
/// slot's callback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_slot_wins_a_conflict() {
    let env = Env::new("routes-conflict").await;
    let older_cb = CallbackServer::start().await;
    let newer_cb = CallbackServer::start().await;
    let older = env
        .ns
        .apply_yaml(&slot_yaml(
            "z-older",
            &format!("  capability: {CAP}\n{}", callback_spec(&older_cb.url("/old"), "")),
        ))
        .await
        .unwrap();
    env.slot_status_where("z-older", "Ready", |s| has_condition(s, "Ready", "True")).await;
    // creationTimestamp has a one-second resolution: make sure the newer one is newer.
    let created: Timestamp =
        older[0].metadata.creation_timestamp.as_ref().map(|t| t.0).expect("creationTimestamp");
    eventually(T, "a second past the older slot's creation", || async {
        (Timestamp::now().as_second() > created.as_second()).then_some(())
    })
    .await;
    env.apply(&slot_yaml(
        "a-newer",
        &format!("  capability: {CAP}\n{}", callback_spec(&newer_cb.url("/new"), "")),
    ))
    .await;

    let lost = env.slot_status_where("a-newer", "Conflict", |s| has_condition(s, "Conflict", "True")).await;
    assert!(has_condition(&lost, "Ready", "False"), "{lost:#?}");
    let msg = &condition(&lost, "Conflict").unwrap().message;
    assert!(msg.contains("z-older"), "the Conflict condition names the winner: {msg:?}");
    let won = env.slot_status_where("z-older", "still Ready", |s| has_condition(s, "Ready", "True")).await;
    assert!(!has_condition(&won, "Conflict", "True"), "{won:#?}");

    let mut agent = env.agent(spec_with("checkout", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    agent.send_custom(CAP, "profile", b"which slot?");
    let got = older_cb.wait_for(1, T, "the message at the older slot's callback").await;
    assert_eq!(got[0].body_json()["slot"], "z-older");
    newer_cb.assert_no_more(0, QUIET, "the newer slot's callback gets nothing").await;
    older_cb.assert_no_more(1, QUIET, "once").await;

    agent.stop().await;
    env.stop().await;
}

/// Stopping the operator (SIGTERM) lets the callbacks in flight and queued finish within the
/// grace period: a slow delivery and the one queued behind it (same agent, so in order) both
/// reach the callback before `stop` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_callbacks_in_flight() {
    let env = Env::new("routes-shutdown").await;
    let cb = CallbackServer::start().await;
    env.apply(&slot_yaml("pprof", &format!("  capability: {CAP}\n{}", callback_spec(&cb.url("/hook"), ""))))
        .await;
    let mut agent = env.agent(spec_with("checkout", &[CAP]));
    agent.connect();
    agent.wait_advertised(CAP).await;
    env.slot_status_where("pprof", "Ready", |s| {
        s.supporting_agents == 1 && has_condition(s, "Ready", "True")
    })
    .await;
    cb.hang_next(1, Duration::from_millis(1500)); // within the default 5 s timeout: delivered late
    agent.send_custom(CAP, "profile", b"first");
    agent.send_custom(CAP, "profile", b"second");
    cb.wait_for(1, T, "the first message reaching the slow callback").await;
    assert_eq!(cb.count(), 1, "the second waits behind the first");
    agent.stop().await;
    env.stop().await;
    let got = cb.requests();
    assert_eq!(got.len(), 2, "both messages were delivered before the operator stopped");
    assert_eq!(got[1].data(), b"second");
}
