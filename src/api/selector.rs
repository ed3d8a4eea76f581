//! Selecting agents by their `AgentDescription` attributes.
use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Selects agents by the attributes of their AgentDescription (identifying and non-identifying
/// alike). An empty selector selects every agent of the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSelector {
    /// Attributes that must have exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_attributes: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One requirement on an attribute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(self.operator in ['In', 'NotIn']) ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
        "message": "operators In and NotIn need values; Exists and DoesNotExist take none"
    }
]))]
pub struct SelectorRequirement {
    /// The attribute key, e.g. `deployment.environment`.
    #[schemars(length(min = 1))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl AgentSelector {
    /// Whether an agent with these attributes is selected.
    pub fn matches<'a>(&self, attribute: impl Fn(&str) -> Option<Cow<'a, str>>) -> bool {
        self.match_attributes.iter().all(|(k, v)| attribute(k).is_some_and(|a| a == v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let value = attribute(&r.key);
                let listed = || value.as_deref().is_some_and(|v| r.values.iter().any(|x| x == v));
                match r.operator {
                    SelectorOperator::In => listed(),
                    SelectorOperator::NotIn => !listed(),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<Cow<'a, str>> + 'a {
        move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| Cow::Borrowed(*v))
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(AgentSelector::default().matches(attrs(&[])));
    }

    #[test]
    fn attributes_and_expressions_must_all_hold() {
        let s = AgentSelector {
            match_attributes: [("service.name".to_string(), "checkout".to_string())].into(),
            match_expressions: vec![
                req("deployment.environment", SelectorOperator::In, &["prod", "staging"]),
                req("canary", SelectorOperator::DoesNotExist, &[]),
                req("region", SelectorOperator::NotIn, &["eu"]),
                req("host.name", SelectorOperator::Exists, &[]),
            ],
        };
        let base = [("service.name", "checkout"), ("deployment.environment", "prod"), ("host.name", "h1")];
        assert!(s.matches(attrs(&base)));
        assert!(!s.matches(attrs(&[
            ("service.name", "payments"),
            ("deployment.environment", "prod"),
            ("host.name", "h")
        ])));
        assert!(!s.matches(attrs(&[
            ("service.name", "checkout"),
            ("deployment.environment", "dev"),
            ("host.name", "h")
        ])));
        assert!(!s.matches(attrs(&[("service.name", "checkout"), ("deployment.environment", "prod")])));
        let mut canary = base.to_vec();
        canary.push(("canary", "true"));
        assert!(!s.matches(attrs(&canary)));
        let mut eu = base.to_vec();
        eu.push(("region", "eu"));
        assert!(!s.matches(attrs(&eu)));
    }
}
