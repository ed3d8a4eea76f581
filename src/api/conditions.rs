//! Status conditions with kstatus semantics: `lastTransitionTime` moves only when the status
//! flips, every condition carries the generation it describes.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const CONFLICT: &str = "Conflict";

/// A condition as computed, before merging with what the status already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// Merges computed conditions into the current ones: keeps `lastTransitionTime` unless the
/// status changed, sets `observedGeneration`, and orders them by type for stable output.
pub fn merge(
    current: &[Condition],
    desired: Vec<Desired>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = desired
        .into_iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_owned();
            let previous = current.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_owned(),
                status,
                reason: d.reason,
                message: d.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect();
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The same conditions, ignoring timestamps (to decide whether a status patch is needed).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first =
            merge(&[], vec![Desired::new(READY, false, "RolloutInProgress", "1/2 applied")], Some(1), &t(10));
        assert_eq!(first[0].last_transition_time, t(10));
        let same_status =
            merge(&first, vec![Desired::new(READY, false, "RolloutInProgress", "2/3")], Some(2), &t(20));
        assert_eq!(same_status[0].last_transition_time, t(10));
        assert_eq!(same_status[0].observed_generation, Some(2));
        let flipped = merge(&same_status, vec![Desired::new(READY, true, "Applied", "3/3")], Some(2), &t(30));
        assert_eq!(flipped[0].last_transition_time, t(30));
        assert!(!same(&same_status, &flipped));
        assert!(same(
            &flipped,
            &merge(&flipped, vec![Desired::new(READY, true, "Applied", "3/3")], Some(2), &t(40))
        ));
    }
}
