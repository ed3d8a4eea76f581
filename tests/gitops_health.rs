//! The Argo CD health check in README.md, run by a Lua 5.1 interpreter as Argo CD runs it
//! (`common::argocd`), against AgentConfigs shaped as `kubectl get -o json` shows them, with the
//! conditions the operator writes. No cluster needed.
mod common;

use common::argocd::{self, HEADER, Health, MAX_INSTRUCTIONS, MAX_MEMORY};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use opamp_operator::api::conditions::{self, DEGRADED, Desired, PROGRESSING, READY};
use opamp_operator::api::{AgentConfig, AgentConfigStatus, RolloutState, RolloutStatus};
use serde_json::{Value, json};

/// An AgentConfig at `generation` as the API server returns it, without status.
fn object(generation: i64) -> Value {
    json!({
        "apiVersion": "opamp.dev/v1alpha1",
        "kind": "AgentConfig",
        "metadata": {
            "name": "checkout-collectors",
            "namespace": "observability",
            "uid": "5a3e0c1e-6f0b-4d6e-9a43-1f2d7b9c0e11",
            "resourceVersion": "4711",
            "generation": generation,
            "creationTimestamp": "2026-12-02T10:00:00Z",
            "labels": null,
            "finalizers": [],
            "managedFields": [{ "manager": "kubectl", "operation": "Apply", "fieldsV1": {} }]
        },
        "spec": {
            "selector": { "matchAttributes": { "service.name": "checkout" } },
            "files": { "collector.yaml": { "contentType": "text/yaml", "inline": "receivers: {}\n" } },
            "rollout": { "strategy": "Progressive", "steps": [10, 50, 100], "maxFailures": 0 }
        }
    })
}

/// `object(generation)` with the status the operator writes for `observed` and these conditions
/// (each `(type, status, reason, message)`), plus `Conflict=False` as it always writes.
fn with_status(generation: i64, observed: i64, desired: &[(&'static str, bool, &str, &str)]) -> Value {
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_796_000_000).unwrap());
    let mut desired: Vec<Desired> = desired.iter().map(|(t, s, r, m)| Desired::new(t, *s, *r, *m)).collect();
    desired.push(Desired::new(conditions::CONFLICT, false, "NoConflict", ""));
    let status = AgentConfigStatus {
        observed_generation: Some(observed),
        config_hash: Some("sha256:9f2c".into()),
        selected_agents: 3,
        applied_agents: 1,
        rollout: Some(RolloutStatus {
            step: 1,
            state: RolloutState::Progressing,
            admitted_up_to: None,
            ..Default::default()
        }),
        conditions: conditions::merge(&[], desired, Some(observed), &now),
        ..Default::default()
    };
    let mut o = object(generation);
    o["status"] = serde_json::to_value(status).unwrap();
    o
}

fn health(status: &str, message: &str) -> Health {
    Health { status: status.into(), message: message.into() }
}

const ROLLED_BACK: &str = "gate UnhealthyRatio tripped at step 1: 1 of 1 agents unhealthy after applying (more than 10%); rolled back to edge-5d8f9c7b1a";

