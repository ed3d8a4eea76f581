//! The wire rules, one test each, driven through the fleet without sockets: a message in,
//! the exact reply out.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::proto::{
    AgentCapabilities, AgentConfigFile, AgentConfigMap, AgentDescription, AgentDisconnect, AnyValue,
    AvailableComponents, ComponentHealth, EffectiveConfig, KeyValue, RemoteConfigStatus,
    RemoteConfigStatuses, ServerCapabilities, ServerToAgentFlags, any_value,
};
use crate::protocol::Description;
use crate::protocol::session::{ReportedHealth, SERVER_CAPABILITIES};

const UID: Uid =
    Uid([0x01, 0x93, 0xa5, 0xc4, 0x7d, 0x2e, 0x7c, 0x3a, 0x9b, 0x1f, 0x2a, 0x4c, 0x6e, 0x8f, 0x0a, 0x1b]);
const ACCEPTS_CONFIG: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsRemoteConfig as u64;
const FULL_STATE: u64 = ServerToAgentFlags::ReportFullState as u64;

fn key(uid: Uid) -> AgentKey {
    AgentKey::new("team-a", uid)
}

fn ws(fleet: &Fleet) -> Connection {
    fleet.connection(Transport::WebSocket, Tenant::new("team-a"))
}

fn http(fleet: &Fleet) -> Connection {
    fleet.connection(Transport::Http, Tenant::new("team-a"))
}

fn description(service: &str) -> AgentDescription {
    AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(service.into())) }),
        }],
        non_identifying_attributes: vec![],
    }
}

fn msg(uid: Uid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_wire(),
        sequence_num: seq,
        capabilities: ACCEPTS_CONFIG,
        ..Default::default()
    }
}

fn first(uid: Uid) -> AgentToServer {
    AgentToServer { agent_description: Some(description("checkout")), ..msg(uid, 0) }
}

/// The reply a server sends when it has nothing to say.
fn plain(uid: &[u8]) -> ServerToAgent {
    ServerToAgent {
        instance_uid: Bytes::copy_from_slice(uid),
        capabilities: SERVER_CAPABILITIES,
        ..Default::default()
    }
}

fn config(body: &str) -> Arc<AgentRemoteConfig> {
    let mut files = AgentConfigMap::default();
    files.config_map.insert(
        "collector.yaml".into(),
        AgentConfigFile { body: Bytes::from(body.to_owned()), content_type: "text/yaml".into() },
    );
    Arc::new(AgentRemoteConfig { config: Some(files), config_hash: Bytes::from(format!("hash-of-{body}")) })
}

fn status(cfg: &AgentRemoteConfig, s: RemoteConfigStatuses) -> RemoteConfigStatus {
    RemoteConfigStatus {
        last_remote_config_hash: cfg.config_hash.clone(),
        status: s as i32,
        error_message: String::new(),
    }
}

#[test]
fn first_reply_carries_server_capabilities_and_echoes_the_uid() {
    let fleet = Fleet::default();
    let reply = fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    assert_eq!(reply, plain(&UID.0));
    assert_eq!(reply.capabilities & ServerCapabilities::AcceptsStatus as u64, 1);
}

#[test]
fn every_message_gets_a_reply_including_heartbeats() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    for seq in 1..4 {
        assert_eq!(fleet.handle(&mut conn, msg(UID, seq)).unwrap(), plain(&UID.0));
    }
    assert!(fleet.agent(&key(UID)).unwrap().connected);
}

#[test]
fn uid_of_wrong_length_gets_a_new_instance_uid() {
    for bad in [&b"01ARZ3NDEKTSV4RRFFQ69G5FAV"[..], &[][..], &[7u8; 15][..], &[7u8; 17][..]] {
        let fleet = Fleet::default();
        let mut conn = ws(&fleet);
        let mut m = first(UID);
        m.instance_uid = Bytes::copy_from_slice(bad);
        let reply = fleet.handle(&mut conn, m.clone()).unwrap();
        let issued =
            reply.agent_identification.as_ref().expect("new_instance_uid issued").new_instance_uid.clone();
        let new_uid = Uid::from_wire(&issued).expect("16 bytes");
        assert_eq!(uuid::Uuid::from_bytes(new_uid.0).get_version_num(), 7);
        assert_eq!(
            reply,
            ServerToAgent {
                agent_identification: Some(AgentIdentification { new_instance_uid: issued.clone() }),
                ..plain(bad)
            },
            "the reply must echo the uid the agent sent"
        );
        // The agent is filed under the issued uid, and a retry with the bad uid gets the same one.
        assert!(fleet.agent(&key(new_uid)).is_some());
        m.sequence_num = 1;
        m.agent_description = None;
        let again = fleet.handle(&mut conn, m).unwrap();
        assert_eq!(again.agent_identification.unwrap().new_instance_uid, issued);
        // Once the agent adopts it, the sequence simply continues.
        assert_eq!(fleet.handle(&mut conn, msg(new_uid, 2)).unwrap(), plain(&new_uid.0));
        assert_eq!(fleet.known_count(), 1);
    }
}

#[test]
fn http_agents_with_a_bad_uid_get_the_same_new_uid_on_every_poll() {
    let fleet = Fleet::default();
    let mut m = first(UID);
    m.instance_uid = Bytes::from_static(b"01ARZ3NDEKTSV4RRFFQ69G5FAV");
    let a = fleet.handle(&mut http(&fleet), m.clone()).unwrap().agent_identification.unwrap();
    m.sequence_num = 1;
    let b = fleet.handle(&mut http(&fleet), m).unwrap().agent_identification.unwrap();
    assert_eq!(a, b);
}

#[test]
fn request_instance_uid_flag_gets_a_new_uid() {
    let fleet = Fleet::default();
    let mut m = first(UID);
    m.flags = AgentToServerFlags::RequestInstanceUid as u64;
    let reply = fleet.handle(&mut ws(&fleet), m).unwrap();
    let issued = Uid::from_wire(&reply.agent_identification.unwrap().new_instance_uid).unwrap();
    assert_ne!(issued, UID);
    assert_eq!(reply.instance_uid, UID.to_wire());
}

#[test]
fn unknown_agent_mid_sequence_is_asked_for_full_state() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    // E.g. the server restarted: the agent continues its sequence.
    let reply = fleet.handle(&mut conn, msg(UID, 41)).unwrap();
    assert_eq!(reply, ServerToAgent { flags: FULL_STATE, ..plain(&UID.0) });
    assert!(fleet.agent(&key(UID)).unwrap().awaiting_full_state);
    // The full state arrives in sequence: the flag is not repeated.
    let reply = fleet
        .handle(&mut conn, AgentToServer { agent_description: Some(description("x")), ..msg(UID, 42) })
        .unwrap();
    assert_eq!(reply, plain(&UID.0));
    assert!(!fleet.agent(&key(UID)).unwrap().awaiting_full_state);
}

