//! TLS on the OpAMP endpoint: opamp-go agents over wss:// and https://, and a certificate
//! rotated on disk taking effect without a restart.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::eventually;
use common::goagent::GoAgent;
use opamp_operator::fleet::{AgentKey, Fleet, Transport};
use opamp_operator::opamp::{OpampServer, ServerConfig, TlsFiles, Uid};

const T: Duration = Duration::from_secs(30);

/// A self-signed certificate for 127.0.0.1 (openssl, as on any machine with the tests).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}"))
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fleet = Fleet::default();
    let server = OpampServer::new(fleet.clone(), ServerConfig::default());
    let stop = server.shutdown_token();
    tokio::spawn(async move { server.serve_tls(listener, files).await.expect("serves TLS") });
    (addr, fleet, stop)
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
