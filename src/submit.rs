//! The submit half: checks a job against the catalog and sends it to a queue.
//! It never receives or deletes messages.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::array::parse_frames;
use crate::catalog::Catalog;
use crate::event::{Event, EventType, JobRef, Notification};
use crate::job::{ArrayPart, Envelope, TaskSpec};
use crate::ledger::Ledgers;
use crate::observe::Subject;
use crate::params::FieldError;
use crate::publish::Publisher;
use crate::queue::{QueueError, Queues};

/// `queue_manager_submit_job` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub command: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    /// Defaults to `queue_manager.default_queue`.
    #[serde(default)]
    pub queue_name: Option<String>,
    /// A frame spec (`"1-100"`, `"1-100x5"`, `"1,5,9-12"`): makes an array
    /// job of one child per chunk.
    #[serde(default)]
    pub frames: Option<String>,
    /// Frames per child (default 1).
    #[serde(default)]
    pub chunk_size: Option<u32>,
    /// The job's own event subscriptions.
    #[serde(default)]
    pub notifications: Vec<Notification>,
}

/// What a submit queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// One message.
    Job { message_id: String },
    /// An array job: its id and one message per child, in order.
    Array {
        job_id: String,
        message_ids: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job was refused; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The queue could not take it. For an array, `sent` lists the
    /// children queued before the failure (they will run).
    #[error("queue `{queue}`: {source}")]
    Queue {
        queue: String,
        source: QueueError,
        sent: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Submitter {
    catalog: Arc<Catalog>,
    queues: Queues,
    default_queue: String,
    /// For `JobSubmitted`, and to check the targets jobs subscribe to.
    publisher: Publisher,
    /// Queues with a ledger can take array jobs (it counts their children).
    ledgers: Ledgers,
    /// Most children one array job may have.
    max_array_size: u32,
}

/// Children sent per call (SQS `SendMessageBatch` takes 10).
const BATCH: usize = 10;

impl Submitter {
    pub fn new(
        catalog: Arc<Catalog>,
        queues: Queues,
        default_queue: String,
        publisher: Publisher,
        ledgers: Ledgers,
        max_array_size: u32,
    ) -> Self {
        Self {
            catalog,
            queues,
            default_queue,
            publisher,
            ledgers,
            max_array_size,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    pub fn default_queue(&self) -> &str {
        &self.default_queue
    }

    /// Checks and sends a job, or an array job's children; returns what
    /// was queued.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, SubmitError> {
        let queue_name = request
            .queue_name
            .clone()
            .unwrap_or_else(|| self.default_queue.clone());
        let queue = self.queues.get(&queue_name).ok_or_else(|| {
            FieldError::new(
                "queue_name",
                format!("no queue `{queue_name}` is configured"),
            )
        })?;
        let job = self
            .catalog
            .validate(&request.command, &request.parameters, &request.tasks)?;
        let has_frame = job.command.schema.contains("frame");
        for (i, notification) in request.notifications.iter().enumerate() {
            if !self.publisher.has_target(&notification.target) {
                return Err(FieldError::new(
                    format!("notifications[{i}].target"),
                    format!("no event target `{}` is configured", notification.target),
                )
                .into());
            }
        }
        let mut envelope = Envelope::new(request.command, request.parameters, request.tasks);
        envelope.notifications = request.notifications;
        let subject = |job_id: &str, message_id: &str| Subject {
            job: JobRef {
                job_id: job_id.to_owned(),
                message_id: message_id.to_owned(),
                queue: queue_name.clone(),
                command: envelope.command.clone(),
                attempt: 0,
                array: None,
            },
            notifications: envelope.notifications.clone(),
        };
        let queue_error = |source, sent| SubmitError::Queue {
            queue: queue_name.clone(),
            source,
            sent,
        };

        let Some(spec) = request.frames else {
            let message_id = queue
                .send(&envelope.to_body())
                .await
                .map_err(|e| queue_error(e, Vec::new()))?;
            tracing::info!(queue = %queue_name, %message_id, job_id = %envelope.job_id, "Job successfully queued.");
            self.publish_submitted(&subject(&envelope.job_id, &message_id), json!({}));
            return Ok(Submitted::Job { message_id });
        };

        if self.ledgers.get(&queue_name).is_none() {
            return Err(FieldError::new(
                "frames",
                format!("queue `{queue_name}` has no status_bucket to count an array's children"),
            )
            .into());
        }
        let chunk_size = request.chunk_size.unwrap_or(1);
        if chunk_size == 0 {
            return Err(FieldError::new("chunk_size", "must be at least 1").into());
        }
        let max_frames = self.max_array_size as usize * chunk_size as usize;
        let frames = parse_frames(&spec, max_frames).map_err(|e| {
            FieldError::new(
                "frames",
                format!("{e} (at most {} children)", self.max_array_size),
            )
        })?;
        let chunks: Vec<&[i64]> = frames.chunks(chunk_size as usize).collect();
        let size = chunks.len() as u32;
        let children: Vec<String> = chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| {
                let mut child = envelope.clone();
                child.job_id = uuid::Uuid::new_v4().to_string();
                if has_frame {
                    child.parameters.insert("frame".into(), json!(chunk[0]));
                }
                child.array = Some(ArrayPart {
                    job_id: envelope.job_id.clone(),
                    index: index as u32,
                    size,
                    frames: chunk.to_vec(),
                });
                child
            })
            .collect::<Vec<_>>()
            .iter()
            .map(|child| {
                // A child's parameters (with its `frame`) must pass too.
                self.catalog
                    .validate(&child.command, &child.parameters, &child.tasks)
                    .map_err(|e| {
                        FieldError::new("frames", format!("a child would be refused: {e}"))
                    })?;
                Ok(child.to_body())
            })
            .collect::<Result<_, FieldError>>()?;
        let mut message_ids = Vec::with_capacity(children.len());
        for batch in children.chunks(BATCH) {
            let ids = queue
                .send_batch(batch)
                .await
                .map_err(|e| queue_error(e, message_ids.clone()))?;
            message_ids.extend(ids);
        }
        tracing::info!(queue = %queue_name, job_id = %envelope.job_id, children = size, frames = frames.len(), "Array job successfully queued.");
        self.publish_submitted(
            &subject(&envelope.job_id, ""),
            json!({"array_size": size, "frames": frames.len()}),
        );
        Ok(Submitted::Array {
            job_id: envelope.job_id,
            message_ids,
        })
    }

    fn publish_submitted(&self, subject: &Subject, detail: Value) {
        self.publisher.publish(
            Event::new(EventType::JobSubmitted, Some(subject.job.clone()), detail),
            &subject.notifications,
        );
    }
}
