//! `workers.toml`: the configuration types, their defaults and their checks.
//!
//! These are plain serde types (`deny_unknown_fields`, a doc comment on every
//! field that doubles as the user documentation). They describe what the
//! operator asked for; the runtime objects (queues, buckets, the catalog of
//! commands) are built from them elsewhere and never deserialize themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::drain::UnknownEta;
use crate::event::EventType;
use crate::gpu::GpusConfig;
use crate::params::ParamSpec;
/// SQS refuses to keep a message invisible for longer than this after it was
/// received, so a job must finish (or be failed) within it.
pub const SQS_MAX_INVISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// The whole of `workers.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What may be queued and where the two halves send and listen.
    pub queue_manager: QueueManagerConfig,
    /// The JSON-RPC endpoint of the submit half.
    #[serde(default)]
    pub server: ServerConfig,
    /// The listen half: slots, visibility, retries, shutdown.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Named queues; jobs name one with `queue_name`.
    #[serde(default)]
    pub queues: BTreeMap<String, QueueConfig>,
    /// Named buckets that `s3_upload` tasks may write to.
    #[serde(default)]
    pub buckets: BTreeMap<String, BucketConfig>,
    /// Operator policy for the `http_post` task.
    #[serde(default)]
    pub http_post: HttpPostConfig,
    /// Commands defined here (beside the built-ins); a job can name one
    /// only if `allow_commands` lists it.
    #[serde(default)]
    pub commands: BTreeMap<String, CommandConfig>,
    /// Where lifecycle events go.
    #[serde(default)]
    pub events: EventsConfig,
    /// `GET /metrics` for a process that runs no endpoint (`worker`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The folder of the config file: relative paths start here, and
    /// `{config_dir}` in command arguments stands for it.
    #[serde(skip)]
    pub config_dir: PathBuf,
    /// The file and its text, so that problems found later (building the
    /// commands) can name their line too.
    #[serde(skip)]
    source: Option<Arc<Source>>,
}

#[derive(Debug)]
struct Source {
    path: PathBuf,
    text: String,
}

/// `[commands.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CommandConfig {
    /// An external program, started afresh for every job.
    Process(ProcessConfig),
    /// A long-lived program started once per worker slot and reused for
    /// many jobs (JSON lines on stdin/stdout; see the README).
    Adaptor(AdaptorConfig),
}

/// `[commands.NAME]` with `kind = "process"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// The program: an absolute path, a path relative to the config file's
    /// folder, or a bare name looked up on `PATH` at start-up.
    pub program: String,
    /// Argument templates, one argv element each (never a shell):
    /// `{param}`, `{param:04}` (zero-padded), `{workdir}`, `{config_dir}`,
    /// `{job_id}`; `{{` and `}}` for literal braces.
    #[serde(default)]
    pub args: Vec<String>,
    /// The result file (a template like `args`); without it, the result is
    /// the program's standard output.
    #[serde(default)]
    pub output: Option<String>,
    /// MIME type of the result; by default from the output file's
    /// extension, or JSON / plain text for standard output.
    #[serde(default)]
    pub output_mime: Option<String>,
    /// The program and every process it started are killed after this.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Environment variables passed on from the worker's environment;
    /// nothing else is (so the worker's secrets stay with the worker).
    #[serde(default = "default_command_env")]
    pub env: Vec<String>,
    /// The parameters a job may give.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamSpec>,
}

/// `[commands.NAME]` with `kind = "adaptor"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptorConfig {
    /// The adaptor program (found as for `process`).
    pub program: String,
    /// Argument templates; only `{config_dir}` is known when it starts.
    #[serde(default)]
    pub args: Vec<String>,
    /// Sent to the adaptor once, in its `init` message.
    #[serde(default)]
    pub init_data: serde_json::Map<String, serde_json::Value>,
    /// The adaptor must answer `init` with `ready` within this.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// One run must end within this, or the adaptor is killed.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Environment variables passed on from the worker's environment.
    #[serde(default = "default_command_env")]
    pub env: Vec<String>,
    /// The parameters a job may give.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamSpec>,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_start_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_command_env() -> Vec<String> {
    ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"]
        .map(String::from)
        .to_vec()
}

