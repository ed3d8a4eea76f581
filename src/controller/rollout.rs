//! Rollouts: a new version of an AgentConfig reaches its selected agents in steps (percentages;
//! one step of 100 for Immediate rollouts), each step done when its agents applied it (or
//! failed, or missed the apply deadline) and the gates held for `minHealthySeconds`; the last
//! step holds `soakSeconds` longer. Then the rollout is complete and its revision is the last
//! healthy one.
//!
//! **Gates**, watched at every tick until the rollout completes, over the agents given the
//! version ([`Gate`]): FAILED agents (a share, or the `maxFailures` count), agents unhealthy
//! for [`UNHEALTHY_GRACE`] after applying it, agents gone for [`DISCONNECTED_GRACE`] after
//! applying it, and agents that still do not report it applied once the apply deadline of their
//! step passed. A share above its limit trips the gate: the rollout halts, or with
//! `onFailure: Rollback` (and a last healthy revision to go back to) rolls back: the plan gives
//! the agents that took this version the files of the last healthy revision. Either holds
//! until the spec changes or the `opamp.dev/retry` annotation does.
//!
//! Which agents a step admits holds across replicas: every agent has a stable rollout key
//! ([`rollout_key`]); the leader raises a threshold until a step's share of the agents it sees
//! is below it and writes the threshold into the AgentConfig's status (`rollout.admittedUpTo`),
//! where every replica's plan reads it. Only the leader runs a [`Tracker`].
use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::api::{
    AgentConfigStatus, OnFailure, Rollout, RolloutState, RolloutStatus, RolloutStrategy, TrippedGate,
};
use crate::protocol::Uid;

/// How long an agent must stay unhealthy after applying a version to count against the
/// unhealthy gate (a collector restarting on a new config reports unhealthy for a moment).
pub const UNHEALTHY_GRACE: Duration = Duration::from_secs(15);
/// How long an agent must be gone to count against the disconnected gate.
pub const DISCONNECTED_GRACE: Duration = Duration::from_secs(30);

/// An agent's place in the rollouts of one AgentConfig (`namespace/name`): the first 8 bytes
/// of SHA-256 over the key and the uid. Stable, so the first steps always go to the same agents.
pub fn rollout_key(config: &str, uid: &Uid) -> u64 {
    let digest = Sha256::new().chain_update(config.as_bytes()).chain_update(uid.0).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The threshold as written in status.
pub fn format_threshold(t: u64) -> String {
    format!("{t:016x}")
}

pub fn parse_threshold(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Complete,
    Halted(TrippedGate),
    /// The agents that took the version were sent the revision named.
    RolledBack(TrippedGate, String),
}

/// One rollout in progress (per AgentConfig, per version), on the leader.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracker {
    pub hash: [u8; 32],
    pub generation: Option<i64>,
    /// The retry annotation's value it started with.
    pub retry: Option<String>,
    /// 0-based index into the steps.
    pub step: usize,
    /// Agents whose rollout key is at most this are admitted (`None`: none yet).
    pub admitted_up_to: Option<u64>,
    /// When the current step began (the apply deadline counts from it).
    step_started: Option<Instant>,
    /// When every admitted agent was first seen done (for minHealthySeconds and the soak).
    settled_since: Option<Instant>,
    /// Since when each admitted agent (by rollout key) is seen unhealthy after applying.
    unhealthy_since: HashMap<u64, Instant>,
    pub end: Option<End>,
}

/// What the tracker needs to know of one selected agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentFacts {
    pub key: u64,
    /// Reports APPLIED for its desired config (which includes this version once admitted).
    pub applied: bool,
    pub failed: bool,
    pub healthy: bool,
    /// Already runs this version (reported before the rollout reached it, e.g. after a
    /// restart).
    pub has_version: bool,
    /// Gone for [`DISCONNECTED_GRACE`] or more.
    pub disconnected: bool,
}

/// The steps of a rollout, ending at 100.
pub fn steps(rollout: &Rollout) -> Vec<u8> {
    let mut steps: Vec<u8> = match rollout.strategy {
        RolloutStrategy::Immediate => vec![],
        RolloutStrategy::Progressive => rollout.steps.clone(),
    };
    if steps.last() != Some(&100) {
        steps.push(100);
    }
    steps
}

/// Whether `bad` of `of` is more than `percent`.
fn over(bad: usize, of: usize, percent: u8) -> bool {
    bad > 0 && bad * 100 > usize::from(percent) * of
}

