//! The plain-HTTP transport: `POST /v1/opamp` with an `application/x-protobuf` body (optionally
//! gzip-compressed), answered with one `ServerToAgent`. HTTP agents hold no task and no socket
//! between polls; what the server has for them waits in the fleet until the next poll.
//!
//! With several replicas behind one Service (see [`crate::peers`]), an HTTP agent's polls land
//! on any of them, yet its record (report, sequence, desired state, queued custom messages)
//! lives on one: the replica that owns its instance uid. A poll for an agent another live
//! replica owns is forwarded to the owner's peer route (`POST /peer/v1/opamp`), its body as
//! received (still compressed) with the headers that matter (`Content-Type`,
//! `Content-Encoding`, `Accept-Encoding`, `OpAMP-Instance-UID`, and the agent's
//! `Authorization` as `OpAMP-Forwarded-Authorization`: the owner admits the tenant itself),
//! and the owner's answer goes back as it is (status, `Content-Type`, `Content-Encoding`,
//! `Retry-After`, body). The owner handles a forwarded poll as a local one and never forwards
//! it again. The uid is read from the `OpAMP-Instance-UID` header when it is present and valid
//! (no decoding), else from the decoded message.
//!
//! - **Owner unreachable** (no answer within the peer call deadline, or an answer that is not
//!   an OpAMP reply): the poll is handled here, so agents are never left without answers
//!   (`opamp_http_forwarded_total{result="owner_unreachable"}`, a warning at most every 10 s).
//! - **Bounds**: bodies are bounded by [`ServerConfig::max_message_bytes`] before anything is
//!   forwarded; at most [`ServerConfig::max_forwards`] forwards are in flight (each holds a
//!   connection to the owner); a poll that finds no free slot within a second is refused with
//!   `503` and a `Retry-After` (`result="busy"`). Each forward is under the peer call deadline.
//! - **Counted once**: a replica that handled a poll for an agent it does not own (the owner
//!   unreachable, or views of the membership differing for a moment) marks it offline again at
//!   once, and at each membership change every replica marks offline the HTTP agents another
//!   one owns now. The new owner, which does not know the agent or knows an old sequence, asks
//!   it for its full state once: once per ownership change, not per poll.
//!
//! [`ServerConfig::max_message_bytes`]: super::ServerConfig::max_message_bytes
//! [`ServerConfig::max_forwards`]: super::ServerConfig::max_forwards
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::forward::{self, Forwarded};
use super::metrics::{ResultLabel, TransportLabel};
use super::request::{self, Handled, PROTOBUF, bad_request, refused, reply};
use super::server::State;
use crate::fleet::{AgentKey, Tenant};
use crate::http_server::read_body;
use crate::proto::{AgentToServer, ServerErrorResponseType, ServerToAgent};
use crate::protocol::codec::{self, DecodeError};
use crate::protocol::{Transport, Uid};

const HTTP: TransportLabel = TransportLabel { transport: "http" };

/// `POST /v1/opamp`: handled here, or forwarded to the agent's owner (module docs).
pub(super) async fn post(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let gzip_ok = accepts_gzip(&headers);
    let tenant = match request::admit(&state, &headers) {
        Ok(t) => t,
        Err(e) => return request::unauthorized(e),
    };
    let raw = match read_protobuf(&state, &headers, body, gzip_ok).await {
        Ok(raw) => raw,
        Err(resp) => return resp,
    };
    let mut decoded = None;
    if let Some(forwarding) = &state.forwarding {
        let uid = match forward::header_uid(&headers) {
            Some(uid) => Some(uid),
            // Alone, nothing is forwarded: no need to decode first.
            None if forwarding.peers.others().is_empty() => None,
            None => match decode(&state, &headers, raw.clone()) {
                Ok(msg) => {
                    let uid = forward::routing_uid(&msg.instance_uid);
                    decoded = Some(msg);
                    Some(uid)
                }
                Err(e) => return undecodable(e, gzip_ok),
            },
        };
        if let Some(owner) = uid.and_then(|uid| forwarding.peers.owner(&uid)) {
            let result = |result| state.metrics.http_forwarded.get_or_create(&ResultLabel { result }).inc();
            match forwarding.forward(&owner, &headers, raw.clone()).await {
                Forwarded::Answered(resp) => {
                    result("answered");
                    return resp;
                }
                Forwarded::Busy => {
                    result("busy");
                    let retry_after = state.fleet.config().retry_after;
                    let out = request::error_reply(
                        ServerErrorResponseType::Unavailable,
                        "too many polls are being forwarded to other replicas".into(),
                        Some(retry_after),
                    );
                    return refused(out, retry_after, gzip_ok);
                }
                Forwarded::Failed(error) => {
                    result("owner_unreachable");
                    forwarding.log_failure(&owner, &error);
                }
            }
        }
    }
    let msg = match decoded {
        Some(msg) => msg,
        None => match decode(&state, &headers, raw) {
            Ok(msg) => msg,
            Err(e) => return undecodable(e, gzip_ok),
        },
    };
    handle_here(&state, tenant, msg, gzip_ok)
}

