//! TLS for the OpAMP endpoint (rustls through tokio-rustls): certificate and key from PEM files,
//! reloaded when either file changes, so a rotated Secret takes effect without a restart. The
//! handshake itself runs in the connection's task, under its deadline (`server.rs`).
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

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

/// Uses ring as the process's rustls provider (shared with the other TLS addresses).
pub use crate::http_server::install_crypto_provider;

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
        crate::http_server::modified(&self.cert, &self.key)
    }

    pub(super) fn error(&self, source: std::io::Error) -> TlsError {
        TlsError { cert: self.cert.display().to_string(), key: self.key.display().to_string(), source }
    }

    /// Loads the files (a clear error when they are missing or invalid).
    pub async fn load(&self) -> Result<TlsConfig, TlsError> {
        let config = self.server_config().map_err(|e| self.error(e))?;
        Ok(TlsConfig(Arc::new(RwLock::new(Arc::new(config)))))
    }

    fn server_config(&self) -> std::io::Result<rustls::ServerConfig> {
        crate::http_server::install_crypto_provider();
        let (chain, key) = crate::http_server::read_identity(&self.cert, &self.key)?;
        let mut config =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).map_err(
                |e| std::io::Error::other(format!("certificate and key do not make a server identity: {e}")),
            )?;
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
