//! One Lease per replica, renewed while it runs and deleted when it stops; the live Leases of
//! the group are the membership (see the module docs of [`super`]).
use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::auth::TokenSource;
use super::{Member, Peers, PeersConfig, new_incarnation};

pub const GROUP_LABEL: &str = "opamp.dev/peer-group";
pub const ADDRESS_ANNOTATION: &str = "opamp.dev/peer-address";
pub const INCARNATION_ANNOTATION: &str = "opamp.dev/incarnation";
/// Leases lapsed for this many lease durations are deleted by whoever sees them (a replica
/// killed outright leaves its Lease behind; no controller-manager collects it).
const FORGET_AFTER_DURATIONS: i64 = 10;

/// This replica's view, empty of others until [`run`] has read the Leases.
pub fn peers(config: &PeersConfig, metrics: std::sync::Arc<super::PeerMetrics>) -> Peers {
    let me = Member {
        identity: config.identity.as_str().into(),
        incarnation: new_incarnation().into(),
        address: config.address.as_str().into(),
    };
    Peers::new(me, Some(TokenSource::new(config.token_file.clone())), config.call_timeout, metrics)
}

fn lease_name(config: &PeersConfig) -> String {
    format!("{}-{}", config.group, config.identity)
}

/// The member a Lease names, if it is live at `now`.
fn live_member(lease: &Lease, now: Timestamp) -> Option<Member> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0.as_millisecond();
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
    if renewed + duration < now.as_millisecond() {
        return None;
    }
    let annotations = lease.annotations();
    Some(Member {
        identity: spec.holder_identity.as_deref()?.into(),
        incarnation: annotations.get(INCARNATION_ANNOTATION)?.as_str().into(),
        address: annotations.get(ADDRESS_ANNOTATION)?.as_str().into(),
    })
}

fn long_lapsed(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else { return false };
    let Some(renewed) = spec.renew_time.as_ref() else { return true };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)).max(1);
    renewed.0.as_second() + duration * FORGET_AFTER_DURATIONS < now.as_second()
}

/// Holds this replica's Lease and keeps `peers` up to date until `shutdown`, then deletes the
/// Lease (the others drop this replica at once).
pub async fn run(client: Client, config: PeersConfig, peers: Peers, shutdown: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&config);
    let (store, writer) = reflector::store::<Lease>();
    let selector = format!("{GROUP_LABEL}={}", config.group);
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default().labels(&selector)))
        .default_backoff()
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    let mut renew = tokio::time::interval(config.renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Lapses are seen without an event: the live set is recomputed often.
    let mut look = tokio::time::interval(Duration::from_millis(250));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed_once = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = renew.tick() => {
                match hold(&api, &name, &config, &peers).await {
                    Ok(()) if !renewed_once => {
                        renewed_once = true;
                        tracing::info!(lease = %name, address = %config.address, "joined the replicas");
                    }
                    Ok(()) => {}
                    Err(e) => tracing::warn!(error = %e, lease = %name, "cannot renew this replica's Lease"),
                }
                forget_lapsed(&api, &store.state()).await;
            }
            event = stream.next() => match event {
                Some(Err(e)) => tracing::warn!(error = %e, "watching the replicas' Leases"),
                None => break,
                Some(Ok(_)) => {}
            },
            _ = look.tick() => {}
        }
        let now = Timestamp::now();
        peers.set_others(store.state().iter().filter_map(|l| live_member(l, now)).collect());
    }
    peers.set_others(Vec::new());
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => tracing::warn!(error = %e, lease = %name, "this replica's Lease was not deleted"),
    }
}

async fn hold(api: &Api<Lease>, name: &str, config: &PeersConfig, peers: &Peers) -> Result<(), kube::Error> {
    let me = peers.me();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(GROUP_LABEL.into(), config.group.clone())])),
            owner_references: config.owner.clone().map(|o| vec![o]),
            annotations: Some(BTreeMap::from([
                (ADDRESS_ANNOTATION.into(), me.address.to_string()),
                (INCARNATION_ANNOTATION.into(), me.incarnation.to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(me.identity.to_string()),
            lease_duration_seconds: Some(i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    let params = PatchParams::apply("opamp-operator-peers").force();
    api.patch(
        name,
        &params,
        &Patch::Apply(&serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": lease.metadata,
            "spec": lease.spec,
        })),
    )
    .await
    .map(|_| ())
}

async fn forget_lapsed(api: &Api<Lease>, leases: &[std::sync::Arc<Lease>]) {
    let now = Timestamp::now();
    for lease in leases.iter().filter(|l| long_lapsed(l, now)) {
        let name = lease.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(lease = %name, "deleted the Lease of a replica gone long ago"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::debug!(error = %e, lease = %name, "cannot delete a lapsed Lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("g-a".into()),
                annotations: Some(BTreeMap::from([
                    (ADDRESS_ANNOTATION.into(), "10.0.0.1:8081".into()),
                    (INCARNATION_ANNOTATION.into(), "x".into()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_replica_is_live_until_its_lease_lapses_and_forgotten_long_after() {
        let at = |s| Timestamp::from_second(s).unwrap();
        let l = lease(100, 15);
        assert_eq!(live_member(&l, at(115)).map(|m| m.address), Some("10.0.0.1:8081".into()));
        assert!(live_member(&l, at(116)).is_none());
        assert!(!long_lapsed(&l, at(250)));
        assert!(long_lapsed(&l, at(251)));
        let mut unannotated = l.clone();
        unannotated.metadata.annotations = None;
        assert!(live_member(&unannotated, at(101)).is_none(), "no address: not a member");
    }
}