impl Tracker {
    pub fn new(hash: [u8; 32], generation: Option<i64>, retry: Option<String>) -> Self {
        Self {
            hash,
            generation,
            retry,
            step: 0,
            admitted_up_to: None,
            step_started: None,
            settled_since: None,
            unhealthy_since: HashMap::new(),
            end: None,
        }
    }

    /// The rollout of `hash` as the status records it (a new leader, or a restart, resumes
    /// there); a new one when the status is of another version or retry. A halted or rolled
    /// back rollout whose spec changed since (`generation` newer than the status's) starts over.
    pub fn resume(
        hash: [u8; 32],
        display_hash: &str,
        generation: Option<i64>,
        retry: Option<String>,
        status: Option<&AgentConfigStatus>,
    ) -> Self {
        let mut t = Self::new(hash, generation, retry);
        let Some(status) = status.filter(|s| s.config_hash.as_deref() == Some(display_hash)) else {
            return t;
        };
        let Some(r) = status.rollout.as_ref().filter(|r| r.retry == t.retry) else { return t };
        let ended = matches!(r.state, RolloutState::Halted | RolloutState::RolledBack);
        if ended && status.observed_generation != generation {
            return t;
        }
        t.step = r.step.saturating_sub(1) as usize;
        t.admitted_up_to = r.admitted_up_to.as_deref().and_then(parse_threshold);
        let gate =
            || r.tripped.clone().unwrap_or(TrippedGate { gate: "Unknown".into(), message: String::new() });
        t.end = match r.state {
            RolloutState::Complete => Some(End::Complete),
            RolloutState::Halted => Some(End::Halted(gate())),
            RolloutState::RolledBack => {
                Some(End::RolledBack(gate(), r.rolled_back_to.clone().unwrap_or_default()))
            }
            RolloutState::Progressing | RolloutState::Paused => None,
        };
        t
    }

    pub fn complete(&self) -> bool {
        self.end == Some(End::Complete)
    }

    /// Halted or rolled back.
    pub fn stopped(&self) -> bool {
        matches!(self.end, Some(End::Halted(_) | End::RolledBack(..)))
    }

    /// Whether an agent with this rollout key may be given this version now.
    pub fn admits(&self, key: u64) -> bool {
        self.complete() || self.admitted_up_to.is_some_and(|t| key <= t)
    }

    fn counts(&self, a: &AgentFacts) -> bool {
        a.has_version || self.admits(a.key)
    }

    pub fn state(&self) -> RolloutState {
        match self.end {
            None => RolloutState::Progressing,
            Some(End::Complete) => RolloutState::Complete,
            Some(End::Halted(_)) => RolloutState::Halted,
            Some(End::RolledBack(..)) => RolloutState::RolledBack,
        }
    }

    /// What the status says of this rollout (`state` as the status shows it).
    pub fn status(&self, state: RolloutState) -> RolloutStatus {
        let (tripped, rolled_back_to) = match &self.end {
            Some(End::Halted(g)) => (Some(g.clone()), None),
            Some(End::RolledBack(g, to)) => (Some(g.clone()), Some(to.clone())),
            _ => (None, None),
        };
        RolloutStatus {
            step: self.step as u32 + 1,
            state,
            admitted_up_to: self.admitted_up_to.map(format_threshold),
            tripped,
            rolled_back_to,
            retry: self.retry.clone(),
        }
    }

