//! Progressive rollouts: a new version of an AgentConfig reaches its selected agents in steps
//! (percentages), each step done when its agents applied it and stayed healthy for
//! `minHealthySeconds`; more than `maxFailures` failed agents halt it until the spec changes.
//!
//! Which agents a step admits holds across replicas: every agent has a stable rollout key
//! ([`rollout_key`]); the leader raises a threshold until a step's share of the agents it sees
//! is below it and writes the threshold into the AgentConfig's status (`rollout.admittedUpTo`),
//! where every replica's plan reads it. Only the leader runs a [`Tracker`].
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::api::{AgentConfigStatus, Rollout, RolloutState, RolloutStatus, RolloutStrategy};
use crate::protocol::Uid;

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

/// One rollout in progress (per AgentConfig, per version), on the leader.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracker {
    pub hash: [u8; 32],
    pub generation: Option<i64>,
    /// 0-based index into the steps.
    pub step: usize,
    /// Agents whose rollout key is at most this are admitted (`None`: none yet).
    pub admitted_up_to: Option<u64>,
    /// When every admitted agent was first seen applied and healthy (for minHealthySeconds).
    pub settled_since: Option<Instant>,
    pub halted: bool,
    pub complete: bool,
}

/// What the tracker needs to know of one selected agent.
#[derive(Debug, Clone, Copy)]
pub struct AgentFacts {
    pub key: u64,
    /// Reports APPLIED for its desired config (which includes this version once admitted).
    pub applied: bool,
    pub failed: bool,
    pub healthy: bool,
    /// Already runs this version (reported before the rollout reached it, e.g. after a
    /// restart).
    pub has_version: bool,
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

impl Tracker {
    pub fn new(hash: [u8; 32], generation: Option<i64>) -> Self {
        Self {
            hash,
            generation,
            step: 0,
            admitted_up_to: None,
            settled_since: None,
            halted: false,
            complete: false,
        }
    }

    /// The rollout of `hash` as the status records it (a new leader, or a restart, resumes
    /// there); a new one when the status is of another version. A halted rollout whose spec
    /// changed since (`generation` newer than the status's) resumes.
    pub fn resume(
        hash: [u8; 32],
        display_hash: &str,
        generation: Option<i64>,
        status: Option<&AgentConfigStatus>,
    ) -> Self {
        let mut t = Self::new(hash, generation);
        let Some(status) = status.filter(|s| s.config_hash.as_deref() == Some(display_hash)) else {
            return t;
        };
        if let Some(r) = &status.rollout {
            t.step = r.step.saturating_sub(1) as usize;
            t.admitted_up_to = r.admitted_up_to.as_deref().and_then(parse_threshold);
            t.complete = r.state == RolloutState::Complete;
            t.halted = r.state == RolloutState::Halted && status.observed_generation == generation;
        }
        t
    }

    /// Whether an agent with this rollout key may be given this version now.
    pub fn admits(&self, key: u64) -> bool {
        self.complete || self.admitted_up_to.is_some_and(|t| key <= t)
    }

    fn counts(&self, a: &AgentFacts) -> bool {
        a.has_version || self.admits(a.key)
    }

    pub fn state(&self) -> RolloutState {
        if self.halted {
            RolloutState::Halted
        } else if self.complete {
            RolloutState::Complete
        } else {
            RolloutState::Progressing
        }
    }

    /// What the status says of this rollout (`state` as the status shows it).
    pub fn status(&self, state: RolloutState) -> RolloutStatus {
        RolloutStatus {
            step: self.step as u32 + 1,
            state,
            admitted_up_to: self.admitted_up_to.map(format_threshold),
        }
    }

