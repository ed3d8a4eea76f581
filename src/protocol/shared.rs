//! Reported parts that many agents share, held once, and effective configs that many agents
//! nearly share, held as a small difference.
//!
//! A fleet runs few builds and few configs: thousands of agents report the same list of
//! available components, each several kilobytes. An [`Interner`] maps such a part's content to
//! the one copy in memory; an agent's report holds an `Arc` of it, and the copy is freed with the
//! last agent that holds it. Parts are told apart by their content (a keyed hash of their
//! encoding, then a full comparison), never by a hash the agent claims, so one agent cannot make
//! another's report read differently.
//!
//! Effective configs are alike more often than equal: a collector run by the OpAMP supervisor
//! reports the config the supervisor wrote for it, ~2 KB of YAML of which about five lines are
//! its own (its instance UID, the supervisor's pid, a local port, `host.name`,
//! `service.instance.id`). Shared only when equal, every such agent would keep a copy of its own.
//! [`Configs`] therefore keeps a config that is new as an LZ4 block compressed with the encoding
//! of a *reference* config as dictionary ([`KeptConfig`]): what it has in common with the
//! reference costs a few bytes, and mostly its own values are kept (LZ4 reaches back 64 KiB, so
//! configs larger than that gain less). Equal configs are still one `Arc`, as in an [`Interner`].
//!
//! The references of a config are the last few kept whole with the same file names and content
//! types ([`REFERENCES_PER_FILES`]), so the choice depends on nothing an agent can aim at
//! another's config. A config is kept as its smallest difference against them when that takes
//! at most 1/[`GOOD_DIFFERENCE`] of its encoding (or half, when there is no room for another
//! reference); else it is kept whole and becomes a reference, replacing the oldest: a fleet run
//! by a few AgentConfigs that share file names keeps each one's agents against a config of its
//! own kind. Reading a config decodes its difference against
//! the reference it was made with, which every difference holds (an `Arc`), and a difference is
//! checked to decode to the config's exact encoding before it is kept: a config reads as exactly
//! what its agent sent, whatever others send. Memory stays bounded by what agents send: a
//! reference lives while a config kept against it does, which costs at most one copy per
//! reference beyond the configs agents hold (live references: at most [`REFERENCES_PER_FILES`]
//! per file-name set in use, plus the superseded ones that differences still hold), and a
//! difference is only made against a reference at most twice the size of the config, so what a
//! config kept as a difference keeps alive (its difference, at most half its size, and its
//! reference) is at most 2.5 times what its agent is charged for: reports are charged by their
//! decoded size
//! ([`KeptConfig::encoded_len`]), within the per-agent bound of bytes.
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prost::Message;

use crate::proto::{AvailableComponents, EffectiveConfig};

/// Sweeps of dead entries start once the table holds this many.
const MIN_SWEEP: usize = 64;

/// One copy per distinct content of `T`, for as long as someone holds it.
pub struct Interner<T: ?Sized> {
    /// Keyed per process (SipHash with a random key): content cannot be crafted to collide.
    hasher: RandomState,
    table: Mutex<Table<T>>,
}

struct Table<T: ?Sized> {
    entries: HashMap<u64, Weak<T>>,
    /// When `entries` reaches this length, entries whose part no agent holds are removed.
    sweep_at: usize,
}

impl<T: ?Sized> Default for Table<T> {
    fn default() -> Self {
        Self { entries: HashMap::new(), sweep_at: MIN_SWEEP }
    }
}

impl<T: ?Sized> Table<T> {
    /// The part held under `key`, if someone still holds it.
    fn get(&self, key: u64) -> Option<Arc<T>> {
        self.entries.get(&key).and_then(Weak::upgrade)
    }

    /// Holds `value` under `key` (replacing what was there), sweeping dead entries now and then.
    fn put(&mut self, key: u64, value: &Arc<T>) {
        self.entries.insert(key, Arc::downgrade(value));
        if self.entries.len() >= self.sweep_at {
            self.entries.retain(|_, held| held.strong_count() > 0);
            self.sweep_at = (self.entries.len() * 2).max(MIN_SWEEP);
        }
    }