#[test]
fn sequence_gaps_and_repeats_ask_for_full_state() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(fleet.handle(&mut conn, msg(UID, 1)).unwrap(), plain(&UID.0));
    // 2 was lost.
    assert_eq!(fleet.handle(&mut conn, msg(UID, 3)).unwrap().flags, FULL_STATE);
    // A repeat (an HTTP retry) is not the next message either.
    assert_eq!(fleet.handle(&mut conn, msg(UID, 3)).unwrap().flags, FULL_STATE);
    // An agent that restarted begins again at 0 with everything: in sequence.
    assert_eq!(fleet.handle(&mut conn, first(UID)).unwrap(), plain(&UID.0));
}

#[test]
fn no_config_is_offered_while_waiting_for_full_state() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, msg(UID, 7)).unwrap();
    let cfg = config("a");
    fleet.set_remote_config(&key(UID), Some(cfg.clone()));
    // A heartbeat in between carries no description: still waiting, still no offer.
    let reply = fleet.handle(&mut conn, msg(UID, 8)).unwrap();
    assert_eq!(reply.remote_config, None);
    // The full state shows the agent already applied it: nothing to send.
    let full = AgentToServer {
        agent_description: Some(description("x")),
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        ..msg(UID, 9)
    };
    assert_eq!(fleet.handle(&mut conn, full).unwrap(), plain(&UID.0));
}

#[test]
fn omitted_sub_messages_keep_their_last_value() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let health = ComponentHealth { healthy: true, status: "ok".into(), ..Default::default() };
    let effective = EffectiveConfig { config_map: Some(AgentConfigMap::default()) };
    let components = AvailableComponents { hash: Bytes::from_static(b"c1"), ..Default::default() };
    let cfg = config("a");
    let full = AgentToServer {
        health: Some(health.clone()),
        effective_config: Some(effective.clone()),
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        custom_capabilities: Some(CustomCapabilities { capabilities: vec!["com.example.pprof".into()] }),
        available_components: Some(components.clone()),
        ..first(UID)
    };
    fleet.handle(&mut conn, full).unwrap();
    fleet.take_changes();
    fleet.handle(&mut conn, msg(UID, 1)).unwrap();
    let r = fleet.agent(&key(UID)).unwrap().report;
    assert_eq!(r.description.as_ref().map(Description::to_proto), Some(description("checkout")));
    assert_eq!(r.health.as_ref().map(ReportedHealth::to_proto), Some(health));
    assert_eq!(r.effective_config.as_ref().map(|c| c.to_proto()), Some(effective));
    assert_eq!(r.remote_config_status, Some(status(&cfg, RemoteConfigStatuses::Applied)));
    assert!(r.supports_custom_capability("com.example.pprof"));
    assert_eq!(r.available_components, Some(Arc::new(components)));
    assert!(fleet.take_changes().is_empty(), "a heartbeat changes nothing");
}

#[test]
fn changes_are_reported_once_and_only_when_something_changed() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(
        fleet.take_changes()[&key(UID)],
        Changes::CONNECTED | Changes::CAPABILITIES | Changes::DESCRIPTION
    );
    // The same description again is no change; new health is.
    let m = AgentToServer {
        agent_description: Some(description("checkout")),
        health: Some(ComponentHealth { healthy: false, ..Default::default() }),
        ..msg(UID, 1)
    };
    fleet.handle(&mut conn, m).unwrap();
    assert_eq!(fleet.take_changes()[&key(UID)], Changes::HEALTH);
}

#[test]
fn remote_config_is_offered_once_and_not_again_once_reported() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let cfg = config("a");
    fleet.set_remote_config(&key(UID), Some(cfg.clone()));
    let reply = fleet.handle(&mut conn, msg(UID, 1)).unwrap();
    assert_eq!(reply, ServerToAgent { remote_config: Some((*cfg).clone()), ..plain(&UID.0) });
    // Offered already on this connection: not repeated while the agent works on it.
    assert_eq!(fleet.handle(&mut conn, msg(UID, 2)).unwrap(), plain(&UID.0));
    let applied = AgentToServer {
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        ..msg(UID, 3)
    };
    assert_eq!(fleet.handle(&mut conn, applied).unwrap(), plain(&UID.0));
    assert_eq!(
        fleet.agent(&key(UID)).unwrap().report.remote_config_status.unwrap().status,
        RemoteConfigStatuses::Applied as i32
    );
}

#[test]
fn a_failed_config_is_not_resent_but_a_new_one_is_offered() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let bad = config("bad");
    let failed = RemoteConfigStatus {
        error_message: "unknown receiver".into(),
        ..status(&bad, RemoteConfigStatuses::Failed)
    };
    fleet.handle(&mut conn, AgentToServer { remote_config_status: Some(failed), ..first(UID) }).unwrap();
    fleet.set_remote_config(&key(UID), Some(bad));
    assert_eq!(fleet.poll_push(&conn), None);
    let good = config("good");
    fleet.set_remote_config(&key(UID), Some(good.clone()));
    assert_eq!(fleet.poll_push(&conn).unwrap().remote_config, Some((*good).clone()));
}

#[test]
fn agents_that_do_not_accept_remote_config_are_never_offered_one() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let status_only = AgentCapabilities::ReportsStatus as u64;
    fleet.handle(&mut conn, AgentToServer { capabilities: status_only, ..first(UID) }).unwrap();
    fleet.set_remote_config(&key(UID), Some(config("a")));
    assert_eq!(fleet.poll_push(&conn), None);
    let heartbeat = AgentToServer { capabilities: status_only, ..msg(UID, 1) };
    assert_eq!(fleet.handle(&mut conn, heartbeat).unwrap().remote_config, None);
}

#[test]
fn reconnecting_agent_that_has_the_config_is_not_sent_it_again() {
    let cfg = config("a");
    // A fresh fleet (the server restarted) with the same desired config.
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let reply = fleet.handle(&mut conn, msg(UID, 12)).unwrap();
    assert_eq!(reply.flags, FULL_STATE);
    fleet.set_remote_config(&key(UID), Some(cfg.clone()));
    let full = AgentToServer {
        agent_description: Some(description("x")),
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        ..msg(UID, 13)
    };
    assert_eq!(fleet.handle(&mut conn, full).unwrap(), plain(&UID.0));
    assert_eq!(fleet.poll_push(&conn), None);
}

#[test]
fn an_agent_restarted_without_its_config_is_offered_it_again() {
    let fleet = Fleet::default();
    let cfg = config("a");
    let health = ComponentHealth { healthy: true, ..Default::default() };
    let effective = EffectiveConfig { config_map: Some(AgentConfigMap::default()) };
    let mut conn = ws(&fleet);
    let applied = AgentToServer {
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        health: Some(health),
        effective_config: Some(effective),
        ..first(UID)
    };
    fleet.handle(&mut conn, applied).unwrap();
    fleet.set_remote_config(&key(UID), Some(cfg.clone()));
    assert_eq!(fleet.poll_push(&conn), None, "the agent runs it");
    fleet.connection_closed(&conn);
    // The agent restarted and lost its config: it begins again at 0 with everything it has,
    // which is no remote config, health or effective config. What it reported before is gone.
    let mut conn = ws(&fleet);
    let reply = fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(reply.remote_config, Some((*cfg).clone()), "offered again after a restart");
    let r = fleet.agent(&key(UID)).unwrap().report;
    assert_eq!((r.remote_config_status, r.health, r.effective_config), (None, None, None));
    // The same holds for the full state the server asks for after a gap.
    let applied = AgentToServer {
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        ..msg(UID, 1)
    };
    fleet.handle(&mut conn, applied).unwrap();
    assert_eq!(fleet.handle(&mut conn, msg(UID, 5)).unwrap().flags, FULL_STATE);
    let full = AgentToServer { agent_description: Some(description("checkout")), ..msg(UID, 6) };
    assert_eq!(fleet.handle(&mut conn, full).unwrap().remote_config, Some((*cfg).clone()));
}

