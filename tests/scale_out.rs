//! Replicas as one operator (see `opamp_operator::peers`), against the local control plane.
mod common;

use std::time::Duration;

use common::env::TestEnv;
use common::replica::{Group, Replica};
use common::service::Service;
use common::simrun::RunningAgent;
use common::{eventually, peers};
use k8s_openapi::api::coordination::v1::Lease;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, CapabilitySlot};
use opamp_operator::operator::Operator;
use opamp_operator::protocol::Uid;
use opamp_operator::sim::AgentSpec;

const T: Duration = Duration::from_secs(30);

async fn ping(op: &Operator, token: &str) -> u16 {
    let url = format!("http://{}/peer/v1/ping", op.peer_addr.expect("a peer address"));
    let resp =
        reqwest::Client::new().post(url).bearer_auth(token).send().await.expect("the peer address answers");
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_find_each_other_through_leases_and_only_peers_may_call_them() {
    let tenants = TestEnv::new("peers-member").with_token("agent-token-1").deadline(T).prepare().await;
    let ns = &tenants.tenant(0).ns.name;
    let id = peers::identity(ns).await;
    let ops = peers::start_replicas(ns, tenants.names(), &id, &["replica-a", "replica-b", "replica-c"]).await;
    let [a, b, c] = <[Operator; 3]>::try_from(ops).ok().expect("three replicas");
    // Only the replicas' service account, with the peer audience, opens the peer address.
    assert_eq!(ping(&a, &id.token).await, 200);
    assert_eq!(ping(&a, "agent-token-1").await, 403, "an agent's token");
    let (api_token, _) = peers::token_for(ns, "https://kubernetes.default.svc").await;
    assert_eq!(ping(&a, &api_token).await, 403, "the same service account, another audience");
    let url = format!("http://{}/peer/v1/ping", a.peer_addr.unwrap());
    assert_eq!(reqwest::Client::new().post(url).send().await.unwrap().status(), 401, "no token");

    // A replica that stops leaves at once; one killed, when its Lease lapses (3 s).
    b.stop().await;
    eventually(Duration::from_secs(2), "a stopped replica leaves at once", || async {
        (a.peers.others().len() == 1 && c.peers.others().len() == 1).then_some(())
    })
    .await;
    let killed = std::time::Instant::now();
    c.kill();
    eventually(T, "a killed replica leaves when its Lease lapses", || async {
        a.peers.others().is_empty().then_some(())
    })
    .await;
    let after = killed.elapsed();
    assert!(after < Duration::from_secs(3 + 2), "gone after {after:?}");
    a.stop().await;
    tenants.cleanup().await;
}

/// WebSocket agents, and one plain-HTTP agent that opens a new connection at each poll (so the
/// Service sends each poll to the next replica).
const AGENTS: usize = 30;
const ALL: usize = AGENTS + 1;
const CAP: &str = "io.example.jobs";
const DISPATCH_TOKEN: &str = "dispatch-token-of-the-suite";

fn edge_config(version: u32) -> String {
    format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {{name: edge}}\nspec:\n  \
         selector: {{matchAttributes: {{service.name: edge}}}}\n  \
         files:\n    edge.yaml:\n      inline: 'v: {version}'\n"
    )
}

/// Waits until the AgentConfig's status is of its current generation and counts every agent
/// once, applied: the status converged.
async fn converged(ns: &common::env::Tenant, what: &str) -> AgentConfigStatus {
    let generation = ns.ns.api::<AgentConfig>().get("edge").await.unwrap().metadata.generation;
    ns.status_where::<AgentConfig>("edge", what, |s| {
        s.observed_generation == generation
            && s.selected_agents as usize == ALL
            && s.applied_agents as usize == ALL
            && s.pending_agents == 0
            && s.applying_agents == 0
    })
    .await
}

/// Dispatches one message of `kind` to every agent (a selector) through `via`: the HTTP status
/// and each agent's state.
async fn dispatch_all(via: &Replica, ns: &str, kind: &str) -> (u16, Vec<(String, String)>) {
    let url = via.api_url(&format!("/api/v1/namespaces/{ns}/capabilityslots/jobs/messages"));
    let body = serde_json::json!({ "type": kind, "data": "", "selector": {} });
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(DISPATCH_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the dispatch API answers");
    let status = resp.status().as_u16();
    let reply: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.unwrap()).expect("a JSON answer");
    let states = reply["results"].as_array().into_iter().flatten().map(|r| {
        (r["agent"].as_str().unwrap_or("").to_owned(), r["state"].as_str().unwrap_or("").to_owned())
    });
    (status, states.collect())
}

