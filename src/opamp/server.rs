//! Serves `/v1/opamp`: a `GET` with an upgrade becomes a WebSocket, a `POST` is the plain-HTTP
//! transport. With other replicas ([`OpampServer::with_peers`]), the route their forwarded HTTP
//! polls arrive on ([`OpampServer::peer_router`]) is served on the peer address, and a task
//! marks offline the HTTP agents another replica owns after each membership change (`http.rs`).
//!
//! Connections are accepted by our own loop and served by hyper (HTTP/1.1, with upgrades), so
//! that each one is under a deadline in every phase and their number is capped:
//!
//! | phase | deadline | closes |
//! | --- | --- | --- |
//! | TLS handshake | [`ServerConfig::tls_handshake_timeout`] from the accept | a peer that never finishes its ClientHello |
//! | request head | [`ServerConfig::header_read_timeout`] from the accept, or from the first byte of the next request on a kept-alive connection | idle sockets, partial headers |
//! | request body | [`ServerConfig::body_read_timeout`] from the head | stalled bodies (their buffered bytes are dropped with the request) |
//! | response | [`ServerConfig::write_timeout`] until it is flushed | peers that do not read |
//! | between requests | [`ServerConfig::idle_timeout`] | idle kept-alive connections |
//! | WebSocket | [`ServerConfig::ws_first_message_timeout`], then pings (`ws.rs`) | upgraded peers that never speak OpAMP, dead peers |
//!
//! hyper's own `header_read_timeout` cannot do this: its timer runs from the end of one response
//! to the end of the next request's head, so it also bounds the idle time between two requests
//! (tests/transport.rs `hyper_header_read_timeout_also_closes_idle_keep_alive_connections`) and a
//! 10 s header deadline would cut HTTP agents polling every 30 s. Instead each connection has one
//! timer in its task (as hyper's would be) and one word holding its phase and deadline, moved on by
//! its socket (first byte of a request, response flushed) and its service (head received,
//! response ready). The timer is re-armed only when a deadline moves earlier (the first byte of a
//! request after an idle time) or when it fires before a deadline that moved later: at most about
//! twice per request, as hyper's own timer would be, and no task or timer per request.
//!
//! At [`ServerConfig::max_connections`] open connections the event loops stop accepting until one
//! closes: waiting connections queue in the kernel's backlog instead of the process running out of
//! file descriptors (EMFILE), which would also fail its Kubernetes watches and callbacks.
//!
//! New agent sessions are paced at [`ServerConfig::max_connects_per_second`] (`pace.rs`): a
//! WebSocket upgrade or a plain-HTTP poll of an agent not live here beyond the rate is refused
//! with 503, a `Retry-After` and an `UNAVAILABLE` error with `RetryInfo`, so a fleet
//! reconnecting at once comes back spread over time.
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{AdmitAll, Authenticator};
use super::forward::{Forwarding, PEER_OPAMP_PATH};
use super::metrics::{KindLabel, ServerMetrics};
use super::pace::Pacer;
use super::tls::{TlsConfig, TlsError, TlsFiles};
use crate::fleet::{Fleet, Tenant, Wakeup};
use crate::peers::Peers;