/// `[queue_manager]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueManagerConfig {
    /// The only commands a job may name; anything else is refused at submit
    /// and dead-lettered on receive.
    pub allow_commands: Vec<String>,
    /// The queue a submit goes to when it names none.
    pub default_queue: String,
    /// The queue this process's worker pulls jobs from.
    pub listen_queue: String,
    /// Most children one array job may have.
    #[serde(default = "default_max_array_size")]
    pub max_array_size: u32,
}

fn default_max_array_size() -> u32 {
    10_000
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the JSON-RPC endpoint binds to.
    pub listen: String,
    /// Name of an environment variable holding the bearer token every request
    /// must carry. The token itself never appears in the file.
    pub auth_token_env: Option<String>,
    /// Requests with a larger body are refused with HTTP 413.
    pub max_body_bytes: usize,
    /// Serve a non-loopback address without a token, on purpose (anyone who
    /// reaches the port can then fill the queue).
    pub allow_anonymous: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            auth_token_env: None,
            max_body_bytes: 256 * 1024,
            allow_anonymous: false,
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
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
    /// Where per-job working folders are made (default: the system's
    /// temporary folder).
    pub work_dir: Option<PathBuf>,
    /// On an instance notice (spot, autoscaling), what to do with a job
    /// that reported no progress: `release` it at once, or
    /// `run-to-deadline`.
    pub unknown_eta: UnknownEta,
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

impl WorkerConfig {
    /// Where per-job working folders are made.
    pub fn work_root(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            slots: None,
            visibility_timeout: Duration::from_secs(120),
            wait_time: Duration::from_secs(20),
            retry_delay: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(300),
            max_runtime: Duration::from_secs(2 * 3600),
            drain_timeout: Duration::from_secs(30),
            work_dir: None,
            unknown_eta: UnknownEta::default(),
            stop_margin: Duration::from_secs(10),
            imds: "off".into(),
            gpus: GpusConfig::default(),
            autoscaling: None,
        }
    }
}

/// `[queues.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum QueueConfig {
    /// The embedded queue: durable on disk, one machine.
    Local(LocalQueueConfig),
    /// Amazon SQS, or an SQS-compatible server.
    Sqs(SqsQueueConfig),
}

/// `[queues.NAME]` with `backend = "sqs"`. Credentials come from the
/// standard AWS chain (environment, profile, instance role), never this file.
/// The queue must have a redrive policy naming its dead-letter queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsQueueConfig {
    /// The queue URL, e.g. `https://sqs.us-east-1.amazonaws.com/123456789012/renders`.
    pub url: String,
    /// AWS region; defaults to the standard chain's (`AWS_REGION`, profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of an SQS-compatible server, instead of AWS's.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// A `[buckets.NAME]` on S3 where workers keep the queue's ledger
    /// (array children's final states, failed tries). Array jobs on this
    /// queue need it.
    #[serde(default)]
    pub status_bucket: Option<String>,
    /// Key prefix of the ledger in `status_bucket`.
    #[serde(default = "default_status_prefix")]
    pub status_prefix: String,
}

fn default_status_prefix() -> String {
    "renderq-status".into()
}

/// `[queues.NAME]` with `backend = "local"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalQueueConfig {
    /// Folder holding the queue's store; relative paths are taken from the
    /// folder of the config file.
    pub path: PathBuf,
    /// Receives after which a message goes to the dead-letter queue (the
    /// embedded counterpart of an SQS redrive policy).
    #[serde(default = "default_max_receive_count")]
    pub max_receive_count: u32,
}

fn default_max_receive_count() -> u32 {
    3
}

