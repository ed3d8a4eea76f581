//! The wire rules, one test each, driven through the fleet without sockets: a message in,
//! the exact reply out.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::opamp::session::SERVER_CAPABILITIES;
use crate::proto::{
    AgentCapabilities, AgentConfigFile, AgentConfigMap, AgentDisconnect, AnyValue, AvailableComponents,
    ComponentHealth, EffectiveConfig, KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerCapabilities,
    ServerToAgentFlags, any_value,
};

const UID: Uid =
    Uid([0x01, 0x93, 0xa5, 0xc4, 0x7d, 0x2e, 0x7c, 0x3a, 0x9b, 0x1f, 0x2a, 0x4c, 0x6e, 0x8f, 0x0a, 0x1b]);
const ACCEPTS_CONFIG: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsRemoteConfig as u64;
const FULL_STATE: u64 = ServerToAgentFlags::ReportFullState as u64;

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
    assert!(fleet.agent(UID).unwrap().connected);
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
        assert!(fleet.agent(new_uid).is_some());
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
    assert!(fleet.agent(UID).unwrap().awaiting_full_state);
    // The full state arrives in sequence: the flag is not repeated.
    let reply = fleet
        .handle(&mut conn, AgentToServer { agent_description: Some(description("x")), ..msg(UID, 42) })
        .unwrap();
    assert_eq!(reply, plain(&UID.0));
    assert!(!fleet.agent(UID).unwrap().awaiting_full_state);
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
    fleet.set_remote_config(UID, Some(cfg.clone()));
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
    let r = fleet.agent(UID).unwrap().report;
    assert_eq!(r.description, Some(description("checkout")));
    assert_eq!(r.health, Some(health));
    assert_eq!(r.effective_config, Some(effective));
    assert_eq!(r.remote_config_status, Some(status(&cfg, RemoteConfigStatuses::Applied)));
    assert!(r.supports_custom_capability("com.example.pprof"));
    assert_eq!(r.available_components, Some(components));
    assert!(fleet.take_changes().is_empty(), "a heartbeat changes nothing");
}

#[test]
fn changes_are_reported_once_and_only_when_something_changed() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(fleet.take_changes()[&UID], Changes::CONNECTED | Changes::CAPABILITIES | Changes::DESCRIPTION);
    // The same description again is no change; new health is.
    let m = AgentToServer {
        agent_description: Some(description("checkout")),
        health: Some(ComponentHealth { healthy: false, ..Default::default() }),
        ..msg(UID, 1)
    };
    fleet.handle(&mut conn, m).unwrap();
    assert_eq!(fleet.take_changes()[&UID], Changes::HEALTH);
}

#[test]
fn remote_config_is_offered_once_and_not_again_once_reported() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let cfg = config("a");
    fleet.set_remote_config(UID, Some(cfg.clone()));
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
        fleet.agent(UID).unwrap().report.remote_config_status.unwrap().status,
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
    fleet.set_remote_config(UID, Some(bad));
    assert_eq!(fleet.poll_push(&conn), None);
    let good = config("good");
    fleet.set_remote_config(UID, Some(good.clone()));
    assert_eq!(fleet.poll_push(&conn).unwrap().remote_config, Some((*good).clone()));
}

#[test]
fn agents_that_do_not_accept_remote_config_are_never_offered_one() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    let status_only = AgentCapabilities::ReportsStatus as u64;
    fleet.handle(&mut conn, AgentToServer { capabilities: status_only, ..first(UID) }).unwrap();
    fleet.set_remote_config(UID, Some(config("a")));
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
    fleet.set_remote_config(UID, Some(cfg.clone()));
    let full = AgentToServer {
        agent_description: Some(description("x")),
        remote_config_status: Some(status(&cfg, RemoteConfigStatuses::Applied)),
        ..msg(UID, 13)
    };
    assert_eq!(fleet.handle(&mut conn, full).unwrap(), plain(&UID.0));
    assert_eq!(fleet.poll_push(&conn), None);
}

