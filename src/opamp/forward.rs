//! Routing plain-HTTP polls to the replica that owns the agent (see [`crate::peers`]): which
//! uid a poll is for, forwarding it to the owner's peer route and passing the owner's answer
//! on, and letting go of the HTTP agents another replica owns after a membership change.
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::Response;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::ServerMetrics;
use super::server::Throttle;
use crate::fleet::Fleet;
use crate::peers::{Member, Peers};
use crate::protocol::Uid;

/// The peer route forwarded polls go to, under [`crate::peers::PREFIX`].
pub const PEER_OPAMP_PATH: &str = "/opamp";
/// A forwarded poll carries the agent's `Authorization` in this header: the peer call's own
/// `Authorization` is the forwarding replica's peer token. Only the peer route reads it.
pub const FORWARDED_AUTHORIZATION: HeaderName = HeaderName::from_static("opamp-forwarded-authorization");
/// The instance uid of a plain-HTTP request as a UUID string (OpAMP specification; opamp-go
/// sends it with every request since v0.23.0, older clients none).
pub const INSTANCE_UID: HeaderName = HeaderName::from_static("opamp-instance-uid");
/// Forwards in flight at once by default ([`super::ServerConfig::max_forwards`]).
pub const MAX_FORWARDS_DEFAULT: usize = 64;
/// How long a poll waits for a forwarding slot before it is refused with a Retry-After.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// A replica that cannot reach an owner says so at most this often (each poll at debug level).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The request headers a forwarded poll keeps (the agent's `Authorization` is renamed).
const KEPT: [HeaderName; 4] =
    [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::ACCEPT_ENCODING, INSTANCE_UID];
/// The headers of the owner's answer passed on to the agent.
const ANSWERED: [HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::RETRY_AFTER,
    header::VARY,
    header::WWW_AUTHENTICATE,
];

/// How a forward went.
pub(super) enum Forwarded {
    /// The owner's answer, to pass on as it is.
    Answered(Response),
    /// Every forwarding slot stayed taken.
    Busy,
    /// The owner did not answer with an OpAMP reply (unreachable, timed out, refused the peer
    /// call, or has no such route).
    Failed(String),
}

/// This replica's forwarding: the other replicas, and the bound on forwards in flight.
pub(super) struct Forwarding {
    pub(super) peers: Peers,
    /// The runtime peer calls run on: the OpAMP event loops are single-threaded runtimes of
    /// their own, and the peer client's pooled connections (shared with the other peer calls)
    /// must live on one runtime that outlives them.
    runtime: Option<tokio::runtime::Handle>,
    slots: Arc<Semaphore>,
    /// Failed forwards are logged at warn level at most every [`WARN_EVERY`].
    failure_warning: Throttle,
}

impl Forwarding {
    /// Forwarding through `peers`, at most `max_forwards` at once; peer calls run on the
    /// current runtime, if any.
    pub(super) fn new(peers: Peers, max_forwards: usize) -> Self {
        Self {
            peers,
            runtime: tokio::runtime::Handle::try_current().ok(),
            slots: Arc::new(Semaphore::new(max_forwards.clamp(1, Semaphore::MAX_PERMITS))),
            failure_warning: Throttle::new(WARN_EVERY),
        }
    }