/// `[buckets.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum BucketConfig {
    /// A local folder standing in for an object store.
    Local(LocalBucketConfig),
    /// Amazon S3, or an S3-compatible server.
    S3(S3BucketConfig),
}

/// `[buckets.NAME]` with `backend = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3BucketConfig {
    /// The S3 bucket's name.
    pub bucket: String,
    /// AWS region; defaults to the standard chain's.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible server; path-style addressing is used
    /// when set.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// File results at least this large go up as multipart uploads.
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold: u64,
    /// Size of each multipart part (S3's minimum is 5 MiB).
    #[serde(default = "default_part_size")]
    pub part_size: u64,
    /// Parts uploaded at once (one connection each).
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
}

fn default_multipart_threshold() -> u64 {
    16 * 1024 * 1024
}

fn default_upload_concurrency() -> usize {
    8
}

fn default_part_size() -> u64 {
    8 * 1024 * 1024
}

/// `[buckets.NAME]` with `backend = "local"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalBucketConfig {
    /// Folder the objects are written under; relative paths are taken from
    /// the folder of the config file.
    pub path: PathBuf,
}

/// `[http_post]`: what the operator lets jobs post to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpPostConfig {
    /// Hosts a postback may go to. When absent, any host is allowed except
    /// link-local and cloud metadata addresses.
    pub allow_hosts: Option<Vec<String>>,
    /// Allow link-local and metadata addresses (169.254.0.0/16, fe80::/10).
    pub allow_link_local: bool,
    /// Limit on one attempt, connect to last byte.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before the task fails (and the job is retried later).
    pub attempts: u32,
    /// Back-off after the first failed attempt; doubles with each one.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Name of an environment variable holding the HMAC-SHA256 secret used
    /// for the `X-Renderq-Signature` header.
    pub signing_secret_env: Option<String>,
}

impl Default for HttpPostConfig {
    fn default() -> Self {
        Self {
            allow_hosts: None,
            allow_link_local: false,
            timeout: Duration::from_secs(30),
            attempts: 4,
            retry_delay: Duration::from_millis(500),
            signing_secret_env: None,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address `renderq worker` serves `/metrics` and `/healthz` on, e.g.
    /// `127.0.0.1:9464` (`serve` has them on its endpoint anyway).
    pub listen: Option<String>,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Named targets; each gets the events its filter lets through, and
    /// jobs may subscribe to any of them by name.
    pub targets: BTreeMap<String, EventTargetConfig>,
    /// Events waiting per target while it is slow or down; past this, new
    /// ones are dropped (and counted).
    pub buffer: usize,
    /// How many times a batch is sent before it is dropped (and counted).
    pub attempts: u32,
    /// A job-status table (SQLite) this process keeps up to date with the
    /// events it publishes; `renderq status`, `events watch` and
    /// `queue_manager_job_status` use it. Relative to the config's folder.
    pub status: Option<PathBuf>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            targets: BTreeMap::new(),
            buffer: 10_000,
            attempts: 10,
            status: None,
        }
    }
}

/// `[events.targets.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EventTargetConfig {
    /// One JSON event per line, appended to a file.
    File(FileTargetConfig),
    /// An SQS queue (a plain one; no redrive policy needed).
    Sqs(SqsTargetConfig),
    /// An EventBridge bus: `source = "renderq"`, detail-type = event type.
    Eventbridge(EventBridgeTargetConfig),
    /// An HTTP endpoint, one POST per event.
    Webhook(WebhookTargetConfig),
}

impl EventTargetConfig {
    /// The event types this target gets without a subscription (`None`:
    /// all; `[]`: only what jobs subscribe to).
    pub fn events(&self) -> Option<&[EventType]> {
        match self {
            EventTargetConfig::File(c) => c.events.as_deref(),
            EventTargetConfig::Sqs(c) => c.events.as_deref(),
            EventTargetConfig::Eventbridge(c) => c.events.as_deref(),
            EventTargetConfig::Webhook(c) => c.events.as_deref(),
        }
    }
}

