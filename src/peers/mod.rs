//! Replicas as one operator: who the others are ([`membership`]), which of them owns an
//! instance uid, and calls between them ([`Peers::call`]), authenticated both ways ([`auth`]).
//!
//! - **Membership**: every replica holds a `coordination.k8s.io/v1` Lease of its own,
//!   `<group>-<identity>`, labelled `opamp.dev/peer-group: <group>` and annotated with its peer
//!   address and incarnation (a random id per process start), renewed every `renew_every`. A
//!   replica whose Lease lapses (renewTime + leaseDurationSeconds in the past) is out; one that
//!   stops deletes its Lease and is out at once. Nothing but the Kubernetes API is needed.
//! - **Ownership**: an instance uid belongs to one live replica, chosen by rendezvous hashing
//!   over the live replicas' identities: every replica computes the same owner from the same
//!   membership, and a replica leaving moves only its own uids. HTTP agents are routed to their
//!   owner; WebSocket agents stay where they connected.
//! - **Calls**: plain HTTP to the peer address (`/peer/v1/…`), with this replica's
//!   service-account token (audience [`AUDIENCE`]) as bearer; the receiver checks it with a
//!   TokenReview and accepts only its own service account ([`auth`]). Agent tokens do not open it.
pub mod auth;
pub mod membership;
mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::protocol::Uid;
pub use metrics::PeerMetrics;

/// The audience of the tokens replicas present to each other (a token for the API server is
/// refused, and a peer token is useless against the API server).
pub const AUDIENCE: &str = "opamp-operator.opamp.dev/peers";
/// The path prefix of peer calls.
pub const PREFIX: &str = "/peer/v1";
/// Largest answer a peer call reads.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct PeersConfig {
    /// Namespace of the Leases (the operator's own).
    pub namespace: String,
    /// Lease names are `<group>-<identity>`; the label `opamp.dev/peer-group` holds the group.
    pub group: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Where peers reach this replica (`host:port` of the peer address).
    pub address: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// This replica's token for peers (a projected service-account token with audience
    /// [`AUDIENCE`]); read again when it changes.
    pub token_file: PathBuf,
    /// Users whose tokens peers accept; empty: this replica's own user (a SelfSubjectReview).
    pub allowed_users: Vec<String>,
    /// Deadline of one peer call.
    pub call_timeout: Duration,
    /// The owner of this replica's Lease (its Pod): deleted with it by the garbage collector.
    pub owner: Option<OwnerReference>,
}

impl PeersConfig {
    pub fn new(namespace: &str, identity: &str, address: &str, token_file: impl Into<PathBuf>) -> Self {
        Self {
            namespace: namespace.into(),
            group: "opamp-operator".into(),
            identity: identity.into(),
            address: address.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            token_file: token_file.into(),
            allowed_users: Vec::new(),
            call_timeout: Duration::from_secs(5),
            owner: None,
        }
    }
}

/// A live replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub identity: Arc<str>,
    /// A new id each time the replica's process starts.
    pub incarnation: Arc<str>,
    /// `host:port` of its peer address.
    pub address: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("peer {peer} unreachable: {source}")]
    Unreachable { peer: Arc<str>, source: reqwest::Error },
    #[error("peer {peer} answered {status}: {body}")]
    Status { peer: Arc<str>, status: u16, body: String },
    #[error("peer {peer} answered something unreadable: {message}")]
    Unreadable { peer: Arc<str>, message: String },
    #[error("no peer token: {0}")]
    Token(String),
}

struct Inner {
    me: Member,
    /// Live replicas other than this one, sorted.
    others: RwLock<Arc<Vec<Member>>>,
    /// Bumped at each membership change.
    epoch: watch::Sender<u64>,
    http: reqwest::Client,
    token: Option<auth::TokenSource>,
    call_timeout: Duration,
    metrics: Arc<PeerMetrics>,
}

