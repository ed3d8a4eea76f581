//! A user's callback endpoint for CapabilitySlot tests: an HTTP server on a free loopback port
//! that records every request (method, path, headers, exact body bytes, parsed JSON) and can be
//! told to fail the next N requests with 500 or to hang before answering. [`dead_url`] gives an
//! address nobody listens on (connection refused); [`FaultyReceiver`] one that never answers or
//! answers 500 to everything, for fault tests. Also the few primitives the tests need to
//! check what arrives: HMAC-SHA256 (from `sha2`, RFC 2104) and standard base64.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One request as it reached the callback.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The exact body bytes (what the signature covers).
    pub body: Bytes,
    /// The body parsed as JSON (`None` when it is not JSON).
    pub json: Option<Value>,
    /// What the server answered (500 while failing, 200 otherwise).
    pub answered: u16,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The parsed body; panics naming the raw body when it is not JSON.
    pub fn body_json(&self) -> &Value {
        self.json
            .as_ref()
            .unwrap_or_else(|| panic!("callback body is not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// `data` of the body, base64-decoded.
    pub fn data(&self) -> Vec<u8> {
        let data =
            self.body_json()["data"].as_str().unwrap_or_else(|| panic!("no data: {}", self.body_json()));
        b64decode(data).unwrap_or_else(|| panic!("data is not standard base64: {data:?}"))
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    fail_next: AtomicUsize,
    hang_next: AtomicUsize,
    hang_for: Mutex<Duration>,
}

/// The callback server. Stops when dropped or [`CallbackServer::stop`]ped.
pub struct CallbackServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

async fn record(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let fail = take_one(&shared.fail_next);
    let hang = !fail && take_one(&shared.hang_next);
    let json = serde_json::from_slice(&body).ok();
    shared.requests.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_owned(),
        headers,
        body,
        json,
        answered: if fail { 500 } else { 200 },
        at: Instant::now(),
    });
    if fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, "told to fail");
    }
    if hang {
        let d = *shared.hang_for.lock().unwrap();
        tokio::time::sleep(d).await;
    }
    (StatusCode::OK, "ok")
}

