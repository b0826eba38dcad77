//! Re-rendering chosen frames of an array (`queue_manager_rerender`,
//! `renderq rerender`): those frames go out again as a new revision of the
//! same array, from what its submit recorded in the queue's ledger (the
//! job with its pinned inputs, tasks, notifications and label; its frames
//! and chunks), never from the status table.
//!
//! A frame is sent in a child that keeps the index of the child that first
//! carried it (the chosen frames of one chunk go together), so the status
//! table and the monitor's grid put it in the same place, newest revision
//! first. The ledger counts the revision as an array of its own, so it
//! announces its own `ArrayJobCompleted` once, with `revision` in its
//! detail.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::children::{ArrayPlan, send_batch};
use super::control::{ControlError, job_id};
use super::submit::Submitter;
use crate::events::ledger::{ArrayRecord, ChildState, Ledger};
use crate::events::observe::Subject;
use crate::events::status::{Status, StatusTable};
use crate::job::event::{Event, EventType, JobRef};
use crate::job::frames::{format_frames, parse_frames};
use crate::job::params::FieldError;
use crate::job::{ArrayPart, Envelope, Revision, revision_id};
use crate::queue::{SEND_BATCH, SEND_BATCH_BYTES};

/// `queue_manager_rerender` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerenderRequest {
    /// The array's id, as its submit returned it.
    pub job_id: String,
    /// The frames to render again, as a frame spec (`"12,40-45"`).
    pub frames: String,
}

/// What a re-render queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rerendered {
    /// The array's id.
    pub job_id: String,
    /// The revision these children make (2 for the first re-render).
    pub revision: u32,
    /// The frames sent again.
    pub frames: String,
    /// One message per child of the revision.
    pub message_ids: Vec<String>,
}

/// Keeps what a re-render of the array `envelope` needs; an array whose
/// record could not be kept still renders (it cannot be re-rendered).
pub(super) async fn record(plan: &ArrayPlan, envelope: &Envelope) {
    let record = ArrayRecord {
        envelope: envelope.clone(),
        frame_spec: plan.spec.clone(),
        chunk_size: plan.chunk_size as u32,
        has_frame: plan.has_frame,
        size: plan.size(),
    };
    if let Err(error) = plan.ledger.record_array(&record).await {
        tracing::warn!(%error, array_id = %envelope.job_id, "cannot record the array for re-renders");
    }
}

/// The children of one revision: per child, the index it keeps and its
/// frames, in the array's order.
fn revision_children(
    record: &ArrayRecord,
    chosen: &[i64],
    max_frames: u32,
) -> Result<Vec<(u32, Vec<i64>)>, FieldError> {
    let frames = parse_frames(&record.frame_spec, max_frames.into())
        .map_err(|e| FieldError::new("job_id", format!("the array's recorded frames: {e}")))?;
    let position: HashMap<i64, usize> = frames.iter().enumerate().map(|(i, f)| (*f, i)).collect();
    let mut positions = Vec::with_capacity(chosen.len());
    for frame in chosen {
        let Some(&at) = position.get(frame) else {
            return Err(FieldError::new(
                "frames",
                format!(
                    "frame {frame} is not one of the array's frames (`{}`)",
                    record.frame_spec
                ),
            ));
        };
        positions.push(at);
    }
    positions.sort_unstable();
    let chunk = record.chunk_size.max(1) as usize;
    let mut children: Vec<(u32, Vec<i64>)> = Vec::new();
    for at in positions {
        let index = (at / chunk) as u32;
        match children.last_mut() {
            Some((last, frames_of)) if *last == index => frames_of.push(frames[at]),
            _ => children.push((index, vec![frames[at]])),
        }
    }
    Ok(children)
}

