//! Which collector components a config needs, and which of them an agent lacks (pure).
//!
//! # What a config needs
//!
//! A file is an OpenTelemetry Collector config when it parses as YAML (JSON included; the
//! content type is not consulted) and its top level is a mapping in which at least one of
//! `receivers`, `processors`, `exporters`, `extensions`, `connectors` maps to a mapping or to
//! null. Every component *defined* in those sections is needed, whether a pipeline uses it or
//! not: the collector unmarshals each section into a map keyed by component id and refuses the
//! whole config when an id's type has no factory in its build (`otelcol/unmarshaler.go`, whose
//! `configSettings` holds one `configunmarshaler.Configs` per kind, and
//! `otelcol/internal/configunmarshaler/configs.go`, whose `Configs.Unmarshal` returns
//! `unknown type: … for id: …` for the first id of the section without a factory; both in
//! `open-telemetry/opentelemetry-collector`). What a component needs is its *type*: the part of
//! its id before the first `/`, with surrounding spaces trimmed (`otlp/2` → `otlp`), as
//! `component.ID.UnmarshalText` reads it (`component/identifiable.go`). An id whose type does
//! not match `^[a-zA-Z][0-9a-zA-Z_]{0,62}$` (`typeRegexp` there), or with an empty name after
//! the `/`, is not a component id and adds nothing: the collector refuses it for that reason,
//! not for a missing component. Ids must be YAML strings; merge keys (`<<`) are followed, in a
//! section and at the top level (where a section given explicitly wins over a merged one), as
//! the collector's YAML decoder does. Only the first document of a YAML stream counts, as for
//! the collector.
//!
//! Anything else (plain text, JSON that is not such a mapping, a YAML list, invalid UTF-8 or
//! YAML, a file of another agent type) is not a collector config: it adds nothing and is passed
//! through untouched. The [`needed`] of several files is the union of theirs (the supervisor
//! merges every file of its remote config into one collector config).
//!
//! # Bounds
//!
//! A file is parsed only when it has at most [`MAX_FILE_BYTES`] (1 MiB), and when its `[` and
//! `{` nest at most [`MAX_DEPTH`] deep, counted over the raw text (the YAML scanner's work per
//! token grows with that nesting, so it is refused before the scanner runs). Parsing builds no
//! value tree: it walks the YAML events once, keeping only the section keys, and counts every
//! node it visits — aliases expanded — against [`MAX_NODES`], and nesting (block nesting too)
//! against [`MAX_DEPTH`]; serde_yaml's own alias-repetition limit may stop it first. A file
//! beyond a bound (an alias bomb, absurd nesting) is not checked: it adds nothing to the
//! components and is named, with the reason, in [`Needed::unchecked`].
//!
//! # What an agent has
//!
//! The collector's `opamp` extension (`extension/opampextension/opamp_agent.go` in
//! `open-telemetry/opentelemetry-collector-contrib`, `initAvailableComponents` and
//! `createComponentTypeAvailableComponentDetails`) reports `AvailableComponents.components`
//! with exactly the five keys `receivers`, `processors`, `exporters`, `extensions`,
//! `connectors`, each always present; each one's `sub_component_map` is keyed by component
//! type (`otlp`, `debug`, …), one leaf per type with the metadata `code.namespace` = the Go
//! module it was built from. `opampsupervisor` passes that report on unchanged. Our test
//! collector (`tests/interop/otelcol/manifest.yaml`) under the supervisor reports
//! `receivers: {nop, otlp}`, `exporters: {debug, nop}`, `extensions: {opamp, opampecho}` and
//! empty `processors` and `connectors`. An extension whose host does not list its modules
//! reports the five keys with empty maps: like a report without components (or with only its
//! hash), that is an agent reporting no components, which [`missing`] leaves unaffected.
use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use crate::proto::AvailableComponents;

