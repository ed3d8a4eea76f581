//! Our Rust agent running in the background over WebSocket, reconnecting like real agents do.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opamp_operator::protocol::Uid;
use opamp_operator::sim::{AgentSpec, HttpClient, SimAgent, WsClient};
use tokio_util::sync::CancellationToken;

/// How a WebSocket agent waits after an attempt that failed without retry advice: `first`,
/// doubling up to `max`, each wait jittered by ±50 % (reset once connected).
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    pub first: Duration,
    pub max: Duration,
}

pub struct RunningAgent {
    pub uid: Uid,
    pub state: Arc<Mutex<SimAgent>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Connects to `url` and keeps the agent connected (reconnecting every 200 ms when the
    /// connection drops) until stopped, with a heartbeat every second.
    pub fn spawn(url: String, token: Option<String>, spec: AgentSpec) -> Self {
        Self::spawn_with_heartbeat(url, token, spec, Duration::from_secs(1))
    }

    /// [`RunningAgent::spawn`] with a heartbeat every `heartbeat` once nothing else was sent
    /// (a fleet of a thousand in one test keeps the CPU for the operator with a longer one;
    /// WebSocket agents are not taken for gone when they are quiet).
    pub fn spawn_with_heartbeat(
        url: String,
        token: Option<String>,
        spec: AgentSpec,
        heartbeat: Duration,
    ) -> Self {
        let reconnect = Reconnect { first: Duration::from_millis(200), max: Duration::from_millis(200) };
        Self::spawn_reconnecting(url, token, spec, heartbeat, None, reconnect)
    }

    /// [`RunningAgent::spawn_with_heartbeat`] connecting from `source` (a loopback address of
    /// its own, so a large fleet on one machine does not run one address out of ports), and
    /// after a failed attempt without retry advice waiting as `reconnect` says. Told to wait
    /// (a refused upgrade with `Retry-After`, an `UNAVAILABLE` error with `RetryInfo`), it waits
    /// that long instead.
    pub fn spawn_reconnecting(
        url: String,
        token: Option<String>,
        spec: AgentSpec,
        heartbeat: Duration,
        source: Option<SocketAddr>,
        reconnect: Reconnect,
    ) -> Self {
        let uid = spec.uid;
        let state = Arc::new(Mutex::new(SimAgent::new(spec)));
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut first = true;
            let mut backoff = reconnect.first;
            while !st.is_cancelled() {
                let mut connected = false;
                match WsClient::connect_from(&url, token.as_deref(), source).await {
                    Err(e) => {
                        if let Some(wait) = e.retry_after() {
                            s.lock().unwrap().told_to_wait(wait);
                        }
                    }
                    Ok(mut ws) => {
                        // Like opamp-go: everything on the first connection, a bare message after.
                        let hello = if first {
                            s.lock().unwrap().full_state()
                        } else {
                            s.lock().unwrap().heartbeat()
                        };
                        first = false;
                        if ws.send(&hello).await.is_ok() {
                            loop {
                                tokio::select! {
                                    _ = st.cancelled() => break,
                                    msg = ws.recv() => match msg {
                                        Ok(m) => {
                                            connected = true;
                                            let out = s.lock().unwrap().on_message(&m);
                                            if let Some(out) = out {
                                                if ws.send(&out).await.is_err() { break; }
                                            }
                                        }
                                        Err(_) => break,
                                    },
                                    _ = tokio::time::sleep(heartbeat) => {
                                        let hb = s.lock().unwrap().heartbeat();
                                        if ws.send(&hb).await.is_err() { break; }
                                    }
                                }
                            }
                        }
                        ws.close().await;
                    }
                }
                if connected {
                    backoff = reconnect.first;
                }
                let advised = s.lock().unwrap().take_retry_advice();
                let wait = advised.unwrap_or_else(|| {
                    let wait = backoff.mul_f64(0.5 + rand::random::<f64>());
                    backoff = (backoff * 2).min(reconnect.max);
                    wait
                });
                tokio::select! { _ = st.cancelled() => {}, _ = tokio::time::sleep(wait) => {} }
            }
        });
        Self { uid, state, stop, task }
    }

    /// Polls `url` over plain HTTP every `every` (at once when it has something to answer),
    /// a new connection for each poll, until stopped.
    pub fn spawn_http(url: String, token: Option<String>, spec: AgentSpec, every: Duration) -> Self {
        let uid = spec.uid;
        let state = Arc::new(Mutex::new(SimAgent::new(spec)));
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = HttpClient::new(&url, token.as_deref(), false).without_keepalive();
            let mut next = Some(s.lock().unwrap().full_state());
            while !st.is_cancelled() {
                let msg = next.take().unwrap_or_else(|| s.lock().unwrap().heartbeat());
                let wait = match client.send(&msg).await {
                    Ok(reply) if !reply.status.is_success() => {
                        if let Some(advised) = reply.retry_after() {
                            s.lock().unwrap().told_to_wait(advised);
                        }
                        next = Some(msg); // refused: again after the advised wait, or a pause
                        true
                    }
                    Ok(reply) => {
                        next = reply.message.and_then(|m| s.lock().unwrap().on_message(&m));
                        next.is_none()
                    }
                    Err(_) => {
                        next = Some(msg); // not delivered: again after a pause, as agents retry
                        true
                    }
                };
                if wait {
                    let pause = s.lock().unwrap().take_retry_advice().unwrap_or(every);
                    tokio::select! { _ = st.cancelled() => {}, _ = tokio::time::sleep(pause) => {} }
                }
            }
        });
        Self { uid, state, stop, task }
    }

    pub fn configs_received(&self) -> usize {
        self.state.lock().unwrap().configs_received
    }

    /// What the agent last reported of its remote config (hash, APPLIED or FAILED, error).
    pub fn remote_config_status(&self) -> Option<opamp_operator::proto::RemoteConfigStatus> {
        self.state.lock().unwrap().remote_config_status().cloned()
    }

    /// Times the server told the agent to wait before trying again.
    pub fn retries_advised(&self) -> usize {
        self.state.lock().unwrap().retries_advised
    }

    pub fn duplicate_configs(&self) -> usize {
        self.state.lock().unwrap().duplicate_configs
    }

    /// The types of the custom messages received, in order.
    pub fn custom_message_types(&self) -> Vec<String> {
        self.state.lock().unwrap().custom_messages.iter().map(|m| m.r#type.clone()).collect()
    }

    /// The content of one file of the agent's effective config.
    pub fn effective(&self, file: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .effective_files()
            .get(file)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
