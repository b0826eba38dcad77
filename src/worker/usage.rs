//! A try's `usage`, put together: wall time, what the program used (left
//! in the run context by the command, see `commands::usage`), the slot's
//! GPU sampled while it ran, the instance, and the cost at `[fleet]
//! price`.
//!
//! The GPU is read with `nvidia-smi -i GPU` as the run starts and then
//! every [`SAMPLE_EVERY`], each query bounded by [`QUERY_BOUND`]; a query
//! that fails or hangs gives usage without GPU figures and one warning
//! per worker, and a run never waits for one: its end drops (and kills)
//! the query under way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing::warn;

use super::Worker;
use crate::config::{ImdsSetting, Prices};
use crate::events::observe::Subject;
use crate::job::usage::{GpuUsage, Instance, ProcessUsage, Usage};
use crate::worker::delivery::Delivery;

/// Between two samples of a slot's GPU.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The longest one `nvidia-smi` query may take before it is killed.
const QUERY_BOUND: Duration = Duration::from_secs(2);

/// What the worker knows to price and describe its runs.
#[derive(Debug, Default)]
pub struct Meter {
    prices: Prices,
    /// Slots sharing the instance: a run pays for its share.
    slots: usize,
    /// Set once IMDS answered (or was found absent).
    instance: OnceLock<Instance>,
    /// A GPU query failed or hung already (it is said once).
    warned: Arc<AtomicBool>,
}

impl Meter {
    pub fn new(prices: Prices, slots: usize) -> Self {
        Self {
            prices,
            slots,
            ..Self::default()
        }
    }

    /// Learns the instance from IMDS, once; runs that end before it
    /// answers carry no instance (nor, without `per_hour`, a cost).
    pub async fn learn_instance(&self, imds: &str) {
        let instance = match ImdsSetting::parse(imds) {
            Ok(setting) => crate::fleet::imds::instance(&setting).await,
            Err(_) => Instance::default(),
        };
        if instance.instance_type.is_some() {
            tracing::info!(instance_type = ?instance.instance_type, lifecycle = ?instance.lifecycle, "Instance known: runs are priced by it.");
        }
        let _ = self.instance.set(instance);
    }

    /// Starts sampling the slot's GPU, if it has one.
    pub fn sample_gpu(&self, gpu: Option<u32>) -> Option<GpuSampler> {
        gpu.map(|gpu| GpuSampler::start(vec![gpu], self.warned.clone()))
    }

    /// A try's usage and cost.
    pub fn usage(
        &self,
        wall: Duration,
        process: Option<ProcessUsage>,
        gpu: Option<GpuUsage>,
    ) -> Usage {
        let unknown = Instance::default();
        let instance = self.instance.get().unwrap_or(&unknown);
        let per_hour = self.prices.per_hour(instance);
        Usage::new(wall.as_secs_f64(), process, gpu, instance).priced(per_hour, self.slots)
    }
}

/// Samples of a slot's GPUs while a run goes on.
#[derive(Debug)]
pub struct GpuSampler {
    task: tokio::task::JoinHandle<()>,
    seen: Arc<Mutex<Totals>>,
}

#[derive(Debug, Default)]
struct Totals {
    peak: u64,
    utilization: f64,
    samples: u32,
}

