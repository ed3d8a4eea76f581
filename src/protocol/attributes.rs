//! Agents' attributes (from their `AgentDescription`) as users see them: selectors match them,
//! APIs and callbacks show them.
use std::borrow::Cow;

use crate::proto::{AgentDescription, AnyValue, any_value};

/// An attribute of an agent's description, identifying or not, as a string.
pub fn attribute<'a>(desc: Option<&'a AgentDescription>, key: &str) -> Option<Cow<'a, str>> {
    let desc = desc?;
    let kv = desc
        .identifying_attributes
        .iter()
        .chain(&desc.non_identifying_attributes)
        .find(|kv| kv.key == key)?;
    value_str(kv.value.as_ref()?)
}

/// A scalar attribute value as a string (`None` for arrays, maps, bytes and empty values).
pub fn any_value_string(v: &AnyValue) -> Option<String> {
    value_str(v).map(Cow::into_owned)
}

fn value_str(v: &AnyValue) -> Option<Cow<'_, str>> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Cow::Borrowed(s.as_str()),
        any_value::Value::BoolValue(b) => Cow::Owned(b.to_string()),
        any_value::Value::IntValue(i) => Cow::Owned(i.to_string()),
        any_value::Value::DoubleValue(d) => Cow::Owned(d.to_string()),
        _ => return None,
    })
}

/// Every attribute of an agent's description (identifying and not) as a JSON object of
/// strings, as users see them in APIs and callbacks.
pub fn attributes_json(desc: Option<&AgentDescription>) -> serde_json::Map<String, serde_json::Value> {
    desc.into_iter()
        .flat_map(|d| d.identifying_attributes.iter().chain(&d.non_identifying_attributes))
        .filter_map(|kv| Some((kv.key.clone(), attribute(desc, &kv.key)?.into_owned().into())))
        .collect()
}