#[test]
fn a_new_connection_re_offers_a_config_the_agent_never_reported() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let cfg = config("a");
    fleet.set_remote_config(&key(UID), Some(cfg.clone()));
    assert!(fleet.poll_push(&conn).unwrap().remote_config.is_some());
    // The connection dropped before the agent got it; it reconnects.
    fleet.connection_closed(&conn);
    let mut conn2 = ws(&fleet);
    let reply = fleet.handle(&mut conn2, msg(UID, 1)).unwrap();
    assert_eq!(reply.remote_config, Some((*cfg).clone()));
}

#[test]
fn agent_disconnect_ends_the_session() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(fleet.connected_count(), 1);
    fleet.take_changes();
    let bye = AgentToServer { agent_disconnect: Some(AgentDisconnect {}), ..msg(UID, 1) };
    assert_eq!(fleet.handle(&mut conn, bye).unwrap(), plain(&UID.0));
    assert_eq!(fleet.connected_count(), 0);
    assert!(!fleet.agent(&key(UID)).unwrap().connected);
    assert_eq!(fleet.take_changes()[&key(UID)], Changes::DISCONNECTED);
    // The transport closing afterwards changes nothing more.
    fleet.connection_closed(&conn);
    assert_eq!(fleet.connected_count(), 0);
}

#[test]
fn agents_beyond_the_limit_are_refused_with_retry_after() {
    let fleet = Fleet::new(FleetConfig {
        max_agents: Some(1),
        retry_after: Duration::from_secs(7),
        ..Default::default()
    });
    let mut a = ws(&fleet);
    fleet.handle(&mut a, first(UID)).unwrap();
    let other = Uid([9; 16]);
    let err = fleet.handle(&mut ws(&fleet), first(other)).unwrap_err();
    assert_eq!(err, Rejection::AtCapacity { limit: 1, retry_after: Duration::from_secs(7) });
    assert!(fleet.agent(&key(other)).is_none(), "a refused agent is not registered");
    // Agents already in keep working.
    assert_eq!(fleet.handle(&mut a, msg(UID, 1)).unwrap(), plain(&UID.0));
    // Once one leaves, the next gets in.
    fleet.connection_closed(&a);
    assert!(fleet.handle(&mut ws(&fleet), first(other)).is_ok());
    assert_eq!(fleet.connected_count(), 1);
}

#[test]
fn same_agent_on_a_new_connection_replaces_the_old_one() {
    let fleet = Fleet::new(FleetConfig { max_agents: Some(1), ..Default::default() });
    let mut old = ws(&fleet);
    fleet.handle(&mut old, first(UID)).unwrap();
    let mut new = ws(&fleet);
    fleet.handle(&mut new, msg(UID, 1)).expect("not counted twice against the limit");
    // The stale connection closing does not take the agent offline.
    fleet.connection_closed(&old);
    assert!(fleet.agent(&key(UID)).unwrap().connected);
    assert_eq!(fleet.connected_count(), 1);
    fleet.set_remote_config(&key(UID), Some(config("a")));
    assert_eq!(fleet.poll_push(&old), None);
    assert!(fleet.poll_push(&new).is_some());
}

#[test]
fn desired_changes_wake_websocket_agents_and_wait_for_http_polls() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let wakeup = conn.wakeup().unwrap().clone();
    let cfg = config("a");
    assert!(fleet.set_remote_config(&key(UID), Some(cfg.clone())));
    assert!(!fleet.set_remote_config(&key(UID), Some(cfg.clone())), "unchanged desired state is no change");
    // The raise is kept: the connection task wakes even if it was busy.
    let raised = futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| wakeup.poll_raised(cx)));
    assert_eq!(raised, Some(Wakeup::PUSH), "woken");
    assert_eq!(
        fleet.poll_push(&conn).unwrap(),
        ServerToAgent { remote_config: Some((*cfg).clone()), ..plain(&UID.0) }
    );

    let h = Uid([5; 16]);
    fleet.handle(&mut http(&fleet), first(h)).unwrap();
    fleet.set_remote_config(&key(h), Some(cfg.clone()));
    assert_eq!(fleet.poll_push(&http(&fleet)), None, "nothing is pushed to HTTP agents");
    assert_eq!(fleet.handle(&mut http(&fleet), msg(h, 1)).unwrap().remote_config, Some((*cfg).clone()));
}

#[test]
fn http_agents_missing_three_heartbeats_are_disconnected_then_forgotten() {
    let fleet = Fleet::new(FleetConfig {
        heartbeat_interval: Duration::from_secs(10),
        offline_retention: Duration::from_secs(60),
        ..Default::default()
    });
    fleet.handle(&mut http(&fleet), first(UID)).unwrap();
    let start = Instant::now();
    fleet.sweep(start + Duration::from_secs(29));
    assert!(fleet.agent(&key(UID)).unwrap().connected);
    fleet.sweep(start + Duration::from_secs(31));
    assert!(!fleet.agent(&key(UID)).unwrap().connected);
    assert_eq!(fleet.connected_count(), 0);
    fleet.sweep(start + Duration::from_secs(31 + 61));
    assert!(fleet.agent(&key(UID)).is_none());
    assert_eq!(fleet.known_count(), 0);
    assert!(fleet.take_changes()[&key(UID)].contains(Changes::REMOVED));
}

#[test]
fn websocket_agents_are_not_swept_while_connected() {
    let fleet = Fleet::new(FleetConfig { heartbeat_interval: Duration::from_secs(1), ..Default::default() });
    fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    fleet.sweep(Instant::now() + Duration::from_secs(3600));
    assert!(fleet.agent(&key(UID)).unwrap().connected);
}