#[test]
fn the_script_is_the_readme_block() {
    let script = argocd::script();
    assert!(script.starts_with(HEADER), "{script}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains(&format!("```lua\n{script}```\n")), "not the README's block: {script}");
    assert_eq!(argocd::extract("# no script\n```lua\nreturn {}\n```\n"), None);
}

#[test]
fn a_fresh_object_without_status_is_progressing() {
    assert_eq!(argocd::health(&object(1)).status, "Progressing");
}

#[test]
fn ready_for_the_current_generation_is_healthy_with_readys_message() {
    let o = with_status(
        2,
        2,
        &[
            (READY, true, "Applied", "3/3 agents applied"),
            (PROGRESSING, false, "RolloutComplete", "3/3 agents applied"),
            (DEGRADED, false, "AsExpected", ""),
        ],
    );
    assert_eq!(argocd::health(&o), health("Healthy", "3/3 agents applied"));
}

#[test]
fn a_typed_agent_config_reads_the_same() {
    let o = with_status(5, 5, &[(READY, true, "Applied", "3/3 agents applied")]);
    let typed: AgentConfig = serde_json::from_value(o.clone()).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(argocd::health(&back), argocd::health(&o));
    assert_eq!(argocd::health(&back).status, "Healthy");
}

#[test]
fn ready_for_an_older_generation_is_progressing() {
    let o = with_status(3, 2, &[(READY, true, "Applied", "3/3 agents applied")]);
    assert_eq!(argocd::health(&o).status, "Progressing");
}

#[test]
fn a_rollout_in_progress_is_progressing() {
    let o = with_status(
        1,
        1,
        &[
            (READY, false, "RolloutInProgress", "1/3 agents applied"),
            (PROGRESSING, true, "RolloutInProgress", "1/3 agents applied"),
            (DEGRADED, false, "AsExpected", ""),
        ],
    );
    assert_eq!(argocd::health(&o), health("Progressing", "RolloutInProgress: 1/3 agents applied"));
}

#[test]
fn not_ready_without_degraded_is_progressing() {
    let o = with_status(
        1,
        1,
        &[
            (READY, false, "ReferenceNotFound", "ConfigMap base not found"),
            (PROGRESSING, false, "ReferenceNotFound", "ConfigMap base not found"),
            (DEGRADED, false, "ReferenceNotFound", "nothing is sent until the reference exists"),
        ],
    );
    assert_eq!(argocd::health(&o), health("Progressing", "ReferenceNotFound: ConfigMap base not found"));
}

#[test]
fn a_paused_rollout_is_suspended() {
    let paused = "paused at step 1: 2/8 agents applied; set rollout.paused to false to go on";
    let o = with_status(
        2,
        2,
        &[
            (READY, false, "RolloutPaused", paused),
            (PROGRESSING, false, "RolloutPaused", paused),
            (DEGRADED, false, "AsExpected", ""),
        ],
    );
    assert_eq!(argocd::health(&o), health("Suspended", &format!("RolloutPaused: {paused}")));
}

#[test]
fn a_rollback_is_degraded_naming_the_gate() {
    let o = with_status(
        4,
        4,
        &[
            (READY, false, "RolledBack", ROLLED_BACK),
            (PROGRESSING, false, "RolledBack", ROLLED_BACK),
            (DEGRADED, true, "RolledBack", ROLLED_BACK),
        ],
    );
    assert_eq!(argocd::health(&o), health("Degraded", &format!("RolledBack: {ROLLED_BACK}")));
}

#[test]
fn missing_components_are_degraded() {
    let missing =
        "2 agents lack components the config uses: exporter kafka (0193a5c4-…-9a01, 0193a5c4-…-9a02)";
    let o = with_status(
        1,
        1,
        &[
            (READY, false, "ComponentsMissing", missing),
            (PROGRESSING, false, "RolloutComplete", "1/3 agents applied"),
            (DEGRADED, true, "ComponentsMissing", missing),
        ],
    );
    assert_eq!(argocd::health(&o), health("Degraded", &format!("ComponentsMissing: {missing}")));
}

#[test]
fn a_halted_rollout_is_degraded() {
    let halted = "rollout halted: 2 agents failed (more than maxFailures); change the spec to resume";
    let o = with_status(
        1,
        1,
        &[
            (READY, false, "RolloutHalted", halted),
            (PROGRESSING, false, "RolloutHalted", halted),
            (DEGRADED, true, "RolloutHalted", halted),
        ],
    );
    assert_eq!(argocd::health(&o), health("Degraded", &format!("RolloutHalted: {halted}")));
}

#[test]
fn the_object_reaches_lua_as_argo_cd_converts_it() {
    let o = json!({
        "metadata": { "generation": 7, "labels": null },
        "list": ["a", null, "b"],
        "nested": [{ "k": 1.5 }],
        "flag": false
    });
    let script = r#"
        local n = 0
        for i, v in ipairs(obj.list) do n = n + 1 end
        local ok = obj.metadata.generation + 1 == 8 and obj.metadata.labels == nil and n == 2
            and obj.list[1] == "a" and obj.list[2] == "b" and obj.nested[1].k == 1.5
            and obj.flag == false and obj.absent == nil
        return { status = ok and "Healthy" or "Degraded", message = "checked" }
    "#;
    assert_eq!(argocd::health_with(script, &o), health("Healthy", "checked"));
}

#[test]
fn script_errors_carry_luas_message() {
    let o = object(1);
    let err = argocd::run("return obj.status.conditions", &o).unwrap_err();
    assert_eq!(err, "health.lua:1: attempt to index field 'status' (a nil value)");
    let err = argocd::run("hs = {", &o).unwrap_err();
    assert!(err.contains("health.lua:1:"), "{err}");
    let err = argocd::run("return 'Healthy'", &o).unwrap_err();
    assert_eq!(err, "expect table output from Lua script, not string");
    // Argo CD opens no `string` library for argocd-cm scripts; neither does the test.
    let err = argocd::run("return { status = string.format('%s', 'Healthy') }", &o).unwrap_err();
    assert!(err.contains("attempt to index global 'string'"), "{err}");
}

#[test]
#[should_panic(expected = "attempt to call global 'nosuch' (a nil value)")]
fn a_failing_script_fails_the_test_with_luas_message() {
    argocd::health_with("return nosuch()", &object(1));
}

#[test]
fn an_unknown_status_is_unknown_as_in_argo_cd() {
    assert_eq!(
        argocd::health_with("return { status = 'Fine' }", &object(1)),
        health("Unknown", "Lua returned an invalid health status")
    );
}

#[test]
fn runaway_scripts_are_stopped_within_the_bounds() {
    let err = argocd::run("while true do end", &object(1)).unwrap_err();
    assert!(err.contains(&format!("more than {MAX_INSTRUCTIONS} Lua instructions")), "{err}");
    let err = argocd::run("local s = 'x' for i = 1, 40 do s = s .. s end return {}", &object(1)).unwrap_err();
    assert!(err.contains(&format!("more than {MAX_MEMORY} bytes of memory")), "{err}");
}
