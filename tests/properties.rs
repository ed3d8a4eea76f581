//! The fuzz targets of `fuzz/` as stable property tests: the same checks
//! (`tests/wire_invariants/mod.rs`) on generated inputs, a few hundred cases each, plus the
//! reproducers of what fuzzing found. `make fuzz` runs them coverage-guided for longer.
// `cfg(fuzzing)` (set by cargo-fuzz) derives `Arbitrary` on the shared step types.
#![allow(unexpected_cfgs)]

mod wire_invariants;

use bytes::Bytes;
use opamp_operator::proto::{AgentDescription, AgentToServer, RemoteConfigStatus};
use opamp_operator::protocol::codec;
use proptest::prelude::*;
use prost::Message;
use wire_invariants::{Seq, Status, Step};

/// A valid `AgentToServer` encoding from a few generated fields, so that the decoders see
/// well-formed messages and their near misses (mutated below), not only noise.
fn agent_message() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..24),
        prop::option::of(".{0,16}"),
        any::<bool>(),
    )
        .prop_map(|(seq, caps, uid, error, describe)| {
            AgentToServer {
                instance_uid: Bytes::from(uid),
                sequence_num: seq,
                capabilities: caps,
                agent_description: describe.then(AgentDescription::default),
                remote_config_status: error
                    .map(|e| RemoteConfigStatus { error_message: e, ..Default::default() }),
                ..Default::default()
            }
            .encode_to_vec()
        })
}

/// A valid message or noise, with some bytes flipped.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![agent_message(), prop::collection::vec(any::<u8>(), 0..256)];
    (base, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)).prop_map(
        |(mut bytes, flips)| {
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            bytes
        },
    )
}

fn status() -> impl Strategy<Value = Status> {
    (prop_oneof![3 => Just(0u8), 2 => Just(1u8), 1 => 2u8..], 0u16..6000, any::<u8>(), 0u16..2000)
        .prop_map(|(which, hash_len, code, error_len)| Status { which, hash_len, code, error_len })
}

fn step() -> impl Strategy<Value = Step> {
    let seq = prop_oneof![6 => Just(Seq::Next), 1 => Just(Seq::Restart), 1 => any::<u8>().prop_map(Seq::Gap)];
    let size = || prop::option::of(0u16..3000);
    (
        seq,
        any::<bool>(),
        prop::bool::weighted(0.8),
        size(),
        size(),
        prop::option::of(status()),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                seq,
                description,
                accepts_remote_config,
                health,
                effective_config,
                status,
                disconnect,
                reconnect,
            )| Step {
                seq,
                description,
                accepts_remote_config,
                health,
                effective_config,
                status,
                disconnect,
                reconnect,
            },
        )
}

proptest! {
    // Failures are pinned as explicit regression tests below, not in a persistence file.
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ws_frames_decode_or_fail_cleanly(mut bytes in wire_bytes(), headed in any::<bool>()) {
        if headed {
            bytes.insert(0, codec::WS_HEADER);
        }
        wire_invariants::ws_frame(&bytes);
    }

    #[test]
    fn gzip_bodies_stay_within_their_limit(bytes in wire_bytes(), zip in any::<bool>()) {
        let body = if zip { codec::gzip(&bytes).to_vec() } else { bytes };
        wire_invariants::gzip_body(&body);
    }

    #[test]
    fn any_agent_to_server_gets_a_reply(bytes in wire_bytes()) {
        wire_invariants::agent_to_server(&bytes);
    }

    #[test]
    fn session_sequences_keep_their_invariants(steps in prop::collection::vec(step(), 1..24)) {
        wire_invariants::session_sequence(&steps);
    }
}

/// Finding of the session fuzzing, fixed: the remote config status was kept whole whatever its
/// size (`AgentReport::fit` sheds every other part, never this one), so an agent reporting a
/// long `last_remote_config_hash` kept more than `max_reported_bytes_per_agent` (with the
/// defaults, up to the 4 MiB message limit against a 512 KiB bound). Reported hashes are now
/// kept up to `MAX_CONFIG_HASH_BYTES`.
#[test]
fn a_long_remote_config_hash_stays_within_the_per_agent_bound() {
    use opamp_operator::fleet::Tenant;
    use opamp_operator::protocol::{Transport, Uid};
    let fleet = wire_invariants::fleet_with_plan();
    let uid = Uid([7; 16]);
    let mut conn = fleet.connection(Transport::WebSocket, Tenant::new(wire_invariants::NAMESPACE));
    let msg = AgentToServer {
        instance_uid: uid.to_wire(),
        agent_description: Some(AgentDescription::default()),
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: Bytes::from(vec![2u8; wire_invariants::MAX_REPORTED_BYTES + 1]),
            ..Default::default()
        }),
        ..Default::default()
    };
    fleet.handle(&mut conn, msg).expect("a reply");
    wire_invariants::check_bounds(&fleet, uid);
}

/// The committed seed corpora of `make fuzz` hold what they claim (a valid `AgentToServer`,
/// bare, framed and gzipped) and pass the checks.
#[test]
fn the_fuzz_seeds_are_valid_messages() {
    let seed =
        |path: &str| std::fs::read(format!("{}/fuzz/corpus/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let hello = codec::decode(seed("agent_to_server/seed-hello.bin")).expect("a valid AgentToServer");
    assert!(hello.agent_description.is_some() && hello.remote_config_status.is_some());
    let framed = seed("ws_frame/seed-hello-with-header.bin");
    assert_eq!(codec::decode_ws(framed.clone().into()), Ok(hello.clone()));
    let headerless = seed("ws_frame/seed-hello-headerless.bin");
    assert_eq!(codec::decode_ws(headerless.clone().into()), Ok(hello.clone()));
    let zipped = seed("gzip_body/seed-hello.gz");
    assert_eq!(codec::decode(codec::gunzip(&zipped, wire_invariants::GUNZIP_LIMIT).unwrap()), Ok(hello));
    wire_invariants::agent_to_server(&seed("agent_to_server/seed-hello.bin"));
    wire_invariants::ws_frame(&framed);
    wire_invariants::ws_frame(&headerless);
    wire_invariants::gzip_body(&zipped);
}
