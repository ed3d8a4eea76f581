//! Who may read what: the API server says who callers are and whether they may
//! (SubjectAccessReview). The operator decides nothing of its own, so a team's RBAC is the one
//! place access is granted.
//!
//! - On the operator's API address callers present a Kubernetes bearer token, which the API
//!   server authenticates (TokenReview): [`KubeAccess::check`].
//! - On the aggregated API the API server has authenticated the caller already and says who it
//!   is in front-proxy headers (`crate::agents_api::frontproxy`): [`KubeAccess::check_user`].
//!
//! Decisions are cached for [`DECISION_TTL`] (at most [`DECISION_CACHE_ENTRIES`]), keyed by a
//! hash of the token (or user) and the request's attributes: a burst of requests costs one or
//! two API calls.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use std::collections::BTreeMap;

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
    /// One object (e.g. `get`), or `None`.
    pub name: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A request about agents (`agents.fleet.opamp.dev`).
    pub fn agents(verb: &'a str, namespace: Option<&'a str>, name: Option<&'a str>) -> Self {
        Self { verb, group: AGENTS_GROUP, resource: "agents", namespace, name }
    }
}

/// Who a caller is, as the API server authenticated it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing bearer token (a Kubernetes token: a ServiceAccount's or a user's)")]
    MissingToken,
    #[error("the Kubernetes API did not authenticate this token")]
    Unauthenticated,
    #[error("User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}")]
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

    /// Whether the caller of `headers` (a bearer token) may do `request`.
    pub async fn check(&self, headers: &HeaderMap, request: &Request<'_>) -> Result<(), Denied> {
        let token = bearer_token(headers).ok_or(Denied::MissingToken)?;
        self.cached(cache_key(&[token], request), async {
            let user = self.authenticate(token).await?;
            self.authorize(&user, request).await
        })
        .await
    }

    /// Whether `user`, authenticated by the API server already, may do `request`.
    pub async fn check_user(&self, user: &User, request: &Request<'_>) -> Result<(), Denied> {
        let mut parts: Vec<&str> = vec!["\0user", &user.name, user.uid.as_deref().unwrap_or("\0")];
        parts.extend(user.groups.iter().map(String::as_str));
        for (k, values) in &user.extra {
            parts.push("\0extra");
            parts.push(k);
            parts.extend(values.iter().map(String::as_str));
        }
        self.cached(cache_key(&parts, request), self.authorize(user, request)).await
    }

    /// The decision under `key` if fresh; else `decide`'s, remembered unless the API server
    /// could not be asked.
    async fn cached(
        &self,
        key: [u8; 32],
        decide: impl std::future::Future<Output = Result<(), Denied>>,
    ) -> Result<(), Denied> {
        let now = Instant::now();
        if let Some((at, decision)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            if now.duration_since(*at) < DECISION_TTL {
                return decision.clone();
            }
        }
        let decision = decide.await;
        if !matches!(decision, Err(Denied::Unavailable(_))) {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= DECISION_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, (now, decision.clone()));
        }
        decision
    }

    /// Who `token` is (TokenReview).
    async fn authenticate(&self, token: &str) -> Result<User, Denied> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Ok(User {
                name: user.username.unwrap_or_default(),
                uid: user.uid,
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }),
            _ => Err(Denied::Unauthenticated),
        }
    }

    /// Whether `user` may do `request` (SubjectAccessReview).
    async fn authorize(&self, user: &User, request: &Request<'_>) -> Result<(), Denied> {
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(request.verb.to_owned()),
                    group: Some(request.group.to_owned()),
                    resource: Some(request.resource.to_owned()),
                    namespace: request.namespace.map(str::to_owned),
                    name: request.name.map(str::to_owned),
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
            user: user.name.clone(),
            verb: request.verb.to_owned(),
            resource: request.resource.to_owned(),
            group: request.group.to_owned(),
            scope: match request.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_owned(),
            },
        })
    }
}

fn unavailable(e: kube::Error) -> Denied {
    Denied::Unavailable(e.to_string())
}

/// A hash of who asks (`caller`'s parts) and of what.
fn cache_key(caller: &[&str], request: &Request<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    let what = [
        "\0request",
        request.verb,
        request.group,
        request.resource,
        request.namespace.unwrap_or("\0*"),
        request.name.unwrap_or("\0*"),
    ];
    for part in caller.iter().chain(&what) {
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
        let r = |ns| Request::agents("list", ns, None);
        assert_ne!(cache_key(&["t"], &r(Some("a"))), cache_key(&["t"], &r(Some("b"))));
        assert_ne!(cache_key(&["t"], &r(Some("a"))), cache_key(&["t"], &r(None)));
        assert_ne!(cache_key(&["t1"], &r(Some("a"))), cache_key(&["t2"], &r(Some("a"))));
        // No concatenation ambiguity between parts.
        assert_ne!(cache_key(&["ab"], &r(Some("c"))), cache_key(&["a"], &r(Some("bc"))));
        assert_ne!(cache_key(&["u", "g1"], &r(None)), cache_key(&["u"], &r(None)));
        let get = |name| Request::agents("get", Some("a"), name);
        assert_ne!(cache_key(&["t"], &get(Some("x"))), cache_key(&["t"], &get(Some("y"))));
    }

    #[test]
    fn refusals_map_to_http_statuses() {
        assert_eq!(Denied::MissingToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Unavailable("x".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
