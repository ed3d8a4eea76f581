//! TLS on the OpAMP endpoint: opamp-go agents over wss:// and https://, and a certificate
//! rotated on disk taking effect without a restart.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::goagent::GoAgent;
use common::{eventually, within};
use opamp_operator::fleet::{AgentKey, Fleet};
use opamp_operator::opamp::{KindLabel, OpampServer, ServerConfig, ServerMetrics, TlsFiles};
use opamp_operator::protocol::{Transport, Uid};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(30);

/// A self-signed certificate for 127.0.0.1 (openssl, as on any machine with the tests).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    self_signed_with(dir, name, &[])
}

fn self_signed_with(dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}"))
        .args(extra)
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opamp-tls-{name}-{}", Uid::new_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start(files: TlsFiles) -> (std::net::SocketAddr, Fleet, tokio_util::sync::CancellationToken) {
    let (addr, fleet, stop, _) = start_with(files, ServerConfig::default()).await;
    (addr, fleet, stop)
}

async fn start_with(
    files: TlsFiles,
    config: ServerConfig,
) -> (std::net::SocketAddr, Fleet, tokio_util::sync::CancellationToken, Arc<ServerMetrics>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (fleet, metrics) = (Fleet::default(), Arc::new(ServerMetrics::default()));
    let server = OpampServer::new(fleet.clone(), config).with_metrics(metrics.clone());
    let stop = server.shutdown_token();
    tokio::spawn(async move { server.serve_tls(listener, files).await.expect("serves TLS") });
    (addr, fleet, stop, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_go_agents_connect_over_wss_and_https() {
    let dir = temp_dir("both");
    let (cert, key) = self_signed(&dir, "server");
    let (addr, fleet, stop) = start(TlsFiles { cert: cert.clone(), key }).await;
    for (scheme, transport) in [("wss", Transport::WebSocket), ("https", Transport::Http)] {
        let uid = Uid::new_v7();
        let url = format!("{scheme}://{addr}/v1/opamp");
        let ca = cert.to_str().unwrap();
        let mut agent =
            GoAgent::spawn(&["-url", &url, "-uid", &uid.to_string(), "-heartbeat", "500ms", "-ca", ca]);
        agent.wait_event(T, "connected").await;
        let snap = eventually(T, "agent reported over TLS", || async {
            fleet.agent(&AgentKey::new("default", uid)).filter(|a| a.report.description.is_some())
        })
        .await;
        assert_eq!(snap.transport, Some(transport));
        agent.stop().await;
    }
    stop.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_takes_effect_without_a_restart() {
    let dir = temp_dir("rotate");
    let (cert, key) = self_signed(&dir, "first");
    let (addr, fleet, stop) = start(TlsFiles { cert: cert.clone(), key: key.clone() }).await;
    let (cert2, key2) = self_signed(&dir, "second");
    // An agent that trusts only the second certificate cannot connect yet.
    let uid = Uid::new_v7();
    let url = format!("wss://{addr}/v1/opamp");
    let mut agent = GoAgent::spawn(&[
        "-url",
        &url,
        "-uid",
        &uid.to_string(),
        "-heartbeat",
        "500ms",
        "-ca",
        cert2.to_str().unwrap(),
    ]);
    let failed = agent.wait_event(T, "connect_failed").await;
    assert!(failed["error"].as_str().unwrap_or_default().contains("certificate"), "{failed}");
    // Rotate the files in place, as a Secret update does.
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    agent.wait_event(T, "connected").await;
    eventually(T, "agent known", || async {
        fleet.agent(&AgentKey::new("default", uid)).filter(|a| a.connected)
    })
    .await;
    agent.stop().await;
    stop.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_missing_certificate_is_a_clear_error() {
    let files = TlsFiles { cert: "/nonexistent/tls.crt".into(), key: "/nonexistent/tls.key".into() };
    let Err(err) = files.load().await else { panic!("a missing certificate was accepted") };
    assert!(err.to_string().contains("/nonexistent/tls.crt"), "{err}");
}

/// Reads (and drops) whatever the server sends until it closes the connection (EOF or reset).
async fn closed_by_server(tcp: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    while let Ok(1..) = tcp.read(&mut buf).await {}
}

/// A handshake that never finishes, and a finished one followed by no request, are both closed
/// at their deadlines.
#[tokio::test]
async fn stalled_handshakes_and_silent_tls_connections_are_closed_at_their_deadlines() {
    let dir = temp_dir("deadlines");
    // Not a CA: rustls, unlike Go, refuses a CA certificate as the server's own.
    let (cert, key) = self_signed_with(&dir, "server", &["-addext", "basicConstraints=critical,CA:FALSE"]);
    let (handshake, header) = (Duration::from_millis(500), Duration::from_millis(700));
    let config =
        ServerConfig { tls_handshake_timeout: handshake, header_read_timeout: header, ..Default::default() };
    let (addr, _fleet, stop, metrics) = start_with(TlsFiles { cert: cert.clone(), key }, config).await;
    let slack = Duration::from_secs(5);

    // Nothing, then the first bytes of a ClientHello's record header: no handshake either way.
    // Lower bounds from before the connect: the server's deadlines start later (its accept).
    let connecting = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    within(handshake + slack, "a silent peer closed", closed_by_server(&mut silent)).await;
    within(handshake + slack, "a partial ClientHello closed", closed_by_server(&mut partial)).await;
    assert!(connecting.elapsed() >= handshake - Duration::from_millis(10));
    let timeouts = |kind| metrics.connection_timeouts.get_or_create(&KindLabel { kind }).get();
    eventually(T, "two handshake timeouts counted", || async {
        (timeouts("tls_handshake") == 2).then_some(())
    })
    .await;

    // A finished handshake and no request: the header deadline.
    opamp_operator::opamp::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&cert).unwrap();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(der.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let connecting = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = within(T, "handshake", connector.connect(name, tcp)).await.unwrap();
    within(header + slack, "a silent TLS connection closed", closed_by_server(&mut tls)).await;
    assert!(connecting.elapsed() >= header - Duration::from_millis(10));
    eventually(T, "a header timeout counted", || async { (timeouts("header") == 1).then_some(()) }).await;
    stop.cancel();
    let _ = std::fs::remove_dir_all(dir);
}
