//! Peer calls carry a service-account token of audience [`AUDIENCE`]; the receiver asks the API
//! server (a TokenReview) who it belongs to and accepts only its allowed users (by default its
//! own service account). Answers are cached by the token's SHA-256 (accepted for a minute,
//! refused for ten seconds, [`CACHE_ENTRIES`] at most), so peers cost the API server a review a
//! minute each and a flood of bad tokens a review per distinct token every ten seconds.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::AUDIENCE;
use crate::protocol::bearer_token;

/// Reviews remembered at most.
pub const CACHE_ENTRIES: usize = 1024;
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);

/// This replica's own token, read from a file (a projected token is rotated in place).
pub struct TokenSource {
    path: PathBuf,
    cached: Mutex<Option<(Instant, String)>>,
}

impl TokenSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path, cached: Mutex::new(None) }
    }

    /// The token, read again at most every 30 s.
    pub fn get(&self) -> Result<String, String> {
        let mut cached = self.cached.lock();
        if let Some((at, token)) = cached.as_ref()
            && at.elapsed() < Duration::from_secs(30)
        {
            return Ok(token.clone());
        }
        let token = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(format!("{} is empty", self.path.display()));
        }
        *cached = Some((Instant::now(), token.clone()));
        Ok(token)
    }
}

/// Checks the tokens of incoming peer calls.
pub struct Verifier {
    client: Client,
    /// Counts refused callers.
    pub refused: Option<std::sync::Arc<super::PeerMetrics>>,
    allowed: Vec<String>,
    cache: Mutex<HashMap<[u8; 32], (Instant, bool)>>,
}

impl Verifier {
    /// Accepts tokens of `allowed` users; none given: this process's own user, as the API
    /// server names it (a SelfSubjectReview).
    pub async fn new(client: Client, mut allowed: Vec<String>) -> Result<Self, kube::Error> {
        if allowed.is_empty() {
            let api: Api<SelfSubjectReview> = Api::all(client.clone());
            let review = api.create(&PostParams::default(), &SelfSubjectReview::default()).await?;
            let user = review.status.and_then(|s| s.user_info).and_then(|u| u.username).unwrap_or_default();
            tracing::info!(user = %user, "peer calls are accepted from this user");
            allowed.push(user);
        }
        Ok(Self { client, refused: None, allowed, cache: Mutex::new(HashMap::new()) })
    }

    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// Whether `token` belongs to an allowed user, for audience [`AUDIENCE`].
    pub async fn verify(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((until, ok)) = self.cache.lock().get(&digest)
            && *until > now
        {
            return *ok;
        }
        let ok = match self.review(token).await {
            Ok(user) => user.is_some_and(|u| self.allowed.contains(&u)),
            Err(e) => {
                tracing::warn!(error = %e, "peer call: TokenReview failed");
                return false; // not cached: the API server may answer next time
            }
        };
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(digest, (now + if ok { ACCEPTED_FOR } else { REFUSED_FOR }, ok));
        ok
    }

    /// The user a token authenticates as, for our audience; `None` when it does not.
    async fn review(&self, token: &str) -> Result<Option<String>, kube::Error> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.into()), audiences: Some(vec![AUDIENCE.into()]) },
            ..Default::default()
        };
        let status = api.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
        let audience_ok = status.audiences.as_ref().is_none_or(|a| a.iter().any(|a| a == AUDIENCE));
        Ok((status.authenticated == Some(true) && audience_ok)
            .then(|| status.user.and_then(|u| u.username))
            .flatten())
    }
}

/// Middleware: only calls with an accepted peer token pass.
pub async fn require_peer(State(verifier): State<Arc<Verifier>>, request: Request, next: Next) -> Response {
    let refused = || {
        if let Some(m) = &verifier.refused {
            m.refused.inc();
        }
    };
    let Some(token) = bearer_token(request.headers()) else {
        refused();
        return (StatusCode::UNAUTHORIZED, "missing bearer token").into_response();
    };
    if !verifier.verify(token).await {
        refused();
        return (StatusCode::FORBIDDEN, "not a peer").into_response();
    }
    next.run(request).await
}
