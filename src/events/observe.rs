//! How a job's try went, as values, and the one place that tells the world:
//! the log line and the event for each (and, later, the metrics).
//!
//! The worker decides what happens to a message; it then hands the result
//! here as a [`JobEnd`], once. Nothing else in the worker logs a job's end
//! or publishes its events.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::events::ledger::ArrayCounts;
use crate::events::metrics::Metrics;
use crate::events::publish::Publisher;
use crate::job::event::{Event, EventType, JobRef, Notification};
use crate::job::inputs::Staged;
use crate::job::output::Thumbnail;
use crate::job::usage::Usage;

/// How one try of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// Done and deleted; where its outputs went.
    Succeeded {
        outputs: Vec<String>,
        /// Its image outputs' thumbnails, beside the ledger, with their
        /// frames.
        thumbnails: Vec<Thumbnail>,
        duration: Duration,
    },
    /// Failed; back in the queue after `delay`.
    WillRetry { reason: String, delay: Duration },
    /// Moved to the dead-letter queue. `ran` is false for a job that could
    /// never run (malformed, refused, lost on its last try).
    DeadLettered { reason: String, ran: bool },
    /// Handed back without using up a try (interruption).
    Requeued { reason: String },
    /// An operator cancelled it: deleted, never retried.
    Cancelled,
    /// Held by hand when it was received: moved into the ledger without
    /// using a try, until its release.
    Held { by: String },
}

/// A job as its events name it, with its subscriptions.
#[derive(Debug, Clone)]
pub struct Subject {
    pub job: JobRef,
    pub notifications: Vec<Notification>,
}

/// Logs, publishes and counts what happens to jobs.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    publisher: Publisher,
    metrics: Arc<Metrics>,
}

