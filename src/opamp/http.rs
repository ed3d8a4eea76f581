//! The plain-HTTP transport: `POST /v1/opamp` with an `application/x-protobuf` body (optionally
//! gzip-compressed), answered with one `ServerToAgent`. HTTP agents hold no task and no socket
//! between polls; what the server has for them waits in the fleet until the next poll.
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::auth::AuthError;
use super::server::State;
use super::ws::error_reply;
use crate::metrics::{KindLabel, TransportLabel};
use crate::protocol::Transport;
use crate::protocol::codec::{self, DecodeError};

const HTTP: TransportLabel = TransportLabel { transport: "http" };
use crate::proto::{ServerErrorResponseType, ServerToAgent};

pub(super) const PROTOBUF: &str = "application/x-protobuf";

/// `POST /v1/opamp`.
pub(super) async fn post(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let gzip_ok = accepts_gzip(&headers);
    let tenant = match state.auth.authenticate(&headers) {
        Ok(t) => t,
        Err(e) => {
            state.metrics.rejected_agents.get_or_create(&KindLabel { kind: "unauthorized" }).inc();
            return unauthorized(e);
        }
    };
    let decode_error = || state.metrics.decode_errors.get_or_create(&HTTP).inc();
    if !is_protobuf(&headers) {
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &bad_request(format!("Content-Type must be {PROTOBUF}")),
            gzip_ok,
        );
    }
    let limit = state.config.max_message_bytes;
    let raw = match read_body(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            decode_error();
            let mut resp = too_large(limit, gzip_ok);
            e.close_if_undrained(&mut resp);
            return resp;
        }
    };
    let msg = match decode_body(&headers, raw, limit) {
        Ok(msg) => msg,
        Err(DecodeError::TooLarge { limit }) => {
            decode_error();
            return too_large(limit, gzip_ok);
        }
        Err(e) => {
            decode_error();
            return reply(StatusCode::BAD_REQUEST, &bad_request(e.to_string()), gzip_ok);
        }
    };
    let uid = msg.instance_uid.clone();
    state.metrics.hot.received(&msg).inc();
    let mut conn = state.fleet.connection(Transport::Http, tenant);
    match state.fleet.handle(&mut conn, msg) {
        Ok(out) => {
            state.metrics.hot.reply.inc();
            reply(StatusCode::OK, &out, gzip_ok)
        }
        Err(rejection) => {
            let retry_after = rejection.retry_after();
            state.metrics.rejected_agents.get_or_create(&KindLabel { kind: rejection.kind() }).inc();
            let mut out =
                error_reply(ServerErrorResponseType::Unavailable, rejection.to_string(), Some(retry_after));
            out.instance_uid = uid;
            let mut resp = reply(StatusCode::SERVICE_UNAVAILABLE, &out, gzip_ok);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
}

/// A body over the limit.
pub(crate) struct TooLarge {
    /// Whether the whole body was read (and dropped): then the connection can be reused.
    pub(crate) drained: bool,
}

impl TooLarge {
    /// Marks a reply to an undrained body: the connection cannot carry another request.
    pub(crate) fn close_if_undrained(&self, resp: &mut Response) {
        if !self.drained {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Reads a body of at most `limit` bytes. A larger one is read on (and dropped) up to eight
/// times the limit, so that a client still writing gets to read the 413, not a broken pipe.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, TooLarge> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return Err(TooLarge { drained: false }) };
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > limit.saturating_mul(8) {
            return Err(TooLarge { drained: false });
        }
    }
    if seen > limit { Err(TooLarge { drained: true }) } else { Ok(buf.freeze()) }
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

fn is_protobuf(headers: &HeaderMap) -> bool {
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

fn bad_request(message: String) -> ServerToAgent {
    error_reply(ServerErrorResponseType::BadRequest, message, None)
}

fn too_large(limit: usize, gzip_ok: bool) -> Response {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        &bad_request(format!("message exceeds the limit of {limit} bytes")),
        gzip_ok,
    )
}

/// A protobuf response: every reply carries the protobuf content type, gzip when accepted.
fn reply(status: StatusCode, msg: &ServerToAgent, gzip_ok: bool) -> Response {
    let body = codec::encode(msg);
    let mut resp = if gzip_ok {
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

#[cfg(test)]
mod tests {
    use super::*;

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
