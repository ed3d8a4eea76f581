//! A replica as its own process: `opamp-operator run --peers --leader-election`, as the chart
//! runs it, with the chart's RBAC identity, on loopback ports picked for it. Stopped with SIGTERM
//! (a rolling update) or SIGKILL (a crash).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::peers::PeerIdentity;

pub struct Replica {
    pub identity: String,
    pub opamp_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    child: Child,
}

/// A loopback port free right now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A kubeconfig whose current context is the chart's identity (`e2e-operator`), next to ours.
pub async fn chart_kubeconfig() -> PathBuf {
    let cluster = super::cluster::cluster().await;
    let text = std::fs::read_to_string(&cluster.kubeconfig_path).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["current-context"] = "e2e-operator".into();
    let path = cluster.kubeconfig_path.with_file_name("kubeconfig-e2e-operator");
    std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
    path
}

/// What every replica of a test shares.
#[derive(Clone)]
pub struct Group {
    /// Where the Leases are (and the chart's RBAC is bound).
    pub home: String,
    pub namespaces: Vec<String>,
    pub peer: PeerIdentity,
    pub kubeconfig: PathBuf,
}

impl Group {
    pub async fn new(home: &str, namespaces: Vec<String>) -> Self {
        // Bind the chart's RBAC in `home`, as the chart does in its release namespace.
        let _ = super::cluster::cluster().await.client_as_chart_identity(home).await;
        Self {
            home: home.into(),
            namespaces,
            peer: super::peers::identity(home).await,
            kubeconfig: chart_kubeconfig().await,
        }
    }

    /// Starts a replica and waits until it is ready. The loopback ports are picked free just
    /// before; one taken meanwhile (the process exits: address in use) is tried again with others.
    pub async fn start(&self, identity: &str) -> Replica {
        for _ in 0..5 {
            let mut replica = self.spawn(identity);
            let ready = format!("http://{}/readyz", replica.api_addr);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = replica.child.try_wait() {
                    eprintln!("{identity} exited at start ({status}); trying other ports");
                    break;
                }
                if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                    return replica;
                }
                assert!(tokio::time::Instant::now() < deadline, "{identity} not ready within 60 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("{identity} did not start in five tries");
    }

    fn spawn(&self, identity: &str) -> Replica {
        let addrs = (free_port(), free_port(), free_port(), free_port());
        let mut cmd = self.command(identity, addrs);
        cmd.stderr(Stdio::inherit());
        let child = cmd.spawn().expect("the operator binary starts");
        let (opamp_addr, api_addr, metrics_addr, peer_addr) = addrs;
        Replica { identity: identity.into(), opamp_addr, api_addr, metrics_addr, peer_addr, child }
    }

    /// Starts a replica without waiting for it (see [`Replica::wait_ready`]), its OpAMP
    /// endpoint on `opamp_addr` when given (where the agents of a killed one reconnect), else on
    /// a free port; its log is kept in the returned [`Log`] (and echoed to stderr).
    pub fn spawn_logged(&self, identity: &str, opamp_addr: Option<SocketAddr>) -> (Replica, Log) {
        let addrs = (opamp_addr.unwrap_or_else(free_port), free_port(), free_port(), free_port());
        let mut cmd = self.command(identity, addrs);
        cmd.stderr(Stdio::piped()).env("NO_COLOR", "1");
        let mut child = cmd.spawn().expect("the operator binary starts");
        let log = Log::default();
        let (lines, who) = (log.0.clone(), identity.to_owned());
        let stderr = child.stderr.take().expect("piped");
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{who}] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        let (opamp_addr, api_addr, metrics_addr, peer_addr) = addrs;
        (Replica { identity: identity.into(), opamp_addr, api_addr, metrics_addr, peer_addr, child }, log)
    }

    /// `opamp-operator run` as the chart runs it, on these addresses (OpAMP, API, metrics, peer).
    fn command(&self, identity: &str, addrs: (SocketAddr, SocketAddr, SocketAddr, SocketAddr)) -> Command {
        let (opamp_addr, api_addr, metrics_addr, peer_addr) = addrs;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_opamp-operator"));
        cmd.arg("run")
            .args(["--opamp-addr", &opamp_addr.to_string()])
            .args(["--api-addr", &api_addr.to_string()])
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(["--aggregated-api-addr", "off"])
            .args(["--peer-addr", &peer_addr.to_string()])
            .args(["--peer-advertise", &peer_addr.to_string()])
            .args(["--peers", "--peer-group", "opamp-e2e", "--peer-lease-seconds", "3"])
            .arg("--peer-token-file")
            .arg(&self.peer.token_file)
            .args(["--peer-users", &self.peer.user])
            .args(["--leader-election", "--leader-election-lease-seconds", "3"])
            .args(["--leader-election-namespace", &self.home])
            .args(["--identity", identity])
            .args(["--namespaces", &self.namespaces.join(",")])
            .args(["--heartbeat-seconds", "1", "--shutdown-grace-seconds", "2"])
            .args(["--callback-allow", "127.0.0.1/32"])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_IP")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

/// The log lines of a replica started with [`Group::spawn_logged`].
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    /// The lines so far that contain every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines.iter().filter(|l| parts.iter().all(|p| l.contains(p))).cloned().collect()
    }
}

impl Replica {
    /// The process id, to read its `/proc` entries.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Waits until `/readyz` answers 200; panics if the process exits first or `deadline`
    /// passes.
    pub async fn wait_ready(&mut self, deadline: Duration) {
        let ready = self.api_url("/readyz");
        let end = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited before it was ready ({status})", self.identity);
            }
            if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(tokio::time::Instant::now() < end, "{} not ready within {deadline:?}", self.identity);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api_addr)
    }

    /// SIGTERM, as a rolling update stops a pod; waits until the process exits.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(status.success());
        let exited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        assert!(exited.is_ok(), "{} did not exit within 30 s of SIGTERM", self.identity);
    }

    /// SIGKILL: gone at once, its Leases left to lapse.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// One value of the replica's `/metrics` (the sum of its series matching `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let body = reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .and_then(|r| r.error_for_status())
            .map(|r| r.text());
        let Ok(body) = body else { return 0.0 };
        let text = body.await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