/// This replica's view of the others; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("me", &self.inner.me).field("others", &self.others()).finish()
    }
}

impl Peers {
    /// A replica alone: owns every uid and has nobody to call.
    pub fn solo() -> Self {
        Self::new(
            Member { identity: "solo".into(), incarnation: new_incarnation().into(), address: "".into() },
            None,
            Duration::from_secs(5),
            Arc::default(),
        )
    }

    fn new(
        me: Member,
        token: Option<auth::TokenSource>,
        call_timeout: Duration,
        metrics: Arc<PeerMetrics>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(8)
            .build()
            .expect("HTTP client builds");
        Self {
            inner: Arc::new(Inner {
                me,
                others: RwLock::new(Arc::new(Vec::new())),
                epoch: watch::channel(0).0,
                http,
                token,
                call_timeout,
                metrics,
            }),
        }
    }

    pub fn me(&self) -> &Member {
        &self.inner.me
    }

    /// The live replicas other than this one.
    pub fn others(&self) -> Arc<Vec<Member>> {
        self.inner.others.read().clone()
    }

    /// A receiver that changes at each membership change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// Replaces the live set (membership calls this; tests too).
    pub fn set_others(&self, mut others: Vec<Member>) {
        others.retain(|m| m.identity != self.inner.me.identity);
        others.sort();
        others.dedup_by(|a, b| a.identity == b.identity);
        let mut current = self.inner.others.write();
        if **current != others {
            self.inner.metrics.members.set(others.len() as i64 + 1);
            *current = Arc::new(others);
            drop(current);
            self.inner.epoch.send_modify(|e| *e += 1);
        }
    }

    /// The live replica that owns `uid`: `None` for this one. Rendezvous hashing over the
    /// identities of the live replicas, this one included.
    pub fn owner(&self, uid: &Uid) -> Option<Member> {
        let others = self.others();
        if others.is_empty() {
            return None;
        }
        let me = &self.inner.me;
        let mut best = (score(&me.identity, uid), None);
        for m in others.iter() {
            let s = score(&m.identity, uid);
            if s > best.0 {
                best = (s, Some(m));
            }
        }
        best.1.cloned()
    }

    /// Calls `path` (under [`PREFIX`]) on `peer` with `body` as JSON and reads a JSON answer.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        peer: &Member,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).expect("JSON serializes into memory");
        let headers = [(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"))];
        let (status, _, answer) = self.send(peer, path, headers.into_iter().collect(), body.into()).await?;
        if status != 200 {
            return Err(CallError::Status {
                peer: peer.identity.clone(),
                status,
                body: String::from_utf8_lossy(&answer).chars().take(512).collect(),
            });
        }
        serde_json::from_slice(&answer)
            .map_err(|e| CallError::Unreadable { peer: peer.identity.clone(), message: e.to_string() })
    }

    /// Calls `path` on every live peer at once; their answers in the order of [`Self::others`].
    pub async fn call_all<B: Serialize + Sync + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Vec<(Member, Result<T, CallError>)> {
        let others = self.others();
        let calls = others.iter().map(|m| async move { (m.clone(), self.call(m, path, body).await) });
        futures_util::future::join_all(calls).await
    }

    /// Sends a request with `headers` and `body` to `path` (under [`PREFIX`]) on `peer`, and
    /// answers its status, headers and body (at most [`MAX_ANSWER_BYTES`]) as they are.
    pub async fn send(
        &self,
        peer: &Member,
        path: &str,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> Result<(u16, http::HeaderMap, Bytes), CallError> {
        let started = std::time::Instant::now();
        let sent = body.len() as u64;
        let result = async {
            let token = match &self.inner.token {
                Some(t) => t.get().map_err(CallError::Token)?,
                None => return Err(CallError::Token("this replica has no peers".into())),
            };
            let url = format!("http://{}{PREFIX}{path}", peer.address);
            let unreachable = |source| CallError::Unreachable { peer: peer.identity.clone(), source };
            let too_large = || CallError::Unreadable {
                peer: peer.identity.clone(),
                message: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
            };
            let mut response = self
                .inner
                .http
                .post(url)
                .headers(headers)
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .timeout(self.inner.call_timeout)
                .body(body)
                .send()
                .await
                .map_err(unreachable)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            if response.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
                return Err(too_large());
            }
            let mut answer = bytes::BytesMut::new();
            while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
                if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(too_large());
                }
                answer.extend_from_slice(&chunk);
            }
            Ok((status, headers, answer.freeze()))
        }
        .await;
        let m = &self.inner.metrics;
        m.call_duration.observe(started.elapsed().as_secs_f64());
        let bytes = |direction| metrics::BytesLabels { path: path.to_owned(), direction };
        m.bytes.get_or_create(&bytes("sent")).inc_by(sent);
        let outcome = match &result {
            Ok((status, _, body)) => {
                m.bytes.get_or_create(&bytes("received")).inc_by(body.len() as u64);
                if *status == 200 { "ok" } else { "status" }
            }
            Err(CallError::Unreachable { .. }) => "unreachable",
            Err(CallError::Unreadable { .. }) => "unreadable",
            Err(CallError::Token(_)) => "token",
            Err(CallError::Status { .. }) => "status",
        };
        m.calls.get_or_create(&metrics::CallLabels { path: path.to_owned(), result: outcome }).inc();
        result
    }

    /// The metrics of peer calls (registered by the operator).
    pub fn metrics(&self) -> &Arc<PeerMetrics> {
        &self.inner.metrics
    }
}

