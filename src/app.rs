//! Builds the runtime objects from a checked [`Config`] and runs the halves:
//! `serve` (endpoint and worker) or `work` (worker only); `web` is their
//! HTTP side.

use std::sync::Arc;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::control::Control;
use crate::api::server;
use crate::api::submit::Submitter;
use crate::commands::catalog::Catalog;
use crate::config::{Config, Invalid, optional_secret};
use crate::events::ledger::Ledgers;
use crate::events::metrics::Metrics;
use crate::events::observe::Observer;
use crate::events::publish::Publisher;
use crate::events::status::StatusTable;
use crate::fleet::lifecycle::{Shutdown, StopReason};
use crate::fleet::scaling::Scaling;
use crate::job::event::WorkerIdentity;
use crate::queue::Queues;
use crate::storage::Buckets;
use crate::tasks::{HttpPoster, TaskRunner};
use crate::worker::Worker;
use web::raise_open_file_limit;

mod job_user;
mod web;

/// Everything a renderq process runs on, built once at start-up.
#[derive(Debug, Clone)]
pub struct App {
    pub config: Config,
    pub catalog: Arc<Catalog>,
    pub queues: Queues,
    pub tasks: TaskRunner,
    /// Sends events to `[events.targets.*]`; shared by both halves.
    pub publisher: Publisher,
    /// Each queue's ledger (array completion, reported tries).
    pub ledgers: Ledgers,
    /// The job-status table, unless `[events] status` is `"off"`.
    pub status: Option<Arc<StatusTable>>,
    /// The GPU of each worker slot (empty: not pinned).
    pub gpus: Vec<u32>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// This process, as its events name it.
    pub identity: WorkerIdentity,
}