pub const OPAMP_PATH: &str = "/v1/opamp";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted message (WebSocket message or HTTP body, after gunzip).
    pub max_message_bytes: usize,
    /// A WebSocket silent for this long is pinged; silent for three times this long, closed.
    pub ws_ping_interval: Duration,
    /// A write that cannot complete in this time closes the connection (an HTTP response not
    /// flushed this long after it was ready, too).
    pub write_timeout: Duration,
    /// Threads serving the endpoint, each an event loop of its own (`--opamp-threads`; default:
    /// half the CPUs, at least one).
    pub event_loops: usize,
    /// A TLS handshake not finished this long after the accept closes the connection
    /// (`--tls-handshake-timeout-seconds`, default 10 s).
    pub tls_handshake_timeout: Duration,
    /// A request head (request line and headers) not received whole this long after the
    /// connection was accepted (or its TLS handshake finished), or after the first byte of a
    /// later request on a kept-alive connection, closes the connection
    /// (`--header-read-timeout-seconds`, default 10 s). Agents send their request at once.
    pub header_read_timeout: Duration,
    /// A request body not received whole this long after its head closes the connection and
    /// drops the bytes buffered so far (`--body-read-timeout-seconds`, default 30 s: 4 MiB, the
    /// default message limit, at about 140 KiB/s).
    pub body_read_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed (`--idle-timeout-seconds`,
    /// default 90 s). It must exceed the agents' poll interval (30 s by default): Go's HTTP client
    /// does not retry a POST it already wrote when the server's close arrives, so a connection
    /// closed between two polls would fail the next one.
    pub idle_timeout: Duration,
    /// A WebSocket whose first AgentToServer has not arrived this long after the upgrade is
    /// closed with 1008 (`--ws-first-message-timeout-seconds`, default 30 s). Answering pings
    /// does not count: only an agent's message does.
    pub ws_first_message_timeout: Duration,
    /// Connections open at once, both transports and TLS handshakes included
    /// (`--max-connections`). At the limit the endpoint stops accepting until one closes. `None`:
    /// derived from the soft open-file limit when serving starts
    /// ([`connections_for_open_file_limit`]).
    pub max_connections: Option<usize>,
    /// Plain-HTTP polls forwarded to their agent's owner at once, at most (with peers, see
    /// `http.rs`); each holds a connection to the owner's peer address. A poll that finds no
    /// free slot within a second is refused with 503 and a Retry-After.
    pub max_forwards: usize,
    /// New agent sessions let in per second (`--max-connects-per-second`; a burst of one
    /// second's worth; 0: no pacing): WebSocket upgrades, and plain-HTTP polls of agents not
    /// live here. Beyond it they are refused with 503, `Retry-After` and an `UNAVAILABLE`
    /// error with `RetryInfo` (see `pace.rs`).
    pub max_connects_per_second: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            ws_ping_interval: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            event_loops: default_event_loops(),
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            ws_first_message_timeout: Duration::from_secs(30),
            max_connections: None,
            max_forwards: super::forward::MAX_FORWARDS_DEFAULT,
            max_connects_per_second: super::pace::MAX_CONNECTS_PER_SECOND_DEFAULT,
        }
    }
}

impl ServerConfig {
    /// [`Self::max_connections`], or the default for the process's soft open-file limit now.
    pub fn connection_limit(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| {
                let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
                connections_for_open_file_limit(soft)
            })
            .clamp(1, Semaphore::MAX_PERMITS)
    }
}

/// The connections that fit in a soft open-file limit of `soft`: each is one file descriptor,
/// and the rest of the process needs a reserve of its own (the Kubernetes API connections and
/// watches, callback connections, the API and metrics endpoints' connections, certificate
/// files, each event loop's epoll and eventfd): a tenth of the limit, at least 256 (half of a
/// limit under 512). At the common limits: 1,024 → 768, 65,536 → 58,983, 1,048,576 → 943,719.
pub fn connections_for_open_file_limit(soft: u64) -> usize {
    let reserve = (soft / 10).max(256.min(soft / 2));
    usize::try_from(soft - reserve).unwrap_or(usize::MAX)
}

/// Half the CPUs, at least one. Each event loop parks and is woken on its own, so a second
/// loop costs wake-ups (at 5,000 heartbeats/s on 2 CPUs: 23 instead of 17 µs of CPU per
/// message, `tests/bench/probe`), while one loop handles tens of thousands of messages per
/// second; the other half is left to the kernel's network stack and the controller.
fn default_event_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

pub(super) struct State {
    pub(super) fleet: Fleet,
    pub(super) metrics: Arc<ServerMetrics>,
    pub(super) auth: Arc<dyn Authenticator>,
    pub(super) config: ServerConfig,
    pub(super) shutdown: CancellationToken,
    /// The WebSocket connections: upgraded connections are tasks of their own that the HTTP
    /// connections' tasks do not cover, so the event loops wait for these too.
    pub(super) websockets: TaskTracker,
    /// With other replicas: routing HTTP polls to their agent's owner (`http.rs`).
    pub(super) forwarding: Option<Forwarding>,
    /// New sessions per second, when paced (`pace.rs`).
    pub(super) pacer: Option<Pacer>,
    /// Each open WebSocket connection's wakeup, by connection: raised when the server shuts down.
    wakeups: parking_lot::Mutex<HashMap<u64, Arc<Wakeup>>>,
}

