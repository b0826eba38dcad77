//! `GET /metrics`: the process's counters in Prometheus text format, every
//! name prefixed `renderq_`. The observer counts jobs and tasks, the worker
//! its receives, heartbeats and busy slots, the publisher dropped events; a
//! sampler reads GPU utilization from `nvidia-smi` when slots are pinned.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::commands::catalog::Catalog;
use crate::job::inputs::Staged;

type Labels = Vec<(String, String)>;

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

fn seconds_histogram() -> Histogram {
    // 10 ms … about 3 h.
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

/// Why an event was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The target's buffer was full.
    BufferFull,
    /// The target failed every try.
    OutOfTries,
    /// Over the target's size limit for one entry, even trimmed.
    TooLarge,
    /// The target refused the entry for a reason no retry changes.
    Refused,
}

impl DropReason {
    const ALL: [Self; 4] = [
        Self::BufferFull,
        Self::OutOfTries,
        Self::TooLarge,
        Self::Refused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::OutOfTries => "out_of_tries",
            Self::TooLarge => "too_large",
            Self::Refused => "refused",
        }
    }
}

/// Events dropped, by reason (`renderq_events_dropped_total{reason}`);
/// clones count into the same series.
#[derive(Debug, Clone)]
pub struct EventsDropped(Family<Labels, Counter>);

impl Default for EventsDropped {
    fn default() -> Self {
        let family = Family::default();
        // Every reason is exported from the start, at 0.
        for reason in DropReason::ALL {
            drop(family.get_or_create(&label("reason", reason.name())));
        }
        Self(family)
    }
}

impl EventsDropped {
    /// Counts `n` more; returns the new total of all reasons.
    pub fn count(&self, reason: DropReason, n: u64) -> u64 {
        self.0
            .get_or_create(&label("reason", reason.name()))
            .inc_by(n);
        self.total()
    }

    pub fn of(&self, reason: DropReason) -> u64 {
        self.0.get_or_create(&label("reason", reason.name())).get()
    }

    pub fn total(&self) -> u64 {
        DropReason::ALL.into_iter().map(|r| self.of(r)).sum()
    }
}

/// Every series this process exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<Labels, Counter>,
    job_duration: Histogram,
    task_duration: Family<Labels, Histogram, fn() -> Histogram>,
    queue_wait: Histogram,
    receives: Family<Labels, Counter>,
    swept: Family<Labels, Counter>,
    heartbeats: Counter,
    extensions_failed: Counter,
    slots_busy: Gauge,
    slots: Gauge,
    /// Shared with the publisher, which counts into it.
    pub events_dropped: EventsDropped,
    gpu_utilization: Family<Labels, Gauge<f64, AtomicU64>>,
    gpu_memory_used: Family<Labels, Gauge>,
    cache_files: Family<Labels, Counter>,
    input_bytes: Family<Labels, Counter>,
    cache_size: Gauge,
    run_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    cost_usd: Family<Labels, Counter<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Adaptor processes started, read from the catalog at each scrape.
#[derive(Debug)]
struct AdaptorStarts(Arc<Catalog>);

