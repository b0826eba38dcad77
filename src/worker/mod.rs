//! The listen half: receive → check → run → post-tasks → delete.
//!
//! [`Worker::process_next`] is one step (one message, or none), which tests
//! call to drain a queue without sleeping. The slot loops in [`Worker::run`]
//! take the same step in two halves: a job's post-tasks and settling
//! (`Finishing`) run while the slot's next job is received, staged and
//! run, at most one pending per slot.
//!
//! A message is deleted only after the command and every task succeeded. A
//! job that fails is left in the queue with a back-off delay; one that can
//! never run (malformed, not allowed, invalid) is dead-lettered at once; one
//! cut short by shutdown is handed straight back without using up a try.
//!
//! Here: the slots, one step, and the heartbeat. `execute` runs one job
//! (checks, command, tasks); `settle` does to its message what the job's
//! end calls for.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::commands::catalog::Catalog;
use crate::config::WorkerConfig;
use crate::events::ledger::Ledger;
use crate::events::observe::Subject;
use crate::events::observe::{JobEnd, Observer};
use crate::fleet::drain::{Registered, RunningJobs};
use crate::fleet::lifecycle::Shutdown;
use crate::job::event::EventType;
use crate::queue::{Queue, QueueError};
use crate::retry::Backoff;
use crate::tasks::TaskRunner;
use crate::worker::delivery::Delivery;
use cancel::CancelWatch;
use execute::Ran;
use heartbeat::Heartbeat;
use intake::Intake;

mod cancel;
pub mod delivery;
mod execute;
pub mod health;
mod heartbeat;
mod intake;
pub(crate) mod release;
mod settle;
mod staging;
mod sweep;
pub mod thumbs;
mod usage;

/// Waits between receives while the queue cannot be reached.
/// What a cancelled job needs before the deadline: a process's kill grace
/// (5 s) and a second to hand its message back.
const CANCEL_ALLOWANCE: Duration = Duration::from_secs(6);
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

/// A job whose command has ended; its post-tasks, and what happens to its
/// message, are still ahead. Until then it keeps its place among the
/// running jobs (a drain waits for it, or hands it back) and its heartbeat.
struct Finishing<'a> {
    delivery: Delivery,
    subject: Subject,
    /// Cancels its tasks: a hand-back.
    cancel: CancellationToken,
    /// Set when an operator cancelled the job (and `cancel` with it).
    cancelled: CancellationToken,
    _registered: Registered<'a>,
    /// Stopped (and waited for) just before the settle.
    heartbeat: Heartbeat,
    /// How long the job took up to its tasks.
    ran_for: Duration,
    /// What its try used, up to its tasks.
    usage: crate::job::usage::Usage,
    /// The command's result, or why there is none.
    ran: Result<Ran, JobError>,
    span: tracing::Span,
}

/// What a job that succeeded made.
struct Done {
    /// Where its outputs went.
    outputs: Vec<String>,
    /// Its image outputs' thumbnails.
    thumbnails: Vec<crate::job::output::Thumbnail>,
    duration: Duration,
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
    /// Stopped through no fault of its own (its adaptor answered for
    /// another run): handed back without using a try, as an interruption
    /// is, with the reason.
    #[error("{0}")]
    HandedBack(String),
    /// Not run: this worker failed the job too often, or is sick. Handed
    /// back without using a try, visible again after the delay.
    #[error("{0}")]
    Declined(String, Duration),
    /// An operator cancelled it: deleted, never retried.
    #[error("cancelled")]
    Cancelled,
    /// Held by hand (the id held): moved into the ledger unrun, without
    /// using a try.
    #[error("held ({0})")]
    Held(String),
    /// Its receipt went stale: another worker holds the message now and
    /// runs the job; this copy was stopped.
    #[error("another worker holds the message now")]
    Lost,
}

/// A queue the worker takes jobs from, and what goes with it.
struct Source {
    queue: Queue,
    /// The queue's ledger: reported tries, array children, cancels.
    ledger: Option<Ledger>,
    /// What the ledger says was cancelled.
    cancels: Option<Arc<CancelWatch>>,
}

