//! Status of AgentConfigs and CapabilitySlots, computed from the index and the fleet (pure
//! given its inputs), with kstatus conditions.
use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::index::{NamespaceIndex, ResolvedConfig};
use super::merge::display_hash;
use super::rollout::{AgentFacts, DISCONNECTED_GRACE, Tracker, rollout_key};
use crate::api::conditions::{self, CONFLICT, DEGRADED, Desired, PROGRESSING, READY};
use crate::api::{
    AgentConfigStatus, AgentFailure, CapabilitySlotStatus, ConnectionStatus, RestartStatus, RolloutState,
    RolloutStatus,
};
use crate::fleet::AgentView;
use crate::proto::{AgentCapabilities, ConnectionSettingsStatuses, RemoteConfigStatuses};
use crate::protocol::Uid;
use crate::protocol::session::settings_for;

pub const MAX_FAILURES: usize = 20;

#[derive(Debug, Default, Clone)]
pub(super) struct Counts {
    pub(super) selected: u32,
    pub(super) applied: u32,
    pub(super) applying: u32,
    pub(super) failed: u32,
    pub(super) pending: u32,
    pub(super) unhealthy: u32,
    pub(super) incompatible: u32,
    pub(super) updated: u32,
    pub(super) failures: Vec<(Uid, String, Bytes)>,
    pub(super) connection: ConnectionCounts,
    pub(super) restart: RestartCounts,
}

/// Each count plus the other's (saturating): how peers' counts add up.
fn add_each<const N: usize>(mine: [u32; N], theirs: [u32; N]) -> [u32; N] {
    std::array::from_fn(|i| mine[i].saturating_add(theirs[i]))
}

/// The selected agents of a resource that asks for a restart (see `RestartStatus`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct RestartCounts {
    pub(super) restarted: u32,
    pub(super) pending: u32,
    pub(super) unsupported: u32,
}

impl RestartCounts {
    /// As a peer sends them: restarted, pending, unsupported.
    pub(super) fn to_array(self) -> [u32; 3] {
        [self.restarted, self.pending, self.unsupported]
    }

    pub(super) fn add(&mut self, theirs: [u32; 3]) {
        let [restarted, pending, unsupported] = add_each(self.to_array(), theirs);
        *self = Self { restarted, pending, unsupported };
    }

    /// Counts one selected agent of a restart asked for at `at`.
    fn count(&mut self, agent: &AgentView<'_>, at: u64) {
        if !agent.report.has_capability(AgentCapabilities::AcceptsRestartCommand) {
            self.unsupported += 1;
        } else if agent.report.started_since(at) {
            self.restarted += 1;
        } else {
            self.pending += 1;
        }
    }
}

/// The agents a resource's connection settings are for (it wins for them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConnectionCounts {
    pub(super) offered: u32,
    pub(super) applied: u32,
    pub(super) failed: u32,
    pub(super) unsupported: u32,
}

impl ConnectionCounts {
    /// As a peer sends them: offered, applied, failed, unsupported.
    pub(super) fn to_array(self) -> [u32; 4] {
        [self.offered, self.applied, self.failed, self.unsupported]
    }

    pub(super) fn add(&mut self, theirs: [u32; 4]) {
        let [offered, applied, failed, unsupported] = add_each(self.to_array(), theirs);
        *self = Self { offered, applied, failed, unsupported };
    }

    /// Counts one agent the settings are for.
    fn count(&mut self, agent: &AgentView<'_>) {
        let Some(offer) = agent.desired.connection_settings.as_ref() else { return };
        if settings_for(agent.report, offer).is_none() {
            self.unsupported += 1;
            return;
        }
        self.offered += 1;
        let offered = Some(&offer.hash);
        let reported = agent.report.connection_settings_status.as_deref();
        match reported.filter(|r| Some(&r.last_connection_settings_hash) == offered) {
            Some(r) if r.status == ConnectionSettingsStatuses::Applied as i32 => self.applied += 1,
            Some(r) if r.status == ConnectionSettingsStatuses::Failed as i32 => self.failed += 1,
            _ => {}
        }
    }
}

