//! Fuzz target: an `arbitrary` sequence of agent steps through a fleet with a fixed plan,
//! checked by `wire_invariants::session_sequence` (see tests/wire_invariants/mod.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|steps: Vec<wire_invariants::Step>| {
    // Long sequences add time, not states: the session keeps only the last report.
    wire_invariants::session_sequence(&steps[..steps.len().min(64)]);
});
