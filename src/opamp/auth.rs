//! Who an agent is: a bearer token maps it to a namespace (its tenant).
use axum::http::HeaderMap;

use crate::fleet::Tenant;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("unknown bearer token")]
    UnknownToken,
}

/// Decides which tenant a connecting agent belongs to.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Tenant, AuthError>;
}

/// Admits every agent into one namespace (the library default, and anonymous agents).
#[derive(Debug, Clone)]
pub struct AdmitAll(pub Tenant);

impl Authenticator for AdmitAll {
    fn authenticate(&self, _: &HeaderMap) -> Result<Tenant, AuthError> {
        Ok(self.0.clone())
    }
}
