//! Minimal OpAMP transport clients.
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::proto::{AgentToServer, RetryInfo, ServerErrorResponseType, ServerToAgent, server_error_response};
use crate::protocol::{Uid, codec};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the server closed the connection: {0:?}")]
    Closed(Option<CloseFrame>),
    #[error("undecodable ServerToAgent: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// The server answered the upgrade with an HTTP status instead of switching protocols;
    /// with a `503`/`429` it may have said when to come back (`Retry-After`, or `RetryInfo` in
    /// a protobuf body).
    #[error("the upgrade was refused with HTTP {status} (retry after {retry_after:?})")]
    Refused { status: u16, retry_after: Option<Duration> },
    #[error("tls: {0}")]
    Tls(String),
}

/// A TLS client configuration trusting the certificates of a PEM file (and nothing else), for
/// `wss://` URLs.
pub fn tls_trusting(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", ca_file.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The byte stream under a WebSocket: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl ClientError {
    /// How long the server asked to wait before trying again, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn from_upgrade(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => {
                let status = resp.status().as_u16();
                let body = resp.body().as_deref().unwrap_or_default();
                let is_protobuf =
                    resp.headers().get("content-type").is_some_and(|v| v == "application/x-protobuf");
                let advised = is_protobuf
                    .then(|| ServerToAgent::decode(body).ok())
                    .flatten()
                    .and_then(|m| retry_info(&m));
                let retry_after = advised.or_else(|| retry_after_header(status, resp.headers()));
                ClientError::Refused { status, retry_after }
            }
            e => e.into(),
        }
    }
}

/// The wait an `UNAVAILABLE` `ServerErrorResponse` with `RetryInfo` asks for.
pub fn retry_info(msg: &ServerToAgent) -> Option<Duration> {
    let error = msg.error_response.as_ref()?;
    if error.r#type != ServerErrorResponseType::Unavailable as i32 {
        return None;
    }
    let server_error_response::Details::RetryInfo(RetryInfo { retry_after_nanoseconds }) = error.details?;
    Some(Duration::from_nanos(retry_after_nanoseconds))
}

/// The `Retry-After` (delay in seconds) of a `503` or `429`, as opamp-go reads it.
fn retry_after_header(status: u16, headers: &http::HeaderMap) -> Option<Duration> {
    if status != 503 && status != 429 {
        return None;
    }
    let secs = headers.get("retry-after")?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs))
}

/// What arrives on a WebSocket.
#[derive(Debug)]
pub enum WsEvent {
    Message(Box<ServerToAgent>),
    Closed(Option<CloseFrame>),
}

/// An OpAMP WebSocket client connection.
pub struct WsClient {
    ws: WebSocketStream<Box<dyn Io>>,
}

impl WsClient {
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Self, ClientError> {
        Self::connect_from(url, token, None).await
    }

    /// Connects from a chosen loopback source address when the server is on loopback (so one
    /// machine can open more connections than one address has ephemeral ports).
    pub async fn connect_from(
        url: &str,
        token: Option<&str>,
        source: Option<SocketAddr>,
    ) -> Result<Self, ClientError> {
        Self::connect_tls(url, token, source, None).await
    }

