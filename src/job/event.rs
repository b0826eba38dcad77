//! Lifecycle events as values: their types, their JSON form (SPEC §8), and
//! the per-job subscriptions a submit may carry. Pure: publishing them is
//! the events folder's job.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::label::Label;

/// The event format this build writes and reads.
pub const PROTOCOL: u32 = 1;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    JobSubmitted,
    JobStarted,
    JobProgress,
    JobSucceeded,
    JobFailed,
    JobRequeued,
    JobDeadLettered,
    JobCancelled,
    JobHeld,
    JobReleased,
    TaskSucceeded,
    TaskFailed,
    ArrayJobCompleted,
    BudgetReached,
    WorkerStarted,
    WorkerStopping,
    WorkerInterrupted,
    /// The worker failed too many tries in a row and takes no more jobs.
    WorkerUnhealthy,
}

impl EventType {
    pub const ALL: [EventType; 18] = [
        EventType::JobSubmitted,
        EventType::JobStarted,
        EventType::JobProgress,
        EventType::JobSucceeded,
        EventType::JobFailed,
        EventType::JobRequeued,
        EventType::JobDeadLettered,
        EventType::JobCancelled,
        EventType::JobHeld,
        EventType::JobReleased,
        EventType::TaskSucceeded,
        EventType::TaskFailed,
        EventType::ArrayJobCompleted,
        EventType::BudgetReached,
        EventType::WorkerStarted,
        EventType::WorkerStopping,
        EventType::WorkerInterrupted,
        EventType::WorkerUnhealthy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventType::JobSubmitted => "JobSubmitted",
            EventType::JobStarted => "JobStarted",
            EventType::JobProgress => "JobProgress",
            EventType::JobSucceeded => "JobSucceeded",
            EventType::JobFailed => "JobFailed",
            EventType::JobRequeued => "JobRequeued",
            EventType::JobDeadLettered => "JobDeadLettered",
            EventType::JobCancelled => "JobCancelled",
            EventType::JobHeld => "JobHeld",
            EventType::JobReleased => "JobReleased",
            EventType::TaskSucceeded => "TaskSucceeded",
            EventType::TaskFailed => "TaskFailed",
            EventType::ArrayJobCompleted => "ArrayJobCompleted",
            EventType::BudgetReached => "BudgetReached",
            EventType::WorkerStarted => "WorkerStarted",
            EventType::WorkerStopping => "WorkerStopping",
            EventType::WorkerInterrupted => "WorkerInterrupted",
            EventType::WorkerUnhealthy => "WorkerUnhealthy",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EventType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        EventType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown event type `{s}`"))
    }
}

/// Who published an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerIdentity {
    /// Unique per worker process.
    pub id: String,
    pub host: String,
    /// The EC2 instance, when known.
    pub instance_id: Option<String>,
}

impl WorkerIdentity {
    /// This process, on this host.
    pub fn current() -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            instance_id: None,
        }
    }
}

/// The job an event is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: String,
    pub message_id: String,
    pub queue: String,
    pub command: String,
    /// Tries used, this one included (0 before the first).
    pub attempt: u32,
    /// For an array child: the array's id and this child's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayRef>,
    /// The job's name, owner and metadata, as submitted.
    #[serde(flatten)]
    pub label: Label,
}

/// Where an array child sits in its array.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayRef {
    pub job_id: String,
    pub index: u32,
    pub size: u32,
    /// A re-render's revision (absent: the submit's, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// A re-render child's frames (the submit's children leave them out:
    /// the array's frame spec says them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<i64>,
}

impl ArrayRef {
    /// How an event names the array child `part`.
    pub fn of(part: &crate::job::ArrayPart) -> Self {
        Self {
            job_id: part.job_id.clone(),
            index: part.index,
            size: part.size,
            revision: part.revision.map(|r| r.number),
            frames: if part.revision.is_some() {
                part.frames.clone()
            } else {
                Vec::new()
            },
        }
    }
}

/// One event, as it travels (SPEC §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event, so consumers can drop repeats.
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339.
    pub time: String,
    pub protocol: u32,
    #[serde(flatten)]
    pub job: Option<JobRef>,
    pub worker: Option<WorkerIdentity>,
    pub detail: Value,
    /// The job's subscription variables.
    #[serde(default)]
    pub vars: Map<String, Value>,
}

