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
  accepts_restart_command: true
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
        Self::spawn_with(endpoint, token, |yaml| yaml)
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

/// The supervisor's own log at debug level, appended to [`config`]: it then logs each remote
/// config it receives, with its hash ("Received remote config from server"), which
/// [`Supervisor::received_config_hashes`] reads.
pub const DEBUG_LOGS: &str = "telemetry:\n  logs:\n    level: debug\n";

/// What the supervisor keeps of itself in its storage (`persistent_state.yaml`): its instance
/// uid and the last remote config status it reported.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PersistentState {
    /// The instance uid it reports (a UUID).
    #[serde(default)]
    pub instance_id: String,
    #[serde(default)]
    pub last_remote_config_status: Option<SavedConfigStatus>,
}

/// The last RemoteConfigStatus the supervisor reported, as it saved it.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct SavedConfigStatus {
    /// The `RemoteConfigStatuses` number (1 APPLIED, 2 APPLYING, 3 FAILED).
    #[serde(default)]
    pub status: i32,
    /// The hash of the remote config it is about, as the supervisor writes it.
    #[serde(default)]
    pub last_remote_config_hash: String,
    #[serde(default)]
    pub error_message: String,
}

impl Supervisor {
    /// [`Supervisor::spawn`] with the configuration [`config`] writes passed through `edit`
    /// first (e.g. another `config_apply_timeout`, or [`DEBUG_LOGS`] appended).
    pub fn spawn_with(endpoint: &str, token: &str, edit: impl FnOnce(String) -> String) -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-supervisor-{}", uuid::Uuid::new_v4()));
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let path = dir.join("supervisor.yaml");
        let yaml = edit(config(endpoint, token, &tool("otelcol-opamp-test"), &storage));
        std::fs::write(&path, yaml).unwrap();
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

    /// The pid of the collector the supervisor runs now (a process of its group running the
    /// collector's executable), if one runs.
    pub fn collector_pid(&self) -> Option<u32> {
        let collector = tool("otelcol-opamp-test");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid pgrp ...: the fields after the last ')'.
            let pgrp: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(2)?.parse().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            let same = exe == collector || std::fs::canonicalize(&collector).is_ok_and(|c| c == exe);
            (pgrp == self.group && same).then_some(pid)
        })
    }

    /// The supervisor's persistent state, once it wrote it.
    pub fn persistent_state(&self) -> Option<PersistentState> {
        let text = std::fs::read_to_string(self.dir.join("storage").join("persistent_state.yaml")).ok()?;
        serde_yaml::from_str(&text).ok()
    }

    /// The hashes (lowercase hex) of the remote configs the supervisor received from the
    /// server, in order: one per AgentRemoteConfig message it processed. Only logged with
    /// [`DEBUG_LOGS`].
    pub fn received_config_hashes(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Received remote config from server"))
            .filter_map(logged_hash)
            .collect()
    }
}

/// The value of the `hash` field of a supervisor log line (console or JSON encoding).
fn logged_hash(line: &str) -> Option<String> {
    let rest = &line[line.find("\"hash\"")? + "\"hash\"".len()..];
    let rest = rest.trim_start_matches([':', ' ', '"']);
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    Some(hex.to_ascii_lowercase())
}
