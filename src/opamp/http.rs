//! The plain-HTTP transport: `POST /v1/opamp` with an `application/x-protobuf` body (optionally
//! gzip-compressed), answered with one `ServerToAgent`. HTTP agents hold no task and no socket
//! between polls; what the server has for them waits in the fleet until the next poll.
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::metrics::TransportLabel;
use super::request::{self, Handled, PROTOBUF, bad_request, reply};
use super::server::State;
use crate::http_server::read_body;
use crate::protocol::Transport;
use crate::protocol::codec::{self, DecodeError};

const HTTP: TransportLabel = TransportLabel { transport: "http" };

/// `POST /v1/opamp`.
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
    let mut conn = state.fleet.connection(Transport::Http, tenant);
    match request::handle(&state, &mut conn, msg) {
        Handled::Reply(out) => reply(StatusCode::OK, &out, gzip_ok),
        Handled::Refused(out, retry_after) => {
            let mut resp = reply(StatusCode::SERVICE_UNAVAILABLE, &out, gzip_ok);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
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
