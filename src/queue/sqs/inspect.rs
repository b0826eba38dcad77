//! What `queue stats`, `dlq list` and `dlq redrive` see of an SQS queue:
//! approximate counts, and dead letters read (and put back) in batches.

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};
use tracing::warn;

use super::{ApiCalls, REASON, RECEIVES, SOURCE_ID, SqsQueue, classify, seconds};
use crate::job::Envelope;
use crate::queue::{DeadLetter, QueueError, Redrive, SEND_BATCH, SEND_BATCH_BYTES, Stats};

/// Why a job the redrive policy moved is dead-lettered.
pub const MOVED_REASON: &str =
    "worker lost: moved by the queue's redrive policy after its last try never finished";

/// A dead letter the queue's redrive policy moved, as a sweep took it.
#[derive(Debug)]
pub struct MovedDeadLetter {
    pub body: String,
    /// SQS's id of the message.
    pub message_id: String,
    /// How many times it was received before it was moved.
    pub receives: u32,
    receipt: String,
}

/// Dead letters a selective redrive (one job, one message) looks through.
const SCAN: usize = 10_000;

/// Reads `dlq list` makes while other readers hold dead letters, and the
/// pause between them.
const LIST_TRIES: u32 = 4;
const LIST_PAUSE: Duration = Duration::from_millis(500);

/// A dead letter as `dlq list` shows it.
fn described(message: &aws_sdk_sqs::types::Message) -> DeadLetter {
    let attribute = |name| {
        message
            .message_attributes()
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_owned)
    };
    // Messages moved by the redrive policy carry no attributes; the
    // receive count then includes this listing's own receive.
    let receives = attribute(RECEIVES)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse::<u32>().ok())
                .map_or(0, |n| n.saturating_sub(1))
        });
    DeadLetter {
        message_id: attribute(SOURCE_ID)
            .or_else(|| message.message_id.clone())
            .unwrap_or_default(),
        receive_count: receives,
        // renderq dead-letters every failure itself, so the redrive policy
        // only moves jobs whose last worker never reported.
        reason: attribute(REASON).unwrap_or_else(|| MOVED_REASON.into()),
    }
}