/// A replica's score for a uid: the highest wins it.
fn score(identity: &str, uid: &Uid) -> u64 {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update([0]);
    h.update(uid.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

fn new_incarnation() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member { identity: id.into(), incarnation: "1".into(), address: format!("{id}:1").into() }
    }

    fn peers(me: &str) -> Peers {
        Peers::new(member(me), None, Duration::from_secs(1), Arc::default())
    }

    #[test]
    fn every_replica_names_the_same_owner_and_a_leaving_replica_moves_only_its_uids() {
        let names = ["a", "b", "c"];
        let views: Vec<Peers> = names
            .iter()
            .map(|me| {
                let p = peers(me);
                p.set_others(names.iter().map(|n| member(n)).collect());
                p
            })
            .collect();
        let uids: Vec<Uid> =
            (0..3000u32).map(|i| Uid::from_wire(&i.to_be_bytes().repeat(4)).unwrap()).collect();
        let owner_of =
            |view: &Peers, uid: &Uid| view.owner(uid).map_or(view.me().identity.clone(), |m| m.identity);
        let mut per = std::collections::HashMap::<Arc<str>, usize>::new();
        for uid in &uids {
            let owners: Vec<_> = views.iter().map(|v| owner_of(v, uid)).collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]), "{owners:?}");
            *per.entry(owners[0].clone()).or_default() += 1;
        }
        assert!(per.values().all(|n| (800..1200).contains(n)), "spread evenly: {per:?}");
        // c leaves: a's and b's uids stay where they are.
        let (a, b) = (peers("a"), peers("b"));
        a.set_others(vec![member("b")]);
        b.set_others(vec![member("a")]);
        for (uid, before) in uids.iter().map(|u| (u, owner_of(&views[0], u))) {
            let after = owner_of(&a, uid);
            assert_eq!(after, owner_of(&b, uid));
            if &*before != "c" {
                assert_eq!(after, before);
            }
        }
    }

    #[test]
    fn alone_a_replica_owns_everything() {
        let p = peers("a");
        assert!(p.owner(&Uid::from_wire(&[1; 16]).unwrap()).is_none());
        let changes = p.changes();
        p.set_others(vec![member("a")]);
        assert!(!changes.has_changed().unwrap(), "itself is not another");
        p.set_others(vec![member("b")]);
        assert!(changes.has_changed().unwrap());
    }
}
