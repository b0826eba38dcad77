//! What happens to a message once its job has ended: deleted, retried
//! later, dead-lettered or handed back; and what the ledger is told.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::health::{Admission, TryEnd};
use super::{Done, JobError, Worker};
use crate::events::ledger::{ArrayCounts, ChildState, LedgerError};
use crate::events::observe::{JobEnd, Subject};
use crate::job::event::EventType;
use crate::queue::{DeadLetter, QueueError};
use crate::retry::Backoff;
use crate::worker::delivery::Delivery;

/// How an array child's ledger write is retried in place: about 8 s in
/// all, beyond the SDK's own retries of each call.
const LEDGER_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(4));
const LEDGER_TRIES: u32 = 6;
/// How a settle's queue call is retried in place before the job is given
/// back to the queue's own redelivery.
const QUEUE_RETRY: Backoff = LEDGER_RETRY;
const QUEUE_TRIES: u32 = LEDGER_TRIES;

/// The array a settled child completed, for its `ArrayJobCompleted`.
pub(super) struct ArrayCompletion {
    pub array_id: String,
    pub counts: ArrayCounts,
}

impl Worker {
    /// A try after the first whose predecessor never reported a failure:
    /// the worker running it was lost.
    pub(super) async fn check_previous_try(&self, delivery: &Delivery, subject: &Subject) {
        let (Some(ledger), true) = (&self.source(delivery).ledger, delivery.attempt > 1) else {
            return;
        };
        match ledger
            .was_reported(&delivery.message_id, delivery.attempt - 1)
            .await
        {
            Ok(false) => self.observer.lost_before(subject),
            Ok(true) => {}
            Err(error) => warn!(%error, "cannot read the ledger"),
        }
    }

    /// Records an array child's final state before its message is settled,
    /// retrying in place: the message is what brings the child back if
    /// the ledger stays unreachable. `Some` when this call completed the
    /// array (the one that announces it, after the child's own end).
    pub(super) async fn record_array_child(
        &self,
        delivery: &Delivery,
        outcome: &Result<Done, JobError>,
    ) -> Result<Option<ArrayCompletion>, LedgerError> {
        let Some(state) = self.final_state(delivery, outcome) else {
            return Ok(None);
        };
        let (Some(ledger), Ok(Some(array))) = (
            &self.source(delivery).ledger,
            delivery.envelope.as_ref().map(|e| e.array.as_ref()),
        ) else {
            return Ok(None);
        };
        let counts = LEDGER_RETRY
            .retry(
                LEDGER_TRIES,
                "recording the array child's end",
                |_| true,
                || ledger.child_settled(array, state),
            )
            .await?;
        Ok(counts.map(|counts| ArrayCompletion {
            array_id: array.job_id.clone(),
            counts,
        }))
    }

    /// The state a try's outcome leaves the job in, when it is final.
    pub(super) fn final_state(
        &self,
        delivery: &Delivery,
        outcome: &Result<Done, JobError>,
    ) -> Option<ChildState> {
        Some(match outcome {
            Ok(_) => ChildState::Succeeded,
            Err(JobError::Retryable(_)) if self.last_try(delivery) => ChildState::DeadLettered,
            Err(JobError::Permanent(_) | JobError::Refused(_)) => ChildState::DeadLettered,
            Err(JobError::Cancelled) => ChildState::Cancelled,
            Err(
                JobError::Retryable(_)
                | JobError::Lost
                | JobError::Interrupted
                | JobError::HandedBack(_)
                | JobError::Held(_)
                | JobError::Declined(..),
            ) => return None,
        })
    }

    /// Whether this is the job's last allowed try.
    fn last_try(&self, delivery: &Delivery) -> bool {
        delivery.attempt >= self.source(delivery).queue.max_receive_count()
    }