impl Submitter {
    /// Sends `request.frames` of an array again, as its next revision.
    pub async fn rerender(&self, request: RerenderRequest) -> Result<Rerendered, ControlError> {
        let array_id = job_id(&request.job_id)?.to_string();
        let limits = *self.limits();
        let chosen = parse_frames(&request.frames, limits.max_frames.into())
            .map_err(|e| FieldError::new("frames", format!("{e} (queue_manager.max_frames)")))?;
        let (queue_name, ledger, record) = self.find_array(&array_id).await?;
        let children = revision_children(&record, &chosen, limits.max_frames)?;
        let queue = self.queues().get(&queue_name).cloned().ok_or_else(|| {
            FieldError::new(
                "job_id",
                format!("the array's queue `{queue_name}` is no longer configured"),
            )
        })?;
        // The catalog may have changed since the submit.
        let template = &record.envelope;
        let catalog = self.catalog();
        catalog.check_inputs(&queue_name, &template.inputs)?;
        let size = children.len() as u32;
        // Every child is checked, with the largest revision number it may
        // get, before a number is taken: a refused re-render takes none.
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut made = Vec::with_capacity(children.len());
        for (k, (index, frames)) in children.iter().enumerate() {
            let mut child = template.clone();
            child.job_id = uuid::Uuid::new_v4().to_string();
            child.submitted_at = Some(now.clone());
            if record.has_frame {
                child.parameters.insert("frame".into(), json!(frames[0]));
            }
            catalog
                .validate(&child.command, &child.parameters, &child.tasks)
                .map_err(|e| FieldError::new("frames", format!("a child would be refused: {e}")))?;
            child.array = Some(ArrayPart {
                job_id: array_id.clone(),
                index: *index,
                size: record.size,
                frames: frames.clone(),
                revision: Some(Revision {
                    number: limits.max_revisions,
                    index: k as u32,
                    size,
                }),
            });
            let bytes = child.to_body().len();
            if bytes > limits.max_message_bytes {
                return Err(FieldError::new(
                    "frames",
                    format!(
                        "a child would be {bytes} bytes; at most {} (queue_manager.max_message_bytes)",
                        limits.max_message_bytes
                    ),
                )
                .into());
            }
            made.push(child);
        }
        let Some(revision) = ledger
            .take_revision(&array_id, limits.max_revisions)
            .await?
        else {
            return Err(FieldError::new(
                "job_id",
                format!(
                    "array {array_id} has had {} revisions, the most allowed \
                     (queue_manager.max_revisions)",
                    limits.max_revisions
                ),
            )
            .into());
        };
        let bodies: Vec<String> = made
            .into_iter()
            .map(|mut child| {
                if let Some(part) = child.array.as_mut().and_then(|a| a.revision.as_mut()) {
                    part.number = revision;
                }
                child.to_body()
            })
            .collect();
        let subject = Subject {
            job: JobRef {
                job_id: array_id.clone(),
                queue: queue_name.clone(),
                command: template.command.clone(),
                label: template.label.clone(),
                ..JobRef::default()
            },
            notifications: template.notifications.clone(),
        };
        let mut message_ids = Vec::with_capacity(bodies.len());
        let mut next = 0;
        while next < bodies.len() {
            let first = next;
            let mut bytes = 0;
            while next < bodies.len()
                && next - first < SEND_BATCH
                && (next == first || bytes + bodies[next].len() <= SEND_BATCH_BYTES)
            {
                bytes += bodies[next].len();
                next += 1;
            }
            match send_batch(&queue, &bodies[first..next]).await {
                Ok(ids) => message_ids.extend(ids),
                Err((ids, source)) => {
                    // The revision completes with the children that went.
                    let unsent: Vec<u32> = ids
                        .iter()
                        .enumerate()
                        .filter(|(_, id)| id.is_none())
                        .map(|(i, _)| (first + i) as u32)
                        .chain(next as u32..size)
                        .collect();
                    let slot = revision_id(&array_id, revision);
                    if let Err(error) = ledger
                        .children_settled(&slot, size, unsent, ChildState::NotSent)
                        .await
                    {
                        tracing::error!(%error, %array_id, revision, "cannot record the children not sent");
                    }
                    return Err(ControlError::Queue {
                        queue: queue_name,
                        source,
                    });
                }
            }
        }
        let frames = format_frames(&chosen);
        tracing::info!(queue = %queue_name, %array_id, revision, children = size, %frames, "Frames queued again.");
        self.publisher().publish(
            Event::new(
                EventType::JobSubmitted,
                Some(subject.job.clone()),
                json!({"array_size": record.size, "frame_spec": record.frame_spec,
                       "chunk_size": record.chunk_size, "revision": revision,
                       "rerendered": frames, "revision_size": size}),
            ),
            &subject.notifications,
        );
        Ok(Rerendered {
            job_id: array_id,
            revision,
            frames,
            message_ids,
        })
    }

    /// The queue, ledger and record of array `array_id`, from the first
    /// ledger that kept it.
    async fn find_array(
        &self,
        array_id: &str,
    ) -> Result<(String, Ledger, ArrayRecord), ControlError> {
        for (queue, ledger) in self.ledgers().iter() {
            if let Some(record) = ledger.array_record(array_id).await? {
                return Ok((queue.clone(), ledger.clone(), record));
            }
        }
        Err(FieldError::new(
            "job_id",
            format!(
                "no array `{array_id}` was submitted on a queue with a ledger \
                 (a plain job has no frames to re-render)"
            ),
        )
        .into())
    }
}

/// A re-render refused for its `job_id`, said more exactly where the
/// status table knows the id as a plain job (the ledger keeps records of
/// arrays only).
pub async fn explain(
    error: ControlError,
    id: &str,
    status: Option<Arc<StatusTable>>,
) -> ControlError {
    let (ControlError::Field(field), Some(table), Ok(id)) = (&error, status, job_id(id)) else {
        return error;
    };
    if field.field != "job_id" {
        return error;
    }
    let id = id.to_string();
    let found = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || table.get(&id)).await
    };
    match found {
        Ok(Ok(Some(Status::Job(_)))) => FieldError::new(
            "job_id",
            format!("`{id}` is a job, not an array: only an array's frames can be rendered again"),
        )
        .into(),
        _ => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(spec: &str, chunk_size: u32) -> ArrayRecord {
        ArrayRecord {
            envelope: Envelope::new("sleep".into(), Default::default(), vec![]),
            frame_spec: spec.into(),
            chunk_size,
            has_frame: true,
            size: 0,
        }
    }

    #[test]
    fn chosen_frames_keep_the_index_of_the_child_that_first_carried_them() {
        let children = revision_children(&record("1-20", 4), &[7, 3, 4], 100).unwrap();
        assert_eq!(children, [(0, vec![3, 4]), (1, vec![7])]);
        let children = revision_children(&record("10-30x10,99", 1), &[99, 10], 100).unwrap();
        assert_eq!(children, [(0, vec![10]), (3, vec![99])]);
    }

    #[test]
    fn a_frame_outside_the_array_is_refused_naming_it() {
        let error = revision_children(&record("1-20", 1), &[3, 21], 100).unwrap_err();
        assert_eq!(error.field, "frames");
        assert!(error.reason.contains("frame 21"), "{}", error.reason);
    }
}