pub struct Worker {
    /// The listened queues, most urgent first.
    sources: Vec<Source>,
    /// Receives for every slot.
    intake: Intake,
    catalog: Arc<Catalog>,
    tasks: TaskRunner,
    config: WorkerConfig,
    /// Logs and publishes what happens to jobs.
    observer: Observer,
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
    /// Decodes image outputs for thumbnails in a child process; `None`
    /// when the renderq binary cannot be found (no thumbnails, one warning
    /// at start).
    thumbnailer: Option<thumbs::Thumbnailer>,
    /// Prices and describes each try (its `usage`).
    meter: Arc<usage::Meter>,
    /// How this worker's tries ended lately: which jobs it declines, and
    /// whether it is sick.
    health: std::sync::Mutex<health::Health>,
    /// Up once it is sick: slots closed, `/healthz` 503.
    sick: health::SickFlag,
    /// Every queue and ledger of the config (by default the listened
    /// ones): where dependants of a parent on another queue are released.
    all_queues: crate::queue::Queues,
    all_ledgers: crate::events::ledger::Ledgers,
}

impl Worker {
    /// A worker on `queues` (most urgent first), each with its ledger.
    pub fn new(
        queues: Vec<(Queue, Option<Ledger>)>,
        catalog: Arc<Catalog>,
        tasks: TaskRunner,
        config: WorkerConfig,
        observer: Observer,
        gpus: Vec<u32>,
    ) -> Self {
        let workspace =
            crate::workspace::Workspace::for_jobs(&config.work_root(), config.job_user());
        let thumbnailer = thumbs::Thumbnailer::new(&config.thumbnails, config.job_user())
            .inspect_err(|error| {
                warn!(%error, "cannot find the renderq binary to decode thumbnails in; no thumbnails")
            })
            .ok();
        let heartbeat = config.visibility_timeout / 3;
        let sources: Vec<Source> = queues
            .into_iter()
            .map(|(queue, ledger)| Source {
                cancels: (ledger.clone()).map(|l| Arc::new(CancelWatch::new(l, heartbeat))),
                queue,
                ledger,
            })
            .collect();
        let intake = Intake::new(
            sources.iter().map(|s| s.queue.clone()).collect(),
            config.wait_time,
            config.visibility_timeout,
            observer.clone(),
        );
        let slots = config.slots.unwrap_or(gpus.len().max(1));
        let all_queues = sources.iter().map(|s| s.queue.clone()).collect();
        let all_ledgers = (sources.iter())
            .filter_map(|s| Some((s.queue.name().to_owned(), s.ledger.clone()?)))
            .collect();
        Self {
            all_queues,
            all_ledgers,
            health: std::sync::Mutex::new(health::Health::new(
                config.blocklist_after,
                config.sick_after,
            )),
            sick: health::SickFlag::default(),
            sources,
            intake,
            slots,
            meter: Arc::new(usage::Meter::new(Default::default(), slots)),
            gpus,
            catalog,
            tasks,
            config,
            observer,
            running: RunningJobs::default(),
            cache: tokio::sync::OnceCell::new(),
            workspace,
            thumbnailer,
        }
    }

    /// Reaches every queue of the config (`queues`, `ledgers`), not only
    /// the listened ones, to release dependants of its jobs there.
    pub fn reaching(
        mut self,
        queues: crate::queue::Queues,
        ledgers: crate::events::ledger::Ledgers,
    ) -> Self {
        (self.all_queues, self.all_ledgers) = (queues, ledgers);
        self
    }

