//! The queue interface every backend offers, with SQS semantics: at-least-once
//! delivery, visibility timeouts, receive counts, a dead-letter queue.

mod local;
mod sqs;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::job::Envelope;
use crate::job::id::Id;
pub use local::{Cancelled, LocalQueue};
pub use sqs::{ApiCalls, MOVED_REASON, SqsQueue};

/// Most messages one send of a batch carries (SQS's `SendMessageBatch`
/// limit; the submit half keeps to it on every backend)...
pub const SEND_BATCH: usize = 10;
/// ...and at most this many bytes in all, which is also SQS's largest
/// message.
pub const SEND_BATCH_BYTES: usize = 256 * 1024;

/// A message handed to a worker. It stays invisible to others until its
/// visibility lapses or it is deleted with `receipt`.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    /// Proof of this particular receive; refused once the message has been
    /// received again by someone else.
    pub receipt: String,
    pub body: String,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
}

/// Counts for `queue stats` and `queue_manager_queue_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub visible: u64,
    pub in_flight: u64,
    pub dead_lettered: u64,
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The id the submit returned, kept across re-sends.
    pub message_id: String,
    /// Tries used, across re-sends.
    pub receive_count: u32,
    /// Why it was dead-lettered: the fatal error, or the last retryable one.
    pub reason: String,
}

/// Which dead letters a redrive puts back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// All of them (up to the limit).
    All,
    /// The one whose message id (the id the submit returned) is this.
    Message(Id),
    /// A job's, or every dead-lettered child of an array, by the id the
    /// submit returned for it.
    Job(Id),
}

impl Redrive {
    /// Whether a dead letter (its message id and body) is one to put back.
    pub fn wants(&self, message_id: &str, body: &str) -> bool {
        match self {
            Redrive::All => true,
            Redrive::Message(id) => {
                id.is(message_id)
                    || Envelope::parse(body, message_id)
                        .is_ok_and(|e| e.message_id.as_deref().is_some_and(|m| id.is(m)))
            }
            Redrive::Job(id) => Envelope::parse(body, message_id).is_ok_and(|e| e.is_part_of(id)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The receipt is no longer valid: the message was received again or
    /// deleted. The caller's work may be repeated elsewhere.
    #[error("receipt handle is stale: the message was received again or deleted")]
    StaleReceipt,
    /// The backend could not be reached or failed; try again later.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// A redrive put `redriven` dead letters back, and `left` others it
    /// chose stay in the dead-letter queue (a later redrive tries them
    /// again; none is sent twice).
    #[error(
        "{redriven} dead letter(s) put back; {left} could not be and stay in the dead-letter queue: {reason}"
    )]
    PartlyRedriven {
        redriven: usize,
        left: usize,
        reason: String,
    },
}

/// One configured queue.
#[derive(Debug, Clone)]
pub enum Queue {
    Local(LocalQueue),
    Sqs(SqsQueue),
}

impl Queue {
    pub async fn open(name: &str, config: &QueueConfig) -> Result<Self, QueueError> {
        match config {
            QueueConfig::Local(c) => Ok(Queue::Local(LocalQueue::open(name, c).await?)),
            QueueConfig::Sqs(c) => Ok(Queue::Sqs(SqsQueue::open(name, c).await?)),
        }
    }

    /// The name the config gives this queue.
    pub fn name(&self) -> &str {
        match self {
            Queue::Local(q) => q.name(),
            Queue::Sqs(q) => q.name(),
        }
    }

    /// Receives after which the queue dead-letters a message (the local
    /// config's `max_receive_count`, or the SQS redrive policy's).
    pub fn max_receive_count(&self) -> u32 {
        match self {
            Queue::Local(q) => q.max_receive_count(),
            Queue::Sqs(q) => q.max_receive_count(),
        }
    }

    /// Adds a message; returns its id.
    pub async fn send(&self, body: &str) -> Result<String, QueueError> {
        match self {
            Queue::Local(q) => q.send(body).await,
            Queue::Sqs(q) => q.send(body).await,
        }
    }

    /// Adds up to 10 messages in one call; returns, in order, each one's
    /// message id or why it was not added (SQS reports per entry; the
    /// embedded queue adds all or none). On an error for the whole call,
    /// none or some may have been added.
    pub async fn send_batch(
        &self,
        bodies: &[String],
    ) -> Result<Vec<Result<String, QueueError>>, QueueError> {
        match self {
            Queue::Local(q) => q.send_batch(bodies).await,
            Queue::Sqs(q) => q.send_batch(bodies).await,
        }
    }

