//! Drives `opampsupervisor` managing our test collector `otelcol-opamp-test` (both built by
//! `make tools-otel`): writes the supervisor's configuration, runs it in a process group of its
//! own (the collector is its child), and stops the two together.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::cluster::tool;

/// The supervisor configuration the README recommends, for `endpoint` and an agent token.
pub fn config(endpoint: &str, token: &str, collector: &Path, storage: &Path) -> String {
    format!(
        r#"server:
  endpoint: {endpoint}
  headers:
    Authorization: ["Bearer {token}"]
capabilities:
  accepts_remote_config: true
  reports_remote_config: true
  reports_effective_config: true
  reports_health: true
  reports_available_components: true
  reports_own_metrics: false
agent:
  executable: {collector}
  # The collector's own telemetry would listen on :8888, which several collectors on one host
  # cannot share.
  args: ["--set=service.telemetry.metrics.level=none"]
  # Check a new config with the collector before switching to it: a broken config is reported
  # FAILED with the collector's own error, and the running collector keeps its last good one.
  validate_config: true
  config_apply_timeout: 2s
  # The supervisor first runs the collector to learn its description; the default 3 s is not
  # enough on two busy cores ("collector's OpAMP client never connected to the Supervisor").
  bootstrap_timeout: 30s
storage:
  directory: {storage}
"#,
        collector = collector.display(),
        storage = storage.display(),
    )
}

pub struct Supervisor {
    child: Child,
    /// The process group: the supervisor and the collectors it starts.
    group: u32,
    dir: PathBuf,
}

impl Supervisor {
    /// Starts a supervisor connecting to `endpoint` (ws://… or http://…/v1/opamp).
    pub fn spawn(endpoint: &str, token: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-supervisor-{}", uuid::Uuid::new_v4()));
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let path = dir.join("supervisor.yaml");
        std::fs::write(&path, config(endpoint, token, &tool("otelcol-opamp-test"), &storage)).unwrap();
        let log = std::fs::File::create(dir.join("supervisor.log")).unwrap();
        let child = Command::new(tool("opampsupervisor"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn opampsupervisor");
        let group = child.id().expect("a running child has a pid");
        Self { child, group, dir }
    }

    /// The supervisor's log and the collector's (for failure messages).
    pub fn logs(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let tail =
            |s: String| s.chars().rev().take(6000).collect::<Vec<_>>().into_iter().rev().collect::<String>();
        format!(
            "--- supervisor log ---\n{}\n--- collector log ---\n{}",
            tail(read(self.dir.join("supervisor.log"))),
            tail(read(self.dir.join("storage").join("agent.log")))
        )
    }

    /// Stops the supervisor as an operator would (SIGINT: it stops the collector, tells the
    /// server it disconnects, and exits), then makes sure nothing of the group is left.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            signal("-INT", &pid.to_string());
            let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        signal("-KILL", &format!("-{}", self.group)); // whatever is left of the group
        let _ = self.child.try_wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("supervisor files kept in {}", self.dir.display());
        }
    }
}

fn signal(sig: &str, target: &str) {
    let _ = std::process::Command::new("kill").args([sig, "--", target]).stderr(Stdio::null()).status();
}
