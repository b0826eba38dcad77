//! Amazon SQS (or an SQS-compatible server) as the queue.
//!
//! The queue must have a redrive policy: its dead-letter queue is where the
//! worker sends jobs that can never run (with the reason as a message
//! attribute), and its `maxReceiveCount` is the failure budget. Receives long
//! poll for up to 20 s with an SDK operation timeout above that.
//!
//! Here: opening the queue, and sending, receiving and settling messages;
//! `inspect` is what the operator's `queue stats` and `dlq` commands see.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};

use super::{DeadLetter, QueueError, Received};
use crate::config::SqsQueueConfig;

mod inspect;
pub use inspect::MOVED_REASON;

/// Longest long-poll SQS allows.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Message attribute carrying why the worker dead-lettered a message.
const REASON: &str = "renderq_reason";
/// Message attribute carrying the original message id of a dead letter.
const SOURCE_ID: &str = "renderq_message_id";
/// Message attribute carrying how often the message had been received.
const RECEIVES: &str = "renderq_receive_count";

/// SQS API calls made, by operation, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct ApiCalls {
    pub receive: AtomicU64,
    pub delete: AtomicU64,
    pub change_visibility: AtomicU64,
    pub send: AtomicU64,
    pub get_attributes: AtomicU64,
}

impl ApiCalls {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        [
            &self.receive,
            &self.delete,
            &self.change_visibility,
            &self.send,
            &self.get_attributes,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

#[derive(Debug, Clone)]
pub struct SqsQueue {
    name: String,
    /// Calls made through this handle (and its clones).
    calls: Arc<ApiCalls>,
    client: Client,
    url: String,
    /// The dead-letter queue named by the redrive policy.
    dlq_url: String,
    /// renderq's failure budget: the redrive policy's `maxReceiveCount`
    /// less one.
    max_receive_count: u32,
}

/// Maps an SDK error to what the worker decides on: a refused receipt, or
/// a queue that is unavailable for now.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    error: SdkError<E>,
) -> QueueError {
    let stale = match error.code() {
        Some("ReceiptHandleIsInvalid" | "MessageNotInflight") => true,
        // Some SQS-compatible servers report a stale receipt as a bad value.
        Some("InvalidParameterValue") => error
            .message()
            .is_some_and(|m| m.to_ascii_lowercase().contains("receipt")),
        _ => false,
    };
    if stale {
        QueueError::StaleReceipt
    } else {
        QueueError::Unavailable(crate::aws::describe(&error))
    }
}

fn seconds(d: Duration) -> i32 {
    d.as_secs().min(43_200) as i32
}

fn string_attribute(value: impl Into<String>) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

impl SqsQueue {
    /// Connects and reads the redrive policy; fails (naming why) when the
    /// queue is missing, unreachable or has no dead-letter queue.
    pub async fn open(name: &str, config: &SqsQueueConfig) -> Result<Self, QueueError> {
        let sdk =
            crate::aws::sdk_config(config.region.as_deref(), config.endpoint_url.as_deref()).await;
        let client = Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&sdk)
                .timeout_config(crate::aws::timeouts(MAX_WAIT + Duration::from_secs(10)))
                .build(),
        );
        let attributes = client
            .get_queue_attributes()
            .queue_url(&config.url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| {
                QueueError::Unavailable(format!("{}: {}", config.url, crate::aws::describe(&e)))
            })?;
        let policy = attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
            .ok_or_else(|| {
                QueueError::Unavailable(format!(
                    "{} has no redrive policy; renderq needs a dead-letter queue",
                    config.url
                ))
            })?;
        let (dlq_arn, max_receive_count) = parse_redrive_policy(policy).ok_or_else(|| {
            QueueError::Unavailable(format!("unreadable redrive policy: {policy}"))
        })?;
        let (account, dlq_name) = arn_account_and_name(&dlq_arn).ok_or_else(|| {
            QueueError::Unavailable(format!("unreadable dead-letter ARN: {dlq_arn}"))
        })?;
        let dlq_url = client
            .get_queue_url()
            .queue_name(dlq_name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(|e| {
                QueueError::Unavailable(format!(
                    "dead-letter queue {dlq_arn}: {}",
                    crate::aws::describe(&e)
                ))
            })?
            .queue_url
            .ok_or_else(|| QueueError::Unavailable(format!("no URL for {dlq_arn}")))?;
        Ok(Self {
            name: name.to_owned(),
            calls: Arc::default(),
            client,
            url: config.url.clone(),
            dlq_url,
            // One below the redrive policy's, so that a worker always sees
            // the receive after the last try (and can count it as lost);
            // the policy only catches what that worker could not.
            max_receive_count: max_receive_count.saturating_sub(1).max(1),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn max_receive_count(&self) -> u32 {
        self.max_receive_count
    }

    pub fn calls(&self) -> &ApiCalls {
        &self.calls
    }

    pub async fn send(&self, body: &str) -> Result<String, QueueError> {
        self.send_delayed(body, Duration::ZERO).await
    }

    /// `SendMessage`, visible after `delay` (whole seconds, at most 900).
    async fn send_delayed(&self, body: &str, delay: Duration) -> Result<String, QueueError> {
        ApiCalls::count(&self.calls.send);
        let delay = delay.as_secs().min(900) as i32;
        let sent = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .set_delay_seconds((delay > 0).then_some(delay))
            .send()
            .await
            .map_err(classify)?;
        sent.message_id
            .ok_or_else(|| QueueError::Unavailable("SendMessage returned no message id".into()))
    }

    /// `SendMessageBatch` of up to 10; fails if any entry failed.
    pub async fn send_batch(
        &self,
        bodies: &[String],
    ) -> Result<Vec<Result<String, QueueError>>, QueueError> {
        ApiCalls::count(&self.calls.send);
        let entries = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .build()
                    .map_err(|e| QueueError::Unavailable(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sent = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(classify)?;
        // An entry SQS names in neither list was not added, as far as
        // anyone can tell.
        let mut outcomes: Vec<Result<String, QueueError>> = (0..bodies.len())
            .map(|_| {
                Err(QueueError::Unavailable(
                    "SendMessageBatch: no answer".into(),
                ))
            })
            .collect();
        let at = |id: &str| id.parse::<usize>().ok().filter(|&i| i < bodies.len());
        for entry in sent.successful {
            if let Some(i) = at(&entry.id) {
                outcomes[i] = Ok(entry.message_id);
            }
        }
        for entry in sent.failed {
            if let Some(i) = at(&entry.id) {
                outcomes[i] = Err(QueueError::Unavailable(format!(
                    "SendMessageBatch: {} {}",
                    entry.code,
                    entry.message.as_deref().unwrap_or_default()
                )));
            }
        }
        Ok(outcomes)
    }

    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        ApiCalls::count(&self.calls.receive);
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(seconds(wait.min(MAX_WAIT)))
            .visibility_timeout(seconds(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(classify)?;
        output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|message| {
                let receive_count = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                match (message.message_id, message.receipt_handle) {
                    (Some(message_id), Some(receipt)) => Ok(Received {
                        message_id,
                        receipt,
                        body: message.body.unwrap_or_default(),
                        receive_count,
                    }),
                    _ => Err(QueueError::Unavailable(
                        "ReceiveMessage returned a message without id or receipt".into(),
                    )),
                }
            })
            .collect()
    }

    pub async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        ApiCalls::count(&self.calls.delete);
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    pub async fn set_visibility(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        ApiCalls::count(&self.calls.change_visibility);
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds(visibility))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Sends a copy with its reason to the dead-letter queue, then deletes
    /// the original. If the delete fails, the copy stays and the original
    /// comes back later: at least once, never lost.
    pub async fn dead_letter(
        &self,
        received: &Received,
        body: &str,
        note: &DeadLetter,
    ) -> Result<(), QueueError> {
        self.send_dead_letter(body, note).await?;
        self.delete(&received.receipt).await
    }

    /// Sends `body` to the dead-letter queue with renderq's note.
    async fn send_dead_letter(&self, body: &str, note: &DeadLetter) -> Result<(), QueueError> {
        ApiCalls::count(&self.calls.send);
        self.client
            .send_message()
            .queue_url(&self.dlq_url)
            .message_body(body)
            .message_attributes(REASON, string_attribute(truncate(&note.reason, 4096)))
            .message_attributes(SOURCE_ID, string_attribute(&note.message_id))
            .message_attributes(RECEIVES, string_attribute(note.receive_count.to_string()))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Re-sends `body` as a new message and deletes the received one, so the
    /// message starts over with a fresh receive count (the body carries the
    /// tries already used).
    pub async fn requeue(
        &self,
        received: &Received,
        body: &str,
        delay: Duration,
    ) -> Result<(), QueueError> {
        self.send_delayed(body, delay).await?;
        self.delete(&received.receipt).await
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `{"deadLetterTargetArn": "...", "maxReceiveCount": 3}` (the count may be
/// a string or a number).
fn parse_redrive_policy(policy: &str) -> Option<(String, u32)> {
    let value: serde_json::Value = serde_json::from_str(policy).ok()?;
    let arn = value.get("deadLetterTargetArn")?.as_str()?.to_owned();
    let count = match value.get("maxReceiveCount")? {
        serde_json::Value::String(s) => s.parse().ok()?,
        n => u32::try_from(n.as_u64()?).ok()?,
    };
    Some((arn, count))
}

/// `arn:aws:sqs:REGION:ACCOUNT:NAME` → (ACCOUNT, NAME).
fn arn_account_and_name(arn: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", _, "sqs", _, account, name] => Some((account, name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_policy_parses_both_count_forms() {
        let arn = "arn:aws:sqs:us-east-1:123456789012:jobs-dlq";
        assert_eq!(
            parse_redrive_policy(&format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"5"}}"#
            )),
            Some((arn.to_owned(), 5))
        );
        assert_eq!(
            parse_redrive_policy(&format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":3}}"#
            )),
            Some((arn.to_owned(), 3))
        );
        assert_eq!(
            arn_account_and_name(arn),
            Some(("123456789012", "jobs-dlq"))
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