impl State {
    /// Has `wakeup` raised with [`Wakeup::SHUTDOWN`] when the server shuts down (at once if it
    /// already is), until the returned guard is dropped.
    pub(super) fn close_on_shutdown(&self, conn: u64, wakeup: &Arc<Wakeup>) -> Unregister<'_> {
        self.wakeups.lock().insert(conn, wakeup.clone());
        // After the insert: a shutdown either sees this entry or is seen here.
        if self.shutdown.is_cancelled() {
            wakeup.raise(Wakeup::SHUTDOWN);
        }
        Unregister { state: self, conn }
    }

    /// Closes every WebSocket connection (each task writes its Close frame and ends).
    async fn close_websockets_on_shutdown(self: Arc<Self>) {
        self.shutdown.cancelled().await;
        for wakeup in self.wakeups.lock().values() {
            wakeup.raise(Wakeup::SHUTDOWN);
        }
    }
}

/// Takes a connection's wakeup out of the server's list when dropped.
pub(super) struct Unregister<'a> {
    state: &'a State,
    conn: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.state.wakeups.lock().remove(&self.conn);
    }
}

/// The OpAMP endpoint over a fleet.
#[derive(Clone)]
pub struct OpampServer {
    state: Arc<State>,
}

impl OpampServer {
    /// A server admitting every agent into the `default` namespace (see [`Self::with_auth`]).
    pub fn new(fleet: Fleet, config: ServerConfig) -> Self {
        Self::with_auth(fleet, config, Arc::new(AdmitAll(Tenant::new("default"))))
    }

    pub fn with_auth(fleet: Fleet, config: ServerConfig, auth: Arc<dyn Authenticator>) -> Self {
        let metrics = Arc::default();
        let (shutdown, websockets) = (CancellationToken::new(), TaskTracker::new());
        let forwarding = None;
        let pacer = Pacer::new(config.max_connects_per_second, std::time::Instant::now());
        let wakeups = Default::default();
        let state = State { fleet, metrics, auth, config, shutdown, websockets, forwarding, pacer, wakeups };
        Self { state: Arc::new(state) }
    }

    /// Acts as one endpoint with the other replicas: plain-HTTP polls for an agent another
    /// replica owns are forwarded to it (see `http.rs`), and at each membership change the HTTP
    /// agents others own now are marked offline here. Serve [`Self::peer_router`] on the peer
    /// address. Call on the runtime peer calls should run on.
    pub fn with_peers(mut self, peers: Peers) -> Self {
        let state = Arc::get_mut(&mut self.state).expect("set before the server is cloned or served");
        state.forwarding = Some(Forwarding::new(peers, state.config.max_forwards));
        self
    }

    /// The peer routes (`/opamp`: polls other replicas forward), to be nested under
    /// [`crate::peers::PREFIX`] behind the peer authentication.
    pub fn peer_router(&self) -> Router {
        Router::new()
            .route(PEER_OPAMP_PATH, post(super::http::forwarded))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(self.state.clone())
    }

    /// Counts into these metrics (each server has its own otherwise).
    pub fn with_metrics(mut self, metrics: Arc<ServerMetrics>) -> Self {
        Arc::get_mut(&mut self.state).expect("set before the server is cloned or served").metrics = metrics;
        self
    }

    pub fn fleet(&self) -> &Fleet {
        &self.state.fleet
    }

    /// Cancelled when the server shuts down; WebSockets then close with 1001 (going away).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// The routes, to be merged into a larger router or served alone.
    pub fn router(&self) -> Router {
        Router::new()
            .route(OPAMP_PATH, get(super::ws::upgrade).post(super::http::post))
            // max_message_bytes is enforced by hand (axum's default would cap bodies at 2 MB)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(self.state.clone())
    }