    /// Advances the rollout; returns true when it changed (more agents admitted, a step
    /// taken, halted or complete).
    pub fn advance(&mut self, rollout: &Rollout, agents: &[AgentFacts], now: Instant) -> bool {
        if self.halted || self.complete {
            return false;
        }
        let admitted: Vec<&AgentFacts> = agents.iter().filter(|a| self.counts(a)).collect();
        let failed = admitted.iter().filter(|a| a.failed).count() as u32;
        if failed > rollout.max_failures.unwrap_or(0) {
            self.halted = true;
            return true;
        }
        let steps = steps(rollout);
        if admitted.len() < target(agents.len(), steps[self.step]) {
            self.settled_since = None;
            return self.admit(agents, steps[self.step]);
        }
        let settled = admitted.iter().all(|a| a.applied && a.healthy);
        if !settled {
            self.settled_since = None;
            return false;
        }
        let since = *self.settled_since.get_or_insert(now);
        let hold = Duration::from_secs(u64::from(rollout.min_healthy_seconds.unwrap_or(0)));
        if now.duration_since(since) < hold {
            return false;
        }
        if self.step + 1 >= steps.len() {
            self.complete = true;
            return true;
        }
        self.step += 1;
        self.settled_since = None;
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

    fn agent(i: u8, applied: bool, failed: bool) -> AgentFacts {
        AgentFacts {
            key: rollout_key("ns/edge", &Uid([i; 16])),
            applied,
            failed,
            healthy: true,
            has_version: false,
        }
    }

    fn progressive(steps: &[u8], min_healthy: u32, max_failures: u32) -> Rollout {
        Rollout {
            strategy: RolloutStrategy::Progressive,
            steps: steps.to_vec(),
            min_healthy_seconds: Some(min_healthy),
            max_failures: Some(max_failures),
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
        let mut t = Tracker::new([1; 32], Some(1));
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..8).map(|i| agent(i, false, false)).collect();
        assert!(t.advance(&r, &agents, now));
        assert_eq!(admitted(&t, &agents), 2, "25% of 8");
        assert!(!t.advance(&r, &agents, now), "not applied yet");
        apply(&t, &mut agents);
        assert!(!t.advance(&r, &agents, now), "applied, now stay healthy for 10 s");
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(5)));
        assert!(t.advance(&r, &agents, now + Duration::from_secs(11)));
        assert_eq!((t.step, admitted(&t, &agents)), (1, 4));
        apply(&t, &mut agents);
        let later = now + Duration::from_secs(11);
        t.advance(&r, &agents, later);
        assert!(t.advance(&r, &agents, later + Duration::from_secs(10)));
        assert_eq!((t.step, admitted(&t, &agents)), (2, 8));
        assert_eq!(t.admitted_up_to, Some(u64::MAX), "the last step admits agents no replica saw yet");
        apply(&t, &mut agents);
        t.advance(&r, &agents, later + Duration::from_secs(10));
        t.advance(&r, &agents, later + Duration::from_secs(20));
        assert_eq!(t.state(), RolloutState::Complete);
        assert!(t.admits(rollout_key("ns/edge", &Uid([200; 16]))), "a complete rollout admits newcomers");
    }

    #[test]
    fn the_threshold_only_grows_and_admits_the_lowest_keys() {
        let r = progressive(&[50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(1));
        let agents: Vec<AgentFacts> = (0..10).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, Instant::now());
        let mut keys: Vec<u64> = agents.iter().map(|a| a.key).collect();
        keys.sort_unstable();
        assert_eq!(t.admitted_up_to, Some(keys[4]));
        // Half the agents leave: those admitted stay admitted, no more are taken.
        let before = t.admitted_up_to;
        t.advance(&r, &agents[..5], Instant::now());
        assert!(t.admitted_up_to >= before);
    }

    #[test]
    fn more_failures_than_allowed_halt_the_rollout() {
        let r = progressive(&[50], 0, 1);
        let mut t = Tracker::new([1; 32], Some(1));
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, now);
        let failing: Vec<usize> = (0..4).filter(|&i| t.admits(agents[i].key)).collect();
        agents[failing[0]].failed = true;
        t.advance(&r, &agents, now);
        assert_eq!(t.state(), RolloutState::Progressing, "one failure is allowed");
        agents[failing[1]].failed = true;
        t.advance(&r, &agents, now);
        assert_eq!(t.state(), RolloutState::Halted);
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(60)), "halted until the spec changes");
        assert_eq!(admitted(&t, &agents), 2);
    }

    #[test]
    fn agents_that_already_run_the_version_count_as_admitted() {
        let r = progressive(&[50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(1));
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        agents[3].has_version = true;
        agents[3].applied = true;
        t.advance(&r, &agents, Instant::now());
        let counted = agents.iter().filter(|a| a.has_version || t.admits(a.key)).count();
        assert_eq!(counted, 2);
    }

    #[test]
    fn a_new_leader_resumes_the_rollout_its_status_records() {
        let r = progressive(&[25, 50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(3));
        let agents: Vec<AgentFacts> = (0..8).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, Instant::now());
        let status = AgentConfigStatus {
            config_hash: Some("sha256:01".into()),
            observed_generation: Some(3),
            rollout: Some(t.status(t.state())),
            ..Default::default()
        };
        let resumed = Tracker::resume([1; 32], "sha256:01", Some(3), Some(&status));
        assert_eq!((resumed.step, resumed.admitted_up_to), (t.step, t.admitted_up_to));
        let other = Tracker::resume([2; 32], "sha256:02", Some(4), Some(&status));
        assert_eq!(other, Tracker::new([2; 32], Some(4)), "another version starts over");
        let halted = AgentConfigStatus {
            rollout: Some(RolloutStatus { state: RolloutState::Halted, ..t.status(t.state()) }),
            ..status
        };
        assert!(Tracker::resume([1; 32], "sha256:01", Some(3), Some(&halted)).halted);
        assert!(
            !Tracker::resume([1; 32], "sha256:01", Some(4), Some(&halted)).halted,
            "a spec change resumes"
        );
    }
}
