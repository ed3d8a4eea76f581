//! Plain-HTTP agents behind a Service without session affinity: every poll lands on another
//! replica, yet the agent is served by its owner alone (see `opamp_operator::opamp` `http.rs`).
//! Three replicas in-process against the local control plane, the opamp-go agent polling
//! through a round-robin proxy that sends each poll to the next replica and closes the
//! connection after each response; the proxy also reads what the agent is sent.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::env::Tenant;
use common::goagent::GoAgent;
use common::{eventually, peers};
use opamp_operator::fleet::{AgentKey, Fleet, FleetConfig};
use opamp_operator::operator::Operator;
use opamp_operator::proto::{
    AgentToServer, CustomMessage, RemoteConfigStatuses, ServerToAgent, ServerToAgentFlags,
};
use opamp_operator::protocol::codec;
use opamp_operator::protocol::{Transport, Uid};
use parking_lot::Mutex;
use prost::Message as _;

const T: Duration = Duration::from_secs(60);
const CAPABILITY: &str = "io.example.echo";

/// What the proxy saw of one poll.
#[derive(Debug, Clone)]
struct Poll {
    replica: SocketAddr,
    status: u16,
    /// The agent sent `OpAMP-Instance-UID`.
    uid_header: bool,
    full_state_asked: bool,
    remote_config_hash: Option<Bytes>,
    custom_message: Option<Bytes>,
}

/// A Service without session affinity: each poll goes to the next replica, each connection is
/// closed after its response. Polls wait while it is paused.
struct Proxy {
    targets: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    polls: Mutex<Vec<Poll>>,
    open: tokio::sync::watch::Sender<bool>,
    http: reqwest::Client,
}

