//! Replicas that act as one (see `opamp_operator::peers`): the peer token they present (a
//! service-account token of the peer audience, as the chart projects one), and their config.
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use opamp_operator::controller::leader::LeaderElectionConfig;
use opamp_operator::operator::OperatorConfig;
use opamp_operator::peers::{AUDIENCE, PeersConfig};

/// What the replicas of a test present to each other.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub token_file: PathBuf,
    /// The token itself (tests present it, or a wrong one, by hand).
    pub token: String,
    /// The service account's user name, which replicas accept.
    pub user: String,
}

/// A service account `opamp-peers` in `namespace` and a token of it for `audience`.
pub async fn token_for(namespace: &str, audience: &str) -> (String, String) {
    let admin = super::cluster::cluster().await.client().await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin, namespace);
    let sa = ServiceAccount {
        metadata: ObjectMeta { name: Some("opamp-peers".into()), ..Default::default() },
        ..Default::default()
    };
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("cannot create the peers' service account: {e}"),
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(3600 * 2),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("opamp-peers", &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("cannot request a token: {e}"))
        .status
        .expect("a token")
        .token;
    (token, format!("system:serviceaccount:{namespace}:opamp-peers"))
}

/// The peer identity of the replicas of a test in `namespace`, its token in a file.
pub async fn identity(namespace: &str) -> PeerIdentity {
    let (token, user) = token_for(namespace, AUDIENCE).await;
    let dir = std::env::temp_dir().join(format!("opamp-peers-{namespace}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    PeerIdentity { token_file, token, user }
}

/// Membership as a test wants it: Leases of 3 s renewed every second, calls within 2 s.
pub fn peers_config(namespace: &str, identity: &str, peer: &PeerIdentity) -> PeersConfig {
    let mut p = PeersConfig::new(namespace, identity, "", peer.token_file.clone());
    p.group = "opamp-e2e".into();
    p.allowed_users = vec![peer.user.clone()];
    p.lease_duration = Duration::from_secs(3);
    p.renew_every = Duration::from_secs(1);
    p.call_timeout = Duration::from_secs(2);
    p
}

/// One replica of several, in `namespace` (Leases there) managing `namespaces`: peers on,
/// leader election on (a 3 s Lease), the rest as [`super::operator::test_config`].
pub fn replica_config(
    namespace: &str,
    namespaces: Vec<String>,
    identity: &str,
    peer: &PeerIdentity,
) -> OperatorConfig {
    let mut election = LeaderElectionConfig::new(namespace, identity);
    election.lease_duration = Duration::from_secs(3);
    election.renew_every = Duration::from_millis(500);
    OperatorConfig {
        namespaces: Some(namespaces),
        leader_election: Some(election),
        peers: Some(peers_config(namespace, identity, peer)),
        peer_addr: "127.0.0.1:0".parse().unwrap(),
        ..super::operator::test_config()
    }
}

/// Starts in-process replicas named `names` with their Leases in `namespace`, managing
/// `namespaces`, and waits until each sees all the others.
pub async fn start_replicas(
    namespace: &str,
    namespaces: Vec<String>,
    peer: &PeerIdentity,
    names: &[&str],
) -> Vec<opamp_operator::operator::Operator> {
    let mut ops = Vec::with_capacity(names.len());
    for name in names {
        ops.push(super::operator::start(replica_config(namespace, namespaces.clone(), name, peer)).await);
    }
    settled(&ops).await;
    ops
}

/// Waits until every replica of `ops` sees all the others.
pub async fn settled(ops: &[opamp_operator::operator::Operator]) {
    for op in ops {
        super::eventually(Duration::from_secs(30), "every replica sees all the others", || async {
            (op.peers.others().len() == ops.len() - 1).then_some(())
        })
        .await;
    }
}
