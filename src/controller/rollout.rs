//! Progressive rollouts: a new version of an AgentConfig reaches its selected agents in steps
//! (percentages), each step done when its agents applied it and stayed healthy for
//! `minHealthySeconds`; more than `maxFailures` failed agents halt it until the spec changes.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::api::{Rollout, RolloutState, RolloutStrategy};
use crate::protocol::Uid;

/// One rollout in progress (per AgentConfig, per version).
#[derive(Debug, Clone)]
pub struct Tracker {
    pub hash: [u8; 32],
    pub generation: Option<i64>,
    /// 0-based index into the steps.
    pub step: usize,
    pub admitted: BTreeSet<Uid>,
    /// When every admitted agent was first seen applied and healthy (for minHealthySeconds).
    pub settled_since: Option<Instant>,
    pub halted: bool,
    pub complete: bool,
}

/// Rollouts by `namespace/name`, shared by the planner and the desired-state provider.
pub type Rollouts = Arc<Mutex<HashMap<String, Tracker>>>;

/// What the tracker needs to know of one selected agent.
#[derive(Debug, Clone, Copy)]
pub struct AgentFacts {
    pub uid: Uid,
    /// Reports APPLIED for its desired config (which includes this version once admitted).
    pub applied: bool,
    pub failed: bool,
    pub healthy: bool,
    /// Already runs this version (reported before the tracker existed, e.g. after a restart).
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
            admitted: BTreeSet::new(),
            settled_since: None,
            halted: false,
            complete: false,
        }
    }

    /// Whether an agent may be given this version now.
    pub fn admits(&self, uid: &Uid) -> bool {
        self.complete || self.admitted.contains(uid)
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

    /// Advances the rollout; returns true when more agents were admitted.
    pub fn advance(&mut self, rollout: &Rollout, agents: &[AgentFacts], now: Instant) -> bool {
        if self.halted || self.complete {
            return false;
        }
        for a in agents.iter().filter(|a| a.has_version) {
            self.admitted.insert(a.uid);
        }
        let admitted: Vec<&AgentFacts> = agents.iter().filter(|a| self.admitted.contains(&a.uid)).collect();
        let failed = admitted.iter().filter(|a| a.failed).count() as u32;
        if failed > rollout.max_failures.unwrap_or(0) {
            self.halted = true;
            return false;
        }
        let steps = steps(rollout);
        let target = |step: usize| (agents.len() * steps[step] as usize).div_ceil(100);
        let mut admitted_more = false;
        if self.admitted.len() < target(self.step) {
            admitted_more |= self.admit(agents, target(self.step));
            self.settled_since = None;
            return admitted_more;
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
            return false;
        }
        self.step += 1;
        self.settled_since = None;
        self.admit(agents, target(self.step))
    }

    fn admit(&mut self, agents: &[AgentFacts], target: usize) -> bool {
        let mut candidates: Vec<Uid> =
            agents.iter().map(|a| a.uid).filter(|u| !self.admitted.contains(u)).collect();
        candidates.sort();
        let mut more = false;
        for uid in candidates {
            if self.admitted.len() >= target {
                break;
            }
            self.admitted.insert(uid);
            more = true;
        }
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(i: u8, applied: bool, failed: bool) -> AgentFacts {
        AgentFacts { uid: Uid([i; 16]), applied, failed, healthy: true, has_version: false }
    }

    fn progressive(steps: &[u8], min_healthy: u32, max_failures: u32) -> Rollout {
        Rollout {
            strategy: RolloutStrategy::Progressive,
            steps: steps.to_vec(),
            min_healthy_seconds: Some(min_healthy),
            max_failures: Some(max_failures),
        }
    }

    #[test]
    fn steps_end_at_100() {
        assert_eq!(steps(&progressive(&[10, 50], 0, 0)), vec![10, 50, 100]);
        assert_eq!(steps(&progressive(&[25, 100], 0, 0)), vec![25, 100]);
        assert_eq!(steps(&Rollout::default()), vec![100]);
    }

    #[test]
    fn steps_advance_when_admitted_agents_applied_and_stayed_healthy() {
        let r = progressive(&[25, 50], 10, 0);
        let mut t = Tracker::new([1; 32], Some(1));
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..8).map(|i| agent(i, false, false)).collect();
        assert!(t.advance(&r, &agents, now));
        assert_eq!(t.admitted.len(), 2, "25% of 8");
        assert!(!t.advance(&r, &agents, now), "not applied yet");
        for a in agents.iter_mut().take(2) {
            a.applied = true;
        }
        assert!(!t.advance(&r, &agents, now), "applied, now stay healthy for 10 s");
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(5)));
        assert!(t.advance(&r, &agents, now + Duration::from_secs(11)));
        assert_eq!((t.step, t.admitted.len()), (1, 4));
        for a in agents.iter_mut() {
            a.applied = true;
        }
        let later = now + Duration::from_secs(11);
        t.advance(&r, &agents, later);
        assert!(t.advance(&r, &agents, later + Duration::from_secs(10)));
        assert_eq!((t.step, t.admitted.len()), (2, 8));
        t.advance(&r, &agents, later + Duration::from_secs(10));
        t.advance(&r, &agents, later + Duration::from_secs(20));
        assert_eq!(t.state(), RolloutState::Complete);
        assert!(t.admits(&Uid([200; 16])), "a complete rollout admits newcomers");
    }

    #[test]
    fn more_failures_than_allowed_halt_the_rollout() {
        let r = progressive(&[50], 0, 1);
        let mut t = Tracker::new([1; 32], Some(1));
        let now = Instant::now();
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        t.advance(&r, &agents, now);
        agents[0].failed = true;
        t.advance(&r, &agents, now);
        assert_eq!(t.state(), RolloutState::Progressing, "one failure is allowed");
        agents[1].failed = true;
        t.advance(&r, &agents, now);
        assert_eq!(t.state(), RolloutState::Halted);
        assert!(!t.advance(&r, &agents, now + Duration::from_secs(60)), "halted until the spec changes");
        assert_eq!(t.admitted.len(), 2);
    }

    #[test]
    fn agents_that_already_run_the_version_count_as_admitted() {
        let r = progressive(&[50], 0, 0);
        let mut t = Tracker::new([1; 32], Some(1));
        let mut agents: Vec<AgentFacts> = (0..4).map(|i| agent(i, false, false)).collect();
        agents[3].has_version = true;
        agents[3].applied = true;
        t.advance(&r, &agents, Instant::now());
        assert!(t.admitted.contains(&Uid([3; 16])));
        assert_eq!(t.admitted.len(), 2);
    }
}
