//! Who calls the aggregated API: only the Kubernetes API server, which authenticated the user
//! already and says who it is in request headers, proving it is the API server with a client
//! certificate signed by the request-header CA (the "front proxy", as for every aggregated API
//! server: metrics-server, sample-apiserver).
//!
//! - The request-header CA, the allowed client names and the header names come from the
//!   ConfigMap `kube-system/extension-apiserver-authentication` that kube-apiserver publishes
//!   (read with a `get` every [`CONFIG_REFRESH`]: the Role
//!   `extension-apiserver-authentication-reader` grants it).
//! - The TLS handshake verifies a client certificate against that CA (TLS serving without one
//!   is allowed, so that a bare request gets a clear 401); [`FrontProxy::authenticate`] then
//!   wants the certificate's CN among the allowed names (any, when the list is empty) and a
//!   user name header. Headers without such a certificate are never believed.
//! - The serving certificate comes from files (reloaded when they change) or, without them, is
//!   self-signed at start (an APIService then needs `insecureSkipTLSVerify`).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

use crate::access::User;
use crate::http_server::ClientCertificates;

/// The ConfigMap kube-apiserver publishes its request-header settings in.
pub const AUTHENTICATION_CONFIG_MAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");
/// How often that ConfigMap (and the serving certificate files) are read again.
pub const CONFIG_REFRESH: Duration = Duration::from_secs(30);
/// The group every authenticated user is in.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// How often the serving certificate files are checked for changes.
const FILES_REFRESH: Duration = Duration::from_secs(2);

/// The request-header settings of the API server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// PEM certificates of the request-header CA.
    pub ca_pem: String,
    /// Client certificate CNs allowed to assert users (any signed by the CA when empty).
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub uid_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

impl RequestHeader {
    /// Reads the ConfigMap's data; `None` when it has no request-header CA.
    pub fn from_config_map(cm: &ConfigMap) -> Option<Self> {
        let data = cm.data.as_ref()?;
        let ca_pem = data.get("requestheader-client-ca-file").filter(|s| !s.trim().is_empty())?.clone();
        let list = |key: &str, default: &[&str]| -> Vec<String> {
            data.get(key)
                .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
                .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
        };
        Some(Self {
            ca_pem,
            allowed_names: list("requestheader-allowed-names", &[]),
            username_headers: list("requestheader-username-headers", &["X-Remote-User"]),
            uid_headers: list("requestheader-uid-headers", &[]),
            group_headers: list("requestheader-group-headers", &["X-Remote-Group"]),
            extra_prefixes: list("requestheader-extra-headers-prefix", &["X-Remote-Extra-"]),
        })
    }
}

/// Where the serving certificate and key are.
#[derive(Debug, Clone)]
pub struct ServingFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a caller is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error(
        "no client certificate of the API server's front proxy: only the Kubernetes API server may call this API"
    )]
    NoCertificate,
    #[error(
        "the API server's request-header settings are not known (kube-system/extension-apiserver-authentication \
         unreadable, or without requestheader-client-ca-file)"
    )]
    NotConfigured,
    #[error("client certificate {0:?} is not among the allowed front-proxy names")]
    NameNotAllowed(String),
    #[error("the front proxy named no user")]
    NoUser,
}

/// The state the server's TLS and authentication read.
#[derive(Default)]
struct Current {
    request_header: Option<RequestHeader>,
    config: Option<Arc<rustls::ServerConfig>>,
}

/// The aggregated API's TLS configuration and front-proxy authentication.
#[derive(Clone)]
pub struct FrontProxy {
    current: Arc<RwLock<Current>>,
    serving: Arc<Serving>,
}

/// The serving identity: files, or a self-signed certificate made at start.
enum Serving {
    Files(ServingFiles),
    SelfSigned { chain: Vec<CertificateDer<'static>>, key_der: Vec<u8> },
}

/// Why the serving identity cannot be loaded or made.
#[derive(Debug, thiserror::Error)]
#[error("aggregated API serving certificate: {0}")]
pub struct ServingError(String);

impl FrontProxy {
    /// With `files`, or a self-signed certificate for `names` (DNS names or IPs).
    pub fn new(files: Option<ServingFiles>, names: &[String]) -> Result<Self, ServingError> {
        let serving = match files {
            Some(f) => {
                let me = Serving::Files(f);
                me.identity()?; // a clear error at start
                me
            }
            None => {
                let cert = rcgen::generate_simple_self_signed(names.to_vec())
                    .map_err(|e| ServingError(format!("cannot make a self-signed certificate: {e}")))?;
                Serving::SelfSigned {
                    chain: vec![cert.cert.der().clone()],
                    key_der: cert.signing_key.serialize_der(),
                }
            }
        };
        Ok(Self { current: Arc::default(), serving: Arc::new(serving) })
    }

    /// The TLS configuration for a new connection (`None` before the first [`Self::configure`]).
    pub fn tls(&self) -> crate::http_server::TlsSource {
        let current = self.current.clone();
        Arc::new(move || current.read().unwrap_or_else(|e| e.into_inner()).config.clone())
    }

