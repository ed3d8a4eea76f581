//! The operator end to end against a real kube-apiserver + etcd: custom resources in, configs
//! to real agents (opamp-go and ours), status out.
mod common;

use std::time::Duration;

use common::env::{Tenant, TestEnv};
use common::goagent::GoAgent;
use common::operator::test_config;
use common::simrun::RunningAgent;
use common::{eventually, within};
use k8s_openapi::api::core::v1::Event as KubeEvent;
use opamp_operator::api::{AgentConfig, AgentConfigStatus};
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::protocol::Uid;
use opamp_operator::sim::AgentSpec;

const T: Duration = Duration::from_secs(30);

fn agent_config(name: &str, selector: &str, files: &str, extra: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: {name}}}\nspec:\n  selector: {selector}\n  files:\n{files}{extra}"
    )
}

fn inline(file: &str, body: &str) -> String {
    format!("    {file}:\n      contentType: text/yaml\n      inline: |\n        {body}\n")
}

fn spec(service: &str) -> AgentSpec {
    AgentSpec::new(service)
}

async fn status_where(
    tenant: &Tenant,
    name: &str,
    what: &str,
    pred: impl Fn(&AgentConfigStatus) -> bool,
) -> AgentConfigStatus {
    tenant.status_where::<AgentConfig>(name, what, pred).await
}