#[test]
fn custom_messages_go_out_one_per_message_in_order() {
    let fleet = Fleet::new(FleetConfig { outbox_limit: 2, ..Default::default() });
    let mut conn = ws(&fleet);
    let cap = "com.example.pprof";
    let m =
        |t: &str| CustomMessage { capability: cap.into(), r#type: t.into(), data: Bytes::from_static(b"x") };
    assert_eq!(fleet.enqueue_custom_message(&key(UID), m("start")), Err(EnqueueError::UnknownAgent));
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(
        fleet.enqueue_custom_message(&key(UID), m("start")),
        Err(EnqueueError::CapabilityNotSupported)
    );
    let declare = AgentToServer {
        custom_capabilities: Some(CustomCapabilities { capabilities: vec![cap.into()] }),
        ..msg(UID, 1)
    };
    fleet.handle(&mut conn, declare).unwrap();
    assert_eq!(fleet.enqueue_custom_message(&key(UID), m("start")), Ok(1));
    assert_eq!(fleet.enqueue_custom_message(&key(UID), m("stop")), Ok(2));
    assert_eq!(fleet.enqueue_custom_message(&key(UID), m("more")), Err(EnqueueError::QueueFull(2)));
    assert_eq!(
        fleet.poll_push(&conn).unwrap(),
        ServerToAgent { custom_message: Some(m("start")), ..plain(&UID.0) }
    );
    assert_eq!(fleet.handle(&mut conn, msg(UID, 2)).unwrap().custom_message, Some(m("stop")));
    assert_eq!(fleet.poll_push(&conn), None);
}

#[test]
fn custom_messages_from_agents_reach_the_sink() {
    #[derive(Default)]
    struct Sink(Mutex<Vec<(Uid, String, CustomMessage)>>);
    impl CustomMessageSink for Sink {
        fn on_custom_message(&self, agent: &AgentKey, m: CustomMessage) {
            self.0.lock().unwrap().push((agent.uid, agent.namespace.to_string(), m));
        }
    }
    let fleet = Fleet::default();
    let sink = Arc::new(Sink::default());
    fleet.set_custom_message_sink(sink.clone());
    let cm = CustomMessage {
        capability: "com.example.pprof".into(),
        r#type: "profile".into(),
        data: Bytes::from_static(b"\x01\x02"),
    };
    let reply = fleet
        .handle(&mut ws(&fleet), AgentToServer { custom_message: Some(cm.clone()), ..first(UID) })
        .unwrap();
    assert_eq!(reply, plain(&UID.0));
    assert_eq!(*sink.0.lock().unwrap(), vec![(UID, "team-a".to_string(), cm)]);
}

/// Gives every agent of a namespace one config.
struct Everyone(Arc<AgentRemoteConfig>);
impl Plan for Everyone {
    fn desired(&self, _: &Uid, _: &AgentReport, _: &DesiredState) -> DesiredState {
        DesiredState {
            remote_config: Some(self.0.clone()),
            custom_capabilities: None,
            connection_settings: None,
            restart: None,
        }
    }
}

#[test]
fn the_plan_gives_the_desired_state_before_the_first_reply() {
    struct ByService(Arc<AgentRemoteConfig>);
    impl Plan for ByService {
        fn desired(&self, _: &Uid, report: &AgentReport, _: &DesiredState) -> DesiredState {
            let selected =
                report.description.as_ref().map(Description::to_proto) == Some(description("checkout"));
            DesiredState {
                remote_config: selected.then(|| self.0.clone()),
                custom_capabilities: None,
                connection_settings: None,
                restart: None,
            }
        }
    }
    let fleet = Fleet::default();
    let cfg = config("a");
    fleet.publish_plan("team-a", Arc::new(ByService(cfg.clone())));
    let reply = fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    assert_eq!(reply, ServerToAgent { remote_config: Some((*cfg).clone()), ..plain(&UID.0) });
    // A description change is re-evaluated: this agent no longer matches.
    let other = Uid([3; 16]);
    let mut conn = ws(&fleet);
    fleet
        .handle(
            &mut conn,
            AgentToServer { agent_description: Some(description("payments")), ..msg(other, 0) },
        )
        .unwrap();
    assert_eq!(fleet.desired_state(&key(other)).unwrap().remote_config, None);
    // Another namespace has no plan: its agents get nothing from team-a's.
    let mut elsewhere = fleet.connection(Transport::WebSocket, Tenant::new("team-b"));
    let reply = fleet.handle(&mut elsewhere, first(Uid([4; 16]))).unwrap();
    assert_eq!(reply.remote_config, None);
}

#[test]
fn a_new_plan_reaches_connected_agents_at_once_and_keeps_what_a_plan_keeps() {
    // A plan that holds agents back (as a progressive rollout does) keeps their current state.
    struct OnlyUid(Uid, Arc<AgentRemoteConfig>);
    impl Plan for OnlyUid {
        fn desired(&self, uid: &Uid, _: &AgentReport, current: &DesiredState) -> DesiredState {
            if *uid == self.0 {
                DesiredState {
                    remote_config: Some(self.1.clone()),
                    custom_capabilities: None,
                    connection_settings: None,
                    restart: None,
                }
            } else {
                current.clone()
            }
        }
    }
    let fleet = Fleet::default();
    let (v1, v2) = (config("v1"), config("v2"));
    fleet.publish_plan("team-a", Arc::new(Everyone(v1.clone())));
    let (mut a, mut b) = (ws(&fleet), ws(&fleet));
    let other = Uid([9; 16]);
    fleet.handle(&mut a, first(UID)).unwrap();
    fleet.handle(&mut b, first(other)).unwrap();
    let v = fleet.publish_plan("team-a", Arc::new(OnlyUid(UID, v2.clone())));
    assert_eq!(fleet.plan_version("team-a"), Some(v));
    assert_eq!(fleet.poll_push(&a).unwrap().remote_config.as_ref(), Some(&*v2), "pushed at once");
    assert_eq!(fleet.poll_push(&b), None, "held back: nothing new");
    assert_eq!(fleet.desired_state(&key(other)).unwrap().remote_config, Some(v1));
}

#[test]
fn custom_capabilities_are_advertised_when_they_change() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let caps = Arc::new(CustomCapabilities { capabilities: vec!["com.example.pprof".into()] });
    fleet.set_desired_state(
        &key(UID),
        DesiredState { custom_capabilities: Some(caps.clone()), ..Default::default() },
    );
    assert_eq!(
        fleet.poll_push(&conn).unwrap(),
        ServerToAgent { custom_capabilities: Some((*caps).clone()), ..plain(&UID.0) }
    );
    assert_eq!(fleet.poll_push(&conn), None);
    // Withdrawn: an empty list tells the agent.
    fleet.set_desired_state(&key(UID), DesiredState::default());
    assert_eq!(fleet.poll_push(&conn).unwrap().custom_capabilities, Some(CustomCapabilities::default()));
}

