//! `crd_plan`: AgentConfig specs resolved into the namespace's plan (`NamespaceIndex`), and a
//! few agents' desired state read from it, against an oracle written from the documented rules
//! (selectors, priorities, the canonical hash), not from the code under test.
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use opamp_operator::api::AgentConfig;
use opamp_operator::controller::index::NamespaceIndex;
use opamp_operator::controller::refs::Refs;
use opamp_operator::controller::rollout::{format_threshold, rollout_key};
use opamp_operator::fleet::{DesiredState, Plan};
use opamp_operator::proto::{AgentDescription, AnyValue, KeyValue, RemoteConfigStatus, any_value};
use opamp_operator::protocol::session::AgentReport;
use opamp_operator::protocol::{Description, Uid};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The namespace of every generated AgentConfig.
pub const NAMESPACE: &str = "fuzz";
/// The attribute keys selectors and agents use (a small alphabet, so that they meet).
pub const KEYS: [&str; 3] = ["service.name", "env", "region"];
/// The attribute values.
pub const VALUES: [&str; 3] = ["a", "b", "c"];
/// The file names AgentConfigs set (few, so that they collide and priorities decide).
pub const FILES: [&str; 3] = ["collector.yaml", "extra.yaml", "x.json"];

/// A selector requirement: `key`, operator (modulo 4: In, NotIn, Exists, DoesNotExist), values.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct Expression {
    pub key: u8,
    pub operator: u8,
    pub values: Vec<u8>,
}

/// A Progressive rollout's progress in status.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct Progress {
    pub steps: Vec<u8>,
    /// None: no status yet (nobody admitted); else `admittedUpTo` (u64::MAX admits all).
    pub admitted_up_to: Option<u64>,
    pub complete: bool,
}

/// One AgentConfig spec.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct ConfigSpec {
    /// Name `c<n % 8>`; a name taken by an earlier spec is skipped (one object per name).
    pub name: u8,
    /// `matchAttributes` as (key, value) indices.
    pub match_attributes: Vec<(u8, u8)>,
    pub match_expressions: Vec<Expression>,
    pub priority: i8,
    /// (file name index, content type index, inline body); at least one file is kept.
    pub files: Vec<(u8, u8, String)>,
    pub progressive: Option<Progress>,
}

/// One agent: its uid byte and attributes.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct AgentSpec {
    pub uid: u8,
    pub attributes: Vec<(u8, u8)>,
    /// Whether it reports running a remote config (of another hash).
    pub has_remote_config: bool,
}

/// A namespace's AgentConfigs and a few agents, with a reordering of the configs.
#[derive(Debug, Clone)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct PlanInput {
    pub configs: Vec<ConfigSpec>,
    pub agents: Vec<AgentSpec>,
    /// Rotates the configs before the second resolution.
    pub rotate: u8,
}

const CONTENT_TYPES: [&str; 3] = ["", "text/yaml", "application/json"];

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[i as usize % list.len()]
}

/// A config's files as the oracle sees them: name → (content type, body), the last entry of a
/// name winning (as in the JSON object the spec is built from).
fn files_of(spec: &ConfigSpec) -> BTreeMap<String, (String, String)> {
    let mut files = BTreeMap::new();
    for (name, ct, body) in &spec.files {
        files.insert(pick(&FILES, *name).to_owned(), (pick(&CONTENT_TYPES, *ct).to_owned(), body.clone()));
    }
    if files.is_empty() {
        files.insert(FILES[0].to_owned(), (String::new(), String::new()));
    }
    files
}