    /// Serves until the shutdown token is cancelled, then closes every connection: idle ones at
    /// once, the others after the request in flight (each within its deadline), WebSockets
    /// with 1001.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        self.on_event_loops(listener.into_std()?, None).await
    }

    /// Serves over TLS (wss:// and https://), reloading the certificate when its files change.
    pub async fn serve_tls(self, listener: TcpListener, tls: TlsFiles) -> Result<(), TlsError> {
        let config = tls.load().await?;
        let shutdown = self.state.shutdown.clone();
        let watcher = tokio::spawn(tls.clone().watch(config.clone(), Duration::from_secs(2), shutdown));
        let listener = listener.into_std().map_err(|e| tls.error(e))?;
        let result = self.on_event_loops(listener, Some(config)).await;
        watcher.abort();
        result.map_err(|e| tls.error(e))
    }

    /// Runs an accept loop on [`ServerConfig::event_loops`] threads, each a single-threaded
    /// runtime accepting from its own handle of the listener, and the fleet's sweeper meanwhile.
    /// A connection then lives on one thread, and handling a message wakes no other: on a
    /// multi-threaded runtime the wake-ups of idle workers cost more CPU than the message itself.
    /// The loops share one connection limit.
    async fn on_event_loops(
        &self,
        listener: std::net::TcpListener,
        tls: Option<TlsConfig>,
    ) -> io::Result<()> {
        // Dropping this future (the server's task aborted, its runtime shut down) stops the loops.
        let abort = CancellationToken::new();
        let _abort_on_drop = abort.clone().drop_guard();
        let sweeper = tokio::spawn(self.state.fleet.clone().run_sweeper(abort.clone()));
        let closer = tokio::spawn(self.state.clone().close_websockets_on_shutdown());
        let releaser = self.state.forwarding.as_ref().map(|f| {
            let (fleet, metrics) = (self.state.fleet.clone(), self.state.metrics.clone());
            tokio::spawn(super::forward::release_on_changes(fleet, f.peers.clone(), metrics, abort.clone()))
        });
        let connections = Arc::new(Connections::new(&self.state));
        let router = self.router();
        let mut loops = Vec::new();
        for i in 0..self.state.config.event_loops.max(1) {
            let (listener, abort, tls) = (listener.try_clone()?, abort.clone(), tls.clone());
            let (state, connections, router) = (self.state.clone(), connections.clone(), router.clone());
            let (done, finished) = tokio::sync::oneshot::channel();
            std::thread::Builder::new().name(format!("opamp-{i}")).spawn(move || {
                let served =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
                        rt.block_on(async move {
                            let websockets = state.websockets.clone();
                            tokio::select! {
                                served = async {
                                    let served = accept_loop(state, router, connections, listener, tls).await;
                                    // Each WebSocket closes with 1001 (bounded by the write timeout)
                                    // before the runtime, and its tasks with it, goes away.
                                    websockets.close();
                                    websockets.wait().await;
                                    served
                                } => served,
                                _ = abort.cancelled() => Ok(()),
                            }
                        })
                    });
                let _ = done.send(served);
            })?;
            loops.push(finished);
        }
        drop(listener);
        let mut result = Ok(());
        for finished in loops {
            let served =
                finished.await.unwrap_or_else(|_| Err(std::io::Error::other("an OpAMP event loop panicked")));
            result = result.and(served);
        }
        sweeper.abort();
        closer.abort();
        if let Some(releaser) = releaser {
            releaser.abort();
        }
        result
    }
}

