//! Fuzz target: one `arbitrary` HTTP request through the OpAMP and API routers, in memory,
//! checked by `wire_invariants::http::http_request` (see tests/wire_invariants/http.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|input: wire_invariants::http::HttpInput| {
    wire_invariants::http::http_request(&input);
});
