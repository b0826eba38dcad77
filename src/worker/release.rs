//! Held jobs leaving the ledger: what a parent's end (or a release by
//! hand, or the sweep) freed is sent, or cancelled with its reason; a
//! cancelled dependant ends as a parent too, so its own dependants follow.
//!
//! The ledger freed each row once (see `events::ledger::holds`); this sends
//! it and only then marks it released. A worker that dies in between
//! leaves the row `releasing`, and the sweep ([`Worker::sweep_holds`])
//! sends it after `release_grace`.

use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::Worker;
use super::delivery::Delivery;
use crate::events::ledger::{ChildState, Freed, Ledger};
use crate::events::observe::Observer;
use crate::job::event::EventType;
use crate::queue::{Queue, Received};
use crate::retry::Backoff;

const SEND_TRIES: u32 = 4;
const SEND_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Set (to anything) only by tests: a worker that freed a dependant stops
/// there, before sending it, as if it died (the test then kills it).
const HALT_BEFORE_RELEASE: &str = "RENDERQ_TEST_HALT_BEFORE_RELEASE";

/// A queue, its ledger and whom to tell: what a release needs.
#[derive(Debug, Clone, Copy)]
pub struct Releaser<'a> {
    pub queue: &'a Queue,
    pub ledger: &'a Ledger,
    pub observer: &'a Observer,
}

impl Releaser<'_> {
    /// Sends (or cancels) what was freed, and what cancelling that frees in
    /// turn; returns the rows released.
    pub async fn apply(&self, mut freed: Vec<Freed>) -> usize {
        let mut released = 0;
        while !freed.is_empty() {
            let mut done = Vec::with_capacity(freed.len());
            let mut next = Vec::new();
            for row in freed {
                let ended = match &row.cancelled {
                    None => {
                        let sent = self.send(&row).await;
                        released += usize::from(sent);
                        sent
                    }
                    Some(reason) => self
                        .cancel(&row, reason)
                        .await
                        .map(|more| next.extend(more))
                        .is_some(),
                };
                if ended {
                    done.push(row);
                }
            }
            if let Err(error) = self.ledger.holds_done(done).await {
                // The rows stay as they are; the sweep takes them again.
                warn!(%error, "cannot mark released jobs in the ledger");
            }
            freed = next;
        }
        released
    }

    /// One held message into the queue; false when the queue refused it
    /// (the sweep tries again).
    async fn send(&self, row: &Freed) -> bool {
        let sent = SEND_RETRY
            .retry(
                SEND_TRIES,
                "sending a released job",
                |_| true,
                || self.queue.send(&row.body),
            )
            .await;
        let delivery = held_delivery(&row.body);
        let subject = delivery.subject(self.queue.name());
        match sent {
            Ok(message_id) => {
                info!(job_id = %subject.job.job_id, %message_id, by = %row.by, "Held job released.");
                self.observer.job_event(
                    EventType::JobReleased,
                    &subject,
                    json!({"released_by": row.by}),
                );
                true
            }
            Err(error) => {
                warn!(%error, job_id = %subject.job.job_id, "cannot send a released job; the sweep will");
                false
            }
        }
    }

    /// Ends a held job as cancelled: counted for its array, announced, and
    /// its own dependants freed. `None` when the ledger could not be
    /// written (the sweep tries again).
    async fn cancel(&self, row: &Freed, reason: &str) -> Option<Vec<Freed>> {
        let delivery = held_delivery(&row.body);
        let subject = delivery.subject(self.queue.name());
        let (id, size, indexes) = match &subject.job.array {
            Some(array) => (array.job_id.clone(), array.size, vec![array.index]),
            None => (delivery.message_id.clone(), 0, Vec::new()),
        };
        if size > 0 {
            match self
                .ledger
                .children_settled(&id, size, indexes.clone(), ChildState::Cancelled)
                .await
            {
                Ok(Some(counts)) => self.observer.array_completed(&subject, &id, counts),
                Ok(None) => {}
                Err(error) => {
                    warn!(%error, "cannot record a cancelled dependant");
                    return None;
                }
            }
        }
        info!(job_id = %subject.job.job_id, %reason, "Held job cancelled: its parent did not succeed.");
        self.observer
            .job_event(EventType::JobCancelled, &subject, json!({"reason": reason}));
        match self
            .ledger
            .units_ended(&id, size, indexes, ChildState::Cancelled)
            .await
        {
            Ok(more) => Some(more),
            Err(error) => {
                warn!(%error, "cannot free the dependants of a cancelled dependant");
                Some(Vec::new())
            }
        }
    }
}

/// A held message as a delivery, for its events: named as its message will
/// be once sent.
pub(crate) fn held_delivery(body: &str) -> Delivery {
    Delivery::new(Received {
        message_id: String::new(),
        receipt: String::new(),
        body: body.to_owned(),
        receive_count: 0,
    })
}

impl Worker {
    /// After a job's end: frees (sends or cancels) its dependants. A plain
    /// job's end is recorded for dependants to come.
    pub(super) async fn release_dependants(&self, delivery: &Delivery, state: ChildState) {
        let source = self.source(delivery);
        let Some(ledger) = &source.ledger else {
            return;
        };
        let Ok(envelope) = &delivery.envelope else {
            return;
        };
        let freed = match &envelope.array {
            Some(array) => {
                ledger
                    .units_ended(&array.job_id, array.size, vec![array.index], state)
                    .await
            }
            None => {
                ledger
                    .units_ended(&delivery.message_id, 0, Vec::new(), state)
                    .await
            }
        };
        let freed = match freed {
            Ok(freed) => freed,
            Err(error) => {
                warn!(%error, "cannot free the job's dependants; the sweep will");
                return;
            }
        };
        if !freed.is_empty() && std::env::var_os(HALT_BEFORE_RELEASE).is_some() {
            warn!("{HALT_BEFORE_RELEASE}: halting before the release, as if dead");
            std::future::pending::<()>().await;
        }
        Releaser {
            queue: &source.queue,
            ledger,
            observer: &self.observer,
        }
        .apply(freed)
        .await;
    }

    /// Sends what workers freed and died before sending, `grace` after.
    pub async fn sweep_holds(&self, grace: Duration) {
        for source in &self.sources {
            let Some(ledger) = &source.ledger else {
                continue;
            };
            match ledger.stale_holds(grace).await {
                Ok(freed) if freed.is_empty() => {}
                Ok(freed) => {
                    info!(
                        rows = freed.len(),
                        queue = source.queue.name(),
                        "Sweep: releasing what a worker left."
                    );
                    Releaser {
                        queue: &source.queue,
                        ledger,
                        observer: &self.observer,
                    }
                    .apply(freed)
                    .await;
                }
                Err(error) => warn!(%error, "cannot sweep held jobs"),
            }
        }
    }
}
