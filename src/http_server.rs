//! The HTTP server of the API address (dispatch API, fleet listing, health) and the metrics
//! address: like the OpAMP endpoint, every connection is under deadlines and their number is
//! capped, so idle sockets, trickled headers or stalled bodies cannot pile up and use the
//! process's open files (which the OpAMP endpoint shares).
//!
//! Its callers are services and scrapers, not agents polling at long intervals, so hyper's own
//! header timeout, which also closes a kept-alive connection idle for that long, is what is
//! wanted here (they reconnect).
//!
//! Also the bounded body read that the OpAMP endpoint and the dispatch API share (`read_body`),
//! and the PEM serving identity that the OpAMP endpoint and the aggregated API read (`read_identity`).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deadlines and the connection cap of one address.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request's head must arrive within this, from the accept or the previous response
    /// (an idle kept-alive connection is closed then too).
    pub header_read_timeout: Duration,
    /// A request (body read and answer) must complete within this; beyond, 408 and the request
    /// is dropped with what it buffered.
    pub request_timeout: Duration,
    /// Open connections at most; beyond, accepting pauses until one closes. Small: its callers
    /// are a few services and scrapers, and these files come out of the OpAMP endpoint's reserve
    /// (`--max-connections`).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 128,
        }
    }
}

/// Serves `router` until `shutdown`, then lets the requests in flight finish (each within its
/// deadline) and closes idle connections.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: CancellationToken) {
    serve_with(listener, router, limits, shutdown, None).await
}

/// The server configuration a new TLS connection takes (the current one: it may be replaced
/// while serving, e.g. when a CA rotates), or `None` to refuse connections for now.
pub type TlsSource = Arc<dyn Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync>;

/// The certificates a TLS client presented (verified by the server configuration's client
/// verifier; empty when it presented none), in every request of its connection's extensions.
#[derive(Debug, Clone, Default)]
pub struct ClientCertificates(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// Like [`serve`], over TLS: the handshake is part of the header deadline, and each request
/// carries its connection's [`ClientCertificates`].
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    tls: TlsSource,
) {
    serve_with(listener, router, limits, shutdown, Some(tls)).await
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    tls: Option<TlsSource>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let tcp = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let (router, limits, shutdown, tls) = (router.clone(), limits.clone(), shutdown.clone(), tls.clone());
        connections.spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                return serve_connection(TokioIo::new(tcp), router, limits, shutdown).await;
            };
            let Some(config) = tls() else {
                tracing::debug!("TLS not configured yet: connection closed");
                return;
            };
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
            let stream = match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            };
            let certs = stream.get_ref().1.peer_certificates().map(|c| c.to_vec()).unwrap_or_default();
            let certs = ClientCertificates(Arc::new(certs));
            let router = router.layer(axum::Extension(certs));
            serve_connection(TokioIo::new(stream), router, limits, shutdown).await
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection's requests under `limits` until it closes or `shutdown`.
async fn serve_connection<I>(io: TokioIo<I>, router: Router, limits: Limits, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = limits.request_timeout;
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let response = tower_service::Service::call(&mut router.clone(), req);
        async move {
            Ok::<_, Infallible>(match tokio::time::timeout(timeout, response).await {
                Ok(Ok(response)) => response,
                Err(_) => (http::StatusCode::REQUEST_TIMEOUT, "request timed out").into_response(),
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.request_timeout, conn).await;
        }
    }
}

/// Uses ring (already used by the Kubernetes client) as the process's rustls provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A serving identity: its certificate chain and key.
pub type Identity =
    (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

/// Reads a certificate chain and its key from PEM files (two small files: blocking the runtime
/// for that is cheaper than a thread hop); a clear error when either is missing or invalid.
pub fn read_identity(cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<Identity> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| std::io::Error::other(format!("{what}: {e}"));
    let (cert, key) = (std::fs::read(cert)?, std::fs::read(key)?);
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("invalid certificate PEM", &e))?;
    if chain.is_empty() {
        return Err(std::io::Error::other("no certificate in the certificate file"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| invalid("invalid private key PEM", &e))?;
    Ok((chain, key))
}

/// When a certificate and key file last changed (`None` when either cannot be read), to reload
/// them on a change.
pub fn modified(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
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