/// The largest file parsed; a bigger one is not checked.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most YAML nodes (scalars, mappings, sequences, counted again each time an alias repeats
/// them) one file may have; beyond, the file is not checked.
pub const MAX_NODES: usize = 1_000_000;
/// The deepest nesting of mappings and sequences read; beyond, the file is not checked.
pub const MAX_DEPTH: usize = 64;

/// A kind of collector component: a top-level section of a collector config and a top-level
/// key of the collector's AvailableComponents. Ordered as their names are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Connectors,
    Exporters,
    Extensions,
    Processors,
    Receivers,
}

impl Kind {
    /// Every kind, in order.
    pub const ALL: [Kind; 5] =
        [Kind::Connectors, Kind::Exporters, Kind::Extensions, Kind::Processors, Kind::Receivers];

    /// The section's name (`receivers`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connectors => "connectors",
            Kind::Exporters => "exporters",
            Kind::Extensions => "extensions",
            Kind::Processors => "processors",
            Kind::Receivers => "receivers",
        }
    }

    fn from_section(key: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == key)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component type of one kind; shown as `exporters/kafka`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Component {
    kind: Kind,
    ty: String,
}

impl Component {
    /// The component of `kind` with the type of the component id `id` (`otlp/2` → `otlp`);
    /// `None` when `id` is not a valid component id.
    pub fn from_id(kind: Kind, id: &str) -> Option<Component> {
        let (ty, name) = match id.split_once('/') {
            Some((ty, name)) => (ty.trim(), Some(name.trim())),
            None => (id.trim(), None),
        };
        (valid_type(ty) && name.is_none_or(|n| !n.is_empty())).then(|| Component { kind, ty: ty.to_owned() })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The component type (`kafka`).
    pub fn component_type(&self) -> &str {
        &self.ty
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.ty)
    }
}

/// `^[a-zA-Z][0-9a-zA-Z_]{0,62}$`, the collector's `component.Type`.
fn valid_type(ty: &str) -> bool {
    let b = ty.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b[1..].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A file [`needed`] did not check, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unchecked {
    pub file: String,
    pub reason: String,
}

impl fmt::Display for Unchecked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not checked: {}", self.file, self.reason)
    }
}

/// The components the collector configs among a set of files use, and the files not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needed {
    components: BTreeSet<Component>,
    unchecked: Vec<Unchecked>,
}

impl Needed {
    /// No component needed (no collector config among the files, or none defining one).
    pub fn is_empty(&self) -> bool {
        self.components.is_empty()
    }

    pub fn len(&self) -> usize {
        self.components.len()
    }

    /// The components, sorted (by their `kind/type` text).
    pub fn iter(&self) -> impl Iterator<Item = &Component> {
        self.components.iter()
    }

    /// The files beyond a bound, which add nothing, in the order given.
    pub fn unchecked(&self) -> &[Unchecked] {
        &self.unchecked
    }
}

/// The union of the components the collector configs among `files` (name, content type,
/// body) use; see the module doc for which files are collector configs and the bounds.
pub fn needed<'a>(files: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>) -> Needed {
    let mut out = Needed::default();
    for (name, _content_type, body) in files {
        let unchecked = |reason: String| Unchecked { file: name.to_owned(), reason };
        if body.len() > MAX_FILE_BYTES {
            out.unchecked
                .push(unchecked(format!("{} bytes, more than the {MAX_FILE_BYTES} read", body.len())));
            continue;
        }
        match parse(body) {
            Ok(Some(sections)) => out.components.extend(sections.components()),
            Ok(None) => {}
            Err(reason) => out.unchecked.push(unchecked(reason)),
        }
    }
    out
}

/// The components of `needed` that `available` lacks, as `kind/type`, sorted; `None` when the
/// agent reports no components (no map, an empty one, or every kind empty).
pub fn missing(needed: &Needed, available: &AvailableComponents) -> Option<Vec<String>> {
    let types = |kind: Kind| available.components.get(kind.as_str()).map(|d| &d.sub_component_map);
    if Kind::ALL.into_iter().all(|k| types(k).is_none_or(|m| m.is_empty())) {
        return None;
    }
    Some(
        needed
            .iter()
            .filter(|c| !types(c.kind).is_some_and(|m| m.contains_key(&c.ty)))
            .map(Component::to_string)
            .collect(),
    )
}

