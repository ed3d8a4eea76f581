//! Status over several replicas (see `opamp_operator::controller::peer`): the leader writes
//! what every live replica's agents add, against the local control plane.
mod common;

use std::time::Duration;

use common::env::Tenant;
use common::env::TestEnv;
use common::simrun::RunningAgent;
use common::{eventually, peers};
use k8s_openapi::api::coordination::v1::Lease;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, CapabilitySlot, RolloutState};
use opamp_operator::operator::Operator;
use opamp_operator::protocol::Uid;
use opamp_operator::sim::AgentSpec;

const T: Duration = Duration::from_secs(60);
const CAPABILITY: &str = "com.example.echo";

const EDGE: &str = "apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: edge}
spec:
  selector: {matchAttributes: {service.name: edge}}
  files: {edge.yaml: {inline: 'v: 1'}}
";
const STAGED: &str = "apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: staged}
spec:
  selector: {matchAttributes: {service.name: edge}}
  files: {staged.yaml: {inline: 'stage: 1'}}
  rollout: {strategy: Progressive, steps: [50, 100], minHealthySeconds: 0}
";
const ECHO: &str = "apiVersion: opamp.dev/v1alpha1
kind: CapabilitySlot
metadata: {name: echo}
spec:
  capability: com.example.echo
";

fn ready(s: &AgentConfigStatus) -> bool {
    s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `n` agents of `uids` on `op`, declaring the slot's capability.
fn agents(op: &Operator, ns: &Tenant, uids: &[Uid]) -> Vec<RunningAgent> {
    let url = format!("ws://{}/v1/opamp", op.opamp_addr);
    uids.iter()
        .map(|uid| {
            let spec = AgentSpec {
                uid: *uid,
                custom_capabilities: vec![CAPABILITY.into()],
                ..AgentSpec::new("edge")
            };
            RunningAgent::spawn(url.clone(), Some(ns.token.clone()), spec)
        })
        .collect()
}

async fn stop_all(agents: Vec<RunningAgent>) {
    for a in agents {
        a.stop().await;
    }
}

async fn leader(ns: &Tenant) -> String {
    let leases: kube::Api<Lease> = ns.ns.api();
    eventually(T, "a replica holds the leader Lease", || async {
        leases.get("opamp-operator").await.ok()?.spec?.holder_identity
    })
    .await
}

/// Waits until the `edge` AgentConfig counts `n` agents, all applied, Ready.
async fn edge_counts(ns: &Tenant, n: u32, what: &str) -> AgentConfigStatus {
    ns.status_where::<AgentConfig>("edge", what, |s| {
        s.selected_agents == n && s.applied_agents == n && ready(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_the_agents_of_every_live_replica() {
    let tenants = TestEnv::new("scale-status").with_token("agent-token-st").deadline(T).prepare().await;
    let ns = tenants.tenant(0);
    let id = peers::identity(&ns.ns.name).await;
    let replica = |name: &str| peers::replica_config(&ns.ns.name, tenants.names(), name, &id);
    let names = ["replica-a", "replica-b", "replica-c"];
    let started = peers::start_replicas(&ns.ns.name, tenants.names(), &id, &names).await;
    let mut ops: Vec<_> = names.into_iter().zip(started).collect();
    // Six agents on each replica.
    let uids: Vec<Vec<Uid>> = (0..3).map(|_| (0..6).map(|_| Uid::new_v7()).collect()).collect();
    let mut running: Vec<Vec<RunningAgent>> =
        ops.iter().zip(&uids).map(|((_, op), uids)| agents(op, ns, uids)).collect();
    for (_, op) in &ops {
        eventually(T, "six agents on each replica", || async {
            (op.fleet.connected_count() == 6).then_some(())
        })
        .await;
    }

    ns.apply(EDGE).await;
    ns.apply(ECHO).await;
    edge_counts(ns, 18, "every replica's agents counted, applied and Ready").await;
    ns.status_where::<CapabilitySlot>("echo", "every replica's agents support it", |s| {
        s.supporting_agents == 18
    })
    .await;

    // A progressive rollout steps over the agents of every replica, to the end.
    ns.apply(STAGED).await;
    let staged = ns
        .status_where::<AgentConfig>("staged", "the rollout completes over all 18 agents", |s| {
            s.rollout.as_ref().is_some_and(|r| r.state == RolloutState::Complete)
                && s.selected_agents == 18
                && s.applied_agents == 18
        })
        .await;
    assert!(ready(&staged), "{staged:#?}");
    assert!(running.iter().flatten().all(|a| a.effective("staged.yaml").as_deref() == Some("stage: 1")));

    // A follower dies: its agents stop counting once its Lease lapses (3 s).
    let first_leader = leader(ns).await;
    let victim = ops.iter().position(|(name, _)| *name != first_leader).expect("a follower");
    let (victim_name, dead) = ops.remove(victim);
    let dead_agents = running.remove(victim);
    let dead_uids = uids[victim].clone();
    let killed = std::time::Instant::now();
    dead.kill();
    edge_counts(ns, 12, "the dead replica's agents no longer count").await;
    let after = killed.elapsed();
    assert!(after < Duration::from_secs(3 + 2), "{victim_name}'s agents counted {after:?} after it died");
    // Its agents reconnect to a survivor: they count again.
    stop_all(dead_agents).await;
    let follower = ops.iter().position(|(name, _)| *name != first_leader).expect("a surviving follower");
    running[follower].extend(agents(&ops[follower].1, ns, &dead_uids));
    edge_counts(ns, 18, "the reconnected agents count again").await;
    ns.status_where::<CapabilitySlot>("echo", "the reconnected agents support it", |s| {
        s.supporting_agents == 18
    })
    .await;

    // The leader dies too; a replica joins and takes the leader's agents. The new leader counts
    // every live replica's agents.
    let d = common::operator::start(replica("replica-d")).await;
    eventually(T, "the new replica joins", || async { (d.peers.others().len() == 2).then_some(()) }).await;
    let at = ops.iter().position(|(name, _)| *name == first_leader).expect("the leader");
    let (_, old_leader) = ops.remove(at);
    let leader_agents = running.remove(at);
    let leader_uids: Vec<Uid> = leader_agents.iter().map(|a| a.uid).collect();
    old_leader.kill();
    eventually(T, "another replica leads", || async {
        let holder = leader(ns).await;
        (holder != first_leader).then_some(())
    })
    .await;
    edge_counts(ns, 12, "the new leader counts the survivors' agents").await;
    stop_all(leader_agents).await;
    let on_d = agents(&d, ns, &leader_uids);
    edge_counts(ns, 18, "the new leader counts the agents on the new replica").await;
    ns.status_where::<CapabilitySlot>("echo", "the new leader counts every supporting agent", |s| {
        s.supporting_agents == 18
    })
    .await;

    stop_all(on_d).await;
    for agents in running {
        stop_all(agents).await;
    }
    d.stop().await;
    for (_, op) in ops {
        op.stop().await;
    }
    tenants.cleanup().await;
}