    fn live(&self) -> usize {
        self.entries.values().filter(|held| held.strong_count() > 0).count()
    }
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self { hasher: RandomState::new(), table: Mutex::new(Table::default()) }
    }
}

impl<T: ?Sized> Interner<T> {
    /// The held copy under `key` that `same` accepts, if any; else `value`, now held for others
    /// under `key` unless another content already is (a collision: `value` is kept, not shared).
    fn share_by(&self, key: u64, value: Arc<T>, same: impl FnOnce(&T) -> bool) -> Arc<T> {
        let mut table = self.table.lock();
        if let Some(held) = table.get(key) {
            return if same(&held) { held } else { value };
        }
        table.put(key, &value);
        value
    }

    /// The copy held under `key`, if any (to compare with before making a value to share).
    fn held(&self, key: u64) -> Option<Arc<T>> {
        self.table.lock().get(key)
    }

    /// Distinct contents someone still holds.
    pub fn live(&self) -> usize {
        self.table.lock().live()
    }
}

impl<T: Message + PartialEq> Interner<T> {
    /// The copy of `value`'s content already held, if any; else `value`, now held for others.
    /// Content whose key collides with another's is returned as is (kept, not shared).
    pub fn share(&self, value: Arc<T>) -> Arc<T> {
        let key = self.hasher.hash_one(value.encode_to_vec());
        self.share_by(key, value.clone(), |held| *held == *value)
    }
}

impl Interner<str> {
    /// The copy of `value`'s text already held, if any; else `value`, now held for others.
    /// Text whose key collides with another's is returned as is (kept, not shared).
    pub fn share_str(&self, value: &Arc<str>) -> Arc<str> {
        let key = self.hasher.hash_one(&**value);
        self.share_by(key, value.clone(), |held| *held == **value)
    }
}

/// An effective config kept whole, which configs with the same file names are kept against.
struct Reference {
    encoding: Box<[u8]>,
}

/// An effective config as kept: its encoding, whole or as a difference against a reference.
/// Made whole by [`KeptConfig::new`]; [`Configs::keep`] shares it or makes it a difference.
pub struct KeptConfig(Form);

enum Form {
    /// The encoding itself (the reference of the configs kept against it, if any).
    Whole(Arc<Reference>),
    /// An LZ4 block that decodes, with `reference`'s encoding as dictionary, to the `len` bytes
    /// of the config's encoding (checked before it is kept).
    Delta { reference: Arc<Reference>, delta: Box<[u8]>, len: u32 },
}

impl KeptConfig {
    /// `config`, kept whole.
    pub fn new(config: &EffectiveConfig) -> Self {
        Self::whole(config.encode_to_vec())
    }

    fn whole(encoding: Vec<u8>) -> Self {
        Self(Form::Whole(Arc::new(Reference { encoding: encoding.into_boxed_slice() })))
    }

    /// The config as its agent reported it.
    pub fn to_proto(&self) -> EffectiveConfig {
        EffectiveConfig::decode(&*self.encoding()).expect("a kept config is the encoding of one")
    }

    /// The size of the config's encoding, in bytes, however it is kept: what its agent is
    /// charged for against its bounds.
    pub fn encoded_len(&self) -> usize {
        match &self.0 {
            Form::Whole(reference) => reference.encoding.len(),
            Form::Delta { len, .. } => *len as usize,
        }
    }

    /// The bytes this config keeps of its own: its encoding, or its difference.
    pub fn kept_len(&self) -> usize {
        match &self.0 {
            Form::Whole(reference) => reference.encoding.len(),
            Form::Delta { delta, .. } => delta.len(),
        }
    }

    /// Whether the config is kept as a difference against another config.
    pub fn is_delta(&self) -> bool {
        matches!(self.0, Form::Delta { .. })
    }

    /// The config's encoding (decoded from its difference if it is one).
    fn encoding(&self) -> Cow<'_, [u8]> {
        match &self.0 {
            Form::Whole(reference) => Cow::Borrowed(&reference.encoding),
            Form::Delta { reference, delta, len } => Cow::Owned(
                decompress(delta, *len as usize, &reference.encoding)
                    .expect("a difference is checked to decode before it is kept"),
            ),
        }
    }

    /// Whether this config's encoding is `encoding`.
    fn encodes(&self, encoding: &[u8]) -> bool {
        self.encoded_len() == encoding.len() && *self.encoding() == *encoding
    }
}