/// The sections of one collector config: per kind (indexed as [`Kind::ALL`]), `None` when
/// absent, else whether it is a mapping (or null) and the ids defined in it.
#[derive(Default)]
struct Sections([Option<(bool, BTreeSet<String>)>; 5]);

impl Sections {
    fn is_config(&self) -> bool {
        self.0.iter().flatten().any(|(mapping, _)| *mapping)
    }

    fn components(self) -> impl Iterator<Item = Component> {
        Kind::ALL
            .into_iter()
            .zip(self.0)
            .filter_map(|(kind, s)| s.map(|(_, ids)| (kind, ids)))
            .flat_map(|(kind, ids)| ids.into_iter().filter_map(move |id| Component::from_id(kind, &id)))
    }
}

/// `Ok(Some)` for a collector config, `Ok(None)` for any other file, `Err(reason)` for one
/// beyond a bound.
fn parse(body: &[u8]) -> Result<Option<Sections>, String> {
    // The YAML scanner's work per token grows with the nesting of flow collections, so deep
    // ones are refused before it runs.
    if flow_nesting_exceeds(body, MAX_DEPTH) {
        return Err(format!("brackets nested deeper than {MAX_DEPTH}"));
    }
    let Some(document) = serde_yaml::Deserializer::from_slice(body).next() else {
        return Ok(None);
    };
    let walk = Walk { nodes: Cell::new(0), depth: Cell::new(0), beyond: Cell::new(None) };
    match TopLevel(&walk).deserialize(document) {
        Ok(sections) => Ok(sections.filter(Sections::is_config)),
        Err(e) => match walk.beyond.take() {
            Some(reason) => Err(reason),
            // serde_yaml's own limits (aliases repeated more than it allows, nesting deeper
            // than 128): the same bounds, met first.
            None if e.to_string().contains("limit exceeded") => Err(e.to_string()),
            None => Ok(None),
        },
    }
}

