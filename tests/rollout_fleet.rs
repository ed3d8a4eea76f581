//! Rollout gates and rollback at fleet scale, against the local control plane: a thousand
//! simulated WebSocket agents under one operator, and two hundred spread over two operator
//! replica processes. 30 % of the agents reject any config containing "BAD"; which ones is
//! chosen by their rollout key (every agent whose rank among the keys is 0, 1 or 2 modulo 10),
//! so every step of a Progressive rollout, which admits the agents with the lowest keys, meets
//! exactly 30 % of failing agents.
//!
//! What a user checks after a bad version: the failed gate tripped at the configured share, the
//! agents the rollout admitted run the last healthy revision again, the others were sent
//! nothing, the status, Conditions, Events, ControllerRevisions and the README's Argo CD health
//! check say so, and a retry or a more tolerant gate does what it says.
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::argocd;
use common::env::{Tenant, TestEnv};
use common::eventually;
use common::replica::{Group, Replica};
use common::simrun::RunningAgent;
use k8s_openapi::api::core::v1::Event as KubeEvent;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, RolloutState};
use opamp_operator::controller::rollout::{parse_threshold, rollout_key};
use opamp_operator::proto::RemoteConfigStatuses;
use opamp_operator::protocol::Uid;
use opamp_operator::sim::AgentSpec;

/// The AgentConfig every scenario rolls out.
const NAME: &str = "fleet";
/// The file it sets.
const FILE: &str = "fleet.yaml";
/// What the failing agents reject.
const MARKER: &str = "BAD";
/// Heartbeats of the simulated agents: quiet, so a thousand of them leave the CPU to the
/// operator (WebSocket agents are not taken for gone when quiet).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Deadline of every wait.
const T: Duration = Duration::from_secs(90);

/// The AgentConfig `fleet` selecting every `edge` agent: `body` as its file, a Progressive
/// rollout in steps of 10 % and 50 % rolling back on a tripped gate, `gates` as the gates and
/// `retry` (if any) as the retry annotation.
fn agent_config(body: &str, gates: &str, retry: Option<&str>) -> String {
    let annotations = retry.map(|r| format!(", annotations: {{opamp.dev/retry: '{r}'}}")).unwrap_or_default();
    format!(
        "apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {{name: {NAME}{annotations}}}
spec:
  selector: {{matchAttributes: {{service.name: edge}}}}
  files: {{{FILE}: {{contentType: text/yaml, inline: '{body}'}}}}
  rollout: {{strategy: Progressive, steps: [10, 50], onFailure: Rollback, gates: {gates}}}
"
    )
}

/// One simulated agent of a fleet.
struct Member {
    agent: RunningAgent,
    /// Its rollout key for `<namespace>/fleet`.
    key: u64,
    /// Whether it rejects configs containing [`MARKER`].
    failing: bool,
    /// Its rank among the fleet's rollout keys (0: the lowest, the first admitted).
    rank: usize,
}

/// What an agent had once a version was rolled out: what the test compares with later.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    received: usize,
    hash: Bytes,
    applied: bool,
    file: Option<String>,
}

impl Member {
    fn snapshot(&self) -> Snapshot {
        let status = self.agent.remote_config_status();
        Snapshot {
            received: self.agent.configs_received(),
            hash: status.as_ref().map(|s| s.last_remote_config_hash.clone()).unwrap_or_default(),
            applied: status.is_some_and(|s| s.status == RemoteConfigStatuses::Applied as i32),
            file: self.agent.effective(FILE),
        }
    }

    /// Runs the files of the version whose snapshot is `v` (its hash reported APPLIED).
    fn runs(&self, v: &Snapshot) -> bool {
        let now = self.snapshot();
        now.applied && now.hash == v.hash && now.file == v.file
    }
}

/// `n` agents of service `edge` in `tenant`, 30 % of them failing by rank of their rollout key
/// (see the module doc), each connected to `urls[rank % urls.len()]`.
fn fleet(tenant: &Tenant, n: usize, urls: &[String]) -> Vec<Member> {
    let config = format!("{}/{NAME}", tenant.ns.name);
    let mut uids: Vec<(u64, Uid)> = (0..n)
        .map(|_| {
            let uid = Uid::new_v7();
            (rollout_key(&config, &uid), uid)
        })
        .collect();
    uids.sort_unstable();
    uids.into_iter()
        .enumerate()
        .map(|(rank, (key, uid))| {
            let failing = rank % 10 < 3;
            let spec =
                AgentSpec { uid, fail_marker: failing.then(|| MARKER.to_owned()), ..AgentSpec::new("edge") };
            let url = urls[rank % urls.len()].clone();
            let agent = RunningAgent::spawn_with_heartbeat(url, Some(tenant.token.clone()), spec, HEARTBEAT);
            Member { agent, key, failing, rank }
        })
        .collect()
}

