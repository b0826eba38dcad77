//! The submit half: checks a job against the catalog and sends it to a queue.
//! It never receives or deletes messages.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::job::{Envelope, TaskSpec};
use crate::params::FieldError;
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
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job was refused; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The queue could not take it.
    #[error("queue `{queue}`: {source}")]
    Queue { queue: String, source: QueueError },
}

#[derive(Debug, Clone)]
pub struct Submitter {
    catalog: Arc<Catalog>,
    queues: Queues,
    default_queue: String,
}

impl Submitter {
    pub fn new(catalog: Arc<Catalog>, queues: Queues, default_queue: String) -> Self {
        Self {
            catalog,
            queues,
            default_queue,
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

    /// Checks and sends a job; returns the message id.
    pub async fn submit(&self, request: SubmitRequest) -> Result<String, SubmitError> {
        let queue_name = request.queue_name.as_deref().unwrap_or(&self.default_queue);
        let queue = self.queues.get(queue_name).ok_or_else(|| {
            FieldError::new(
                "queue_name",
                format!("no queue `{queue_name}` is configured"),
            )
        })?;
        self.catalog
            .validate(&request.command, &request.parameters, &request.tasks)?;
        let envelope = Envelope::new(request.command, request.parameters, request.tasks);
        let message_id =
            queue
                .send(&envelope.to_body())
                .await
                .map_err(|source| SubmitError::Queue {
                    queue: queue_name.to_owned(),
                    source,
                })?;
        tracing::info!(
            queue = queue_name,
            %message_id,
            job_id = %envelope.job_id,
            "Job successfully queued."
        );
        Ok(message_id)
    }
}