/// Whether `[` and `{` nest deeper than `limit` in `body`, counted over the raw text (in
/// quoted scalars and comments too, so never fewer than the YAML scanner sees).
fn flow_nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    for c in body {
        match c {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The state of one walk over a document: nodes visited, current depth, the bound met.
struct Walk {
    nodes: Cell<usize>,
    depth: Cell<usize>,
    beyond: Cell<Option<String>>,
}

impl Walk {
    /// Counts one node.
    fn node<E: de::Error>(&self) -> Result<(), E> {
        let n = self.nodes.get() + 1;
        self.nodes.set(n);
        if n > MAX_NODES {
            return Err(self.stop(format!("more than {MAX_NODES} YAML nodes (aliases expanded)")));
        }
        Ok(())
    }

    /// Counts one node and runs `f` one level deeper.
    fn nested<T, E: de::Error>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.node()?;
        let depth = self.depth.get() + 1;
        if depth > MAX_DEPTH {
            return Err(self.stop(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.depth.set(depth);
        let out = f();
        self.depth.set(depth - 1);
        out
    }

    fn stop<E: de::Error>(&self, reason: String) -> E {
        let e = E::custom(&reason);
        self.beyond.set(Some(reason));
        e
    }
}

/// The scalar visits other than strings and null: one node each, read as `$out`.
macro_rules! scalars {
    ($out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            self.0.node()?;
            Ok($out)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            self.0.node()?;
            Ok($out)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            self.0.node()?;
            Ok($out)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            self.0.node()?;
            Ok($out)
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            self.0.node()?;
            Ok($out)
        }
    };
}

/// What a section and the top level make of anything but a mapping: it is counted and yields
/// nothing (`None`), except an empty value (`~`, or no value), which yields `$empty`.
macro_rules! not_a_mapping {
    ($empty:expr) => {
        scalars!(None);
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            self.0.node().map(|()| None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.0.node().map(|()| $empty)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            self.visit_unit()
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            self.deserialize(d)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Skip(self.0).visit_seq(seq).map(|()| None)
        }
        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
            Skip(self.0).visit_enum(data).map(|()| None)
        }
    };
}

/// Skips one node, counting everything in it.
#[derive(Clone, Copy)]
struct Skip<'w>(&'w Walk);

impl<'de> DeserializeSeed<'de> for Skip<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    scalars!(());
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.0.node()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.node()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.node()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.nested(|| {
            while seq.next_element_seed(self)?.is_some() {}
            Ok(())
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.nested(|| {
            while map.next_key_seed(self)?.is_some() {
                map.next_value_seed(self)?;
            }
            Ok(())
        })
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A value with a tag of its own (`!tag value`): the tag, then the value.
        self.0.nested(|| {
            let ((), variant) = data.variant_seed(self)?;
            variant.newtype_variant_seed(self)
        })
    }
}

/// A mapping key: its text when it is a string.
#[derive(Clone, Copy)]
struct Key<'w>(&'w Walk);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    scalars!(None);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        self.0.node()?;
        Ok(Some(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        self.0.node().map(|()| None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        self.0.node().map(|()| None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        Skip(self.0).deserialize(d).map(|()| None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<String>, A::Error> {
        Skip(self.0).visit_seq(seq).map(|()| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<String>, A::Error> {
        Skip(self.0).visit_map(map).map(|()| None)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Option<String>, A::Error> {
        Skip(self.0).visit_enum(data).map(|()| None)
    }
}

/// One section (`receivers: …`): `Some(ids)` when it is a mapping or null, with the keys of
/// what it merges (`<<: *x`, `<<: [*x, *y]`); `None` when it is anything else.
#[derive(Clone, Copy)]
struct Section<'w>(&'w Walk);

impl<'de> DeserializeSeed<'de> for Section<'_> {
    type Value = Option<BTreeSet<String>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Section<'_> {
    type Value = Option<BTreeSet<String>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a section of a collector config")
    }
    not_a_mapping!(Some(BTreeSet::new()));
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.0.nested(|| {
            let mut ids = BTreeSet::new();
            while let Some(key) = map.next_key_seed(Key(self.0))? {
                match key {
                    Some(k) if k == "<<" => {
                        for merged in map.next_value_seed(Merge(self))? {
                            ids.extend(merged.into_iter().flatten());
                        }
                    }
                    Some(id) => {
                        map.next_value_seed(Skip(self.0))?;
                        ids.insert(id);
                    }
                    None => map.next_value_seed(Skip(self.0))?,
                }
            }
            Ok(Some(ids))
        })
    }
}

/// The value of a merge key: one mapping, or a sequence of them, each read with `S`.
struct Merge<S>(S);

impl<'de, S> DeserializeSeed<'de> for Merge<S>
where
    S: DeserializeSeed<'de> + Visitor<'de, Value = <S as DeserializeSeed<'de>>::Value> + Copy + Walked,
{
    type Value = Vec<<S as DeserializeSeed<'de>>::Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, S> Visitor<'de> for Merge<S>
where
    S: DeserializeSeed<'de> + Visitor<'de, Value = <S as DeserializeSeed<'de>>::Value> + Copy + Walked,
{
    type Value = Vec<<S as DeserializeSeed<'de>>::Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence of mappings to merge")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(vec![<S as Visitor<'de>>::visit_map(self.0, map)?])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let walk = self.0.walk();
        walk.nested(|| {
            let mut out = Vec::new();
            while let Some(one) = seq.next_element_seed(self.0)? {
                out.push(one);
            }
            Ok(out)
        })
    }
    // Anything else is not a merge the collector accepts: skipped.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.walk().node().map(|()| Vec::new())
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        Skip(self.0.walk()).visit_enum(data).map(|()| Vec::new())
    }
}

/// A seed walking with a [`Walk`].
trait Walked {
    fn walk(&self) -> &Walk;
}

impl Walked for Section<'_> {
    fn walk(&self) -> &Walk {
        self.0
    }
}