impl Proxy {
    async fn start(targets: Vec<SocketAddr>) -> (Arc<Proxy>, SocketAddr) {
        let proxy = Arc::new(Proxy {
            targets: Mutex::new(targets),
            next: AtomicUsize::new(0),
            polls: Mutex::new(Vec::new()),
            open: tokio::sync::watch::channel(true).0,
            http: reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap(),
        });
        let app =
            axum::Router::new().route("/v1/opamp", axum::routing::post(relay)).with_state(proxy.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (proxy, addr)
    }

    fn polls(&self) -> Vec<Poll> {
        self.polls.lock().clone()
    }

    fn count(&self) -> usize {
        self.polls.lock().len()
    }

    /// Waits until `n` more polls were answered.
    async fn wait_polls(&self, n: usize) {
        let until = self.count() + n;
        eventually(T, &format!("{n} more polls"), || async { (self.count() >= until).then_some(()) }).await;
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

async fn relay(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut open = proxy.open.subscribe();
    let _ = open.wait_for(|o| *o).await;
    let target = {
        let targets = proxy.targets.lock();
        targets[proxy.next.fetch_add(1, Ordering::Relaxed) % targets.len()]
    };
    let mut request = proxy.http.post(format!("http://{target}/v1/opamp")).body(body);
    for (name, value) in &headers {
        if ![header::HOST, header::CONTENT_LENGTH, header::CONNECTION].contains(name) {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status().as_u16();
    let answer_headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap_or_default();
    let gzipped = answer_headers.get(header::CONTENT_ENCODING).is_some_and(|v| v == "gzip");
    let plain = if gzipped { codec::gunzip(&body, 64 << 20).unwrap() } else { body.clone() };
    let msg = ServerToAgent::decode(plain).unwrap_or_else(|e| panic!("the agent got no ServerToAgent: {e}"));
    proxy.polls.lock().push(Poll {
        replica: target,
        status,
        uid_header: headers.contains_key("opamp-instance-uid"),
        full_state_asked: msg.flags & ServerToAgentFlags::ReportFullState as u64 != 0,
        remote_config_hash: msg.remote_config.map(|c| c.config_hash),
        custom_message: msg.custom_message.map(|c| c.data),
    });
    let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::RETRY_AFTER] {
        if let Some(v) = answer_headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn edge_config(body: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: edge}}\nspec:\n  selector: {{matchAttributes: {{service.name: edge}}}}\n  files:\n    edge.yaml:\n      inline: '{body}'\n"
    )
}

/// The replica of `ops` that owns `uid`, as the first one sees it.
fn owner_of(ops: &[Operator], uid: &Uid) -> usize {
    let owner = ops[0].peers.owner(uid).map_or(ops[0].peers.me().identity.clone(), |m| m.identity);
    ops.iter().position(|op| op.peers.me().identity == owner).expect("the owner is one of them")
}

/// The replicas that count the agent as connected.
fn counting(ops: &[Operator], key: &AgentKey) -> Vec<usize> {
    (0..ops.len()).filter(|&i| ops[i].fleet.agent(key).is_some_and(|a| a.connected)).collect()
}

/// Over `polls` more polls, after each: exactly the owner counts the agent as connected.
async fn counted_once(proxy: &Proxy, ops: &[Operator], key: &AgentKey, owner: usize, polls: usize) {
    for _ in 0..polls {
        proxy.wait_polls(1).await;
        assert_eq!(counting(ops, key), vec![owner], "only the owner counts the agent");
    }
}

/// The value of one sample of the replica's metrics, 0 when absent.
async fn metric(op: &Operator, sample: &str) -> f64 {
    let url = format!("http://{}/metrics", op.metrics_addr.expect("a metrics address"));
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

fn applied(fleet: &Fleet, key: &AgentKey, hash: &Bytes) -> bool {
    fleet.agent(key).is_some_and(|a| {
        a.connected
            && !a.awaiting_full_state
            && a.report.remote_config_status.as_ref().is_some_and(|s| {
                s.last_remote_config_hash == *hash && s.status == RemoteConfigStatuses::Applied as i32
            })
    })
}

fn full_state_asks(proxy: &Proxy) -> usize {
    proxy.polls().iter().filter(|p| p.full_state_asked).count()
}

fn configs_sent(proxy: &Proxy) -> Vec<Bytes> {
    proxy.polls().into_iter().filter_map(|p| p.remote_config_hash).collect()
}

/// Queues a custom message on the owner and checks it reaches the agent at its next poll.
async fn custom_message_delivered(
    proxy: &Proxy,
    agent: &mut GoAgent,
    owner: &Operator,
    key: &AgentKey,
    data: &str,
) {
    let before = proxy.count();
    let message = CustomMessage {
        capability: CAPABILITY.into(),
        r#type: "ping".into(),
        data: Bytes::from(data.to_owned()),
    };
    owner.fleet.enqueue_custom_message(key, message).expect("queued on the owner");
    agent
        .wait_for(T, "the custom message", |e| {
            e["event"] == "custom_message" && e["capability"] == CAPABILITY && e["type"] == "ping"
        })
        .await;
    let polls = proxy.polls();
    let at = polls.iter().position(|p| p.custom_message.as_deref() == Some(data.as_bytes())).unwrap();
    // A poll in flight when it was queued may have been answered without it.
    assert!(at <= before + 1, "delivered at poll {at}, queued after poll {before}");
}

/// Changes the membership with the proxy holding polls, so that no poll lands while the
/// replicas' views differ (for a moment, a poll could then be asked for its full state by
/// two of them); the proxy sends polls to `targets` afterwards.
async fn while_held<F: std::future::Future<Output = Vec<Operator>>>(
    proxy: &Proxy,
    targets: impl FnOnce(),
    change: F,
) -> Vec<Operator> {
    proxy.set_open(false);
    targets();
    let ops = change.await;
    peers::settled(&ops).await;
    proxy.set_open(true);
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_agent_polling_every_replica_in_turn_is_served_by_its_owner_alone() {
    let tenants = common::env::TestEnv::new("http-route").deadline(T).prepare().await;
    let ns: &Tenant = &tenants;
    let id = peers::identity(&ns.ns.name).await;
    let replica = |name: &str| peers::replica_config(&ns.ns.name, tenants.names(), name, &id);
    let mut ops =
        peers::start_replicas(&ns.ns.name, tenants.names(), &id, &["replica-a", "replica-b", "replica-c"])
            .await;
    // An agent replica-c owns when it is there; it is not, at first.
    let uid = loop {
        let uid = Uid::new_v7();
        if owner_of(&ops, &uid) == 2 {
            break uid;
        }
    };
    ops.pop().unwrap().stop().await;
    peers::settled(&ops).await;
    ns.apply(&edge_config("v: 1")).await;

    let (proxy, proxy_addr) = Proxy::start(ops.iter().map(|op| op.opamp_addr).collect()).await;
    let key = ns.key(uid);
    let mut agent = GoAgent::spawn(&[
        "-url",
        &format!("http://{proxy_addr}/v1/opamp"),
        "-uid",
        &uid.to_string(),
        "-heartbeat",
        "200ms",
        "-compression",
        "-token",
        &ns.token,
        "-attr",
        "service.name=edge",
        "-custom-capability",
        CAPABILITY,
    ]);
    agent.wait_event(T, "connected").await;
    let first_owner = owner_of(&ops, &uid);

    // The AgentConfig reaches it through its owner, and it reports APPLIED there.
    let v1 = agent
        .wait_for(T, "v1 applied", |e| e["event"] == "remote_config_status" && e["status"] == "APPLIED")
        .await;
    let v1_hash = Bytes::from(hex_decode(v1["hash"].as_str().unwrap()));
    eventually(T, "the owner knows it runs v1", || async {
        applied(&ops[first_owner].fleet, &key, &v1_hash).then_some(())
    })
    .await;

    // Counted once, at every poll, while its polls go to both replicas in turn.
    counted_once(&proxy, &ops, &key, first_owner, 6).await;
    let polls = proxy.polls();
    for op in &ops {
        assert!(
            polls.iter().filter(|p| p.replica == op.opamp_addr).count() >= 3,
            "polls reach every replica"
        );
    }
    assert!(polls.iter().all(|p| p.status == 200 && p.uid_header), "{polls:#?}");
    assert!(full_state_asks(&proxy) <= 1, "its full state asked once at most: {polls:#?}");
    assert_eq!(configs_sent(&proxy), vec![v1_hash.clone()], "v1 sent once");
    let other = 1 - first_owner;
    let forwarded = metric(&ops[other], "opamp_http_forwarded_total{result=\"answered\"}").await;
    assert!(forwarded >= 1.0, "the other replica forwarded its polls to the owner");
    assert!(metric(&ops[first_owner], "opamp_http_forwards_received_total").await >= 1.0);

    // A custom message queued on the owner goes out at the next poll.
    custom_message_delivered(&proxy, &mut agent, &ops[first_owner], &key, "first").await;

    // replica-c joins and owns the agent now: the first owner marks it offline; replica-c asks
    // for its full state once and does not send again the config the agent runs.
    let asks = full_state_asks(&proxy);
    let joined = common::operator::start(replica("replica-c")).await;
    let c_addr = joined.opamp_addr;
    ops.push(joined);
    let ops = while_held(&proxy, || proxy.targets.lock().push(c_addr), async { ops }).await;
    assert_eq!(owner_of(&ops, &uid), 2);
    eventually(T, "replica-c knows it runs v1", || async {
        applied(&ops[2].fleet, &key, &v1_hash).then_some(())
    })
    .await;
    counted_once(&proxy, &ops, &key, 2, 6).await;
    assert!(full_state_asks(&proxy) <= asks + 1, "full state asked once per ownership change");
    assert_eq!(configs_sent(&proxy), vec![v1_hash.clone()], "the config it runs is not sent again");
    assert!(metric(&ops[first_owner], "opamp_http_agents_released_total").await >= 1.0);
    custom_message_delivered(&proxy, &mut agent, &ops[2], &key, "second").await;

    // replica-c stops (the Service drops it first): the agent is its first owner's again.
    let asks = full_state_asks(&proxy);
    let mut ops = ops;
    let stopped = ops.pop().unwrap();
    let ops = while_held(&proxy, || proxy.targets.lock().retain(|a| *a != c_addr), async {
        stopped.stop().await;
        ops
    })
    .await;
    assert_eq!(owner_of(&ops, &uid), first_owner);
    eventually(T, "the first owner knows it runs v1", || async {
        applied(&ops[first_owner].fleet, &key, &v1_hash).then_some(())
    })
    .await;
    counted_once(&proxy, &ops, &key, first_owner, 4).await;
    assert!(full_state_asks(&proxy) <= asks + 1, "full state asked once per ownership change");
    assert_eq!(configs_sent(&proxy), vec![v1_hash.clone()], "the config it runs is not sent again");
    custom_message_delivered(&proxy, &mut agent, &ops[first_owner], &key, "third").await;

    // A config change reaches it through its owner, once.
    ns.apply(&edge_config("v: 2")).await;
    let v2 = agent
        .wait_for(T, "v2 applied", |e| {
            e["event"] == "remote_config_status" && e["status"] == "APPLIED" && e["hash"] != v1["hash"]
        })
        .await;
    let v2_hash = Bytes::from(hex_decode(v2["hash"].as_str().unwrap()));
    eventually(T, "the owner knows it runs v2", || async {
        applied(&ops[first_owner].fleet, &key, &v2_hash).then_some(())
    })
    .await;
    counted_once(&proxy, &ops, &key, first_owner, 4).await;
    assert_eq!(configs_sent(&proxy), vec![v1_hash, v2_hash]);
    assert_eq!(agent.count("remote_config_duplicate"), 0);
    assert!(full_state_asks(&proxy) <= asks + 1);

    agent.stop().await;
    for op in ops {
        op.stop().await;
    }
    tenants.cleanup().await;
}

/// An owner that does not answer (killed: its Lease is still live for up to 3 s) does not
/// starve its agents: the replica they poll answers them itself meanwhile, without counting
/// them, and becomes their owner when the Lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_for_an_owner_that_does_not_answer_are_handled_where_they_land() {
    let tenants = common::env::TestEnv::new("http-route-kill").deadline(T).prepare().await;
    let ns: &Tenant = &tenants;
    let id = peers::identity(&ns.ns.name).await;
    let mut ops = peers::start_replicas(&ns.ns.name, tenants.names(), &id, &["replica-a", "replica-b"]).await;
    // An agent the second replica owns polls the first one only.
    let uid = loop {
        let uid = Uid::new_v7();
        if owner_of(&ops, &uid) == 1 {
            break uid;
        }
    };
    let key = ns.key(uid);

    // A poll without OpAMP-Instance-UID (opamp-go before v0.23 sends none), gzipped, is routed by the
    // uid it carries; the owner admits it by the agent's token and answers it uncompressed, as
    // the agent asked (no Accept-Encoding).
    let plain = ns.key(loop {
        let other = Uid::new_v7();
        if owner_of(&ops, &other) == 1 {
            break other;
        }
    });
    let hello = AgentToServer {
        instance_uid: plain.uid.to_wire(),
        agent_description: Some(Default::default()),
        ..Default::default()
    };
    let post = |token: &str| {
        reqwest::Client::new()
            .post(format!("http://{}/v1/opamp", ops[0].opamp_addr))
            .bearer_auth(token)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(codec::gzip(&hello.encode_to_vec()))
            .send()
    };
    let resp = post(&ns.token).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-protobuf");
    assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
    let reply = ServerToAgent::decode(resp.bytes().await.unwrap()).unwrap();
    assert_eq!(reply.instance_uid, plain.uid.to_wire());
    assert!(ops[1].fleet.agent(&plain).is_some_and(|a| a.connected), "its owner holds it");
    assert!(ops[0].fleet.agent(&plain).is_none(), "the replica it landed on does not");
    // A token no namespace has is refused where the poll lands.
    assert_eq!(post("no-such-token").await.unwrap().status(), 401);

    let (proxy, proxy_addr) = Proxy::start(vec![ops[0].opamp_addr]).await;
    let mut agent = GoAgent::spawn(&[
        "-url",
        &format!("http://{proxy_addr}/v1/opamp"),
        "-uid",
        &uid.to_string(),
        "-heartbeat",
        "200ms",
        "-token",
        &ns.token,
    ]);
    agent.wait_event(T, "connected").await;
    counted_once(&proxy, &ops, &key, 1, 3).await;

    ops.remove(1).kill();
    let killed_at = proxy.count();
    eventually(T, "the killed replica's Lease lapses", || async {
        ops[0].peers.others().is_empty().then_some(())
    })
    .await;
    let unreachable = metric(&ops[0], "opamp_http_forwarded_total{result=\"owner_unreachable\"}").await;
    assert!(unreachable >= 1.0, "polls while the owner was unreachable: {unreachable}");
    counted_once(&proxy, &ops, &key, 0, 3).await;
    let after = &proxy.polls()[killed_at..];
    assert!(after.iter().all(|p| p.status == 200), "every poll answered: {after:#?}");
    assert!(after.iter().filter(|p| p.full_state_asked).count() <= 1, "{after:#?}");

    agent.stop().await;
    ops.remove(0).stop().await;
    tenants.cleanup().await;
}

/// Releasing an HTTP agent takes it offline and keeps its record, queued messages included;
/// WebSocket agents are left alone.
#[test]
fn released_http_agents_are_offline_and_remembered() {
    let fleet = Fleet::new(FleetConfig::default());
    let tenant = opamp_operator::fleet::Tenant::new("ns");
    let hello = |uid: Uid, transport| {
        let mut conn = fleet.connection(transport, tenant.clone());
        let msg = AgentToServer {
            instance_uid: uid.to_wire(),
            agent_description: Some(Default::default()),
            ..Default::default()
        };
        fleet.handle(&mut conn, msg).unwrap();
        conn
    };
    let (http_a, http_b, ws) = (Uid::new_v7(), Uid::new_v7(), Uid::new_v7());
    hello(http_a, Transport::Http);
    hello(http_b, Transport::Http);
    let _ws_conn = hello(ws, Transport::WebSocket);
    assert_eq!(fleet.connected_count(), 3);
    assert_eq!(fleet.release_http_agents(|uid| *uid == http_b), 1);
    let a = fleet.agent(&AgentKey::new("ns", http_a)).unwrap();
    assert!(!a.connected && a.report.description.is_some(), "offline, remembered");
    assert!(fleet.agent(&AgentKey::new("ns", ws)).unwrap().connected);
    assert_eq!(fleet.connected_count(), 2);
    assert!(fleet.release_http_agent(&AgentKey::new("ns", http_b)));
    assert!(!fleet.release_http_agent(&AgentKey::new("ns", http_b)), "already offline");
    assert!(!fleet.release_http_agent(&AgentKey::new("ns", ws)), "not an HTTP agent");
    assert_eq!(fleet.connected_count(), 1);
    assert_eq!(fleet.known_count(), 3);
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
