//! Drives the opamp-go interop agent (`tests/interop/agent`, built by `make tools-interop`):
//! spawns it, reads its JSON event lines, writes its stdin commands.
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::cluster::tool;

pub struct GoAgent {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::UnboundedReceiver<Value>,
    /// Every event seen so far, in order.
    pub events: Vec<Value>,
}

impl GoAgent {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(tool("opamp-interop-agent"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn opamp-interop-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("interop agent printed a non-JSON line: {line}"),
                }
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, rx, events: Vec::new() }
    }

    /// Waits for the next event satisfying `pred` (events before it are kept in `events`).
    pub async fn wait_for(&mut self, deadline: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some(ev)) => {
                    self.events.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                }
                Ok(None) => {
                    panic!("interop agent exited while waiting for {what}; events: {:#?}", self.events)
                }
                Err(_) => {
                    panic!("timed out after {deadline:?} waiting for {what}; events: {:#?}", self.events)
                }
            }
        }
    }

    pub async fn wait_event(&mut self, deadline: Duration, name: &str) -> Value {
        self.wait_for(deadline, name, |e| e["event"] == name).await
    }

    /// Takes what has arrived without waiting.
    pub fn drain(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.events.push(ev);
        }
    }

    pub fn count(&mut self, name: &str) -> usize {
        self.drain();
        self.events.iter().filter(|e| e["event"] == name).count()
    }

    pub async fn command(&mut self, cmd: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Stops the agent cleanly and checks it exits 0.
    pub async fn stop(mut self) {
        self.command(serde_json::json!({"cmd": "stop"})).await;
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("agent stops")
            .unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}