impl PartialEq for KeptConfig {
    fn eq(&self, other: &Self) -> bool {
        self.encodes(&other.encoding())
    }
}

impl std::fmt::Debug for KeptConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConfig")
            .field("encoded_len", &self.encoded_len())
            .field("kept_len", &self.kept_len())
            .field("delta", &self.is_delta())
            .finish()
    }
}

/// `delta` decoded with `dict` as dictionary, if it decodes to exactly `len` bytes.
fn decompress(delta: &[u8], len: usize, dict: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0; len];
    let decoded = lz4_flex::block::decompress_into_with_dict(delta, &mut out, dict).ok()?;
    (decoded == len).then_some(out)
}

/// Effective configs: equal ones held once, others that resemble a reference as their
/// difference against it (see the module documentation).
#[derive(Default)]
pub struct Configs {
    configs: Interner<KeptConfig>,
    /// The references of each set of file names and content types, by a keyed hash of the set:
    /// the last [`REFERENCES_PER_FILES`] configs kept whole, oldest first.
    references: Mutex<References>,
}

/// References kept per set of file names: a fleet configured by a few AgentConfigs that share
/// their file names (`collector.yaml`) keeps each variant's configs against that variant.
const REFERENCES_PER_FILES: usize = 4;
/// A difference taking at most this share of a config's encoding (1/n) is kept at once; a larger
/// one only when there is no room for another reference for the config's file names.
const GOOD_DIFFERENCE: usize = 8;

#[derive(Default)]
struct References {
    by_files: HashMap<u64, Vec<Weak<Reference>>>,
    /// When `by_files` reaches this length, sets without a live reference are removed.
    sweep_at: usize,
}

impl References {
    fn live(&mut self, files: u64) -> Vec<Arc<Reference>> {
        let held = self.by_files.get_mut(&files);
        let held = held.map(|h| {
            h.retain(|r| r.strong_count() > 0);
            h.iter().filter_map(Weak::upgrade).collect()
        });
        held.unwrap_or_default()
    }

    /// Adds `reference` for `files`, replacing the oldest when they are [`REFERENCES_PER_FILES`].
    fn add(&mut self, files: u64, reference: &Arc<Reference>) {
        let held = self.by_files.entry(files).or_default();
        held.retain(|r| r.strong_count() > 0);
        if held.len() >= REFERENCES_PER_FILES {
            held.remove(0);
        }
        held.push(Arc::downgrade(reference));
        if self.by_files.len() >= self.sweep_at.max(MIN_SWEEP) {
            self.by_files.retain(|_, h| h.iter().any(|r| r.strong_count() > 0));
            self.sweep_at = self.by_files.len() * 2;
        }
    }
}

impl Configs {
    /// The copy of `config`'s content already held, if any; else `config` kept as small as its
    /// reference allows, now held for others.
    pub fn keep(&self, config: Arc<KeptConfig>) -> Arc<KeptConfig> {
        let encoding = config.encoding();
        let key = self.configs.hasher.hash_one(&*encoding);
        if let Some(held) = self.configs.held(key).filter(|held| held.encodes(&encoding)) {
            return held;
        }
        let files = self.files_key(&encoding);
        let kept = match self.against_references(files, &encoding) {
            Some(delta) => Arc::new(delta),
            None => {
                // Kept whole, it becomes a reference for its file names.
                let whole = match &config.0 {
                    Form::Whole(_) => config.clone(),
                    Form::Delta { .. } => Arc::new(KeptConfig::whole(encoding.to_vec())),
                };
                if let Form::Whole(reference) = &whole.0 {
                    self.references.lock().add(files, reference);
                }
                whole
            }
        };
        self.configs.share_by(key, kept, |held| held.encodes(&encoding))
    }