/// `kind = "file"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTargetConfig {
    /// The file; relative paths start at the config's folder.
    pub path: PathBuf,
    /// Event types sent without a subscription (default: all).
    pub events: Option<Vec<EventType>>,
}

/// `kind = "sqs"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsTargetConfig {
    pub url: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Event types sent without a subscription (default: all).
    pub events: Option<Vec<EventType>>,
}

/// `kind = "eventbridge"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBridgeTargetConfig {
    /// The bus, by name or ARN.
    pub bus: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Event types sent without a subscription (default: all).
    pub events: Option<Vec<EventType>>,
}

/// `kind = "webhook"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTargetConfig {
    pub url: String,
    /// Environment variable holding the HMAC-SHA256 secret for the
    /// `X-Renderq-Signature` header.
    pub secret_env: Option<String>,
    /// Limit on one attempt.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Event types sent without a subscription (default: all).
    pub events: Option<Vec<EventType>>,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A configuration that could not be used, naming the file, line and key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    path: PathBuf,
    line: Option<usize>,
    key: Option<String>,
    message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A problem found after parsing, located by its dotted key.
#[derive(Debug)]
pub struct Invalid {
    /// Dotted path to the offending key, e.g. `queue_manager.default_queue`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, parses and checks a config file. Relative paths inside it are
    /// resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let error = |line, key, message: String| ConfigError {
            path: path.to_owned(),
            line,
            key,
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(None, None, format!("cannot read: {e}")))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|span| {
                unknown_field_at(&text, span.clone(), e.message()).unwrap_or(span.start)
            });
            let line = at.map(|at| line_of(&text, at));
            let key = at.and_then(|at| key_at(&text, at));
            error(line, key, e.message().trim().to_owned())
        })?;
        let absolute = std::path::absolute(path)
            .map_err(|e| error(None, None, format!("cannot resolve path: {e}")))?;
        config.resolve_paths(absolute.parent().unwrap_or(Path::new("/")));
        config.source = Some(Arc::new(Source {
            path: path.to_owned(),
            text,
        }));
        config
            .validate()
            .map_err(|invalid| config.locate(invalid))?;
        Ok(config)
    }

    /// A problem with a key, as an error naming the file and line where the
    /// key is written (when the config came from a file).
    pub fn locate(&self, invalid: Invalid) -> ConfigError {
        let (path, line) = match &self.source {
            Some(source) => (
                source.path.clone(),
                span_of_key(&source.text, &invalid.key).map(|at| line_of(&source.text, at)),
            ),
            None => (PathBuf::from("(config)"), None),
        };
        ConfigError {
            path,
            line,
            key: Some(invalid.key),
            message: invalid.message,
        }
    }

    /// Parses a config from text, with relative paths resolved against
    /// `base`. For tests and examples that build configs in memory.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, anyhow::Error> {
        let mut config: Config = toml::from_str(text)?;
        config.resolve_paths(base);
        config
            .validate()
            .map_err(|i| anyhow::anyhow!("`{}`: {}", i.key, i.message))?;
        Ok(config)
    }

    /// Checks that hold across keys: names that refer to other tables exist,
    /// durations fit the queue's limits.
    fn validate(&self) -> Result<(), Invalid> {
        let qm = &self.queue_manager;
        for (key, queue) in [
            ("queue_manager.default_queue", &qm.default_queue),
            ("queue_manager.listen_queue", &qm.listen_queue),
        ] {
            if !self.queues.contains_key(queue) {
                return Err(Invalid::new(
                    key,
                    format!("no [queues.{queue}] table defines queue `{queue}`"),
                ));
            }
        }
        let w = &self.worker;
        if w.slots == Some(0) {
            return Err(Invalid::new("worker.slots", "must be at least 1"));
        }
        if w.visibility_timeout < Duration::from_secs(1) {
            return Err(Invalid::new(
                "worker.visibility_timeout",
                "must be at least 1s",
            ));
        }
        if w.max_runtime >= SQS_MAX_INVISIBILITY {
            return Err(Invalid::new(
                "worker.max_runtime",
                "must be below 12h, the longest SQS keeps a received message invisible",
            ));
        }
        if w.max_retry_delay < w.retry_delay {
            return Err(Invalid::new(
                "worker.max_retry_delay",
                "must not be shorter than worker.retry_delay",
            ));
        }
        let imds =
            crate::imds::Setting::parse(&w.imds).map_err(|e| Invalid::new("worker.imds", e))?;
        if w.autoscaling.is_some() && imds == crate::imds::Setting::Off {
            return Err(Invalid::new(
                "worker.autoscaling",
                "needs worker.imds (\"auto\" on EC2) to learn the instance id",
            ));
        }
        if let Some(dir) = &w.work_dir {
            check_writable_dir(dir).map_err(|e| Invalid::new("worker.work_dir", e))?;
        }
        if self.events.buffer == 0 {
            return Err(Invalid::new("events.buffer", "must be at least 1"));
        }
        if self.events.attempts == 0 {
            return Err(Invalid::new("events.attempts", "must be at least 1"));
        }
        if self.http_post.attempts == 0 {
            return Err(Invalid::new("http_post.attempts", "must be at least 1"));
        }
        let mut paths = BTreeMap::new();
        for (name, queue) in &self.queues {
            let QueueConfig::Local(local) = queue else {
                continue;
            };
            if local.max_receive_count == 0 {
                return Err(Invalid::new(
                    format!("queues.{name}.max_receive_count"),
                    "must be at least 1",
                ));
            }
            if let Some(other) = paths.insert(&local.path, name) {
                return Err(Invalid::new(
                    format!("queues.{name}.path"),
                    format!("queue `{other}` already uses this path"),
                ));
            }
        }
        for (name, queue) in &self.queues {
            if let QueueConfig::Sqs(sqs) = queue
                && let Some(bucket) = &sqs.status_bucket
                && !matches!(self.buckets.get(bucket), Some(BucketConfig::S3(_)))
            {
                return Err(Invalid::new(
                    format!("queues.{name}.status_bucket"),
                    format!("no [buckets.{bucket}] with backend = \"s3\""),
                ));
            }
        }
        for (name, bucket) in &self.buckets {
            if let BucketConfig::S3(s3) = bucket
                && s3.part_size < 5 * 1024 * 1024
            {
                return Err(Invalid::new(
                    format!("buckets.{name}.part_size"),
                    "must be at least 5 MiB (5242880), S3's smallest part",
                ));
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.config_dir = base.to_owned();
        if let Some(dir) = &mut self.worker.work_dir {
            *dir = base.join(&*dir);
        }
        for queue in self.queues.values_mut() {
            if let QueueConfig::Local(local) = queue {
                local.path = base.join(&local.path);
            }
        }
        for bucket in self.buckets.values_mut() {
            if let BucketConfig::Local(local) = bucket {
                local.path = base.join(&local.path);
            }
        }
        if let Some(status) = &mut self.events.status {
            *status = base.join(&*status);
        }
        for target in self.events.targets.values_mut() {
            if let EventTargetConfig::File(file) = target {
                file.path = base.join(&file.path);
            }
        }
    }
}

/// Checks that `dir` is a folder this process can make files in.
fn check_writable_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!(
            "{} does not exist or is not a folder",
            dir.display()
        ));
    }
    tempfile::tempfile_in(dir)
        .map(drop)
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))
}

