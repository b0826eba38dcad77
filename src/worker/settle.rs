//! What happens to a message once its job has ended: deleted, retried
//! later, dead-lettered or handed back; and what the ledger is told.

use tracing::{error, warn};

use super::{Done, JobError, Worker};
use crate::events::ledger::ChildState;
use crate::events::observe::{JobEnd, Subject};
use crate::queue::{DeadLetter, QueueError};
use crate::retry::Backoff;
use crate::worker::delivery::Delivery;

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

    /// Records an array child's final state; the one call that completes
    /// the array announces it.
    pub(super) async fn count_array_child(
        &self,
        delivery: &Delivery,
        subject: &Subject,
        end: &JobEnd,
    ) {
        let state = match end {
            JobEnd::Succeeded { .. } => ChildState::Succeeded,
            JobEnd::DeadLettered { .. } => ChildState::DeadLettered,
            JobEnd::Cancelled => ChildState::Cancelled,
            JobEnd::WillRetry { .. } | JobEnd::Requeued { .. } => return,
        };
        let (Some(ledger), Ok(Some(array))) = (
            &self.source(delivery).ledger,
            delivery.envelope.as_ref().map(|e| e.array.as_ref()),
        ) else {
            return;
        };
        match ledger.child_settled(array, state).await {
            Ok(Some(counts)) => self
                .observer
                .array_completed(subject, &array.job_id, counts),
            Ok(None) => {}
            Err(error) => error!(%error, "cannot record the array child's end"),
        }
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
                match queue.delete(receipt).await {
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
            Err(JobError::Retryable(reason)) if delivery.attempt >= queue.max_receive_count() => {
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
            Err(JobError::Interrupted) => {
                // This try does not count; the ones before it still do.
                let body = delivery.resend_body(|envelope| {
                    envelope.interrupts += 1;
                    envelope.failures = delivery.attempt - 1;
                });
                queue.requeue(&delivery.received, &body).await?;
                JobEnd::Requeued {
                    reason: "interrupted".into(),
                }
            }
        })
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