impl Event {
    /// A new event, now.
    pub fn new(kind: EventType, job: Option<JobRef>, detail: Value) -> Self {
        Self {
            // Time-ordered (v7): the status table's index of the events
            // it has seen takes each new one at its end, not at a random
            // page (which cost a page written per event at commit).
            event_id: uuid::Uuid::now_v7().to_string(),
            kind,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            protocol: PROTOCOL,
            job,
            worker: None,
            detail,
            vars: Map::new(),
        }
    }

    /// Parses an event a target delivered; refuses other protocols.
    pub fn parse(text: &str) -> Result<Self, String> {
        let event: Event = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if event.protocol != PROTOCOL {
            return Err(format!("unsupported event protocol {}", event.protocol));
        }
        Ok(event)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes")
    }

    /// The event as JSON of at most `limit` bytes: whole, or with
    /// `detail.outputs` cut short (`detail.outputs_omitted` says how many
    /// were left out; a `JobSucceeded` of a thousand frames, say).
    /// `Err(bytes)` when it does not fit even so.
    pub fn to_json_within(&self, limit: usize) -> Result<String, usize> {
        let json = self.to_json();
        let outputs = self.detail["outputs"].as_array().map_or(0, Vec::len);
        if json.len() <= limit || outputs == 0 {
            return if json.len() <= limit {
                Ok(json)
            } else {
                Err(json.len())
            };
        }
        // Halve what is kept until it fits: at most log2(outputs) tries.
        let mut keep = outputs;
        while keep > 0 {
            keep /= 2;
            let mut trimmed = self.clone();
            let all = trimmed.detail["outputs"]
                .as_array_mut()
                .expect("counted above");
            all.truncate(keep);
            trimmed.detail["outputs_omitted"] = (outputs - keep).into();
            let json = trimmed.to_json();
            if json.len() <= limit {
                return Ok(json);
            }
            if keep == 0 {
                return Err(json.len());
            }
        }
        Err(json.len())
    }
}

/// A job's own subscription: `{"events": [...], "target": "NAME", "vars": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Event types to deliver (all when empty).
    #[serde(default)]
    pub events: Vec<EventType>,
    /// An `[events.targets.NAME]`.
    pub target: String,
    /// Copied into every event delivered for this subscription.
    #[serde(default)]
    pub vars: Map<String, Value>,
}

impl Notification {
    pub fn wants(&self, kind: EventType) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_json_has_the_spec_fields() {
        let job = JobRef {
            job_id: "j".into(),
            message_id: "m".into(),
            queue: "renders".into(),
            command: "render_demo".into(),
            attempt: 1,
            array: None,
            label: Label::default(),
        };
        let event = Event::new(
            EventType::JobSucceeded,
            Some(job),
            json!({"duration_ms": 5}),
        );
        let value: Value = serde_json::from_str(&event.to_json()).unwrap();
        for field in [
            "event_id",
            "type",
            "time",
            "protocol",
            "job_id",
            "message_id",
            "queue",
            "command",
            "attempt",
            "worker",
            "detail",
            "vars",
        ] {
            assert!(value.get(field).is_some(), "{field} in {value}");
        }
        assert_eq!(value["type"], "JobSucceeded");
        assert_eq!(Event::parse(&event.to_json()).unwrap(), event);
    }

    #[test]
    fn worker_events_have_no_job_fields() {
        let event = Event::new(EventType::WorkerStarted, None, json!({}));
        let value: Value = serde_json::from_str(&event.to_json()).unwrap();
        assert!(value.get("job_id").is_none());
        assert_eq!(Event::parse(&event.to_json()).unwrap().job, None);
    }

    #[test]
    fn unknown_types_and_protocols_are_refused() {
        assert!("JobExploded".parse::<EventType>().is_err());
        assert_eq!("JobFailed".parse::<EventType>(), Ok(EventType::JobFailed));
        let mut value: Value =
            serde_json::from_str(&Event::new(EventType::JobStarted, None, json!({})).to_json())
                .unwrap();
        value["protocol"] = json!(2);
        assert!(Event::parse(&value.to_string()).is_err());
    }
}