    /// The first gate the admitted agents trip, if any.
    fn tripped(&mut self, rollout: &Rollout, admitted: &[&AgentFacts], now: Instant) -> Option<TrippedGate> {
        let gates = &rollout.gates;
        let at = format!("at step {}", self.step + 1);
        let trip = |gate: &str, message: String| Some(TrippedGate { gate: gate.into(), message });
        let failed = admitted.iter().filter(|a| a.failed).count();
        let n = admitted.len();
        let failed_trips = match rollout.max_failures {
            Some(max) => failed > max as usize,
            None => over(failed, n, gates.failed_percent()),
        };
        if failed_trips {
            let limit = match rollout.max_failures {
                Some(max) => format!("more than maxFailures {max}"),
                None => format!("more than {}%", gates.failed_percent()),
            };
            return trip("FailedRatio", format!("{at}: {failed} of {n} agents failed to apply it ({limit})"));
        }
        let applied: Vec<&&AgentFacts> = admitted.iter().filter(|a| a.applied || a.has_version).collect();
        let live: Vec<&&&AgentFacts> = applied.iter().filter(|a| !a.disconnected).collect();
        self.unhealthy_since.retain(|key, _| live.iter().any(|a| a.key == *key && !a.healthy));
        for a in live.iter().filter(|a| !a.healthy) {
            self.unhealthy_since.entry(a.key).or_insert(now);
        }
        let unhealthy = self
            .unhealthy_since
            .values()
            .filter(|since| now.duration_since(**since) >= UNHEALTHY_GRACE)
            .count();
        if over(unhealthy, live.len(), gates.unhealthy_percent()) {
            let (u, l, p) = (unhealthy, live.len(), gates.unhealthy_percent());
            return trip(
                "UnhealthyRatio",
                format!("{at}: {u} of {l} agents unhealthy after applying it (more than {p}%)"),
            );
        }
        let gone = applied.len() - live.len();
        if over(gone, applied.len(), gates.disconnected_percent()) {
            let (a, p) = (applied.len(), gates.disconnected_percent());
            return trip(
                "DisconnectedRatio",
                format!("{at}: {gone} of {a} agents disconnected after applying it (more than {p}%)"),
            );
        }
        if self.overdue(rollout, now) {
            let connected: Vec<&&AgentFacts> = admitted.iter().filter(|a| !a.disconnected).collect();
            let late = connected.iter().filter(|a| !a.applied && !a.has_version && !a.failed).count();
            if over(late, connected.len(), gates.not_applied_percent()) {
                let (c, p, d) =
                    (connected.len(), gates.not_applied_percent(), gates.apply_deadline().as_secs());
                return trip(
                    "NotAppliedRatio",
                    format!("{at}: {late} of {c} agents did not apply it within {d}s (more than {p}%)"),
                );
            }
        }
        None
    }

    fn overdue(&self, rollout: &Rollout, now: Instant) -> bool {
        self.step_started.is_some_and(|s| now.duration_since(s) >= rollout.gates.apply_deadline())
    }

    /// Advances the rollout; returns true when it changed (more agents admitted, a step
    /// taken, halted, rolled back or complete). `rollback_to` names the revision a tripped gate
    /// rolls back to, or says why there is none (then the rollout halts).
    pub fn advance(
        &mut self,
        rollout: &Rollout,
        agents: &[AgentFacts],
        now: Instant,
        rollback_to: Result<&str, &str>,
    ) -> bool {
        if self.end.is_some() {
            return false;
        }
        let admitted: Vec<&AgentFacts> = agents.iter().filter(|a| self.counts(a)).collect();
        if let Some(mut gate) = self.tripped(rollout, &admitted, now) {
            self.end = Some(match (rollout.on_failure, rollback_to) {
                (OnFailure::Rollback, Ok(to)) => End::RolledBack(gate, to.to_owned()),
                (OnFailure::Rollback, Err(why)) => {
                    gate.message.push_str(&format!("; cannot roll back: {why}"));
                    End::Halted(gate)
                }
                (OnFailure::Halt, _) => End::Halted(gate),
            });
            return true;
        }
        if rollout.paused {
            // Held where it is: nothing new admitted, no step taken (a hold starts over after).
            self.settled_since = None;
            return false;
        }
        let steps = steps(rollout);
        let started = *self.step_started.get_or_insert(now);
        if admitted.len() < target(agents.len(), steps[self.step]) {
            self.settled_since = None;
            return self.admit(agents, steps[self.step]);
        }
        // Done: every connected admitted agent applied it, failed, or is past the deadline.
        let overdue = now.duration_since(started) >= rollout.gates.apply_deadline();
        let settled =
            admitted.iter().all(|a| a.disconnected || a.applied || a.has_version || a.failed || overdue);
        if !settled {
            self.settled_since = None;
            return false;
        }
        let since = *self.settled_since.get_or_insert(now);
        let last = self.step + 1 >= steps.len();
        let mut hold = u64::from(rollout.min_healthy_seconds.unwrap_or(0));
        if last {
            hold += u64::from(rollout.soak_seconds.unwrap_or(0));
        }
        if now.duration_since(since) < Duration::from_secs(hold) {
            return false;
        }
        if last {
            self.end = Some(End::Complete);
            return true;
        }
        self.step += 1;
        self.settled_since = None;
        self.step_started = Some(now);
        self.admit(agents, steps[self.step]);
        true
    }