/// Accumulates one namespace's agents, then yields each object's status.
pub struct NamespaceStatus<'a> {
    pub(super) index: &'a NamespaceIndex,
    pub(super) configs: Vec<Counts>,
    pub(super) selections: HashSet<Vec<usize>>,
    pub(super) supporting: Vec<u32>,
    /// Per progressive config: what its rollout tracker needs of each selected agent.
    pub facts: BTreeMap<usize, Vec<AgentFacts>>,
}

impl<'a> NamespaceStatus<'a> {
    pub fn new(index: &'a NamespaceIndex) -> Self {
        Self {
            index,
            configs: vec![Counts::default(); index.configs.len()],
            selections: HashSet::new(),
            supporting: vec![0; index.slots.slots.len()],
            facts: BTreeMap::new(),
        }
    }

    /// Counts one agent of the namespace.
    pub fn add(&mut self, agent: &AgentView<'_>) {
        let uid = agent.uid;
        let desc = agent.report.description.as_ref();
        let desired_hash = agent.desired.remote_config.as_ref().map(|c| &c.config_hash);
        let reported = agent.report.remote_config_status.as_ref();
        let reported_hash = reported.map(|r| &r.last_remote_config_hash);
        let mut selecting = Vec::new();
        // Every selecting resource with its files at hand (`NamespaceIndex::selecting`).
        let mut resolved = Vec::new();
        let mut update_hash = None;
        let gone = !agent.connected
            && std::time::SystemTime::now().duration_since(agent.last_seen).unwrap_or_default()
                >= DISCONNECTED_GRACE;
        for (i, config) in self.index.configs.iter().enumerate() {
            if !config.selects(desc) {
                continue;
            }
            let c = &mut self.configs[i];
            c.selected += 1;
            if agent.connected && agent.report.health.as_ref().is_some_and(|h| !h.healthy) {
                c.unhealthy += 1;
            }
            let Some(source) = config.source.as_ref() else {
                c.pending += 1;
                continue;
            };
            resolved.push(i);
            if let Some(at) = config.restart_at() {
                c.restart.count(agent, at);
            }
            // The config of every selecting resource at its update revision: what an agent runs
            // once this version reached it.
            let update = update_hash.get_or_insert_with(|| {
                self.index.update_hash(self.index.selecting(desc), agent.report.has_remote_config())
            });
            let has_version = reported_hash.is_some() && reported_hash == update.as_ref();
            let on = |hash: Option<&Bytes>, s: RemoteConfigStatuses| {
                reported.is_some_and(|r| hash == Some(&r.last_remote_config_hash) && r.status == s as i32)
            };
            if on(update.as_ref(), RemoteConfigStatuses::Applied) {
                c.updated += 1;
            }
            if let Some(missing) = config.missing(agent.report) {
                c.incompatible += 1;
                let hash = Bytes::copy_from_slice(&config.own_hash.unwrap_or_default());
                c.failures.push((uid, format!("missing components: {}", missing.join(", ")), hash));
                continue;
            }
            if config.tracking {
                self.facts.entry(i).or_default().push(AgentFacts {
                    key: rollout_key(&source.key, &uid),
                    applied: on(desired_hash, RemoteConfigStatuses::Applied),
                    failed: on(desired_hash, RemoteConfigStatuses::Failed),
                    healthy: agent.report.health.as_ref().is_none_or(|h| h.healthy),
                    has_version,
                    disconnected: gone,
                });
            }
            // Rolled back, every agent is where it should be once it runs what it is to have
            // (the agents never given the bad version keep theirs); otherwise an agent the
            // rollout has not reached waits for it.
            let gated = !config.admits(&uid) && !config.rolled_back;
            if !agent.connected || desired_hash.is_none() || gated {
                c.pending += 1;
                continue;
            }
            selecting.push(i);
            match reported.filter(|r| Some(&r.last_remote_config_hash) == desired_hash) {
                Some(r) if r.status == RemoteConfigStatuses::Applied as i32 => c.applied += 1,
                Some(r) if r.status == RemoteConfigStatuses::Failed as i32 => {
                    c.failed += 1;
                    c.failures.push((uid, r.error_message.clone(), r.last_remote_config_hash.clone()));
                }
                _ if agent.awaiting_full_state => c.pending += 1,
                _ => c.applying += 1,
            }
        }
        if selecting.len() > 1 {
            self.selections.insert(selecting);
        }
        if let Some(winner) = self.index.connection_winner(&resolved) {
            self.configs[winner].connection.count(agent);
        }
        for (i, slot) in self.index.slots.slots.iter().enumerate() {
            if agent.report.supports_custom_capability(&slot.spec.capability) {
                self.supporting[i] += 1;
            }
        }
    }

