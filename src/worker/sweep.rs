//! The dead-letter sweep: jobs the SQS redrive policy moved by itself (their
//! worker died during their last try, so nobody reported their end) are
//! counted for their arrays, so that every array completes, and their end
//! is published. Each one is then re-sent as renderq's own dead letter,
//! with its reason, so that the next sweep passes it by and `dlq list`
//! says why. A message that is not a renderq job is skipped (marked, with
//! that reason) and counted in `/metrics`.

use tracing::{info, warn};

use super::Worker;
use super::delivery::Delivery;
use crate::events::ledger::ChildState;
use crate::events::observe::JobEnd;
use crate::queue::MOVED_REASON as MOVED;
use crate::queue::{Queue, Received};

/// Dead letters one sweep looks at per queue.
const SWEEP: usize = 100;

impl Worker {
    /// Sweeps every SQS queue's dead-letter queue once.
    pub async fn sweep_dead_letters(&self) {
        for source in &self.sources {
            let Queue::Sqs(queue) = &source.queue else {
                continue;
            };
            let moved = match queue.moved_dead_letters(SWEEP).await {
                Ok(moved) => moved,
                Err(error) => {
                    warn!(%error, queue = queue.name(), "cannot sweep the dead-letter queue");
                    continue;
                }
            };
            for letter in moved {
                let delivery = Delivery::new(Received {
                    message_id: letter.message_id.clone(),
                    receipt: String::new(),
                    body: letter.body.clone(),
                    receive_count: letter.receives,
                });
                let subject = delivery.subject(queue.name());
                let reason = match &delivery.envelope {
                    Err(error) => {
                        warn!(%error, sqs_message_id = %letter.message_id, "A dead letter that is not a renderq job: skipped.");
                        self.observer.metrics().swept("skipped");
                        format!("not a renderq job: {error}")
                    }
                    Ok(envelope) => {
                        if let (Some(array), Some(ledger)) = (&envelope.array, &source.ledger) {
                            match ledger.child_settled(array, ChildState::DeadLettered).await {
                                Ok(Some(counts)) => {
                                    self.observer
                                        .array_completed(&subject, &array.job_id, counts)
                                }
                                Ok(None) => {}
                                Err(error) => {
                                    // Left for the next sweep, when it is
                                    // visible again.
                                    warn!(%error, "cannot count a moved dead letter for its array");
                                    continue;
                                }
                            }
                        }
                        info!(message_id = %delivery.message_id, "Counted a job the redrive policy dead-lettered.");
                        self.observer.metrics().swept("counted");
                        self.observer.ended(
                            &subject,
                            &JobEnd::DeadLettered {
                                reason: MOVED.into(),
                                ran: true,
                            },
                        );
                        MOVED.to_owned()
                    }
                };
                if let Err(error) = queue
                    .adopt_dead_letter(&letter, &delivery.message_id, &reason)
                    .await
                {
                    warn!(%error, "cannot mark a swept dead letter");
                }
            }
        }
    }
}