impl CallbackServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind callback server");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(record).with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Self { addr, shared, shutdown }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next `n` requests are answered 500 (and recorded).
    pub fn fail_next(&self, n: usize) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests are answered 200 only after `d` (longer than the slot's timeout:
    /// the operator gives up on them).
    pub fn hang_next(&self, n: usize, d: Duration) {
        *self.shared.hang_for.lock().unwrap() = d;
        self.shared.hang_next.store(n, Ordering::SeqCst);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; returns all of them.
    pub async fn wait_for(&self, n: usize, deadline: Duration, what: &str) -> Vec<Recorded> {
        let end = Instant::now() + deadline;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > end {
                panic!(
                    "timed out after {deadline:?} waiting for {what}: {} of {n} callback requests arrived: {:#?}",
                    got.len(),
                    got.iter().map(|r| r.json.clone()).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts no request beyond the first `n` arrives within `quiet` (a bounded "nothing more"
    /// check).
    pub async fn assert_no_more(&self, n: usize, quiet: Duration, what: &str) {
        let end = Instant::now() + quiet;
        while Instant::now() < end {
            let got = self.requests();
            assert!(
                got.len() <= n,
                "{what}: expected {n} callback requests, got {}: {:#?}",
                got.len(),
                got.iter().map(|r| r.json.clone()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(self.count() <= n, "{what}: more than {n} callback requests");
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for CallbackServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A URL where nothing listens: a port bound and released at once (connection refused).
pub fn dead_url(path: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}{path}")
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(message).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

/// The `X-OpAMP-Signature` value a body signed with `key` must carry.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(key, body)))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn b64encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding; `None` when it is not exactly that.
pub fn b64decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (ci, chunk) in bytes.chunks(4).enumerate() {
        let last = ci == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

/// What a [`FaultyReceiver`] does with each request, switchable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Reads the request, then never answers: keeps the connection open, reading and
    /// discarding, until the client gives up and closes it.
    Silent,
    /// Answers 500 to every request.
    Fail,
    /// Answers 200 to every request.
    Healthy,
}

impl Behaviour {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Silent,
            1 => Self::Fail,
            _ => Self::Healthy,
        }
    }
}

/// What a [`FaultyReceiver`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// TCP connections accepted.
    pub connections: usize,
    /// Requests read and never answered (while [`Behaviour::Silent`]).
    pub unanswered: usize,
    /// Requests answered 500.
    pub failed: usize,
    /// Requests answered 200.
    pub ok: usize,
}

#[derive(Default)]
struct FaultyShared {
    mode: std::sync::atomic::AtomicU8,
    connections: AtomicUsize,
    unanswered: AtomicUsize,
    failed: AtomicUsize,
    ok: AtomicUsize,
    /// `data` of the bodies answered 200 whose data starts with [`MARK`].
    marked: Mutex<Vec<Vec<u8>>>,
}

/// A message whose data starts with this is recorded by a [`FaultyReceiver`] when answered 200
/// (others are only counted, so that a flood costs the test process nothing per message).
pub const MARK: &[u8] = b"mark:";

/// A callback receiver for fault tests, on a free loopback port: a plain HTTP/1.1 server
/// written over TCP (no framework in the way), so that it can accept a connection and never
/// answer at all ([`Behaviour::Silent`]), answer 500 to everything ([`Behaviour::Fail`]), or be
/// healthy again. It keeps no request body: bodies are read and discarded, only the data of
/// marked messages ([`MARK`]) answered 200 is recorded. Stops when dropped.
pub struct FaultyReceiver {
    pub addr: SocketAddr,
    shared: Arc<FaultyShared>,
    shutdown: CancellationToken,
}

impl FaultyReceiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind faulty receiver");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(FaultyShared::default());
        let shutdown = CancellationToken::new();
        let receiver = Self { addr, shared: shared.clone(), shutdown: shutdown.clone() };
        receiver.set(behaviour);
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((conn, _)) = conn else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let (shared, stop) = (shared.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve_faulty(conn, &shared) => {}
                    }
                });
            }
        });
        receiver
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the receiver does with the requests read from now on.
    pub fn set(&self, behaviour: Behaviour) {
        self.shared.mode.store(behaviour as u8, Ordering::SeqCst);
    }

    pub fn counts(&self) -> Counts {
        let s = &self.shared;
        Counts {
            connections: s.connections.load(Ordering::SeqCst),
            unanswered: s.unanswered.load(Ordering::SeqCst),
            failed: s.failed.load(Ordering::SeqCst),
            ok: s.ok.load(Ordering::SeqCst),
        }
    }

    /// The data of the marked messages answered 200, in arrival order.
    pub fn marked(&self) -> Vec<Vec<u8>> {
        self.shared.marked.lock().unwrap().clone()
    }
}

impl Drop for FaultyReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves one connection of a [`FaultyReceiver`]: request after request (keep-alive) until
/// the client closes it or a request is left unanswered.
async fn serve_faulty(mut conn: tokio::net::TcpStream, shared: &FaultyShared) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_HEAD: usize = 64 << 10;
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 16 << 10];
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            match conn.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
            .unwrap_or(0);
        buf.drain(..head_end);
        let mode = Behaviour::from_u8(shared.mode.load(Ordering::SeqCst));
        // Only a healthy receiver looks at small bodies; others are discarded as they arrive.
        let keep = mode == Behaviour::Healthy && len <= MAX_HEAD;
        let mut body = Vec::new();
        let first = len.min(buf.len());
        if keep {
            body.extend_from_slice(&buf[..first]);
        }
        buf.drain(..first);
        let mut left = len - first;
        while left > 0 {
            let want = left.min(tmp.len());
            match conn.read(&mut tmp[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if keep {
                        body.extend_from_slice(&tmp[..n]);
                    }
                    left -= n;
                }
            }
        }
        let answer: &[u8] = match mode {
            Behaviour::Silent => {
                shared.unanswered.fetch_add(1, Ordering::SeqCst);
                while let Ok(n) = conn.read(&mut tmp).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
            Behaviour::Fail => {
                shared.failed.fetch_add(1, Ordering::SeqCst);
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 6\r\n\r\nfailed"
            }
            Behaviour::Healthy => {
                shared.ok.fetch_add(1, Ordering::SeqCst);
                let data = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["data"].as_str().and_then(b64decode));
                if let Some(data) = data.filter(|d| d.starts_with(MARK)) {
                    shared.marked.lock().unwrap().push(data);
                }
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            }
        };
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}