#[test]
fn a_new_connection_re_offers_a_config_the_agent_never_reported() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let cfg = config("a");
    fleet.set_remote_config(UID, Some(cfg.clone()));
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
    assert!(!fleet.agent(UID).unwrap().connected);
    assert_eq!(fleet.take_changes()[&UID], Changes::DISCONNECTED);
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
    assert!(fleet.agent(other).is_none(), "a refused agent is not registered");
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
    assert!(fleet.agent(UID).unwrap().connected);
    assert_eq!(fleet.connected_count(), 1);
    fleet.set_remote_config(UID, Some(config("a")));
    assert_eq!(fleet.poll_push(&old), None);
    assert!(fleet.poll_push(&new).is_some());
}

#[test]
fn desired_changes_wake_websocket_agents_and_wait_for_http_polls() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let notified = conn.notified().unwrap().clone();
    let cfg = config("a");
    assert!(fleet.set_remote_config(UID, Some(cfg.clone())));
    assert!(!fleet.set_remote_config(UID, Some(cfg.clone())), "unchanged desired state is no change");
    // The permit is stored: the connection task wakes even if it was busy.
    futures_util::FutureExt::now_or_never(notified.notified()).expect("woken");
    assert_eq!(
        fleet.poll_push(&conn).unwrap(),
        ServerToAgent { remote_config: Some((*cfg).clone()), ..plain(&UID.0) }
    );

    let h = Uid([5; 16]);
    fleet.handle(&mut http(&fleet), first(h)).unwrap();
    fleet.set_remote_config(h, Some(cfg.clone()));
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
    assert!(fleet.agent(UID).unwrap().connected);
    fleet.sweep(start + Duration::from_secs(31));
    assert!(!fleet.agent(UID).unwrap().connected);
    assert_eq!(fleet.connected_count(), 0);
    fleet.sweep(start + Duration::from_secs(31 + 61));
    assert!(fleet.agent(UID).is_none());
    assert_eq!(fleet.known_count(), 0);
    assert!(fleet.take_changes()[&UID].contains(Changes::REMOVED));
}

#[test]
fn websocket_agents_are_not_swept_while_connected() {
    let fleet = Fleet::new(FleetConfig { heartbeat_interval: Duration::from_secs(1), ..Default::default() });
    fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    fleet.sweep(Instant::now() + Duration::from_secs(3600));
    assert!(fleet.agent(UID).unwrap().connected);
}