#[test]
fn the_same_uid_from_another_namespace_is_another_agent() {
    // Attack: team-b learns the uid of a team-a agent and speaks for it with team-b's token.
    let fleet = Fleet::default();
    let cap = "com.example.jobs";
    let declared = |m: AgentToServer| AgentToServer {
        custom_capabilities: Some(CustomCapabilities { capabilities: vec![cap.into()] }),
        ..m
    };
    fleet.handle(&mut http(&fleet), declared(first(UID))).unwrap();
    let secret =
        CustomMessage { capability: cap.into(), r#type: "job".into(), data: Bytes::from_static(b"a") };
    fleet.enqueue_custom_message(&key(UID), secret.clone()).unwrap();

    let mut b = fleet.connection(Transport::Http, Tenant::new("team-b"));
    let reply = fleet.handle(&mut b, declared(first(UID))).unwrap();
    assert_eq!(reply.custom_message, None, "team-b got team-a's queued message");
    let team_b = AgentKey::new("team-b", UID);
    assert_eq!(fleet.agent(&team_b).unwrap().namespace, "team-b");
    assert_eq!(fleet.agent(&key(UID)).unwrap().namespace, "team-a");
    assert_eq!(fleet.known_count(), 2);

    // team-b's dispatches reach its own record only; team-a's agent gets exactly its own message.
    let planted = CustomMessage { data: Bytes::from_static(b"planted"), ..secret.clone() };
    fleet.enqueue_custom_message(&team_b, planted.clone()).unwrap();
    assert_eq!(fleet.handle(&mut http(&fleet), msg(UID, 1)).unwrap().custom_message, Some(secret));
    assert_eq!(fleet.handle(&mut http(&fleet), msg(UID, 2)).unwrap().custom_message, None);
    assert_eq!(fleet.handle(&mut b, msg(UID, 1)).unwrap().custom_message, Some(planted));
}

#[test]
fn issued_uids_are_per_namespace() {
    let fleet = Fleet::default();
    let ulid =
        || AgentToServer { instance_uid: Bytes::from_static(b"01ARZ3NDEKTSV4RRFFQ69G5FAV"), ..first(UID) };
    let issued = |conn: &mut Connection| {
        let reply = fleet.handle(conn, ulid()).unwrap();
        reply.agent_identification.unwrap().new_instance_uid
    };
    let a = issued(&mut http(&fleet));
    let mut b = fleet.connection(Transport::Http, Tenant::new("team-b"));
    assert_ne!(issued(&mut b), a, "team-b was handed the uid issued to team-a");
    assert_eq!(issued(&mut http(&fleet)), a, "a retry from team-a keeps its issued uid");
    // A wire uid longer than any real one is not remembered (nothing of it is kept).
    let huge = || AgentToServer { instance_uid: Bytes::from(vec![7u8; 1 << 20]), ..first(UID) };
    let one = fleet.handle(&mut http(&fleet), huge()).unwrap().agent_identification.unwrap();
    let two = fleet.handle(&mut http(&fleet), huge()).unwrap().agent_identification.unwrap();
    assert_ne!(one, two);
}

#[test]
fn a_websocket_speaks_for_one_agent_and_closing_it_leaves_no_ghosts() {
    // Attack: one socket claims 501 uids; before, every uid but the last stayed "connected".
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    for i in 0..=500u16 {
        let mut uid = UID;
        uid.0[..2].copy_from_slice(&i.to_be_bytes());
        fleet.handle(&mut conn, first(uid)).unwrap();
        assert_eq!(fleet.connected_count(), 1, "uid #{i}");
    }
    fleet.connection_closed(&conn);
    assert_eq!(fleet.connected_count(), 0);
    let mut online = 0;
    fleet.for_each_view(|v| online += usize::from(v.connected));
    assert_eq!(online, 0);
}

#[test]
fn agents_beyond_a_namespaces_limit_are_told_to_retry() {
    let retry_after = Duration::from_secs(7);
    let config = FleetConfig { max_agents_per_namespace: Some(3), retry_after, ..Default::default() };
    let fleet = Fleet::new(config);
    let uid = |i: u8| Uid([i; 16]);
    for i in 0..3 {
        fleet.handle(&mut http(&fleet), first(uid(i))).unwrap();
    }
    let refused = fleet.handle(&mut http(&fleet), first(uid(3))).unwrap_err();
    assert_eq!(refused, Rejection::NamespaceFull { namespace: "team-a".into(), limit: 3, retry_after });
    assert_eq!(refused.retry_after(), retry_after);
    // Known agents keep being served; another namespace is not affected.
    fleet.handle(&mut http(&fleet), msg(uid(0), 1)).unwrap();
    fleet.handle(&mut fleet.connection(Transport::Http, Tenant::new("team-b")), first(uid(3))).unwrap();
    assert_eq!(fleet.namespace_count("team-a"), 3);
    assert_eq!(fleet.known_count(), 4);
    assert_eq!(fleet.take_refusals(), vec![Refusals { namespace: "team-a".into(), count: 1, limit: 3 }]);
    assert_eq!(fleet.take_refusals(), vec![]);
    // Forgotten agents make room again.
    let config = FleetConfig {
        max_agents_per_namespace: Some(1),
        offline_retention: Duration::ZERO,
        ..Default::default()
    };
    let fleet = Fleet::new(config);
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(uid(0))).unwrap();
    fleet.connection_closed(&conn);
    assert!(fleet.handle(&mut http(&fleet), first(uid(1))).is_err());
    fleet.sweep(Instant::now() + Duration::from_millis(1));
    assert_eq!(fleet.namespace_count("team-a"), 0);
    fleet.handle(&mut http(&fleet), first(uid(1))).unwrap();
}

#[test]
fn reported_state_beyond_its_bound_is_dropped_and_flagged() {
    let config = FleetConfig {
        max_reported_bytes_per_agent: 64 << 10,
        max_reported_bytes_per_namespace: 100 << 10,
        ..Default::default()
    };
    let fleet = Fleet::new(config);
    let effective = |bytes: usize| EffectiveConfig {
        config_map: Some(AgentConfigMap {
            config_map: [(
                "big.yaml".into(),
                AgentConfigFile { body: vec![b'x'; bytes].into(), content_type: String::new() },
            )]
            .into(),
        }),
    };
    let uid = |i: u8| Uid([i; 16]);
    // 4 MB of effective config: dropped, the rest (description) kept, the agent flagged.
    let m = AgentToServer { effective_config: Some(effective(4 << 20)), ..first(uid(1)) };
    fleet.handle(&mut http(&fleet), m).unwrap();
    let a = fleet.agent(&key(uid(1))).unwrap();
    assert_eq!(a.report.effective_config, None);
    assert_eq!(a.report.trimmed, Changes::EFFECTIVE_CONFIG);
    assert_eq!(a.report.trimmed.part_names(), vec!["effectiveConfig"]);
    assert_eq!(a.report.description.map(|d| d.to_proto()), Some(description("checkout")));
    assert!(a.reported_bytes < 1024, "{}", a.reported_bytes);
    // Within the agent's bound: kept, until the namespace's bound is reached.
    for i in 2..5 {
        let m = AgentToServer { effective_config: Some(effective(40 << 10)), ..first(uid(i)) };
        fleet.handle(&mut http(&fleet), m).unwrap();
    }
    let kept: Vec<bool> =
        (2..5).map(|i| fleet.agent(&key(uid(i))).unwrap().report.effective_config.is_some()).collect();
    assert_eq!(kept, vec![true, true, false]);
    assert!(fleet.namespace_reported_bytes("team-a") <= 100 << 10);
    // A smaller config that fits is kept again, and the flag cleared.
    let m = AgentToServer { effective_config: Some(effective(1 << 10)), ..msg(uid(1), 1) };
    fleet.handle(&mut http(&fleet), m).unwrap();
    let a = fleet.agent(&key(uid(1))).unwrap();
    assert!(a.report.effective_config.is_some());
    assert_eq!(a.report.trimmed, Changes::empty());
}

