//! A submit's `depends_on`: checked against the parents the ledgers know
//! (each must exist on a queue this endpoint serves; a `same` edge must
//! map every frame), turned into what each child waits for, and, at send,
//! held in the ledger instead of the queue where something is left to
//! wait for.
//!
//! A parent on another queue (see `events::ledger::holds::foreign`): the
//! held rows and edges go to the dependant's ledger as usual, then the
//! parent's ledger is told that this queue waits, then the parent's ends
//! are read again from its ledger and what ended meanwhile is spent here.
//! Both queues must be of one backend: an SQS queue with an embedded one
//! is refused (the embedded ledger is a file on the endpoint's machine
//! that SQS workers elsewhere cannot read).

use std::collections::HashSet;

use serde_json::json;

use super::children::ArrayPlan;
use super::submit::Submitter;
use crate::events::ledger::{Fate, Freed, Ledger, Registered, ToHold, Wait};
use crate::events::observe::Subject;
use crate::job::depends::{DependsOn, Frames, On, map_same};
use crate::job::event::EventType;
use crate::job::frames::parse_frames;
use crate::job::id::Id;
use crate::job::params::FieldError;
use crate::worker::release::{Reach, Releaser};

/// What a dependant's children wait for, checked.
#[derive(Debug)]
pub struct DependPlan {
    /// By child (one entry for a plain job).
    pub(super) waits: Vec<Vec<Wait>>,
    pub(super) ledger: Ledger,
}

impl Submitter {
    /// Checks `edges` for a job on `queue_name` (an array's children:
    /// `plan`); `None` when there are none.
    pub(super) async fn plan_depends(
        &self,
        edges: &[DependsOn],
        queue_name: &str,
        plan: Option<&ArrayPlan>,
    ) -> Result<Option<DependPlan>, FieldError> {
        if edges.is_empty() {
            return Ok(None);
        }
        let limit = self.limits().max_dependencies;
        if edges.len() > limit {
            return Err(FieldError::new(
                "depends_on",
                format!(
                    "{} parents; at most {limit} (queue_manager.max_dependencies)",
                    edges.len()
                ),
            ));
        }
        let Some(ledger) = self.ledgers().get(queue_name).cloned() else {
            return Err(FieldError::new(
                "depends_on",
                format!(
                    "queue `{queue_name}` has no ledger (an SQS queue needs a `status_bucket`); \
                     dependencies are kept there"
                ),
            ));
        };
        let children = plan.map_or(1, |p| p.size() as usize);
        let mut waits: Vec<Vec<Wait>> = vec![Vec::new(); children];
        let mut seen = HashSet::new();
        for (i, edge) in edges.iter().enumerate() {
            let field = format!("depends_on[{i}]");
            let id = Id::parse(&edge.job_id)
                .map_err(|e| FieldError::new(format!("{field}.job_id"), e.to_string()))?
                .to_string();
            // Ids are made by the submit and a job can only name jobs that
            // exist, so no cycle can be formed except by naming one twice.
            if !seen.insert(id.clone()) {
                return Err(FieldError::new(
                    format!("{field}.job_id"),
                    format!("job {id} is named twice: a job depends on a parent once"),
                ));
            }
            let (parent, parent_queue) = self.find_parent(&ledger, queue_name, &id, &field).await?;
            let on_finish = edge.on == On::Finish;
            match (edge.frames, plan, parent.size) {
                (Frames::All, _, _) | (Frames::Same, None, 0) => {
                    for child in &mut waits {
                        child.push(Wait {
                            parent_id: id.clone(),
                            index: None,
                            on_finish,
                            queue: parent_queue.clone(),
                        });
                    }
                }
                (Frames::Same, Some(plan), size) if size > 0 => {
                    let spec = parent.frames.as_deref().unwrap_or_default();
                    let frames = parse_frames(spec, self.limits().max_frames.into())
                        .map_err(|e| FieldError::new(format!("{field}.frames"), e))?;
                    let parent_chunks: Vec<&[i64]> =
                        frames.chunks(parent.chunk_size.max(1) as usize).collect();
                    let child_chunks: Vec<&[i64]> = plan.chunks().collect();
                    let map = map_same(&parent_chunks, &child_chunks).map_err(|e| {
                        FieldError::new(
                            format!("{field}.frames"),
                            format!("`same`: {e} (parent {id} renders {spec})"),
                        )
                    })?;
                    for (child, parents) in waits.iter_mut().zip(map) {
                        child.extend(parents.into_iter().map(|index| Wait {
                            parent_id: id.clone(),
                            index: Some(index),
                            on_finish,
                            queue: parent_queue.clone(),
                        }));
                    }
                }
                (Frames::Same, _, _) => {
                    return Err(FieldError::new(
                        format!("{field}.frames"),
                        "`same` maps frames between two arrays; use `all` for a plain job",
                    ));
                }
            }
        }
        Ok(Some(DependPlan { waits, ledger }))
    }