/// The documented canonical hash: SHA-256 over length-prefixed (u64 big-endian) name,
/// content type and body of each file, in name order.
pub fn canonical_hash(files: &BTreeMap<String, (String, String)>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (name, (ct, body)) in files {
        for part in [name.as_bytes(), ct.as_bytes(), body.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    h.finalize().into()
}

fn operator(op: u8) -> &'static str {
    pick(&["In", "NotIn", "Exists", "DoesNotExist"], op)
}

/// The AgentConfig object of a spec.
fn object(spec: &ConfigSpec, name: &str) -> Arc<AgentConfig> {
    let files: serde_json::Map<String, serde_json::Value> = files_of(spec)
        .into_iter()
        .map(|(n, (ct, body))| {
            let mut file = json!({ "inline": body });
            if !ct.is_empty() {
                file["contentType"] = json!(ct);
            }
            (n, file)
        })
        .collect();
    let match_attributes: BTreeMap<&str, &str> =
        spec.match_attributes.iter().map(|(k, v)| (pick(&KEYS, *k), pick(&VALUES, *v))).collect();
    let match_expressions: Vec<serde_json::Value> = spec
        .match_expressions
        .iter()
        .map(|e| {
            let op = operator(e.operator);
            let mut values: Vec<&str> = e.values.iter().map(|v| pick(&VALUES, *v)).collect();
            // The CRD requires values for In/NotIn and none for Exists/DoesNotExist.
            match op {
                "In" | "NotIn" if values.is_empty() => values.push(VALUES[0]),
                "Exists" | "DoesNotExist" => values.clear(),
                _ => {}
            }
            json!({ "key": pick(&KEYS, e.key), "operator": op, "values": values })
        })
        .collect();
    let mut object = json!({
        "apiVersion": "opamp.dev/v1alpha1",
        "kind": "AgentConfig",
        "metadata": { "name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"), "generation": 1 },
        "spec": {
            "selector": { "matchAttributes": match_attributes, "matchExpressions": match_expressions },
            "priority": spec.priority,
            "files": files,
        },
    });
    if let Some(p) = &spec.progressive {
        let mut steps: Vec<u8> = p.steps.iter().map(|s| 1 + s % 100).collect();
        steps.sort();
        steps.dedup();
        object["spec"]["rollout"] = json!({ "strategy": "Progressive", "steps": steps });
        if let Some(t) = p.admitted_up_to {
            let hash = format!("sha256:{}", hex(&canonical_hash(&files_of(spec))));
            object["status"] = json!({
                "observedGeneration": 1,
                "configHash": hash,
                "rollout": {
                    "step": 1,
                    "state": if p.complete { "Complete" } else { "Progressing" },
                    "admittedUpTo": format_threshold(t),
                },
            });
        }
    }
    Arc::new(serde_json::from_value(object).expect("a valid AgentConfig"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The attributes of an agent: key → value, the first value of a key kept (as an agent's
/// description lists each key once).
fn attributes_of(agent: &AgentSpec) -> BTreeMap<&'static str, &'static str> {
    let mut attrs = BTreeMap::new();
    for (k, v) in &agent.attributes {
        attrs.entry(pick(&KEYS, *k)).or_insert(pick(&VALUES, *v));
    }
    attrs
}

/// The oracle's selector: Kubernetes label-selector semantics over the agent's attributes.
fn selects(spec: &ConfigSpec, attrs: &BTreeMap<&str, &str>) -> bool {
    // matchAttributes is an object: one value per key, the last one written.
    let wanted: BTreeMap<&str, &str> =
        spec.match_attributes.iter().map(|(k, v)| (pick(&KEYS, *k), pick(&VALUES, *v))).collect();
    wanted.iter().all(|(k, v)| attrs.get(k) == Some(v))
        && spec.match_expressions.iter().all(|e| {
            let value = attrs.get(pick(&KEYS, e.key));
            let mut values: Vec<&str> = e.values.iter().map(|v| pick(&VALUES, *v)).collect();
            if values.is_empty() {
                values.push(VALUES[0]);
            }
            let listed = value.is_some_and(|v| values.contains(v));
            match operator(e.operator) {
                "In" => listed,
                "NotIn" => !listed,
                "Exists" => value.is_some(),
                _ => value.is_none(),
            }
        })
}

fn report(agent: &AgentSpec) -> AgentReport {
    let kv = |k: &str, v: &str| KeyValue {
        key: k.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.to_owned())) }),
    };
    AgentReport {
        description: Some(Description::new(AgentDescription {
            identifying_attributes: attributes_of(agent).into_iter().map(|(k, v)| kv(k, v)).collect(),
            non_identifying_attributes: vec![],
        })),
        remote_config_status: agent.has_remote_config.then(|| RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(b"some-earlier-config"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An agent's desired files: name → (content type, body), and the offered hash.
type Offered = Option<(BTreeMap<String, (String, String)>, Bytes)>;

fn offered(desired: &DesiredState) -> Offered {
    let config = desired.remote_config.as_ref()?;
    let files = config.config.as_ref().map_or_else(BTreeMap::new, |m| {
        m.config_map
            .iter()
            .map(|(n, f)| {
                (n.clone(), (f.content_type.clone(), String::from_utf8_lossy(&f.body).into_owned()))
            })
            .collect()
    });
    Some((files, config.config_hash.clone()))
}

/// Resolves the configs (each name once), then for each agent checks its desired state: the
/// same from another order of the configs and from a second resolution; only files of
/// configs whose selector matches it, each from the winner (higher priority, then the first
/// `namespace/name`); bounded by the inputs; its hash the canonical hash of its files; and
/// nothing offered before every selecting Progressive rollout admits it.
pub fn crd_plan(input: &PlanInput) {
    let mut specs: Vec<(String, &ConfigSpec)> = Vec::new();
    for spec in &input.configs {
        let name = format!("c{}", spec.name % 8);
        if !specs.iter().any(|(n, _)| *n == name) {
            specs.push((name, spec));
        }
    }
    let objects: Vec<Arc<AgentConfig>> = specs.iter().map(|(n, s)| object(s, n)).collect();
    let refs = Refs::new().0;
    let index = NamespaceIndex::resolve(objects.clone(), vec![], &[], &refs);
    let mut rotated = objects.clone();
    if !rotated.is_empty() {
        let by = input.rotate as usize % rotated.len();
        rotated.rotate_left(by);
        rotated.reverse();
    }
    let other = NamespaceIndex::resolve(rotated, vec![], &[], &refs);
    assert!(index.same_plan(&other), "two orders of the same AgentConfigs plan differently");

    for agent in &input.agents {
        let uid = Uid([agent.uid; 16]);
        let report = report(agent);
        let current = DesiredState::default();
        let desired = index.desired(&uid, &report, &current);
        let got = offered(&desired);
        assert_eq!(got, offered(&other.desired(&uid, &report, &current)), "another order of the configs");
        assert_eq!(got, offered(&index.desired(&uid, &report, &current)), "a second reading of one plan");

        let attrs = attributes_of(agent);
        let selecting: Vec<&(String, &ConfigSpec)> =
            specs.iter().filter(|(_, s)| selects(s, &attrs)).collect();
        let names: Vec<String> = index.selected_by(&report);
        let mut expected_names: Vec<String> = selecting.iter().map(|(n, _)| n.clone()).collect();
        expected_names.sort();
        assert_eq!(names, expected_names, "the configs selecting agent {attrs:?}");

        let admitted = selecting.iter().all(|(name, s)| match &s.progressive {
            None => true,
            Some(p) => match p.admitted_up_to {
                None => false,
                Some(_) if p.complete => true,
                Some(u64::MAX) => true,
                Some(t) => rollout_key(&format!("{NAMESPACE}/{name}"), &uid) <= t,
            },
        });
        let Some((files, hash)) = got else {
            assert!(
                !admitted || (selecting.is_empty() && !agent.has_remote_config),
                "agent {attrs:?} admitted by {expected_names:?} was offered nothing"
            );
            continue;
        };
        assert!(admitted, "agent {attrs:?} was offered a config a Progressive rollout does not admit it to");
        // The merge of the oracle: per file, the winner by priority, then namespace/name.
        let mut winners = selecting.clone();
        winners.sort_by(|(a, x), (b, y)| y.priority.cmp(&x.priority).then(a.cmp(b)));
        let mut expected: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (_, spec) in &winners {
            for (n, f) in files_of(spec) {
                expected.entry(n).or_insert(f);
            }
        }
        let (input_files, input_bytes) = selecting.iter().fold((0, 0), |(n, b), (_, s)| {
            let f = files_of(s);
            (n + f.len(), b + f.values().map(|(ct, body)| ct.len() + body.len()).sum::<usize>())
        });
        let output_bytes: usize = files.values().map(|(ct, body)| ct.len() + body.len()).sum();
        assert!(files.len() <= input_files && output_bytes <= input_bytes, "merged output beyond its inputs");
        assert_eq!(files, expected, "agent {attrs:?} selected by {expected_names:?}");
        assert_eq!(
            &hash[..],
            &canonical_hash(&files)[..],
            "the offered hash is the canonical hash of the files"
        );
    }
}
