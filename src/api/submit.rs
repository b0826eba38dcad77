//! The submit half: checks a job against the catalog and sends it to a queue.
//! It never receives or deletes messages.
//!
//! What one request may cost is bounded before anything is built or sent
//! ([`Limits`], from `[queue_manager]`): frames are measured before they are
//! expanded, every child's body is sized before the first is sent, and an
//! array goes out one batch of ten at a time, so memory does not grow with
//! its size.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::children::{ArrayPlan, CHILD_SLACK, json_len, make_child, send_batch};
use super::depends::DependPlan;
use crate::commands::catalog::Catalog;
use crate::config::QueueManagerConfig;
use crate::events::ledger::{ArrayCounts, ChildState, Ledgers};
use crate::events::observe::{Observer, Subject};
use crate::events::publish::Publisher;
use crate::job::depends::DependsOn;
use crate::job::event::{Event, EventType, JobRef, Notification};
use crate::job::frames::{format_frames, parse_frames};
use crate::job::inputs::InputSpec;
use crate::job::label::{Label, LabelLimits};
use crate::job::params::FieldError;
use crate::job::{Envelope, TaskSpec};
use crate::queue::{Queue, QueueError, Queues, SEND_BATCH, SEND_BATCH_BYTES};
use crate::storage::{Buckets, StorageError};
use crate::worker::release::{Reach, Releaser};

/// `queue_manager_submit_job` params.
#[derive(Debug, Clone, Default, Deserialize)]
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
    /// Objects placed in the job's working folder before it runs.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// What people call the job ("shot010_lighting_v3").
    #[serde(default)]
    pub name: Option<String>,
    /// Who submitted it (free text).
    #[serde(default)]
    pub owner: Option<String>,
    /// A small flat map of strings (project, sequence, shot).
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Jobs this one waits for (SPEC §12): held in the ledger until then.
    #[serde(default)]
    pub depends_on: Vec<DependsOn>,
    /// `{"usd": 25}`: an array stops starting children once its tries
    /// cost this much.
    #[serde(default)]
    pub budget: Option<crate::job::usage::Budget>,
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

/// The children of an array that a failed submit did not send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSent {
    /// The array's id.
    pub job_id: String,
    /// Their frames, as a spec the client can resubmit.
    pub frames: String,
    /// Whether the ledger recorded them as final, so that the array
    /// completes with the children that were sent.
    pub recorded: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job was refused; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// An input's bucket could not be read to pin it (not a missing
    /// object: that is `Invalid`); nothing was sent.
    #[error("{field}: {source}")]
    Input { field: String, source: StorageError },
    /// The queue could not take it. For an array, `sent` lists the
    /// children queued before the failure (they will run), and `not_sent`
    /// says which were not.
    #[error("queue `{queue}`: {source}")]
    Queue {
        queue: String,
        source: QueueError,
        sent: Vec<String>,
        not_sent: Option<Box<NotSent>>,
    },
}

/// What one submit may cost: `[queue_manager]`'s limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_array_size: u32,
    pub max_chunk_size: u32,
    pub max_frames: u32,
    pub max_message_bytes: usize,
    pub max_array_bytes: usize,
    pub max_notifications: usize,
    pub max_dependencies: usize,
    pub max_batch: usize,
    pub max_request_messages: u32,
    pub label: LabelLimits,
    pub max_revisions: u32,
}

impl From<&QueueManagerConfig> for Limits {
    fn from(c: &QueueManagerConfig) -> Self {
        Self {
            max_array_size: c.max_array_size,
            max_chunk_size: c.max_chunk_size,
            max_frames: c.max_frames,
            max_message_bytes: c.max_message_bytes,
            max_array_bytes: c.max_array_bytes,
            max_notifications: c.max_notifications,
            max_dependencies: c.max_dependencies,
            max_batch: c.max_batch,
            max_request_messages: c.max_request_messages,
            label: LabelLimits {
                max_name_bytes: c.max_name_bytes,
                max_metadata_entries: c.max_metadata_entries,
            },
            max_revisions: c.max_revisions,
        }
    }
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
    limits: Limits,
    /// Where inputs are pinned (`HEAD`) before a job is sent.
    buckets: Buckets,
}

