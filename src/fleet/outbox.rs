//! A bounded per-agent queue of custom messages waiting to be sent.
use std::collections::VecDeque;

use crate::proto::CustomMessage;

pub const OUTBOX_LIMIT_DEFAULT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("unknown agent")]
    UnknownAgent,
    #[error("the agent did not declare this custom capability")]
    CapabilityNotSupported,
    #[error("the agent's queue holds its limit of {0} messages")]
    QueueFull(usize),
}

#[derive(Debug, Default)]
pub(super) struct Outbox {
    queue: VecDeque<CustomMessage>,
}

impl Outbox {
    /// Appends a message; returns the queue depth.
    pub(super) fn push(&mut self, message: CustomMessage, limit: usize) -> Result<usize, EnqueueError> {
        if self.queue.len() >= limit {
            return Err(EnqueueError::QueueFull(limit));
        }
        self.queue.push_back(message);
        Ok(self.queue.len())
    }

    pub(super) fn pop(&mut self) -> Option<CustomMessage> {
        self.queue.pop_front()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