#[test]
fn components_dropped_for_size_are_not_asked_for_again() {
    let config = FleetConfig { max_reported_bytes_per_agent: 1 << 10, ..Default::default() };
    let fleet = Fleet::new(config);
    let details = crate::proto::ComponentDetails { metadata: vec![], sub_component_map: Default::default() };
    let components: std::collections::BTreeMap<String, _> =
        (0..200).map(|i| (format!("receiver-{i:04}"), details.clone())).collect();
    let hash = Bytes::from_static(b"h1");
    let full = AvailableComponents { components, hash: hash.clone() };
    let m = AgentToServer { available_components: Some(full), ..first(UID) };
    fleet.handle(&mut http(&fleet), m).unwrap();
    let r = fleet.agent(&key(UID)).unwrap().report;
    assert!(r.trimmed.contains(Changes::AVAILABLE_COMPONENTS));
    assert_eq!(
        r.available_components.as_ref().map(|c| (c.components.len(), c.hash.clone())),
        Some((0, hash.clone()))
    );
    // The agent then sends the hash alone: the server must not ask for what it would drop again.
    let m = AgentToServer {
        available_components: Some(AvailableComponents { components: Default::default(), hash }),
        ..msg(UID, 1)
    };
    let reply = fleet.handle(&mut http(&fleet), m).unwrap();
    assert_eq!(reply.flags & ServerToAgentFlags::ReportAvailableComponents as u64, 0);
}

#[test]
fn error_texts_agents_report_are_cut_to_their_bound() {
    let fleet = Fleet::default();
    let cfg = config("a");
    let mut s = status(&cfg, RemoteConfigStatuses::Failed);
    s.error_message = "é".repeat(10_000);
    fleet.handle(&mut http(&fleet), AgentToServer { remote_config_status: Some(s), ..first(UID) }).unwrap();
    let kept = fleet.agent(&key(UID)).unwrap().report.remote_config_status.unwrap().error_message;
    assert!(
        kept.len() <= crate::protocol::session::MAX_ERROR_MESSAGE_BYTES && kept.len() > 1000,
        "{}",
        kept.len()
    );
}

#[test]
fn a_panic_under_a_shard_lock_does_not_fail_the_shard() {
    let fleet = Fleet::default();
    fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fleet.inspect(&key(UID), |_| panic!("a bug while the shard is locked"));
    }));
    assert!(panicked.is_err());
    // Same shard (same last byte), later messages: served.
    let mut other = Uid([9; 16]);
    other.0[15] = UID.0[15];
    fleet.handle(&mut ws(&fleet), first(other)).unwrap();
    fleet.handle(&mut ws(&fleet), msg(UID, 1)).unwrap();
    fleet.sweep(Instant::now());
    assert_eq!(fleet.agents().len(), 2);
}

#[test]
fn a_components_hash_without_components_is_answered_with_report_available_components() {
    const REPORT_COMPONENTS: u64 = ServerToAgentFlags::ReportAvailableComponents as u64;
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let hash_only = AvailableComponents { hash: Bytes::from_static(b"c1"), ..Default::default() };
    let mut full = hash_only.clone();
    full.components.insert("receivers".into(), Default::default());
    let with = |components: &AvailableComponents, m: AgentToServer| AgentToServer {
        available_components: Some(components.clone()),
        ..m
    };

    let reply = fleet.handle(&mut conn, with(&hash_only, first(UID))).unwrap();
    assert_eq!(reply.flags, REPORT_COMPONENTS, "the server has no components for this hash");
    let reply = fleet.handle(&mut conn, with(&full, msg(UID, 1))).unwrap();
    assert_eq!(reply.flags, 0);
    assert_eq!(fleet.agent(&key(UID)).unwrap().report.available_components, Some(Arc::new(full.clone())));
    // From now on the hash alone is enough, and does not erase the components.
    let reply = fleet.handle(&mut conn, with(&hash_only, msg(UID, 2))).unwrap();
    assert_eq!(reply.flags, 0);
    assert_eq!(fleet.agent(&key(UID)).unwrap().report.available_components, Some(Arc::new(full)));
    // A new hash without components is asked for again.
    let changed = AvailableComponents { hash: Bytes::from_static(b"c2"), ..Default::default() };
    let reply = fleet.handle(&mut conn, with(&changed, msg(UID, 3))).unwrap();
    assert_eq!(reply.flags, REPORT_COMPONENTS);
}

#[test]
fn plans_published_while_agents_connect_reach_every_agent_from_many_threads() {
    // Agents connect on some threads while plans are published on another: whichever comes
    // second sees the other, so every agent ends with the last plan's config.
    let fleet = Fleet::default();
    let last = config("v50");
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let fleet = fleet.clone();
            s.spawn(move || {
                for i in 0..200u8 {
                    let uid = Uid([t, i, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, i]);
                    fleet.handle(&mut ws(&fleet), first(uid)).unwrap();
                }
            });
        }
        let fleet = fleet.clone();
        let last = last.clone();
        s.spawn(move || {
            for v in 0..=50 {
                let cfg = if v == 50 { last.clone() } else { config(&format!("v{v}")) };
                fleet.publish_plan("team-a", Arc::new(Everyone(cfg)));
            }
        });
    });
    assert_eq!(fleet.known_count(), 800);
    fleet.for_each_view(|a| assert_eq!(a.desired.remote_config.as_ref(), Some(&last), "{}", a.uid));
}

#[test]
fn agents_reporting_the_same_config_and_components_share_one_copy() {
    let fleet = Fleet::default();
    let mut map = AgentConfigMap::default();
    map.config_map.insert(
        "collector.yaml".into(),
        AgentConfigFile { body: Bytes::from(vec![b'x'; 8 << 10]), content_type: "text/yaml".into() },
    );
    let effective = EffectiveConfig { config_map: Some(map) };
    let details = crate::proto::ComponentDetails { metadata: vec![], sub_component_map: Default::default() };
    let components = AvailableComponents {
        components: (0..100).map(|i| (format!("receiver-{i:03}"), details.clone())).collect(),
        hash: Bytes::from_static(b"build-1"),
    };
    let report = |uid| AgentToServer {
        effective_config: Some(effective.clone()),
        available_components: Some(components.clone()),
        ..first(uid)
    };
    let (a, b) = (Uid([1; 16]), Uid([2; 16]));
    fleet.handle(&mut ws(&fleet), report(a)).unwrap();
    fleet.handle(&mut ws(&fleet), report(b)).unwrap();
    let (ra, rb) = (fleet.agent(&key(a)).unwrap().report, fleet.agent(&key(b)).unwrap().report);
    assert!(Arc::ptr_eq(ra.effective_config.as_ref().unwrap(), rb.effective_config.as_ref().unwrap()));
    assert!(Arc::ptr_eq(
        ra.available_components.as_ref().unwrap(),
        rb.available_components.as_ref().unwrap()
    ));
    let shared = fleet.shared_parts();
    assert_eq!((shared.effective_configs, shared.available_components), (1, 1));
    // Their descriptions' text too: `service.name` and `checkout`, once.
    assert_eq!(shared.description_strings, 2);
    // Each agent still reads as what it reported, and is charged for it against its bounds.
    assert_eq!(ra.effective_config.as_ref().map(|c| c.to_proto()), Some(effective.clone()));
    assert!(fleet.agent(&key(b)).unwrap().reported_bytes > 8 << 10);
    // One agent moving on to another config leaves the other's copy alone.
    let mut changed = effective.clone();
    changed.config_map.as_mut().unwrap().config_map.get_mut("collector.yaml").unwrap().body =
        Bytes::from_static(b"exporters: {}");
    let m = AgentToServer { effective_config: Some(changed.clone()), ..msg(b, 1) };
    fleet.handle(&mut ws(&fleet), m).unwrap();
    drop((ra, rb));
    let read = |uid| fleet.agent(&key(uid)).unwrap().report.effective_config.map(|c| c.to_proto());
    assert_eq!(read(b), Some(changed));
    assert_eq!(read(a), Some(effective));
    let shared = fleet.shared_parts();
    assert_eq!((shared.effective_configs, shared.available_components), (2, 1));
}

