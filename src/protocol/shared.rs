//! Reported parts that many agents share, held once.
//!
//! A fleet runs few builds and few configs: thousands of agents report the same effective
//! config and the same list of available components, each several kilobytes. An [`Interner`]
//! maps such a part's content to the one copy in memory; an agent's report holds an `Arc` of
//! it, and the copy is freed with the last agent that holds it. Parts are told apart by their
//! content (a keyed hash of their encoding, then a full comparison), never by a hash the agent
//! claims, so one agent cannot make another's report read differently.
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
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

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            table: Mutex::new(Table { entries: HashMap::new(), sweep_at: MIN_SWEEP }),
        }
    }
}

impl<T: Message + PartialEq> Interner<T> {
    /// The copy of `value`'s content already held, if any; else `value`, now held for others.
    /// Content whose key collides with another's is returned as is (kept, not shared).
    pub fn share(&self, value: Arc<T>) -> Arc<T> {
        let key = self.hasher.hash_one(value.encode_to_vec());
        let mut table = self.table.lock();
        if let Some(held) = table.entries.get(&key).and_then(Weak::upgrade) {
            return if *held == *value { held } else { value };
        }
        table.entries.insert(key, Arc::downgrade(&value));
        if table.entries.len() >= table.sweep_at {
            table.entries.retain(|_, held| held.strong_count() > 0);
            table.sweep_at = (table.entries.len() * 2).max(MIN_SWEEP);
        }
        value
    }

    /// Distinct contents someone still holds.
    pub fn live(&self) -> usize {
        self.table.lock().entries.values().filter(|held| held.strong_count() > 0).count()
    }
}

/// The interners of the report parts worth sharing.
#[derive(Default)]
pub struct SharedParts {
    pub effective_config: Interner<EffectiveConfig>,
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
