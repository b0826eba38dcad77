//! Job control, for the endpoint and the command line alike: cancel a job
//! or a whole array, and put one job's (or one array's) dead letters back.
//!
//! A cancel is recorded in the ledger of every queue it concerns, where
//! workers read it when they receive a message and at each heartbeat. On
//! the embedded queue it also deletes, at once, the job's messages that no
//! worker holds, so they never run, and counts the ones that are held. SQS
//! cannot look into a queue: there the answer says the cancel was
//! recorded, and workers delete the job's messages as they receive them.

use std::sync::Arc;

use serde::Serialize;
use tracing::info;

use crate::events::ledger::{ArrayCounts, ChildState, Ledger, Ledgers};
use crate::events::observe::{JobEnd, Observer};
use crate::events::status::StatusTable;
use crate::job::id::Id;
use crate::job::params::FieldError;
use crate::queue::{Queue, QueueError, Queues, Received, Redrive};
use crate::worker::delivery::Delivery;
use crate::worker::release::{Reach, Releaser};

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// Recorded now.
    Cancelled,
    /// Recorded by an earlier cancel; nothing more was done.
    AlreadyCancelled,
    /// The job or array had already ended (the status table or the ledger
    /// says so); nothing was recorded.
    AlreadyFinished,
}

/// The answer to a redrive.
#[derive(Debug, Clone, Serialize)]
pub struct RedriveReport {
    pub queue: String,
    /// The job's or the array's id, in its one spelling.
    pub job_id: String,
    /// Dead letters put back.
    pub redriven: usize,
}

/// The answer to a cancel.
#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// The id cancelled, in its one spelling.
    pub job_id: String,
    pub outcome: CancelOutcome,
    /// The queues whose ledgers recorded it.
    pub queues: Vec<String>,
    /// Messages of the job held by workers (running, or waiting out a
    /// retry's back-off), which they stop; `null` where the queue cannot
    /// tell (SQS).
    pub cancelled: Option<u32>,
    /// Queued messages deleted unrun; `null` where the queue cannot tell.
    pub skipped_queued: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("queue `{queue}`: {source}")]
    Queue { queue: String, source: QueueError },
    #[error("{0}")]
    Ledger(#[from] crate::events::ledger::LedgerError),
}

/// Cancels and redrives, over every configured queue.
#[derive(Debug, Clone)]
pub struct Control {
    queues: Queues,
    ledgers: Ledgers,
    observer: Observer,
    status: Option<Arc<StatusTable>>,
    default_queue: String,
    /// Most dead letters one redrive moves.
    max_redrive: usize,
}

/// An id as it came in (a parameter, an argument, a form field), in its
/// one spelling; refused, naming the field, when it is not a UUID.
pub fn job_id(id: &str) -> Result<Id, FieldError> {
    Id::parse(id).map_err(|e| FieldError::new("job_id", e.to_string()))
}

impl Control {
    pub fn new(
        queues: Queues,
        ledgers: Ledgers,
        observer: Observer,
        status: Option<Arc<StatusTable>>,
        default_queue: String,
        max_redrive: usize,
    ) -> Self {
        Self {
            queues,
            ledgers,
            observer,
            status,
            default_queue,
            max_redrive,
        }
    }

    pub(super) fn queues(&self) -> &Queues {
        &self.queues
    }

    pub(super) fn ledgers(&self) -> &Ledgers {
        &self.ledgers
    }

