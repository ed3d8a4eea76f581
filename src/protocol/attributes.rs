//! Agents' attributes (from their `AgentDescription`) as users see them: selectors match them,
//! APIs and callbacks show them.
//!
//! An agent's description is kept as a [`Description`]: its attributes in one allocation, their
//! keys and string values as `Arc<str>` that agents reporting the same text share
//! ([`Description::share`]). A fleet's descriptions differ in a value or two (an instance id, a
//! host name) and repeat the rest: decoded as protobuf, each of a collector's seven attributes
//! costs its agent two allocations of its own.
use std::borrow::Cow;
use std::sync::Arc;

use prost::Message;

use super::shared::Interner;
use crate::proto::{AgentDescription, AnyValue, KeyValue, any_value};

/// An agent's description as kept: reads back as exactly what the agent reported
/// ([`Description::to_proto`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// The identifying attributes, then the others.
    attributes: Box<[Attribute]>,
    identifying: u32,
    /// The reported description's encoded size (what the agent is charged for).
    encoded_len: u32,
}

#[derive(Debug, Clone, PartialEq)]
struct Attribute {
    key: Arc<str>,
    value: Value,
}

/// A `KeyValue`'s value: scalars inline, strings shareable, the rest as reported.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// No `AnyValue` at all.
    Absent,
    Str(Arc<str>),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// An empty `AnyValue`, arrays, key-value lists and bytes.
    Other(Box<AnyValue>),
}

impl Value {
    fn new(value: Option<AnyValue>) -> Self {
        let Some(value) = value else { return Value::Absent };
        match value.value {
            Some(any_value::Value::StringValue(s)) => Value::Str(s.into()),
            Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
            Some(any_value::Value::IntValue(i)) => Value::Int(i),
            Some(any_value::Value::DoubleValue(d)) => Value::Double(d),
            value => Value::Other(Box::new(AnyValue { value })),
        }
    }

    fn to_proto(&self) -> Option<AnyValue> {
        let value = match self {
            Value::Absent => return None,
            Value::Str(s) => any_value::Value::StringValue(s.to_string()),
            Value::Bool(b) => any_value::Value::BoolValue(*b),
            Value::Int(i) => any_value::Value::IntValue(*i),
            Value::Double(d) => any_value::Value::DoubleValue(*d),
            Value::Other(v) => return Some((**v).clone()),
        };
        Some(AnyValue { value: Some(value) })
    }

    /// A scalar as a string (`None` for arrays, maps, bytes and empty values).
    fn as_str(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            Value::Str(s) => Cow::Borrowed(s),
            Value::Bool(b) => Cow::Owned(b.to_string()),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Double(d) => Cow::Owned(d.to_string()),
            Value::Absent | Value::Other(_) => return None,
        })
    }
}

impl Description {
    /// The description as kept, its strings its own until [`Description::share`].
    pub fn new(desc: AgentDescription) -> Self {
        let encoded_len = u32::try_from(desc.encoded_len()).unwrap_or(u32::MAX);
        let identifying = u32::try_from(desc.identifying_attributes.len()).unwrap_or(u32::MAX);
        let attributes = desc
            .identifying_attributes
            .into_iter()
            .chain(desc.non_identifying_attributes)
            .map(|kv| Attribute { key: kv.key.into(), value: Value::new(kv.value) })
            .collect();
        Self { attributes, identifying, encoded_len }
    }

    /// Replaces its keys and string values with the copies others hold of the same text.
    pub fn share(&mut self, strings: &Interner<str>) {
        for a in &mut self.attributes {
            a.key = strings.share_str(&a.key);
            if let Value::Str(s) = &mut a.value {
                *s = strings.share_str(s);
            }
        }
    }

    /// The description as the agent reported it.
    pub fn to_proto(&self) -> AgentDescription {
        let list = |attrs: &[Attribute]| -> Vec<KeyValue> {
            attrs.iter().map(|a| KeyValue { key: a.key.to_string(), value: a.value.to_proto() }).collect()
        };
        let (identifying, other) = self.split();
        AgentDescription {
            identifying_attributes: list(identifying),
            non_identifying_attributes: list(other),
        }
    }

    /// The encoded size of the description the agent reported.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len as usize
    }

    /// An attribute, identifying or not (identifying first), as a string.
    pub fn attribute(&self, key: &str) -> Option<Cow<'_, str>> {
        self.attributes.iter().find(|a| &*a.key == key)?.value.as_str()
    }

    /// The identifying attributes with a scalar value, as strings.
    pub fn identifying(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
        scalars(self.split().0)
    }

    /// The non-identifying attributes with a scalar value, as strings.
    pub fn non_identifying(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
        scalars(self.split().1)
    }

    fn split(&self) -> (&[Attribute], &[Attribute]) {
        self.attributes.split_at((self.identifying as usize).min(self.attributes.len()))
    }
}

