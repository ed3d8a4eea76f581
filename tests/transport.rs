//! Both transports over real sockets, driven by our own Rust agent.
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, eventually, remote_config, within};
use opamp_operator::fleet::{AgentKey, FleetConfig};
use opamp_operator::opamp::{AuthError, Authenticator, KindLabel, OpampServer, ServerConfig, ServerMetrics};
use opamp_operator::proto::{
    AgentToServer, RemoteConfigStatuses, ServerErrorResponseType, server_error_response,
};
use opamp_operator::protocol::session::SERVER_CAPABILITIES;
use opamp_operator::protocol::{Transport, Uid};
use opamp_operator::sim::{AgentSpec, HttpClient, SimAgent, WsClient, WsEvent};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const T: Duration = Duration::from_secs(10);

async fn close_code(ws: &mut WsClient) -> Option<CloseCode> {
    loop {
        match within(T, "close", ws.next_event()).await {
            Ok(WsEvent::Closed(frame)) => return frame.map(|f| f.code),
            Ok(WsEvent::Message(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn websocket_agent_reports_and_gets_config_pushed() {
    let server = TestServer::start_default().await;
    let mut agent = SimAgent::new(AgentSpec::new("checkout"));
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send(&agent.full_state()).await.unwrap();
    let reply = within(T, "first reply", ws.recv()).await.unwrap();
    assert_eq!(reply.capabilities, SERVER_CAPABILITIES);
    assert_eq!(reply.instance_uid, agent.uid().to_wire());

    let snap = server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap();
    assert_eq!(snap.transport, Some(Transport::WebSocket));
    assert!(snap.report.description.is_some() && snap.report.health.is_some());

    // The server pushes as soon as the desired state changes: the agent sends nothing first.
    let cfg = remote_config("receivers: {}");
    server.fleet.set_remote_config(&AgentKey::new("default", agent.uid()), Some(cfg.clone()));
    let push = within(T, "pushed config", ws.recv()).await.unwrap();
    assert_eq!(push.remote_config.as_ref(), Some(&*cfg));
    let status = agent.on_message(&push).expect("agent reports the status");
    ws.send(&status).await.unwrap();
    within(T, "reply to status", ws.recv()).await.unwrap();
    let snap = server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap();
    let rcs = snap.report.remote_config_status.unwrap();
    assert_eq!(
        (rcs.status, rcs.last_remote_config_hash),
        (RemoteConfigStatuses::Applied as i32, cfg.config_hash.clone())
    );

    // Closing the socket disconnects the agent.
    ws.close().await;
    eventually(T, "agent disconnected", || async {
        (!server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap().connected).then_some(())
    })
    .await;
    assert_eq!(server.fleet.connected_count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn websocket_accepts_frames_without_the_header_from_old_clients() {
    let server = TestServer::start_default().await;
    let mut agent = SimAgent::new(AgentSpec::new("legacy"));
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send_raw(Message::Binary(agent.full_state().encode_to_vec().into())).await.unwrap();
    let reply = within(T, "reply", ws.recv()).await.unwrap();
    assert_eq!(reply.instance_uid, agent.uid().to_wire());
    server.stop().await;
}

#[tokio::test]
async fn websocket_text_frames_are_refused_with_1003() {
    let server = TestServer::start_default().await;
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send_raw(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Unsupported));
    server.stop().await;
}

#[tokio::test]
async fn websocket_oversize_messages_are_closed_with_1009() {
    let server = TestServer::start(
        FleetConfig::default(),
        ServerConfig { max_message_bytes: 1024, ..Default::default() },
    )
    .await;
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    let mut big = vec![0u8];
    AgentToServer { instance_uid: Bytes::from(vec![1u8; 2048]), ..Default::default() }
        .encode(&mut big)
        .unwrap();
    ws.send_raw(Message::Binary(big.into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));
    server.stop().await;
}

#[tokio::test]
async fn websocket_garbage_gets_bad_request_and_the_connection_lives_on() {
    let server = TestServer::start_default().await;
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send_raw(Message::Binary(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0x0f]))).await.unwrap();
    let reply = within(T, "error reply", ws.recv()).await.unwrap();
    let err = reply.error_response.expect("error_response");
    assert_eq!(err.r#type, ServerErrorResponseType::BadRequest as i32);
    assert!(err.error_message.contains("malformed AgentToServer"), "{}", err.error_message);
    let mut agent = SimAgent::new(AgentSpec::new("after-garbage"));
    ws.send(&agent.full_state()).await.unwrap();
    assert_eq!(within(T, "reply", ws.recv()).await.unwrap().error_response, None);
    server.stop().await;
}

#[tokio::test]
async fn websocket_agents_beyond_the_limit_get_unavailable_with_retry_info() {
    let fleet =
        FleetConfig { max_agents: Some(1), retry_after: Duration::from_secs(5), ..Default::default() };
    let server = TestServer::start(fleet, ServerConfig::default()).await;
    let mut first = WsClient::connect(&server.ws_url(), None).await.unwrap();
    first.send(&SimAgent::new(AgentSpec::new("a")).full_state()).await.unwrap();
    within(T, "reply", first.recv()).await.unwrap();

    let mut second = WsClient::connect(&server.ws_url(), None).await.unwrap();
    let mut agent = SimAgent::new(AgentSpec::new("b"));
    second.send(&agent.full_state()).await.unwrap();
    let reply = within(T, "refusal", second.recv()).await.unwrap();
    assert_eq!(reply.instance_uid, agent.uid().to_wire());
    let err = reply.error_response.expect("error_response");
    assert_eq!(err.r#type, ServerErrorResponseType::Unavailable as i32);
    let Some(server_error_response::Details::RetryInfo(retry)) = err.details else {
        panic!("retry_info missing")
    };
    assert_eq!(retry.retry_after_nanoseconds, 5_000_000_000);
    assert_eq!(close_code(&mut second).await, Some(CloseCode::Again));
    assert_eq!(server.fleet.connected_count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_websockets_with_going_away() {
    let server = TestServer::start_default().await;
    let mut ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    ws.send(&SimAgent::new(AgentSpec::new("a")).full_state()).await.unwrap();
    within(T, "reply", ws.recv()).await.unwrap();
    server.shutdown.cancel();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
}

#[tokio::test]
async fn http_agent_polls_and_gets_config_on_next_poll() {
    let server = TestServer::start_default().await;
    let http = HttpClient::new(&server.http_url(), None, false);
    let mut agent = SimAgent::new(AgentSpec::new("http-agent"));
    let reply = http.send(&agent.full_state()).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/x-protobuf");
    assert!(reply.headers.get("content-encoding").is_none(), "no gzip unless accepted");
    let msg = reply.message.unwrap();
    assert_eq!((msg.capabilities, msg.remote_config), (SERVER_CAPABILITIES, None));
    assert_eq!(
        server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap().transport,
        Some(Transport::Http)
    );

    let cfg = remote_config("exporters: {}");
    server.fleet.set_remote_config(&AgentKey::new("default", agent.uid()), Some(cfg.clone()));
    let msg = http.send(&agent.heartbeat()).await.unwrap().message.unwrap();
    assert_eq!(msg.remote_config.as_ref(), Some(&*cfg));
    let status = agent.on_message(&msg).unwrap();
    let msg = http.send(&status).await.unwrap().message.unwrap();
    assert_eq!(msg.remote_config, None, "applied: not offered again");
    let rcs = server
        .fleet
        .agent(&AgentKey::new("default", agent.uid()))
        .unwrap()
        .report
        .remote_config_status
        .unwrap();
    assert_eq!(rcs.status, RemoteConfigStatuses::Applied as i32);
    server.stop().await;
}

#[tokio::test]
async fn http_gzip_bodies_are_accepted_and_replies_gzipped_when_accepted_and_worth_it() {
    let server = TestServer::start_default().await;
    let http = HttpClient::new(&server.http_url(), None, true);
    let mut agent = SimAgent::new(AgentSpec::new("gz"));
    let reply = http.send(&agent.full_state()).await.unwrap();
    assert_eq!(reply.status, 200);
    // A short reply goes as it is: gzip would make it longer.
    assert!(reply.headers.get("content-encoding").is_none(), "{:?}", reply.headers);
    assert_eq!(reply.message.unwrap().instance_uid, agent.uid().to_wire());
    assert!(server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap().report.description.is_some());
    // A reply carrying a config of a few kilobytes is gzipped.
    let cfg = remote_config(&"exporters: { debug: {} }\n".repeat(200));
    server.fleet.set_remote_config(&AgentKey::new("default", agent.uid()), Some(cfg.clone()));
    let reply = http.send(&agent.heartbeat()).await.unwrap();
    assert_eq!(reply.headers["content-encoding"], "gzip");
    assert_eq!(&reply.raw[..2], &[0x1f, 0x8b], "the body on the wire is gzip");
    assert_eq!(reply.message.unwrap().remote_config.as_ref(), Some(&*cfg));
    server.stop().await;
}

#[tokio::test]
async fn http_bad_input_gets_clear_errors_with_protobuf_bodies() {
    let server = TestServer::start(
        FleetConfig::default(),
        ServerConfig { max_message_bytes: 1024, ..Default::default() },
    )
    .await;
    let plain = HttpClient::new(&server.http_url(), None, false);
    let gz = HttpClient::new(&server.http_url(), None, true);

    let garbage =
        plain.post(Bytes::from_static(&[0xff, 0xff, 0xff]), "application/x-protobuf").await.unwrap();
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.headers["content-type"], "application/x-protobuf");
    let err = garbage.message.unwrap().error_response.unwrap();
    assert_eq!(err.r#type, ServerErrorResponseType::BadRequest as i32);

    let full = AgentToServer { instance_uid: Uid::new_v7().to_wire(), capabilities: 1, ..Default::default() };
    let bytes = full.encode_to_vec();
    let truncated =
        plain.post(Bytes::copy_from_slice(&bytes[..bytes.len() - 5]), "application/x-protobuf").await;
    assert_eq!(truncated.unwrap().status, 400);

    let oversize = plain.post(Bytes::from(vec![1u8; 4096]), "application/x-protobuf").await.unwrap();
    assert_eq!(oversize.status, 413);
    assert_eq!(oversize.headers["content-type"], "application/x-protobuf");
    // A small gzip body that inflates beyond the limit is refused the same way.
    let bomb = gz.post(Bytes::from(vec![b'a'; 1 << 20]), "application/x-protobuf").await.unwrap();
    assert_eq!(bomb.status, 413);

    let json = plain.post(Bytes::from_static(b"{}"), "application/json").await.unwrap();
    assert_eq!(json.status, 415);
    assert_eq!(json.headers["content-type"], "application/x-protobuf");
    assert_eq!(server.fleet.known_count(), 0, "nothing was registered from bad input");
    server.stop().await;
}

#[tokio::test]
async fn http_agents_beyond_the_limit_get_503_with_retry_after() {
    let fleet =
        FleetConfig { max_agents: Some(1), retry_after: Duration::from_millis(2500), ..Default::default() };
    let server = TestServer::start(fleet, ServerConfig::default()).await;
    let http = HttpClient::new(&server.http_url(), None, false);
    let mut a = SimAgent::new(AgentSpec::new("a"));
    assert_eq!(http.send(&a.full_state()).await.unwrap().status, 200);
    let refused = http.send(&SimAgent::new(AgentSpec::new("b")).full_state()).await.unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "3");
    let err = refused.message.unwrap().error_response.unwrap();
    assert_eq!(err.r#type, ServerErrorResponseType::Unavailable as i32);
    // The admitted agent keeps polling fine.
    assert_eq!(http.send(&a.heartbeat()).await.unwrap().status, 200);
    server.stop().await;
}

struct TokenAuth;
impl Authenticator for TokenAuth {
    fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<opamp_operator::fleet::Tenant, AuthError> {
        match opamp_operator::protocol::bearer_token(headers) {
            Some("s3cret") => Ok(opamp_operator::fleet::Tenant::new("team-a")),
            Some(_) => Err(AuthError::UnknownToken),
            None => Err(AuthError::MissingToken),
        }
    }
}

#[tokio::test]
async fn unauthenticated_agents_get_401_on_both_transports() {
    let fleet = opamp_operator::fleet::Fleet::default();
    let server = TestServer::start_at(
        "127.0.0.1:0".parse().unwrap(),
        fleet,
        ServerConfig::default(),
        Some(Arc::new(TokenAuth)),
    )
    .await;
    let mut agent = SimAgent::new(AgentSpec::new("a"));
    for token in [None, Some("wrong")] {
        let reply =
            HttpClient::new(&server.http_url(), token, false).send(&agent.full_state()).await.unwrap();
        assert_eq!(reply.status, 401);
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
        let err = WsClient::connect(&server.ws_url(), token).await.err().expect("upgrade refused");
        assert!(err.to_string().contains("401"), "{err}");
    }
    let ok =
        HttpClient::new(&server.http_url(), Some("s3cret"), false).send(&agent.full_state()).await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(server.fleet.agent(&AgentKey::new("team-a", agent.uid())).unwrap().namespace, "team-a");
    server.stop().await;
}

/// Many agents at once on both transports: every one gets its config and reports it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_agents_on_both_transports_all_apply_their_config() {
    let server = TestServer::start_default().await;
    let cfg = remote_config("service: fleet");
    let n = 100;
    let mut tasks = Vec::new();
    for i in 0..n * 2 {
        let (ws_url, http_url) = (server.ws_url(), server.http_url());
        let fleet = server.fleet.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut agent = SimAgent::new(AgentSpec::new(&format!("svc-{i}")));
            if i % 2 == 0 {
                let mut ws = WsClient::connect(&ws_url, None).await.unwrap();
                ws.send(&agent.full_state()).await.unwrap();
                ws.recv().await.unwrap();
                fleet.set_remote_config(&AgentKey::new("default", agent.uid()), Some(cfg));
                let push = ws.recv().await.unwrap();
                ws.send(&agent.on_message(&push).unwrap()).await.unwrap();
                ws.recv().await.unwrap();
                Some(ws) // stays connected until the end of the test
            } else {
                let http = HttpClient::new(&http_url, None, i % 4 == 1);
                http.send(&agent.full_state()).await.unwrap();
                fleet.set_remote_config(&AgentKey::new("default", agent.uid()), Some(cfg));
                let reply = http.send(&agent.heartbeat()).await.unwrap().message.unwrap();
                http.send(&agent.on_message(&reply).unwrap()).await.unwrap();
                None
            }
        }));
    }
    let mut sockets = Vec::new();
    for t in tasks {
        sockets.push(within(T * 3, "agent task", t).await.unwrap());
    }
    let applied = server
        .fleet
        .agents()
        .into_iter()
        .filter(|a| {
            a.report.remote_config_status.as_ref().is_some_and(|s| {
                s.status == RemoteConfigStatuses::Applied as i32
                    && s.last_remote_config_hash == cfg.config_hash
            })
        })
        .count();
    assert_eq!(applied, n * 2);
    assert_eq!(server.fleet.connected_count(), n * 2);
    server.stop().await;
}

#[tokio::test]
async fn http_bodies_up_to_the_configured_limit_are_accepted() {
    // 3 MiB: above common framework defaults (2 MB), within our 4 MiB default (and kept: the
    // bound of reported bytes per agent is raised for this test).
    let fleet = FleetConfig { max_reported_bytes_per_agent: 4 << 20, ..Default::default() };
    let server = TestServer::start(fleet, ServerConfig::default()).await;
    let http = HttpClient::new(&server.http_url(), None, false);
    let mut agent = SimAgent::new(AgentSpec::new("big"));
    let mut msg = agent.full_state();
    let files = &mut msg.effective_config.as_mut().unwrap().config_map.as_mut().unwrap().config_map;
    files.get_mut("agent.yaml").unwrap().body = Bytes::from(vec![b'x'; 3 << 20]);
    let reply = http.send(&msg).await.unwrap();
    assert_eq!(reply.status, 200);
    let stored =
        server.fleet.agent(&AgentKey::new("default", agent.uid())).unwrap().report.effective_config.unwrap();
    assert_eq!(stored.to_proto().config_map.as_ref().unwrap().config_map["agent.yaml"].body.len(), 3 << 20);
    server.stop().await;
}

#[tokio::test]
async fn silent_websocket_is_pinged_then_closed_while_a_listening_one_stays() {
    let ping = Duration::from_millis(200);
    let server = TestServer::start(
        FleetConfig::default(),
        ServerConfig { ws_ping_interval: ping, ..Default::default() },
    )
    .await;
    let (mut live, mut silent) =
        (SimAgent::new(AgentSpec::new("live")), SimAgent::new(AgentSpec::new("silent")));
    let mut live_ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    let mut silent_ws = WsClient::connect(&server.ws_url(), None).await.unwrap();
    live_ws.send(&live.full_state()).await.unwrap();
    silent_ws.send(&silent.full_state()).await.unwrap();
    within(T, "first reply", live_ws.recv()).await.unwrap();
    // The live agent sends nothing more but keeps reading, so it answers the server's pings.
    let reader = tokio::spawn(async move { close_code(&mut live_ws).await });

    // The silent one reads nothing: pinged after one interval, closed after three.
    eventually(T, "the silent agent disconnected", || async {
        server
            .fleet
            .agent(&AgentKey::new("default", silent.uid()))
            .is_some_and(|a| a.transport.is_none())
            .then_some(())
    })
    .await;
    assert_eq!(close_code(&mut silent_ws).await, Some(CloseCode::Away));
    let live_view = server.fleet.agent(&AgentKey::new("default", live.uid())).unwrap();
    assert_eq!(live_view.transport, Some(Transport::WebSocket), "an agent answering pings stays connected");
    assert!(
        live_view.last_seen.elapsed().unwrap() > ping * 3,
        "and it was silent for longer than the close timeout"
    );
    assert!(!reader.is_finished());
    reader.abort();
}

// --- Deadlines and the connection limit (hostile peers) ---------------------------------------
//
// Each attack is reproduced with short deadlines; tests wait on the condition they assert (the
// server closing the socket) with a bound of the deadline plus SLACK, never on a fixed sleep.

/// Scheduling slack on top of a deadline (the tests also run under CPU load).
const SLACK: Duration = Duration::from_secs(5);
/// The server keeps deadlines in whole milliseconds. Lower bounds are measured from an instant
/// before the server's deadline started (before the connect, the request), so they hold under load.
const ROUNDING: Duration = Duration::from_millis(10);

/// A server with its own metrics, to read the connection counters.
struct Endpoint {
    addr: std::net::SocketAddr,
    fleet: opamp_operator::fleet::Fleet,
    metrics: Arc<ServerMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Endpoint {
    async fn start(config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fleet, metrics) = (opamp_operator::fleet::Fleet::default(), Arc::new(ServerMetrics::default()));
        let server = OpampServer::new(fleet.clone(), config).with_metrics(metrics.clone());
        let shutdown = server.shutdown_token();
        let task = tokio::spawn(server.serve(listener));
        Self { addr, fleet, metrics, shutdown, task }
    }

    fn timeouts(&self, kind: &'static str) -> u64 {
        self.metrics.connection_timeouts.get_or_create(&KindLabel { kind }).get()
    }

    fn open(&self) -> i64 {
        self.metrics.connections_open.get()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within(T, "server stops", self.task).await.unwrap().unwrap();
    }
}

/// Reads (and drops) whatever the server sends until it closes the connection (EOF or reset).
async fn closed_by_server(tcp: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    while let Ok(1..) = tcp.read(&mut buf).await {}
}

/// One `POST /v1/opamp` on a kept-alive connection: the reply's status, its body read whole.
async fn raw_post(tcp: &mut (impl AsyncRead + AsyncWrite + Unpin), body: &[u8]) -> std::io::Result<u16> {
    let head = format!(
        "POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body).await?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 1024];
        match tcp.read(&mut chunk).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
    let mut rest = buf.len() - end;
    while rest < length {
        let mut chunk = vec![0u8; length - rest];
        match tcp.read(&mut chunk).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => rest += n,
        }
    }
    Ok(status)
}

fn heartbeat_body() -> Vec<u8> {
    SimAgent::new(AgentSpec::new("raw")).full_state().encode_to_vec()
}

#[tokio::test]
async fn idle_connections_are_closed_at_the_header_deadline() {
    let header = Duration::from_millis(500);
    let server = Endpoint::start(ServerConfig { header_read_timeout: header, ..Default::default() }).await;
    let mut idle = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let connecting = Instant::now();
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        idle.spawn(async move {
            within(header + SLACK, "an idle connection closed by the server", closed_by_server(&mut tcp))
                .await;
            connecting.elapsed()
        });
    }
    while let Some(lived) = idle.join_next().await {
        let lived = lived.unwrap();
        assert!(lived >= header - ROUNDING, "closed after {lived:?}, before the deadline");
    }
    eventually(T, "200 header timeouts counted, nothing open", || async {
        (server.timeouts("header") == 200 && server.open() == 0).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn partial_headers_are_closed_at_the_header_deadline_however_slowly_they_trickle() {
    let header = Duration::from_millis(500);
    let server = Endpoint::start(ServerConfig { header_read_timeout: header, ..Default::default() }).await;
    let connecting = Instant::now();
    let (mut read, mut write) = TcpStream::connect(server.addr).await.unwrap().into_split();
    write.write_all(b"POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\nX-Slow: ").await.unwrap();
    // Slowloris: one more header byte every 50 ms, until the server closes.
    let trickle = tokio::spawn(async move {
        while write.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    within(header + SLACK, "partial headers closed by the server", closed_by_server(&mut read)).await;
    assert!(connecting.elapsed() >= header - ROUNDING);
    within(T, "the trickle's writes fail", trickle).await.unwrap();
    eventually(T, "a header timeout counted", || async { (server.timeouts("header") == 1).then_some(()) })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_closed_at_the_body_deadline() {
    let (header, body) = (Duration::from_millis(300), Duration::from_millis(1500));
    let config = ServerConfig { header_read_timeout: header, body_read_timeout: body, ..Default::default() };
    let server = Endpoint::start(config).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    // 4 MiB announced, 1 MiB sent, then nothing.
    let head = "POST /v1/opamp HTTP/1.1\r\nHost: opamp\r\nContent-Type: application/x-protobuf\r\n\
                Content-Length: 4194304\r\n\r\n";
    let sending = Instant::now();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    within(body + SLACK, "a stalled body closed by the server", closed_by_server(&mut tcp)).await;
    assert!(sending.elapsed() >= body - ROUNDING, "the body deadline, not the header one");
    eventually(T, "a body timeout counted, nothing open", || async {
        (server.timeouts("body") == 1 && server.open() == 0).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_deadline() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_millis(1500));
    let config = ServerConfig { header_read_timeout: header, idle_timeout: idle, ..Default::default() };
    let server = Endpoint::start(config).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let posting = Instant::now();
    assert_eq!(raw_post(&mut tcp, &heartbeat_body()).await.unwrap(), 200);
    within(idle + SLACK, "an idle kept-alive connection closed", closed_by_server(&mut tcp)).await;
    assert!(posting.elapsed() >= idle - ROUNDING, "the idle deadline, not the header one");
    eventually(T, "an idle timeout counted", || async { (server.timeouts("idle") == 1).then_some(()) }).await;
    server.stop().await;
}

/// An HTTP agent polling over one kept-alive connection: the pause between two polls is longer
/// than the header deadline but shorter than the idle one, and no poll is cut off.
#[tokio::test]
async fn an_http_agent_polling_every_second_keeps_its_connection() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_secs(4));
    let config = ServerConfig { header_read_timeout: header, idle_timeout: idle, ..Default::default() };
    let server = Endpoint::start(config).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut agent = SimAgent::new(AgentSpec::new("poller"));
    assert_eq!(raw_post(&mut tcp, &agent.full_state().encode_to_vec()).await.unwrap(), 200);
    for poll in 1..=4 {
        tokio::time::sleep(Duration::from_secs(1)).await; // the agent's poll interval
        let status = within(
            T,
            "a poll on the same connection",
            raw_post(&mut tcp, &agent.heartbeat().encode_to_vec()),
        )
        .await
        .unwrap_or_else(|e| panic!("poll {poll} failed on the kept-alive connection: {e}"));
        assert_eq!(status, 200);
    }
    assert_eq!(server.timeouts("header") + server.timeouts("idle"), 0);
    assert!(server.fleet.agent(&AgentKey::new("default", agent.uid())).is_some_and(|a| a.connected));
    server.stop().await;
}

/// Why the server keeps its own deadlines: hyper's `header_read_timeout` runs from the end of a
/// response to the end of the next request's head, so it also closes a kept-alive connection
/// that is merely idle between two requests; a 10 s header deadline would cut agents polling
/// every 30 s.
#[tokio::test]
async fn hyper_header_read_timeout_also_closes_idle_keep_alive_connections() {
    let header = Duration::from_millis(300);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header);
        let service = hyper::service::service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("ok")))
        });
        let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    assert_eq!(raw_post(&mut tcp, b"").await.unwrap(), 200);
    let replied = Instant::now();
    within(header + SLACK, "hyper closes the idle connection", closed_by_server(&mut tcp)).await;
    let idle = replied.elapsed();
    assert!(idle < header + SLACK, "idle for {idle:?}: bounded by the header read timeout");
}

#[tokio::test]
async fn a_websocket_that_never_sends_an_agent_to_server_is_closed() {
    let first = Duration::from_secs(1);
    let config = ServerConfig {
        ws_first_message_timeout: first,
        ws_ping_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let server = Endpoint::start(config).await;
    // It reads, so it answers every ping: only the first-message deadline closes it.
    let connecting = Instant::now();
    let mut ws = WsClient::connect(&format!("ws://{}/v1/opamp", server.addr), None).await.unwrap();
    let code = within(first + SLACK, "closed without a first message", async {
        loop {
            match ws.next_event().await {
                Ok(WsEvent::Closed(frame)) => return frame.map(|f| f.code),
                Ok(WsEvent::Message(_)) => continue,
                Err(_) => return None,
            }
        }
    })
    .await;
    assert_eq!(code, Some(CloseCode::Policy));
    assert!(connecting.elapsed() >= first - ROUNDING);
    eventually(T, "counted", || async {
        (server.timeouts("websocket_first_message") == 1 && server.open() == 0).then_some(())
    })
    .await;
    server.stop().await;
}

/// A masked binary frame, as a client sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x82];
    match payload.len() {
        n @ 0..126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn a_websocket_peer_that_never_answers_pings_is_closed() {
    deaf_after_heartbeats(0).await;
}

/// Heartbeats more often than the ping interval move the ping's deadline many times before the
/// agent goes deaf: it is still pinged, and closed.
#[tokio::test]
async fn a_websocket_peer_that_stops_after_heartbeats_and_never_answers_pings_is_closed() {
    deaf_after_heartbeats(12).await;
}

/// One AgentToServer, `heartbeats` more a quarter of the ping interval apart, then nothing read
/// or written: the server's pings go unanswered and it closes the connection.
async fn deaf_after_heartbeats(heartbeats: usize) {
    let ping = Duration::from_millis(200);
    let server = Endpoint::start(ServerConfig { ws_ping_interval: ping, ..Default::default() }).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"GET /v1/opamp HTTP/1.1\r\nHost: opamp\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        within(T, "the upgrade", tcp.read_exact(&mut byte)).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    // One AgentToServer, then it neither reads nor writes: the server's pings go unanswered.
    let mut agent = SimAgent::new(AgentSpec::new("deaf"));
    let mut payload = vec![0u8];
    payload.extend(agent.full_state().encode_to_vec());
    tcp.write_all(&client_frame(&payload)).await.unwrap();
    eventually(T, "the agent connected", || async {
        server.fleet.agent(&AgentKey::new("default", agent.uid())).filter(|a| a.connected).map(|_| ())
    })
    .await;
    for _ in 0..heartbeats {
        tokio::time::sleep(ping / 4).await;
        let mut payload = vec![0u8];
        payload.extend(agent.heartbeat().encode_to_vec());
        tcp.write_all(&client_frame(&payload)).await.unwrap();
    }
    eventually(ping * 3 + SLACK, "the deaf agent disconnected", || async {
        server.fleet.agent(&AgentKey::new("default", agent.uid())).filter(|a| !a.connected).map(|_| ())
    })
    .await;
    within(T, "its socket closed", closed_by_server(&mut tcp)).await;
    eventually(T, "counted", || async { (server.timeouts("websocket_silent") == 1).then_some(()) }).await;
    server.stop().await;
}

/// With the connection limit taken by idle attackers, a real agent waits in the backlog (the
/// server does not accept beyond the limit) and gets in once the attackers' header deadline
/// evicts them.
#[tokio::test]
async fn at_the_connection_limit_an_agent_gets_in_once_idle_attackers_are_evicted() {
    let (max, header) = (20, Duration::from_secs(1));
    let config =
        ServerConfig { max_connections: Some(max), header_read_timeout: header, ..Default::default() };
    let server = Endpoint::start(config).await;
    let mut attackers = Vec::new();
    for _ in 0..max {
        attackers.push(TcpStream::connect(server.addr).await.unwrap());
    }
    eventually(T, "the attackers hold every connection", || async {
        (server.open() == max as i64).then_some(())
    })
    .await;
    let highest = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watch = {
        let (metrics, highest) = (server.metrics.clone(), highest.clone());
        tokio::spawn(async move {
            loop {
                highest.fetch_max(metrics.connections_open.get(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let agent = HttpClient::new(&format!("http://{}/v1/opamp", server.addr), None, false);
    let mut sim = SimAgent::new(AgentSpec::new("real"));
    let reply = within(header + SLACK, "the agent's reply", agent.send(&sim.full_state())).await.unwrap();
    assert_eq!(reply.status, 200);
    for mut tcp in attackers {
        within(header + SLACK, "an attacker evicted", closed_by_server(&mut tcp)).await;
    }
    watch.abort();
    assert!(highest.load(std::sync::atomic::Ordering::Relaxed) <= max as i64, "never above the limit");
    assert!(server.metrics.connection_accepts_paused.get() >= 1);
    eventually(T, "the attackers' header timeouts counted", || async {
        (server.timeouts("header") == max as u64).then_some(())
    })
    .await;
    server.stop().await;
}
