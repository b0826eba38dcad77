//! The listen half: receive → check → run → post-tasks → delete.
//!
//! [`Worker::process_next`] is one step (one message, or none); the slot
//! loops in [`Worker::run`] call it until shutdown, and tests call it
//! directly to drain a queue without sleeping.
//!
//! A message is deleted only after the command and every task succeeded. A
//! job that fails is left in the queue with a back-off delay; one that can
//! never run (malformed, not allowed, invalid) is dead-lettered at once; one
//! cut short by shutdown is handed straight back without using up a try.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::catalog::Catalog;
use crate::commands::{CommandError, Progress, ProgressSink, RunContext};
use crate::config::WorkerConfig;
use crate::delivery::Delivery;
use crate::drain::{Registered, RunningJobs};
use crate::event::EventType;
use crate::job::{Vars, mime_ext};
use crate::ledger::{ChildState, Ledger};
use crate::lifecycle::{Shutdown, StopReason};
use crate::observe::{JobEnd, Observer, Subject};
use crate::queue::{DeadLetter, Queue, QueueError, Received};
use crate::retry::Backoff;
use crate::tasks::{TaskError, TaskRunner};

/// Waits between receives while the queue cannot be reached.
const QUEUE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No message arrived within the wait (or shutdown began).
    Empty,
    Processed {
        message_id: String,
        end: JobEnd,
    },
}

/// Why a job did not succeed; decides what happens to its message.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// Worth another try.
    #[error("{0}")]
    Retryable(String),
    /// Can never run (malformed, refused): dead-lettered unrun.
    #[error("{0}")]
    Refused(String),
    /// Ran and failed in a way no retry fixes: dead-lettered now.
    #[error("{0}")]
    Permanent(String),
    #[error("interrupted by shutdown")]
    Interrupted,
}

pub struct Worker {
    queue: Queue,
    catalog: Arc<Catalog>,
    tasks: TaskRunner,
    config: WorkerConfig,
    /// Logs and publishes what happens to jobs.
    observer: Observer,
    /// The queue's ledger: reported tries, array children.
    ledger: Option<Ledger>,
    /// Jobs received and not yet settled, across slots.
    running: RunningJobs,
    /// Slots, each pulling jobs on its own.
    slots: usize,
    /// The GPU each slot is pinned to, by slot (round robin); empty when
    /// slots are not pinned.
    gpus: Vec<u32>,
}

impl Worker {
    pub fn new(
        queue: Queue,
        catalog: Arc<Catalog>,
        tasks: TaskRunner,
        config: WorkerConfig,
        observer: Observer,
        ledger: Option<Ledger>,
        gpus: Vec<u32>,
    ) -> Self {
        Self {
            slots: config.slots.unwrap_or(gpus.len().max(1)),
            gpus,
            queue,
            catalog,
            tasks,
            config,
            observer,
            ledger,
            running: RunningJobs::default(),
        }
    }