    /// Raises the threshold until `percent` of `agents` are admitted (all of the key space at
    /// 100: agents this replica does not see are admitted too).
    fn admit(&mut self, agents: &[AgentFacts], percent: u8) -> bool {
        let before = self.admitted_up_to;
        if percent >= 100 {
            self.admitted_up_to = Some(u64::MAX);
            return before != self.admitted_up_to;
        }
        let have = agents.iter().filter(|a| self.counts(a)).count();
        let mut waiting: Vec<u64> = agents.iter().filter(|a| !self.counts(a)).map(|a| a.key).collect();
        waiting.sort_unstable();
        let need = target(agents.len(), percent).saturating_sub(have);
        if let Some(&last) = need.checked_sub(1).and_then(|i| waiting.get(i)) {
            self.admitted_up_to = Some(self.admitted_up_to.map_or(last, |t| t.max(last)));
        }
        before != self.admitted_up_to
    }
}

/// How many of `n` agents a step of `percent` admits.
fn target(n: usize, percent: u8) -> usize {
    (n * percent as usize).div_ceil(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Result<&str, &str> = Err("no healthy revision to roll back to");

    fn agent(i: u8, applied: bool, failed: bool) -> AgentFacts {
        AgentFacts {
            key: rollout_key("ns/edge", &Uid([i; 16])),
            applied,
            failed,
            healthy: true,
            ..Default::default()
        }
    }

    fn progressive(steps: &[u8], min_healthy: u32, max_failures: u32) -> Rollout {
        Rollout {
            strategy: RolloutStrategy::Progressive,
            steps: steps.to_vec(),
            min_healthy_seconds: Some(min_healthy),
            max_failures: Some(max_failures),
            ..Default::default()
        }
    }

    fn admitted(t: &Tracker, agents: &[AgentFacts]) -> usize {
        agents.iter().filter(|a| t.admits(a.key)).count()
    }

    /// Marks the admitted agents applied.
    fn apply(t: &Tracker, agents: &mut [AgentFacts]) {
        for a in agents.iter_mut().filter(|a| t.admits(a.key)) {
            a.applied = true;
        }
    }

    #[test]
    fn steps_end_at_100() {
        assert_eq!(steps(&progressive(&[10, 50], 0, 0)), vec![10, 50, 100]);
        assert_eq!(steps(&progressive(&[25, 100], 0, 0)), vec![25, 100]);
        assert_eq!(steps(&Rollout::default()), vec![100]);
    }

    #[test]
    fn rollout_keys_are_stable_and_per_config() {
        let uid = Uid([7; 16]);
        assert_eq!(rollout_key("ns/a", &uid), rollout_key("ns/a", &uid));
        assert_ne!(rollout_key("ns/a", &uid), rollout_key("ns/b", &uid));
        assert_eq!(parse_threshold(&format_threshold(0x0123_4567_89ab_cdef)), Some(0x0123_4567_89ab_cdef));
        assert_eq!(parse_threshold("zz"), None);
    }

    #[test]
    fn steps_advance_when_admitted_agents_applied_and_stayed_healthy() {
        let r = progressive(&[25, 50], 10, 0);
        let mut t = Tracker::new([1; 32], Some(1), None);
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..8).map(|i| agent(i, false, false)).collect();
        assert!(t.advance(&r, &agents, now, NONE));
        assert_eq!(admitted(&t, &agents), 2, "25% of 8");
        assert!(!t.advance(&r, &agents, now, NONE), "not applied yet");
        apply(&t, &mut agents);
        assert!(!t.advance(&r, &agents, now, NONE), "applied, now stay healthy for 10 s");
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(5), NONE));
        assert!(t.advance(&r, &agents, now + Duration::from_secs(11), NONE));
        assert_eq!((t.step, admitted(&t, &agents)), (1, 4));
        apply(&t, &mut agents);
        let later = now + Duration::from_secs(11);
        t.advance(&r, &agents, later, NONE);
        assert!(t.advance(&r, &agents, later + Duration::from_secs(10), NONE));
        assert_eq!((t.step, admitted(&t, &agents)), (2, 8));
        assert_eq!(t.admitted_up_to, Some(u64::MAX), "the last step admits agents no replica saw yet");
        apply(&t, &mut agents);
        t.advance(&r, &agents, later + Duration::from_secs(10), NONE);
        t.advance(&r, &agents, later + Duration::from_secs(20), NONE);
        assert_eq!(t.state(), RolloutState::Complete);
        assert!(t.admits(rollout_key("ns/edge", &Uid([200; 16]))), "a complete rollout admits newcomers");
    }

    #[test]
    fn the_threshold_only_grows_and_admits_the_lowest_keys() {
        let r = progressive(&[50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(1), None);
        let agents: Vec<AgentFacts> = (0..10).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, Instant::now(), NONE);
        let mut keys: Vec<u64> = agents.iter().map(|a| a.key).collect();
        keys.sort_unstable();
        assert_eq!(t.admitted_up_to, Some(keys[4]));
        // Half the agents leave: those admitted stay admitted, no more are taken.
        let before = t.admitted_up_to;
        t.advance(&r, &agents[..5], Instant::now(), NONE);
        assert!(t.admitted_up_to >= before);
    }

    #[test]
    fn more_failures_than_allowed_halt_the_rollout() {
        let r = progressive(&[50], 0, 1);
        let mut t = Tracker::new([1; 32], Some(1), None);
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, now, NONE);
        let failing: Vec<usize> = (0..4).filter(|&i| t.admits(agents[i].key)).collect();
        agents[failing[0]].failed = true;
        t.advance(&r, &agents, now, NONE);
        assert_eq!(t.state(), RolloutState::Progressing, "one failure is allowed");
        agents[failing[1]].failed = true;
        t.advance(&r, &agents, now, NONE);
        assert_eq!(t.state(), RolloutState::Halted);
        assert!(
            !t.advance(&r, &agents, now + Duration::from_secs(60), NONE),
            "halted until the spec changes"
        );
        assert_eq!(admitted(&t, &agents), 2);
    }

    #[test]
    fn agents_that_already_run_the_version_count_as_admitted() {
        let r = progressive(&[50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(1), None);
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        agents[3].has_version = true;
        agents[3].applied = true;
        t.advance(&r, &agents, Instant::now(), NONE);
        let counted = agents.iter().filter(|a| a.has_version || t.admits(a.key)).count();
        assert_eq!(counted, 2);
    }

    #[test]
    fn a_new_leader_resumes_the_rollout_its_status_records() {
        let r = progressive(&[25, 50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(3), None);
        let agents: Vec<AgentFacts> = (0..8).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, Instant::now(), NONE);
        let status = AgentConfigStatus {
            config_hash: Some("sha256:01".into()),
            observed_generation: Some(3),
            rollout: Some(t.status(t.state())),
            ..Default::default()
        };
        let resumed = Tracker::resume([1; 32], "sha256:01", Some(3), None, Some(&status));
        assert_eq!((resumed.step, resumed.admitted_up_to), (t.step, t.admitted_up_to));
        let other = Tracker::resume([2; 32], "sha256:02", Some(4), None, Some(&status));
        assert_eq!(other, Tracker::new([2; 32], Some(4), None), "another version starts over");
        let halted = AgentConfigStatus {
            rollout: Some(RolloutStatus { state: RolloutState::Halted, ..t.status(t.state()) }),
            ..status
        };
        assert!(Tracker::resume([1; 32], "sha256:01", Some(3), None, Some(&halted)).stopped());
        assert!(
            !Tracker::resume([1; 32], "sha256:01", Some(4), None, Some(&halted)).stopped(),
            "a spec change starts over"
        );
    }

    fn gated(on_failure: OnFailure, gates: crate::api::Gates) -> Rollout {
        Rollout {
            strategy: RolloutStrategy::Progressive,
            steps: vec![50],
            on_failure,
            gates,
            min_healthy_seconds: Some(3600), // the first step holds
            ..Default::default()
        }
    }

    /// Ten agents, the first step (half) admitted and applied.
    fn first_step(r: &Rollout, now: Instant) -> (Tracker, Vec<AgentFacts>) {
        let mut t = Tracker::new([1; 32], Some(1), None);
        let mut agents: Vec<AgentFacts> = (0..10).map(|i| agent(i, false, false)).collect();
        assert!(t.advance(r, &agents, now, Ok("edge-1")));
        apply(&t, &mut agents);
        (t, agents)
    }

    fn admitted_indices(t: &Tracker, agents: &[AgentFacts]) -> Vec<usize> {
        (0..agents.len()).filter(|&i| t.admits(agents[i].key)).collect()
    }

    #[test]
    fn failed_share_above_the_gate_rolls_back_to_the_revision_given() {
        let gates = crate::api::Gates { max_failed_percent: Some(20), ..Default::default() };
        let r = gated(OnFailure::Rollback, gates);
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        let admitted = admitted_indices(&t, &agents);
        assert_eq!(admitted.len(), 5);
        agents[admitted[0]].applied = false;
        agents[admitted[0]].failed = true;
        t.advance(&r, &agents, now, Ok("edge-1"));
        assert_eq!(t.state(), RolloutState::Progressing, "1 of 5 is 20%, not more");
        agents[admitted[1]].applied = false;
        agents[admitted[1]].failed = true;
        assert!(t.advance(&r, &agents, now, Ok("edge-1")));
        assert_eq!(t.state(), RolloutState::RolledBack);
        let status = t.status(t.state());
        assert_eq!(status.rolled_back_to.as_deref(), Some("edge-1"));
        let gate = status.tripped.unwrap();
        assert_eq!(gate.gate, "FailedRatio");
        assert_eq!(gate.message, "at step 1: 2 of 5 agents failed to apply it (more than 20%)");
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(60), Ok("edge-1")), "it stays");
    }

    #[test]
    fn without_a_healthy_revision_a_rollback_halts_and_says_why() {
        let r = gated(OnFailure::Rollback, Default::default());
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        for i in admitted_indices(&t, &agents) {
            agents[i].failed = true;
        }
        assert!(t.advance(&r, &agents, now, NONE));
        assert_eq!(t.state(), RolloutState::Halted);
        assert!(
            t.status(t.state()).tripped.unwrap().message.ends_with("no healthy revision to roll back to")
        );
    }

    #[test]
    fn unhealthy_agents_count_once_unhealthy_for_the_grace() {
        let r = gated(OnFailure::Halt, Default::default());
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        let admitted = admitted_indices(&t, &agents);
        agents[admitted[0]].healthy = false;
        assert!(!t.advance(&r, &agents, now, NONE), "a collector restarting is unhealthy a moment");
        let later = now + UNHEALTHY_GRACE;
        // 1 of 5 is 20% (> 10%) once it lasted the grace.
        agents[admitted[0]].healthy = true;
        assert!(!t.advance(&r, &agents, later, NONE), "healthy again: its clock starts over");
        agents[admitted[0]].healthy = false;
        assert!(!t.advance(&r, &agents, later, NONE));
        assert!(t.advance(&r, &agents, later + UNHEALTHY_GRACE, NONE));
        let gate = t.status(t.state()).tripped.unwrap();
        assert_eq!((t.state(), gate.gate.as_str()), (RolloutState::Halted, "UnhealthyRatio"));
    }

    #[test]
    fn agents_gone_after_applying_trip_the_disconnected_gate() {
        let gates = crate::api::Gates { max_disconnected_percent: Some(40), ..Default::default() };
        let r = gated(OnFailure::Halt, gates);
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        let admitted = admitted_indices(&t, &agents);
        agents[admitted[0]].disconnected = true;
        agents[admitted[1]].disconnected = true;
        t.advance(&r, &agents, now, NONE);
        assert_eq!(t.state(), RolloutState::Progressing, "2 of 5 is 40%, not more");
        agents[admitted[2]].disconnected = true;
        assert!(t.advance(&r, &agents, now, NONE));
        assert_eq!(t.status(t.state()).tripped.unwrap().gate, "DisconnectedRatio");
        // Agents that are gone but never applied it are only pending.
        let (mut t, mut agents) = first_step(&r, now);
        for i in admitted_indices(&t, &agents) {
            agents[i].applied = false;
            agents[i].disconnected = true;
        }
        assert!(!t.advance(&r, &agents, now, NONE));
        assert_eq!(t.state(), RolloutState::Progressing);
    }

    #[test]
    fn agents_that_do_not_apply_it_by_the_deadline_trip_the_not_applied_gate() {
        let gates = crate::api::Gates { apply_deadline_seconds: Some(60), ..Default::default() };
        let r = Rollout { min_healthy_seconds: Some(0), ..gated(OnFailure::Halt, gates) };
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        let admitted = admitted_indices(&t, &agents);
        agents[admitted[0]].applied = false;
        agents[admitted[1]].applied = false;
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(59), NONE), "still in time");
        assert!(t.advance(&r, &agents, now + Duration::from_secs(60), NONE));
        let gate = t.status(t.state()).tripped.unwrap();
        assert_eq!(gate.gate, "NotAppliedRatio");
        assert_eq!(gate.message, "at step 1: 2 of 5 agents did not apply it within 60s (more than 20%)");
        // One late agent of five (20%) is tolerated: the step goes on without it at the deadline.
        let (mut t, mut agents) = first_step(&r, now);
        let first = admitted_indices(&t, &agents)[0];
        agents[first].applied = false;
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(30), NONE), "waits for it");
        assert!(t.advance(&r, &agents, now + Duration::from_secs(60), NONE));
        assert_eq!(t.step, 1, "the next step");
    }

    #[test]
    fn the_last_step_soaks_with_the_gates_watched_before_it_is_complete() {
        let r = Rollout {
            soak_seconds: Some(30),
            min_healthy_seconds: Some(0),
            ..gated(OnFailure::Halt, Default::default())
        };
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        assert!(t.advance(&r, &agents, now, NONE), "step 2 at once (minHealthySeconds 0)");
        apply(&t, &mut agents);
        let soaking = now + Duration::from_secs(1);
        assert!(!t.advance(&r, &agents, soaking, NONE));
        assert!(!t.advance(&r, &agents, soaking + Duration::from_secs(29), NONE));
        assert_eq!(t.state(), RolloutState::Progressing, "soaking");
        agents[0].healthy = false;
        agents[1].healthy = false;
        t.advance(&r, &agents, soaking + Duration::from_secs(29), NONE);
        assert!(t.advance(&r, &agents, soaking + Duration::from_secs(29) + UNHEALTHY_GRACE, NONE));
        assert_eq!(t.state(), RolloutState::Halted, "the soak caught 2 of 10 unhealthy");
        let (mut t, mut agents) = first_step(&r, now);
        t.advance(&r, &agents, now, NONE);
        apply(&t, &mut agents);
        t.advance(&r, &agents, soaking, NONE);
        assert!(t.advance(&r, &agents, soaking + Duration::from_secs(30), NONE));
        assert_eq!(t.state(), RolloutState::Complete);
    }

    #[test]
    fn a_retry_starts_a_stopped_rollout_over_and_a_new_leader_keeps_it_stopped() {
        let r = gated(OnFailure::Rollback, Default::default());
        let now = Instant::now();
        let (mut t, mut agents) = first_step(&r, now);
        for i in admitted_indices(&t, &agents) {
            agents[i].failed = true;
        }
        t.advance(&r, &agents, now, Ok("edge-1"));
        let status = AgentConfigStatus {
            config_hash: Some("sha256:01".into()),
            observed_generation: Some(1),
            rollout: Some(t.status(t.state())),
            ..Default::default()
        };
        let resumed = Tracker::resume([1; 32], "sha256:01", Some(1), None, Some(&status));
        assert_eq!(resumed.end, t.end, "a new leader keeps the rollback");
        let retried = Tracker::resume([1; 32], "sha256:01", Some(1), Some("1".into()), Some(&status));
        assert_eq!(retried, Tracker::new([1; 32], Some(1), Some("1".into())), "a retry starts over");
    }

    #[test]
    fn a_paused_rollout_admits_no_one_more_but_its_gates_still_trip() {
        let r = Rollout { paused: true, ..gated(OnFailure::Halt, Default::default()) };
        let now = Instant::now();
        let mut t = Tracker::new([1; 32], Some(1), None);
        let mut agents: Vec<AgentFacts> = (0..10).map(|i| agent(i, false, false)).collect();
        assert!(!t.advance(&r, &agents, now, NONE), "paused before its first step: nobody");
        assert_eq!(t.admitted_up_to, None);
        let r = Rollout { paused: false, min_healthy_seconds: Some(0), ..r };
        t.advance(&r, &agents, now, NONE);
        apply(&t, &mut agents);
        let paused = Rollout { paused: true, ..r.clone() };
        let before = (t.step, t.admitted_up_to);
        assert!(!t.advance(&paused, &agents, now + Duration::from_secs(60), NONE));
        assert_eq!((t.step, t.admitted_up_to), before, "held at its step");
        for i in admitted_indices(&t, &agents) {
            agents[i].failed = true;
        }
        assert!(t.advance(&paused, &agents, now + Duration::from_secs(61), NONE));
        assert_eq!(t.state(), RolloutState::Halted, "a paused rollout's gates still trip");
    }
}