async fn stop_all(members: Vec<Member>) {
    for m in members {
        m.agent.stop().await;
    }
}

fn state(s: &AgentConfigStatus) -> Option<RolloutState> {
    s.rollout.as_ref().map(|r| r.state)
}

fn condition<'a>(s: &'a AgentConfigStatus, t: &str) -> (&'a str, &'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no condition {t}: {s:#?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

/// What Argo CD shows for the live AgentConfig (read as `kubectl get -o json` shows it).
async fn argo_health(tenant: &Tenant) -> argocd::Health {
    let live = tenant.ns.api::<AgentConfig>().get(NAME).await.expect("the AgentConfig");
    argocd::health(&serde_json::to_value(&live).unwrap())
}

/// Waits until the rollout of the AgentConfig is `Complete` with `applied` agents applied and
/// `failed` failed; returns that status and what Argo CD showed for the first status seen
/// with the rollout `Progressing` (`None` if the rollout was never seen progressing).
async fn complete(
    tenant: &Tenant,
    applied: u32,
    failed: u32,
) -> (AgentConfigStatus, Option<(AgentConfigStatus, argocd::Health)>) {
    let api = tenant.ns.api::<AgentConfig>();
    let end = Instant::now() + T;
    let mut progressing = None;
    let mut last = None;
    while Instant::now() < end {
        if let Ok(live) = api.get(NAME).await {
            let status = live.status.clone();
            if let Some(s) = &status {
                if progressing.is_none() && state(s) == Some(RolloutState::Progressing) {
                    progressing = Some((s.clone(), argocd::health(&serde_json::to_value(&live).unwrap())));
                }
                if state(s) == Some(RolloutState::Complete)
                    && s.applied_agents == applied
                    && s.failed_agents == failed
                {
                    return (s.clone(), progressing);
                }
            }
            last = status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "timed out after {T:?}: rollout Complete with {applied} applied, {failed} failed; last status: {last:#?}"
    );
}

/// The agents the rollout in `s` admitted (rollout key at most `admittedUpTo`), and the others.
fn admitted<'a>(s: &AgentConfigStatus, members: &'a [Member]) -> (Vec<&'a Member>, Vec<&'a Member>) {
    let up_to = s.rollout.as_ref().and_then(|r| r.admitted_up_to.as_deref()).and_then(parse_threshold);
    let up_to = up_to.unwrap_or_else(|| panic!("no admittedUpTo in {s:#?}"));
    members.iter().partition(|m| m.key <= up_to)
}

/// Checks a rollback to v1 (whose snapshots are `v1`): every admitted agent (waited for) runs
/// v1 again, failed ones included; every other agent was sent nothing since and still runs v1;
/// the status counts every selected agent applied again.
async fn rolled_back_to_v1(tenant: &Tenant, s: &AgentConfigStatus, members: &[Member], v1: &[Snapshot]) {
    let (taken, others) = admitted(s, members);
    eventually(T, "every admitted agent runs v1 again, the failed ones too", || async {
        taken.iter().all(|m| m.runs(&v1[m.rank])).then_some(())
    })
    .await;
    let all = members.len() as u32;
    let back = tenant
        .status_where::<AgentConfig>(NAME, "every agent counted applied again", |x| {
            x.applied_agents == all && x.failed_agents == 0 && x.pending_agents == 0
        })
        .await;
    assert_eq!(back.selected_agents, all, "{back:#?}");
    // Settled: the others were never sent anything.
    for m in &others {
        let now = m.snapshot();
        assert_eq!(
            now, v1[m.rank],
            "agent {} (rank {}) was not admitted: sent nothing, still on v1",
            m.agent.uid, m.rank
        );
    }
}

/// The `fleet` ControllerRevisions as `kubectl get controllerrevisions -n NS -o json` lists
/// them: (name, owner kind, owner name).
async fn controller_revisions(tenant: &Tenant) -> Vec<(String, String, String)> {
    let out = common::cluster::cluster()
        .await
        .kubectl()
        .args(["get", "controllerrevisions", "-n", &tenant.ns.name, "-o", "json"])
        .output()
        .await
        .expect("kubectl runs");
    assert!(out.status.success(), "kubectl: {}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let items = list["items"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let owner = &item["metadata"]["ownerReferences"][0];
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (text(&item["metadata"]["name"]), text(&owner["kind"]), text(&owner["name"]))
        })
        .collect()
}

/// Whether `name` is a revision name of `fleet`: `fleet-` and 10 hex digits.
fn revision_name(name: &str) -> bool {
    name.strip_prefix(&format!("{NAME}-"))
        .is_some_and(|h| h.len() == 10 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_trip_at_the_configured_share_and_rollback_reaches_every_admitted_agent() {
    const AGENTS: usize = 1000;
    // Both ends of every agent's connection are in this process: two files each, more than a
    // default soft limit of 1,024 allows. Raised as the operator's binary raises it.
    let files = opamp_operator::operator::raise_fd_limit();
    assert!(
        files >= 4 * AGENTS as u64,
        "{AGENTS} agents need more open files than the limit allows ({files})"
    );
    let env = TestEnv::new("fleet-gates").deadline(T).start().await;
    let started = Instant::now(); // the operator started (and the harness's lock taken)
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let mut lap = |what: &'static str, since: &mut Instant| {
        timings.push((what, since.elapsed()));
        *since = Instant::now();
    };
    let mut since = Instant::now();
    let members = fleet(&env, AGENTS, &[env.ws_url()]);
    eventually(T, "a thousand agents connected", || async {
        (env.op.fleet.connected_count() == AGENTS).then_some(())
    })
    .await;
    lap("1,000 agents connected", &mut since);

    // v1, good: every step passes, the rollout completes and v1 is the last healthy revision.
    let gate20 = "{maxFailedPercent: 20}";
    env.apply(&agent_config("version: 1", gate20, None)).await;
    let (s1, progressing) = complete(&env, AGENTS as u32, 0).await;
    lap("v1 rolled out (steps 10, 50, 100)", &mut since);
    let v1_revision = s1.update_revision.clone().expect("updateRevision");
    assert!(revision_name(&v1_revision), "{v1_revision}");
    assert_eq!(s1.last_healthy_revision.as_ref(), Some(&v1_revision), "{s1:#?}");
    assert_eq!(s1.current_revision.as_ref(), Some(&v1_revision), "{s1:#?}");
    assert_eq!((s1.rollout.as_ref().unwrap().step, s1.updated_agents), (3, AGENTS as u32), "{s1:#?}");
    let (progressing, health) = progressing.expect("the rollout of v1 was seen Progressing");
    assert_eq!(health.status, "Progressing", "Argo CD while v1 rolled out: {health:?} for {progressing:#?}");
    let health = argo_health(&env).await;
    assert_eq!(health.status, "Healthy", "{health:?}");
    let v1: Vec<Snapshot> = members.iter().map(Member::snapshot).collect();
    assert!(v1.iter().all(|s| s.applied && s.file.as_deref() == Some("version: 1")), "every agent runs v1");

    // v2, bad for 30 %: the first step admits 10 % (100 agents), 30 of them fail: more than 20 %.
    env.apply(&agent_config("version: 2 BAD", gate20, None)).await;
    let s2 = env
        .status_where::<AgentConfig>(NAME, "v2 rolled back", |s| state(s) == Some(RolloutState::RolledBack))
        .await;
    lap("v2 tripped FailedRatio and rolled back", &mut since);
    let rollout = s2.rollout.clone().unwrap();
    let tripped = rollout.tripped.clone().expect("the tripped gate");
    assert_eq!(tripped.gate, "FailedRatio", "{s2:#?}");
    assert!(
        tripped.message.starts_with("at step 1: ")
            && tripped.message.contains(" of 100 agents failed to apply it"),
        "{tripped:?}"
    );
    assert_eq!(rollout.step, 1, "{s2:#?}");
    assert_eq!(rollout.rolled_back_to.as_ref(), Some(&v1_revision), "{s2:#?}");
    let v2_revision = s2.update_revision.clone().expect("updateRevision");
    assert!(revision_name(&v2_revision) && v2_revision != v1_revision, "{v2_revision}");
    assert_eq!(s2.last_healthy_revision.as_ref(), Some(&v1_revision), "{s2:#?}");
    assert_eq!(condition(&s2, "Degraded").0, "True", "{s2:#?}");
    assert_eq!(condition(&s2, "Degraded").1, "RolledBack", "{s2:#?}");
    assert_eq!(condition(&s2, "Ready").0, "False", "{s2:#?}");
    let (taken, _) = admitted(&s2, &members);
    assert_eq!(taken.len(), AGENTS / 10, "the first step admits 10 %");
    assert_eq!(taken.iter().filter(|m| m.failing).count(), 30, "30 % of them fail");
    rolled_back_to_v1(&env, &s2, &members, &v1).await;
    lap("v1 back on every admitted agent", &mut since);
    let health = argo_health(&env).await;
    assert_eq!(health.status, "Degraded", "{health:?}");
    assert!(health.message.starts_with("RolledBack: gate FailedRatio"), "{health:?}");
    // An Event on the AgentConfig, and both revisions as ControllerRevisions it owns.
    let events: kube::Api<KubeEvent> = env.ns.api();
    let event = eventually(T, "a RolledBack Event on the AgentConfig", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("RolledBack")
                && e.involved_object.kind.as_deref() == Some("AgentConfig")
                && e.involved_object.name.as_deref() == Some(NAME)
        })
    })
    .await;
    assert!(event.message.as_deref().unwrap_or_default().contains("gate FailedRatio"), "{event:?}");
    let revisions = eventually(T, "both revisions listed", || async {
        let mut r = controller_revisions(&env).await;
        r.sort();
        (r.len() == 2).then_some(r)
    })
    .await;
    let mut expected = [v1_revision.clone(), v2_revision.clone()];
    expected.sort();
    for ((name, kind, owner), want) in revisions.iter().zip(&expected) {
        assert_eq!((name, kind.as_str(), owner.as_str()), (want, "AgentConfig", NAME), "{revisions:?}");
    }

    // Retry: the same spec with the annotation: v2's rollout starts over at step 1, and trips again.
    let received: Vec<usize> = members.iter().map(|m| m.agent.configs_received()).collect();
    env.apply(&agent_config("version: 2 BAD", gate20, Some("1"))).await;
    let restarted = env
        .status_where::<AgentConfig>(NAME, "the retry's rollout", |s| {
            s.rollout.as_ref().is_some_and(|r| r.retry.as_deref() == Some("1"))
        })
        .await;
    let r = restarted.rollout.clone().unwrap();
    assert_eq!((r.state, r.step), (RolloutState::Progressing, 1), "{restarted:#?}");
    let s3 = env
        .status_where::<AgentConfig>(NAME, "the retry rolled back", |s| {
            s.rollout
                .as_ref()
                .is_some_and(|r| r.retry.as_deref() == Some("1") && r.state == RolloutState::RolledBack)
        })
        .await;
    lap("retry: v2 again, tripped again", &mut since);
    let r = s3.rollout.clone().unwrap();
    assert_eq!((r.step, r.tripped.as_ref().map(|g| g.gate.as_str())), (1, Some("FailedRatio")), "{s3:#?}");
    assert_eq!(r.admitted_up_to, rollout.admitted_up_to, "the retry's first step admits the same agents");
    rolled_back_to_v1(&env, &s3, &members, &v1).await;
    let (taken, _) = admitted(&s3, &members);
    assert!(
        taken.iter().all(|m| m.agent.configs_received() >= received[m.rank] + 2),
        "every admitted agent was sent v2 again, then v1"
    );
    lap("v1 back again", &mut since);

    // v3, with a share of failures below its gate (30 % of at most 40 %): it goes past the first
    // step to the end, the failures counted, not rolled back.
    env.apply(&agent_config("version: 3 BAD", "{maxFailedPercent: 40}", None)).await;
    let failing = members.iter().filter(|m| m.failing).count() as u32;
    let (s4, _) = complete(&env, AGENTS as u32 - failing, failing).await;
    lap("v3 rolled out with 30 % failing", &mut since);
    let r = s4.rollout.clone().unwrap();
    assert_eq!((r.step, r.tripped, r.rolled_back_to), (3, None, None), "{s4:#?}");
    assert_eq!(condition(&s4, "Degraded").1, "AgentsFailed", "{s4:#?}");
    for m in &members {
        let file = m.agent.effective(FILE);
        let want = if m.failing { "version: 1" } else { "version: 3 BAD" };
        assert_eq!(file.as_deref(), Some(want), "agent rank {} failing {}", m.rank, m.failing);
    }

    stop_all(members).await;
    env.stop().await;
    lap("stopped", &mut since);
    eprintln!(
        "gates_trip_at_the_configured_share_and_rollback_reaches_every_admitted_agent ({AGENTS} agents):"
    );
    for (what, took) in &timings {
        eprintln!("  {what}: {took:.1?}");
    }
    eprintln!("  total: {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_replicas_roll_back_together() {
    const AGENTS: usize = 200;
    let tenants = TestEnv::new("fleet-replicas").deadline(T).prepare().await;
    let started = Instant::now(); // the harness's lock taken
    let ns: &Tenant = &tenants;
    let group = Group::new(&ns.ns.name, tenants.names()).await;
    let replicas: Vec<Replica> = vec![group.start("replica-a").await, group.start("replica-b").await];
    // Half the agents on each replica, alternating by rank: each step meets agents of both.
    let urls: Vec<String> = replicas.iter().map(|r| format!("ws://{}/v1/opamp", r.opamp_addr)).collect();
    let members = fleet(ns, AGENTS, &urls);
    let on = |m: &Member| m.rank % replicas.len();

    let gate20 = "{maxFailedPercent: 20}";
    ns.apply(&agent_config("version: 1", gate20, None)).await;
    let (s1, _) = complete(ns, AGENTS as u32, 0).await;
    assert_eq!(s1.selected_agents, AGENTS as u32, "every agent of both replicas counted once: {s1:#?}");
    let v1_revision = s1.update_revision.clone().expect("updateRevision");
    let v1: Vec<Snapshot> = members.iter().map(Member::snapshot).collect();
    assert!(v1.iter().all(|s| s.applied && s.file.as_deref() == Some("version: 1")), "every agent runs v1");

    ns.apply(&agent_config("version: 2 BAD", gate20, None)).await;
    let s2 = ns
        .status_where::<AgentConfig>(NAME, "v2 rolled back", |s| state(s) == Some(RolloutState::RolledBack))
        .await;
    let rollout = s2.rollout.clone().unwrap();
    assert_eq!(rollout.tripped.as_ref().map(|g| g.gate.as_str()), Some("FailedRatio"), "{s2:#?}");
    assert_eq!(rollout.rolled_back_to.as_ref(), Some(&v1_revision), "{s2:#?}");
    assert_eq!(condition(&s2, "Degraded").1, "RolledBack", "{s2:#?}");
    let (taken, _) = admitted(&s2, &members);
    assert_eq!(taken.len(), AGENTS / 10, "the first step admits 10 % of the agents of both replicas");
    for (r, replica) in replicas.iter().enumerate() {
        let here: Vec<_> = taken.iter().filter(|m| on(m) == r).collect();
        assert!(here.iter().any(|m| m.failing), "failing admitted agents on {}", replica.identity);
        assert!(here.iter().any(|m| !m.failing), "applying admitted agents on {}", replica.identity);
    }
    rolled_back_to_v1(ns, &s2, &members, &v1).await;
    let health = argo_health(ns).await;
    assert_eq!(health.status, "Degraded", "{health:?}");
    assert!(health.message.starts_with("RolledBack: gate FailedRatio"), "{health:?}");

    // One status, written by the leader alone, the same a moment later (no replica fights it).
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = ns.ns.api();
    let leader = eventually(T, "a leader", || async {
        leases.get("opamp-operator").await.ok()?.spec?.holder_identity.filter(|h| !h.is_empty())
    })
    .await;
    for r in &replicas {
        let patches = r.metric("opamp_status_patches_total").await;
        if r.identity == leader {
            assert!(patches > 0.0, "the leader {} wrote status", r.identity);
        } else {
            assert_eq!(patches, 0.0, "the follower {} wrote no status", r.identity);
        }
    }
    let first = ns.ns.api::<AgentConfig>().get(NAME).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // three ticks of every replica
    let later = ns.ns.api::<AgentConfig>().get(NAME).await.unwrap();
    assert_eq!(later.status, first.status, "the status holds still once rolled back");

    stop_all(members).await;
    for r in replicas {
        r.terminate().await;
    }
    tenants.cleanup().await;
    eprintln!("several_replicas_roll_back_together ({AGENTS} agents, 2 replicas): {:.1?}", started.elapsed());
}