impl prometheus_client::collector::Collector for AdaptorStarts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let starts: u64 = self.0.commands().map(|c| c.adaptor_starts()).sum();
        let counter = ConstCounter::new(starts);
        let metric = encoder.encode_descriptor(
            "adaptor_starts",
            "Adaptor processes started",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

impl Metrics {
    pub fn new(catalog: Option<Arc<Catalog>>) -> Self {
        let mut registry = Registry::with_prefix("renderq");
        let metrics = Self {
            jobs: Family::default(),
            job_duration: seconds_histogram(),
            task_duration: Family::new_with_constructor(seconds_histogram),
            queue_wait: seconds_histogram(),
            receives: Family::default(),
            swept: Family::default(),
            heartbeats: Counter::default(),
            extensions_failed: Counter::default(),
            slots_busy: Gauge::default(),
            slots: Gauge::default(),
            events_dropped: EventsDropped::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            cache_files: Family::default(),
            input_bytes: Family::default(),
            cache_size: Gauge::default(),
            run_seconds: Family::new_with_constructor(seconds_histogram),
            cost_usd: Family::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs by how their try ended", metrics.jobs.clone());
        registry.register(
            "job_duration_seconds",
            "Time from a job's start to its end",
            metrics.job_duration.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "Time a post-task took",
            metrics.task_duration.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from submit to start",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "receive_calls",
            "Receives by result",
            metrics.receives.clone(),
        );
        registry.register(
            "dead_letters_swept",
            "Dead letters the redrive policy moved, by what the sweep did: counted for their job, or skipped (not a renderq job)",
            metrics.swept.clone(),
        );
        registry.register(
            "heartbeats",
            "Visibility extensions made",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "visibility_extensions_failed",
            "Visibility extensions that failed",
            metrics.extensions_failed.clone(),
        );
        registry.register(
            "slots_busy",
            "Slots running a job",
            metrics.slots_busy.clone(),
        );
        registry.register("slots", "Slots of this worker", metrics.slots.clone());
        registry.register(
            "events_dropped",
            "Events dropped, by reason: buffer_full, out_of_tries, too_large (over the \
             target's entry limit), refused (an entry the target will never take)",
            metrics.events_dropped.0.clone(),
        );
        registry.register(
            "input_cache_files",
            "Input files staged, by result: hit (from the cache) or miss (downloaded)",
            metrics.cache_files.clone(),
        );
        registry.register(
            "input_bytes",
            "Input bytes staged, by source: cache or download",
            metrics.input_bytes.clone(),
        );
        registry.register(
            "input_cache_size_bytes",
            "Bytes the input cache holds",
            metrics.cache_size.clone(),
        );
        registry.register(
            "gpu_utilization_ratio",
            "GPU utilization, 0 to 1",
            metrics.gpu_utilization.clone(),
        );
        registry.register(
            "gpu_memory_used_bytes",
            "GPU memory in use",
            metrics.gpu_memory_used.clone(),
        );
        registry.register(
            "run_seconds",
            "Wall time of a job's tries (receive to the command's end), by command",
            metrics.run_seconds.clone(),
        );
        registry.register(
            "cost_usd",
            "What tries cost at [fleet] price, by command",
            metrics.cost_usd.clone(),
        );
        if let Some(catalog) = catalog {
            registry.register_collector(Box::new(AdaptorStarts(catalog)));
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// A try ended as `outcome`, after `duration` (when it ran).
    pub fn job_ended(&self, outcome: &str, duration: Option<Duration>) {
        self.jobs.get_or_create(&label("outcome", outcome)).inc();
        if let Some(duration) = duration {
            self.job_duration.observe(duration.as_secs_f64());
        }
    }

    /// What a try of `command` used (and cost).
    pub fn run_used(&self, command: &str, usage: &crate::job::usage::Usage) {
        let command = label("command", command);
        self.run_seconds
            .get_or_create(&command)
            .observe(usage.wall_s);
        if let Some(cost) = usage.cost_usd {
            self.cost_usd.get_or_create(&command).inc_by(cost);
        }
    }

    pub fn task_ended(&self, task: &str, duration: Duration) {
        self.task_duration
            .get_or_create(&label("task", task))
            .observe(duration.as_secs_f64());
    }

    pub fn job_started(&self, waited: Option<Duration>) {
        if let Some(waited) = waited {
            self.queue_wait.observe(waited.as_secs_f64());
        }
    }

    /// A job's inputs were staged; the cache now holds `cache_bytes`.
    pub fn staged(&self, staged: &Staged, cache_bytes: u64) {
        self.cache_files
            .get_or_create(&label("result", "hit"))
            .inc_by(staged.hits);
        self.cache_files
            .get_or_create(&label("result", "miss"))
            .inc_by(staged.downloads);
        self.input_bytes
            .get_or_create(&label("source", "cache"))
            .inc_by(staged.bytes_from_cache);
        self.input_bytes
            .get_or_create(&label("source", "download"))
            .inc_by(staged.bytes_downloaded);
        self.cache_size.set(cache_bytes as i64);
    }

    /// `message`, `empty` or `error`.
    pub fn received(&self, result: &str) {
        self.receives.get_or_create(&label("result", result)).inc();
    }

    /// A moved dead letter the sweep `counted` or `skipped`.
    pub fn swept(&self, result: &str) {
        self.swept.get_or_create(&label("result", result)).inc();
    }

    pub fn heartbeat(&self, ok: bool) {
        if ok {
            self.heartbeats.inc();
        } else {
            self.extensions_failed.inc();
        }
    }

    pub fn slots(&self, total: usize) {
        self.slots.set(total as i64);
    }

    pub fn busy(&self, delta: i64) {
        self.slots_busy.inc_by(delta);
    }

    /// Reads utilization from `nvidia-smi` every `every` for `gpus`.
    pub fn sample_gpus(self: &Arc<Self>, gpus: Vec<u32>, every: Duration) {
        if gpus.is_empty() {
            return;
        }
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                match crate::fleet::gpu::utilization().await {
                    Ok(samples) => {
                        for sample in samples.iter().filter(|s| gpus.contains(&s.index)) {
                            let gpu = label("gpu", &sample.index.to_string());
                            metrics
                                .gpu_utilization
                                .get_or_create(&gpu)
                                .set(sample.utilization);
                            metrics
                                .gpu_memory_used
                                .get_or_create(&gpu)
                                .set(sample.memory_used_bytes as i64);
                        }
                    }
                    Err(error) => tracing::debug!(%error, "cannot sample GPUs"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_prefix_and_move() {
        let metrics = Metrics::default();
        metrics.job_ended("succeeded", Some(Duration::from_millis(1500)));
        metrics.received("message");
        metrics.busy(1);
        let text = metrics.encode();
        assert!(
            text.contains("renderq_jobs_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("renderq_receive_calls_total{result=\"message\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("renderq_job_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("renderq_slots_busy 1"), "{text}");
    }
}