impl Walked for TopLevel<'_> {
    fn walk(&self) -> &Walk {
        self.0
    }
}

/// The top level of a document: `Some` when it is a mapping.
#[derive(Clone, Copy)]
struct TopLevel<'w>(&'w Walk);

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Option<Sections>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = Option<Sections>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML document")
    }
    not_a_mapping!(None);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.0.nested(|| {
            let mut explicit = Sections::default();
            let mut merged: Vec<Sections> = Vec::new();
            while let Some(key) = map.next_key_seed(Key(self.0))? {
                match key.as_deref() {
                    Some("<<") => merged.extend(map.next_value_seed(Merge(self))?.into_iter().flatten()),
                    Some(k) => match Kind::from_section(k) {
                        Some(kind) => {
                            let section = map.next_value_seed(Section(self.0))?;
                            let slot = &mut explicit.0[kind as usize];
                            // A repeated key: the collector refuses the file; keep both.
                            let (mapping, ids) = slot.get_or_insert_with(|| (false, BTreeSet::new()));
                            *mapping |= section.is_some();
                            ids.extend(section.into_iter().flatten());
                        }
                        None => map.next_value_seed(Skip(self.0))?,
                    },
                    None => map.next_value_seed(Skip(self.0))?,
                }
            }
            // A section given explicitly wins over merged ones; among merged ones, the first.
            for m in merged {
                for (slot, from) in explicit.0.iter_mut().zip(m.0) {
                    if slot.is_none() {
                        *slot = from;
                    }
                }
            }
            Ok(Some(explicit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AnyValue, ComponentDetails, KeyValue, any_value};

    /// A collector config with every kind, `type/name` ids, and components no pipeline uses.
    const FULL: &str = r#"
receivers:
  otlp:
    protocols: {grpc: {endpoint: "0.0.0.0:4317"}}
  otlp/2:
    protocols: {http: {}}
processors:
  batch:
exporters:
  debug: {verbosity: basic}
  debug/2: {}
  kafka:
    brokers: ["kafka:9092"]
extensions:
  health_check: {}
connectors:
  forward:
service:
  extensions: [health_check]
  pipelines:
    traces: {receivers: [otlp, otlp/2], processors: [batch], exporters: [forward]}
    traces/out: {receivers: [forward], exporters: [debug]}
"#;

    const FULL_NEEDS: [&str; 6] = [
        "connectors/forward",
        "exporters/debug",
        "exporters/kafka",
        "extensions/health_check",
        "processors/batch",
        "receivers/otlp",
    ];

    fn names(needed: &Needed) -> Vec<String> {
        needed.iter().map(Component::to_string).collect()
    }

    fn one(body: &[u8]) -> Needed {
        needed([("collector.yaml", "text/yaml", body)])
    }

    /// An AvailableComponents as the collector's `opamp` extension reports it: the five kinds,
    /// each keyed by type, each type a leaf with its Go module as `code.namespace`.
    fn report(kinds: &[(&str, &[&str])]) -> AvailableComponents {
        let leaf = |module: String| ComponentDetails {
            metadata: vec![KeyValue {
                key: "code.namespace".into(),
                value: Some(AnyValue { value: Some(any_value::Value::StringValue(module)) }),
            }],
            sub_component_map: Default::default(),
        };
        let components = kinds
            .iter()
            .map(|(kind, types)| {
                let sub =
                    types.iter().map(|t| (t.to_string(), leaf(format!("example.com/{kind}/{t} v0.149.0"))));
                (kind.to_string(), ComponentDetails { metadata: vec![], sub_component_map: sub.collect() })
            })
            .collect();
        AvailableComponents { components, hash: bytes::Bytes::from_static(b"hash") }
    }

    /// What our test collector (tests/interop/otelcol/manifest.yaml) reports under the
    /// supervisor: no processors and no connectors.
    fn test_collector() -> AvailableComponents {
        report(&[
            ("connectors", &[]),
            ("exporters", &["debug", "nop"]),
            ("extensions", &["opamp", "opampecho"]),
            ("processors", &[]),
            ("receivers", &["nop", "otlp"]),
        ])
    }

    #[test]
    fn every_defined_component_of_a_full_config_is_needed_by_type() {
        let needed = one(FULL.as_bytes());
        assert_eq!(names(&needed), FULL_NEEDS);
        assert_eq!(needed.len(), 6);
        assert!(needed.unchecked().is_empty());
        let kafka = needed.iter().find(|c| c.component_type() == "kafka").unwrap();
        assert_eq!((kafka.kind(), kafka.to_string()), (Kind::Exporters, "exporters/kafka".to_owned()));
    }

    #[test]
    fn an_agent_lacking_one_exporter_misses_exactly_it() {
        let lacking_kafka = report(&[
            ("receivers", &["otlp", "nop"]),
            ("processors", &["batch"]),
            ("exporters", &["debug", "otlphttp"]),
            ("extensions", &["health_check", "opamp"]),
            ("connectors", &["forward"]),
        ]);
        assert_eq!(missing(&one(FULL.as_bytes()), &lacking_kafka), Some(vec!["exporters/kafka".to_owned()]));
    }

    #[test]
    fn the_test_collector_lacks_processors_connectors_kafka_and_what_is_not_built_in() {
        assert_eq!(
            missing(&one(FULL.as_bytes()), &test_collector()),
            Some(vec![
                "connectors/forward".to_owned(),
                "exporters/kafka".to_owned(),
                "extensions/health_check".to_owned(),
                "processors/batch".to_owned(),
            ])
        );
        // The config of the collector e2e tests: everything is there.
        let runs = "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:0\nexporters:\n  debug:\n    verbosity: basic\nextensions:\n  opampecho: {}\nservice:\n  extensions: [opampecho]\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n";
        assert_eq!(missing(&one(runs.as_bytes()), &test_collector()), Some(vec![]));
        let broken = runs.replace("debug", "otlphttp");
        assert_eq!(
            missing(&one(broken.as_bytes()), &test_collector()),
            Some(vec!["exporters/otlphttp".to_owned()])
        );
    }

    #[test]
    fn an_agent_reporting_no_components_is_unaffected() {
        let needed = one(FULL.as_bytes());
        assert_eq!(missing(&needed, &AvailableComponents::default()), None);
        // Only the hash (until the full map is asked for).
        let hash_only = AvailableComponents { hash: bytes::Bytes::from_static(b"h"), ..Default::default() };
        assert_eq!(missing(&needed, &hash_only), None);
        // The extension on a host that does not list its modules: five empty kinds.
        let empty = report(&[
            ("receivers", &[]),
            ("processors", &[]),
            ("exporters", &[]),
            ("extensions", &[]),
            ("connectors", &[]),
        ]);
        assert_eq!(missing(&needed, &empty), None);
        // A report in other terms than the collector's.
        assert_eq!(missing(&needed, &report(&[("inputs", &["tail"])])), None);
    }

    #[test]
    fn a_kind_the_agent_does_not_report_is_missing_whole() {
        let only_receivers = report(&[("receivers", &["otlp"])]);
        let needed = one(b"receivers: {otlp: {}}\nexporters: {debug: {}}\n");
        assert_eq!(missing(&needed, &only_receivers), Some(vec!["exporters/debug".to_owned()]));
        assert_eq!(missing(&Needed::default(), &only_receivers), Some(vec![]));
    }

    #[test]
    fn files_that_are_not_collector_configs_need_nothing() {
        let files: [(&str, &str, &[u8]); 8] = [
            ("plain.txt", "text/plain", b"receivers are listed below\notlp kafka\n"),
            ("object.json", "application/json", br#"{"a":1}"#),
            ("list.yaml", "text/yaml", b"- receivers\n- exporters: {kafka: {}}\n"),
            ("binary", "", &[0xff, 0xfe, 0x00, 0x01, 0x80, b':', 0x9f]),
            (
                "fluent-bit.yaml",
                "text/yaml",
                b"service:\n  flush: 1\npipeline:\n  inputs:\n    - name: tail\n",
            ),
            ("sections-as-lists.yaml", "", b"receivers: [otlp]\nexporters: kafka\n"),
            ("invalid.yaml", "text/yaml", b"receivers: {otlp: [\n"),
            ("empty", "", b""),
        ];
        for file in files {
            let needed = needed([file]);
            assert!(needed.is_empty() && needed.unchecked().is_empty(), "{}: {needed:?}", file.0);
        }
    }

    #[test]
    fn json_configs_and_null_sections_count_whatever_the_content_type() {
        let json = br#"{"receivers": {"otlp": {}}, "exporters": {"kafka/x": null}}"#;
        assert_eq!(
            names(&needed([("c.json", "application/json", &json[..])])),
            ["exporters/kafka", "receivers/otlp"]
        );
        assert_eq!(
            names(&needed([("c", "", &b"receivers:\nexporters:\n  kafka:\n"[..])])),
            ["exporters/kafka"]
        );
        // A null section alone makes a collector config that needs nothing.
        assert!(one(b"receivers:\nservice: {}\n").is_empty());
    }

    #[test]
    fn ids_that_are_not_component_ids_add_nothing() {
        let long = "a".repeat(64);
        let ok = format!("b{}", "_".repeat(62));
        let body = format!(
            "receivers:\n  1otlp: {{}}\n  otlp/: {{}}\n  /x: {{}}\n  ' nop / a ': {{}}\n  a-b: {{}}\n  123: {{}}\n  true: {{}}\n  ~: {{}}\n  [x]: {{}}\n  {long}: {{}}\n  {ok}/n: {{}}\n  é: {{}}\n"
        );
        assert_eq!(names(&one(body.as_bytes())), [format!("receivers/{ok}"), "receivers/nop".to_owned()]);
    }

    #[test]
    fn merge_keys_are_followed_and_explicit_sections_win() {
        let body = b"x-common: &common\n  otlp: {}\n  kafka/a: {}\nreceivers:\n  <<: *common\n  nop: {}\nexporters:\n  <<: [*common, {debug: {}}]\n";
        assert_eq!(
            names(&one(body)),
            [
                "exporters/debug",
                "exporters/kafka",
                "exporters/otlp",
                "receivers/kafka",
                "receivers/nop",
                "receivers/otlp"
            ]
        );
        let top = b"base: &base\n  exporters: {kafka: {}}\n  receivers: {nop: {}}\n<<: *base\nreceivers: {otlp: {}}\n";
        assert_eq!(names(&one(top)), ["exporters/kafka", "receivers/otlp"]);
    }

    #[test]
    fn only_the_first_document_counts_and_tags_do_no_harm() {
        assert_eq!(names(&one(b"receivers: {otlp: {}}\n---\nexporters: {kafka: {}}\n")), ["receivers/otlp"]);
        let tagged = b"receivers:\n  otlp: !custom {a: 1}\n  nop: !!map {}\nexporters: !!map {debug: {}}\n";
        assert_eq!(names(&one(tagged)), ["exporters/debug", "receivers/nop", "receivers/otlp"]);
    }

    #[test]
    fn several_files_are_unioned() {
        let files: [(&str, &str, &[u8]); 4] = [
            ("in.yaml", "text/yaml", b"receivers: {otlp: {}, otlp/2: {}}\n"),
            ("out.yaml", "text/yaml", b"exporters: {kafka: {}}\nprocessors: {batch: {}}\n"),
            ("more.yaml", "text/yaml", b"exporters: {debug: {}, kafka/2: {}}\n"),
            ("notes.txt", "text/plain", b"not a config"),
        ];
        assert_eq!(
            names(&needed(files)),
            ["exporters/debug", "exporters/kafka", "processors/batch", "receivers/otlp"]
        );
    }

    #[test]
    fn a_file_above_one_mib_is_not_checked_and_says_so() {
        let mut body = b"exporters: {kafka: {}}\n# ".to_vec();
        body.resize(MAX_FILE_BYTES + 1, b'x');
        let needed = one(&body);
        assert!(needed.is_empty());
        assert_eq!(needed.unchecked().len(), 1);
        assert_eq!(needed.unchecked()[0].file, "collector.yaml");
        assert!(needed.unchecked()[0].to_string().contains("not checked"), "{needed:?}");
        // At the bound, it is read.
        let mut body = b"exporters: {kafka: {}}\n# ".to_vec();
        body.resize(MAX_FILE_BYTES, b'x');
        assert_eq!(names(&one(&body)), ["exporters/kafka"]);
    }

    /// The classic "billion laughs": nine levels of ten aliases.
    fn laughs() -> String {
        let mut s = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        s
    }

    #[test]
    fn an_alias_bomb_stops_at_the_node_bound() {
        let laughs = laughs();
        // In a component's config, in a key no one reads, and as a whole section.
        for body in [
            format!("{laughs}receivers:\n  otlp: *a9\n"),
            format!("{laughs}x: *a9\nreceivers: {{otlp: {{}}}}\n"),
            format!("{laughs}receivers: *a9\n"),
        ] {
            let needed = one(body.as_bytes());
            assert!(needed.is_empty(), "{needed:?}");
            assert_eq!(needed.unchecked().len(), 1, "{needed:?}");
        }
        // A wide base repeated through few aliases: few alias jumps, many nodes.
        let wide = vec!["x"; 100_000].join(",");
        let mut body = format!("w0: &w0 [{wide}]\n");
        for i in 1..=6 {
            body.push_str(&format!("w{i}: &w{i} [{}]\n", vec![format!("*w{}", i - 1); 10].join(", ")));
        }
        body.push_str("receivers:\n  otlp: *w6\n");
        assert!(body.len() < MAX_FILE_BYTES);
        let needed = one(body.as_bytes());
        assert!(needed.is_empty() && needed.unchecked()[0].reason.contains("nodes"), "{needed:?}");
        // Merges repeat keys only, and are bounded the same way.
        let mut body = format!(
            "m0: &m0 {{{}}}\n",
            (0..50_000).map(|i| format!("k{i}: 1")).collect::<Vec<_>>().join(", ")
        );
        for i in 1..=4 {
            body.push_str(&format!(
                "m{i}: &m{i} {{<<: [{}]}}\n",
                vec![format!("*m{}", i - 1); 10].join(", ")
            ));
        }
        body.push_str("receivers: *m4\n");
        let needed = one(body.as_bytes());
        assert_eq!(needed.unchecked().len(), 1);
    }

    #[test]
    fn deep_nesting_stops_at_the_depth_bound() {
        let n = 200_000;
        let flow = format!("receivers:\n  otlp: {}{}\n", "[".repeat(n), "]".repeat(n));
        let maps = format!("exporters:\n  kafka: {}x{}\n", "{a: ".repeat(n / 4), "}".repeat(n / 4));
        let top = format!("{}{}", "[".repeat(500_000), "]".repeat(500_000));
        let unclosed = "{a: ".repeat(200_000);
        let mut block = String::new();
        for i in 0..1_300 {
            block.push_str(&format!("{}a:\n", " ".repeat(i)));
        }
        let block = format!("receivers:\n  otlp:\n{}", block.replace('a', &format!("{}a", "  ")));
        for body in [flow, maps, top, unclosed, block] {
            let needed = one(body.as_bytes());
            assert!(needed.is_empty(), "{needed:?}");
            assert!(
                needed.unchecked().len() == 1 && needed.unchecked()[0].reason.contains("deeper"),
                "{needed:?}"
            );
        }
        // Nesting within the bound is read.
        let ok = format!("receivers:\n  otlp: {}{}\n", "[".repeat(MAX_DEPTH - 3), "]".repeat(MAX_DEPTH - 3));
        assert_eq!(names(&one(ok.as_bytes())), ["receivers/otlp"]);
    }
}
