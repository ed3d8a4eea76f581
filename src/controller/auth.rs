//! Agent authentication from Secrets of type `opamp.dev/agent-token`: the token (key `token`)
//! admits an agent into the Secret's namespace.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::api::AGENT_TOKEN_SECRET_TYPE;
use crate::fleet::Tenant;
use crate::opamp::{AuthError, Authenticator};
use crate::protocol::bearer_token;

/// Tokens are looked up by their SHA-256 digest, so the lookup's timing reveals nothing of
/// the token, and no token is held in the clear.
#[derive(Default)]
pub struct TokenAuthenticator {
    tokens: RwLock<HashMap<[u8; 32], Tenant>>,
    anonymous: Option<Tenant>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenAuthenticator {
    pub fn new(anonymous_namespace: Option<&str>) -> Arc<Self> {
        Arc::new(Self { tokens: RwLock::default(), anonymous: anonymous_namespace.map(Tenant::new) })
    }

    /// Rebuilds the token map from every Secret of the agent-token type.
    pub fn rebuild(&self, secrets: &[Arc<Secret>]) {
        let mut tokens = HashMap::new();
        for s in secrets.iter().filter(|s| s.type_.as_deref() == Some(AGENT_TOKEN_SECRET_TYPE)) {
            let Some(token) = s.data.as_ref().and_then(|d| d.get("token")) else { continue };
            let Ok(token) = std::str::from_utf8(&token.0) else { continue };
            let token = token.trim();
            if !token.is_empty() {
                tokens.insert(digest(token), Tenant::new(&s.namespace().unwrap_or_default()));
            }
        }
        *self.tokens.write().unwrap() = tokens;
    }

    pub fn len(&self) -> usize {
        self.tokens.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Authenticator for TokenAuthenticator {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Tenant, AuthError> {
        match bearer_token(headers) {
            Some(token) => {
                self.tokens.read().unwrap().get(&digest(token)).cloned().ok_or(AuthError::UnknownToken)
            }
            None => self.anonymous.clone().ok_or(AuthError::MissingToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(ns: &str, type_: &str, token: &str) -> Arc<Secret> {
        Arc::new(Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("t".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some([("token".to_string(), ByteString(token.as_bytes().to_vec()))].into()),
            ..Default::default()
        })
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_map_agents_to_their_secret_namespace() {
        let auth = TokenAuthenticator::new(None);
        auth.rebuild(&[
            secret("team-a", AGENT_TOKEN_SECRET_TYPE, "aaa\n"),
            secret("team-b", "Opaque", "bbb"),
        ]);
        assert_eq!(auth.authenticate(&headers(Some("aaa"))), Ok(Tenant::new("team-a")));
        assert_eq!(
            auth.authenticate(&headers(Some("bbb"))),
            Err(AuthError::UnknownToken),
            "only agent-token Secrets count"
        );
        assert_eq!(auth.authenticate(&headers(None)), Err(AuthError::MissingToken));
    }

    #[test]
    fn anonymous_agents_land_in_the_configured_namespace() {
        let auth = TokenAuthenticator::new(Some("public"));
        assert_eq!(auth.authenticate(&headers(None)), Ok(Tenant::new("public")));
        assert_eq!(auth.authenticate(&headers(Some("nope"))), Err(AuthError::UnknownToken));
    }
}