impl GpuSampler {
    fn start(gpus: Vec<u32>, warned: Arc<AtomicBool>) -> Self {
        let seen = Arc::new(Mutex::new(Totals::default()));
        let totals = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let sample =
                    tokio::time::timeout(QUERY_BOUND, crate::fleet::gpu::query(&gpus)).await;
                match sample {
                    Ok(Ok(samples)) if !samples.is_empty() => {
                        let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
                        for sample in &samples {
                            totals.peak = totals.peak.max(sample.memory_used_bytes);
                        }
                        totals.utilization += samples.iter().map(|s| s.utilization).sum::<f64>()
                            / samples.len() as f64;
                        totals.samples += 1;
                    }
                    other => {
                        let error = match other {
                            Ok(Err(error)) => error,
                            Ok(Ok(_)) => format!("nvidia-smi listed none of GPUs {gpus:?}"),
                            Err(_) => format!("nvidia-smi took over {QUERY_BOUND:?}"),
                        };
                        if !warned.swap(true, Ordering::Relaxed) {
                            warn!(%error, "cannot read the slot's GPU: usage without GPU figures");
                        } else {
                            tracing::debug!(%error, "cannot read the slot's GPU");
                        }
                        // The run's figures would be partial: none at all.
                        *totals.lock().unwrap_or_else(|e| e.into_inner()) = Totals::default();
                        return;
                    }
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        });
        Self { task, seen }
    }

    /// Stops sampling (a query under way is killed, not waited for) and
    /// gives the figures, if any sample was taken.
    pub fn finish(self) -> Option<GpuUsage> {
        self.task.abort();
        let totals = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        (totals.samples > 0).then(|| GpuUsage {
            peak_memory_bytes: totals.peak,
            mean_utilization: totals.utilization / f64::from(totals.samples),
            samples: totals.samples,
        })
    }
}

impl Worker {
    /// Adds a try's cost to its array's in the ledger, when the array has
    /// a budget. The one try (of every worker's) that reaches it stops the
    /// array's children that have not started, and publishes
    /// `BudgetReached`: held, as `renderq hold` does (released by
    /// `renderq release`), on either backend.
    pub(super) async fn charge(&self, delivery: &Delivery, subject: &Subject, usage: &Usage) {
        let Ok(envelope) = &delivery.envelope else {
            return;
        };
        let (Some(array), Some(budget), Some(cost)) =
            (&envelope.array, envelope.budget, usage.cost_usd)
        else {
            return;
        };
        let Some(ledger) = &self.source(delivery).ledger else {
            return;
        };
        match ledger.add_cost(&array.job_id, cost, budget.usd).await {
            Ok((spent, true)) => {
                let stopped = self.stop_array(ledger, &array.job_id).await;
                self.observer
                    .budget_reached(subject, &array.job_id, budget.usd, spent, stopped);
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot add the try's cost to its array's"),
        }
    }

    /// Holds the array's unstarted children (this worker's own receives
    /// see the hold at once; other workers' within
    /// `Ledger::hold_seen_within`); says whether it did.
    async fn stop_array(
        &self,
        ledger: &crate::events::ledger::Ledger,
        array_id: &str,
    ) -> &'static str {
        match ledger.hold_by_hand(array_id).await {
            Ok(_) => "held",
            Err(error) => {
                tracing::error!(%error, "cannot hold the array that reached its budget");
                "none"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::usage::Lifecycle;

    #[test]
    fn a_run_is_priced_by_the_instance_and_shared_by_the_slots() {
        let config: crate::config::FleetConfig =
            toml::from_str("[price]\n\"g5.xlarge\" = { on_demand = 3.06 }").unwrap();
        let meter = Meter::new(config.prices().unwrap(), 2);
        // Before IMDS answered: no instance, and no price for none.
        assert_eq!(
            meter.usage(Duration::from_secs(10), None, None).cost_usd,
            None
        );
        meter
            .instance
            .set(Instance {
                instance_type: Some("g5.xlarge".into()),
                lifecycle: Some(Lifecycle::OnDemand),
            })
            .unwrap();
        let process = ProcessUsage {
            cpu_s: 1.5,
            peak_rss_bytes: 300 << 20,
        };
        let usage = meter.usage(Duration::from_secs(10), Some(process), None);
        assert!(
            (usage.cost_usd.unwrap() - 0.00425).abs() < 1e-9,
            "{usage:?}"
        );
        assert_eq!(usage.cpu_s, Some(1.5));
        assert_eq!(usage.gpu_memory_peak_bytes, None);
    }

    #[tokio::test]
    async fn a_missing_nvidia_smi_gives_no_gpu_figures_and_does_not_wait() {
        let meter = Meter::default();
        let sampler = meter.sample_gpu(Some(0)).unwrap();
        let started = std::time::Instant::now();
        // Whatever nvidia-smi does here, finishing does not wait for it.
        let _ = sampler.finish();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(meter.sample_gpu(None).is_none());
    }
}
