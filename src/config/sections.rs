//! The tables of `workers.toml` other than `[worker]` and `[events]`, one
//! type each, with their defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::job::params::ParamSpec;

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
    /// How long a run usually takes: the expected time left of a job that
    /// reports no progress, when a notice asks which jobs can finish.
    #[serde(default, with = "humantime_serde")]
    pub typical_duration: Option<Duration>,
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
    /// How long a run usually takes: the expected time left of a job that
    /// reports no progress, when a notice asks which jobs can finish.
    #[serde(default, with = "humantime_serde")]
    pub typical_duration: Option<Duration>,
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
    /// Most frames one child of an array may carry (`chunk_size`).
    #[serde(default = "default_max_chunk_size")]
    pub max_chunk_size: u32,
    /// Most frames one array may name, counted range by range before any
    /// is expanded (a frame written twice counts twice).
    #[serde(default = "default_max_frames")]
    pub max_frames: u32,
    /// Largest message body a submit may send, one job or one child
    /// (SQS takes at most 256 KiB).
    #[serde(
        default = "default_max_message_bytes",
        deserialize_with = "crate::config::bytes::deserialize"
    )]
    pub max_message_bytes: usize,
    /// Largest total of an array's children's bodies: what one submit may
    /// put on the queue.
    #[serde(
        default = "default_max_array_bytes",
        deserialize_with = "crate::config::bytes::deserialize"
    )]
    pub max_array_bytes: usize,
    /// Most requests in one JSON-RPC batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Most messages one HTTP request may queue, across its whole batch.
    #[serde(default = "default_max_request_messages")]
    pub max_request_messages: u32,
    /// Most entries in one job's `inputs`.
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Most event subscriptions (`notifications`) one job may carry;
    /// identical ones are then merged.
    #[serde(default = "default_max_notifications")]
    pub max_notifications: usize,
    /// Most `depends_on` entries one job may carry.
    #[serde(default = "default_max_dependencies")]
    pub max_dependencies: usize,
    /// How long a dependant freed by a worker that died before sending it
    /// waits before the sweep sends it (a live worker sends at once).
    #[serde(default = "default_release_grace", with = "humantime_serde")]
    pub release_grace: Duration,
    /// How long the records of finished work are kept: the job-status
    /// table's rows and the ledger's reports and array states. Pruned
    /// every hour by `serve` and `worker`, and by `renderq prune`.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Longest `name` or `owner` a job may carry, and longest key or value
    /// of its `metadata`, in bytes.
    #[serde(default = "default_max_name_bytes")]
    pub max_name_bytes: usize,
    /// Most entries in a job's `metadata`.
    #[serde(default = "default_max_metadata_entries")]
    pub max_metadata_entries: usize,
    /// Most revisions of one array (its submit and its re-renders): what
    /// the monitor's grid reads for a frame is bounded by it.
    #[serde(default = "default_max_revisions")]
    pub max_revisions: u32,
}

fn default_max_name_bytes() -> usize {
    256
}

fn default_max_metadata_entries() -> usize {
    16
}

fn default_max_revisions() -> u32 {
    16
}

fn default_max_array_size() -> u32 {
    10_000
}

fn default_max_chunk_size() -> u32 {
    10_000
}

/// `max_frames` when the file does not say.
pub const DEFAULT_MAX_FRAMES: u32 = 100_000;

fn default_max_frames() -> u32 {
    DEFAULT_MAX_FRAMES
}

fn default_max_message_bytes() -> usize {
    256 * 1024
}

fn default_max_array_bytes() -> usize {
    256 * 1024 * 1024
}

fn default_max_batch() -> usize {
    100
}

fn default_max_request_messages() -> u32 {
    10_000
}

fn default_max_inputs() -> usize {
    100
}

fn default_max_notifications() -> usize {
    10
}

fn default_max_dependencies() -> usize {
    16
}

fn default_release_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
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
    /// The `[buckets.NAME]` a job on this queue may read inputs from (see
    /// [`QueueConfig::input_buckets`] for the default).
    #[serde(default)]
    pub input_buckets: Option<Vec<String>>,
}

impl QueueConfig {
    /// The buckets a job on this queue may name in `inputs`, when the
    /// queue lists them (`input_buckets`). Without a list, every bucket
    /// except the ledgers (`status_bucket`) may be read: see
    /// [`crate::config::Config::input_buckets`].
    pub fn input_buckets(&self) -> Option<&[String]> {
        match self {
            QueueConfig::Local(q) => q.input_buckets.as_deref(),
            QueueConfig::Sqs(q) => q.input_buckets.as_deref(),
        }
    }
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
    /// The `[buckets.NAME]` a job on this queue may read inputs from (see
    /// [`QueueConfig::input_buckets`] for the default).
    #[serde(default)]
    pub input_buckets: Option<Vec<String>>,
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
    #[serde(
        default = "default_multipart_threshold",
        deserialize_with = "crate::config::bytes::deserialize"
    )]
    pub multipart_threshold: u64,
    /// Size of each multipart part (S3's minimum is 5 MiB).
    #[serde(
        default = "default_part_size",
        deserialize_with = "crate::config::bytes::deserialize"
    )]
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
    /// How long one attempt may go without progress (connecting, sending
    /// no byte, or awaiting the answer after the last byte); a large result
    /// that keeps moving is never cut.
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
