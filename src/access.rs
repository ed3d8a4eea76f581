//! Who may read what on the operator's API address: callers present a Kubernetes bearer token,
//! the API server says who they are (TokenReview) and whether they may (SubjectAccessReview).
//! The operator decides nothing of its own, so a team's RBAC is the one place access is granted.
//!
//! Decisions are cached for [`DECISION_TTL`] (at most [`DECISION_CACHE_ENTRIES`]), keyed by a
//! hash of the token and the request's attributes: a burst of requests costs two API calls.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::protocol::bearer_token;

/// How long an allow or deny is remembered.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Decisions remembered at most (the cache starts over beyond).
pub const DECISION_CACHE_ENTRIES: usize = 4096;

/// The API group of the agents resource that RBAC rules name.
pub const AGENTS_GROUP: &str = "fleet.opamp.dev";

/// What a request asks to do, in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    /// `None`: across all namespaces.
    pub namespace: Option<&'a str>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing bearer token (a Kubernetes token: a ServiceAccount's or a user's)")]
    MissingToken,
    #[error("the Kubernetes API did not authenticate this token")]
    Unauthenticated,
    #[error("{user} may not {verb} {resource}.{group} {scope}")]
    Forbidden { user: String, verb: String, resource: String, group: String, scope: String },
    #[error("cannot check access with the Kubernetes API: {0}")]
    Unavailable(String),
}

impl Denied {
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::MissingToken | Denied::Unauthenticated => StatusCode::UNAUTHORIZED,
            Denied::Forbidden { .. } => StatusCode::FORBIDDEN,
            Denied::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A decision and when it was made, by the hash of the token and request.
type Decisions = HashMap<[u8; 32], (Instant, Result<(), Denied>)>;

/// Checks callers against the Kubernetes API.
pub struct KubeAccess {
    client: Client,
    cache: Mutex<Decisions>,
}

impl KubeAccess {
    pub fn new(client: Client) -> Self {
        Self { client, cache: Mutex::default() }
    }

    /// Whether the caller of `headers` may do `request`.
    pub async fn check(&self, headers: &HeaderMap, request: &Request<'_>) -> Result<(), Denied> {
        let token = bearer_token(headers).ok_or(Denied::MissingToken)?;
        let key = cache_key(token, request);
        let now = Instant::now();
        if let Some((at, decision)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            if now.duration_since(*at) < DECISION_TTL {
                return decision.clone();
            }
        }
        let decision = self.review(token, request).await;
        if !matches!(decision, Err(Denied::Unavailable(_))) {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= DECISION_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, (now, decision.clone()));
        }
        decision
    }

    async fn review(&self, token: &str, request: &Request<'_>) -> Result<(), Denied> {
        let unavailable = |e: kube::Error| Denied::Unavailable(e.to_string());
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => return Err(Denied::Unauthenticated),
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(request.verb.to_owned()),
                    group: Some(request.group.to_owned()),
                    resource: Some(request.resource.to_owned()),
                    namespace: request.namespace.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let decided = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(unavailable)?;
        if decided.status.is_some_and(|s| s.allowed) {
            return Ok(());
        }
        Err(Denied::Forbidden {
            user: user.username.unwrap_or_default(),
            verb: request.verb.to_owned(),
            resource: request.resource.to_owned(),
            group: request.group.to_owned(),
            scope: match request.namespace {
                Some(ns) => format!("in namespace {ns}"),
                None => "across all namespaces".to_owned(),
            },
        })
    }
}

fn cache_key(token: &str, request: &Request<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [token, request.verb, request.group, request.resource, request.namespace.unwrap_or("\0*")] {
        h.update(part.len().to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_separate_tokens_and_scopes() {
        let r = |ns| Request { verb: "list", group: AGENTS_GROUP, resource: "agents", namespace: ns };
        assert_ne!(cache_key("t", &r(Some("a"))), cache_key("t", &r(Some("b"))));
        assert_ne!(cache_key("t", &r(Some("a"))), cache_key("t", &r(None)));
        assert_ne!(cache_key("t1", &r(Some("a"))), cache_key("t2", &r(Some("a"))));
        // No concatenation ambiguity between parts.
        assert_ne!(cache_key("ab", &r(Some("c"))), cache_key("a", &r(Some("bc"))));
    }

    #[test]
    fn refusals_map_to_http_statuses() {
        assert_eq!(Denied::MissingToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Unavailable("x".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