    /// Builds the TLS configuration for `request_header` (or, without one, a configuration that
    /// verifies no client: every request is then refused).
    pub fn configure(&self, request_header: Option<RequestHeader>) -> Result<(), ServingError> {
        crate::http_server::install_crypto_provider();
        let (chain, key) = self.serving.identity()?;
        let builder = rustls::ServerConfig::builder();
        let builder = match request_header.as_ref().map(|r| client_roots(&r.ca_pem)) {
            Some(Ok(roots)) => {
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| ServingError(format!("request-header CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            Some(Err(e)) => return Err(e),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| ServingError(format!("certificate and key do not make a server identity: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Current { request_header, config: Some(Arc::new(config)) };
        Ok(())
    }

    /// The user the front proxy asserts for a request of a connection that presented `certs`.
    pub fn authenticate(
        &self,
        certs: &ClientCertificates,
        headers: &HeaderMap,
    ) -> Result<User, Unauthenticated> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let rh = current.request_header.as_ref().ok_or(Unauthenticated::NotConfigured)?;
        let leaf = certs.0.first().ok_or(Unauthenticated::NoCertificate)?;
        authenticate(rh, leaf, headers)
    }

    /// Keeps the request-header settings and the serving certificate current until `shutdown`:
    /// reads the ConfigMap every [`CONFIG_REFRESH`] (every two seconds while it cannot be read)
    /// and checks the files every two seconds.
    pub async fn run(self, client: Client, shutdown: CancellationToken) {
        let api: Api<ConfigMap> = Api::namespaced(client, AUTHENTICATION_CONFIG_MAP.0);
        let mut last_read: Option<tokio::time::Instant> = None;
        let mut seen_files = self.serving.modified();
        let mut request_header = None;
        let mut configured = false;
        let mut failing_since = None;
        loop {
            let due = last_read.is_none_or(|at| at.elapsed() >= CONFIG_REFRESH);
            let mut changed = false;
            if due {
                last_read = Some(tokio::time::Instant::now());
                match api.get_opt(AUTHENTICATION_CONFIG_MAP.1).await {
                    Ok(cm) => {
                        failing_since = None;
                        let read = cm.as_ref().and_then(RequestHeader::from_config_map);
                        if read.is_none() {
                            tracing::warn!(
                                "no request-header CA in kube-system/extension-apiserver-authentication: \
                                 the aggregated API refuses every request (is kube-apiserver's aggregation layer on?)"
                            );
                        }
                        changed |= read != request_header;
                        request_header = read;
                    }
                    Err(e) => {
                        // Tried again at the next look (every two seconds) until it is read,
                        // told once a refresh period.
                        if failing_since.is_none_or(|at: tokio::time::Instant| at.elapsed() >= CONFIG_REFRESH)
                        {
                            tracing::warn!(
                                error = %e,
                                "cannot read kube-system/extension-apiserver-authentication (the Role \
                                 extension-apiserver-authentication-reader grants it): the aggregated API \
                                 refuses every request until it is read"
                            );
                            failing_since = Some(tokio::time::Instant::now());
                        }
                        last_read = None;
                    }
                }
            }
            let files = self.serving.modified();
            changed |= files != seen_files;
            if changed || (!configured && (due || files != seen_files)) {
                match self.configure(request_header.clone()) {
                    Ok(()) => {
                        if configured {
                            tracing::info!("aggregated API TLS configuration reloaded");
                        }
                        configured = true;
                        seen_files = files;
                    }
                    Err(e) => tracing::warn!(error = %e, "aggregated API TLS configuration not (re)loaded"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FILES_REFRESH) => {}
            }
        }
    }
}

impl Serving {
    fn identity(&self) -> Result<crate::http_server::Identity, ServingError> {
        match self {
            Serving::SelfSigned { chain, key_der } => {
                let key =
                    PrivateKeyDer::try_from(key_der.clone()).map_err(|e| ServingError(e.to_string()))?;
                Ok((chain.clone(), key))
            }
            Serving::Files(f) => crate::http_server::read_identity(&f.cert, &f.key)
                .map_err(|e| ServingError(format!("{} / {}: {e}", f.cert.display(), f.key.display()))),
        }
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        match self {
            Serving::Files(f) => crate::http_server::modified(&f.cert, &f.key),
            Serving::SelfSigned { .. } => None,
        }
    }
}

fn client_roots(pem: &str) -> Result<RootCertStore, ServingError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| ServingError(format!("request-header CA PEM: {e}")))?;
        roots.add(cert).map_err(|e| ServingError(format!("request-header CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ServingError("no certificate in the request-header CA".into()));
    }
    Ok(roots)
}

/// The user of a request whose connection presented `leaf` (verified against the CA already).
fn authenticate(
    rh: &RequestHeader,
    leaf: &CertificateDer<'_>,
    headers: &HeaderMap,
) -> Result<User, Unauthenticated> {
    let cn = common_name(leaf).unwrap_or_default();
    if !rh.allowed_names.is_empty() && !rh.allowed_names.contains(&cn) {
        return Err(Unauthenticated::NameNotAllowed(cn));
    }
    let first = |names: &[String]| {
        names
            .iter()
            .find_map(|h| headers.get(h.as_str()).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()))
    };
    let name = first(&rh.username_headers).ok_or(Unauthenticated::NoUser)?.to_owned();
    let uid = first(&rh.uid_headers).map(str::to_owned);
    let mut groups: Vec<String> = rh
        .group_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned))
        .collect();
    // As Kubernetes' delegating authenticator does: whoever the API server vouches for is
    // authenticated (its own calls, e.g. `system:kube-aggregator`, come without groups).
    if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        groups.push(AUTHENTICATED_GROUP.to_owned());
    }
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, value) in headers {
        let lower = header.as_str(); // header names are lowercase in `http`
        for prefix in &rh.extra_prefixes {
            let prefix = prefix.to_ascii_lowercase();
            if let (Some(key), Ok(value)) = (lower.strip_prefix(&prefix), value.to_str()) {
                if !key.is_empty() {
                    extra.entry(percent_decode(key).to_lowercase()).or_default().push(value.to_owned());
                }
            }
        }
    }
    Ok(User { name, uid, groups, extra })
}

