//! The WebSocket transport: one task per connection, woken by the socket, by the fleet when
//! there is something to push, by the ping timer, and by shutdown.
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until, timeout};

use super::frames::{self, CloseCode, FrameError, FrameReader, FrameWriter, Incoming, Limits, Outgoing};
use super::metrics::{KindLabel, TransportLabel};
use super::request::{self, Handled, bad_request};
use super::server::{PlainIo, State, TlsIo};
use crate::fleet::{Connection, Wakeup};
use crate::proto::{AgentToServer, ServerToAgent};
use crate::protocol::Transport;
use crate::protocol::codec::{self, WsFrame};

const WS: TransportLabel = TransportLabel { transport: "websocket" };

/// `GET /v1/opamp` with an upgrade.
pub(super) async fn upgrade(AxumState(state): AxumState<Arc<State>>, mut req: Request) -> Response {
    let accept_key = match frames::accept(req.headers()) {
        Ok(key) => key,
        Err(frames::Refused(status, why)) => return (status, why).into_response(),
    };
    let tenant = match request::admit(&state, req.headers()) {
        Ok(t) => t,
        Err(e) => return request::unauthorized(e),
    };
    // Refused before upgrading when beyond the pace of new sessions: opamp-go reads the
    // Retry-After of a refused upgrade (`pace.rs`).
    if let Some(refused) = request::paced(&state, Default::default(), false) {
        return refused;
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::UPGRADE_REQUIRED, "this connection cannot be upgraded").into_response();
    };
    // Counted from here, while the upgrade is still the HTTP server's, until the socket closes.
    let open = state.websockets.token();
    tokio::spawn(async move {
        let _open = open;
        let Ok(upgraded) =
            on_upgrade.await.inspect_err(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        else {
            return;
        };
        let conn = state.fleet.connection(Transport::WebSocket, tenant);
        // The socket itself when hyper hands it back (always, for our own connections): reads
        // and writes then skip hyper's upgraded-connection layers, and what hyper had read past
        // the request is given to the frame reader. The future is boxed and awaited after the
        // match, so the task holds neither the other kinds' futures nor the downcast's result
        // (a TLS connection's state is over a kilobyte).
        let served: Pin<Box<dyn Future<Output = ()> + Send>> = match upgraded.downcast::<TokioIo<PlainIo>>() {
            Ok(parts) => {
                Box::pin(serve(parts.io.into_inner(), FrameReader::new(&parts.read_buf), state, conn))
            }
            Err(upgraded) => match upgraded.downcast::<TokioIo<TlsIo>>() {
                Ok(parts) => Box::pin(serve(
                    Box::new(parts.io.into_inner()),
                    FrameReader::new(&parts.read_buf),
                    state,
                    conn,
                )),
                Err(upgraded) => Box::pin(serve(TokioIo::new(upgraded), FrameReader::default(), state, conn)),
            },
        };
        served.await
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key)
        .body(Body::empty())
        .expect("a valid response")
}

enum Step {
    Continue,
    Close(CloseCode, &'static str),
    Gone,
}

/// The connection's life. A plain function returning an `async move` block rather than an
/// `async fn`: the block keeps its captured arguments in place, where an `async fn` also keeps
/// copies of them (~200 bytes per agent: the socket, the frame reader, the connection).
#[expect(clippy::manual_async_fn, reason = "an async fn keeps copies of its arguments (above)")]
fn serve<S>(
    mut socket: S,
    mut reader: FrameReader,
    state: Arc<State>,
    mut conn: Connection,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        let wakeup = conn.wakeup().cloned().expect("WebSocket connections have a wakeup");
        let _closed_on_shutdown = state.close_on_shutdown(conn.id(), &wakeup);
        let ping_every = state.config.ws_ping_interval;
        let limits = Limits { max_message: state.config.max_message_bytes };
        let mut writer = FrameWriter::default();
        // The timer stays pinned across loop turns, so a message costs no timer registration: it is
        // reset only when it fires early. Pushes and shutdown wake the task through `wakeup`.
        let mut last_heard = Instant::now();
        // Until the agent's first message the timer also keeps this deadline: a peer that upgrades
        // and answers pings, but never speaks OpAMP, would otherwise hold its socket for good.
        let mut first_due = Some(last_heard + state.config.ws_first_message_timeout);
        let mut pinged = false;
        let mut ping = pin!(sleep_until(earliest(last_heard + ping_every, first_due)));
        // The timer is polled only when it may have fired: once polled pending it holds the
        // task's waker until it fires, and another poll before its deadline (each turn of the
        // loop) cost more than a look at the clock. `heard` is the time a message was read at,
        // when its reply was written at once: still current at the first poll of the next turn
        // (nothing awaited in between), so a heartbeat's turns read the clock once. A time
        // older than the task's last yield could hide a timer that fired meanwhile.
        let mut ping_waits = false;
        let mut heard = None;
        let step = loop {
            let mut fresh = heard.take();
            let step = tokio::select! {
                biased;
                raised = poll_fn(|cx| wakeup.poll_raised(cx)) => {
                    if raised & Wakeup::SHUTDOWN != 0 {
                        Step::Close(CloseCode::Away, "server shutting down")
                    } else {
                        match state.fleet.poll_push(&conn).map(|msg| codec::encode_ws(&msg)) {
                            Some(frame) => {
                                state.metrics.hot.push.inc();
                                write(&mut socket, &mut writer, &state, Outgoing::Binary(&frame)).await
                            }
                            None => Step::Continue,
                        }
                    }
                }
                incoming = poll_fn(|cx| reader.poll_read(cx, &mut socket, limits)) => {
                    last_heard = Instant::now();
                    pinged = false;
                    match incoming {
                        Ok(None) => Step::Gone,
                        // The message is handled and its reply encoded before anything is awaited;
                        // only the write is, and only when the socket does not take it at once.
                        Ok(Some(Incoming::Binary(data))) => {
                            let (reply, then) = on_frame(&state, &mut conn, data, last_heard);
                            if first_due.is_some() && conn.agent().is_some() {
                                first_due = None;
                            }
                            let written = match start_write(&mut socket, &mut writer, Outgoing::Binary(&reply)).await {
                                Poll::Ready(step) => {
                                    heard = Some(last_heard);
                                    step
                                }
                                Poll::Pending => Box::pin(finish_write(&mut socket, &mut writer, &state)).await,
                            };
                            match written {
                                Step::Continue => then,
                                failed => failed,
                            }
                        }
                        Ok(Some(Incoming::Text)) => Step::Close(CloseCode::Unsupported, "text frames are not supported"),
                        // The close is answered with the peer's code, and the connection then ends.
                        Ok(Some(Incoming::Close(code))) => Step::Close(code.unwrap_or(CloseCode::Normal), ""),
                        Ok(Some(Incoming::Ping(data))) => write(&mut socket, &mut writer, &state, Outgoing::Pong(&data)).await,
                        Ok(Some(Incoming::Pong)) => Step::Continue,
                        Err(e) => read_error(&state, e),
                    }
                }
                _ = poll_fn(|cx| {
                    let now = fresh.take();
                    if ping_waits && now.unwrap_or_else(Instant::now) < ping.deadline() {
                        return Poll::Pending;
                    }
                    // Unconstrained: a timer pending for want of the task's budget would not
                    // hold its waker.
                    ping_waits = pin!(tokio::task::unconstrained(ping.as_mut())).poll(cx).is_pending();
                    if ping_waits { Poll::Pending } else { Poll::Ready(()) }
                }) => {
                    // Silent for one interval: pinged; for three (the ping unanswered): closed. Only a
                    // peer that reads answers pings, so one that stopped reading or is gone is closed too.
                    let now = Instant::now();
                    let due = last_heard + ping_every * if pinged { 3 } else { 1 };
                    if first_due.is_some_and(|first| now >= first) {
                        timed_out(&state, "websocket_first_message");
                        Step::Close(CloseCode::Policy, "no AgentToServer message in time")
                    } else if now < due {
                        ping.as_mut().reset(earliest(due, first_due)); // heard from the agent since: not due yet
                        Step::Continue
                    } else if pinged {
                        timed_out(&state, "websocket_silent");
                        Step::Close(CloseCode::Away, "no traffic from the agent")
                    } else {
                        pinged = true;
                        ping.as_mut().reset(earliest(last_heard + ping_every * 3, first_due));
                        write(&mut socket, &mut writer, &state, Outgoing::Ping).await
                    }
                }
            };
            if !matches!(step, Step::Continue) {
                break step;
            }
        };
        state.fleet.connection_closed(&conn);
        if let Step::Close(code, reason) = step {
            let _ = write(&mut socket, &mut writer, &state, Outgoing::Close(code, reason)).await;
        }
        tracing::debug!(agent = ?conn.agent(), "websocket closed");
    }
}

fn earliest(at: Instant, first_due: Option<Instant>) -> Instant {
    first_due.map_or(at, |first| first.min(at))
}

fn timed_out(state: &State, kind: &'static str) {
    state.metrics.connection_timeouts.get_or_create(&KindLabel { kind }).inc();
}

/// Decodes and handles one frame, received at `now`: the encoded reply, and what to do once it
/// is written.
fn on_frame(state: &State, conn: &mut Connection, data: Bytes, now: Instant) -> (WsFrame, Step) {
    let metrics = &state.metrics;
    let mut msg = AgentToServer::default();
    if let Err(e) = codec::decode_ws_into(data, &mut msg) {
        tracing::debug!(error = %e, "undecodable frame");
        metrics.decode_errors.get_or_create(&WS).inc();
        metrics.hot.error.inc();
        return (codec::encode_ws_reply(&bad_request(e.to_string())), Step::Continue);
    }
    let mut reply = ServerToAgent::default();
    match request::handle(state, conn, &mut msg, &mut reply, now) {
        Handled::Reply => (codec::encode_ws_reply(&reply), Step::Continue),
        Handled::Refused(_) => {
            (codec::encode_ws_reply(&reply), Step::Close(CloseCode::Again, "server at capacity, retry later"))
        }
    }
}

/// Writes one frame. Most writes complete at once (a reply fits the socket's buffer): those
/// cost no timer and no future. The rest of a write the socket did not take at once is awaited
/// under the write timeout, in a boxed future so the connection's task (one per agent) stays
/// small.
async fn write<S: AsyncWrite + Unpin>(
    socket: &mut S,
    writer: &mut FrameWriter,
    state: &State,
    frame: Outgoing<'_>,
) -> Step {
    match start_write(socket, writer, frame).await {
        Poll::Ready(step) => step,
        Poll::Pending => Box::pin(finish_write(socket, writer, state)).await,
    }
}

/// Starts a write, awaiting nothing: `Ready` when the socket took the whole frame (or failed),
/// `Pending` when [`finish_write`] is to write the rest.
async fn start_write<S: AsyncWrite + Unpin>(
    socket: &mut S,
    writer: &mut FrameWriter,
    frame: Outgoing<'_>,
) -> Poll<Step> {
    match poll_fn(|cx| Poll::Ready(writer.start(cx, socket, frame))).await {
        Poll::Ready(Ok(())) => Poll::Ready(Step::Continue),
        Poll::Ready(Err(_)) => Poll::Ready(Step::Gone),
        Poll::Pending => Poll::Pending,
    }
}

/// The rest of a write [`write`] started.
async fn finish_write<S: AsyncWrite + Unpin>(
    socket: &mut S,
    writer: &mut FrameWriter,
    state: &State,
) -> Step {
    match timeout(state.config.write_timeout, poll_fn(|cx| writer.poll_finish(cx, socket))).await {
        Ok(Ok(())) => Step::Continue,
        Ok(Err(_)) => Step::Gone,
        Err(_) => Step::Close(CloseCode::Away, "write timed out"),
    }
}

fn read_error(state: &State, e: FrameError) -> Step {
    match e {
        FrameError::TooLarge(_) => {
            state.metrics.decode_errors.get_or_create(&WS).inc();
            Step::Close(CloseCode::Size, "message too large")
        }
        FrameError::Protocol(why) => {
            tracing::debug!(error = why, "websocket protocol error");
            Step::Close(CloseCode::Protocol, "protocol error")
        }
        FrameError::Io(_) => Step::Gone,
    }
}