    /// [`WsClient::connect_from`], over TLS for a `wss://` URL (with `tls`, which is then
    /// required).
    pub async fn connect_tls(
        url: &str,
        token: Option<&str>,
        source: Option<SocketAddr>,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ClientError> {
        let mut req = url.into_client_request()?;
        if let Some(t) = token {
            req.headers_mut().insert("authorization", format!("Bearer {t}").parse().expect("valid header"));
        }
        let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 << 10);
        let host = req.uri().host().unwrap_or("localhost").trim_matches(['[', ']']).to_owned();
        let secure = req.uri().scheme_str() == Some("wss");
        let port = req.uri().port_u16().unwrap_or(if secure { 443 } else { 80 });
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(tungstenite::Error::Io)?
            .next()
            .ok_or_else(|| ClientError::Unexpected(format!("cannot resolve {host}")))?;
        let stream = match source.filter(|s| target.ip().is_loopback() && s.is_ipv4() == target.is_ipv4()) {
            Some(source) => {
                let socket = if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
                    .map_err(tungstenite::Error::Io)?;
                socket.bind(source).map_err(tungstenite::Error::Io)?;
                socket.connect(target).await.map_err(tungstenite::Error::Io)?
            }
            None => TcpStream::connect(target).await.map_err(tungstenite::Error::Io)?,
        };
        stream.set_nodelay(true).map_err(tungstenite::Error::Io)?;
        let stream: Box<dyn Io> = if secure {
            let tls = tls.ok_or_else(|| ClientError::Tls("wss:// needs a trust root (--ca-file)".into()))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ClientError::Tls(format!("{host}: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            Box::new(connector.connect(name, stream).await.map_err(|e| ClientError::Tls(e.to_string()))?)
        } else {
            Box::new(stream)
        };
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
            .await
            .map_err(ClientError::from_upgrade)?;
        Ok(Self { ws })
    }

    /// Sends one message with the standard header.
    pub async fn send(&mut self, msg: &AgentToServer) -> Result<(), ClientError> {
        let mut buf = Vec::with_capacity(1 + msg.encoded_len());
        buf.push(codec::WS_HEADER);
        msg.encode(&mut buf).expect("Vec grows");
        self.send_raw(Message::Binary(buf.into())).await
    }

    pub async fn send_raw(&mut self, frame: Message) -> Result<(), ClientError> {
        Ok(self.ws.send(frame).await?)
    }

    /// The next message or close, skipping pings.
    pub async fn next_event(&mut self) -> Result<WsEvent, ClientError> {
        loop {
            match self.ws.next().await {
                None => return Ok(WsEvent::Closed(None)),
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(WsEvent::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(data))) => {
                    let data = match data.first() {
                        Some(0) => data.slice(1..),
                        _ => return Err(ClientError::Unexpected("frame without the 0 header".into())),
                    };
                    return Ok(WsEvent::Message(Box::new(ServerToAgent::decode(data)?)));
                }
                Some(Ok(Message::Close(frame))) => return Ok(WsEvent::Closed(frame)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(t))) => return Err(ClientError::Unexpected(format!("text frame {t}"))),
            }
        }
    }

    /// The next message; a close is an error.
    pub async fn recv(&mut self) -> Result<ServerToAgent, ClientError> {
        match self.next_event().await? {
            WsEvent::Message(m) => Ok(*m),
            WsEvent::Closed(frame) => Err(ClientError::Closed(frame)),
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The plain-HTTP transport.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    gzip: bool,
}

/// A raw HTTP reply, decoded when it carried a protobuf body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    /// The body as sent (possibly gzip-compressed).
    pub raw: Bytes,
    pub message: Option<ServerToAgent>,
}

impl HttpReply {
    /// How long the server asked to wait before the next poll: the `RetryInfo` of an
    /// `UNAVAILABLE` error reply, else the `Retry-After` of a `503`/`429`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.message
            .as_ref()
            .and_then(retry_info)
            .or_else(|| retry_after_header(self.status.as_u16(), &self.headers))
    }
}

impl HttpClient {
    pub fn new(url: &str, token: Option<&str>, gzip: bool) -> Self {
        Self {
            client: reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client builds"),
            url: url.to_owned(),
            token: token.map(str::to_owned),
            gzip,
        }
    }

    /// The same client opening a new connection for every request (a Service without session
    /// affinity then sends each poll to a replica of its choice).
    pub fn without_keepalive(mut self) -> Self {
        self.client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client builds");
        self
    }

    /// Sends one message, with its uid in the `OpAMP-Instance-UID` header as opamp-go does
    /// (replicas route the poll by it without decoding).
    pub async fn send(&self, msg: &AgentToServer) -> Result<HttpReply, ClientError> {
        let body = msg.encode_to_vec();
        let uid = Uid::from_wire(&msg.instance_uid);
        self.post_as(body.into(), "application/x-protobuf", uid).await
    }

    /// Posts any body (gzip-compressed when the client compresses).
    pub async fn post(&self, body: Bytes, content_type: &str) -> Result<HttpReply, ClientError> {
        self.post_as(body, content_type, None).await
    }

    async fn post_as(
        &self,
        body: Bytes,
        content_type: &str,
        uid: Option<Uid>,
    ) -> Result<HttpReply, ClientError> {
        let mut req = self.client.post(&self.url).header("content-type", content_type);
        if let Some(uid) = uid {
            req = req.header("opamp-instance-uid", uid.to_string());
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let body = if self.gzip {
            req = req.header("content-encoding", "gzip").header("accept-encoding", "gzip");
            codec::gzip(&body)
        } else {
            body
        };
        let resp = req.body(body).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let raw = resp.bytes().await?;
        let gzipped = headers.get("content-encoding").is_some_and(|v| v == "gzip");
        let plain = if gzipped {
            codec::gunzip(&raw, 64 << 20).map_err(|e| ClientError::Unexpected(e.to_string()))?
        } else {
            raw.clone()
        };
        let is_protobuf = headers.get("content-type").is_some_and(|v| v == "application/x-protobuf");
        let message = if is_protobuf { Some(ServerToAgent::decode(plain)?) } else { None };
        Ok(HttpReply { status, headers, raw, message })
    }
}