    /// `encoding` as its smallest difference against a reference for `files` no more than twice
    /// as large, if that takes at most 1/[`GOOD_DIFFERENCE`] of `encoding`, or at most half when
    /// the references for `files` leave no room for another; `None`: keep it whole.
    fn against_references(&self, files: u64, encoding: &[u8]) -> Option<KeptConfig> {
        let references = self.references.lock().live(files);
        let len = u32::try_from(encoding.len()).ok()?;
        let (reference, delta) = references
            .iter()
            .filter(|r| r.encoding.len() <= encoding.len().saturating_mul(2))
            .map(|r| (r, lz4_flex::block::compress_with_dict(encoding, &r.encoding)))
            .min_by_key(|(_, delta)| delta.len())?;
        let room = references.len() < REFERENCES_PER_FILES;
        if delta.len() > encoding.len() / if room { GOOD_DIFFERENCE } else { 2 } {
            return None;
        }
        // Kept only if it reads back as exactly what the agent sent.
        if decompress(&delta, encoding.len(), &reference.encoding).as_deref() != Some(encoding) {
            return None;
        }
        Some(KeptConfig(Form::Delta { reference: reference.clone(), delta: delta.into_boxed_slice(), len }))
    }

    /// A keyed hash of the sorted file names and content types of the config `encoding` holds.
    fn files_key(&self, encoding: &[u8]) -> u64 {
        let config = EffectiveConfig::decode(encoding).unwrap_or_default();
        let mut files: Vec<(&str, &str)> = config
            .config_map
            .iter()
            .flat_map(|m| m.config_map.iter())
            .map(|(name, file)| (name.as_str(), file.content_type.as_str()))
            .collect();
        files.sort_unstable();
        let mut hasher = self.configs.hasher.build_hasher();
        for (name, content_type) in files {
            for text in [name, content_type] {
                hasher.write_usize(text.len());
                hasher.write(text.as_bytes());
            }
        }
        hasher.finish()
    }

    /// Distinct configs someone still holds.
    pub fn live(&self) -> usize {
        self.configs.live()
    }

    /// References someone still holds (a config kept whole, or one kept against it) that new
    /// configs are kept against.
    pub fn live_references(&self) -> usize {
        let references = self.references.lock();
        references.by_files.values().flatten().filter(|r| r.strong_count() > 0).count()
    }
}

