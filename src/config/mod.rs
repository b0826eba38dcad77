//! `workers.toml`: the configuration types, their defaults and their checks.
//!
//! These are plain serde types (`deny_unknown_fields`, a doc comment on every
//! field that doubles as the user documentation). They describe what the
//! operator asked for; the runtime objects (queues, buckets, the catalog of
//! commands) are built from them elsewhere and never deserialize themselves.
//!
//! Here: the whole file, its loading and the checks across tables. The
//! tables are in `sections`, `web`, `worker` and `events`; `locate` finds the line a key is
//! written on, so that every error names it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

mod bytes;
mod events;
mod fleet;
mod locate;
mod sections;
mod web;
mod worker;

pub use events::*;
pub use fleet::*;
use locate::{key_at, line_of, span_of_key, unknown_field_at};
pub use sections::*;
pub use web::*;
pub use worker::*;

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
    /// What the machines cost (`[fleet] price`).
    #[serde(default)]
    pub fleet: FleetConfig,
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
    /// The queues a worker takes jobs from, most urgent first.
    pub fn listen_queues(&self) -> Vec<String> {
        (self.worker.listen_queues.clone())
            .unwrap_or_else(|| vec![self.queue_manager.listen_queue.clone()])
    }

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
        for (key, value) in [
            ("queue_manager.max_array_size", qm.max_array_size as usize),
            ("queue_manager.max_chunk_size", qm.max_chunk_size as usize),
            ("queue_manager.max_frames", qm.max_frames as usize),
            ("queue_manager.max_message_bytes", qm.max_message_bytes),
            ("queue_manager.max_array_bytes", qm.max_array_bytes),
            ("queue_manager.max_batch", qm.max_batch),
            (
                "queue_manager.max_request_messages",
                qm.max_request_messages as usize,
            ),
            ("queue_manager.max_name_bytes", qm.max_name_bytes),
            ("queue_manager.max_revisions", qm.max_revisions as usize),
        ] {
            if value == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        let w = &self.worker;
        if let Some(names) = &w.listen_queues {
            let key = "worker.listen_queues";
            if names.is_empty() {
                return Err(Invalid::new(key, "must name at least one queue"));
            }
            for (i, name) in names.iter().enumerate() {
                if !self.queues.contains_key(name) {
                    return Err(Invalid::new(
                        key,
                        format!("no [queues.{name}] table defines queue `{name}`"),
                    ));
                }
                if names[..i].contains(name) {
                    return Err(Invalid::new(key, format!("queue `{name}` is named twice")));
                }
            }
        }
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
        let imds = crate::config::ImdsSetting::parse(&w.imds)
            .map_err(|e| Invalid::new("worker.imds", e))?;
        if w.autoscaling.is_some() && imds == crate::config::ImdsSetting::Off {
            return Err(Invalid::new(
                "worker.autoscaling",
                "needs worker.imds (\"auto\" on EC2) to learn the instance id",
            ));
        }
        if let Some(dir) = &w.work_dir {
            check_writable_dir(dir).map_err(|e| Invalid::new("worker.work_dir", e))?;
        }
        self.server.check()?;
        self.metrics.check()?;
        self.fleet.prices()?;
        w.thumbnails.check()?;
        for (key, value) in [
            ("worker.blocklist_after", w.blocklist_after),
            ("worker.sick_after", w.sick_after),
        ] {
            if value == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if self.events.buffer == 0 {
            return Err(Invalid::new("events.buffer", "must be at least 1"));
        }
        if self.events.status_buffer == 0 {
            return Err(Invalid::new(
                "events.status_buffer",
                "must be at least 1 byte",
            ));
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
        for (name, queue) in &self.queues {
            for (i, bucket) in queue.input_buckets().unwrap_or_default().iter().enumerate() {
                if !self.buckets.contains_key(bucket) {
                    return Err(Invalid::new(
                        format!("queues.{name}.input_buckets[{i}]"),
                        format!("no [buckets.{bucket}] is configured"),
                    ));
                }
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

    /// The buckets a job on `queue` may read inputs from: its
    /// `input_buckets`, or without that list every bucket but the queues'
    /// ledgers (`status_bucket`: the workers' own records, never a job's).
    pub fn input_buckets(&self, queue: &str) -> std::collections::BTreeSet<String> {
        if let Some(listed) = self.queues.get(queue).and_then(QueueConfig::input_buckets) {
            return listed.iter().cloned().collect();
        }
        let ledgers: Vec<&String> = (self.queues.values())
            .filter_map(|q| match q {
                QueueConfig::Sqs(sqs) => sqs.status_bucket.as_ref(),
                QueueConfig::Local(_) => None,
            })
            .collect();
        (self.buckets.keys())
            .filter(|b| !ledgers.contains(b))
            .cloned()
            .collect()
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.config_dir = base.to_owned();
        self.worker.default_work_dir = base.join(worker::DEFAULT_WORK_DIR);
        if let Some(dir) = &mut self.worker.work_dir {
            *dir = base.join(&*dir);
        }
        if let Some(dir) = &mut self.worker.cache.path {
            *dir = base.join(&*dir);
        }
        if let Some(program) = &mut self.worker.thumbnails.program {
            *program = base.join(&*program);
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
        self.events.status = match std::mem::take(&mut self.events.status) {
            StatusSetting::At(path) => StatusSetting::At(base.join(path)),
            StatusSetting::Off => StatusSetting::Off,
            StatusSetting::Default => {
                StatusSetting::At(match self.queues.get(&self.queue_manager.default_queue) {
                    Some(QueueConfig::Local(local)) => local.path.join("status.sqlite3"),
                    _ => self.worker.work_root().join("renderq-status.sqlite3"),
                })
            }
        };
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest config that loads: one embedded queue.
    pub(crate) const MINIMAL: &str = r#"
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
        // All state under the config's own `var/`, none in /tmp.
        let var = q.path.parent().unwrap();
        assert_eq!(config.worker.work_root(), var.join("work"));
        assert_eq!(
            config.worker.cache_root(),
            var.join("work").join("renderq-cache")
        );
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
    fn listen_queues_must_name_known_queues_once() {
        for (value, expected) in [
            (r#"["q", "nope"]"#, "no [queues.nope]"),
            (r#"["q", "q"]"#, "named twice"),
            ("[]", "at least one"),
        ] {
            let text = format!("{MINIMAL}\n[worker]\nlisten_queues = {value}\n");
            let line = text.lines().count();
            let err = load_text(&text).unwrap_err().to_string();
            assert!(
                err.contains(&format!(":{line}: `worker.listen_queues`")) && err.contains(expected),
                "{err}"
            );
        }
        let text = format!("{MINIMAL}\n[worker]\nlisten_queues = [\"q\"]\n");
        assert_eq!(load_text(&text).unwrap().listen_queues(), ["q"]);
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
