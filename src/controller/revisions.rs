//! Revisions: each distinct resolved set of files of an AgentConfig is a `ControllerRevision`
//! (`apps/v1`) named `<agentconfig>-<first 10 hex digits of the files' hash>`, owned by the
//! AgentConfig (so it goes with it), as Deployments and StatefulSets keep theirs. `revision`
//! numbers them in the order they were last asked for: a spec going back to older files reuses
//! that revision and gives it the next number.
//!
//! What a revision holds (`data`): each file's content type and content, as the rollout sent
//! it, except files from Secrets: of those only the reference and the SHA-256 of the content
//! (a ControllerRevision is readable by anyone who may view the namespace). A rollback to a
//! revision therefore restores a Secret's file only while the Secret still holds that content;
//! otherwise the rollback cannot be made and the rollout halts instead, saying so.
//!
//! Every replica reads revisions (a watch of the ones labelled
//! `app.kubernetes.io/managed-by=opamp-operator`) to plan a rollback; the leader alone writes
//! them ([`Writer`]): it creates the revision of each AgentConfig's current files, renumbers
//! one a spec went back to, and deletes the oldest beyond `spec.revisionHistoryLimit` (never the
//! current, updating or last healthy one), each call under a deadline, off the control loop.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::FIELD_MANAGER;
use super::error::{Error, Errors};
use super::merge::{File, display_hash, hash_files};
use super::refs::{Key, Kind, Refs};
use crate::api::{AgentConfig, ConfigFile, KeyRef, REVISION_HISTORY_LIMIT_DEFAULT};

/// The label every revision of ours carries (what the watch selects).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "opamp-operator");
/// The label naming the AgentConfig (set when the name is a valid label value).
pub const CONFIG_LABEL: &str = "opamp.dev/agent-config";
/// The annotation holding the revision's files hash (`sha256:…`).
pub const HASH_ANNOTATION: &str = "opamp.dev/config-hash";
/// How long one revision write may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long before a write whose result the watch has not shown yet is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(15);
/// Revision writes waiting at most (beyond: tried again at a later pass).
const QUEUE: usize = 256;

/// The revision name of an AgentConfig's files.
pub fn name(config: &str, hash: &[u8; 32]) -> String {
    let prefix: String = config.chars().take(242).collect();
    format!("{}-{}", prefix.trim_end_matches(['-', '.']), &hex::encode(hash)[..10])
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    files: BTreeMap<String, Stored>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    #[serde(default)]
    content_type: String,
    /// The content, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    /// The content, base64, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_base64: Option<String>,
    /// A file from a Secret: where it came from, and the SHA-256 (hex) of its content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_key_ref: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

/// The `data` of the revision of `files` (resolved from `spec`).
pub fn data(spec: &BTreeMap<String, ConfigFile>, files: &BTreeMap<String, File>) -> serde_json::Value {
    use base64::Engine;
    let files = files
        .iter()
        .map(|(name, f)| {
            let secret = spec.get(name).and_then(|s| s.secret_key_ref.clone());
            let mut stored = Stored {
                content_type: f.content_type.clone(),
                content: None,
                content_base64: None,
                secret_key_ref: None,
                sha256: None,
            };
            match secret {
                Some(r) => {
                    stored.secret_key_ref = Some(r);
                    stored.sha256 = Some(hex::encode(Sha256::digest(&f.body)));
                }
                None => match std::str::from_utf8(&f.body) {
                    Ok(s) => stored.content = Some(s.to_owned()),
                    Err(_) => {
                        stored.content_base64 =
                            Some(base64::engine::general_purpose::STANDARD.encode(&f.body))
                    }
                },
            }
            (name.clone(), stored)
        })
        .collect();
    serde_json::to_value(Data { files }).expect("revision data serializes")
}

/// The revision of `config` named `name`, among a namespace's revisions.
pub fn find<'a>(
    revisions: &'a [Arc<ControllerRevision>],
    config: &AgentConfig,
    name: &str,
) -> Option<&'a ControllerRevision> {
    let owner = config.metadata.uid.as_deref();
    revisions.iter().map(|r| &**r).find(|r| {
        r.metadata.name.as_deref() == Some(name)
            && owner.is_some()
            && r.owner_references().iter().any(|o| Some(o.uid.as_str()) == owner)
    })
}

