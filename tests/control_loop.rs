//! The control loop in one direction, end to end against a real kube-apiserver: every replica
//! plans (a progressive rollout reaches every agent, whichever replica holds it), and a slow API
//! server delays status, never configs.
mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use common::env::{Tenant, TestEnv};
use common::eventually;
use common::operator::test_config;
use common::simrun::RunningAgent;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, RolloutState};
use opamp_operator::controller::leader::LeaderElectionConfig;
use opamp_operator::fleet::{AgentKey, Fleet};
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::sim::AgentSpec;

const T: Duration = Duration::from_secs(60);

fn edge_config(body: &str, rollout: &str) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: edge}}\nspec:\n  selector: {{matchAttributes: {{service.name: edge}}}}\n  files:\n    edge.yaml:\n      inline: '{body}'\n{rollout}"
    )
}

async fn status_where(
    ns: &Tenant,
    what: &str,
    pred: impl Fn(&AgentConfigStatus) -> bool,
) -> AgentConfigStatus {
    ns.status_where::<AgentConfig>("edge", what, pred).await
}

fn desired_hash(fleet: &Fleet, ns: &str, agent: &RunningAgent) -> Option<bytes::Bytes> {
    fleet.agent(&AgentKey::new(ns, agent.uid))?.desired_config_hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progressive_rollout_reaches_every_agent_whichever_replica_holds_it() {
    let tenants = TestEnv::new("loop-replicas").deadline(T).prepare().await;
    let ns: &Tenant = &tenants;
    let replica = |identity: &str| {
        let mut election = LeaderElectionConfig::new(&ns.ns.name, identity);
        election.lease_duration = Duration::from_secs(3);
        election.renew_every = Duration::from_millis(500);
        OperatorConfig { namespaces: Some(tenants.names()), leader_election: Some(election), ..test_config() }
    };
    let leader = common::operator::start(replica("replica-1")).await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = ns.ns.api();
    eventually(T, "replica-1 holds the Lease", || async {
        let lease = leases.get("opamp-operator").await.ok()?;
        (lease.spec?.holder_identity.as_deref() == Some("replica-1")).then_some(())
    })
    .await;
    let follower = common::operator::start(replica("replica-2")).await;

    // Ten agents on each replica.
    let spawn = |op: &Operator| {
        let url = format!("ws://{}/v1/opamp", op.opamp_addr);
        (0..10)
            .map(|_| RunningAgent::spawn(url.clone(), Some(ns.token.clone()), AgentSpec::new("edge")))
            .collect::<Vec<_>>()
    };
    let (on_leader, on_follower) = (spawn(&leader), spawn(&follower));
    eventually(T, "ten agents on each replica", || async {
        (leader.fleet.connected_count() == 10 && follower.fleet.connected_count() == 10).then_some(())
    })
    .await;

    let rollout = "  rollout: {strategy: Progressive, steps: [50, 100], minHealthySeconds: 0}\n";
    ns.apply(&edge_config("v: 1", rollout)).await;
    let all = || on_leader.iter().chain(&on_follower);
    eventually(T, "every agent of both replicas runs the rollout's files", || async {
        all().all(|a| a.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    let done = status_where(ns, "the rollout complete", |s| {
        s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::Complete)
    })
    .await;
    assert_eq!(done.rollout.as_ref().unwrap().step, 2);
    // Both replicas planned the same: an agent's desired config is the same on either.
    let hash = desired_hash(&leader.fleet, &ns.ns.name, &on_leader[0]).expect("a desired config");
    for a in &on_follower {
        assert_eq!(desired_hash(&follower.fleet, &ns.ns.name, a).as_ref(), Some(&hash));
    }

    // The next version goes through the steps again, on both replicas.
    ns.apply(&edge_config("v: 2", rollout)).await;
    let first_step = status_where(ns, "the second version's first step", |s| {
        s.observed_generation == Some(2) && s.rollout.as_ref().is_some_and(|r| r.admitted_up_to.is_some())
    })
    .await;
    assert_eq!(first_step.rollout.as_ref().unwrap().step, 1, "{first_step:?}");
    eventually(T, "every agent runs the second version", || async {
        all().all(|a| a.effective("edge.yaml").as_deref() == Some("v: 2")).then_some(())
    })
    .await;

    for a in on_leader.into_iter().chain(on_follower) {
        a.stop().await;
    }
    follower.stop().await;
    leader.stop().await;
    tenants.cleanup().await;
}

/// Holds every status PATCH for a while before sending it: a slow API server, as the
/// operator sees it.
#[derive(Clone)]
struct HoldStatusPatches {
    hold: Duration,
    held: Arc<AtomicUsize>,
}

struct Held<S> {
    inner: Arc<tokio::sync::Mutex<S>>,
    patches: HoldStatusPatches,
}

impl<S> tower::Layer<S> for HoldStatusPatches {
    type Service = Held<S>;
    fn layer(&self, inner: S) -> Held<S> {
        Held { inner: Arc::new(tokio::sync::Mutex::new(inner)), patches: self.clone() }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Held<S>
where
    S: tower::Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(())) // readiness is awaited per call, below
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tower::ServiceExt;
        let status_patch = req.method() == http::Method::PATCH && req.uri().path().ends_with("/status");
        let (inner, p) = (self.inner.clone(), self.patches.clone());
        Box::pin(async move {
            if status_patch {
                p.held.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(p.hold).await;
            }
            let response = {
                let mut service = inner.lock().await;
                service.ready().await?.call(req)
            };
            response.await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_server_delays_status_never_configs() {
    let cluster = common::cluster::cluster().await;
    let ns = TestEnv::new("loop-slow-api").deadline(T).prepare().await;
    // The operator, as the chart's identity, reaches the API server through a layer that holds
    // every status PATCH for 5 s.
    cluster.client_as_chart_identity(&ns.ns.name).await;
    let patches = HoldStatusPatches { hold: Duration::from_secs(5), held: Arc::default() };
    let config = cluster.config_for("e2e-operator").await;
    let client = kube::client::ClientBuilder::try_from(config).unwrap().with_layer(&patches).build();
    let op =
        common::operator::start_as(client, OperatorConfig { namespaces: Some(ns.names()), ..test_config() })
            .await;
    let url = format!("ws://{}/v1/opamp", op.opamp_addr);
    let agent = RunningAgent::spawn(url, Some(ns.token.clone()), AgentSpec::new("edge"));
    eventually(T, "the agent connected", || async { (op.fleet.connected_count() == 1).then_some(()) }).await;

    ns.apply(&edge_config("v: 1", "")).await;
    eventually(T, "the first config reaches the agent", || async {
        (agent.effective("edge.yaml").as_deref() == Some("v: 1")).then_some(())
    })
    .await;
    status_where(&ns, "the first status, 5 s late", |s| s.applied_agents == 1).await;

    // A change while status patches are held: the config reaches the agent, the status follows.
    let generation_1_patches = patches.held.load(Ordering::SeqCst);
    let changed = std::time::Instant::now();
    ns.apply(&edge_config("v: 2", "")).await;
    eventually(T, "the change reaches the agent", || async {
        (agent.effective("edge.yaml").as_deref() == Some("v: 2")).then_some(())
    })
    .await;
    let took = changed.elapsed();
    let written = ns.ns.api::<AgentConfig>().get("edge").await.unwrap().status.unwrap();
    eprintln!("the change reached the agent in {took:?}, status patches held for 5 s");
    assert_ne!(
        written.observed_generation,
        Some(2),
        "the status of the change was written before the change reached the agent ({took:?})"
    );
    let s = status_where(&ns, "the change's status, once the API server answers", |s| {
        s.observed_generation == Some(2) && s.applied_agents == 1
    })
    .await;
    assert_eq!(s.selected_agents, 1);
    // Statuses computed while a patch was held were not queued again and again.
    let sent = patches.held.load(Ordering::SeqCst) - generation_1_patches;
    assert!(sent <= 4, "{sent} status patches for one change");

    agent.stop().await;
    op.stop().await;
    ns.cleanup().await;
}