#[test]
fn custom_messages_go_out_one_per_message_in_order() {
    let fleet = Fleet::new(FleetConfig { outbox_limit: 2, ..Default::default() });
    let mut conn = ws(&fleet);
    let cap = "com.example.pprof";
    let m =
        |t: &str| CustomMessage { capability: cap.into(), r#type: t.into(), data: Bytes::from_static(b"x") };
    assert_eq!(fleet.enqueue_custom_message(UID, m("start")), Err(EnqueueError::UnknownAgent));
    fleet.handle(&mut conn, first(UID)).unwrap();
    assert_eq!(fleet.enqueue_custom_message(UID, m("start")), Err(EnqueueError::CapabilityNotSupported));
    let declare = AgentToServer {
        custom_capabilities: Some(CustomCapabilities { capabilities: vec![cap.into()] }),
        ..msg(UID, 1)
    };
    fleet.handle(&mut conn, declare).unwrap();
    assert_eq!(fleet.enqueue_custom_message(UID, m("start")), Ok(1));
    assert_eq!(fleet.enqueue_custom_message(UID, m("stop")), Ok(2));
    assert_eq!(fleet.enqueue_custom_message(UID, m("more")), Err(EnqueueError::QueueFull(2)));
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
        fn on_custom_message(&self, uid: Uid, ns: &Arc<str>, m: CustomMessage) {
            self.0.lock().unwrap().push((uid, ns.to_string(), m));
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

#[test]
fn the_provider_computes_desired_state_before_the_first_reply() {
    struct ByService(Arc<AgentRemoteConfig>);
    impl DesiredStateProvider for ByService {
        fn desired_state(
            &self,
            _: Uid,
            ns: &str,
            d: Option<&AgentDescription>,
            _: bool,
        ) -> Option<DesiredState> {
            let selected = ns == "team-a" && d == Some(&description("checkout"));
            Some(DesiredState { remote_config: selected.then(|| self.0.clone()), custom_capabilities: None })
        }
    }
    let fleet = Fleet::default();
    let cfg = config("a");
    fleet.set_desired_state_provider(Arc::new(ByService(cfg.clone())));
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
    assert_eq!(fleet.desired_state(other).unwrap().remote_config, None);
}

#[test]
fn custom_capabilities_are_advertised_when_they_change() {
    let fleet = Fleet::default();
    let mut conn = ws(&fleet);
    fleet.handle(&mut conn, first(UID)).unwrap();
    let caps = Arc::new(CustomCapabilities { capabilities: vec!["com.example.pprof".into()] });
    fleet.set_desired_state(
        UID,
        DesiredState { remote_config: None, custom_capabilities: Some(caps.clone()) },
    );
    assert_eq!(
        fleet.poll_push(&conn).unwrap(),
        ServerToAgent { custom_capabilities: Some((*caps).clone()), ..plain(&UID.0) }
    );
    assert_eq!(fleet.poll_push(&conn), None);
    // Withdrawn: an empty list tells the agent.
    fleet.set_desired_state(UID, DesiredState::default());
    assert_eq!(fleet.poll_push(&conn).unwrap().custom_capabilities, Some(CustomCapabilities::default()));
}

#[test]
fn agents_move_to_the_namespace_of_their_latest_credentials() {
    let fleet = Fleet::default();
    fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    let mut b = fleet.connection(Transport::WebSocket, Tenant::new("team-b"));
    fleet.handle(&mut b, msg(UID, 1)).unwrap();
    assert_eq!(fleet.agent(UID).unwrap().namespace, "team-b");
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
    assert_eq!(fleet.agent(UID).unwrap().report.available_components, Some(full.clone()));
    // From now on the hash alone is enough, and does not erase the components.
    let reply = fleet.handle(&mut conn, with(&hash_only, msg(UID, 2))).unwrap();
    assert_eq!(reply.flags, 0);
    assert_eq!(fleet.agent(UID).unwrap().report.available_components, Some(full));
    // A new hash without components is asked for again.
    let changed = AvailableComponents { hash: Bytes::from_static(b"c2"), ..Default::default() };
    let reply = fleet.handle(&mut conn, with(&changed, msg(UID, 3))).unwrap();
    assert_eq!(reply.flags, REPORT_COMPONENTS);
}

#[test]
fn a_desired_state_set_while_the_provider_computes_wins_over_the_providers() {
    // The provider computes from the plan of that moment, outside the shard lock; a newer plan
    // written meanwhile (the controller's set_desired_state) must not be overwritten by it.
    struct Racing {
        fleet: Fleet,
        newer: Arc<AgentRemoteConfig>,
        stale: Arc<AgentRemoteConfig>,
    }
    impl DesiredStateProvider for Racing {
        fn desired_state(
            &self,
            uid: Uid,
            _: &str,
            _: Option<&AgentDescription>,
            _: bool,
        ) -> Option<DesiredState> {
            let newer = DesiredState { remote_config: Some(self.newer.clone()), custom_capabilities: None };
            self.fleet.set_desired_state(uid, newer);
            Some(DesiredState { remote_config: Some(self.stale.clone()), custom_capabilities: None })
        }
    }
    let fleet = Fleet::default();
    let (newer, stale) = (config("newer"), config("stale"));
    fleet.set_desired_state_provider(Arc::new(Racing { fleet: fleet.clone(), newer: newer.clone(), stale }));
    let reply = fleet.handle(&mut ws(&fleet), first(UID)).unwrap();
    assert_eq!(reply.remote_config.as_ref(), Some(&*newer));
    assert_eq!(fleet.desired_state(UID).unwrap().remote_config, Some(newer));
}