/// The files of a revision, Secrets' read now from `refs`; an error says why they cannot be
/// had as the revision recorded them.
pub fn files(
    revision: &ControllerRevision,
    namespace: &str,
    refs: &Refs,
) -> Result<BTreeMap<String, File>, String> {
    use base64::Engine;
    let name = revision.name_any();
    let data: Data =
        revision.data.as_ref().ok_or_else(|| format!("revision {name} holds no data")).and_then(|d| {
            serde_json::from_value(d.0.clone()).map_err(|e| format!("revision {name} does not read: {e}"))
        })?;
    let mut files = BTreeMap::new();
    for (file, stored) in data.files {
        let body = match (stored.content, stored.content_base64, stored.secret_key_ref, stored.sha256) {
            (Some(s), _, None, _) => Bytes::from(s),
            (None, Some(b), None, _) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("revision {name}: file {file}: {e}"))?,
            ),
            (_, _, Some(r), Some(sha)) => {
                let value = refs.value(&Key::new(Kind::Secret, namespace, &r.name), &r.key).flatten();
                match value {
                    Some(v) if hex::encode(Sha256::digest(&v)) == sha => v,
                    Some(_) => {
                        return Err(format!(
                            "file {file} of revision {name} came from Secret {} key {}, which holds \
                             other content now (revisions keep no Secret content)",
                            r.name, r.key
                        ));
                    }
                    None => {
                        return Err(format!(
                            "file {file} of revision {name} came from Secret {} key {}, which is not \
                             read now (revisions keep no Secret content)",
                            r.name, r.key
                        ));
                    }
                }
            }
            _ => return Err(format!("revision {name}: file {file} has no content")),
        };
        files.insert(file, File { content_type: stored.content_type, body });
    }
    let recorded = revision.annotations().get(HASH_ANNOTATION);
    let hash = hash_files(files.iter());
    if recorded != Some(&display_hash(&hash)) {
        return Err(format!("revision {name} does not hold the files its hash says"));
    }
    // Someone allowed to write ControllerRevisions could create one under the name the operator
    // gives another file set (a consistent hash annotation is easy to forge); the name carries
    // the files' hash, so such a revision does not read.
    if !name.ends_with(&format!("-{}", &hex::encode(hash)[..10])) {
        return Err(format!("revision {name} is not named after the files it holds"));
    }
    Ok(files)
}

/// A write to make.
#[derive(Debug)]
enum Job {
    Create(Box<ControllerRevision>),
    Renumber { namespace: String, name: String, revision: i64 },
    Delete { namespace: String, name: String },
}

impl Job {
    fn key(&self) -> String {
        match self {
            Job::Create(r) => format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any()),
            Job::Renumber { namespace, name, .. } | Job::Delete { namespace, name } => {
                format!("{namespace}/{name}")
            }
        }
    }
}

/// The leader's revision writes: decides them from what the watch shows and runs them in a task
/// of their own.
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Writes sent and when, by `namespace/name`: not sent again before [`RETRY_AFTER`].
    sent: HashMap<String, Instant>,
}

/// What one AgentConfig's revisions should be.
pub struct Wanted<'a> {
    pub config: &'a AgentConfig,
    /// The revision name and files the spec asks for now.
    pub update: (String, [u8; 32], &'a BTreeMap<String, File>),
    /// Revisions never to delete (current, last healthy, rolled back to).
    pub keep: Vec<String>,
}

impl Writer {
    /// Starts the task that makes the writes; it ends when the writer is dropped.
    pub fn start(client: Client, errors: Errors) -> Self {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let what = job.key();
                let result = tokio::time::timeout(WRITE_TIMEOUT, run(&client, job)).await;
                let failure = match result {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {WRITE_TIMEOUT:?}"),
                };
                errors.count(&Error::Revision { revision: what, reason: failure });
            }
        });
        Self { jobs, sent: HashMap::new() }
    }

    /// Makes the writes that bring `wanted`'s revisions, as `revisions` (the namespace's, as
    /// watched) show them, to what they should be.
    pub fn reconcile(&mut self, wanted: &Wanted<'_>, revisions: &[Arc<ControllerRevision>]) {
        let config = wanted.config;
        let Some(uid) = config.metadata.uid.clone() else { return };
        let namespace = config.namespace().unwrap_or_default();
        let mut own: Vec<&ControllerRevision> = revisions
            .iter()
            .map(|r| &**r)
            .filter(|r| r.owner_references().iter().any(|o| o.uid == uid))
            .collect();
        own.sort_by_key(|r| (r.revision, r.name_any()));
        let newest = own.last().map_or(0, |r| r.revision);
        let (update, hash, files) = &wanted.update;
        match own.iter().find(|r| &r.name_any() == update) {
            None => {
                let revision = ControllerRevision {
                    metadata: ObjectMeta {
                        name: Some(update.clone()),
                        namespace: Some(namespace.clone()),
                        labels: Some(labels(&config.name_any())),
                        annotations: Some([(HASH_ANNOTATION.to_owned(), display_hash(hash))].into()),
                        owner_references: Some(vec![owner(config, uid.clone())]),
                        ..Default::default()
                    },
                    data: Some(RawExtension(data(&config.spec.files, files))),
                    revision: newest + 1,
                };
                self.send(Job::Create(Box::new(revision)));
            }
            Some(r) if r.revision < newest => {
                let name = r.name_any();
                self.send(Job::Renumber { namespace: namespace.clone(), name, revision: newest + 1 });
            }
            Some(_) => {}
        }
        let limit = config.spec.revision_history_limit.unwrap_or(REVISION_HISTORY_LIMIT_DEFAULT) as usize;
        let keep: HashSet<&str> =
            wanted.keep.iter().map(String::as_str).chain(std::iter::once(update.as_str())).collect();
        let excess = own.len().saturating_sub(limit);
        for r in own.iter().filter(|r| !keep.contains(r.name_any().as_str())).take(excess) {
            self.send(Job::Delete { namespace: namespace.clone(), name: r.name_any() });
        }
    }

    fn send(&mut self, job: Job) {
        let key = job.key();
        let now = Instant::now();
        if self.sent.get(&key).is_some_and(|at| now.duration_since(*at) < RETRY_AFTER) {
            return;
        }
        self.sent.retain(|_, at| now.duration_since(*at) < RETRY_AFTER);
        if self.jobs.try_send(job).is_ok() {
            self.sent.insert(key, now);
        }
    }
}