/// Reads the secret an optional `*_env` key names (`key` for errors),
/// located in the file when it is missing.
pub fn optional_secret(
    config: &Config,
    key: &str,
    var: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    var.map(|var| secret_from_env(key, var))
        .transpose()
        .map_err(|i| config.locate(i))
}

/// Reads the secret an `*_env` key names, so the file never holds it.
pub fn secret_from_env(key: &str, var: &str) -> Result<String, Invalid> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(Invalid::new(
            key,
            format!("environment variable `{var}` is not set"),
        )),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Where an unknown field is written in the table starting at `span`.
/// Errors inside tagged tables (`[queues.NAME]`) point at the table's
/// header; this finds the field's own line.
fn unknown_field_at(text: &str, span: std::ops::Range<usize>, message: &str) -> Option<usize> {
    let field = message.strip_prefix("unknown field `")?.split('`').next()?;
    let mut offset = span.start;
    let table = text.get(span.start..)?;
    for (i, line) in table.split_inclusive('\n').enumerate() {
        if i > 0 && line.trim_start().starts_with('[') {
            break;
        }
        let rest = line.trim_start().strip_prefix(field);
        if rest.is_some_and(|r| r.trim_start().starts_with('=')) {
            return Some(offset + (line.len() - line.trim_start().len()));
        }
        offset += line.len();
    }
    None
}