/// One event loop's accepting: a free connection slot first, then a connection, each served by
/// a task of its own; on shutdown, waits for those tasks (bounded by their deadlines).
async fn accept_loop(
    state: Arc<State>,
    router: Router,
    connections: Arc<Connections>,
    listener: std::net::TcpListener,
    tls: Option<TlsConfig>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let tasks = TaskTracker::new();
    let mut stop = pin!(state.shutdown.cancelled());
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut stop => break,
            slot = connections.acquire() => slot,
        };
        let tcp = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => send_at_once(tcp),
                Err(e) => {
                    drop(slot);
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let tls = tls.as_ref().map(TlsConfig::acceptor);
        let conn = Conn::new(slot, if tls.is_some() { Phase::Handshake } else { Phase::Head });
        tasks.spawn(connection(state.clone(), router.clone(), conn, tcp, tls));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The backlog the OpAMP listener asks of the kernel: Linux takes the smaller of this and
/// `net.core.somaxconn` (4,096 by default), as for Go's listeners, opamp-go's among them.
/// tokio's `TcpListener::bind` asks for 1,024: a fleet reconnecting at once after a restart
/// overflowed that queue while the event loop was busy with the first handshakes, the kernel
/// dropped the overflow's handshakes, and those agents came back only when their SYN was
/// retransmitted a second later (`make bench`'s storm: all 5,000 back in 1.6 s, opamp-go 0.7 s).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A listener for the OpAMP endpoint on `addr`, with [`LISTEN_BACKLOG`] and, as tokio's `bind`,
/// `SO_REUSEADDR` (a restarted replica binds again at once over its old connections' TIME_WAIT).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// As hyper and axum do: a connection that failed before it was accepted is skipped; anything
/// else (e.g. EMFILE when something else used up the reserve) is logged and retried after a
/// second, when files may have been closed.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept OpAMP connections");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An accepted socket, set to send each write at once. With Nagle's algorithm a write that
/// follows another before the peer acknowledged it waits for that ACK, which the peer delays by
/// up to 40 ms: over TLS 1.3 the session tickets go out right after the handshake, and the
/// upgrade's reply then waited for their ACK (wss first replies took 43 ms at the median). Go's
/// servers, opamp-go's among them, set the same on every connection.
fn send_at_once(tcp: TcpStream) -> TcpStream {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    tcp
}

/// One connection, from the accept to its close: TLS handshake, then HTTP/1.1 until it closes,
/// upgrades or misses a deadline.
async fn connection(
    state: Arc<State>,
    router: Router,
    conn: Arc<Conn>,
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // The connection's one timer, for every phase.
    let (first, deadline) = conn.get();
    let mut timer = pin!(sleep_until(deadline));
    // The first byte before anything else: hyper allocates 16 KiB of buffers for a connection (and
    // rustls its state), so an idle socket would hold them until its deadline (2,000 idle
    // connections: 38 instead of 20 MiB RSS, 44 instead of 11 MiB of heap); waiting, it costs
    // its task (5 KiB), as it did under axum::serve.
    let mut first_byte = [0u8];
    tokio::select! {
        biased;
        _ = state.shutdown.cancelled() => return,
        _ = &mut timer => return conn.timed_out(first),
        // Not `readable()`: a new socket starts out as ready, and only a read clears that.
        peeked = tcp.peek(&mut first_byte) => if !matches!(peeked, Ok(1..)) { return },
    }
    let io = ConnIo { io: tcp, conn: conn.clone() };
    let Some(acceptor) = tls else {
        return serve_http(&state, router, conn, io, timer.as_mut()).await;
    };
    let handshake = tokio::select! {
        biased;
        _ = state.shutdown.cancelled() => return,
        _ = &mut timer => return conn.timed_out(Phase::Handshake),
        handshake = acceptor.accept(io) => handshake,
    };
    match handshake {
        Ok(io) => {
            conn.enter(Phase::Head);
            serve_http(&state, router, conn, io, timer.as_mut()).await
        }
        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
    }
}

async fn serve_http<I>(state: &State, router: Router, conn: Arc<Conn>, io: I, mut timer: Pin<&mut Sleep>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            conn.enter(Phase::Body);
            // Router is always ready (its poll_ready returns Ready); a clone is one Arc.
            let response = tower_service::Service::call(&mut router.clone(), req);
            let conn = conn.clone();
            async move {
                let Ok(response) = response.await;
                let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                conn.enter(if upgraded { Phase::Upgraded } else { Phase::Respond });
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our deadlines instead (module docs); without a timer hyper would not run it anyway.
    builder.header_read_timeout(None);
    let mut http = pin!(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
    let mut shutdown = pin!(state.shutdown.cancelled());
    let mut draining = false;
    let expired = poll_fn(|cx| {
        if !draining && shutdown.as_mut().poll(cx).is_ready() {
            // Idle and fresh connections close at once, others after the request in flight.
            draining = true;
            http.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(served) = http.as_mut().poll(cx) {
            if let Err(e) = served {
                tracing::debug!(error = %e, "HTTP connection failed");
            }
            return Poll::Ready(None);
        }
        conn.poll_deadline(timer.as_mut(), cx).map(Some)
    })
    .await;
    // Dropping the connection closes the socket and drops the request in flight, with the
    // body it buffered.
    if let Some(phase) = expired {
        conn.timed_out(phase);
    }
}

/// What a connection is waiting for; each phase has its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake = 0,
    Head = 1,
    Body = 2,
    Respond = 3,
    Idle = 4,
    /// A WebSocket now: `ws.rs` has its own deadlines.
    Upgraded = 5,
}

impl Phase {
    fn from_bits(bits: u64) -> Self {
        match bits & 7 {
            0 => Self::Handshake,
            1 => Self::Head,
            2 => Self::Body,
            3 => Self::Respond,
            4 => Self::Idle,
            _ => Self::Upgraded,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "tls_handshake",
            Self::Head => "header",
            Self::Body => "body",
            Self::Respond => "write",
            Self::Idle => "idle",
            Self::Upgraded => "upgraded",
        }
    }
}

/// Deadlines are stored as milliseconds since this instant.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The endpoint's connections, shared by its event loops: the limit, and the deadlines.
struct Connections {
    slots: Semaphore,
    max: usize,
    deadlines: [Duration; 5],
    metrics: Arc<ServerMetrics>,
    /// Accepting paused at the limit is logged once a minute at most.
    paused_warning: Throttle,
}

impl Connections {
    fn new(state: &State) -> Self {
        let c = &state.config;
        let max = c.connection_limit();
        tracing::info!(max_connections = max, "OpAMP connection limit");
        Self {
            slots: Semaphore::new(max),
            max,
            deadlines: [
                c.tls_handshake_timeout,
                c.header_read_timeout,
                c.body_read_timeout,
                c.write_timeout,
                c.idle_timeout,
            ],
            metrics: state.metrics.clone(),
            paused_warning: Throttle::new(Duration::from_secs(60)),
        }
    }

    fn deadline(&self, phase: Phase) -> Option<Duration> {
        self.deadlines.get(phase as usize).copied()
    }

    /// A slot for one more connection, waiting (and counting the wait) at the limit.
    async fn acquire(self: &Arc<Self>) -> Slot {
        match self.slots.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.metrics.connection_accepts_paused.inc();
                if self.paused_warning.due() {
                    tracing::warn!(
                        max_connections = self.max,
                        "OpAMP connection limit reached: accepting again as connections close"
                    );
                }
                self.slots.acquire().await.expect("the semaphore is never closed").forget();
            }
        }
        Slot(self.clone())
    }
}

/// A place under the limit, taken before a connection is accepted and given back when it
/// closes.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.add_permits(1);
    }
}

