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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::catalog::Catalog;
use crate::commands::{CommandError, Progress, RunContext};
use crate::config::WorkerConfig;
use crate::job::{Envelope, Vars, mime_ext};
use crate::queue::{DeadLetter, Queue, QueueError, Received};
use crate::retry::Backoff;
use crate::tasks::{TaskError, TaskRunner};

/// Waits between receives while the queue cannot be reached.
const QUEUE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No message arrived within the wait (or shutdown began).
    Empty,
    Processed {
        message_id: String,
        result: JobResult,
    },
}

/// How a received job ended this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    /// Done and deleted.
    Succeeded,
    /// Failed; left in the queue for another try after a back-off.
    WillRetry,
    /// Could never run; moved to the dead-letter queue.
    DeadLettered,
    /// Cut short by shutdown; handed back at once.
    Requeued,
}

/// Why a job did not succeed; decides what happens to its message.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("{0}")]
    Retryable(String),
    #[error("{0}")]
    Fatal(String),
    #[error("interrupted by shutdown")]
    Interrupted,
}

/// A received message, its envelope parsed once.
struct Delivery {
    received: Received,
    /// The job, or why the body is not one (a fatal error).
    envelope: Result<Envelope, String>,
    /// The id the submit returned; stays the same across re-sends.
    message_id: String,
    /// Tries used so far, this one included, across hand-backs.
    attempt: u32,
}

impl Delivery {
    fn new(received: Received) -> Self {
        let envelope = Envelope::parse(&received.body, &received.message_id);
        let (message_id, failures) = match &envelope {
            Ok(e) => (e.message_id(&received.message_id).to_owned(), e.failures),
            Err(_) => (received.message_id.clone(), 0),
        };
        Self {
            attempt: received.receive_count.saturating_add(failures),
            message_id,
            envelope,
            received,
        }
    }

    /// The body to send the job on with: its envelope, changed by `edit`
    /// and naming the submit's message id; an unreadable body as it was.
    fn resend_body(&self, edit: impl FnOnce(&mut Envelope)) -> String {
        match &self.envelope {
            Ok(envelope) => {
                let mut envelope = envelope.clone();
                envelope.message_id = Some(self.message_id.clone());
                edit(&mut envelope);
                envelope.to_body()
            }
            Err(_) => self.received.body.clone(),
        }
    }
}

pub struct Worker {
    queue: Queue,
    catalog: Arc<Catalog>,
    tasks: TaskRunner,
    config: WorkerConfig,
    /// Jobs received and not yet settled, across slots.
    running: AtomicUsize,
}

impl Worker {
    pub fn new(
        queue: Queue,
        catalog: Arc<Catalog>,
        tasks: TaskRunner,
        config: WorkerConfig,
    ) -> Self {
        Self {
            queue,
            catalog,
            tasks,
            config,
            running: AtomicUsize::new(0),
        }
    }