/// The dotted key an error at `offset` is about: the key of the
/// `key = value` line it falls on, under the table header above it, or the
/// header itself.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let header = |l: &str| {
        l.strip_prefix('[').map(|rest| {
            rest.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned()
        })
    };
    if let Some(table) = header(line) {
        return Some(table);
    }
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    let table = text[..line_start]
        .lines()
        .rev()
        .find_map(|l| header(l.trim()));
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// Byte offset of a dotted key (`a.b[2]` style) in the document.
fn span_of_key(text: &str, dotted: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut start = None;
    for part in dotted.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (key, value) = item.as_table_like()?.get_key_value(name)?;
        start = key.span().map(|s| s.start).or(start);
        item = value;
        if let Some(index) = index {
            let array = item.as_array()?;
            start = array.get(index)?.span().map(|s| s.start).or(start);
            return start;
        }
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "q"
listen_queue = "q"

[queues.q]
backend = "local"
path = "var/q"
"#;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let config = load_text(MINIMAL).unwrap();
        assert_eq!(config.worker.slots, None);
        assert_eq!(config.server.max_body_bytes, 262144);
        let QueueConfig::Local(q) = &config.queues["q"] else {
            panic!("a local queue")
        };
        assert!(q.path.is_absolute());
        assert_eq!(q.max_receive_count, 3);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("path = \"var/q\"", "path = \"var/q\"\npth = 1");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains("pth"), "{err}");
        assert!(err.contains("workers.toml:10: `queues.q.pth`"), "{err}");
    }

    #[test]
    fn unknown_top_level_key_names_its_line() {
        let text = format!("{MINIMAL}\n[wrker]\nslots = 2\n");
        let err = load_text(&text).unwrap_err().to_string();
        let line = text.lines().position(|l| l == "[wrker]").unwrap() + 1;
        assert!(err.contains(&format!("workers.toml:{line}")), "{err}");
        assert!(err.contains("wrker"), "{err}");
    }

    #[test]
    fn missing_queue_names_the_key_and_line() {
        let text = MINIMAL.replace("listen_queue = \"q\"", "listen_queue = \"nope\"");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains(":5: `queue_manager.listen_queue`"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn later_problems_are_located_in_the_file() {
        let config = load_text(MINIMAL).unwrap();
        let err = config
            .locate(Invalid::new("queue_manager.default_queue", "no such queue"))
            .to_string();
        assert!(
            err.ends_with("workers.toml:4: `queue_manager.default_queue`: no such queue"),
            "{err}"
        );
    }

    #[test]
    fn max_runtime_must_stay_below_sqs_cap() {
        let text = format!("{MINIMAL}\n[worker]\nmax_runtime = \"12h\"\n");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains("worker.max_runtime"), "{err}");
    }

    #[test]
    fn bad_duration_is_an_error() {
        let text = format!("{MINIMAL}\n[worker]\nvisibility_timeout = \"soon\"\n");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains("`worker.visibility_timeout`"), "{err}");
    }
}
