//! Faults of the control plane under a serving operator, end to end: the API server killed for
//! 30 s, etcd restarted under the API server. Agents must not notice: they stay connected, keep
//! their config, a new agent gets its config from the operator's cache, and status catches up
//! once the API server is back.
//!
//! These tests stop parts of the control plane, so they run on a cluster of their own:
//! `<LOCAL_CLUSTER_DIR>-faults` (default `target/local-cluster-faults`), started on first use by
//! the same `tests/tools/local-cluster up` and taken down after the last test of this file. The
//! suite's shared cluster is never touched; cargo runs test binaries one after another, and the
//! tests here one at a time (the harness's lock), so only the small control plane is added.
mod common;

use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::env::TestEnv;
use common::eventually;
use common::simrun::RunningAgent;
use opamp_operator::api::AgentConfig;
use opamp_operator::sim::AgentSpec;

/// Deadline of every wait, including status catching up after the outage.
const T: Duration = Duration::from_secs(120);

/// How long the API server stays down.
const OUTAGE: Duration = Duration::from_secs(30);

/// Tests in this file: the last one to finish takes the dedicated cluster down.
const TESTS: usize = 2;
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// The dedicated cluster's directory, also given to `common::cluster` (through
/// `LOCAL_CLUSTER_DIR`, set once before any test reaches the cluster).
fn cluster_dir() -> PathBuf {
    static SET: Once = Once::new();
    let base = std::env::var("LOCAL_CLUSTER_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/local-cluster").to_owned());
    let dir = if base.ends_with("-faults") { base } else { format!("{base}-faults") };
    SET.call_once(|| {
        // SAFETY: called before any test of this binary starts a cluster or a runtime reads the
        // environment; every test goes through here first.
        unsafe { std::env::set_var("LOCAL_CLUSTER_DIR", &dir) };
    });
    PathBuf::from(dir)
}

/// `tests/tools/local-cluster <command>` on the dedicated cluster; panics with its output on
/// failure.
async fn local_cluster(command: &str) {
    let out = tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/local-cluster"))
        .arg(command)
        .env("LOCAL_CLUSTER_DIR", cluster_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run local-cluster {command}: {e}"));
    assert!(
        out.status.success(),
        "local-cluster {command} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counts a finished test; the last one takes the dedicated cluster down.
async fn finished() {
    if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
        local_cluster("down").await;
    }
}

fn edge_config(body: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: edge}}\nspec:\n  selector: {{matchAttributes: {{service.name: edge}}}}\n  files:\n    edge.yaml:\n      inline: '{body}'\n"
    )
}

/// `opamp_controller_errors_total{category="watch"}` as the operator reports it (0 when absent).
async fn watch_errors(metrics_url: &str) -> f64 {
    let text = reqwest::get(metrics_url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("opamp_controller_errors_total{") && l.contains("category=\"watch\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// What breaks under the operator.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// kube-apiserver SIGKILLed, back after [`OUTAGE`] on the same port with the same
    /// certificates; etcd keeps running.
    ApiServerDown,
    /// etcd stopped and started again on its data; kube-apiserver keeps running.
    EtcdRestart,
}

/// The scenario both faults share; prints the measured times.
async fn agents_do_not_notice(prefix: &str, fault: Fault) {
    cluster_dir();
    common::cluster::cluster().await;
    let env = TestEnv::new(prefix).deadline(T).start().await;
    env.apply(&edge_config("v: 1")).await;
    let agents: Vec<RunningAgent> = (0..2)
        .map(|_| RunningAgent::spawn(env.ws_url(), Some(env.token.clone()), AgentSpec::new("edge")))
        .collect();
    eventually(T, "both agents run the config", || async {
        agents.iter().all(|a| a.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    env.status_where::<AgentConfig>("edge", "both agents selected and applied", |s| {
        s.selected_agents == 2 && s.applied_agents == 2
    })
    .await;
    let received: Vec<usize> = agents.iter().map(RunningAgent::configs_received).collect();
    let errors_before = watch_errors(&env.metrics_url()).await;

    // The fault; for etcd the restart runs while the new agent connects.
    let started = Instant::now();
    let restart = match fault {
        Fault::ApiServerDown => {
            local_cluster("stop-apiserver").await;
            None
        }
        Fault::EtcdRestart => Some(tokio::spawn(local_cluster("restart-etcd"))),
    };
    let newcomer = RunningAgent::spawn(env.ws_url(), Some(env.token.clone()), AgentSpec::new("edge"));
    eventually(T, "the new agent gets its config from the cache", || async {
        (newcomer.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    let newcomer_served = started.elapsed();
    let healthz = env.api_url("/healthz");
    eventually(T, "/healthz answers during the fault", || async {
        reqwest::get(&healthz).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    if let Fault::ApiServerDown = fault {
        tokio::time::sleep(OUTAGE.saturating_sub(started.elapsed())).await;
        // Still down: everything the agents see comes from the operator alone.
        assert_eq!(env.op.fleet.connected_count(), 3, "agents dropped during the outage");
        local_cluster("start-apiserver").await;
    }
    if let Some(restart) = restart {
        restart.await.unwrap();
    }
    let outage = started.elapsed();

    let s = env
        .status_where::<AgentConfig>("edge", "status counts the new agent", |s| {
            s.selected_agents == 3 && s.applied_agents == 3
        })
        .await;
    let caught_up = started.elapsed();
    assert_eq!(s.selected_agents, 3);
    assert_eq!(env.op.fleet.connected_count(), 3, "agents dropped after the fault");
    for (agent, before) in agents.iter().zip(&received) {
        assert_eq!(agent.effective("edge.yaml").as_deref(), Some("v: 1"));
        assert_eq!(agent.configs_received(), *before, "an agent was sent its config again");
    }
    let errors_after = watch_errors(&env.metrics_url()).await;
    if let Fault::ApiServerDown = fault {
        assert!(errors_after > errors_before, "no watch error counted for the outage ({errors_after})");
    }
    eprintln!(
        "[faults] {fault:?}: new agent served after {newcomer_served:?}, control plane back after {outage:?}, \
         status caught up after {caught_up:?} ({:?} after the control plane), watch errors {errors_before} -> {errors_after}",
        caught_up - outage
    );

    newcomer.stop().await;
    for agent in agents {
        agent.stop().await;
    }
    env.stop().await;
    finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_down_for_30_s_changes_nothing_for_agents_and_status_catches_up() {
    agents_do_not_notice("fault-api", Fault::ApiServerDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_under_the_api_server_changes_nothing_for_agents() {
    agents_do_not_notice("fault-etcd", Fault::EtcdRestart).await;
}
