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
//! reference costs a few bytes, and mostly its own values are kept. Equal configs are still one
//! `Arc`, as in an [`Interner`].
//!
//! The reference of a config is the last one kept whole with the same file names and content
//! types, so the choice depends on nothing an agent can aim at another's config: a difference is
//! kept only when it takes at most half of the config's encoding, else the config is kept whole
//! and becomes the reference for its file names. Reading a config decodes its difference against
//! the reference it was made with, which every difference holds (an `Arc`), and a difference is
//! checked to decode to the config's exact encoding before it is kept: a config reads as exactly
//! what its agent sent, whatever others send. Memory stays bounded by what agents send: a
//! reference lives while a config kept against it does, which costs at most one copy per
//! reference beyond the configs agents hold (live references: at most one per file-name set in
//! use, plus the superseded ones that differences still hold), and a difference is only made
//! against a reference at most twice the size of the config, so what a config kept as a
//! difference keeps alive (its difference, at most half its size, and its reference) is at most
//! 2.5 times what its agent is charged for: reports are charged by their decoded size
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
pub struct Interner<T> {
    /// Keyed per process (SipHash with a random key): content cannot be crafted to collide.
    hasher: RandomState,
    table: Mutex<Table<T>>,
}

struct Table<T> {
    entries: HashMap<u64, Weak<T>>,
    /// When `entries` reaches this length, entries whose part no agent holds are removed.
    sweep_at: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self { entries: HashMap::new(), sweep_at: MIN_SWEEP }
    }
}

impl<T> Table<T> {
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

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self { hasher: RandomState::new(), table: Mutex::new(Table::default()) }
    }
}

impl<T> Interner<T> {
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
    /// The reference of each set of file names and content types, by a keyed hash of the set.
    references: Mutex<Table<Reference>>,
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
        let kept = match self.against_reference(files, &encoding) {
            Some(delta) => Arc::new(delta),
            None => {
                // Kept whole, it becomes the reference for its file names.
                let whole = match &config.0 {
                    Form::Whole(_) => config.clone(),
                    Form::Delta { .. } => Arc::new(KeptConfig::whole(encoding.to_vec())),
                };
                if let Form::Whole(reference) = &whole.0 {
                    self.references.lock().put(files, reference);
                }
                whole
            }
        };
        self.configs.share_by(key, kept, |held| held.encodes(&encoding))
    }

    /// `encoding` as its difference against the reference for `files`, if there is one, no
    /// more than twice as large, and the difference takes at most half of `encoding`.
    fn against_reference(&self, files: u64, encoding: &[u8]) -> Option<KeptConfig> {
        let reference = self.references.lock().get(files)?;
        if reference.encoding.len() > encoding.len().saturating_mul(2) {
            return None;
        }
        let len = u32::try_from(encoding.len()).ok()?;
        let delta = lz4_flex::block::compress_with_dict(encoding, &reference.encoding);
        if delta.len() > encoding.len() / 2 {
            return None;
        }
        // Kept only if it reads back as exactly what the agent sent.
        if decompress(&delta, encoding.len(), &reference.encoding).as_deref() != Some(encoding) {
            return None;
        }
        Some(KeptConfig(Form::Delta { reference, delta: delta.into_boxed_slice(), len }))
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

    /// References someone still holds (a config kept whole, or one kept against it).
    pub fn live_references(&self) -> usize {
        self.references.lock().live()
    }
}

/// The report parts worth sharing.
#[derive(Default)]
pub struct SharedParts {
    pub effective_config: Configs,
    pub available_components: Interner<AvailableComponents>,
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
