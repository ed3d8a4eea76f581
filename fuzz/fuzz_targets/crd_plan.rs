//! Fuzz target: `arbitrary` AgentConfig specs and agents resolved into a plan, checked by
//! `wire_invariants::plan::crd_plan` (see tests/wire_invariants/plan.rs).
#![no_main]

#[path = "../../tests/wire_invariants/mod.rs"]
mod wire_invariants;

libfuzzer_sys::fuzz_target!(|input: wire_invariants::plan::PlanInput| {
    // Many configs or agents add time, not states: the names and attributes are few.
    if input.configs.len() <= 12 && input.agents.len() <= 8 {
        wire_invariants::plan::crd_plan(&input);
    }
});