    /// Waits up to `wait` for a message and hides it, and up to `max - 1`
    /// more that are visible by then, for `visibility`.
    ///
    /// `stop` ends the wait early where that is safe. A request already on
    /// its way is never abandoned: the server could hand a message to it
    /// that nobody would then see for a whole visibility timeout. So an SQS
    /// receive runs to the end of its long poll (at most 20 s).
    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Received>, QueueError> {
        match self {
            Queue::Local(q) => {
                let mut got = Vec::new();
                let mut wait = wait;
                while got.len() < max {
                    match q.receive(wait, visibility, stop).await? {
                        Some(received) => got.push(received),
                        None => break,
                    }
                    wait = Duration::ZERO;
                }
                Ok(got)
            }
            Queue::Sqs(q) => q.receive(max, wait, visibility).await,
        }
    }

    /// Removes a message for good: the job is done.
    pub async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        match self {
            Queue::Local(q) => q.delete(receipt).await,
            Queue::Sqs(q) => q.delete(receipt).await,
        }
    }

    /// Keeps a running job's message hidden for `visibility` from now.
    pub async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), QueueError> {
        match self {
            Queue::Local(q) => q.set_visibility(receipt, visibility, None).await,
            Queue::Sqs(q) => q.set_visibility(receipt, visibility).await,
        }
    }

    /// Leaves the message for another try after `delay`, remembering `error`
    /// where the backend can, so `dlq list` can show it.
    pub async fn retry_later(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Local(q) => q.set_visibility(receipt, delay, Some(error)).await,
            // SQS cannot annotate a message; the worker dead-letters the
            // last failure itself, with its reason.
            Queue::Sqs(q) => q.set_visibility(receipt, delay).await,
        }
    }

    /// Moves a message to the dead-letter queue at once, as `body`, noting
    /// the job's id, tries and reason for `dlq list`.
    pub async fn dead_letter(
        &self,
        received: &Received,
        body: &str,
        note: &DeadLetter,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Local(q) => q.dead_letter(&received.receipt, body, note).await,
            Queue::Sqs(q) => q.dead_letter(received, body, note).await,
        }
    }

    /// Hands an interrupted job back as `body`, which carries the tries
    /// already used, visible again after `delay` (zero: at once; SQS
    /// takes whole seconds, up to 15 minutes): on every backend the
    /// message's own receive count starts again (SQS re-sends it as a new
    /// message).
    pub async fn requeue(
        &self,
        received: &Received,
        body: &str,
        delay: Duration,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Local(q) => q.requeue(&received.receipt, body, delay).await,
            Queue::Sqs(q) => q.requeue(received, body, delay).await,
        }
    }

    pub async fn stats(&self) -> Result<Stats, QueueError> {
        match self {
            Queue::Local(q) => q.stats().await,
            Queue::Sqs(q) => q.stats().await,
        }
    }

    pub async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        match self {
            Queue::Local(q) => q.dlq_list(limit).await,
            Queue::Sqs(q) => q.dlq_list(limit).await,
        }
    }

    /// Moves up to `limit` of the dead letters `which` selects back, with
    /// a fresh budget of tries; returns how many.
    pub async fn dlq_redrive(&self, limit: usize, which: &Redrive) -> Result<usize, QueueError> {
        match self {
            Queue::Local(q) => q.dlq_redrive(limit, which).await,
            Queue::Sqs(q) => q.dlq_redrive(limit, which).await,
        }
    }
}

/// Every configured queue, by name.
#[derive(Debug, Clone, Default)]
pub struct Queues(BTreeMap<String, Queue>);

impl Queues {
    pub async fn open(configs: &BTreeMap<String, QueueConfig>) -> Result<Self, anyhow::Error> {
        let mut queues = BTreeMap::new();
        for (name, config) in configs {
            let queue = Queue::open(name, config)
                .await
                .map_err(|e| anyhow::anyhow!("queue `{name}`: {e}"))?;
            queues.insert(name.clone(), queue);
        }
        Ok(Self(queues))
    }

    pub fn get(&self, name: &str) -> Option<&Queue> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl FromIterator<Queue> for Queues {
    /// Queues by their names.
    fn from_iter<I: IntoIterator<Item = Queue>>(queues: I) -> Self {
        Self(
            queues
                .into_iter()
                .map(|q| (q.name().to_owned(), q))
                .collect(),
        )
    }
}