/// `%2F` → `/` (extra keys are escaped in header names).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The subject CN of a certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allowed: &[&str]) -> RequestHeader {
        RequestHeader {
            ca_pem: String::new(),
            allowed_names: allowed.iter().map(|s| s.to_string()).collect(),
            username_headers: vec!["X-Remote-User".into()],
            uid_headers: vec!["X-Remote-Uid".into()],
            group_headers: vec!["X-Remote-Group".into()],
            extra_prefixes: vec!["X-Remote-Extra-".into()],
        }
    }

    fn cert(cn: &str) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_front_proxy_names_the_user_groups_and_extra() {
        let h = headers(&[
            ("X-Remote-User", "alice"),
            ("X-Remote-Uid", "u-1"),
            ("X-Remote-Group", "team-a"),
            ("X-Remote-Group", "system:authenticated"),
            ("X-Remote-Extra-Scopes", "read"),
            ("X-Remote-Extra-Acme.com%2Fproject", "p1"),
        ]);
        let user = authenticate(&settings(&["front-proxy-client"]), &cert("front-proxy-client"), &h).unwrap();
        assert_eq!(user.name, "alice");
        assert_eq!(user.uid.as_deref(), Some("u-1"));
        assert_eq!(user.groups, ["team-a", "system:authenticated"], "given once, kept once");
        assert_eq!(user.extra["scopes"], ["read"]);
        assert_eq!(user.extra["acme.com/project"], ["p1"]);
    }

    #[test]
    fn only_allowed_names_and_a_named_user_pass() {
        let h = headers(&[("X-Remote-User", "alice")]);
        assert_eq!(
            authenticate(&settings(&["front-proxy-client"]), &cert("someone-else"), &h),
            Err(Unauthenticated::NameNotAllowed("someone-else".into()))
        );
        let user = authenticate(&settings(&[]), &cert("anyone"), &h).expect("no list: any CA-signed cert");
        assert_eq!(user.groups, ["system:authenticated"], "added as the API server would");
        assert_eq!(
            authenticate(&settings(&[]), &cert("front-proxy-client"), &headers(&[])),
            Err(Unauthenticated::NoUser)
        );
    }

    /// Headers alone (no client certificate) are never believed.
    #[test]
    fn headers_without_a_certificate_are_refused() {
        let proxy = FrontProxy::new(None, &["localhost".into()]).unwrap();
        proxy.configure(Some(RequestHeader { ca_pem: pem_of_self_signed(), ..settings(&[]) })).unwrap();
        let h = headers(&[("X-Remote-User", "system:admin"), ("X-Remote-Group", "system:masters")]);
        assert_eq!(
            proxy.authenticate(&ClientCertificates::default(), &h),
            Err(Unauthenticated::NoCertificate)
        );
    }

    /// Until the API server's settings are read, nobody is believed, and the answer says why.
    #[test]
    fn nothing_is_believed_before_the_settings_are_known() {
        let proxy = FrontProxy::new(None, &["localhost".into()]).unwrap();
        let certs = ClientCertificates(Arc::new(vec![cert("front-proxy-client")]));
        let h = headers(&[("X-Remote-User", "alice")]);
        assert_eq!(proxy.authenticate(&certs, &h), Err(Unauthenticated::NotConfigured));
    }

    fn pem_of_self_signed() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_config_map_is_read_with_kubernetes_defaults() {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
            "data": {
                "requestheader-client-ca-file": "-----BEGIN CERTIFICATE-----\n...",
                "requestheader-allowed-names": "[\"front-proxy-client\"]",
                "requestheader-username-headers": "[\"X-Remote-User\"]",
            }
        }))
        .unwrap();
        let rh = RequestHeader::from_config_map(&cm).unwrap();
        assert_eq!(rh.allowed_names, ["front-proxy-client"]);
        assert_eq!(rh.group_headers, ["X-Remote-Group"]);
        assert_eq!(rh.extra_prefixes, ["X-Remote-Extra-"]);
        let empty: ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {}, "data": {}})).unwrap();
        assert!(RequestHeader::from_config_map(&empty).is_none());
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%"), "%");
    }
}