    /// Does to the message what the outcome calls for.
    pub(super) async fn settle(
        &self,
        delivery: &Delivery,
        outcome: Result<Done, JobError>,
    ) -> Result<JobEnd, QueueError> {
        let receipt = &delivery.received.receipt;
        let queue = &self.source(delivery).queue;
        Ok(match outcome {
            Ok(Done {
                outputs,
                thumbnails,
                duration,
            }) => {
                // A finished render is not run again for one failed call.
                let deleted = QUEUE_RETRY
                    .retry(
                        QUEUE_TRIES,
                        "deleting the finished job's message",
                        |e| matches!(e, QueueError::Unavailable(_)),
                        || queue.delete(receipt),
                    )
                    .await;
                match deleted {
                    Err(QueueError::StaleReceipt) => {
                        // Someone else holds the message now and will run it
                        // again; our outputs were written to the same keys.
                        warn!("Job finished after its receipt expired; it may run again.");
                    }
                    other => other?,
                }
                JobEnd::Succeeded {
                    outputs,
                    thumbnails,
                    duration,
                }
            }
            Err(JobError::Retryable(reason)) if self.last_try(delivery) => {
                // The last try: dead-letter it now, with the reason, rather
                // than leave it for the redrive policy, which cannot say why.
                let reason = format!("{reason} (after {} tries)", delivery.attempt);
                self.dead_letter(delivery, &reason).await?;
                JobEnd::DeadLettered { reason, ran: true }
            }
            Err(JobError::Retryable(reason)) => {
                let delay = Backoff::new(self.config.retry_delay, self.config.max_retry_delay)
                    .delay(delivery.attempt);
                // Reported before the message can come back, so the next
                // try does not take this one for a lost worker.
                if let Some(ledger) = &self.source(delivery).ledger
                    && let Err(error) = ledger
                        .report_failure(&delivery.message_id, delivery.attempt)
                        .await
                {
                    warn!(%error, "cannot record the failed try in the ledger");
                }
                queue.retry_later(receipt, delay, &reason).await?;
                JobEnd::WillRetry { reason, delay }
            }
            Err(JobError::Permanent(reason)) => {
                self.dead_letter(delivery, &reason).await?;
                JobEnd::DeadLettered { reason, ran: true }
            }
            Err(JobError::Refused(reason)) => {
                self.dead_letter(delivery, &reason).await?;
                JobEnd::DeadLettered { reason, ran: false }
            }
            Err(JobError::Cancelled) => {
                match queue.delete(receipt).await {
                    // The embedded queue's cancel deleted it already.
                    Err(QueueError::StaleReceipt) => {}
                    other => other?,
                }
                JobEnd::Cancelled
            }
            Err(JobError::Lost) => {
                // The message is another worker's to settle; this try
                // reported nothing, so that worker sees it as lost.
                JobEnd::Requeued {
                    reason: "another worker holds the message now".into(),
                }
            }
            Err(JobError::Held(by)) => self.park(delivery, by).await?,
            Err(JobError::Interrupted) => {
                self.hand_back(delivery, "interrupted".into(), Duration::ZERO)
                    .await?
            }
            Err(JobError::HandedBack(reason)) => {
                self.hand_back(delivery, reason, Duration::ZERO).await?
            }
            Err(JobError::Declined(reason, delay)) => self.decline(delivery, reason, delay).await?,
        })
    }

    /// Puts the message back for another try that does not count, visible
    /// after `delay`; the ones before it still do.
    async fn hand_back(
        &self,
        delivery: &Delivery,
        reason: String,
        delay: Duration,
    ) -> Result<JobEnd, QueueError> {
        self.requeue(delivery, reason, delay, |envelope| envelope.interrupts += 1)
            .await
    }

    /// Hands back a job this worker declines (its blocklist), counting the
    /// decline in the job.
    async fn decline(
        &self,
        delivery: &Delivery,
        reason: String,
        delay: Duration,
    ) -> Result<JobEnd, QueueError> {
        self.requeue(delivery, reason, delay, |envelope| envelope.declines += 1)
            .await
    }

    /// Puts the job back in its queue after `delay` without using a try,
    /// noting why in its envelope (`note`).
    async fn requeue(
        &self,
        delivery: &Delivery,
        reason: String,
        delay: Duration,
        note: impl FnOnce(&mut crate::job::Envelope),
    ) -> Result<JobEnd, QueueError> {
        let body = delivery.resend_body(|envelope| {
            note(envelope);
            envelope.failures = delivery.attempt - 1;
        });
        self.source(delivery)
            .queue
            .requeue(&delivery.received, &body, delay)
            .await?;
        Ok(JobEnd::Requeued { reason })
    }

    /// Moves a job held by hand into the ledger, without using a try, and
    /// deletes its message; hands it back instead when the hold was
    /// released meanwhile.
    async fn park(&self, delivery: &Delivery, by: String) -> Result<JobEnd, QueueError> {
        let body = delivery.resend_body(|envelope| {
            envelope.failures = delivery.attempt - 1;
        });
        let source = self.source(delivery);
        let (Some(ledger), Ok(envelope)) = (&source.ledger, &delivery.envelope) else {
            return self
                .hand_back(delivery, "held".into(), Duration::ZERO)
                .await;
        };
        let (id, size, index) = match &envelope.array {
            Some(a) => (a.job_id.clone(), a.size, a.index),
            None => (delivery.message_id.clone(), 0, 0),
        };
        match ledger.park(&by, &id, size, index, body).await {
            Ok(true) => {
                match source.queue.delete(&delivery.received.receipt).await {
                    Err(QueueError::StaleReceipt) => {}
                    other => other?,
                }
                Ok(JobEnd::Held { by })
            }
            Ok(false) => {
                self.hand_back(delivery, "its hold was released".into(), Duration::ZERO)
                    .await
            }
            Err(error) => {
                warn!(%error, "cannot hold the job in the ledger; handing it back");
                self.hand_back(delivery, "held".into(), Duration::ZERO)
                    .await
            }
        }
    }