/// Dispatch reached every agent: written to each WebSocket agent, queued for the HTTP agent's
/// next poll (or written, if it was polling).
fn all_reached((status, states): &(u16, Vec<(String, String)>), http: Uid) -> bool {
    let http = http.to_string();
    *status == 200
        && states.len() == ALL
        && states.iter().all(|(agent, state)| state == "sent" || (*agent == http && state == "queued"))
}

/// The Lease holder: the leader's identity.
async fn leader(ns: &common::env::Tenant) -> String {
    let leases: kube::Api<Lease> = ns.ns.api();
    eventually(T, "a leader", || async {
        leases.get("opamp-operator").await.ok()?.spec?.holder_identity.filter(|h| !h.is_empty())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replica_processes_stay_one_operator_through_a_rolling_update_and_a_crash() {
    let tenants = TestEnv::new("scale").deadline(Duration::from_secs(60)).prepare().await;
    let ns: &common::env::Tenant = &tenants;
    let name = ns.ns.name.clone();
    let group = Group::new(&name, tenants.names()).await;
    let mut replicas = Vec::new();
    for i in 1..=3 {
        replicas.push(group.start(&format!("replica-{i}")).await);
    }
    let service = Service::start(replicas.iter().map(|r| r.opamp_addr).collect()).await;
    let url = format!("ws://{}/v1/opamp", service.addr);
    let spec = || {
        let mut spec = AgentSpec::new("edge");
        spec.custom_capabilities = vec![CAP.into()];
        spec
    };
    let mut agents: Vec<RunningAgent> =
        (0..AGENTS).map(|_| RunningAgent::spawn(url.clone(), Some(ns.token.clone()), spec())).collect();
    let http_url = format!("http://{}/v1/opamp", service.addr);
    let http = RunningAgent::spawn_http(http_url, Some(ns.token.clone()), spec(), Duration::from_millis(300));
    let http_uid = http.uid;
    agents.push(http);
    ns.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: dispatch}}\ntype: Opaque\nstringData: {{token: {DISPATCH_TOKEN}}}\n"
    ))
    .await;
    ns.apply(&format!(
        "apiVersion: opamp.dev/v1alpha1\nkind: CapabilitySlot\nmetadata: {{name: jobs}}\nspec:\n  capability: {CAP}\n  \
         dispatch:\n    tokenSecretRef: {{name: dispatch, key: token}}\n"
    ))
    .await;
    ns.apply(&edge_config(1)).await;
    // Status counts the agents of all three replicas (the Service spreads them).
    let first = converged(ns, "every agent of every replica counted, applied").await;
    assert_eq!(first.selected_agents as usize, ALL, "counted once each: {first:?}");
    ns.status_where::<CapabilitySlot>("jobs", "every agent supports the slot", |s| {
        s.supporting_agents as usize == ALL
    })
    .await;
    // Only the replicas' service account opens a replica's peer address.
    let ping = |token: Option<&str>| {
        let url = format!("http://{}/peer/v1/ping", replicas[0].peer_addr);
        let req = reqwest::Client::new().post(url);
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        async move { req.send().await.expect("the peer address answers").status().as_u16() }
    };
    assert_eq!(ping(Some(&group.peer.token)).await, 200);
    assert_eq!(ping(Some(&ns.token)).await, 403, "an agent's token");
    assert_eq!(ping(None).await, 401);
    // Dispatch through any replica reaches every agent, wherever it is connected.
    // (The slot reaches each replica's routes a moment after the apply: the first try of each
    // may be refused.)
    for (i, r) in replicas.iter().enumerate() {
        let kind = format!("hello-{i}");
        eventually(T, "a dispatch through each replica sent to every agent", || async {
            let reply = dispatch_all(r, &name, &kind).await;
            match reply.0 {
                200 => {
                    assert!(all_reached(&reply, http_uid), "{reply:?}");
                    Some(())
                }
                _ => None,
            }
        })
        .await;
    }
    eventually(T, "every agent received the three messages once", || async {
        agents.iter().all(|a| a.custom_message_types() == ["hello-0", "hello-1", "hello-2"]).then_some(())
    })
    .await;
    // The slot's counters are the sum of what every replica sent.
    let total = 3 * ALL as u64;
    ns.status_where::<CapabilitySlot>("jobs", "the slot counts every replica's sends", |s| {
        s.downstream.accepted == total && s.downstream.sent == total
    })
    .await;

    // A rolling update: each replica in turn stopped (SIGTERM) and replaced; its agents
    // reconnect through the Service to the others.
    let mut timings = Vec::new();
    for i in 0..3 {
        let old = replicas.remove(i);
        let identity = old.identity.clone();
        let started = std::time::Instant::now();
        old.terminate().await;
        let new = group.start(&identity).await;
        replicas.insert(i, new);
        service.set_backends(replicas.iter().map(|r| r.opamp_addr).collect());
        ns.apply(&edge_config(2 + i as u32)).await;
        let version = format!("v: {}", 2 + i);
        eventually(Duration::from_secs(60), "every agent runs the new version", || async {
            agents.iter().all(|a| a.effective("edge.yaml").as_deref() == Some(version.as_str())).then_some(())
        })
        .await;
        converged(ns, "status converged after the rolling step").await;
        timings.push((format!("SIGTERM {identity}, replace, apply"), started.elapsed()));
        let reply = dispatch_all(&replicas[(i + 1) % 3], &name, &format!("roll-{i}")).await;
        assert!(all_reached(&reply, http_uid), "{reply:?}");
    }

    // A crash: the leader killed outright; its Leases lapse (3 s), another replica leads.
    let leading = leader(ns).await;
    let at = replicas.iter().position(|r| r.identity == leading).expect("the leader is a replica");
    let killed = replicas.remove(at);
    let started = std::time::Instant::now();
    killed.kill().await;
    service.set_backends(replicas.iter().map(|r| r.opamp_addr).collect());
    eventually(T, "another replica leads", || async {
        let now = leader(ns).await;
        (now != leading).then_some(())
    })
    .await;
    ns.apply(&edge_config(9)).await;
    converged(ns, "status converged after the crash").await;
    timings.push((format!("SIGKILL {leading} (the leader), apply"), started.elapsed()));
    let reply = dispatch_all(&replicas[0], &name, "after-crash").await;
    assert!(all_reached(&reply, http_uid), "{reply:?}");
    // Every WebSocket agent received every message once. The HTTP agent received those sent
    // while the replica holding its queue stayed up, once each (a replica stopped before the
    // agent's next poll takes what it queued for it along: see docs/scaling.md).
    let mut every = ["hello-0", "hello-1", "hello-2", "roll-0", "roll-1", "roll-2", "after-crash"];
    every.sort();
    eventually(T, "every agent received every message once", || async {
        agents
            .iter()
            .filter(|a| a.uid != http_uid)
            .all(|a| {
                let mut got = a.custom_message_types();
                got.sort();
                got == every
            })
            .then_some(())
    })
    .await;
    let http = agents.iter().find(|a| a.uid == http_uid).expect("the HTTP agent");
    eventually(T, "the HTTP agent received the messages of stable replicas", || async {
        let got = http.custom_message_types();
        ["hello-0", "hello-1", "hello-2", "after-crash"]
            .iter()
            .all(|m| got.iter().filter(|g| g == m).count() == 1)
            .then_some(())
    })
    .await;
    let got = http.custom_message_types();
    let distinct: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), got.len(), "no message twice: {got:?}");

    // No agent was ever sent a config it already ran.
    let duplicates: usize = agents.iter().map(|a| a.duplicate_configs()).sum();
    assert_eq!(duplicates, 0, "configs resent to agents that ran them");
    for (what, took) in &timings {
        eprintln!("scale-out: {what} -> status converged in {took:.2?}");
    }
    for a in agents {
        a.stop().await;
    }
    for r in replicas {
        r.terminate().await;
    }
    tenants.cleanup().await;
}