/// The report parts worth sharing.
#[derive(Default)]
pub struct SharedParts {
    pub effective_config: Configs,
    pub available_components: Interner<AvailableComponents>,
    /// Attribute keys and values of agents' descriptions ([`crate::protocol::Description`]).
    pub strings: Interner<str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentConfigFile, AgentConfigMap};

    fn config(body: &str) -> Arc<EffectiveConfig> {
        let mut map = AgentConfigMap::default();
        map.config_map.insert(
            "collector.yaml".into(),
            AgentConfigFile { body: body.as_bytes().to_vec().into(), content_type: "text/yaml".into() },
        );
        Arc::new(EffectiveConfig { config_map: Some(map) })
    }

    #[test]
    fn equal_content_is_held_once_and_freed_with_its_last_holder() {
        let interner = Interner::default();
        let a = interner.share(config("receivers: {}"));
        let b = interner.share(config("receivers: {}"));
        let c = interner.share(config("exporters: {}"));
        assert!(Arc::ptr_eq(&a, &b), "the same content is one copy");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(interner.live(), 2);
        drop((a, b));
        assert_eq!(interner.live(), 1, "freed with its last holder");
        drop(c);
        assert_eq!(interner.live(), 0);
    }

    #[test]
    fn entries_of_dropped_parts_are_swept() {
        let interner = Interner::default();
        for i in 0..10 * MIN_SWEEP {
            let held = interner.share(config(&format!("n: {i}")));
            drop(held);
        }
        assert!(interner.table.lock().entries.len() < MIN_SWEEP + 1, "dead entries do not pile up");
    }

    /// A collector's config as the supervisor writes it (~2 KB of YAML), with agent `i`'s own
    /// values in five lines.
    fn collector(i: usize) -> EffectiveConfig {
        let mut body = String::from("receivers:\n");
        for r in ["otlp", "prometheus", "hostmetrics", "filelog", "jaeger", "zipkin"] {
            body += &format!("  {r}:\n    collection_interval: 30s\n    endpoint: 0.0.0.0:4317\n");
        }
        body += "processors:\n  batch:\n    send_batch_size: 8192\n    timeout: 200ms\n";
        body += "  memory_limiter:\n    check_interval: 1s\n    limit_percentage: 80\n";
        body += "  resource:\n    attributes:\n";
        body += &format!("      - key: host.name\n        value: host-{i}\n        action: upsert\n");
        body += &format!("      - key: service.instance.id\n        value: {:032x}\n", i * 7919);
        body += "exporters:\n  otlphttp:\n    endpoint: https://gateway.observability.svc:4318\n";
        body += "    compression: gzip\n    retry_on_failure:\n      enabled: true\n";
        body += "extensions:\n  health_check: {}\n  opamp:\n    server:\n      ws:\n";
        body += &format!("        endpoint: ws://127.0.0.1:{}/v1/opamp\n", 20_000 + i);
        body += &format!("    instance_uid: {:032x}\n    ppid: {}\n", i * 104_729, 1000 + i);
        body += "service:\n  extensions: [health_check, opamp]\n  telemetry:\n";
        body += "    logs:\n      level: info\n    metrics:\n      level: detailed\n";
        for p in ["traces", "metrics", "logs"] {
            body += &format!(
                "    {p}:\n      receivers: [otlp, prometheus, hostmetrics]\n      \
                 processors: [memory_limiter, resource, batch]\n      exporters: [otlphttp]\n"
            );
        }
        while body.len() < 2000 {
            body += "# the rest of the pipeline is configured by the gateway\n";
        }
        files(&[("collector.yaml", &body)])
    }

    fn files(files: &[(&str, &str)]) -> EffectiveConfig {
        let mut map = AgentConfigMap::default();
        for (name, body) in files {
            map.config_map.insert(
                (*name).into(),
                AgentConfigFile { body: body.as_bytes().to_vec().into(), content_type: "text/yaml".into() },
            );
        }
        EffectiveConfig { config_map: Some(map) }
    }

    fn keep(configs: &Configs, config: &EffectiveConfig) -> Arc<KeptConfig> {
        let kept = configs.keep(Arc::new(KeptConfig::new(config)));
        assert_eq!(kept.to_proto(), *config, "reads back as reported");
        assert_eq!(kept.encoded_len(), config.encoded_len(), "charged as reported");
        kept
    }

    fn reference(kept: &KeptConfig) -> Weak<Reference> {
        match &kept.0 {
            Form::Whole(reference) | Form::Delta { reference, .. } => Arc::downgrade(reference),
        }
    }

    #[test]
    fn configs_differing_in_a_few_values_keep_a_small_difference() {
        let configs = Configs::default();
        let kept: Vec<_> = (0..3).map(|i| keep(&configs, &collector(i))).collect();
        let len = collector(1).encoded_len();
        assert!(len > 2000, "{len}");
        assert!(!kept[0].is_delta(), "the first is kept whole, as the reference");
        for k in &kept[1..] {
            assert!(k.is_delta() && k.kept_len() < len / 4, "{k:?}");
            assert!(Weak::ptr_eq(&reference(k), &reference(&kept[0])));
        }
        assert_eq!((configs.live(), configs.live_references()), (3, 1));
    }

    #[test]
    fn equal_configs_are_one_copy() {
        let configs = Configs::default();
        let (a, b) = (keep(&configs, &collector(0)), keep(&configs, &collector(0)));
        let (c, d) = (keep(&configs, &collector(1)), keep(&configs, &collector(1)));
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&c, &d), "whole or a difference, one copy");
        assert!(c.is_delta());
        assert_eq!(configs.live(), 2);
        drop((a, b));
        assert_eq!(configs.live(), 1);
    }

    #[test]
    fn a_reference_lives_while_a_difference_uses_it_and_is_freed_with_the_last() {
        let configs = Configs::default();
        let first = keep(&configs, &collector(0));
        let (b, c) = (keep(&configs, &collector(1)), keep(&configs, &collector(2)));
        let held = reference(&first);
        drop(first);
        assert!(held.upgrade().is_some(), "outlives the agent that reported it");
        assert_eq!(configs.live(), 2);
        assert_eq!((b.to_proto(), c.to_proto()), (collector(1), collector(2)));
        // Still the reference of configs like it.
        assert!(Weak::ptr_eq(&reference(&keep(&configs, &collector(3))), &held));
        drop(b);
        assert!(held.upgrade().is_some());
        drop(c);
        assert!(held.upgrade().is_none(), "freed with the last difference made against it");
        assert_eq!((configs.live(), configs.live_references()), (0, 0));
    }

    #[test]
    fn a_config_unlike_the_reference_is_kept_whole_and_becomes_the_reference() {
        let configs = Configs::default();
        let a = keep(&configs, &collector(0));
        let other = |i: usize| {
            let body: String = (0..80).map(|n| format!("setting_{n}: {}\n", n * 31)).collect();
            files(&[("collector.yaml", &format!("{body}id: {i}\n"))])
        };
        let b = keep(&configs, &other(0));
        assert!(!b.is_delta(), "unlike the reference: kept whole");
        let c = keep(&configs, &other(1));
        assert!(c.is_delta() && Weak::ptr_eq(&reference(&c), &reference(&b)), "the new reference");
        // Configs kept against the former reference still read as they were.
        let d = keep(&configs, &collector(1));
        assert_eq!((a.to_proto(), d.to_proto()), (collector(0), collector(1)));
        // Other file names, other references.
        let e = keep(&configs, &files(&[("other.yaml", "setting_1: 31\n")]));
        assert!(!e.is_delta());
    }

    #[test]
    fn a_reference_much_larger_than_the_config_is_not_used() {
        let configs = Configs::default();
        let big = collector(0);
        let _reference = keep(&configs, &big);
        let small = files(&[("collector.yaml", "receivers:\n  otlp:\n")]);
        assert!(!keep(&configs, &small).is_delta(), "would hold a reference far larger than itself");
    }

    #[test]
    fn random_bytes_are_kept_whole_and_others_read_as_they_were_sent() {
        use rand::{RngCore, SeedableRng};
        let configs = Configs::default();
        let honest: Vec<_> = (0..3).map(|i| keep(&configs, &collector(i))).collect();
        let mut noise = vec![0; 64 << 10];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut noise);
        let mut hostile = collector(0);
        let map = &mut hostile.config_map.as_mut().unwrap().config_map;
        map.get_mut("collector.yaml").unwrap().body = noise.clone().into();
        let kept = keep(&configs, &hostile);
        assert!(!kept.is_delta(), "incompressible: kept whole");
        assert_eq!(kept.kept_len(), hostile.encoded_len(), "no more than was sent");
        // A hostile reference (kept whole: the one before is over twice its size): a config kept
        // against it still reads as sent.
        let noise = String::from_utf8_lossy(&noise[..8 << 10]);
        let reference = keep(&configs, &files(&[("collector.yaml", &noise)]));
        assert!(!reference.is_delta());
        let hostile_like = files(&[("collector.yaml", &format!("host: a\n{noise}"))]);
        assert!(keep(&configs, &hostile_like).is_delta());
        // Configs crafted from the reference (a prefix of it, its values changed, it repeated)
        // read as sent, and leave the others as they were.
        let body = |i| {
            String::from_utf8(collector(i).config_map.unwrap().config_map["collector.yaml"].body.to_vec())
        };
        let base = body(0).unwrap();
        for crafted in [base[..base.len() / 2].to_owned(), base.replace("host-0", "host-1"), base.repeat(3)] {
            keep(&configs, &files(&[("collector.yaml", &crafted)]));
        }
        for (i, k) in honest.iter().enumerate() {
            assert_eq!(k.to_proto(), collector(i), "agent {i} reads as it reported");
        }
    }

    #[test]
    fn a_collision_keeps_both_contents_apart() {
        let interner = Interner::default();
        let a = config("a: 1");
        // Forge a collision: another content under the first one's key.
        let key = interner.hasher.hash_one(a.encode_to_vec());
        let held = config("b: 2");
        interner.table.lock().entries.insert(key, Arc::downgrade(&held));
        let got = interner.share(a.clone());
        assert!(Arc::ptr_eq(&got, &a), "not mistaken for the other content");
        assert_eq!(*got, *config("a: 1"));
    }
}