    /// Which id of the job is held by hand, if any.
    pub(super) async fn held_by_hand(&self, delivery: &Delivery) -> Option<String> {
        let ledger = self.source(delivery).ledger.as_ref()?;
        let ids = delivery
            .cancel_ids()
            .into_iter()
            .map(str::to_owned)
            .collect();
        match ledger.held_by_hand(ids).await {
            Ok(held) => held,
            Err(error) => {
                warn!(%error, "cannot read the ledger's holds");
                None
            }
        }
    }

    /// Moves the job to the dead-letter queue with a fresh failure budget
    /// (a redrive starts it over) and its reason.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let body = delivery.resend_body(|envelope| envelope.failures = 0);
        let note = DeadLetter {
            message_id: delivery.message_id.clone(),
            receive_count: delivery.attempt,
            reason: reason.to_owned(),
        };
        self.source(delivery)
            .queue
            .dead_letter(&delivery.received, &body, &note)
            .await
    }
}

/// How long a job this worker declines stays hidden: long enough that
/// another worker takes it first, short enough that it does not wait for
/// one. A sick worker's are visible again at once (it takes no more).
const DECLINED_DELAY: Duration = Duration::from_secs(2);

/// Declines of one job (by any worker) after which a blocklisting worker
/// runs it after all: no other worker took it in that time (a farm of one
/// worker, or every other one blocklisting it too), and a job nobody runs
/// would never end, not even in the dead-letter queue.
const MAX_DECLINES: u32 = 10;

impl Worker {
    /// The job's key in the worker's health: its array's id for a child,
    /// so that an array is blocklisted as one job.
    fn health_key(delivery: &Delivery) -> &str {
        match &delivery.envelope {
            Ok(envelope) => envelope
                .array
                .as_ref()
                .map_or(envelope.job_id.as_str(), |a| a.job_id.as_str()),
            Err(_) => &delivery.message_id,
        }
    }

    /// Why this worker will not run the job, and when it should be
    /// visible again; `None`: it runs.
    pub(super) fn declines(&self, delivery: &Delivery) -> Option<(String, Duration)> {
        let admission = self
            .health
            .lock()
            .expect("health lock")
            .admits(Self::health_key(delivery));
        let declines = delivery.envelope.as_ref().map_or(0, |e| e.declines);
        match admission {
            Admission::Run => None,
            Admission::Blocklisted { failures } if declines >= MAX_DECLINES => {
                warn!(
                    failures,
                    declines, "no other worker took the job this worker declined; running it"
                );
                None
            }
            Admission::Blocklisted { failures } => Some((
                format!("this worker failed the job {failures} times; another worker gets it"),
                DECLINED_DELAY,
            )),
            Admission::Sick => Some((
                format!(
                    "this worker is unhealthy ({})",
                    self.sick.reason().unwrap_or_default()
                ),
                Duration::ZERO,
            )),
        }
    }

    /// Notes how a try ended in the worker's health; the try that makes
    /// the worker sick raises its flag and publishes `WorkerUnhealthy`.
    pub(super) fn judge(&self, delivery: &Delivery, outcome: &Result<Done, JobError>) {
        let end = match outcome {
            Ok(_) => TryEnd::Succeeded,
            Err(JobError::Retryable(reason) | JobError::Permanent(reason)) => {
                TryEnd::Failed(reason.clone())
            }
            Err(
                JobError::Refused(_)
                | JobError::Interrupted
                | JobError::HandedBack(_)
                | JobError::Declined(..)
                | JobError::Held(_)
                | JobError::Cancelled
                | JobError::Lost,
            ) => TryEnd::Neutral,
        };
        let sickness = self
            .health
            .lock()
            .expect("health lock")
            .record(Self::health_key(delivery), end);
        let Some(sickness) = sickness else {
            return;
        };
        if !self.sick.raise(sickness.to_string()) {
            return;
        }
        error!(
            tries = sickness.tries,
            jobs = sickness.jobs,
            reasons = ?sickness.reasons,
            "Worker unhealthy: it takes no more jobs until it is restarted."
        );
        self.observer.worker_event(
            EventType::WorkerUnhealthy,
            json!({
                "reason": sickness.to_string(),
                "reasons": sickness.reasons,
                "tries": sickness.tries,
                "jobs": sickness.jobs,
            }),
        );
    }

    /// Cancels `open` (the slots' stop) once the worker is sick, and hands
    /// back what the intake holds; ends when `open` is cancelled otherwise.
    pub(super) fn close_when_sick(self: Arc<Self>, open: CancellationToken) {
        tokio::spawn(async move {
            tokio::select! {
                _ = self.sick.token().cancelled() => {}
                _ = open.cancelled() => return,
            }
            open.cancel();
            self.intake.close().await;
        });
    }
}