    /// Every queue and its ledger: where dependants on other queues are.
    pub(super) fn reach(&self) -> Reach<'_> {
        Reach {
            queues: &self.queues,
            ledgers: &self.ledgers,
        }
    }

    pub(super) fn observer(&self) -> &Observer {
        &self.observer
    }

    /// A `queue_name` (default: `default_queue`) and its queue.
    pub fn queue(&self, name: Option<String>) -> Result<(String, &Queue), FieldError> {
        let name = name.unwrap_or_else(|| self.default_queue.clone());
        match self.queues.get(&name) {
            Some(queue) => Ok((name, queue)),
            None => Err(FieldError::new(
                "queue_name",
                format!("no queue `{name}` is configured"),
            )),
        }
    }

    /// Puts a job's dead letters (an array's: every dead-lettered child)
    /// back in their queue with a fresh budget of tries; says how many.
    pub async fn redrive(
        &self,
        job: &str,
        queue: Option<String>,
    ) -> Result<RedriveReport, ControlError> {
        let job = job_id(job)?;
        let (name, queue) = self.queue(queue)?;
        let redriven = queue
            .dlq_redrive(self.max_redrive, &Redrive::Job(job.clone()))
            .await
            .map_err(|source| ControlError::Queue {
                queue: name.clone(),
                source,
            })?;
        info!(queue = %name, job_id = %job, redriven, "Dead letters redriven.");
        Ok(RedriveReport {
            queue: name,
            job_id: job.to_string(),
            redriven,
        })
    }

    /// Cancels a job, or every child of an array, on `queue` or (without
    /// one) on every queue that has a ledger.
    /// `job` may be the id the submit returned for a job or an array, a
    /// job id, or one message's id (one child of an array).
    pub async fn cancel(
        &self,
        job: &str,
        queue: Option<String>,
    ) -> Result<CancelReport, ControlError> {
        let job = &job_id(job)?;
        let targets: Vec<(&str, &Queue, &Ledger)> = match queue {
            Some(name) => {
                let (_, queue) = self.queue(Some(name))?;
                let name = queue.name();
                let ledger = self.ledgers.get(name).ok_or_else(|| no_ledger(name))?;
                vec![(name, queue, ledger)]
            }
            None => self
                .queues
                .names()
                .filter_map(|name| Some((name, self.queues.get(name)?, self.ledgers.get(name)?)))
                .collect(),
        };
        if targets.is_empty() {
            return Err(no_ledger(&self.default_queue).into());
        }
        let mut report = CancelReport {
            job_id: job.to_string(),
            outcome: CancelOutcome::AlreadyCancelled,
            queues: Vec::new(),
            cancelled: Some(0),
            skipped_queued: Some(0),
        };
        if self.finished(job, &targets).await? {
            report.outcome = CancelOutcome::AlreadyFinished;
            return Ok(report);
        }
        for (name, queue, ledger) in targets {
            if ledger.cancel(job).await? {
                report.outcome = CancelOutcome::Cancelled;
            }
            // Held in the ledger (waiting for parents, or by hand): never
            // sent, and their own dependants follow.
            let held = ledger
                .cancel_held(job.as_str(), "cancelled by hand")
                .await?;
            Releaser {
                queue,
                ledger,
                observer: &self.observer,
                reach: self.reach(),
            }
            .apply(held)
            .await;
            report.queues.push(name.to_owned());
            match queue {
                Queue::Local(local) => {
                    let found =
                        local
                            .cancel_queued(job)
                            .await
                            .map_err(|source| ControlError::Queue {
                                queue: name.to_owned(),
                                source,
                            })?;
                    report.cancelled = report.cancelled.map(|n| n + found.held);
                    report.skipped_queued =
                        (report.skipped_queued).map(|n| n + found.queued.len() as u32);
                    self.settle_unrun(queue, ledger, found.queued).await;
                }
                Queue::Sqs(_) => (report.cancelled, report.skipped_queued) = (None, None),
            }
        }
        info!(job_id = %job, outcome = ?report.outcome, running = ?report.cancelled,
            skipped_queued = ?report.skipped_queued, "Cancel recorded.");
        Ok(report)
    }

    /// Whether the job, or the array, had ended before the cancel.
    async fn finished(
        &self,
        job: &Id,
        targets: &[(&str, &Queue, &Ledger)],
    ) -> Result<bool, ControlError> {
        if let Some(table) = self.status.clone() {
            let id = job.to_string();
            let status = tokio::task::spawn_blocking(move || table.get(&id))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            if status.is_some_and(|s| s.is_final()) {
                return Ok(true);
            }
        }
        for (_, _, ledger) in targets {
            if ledger.completed(job.as_str()).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Announces messages deleted unrun as cancelled, counts array
    /// children in the ledger (which may complete the array, or its
    /// revision), and frees their dependants.
    async fn settle_unrun(&self, queue: &Queue, ledger: &Ledger, messages: Vec<(String, String)>) {
        // By ledger slot: its size, the indexes, and the array and revision.
        type Slot = (u32, Vec<u32>, String, Option<u32>);
        let mut arrays: std::collections::BTreeMap<String, Slot> = Default::default();
        // By array: its size and the indexes whose dependants are freed.
        let mut units: std::collections::BTreeMap<String, (u32, Vec<u32>)> = Default::default();
        let mut plain = Vec::new();
        let mut last = None;
        for (message_id, body) in messages {
            let delivery = Delivery::new(Received {
                message_id,
                receipt: String::new(),
                body,
                receive_count: 0,
            });
            let subject = delivery.subject(queue.name());
            self.observer.ended(&subject, &JobEnd::Cancelled);
            match delivery.envelope.as_ref().map(|e| e.array.as_ref()) {
                Ok(Some(array)) => {
                    // A re-render's children are counted in their revision.
                    let (id, size, index) = array.ledger_slot();
                    let entry = arrays.entry(id).or_default();
                    entry.0 = size;
                    entry.1.push(index);
                    entry.2.clone_from(&array.job_id);
                    entry.3 = array.revision.map(|r| r.number);
                    let unit = units.entry(array.job_id.clone()).or_default();
                    unit.0 = array.size;
                    unit.1.push(array.index);
                }
                _ => plain.push(delivery.message_id.clone()),
            }
            last = Some(subject);
        }
        for (slot, (size, indexes, array_id, revision)) in arrays {
            match ledger
                .children_settled(&slot, size, indexes, ChildState::Cancelled)
                .await
            {
                Ok(Some(counts)) => {
                    if let Some(subject) = &last {
                        let counts = ArrayCounts { revision, ..counts };
                        self.observer.array_completed(subject, &array_id, counts);
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::error!(%error, "cannot record the cancelled children"),
            }
        }
        let ended = (plain.into_iter().map(|id| (id, 0, Vec::new()))).chain(
            units
                .into_iter()
                .map(|(id, (size, indexes))| (id, size, indexes)),
        );
        let releaser = Releaser {
            queue,
            ledger,
            observer: &self.observer,
            reach: self.reach(),
        };
        for (id, size, indexes) in ended {
            match ledger
                .units_ended(&id, size, indexes, ChildState::Cancelled)
                .await
            {
                Ok(ended) => {
                    releaser.after_end(ended).await;
                }
                Err(error) => tracing::error!(%error, "cannot free the cancelled job's dependants"),
            }
        }
    }
}

fn no_ledger(queue: &str) -> FieldError {
    FieldError::new(
        "queue_name",
        format!(
            "queue `{queue}` keeps no ledger (an SQS queue needs `status_bucket`), \
             so a cancel cannot be recorded there"
        ),
    )
}
