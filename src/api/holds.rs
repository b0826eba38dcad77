//! Holding a job or an array by hand, and releasing it, for the endpoint
//! and the command line alike (the same shape as a cancel).
//!
//! A hold is recorded in the ledger of every queue it concerns. On an
//! embedded queue the job's messages that no worker holds are moved from
//! the queue into the ledger at once; SQS cannot take a message out by its
//! id, so there they are held at receive: a worker that receives one of
//! its messages (on either backend: a retry coming back) moves it into the
//! ledger, without using a try. On SQS the hold answers once every
//! worker's receive sees it (`Ledger::hold_seen_within`, a second).
//! Running ones finish. A release sends every held message that waits for
//! no parent; the others go when their parents end. A hold of a job that
//! no queue's ledger knows is refused, naming `job_id`.

use serde::Serialize;
use serde_json::json;
use tracing::info;

use super::control::{Control, ControlError, job_id};
use crate::events::ledger::Ledger;
use crate::job::event::EventType;
use crate::job::id::Id;
use crate::job::params::FieldError;
use crate::queue::Queue;
use crate::worker::delivery::Delivery;
use crate::worker::release::{Releaser, held_delivery};

/// What a hold or a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldOutcome {
    Held,
    AlreadyHeld,
    Released,
    /// A release of a job nobody held by hand.
    NotHeld,
}

/// The answer to a hold or a release.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    pub job_id: String,
    pub outcome: HoldOutcome,
    pub queues: Vec<String>,
    /// Queued messages moved into the ledger (a hold), or sent (a
    /// release).
    pub moved: u32,
}

impl Control {
    /// The queues with a ledger (one, or all) a hold or release concerns.
    fn hold_targets(
        &self,
        queue: Option<String>,
    ) -> Result<Vec<(String, Queue, Ledger)>, FieldError> {
        let names: Vec<String> = match queue {
            Some(name) => vec![self.queue(Some(name))?.0],
            None => self.queues().names().map(str::to_owned).collect(),
        };
        let targets: Vec<_> = names
            .into_iter()
            .filter_map(|name| {
                let queue = self.queues().get(&name)?.clone();
                let ledger = self.ledgers().get(&name)?.clone();
                Some((name, queue, ledger))
            })
            .collect();
        if targets.is_empty() {
            return Err(FieldError::new(
                "queue_name",
                "holds need a queue with a ledger (an SQS queue's `status_bucket`) to keep the held messages",
            ));
        }
        Ok(targets)
    }

    /// Holds a job, or every child of an array not started yet.
    pub async fn hold(&self, job: &str, queue: Option<String>) -> Result<HoldReport, ControlError> {
        let job = &job_id(job)?;
        let mut report = HoldReport {
            job_id: job.to_string(),
            outcome: HoldOutcome::AlreadyHeld,
            queues: Vec::new(),
            moved: 0,
        };
        let targets = self.known_to(self.hold_targets(queue)?, job).await?;
        let mut seen_within = std::time::Duration::ZERO;
        for (name, queue, ledger) in targets {
            seen_within = seen_within.max(ledger.hold_seen_within());
            if ledger.hold_by_hand(job.as_str()).await? {
                report.outcome = HoldOutcome::Held;
            }
            if let Queue::Local(local) = &queue {
                let found =
                    local
                        .cancel_queued(job)
                        .await
                        .map_err(|source| ControlError::Queue {
                            queue: name.clone(),
                            source,
                        })?;
                for (message_id, body) in found.queued {
                    report.moved +=
                        u32::from(self.park(&name, &ledger, job, message_id, body).await?);
                }
            }
            report.queues.push(name);
        }
        if report.outcome == HoldOutcome::Held {
            // Until then a worker may still start one it received.
            tokio::time::sleep(seen_within).await;
        }
        info!(job_id = %job, outcome = ?report.outcome, moved = report.moved, "Hold recorded.");
        Ok(report)
    }

    /// The targets whose ledger knows `job` (its submit registered it);
    /// refused, naming `job_id`, when none does.
    async fn known_to(
        &self,
        targets: Vec<(String, Queue, Ledger)>,
        job: &Id,
    ) -> Result<Vec<(String, Queue, Ledger)>, ControlError> {
        let names: Vec<String> = targets.iter().map(|t| t.0.clone()).collect();
        let mut known = Vec::with_capacity(targets.len());
        for target in targets {
            if target.2.registered(job.as_str()).await?.is_some() {
                known.push(target);
            }
        }
        if known.is_empty() {
            return Err(FieldError::new(
                "job_id",
                format!("no job {job} on queue(s) {}", names.join(", ")),
            )
            .into());
        }
        Ok(known)
    }

    /// Moves one queued message of a held job into the ledger; false (and
    /// sent back) when the hold was released meanwhile.
    async fn park(
        &self,
        queue: &str,
        ledger: &Ledger,
        job: &Id,
        message_id: String,
        body: String,
    ) -> Result<bool, ControlError> {
        let delivery = Delivery::new(crate::queue::Received {
            message_id,
            receipt: String::new(),
            body,
            receive_count: 0,
        });
        let body = delivery.resend_body(|_| {});
        let (id, size, index) = match delivery
            .envelope
            .as_ref()
            .ok()
            .and_then(|e| e.array.as_ref())
        {
            Some(a) => (a.job_id.clone(), a.size, a.index),
            None => (delivery.message_id.clone(), 0, 0),
        };
        let parked = ledger
            .park(job.as_str(), &id, size, index, body.clone())
            .await?;
        let subject = held_delivery(&body).subject(queue);
        if parked {
            self.observer().job_event(
                EventType::JobHeld,
                &subject,
                json!({"reason": format!("held by hand ({job})")}),
            );
        } else if let Some(queue) = self.queues().get(queue) {
            queue
                .send(&body)
                .await
                .map_err(|source| ControlError::Queue {
                    queue: queue.name().to_owned(),
                    source,
                })?;
        }
        Ok(parked)
    }

    /// Releases a job held by hand: what waits for no parent is sent.
    pub async fn release(
        &self,
        job: &str,
        queue: Option<String>,
    ) -> Result<HoldReport, ControlError> {
        let job = &job_id(job)?;
        let mut report = HoldReport {
            job_id: job.to_string(),
            outcome: HoldOutcome::NotHeld,
            queues: Vec::new(),
            moved: 0,
        };
        for (name, queue, ledger) in self.hold_targets(queue)? {
            let Some(freed) = ledger.release_by_hand(job.as_str()).await? else {
                continue;
            };
            report.outcome = HoldOutcome::Released;
            let releaser = Releaser {
                queue: &queue,
                ledger: &ledger,
                observer: self.observer(),
                reach: self.reach(),
            };
            report.moved += releaser.apply(freed).await as u32;
            report.queues.push(name);
        }
        info!(job_id = %job, outcome = ?report.outcome, sent = report.moved, "Release recorded.");
        Ok(report)
    }
}
