//! What wakes a WebSocket connection's task besides its socket.
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Raised for a WebSocket connection by the fleet when its agent has something to be pushed, and
/// by the server when it shuts down; the connection's task polls it at every wake-up.
///
/// It takes the place of a `Notify` per connection and a shared cancellation future: those lock
/// a list of waiters at each poll, and the task polls at every message it reads (together some
/// 600 instructions of a heartbeat's ~7,000). This costs a few atomic operations.
#[derive(Debug, Default)]
pub struct Wakeup {
    raised: AtomicU8,
    waker: AtomicWaker,
}

impl Wakeup {
    /// The agent has something to be pushed ([`crate::fleet::Fleet::poll_push`]).
    pub const PUSH: u8 = 1;
    /// The server is shutting down: the connection closes.
    pub const SHUTDOWN: u8 = 2;

    /// Raises `why` (kept until polled) and wakes the task.
    pub fn raise(&self, why: u8) {
        self.raised.fetch_or(why, Ordering::Release);
        self.waker.wake();
    }

    /// What was raised since the last poll (and is now cleared), or `Pending` with this task to
    /// be woken at the next raise.
    pub fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<u8> {
        if self.raised.load(Ordering::Relaxed) == 0 {
            self.waker.register(cx.waker());
            // A raise between the load and the registration woke the previous waker, if any.
            if self.raised.load(Ordering::Acquire) == 0 {
                return Poll::Pending;
            }
        }
        Poll::Ready(self.raised.swap(0, Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_raise_wakes_the_task_once_and_is_kept_until_polled() {
        let w = Arc::new(Wakeup::default());
        // Raised before anyone waits: kept.
        w.raise(Wakeup::PUSH);
        w.raise(Wakeup::PUSH);
        assert_eq!(poll_fn(|cx| w.poll_raised(cx)).await, Wakeup::PUSH);
        let polled = poll_fn(|cx| Poll::Ready(w.poll_raised(cx))).await;
        assert_eq!(polled, Poll::Pending, "cleared by the poll");
        // Raised from another task while this one waits: woken, with every reason raised.
        let raiser = w.clone();
        let raise = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            raiser.raise(Wakeup::PUSH);
            raiser.raise(Wakeup::SHUTDOWN);
        });
        let raised = tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| w.poll_raised(cx))).await;
        raise.await.unwrap();
        let rest = match poll_fn(|cx| Poll::Ready(w.poll_raised(cx))).await {
            Poll::Ready(rest) => rest,
            Poll::Pending => 0,
        };
        let raised = raised.expect("woken") | rest;
        assert_eq!(raised, Wakeup::PUSH | Wakeup::SHUTDOWN);
    }
}
