//! `[worker]`: the listen half's slots, timings, working and cache folders,
//! and its place in a fleet (instance notices, GPUs, autoscaling).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Queues to take jobs from, most urgent first: a free slot takes from
    /// the first with a visible message (default: just
    /// `queue_manager.listen_queue`).
    pub listen_queues: Option<Vec<String>>,
    /// Jobs run at the same time by one process, each pulled on its own
    /// (default: 1, or one per GPU with `gpus`).
    pub slots: Option<usize>,
    /// How long a received job stays invisible to other workers; the
    /// heartbeat extends it while the job runs.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Longest a receive waits for a message (long polling).
    #[serde(with = "humantime_serde")]
    pub wait_time: Duration,
    /// Back-off after the first failure; doubles with every receive.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Cap on the back-off between tries.
    #[serde(with = "humantime_serde")]
    pub max_retry_delay: Duration,
    /// A job still running after this long is cancelled and failed.
    #[serde(with = "humantime_serde")]
    pub max_runtime: Duration,
    /// On shutdown, how long a running job may take to finish before it is
    /// cancelled and handed back to the queue.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Where per-job working folders are made (default: `var/work` beside
    /// the config file, so that the input cache and job folders live with
    /// the queue and results under `var/`, not in the system's `/tmp`).
    pub work_dir: Option<PathBuf>,
    /// `work_dir` when none is given: `var/work` in the config file's
    /// folder, filled in when the config's paths are resolved.
    #[serde(skip)]
    pub default_work_dir: PathBuf,
    /// On an instance notice (spot, autoscaling), what to do with a job
    /// that reported no progress: `release` it at once, or
    /// `run-to-deadline`.
    pub unknown_eta: UnknownEta,
    /// How often a worker looks in its SQS queues' dead-letter queues for
    /// jobs the redrive policy moved (their worker died during their last
    /// try), to count them for their arrays and publish their end.
    #[serde(with = "humantime_serde")]
    pub dead_letter_sweep: Duration,
    /// On a rebalance recommendation (EC2 expects to reclaim the spot
    /// instance soon): `finish-current` stops taking jobs and lets the
    /// running ones finish, or `ignore` it.
    pub rebalance: Rebalance,
    /// On an instance notice, jobs must be handed back this long before
    /// the deadline.
    #[serde(with = "humantime_serde")]
    pub stop_margin: Duration,
    /// The EC2 instance metadata service to watch for spot and autoscaling
    /// notices: `"off"`, `"auto"` (the standard address), or a base URL.
    pub imds: String,
    /// `"off"`, `"auto"` (one slot per GPU `nvidia-smi` lists, each pinned
    /// to its GPU), or GPU indexes, e.g. `[0, 1]`.
    pub gpus: GpusConfig,
    /// Cooperation with the instance's autoscaling group (needs `imds`,
    /// for the instance id).
    pub autoscaling: Option<ScalingConfig>,
    /// Where jobs' inputs are kept between jobs.
    pub cache: CacheConfig,
}

/// `[worker.cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// The cache's folder, shared by every slot of this worker and by other
    /// worker processes on the machine that name it (default:
    /// `renderq-cache` under `work_dir`). Inputs reach job folders as
    /// reflink copies when it is on the same XFS or Btrfs file system as
    /// `work_dir`, else as plain copies; the worker logs which at start.
    pub path: Option<PathBuf>,
    /// Bytes it may hold (a size: `"100GiB"` or a number); past this the
    /// least recently used files are deleted. An input larger than this
    /// fails its job for good.
    #[serde(deserialize_with = "crate::config::bytes::deserialize")]
    pub max_size: u64,
    /// Ranged GETs at once for one large object.
    pub download_concurrency: usize,
    /// Most files one manifest may list.
    pub max_manifest_files: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_size: 20 * 1024 * 1024 * 1024,
            download_concurrency: 8,
            max_manifest_files: 100_000,
        }
    }
}

/// `[worker.autoscaling]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingConfig {
    /// The autoscaling group's name.
    pub group: String,
    /// Turn scale-in protection on while jobs run.
    #[serde(default = "yes")]
    pub protect_when_busy: bool,
    /// Turn it off after this long without a job.
    #[serde(default = "default_idle_before_unprotect", with = "humantime_serde")]
    pub idle_before_unprotect: Duration,
    /// A termination lifecycle hook: heartbeats while draining, then
    /// `CompleteLifecycleAction` (CONTINUE) when done.
    pub lifecycle_hook: Option<String>,
    /// How often the hook gets a heartbeat while the worker drains.
    #[serde(default = "default_hook_heartbeat", with = "humantime_serde")]
    pub hook_heartbeat: Duration,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_idle_before_unprotect() -> Duration {
    Duration::from_secs(300)
}

fn default_hook_heartbeat() -> Duration {
    Duration::from_secs(60)
}

/// Where job folders and the input cache go without `work_dir`, relative
/// to the config file's folder: under `var/` with the rest of the embedded
/// default's state.
pub const DEFAULT_WORK_DIR: &str = "var/work";

impl WorkerConfig {
    /// Where per-job working folders are made.
    pub fn work_root(&self) -> PathBuf {
        (self.work_dir.clone()).unwrap_or_else(|| self.default_work_dir.clone())
    }

    /// The input cache's folder.
    pub fn cache_root(&self) -> PathBuf {
        self.cache
            .path
            .clone()
            .unwrap_or_else(|| self.work_root().join("renderq-cache"))
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen_queues: None,
            slots: None,
            visibility_timeout: Duration::from_secs(120),
            wait_time: Duration::from_secs(20),
            retry_delay: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(300),
            max_runtime: Duration::from_secs(2 * 3600),
            drain_timeout: Duration::from_secs(30),
            work_dir: None,
            default_work_dir: PathBuf::from(DEFAULT_WORK_DIR),
            unknown_eta: UnknownEta::default(),
            rebalance: Rebalance::default(),
            dead_letter_sweep: Duration::from_secs(300),
            stop_margin: Duration::from_secs(10),
            imds: "off".into(),
            gpus: GpusConfig::default(),
            autoscaling: None,
            cache: CacheConfig::default(),
        }
    }
}

/// What to do on an instance notice with a job whose end is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownEta {
    /// Hand it back at once (another worker starts it sooner).
    #[default]
    Release,
    /// Let it run until the deadline less the margin (for short jobs).
    RunToDeadline,
}

/// `[worker] rebalance`: what a rebalance recommendation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rebalance {
    /// Nothing (the instance may still get an interruption notice).
    #[default]
    Ignore,
    /// Stop taking jobs; the running ones finish (up to `max_runtime`),
    /// then the worker exits, so the instance leaves cleanly.
    FinishCurrent,
}

/// `[worker] gpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GpusConfig {
    /// `"auto"` or `"off"`.
    Mode(String),
    /// These GPU indexes.
    List(Vec<u32>),
}

impl Default for GpusConfig {
    fn default() -> Self {
        GpusConfig::Mode("off".into())
    }
}

/// Where to find IMDS, from `[worker] imds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImdsSetting {
    Off,
    Auto,
    Url(String),
}

impl ImdsSetting {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(ImdsSetting::Off),
            "auto" => Ok(ImdsSetting::Auto),
            url if url.starts_with("http://") || url.starts_with("https://") => {
                Ok(ImdsSetting::Url(url.trim_end_matches('/').to_owned()))
            }
            other => Err(format!(
                "`{other}` is not \"off\", \"auto\" or an http:// URL"
            )),
        }
    }
}
