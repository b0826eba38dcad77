//! `[events]` of `workers.toml`: the status table and the targets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::job::event::EventType;

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
    /// Bytes of events waiting for the status table (about what they take
    /// in memory); past this, new ones are dropped (and counted). Large:
    /// a table that missed a job's end would show it running for ever.
    #[serde(with = "super::bytes")]
    pub status_buffer: usize,
    /// How many times a batch is sent before it is dropped (and counted).
    pub attempts: u32,
    /// A job-status table (SQLite) this process keeps up to date with the
    /// events it publishes; `renderq status`, `events watch` and
    /// `queue_manager_job_status` use it. On by default (see
    /// [`StatusSetting`]).
    pub status: StatusSetting,
}

/// `[events] status`: where the job-status table is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StatusSetting {
    /// Not set: beside the default queue's state when it is embedded,
    /// else `renderq-status.sqlite3` in `work_dir`. Resolved when the
    /// config is loaded; never seen after.
    #[default]
    Default,
    /// `"off"`: no table; the commands that need one say so.
    Off,
    /// A path, relative to the config's folder.
    At(PathBuf),
}

impl StatusSetting {
    /// The table's file, unless it is off.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            StatusSetting::At(path) => Some(path),
            StatusSetting::Default | StatusSetting::Off => None,
        }
    }
}

impl<'de> Deserialize<'de> for StatusSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = PathBuf::deserialize(d)?;
        Ok(match text.to_str() {
            Some("off") => StatusSetting::Off,
            _ => StatusSetting::At(text),
        })
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            targets: BTreeMap::new(),
            buffer: 10_000,
            status_buffer: 256 << 20,
            attempts: 10,
            status: StatusSetting::Default,
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
