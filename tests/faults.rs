//! Faults of the control plane under a serving operator, end to end: the API server killed for
//! 30 s, etcd restarted under the API server. Agents must not notice: they stay connected, keep
//! their config, a new agent gets its config from the operator's cache, and status catches up
//! once the API server is back. And faults of the operator's own start: `run` started while
//! the API server is down waits for it and then serves; an operator SIGKILLed in the middle of
//! a Progressive rollout resumes it at its step without re-sending anyone's config.
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
use common::replica::Group;
use common::simrun::RunningAgent;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, RolloutState};
use opamp_operator::sim::AgentSpec;

/// Deadline of every wait, including status catching up after the outage.
const T: Duration = Duration::from_secs(120);

/// How long the API server stays down.
const OUTAGE: Duration = Duration::from_secs(30);

/// Tests in this file: the last one to finish takes the dedicated cluster down.
const TESTS: usize = 4;
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

/// How long the API server stays down before `run` is started and after.
const START_OUTAGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_started_while_the_api_server_is_down_waits_saying_so_then_serves() {
    cluster_dir();
    common::cluster::cluster().await;
    let tenants = TestEnv::new("fault-start").deadline(T).prepare().await;
    tenants.apply(&edge_config("v: 1")).await;
    let group = Group::new(&tenants.ns.name, tenants.names()).await;

    local_cluster("stop-apiserver").await;
    let down = Instant::now();
    let (mut replica, log) = group.spawn_logged("starter", None);
    let waiting = [
        "the Kubernetes API is not ready; retrying in ",
        "cannot reach the Kubernetes API server at https://",
    ];
    // Waits, alive, saying so once per try: /healthz answers (no liveness restart), /readyz not.
    let (healthz, readyz) = (replica.api_url("/healthz"), replica.api_url("/readyz"));
    while down.elapsed() < START_OUTAGE {
        assert!(replica.running(), "run exited while the API server was down");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if log.lines_with(&waiting).is_empty() {
            continue;
        }
        let health = reqwest::get(&healthz).await.map(|r| r.status().as_u16());
        assert_eq!(health.ok(), Some(200), "/healthz while waiting for the API server");
        let ready = reqwest::get(&readyz).await.map(|r| r.status().as_u16());
        assert_eq!(ready.ok(), Some(503), "/readyz while waiting for the API server");
    }
    let tries = log.lines_with(&waiting);
    assert!(tries.len() >= 3, "one line per try, retried: {tries:#?}");
    assert!(tries[0].contains("Connection refused"), "the cause is named: {}", tries[0]);
    local_cluster("start-apiserver").await;
    let api_back = down.elapsed();

    replica.wait_ready(T).await;
    let ready = down.elapsed();
    let agent = RunningAgent::spawn(
        format!("ws://{}/v1/opamp", replica.opamp_addr),
        Some(tenants.token.clone()),
        AgentSpec::new("edge"),
    );
    eventually(T, "the agent runs the config applied before the outage", || async {
        (agent.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    let served = down.elapsed();
    tenants
        .status_where::<AgentConfig>("edge", "the agent selected and applied", |s| {
            s.selected_agents == 1 && s.applied_agents == 1
        })
        .await;
    let status = down.elapsed();
    assert_eq!(agent.configs_received(), 1);
    assert_eq!(agent.duplicate_configs(), 0);
    eprintln!(
        "[faults] run started with the API server down: {} tries logged in {START_OUTAGE:?} (first: {:?}); \
         API server back after {api_back:?}, /readyz 200 after {ready:?} ({:?} after the API server), \
         agent served after {served:?}, status written after {status:?}",
        tries.len(),
        tries[0],
        ready - api_back
    );

    agent.stop().await;
    replica.terminate().await;
    tenants.cleanup().await;
    finished().await;
}

/// Agents of the rollout test.
const ROLLOUT_AGENTS: usize = 10;

fn rollout_config(body: &str, rollout: &str) -> String {
    format!("{}{rollout}", edge_config(body))
}

/// The rollout's step and admitted threshold as the status shows them.
fn rollout_of(s: &AgentConfigStatus) -> Option<(u32, RolloutState, Option<String>)> {
    s.rollout.as_ref().map(|r| (r.step, r.state, r.admitted_up_to.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_rollout_resumes_at_its_step_and_resends_nothing() {
    use k8s_openapi::api::coordination::v1::Lease;
    use opamp_operator::controller::rollout::{parse_threshold, rollout_key};
    cluster_dir();
    common::cluster::cluster().await;
    let tenants = TestEnv::new("fault-kill").deadline(T).prepare().await;
    let group = Group::new(&tenants.ns.name, tenants.names()).await;
    let (mut first, _) = group.spawn_logged("operator-0", None);
    first.wait_ready(T).await;
    let url = format!("ws://{}/v1/opamp", first.opamp_addr);
    let agents: Vec<RunningAgent> = (0..ROLLOUT_AGENTS)
        .map(|_| RunningAgent::spawn(url.clone(), Some(tenants.token.clone()), AgentSpec::new("edge")))
        .collect();
    tenants.apply(&edge_config("v: 1")).await;
    tenants
        .status_where::<AgentConfig>("edge", "v1 everywhere", |s| {
            s.applied_agents == ROLLOUT_AGENTS as u32
                && rollout_of(s).is_some_and(|r| r.1 == RolloutState::Complete)
        })
        .await;

    // v2 in steps; each step holds minHealthySeconds once its agents applied it.
    let rollout = "  rollout: {strategy: Progressive, steps: [20, 60, 100], minHealthySeconds: 15}\n";
    tenants.apply(&rollout_config("v: 2", rollout)).await;
    let on_v2 = |agents: &[RunningAgent]| -> Vec<bool> {
        agents.iter().map(|a| a.effective("edge.yaml").as_deref() == Some("v: 2")).collect()
    };
    let at_step_2 = tenants
        .status_where::<AgentConfig>("edge", "step 2, its agents applied v2", |s| {
            rollout_of(s).is_some_and(|r| r.0 == 2 && r.1 == RolloutState::Progressing)
                && on_v2(&agents).iter().filter(|v| **v).count() == 6
        })
        .await;
    let leases: kube::Api<Lease> = tenants.ns.api();
    let renewed = |l: Lease| l.spec.and_then(|s| s.renew_time).map(|t| format!("{t:?}"));
    let lease_before = renewed(leases.get("opamp-operator").await.unwrap());
    let opamp_addr = first.opamp_addr;
    first.kill().await;
    let killed = Instant::now();
    let admitted = at_step_2.rollout.as_ref().unwrap().admitted_up_to.clone().expect("a threshold");
    let had_v2 = on_v2(&agents);
    let received: Vec<usize> = agents.iter().map(RunningAgent::configs_received).collect();
    // The agents on v2 are the ones the status admits, by their rollout key.
    let key = format!("{}/edge", tenants.ns.name);
    let threshold = parse_threshold(&admitted).unwrap();
    for (a, v2) in agents.iter().zip(&had_v2) {
        assert_eq!(rollout_key(&key, &a.uid) <= threshold, *v2, "admitted and running v2 differ");
    }

    // Every status from now on, to check the rollout never goes back.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = {
        let (api, seen) = (tenants.ns.api::<AgentConfig>(), seen.clone());
        tokio::spawn(async move {
            loop {
                if let Some(r) =
                    api.get("edge").await.ok().and_then(|c| c.status).as_ref().and_then(rollout_of)
                {
                    seen.lock().unwrap().push(r);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Restarted as a Pod's container is: the same identity, the same OpAMP port.
    let (mut second, _) = group.spawn_logged("operator-0", Some(opamp_addr));
    second.wait_ready(T).await;
    let ready = killed.elapsed();
    eventually(T, "the new process holds the leader Lease", || async {
        let now = renewed(leases.get("opamp-operator").await.ok()?);
        (now != lease_before).then_some(())
    })
    .await;
    let leader = killed.elapsed();
    tenants.status_where::<AgentConfig>("edge", "step 3", |s| rollout_of(s).is_some_and(|r| r.0 == 3)).await;
    let step_3 = killed.elapsed();
    let done = tenants
        .status_where::<AgentConfig>("edge", "v2 complete everywhere", |s| {
            s.applied_agents == ROLLOUT_AGENTS as u32
                && rollout_of(s).is_some_and(|r| r.1 == RolloutState::Complete)
        })
        .await;
    let complete = killed.elapsed();
    watcher.abort();
    assert_eq!(done.rollout.as_ref().unwrap().step, 3);

    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|r| r.0 >= 2), "the rollout went back a step: {seen:?}");
    for r in seen.iter().filter(|r| r.0 == 2) {
        assert_eq!(r.2.as_deref(), Some(admitted.as_str()), "step 2 admitted other agents: {seen:?}");
    }
    for (i, a) in agents.iter().enumerate() {
        assert_eq!(a.effective("edge.yaml").as_deref(), Some("v: 2"), "agent {i}");
        let sent = a.configs_received() - received[i];
        let want = if had_v2[i] { 0 } else { 1 };
        assert_eq!(sent, want, "configs sent to agent {i} (on v2 before the kill: {})", had_v2[i]);
        assert_eq!(a.duplicate_configs(), 0, "agent {i} was sent a config it runs");
    }
    eprintln!(
        "[faults] operator SIGKILLed at step 2 of 3 ({} of {ROLLOUT_AGENTS} agents on v2): new process ready \
         after {ready:?}, leader after {leader:?}, step 3 after {step_3:?}, complete after {complete:?} \
         ({} status samples, none before step 2)",
        had_v2.iter().filter(|v| **v).count(),
        seen.len()
    );

    for a in agents {
        a.stop().await;
    }
    second.terminate().await;
    tenants.cleanup().await;
    finished().await;
}
