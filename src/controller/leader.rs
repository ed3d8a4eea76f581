//! Leader election on a `coordination.k8s.io/v1` Lease: every replica serves OpAMP, only the
//! leader writes status and events. The leader renews the Lease every `renew_every`; when it
//! stops renewing (crash) another replica takes over once `lease_duration` has passed, and a
//! replica that shuts down deletes the Lease it holds so the next one takes over at once (and an
//! uninstalled release leaves none behind).
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaderElectionConfig {
    /// Namespace and name of the Lease.
    pub namespace: String,
    pub name: String,
    /// This replica's identity (e.g. the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// The holder's Pod, set as the Lease's owner by whoever acquires it: the garbage collector
    /// deletes the Lease with its holder (a release uninstalled leaves none behind).
    pub owner: Option<OwnerReference>,
}

impl LeaderElectionConfig {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: "opamp-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            owner: None,
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Whether a Lease held by someone else has expired.
fn expired(spec: &LeaseSpec, at: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else { return true };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed.0.as_second() + duration < at.as_second()
}

/// Keeps trying to hold the Lease; publishes leadership on `leader` until `shutdown`, then
/// releases the Lease if held.
pub async fn run(
    client: Client,
    config: LeaderElectionConfig,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        let held = match try_acquire(&api, &config).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, lease = %config.name, "leader election: cannot read or write the Lease");
                false
            }
        };
        if leader.send_replace(held) != held {
            tracing::info!(identity = %config.identity, leader = held, "leadership changed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.renew_every) => {}
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(e) = release(&api, &config).await {
            tracing::warn!(error = %e, "leader election: Lease not released");
        }
    }
}

/// Creates, renews or takes over the Lease; true when this replica holds it afterwards.
async fn try_acquire(api: &Api<Lease>, config: &LeaderElectionConfig) -> Result<bool, kube::Error> {
    let seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                owner_references: config.owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // another replica was faster
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !mine && spec.holder_identity.is_some() && !expired(spec, Timestamp::now()) {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        lease.metadata.owner_references = config.owner.clone().map(|o| vec![o]);
    }
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now());
    // The resourceVersion makes this a compare-and-swap: a concurrent writer gets a 409.
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the Lease if this replica still holds it: the next replica creates it at once, and a
/// release uninstalled leaves no Lease behind. The resourceVersion precondition keeps a Lease
/// another replica took meanwhile.
async fn release(api: &Api<Lease>, config: &LeaderElectionConfig) -> Result<(), kube::Error> {
    let Some(lease) = api.get_opt(&config.name).await? else { return Ok(()) };
    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
    if holder != Some(config.identity.as_str()) {
        return Ok(());
    }
    let held = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.metadata.resource_version.clone(),
            uid: lease.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    match api.delete(&config.name, &held).await {
        Ok(_) => Ok(()),
        // Gone or taken over meanwhile: nothing of ours to release.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_duration() {
        let at = |s: i64| MicroTime(Timestamp::from_second(s).unwrap());
        let spec =
            LeaseSpec { renew_time: Some(at(100)), lease_duration_seconds: Some(15), ..Default::default() };
        assert!(!expired(&spec, Timestamp::from_second(115).unwrap()));
        assert!(expired(&spec, Timestamp::from_second(116).unwrap()));
        assert!(expired(&LeaseSpec::default(), Timestamp::from_second(0).unwrap()), "never renewed");
    }
}