impl SqsQueue {
    /// `(visible, in flight)` approximate counts of the queue at `url`.
    async fn counts(&self, url: &str) -> Result<(u64, u64), QueueError> {
        ApiCalls::count(&self.calls.get_attributes);
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(classify)?
            .attributes
            .unwrap_or_default();
        let count = |name| {
            attributes
                .get(&name)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    pub async fn stats(&self) -> Result<Stats, QueueError> {
        let (visible, in_flight) = self.counts(&self.url).await?;
        let (dead_visible, dead_held) = self.counts(&self.dlq_url).await?;
        Ok(Stats {
            visible,
            in_flight,
            dead_lettered: dead_visible + dead_held,
        })
    }

    /// Receives up to `limit` dead letters, hiding each for `hold` so a
    /// batch of receives does not see the same message twice.
    async fn take_dead_letters(
        &self,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>, QueueError> {
        let mut seen = HashSet::new();
        let mut messages = Vec::new();
        while messages.len() < limit {
            let batch = self
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages((limit - messages.len()).min(10) as i32)
                .visibility_timeout(seconds(hold))
                .wait_time_seconds(0)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await
                .map_err(classify)?
                .messages
                .unwrap_or_default();
            if batch.is_empty() {
                break;
            }
            for message in batch {
                if seen.insert(message.message_id.clone()) {
                    messages.push(message);
                }
            }
        }
        Ok(messages)
    }

    /// Up to `limit` dead letters, each with why it is there. A sweep (or
    /// another listing) holds dead letters out of sight for a moment, so
    /// while the queue says some are in flight this reads again, a few
    /// times, rather than show a short or empty list.
    pub async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let (mut listed, mut seen) = (Vec::new(), HashSet::new());
        for attempt in 1..=LIST_TRIES {
            let messages = self
                .take_dead_letters(limit, Duration::from_secs(30))
                .await?;
            for message in &messages {
                if listed.len() < limit && seen.insert(message.message_id.clone()) {
                    listed.push(described(message));
                }
            }
            // Visible again at once for other readers.
            self.release_dead_letters(messages.iter().filter_map(|m| m.receipt_handle.clone()))
                .await?;
            if listed.len() >= limit {
                break;
            }
            let (_, held) = self.counts(&self.dlq_url).await?;
            if held == 0 {
                break;
            }
            if attempt == LIST_TRIES {
                warn!(
                    held,
                    queue = self.name(),
                    "some dead letters are held by another reader (a sweep or a listing) and are not listed"
                );
                break;
            }
            tokio::time::sleep(LIST_PAUSE).await;
        }
        Ok(listed)
    }

    /// Up to `limit` dead letters the queue's redrive policy moved (a
    /// worker died during the job's last try), each hidden for a minute;
    /// renderq's own (they carry a reason) are made visible again at once.
    pub async fn moved_dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<MovedDeadLetter>, QueueError> {
        let messages = self
            .take_dead_letters(limit, Duration::from_secs(60))
            .await?;
        let (mut moved, mut own) = (Vec::new(), Vec::new());
        for message in messages {
            let Some(receipt) = message.receipt_handle.clone() else {
                continue;
            };
            if message
                .message_attributes()
                .is_some_and(|a| a.contains_key(REASON))
            {
                own.push(receipt);
                continue;
            }
            // The receive count includes this sweep's own receive.
            let receives = message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse::<u32>().ok())
                .map_or(0, |n| n.saturating_sub(1));
            moved.push(MovedDeadLetter {
                body: message.body.unwrap_or_default(),
                message_id: message.message_id.unwrap_or_default(),
                receives,
                receipt,
            });
        }
        self.release_dead_letters(own).await?;
        Ok(moved)
    }

    /// Makes a moved dead letter one of renderq's own, with `reason`: sent
    /// again with its note, the original deleted, so that a later sweep
    /// passes it by and `dlq list` shows why.
    pub async fn adopt_dead_letter(
        &self,
        moved: &MovedDeadLetter,
        message_id: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        let note = DeadLetter {
            message_id: message_id.to_owned(),
            receive_count: moved.receives,
            reason: reason.to_owned(),
        };
        self.send_dead_letter(&moved.body, &note).await?;
        self.client
            .delete_message()
            .queue_url(&self.dlq_url)
            .receipt_handle(&moved.receipt)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Moves dead letters back by receiving and re-sending them (not every
    /// SQS-compatible server has `StartMessageMoveTask`). Each goes back
    /// restamped as a hand-back is: its envelope names the id the submit
    /// returned (a message the redrive policy moved carries none), with a
    /// fresh budget of tries. Sent ten to a call; exactly the dead letters
    /// whose sends succeeded are deleted, each batch before the next is
    /// sent, so a failure part way leaves the others in the dead-letter
    /// queue, and a later redrive sends none of them twice.
    /// A selective redrive looks through at most `SCAN` dead letters.
    pub async fn dlq_redrive(&self, limit: usize, which: &Redrive) -> Result<usize, QueueError> {
        let scan = if *which == Redrive::All {
            limit
        } else {
            SCAN.max(limit)
        };
        let messages = self
            .take_dead_letters(scan, Duration::from_secs(60))
            .await?;
        let (mut chosen, mut others) = (Vec::new(), Vec::new());
        for message in &messages {
            let Some(receipt) = &message.receipt_handle else {
                continue;
            };
            let id = message
                .message_attributes()
                .and_then(|a| a.get(SOURCE_ID))
                .and_then(|v| v.string_value())
                .or(message.message_id.as_deref())
                .unwrap_or_default();
            let body = message.body().unwrap_or_default();
            if chosen.len() < limit && which.wants(id, body) {
                let body = Envelope::restamp(body, id, |envelope| envelope.failures = 0);
                chosen.push((receipt.clone(), body));
            } else {
                others.push(receipt.clone());
            }
        }
        let outcome = self.send_back(chosen, &mut others).await;
        // Not sent: visible again at once for other readers.
        self.release_dead_letters(others).await?;
        outcome
    }

    /// Sends `(receipt, body)` dead letters back to the queue and deletes
    /// those sent; adds the ones left to `left`. Returns how many went back,
    /// or why some did not.
    async fn send_back(
        &self,
        letters: Vec<(String, String)>,
        left: &mut Vec<String>,
    ) -> Result<usize, QueueError> {
        let (mut redriven, mut failure, before) = (0, None, left.len());
        let mut letters = letters.into_iter().peekable();
        while letters.peek().is_some() {
            let mut batch: Vec<(String, String)> = Vec::new();
            let mut bytes = 0;
            while let Some((_, body)) = letters.peek() {
                if body.len() > SEND_BATCH_BYTES {
                    let (receipt, body) = letters.next().expect("peeked");
                    failure.get_or_insert(format!(
                        "a dead letter restamped for its message id is {} bytes, over SQS's {SEND_BATCH_BYTES}",
                        body.len()
                    ));
                    left.push(receipt);
                    continue;
                }
                if batch.len() == SEND_BATCH || bytes + body.len() > SEND_BATCH_BYTES {
                    break;
                }
                bytes += body.len();
                batch.push(letters.next().expect("peeked"));
            }
            if batch.is_empty() {
                continue;
            }
            let bodies: Vec<String> = batch.iter().map(|(_, body)| body.clone()).collect();
            let outcomes = match self.send_batch(&bodies).await {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    // This batch stays (if the call failed after SQS took
                    // some of it, those go twice: at least once, never
                    // lost); the rest wait for the next redrive.
                    failure = Some(error.to_string());
                    left.extend(batch.into_iter().map(|(receipt, _)| receipt));
                    left.extend(letters.map(|(receipt, _)| receipt));
                    break;
                }
            };
            let mut sent = Vec::new();
            for ((receipt, _), outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    Ok(_) => sent.push(receipt),
                    Err(error) => {
                        failure.get_or_insert(error.to_string());
                        left.push(receipt);
                    }
                }
            }
            let count = sent.len();
            if let Err(error) = self.delete_dead_letters(sent).await {
                left.extend(letters.map(|(receipt, _)| receipt));
                return Err(error);
            }
            redriven += count;
        }
        match failure {
            None => Ok(redriven),
            Some(reason) => Err(QueueError::PartlyRedriven {
                redriven,
                left: left.len() - before,
                reason,
            }),
        }
    }

    /// Makes dead letters visible again, ten to a call.
    async fn release_dead_letters(
        &self,
        receipts: impl IntoIterator<Item = String>,
    ) -> Result<(), QueueError> {
        let receipts: Vec<String> = receipts.into_iter().collect();
        for chunk in receipts.chunks(10) {
            let entries = (chunk.iter().enumerate())
                .map(|(i, receipt)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(0)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            self.client
                .change_message_visibility_batch()
                .queue_url(&self.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Deletes dead letters, ten to a call.
    async fn delete_dead_letters(&self, receipts: Vec<String>) -> Result<(), QueueError> {
        for chunk in receipts.chunks(10) {
            let entries = (chunk.iter().enumerate())
                .map(|(i, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            let answer = self
                .client
                .delete_message_batch()
                .queue_url(&self.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(classify)?;
            if let Some(failed) = answer.failed.first() {
                return Err(QueueError::Unavailable(format!(
                    "DeleteMessageBatch: {} of {} dead letters not deleted ({} {}); \
                     they are back in the queue too, and a later redrive would send them again",
                    answer.failed.len(),
                    chunk.len(),
                    failed.code,
                    failed.message.as_deref().unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}