impl Observer {
    pub fn new(publisher: Publisher, metrics: Arc<Metrics>) -> Self {
        Self { publisher, metrics }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn publish(&self, kind: EventType, subject: &Subject, detail: Value) {
        // Without targets an event (a uuid, a timestamp, a copy of the job)
        // would be made per step only to be thrown away.
        if self.publisher.is_idle() {
            return;
        }
        self.publisher.publish(
            Event::new(kind, Some(subject.job.clone()), detail),
            &subject.notifications,
        );
    }

    /// A job's event that is not the end of a try (held, released, a
    /// dependant cancelled before it ran).
    pub fn job_event(&self, kind: EventType, subject: &Subject, detail: Value) {
        self.publish(kind, subject, detail);
    }

    /// Something that happened to the worker itself.
    pub fn worker_event(&self, kind: EventType, detail: Value) {
        self.publisher.publish(Event::new(kind, None, detail), &[]);
    }

    /// A redelivery no worker reported on: the worker before died.
    pub fn lost_before(&self, subject: &Subject) {
        warn!("The job's previous try never reported back: its worker was lost.");
        self.publish(
            EventType::JobRequeued,
            subject,
            json!({"reason": "worker lost"}),
        );
    }

    /// The command starts, `waited` after the submit.
    /// The command is about to run; `inputs` is what staging did, for a
    /// job with inputs.
    pub fn started(&self, subject: &Subject, waited: Option<Duration>, inputs: Option<&Staged>) {
        info!("Executing command: {}.", subject.job.command);
        self.metrics.job_started(waited);
        let detail = match inputs {
            Some(staged) => json!({"inputs": staged.to_json()}),
            None => json!({}),
        };
        self.publish(EventType::JobStarted, subject, detail);
    }

    /// Publishes progress (already throttled by the command's reporter).
    pub fn progress(&self, subject: &Subject, percent: f64) {
        self.publish(EventType::JobProgress, subject, json!({"percent": percent}));
    }

    pub fn task_ended(
        &self,
        subject: &Subject,
        task: &str,
        result: Result<&str, &str>,
        took: Duration,
    ) {
        self.metrics.task_ended(task, took);
        match result {
            Ok(location) => {
                info!(%location, "Executed task: {task}.");
                self.publish(
                    EventType::TaskSucceeded,
                    subject,
                    json!({"task": task, "location": location}),
                );
            }
            Err(reason) => {
                warn!(%reason, "Task failed: {task}.");
                self.publish(
                    EventType::TaskFailed,
                    subject,
                    json!({"task": task, "reason": reason}),
                );
            }
        }
    }

    /// The last child of an array reached a final state (announced by
    /// exactly one worker).
    pub fn array_completed(&self, child: &Subject, array_id: &str, counts: ArrayCounts) {
        info!(array_id, ?counts, "Array job completed.");
        let array = Subject {
            job: JobRef {
                job_id: array_id.to_owned(),
                message_id: String::new(),
                attempt: 0,
                array: None,
                ..child.job.clone()
            },
            notifications: child.notifications.clone(),
        };
        self.publish(EventType::ArrayJobCompleted, &array, json!(counts));
    }

    /// An array's tries reached its budget (announced by exactly one
    /// worker): its children not started yet are cancelled.
    /// `stopped`: what became of the children not started yet (`held`,
    /// `cancelled`, or `none` when neither could be recorded).
    pub fn budget_reached(
        &self,
        child: &Subject,
        array_id: &str,
        budget_usd: f64,
        cost_usd: f64,
        stopped: &str,
    ) {
        warn!(
            array_id,
            budget_usd,
            cost_usd,
            stopped,
            "Array reached its budget: its children not started yet are {stopped}."
        );
        let array = Subject {
            job: JobRef {
                job_id: array_id.to_owned(),
                message_id: String::new(),
                attempt: 0,
                array: None,
                ..child.job.clone()
            },
            notifications: child.notifications.clone(),
        };
        self.publish(
            EventType::BudgetReached,
            &array,
            json!({"budget_usd": budget_usd, "cost_usd": cost_usd, "stopped": stopped,
                   "reason": format!("budget of ${budget_usd} reached")}),
        );
    }

    /// The one report of how a try ended.
    pub fn ended(&self, subject: &Subject, end: &JobEnd) {
        self.ended_with(subject, end, None);
    }

    /// How a try that ran ended, with what it used (`usage` in its end
    /// event, SPEC §13).
    pub fn ended_with(&self, subject: &Subject, end: &JobEnd, usage: Option<&Usage>) {
        if let Some(usage) = usage {
            self.metrics.run_used(&subject.job.command, usage);
        }
        let with_usage = |mut detail: Value| {
            if let Some(usage) = usage {
                detail["usage"] = usage.to_json();
            }
            detail
        };
        let (outcome, duration) = match end {
            JobEnd::Succeeded { duration, .. } => ("succeeded", Some(*duration)),
            JobEnd::WillRetry { .. } => ("will_retry", None),
            JobEnd::DeadLettered { .. } => ("dead_lettered", None),
            JobEnd::Requeued { .. } => ("requeued", None),
            JobEnd::Cancelled => ("cancelled", None),
            JobEnd::Held { .. } => ("held", None),
        };
        self.metrics.job_ended(outcome, duration);
        match end {
            JobEnd::Succeeded {
                outputs,
                thumbnails,
                duration,
            } => {
                info!(
                    duration_ms = duration.as_millis() as u64,
                    "Job processed, removing from queue."
                );
                // Names and frames side by side: `thumbnails` stays the list
                // of names it always was.
                let names: Vec<&str> = thumbnails.iter().map(|t| t.name.as_str()).collect();
                let frames: Vec<Option<i64>> = thumbnails.iter().map(|t| t.frame).collect();
                self.publish(
                    EventType::JobSucceeded,
                    subject,
                    with_usage(
                        json!({"duration_ms": duration.as_millis() as u64, "outputs": outputs,
                           "thumbnails": names, "thumbnail_frames": frames}),
                    ),
                );
            }
            JobEnd::WillRetry { reason, delay } => {
                warn!(%reason, retry_in = ?delay, "Job failed, returning to queue for a retry.");
                self.publish(
                    EventType::JobFailed,
                    subject,
                    with_usage(json!({"reason": reason, "will_retry": true, "retry_in_ms": delay.as_millis() as u64})),
                );
            }
            JobEnd::DeadLettered { reason, ran } => {
                if *ran {
                    error!(%reason, "Job failed its last try, moving to the dead-letter queue.");
                    self.publish(
                        EventType::JobFailed,
                        subject,
                        with_usage(json!({"reason": reason, "will_retry": false})),
                    );
                } else {
                    error!(%reason, "Job cannot run, moving to the dead-letter queue.");
                }
                self.publish(
                    EventType::JobDeadLettered,
                    subject,
                    json!({"reason": reason}),
                );
            }
            JobEnd::Requeued { reason } => {
                info!(%reason, "Job interrupted, returning to queue.");
                self.publish(
                    EventType::JobRequeued,
                    subject,
                    with_usage(json!({"reason": reason})),
                );
            }
            JobEnd::Cancelled => {
                info!("Job cancelled, removing from queue.");
                self.publish(EventType::JobCancelled, subject, with_usage(json!({})));
            }
            JobEnd::Held { by } => {
                info!(%by, "Job held, moved from the queue to the ledger.");
                // The try was not used: its release comes at the same
                // attempt as this.
                let unused = Subject {
                    job: JobRef {
                        attempt: subject.job.attempt.saturating_sub(1),
                        ..subject.job.clone()
                    },
                    notifications: subject.notifications.clone(),
                };
                self.publish(
                    EventType::JobHeld,
                    &unused,
                    json!({"reason": format!("held by hand ({by})")}),
                );
            }
        }
    }
}