    /// The status of each AgentConfig (index order). `since` remembers when failures were
    /// first seen, keyed by (agent, hash); entries no longer failing are dropped.
    pub fn agent_configs(
        &self,
        now: &Time,
        since: &mut HashMap<(Uid, Bytes), Time>,
        rollouts: &HashMap<String, Tracker>,
    ) -> Vec<AgentConfigStatus> {
        let conflicts = self.index.conflicts(self.selections.iter());
        let mut still_failing = HashMap::new();
        let out = self
            .index
            .configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let c = &self.configs[i];
                let current = config.object.status.clone().unwrap_or_default();
                let mut failures: Vec<AgentFailure> = c
                    .failures
                    .iter()
                    .map(|(uid, message, hash)| {
                        let key = (*uid, hash.clone());
                        let t = since.get(&key).cloned().or_else(|| {
                            let uid = uid.to_string();
                            current.failures.iter().find(|f| f.instance_uid == uid).map(|f| f.since.clone())
                        });
                        let t = t.unwrap_or_else(|| now.clone());
                        still_failing.insert(key, t.clone());
                        AgentFailure { instance_uid: uid.to_string(), message: message.clone(), since: t }
                    })
                    .collect();
                failures
                    .sort_by(|a, b| b.since.cmp(&a.since).then_with(|| a.instance_uid.cmp(&b.instance_uid)));
                failures.truncate(MAX_FAILURES);
                let lost = conflicts.get(&i);
                let tracker = config
                    .source
                    .as_ref()
                    .and_then(|s| rollouts.get(&s.key))
                    .filter(|t| Some(t.hash) == config.own_hash);
                let settled = c.pending == 0 && c.applying == 0;
                let paused = config.object.spec.rollout.paused;
                let rollout = match tracker {
                    Some(t) if t.stopped() => t.status(t.state()),
                    Some(t) if paused && !t.complete() => t.status(RolloutState::Paused),
                    Some(t) if !(t.complete() && settled) => t.status(RolloutState::Progressing),
                    Some(t) => t.status(RolloutState::Complete),
                    None => RolloutStatus {
                        step: 1,
                        state: if settled { RolloutState::Complete } else { RolloutState::Progressing },
                        ..Default::default()
                    },
                };
                let update = config.update_revision.clone();
                let last_healthy = match rollout.state {
                    RolloutState::Complete => update.clone(),
                    _ => current.last_healthy_revision.clone(),
                };
                let current_revision = if c.selected == 0 || c.updated * 2 > c.selected {
                    update.clone()
                } else if let Some(to) = &rollout.rolled_back_to {
                    Some(to.clone())
                } else {
                    current.current_revision.clone().or_else(|| last_healthy.clone())
                };
                let desired = config_conditions(config.missing.as_slice(), c, lost, &rollout);
                let generation = config.object.metadata.generation;
                AgentConfigStatus {
                    observed_generation: generation,
                    config_hash: config.own_hash.map(|h| display_hash(&h)),
                    selected_agents: c.selected,
                    applied_agents: c.applied,
                    applying_agents: c.applying,
                    failed_agents: c.failed,
                    pending_agents: c.pending,
                    unhealthy_agents: c.unhealthy,
                    incompatible_agents: c.incompatible,
                    updated_agents: c.updated,
                    current_revision: config.source.as_ref().and(current_revision),
                    update_revision: update,
                    last_healthy_revision: last_healthy,
                    rollout: config.source.as_ref().map(|_| rollout),
                    connection: connection_status(config, c.connection),
                    restart: config.restart.as_ref().map(|(value, at)| RestartStatus {
                        requested_at: value.clone(),
                        message: at.as_ref().err().cloned(),
                        restarted_agents: c.restart.restarted,
                        pending_agents: c.restart.pending,
                        unsupported_agents: c.restart.unsupported,
                    }),
                    failures,
                    conditions: conditions::merge(&current.conditions, desired, generation, now),
                }
            })
            .collect();
        *since = still_failing;
        out
    }

    /// The status of each CapabilitySlot (index order), with the routes' counters.
    pub fn capability_slots(&self, now: &Time, routes: &crate::routes::Routes) -> Vec<CapabilitySlotStatus> {
        self.index
            .slots
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let current = slot.status.clone().unwrap_or_default();
                let owner = self.index.slots.conflicting.get(&slot.name_any());
                let route = routes.route(&slot.namespace().unwrap_or_default(), &slot.name_any());
                let missing: Vec<String> = route
                    .iter()
                    .flat_map(|(r, _)| {
                        let signing = r.callback.as_ref().and_then(|c| c.signing_key.as_ref());
                        let token = r.dispatch.as_ref().map(|d| &d.token);
                        signing.into_iter().chain(token).filter_map(|k| k.as_ref().err().cloned())
                    })
                    .collect();
                let refused =
                    routes.callback_refused(&slot.namespace().unwrap_or_default(), &slot.name_any());
                let desired = match owner {
                    Some(owner) => vec![
                        Desired::new(
                            CONFLICT,
                            true,
                            "CapabilityClaimed",
                            format!(
                                "capability {} is already claimed by CapabilitySlot {owner}",
                                slot.spec.capability
                            ),
                        ),
                        Desired::new(
                            READY,
                            false,
                            "CapabilityClaimed",
                            format!("CapabilitySlot {owner} owns capability {}", slot.spec.capability),
                        ),
                    ],
                    None if !missing.is_empty() => vec![
                        Desired::new(CONFLICT, false, "NoConflict", ""),
                        Desired::new(READY, false, "ReferenceNotFound", missing.join("; ")),
                    ],
                    None if refused.is_some() => vec![
                        Desired::new(CONFLICT, false, "NoConflict", ""),
                        Desired::new(READY, false, "CallbackRefused", refused.unwrap_or_default()),
                    ],
                    None => vec![
                        Desired::new(CONFLICT, false, "NoConflict", ""),
                        Desired::new(
                            READY,
                            true,
                            "Advertised",
                            format!("advertised to agents; {} declare it", self.supporting[i]),
                        ),
                    ],
                };
                let generation = slot.metadata.generation;
                let counters = route.map(|(_, c)| c);
                CapabilitySlotStatus {
                    observed_generation: generation,
                    supporting_agents: self.supporting[i],
                    upstream: counters.as_ref().map_or(current.upstream, |c| c.upstream()),
                    downstream: counters.as_ref().map_or(current.downstream, |c| c.downstream()),
                    conditions: conditions::merge(&current.conditions, desired, generation, now),
                }
            })
            .collect()
    }
}