fn scalars(attrs: &[Attribute]) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    attrs.iter().filter_map(|a| Some((&*a.key, a.value.as_str()?)))
}

/// An attribute of an agent's description, identifying or not, as a string.
pub fn attribute<'a>(desc: Option<&'a Description>, key: &str) -> Option<Cow<'a, str>> {
    desc?.attribute(key)
}

/// Every attribute of an agent's description (identifying and not) as a JSON object of
/// strings, as users see them in APIs and callbacks.
pub fn attributes_json(desc: Option<&Description>) -> serde_json::Map<String, serde_json::Value> {
    desc.into_iter()
        .flat_map(|d| d.identifying().chain(d.non_identifying()))
        .map(|(key, value)| (key.to_owned(), value.into_owned().into()))
        // An attribute named twice reads as its first value, as in `attribute`.
        .fold(serde_json::Map::new(), |mut map, (key, value)| {
            map.entry(key).or_insert(value);
            map
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: Option<any_value::Value>) -> KeyValue {
        KeyValue { key: key.into(), value: value.map(|v| AnyValue { value: Some(v) }) }
    }

    fn collector(instance: &str, host: &str) -> AgentDescription {
        use any_value::Value::*;
        AgentDescription {
            identifying_attributes: vec![
                kv("service.instance.id", Some(StringValue(instance.into()))),
                kv("service.name", Some(StringValue("otelcol-contrib".into()))),
                kv("service.version", Some(StringValue("0.149.0".into()))),
            ],
            non_identifying_attributes: vec![
                kv("host.name", Some(StringValue(host.into()))),
                kv("os.type", Some(StringValue("linux".into()))),
                kv("host.cpus", Some(IntValue(8))),
                kv("ready", Some(BoolValue(true))),
                kv("load", Some(DoubleValue(0.5))),
                kv("tags", Some(ArrayValue(crate::proto::ArrayValue { values: vec![] }))),
                kv("blob", Some(BytesValue(vec![0, 1, 2].into()))),
                kv("unset", None),
                KeyValue { key: "empty".into(), value: Some(AnyValue { value: None }) },
                // Named twice: reads as its first value everywhere.
                kv("os.type", Some(StringValue("windows".into()))),
            ],
        }
    }

    #[test]
    fn a_kept_description_reads_back_exactly_as_reported() {
        let reported = collector("a1", "node-1");
        let kept = Description::new(reported.clone());
        assert_eq!(kept.to_proto(), reported);
        assert_eq!(kept.encoded_len(), reported.encoded_len());
        assert_eq!(kept.attribute("service.name").as_deref(), Some("otelcol-contrib"));
        assert_eq!(kept.attribute("host.cpus").as_deref(), Some("8"));
        assert_eq!(kept.attribute("ready").as_deref(), Some("true"));
        assert_eq!(kept.attribute("load").as_deref(), Some("0.5"));
        assert_eq!(kept.attribute("os.type").as_deref(), Some("linux"));
        for key in ["tags", "blob", "unset", "empty", "missing"] {
            assert_eq!(kept.attribute(key), None, "{key}");
        }
        let identifying: Vec<_> = kept.identifying().map(|(k, _)| k).collect();
        assert_eq!(identifying, ["service.instance.id", "service.name", "service.version"]);
        let json = attributes_json(Some(&kept));
        assert_eq!(json["os.type"], "linux");
        assert_eq!(json["host.name"], "node-1");
        assert!(!json.contains_key("tags") && !json.contains_key("unset"));
    }

    #[test]
    fn agents_share_the_text_they_report_alike_and_keep_their_own() {
        let strings = Interner::<str>::default();
        let mut a = Description::new(collector("a1", "node-1"));
        let mut b = Description::new(collector("b2", "node-2"));
        a.share(&strings);
        b.share(&strings);
        let text =
            |d: &Description, key: &str| match &d.attributes.iter().find(|a| &*a.key == key).unwrap().value {
                Value::Str(s) => s.clone(),
                other => panic!("{other:?}"),
            };
        assert!(Arc::ptr_eq(&text(&a, "service.name"), &text(&b, "service.name")));
        assert!(Arc::ptr_eq(&a.attributes[0].key, &b.attributes[0].key));
        assert!(!Arc::ptr_eq(&text(&a, "host.name"), &text(&b, "host.name")));
        // Shared, each still reads as its own agent reported it.
        assert_eq!(a.to_proto(), collector("a1", "node-1"));
        assert_eq!(b.to_proto(), collector("b2", "node-2"));
        // A change is still a change; the same content is not.
        assert_ne!(a, b);
        assert_eq!(a, Description::new(collector("a1", "node-1")));
        // Freed with their last holder.
        let live = strings.live();
        drop(a);
        assert_eq!(strings.live(), live - 2, "a1 and node-1 are gone, the rest is b's");
        drop(b);
        assert_eq!(strings.live(), 0);
    }
}