    /// The parent `id` as a ledger knows it, and its queue when that is
    /// not `queue_name`; refused, naming the field, when no queue this
    /// endpoint serves knows it, or it is on a queue a dependant here
    /// cannot wait across to.
    async fn find_parent(
        &self,
        ledger: &Ledger,
        queue_name: &str,
        id: &str,
        field: &str,
    ) -> Result<(Registered, Option<String>), FieldError> {
        let refused = |message: String| FieldError::new(format!("{field}.job_id"), message);
        let unreadable = |e: crate::events::ledger::LedgerError| refused(e.to_string());
        if let Some(found) = ledger.registered(id).await.map_err(unreadable)? {
            return Ok((found, None));
        }
        for (name, other) in self.ledgers().iter() {
            if name == queue_name {
                continue;
            }
            let Some(found) = other.registered(id).await.map_err(unreadable)? else {
                continue;
            };
            return match (ledger, other) {
                (Ledger::Local(_), Ledger::Local(_)) | (Ledger::S3 { .. }, Ledger::S3 { .. }) => {
                    Ok((found, Some(name.clone())))
                }
                _ => Err(refused(format!(
                    "job {id} is on queue `{name}`, and `{queue_name}` is of the other backend: \
                     an embedded queue's ledger is a file on this machine that an SQS queue's \
                     workers cannot read, so a job depends across queues only between queues \
                     of one backend"
                ))),
            };
        }
        Err(refused(format!(
            "no job {id} on the queues this endpoint serves"
        )))
    }
}

/// Holds a job's (or an array's) bodies in the ledger: returns, by child,
/// whether it is to be sent now. Held ones are announced (`JobHeld`, with
/// what they wait for); ones whose parent already failed are cancelled.
/// `releaser` is on the job's queue and `depends.ledger`.
pub(super) async fn hold(
    depends: &DependPlan,
    job_id: &str,
    size: u32,
    bodies: Vec<String>,
    releaser: Releaser<'_>,
    subject_of: impl Fn(&str) -> Subject,
) -> Result<Vec<bool>, crate::events::ledger::LedgerError> {
    let entries: Vec<ToHold> = bodies
        .iter()
        .zip(&depends.waits)
        .enumerate()
        .map(|(index, (body, waits))| ToHold {
            index: index as u32,
            body: body.clone(),
            waits: waits.clone(),
        })
        .collect();
    let fates = depends.ledger.hold(job_id, size, entries, false).await?;
    let mut cancelled = Vec::new();
    let mut send = Vec::with_capacity(fates.len());
    for ((index, fate), body) in fates.into_iter().enumerate().zip(bodies) {
        send.push(fate == Fate::Send);
        match fate {
            Fate::Send => {}
            Fate::Held(_) => {
                let reason = format!("waits for {}", describe(&depends.waits[index]));
                releaser.observer.job_event(
                    EventType::JobHeld,
                    &subject_of(&body),
                    json!({ "reason": reason }),
                );
            }
            Fate::Cancelled(reason) => cancelled.push(Freed {
                job_id: job_id.to_owned(),
                index: index as u32,
                size,
                body,
                by: reason.clone(),
                cancelled: Some(reason),
                claim: None,
            }),
        }
    }
    // Parents on other queues: told, then read again (see the module doc).
    let queue_name = releaser.queue.name();
    cancelled.extend(spend_foreign_ends(depends, queue_name, releaser.reach).await?);
    releaser.apply(cancelled).await;
    Ok(send)
}

/// After a dependant's edges are written: tells each parent on another
/// queue's ledger that `queue_name` waits for it, then reads its ends
/// there and spends here what ended; what that freed (to send, or to
/// cancel).
async fn spend_foreign_ends(
    depends: &DependPlan,
    queue_name: &str,
    reach: Reach<'_>,
) -> Result<Vec<Freed>, crate::events::ledger::LedgerError> {
    // By parent: its queue and the units waited for.
    let mut parents: std::collections::BTreeMap<&str, (&str, Vec<Option<u32>>)> =
        Default::default();
    for wait in depends.waits.iter().flatten() {
        if let Some(queue) = &wait.queue {
            let entry = (parents.entry(&wait.parent_id)).or_insert((queue, Vec::new()));
            if !entry.1.contains(&wait.index) {
                entry.1.push(wait.index);
            }
        }
    }
    let mut freed = Vec::new();
    for (parent_id, (queue, units)) in parents {
        let Some(ledger) = reach.ledgers.get(queue) else {
            continue;
        };
        ledger
            .note_foreign_dependants(parent_id, queue_name)
            .await?;
        let ends = ledger.unit_ends(parent_id, units).await?;
        if !ends.is_empty() {
            freed.extend(depends.ledger.spend_foreign(parent_id, ends).await?);
        }
    }
    Ok(freed)
}

/// What a child waits for, for people: `parent P (children 1, 2)`.
pub(crate) fn describe(waits: &[Wait]) -> String {
    let mut parts: Vec<(String, Vec<u32>, bool)> = Vec::new();
    for wait in waits {
        match parts.iter_mut().find(|(p, _, _)| *p == wait.parent_id) {
            Some((_, indexes, whole)) => {
                indexes.extend(wait.index);
                *whole |= wait.index.is_none();
            }
            None => parts.push((
                wait.parent_id.clone(),
                wait.index.into_iter().collect(),
                wait.index.is_none(),
            )),
        }
    }
    parts
        .into_iter()
        .map(
            |(parent, indexes, whole)| match (whole, indexes.as_slice()) {
                (true, _) | (false, []) => format!("job {parent}"),
                (false, indexes) => {
                    let list: Vec<String> = indexes.iter().map(u32::to_string).collect();
                    format!("job {parent} child {}", list.join(", "))
                }
            },
        )
        .collect::<Vec<_>>()
        .join("; ")
}