#[test]
fn agents_reporting_configs_that_differ_in_their_own_values_keep_a_small_difference_each() {
    let fleet = Fleet::default();
    // As the supervisor writes them: common settings, and a few values of each agent's own.
    let effective = |i: u8| {
        let common: String = (0..60).map(|n| format!("  setting_{n}: value-{}\n", n * 7)).collect();
        let own = format!("host.name: host-{i}\nppid: {}\ninstance_uid: {:032x}\n", 1000 + u32::from(i), i);
        let mut map = AgentConfigMap::default();
        map.config_map.insert(
            "collector.yaml".into(),
            AgentConfigFile {
                body: Bytes::from(format!("{own}service:\n{common}")),
                content_type: "text/yaml".into(),
            },
        );
        EffectiveConfig { config_map: Some(map) }
    };
    let uid = |i: u8| Uid([i; 16]);
    for i in 1..=3 {
        let m = AgentToServer { effective_config: Some(effective(i)), ..first(uid(i)) };
        fleet.handle(&mut ws(&fleet), m).unwrap();
    }
    let (a, b) = (fleet.agent(&key(uid(1))).unwrap(), fleet.agent(&key(uid(2))).unwrap());
    let (ka, kb) = (a.report.effective_config.clone().unwrap(), b.report.effective_config.clone().unwrap());
    let len = prost::Message::encoded_len(&effective(2));
    assert!(len > 1500 && !ka.is_delta(), "the first is kept whole: {ka:?}");
    assert!(kb.is_delta() && kb.kept_len() < len / 4, "{kb:?}");
    // Each reads as what it reported, and is charged for all of it.
    for i in 1..=3 {
        let agent = fleet.agent(&key(uid(i))).unwrap();
        assert_eq!(agent.report.effective_config.as_ref().map(|c| c.to_proto()), Some(effective(i)));
    }
    assert_eq!(a.reported_bytes - prost::Message::encoded_len(&effective(1)), b.reported_bytes - len);
    assert_eq!(fleet.shared_parts().effective_configs, 3);
    // The first agent's config, the others' reference, lives on while they do.
    fleet
        .handle(&mut ws(&fleet), AgentToServer { effective_config: Some(effective(9)), ..msg(uid(1), 1) })
        .unwrap();
    drop((a, b, ka, kb));
    let b = fleet.agent(&key(uid(2))).unwrap();
    assert_eq!(b.report.effective_config.map(|c| c.to_proto()), Some(effective(2)));
}

fn settings(heartbeat: u64) -> Arc<ConnectionSettingsOffers> {
    use crate::proto::OpAmpConnectionSettings;
    Arc::new(ConnectionSettingsOffers {
        hash: Bytes::from(format!("settings-{heartbeat}")),
        opamp: Some(OpAmpConnectionSettings { heartbeat_interval_seconds: heartbeat, ..Default::default() }),
        ..Default::default()
    })
}

fn set_settings(fleet: &Fleet, offer: &Arc<ConnectionSettingsOffers>) {
    let desired = DesiredState { connection_settings: Some(offer.clone()), ..Default::default() };
    fleet.set_desired_state(&key(UID), desired);
}

const HEARTBEATS: u64 = ACCEPTS_CONFIG | AgentCapabilities::ReportsHeartbeat as u64;

#[test]
fn the_heartbeat_interval_is_offered_once_to_agents_that_report_heartbeats() {
    let fleet = Fleet::default();
    let offer = settings(5);
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..first(UID) }).unwrap();
    set_settings(&fleet, &offer);
    let pushed = fleet.poll_push(&conn).expect("pushed to a connected agent");
    let sent = pushed.connection_settings.expect("an offer");
    assert_eq!(sent.hash, offer.hash);
    assert_eq!(
        sent.opamp.as_ref().map(|o| o.heartbeat_interval_seconds),
        Some(5),
        "always with the interval"
    );
    assert_eq!(pushed.capabilities & ServerCapabilities::OffersConnectionSettings as u64, 0x20);
    // Not again: not on the next message, nor on a new connection (the agent keeps what it was
    // given; a client that reconnects to apply settings would otherwise do so for ever).
    let next = fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..msg(UID, 1) }).unwrap();
    assert_eq!(next.connection_settings, None);
    fleet.connection_closed(&conn);
    let mut conn = ws(&fleet);
    let back = fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..msg(UID, 2) }).unwrap();
    assert_eq!(back.connection_settings, None, "offered once, not once per connection");
    // New settings are offered.
    let faster = settings(2);
    set_settings(&fleet, &faster);
    let pushed = fleet.poll_push(&conn).and_then(|m| m.connection_settings).map(|s| s.hash);
    assert_eq!(pushed, Some(faster.hash.clone()));
    // A restarted agent (a new sequence) lost them: offered again.
    let restarted =
        fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..first(UID) }).unwrap();
    assert_eq!(restarted.connection_settings.map(|s| s.hash), Some(faster.hash.clone()));
}

#[test]
fn connection_settings_go_only_to_agents_that_can_take_them() {
    let offer = settings(5);
    let accepts_opamp = HEARTBEATS | AgentCapabilities::AcceptsOpAmpConnectionSettings as u64;
    for (capabilities, why) in [
        (ACCEPTS_CONFIG, "an agent that does not report heartbeats"),
        (accepts_opamp, "an agent that would reconnect with the offer's (empty) endpoint"),
    ] {
        let fleet = Fleet::default();
        let mut conn = ws(&fleet);
        fleet.handle(&mut conn, AgentToServer { capabilities, ..first(UID) }).unwrap();
        set_settings(&fleet, &offer);
        assert_eq!(fleet.poll_push(&conn).and_then(|m| m.connection_settings), None, "{why}");
        let reply = fleet.handle(&mut conn, AgentToServer { capabilities, ..msg(UID, 1) }).unwrap();
        assert_eq!(reply.connection_settings, None, "{why}");
    }
}

#[test]
fn settings_an_agent_reports_having_are_not_offered_and_its_status_is_kept() {
    use crate::proto::{ConnectionSettingsStatus, ConnectionSettingsStatuses};
    let offer = settings(5);
    // A fresh server (or another replica): the agent reports the offer it has.
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..msg(UID, 7) }).unwrap();
    set_settings(&fleet, &offer);
    let status = ConnectionSettingsStatus {
        last_connection_settings_hash: offer.hash.clone(),
        status: ConnectionSettingsStatuses::Applied as i32,
        error_message: String::new(),
    };
    let full = AgentToServer {
        capabilities: HEARTBEATS,
        agent_description: Some(description("x")),
        connection_settings_status: Some(status.clone()),
        ..msg(UID, 8)
    };
    assert_eq!(fleet.handle(&mut conn, full).unwrap().connection_settings, None);
    assert_eq!(fleet.poll_push(&conn), None);
    let kept = fleet.agent(&key(UID)).unwrap().report.connection_settings_status;
    assert_eq!(kept.as_deref(), Some(&status));
    assert!(fleet.take_changes()[&key(UID)].contains(Changes::CONNECTION_SETTINGS_STATUS));
}

