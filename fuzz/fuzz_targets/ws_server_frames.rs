//! Fuzz target: `wire_invariants::ws_server_frames` on raw bytes (see tests/wire_invariants/mod.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wire_invariants::ws_server_frames(data));