    /// Every queue and ledger this worker reaches.
    pub(super) fn reach(&self) -> release::Reach<'_> {
        release::Reach {
            queues: &self.all_queues,
            ledgers: &self.all_ledgers,
        }
    }

    /// Prices each try at `prices` (`[fleet] price`), shared by the slots.
    pub fn priced(mut self, prices: crate::config::Prices) -> Self {
        self.meter = Arc::new(usage::Meter::new(prices, self.slots));
        self
    }

    /// Runs `slots` loops of [`Self::process_next`] until a stop is
    /// requested; then drains to the stop's deadline: jobs that cannot
    /// finish in time are handed back early (see [`crate::fleet::drain`]), and
    /// whatever still runs at the deadline is cancelled and handed back.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (meter, imds) = (self.meter.clone(), self.config.imds.clone());
        tokio::spawn(async move { meter.learn_instance(&imds).await });
        // Slots close at a stop, or for good once the worker is sick.
        let open = shutdown.token().child_token();
        self.clone().close_when_sick(open.clone());
        for slot in 0..self.slots {
            let (worker, stop, abort) = (self.clone(), open.clone(), abort.clone());
            tracker.spawn(
                async move { worker.slot_loop(slot, &stop, &abort).await }
                    .instrument(info_span!("slot", slot)),
            );
        }
        tracker.close();
        self.observer.metrics().slots(self.slots);
        let queues: Vec<&str> = self.sources.iter().map(|s| s.queue.name()).collect();
        info!(?queues, slots = self.slots, gpus = ?self.gpus, "Worker started.");
        self.observer.worker_event(
            EventType::WorkerStarted,
            json!({"queue": queues[0], "queues": queues, "slots": self.slots, "gpus": self.gpus}),
        );
        shutdown.token().cancelled().await;
        let Some(first) = shutdown.stop() else {
            return;
        };
        let left = first.deadline.saturating_duration_since(Instant::now());
        info!(reason = first.reason.name(), deadline_in = ?left, "Worker stopping: no new jobs will be received.");
        self.observer.worker_event(
            if first.reason.is_notice() {
                EventType::WorkerInterrupted
            } else {
                EventType::WorkerStopping
            },
            json!({"reason": first.reason.name(), "deadline_in_ms": left.as_millis() as u64}),
        );
        loop {
            let stop = shutdown.stop().unwrap_or(first);
            // An instance notice leaves a margin and releases what cannot
            // make it; a signal or a rebalance lets every job run to the
            // deadline.
            let notice = stop.reason.is_notice();
            // Jobs still running at the cutoff are cancelled: the margin
            // pays for their grace and their hand-back, so that the
            // process is gone by the deadline. A notice keeps the whole
            // `stop_margin`; any other stop only what a cancel needs.
            let margin = match notice {
                true => self.config.stop_margin,
                false => self.config.stop_margin.min(CANCEL_ALLOWANCE),
            };
            let cutoff = stop.deadline.checked_sub(margin).unwrap_or(stop.deadline);
            if notice {
                let released = self.running.release_late(cutoff, self.config.unknown_eta);
                if released > 0 {
                    info!(
                        released,
                        "Handing back jobs that cannot finish before the deadline."
                    );
                }
            }
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
        self.intake.close().await;
        self.catalog.stop().await;
        info!("Worker stopped.");
    }

    /// Takes jobs one after another. A job's post-tasks (its uploads) run
    /// while the slot's next job is received, staged and run, so the GPU
    /// does not wait for them; at most one job's tasks are pending, and
    /// each job's message is settled only after its own tasks.
    async fn slot_loop(&self, slot: usize, stop: &CancellationToken, abort: &CancellationToken) {
        let mut failures = 0u32;
        let mut pending: Option<Finishing<'_>> = None;
        while !stop.is_cancelled() || pending.is_some() {
            let previous = pending.take();
            let (finished, next) = tokio::join!(
                async {
                    match previous {
                        Some(job) => self.finish(job).await.map(drop),
                        None => Ok(()),
                    }
                },
                async {
                    if stop.is_cancelled() {
                        Ok(None)
                    } else {
                        self.step(slot, stop, abort).await
                    }
                },
            );
            let error = match (finished, &next) {
                (Err(e), _) => Some(e.to_string()),
                (Ok(()), Err(e)) => Some(e.to_string()),
                (Ok(()), Ok(_)) => None,
            };
            pending = next.ok().flatten();
            match error {
                None => failures = 0,
                Some(error) => {
                    failures += 1;
                    let delay = QUEUE_BACKOFF.delay(failures);
                    error!(%error, retry_in = ?delay, "queue error");
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

    /// Up once this worker is sick, with why.
    pub fn sick(&self) -> &health::SickFlag {
        &self.sick
    }

    /// One step: waits for a message (until `stop`, where the backend can
    /// stop safely) and handles it. A job, once received, is cut short only
    /// by `abort`.
    pub async fn process_next(
        &self,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Outcome, QueueError> {
        match self.step(0, stop, abort).await? {
            Some(job) => self.finish(job).await,
            None => Ok(Outcome::Empty),
        }
    }

    /// Receives a message (until `stop`, where the backend can stop
    /// safely) on a slot (and so on its GPU), and runs its job up to its
    /// post-tasks. `None`: nothing arrived.
    async fn step(
        &self,
        slot: usize,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Option<Finishing<'_>>, QueueError> {
        let Some((source, received)) = self.intake.next(stop).await? else {
            return Ok(None);
        };
        let metrics = self.observer.metrics();
        let delivery = Delivery::new(received).from_source(source);
        let queue = &self.sources[source].queue;
        let span = info_span!(
            "job",
            queue = %queue.name(),
            message_id = %delivery.message_id,
            attempt = delivery.attempt,
        );
        // Each job can be handed back on its own (see `run`).
        let cancel = abort.child_token();
        let cancelled = CancellationToken::new();
        let typical = (delivery.envelope.as_ref().ok())
            .and_then(|envelope| self.catalog.typical_duration(&envelope.command));
        let registered = self.running.register(cancel.clone(), typical);
        metrics.busy(1);
        let gpu = (!self.gpus.is_empty()).then(|| self.gpus[slot % self.gpus.len()]);
        let started = Instant::now();
        let subject = delivery.subject(queue.name());
        let budget = queue.max_receive_count();
        // Held until the job is settled, which may wait for the slot's
        // previous job.
        let heartbeat = Heartbeat::start(
            &self.source(&delivery).queue,
            self.source(&delivery).cancels.clone(),
            &delivery,
            self.config.visibility_timeout,
            self.observer.clone(),
            (&cancel, &cancelled),
        );
        let used = crate::commands::usage::UsageCell::default();
        let gpu_sampler = self.meter.sample_gpu(gpu);
        let ran = async {
            info!("Received job from queue.");
            if self.is_cancelled(&delivery).await {
                return Err(JobError::Cancelled);
            }
            if let Some(held) = self.held_by_hand(&delivery).await {
                return Err(JobError::Held(held));
            }
            if delivery.attempt > budget {
                // Its last try was handed out and never reported back.
                return Err(JobError::Refused(format!(
                    "worker lost during its last try (try {} of {budget})",
                    delivery.attempt - 1
                )));
            }
            if let Some((reason, delay)) = self.declines(&delivery) {
                return Err(JobError::Declined(reason, delay));
            }
            self.check_previous_try(&delivery, &subject).await;
            // `cancel` reaches the command through its run context, so it
            // can stop in its own way (SIGTERM and a grace, an adaptor's
            // `cancel`).
            tokio::time::timeout_at(
                started + self.config.max_runtime,
                self.run_command(
                    &delivery,
                    &subject,
                    (&cancel, &registered.progress),
                    gpu,
                    &used,
                ),
            )
            .await
            .unwrap_or_else(|_| Err(self.over_max_runtime()))
        }
        .instrument(span.clone())
        .await;
        // Cut short by the cancel, or finished as it came: either way no
        // upload follows.
        let ran = if cancelled.is_cancelled() {
            Err(JobError::Cancelled)
        } else if heartbeat.lost() {
            Err(JobError::Lost)
        } else {
            ran
        };
        let ran_for = started.elapsed();
        // The command's own time: what it held the slot for (staging
        // aside); the receive's when it never ran.
        let usage = self.meter.usage(
            used.wall().unwrap_or(ran_for),
            used.get(),
            gpu_sampler.and_then(usage::GpuSampler::finish),
        );
        Ok(Some(Finishing {
            usage,
            delivery,
            subject,
            cancel,
            cancelled,
            _registered: registered,
            heartbeat,
            ran_for,
            ran,
            span,
        }))
    }

    /// Runs a job's post-tasks, settles its message, and reports how it
    /// ended.
    async fn finish(&self, job: Finishing<'_>) -> Result<Outcome, QueueError> {
        let span = job.span.clone();
        async {
            // Time spent waiting for the slot's previous job does not count
            // against this one's `max_runtime`.
            let started = Instant::now();
            let left = self.config.max_runtime.saturating_sub(job.ran_for);
            let outcome = match job.ran {
                Ok(ran) => tokio::time::timeout(
                    left,
                    self.run_tasks(&job.delivery, &job.subject, ran, &job.cancel),
                )
                .await
                .unwrap_or_else(|_| Err(self.over_max_runtime()))
                .map(|(outputs, thumbnails)| Done {
                    outputs,
                    thumbnails,
                    duration: job.ran_for + started.elapsed(),
                }),
                Err(e) => Err(e),
            };
            let outcome = match outcome {
                Err(_) if job.cancelled.is_cancelled() => Err(JobError::Cancelled),
                Err(_) if job.heartbeat.lost() => Err(JobError::Lost),
                other => other,
            };
            // Recorded while the heartbeat still holds the message, and
            // before the message is settled: a ledger that stays
            // unreachable leaves the message to come back, so no child is
            // ever final in the queue but not in the ledger.
            let ended = self.final_state(&job.delivery, &outcome);
            let recorded = self.record_array_child(&job.delivery, &outcome).await;
            self.judge(&job.delivery, &outcome);
            // With its end recorded, and before its message is settled, the
            // release's reads (on S3 each with its `releasing/` marker): a
            // worker dying after the settle leaves markers for the sweep,
            // one dying before leaves the message to come back. Its claims
            // wait for its end, so that a dependant never starts before
            // its parents' ends are announced.
            let release = match ended.filter(|_| recorded.is_ok()) {
                Some(state) => self.read_release(&job.delivery, state).await,
                None => None,
            };
            let settling = async {
                // No extension may land after the settle (it would undo a
                // retry's back-off): one in flight is waited for.
                job.heartbeat.stop().await;
                let (end, completion) = match recorded {
                    Ok(completion) => (self.settle(&job.delivery, outcome).await, completion),
                    Err(error) => {
                        error!(%error, "cannot record the array child's end; leaving its message to come back");
                        let reason = format!("the ledger is unreachable ({error})");
                        (Ok(JobEnd::Requeued { reason }), None)
                    }
                };
                // Its end is told as soon as it is settled.
                self.observer.metrics().busy(-1);
                if let Ok(end) = &end {
                    self.observer
                        .ended_with(&job.subject, end, Some(&job.usage));
                }
                self.charge(&job.delivery, &job.subject, &job.usage).await;
                // Claimed is claimed: announced even if the settle failed.
                if let Some(done) = completion {
                    self.observer
                        .array_completed(&job.subject, &done.array_id, done.counts);
                }
                end
            };
            let end = settling.await;
            // The dependants it frees go out after its own end.
            if let (Some(read), Ok(_)) = (release, &end) {
                self.release_dependants(&job.delivery, read).await;
            }
            let end = end?;
            Ok(Outcome::Processed {
                message_id: job.delivery.message_id.clone(),
                end,
            })
        }
        .instrument(span)
        .await
    }

    fn over_max_runtime(&self) -> JobError {
        JobError::Retryable(format!(
            "job exceeded max_runtime of {}",
            humantime::format_duration(self.config.max_runtime)
        ))
    }

    /// The queue a job came from, and its ledger.
    fn source(&self, delivery: &Delivery) -> &Source {
        &self.sources[delivery.source]
    }

    /// Whether the job was cancelled (as far as this worker knows yet).
    async fn is_cancelled(&self, delivery: &Delivery) -> bool {
        match &self.source(delivery).cancels {
            Some(cancels) => cancels.is_cancelled(&delivery.cancel_ids()).await,
            None => false,
        }
    }
}
