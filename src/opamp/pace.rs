//! Pacing of new agent sessions: a token bucket of sessions per second
//! ([`super::ServerConfig::max_connects_per_second`]), so that a fleet reconnecting at once
//! (after a restart, a network partition, a load balancer's failover) is let in at a rate the
//! replica serves comfortably instead of all at once.
//!
//! A new session is a WebSocket upgrade, or a plain-HTTP poll of an agent that is not live on
//! this replica (new, or offline); polls of live agents are never paced. One beyond the rate is
//! refused with `503`, a `Retry-After` in whole seconds and an `UNAVAILABLE`
//! `ServerErrorResponse` whose `RetryInfo` holds the same duration (a WebSocket before the
//! upgrade: opamp-go reads the `Retry-After` of a refused upgrade and of a refused poll, and
//! waits at least that long before its next attempt).
//!
//! The advice spreads the herd: it grows with the backlog (the refusals of about the last
//! second, a count decaying with a time constant of one second, divided by the rate: the time
//! the bucket needs to let in those already told to come back), at least one second, plus a
//! random part of up to half of it, capped at [`MAX_RETRY_AFTER`].
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The longest retry advice given.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// New agent sessions per second let in by default (`--max-connects-per-second`): a replica on
/// two cores handles several thousand first messages per second, so this paces only a herd.
pub const MAX_CONNECTS_PER_SECOND_DEFAULT: u32 = 1000;

/// A token bucket of new sessions; its burst is one second's worth.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last refilled.
    refilled: Instant,
    /// Refusals of about the last second (decaying with a time constant of one second).
    backlog: f64,
    /// When `backlog` was last decayed.
    decayed: Instant,
}

impl Pacer {
    /// A bucket letting in `per_second` new sessions per second, full at `now`; `None` when
    /// `per_second` is 0 (no pacing).
    pub fn new(per_second: u32, now: Instant) -> Option<Self> {
        let rate = f64::from(per_second);
        (per_second > 0).then(|| Self {
            rate,
            burst: rate,
            bucket: Mutex::new(Bucket { tokens: rate, refilled: now, backlog: 0.0, decayed: now }),
        })
    }

    /// Lets one new session in at `now`, or refuses it with the retry advice (whole seconds,
    /// jittered).
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        self.admit_with(now, rand::random::<f64>())
    }

    /// [`Self::admit`] with the random part given: `jitter` in `[0, 1)` adds that fraction of
    /// half the advice.
    pub fn admit_with(&self, now: Instant, jitter: f64) -> Result<(), Duration> {
        let mut b = self.bucket.lock();
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.refilled = b.refilled.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let since = now.saturating_duration_since(b.decayed).as_secs_f64();
        b.backlog = b.backlog * (-since).exp() + 1.0;
        b.decayed = b.decayed.max(now);
        let base = (b.backlog / self.rate).max(1.0);
        let advice = (base * (1.0 + jitter.clamp(0.0, 1.0) / 2.0)).ceil();
        Err(Duration::from_secs_f64(advice.min(MAX_RETRY_AFTER.as_secs_f64())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn zero_is_off() {
        assert!(Pacer::new(0, Instant::now()).is_none());
    }

    #[test]
    fn a_full_bucket_lets_in_one_seconds_worth_at_once_then_refuses() {
        let t0 = Instant::now();
        let p = Pacer::new(100, t0).unwrap();
        for i in 0..100 {
            assert_eq!(p.admit_with(t0, 0.0), Ok(()), "session {i} of the burst");
        }
        assert!(p.admit_with(t0, 0.0).is_err());
    }

    #[test]
    fn the_bucket_refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let p = Pacer::new(100, t0).unwrap();
        while p.admit_with(t0, 0.0).is_ok() {}
        // 10 ms at 100/s: one more.
        assert_eq!(p.admit_with(t0 + ms(10), 0.0), Ok(()));
        assert!(p.admit_with(t0 + ms(10), 0.0).is_err());
        // A long pause fills the bucket to one second's worth, no more.
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..1000).take_while(|_| p.admit_with(later, 0.0).is_ok()).count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn advice_is_whole_seconds_at_least_one_and_capped() {
        let t0 = Instant::now();
        let p = Pacer::new(10, t0).unwrap();
        while p.admit_with(t0, 0.0).is_ok() {}
        let mut last = Duration::ZERO;
        for i in 0..2000 {
            let jitter = (i % 10) as f64 / 10.0;
            let advice = p.admit_with(t0, jitter).unwrap_err();
            assert!(advice >= Duration::from_secs(1) && advice <= MAX_RETRY_AFTER, "{advice:?}");
            assert_eq!(advice.subsec_nanos(), 0, "{advice:?}");
            last = advice;
        }
        assert_eq!(last, MAX_RETRY_AFTER, "a backlog of 2000 at 10/s is capped");
    }

    #[test]
    fn advice_grows_with_the_backlog_and_shrinks_as_it_drains() {
        let t0 = Instant::now();
        let p = Pacer::new(100, t0).unwrap();
        // The burst, then a first refusal.
        while p.admit_with(t0, 0.0).is_ok() {}
        let second = p.admit_with(t0, 0.0).unwrap_err();
        assert_eq!(second, Duration::from_secs(1));
        let mut advice = second;
        for _ in 0..498 {
            advice = p.admit_with(t0, 0.0).unwrap_err();
        }
        // 500 refused at 100/s: those come back over five seconds.
        assert_eq!(advice, Duration::from_secs(5));
        // Ten seconds later (the bucket drained and full again, the backlog decayed) a refusal
        // is told one second.
        let later = t0 + Duration::from_secs(10);
        while p.admit_with(later, 0.0).is_ok() {}
        assert_eq!(p.admit_with(later, 0.0).unwrap_err(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_adds_up_to_half() {
        let t0 = Instant::now();
        let p = Pacer::new(100, t0).unwrap();
        while p.admit_with(t0, 0.0).is_ok() {} // and one refusal
        for _ in 0..399 {
            let _ = p.admit_with(t0, 0.0);
        }
        // Backlog 400 → 4 s; the next (401) with the largest jitter: ceil(4.01 × 1.4999…) = 7.
        let advice = p.admit_with(t0, 0.9999).unwrap_err();
        assert_eq!(advice, Duration::from_secs(7));
        let advice = p.admit_with(t0, 0.0).unwrap_err();
        assert_eq!(advice, Duration::from_secs(5));
    }

    #[test]
    fn a_clock_going_backwards_neither_adds_nor_panics() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let p = Pacer::new(1, t0).unwrap();
        assert_eq!(p.admit_with(t0, 0.0), Ok(()));
        assert!(p.admit_with(t0 - Duration::from_secs(3), 0.0).is_err());
    }
}
