//! Fuzz target: `wire_invariants::gzip_body` on raw bytes (see tests/wire_invariants/mod.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wire_invariants::gzip_body(data));
