//! The request path both transports share: admitting a connecting agent, handing one decoded
//! message to the fleet (counted on the way), and the error replies.
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::auth::AuthError;
use super::metrics::KindLabel;
use super::server::State;
use crate::fleet::{Connection, Tenant};
use crate::proto::{
    AgentToServer, RetryInfo, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
    server_error_response,
};
use crate::protocol::codec;

pub(super) const PROTOBUF: &str = "application/x-protobuf";

/// The tenant of a connecting agent; one refused is counted `unauthorized` and answered with
/// [`unauthorized`].
pub(super) fn admit(state: &State, headers: &HeaderMap) -> Result<Tenant, AuthError> {
    state.auth.authenticate(headers).inspect_err(|_| {
        state.metrics.rejected_agents.get_or_create(&KindLabel { kind: "unauthorized" }).inc();
    })
}

/// What the fleet made of one message; the reply is in the caller's message.
pub(super) enum Handled {
    Reply,
    /// The agent is refused for now (at capacity, its namespace's limit): the reply is an
    /// `Unavailable` error, and this is when to come back.
    Refused(Duration),
}

/// Hands one message, received at `now`, to the fleet; its reply is written into `reply`, an
/// empty message.
pub(super) fn handle(
    state: &State,
    conn: &mut Connection,
    msg: &mut AgentToServer,
    reply: &mut ServerToAgent,
    now: tokio::time::Instant,
) -> Handled {
    state.metrics.hot.received(msg).inc();
    match state.fleet.handle_in_place(conn, msg, reply, now) {
        Ok(()) => {
            state.metrics.hot.reply.inc();
            Handled::Reply
        }
        Err(rejection) => {
            let retry_after = rejection.retry_after();
            state.metrics.rejected_agents.get_or_create(&KindLabel { kind: rejection.kind() }).inc();
            *reply =
                error_reply(ServerErrorResponseType::Unavailable, rejection.to_string(), Some(retry_after));
            reply.instance_uid = msg.instance_uid.clone(); // a refused message keeps it
            Handled::Refused(retry_after)
        }
    }
}

pub(super) fn error_reply(
    kind: ServerErrorResponseType,
    message: String,
    retry_after: Option<Duration>,
) -> ServerToAgent {
    ServerToAgent {
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: message,
            details: retry_after.map(|d| {
                server_error_response::Details::RetryInfo(RetryInfo {
                    retry_after_nanoseconds: d.as_nanos() as u64,
                })
            }),
        }),
        ..Default::default()
    }
}

/// `503` with the error reply and a `Retry-After` in whole seconds (at least one).
pub(super) fn refused(out: ServerToAgent, retry_after: Duration, gzip_ok: bool) -> Response {
    let mut resp = reply(StatusCode::SERVICE_UNAVAILABLE, &out, gzip_ok);
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Paces a new session (`pace.rs`): `None` when it may go on, else the [`refused`] answer (its
/// `RetryInfo` the `Retry-After`, addressed to `instance_uid`), counted `paced`.
pub(super) fn paced(state: &State, instance_uid: bytes::Bytes, gzip_ok: bool) -> Option<Response> {
    let retry_after = state.pacer.as_ref()?.admit(Instant::now()).err()?;
    state.metrics.rejected_agents.get_or_create(&KindLabel { kind: "paced" }).inc();
    let mut out = error_reply(
        ServerErrorResponseType::Unavailable,
        "too many agents are connecting at once: retry later".into(),
        Some(retry_after),
    );
    out.instance_uid = instance_uid;
    Some(refused(out, retry_after, gzip_ok))
}

pub(super) fn bad_request(message: String) -> ServerToAgent {
    error_reply(ServerErrorResponseType::BadRequest, message, None)
}

/// Replies shorter than this are sent as they are even to agents that accept gzip: a heartbeat's
/// reply is ~20 bytes, which gzip makes longer, and each compression sets up a deflate state of
/// hundreds of kilobytes (most of the CPU of a poll, when it was done for every reply).
pub const GZIP_MIN_BYTES: usize = 1024;

/// A protobuf response: every reply carries the protobuf content type; gzip when accepted and
/// at least [`GZIP_MIN_BYTES`] long (identity is always acceptable, RFC 9110 12.5.3).
pub(super) fn reply(status: StatusCode, msg: &ServerToAgent, gzip_ok: bool) -> Response {
    let body = codec::encode(msg);
    let mut resp = if gzip_ok && body.len() >= GZIP_MIN_BYTES {
        let mut r = (status, codec::gzip(&body)).into_response();
        r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        (status, body).into_response()
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
    resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    resp
}

/// 401 for an agent whose token is missing or unknown (both transports).
pub(super) fn unauthorized(e: AuthError) -> Response {
    let mut resp = reply(StatusCode::UNAUTHORIZED, &bad_request(e.to_string()), false);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}