/// Says yes at most once per period: for warnings that would otherwise repeat at every request.
pub(super) struct Throttle {
    every_ms: u64,
    /// When it last said yes (ms since [`EPOCH`]; 0: never).
    last: AtomicU64,
}

impl Throttle {
    pub(super) fn new(every: Duration) -> Self {
        Self { every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX), last: AtomicU64::new(0) }
    }

    /// Whether the period has passed since it last said yes (always the first time).
    pub(super) fn due(&self) -> bool {
        let now = millis(Instant::now()).max(1);
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.every_ms)
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

fn millis(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX >> 3)
}

/// One connection's phase and deadline, shared by its socket (also once it is a WebSocket, to
/// keep its slot), its HTTP service and its task.
struct Conn {
    slot: Slot,
    /// The phase (low 3 bits) and its deadline (ms since [`EPOCH`], the rest), in one word.
    at: AtomicU64,
}

impl Conn {
    fn new(slot: Slot, first: Phase) -> Arc<Self> {
        slot.0.metrics.connections_open.inc();
        let conn = Arc::new(Self { slot, at: AtomicU64::new(0) });
        conn.enter(first);
        conn
    }

    fn get(&self) -> (Phase, Instant) {
        let word = self.at.load(Ordering::Relaxed);
        (Phase::from_bits(word), *EPOCH + Duration::from_millis(word >> 3))
    }

    fn enter(&self, phase: Phase) {
        let deadline = match self.slot.0.deadline(phase) {
            Some(d) => millis(Instant::now() + d),
            None => u64::MAX >> 3,
        };
        self.at.store(deadline << 3 | phase as u64, Ordering::Relaxed);
    }

