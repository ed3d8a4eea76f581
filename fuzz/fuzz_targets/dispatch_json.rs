//! Fuzz target: an `arbitrary` dispatch request body (mostly valid JSON with hostile values),
//! checked by `wire_invariants::dispatch::dispatch_json` (see tests/wire_invariants/dispatch.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|input: wire_invariants::dispatch::DispatchInput| {
    wire_invariants::dispatch::dispatch_json(&input);
});
