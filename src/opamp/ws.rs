//! The WebSocket transport: one task per connection, woken by the socket, by the fleet when
//! there is something to push, by the ping timer, and by shutdown.
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::State as AxumState;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite;

use super::metrics::{KindLabel, TransportLabel};
use super::request::{self, Handled, bad_request};
use super::server::State;
use crate::fleet::Connection;
use crate::proto::AgentToServer;
use crate::protocol::Transport;
use crate::protocol::codec;

const WS: TransportLabel = TransportLabel { transport: "websocket" };

/// `GET /v1/opamp` with an upgrade.
pub(super) async fn upgrade(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let tenant = match request::admit(&state, &headers) {
        Ok(t) => t,
        Err(e) => return request::unauthorized(e),
    };
    // Refused before upgrading when beyond the pace of new sessions: opamp-go reads the
    // Retry-After of a refused upgrade (`pace.rs`).
    if let Some(refused) = request::paced(&state, Default::default(), false) {
        return refused;
    }
    let limit = state.config.max_message_bytes;
    // Counted from here, while the upgrade is still the HTTP server's, until the socket closes.
    let open = state.websockets.token();
    ws.read_buffer_size(state.config.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let _open = open;
            let conn = state.fleet.connection(Transport::WebSocket, tenant);
            serve(socket, state, conn).await
        })
        .into_response()
}