    /// The first bytes of a request after an idle time start its header deadline.
    fn on_read(&self) {
        if Phase::from_bits(self.at.load(Ordering::Relaxed)) == Phase::Idle {
            self.enter(Phase::Head);
        }
    }

    /// A response flushed whole: the connection is idle until the next request.
    fn on_flushed(&self) {
        if Phase::from_bits(self.at.load(Ordering::Relaxed)) == Phase::Respond {
            self.enter(Phase::Idle);
        }
    }

    /// Ready with the phase whose deadline passed. The timer is re-armed only when the deadline
    /// moved earlier than it, or when it fires before a deadline that moved later.
    fn poll_deadline(&self, mut timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<Phase> {
        loop {
            let (phase, deadline) = self.get();
            if phase == Phase::Upgraded {
                return Poll::Pending;
            }
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= deadline {
                return Poll::Ready(phase);
            }
            timer.as_mut().reset(deadline);
        }
    }

    fn timed_out(&self, phase: Phase) {
        tracing::debug!(phase = phase.label(), "connection closed at its deadline");
        self.slot.0.metrics.connection_timeouts.get_or_create(&KindLabel { kind: phase.label() }).inc();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.slot.0.metrics.connections_open.dec();
    }
}

/// A connection's socket: tells its [`Conn`] when a request starts and a response went out.
pub(super) struct ConnIo<S> {
    io: S,
    conn: Arc<Conn>,
}

/// The connections hyper serves, as an upgrade hands them back (`ws.rs` takes its WebSocket
/// from them without hyper's layers in between).
pub(super) type PlainIo = ConnIo<TcpStream>;
pub(super) type TlsIo = tokio_rustls::server::TlsStream<ConnIo<TcpStream>>;

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.on_read();
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = ready!(Pin::new(&mut this.io).poll_flush(cx));
        if flushed.is_ok() {
            this.conn.on_flushed();
        }
        Poll::Ready(flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_a_reserve_of_the_open_file_limit() {
        assert_eq!(connections_for_open_file_limit(1024), 768);
        assert_eq!(connections_for_open_file_limit(20_000), 18_000);
        assert_eq!(connections_for_open_file_limit(65_536), 58_983);
        assert_eq!(connections_for_open_file_limit(1 << 20), 943_719);
        assert_eq!(connections_for_open_file_limit(256), 128);
        assert_eq!(connections_for_open_file_limit(0), 0);
        let config = ServerConfig { max_connections: Some(0), ..Default::default() };
        assert_eq!(config.connection_limit(), 1, "at least one");
    }

    #[tokio::test]
    async fn accepted_sockets_send_each_write_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(!tcp.nodelay().unwrap(), "Nagle's algorithm is on by default");
        assert!(send_at_once(tcp).nodelay().unwrap());
        drop(client);
    }

    /// A reconnect storm meets a loop busy with the first handshakes: the kernel must queue the
    /// rest. With tokio's `bind` (a backlog of 1,024) connection 1,026 to a listener that has not
    /// accepted yet has its SYN dropped; in a storm it waits a second for the retransmission.
    #[tokio::test]
    async fn the_opamp_listener_queues_more_than_tokios_default_backlog() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let n = 1_500;
        if somaxconn < n || rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0) < 2 * n as u64 {
            eprintln!("skipped: net.core.somaxconn {somaxconn} or the open-file limit is below {n}");
            return;
        }
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            // A queued connection completes at once. Beyond a full queue the SYN is dropped, and
            // its retransmissions too, as nothing is accepted: such a connect never completes.
            let connected = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
            match connected {
                Ok(Ok(tcp)) => clients.push(tcp),
                Ok(Err(e)) => panic!("connection {i}: {e}"),
                Err(_) => panic!("connection {i} of {n} was not queued (the listener's backlog is full)"),
            }
        }
        for _ in 0..n {
            listener.accept().await.unwrap();
        }
    }

    #[test]
    fn a_phase_and_its_deadline_share_one_word() {
        for phase in
            [Phase::Handshake, Phase::Head, Phase::Body, Phase::Respond, Phase::Idle, Phase::Upgraded]
        {
            assert_eq!(Phase::from_bits(phase as u64), phase);
        }
    }
}
