//! The dispatch API and the agents listing across replicas (see `opamp_operator::routes::peer`
//! and `opamp_operator::agents_api`), against the local control plane: three replicas in
//! process, agents on two of them, every request through the third.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::cluster;
use common::env::TestEnv;
use common::{eventually, peers, within};
use opamp_operator::operator::Operator;
use opamp_operator::proto::CustomMessage;
use opamp_operator::protocol::Uid;
use opamp_operator::sim::{AgentSpec, SimAgent, WsClient};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(500);
const CAP: &str = "com.example.jobs";
const DISPATCH_TOKEN: &str = "dispatch-token-0123456789";

fn ws_url(op: &Operator) -> String {
    format!("ws://{}/v1/opamp", op.opamp_addr)
}

/// A WebSocket agent declaring [`CAP`]: records the custom messages it receives and the
/// capabilities the server advertises; connects to a given replica, and keeps its state (uid,
/// sequence numbers) across connections.
struct Agent {
    uid: Uid,
    token: String,
    state: Arc<Mutex<SimAgent>>,
    received: Arc<Mutex<Vec<CustomMessage>>>,
    advertised: Arc<Mutex<bool>>,
    introduced: Arc<Mutex<bool>>,
    link: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Agent {
    fn new(service: &str, token: &str) -> Self {
        let mut spec = AgentSpec::new(service);
        spec.custom_capabilities = vec![CAP.into()];
        Self {
            uid: spec.uid,
            token: token.into(),
            state: Arc::new(Mutex::new(SimAgent::new(spec))),
            received: Arc::default(),
            advertised: Arc::default(),
            introduced: Arc::default(),
            link: None,
        }
    }

    /// Connects to `op` (and reconnects there every 100 ms until [`Agent::disconnect`]): the
    /// full state the first time, a bare heartbeat later (the server asks for the rest).
    fn connect(&mut self, op: &Operator) {
        assert!(self.link.is_none(), "already connected");
        let stop = CancellationToken::new();
        let (url, token, state, received, advertised, introduced, st) = (
            ws_url(op),
            self.token.clone(),
            self.state.clone(),
            self.received.clone(),
            self.advertised.clone(),
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
                    let hello = {
                        let mut first = introduced.lock().unwrap();
                        let mut s = state.lock().unwrap();
                        if std::mem::replace(&mut *first, true) { s.heartbeat() } else { s.full_state() }
                    };
                    let mut stopping = false;
                    if ws.send(&hello).await.is_ok() {
                        loop {
                            tokio::select! {
                                _ = st.cancelled() => { stopping = true; break }
                                msg = ws.recv() => match msg {
                                    Ok(m) => {
                                        if let Some(c) = &m.custom_capabilities {
                                            *advertised.lock().unwrap() = c.capabilities.iter().any(|x| x == CAP);
                                        }
                                        if let Some(c) = &m.custom_message {
                                            received.lock().unwrap().push(c.clone());
                                        }
                                        let out = state.lock().unwrap().on_message(&m);
                                        if let Some(out) = out {
                                            if ws.send(&out).await.is_err() { break }
                                        }
                                    }
                                    Err(_) => break,
                                },
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
        self.link = Some((stop, task));
    }

    async fn disconnect(&mut self) {
        if let Some((stop, task)) = self.link.take() {
            stop.cancel();
            let _ = within(T, "agent task stops", task).await;
        }
    }

    fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().iter().map(|m| (m.r#type.clone(), m.data.to_vec())).collect()
    }

    async fn wait_received(&self, n: usize, what: &str) -> Vec<(String, Vec<u8>)> {
        eventually(T, &format!("{what}: agent {} received {n} messages", self.uid), || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }

    /// Asserts the agent receives nothing beyond `n` custom messages within [`QUIET`].
    async fn assert_no_more(&self, n: usize, what: &str) {
        let end = tokio::time::Instant::now() + QUIET;
        while tokio::time::Instant::now() < end {
            let got = self.received();
            assert!(got.len() <= n, "{what}: expected {n} custom messages, got {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_advertised(&self) {
        eventually(T, &format!("{CAP} advertised to agent {}", self.uid), || async {
            self.advertised.lock().unwrap().then_some(())
        })
        .await;
    }
}

struct Api {
    http: reqwest::Client,
    ns: String,
}

impl Api {
    fn messages_url(&self, op: &Operator) -> String {
        format!("http://{}/api/v1/namespaces/{}/capabilityslots/jobs/messages", op.api_addr, self.ns)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = within(T, "an API request", req.send()).await.expect("the API answers");
        let status = resp.status().as_u16();
        let body = within(T, "an API answer", resp.bytes()).await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| json!({ "<not JSON>": String::from_utf8_lossy(&body) })),
        )
    }

    /// POSTs a dispatch through `op`; while the slot or its token are not known there yet
    /// (401/403), again.
    async fn dispatch(&self, op: &Operator, body: &Value) -> Value {
        eventually(T, &format!("dispatch {body}"), || async {
            let req = self
                .http
                .post(self.messages_url(op))
                .bearer_auth(DISPATCH_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string());
            match self.send(req).await {
                (200, reply) => Some(reply),
                (401 | 403, _) => None,
                (status, reply) => panic!("dispatch {body} → {status} {reply}"),
            }
        })
        .await
    }

    async fn get(&self, op: &Operator, id: &str) -> (u16, Value) {
        let req = self.http.get(format!("{}/{id}", self.messages_url(op))).bearer_auth(DISPATCH_TOKEN);
        self.send(req).await
    }

    /// Waits until `GET …/messages/{id}` through `op` answers exactly `want` (agent → state).
    async fn wait_states(&self, op: &Operator, id: &str, want: &[(Uid, &str)]) {
        let end = tokio::time::Instant::now() + T;
        loop {
            let (status, reply) = self.get(op, id).await;
            if status == 200 && states(&reply) == want_of(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "GET {id} through {}: wanted {want:?}, last {status} {reply:#}",
                op.api_addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agents listing through `op`, as the cluster admin.
    async fn agents(&self, op: &Operator, path: &str) -> Value {
        let admin = cluster().await.admin_token.clone();
        let (status, reply) =
            self.send(self.http.get(format!("http://{}{path}", op.api_addr)).bearer_auth(admin)).await;
        assert_eq!(status, 200, "{path}: {reply}");
        reply
    }
}

/// The states of a dispatch answer, in order.
fn states(reply: &Value) -> Vec<(String, String)> {
    reply["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| {
                    (
                        x["agent"].as_str().unwrap_or("").to_owned(),
                        x["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn want_of(want: &[(Uid, &str)]) -> Vec<(String, String)> {
    want.iter().map(|(u, s)| (u.to_string(), s.to_string())).collect()
}

/// The rows of `uid` in a listing: (connected).
fn rows_of(listing: &Value, uid: Uid) -> Vec<bool> {
    listing["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter(|r| r["instanceUid"] == uid.to_string().as_str())
        .map(|r| r["connected"].as_bool().unwrap_or(false))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_get_and_listing_answer_from_any_replica_and_messages_follow_their_agent() {
    let tenants = TestEnv::new("so-dispatch").deadline(T).prepare().await;
    let ns = tenants.tenant(0).ns.name.clone();
    let token = tenants.tenant(0).token.clone();
    let id = peers::identity(&ns).await;
    let ops =
        peers::start_replicas(&ns, tenants.names(), &id, &["replica-a", "replica-b", "replica-c"]).await;
    let [a, b, c] = <[Operator; 3]>::try_from(ops).ok().expect("three replicas");
    tenants
        .apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: dispatch}}\ntype: Opaque\nstringData: {{token: {DISPATCH_TOKEN}}}\n"
        ))
        .await;
    tenants
        .apply(&format!(
            "apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: jobs}}\nspec:\n  capability: {CAP}\n  messageTypes: [start, stop]\n  dispatch:\n    tokenSecretRef: {{name: dispatch, key: token}}\n"
        ))
        .await;
    let api = Api { http: reqwest::Client::builder().timeout(T).build().unwrap(), ns: ns.clone() };

    // x1 and x3 on B, x2 on C; x3 goes offline (B remembers it).
    let (mut x1, mut x2, mut x3) =
        (Agent::new("frontend", &token), Agent::new("frontend", &token), Agent::new("backend", &token));
    x1.connect(&b);
    x2.connect(&c);
    x3.connect(&b);
    for x in [&x1, &x2, &x3] {
        x.wait_advertised().await; // the replica holding it routes the slot
    }
    x3.disconnect().await;
    let key3 = tenants.tenant(0).key(x3.uid);
    eventually(T, "B remembers x3 offline", || async {
        b.fleet.agent(&key3).filter(|s| !s.connected).map(|_| ())
    })
    .await;
    assert!(a.fleet.agent(&key3).is_none() && c.fleet.agent(&key3).is_none(), "only B holds x3");
    let unknown = Uid::new_v7();

    // By uid list, through A, which holds none of them.
    let reply = api
        .dispatch(
            &a,
            &json!({ "id": "req-1", "type": "start", "data": "Z28=",
                     "agents": [x1.uid.to_string(), x2.uid.to_string(), x3.uid.to_string(), unknown.to_string()] }),
        )
        .await;
    let want = [(x1.uid, "sent"), (x2.uid, "sent"), (x3.uid, "queued"), (unknown, "rejected")];
    assert_eq!(states(&reply), want_of(&want), "{reply:#}");
    assert!(reply["results"][3]["reason"].as_str().is_some_and(|r| r.contains("unknown")), "{reply:#}");
    for x in [&x1, &x2] {
        assert_eq!(x.wait_received(1, "req-1").await[0], ("start".to_owned(), b"go".to_vec()));
    }
    // The same merged states through every replica.
    for op in [&a, &b, &c] {
        api.wait_states(op, "req-1", &want).await;
    }

    // By selector, through A: every replica's agents it picks.
    let reply = api
        .dispatch(
            &a,
            &json!({ "id": "req-2", "type": "stop", "data": "aGFsdA==",
                     "selector": { "matchAttributes": { "service.name": "frontend" } } }),
        )
        .await;
    let mut want2 = vec![(x1.uid, "sent"), (x2.uid, "sent")];
    want2.sort();
    assert_eq!(states(&reply), want_of(&want2), "{reply:#}");
    for x in [&x1, &x2] {
        assert_eq!(x.wait_received(2, "req-2").await[1], ("stop".to_owned(), b"halt".to_vec()));
    }
    for op in [&a, &b, &c] {
        api.wait_states(op, "req-2", &want2).await;
    }
    // An id is taken on whichever replica took it (here only A has a record of req-3).
    let only_a = json!({ "id": "req-3", "type": "start", "agents": [unknown.to_string()] });
    assert_eq!(states(&api.dispatch(&a, &only_a).await), want_of(&[(unknown, "rejected")]));
    let again = api
        .http
        .post(api.messages_url(&b))
        .bearer_auth(DISPATCH_TOKEN)
        .header("content-type", "application/json")
        .body(only_a.to_string());
    let (status, reply) = api.send(again).await;
    assert_eq!(status, 409, "req-3 again, through B: {reply}");

    // x3 comes back, to C: C claims it from B, which hands over the queued message.
    x3.connect(&c);
    assert_eq!(
        x3.wait_received(1, "the queued message, after moving").await[0],
        ("start".to_owned(), b"go".to_vec())
    );
    eventually(T, "B forgot x3", || async { b.fleet.agent(&key3).is_none().then_some(()) }).await;
    let want = [(x1.uid, "sent"), (x2.uid, "sent"), (x3.uid, "sent"), (unknown, "rejected")];
    for op in [&a, &b, &c] {
        api.wait_states(op, "req-1", &want).await;
    }
    for (x, n) in [(&x1, 2), (&x2, 2), (&x3, 1)] {
        x.assert_no_more(n, "each message once").await;
    }

    // The listing through A: every agent once, x3 connected.
    for path in [format!("/api/v1/namespaces/{ns}/agents"), "/api/v1/agents".to_owned()] {
        let listing = api.agents(&a, &path).await;
        for x in [&x1, &x2, &x3] {
            assert_eq!(rows_of(&listing, x.uid), [true], "{path}: {} once, connected: {listing:#}", x.uid);
        }
        assert!(listing.get("missingReplicas").is_none(), "{listing:#}");
    }

    for mut x in [x1, x2, x3] {
        x.disconnect().await;
    }
    for op in [a, b, c] {
        op.stop().await;
    }
    tenants.cleanup().await;
}
