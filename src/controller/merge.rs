//! Computing an agent's remote config from the AgentConfigs that select it (pure).
//!
//! The agent's config is the union of the files of every selecting AgentConfig of its
//! namespace. Two resources setting one file name: the higher priority wins, ties go to the
//! alphabetically first `namespace/name`. The hash is computed over the canonically ordered
//! merged file set, so an unchanged desired state hashes the same — across restarts too.
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::proto::{AgentConfigFile, AgentConfigMap, AgentRemoteConfig};

/// One file with its content resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct File {
    pub content_type: String,
    pub body: Bytes,
}

/// An AgentConfig whose files were all resolved, ready to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// `namespace/name`: the tie-breaker and how conflicts name the winner.
    pub key: String,
    pub priority: i32,
    pub files: Arc<BTreeMap<String, File>>,
}

/// The merged config of one agent and, per file, which source won and which lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub files: BTreeMap<String, (usize, File)>,
    /// (loser source index, file name, winner source index)
    pub conflicts: Vec<(usize, String, usize)>,
}

/// Merges `sources` (the AgentConfigs selecting one agent). Indices refer to `sources`.
pub fn merge(sources: &[&Source]) -> Merged {
    let mut order: Vec<usize> = (0..sources.len()).collect();
    // Winners first: higher priority, then the alphabetically first key.
    order.sort_by(|&a, &b| {
        sources[b].priority.cmp(&sources[a].priority).then(sources[a].key.cmp(&sources[b].key))
    });
    let mut files: BTreeMap<String, (usize, File)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for i in order {
        for (name, file) in sources[i].files.iter() {
            match files.get(name) {
                Some((winner, _)) => conflicts.push((i, name.clone(), *winner)),
                None => {
                    files.insert(name.clone(), (i, file.clone()));
                }
            }
        }
    }
    Merged { files, conflicts }
}

/// The canonical hash of a file set: sha256 over length-prefixed names, content types and
/// bodies in name order.
pub fn hash_files<'a>(files: impl IntoIterator<Item = (&'a String, &'a File)>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (name, f) in files {
        for part in [name.as_bytes(), f.content_type.as_bytes(), &f.body[..]] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    h.finalize().into()
}

/// The OpAMP remote config of a merged file set.
pub fn remote_config(merged: &Merged) -> AgentRemoteConfig {
    let hash = hash_files(merged.files.iter().map(|(n, (_, f))| (n, f)));
    let config_map = merged
        .files
        .iter()
        .map(|(name, (_, f))| {
            (name.clone(), AgentConfigFile { body: f.body.clone(), content_type: f.content_type.clone() })
        })
        .collect();
    AgentRemoteConfig {
        config: Some(AgentConfigMap { config_map }),
        config_hash: Bytes::copy_from_slice(&hash),
    }
}

/// `sha256:<hex>` as shown in status.
pub fn display_hash(hash: &[u8]) -> String {
    format!("sha256:{}", hex::encode(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(key: &str, priority: i32, files: &[(&str, &str)]) -> Source {
        Source {
            key: key.into(),
            priority,
            files: Arc::new(
                files
                    .iter()
                    .map(|(n, b)| {
                        (
                            n.to_string(),
                            File { content_type: "text/yaml".into(), body: Bytes::from(b.to_string()) },
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn bodies(m: &Merged) -> Vec<(String, String, usize)> {
        m.files
            .iter()
            .map(|(n, (i, f))| (n.clone(), String::from_utf8(f.body.to_vec()).unwrap(), *i))
            .collect()
    }

    #[test]
    fn disjoint_files_are_unioned() {
        let a = source("ns/a", 0, &[("a.yaml", "1")]);
        let b = source("ns/b", 0, &[("b.yaml", "2")]);
        let m = merge(&[&a, &b]);
        assert_eq!(bodies(&m), vec![("a.yaml".into(), "1".into(), 0), ("b.yaml".into(), "2".into(), 1)]);
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn higher_priority_wins_a_file_and_the_loser_is_recorded() {
        let low = source("ns/a", 0, &[("c.yaml", "low")]);
        let high = source("ns/z", 5, &[("c.yaml", "high")]);
        let m = merge(&[&low, &high]);
        assert_eq!(bodies(&m), vec![("c.yaml".into(), "high".into(), 1)]);
        assert_eq!(m.conflicts, vec![(0, "c.yaml".to_string(), 1)]);
    }

    #[test]
    fn ties_go_to_the_alphabetically_first_name() {
        let b = source("ns/b", 1, &[("c.yaml", "b")]);
        let a = source("ns/a", 1, &[("c.yaml", "a")]);
        let m = merge(&[&b, &a]);
        assert_eq!(bodies(&m), vec![("c.yaml".into(), "a".into(), 1)]);
        assert_eq!(m.conflicts, vec![(0, "c.yaml".to_string(), 1)]);
    }

    #[test]
    fn the_hash_is_canonical_and_sensitive_to_every_part() {
        let a = source("ns/a", 0, &[("x", "1"), ("y", "2")]);
        let b = source("ns/b", 0, &[("y", "2"), ("x", "1")]);
        assert_eq!(remote_config(&merge(&[&a])).config_hash, remote_config(&merge(&[&b])).config_hash);
        let changed = source("ns/a", 0, &[("x", "1"), ("y", "3")]);
        assert_ne!(remote_config(&merge(&[&a])).config_hash, remote_config(&merge(&[&changed])).config_hash);
        // Moving bytes between name and body changes the hash (length prefixes).
        let s1 = source("n", 0, &[("ab", "c")]);
        let s2 = source("n", 0, &[("a", "bc")]);
        assert_ne!(remote_config(&merge(&[&s1])).config_hash, remote_config(&merge(&[&s2])).config_hash);
        assert_eq!(remote_config(&merge(&[&a])).config_hash.len(), 32);
    }
}