    /// Sends a poll (its body as received) to `owner`'s peer route and reads its answer.
    pub(super) async fn forward(&self, owner: &Member, headers: &HeaderMap, body: Bytes) -> Forwarded {
        let permit = match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Forwarded::Busy,
        };
        let (peers, owner, outgoing) = (self.peers.clone(), owner.clone(), forwarded_headers(headers));
        let call = async move {
            let _permit = permit; // held until the call ends, even if the agent went away
            peers.send(&owner, PEER_OPAMP_PATH, outgoing, body).await
        };
        let sent = match &self.runtime {
            Some(runtime) => match runtime.spawn(call).await {
                Ok(sent) => sent,
                Err(e) => return Forwarded::Failed(format!("the forwarding task failed: {e}")),
            },
            None => call.await,
        };
        match sent {
            Ok((status, headers, body)) if super::http::is_protobuf(&headers) => {
                match StatusCode::from_u16(status) {
                    Ok(status) => Forwarded::Answered(answer(status, &headers, body)),
                    Err(_) => Forwarded::Failed(format!("the owner answered status {status}")),
                }
            }
            Ok((status, _, body)) => Forwarded::Failed(format!(
                "the owner answered {status} without an OpAMP reply: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
            Err(e) => Forwarded::Failed(e.to_string()),
        }
    }

    /// Logs a failed forward: at warn level at most every [`WARN_EVERY`], else at debug.
    pub(super) fn log_failure(&self, owner: &Member, error: &str) {
        if self.failure_warning.due() {
            tracing::warn!(owner = %owner.identity, error, "the owner of an HTTP agent did not answer: polls for it are handled here meanwhile");
        } else {
            tracing::debug!(owner = %owner.identity, error, "the owner of an HTTP agent did not answer: handled here");
        }
    }
}

/// The uid of the `OpAMP-Instance-UID` header, when present and a valid UUID.
pub(super) fn header_uid(headers: &HeaderMap) -> Option<Uid> {
    headers.get(INSTANCE_UID)?.to_str().ok()?.trim().parse().ok()
}

/// The uid a poll is routed by: its instance uid, or for a wire uid that is not one (an old
/// 26-character ULID, empty), a uid derived from those bytes, so that its retries reach the
/// same replica and get the same uid issued.
pub(super) fn routing_uid(wire: &[u8]) -> Uid {
    Uid::from_wire(wire).unwrap_or_else(|| {
        let digest = Sha256::digest(wire);
        Uid(digest[..16].try_into().expect("16 bytes"))
    })
}

/// The headers of a forwarded poll: those that matter to the owner, nothing else.
fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in KEPT {
        for value in incoming.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some(auth) = incoming.get(header::AUTHORIZATION) {
        out.insert(FORWARDED_AUTHORIZATION, auth.clone());
    }
    out
}

/// The owner's answer as the agent gets it.
fn answer(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    for name in ANSWERED {
        for value in headers.get_all(&name) {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp
}

/// The agent headers the owner admits a forwarded poll by: its `Authorization`.
pub(super) fn admission_headers(forwarded: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(auth) = forwarded.get(FORWARDED_AUTHORIZATION) {
        out.insert(header::AUTHORIZATION, auth.clone());
    }
    out
}

/// At each membership change until `stop`, marks offline the HTTP agents another replica owns
/// now (their next polls go there; the record stays, offline, until the fleet forgets it).
pub(super) async fn release_on_changes(
    fleet: Fleet,
    peers: Peers,
    metrics: Arc<ServerMetrics>,
    stop: CancellationToken,
) {
    let mut changes = peers.changes();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let others = peers.others();
        let released = fleet.release_http_agents(|uid| peers.owner(uid).is_none());
        metrics.http_agents_released.inc_by(released as u64);
        if released > 0 {
            tracing::info!(
                released,
                replicas = others.len() + 1,
                "membership changed: HTTP agents other replicas own now are marked offline here"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn member() -> Member {
        Member { identity: "b".into(), incarnation: "1".into(), address: "127.0.0.1:9".into() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_that_finds_every_forwarding_slot_taken_is_refused_after_a_second() {
        let forwarding = Forwarding::new(Peers::solo(), 1);
        let taken = forwarding.slots.clone().try_acquire_owned().unwrap();
        let started = tokio::time::Instant::now();
        let forwarded = forwarding.forward(&member(), &HeaderMap::new(), Bytes::new()).await;
        assert!(matches!(forwarded, Forwarded::Busy));
        assert_eq!(started.elapsed(), SLOT_WAIT);
        drop(taken);
        // A free slot, and a call that cannot be made (this replica has no peer token).
        let forwarded = forwarding.forward(&member(), &HeaderMap::new(), Bytes::new()).await;
        assert!(matches!(forwarded, Forwarded::Failed(e) if e.contains("no peer token")));
        assert_eq!(forwarding.slots.available_permits(), 1, "the slot is given back");
    }

    #[test]
    fn polls_are_routed_by_a_valid_header_uid_or_their_wire_uid() {
        let uid = Uid::new_v7();
        let mut h = HeaderMap::new();
        assert_eq!(header_uid(&h), None);
        h.insert(INSTANCE_UID, HeaderValue::from_str(&uid.to_string()).unwrap());
        assert_eq!(header_uid(&h), Some(uid));
        h.insert(INSTANCE_UID, HeaderValue::from_static("not-a-uid"));
        assert_eq!(header_uid(&h), None);
        assert_eq!(routing_uid(&uid.to_wire()), uid);
        let ulid = b"01ARZ3NDEKTSV4RRFFQ69G5FAV";
        assert_eq!(routing_uid(ulid), routing_uid(ulid), "the same wire uid, the same owner");
        assert_ne!(routing_uid(ulid), routing_uid(b""));
    }

    #[test]
    fn a_forwarded_poll_keeps_only_the_headers_that_matter_and_renames_the_agents_token() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer agent"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.append(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        h.append(header::ACCEPT_ENCODING, HeaderValue::from_static("br"));
        h.insert(INSTANCE_UID, HeaderValue::from_static("0193a5c4-7d2e-7c3a-9b1f-2a4c6e8f0a1b"));
        h.insert(header::COOKIE, HeaderValue::from_static("session=1"));
        h.insert(FORWARDED_AUTHORIZATION, HeaderValue::from_static("Bearer forged"));
        let out = forwarded_headers(&h);
        assert!(out.get(header::AUTHORIZATION).is_none(), "the peer call sets its own");
        assert_eq!(out.get(FORWARDED_AUTHORIZATION).unwrap(), "Bearer agent", "never the agent's own copy");
        assert_eq!(out.get_all(header::ACCEPT_ENCODING).iter().count(), 2);
        assert!(out.get(header::COOKIE).is_none());
        assert_eq!(out.len(), 6);
        let admitted = admission_headers(&out);
        assert_eq!(admitted.get(header::AUTHORIZATION).unwrap(), "Bearer agent");
        assert_eq!(admitted.len(), 1);
        assert!(admission_headers(&HeaderMap::new()).is_empty(), "no token: admitted as anonymous, or not");
    }
}