#[test]
fn an_http_agent_given_a_longer_poll_interval_is_not_taken_for_gone_between_polls() {
    let fleet = Fleet::new(FleetConfig { heartbeat_interval: Duration::from_secs(10), ..Default::default() });
    let mut conn = http(&fleet);
    fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..first(UID) }).unwrap();
    set_settings(&fleet, &settings(60));
    let start = Instant::now();
    fleet.sweep(start + Duration::from_secs(31));
    assert!(fleet.agent(&key(UID)).unwrap().connected, "three of the server's intervals: polls every 60 s");
    fleet.sweep(start + Duration::from_secs(181));
    assert!(!fleet.agent(&key(UID)).unwrap().connected, "three of its own");
}

#[test]
fn a_restart_is_commanded_once_alone_to_agents_that_accept_it_and_started_before_it() {
    let restarts = HEARTBEATS | AgentCapabilities::AcceptsRestartCommand as u64;
    let started = |at: u64| ComponentHealth { healthy: true, start_time_unix_nano: at, ..Default::default() };
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let hello = AgentToServer { capabilities: restarts, health: Some(started(100)), ..first(UID) };
    fleet.handle(&mut conn, hello).unwrap();
    let cfg = config("a");
    let desired = DesiredState {
        remote_config: Some(cfg.clone()),
        restart: Some(Restart { at: 200, due: 200 }),
        ..Default::default()
    };
    fleet.set_desired_state(&key(UID), desired);
    // The command goes alone; the config follows at once in the next push.
    let command = fleet.poll_push(&conn).expect("a command");
    let alone = ServerToAgent {
        command: Some(Box::new(crate::proto::ServerToAgentCommand {
            r#type: crate::proto::CommandType::Restart as i32,
        })),
        ..plain(&UID.0)
    };
    assert_eq!(command, alone);
    assert_eq!(fleet.poll_push(&conn).and_then(|m| m.remote_config), Some((*cfg).clone()));
    // Once: not again while the agent has not reported its new start, nor on a new connection.
    let next = AgentToServer { capabilities: restarts, ..msg(UID, 1) };
    assert_eq!(fleet.handle(&mut conn, next).unwrap().command, None);
    fleet.connection_closed(&conn);
    let mut conn = ws(&fleet);
    let back = AgentToServer { capabilities: restarts, health: Some(started(250)), ..msg(UID, 2) };
    assert_eq!(fleet.handle(&mut conn, back).unwrap().command, None);
    assert!(fleet.agent(&key(UID)).unwrap().report.started_since(200));

    // A fresh record (another replica) of an agent that already restarted: nothing to do.
    let other = Fleet::default();
    let mut conn = ws(&other);
    let hello = AgentToServer { capabilities: restarts, health: Some(started(250)), ..first(UID) };
    other.handle(&mut conn, hello).unwrap();
    other.set_desired_state(
        &key(UID),
        DesiredState { restart: Some(Restart { at: 200, due: 200 }), ..Default::default() },
    );
    assert_eq!(other.poll_push(&conn), None);

    // Agents that do not accept the command are never sent it.
    let other = Fleet::default();
    let mut conn = ws(&other);
    let hello = AgentToServer { capabilities: HEARTBEATS, health: Some(started(100)), ..first(UID) };
    other.handle(&mut conn, hello).unwrap();
    other.set_desired_state(
        &key(UID),
        DesiredState { restart: Some(Restart { at: 200, due: 200 }), ..Default::default() },
    );
    assert_eq!(other.poll_push(&conn), None);
}

#[test]
fn each_agent_is_offered_the_parts_of_the_settings_it_takes() {
    use crate::proto::TelemetryConnectionSettings;
    let metrics = TelemetryConnectionSettings {
        destination_endpoint: "http://127.0.0.1:1/v1/metrics".into(),
        ..Default::default()
    };
    let offer =
        Arc::new(ConnectionSettingsOffers { own_metrics: Some(metrics.clone()), ..(*settings(5)).clone() });
    let own_metrics = ACCEPTS_CONFIG | AgentCapabilities::ReportsOwnMetrics as u64;
    let accepts_opamp = HEARTBEATS | own_metrics | AgentCapabilities::AcceptsOpAmpConnectionSettings as u64;
    for (capabilities, heartbeat, own) in [
        (HEARTBEATS | own_metrics, true, true),
        (own_metrics, false, true),
        (accepts_opamp, false, true),
        (HEARTBEATS, true, false),
    ] {
        let fleet = Fleet::default();
        let mut conn = ws(&fleet);
        fleet.handle(&mut conn, AgentToServer { capabilities, ..first(UID) }).unwrap();
        set_settings(&fleet, &offer);
        let sent = fleet.poll_push(&conn).and_then(|m| m.connection_settings).expect("a part it takes");
        assert_eq!(sent.hash, offer.hash, "the hash of the whole offer");
        assert_eq!(sent.opamp.is_some(), heartbeat, "capabilities {capabilities:#x}");
        assert_eq!(sent.own_metrics, own.then(|| metrics.clone()), "capabilities {capabilities:#x}");
    }
}

#[test]
fn agents_that_accept_opamp_settings_get_all_of_them_once_even_across_their_client_restarts() {
    use crate::proto::{Header, Headers, OpAmpConnectionSettings};
    let server = OpAmpConnectionSettings {
        destination_endpoint: "http://127.0.0.1:4320/v1/opamp".into(),
        headers: Some(Headers {
            headers: vec![Header { key: "Authorization".into(), value: "Bearer t".into() }],
        }),
        heartbeat_interval_seconds: 2,
        ..Default::default()
    };
    let offer = Arc::new(ConnectionSettingsOffers {
        hash: Bytes::from_static(b"with-server"),
        opamp: Some(server.clone()),
        ..Default::default()
    });
    let accepts = HEARTBEATS | AgentCapabilities::AcceptsOpAmpConnectionSettings as u64;
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, AgentToServer { capabilities: accepts, ..first(UID) }).unwrap();
    set_settings(&fleet, &offer);
    let sent = fleet.poll_push(&conn).and_then(|m| m.connection_settings).expect("offered");
    assert_eq!(sent.opamp, Some(server.clone()), "the endpoint, headers and interval together");
    // The supervisor restarts its OpAMP client with them: a new connection and a new sequence.
    fleet.connection_closed(&conn);
    let mut conn = http(&fleet);
    let back = fleet.handle(&mut conn, AgentToServer { capabilities: accepts, ..first(UID) }).unwrap();
    assert_eq!(back.connection_settings, None, "not offered again: that would restart it for ever");

    // An agent that only reports heartbeats gets the interval alone (not the token).
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, AgentToServer { capabilities: HEARTBEATS, ..first(UID) }).unwrap();
    set_settings(&fleet, &offer);
    let sent = fleet.poll_push(&conn).and_then(|m| m.connection_settings).and_then(|s| s.opamp);
    assert_eq!(sent, Some(OpAmpConnectionSettings { heartbeat_interval_seconds: 2, ..Default::default() }));
}
