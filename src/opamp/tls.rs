//! TLS for the OpAMP endpoint (rustls through tokio-rustls): certificate and key from PEM files,
//! reloaded when either file changes, so a rotated Secret takes effect without a restart. The
//! handshake itself runs in the connection's task, under its deadline (`server.rs`).
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Where the serving certificate and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load the TLS certificate {cert} / key {key}: {source}")]
pub struct TlsError {
    cert: String,
    key: String,
    #[source]
    source: std::io::Error,
}

/// Uses ring (already used by the Kubernetes client) as the process's rustls provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The current server configuration, swapped in place on reload: each new connection takes
/// the one current when it was accepted.
#[derive(Clone)]
pub struct TlsConfig(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl TlsConfig {
    /// An acceptor for one new connection.
    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn set(&self, config: rustls::ServerConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}

impl TlsFiles {
    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&self.cert)?, m(&self.key)?))
    }

    pub(super) fn error(&self, source: std::io::Error) -> TlsError {
        TlsError { cert: self.cert.display().to_string(), key: self.key.display().to_string(), source }
    }

    /// Loads the files (a clear error when they are missing or invalid).
    pub async fn load(&self) -> Result<TlsConfig, TlsError> {
        let config = self.server_config().map_err(|e| self.error(e))?;
        Ok(TlsConfig(Arc::new(RwLock::new(Arc::new(config)))))
    }

    /// Reads two small files: blocking the runtime for that is cheaper than a thread hop.
    fn server_config(&self) -> std::io::Result<rustls::ServerConfig> {
        install_crypto_provider();
        let invalid = |what: &str, e: &dyn std::fmt::Display| std::io::Error::other(format!("{what}: {e}"));
        let (cert, key) = (std::fs::read(&self.cert)?, std::fs::read(&self.key)?);
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("invalid certificate PEM", &e))?;
        if chain.is_empty() {
            return Err(std::io::Error::other("no certificate in the certificate file"));
        }
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| invalid("invalid private key PEM", &e))?;
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| invalid("certificate and key do not make a server identity", &e))?;
        // HTTP/1.1 only: WebSocket upgrades need it, and the endpoint serves no HTTP/2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Reloads `config` whenever either file changes (checked every `every`), until cancelled.
    /// A change that does not load (e.g. the key written before the certificate) keeps the
    /// previous pair and is retried on the next change.
    pub async fn watch(self, config: TlsConfig, every: Duration, shutdown: CancellationToken) {
        let mut seen = self.modified();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.modified();
            if now == seen {
                continue;
            }
            match self.server_config() {
                Ok(new) => {
                    config.set(new);
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    seen = now;
                }
                Err(e) => tracing::warn!(error = %self.error(e), "TLS certificate not reloaded"),
            }
        }
    }
}
