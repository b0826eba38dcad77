//! `[worker]`: the listen half's slots, timings, working and cache folders,
//! and its place in a fleet (instance notices, GPUs, autoscaling).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::access::{Account, JobUser};

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
    /// The sandbox image outputs are decoded in for their thumbnails.
    pub thumbnails: ThumbnailsConfig,
    /// The user jobs' programs (process commands, adaptors) run as: a user
    /// name (with its own groups) or `uid:gid`. The worker must be root (or
    /// hold `CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN`, `CAP_DAC_OVERRIDE` and
    /// `CAP_KILL`); its own state is then out of the jobs' reach. Default:
    /// the worker's own user.
    pub run_as: Option<RunAs>,
    /// Failed tries of one job (or array) after which this worker gives
    /// the job's messages back unrun, without using a try.
    pub blocklist_after: u32,
    /// Consecutive failed tries (of at least two jobs) after which this
    /// worker stops taking jobs, says so, and in an autoscaling group has
    /// its instance replaced.
    pub sick_after: u32,
}

/// `[worker] run_as`, resolved to a user when the config is loaded, so a
/// name that no user has is an error of the file, at its line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RunAs(pub Account);

impl TryFrom<String> for RunAs {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Account::resolve(&text).map(RunAs)
    }
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
    /// Ranged GETs at once for one large object, and files of a manifest
    /// placed at once.
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

/// `[worker.thumbnails]`: the limits of the child process that decodes an
/// image output for its thumbnail. An output over them gets no thumbnail;
/// the defaults fit an 8K (7680x4320) RGBA half-float EXR.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThumbnailsConfig {
    /// Most pixels an image may have, counted on both of an EXR's windows
    /// (data and display); a larger one is refused from its header,
    /// before anything is decoded.
    pub max_pixels: u64,
    /// The child's address space (`RLIMIT_AS`), in bytes: decoding an
    /// image of `max_pixels` takes up to 32 bytes a pixel (an EXR is read
    /// as 32-bit floats, then copied once), and the program's own mapping
    /// comes on top.
    pub max_memory: u64,
    /// The child's CPU time (`RLIMIT_CPU`), whole seconds.
    #[serde(with = "humantime_serde")]
    pub max_cpu_time: Duration,
    /// Wall-clock time before the child is killed: the CPU limit stops a
    /// decoder that spins; this one a child that gets little of the CPU on
    /// a loaded machine, or waits.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The renderq binary run as `renderq thumbnail` (default: this
    /// process's own executable). Set it when the worker runs inside
    /// another program, such as a test binary using the library.
    pub program: Option<PathBuf>,
}

impl Default for ThumbnailsConfig {
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
            max_memory: 2 * 1024 * 1024 * 1024,
            max_cpu_time: Duration::from_secs(20),
            timeout: Duration::from_secs(60),
            program: None,
        }
    }
}

impl ThumbnailsConfig {
    /// Limits below what any decode needs are mistakes, not sandboxes.
    pub(super) fn check(&self) -> Result<(), super::Invalid> {
        use super::Invalid;
        if self.max_pixels == 0 {
            return Err(Invalid::new(
                "worker.thumbnails.max_pixels",
                "must be at least 1",
            ));
        }
        if self.max_memory < 64 * 1024 * 1024 {
            return Err(Invalid::new(
                "worker.thumbnails.max_memory",
                "must be at least 67108864 (64 MiB): the program itself needs that much",
            ));
        }
        if self.max_cpu_time < Duration::from_secs(1) {
            return Err(Invalid::new(
                "worker.thumbnails.max_cpu_time",
                "must be at least 1s (RLIMIT_CPU counts whole seconds)",
            ));
        }
        if self.timeout.is_zero() {
            return Err(Invalid::new(
                "worker.thumbnails.timeout",
                "must be longer than 0s",
            ));
        }
        Ok(())
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

    /// Who runs jobs' programs.
    pub fn job_user(&self) -> JobUser {
        match &self.run_as {
            Some(RunAs(account)) => JobUser::Account(account.clone()),
            None => JobUser::Worker,
        }
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
            run_as: None,
            thumbnails: ThumbnailsConfig::default(),
            blocklist_after: 2,
            sick_after: 5,
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

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::MINIMAL;

    #[test]
    fn thumbnail_limits_too_small_to_decode_anything_are_refused_by_name() {
        let base = std::path::Path::new("/srv/renderq");
        let config = Config::from_toml(MINIMAL, base).unwrap();
        assert_eq!(config.worker.thumbnails.max_pixels, 40_000_000);
        assert_eq!(config.worker.thumbnails.program, None);
        for (line, key) in [
            ("max_memory = 1000", "worker.thumbnails.max_memory"),
            ("max_pixels = 0", "worker.thumbnails.max_pixels"),
            ("max_cpu_time = \"0s\"", "worker.thumbnails.max_cpu_time"),
            ("timeout = \"0s\"", "worker.thumbnails.timeout"),
        ] {
            let text = format!("{MINIMAL}\n[worker.thumbnails]\n{line}\n");
            let error = Config::from_toml(&text, base).unwrap_err().to_string();
            assert!(error.contains(key), "{line}: {error}");
        }
        let text = format!("{MINIMAL}\n[worker.thumbnails]\nprogram = \"bin/renderq\"\n");
        let config = Config::from_toml(&text, base).unwrap();
        assert_eq!(
            config.worker.thumbnails.program.as_deref(),
            Some(std::path::Path::new("/srv/renderq/bin/renderq"))
        );
    }
}