fn condition<'a>(s: &'a AgentConfigStatus, t: &str) -> (&'a str, &'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no condition {t}: {s:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_edit_fail_and_status() {
    let env = TestEnv::new("e2e-apply").with_token("tok-apply").start().await;
    let url = env.ws_url();

    // Two Rust agents and one opamp-go agent of service checkout, one agent of another service.
    let a1 = RunningAgent::spawn(url.clone(), Some("tok-apply".into()), spec("checkout"));
    let a2 = RunningAgent::spawn(url.clone(), Some("tok-apply".into()), spec("checkout"));
    let other = RunningAgent::spawn(url.clone(), Some("tok-apply".into()), spec("payments"));
    let go_uid = Uid::new_v7();
    let mut go = GoAgent::spawn(&[
        "-url",
        &url,
        "-uid",
        &go_uid.to_string(),
        "-token",
        "tok-apply",
        "-heartbeat",
        "1s",
        "-attr",
        "service.name=checkout",
    ]);
    go.wait_event(T, "connected").await;

    let cfg = agent_config(
        "checkout",
        "{matchAttributes: {service.name: checkout}}",
        &inline("collector.yaml", "receivers: {otlp: {}}"),
        "",
    );
    env.apply(&cfg).await;
    let s = status_where(&env, "checkout", "3 agents applied, Ready", |s| {
        s.applied_agents == 3 && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await;
    assert_eq!((s.selected_agents, s.failed_agents, s.pending_agents), (3, 0, 0));
    assert!(s.config_hash.as_deref().unwrap().starts_with("sha256:"));
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(condition(&s, "Ready").1, "Applied");
    assert_eq!(a1.effective("collector.yaml").as_deref(), Some("receivers: {otlp: {}}\n"));
    assert_eq!(other.configs_received(), 0, "payments is not selected");
    let got = go.wait_event(T, "remote_config").await;
    assert_eq!(got["files"]["collector.yaml"], "receivers: {otlp: {}}\n");

    // An edit: a new hash everywhere.
    let edited = agent_config(
        "checkout",
        "{matchAttributes: {service.name: checkout}}",
        &inline("collector.yaml", "receivers: {otlp: {protocols: {grpc: {}}}}"),
        "",
    );
    env.apply(&edited).await;
    let s2 = status_where(&env, "checkout", "edit applied", |x| {
        x.applied_agents == 3 && x.observed_generation == Some(2) && x.config_hash != s.config_hash
    })
    .await;
    assert_eq!(condition(&s2, "Ready").0, "True");
    assert_eq!(
        a2.effective("collector.yaml").as_deref(),
        Some("receivers: {otlp: {protocols: {grpc: {}}}}\n")
    );

    // A config the agents reject: failures and Degraded.
    let bad = agent_config(
        "checkout",
        "{matchAttributes: {service.name: checkout}}",
        &inline("collector.yaml", "FAIL_ME"),
        "",
    );
    env.apply(&bad).await;
    let s3 = status_where(&env, "checkout", "3 failed", |x| x.failed_agents == 3).await;
    assert_eq!(condition(&s3, "Degraded").0, "True");
    assert_eq!(condition(&s3, "Ready").0, "False");
    assert_eq!(s3.failures.len(), 3);
    // Three of three failed: more than the failed gate's 20% (an Immediate rollout is gated too).
    let s3 = status_where(&env, "checkout", "halted", |x| {
        x.rollout.as_ref().is_some_and(|r| r.state == opamp_operator::api::RolloutState::Halted)
    })
    .await;
    assert_eq!(condition(&s3, "Degraded").1, "RolloutHalted");
    let gate = s3.rollout.as_ref().and_then(|r| r.tripped.clone()).expect("the tripped gate");
    assert_eq!(gate.gate, "FailedRatio");
    assert!(s3.failures.iter().any(|f| f.instance_uid == go_uid.to_string() && f.message == "config rejected: contains FAIL_ME"));
    // Events tell the story.
    let events: kube::Api<KubeEvent> = env.ns.api();
    let reasons = eventually(T, "events", || async {
        let list = events.list(&Default::default()).await.ok()?;
        let r: Vec<String> = list.items.into_iter().filter_map(|e| e.reason).collect();
        (r.iter().any(|x| x == "RolloutHalted") && r.iter().any(|x| x == "RolloutComplete")).then_some(r)
    })
    .await;
    assert!(reasons.iter().any(|x| x == "RolloutStarted"), "{reasons:?}");

    // Metrics tell the same story.
    let text = reqwest::get(env.metrics_url()).await.unwrap().text().await.unwrap();
    for line in [
        "opamp_agents_connected{transport=\"websocket\"} 4",
        "opamp_remote_config_statuses{status=\"failed\"} 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("opamp_messages_received_total{kind=\"report\"}"), "{text}");
    assert!(text.contains("opamp_status_patches_total{state=\"ok\"}"), "{text}");

    go.stop().await;
    for a in [a1, a2, other] {
        a.stop().await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_reference_conflicts_and_selector_release() {
    let env = TestEnv::new("e2e-refs").with_token("tok-refs").start().await;
    let url = env.ws_url();
    let mut s = spec("api");
    s.non_identifying.push(("deployment.environment".into(), "prod".into()));
    let agent = RunningAgent::spawn(url.clone(), Some("tok-refs".into()), s);

    // A ConfigMap that does not exist yet.
    let from_cm = "    collector.yaml:\n      configMapKeyRef: {name: otel, key: collector.yaml}\n";
    env.apply(&agent_config("from-cm", "{}", from_cm, "")).await;
    let st = status_where(&env, "from-cm", "ReferenceNotFound", |x| {
        x.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "ReferenceNotFound")
    })
    .await;
    assert!(condition(&st, "Ready").2.contains("ConfigMap \"otel\" not found"), "{st:?}");
    assert_eq!(agent.configs_received(), 0);
    // Creating it fixes it, without a new generation.
    env.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: otel}\ndata: {collector.yaml: 'from: configmap'}\n").await;
    status_where(&env, "from-cm", "applied after the ConfigMap appeared", |x| x.applied_agents == 1).await;
    assert_eq!(agent.effective("collector.yaml").as_deref(), Some("from: configmap"));
    // Editing the ConfigMap re-rolls.
    env.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: otel}\ndata: {collector.yaml: 'from: configmap v2'}\n").await;
    eventually(T, "ConfigMap edit reaches the agent", || async {
        (agent.effective("collector.yaml").as_deref() == Some("from: configmap v2")).then_some(())
    })
    .await;

    // Two AgentConfigs set the same file: the higher priority wins, the other gets Conflict.
    let high = agent_config(
        "override",
        "{matchExpressions: [{key: deployment.environment, operator: In, values: [prod]}]}",
        &inline("collector.yaml", "from: override"),
        "  priority: 10\n",
    );
    env.apply(&high).await;
    let lost = status_where(&env, "from-cm", "Conflict", |x| {
        x.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True")
    })
    .await;
    assert!(condition(&lost, "Conflict").2.contains(&format!("{}/override", env.ns.name)), "{lost:?}");
    eventually(T, "override wins", || async {
        (agent.effective("collector.yaml").as_deref() == Some("from: override\n")).then_some(())
    })
    .await;
    let won = status_where(&env, "override", "override applied", |x| x.applied_agents == 1).await;
    assert_eq!(condition(&won, "Conflict").0, "False");

    // The selector stops matching: the agent is released (sent an empty config).
    let narrowed = agent_config(
        "override",
        "{matchExpressions: [{key: deployment.environment, operator: In, values: [staging]}]}",
        &inline("collector.yaml", "from: override"),
        "  priority: 10\n",
    );
    env.apply(&narrowed).await;
    status_where(&env, "override", "no agents selected", |x| x.selected_agents == 0).await;
    eventually(T, "back to the ConfigMap's file", || async {
        (agent.effective("collector.yaml").as_deref() == Some("from: configmap v2")).then_some(())
    })
    .await;
    env.ns.api::<AgentConfig>().delete("from-cm", &Default::default()).await.unwrap();
    eventually(T, "released: empty config", || async {
        agent.effective("collector.yaml").is_none().then_some(())
    })
    .await;

    agent.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_tokens_and_restart() {
    let env = TestEnv::new("e2e-team-a")
        .with_token("tok-team-a")
        .tenant_with_token("e2e-team-b", "tok-team-b")
        .start()
        .await;
    let a = env.tenant(0);
    let url = env.ws_url();

    // Unknown or missing tokens are refused.
    for token in [None, Some("nope")] {
        let http = opamp_operator::sim::HttpClient::new(&env.http_url(), token, false);
        let reply = http.send(&opamp_operator::sim::SimAgent::new(spec("x")).full_state()).await.unwrap();
        assert_eq!(reply.status, 401);
    }

    a.apply(&agent_config("all", "{}", &inline("a.yaml", "team: a"), "")).await;
    let agent_a = RunningAgent::spawn(url.clone(), Some("tok-team-a".into()), spec("svc"));
    let agent_b = RunningAgent::spawn(url.clone(), Some("tok-team-b".into()), spec("svc"));
    status_where(a, "all", "team a applied", |x| x.applied_agents == 1 && x.selected_agents == 1).await;
    assert_eq!(agent_a.effective("a.yaml").as_deref(), Some("team: a\n"));
    assert_eq!(agent_b.configs_received(), 0, "namespace B never sees namespace A's config");
    assert!(agent_b.effective("a.yaml").is_none());

    // Operator restart (on the same address): agents reconnect and are not sent the unchanged
    // config again.
    let received = agent_a.configs_received();
    let env = env.restart().await;
    let (a, op) = (env.tenant(0), &env.op);
    eventually(T, "agent back", || async {
        op.fleet.agent(&a.key(agent_a.uid)).filter(|x| x.connected && x.report.remote_config_status.is_some())
    })
    .await;
    status_where(a, "all", "still applied after restart", |x| x.applied_agents == 1).await;
    // A few heartbeats later, still nothing re-sent.
    let seen = op.fleet.agent(&a.key(agent_a.uid)).unwrap().last_seen;
    eventually(T, "two more heartbeats", || async {
        let later = op.fleet.agent(&a.key(agent_a.uid))?.last_seen;
        (later.duration_since(seen).unwrap_or_default() >= Duration::from_secs(2)).then_some(())
    })
    .await;
    assert_eq!(agent_a.configs_received(), received);
    assert_eq!(agent_a.duplicate_configs(), 0);

    agent_a.stop().await;
    agent_b.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_rollout_halts_at_max_failures_and_resumes_on_spec_change() {
    let env = TestEnv::new("e2e-progressive").with_token("tok-prog").start().await;
    let url = env.ws_url();
    let agents: Vec<RunningAgent> =
        (0..4).map(|_| RunningAgent::spawn(url.clone(), Some("tok-prog".into()), spec("edge"))).collect();
    eventually(T, "4 agents connected", || async { (env.op.fleet.connected_count() == 4).then_some(()) })
        .await;

    let rollout =
        "  rollout: {strategy: Progressive, steps: [25, 50], minHealthySeconds: 0, maxFailures: 0}\n";
    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "FAIL_ME"), rollout)).await;
    let halted = status_where(&env, "edge", "halted", |s| {
        s.rollout.as_ref().is_some_and(|r| r.state == opamp_operator::api::RolloutState::Halted)
    })
    .await;
    assert_eq!((halted.failed_agents, halted.pending_agents, halted.selected_agents), (1, 3, 4));
    assert_eq!(condition(&halted, "Degraded").1, "RolloutHalted");
    assert_eq!(condition(&halted, "Ready").0, "False");
    // Only the first step's agent was ever offered the bad config.
    let offered: usize = agents.iter().map(|a| a.configs_received()).sum();
    assert_eq!(offered, 1);

    // A fixed spec resumes: steps 25% → 50% → 100%, all applied, Complete and Ready.
    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "fixed: true"), rollout)).await;
    let done = status_where(&env, "edge", "complete", |s| {
        s.applied_agents == 4
            && s.rollout.as_ref().is_some_and(|r| r.state == opamp_operator::api::RolloutState::Complete)
    })
    .await;
    assert_eq!(done.rollout.as_ref().unwrap().step, 3);
    assert_eq!(condition(&done, "Ready").0, "True");
    for a in agents {
        assert_eq!(a.effective("edge.yaml").as_deref(), Some("fixed: true\n"));
        a.stop().await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tripped_gate_rolls_the_admitted_agents_back_to_the_last_healthy_revision() {
    use opamp_operator::api::RolloutState;
    let env = TestEnv::new("e2e-rollback").with_token("tok-rb").start().await;
    let url = env.ws_url();
    let agents: Vec<RunningAgent> =
        (0..4).map(|_| RunningAgent::spawn(url.clone(), Some("tok-rb".into()), spec("edge"))).collect();
    eventually(T, "4 agents connected", || async { (env.op.fleet.connected_count() == 4).then_some(()) })
        .await;
    let rollout = "  rollout: {strategy: Progressive, steps: [25, 50], onFailure: Rollback}\n";
    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "v: 1"), rollout)).await;
    let v1 = status_where(&env, "edge", "v1 complete", |s| {
        s.applied_agents == 4 && s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::Complete)
    })
    .await;
    let healthy = v1.last_healthy_revision.clone().expect("a last healthy revision");
    assert_eq!(v1.update_revision.as_ref(), Some(&healthy));
    assert_eq!(v1.current_revision.as_ref(), Some(&healthy));
    let before: Vec<usize> = agents.iter().map(RunningAgent::configs_received).collect();

    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "FAIL_ME"), rollout)).await;
    let back = status_where(&env, "edge", "rolled back, and the agent that took it applied v1 again", |s| {
        s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::RolledBack) && s.applied_agents == 4
    })
    .await;
    let r = back.rollout.as_ref().unwrap();
    assert_eq!(r.rolled_back_to.as_ref(), Some(&healthy));
    assert_eq!(r.tripped.as_ref().map(|g| g.gate.as_str()), Some("FailedRatio"));
    assert_ne!(back.update_revision.as_ref(), Some(&healthy));
    assert_eq!(back.current_revision.as_ref(), Some(&healthy));
    assert_eq!(back.last_healthy_revision.as_ref(), Some(&healthy));
    assert_eq!(condition(&back, "Degraded").1, "RolledBack");
    let after: Vec<usize> = agents.iter().map(RunningAgent::configs_received).collect();
    let sent: Vec<usize> = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    // The first step's agent got the bad version and then v1 again; the others nothing.
    let mut sorted = sent.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 0, 0, 2], "configs sent per agent since v1: {sent:?}");
    for a in &agents {
        assert_eq!(a.effective("edge.yaml").as_deref(), Some("v: 1\n"));
    }
    let revisions: kube::Api<k8s_openapi::api::apps::v1::ControllerRevision> = env.ns.api();
    let names = eventually(T, "two revisions", || async {
        let list = revisions.list(&Default::default()).await.ok()?;
        let names: Vec<String> = list.items.iter().filter_map(|r| r.metadata.name.clone()).collect();
        (names.len() == 2).then_some(names)
    })
    .await;
    assert!(names.contains(&healthy), "{names:?}");
    let events: kube::Api<KubeEvent> = env.ns.api();
    eventually(T, "a RolledBack event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("RolledBack")).then_some(())
    })
    .await;
    // Argo CD shows it Degraded, saying why.
    let object: kube::Api<AgentConfig> = env.ns.api();
    let json = serde_json::to_value(object.get("edge").await.unwrap()).unwrap();
    let health = common::argocd::health(&json);
    assert_eq!(health.status, "Degraded");
    assert!(health.message.starts_with("RolledBack: gate FailedRatio"), "{}", health.message);
    let text = reqwest::get(env.metrics_url()).await.unwrap().text().await.unwrap();
    let line = "opamp_rollouts_stopped_total{gate=\"FailedRatio\",outcome=\"RolledBack\"} 1";
    assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    for a in agents {
        a.stop().await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rollout_holds_until_resumed() {
    use opamp_operator::api::RolloutState;
    let env = TestEnv::new("e2e-paused").with_token("tok-pause").start().await;
    let url = env.ws_url();
    let agents: Vec<RunningAgent> =
        (0..4).map(|_| RunningAgent::spawn(url.clone(), Some("tok-pause".into()), spec("edge"))).collect();
    eventually(T, "4 agents connected", || async { (env.op.fleet.connected_count() == 4).then_some(()) })
        .await;
    let paused = "  rollout: {strategy: Progressive, steps: [25, 50], paused: true}\n";
    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "v: 1"), paused)).await;
    let held = status_where(&env, "edge", "paused", |s| {
        s.selected_agents == 4 && s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::Paused)
    })
    .await;
    assert_eq!((held.pending_agents, held.applied_agents), (4, 0), "{held:?}");
    assert_eq!(condition(&held, "Ready").1, "RolloutPaused");
    let object: kube::Api<AgentConfig> = env.ns.api();
    let json = serde_json::to_value(object.get("edge").await.unwrap()).unwrap();
    assert_eq!(common::argocd::health(&json).status, "Suspended");
    assert!(agents.iter().all(|a| a.configs_received() == 0), "nobody is given a paused rollout's config");
    let resumed = "  rollout: {strategy: Progressive, steps: [25, 50], paused: false}\n";
    env.apply(&agent_config("edge", "{}", &inline("edge.yaml", "v: 1"), resumed)).await;
    status_where(&env, "edge", "complete once resumed", |s| {
        s.applied_agents == 4 && s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::Complete)
    })
    .await;
    for a in agents {
        a.stop().await;
    }
    env.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_clear_error() {
    let mut config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(2));
    let client = kube::Client::try_from(config).unwrap();
    let err = within(T, "start fails", Operator::start(client, test_config())).await.err().expect("refused");
    assert_eq!(err.category(), "unreachable");
    assert!(err.to_string().starts_with("cannot reach the Kubernetes API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_status_and_a_follower_takes_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    use opamp_operator::controller::leader::LeaderElectionConfig;
    // Two replicas of our own: the namespace only.
    let tenants = TestEnv::new("e2e-leader").with_token("tok-leader").prepare().await;
    let ns = &tenants.ns;
    let replica = |identity: &str| {
        let mut election = LeaderElectionConfig::new(&ns.name, identity);
        election.lease_duration = Duration::from_secs(3);
        election.renew_every = Duration::from_millis(500);
        OperatorConfig {
            leader_election: Some(election),
            namespaces: Some(vec![ns.name.clone()]),
            ..test_config()
        }
    };
    let chart_identity = common::cluster::cluster().await.client_as_chart_identity(&ns.name).await;
    let leases: kube::Api<Lease> = ns.api();
    let holder = |name: &'static str| {
        let leases = leases.clone();
        async move {
            eventually(T, &format!("{name} holds the Lease"), || async {
                let lease = leases.get("opamp-operator").await.ok()?;
                (lease.spec?.holder_identity.as_deref() == Some(name)).then_some(())
            })
            .await
        }
    };
    let first = within(T, "first replica", Operator::start(chart_identity.clone(), replica("replica-1")))
        .await
        .unwrap();
    holder("replica-1").await;
    let second =
        within(T, "second replica", Operator::start(chart_identity, replica("replica-2"))).await.unwrap();

    // Every replica serves OpAMP: the agent talks to the follower, which gives it its config.
    let url = format!("ws://{}/v1/opamp", second.opamp_addr);
    let agent = RunningAgent::spawn(url, Some("tok-leader".into()), spec("edge"));
    tenants.apply(&agent_config("edge", "{}", &inline("edge.yaml", "leader: test"), "")).await;
    eventually(T, "the follower serves the config", || async {
        (agent.effective("edge.yaml").as_deref() == Some("leader: test\n")).then_some(())
    })
    .await;
    // Only the leader writes status, and it does not hold the agent.
    let s =
        status_where(&tenants, "edge", "written by the leader", |s| s.observed_generation == Some(1)).await;
    assert_eq!(s.selected_agents, 0, "the follower wrote status: {s:?}");
    eventually(T, "the agent reported APPLIED to the follower", || async {
        let a = second.fleet.agent(&tenants.key(agent.uid))?;
        (a.report.remote_config_status?.status == opamp_operator::proto::RemoteConfigStatuses::Applied as i32)
            .then_some(())
    })
    .await;
    let again = ns.api::<AgentConfig>().get("edge").await.unwrap().status.unwrap();
    assert_eq!(again.selected_agents, 0, "the follower wrote status: {again:?}");

    // The leader crashes (the Lease is not released): the follower takes over once the Lease
    // expires, and writes what it sees.
    let crashed = std::time::Instant::now();
    first.kill();
    holder("replica-2").await;
    eprintln!("failover after a crash took {:?} (lease duration 3 s)", crashed.elapsed());
    let s = status_where(&tenants, "edge", "written by the new leader", |s| s.applied_agents == 1).await;
    assert_eq!(s.selected_agents, 1);
    agent.stop().await;
    second.stop().await;
    tenants.cleanup().await;
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn run_waits_for_an_api_server_that_is_not_up_yet_then_serves() {
    let cluster = common::cluster::cluster().await;
    // The operator runs as a process of its own: the namespace only.
    let tenants = TestEnv::new("e2e-late-api").prepare().await;
    let ns = &tenants.ns;
    // The operator is pointed at a port where the API server is not (yet) reachable.
    let (api_port, late_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("opamp-late-api-{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: late, cluster: {{server: 'https://127.0.0.1:{late_port}', certificate-authority: '{}'}}}}]\nusers: [{{name: admin, user: {{token: '{}'}}}}]\ncontexts: [{{name: late, context: {{cluster: late, user: admin}}}}]\ncurrent-context: late\n",
            cluster.ca_file.display(),
            cluster.admin_token
        ),
    )
    .unwrap();
    let log = dir.join("operator.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_opamp-operator"))
        .args([
            "run",
            "--opamp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--aggregated-api-addr",
            "127.0.0.1:0",
            "--namespaces",
            &ns.name,
        ])
        .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the operator binary starts");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(T, "a clear line saying it waits for the API server", || async {
        read_log().contains("the Kubernetes API is not ready; retrying").then_some(())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the operator exited:\n{}", read_log());

    // The API server "comes up" on that port: a forwarder to the real one.
    let upstream = cluster.server.trim_start_matches("https://").to_owned();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", late_port)).await.unwrap();
    let forwarder = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let ready = format!("http://127.0.0.1:{api_port}/readyz");
    eventually(Duration::from_secs(60), "the operator ready once the API server is there", || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    let text = read_log();
    assert!(!text.contains("panicked") && !text.contains("stack backtrace"), "{text}");
    child.kill().await.unwrap();
    forwarder.abort();
    let _ = std::fs::remove_dir_all(&dir);
    tenants.cleanup().await;
}
