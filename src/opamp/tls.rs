//! TLS for the OpAMP endpoint (rustls): certificate and key from PEM files, reloaded when
//! either file changes, so a rotated Secret takes effect without a restart.
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
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

impl TlsFiles {
    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&self.cert)?, m(&self.key)?))
    }

    pub(super) fn error(&self, source: std::io::Error) -> TlsError {
        TlsError { cert: self.cert.display().to_string(), key: self.key.display().to_string(), source }
    }

    /// Loads the files (a clear error when they are missing or invalid).
    pub async fn load(&self) -> Result<RustlsConfig, TlsError> {
        install_crypto_provider();
        RustlsConfig::from_pem_file(&self.cert, &self.key).await.map_err(|e| self.error(e))
    }

    /// Reloads `config` whenever either file changes (checked every `every`), until cancelled.
    /// A change that does not load (e.g. the key written before the certificate) keeps the
    /// previous pair and is retried on the next change.
    pub async fn watch(self, config: RustlsConfig, every: Duration, shutdown: CancellationToken) {
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
            match config.reload_from_pem_file(&self.cert, &self.key).await {
                Ok(()) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    seen = now;
                }
                Err(e) => tracing::warn!(error = %self.error(e), "TLS certificate not reloaded"),
            }
        }
    }
}