/// The status of `spec.connection`, when it sets anything.
fn connection_status(config: &ResolvedConfig, counts: ConnectionCounts) -> Option<ConnectionStatus> {
    let offer = config.connection.as_ref()?;
    Some(ConnectionStatus {
        hash: offer.as_ref().map(|o| display_hash(&o.hash)).unwrap_or_default(),
        message: offer.as_ref().err().cloned(),
        offered_agents: counts.offered,
        applied_agents: counts.applied,
        failed_agents: counts.failed,
        unsupported_agents: counts.unsupported,
    })
}

fn config_conditions(
    missing: &[String],
    c: &Counts,
    lost: Option<&BTreeMap<String, String>>,
    rollout: &RolloutStatus,
) -> Vec<Desired> {
    let state = rollout.state;
    let progress = format!("{}/{} agents applied", c.applied, c.selected);
    let gate = rollout.tripped.as_ref().map(|g| format!("gate {} tripped {}", g.gate, g.message));
    let gate = gate.unwrap_or_else(|| "a gate tripped".to_owned());
    // The lowest uid: the same whichever replicas the agents are connected to.
    let first = |pick: &dyn Fn(&str) -> bool| {
        c.failures
            .iter()
            .filter(|f| pick(&f.1))
            .min_by_key(|f| f.0)
            .map(|(u, m, _)| format!(": {u}: {m}"))
            .unwrap_or_default()
    };
    let stopped = |reason: &'static str, msg: String| {
        vec![
            Desired::new(READY, false, reason, msg.clone()),
            Desired::new(PROGRESSING, false, reason, msg.clone()),
            Desired::new(DEGRADED, true, reason, msg),
        ]
    };
    let progressing = || match state {
        RolloutState::Progressing => Desired::new(PROGRESSING, true, "RolloutInProgress", progress.clone()),
        _ => Desired::new(PROGRESSING, false, "RolloutComplete", progress.clone()),
    };
    let mut out = if !missing.is_empty() {
        let what = missing.join("; ");
        vec![
            Desired::new(READY, false, "ReferenceNotFound", what.clone()),
            Desired::new(PROGRESSING, false, "ReferenceNotFound", what),
            Desired::new(DEGRADED, false, "ReferenceNotFound", "nothing is sent until the reference exists"),
        ]
    } else if state == RolloutState::RolledBack {
        let to = rollout.rolled_back_to.as_deref().unwrap_or_default();
        stopped(
            "RolledBack",
            format!(
                "{gate}; rolled back to {to}, {progress}; change the spec or set annotation opamp.dev/retry to \
                 try again"
            ),
        )
    } else if state == RolloutState::Halted {
        stopped(
            "RolloutHalted",
            format!(
                "{gate}; rollout halted ({} agents failed); change the spec or set annotation opamp.dev/retry \
                 to resume",
                c.failed
            ),
        )
    } else if state == RolloutState::Paused {
        let msg =
            format!("paused at step {}: {progress}; set rollout.paused to false to go on", rollout.step);
        vec![
            Desired::new(READY, false, "RolloutPaused", msg.clone()),
            Desired::new(PROGRESSING, false, "RolloutPaused", msg),
            Desired::new(DEGRADED, false, "AsExpected", ""),
        ]
    } else if c.incompatible > 0 {
        let msg = format!(
            "{} of {} agents lack collector components the files use and are not sent them{}",
            c.incompatible,
            c.selected,
            first(&|m| m.starts_with("missing components: "))
        );
        vec![
            Desired::new(READY, false, "ComponentsMissing", msg.clone()),
            progressing(),
            Desired::new(DEGRADED, true, "ComponentsMissing", msg),
        ]
    } else if c.failed > 0 {
        let msg =
            format!("{} of {} agents failed to apply the config{}", c.failed, c.selected, first(&|_| true));
        vec![
            Desired::new(READY, false, "AgentsFailed", msg.clone()),
            progressing(),
            Desired::new(DEGRADED, true, "AgentsFailed", msg),
        ]
    } else if state == RolloutState::Complete {
        let msg = if c.selected == 0 { "no agents selected".to_owned() } else { progress };
        vec![
            Desired::new(READY, true, "Applied", msg.clone()),
            Desired::new(PROGRESSING, false, "RolloutComplete", msg),
            Desired::new(DEGRADED, false, "AsExpected", ""),
        ]
    } else {
        vec![
            Desired::new(READY, false, "RolloutInProgress", progress.clone()),
            Desired::new(PROGRESSING, true, "RolloutInProgress", progress),
            Desired::new(DEGRADED, false, "AsExpected", ""),
        ]
    };
    out.push(match lost {
        Some(files) => {
            let list: Vec<String> = files.iter().map(|(f, w)| format!("{f} (set by {w})")).collect();
            Desired::new(
                CONFLICT,
                true,
                "FileConflict",
                format!("other AgentConfigs win these files: {}", list.join(", ")),
            )
        }
        None => Desired::new(CONFLICT, false, "NoConflict", ""),
    });
    out
}

/// Whether two statuses differ in anything but condition timestamps.
pub fn changed<S: PartialEq + Clone>(
    current: Option<&S>,
    new: &S,
    conditions: impl Fn(&S) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    without_conditions: impl Fn(&S) -> S,
) -> bool {
    match current {
        None => true,
        Some(cur) => {
            !conditions::same(conditions(cur), conditions(new))
                || without_conditions(cur) != without_conditions(new)
        }
    }
}