    /// Runs `slots` loops of [`Self::process_next`] until `shutdown`; then
    /// gives running jobs `drain_timeout` to finish before cancelling them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        for slot in 0..self.config.slots {
            let (worker, stop, abort) = (self.clone(), shutdown.clone(), abort.clone());
            tracker.spawn(
                async move { worker.slot_loop(&stop, &abort).await }
                    .instrument(info_span!("slot", slot)),
            );
        }
        tracker.close();
        info!(queue = %self.queue.name(), slots = self.config.slots, "Worker started.");
        shutdown.cancelled().await;
        info!(drain_timeout = ?self.config.drain_timeout, "Worker stopping: no new jobs will be received.");
        if tokio::time::timeout(self.config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            if self.running.load(Ordering::Relaxed) > 0 {
                warn!(
                    "Drain deadline passed: cancelling running jobs and returning them to the queue."
                );
            } else {
                // A job a late receive brings in is handed back at once.
                info!("No job is running; waiting for receives already sent to end.");
            }
            abort.cancel();
            tracker.wait().await;
        }
        self.catalog.stop().await;
        info!("Worker stopped.");
    }

    async fn slot_loop(&self, stop: &CancellationToken, abort: &CancellationToken) {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            match self.process_next(stop, abort).await {
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

    /// One step: waits for a message (until `stop`, where the backend can
    /// stop safely) and handles it. A job, once received, is cut short only
    /// by `abort`.
    pub async fn process_next(
        &self,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Outcome, QueueError> {
        let received = self
            .queue
            .receive(self.config.wait_time, self.config.visibility_timeout, stop)
            .await?;
        let Some(received) = received else {
            return Ok(Outcome::Empty);
        };
        let delivery = Delivery::new(received);
        let span = info_span!(
            "job",
            queue = %self.queue.name(),
            message_id = %delivery.message_id,
            attempt = delivery.attempt,
        );
        self.running.fetch_add(1, Ordering::Relaxed);
        let result = self.handle(&delivery, abort).instrument(span).await;
        self.running.fetch_sub(1, Ordering::Relaxed);
        let result = result?;
        Ok(Outcome::Processed {
            message_id: delivery.message_id,
            result,
        })
    }

    async fn handle(
        &self,
        delivery: &Delivery,
        abort: &CancellationToken,
    ) -> Result<JobResult, QueueError> {
        info!("Received job from queue.");
        let budget = self.queue.max_receive_count();
        if delivery.attempt > budget {
            // Its last try was handed out and never reported back.
            let reason = format!(
                "worker lost during its last try (try {} of {budget})",
                delivery.attempt - 1
            );
            error!(%reason, "Job used up its tries, moving to the dead-letter queue.");
            self.dead_letter(delivery, reason).await?;
            return Ok(JobResult::DeadLettered);
        }
        let heartbeat = self.start_heartbeat(&delivery.received);
        // `abort` reaches the command through its run context, so it can
        // stop in its own way (SIGTERM and a grace, an adaptor's `cancel`).
        let outcome = tokio::time::timeout(self.config.max_runtime, self.execute(delivery, abort))
            .await
            .unwrap_or_else(|_| {
                Err(JobError::Retryable(format!(
                    "job exceeded max_runtime of {}",
                    humantime::format_duration(self.config.max_runtime)
                )))
            });
        heartbeat.cancel();

        let receipt = &delivery.received.receipt;
        match outcome {
            Ok(()) => {
                info!("Job processed, removing from queue.");
                match self.queue.delete(receipt).await {
                    Err(QueueError::StaleReceipt) => {
                        // Someone else holds the message now and will run it
                        // again; our outputs were written to the same keys.
                        warn!("Job finished after its receipt expired; it may run again.");
                    }
                    other => other?,
                }
                Ok(JobResult::Succeeded)
            }
            Err(JobError::Retryable(reason)) if delivery.attempt >= budget => {
                // The last try: dead-letter it now, with the reason, rather
                // than leave it for the redrive policy, which cannot say why.
                let reason = format!("{reason} (after {} tries)", delivery.attempt);
                error!(%reason, "Job failed its last try, moving to the dead-letter queue.");
                self.dead_letter(delivery, reason).await?;
                Ok(JobResult::DeadLettered)
            }
            Err(JobError::Retryable(reason)) => {
                let delay = Backoff::new(self.config.retry_delay, self.config.max_retry_delay)
                    .delay(delivery.attempt);
                warn!(%reason, retry_in = ?delay, "Job failed, returning to queue for a retry.");
                self.queue.retry_later(receipt, delay, &reason).await?;
                Ok(JobResult::WillRetry)
            }
            Err(JobError::Fatal(reason)) => {
                error!(%reason, "Job cannot run, moving to the dead-letter queue.");
                self.dead_letter(delivery, reason).await?;
                Ok(JobResult::DeadLettered)
            }
            Err(JobError::Interrupted) => {
                info!("Job interrupted, returning to queue.");
                // This try does not count; the ones before it still do.
                let body = delivery.resend_body(|envelope| {
                    envelope.interrupts += 1;
                    envelope.failures = delivery.attempt - 1;
                });
                self.queue.requeue(&delivery.received, &body).await?;
                Ok(JobResult::Requeued)
            }
        }
    }

    /// Moves the job to the dead-letter queue with a fresh failure budget
    /// (a redrive starts it over) and its reason.
    async fn dead_letter(&self, delivery: &Delivery, reason: String) -> Result<(), QueueError> {
        let body = delivery.resend_body(|envelope| envelope.failures = 0);
        let note = DeadLetter {
            message_id: delivery.message_id.clone(),
            receive_count: delivery.attempt,
            reason,
        };
        self.queue
            .dead_letter(&delivery.received, &body, &note)
            .await
    }

    /// Checks, runs the command, then the tasks in order.
    async fn execute(
        &self,
        delivery: &Delivery,
        abort: &CancellationToken,
    ) -> Result<(), JobError> {
        let envelope = delivery
            .envelope
            .as_ref()
            .map_err(|e| JobError::Fatal(e.clone()))?;
        let job = self
            .catalog
            .validate(&envelope.command, &envelope.parameters, &envelope.tasks)
            .map_err(|e| JobError::Fatal(format!("invalid job: {e}")))?;

        info!("Executing command: {}.", job.command.name);
        let ctx = RunContext {
            cancel: abort.clone(),
            progress: Progress::new(),
            job_id: envelope.job_id.clone(),
        };
        let output = job
            .command
            .run(&job.parameters, &ctx)
            .await
            .map_err(|e| match e {
                CommandError::Cancelled => JobError::Interrupted,
                CommandError::Failed(reason) => {
                    JobError::Retryable(format!("command {} failed: {reason}", job.command.name))
                }
            })?;
        info!("Executed command: {}.", job.command.name);

        let ext = mime_ext(&output.mime);
        let vars = Vars {
            message_id: &delivery.message_id,
            job_id: &envelope.job_id,
            mime_ext: &ext,
            command: &envelope.command,
            array_index: String::new(),
            frame: match job.parameters.get("frame") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            },
            date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        };
        for task in &job.tasks {
            info!("Executing task: {}.", task.name());
            let location = tokio::select! {
                r = task.run(&self.tasks, &output, &vars) => r.map_err(|e| match e {
                    TaskError::Retryable(e) => {
                        JobError::Retryable(format!("task {} failed: {e}", task.name()))
                    }
                    TaskError::Permanent(e) => {
                        JobError::Fatal(format!("task {} failed for good: {e}", task.name()))
                    }
                })?,
                _ = abort.cancelled() => return Err(JobError::Interrupted),
            };
            info!(%location, "Executed task: {}.", task.name());
        }
        Ok(())
    }

    /// Keeps the message invisible while the job runs by extending its
    /// visibility every third of the timeout (leaving room for a slow or
    /// failed extension). Cancel the token to stop it.
    fn start_heartbeat(&self, message: &Received) -> CancellationToken {
        let stop = CancellationToken::new();
        let (queue, receipt, visibility) = (
            self.queue.clone(),
            message.receipt.clone(),
            self.config.visibility_timeout,
        );
        let guard = stop.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(visibility / 3) => {}
                        _ = guard.cancelled() => return,
                    }
                    match queue.extend(&receipt, visibility).await {
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
        stop
    }
}
