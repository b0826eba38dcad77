//! An array job's children: the plan they are cut from, how each is made
//! from its parent, sized before any is sent, and sent ten at a time, only
//! the entries a queue refused going again.

use std::time::Duration;

use serde_json::json;

use crate::events::ledger::Ledger;
use crate::job::{ArrayPart, Envelope};
use crate::queue::{Queue, QueueError};
use crate::retry::Backoff;

/// Tries of one batch (only its unsent entries are sent again), and the
/// waits between them.
const SEND_TRIES: u32 = 4;
const SEND_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

/// Room left in a child's size estimate for what differs between children
/// (its index, its `frame` parameter): at most 20 digits each.
pub(super) const CHILD_SLACK: usize = 64;

/// The longest frame spec a `JobSubmitted` carries (for the monitor's
/// grid); a longer one is left out, and the grid shows children.
const MAX_EVENT_SPEC: usize = 4096;

#[derive(Debug)]
pub(super) struct ArrayPlan {
    pub(super) frames: Vec<i64>,
    /// The frames as submitted.
    pub(super) spec: String,
    pub(super) chunk_size: usize,
    /// Whether each child gets its first frame as the `frame` parameter.
    pub(super) has_frame: bool,
    pub(super) ledger: Ledger,
}

impl ArrayPlan {
    pub(super) fn chunks(&self) -> std::slice::Chunks<'_, i64> {
        self.frames.chunks(self.chunk_size)
    }

    pub(super) fn size(&self) -> u32 {
        self.frames.len().div_ceil(self.chunk_size) as u32
    }

    /// The frames as a spec for `JobSubmitted`: the shorter of the one
    /// submitted and the one written from the frames, if it is short
    /// enough.
    pub(super) fn event_spec(&self) -> Option<String> {
        let written = crate::job::frames::format_frames(&self.frames);
        let shorter = if written.len() < self.spec.len() {
            written
        } else {
            self.spec.clone()
        };
        (shorter.len() <= MAX_EVENT_SPEC).then_some(shorter)
    }
}

/// Sends one batch, trying again (with back-off) only the entries that
/// were not added. On failure, returns what was added and the last error.
pub(super) async fn send_batch(
    queue: &Queue,
    bodies: &[String],
) -> Result<Vec<String>, (Vec<Option<String>>, QueueError)> {
    let mut ids: Vec<Option<String>> = vec![None; bodies.len()];
    let mut tries = 0;
    loop {
        tries += 1;
        let pending: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].is_none()).collect();
        let batch: Vec<String> = pending.iter().map(|&i| bodies[i].clone()).collect();
        let error = match queue.send_batch(&batch).await {
            Ok(outcomes) => {
                let mut last = None;
                for (i, outcome) in pending.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(id) => ids[i] = Some(id),
                        Err(e) => last = Some(e),
                    }
                }
                match last {
                    None => return Ok(ids.into_iter().flatten().collect()),
                    Some(e) => e,
                }
            }
            Err(e) => e,
        };
        if tries == SEND_TRIES {
            return Err((ids, error));
        }
        let delay = SEND_RETRY.delay(tries);
        tracing::warn!(%error, retry_in = ?delay, "array batch partly refused; sending the rest again");
        tokio::time::sleep(delay).await;
    }
}

/// Makes `envelope` (the parent, or the previous child: only a child's own
/// fields change) child `index` of array `array_id`.
pub(super) fn make_child(
    envelope: &mut Envelope,
    array_id: &str,
    plan: &ArrayPlan,
    index: u32,
    chunk: &[i64],
) {
    envelope.job_id = uuid::Uuid::new_v4().to_string();
    if plan.has_frame
        && let Some(&first) = chunk.first()
    {
        envelope.parameters.insert("frame".into(), json!(first));
    }
    envelope.array = Some(ArrayPart {
        job_id: array_id.to_owned(),
        index,
        size: plan.size(),
        frames: chunk.to_vec(),
        revision: None,
    });
}

/// Bytes of `frames` as a JSON array.
pub(super) fn json_len(frames: &[i64]) -> usize {
    let digits: usize = frames
        .iter()
        .map(|f| {
            f.unsigned_abs()
                .checked_ilog10()
                .map_or(1, |d| d as usize + 1)
                + usize::from(*f < 0)
        })
        .sum();
    2 + digits + frames.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_counts_what_serde_writes() {
        for frames in [
            vec![],
            vec![0],
            vec![-5, 10, 999, i64::MIN, i64::MAX, 1_000_000],
        ] {
            assert_eq!(
                json_len(&frames),
                serde_json::to_string(&frames).unwrap().len()
            );
        }
    }
}