impl App {
    /// Opens every queue and bucket and reads the secrets the config names.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let secret = optional_secret(
            &config,
            "http_post.signing_secret_env",
            config.http_post.signing_secret_env.as_deref(),
        )?;
        let http = HttpPoster::new(&config.http_post, secret);
        let queues = Queues::open(&config.queues).await?;
        let status = config
            .events
            .status
            .path()
            .map(StatusTable::open)
            .transpose()?
            .map(Arc::new);
        let catalog = Arc::new(Catalog::from_config(&config).map_err(|i| config.locate(i))?);
        let identity = WorkerIdentity::current();
        let metrics = Arc::new(Metrics::new(Some(catalog.clone())));
        let publisher = Publisher::start(
            &config.events,
            identity.clone(),
            status.clone(),
            metrics.events_dropped.clone(),
        )
        .await?;
        let gpus = crate::fleet::gpu::assign(&config.worker.gpus, crate::fleet::gpu::discover)
            .map_err(|e| config.locate(Invalid::new("worker.gpus", e)))?;
        let buckets = Buckets::open(&config.buckets).await?;
        let ledgers = Ledgers::open(&config.queues, &buckets)?;
        Ok(Self {
            publisher,
            ledgers,
            status,
            gpus,
            catalog,
            metrics,
            tasks: TaskRunner { buckets, http },
            identity,
            queues,
            config,
        })
    }

    pub fn submitter(&self) -> Submitter {
        Submitter::new(
            self.catalog.clone(),
            self.queues.clone(),
            self.config.queue_manager.default_queue.clone(),
            self.publisher.clone(),
            self.ledgers.clone(),
            (&self.config.queue_manager).into(),
            self.tasks.buckets.clone(),
        )
    }

    /// Cancels and redrives.
    pub fn control(&self) -> Control {
        Control::new(
            self.queues.clone(),
            self.ledgers.clone(),
            Observer::new(self.publisher.clone(), self.metrics.clone()),
            self.status.clone(),
            self.config.queue_manager.default_queue.clone(),
            self.config.queue_manager.max_array_size as usize,
        )
    }

    /// The worker for the listened queues (`worker.listen_queues`, or
    /// `queue_manager.listen_queue`), after cleaning up what dead workers
    /// left in the working folder.
    pub fn worker(&self) -> Worker {
        crate::workspace::sweep(&self.config.worker.work_root());
        let queues = (self.config.listen_queues().iter())
            .map(|name| {
                let queue = self
                    .queues
                    .get(name)
                    .expect("config checks listened queues");
                (queue.clone(), self.ledgers.get(name).cloned())
            })
            .collect();
        Worker::new(
            queues,
            self.catalog.clone(),
            self.tasks.clone(),
            self.config.worker.clone(),
            Observer::new(self.publisher.clone(), self.metrics.clone()),
            self.gpus.clone(),
        )
        // Checked when the config was loaded.
        .priced(self.config.fleet.prices().unwrap_or_default())
        .reaching(self.queues.clone(), self.ledgers.clone())
    }

    /// Runs the JSON-RPC endpoint and a worker until `shutdown`.
    pub async fn serve(self, shutdown: Shutdown) -> anyhow::Result<()> {
        raise_open_file_limit();
        self.take_up_job_user()?;
        let router = self.router()?;
        let listen = &self.config.server.listen;
        let (listener, router) = self.bind("server.listen", listen, router).await?;
        tracing::info!(address = %listener.local_addr()?, "Listening for JSON-RPC.");
        self.watch_instance(&shutdown);
        let worker = Arc::new(self.worker());
        let (served, ()) = tokio::join!(
            async {
                let result = server::serve(listener, router, shutdown.token().clone()).await;
                // If the endpoint dies, the whole process stops.
                shutdown.request(
                    StopReason::EndpointFailed,
                    Instant::now() + self.config.worker.drain_timeout,
                );
                result
            },
            self.run_worker(worker, shutdown.clone()),
        );
        served.context("HTTP server failed")
    }

    /// Runs only the worker until `shutdown`.
    pub async fn work(self, shutdown: Shutdown) -> anyhow::Result<()> {
        raise_open_file_limit();
        self.take_up_job_user()?;
        self.watch_instance(&shutdown);
        let worker = Arc::new(self.worker());
        self.serve_metrics(&shutdown, worker.sick().clone()).await?;
        self.run_worker(worker, shutdown).await;
        Ok(())
    }

    /// Runs the worker; with `[worker.autoscaling]`, also keeps scale-in
    /// protection on while it is busy and, when the group terminates the
    /// instance, heartbeats the lifecycle hook while it drains and
    /// completes it at the end.
    async fn run_worker(&self, worker: Arc<Worker>, shutdown: Shutdown) {
        let scaling = match &self.config.worker.autoscaling {
            Some(config) => {
                let setting = crate::config::ImdsSetting::parse(&self.config.worker.imds);
                match setting.ok().as_ref().map(crate::fleet::imds::instance_id) {
                    Some(id) => match id.await {
                        Some(id) => Some(Arc::new(Scaling::connect(config, id).await)),
                        None => {
                            tracing::warn!(
                                "no instance id from IMDS: not working with the autoscaling group"
                            );
                            None
                        }
                    },
                    None => None,
                }
            }
            None => None,
        };
        let sweeper = worker.clone();
        every(&shutdown, self.config.worker.dead_letter_sweep, move || {
            let sweeper = sweeper.clone();
            async move { sweeper.sweep_dead_letters().await }
        });
        // Dependants a dead worker freed and never sent.
        let sweeper = worker.clone();
        let grace = self.config.queue_manager.release_grace;
        every(&shutdown, self.config.worker.dead_letter_sweep, move || {
            let sweeper = sweeper.clone();
            async move { sweeper.sweep_holds(grace).await }
        });
        let drained = CancellationToken::new();
        // Both end once the drain is over and are waited for: no protection
        // call or hook heartbeat may follow the hook's completion.
        let mut fleet_tasks = Vec::new();
        if let Some(scaling) = &scaling {
            // Until the drain is over, not merely begun: jobs still run.
            let (protector, busy, stop) = (scaling.clone(), worker.clone(), drained.clone());
            fleet_tasks.push(tokio::spawn(async move {
                protector.protect_while_busy(busy.running(), stop).await
            }));
            // A sick worker has its instance replaced.
            let (doctor, sick, stop) = (scaling.clone(), worker.sick().clone(), drained.clone());
            fleet_tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = sick.token().cancelled() => {}
                    _ = stop.cancelled() => return,
                }
                tokio::select! {
                    _ = doctor.mark_unhealthy() => {}
                    _ = stop.cancelled() => {}
                }
            }));
            let (hook, shutdown, drained) = (scaling.clone(), shutdown.clone(), drained.clone());
            fleet_tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.token().cancelled() => {}
                    _ = drained.cancelled() => return,
                }
                if is_termination(&shutdown) {
                    hook.heartbeat_hook(drained).await;
                }
            }));
        }
        worker.run(shutdown.clone()).await;
        drained.cancel();
        for task in fleet_tasks {
            let _ = task.await;
        }
        // Events before the hook: once it is completed the instance goes.
        self.flush_events(&shutdown).await;
        if let Some(scaling) = &scaling
            && is_termination(&shutdown)
        {
            scaling.complete_hook().await;
        }
    }

    /// Starts the IMDS watcher when `[worker] imds` asks for one, the GPU
    /// sampler when slots are pinned, and the hourly prune.
    fn watch_instance(&self, shutdown: &Shutdown) {
        self.prune_hourly(shutdown);
        self.report_alive(shutdown);
        self.metrics
            .sample_gpus(self.gpus.clone(), std::time::Duration::from_secs(10));
        let worker = &self.config.worker;
        if let Ok(setting) = crate::config::ImdsSetting::parse(&worker.imds) {
            crate::fleet::imds::watch(
                &setting,
                shutdown.clone(),
                crate::fleet::imds::Deadlines::from_config(worker),
            );
        }
    }

    /// Deletes the records of work finished longer than
    /// `queue_manager.retention` ago: the status table's rows and the
    /// embedded ledgers' (S3 ledgers expire by the bucket's lifecycle
    /// rule). Returns the rows deleted.
    pub async fn prune(&self) -> anyhow::Result<u64> {
        let retention = self.config.queue_manager.retention;
        let mut deleted = 0;
        if let Some(status) = self.status.clone() {
            deleted += tokio::task::spawn_blocking(move || status.prune(retention)).await??;
        }
        for (queue, ledger) in self.ledgers.iter() {
            deleted += ledger
                .prune(retention)
                .await
                .with_context(|| format!("queue `{queue}`"))?;
        }
        Ok(deleted)
    }

    /// Prunes now and every hour until `shutdown`.
    fn prune_hourly(&self, shutdown: &Shutdown) {
        let app = self.clone();
        every(shutdown, std::time::Duration::from_secs(3600), move || {
            let app = app.clone();
            async move {
                match app.prune().await {
                    Ok(deleted) => tracing::debug!(deleted, "pruned old records"),
                    Err(error) => tracing::warn!(error = format!("{error:#}"), "prune failed"),
                }
            }
        });
    }

    /// Notes this worker in the status table every minute, so the monitor
    /// lists it while it lives (an idle worker publishes no events).
    fn report_alive(&self, shutdown: &Shutdown) {
        let Some(status) = self.status.clone() else {
            return;
        };
        let identity = self.identity.clone();
        every(shutdown, std::time::Duration::from_secs(60), move || {
            let (status, identity) = (status.clone(), identity.clone());
            async move {
                let noted = tokio::task::spawn_blocking(move || status.worker_alive(&identity));
                if let Ok(Err(error)) = noted.await {
                    tracing::debug!(%error, "cannot note this worker");
                }
            }
        });
    }

    /// Gives the events still buffered what is left until the stop's
    /// deadline (less a second for the lifecycle hook) to go out; without
    /// a deadline, the drain timeout.
    async fn flush_events(&self, shutdown: &Shutdown) {
        let left = shutdown
            .stop()
            .map_or(self.config.worker.drain_timeout, |stop| {
                stop.deadline
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(HOOK_ALLOWANCE)
            });
        self.publisher.close(left.max(MIN_FLUSH)).await;
    }
}

/// Kept from the stop's deadline for completing the lifecycle hook.
const HOOK_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(1);
/// The least time buffered events get at the end, even past a deadline.
const MIN_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs `task` now and every `period` until `shutdown`.
fn every<F, Fut>(shutdown: &Shutdown, period: std::time::Duration, mut task: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = shutdown.token().clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            task().await;
        }
    });
}

/// Whether the stop came from the autoscaling group.
fn is_termination(shutdown: &Shutdown) -> bool {
    shutdown
        .stop()
        .is_some_and(|s| s.reason == StopReason::AutoscalingTermination)
}
