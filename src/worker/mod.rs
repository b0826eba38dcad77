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
//!
//! Here: the slots, one step, and the heartbeat. `execute` runs one job
//! (checks, command, tasks); `settle` does to its message what the job's
//! end calls for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::commands::catalog::Catalog;
use crate::config::WorkerConfig;
use crate::events::ledger::Ledger;
use crate::events::observe::{JobEnd, Observer};
use crate::fleet::drain::RunningJobs;
use crate::fleet::lifecycle::{Shutdown, StopReason};
use crate::job::event::EventType;
use crate::queue::{Queue, QueueError, Received};
use crate::retry::Backoff;
use crate::tasks::TaskRunner;
use crate::worker::delivery::Delivery;

pub mod delivery;
mod execute;
mod settle;
mod staging;

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
    /// Job inputs kept between jobs, opened with the first job that has
    /// inputs.
    cache: tokio::sync::OnceCell<crate::storage::cache::Cache>,
    /// This process's folder under `work_dir`, for the working folders of
    /// jobs whose inputs are staged before they run.
    workspace: crate::workspace::Workspace,
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
        let workspace = crate::workspace::Workspace::new(&config.work_root());
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
            cache: tokio::sync::OnceCell::new(),
            workspace,
        }
    }

    /// Runs `slots` loops of [`Self::process_next`] until a stop is
    /// requested; then drains to the stop's deadline: jobs that cannot
    /// finish in time are handed back early (see [`crate::fleet::drain`]), and
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