fn labels(config: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into();
    let valid = config.len() <= 63
        && config.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && config.starts_with(|c: char| c.is_ascii_alphanumeric())
        && config.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        labels.insert(CONFIG_LABEL.to_owned(), config.to_owned());
    }
    labels
}

fn owner(config: &AgentConfig, uid: String) -> OwnerReference {
    OwnerReference {
        api_version: AgentConfig::api_version(&()).into_owned(),
        kind: AgentConfig::kind(&()).into_owned(),
        name: config.name_any(),
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    }
}

async fn run(client: &Client, job: Job) -> Result<(), kube::Error> {
    match job {
        Job::Create(revision) => {
            let api: Api<ControllerRevision> =
                Api::namespaced(client.clone(), &revision.namespace().unwrap_or_default());
            match api
                .create(
                    &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                    &revision,
                )
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()), // made meanwhile
                other => other.map(drop),
            }
        }
        Job::Renumber { namespace, name, revision } => {
            let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
            let patch = serde_json::json!({ "revision": revision });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.map(drop)
        }
        Job::Delete { namespace, name } => {
            let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
            match api.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                other => other.map(drop),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `refs` holding `value` at `key` of Secret `creds`.
    fn hold(refs: &Refs, key: &str, value: &'static [u8]) {
        let object = Key::new(Kind::Secret, "team-a", "creds");
        refs.want("team-a", [object.clone()].into(), |_| Some("1".into()));
        let content = super::super::refs::Content {
            resource_version: "1".into(),
            values: [(key.to_owned(), Bytes::from_static(value))].into(),
        };
        refs.answered(&(object, 0), Ok(Some(content)));
    }

    fn config() -> AgentConfig {
        let mut c: AgentConfig = serde_yaml::from_str(
            "
apiVersion: opamp.dev/v1alpha1
kind: AgentConfig
metadata: {name: edge, namespace: team-a, uid: u-1}
spec:
  files:
    a.yaml: {inline: 'x: 1'}
    token: {secretKeyRef: {name: creds, key: token}}
",
        )
        .unwrap();
        c.metadata.generation = Some(1);
        c
    }

    fn resolved() -> BTreeMap<String, File> {
        [
            ("a.yaml".to_owned(), File { content_type: String::new(), body: Bytes::from_static(b"x: 1") }),
            ("token".to_owned(), File { content_type: String::new(), body: Bytes::from_static(b"s3cret") }),
        ]
        .into()
    }

    fn revision(files: &BTreeMap<String, File>) -> ControllerRevision {
        let config = config();
        let hash = hash_files(files.iter());
        ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name("edge", &hash)),
                annotations: Some([(HASH_ANNOTATION.to_owned(), display_hash(&hash))].into()),
                owner_references: Some(vec![owner(&config, "u-1".into())]),
                ..Default::default()
            },
            data: Some(RawExtension(data(&config.spec.files, files))),
            revision: 1,
        }
    }

    #[test]
    fn a_revision_keeps_no_secret_content_and_restores_it_only_while_the_secret_holds_it() {
        let files = resolved();
        let rev = revision(&files);
        let json = serde_json::to_string(&rev.data).unwrap();
        assert!(json.contains("x: 1"));
        assert!(!json.contains("s3cret"), "{json}");
        let (refs, _) = Refs::new();
        let err = super::files(&rev, "team-a", &refs).unwrap_err();
        assert!(err.contains("Secret creds key token, which is not read now"), "{err}");
        hold(&refs, "token", b"s3cret");
        assert_eq!(super::files(&rev, "team-a", &refs).unwrap(), files);
        hold(&refs, "token", b"rotated");
        let err = super::files(&rev, "team-a", &refs).unwrap_err();
        assert!(err.contains("holds other content now"), "{err}");
    }

    #[test]
    fn names_are_short_enough_and_a_revision_is_found_by_its_owner() {
        let hash = [0xab; 32];
        assert_eq!(name("edge", &hash), "edge-ababababab");
        assert!(name(&"x".repeat(253), &hash).len() <= 253);
        let rev = Arc::new(revision(&resolved()));
        let n = rev.name_any();
        let config = config();
        assert!(find(std::slice::from_ref(&rev), &config, &n).is_some());
        let mut other = config.clone();
        other.metadata.uid = Some("u-2".into());
        assert!(find(&[rev], &other, &n).is_none(), "another object's revision of the same name");
    }

    #[test]
    fn a_tampered_revision_does_not_read() {
        let mut files = resolved();
        files.remove("token");
        let mut rev = revision(&files);
        rev.data = Some(RawExtension(serde_json::json!({"files": {"a.yaml": {"content": "x: 2"}}})));
        let (refs, _) = Refs::new();
        assert!(super::files(&rev, "team-a", &refs).unwrap_err().contains("does not hold the files"));
    }

    #[test]
    fn a_revision_forged_under_the_name_of_other_files_does_not_read() {
        let mut files = resolved();
        files.remove("token");
        let mut forged = files.clone();
        forged.insert(
            "a.yaml".into(),
            File { content_type: String::new(), body: Bytes::from_static(b"evil: 1") },
        );
        let hash = hash_files(forged.iter());
        // Data and hash annotation agree with each other, the name is the real files'.
        let mut rev = revision(&forged);
        rev.metadata.name = Some(name("edge", &hash_files(files.iter())));
        rev.metadata.annotations = Some([(HASH_ANNOTATION.to_owned(), display_hash(&hash))].into());
        let (refs, _) = Refs::new();
        let err = super::files(&rev, "team-a", &refs).unwrap_err();
        assert!(err.contains("not named after the files it holds"), "{err}");
        assert!(super::files(&revision(&files), "team-a", &refs).is_ok());
    }

    /// A writer whose jobs land in the returned receiver.
    fn writer() -> (Writer, mpsc::Receiver<Job>) {
        let (jobs, rx) = mpsc::channel(QUEUE);
        (Writer { jobs, sent: HashMap::new() }, rx)
    }

    fn stored(name: &str, revision: i64) -> Arc<ControllerRevision> {
        let config = config();
        Arc::new(ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team-a".into()),
                owner_references: Some(vec![owner(&config, "u-1".into())]),
                ..Default::default()
            },
            data: None,
            revision,
        })
    }

    fn drain(rx: &mut mpsc::Receiver<Job>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|job| match job {
                Job::Create(r) => format!("create {} #{}", r.name_any(), r.revision),
                Job::Renumber { name, revision, .. } => format!("renumber {name} #{revision}"),
                Job::Delete { name, .. } => format!("delete {name}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn the_leader_creates_renumbers_and_prunes_revisions_keeping_the_ones_status_names() {
        let mut config = config();
        config.spec.revision_history_limit = Some(2);
        let files = resolved();
        let hash = hash_files(files.iter());
        let update = name("edge", &hash);
        let wanted =
            |keep: Vec<String>| Wanted { config: &config, update: (update.clone(), hash, &files), keep };
        let (mut w, mut rx) = writer();
        // None yet: the update revision is created, numbered 1; asked again at once, not again.
        w.reconcile(&wanted(vec![]), &[]);
        w.reconcile(&wanted(vec![]), &[]);
        assert_eq!(drain(&mut rx), [format!("create {update} #1")]);
        // A spec back to older files: that revision is renumbered after the newest.
        let (mut w, mut rx) = writer();
        let held = [stored(&update, 1), stored("edge-b", 2), stored("edge-c", 3)];
        w.reconcile(&wanted(vec!["edge-c".into()]), &held);
        // Three held, two kept: the oldest the status does not name goes (edge-b; the update
        // revision and edge-c are kept).
        assert_eq!(drain(&mut rx), [format!("renumber {update} #4"), "delete edge-b".to_owned()]);
        // Another AgentConfig's revisions are not ours to count or prune.
        let (mut w, mut rx) = writer();
        let mut foreign = (*stored("other-a", 1)).clone();
        foreign.metadata.owner_references = Some(vec![owner(&config, "u-2".into())]);
        w.reconcile(&wanted(vec![]), &[stored(&update, 1), Arc::new(foreign)]);
        assert!(drain(&mut rx).is_empty());
    }
}