enum Step {
    Continue,
    Close(u16, &'static str),
    Gone,
}

async fn serve(mut socket: WebSocket, state: Arc<State>, mut conn: Connection) {
    let notify = conn.notified().cloned().expect("WebSocket connections are notifiable");
    let ping_every = state.config.ws_ping_interval;
    // The futures that outlive a message stay pinned across loop turns, so a message costs no
    // timer or waiter-list registration: the ping timer is reset only when it fires early.
    let mut shutdown = pin!(state.shutdown.cancelled());
    let mut notified = pin!(notify.notified());
    let mut last_heard = Instant::now();
    // Until the agent's first message the timer also keeps this deadline: a peer that upgrades
    // and answers pings, but never speaks OpAMP, would otherwise hold its socket for good.
    let mut first_due = Some(last_heard + state.config.ws_first_message_timeout);
    let mut pinged = false;
    let mut ping = pin!(sleep_until(earliest(last_heard + ping_every, first_due)));
    let step = loop {
        let step = tokio::select! {
            biased;
            _ = &mut shutdown => Step::Close(close_code::AWAY, "server shutting down"),
            frame = socket.recv() => {
                last_heard = Instant::now();
                pinged = false;
                match frame {
                    None => Step::Gone,
                    // The message is handled and its reply encoded before anything is awaited;
                    // only the write is, and only when the socket does not take it at once.
                    Some(Ok(Message::Binary(data))) => {
                        let (reply, then) = on_frame(&state, &mut conn, data);
                        if first_due.is_some() && conn.agent().is_some() {
                            first_due = None;
                        }
                        match write(&mut socket, &state, Message::Binary(reply)).await {
                            Step::Continue => then,
                            failed => failed,
                        }
                    }
                    Some(Ok(Message::Text(_))) => Step::Close(close_code::UNSUPPORTED, "text frames are not supported"),
                    // Keep reading: tungstenite answers the close, and the stream then ends.
                    Some(Ok(Message::Close(_))) => Step::Continue,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Continue,
                    Some(Err(e)) => {
                        let step = read_error(e);
                        if let Step::Close(close_code::SIZE, _) = step {
                            state.metrics.decode_errors.get_or_create(&WS).inc();
                        }
                        step
                    }
                }
            }
            _ = &mut notified => {
                notified.set(notify.notified());
                match state.fleet.poll_push(&conn).map(|msg| codec::encode_ws(&msg)) {
                    Some(frame) => {
                        state.metrics.hot.push.inc();
                        write(&mut socket, &state, Message::Binary(frame)).await
                    }
                    None => Step::Continue,
                }
            },
            _ = &mut ping => {
                // Silent for one interval: pinged; for three (the ping unanswered): closed. Only a
                // peer that reads answers pings (tungstenite replies while it reads), so one that
                // stopped reading or is gone is closed too.
                let now = Instant::now();
                let due = last_heard + ping_every * if pinged { 3 } else { 1 };
                if first_due.is_some_and(|first| now >= first) {
                    timed_out(&state, "websocket_first_message");
                    Step::Close(close_code::POLICY, "no AgentToServer message in time")
                } else if now < due {
                    ping.as_mut().reset(earliest(due, first_due)); // heard from the agent since: not due yet
                    Step::Continue
                } else if pinged {
                    timed_out(&state, "websocket_silent");
                    Step::Close(close_code::AWAY, "no traffic from the agent")
                } else {
                    pinged = true;
                    ping.as_mut().reset(earliest(last_heard + ping_every * 3, first_due));
                    write(&mut socket, &state, Message::Ping(Default::default())).await
                }
            }
        };
        if !matches!(step, Step::Continue) {
            break step;
        }
    };
    state.fleet.connection_closed(&conn);
    if let Step::Close(code, reason) = step {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = Box::pin(timeout(state.config.write_timeout, socket.send(Message::Close(Some(frame))))).await;
    }
    tracing::debug!(agent = ?conn.agent(), "websocket closed");
}

fn earliest(at: Instant, first_due: Option<Instant>) -> Instant {
    first_due.map_or(at, |first| first.min(at))
}

fn timed_out(state: &State, kind: &'static str) {
    state.metrics.connection_timeouts.get_or_create(&KindLabel { kind }).inc();
}

/// Decodes and handles one frame: the encoded reply, and what to do once it is written.
fn on_frame(state: &State, conn: &mut Connection, data: bytes::Bytes) -> (bytes::Bytes, Step) {
    let metrics = &state.metrics;
    let mut msg = AgentToServer::default();
    if let Err(e) = codec::decode_ws_into(data, &mut msg) {
        tracing::debug!(error = %e, "undecodable frame");
        metrics.decode_errors.get_or_create(&WS).inc();
        metrics.hot.error.inc();
        return (codec::encode_ws(&bad_request(e.to_string())), Step::Continue);
    }
    match request::handle(state, conn, &mut msg) {
        Handled::Reply(reply) => (codec::encode_ws(&reply), Step::Continue),
        Handled::Refused(reply, _) => {
            (codec::encode_ws(&reply), Step::Close(close_code::AGAIN, "server at capacity, retry later"))
        }
    }
}

/// Writes one message. Most writes complete at once (a reply fits the socket's buffer): those
/// cost no timer and no future. The rest of a write the socket did not take at once is awaited
/// under the write timeout, in a boxed future so the connection's task (one per agent) stays
/// small.
async fn write(socket: &mut WebSocket, state: &State, msg: Message) -> Step {
    let mut msg = Some(msg);
    match poll_fn(|cx| Poll::Ready(write_now(socket, cx, &mut msg))).await {
        Poll::Ready(Ok(())) => Step::Continue,
        Poll::Ready(Err(_)) => Step::Gone,
        Poll::Pending => Box::pin(finish_write(socket, state, msg)).await,
    }
}

/// The steps of `SinkExt::send`, as far as the socket takes them now: `msg` is taken once the
/// socket accepted it, and `Pending` means it (or the flush) is still to be done.
fn write_now(
    socket: &mut WebSocket,
    cx: &mut Context<'_>,
    msg: &mut Option<Message>,
) -> Poll<Result<(), axum::Error>> {
    let mut socket = Pin::new(socket);
    if msg.is_some() {
        ready!(socket.as_mut().poll_ready(cx))?;
        socket.as_mut().start_send(msg.take().expect("checked above"))?;
    }
    socket.poll_flush(cx)
}

/// The rest of a write [`write_now`] started: the message if the socket did not accept it yet,
/// else the flush.
async fn finish_write(socket: &mut WebSocket, state: &State, msg: Option<Message>) -> Step {
    let rest = async {
        match msg {
            Some(msg) => socket.send(msg).await,
            None => socket.flush().await,
        }
    };
    match timeout(state.config.write_timeout, rest).await {
        Ok(Ok(())) => Step::Continue,
        Ok(Err(_)) => Step::Gone,
        Err(_) => Step::Close(close_code::AWAY, "write timed out"),
    }
}

fn read_error(e: axum::Error) -> Step {
    match e.into_inner().downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Step::Close(close_code::SIZE, "message too large"),
        Some(tungstenite::Error::Protocol(_)) => Step::Close(close_code::PROTOCOL, "protocol error"),
        _ => Step::Gone,
    }
}