/// `POST /peer/v1/opamp`: a poll another replica forwarded to this one, the agent's owner;
/// handled as a local one (never forwarded again), the tenant admitted by the agent's own
/// `Authorization` (carried as `OpAMP-Forwarded-Authorization`).
pub(super) async fn forwarded(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.http_forwards_received.inc();
    let gzip_ok = accepts_gzip(&headers);
    let tenant = match request::admit(&state, &forward::admission_headers(&headers)) {
        Ok(t) => t,
        Err(e) => return request::unauthorized(e),
    };
    let raw = match read_protobuf(&state, &headers, body, gzip_ok).await {
        Ok(raw) => raw,
        Err(resp) => return resp,
    };
    match decode(&state, &headers, raw) {
        Ok(msg) => handle_here(&state, tenant, msg, gzip_ok),
        Err(e) => undecodable(e, gzip_ok),
    }
}

/// The body of a protobuf request, within [`super::ServerConfig::max_message_bytes`].
async fn read_protobuf(
    state: &State,
    headers: &HeaderMap,
    body: Body,
    gzip_ok: bool,
) -> Result<Bytes, Response> {
    if !is_protobuf(headers) {
        return Err(reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &bad_request(format!("Content-Type must be {PROTOBUF}")),
            gzip_ok,
        ));
    }
    let limit = state.config.max_message_bytes;
    read_body(body, limit).await.map_err(|e| {
        state.metrics.decode_errors.get_or_create(&HTTP).inc();
        let mut resp = too_large(limit, gzip_ok);
        e.close_if_undrained(&mut resp);
        resp
    })
}

/// The message of a body (gunzipped when so encoded, within the message limit); an error is
/// counted, and answered with [`undecodable`].
fn decode(state: &State, headers: &HeaderMap, raw: Bytes) -> Result<AgentToServer, DecodeError> {
    decode_body(headers, raw, state.config.max_message_bytes).inspect_err(|_| {
        state.metrics.decode_errors.get_or_create(&HTTP).inc();
    })
}

/// `413` for a message over the limit, `400` for anything else undecodable.
fn undecodable(e: DecodeError, gzip_ok: bool) -> Response {
    match e {
        DecodeError::TooLarge { limit } => too_large(limit, gzip_ok),
        e => reply(StatusCode::BAD_REQUEST, &bad_request(e.to_string()), gzip_ok),
    }
}

/// Hands a poll to this replica's fleet. An agent another replica owns (its owner did not
/// answer, or it became the owner meanwhile) is marked offline again at once: the owner counts
/// it, not this replica (module docs).
fn handle_here(state: &State, tenant: Tenant, mut msg: AgentToServer, gzip_ok: bool) -> Response {
    // A poll of an agent not live here is a new session: paced (`pace.rs`); live ones never.
    if state.pacer.is_some()
        && !is_live(state, &tenant, &msg)
        && let Some(resp) = request::paced(state, msg.instance_uid.clone(), gzip_ok)
    {
        return resp;
    }
    let mut conn = state.fleet.connection(Transport::Http, tenant);
    let mut out = ServerToAgent::default();
    let handled = request::handle(state, &mut conn, &mut msg, &mut out, tokio::time::Instant::now());
    if let (Some(forwarding), Some(uid)) = (&state.forwarding, conn.agent())
        && forwarding.peers.owner(&uid).is_some()
        && state.fleet.release_http_agent(&AgentKey::new(conn.tenant().namespace.clone(), uid))
    {
        state.metrics.http_agents_released.inc();
    }
    match handled {
        Handled::Reply => reply(StatusCode::OK, &out, gzip_ok),
        Handled::Refused(retry_after) => refused(out, retry_after, gzip_ok),
    }
}

/// Whether the agent of this poll is connected on this replica (a known, valid uid).
fn is_live(state: &State, tenant: &Tenant, msg: &AgentToServer) -> bool {
    Uid::from_wire(&msg.instance_uid)
        .and_then(|uid| state.fleet.inspect(&AgentKey::new(tenant.namespace.clone(), uid), |v| v.connected))
        .unwrap_or(false)
}

fn decode_body(
    headers: &HeaderMap,
    raw: Bytes,
    limit: usize,
) -> Result<crate::proto::AgentToServer, DecodeError> {
    match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        Some(enc) if enc.eq_ignore_ascii_case("gzip") => codec::decode(codec::gunzip(&raw, limit)?),
        None => codec::decode(raw),
        Some(enc) if enc.eq_ignore_ascii_case("identity") => codec::decode(raw),
        Some(other) => Err(DecodeError::Gzip(format!("unsupported Content-Encoding {other:?}"))),
    }
}

pub(super) fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(PROTOBUF))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                matches!(p.trim().replace(' ', "").as_str(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000")
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
    })
}

fn too_large(limit: usize, gzip_ok: bool) -> Response {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        &bad_request(format!("message exceeds the limit of {limit} bytes")),
        gzip_ok,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn gzip_is_used_only_when_accepted() {
        assert!(accepts_gzip(&headers(&[("accept-encoding", "gzip")])));
        assert!(accepts_gzip(&headers(&[("accept-encoding", "deflate, GZIP;q=0.5")])));
        assert!(accepts_gzip(&headers(&[("accept-encoding", "*")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "br")])));
        assert!(!accepts_gzip(&headers(&[])));
    }

    #[test]
    fn protobuf_content_type_is_required() {
        assert!(is_protobuf(&headers(&[("content-type", "application/x-protobuf")])));
        assert!(is_protobuf(&headers(&[("content-type", "Application/X-Protobuf; charset=binary")])));
        assert!(!is_protobuf(&headers(&[("content-type", "application/json")])));
        assert!(!is_protobuf(&headers(&[])));
    }
}
