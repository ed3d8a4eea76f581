//! Replicas as one operator (see `opamp_operator::peers`), against the local control plane.
mod common;

use std::time::Duration;

use common::env::TestEnv;
use common::{eventually, peers};
use opamp_operator::operator::Operator;

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
    let replica = |name: &str| peers::replica_config(ns, tenants.names(), name, &id);
    let a = common::operator::start(replica("replica-a")).await;
    let b = common::operator::start(replica("replica-b")).await;
    let c = common::operator::start(replica("replica-c")).await;
    for op in [&a, &b, &c] {
        eventually(T, "each replica sees the two others", || async {
            (op.peers.others().len() == 2).then_some(())
        })
        .await;
    }
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