    /// Runs `slots` loops of [`Self::process_next`] until a stop is
    /// requested; then drains to the stop's deadline: jobs that cannot
    /// finish in time are handed back early (see [`crate::drain`]), and
    /// whatever still runs at the deadline is cancelled and handed back.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        for slot in 0..self.slots {
            let (worker, stop, abort) = (self.clone(), shutdown.token().clone(), abort.clone());
            tracker.spawn(
                async move { worker.slot_loop(slot, &stop, &abort).await }
                    .instrument(info_span!("slot", slot)),
            );
        }
        tracker.close();
        self.observer.metrics().slots(self.slots);
        info!(queue = %self.queue.name(), slots = self.slots, gpus = ?self.gpus, "Worker started.");
        self.observer.worker_event(
            EventType::WorkerStarted,
            json!({"queue": self.queue.name(), "slots": self.slots, "gpus": self.gpus}),
        );
        shutdown.token().cancelled().await;
        let Some(first) = shutdown.stop() else {
            return;
        };
        let notice = !matches!(first.reason, StopReason::Signal(_));
        let left = first.deadline.saturating_duration_since(Instant::now());
        info!(reason = first.reason.name(), deadline_in = ?left, "Worker stopping: no new jobs will be received.");
        self.observer.worker_event(
            if notice {
                EventType::WorkerInterrupted
            } else {
                EventType::WorkerStopping
            },
            json!({"reason": first.reason.name(), "deadline_in_ms": left.as_millis() as u64}),
        );
        loop {
            let stop = shutdown.stop().unwrap_or(first);
            // An instance notice leaves a margin and releases what cannot
            // make it; a signal lets every job run to the drain deadline.
            let cutoff = if notice {
                let cutoff = stop
                    .deadline
                    .checked_sub(self.config.stop_margin)
                    .unwrap_or(stop.deadline);
                let released = self.running.release_late(cutoff, self.config.unknown_eta);
                if released > 0 {
                    info!(
                        released,
                        "Handing back jobs that cannot finish before the deadline."
                    );
                }
                cutoff
            } else {
                stop.deadline
            };
            tokio::select! {
                _ = tracker.wait() => break,
                _ = shutdown.changed() => continue,
                // Progress may change a job's prospects.
                _ = tokio::time::sleep(Duration::from_millis(500)), if notice => continue,
                _ = tokio::time::sleep_until(cutoff) => {
                    if self.running.is_empty() {
                        // A job a late receive brings in is handed back at once.
                        info!("No job is running; waiting for receives already sent to end.");
                    } else {
                        warn!("Drain deadline passed: cancelling running jobs and returning them to the queue.");
                    }
                    abort.cancel();
                    tracker.wait().await;
                    break;
                }
            }
        }
        self.catalog.stop().await;
        info!("Worker stopped.");
    }

    async fn slot_loop(&self, slot: usize, stop: &CancellationToken, abort: &CancellationToken) {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            match self.step(slot, stop, abort).await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let delay = QUEUE_BACKOFF.delay(failures);
                    error!(error = %e, retry_in = ?delay, "queue error");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// The jobs running now.
    pub fn running(&self) -> &RunningJobs {
        &self.running
    }

    /// One step: waits for a message (until `stop`, where the backend can
    /// stop safely) and handles it. A job, once received, is cut short only
    /// by `abort`.
    pub async fn process_next(
        &self,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Outcome, QueueError> {
        self.step(0, stop, abort).await
    }

    /// [`Self::process_next`] on a given slot (and so on its GPU).
    async fn step(
        &self,
        slot: usize,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Outcome, QueueError> {
        let received = self
            .queue
            .receive(self.config.wait_time, self.config.visibility_timeout, stop)
            .await;
        let metrics = self.observer.metrics();
        metrics.received(match &received {
            Ok(Some(_)) => "message",
            Ok(None) => "empty",
            Err(_) => "error",
        });
        let Some(received) = received? else {
            return Ok(Outcome::Empty);
        };
        let delivery = Delivery::new(received);
        let span = info_span!(
            "job",
            queue = %self.queue.name(),
            message_id = %delivery.message_id,
            attempt = delivery.attempt,
        );
        // Each job can be handed back on its own (see `run`).
        let cancel = abort.child_token();
        let registered = self.running.register(cancel.clone());
        metrics.busy(1);
        let gpu = (!self.gpus.is_empty()).then(|| self.gpus[slot % self.gpus.len()]);
        let end = self
            .handle(&delivery, &cancel, &registered.progress, gpu)
            .instrument(span)
            .await;
        drop(registered);
        metrics.busy(-1);
        Ok(Outcome::Processed {
            message_id: delivery.message_id,
            end: end?,
        })
    }

    /// Runs the job, settles its message, and reports how it ended.
    async fn handle(
        &self,
        delivery: &Delivery,
        abort: &CancellationToken,
        progress: &Arc<Mutex<Option<f64>>>,
        gpu: Option<u32>,
    ) -> Result<JobEnd, QueueError> {
        info!("Received job from queue.");
        let subject = delivery.subject(self.queue.name());
        let budget = self.queue.max_receive_count();
        let outcome = if delivery.attempt > budget {
            // Its last try was handed out and never reported back.
            Err(JobError::Refused(format!(
                "worker lost during its last try (try {} of {budget})",
                delivery.attempt - 1
            )))
        } else {
            self.check_previous_try(delivery, &subject).await;
            let started = Instant::now();
            let _heartbeat = self.heartbeat(&delivery.received);
            // `abort` reaches the command through its run context, so it
            // can stop in its own way (SIGTERM and a grace, an adaptor's
            // `cancel`).
            tokio::time::timeout(
                self.config.max_runtime,
                self.execute(delivery, &subject, abort, progress, gpu),
            )
            .await
            .unwrap_or_else(|_| {
                Err(JobError::Retryable(format!(
                    "job exceeded max_runtime of {}",
                    humantime::format_duration(self.config.max_runtime)
                )))
            })
            .map(|outputs| (outputs, started.elapsed()))
        };
        let end = self.settle(delivery, outcome).await?;
        self.observer.ended(&subject, &end);
        self.count_array_child(delivery, &subject, &end).await;
        Ok(end)
    }

    /// A try after the first whose predecessor never reported a failure:
    /// the worker running it was lost.
    async fn check_previous_try(&self, delivery: &Delivery, subject: &Subject) {
        let (Some(ledger), true) = (&self.ledger, delivery.attempt > 1) else {
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
    async fn count_array_child(&self, delivery: &Delivery, subject: &Subject, end: &JobEnd) {
        let state = match end {
            JobEnd::Succeeded { .. } => ChildState::Succeeded,
            JobEnd::DeadLettered { .. } => ChildState::DeadLettered,
            JobEnd::WillRetry { .. } | JobEnd::Requeued { .. } => return,
        };
        let (Some(ledger), Ok(Some(array))) = (
            &self.ledger,
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
    async fn settle(
        &self,
        delivery: &Delivery,
        outcome: Result<(Vec<String>, Duration), JobError>,
    ) -> Result<JobEnd, QueueError> {
        let receipt = &delivery.received.receipt;
        Ok(match outcome {
            Ok((outputs, duration)) => {
                match self.queue.delete(receipt).await {
                    Err(QueueError::StaleReceipt) => {
                        // Someone else holds the message now and will run it
                        // again; our outputs were written to the same keys.
                        warn!("Job finished after its receipt expired; it may run again.");
                    }
                    other => other?,
                }
                JobEnd::Succeeded { outputs, duration }
            }
            Err(JobError::Retryable(reason))
                if delivery.attempt >= self.queue.max_receive_count() =>
            {
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
                if let Some(ledger) = &self.ledger
                    && let Err(error) = ledger
                        .report_failure(&delivery.message_id, delivery.attempt)
                        .await
                {
                    warn!(%error, "cannot record the failed try in the ledger");
                }
                self.queue.retry_later(receipt, delay, &reason).await?;
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
            Err(JobError::Interrupted) => {
                // This try does not count; the ones before it still do.
                let body = delivery.resend_body(|envelope| {
                    envelope.interrupts += 1;
                    envelope.failures = delivery.attempt - 1;
                });
                self.queue.requeue(&delivery.received, &body).await?;
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
        self.queue
            .dead_letter(&delivery.received, &body, &note)
            .await
    }

    /// Checks, runs the command, then the tasks in order (each on every
    /// output); returns where the outputs went.
    async fn execute(
        &self,
        delivery: &Delivery,
        subject: &Subject,
        abort: &CancellationToken,
        progress_cell: &Arc<Mutex<Option<f64>>>,
        gpu: Option<u32>,
    ) -> Result<Vec<String>, JobError> {
        let envelope = delivery
            .envelope
            .as_ref()
            .map_err(|e| JobError::Refused(e.clone()))?;
        let job = self
            .catalog
            .validate(&envelope.command, &envelope.parameters, &envelope.tasks)
            .map_err(|e| JobError::Refused(format!("invalid job: {e}")))?;

        let waited = envelope
            .submitted_at
            .as_deref()
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .and_then(|at| {
                (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
                    .to_std()
                    .ok()
            });
        self.observer.started(subject, waited);
        let frames = envelope
            .array
            .as_ref()
            .map(|a| a.frames.clone())
            .unwrap_or_default();
        let progress = {
            let (observer, subject, cell) = (
                self.observer.clone(),
                subject.clone(),
                progress_cell.clone(),
            );
            Progress::with_sink(ProgressSink(Arc::new(move |percent| {
                Registered::report(&cell, percent);
                observer.progress(&subject, percent)
            })))
        };
        let ctx = RunContext {
            cancel: abort.clone(),
            progress,
            job_id: envelope.job_id.clone(),
            frames: frames.clone(),
            gpu,
        };
        let outputs = job
            .command
            .run(&job.parameters, &ctx)
            .await
            .map_err(|e| match e {
                CommandError::Cancelled => JobError::Interrupted,
                CommandError::Failed(reason) => {
                    JobError::Retryable(format!("command {} failed: {reason}", job.command.name))
                }
            })?;
        info!(
            outputs = outputs.len(),
            "Executed command: {}.", job.command.name
        );

        let first_frame = frames.first().map(i64::to_string).unwrap_or_else(|| {
            match job.parameters.get("frame") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            }
        });
        let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let mut locations = Vec::new();
        for task in &job.tasks {
            info!("Executing task: {}.", task.name());
            for output in &outputs {
                let ext = mime_ext(&output.mime);
                let vars = Vars {
                    message_id: &delivery.message_id,
                    job_id: envelope.template_job_id(),
                    mime_ext: &ext,
                    command: &envelope.command,
                    array_index: envelope
                        .array
                        .as_ref()
                        .map(|a| a.index.to_string())
                        .unwrap_or_default(),
                    frame: output
                        .frame
                        .map_or_else(|| first_frame.clone(), |f| f.to_string()),
                    output_name: output.name.clone(),
                    date: date.clone(),
                };
                let task_started = Instant::now();
                let ran = tokio::select! {
                    ran = task.run(&self.tasks, output, &vars) => ran,
                    _ = abort.cancelled() => return Err(JobError::Interrupted),
                };
                match ran {
                    Ok(location) => {
                        self.observer.task_ended(
                            subject,
                            task.name(),
                            Ok(&location),
                            task_started.elapsed(),
                        );
                        locations.push(location);
                    }
                    Err(error) => {
                        self.observer.task_ended(
                            subject,
                            task.name(),
                            Err(&error.to_string()),
                            task_started.elapsed(),
                        );
                        return Err(match error {
                            TaskError::Retryable(e) => {
                                JobError::Retryable(format!("task {} failed: {e}", task.name()))
                            }
                            TaskError::Permanent(e) => JobError::Permanent(format!(
                                "task {} failed for good: {e}",
                                task.name()
                            )),
                        });
                    }
                }
            }
        }
        Ok(locations)
    }

    /// Keeps the message invisible while the job runs by extending its
    /// visibility every third of the timeout (leaving room for a slow or
    /// failed extension). It stops when the guard is dropped.
    fn heartbeat(&self, message: &Received) -> DropGuard {
        let stop = CancellationToken::new();
        let (queue, receipt, visibility, observer) = (
            self.queue.clone(),
            message.receipt.clone(),
            self.config.visibility_timeout,
            self.observer.clone(),
        );
        let guard = stop.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(visibility / 3) => {}
                        _ = guard.cancelled() => return,
                    }
                    let extended = queue.extend(&receipt, visibility).await;
                    observer.metrics().heartbeat(extended.is_ok());
                    match extended {
                        Ok(()) => tracing::debug!("visibility extended"),
                        Err(e) => {
                            warn!(error = %e, "heartbeat could not extend visibility");
                            if matches!(e, QueueError::StaleReceipt) {
                                return;
                            }
                        }
                    }
                }
            }
            .in_current_span(),
        );
        stop.drop_guard()
    }
}