/// A checked submit, nothing sent yet: what it will queue is known.
#[derive(Debug)]
pub struct Prepared {
    queue_name: String,
    queue: Queue,
    envelope: Envelope,
    array: Option<ArrayPlan>,
    /// What it waits for, when it has `depends_on`.
    depends: Option<DependPlan>,
}

impl Prepared {
    /// Messages it will send.
    pub fn messages(&self) -> u32 {
        self.array.as_ref().map_or(1, ArrayPlan::size)
    }
}

impl Submitter {
    /// Every queue and its ledger: where dependants on other queues are.
    fn reach(&self) -> Reach<'_> {
        Reach {
            queues: &self.queues,
            ledgers: &self.ledgers,
        }
    }

    pub fn new(
        catalog: Arc<Catalog>,
        queues: Queues,
        default_queue: String,
        publisher: Publisher,
        ledgers: Ledgers,
        limits: Limits,
        buckets: Buckets,
    ) -> Self {
        Self {
            catalog,
            queues,
            default_queue,
            publisher,
            ledgers,
            limits,
            buckets,
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

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn ledgers(&self) -> &Ledgers {
        &self.ledgers
    }

    pub(super) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Checks and sends a job, or an array job's children; returns what
    /// was queued.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, SubmitError> {
        let prepared = self.prepare(request).await?;
        self.send(prepared).await
    }

    /// Checks a job against the catalog and the limits, without sending
    /// anything. Its work is bounded by the limits, not by the request; an
    /// array's (up to `max_frames` frames and `max_array_size` children
    /// checked) is done off the async threads.
    pub async fn prepare(&self, mut request: SubmitRequest) -> Result<Prepared, SubmitError> {
        if !request.inputs.is_empty() {
            let queue = (request.queue_name.as_deref()).unwrap_or(&self.default_queue);
            super::pins::pin(&self.catalog, &self.buckets, queue, &mut request.inputs).await?;
        }
        let depends_on = std::mem::take(&mut request.depends_on);
        let mut prepared = if request.frames.is_none() {
            self.check(request)?
        } else {
            let submitter = self.clone();
            tokio::task::spawn_blocking(move || submitter.check(request))
                .await
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))?
        };
        prepared.depends = self
            .plan_depends(&depends_on, &prepared.queue_name, prepared.array.as_ref())
            .await?;
        Ok(prepared)
    }

    fn check(&self, request: SubmitRequest) -> Result<Prepared, SubmitError> {
        let limits = &self.limits;
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
        if request.notifications.len() > limits.max_notifications {
            return Err(FieldError::new(
                "notifications",
                format!(
                    "{} subscriptions; at most {} a job (queue_manager.max_notifications)",
                    request.notifications.len(),
                    limits.max_notifications
                ),
            )
            .into());
        }
        let notifications = merge_notifications(request.notifications);
        for (i, notification) in notifications.iter().enumerate() {
            if !self.publisher.has_target(&notification.target) {
                return Err(FieldError::new(
                    format!("notifications[{i}].target"),
                    format!("no event target `{}` is configured", notification.target),
                )
                .into());
            }
        }
        let label = Label {
            name: request.name,
            owner: request.owner,
            metadata: request.metadata,
        };
        label.check(&limits.label)?;
        let job = self
            .catalog
            .validate(&request.command, &request.parameters, &request.tasks)?;
        let has_frame = job.command.schema.contains("frame");
        self.catalog.check_inputs(&queue_name, &request.inputs)?;
        let mut envelope = Envelope::new(request.command, request.parameters, request.tasks);
        envelope.notifications = notifications;
        envelope.inputs = request.inputs;
        envelope.label = label;
        if let Some(budget) = request.budget {
            budget
                .check()
                .map_err(|e| FieldError::new("budget.usd", e))?;
            if request.frames.is_none() {
                return Err(FieldError::new(
                    "budget",
                    "a budget stops an array's children: it needs `frames`",
                )
                .into());
            }
            envelope.budget = Some(budget);
        }

        let Some(spec) = request.frames else {
            let bytes = envelope.to_body().len();
            if bytes > limits.max_message_bytes {
                return Err(too_large("parameters", bytes, limits.max_message_bytes).into());
            }
            return Ok(Prepared {
                queue_name,
                queue: queue.clone(),
                envelope,
                array: None,
                depends: None,
            });
        };

        let Some(ledger) = self.ledgers.get(&queue_name).cloned() else {
            return Err(FieldError::new(
                "frames",
                format!("queue `{queue_name}` has no status_bucket to count an array's children"),
            )
            .into());
        };
        let chunk_size = request.chunk_size.unwrap_or(1);
        if !(1..=limits.max_chunk_size).contains(&chunk_size) {
            return Err(FieldError::new(
                "chunk_size",
                format!(
                    "must be from 1 to {} frames a child (queue_manager.max_chunk_size)",
                    limits.max_chunk_size
                ),
            )
            .into());
        }
        let frames = parse_frames(&spec, limits.max_frames.into())
            .map_err(|e| FieldError::new("frames", format!("{e} (queue_manager.max_frames)")))?;
        let plan = ArrayPlan {
            frames,
            spec: spec.trim().to_owned(),
            chunk_size: chunk_size as usize,
            has_frame,
            ledger,
        };
        if plan.size() > limits.max_array_size {
            return Err(FieldError::new(
                "frames",
                format!(
                    "{} children of {chunk_size} frames; at most {} (queue_manager.max_array_size)",
                    plan.size(),
                    limits.max_array_size
                ),
            )
            .into());
        }
        self.check_children(&envelope, &plan)?;
        Ok(Prepared {
            queue_name,
            queue: queue.clone(),
            envelope,
            array: Some(plan),
            depends: None,
        })
    }

    /// Every child must pass the catalog (with its own `frame`), fit in a
    /// message, and all of them together in `max_array_bytes`. One child's
    /// body is built; the others are sized from their frames.
    fn check_children(&self, envelope: &Envelope, plan: &ArrayPlan) -> Result<(), FieldError> {
        let limits = &self.limits;
        let size = plan.size();
        let first = plan.chunks().next().unwrap_or_default();
        let mut sample = envelope.clone();
        make_child(&mut sample, &envelope.job_id, plan, 0, first);
        let base = sample.to_body().len().saturating_sub(json_len(first)) + CHILD_SLACK;
        let mut total = 0usize;
        let mut parameters = envelope.parameters.clone();
        for chunk in plan.chunks() {
            let bytes = base + json_len(chunk);
            if bytes > limits.max_message_bytes {
                let field = if plan.chunk_size > 1 {
                    "chunk_size"
                } else {
                    "parameters"
                };
                return Err(too_large(field, bytes, limits.max_message_bytes));
            }
            total = total.saturating_add(bytes);
            if total > limits.max_array_bytes {
                return Err(FieldError::new(
                    "frames",
                    format!(
                        "{size} children of about {bytes} bytes would queue more than {} bytes \
                         (queue_manager.max_array_bytes)",
                        limits.max_array_bytes
                    ),
                ));
            }
            if plan.has_frame {
                parameters.insert("frame".into(), json!(chunk[0]));
                self.catalog
                    .validate(&envelope.command, &parameters, &envelope.tasks)
                    .map_err(|e| {
                        FieldError::new("frames", format!("a child would be refused: {e}"))
                    })?;
            }
        }
        Ok(())
    }

    /// Sends what [`Submitter::prepare`] checked. A job with parents is
    /// held in the ledger (its children that wait for nothing are sent).
    pub async fn send(&self, prepared: Prepared) -> Result<Submitted, SubmitError> {
        let Prepared {
            queue_name,
            queue,
            mut envelope,
            array,
            depends,
        } = prepared;
        if depends.is_some() {
            // Its id is known before any message exists: the one returned.
            envelope.message_id = Some(envelope.job_id.clone());
        }
        let subject = Subject {
            job: JobRef {
                job_id: envelope.job_id.clone(),
                message_id: String::new(),
                queue: queue_name.clone(),
                command: envelope.command.clone(),
                attempt: 0,
                array: None,
                label: envelope.label.clone(),
            },
            notifications: envelope.notifications.clone(),
        };
        let ledger_failed = |error: crate::events::ledger::LedgerError| SubmitError::Queue {
            queue: queue_name.clone(),
            source: QueueError::Unavailable(error.to_string()),
            sent: Vec::new(),
            not_sent: None,
        };
        let observer = Observer::new(self.publisher.clone(), Default::default());
        let Some(plan) = array else {
            let body = envelope.to_body();
            let send_now = match &depends {
                None => true,
                Some(depends) => super::depends::hold(
                    depends,
                    &envelope.job_id,
                    0,
                    vec![body.clone()],
                    Releaser {
                        queue: &queue,
                        ledger: &depends.ledger,
                        observer: &observer,
                        reach: self.reach(),
                    },
                    |body| held_subject(body, &queue_name),
                )
                .await
                .map_err(ledger_failed)?[0],
            };
            let sent = match send_now {
                true => Some(
                    queue
                        .send(&body)
                        .await
                        .map_err(|source| SubmitError::Queue {
                            queue: queue_name.clone(),
                            source,
                            sent: Vec::new(),
                            not_sent: None,
                        })?,
                ),
                false => None,
            };
            let message_id = match (&depends, sent) {
                (Some(_), _) | (None, None) => envelope.job_id.clone(),
                (None, Some(message_id)) => message_id,
            };
            self.register(&queue_name, &message_id, 0, None, 1).await;
            tracing::info!(queue = %queue_name, %message_id, job_id = %envelope.job_id, held = !send_now, "Job successfully queued.");
            let subject = Subject {
                job: JobRef {
                    message_id: message_id.clone(),
                    ..subject.job
                },
                ..subject
            };
            self.publish(EventType::JobSubmitted, &subject, json!({}));
            return Ok(Submitted::Job { message_id });
        };

        let size = plan.size();
        super::rerender::record(&plan, &envelope).await;
        self.register(
            &queue_name,
            &envelope.job_id,
            size,
            Some(plan.spec.clone()),
            plan.chunk_size as u32,
        )
        .await;
        let mut message_ids = vec![String::new(); size as usize];
        let mut template = envelope.clone();
        let chunks: Vec<&[i64]> = plan.chunks().collect();
        // The children to send now, in order: all of them, or those that
        // wait for nothing (held ones are named by their job id).
        let order: Vec<usize> = match &depends {
            None => (0..chunks.len()).collect(),
            Some(depends) => {
                let mut bodies = Vec::with_capacity(chunks.len());
                let mut ids = Vec::with_capacity(chunks.len());
                for (index, chunk) in chunks.iter().enumerate() {
                    make_child(&mut template, &envelope.job_id, &plan, index as u32, chunk);
                    ids.push(template.job_id.clone());
                    bodies.push(template.to_body());
                }
                let send = super::depends::hold(
                    depends,
                    &envelope.job_id,
                    size,
                    bodies,
                    Releaser {
                        queue: &queue,
                        ledger: &depends.ledger,
                        observer: &observer,
                        reach: self.reach(),
                    },
                    |body| held_subject(body, &queue_name),
                )
                .await
                .map_err(ledger_failed)?;
                for (index, id) in ids.into_iter().enumerate() {
                    if !send[index] {
                        message_ids[index] = id;
                    }
                }
                (0..chunks.len()).filter(|&i| send[i]).collect()
            }
        };
        let mut pos = 0;
        while pos < order.len() {
            // Up to ten children a call, and no more bytes than one call
            // may carry.
            let mut indexes = Vec::new();
            let mut bodies: Vec<String> = Vec::new();
            let mut bytes = 0;
            while pos < order.len() && bodies.len() < SEND_BATCH {
                let next = order[pos];
                make_child(
                    &mut template,
                    &envelope.job_id,
                    &plan,
                    next as u32,
                    chunks[next],
                );
                let body = template.to_body();
                if !bodies.is_empty() && bytes + body.len() > SEND_BATCH_BYTES {
                    break;
                }
                bytes += body.len();
                bodies.push(body);
                indexes.push(next);
                pos += 1;
            }
            match send_batch(&queue, &bodies).await {
                Ok(ids) => {
                    for (index, id) in indexes.into_iter().zip(ids) {
                        message_ids[index] = id;
                    }
                }
                Err((ids, source)) => {
                    let mut unsent = Vec::new();
                    for (index, id) in indexes.into_iter().zip(ids) {
                        match id {
                            Some(id) => message_ids[index] = id,
                            None => unsent.push(index),
                        }
                    }
                    unsent.extend(order[pos..].iter().copied());
                    let not_sent = self
                        .not_sent(&plan, &subject, &envelope.job_id, &unsent)
                        .await;
                    message_ids.retain(|id| !id.is_empty());
                    return Err(SubmitError::Queue {
                        queue: queue_name,
                        source,
                        sent: message_ids,
                        not_sent: Some(Box::new(not_sent)),
                    });
                }
            }
        }
        tracing::info!(queue = %queue_name, job_id = %envelope.job_id, children = size, frames = plan.frames.len(), "Array job successfully queued.");
        self.publish(
            EventType::JobSubmitted,
            &subject,
            json!({"array_size": size, "frames": plan.frames.len(),
                   "frame_spec": plan.event_spec(), "chunk_size": plan.chunk_size}),
        );
        Ok(Submitted::Array {
            job_id: envelope.job_id,
            message_ids,
        })
    }

    /// Records the children a failed submit did not send, so that the
    /// array can complete with the others (announcing it, should those
    /// have finished already).
    async fn not_sent(
        &self,
        plan: &ArrayPlan,
        subject: &Subject,
        array_id: &str,
        unsent: &[usize],
    ) -> NotSent {
        let chunks: Vec<&[i64]> = plan.chunks().collect();
        let frames: Vec<i64> = unsent
            .iter()
            .flat_map(|&i| chunks[i].iter().copied())
            .collect();
        let indexes = unsent.iter().map(|&i| i as u32).collect();
        let recorded = match plan
            .ledger
            .children_settled(array_id, plan.size(), indexes, ChildState::NotSent)
            .await
        {
            Ok(completed) => {
                if let Some(counts) = completed {
                    self.array_completed(subject, counts);
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, array_id, "cannot record the children not sent");
                false
            }
        };
        tracing::warn!(
            array_id,
            not_sent = unsent.len(),
            recorded,
            "array job partly queued"
        );
        NotSent {
            job_id: array_id.to_owned(),
            frames: format_frames(&frames),
            recorded,
        }
    }

    /// Records a submitted job in its queue's ledger, so that later jobs
    /// can depend on it. A ledger that refuses only costs that.
    async fn register(
        &self,
        queue: &str,
        id: &str,
        size: u32,
        frames: Option<String>,
        chunk_size: u32,
    ) {
        let Some(ledger) = self.ledgers.get(queue) else {
            return;
        };
        if let Err(error) = ledger.register_job(id, size, frames, chunk_size).await {
            tracing::warn!(%error, job_id = id, "cannot record the job for its dependants");
        }
    }

    fn array_completed(&self, subject: &Subject, counts: ArrayCounts) {
        tracing::info!(array_id = %subject.job.job_id, ?counts, "Array job completed.");
        self.publish(EventType::ArrayJobCompleted, subject, json!(counts));
    }

    fn publish(&self, kind: EventType, subject: &Subject, detail: Value) {
        self.publisher.publish(
            Event::new(kind, Some(subject.job.clone()), detail),
            &subject.notifications,
        );
    }
}

/// A held job's or child's events name it as its message will.
fn held_subject(body: &str, queue: &str) -> Subject {
    crate::worker::release::held_delivery(body).subject(queue)
}

/// Identical subscriptions merged, first ones first.
fn merge_notifications(notifications: Vec<Notification>) -> Vec<Notification> {
    let mut seen = std::collections::HashSet::new();
    notifications
        .into_iter()
        .filter(|n| seen.insert(serde_json::to_string(n).unwrap_or_default()))
        .collect()
}

fn too_large(field: &str, bytes: usize, limit: usize) -> FieldError {
    FieldError::new(
        field,
        format!(
            "the message would be {bytes} bytes; at most {limit} (queue_manager.max_message_bytes)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_subscriptions_are_merged() {
        let n = |target: &str| Notification {
            events: vec![],
            target: target.into(),
            vars: Map::new(),
        };
        let merged = merge_notifications(vec![n("a"), n("b"), n("a"), n("a")]);
        assert_eq!(merged, [n("a"), n("b")]);
    }
}
