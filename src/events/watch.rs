//! `renderq events watch`: consumes an event target into the job-status
//! table. A line or message that is not an event of this protocol is
//! skipped and counted; a repeat is recognised by its `event_id`. Nothing
//! in the stream can stop the watcher, and an unreachable queue is tried
//! again with back-off. The table is written on blocking threads.

use std::io::{BufRead, Seek};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EventTargetConfig};
use crate::events::status::{Applied, StatusTable};
use crate::job::event::Event;
use crate::retry::Backoff;

/// The waits between receives while the target's queue cannot be reached.
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// What a watch has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    pub applied: u64,
    pub duplicates: u64,
    /// Malformed, or of another protocol.
    pub skipped: u64,
}

impl Watched {
    fn take(&mut self, table: &StatusTable, text: &str) -> anyhow::Result<()> {
        match Event::parse(text) {
            Ok(event) => match table.apply(&event)? {
                Applied::New => self.applied += 1,
                Applied::Duplicate => self.duplicates += 1,
            },
            Err(error) => {
                self.skipped += 1;
                tracing::warn!(%error, "skipped something that is not an event");
            }
        }
        Ok(())
    }
}

/// Feeds `target` into the status table until `stop`, or (with `once`)
/// until the target has nothing more for now.
pub async fn run(
    config: &Config,
    target: &str,
    once: bool,
    stop: CancellationToken,
) -> anyhow::Result<Watched> {
    let path = config
        .events
        .status
        .path()
        .context("no status table: [events] status is \"off\" in workers.toml")?;
    let table = Arc::new(StatusTable::open(path)?);
    let mut watched = Watched::default();
    match config.events.targets.get(target) {
        Some(EventTargetConfig::File(file)) => {
            let mut offset = 0;
            loop {
                // The file and the table are read and written on a
                // blocking thread.
                let (path, table) = (file.path.clone(), table.clone());
                (offset, watched) = tokio::task::spawn_blocking(move || {
                    let mut watched = watched;
                    read_new_lines(&path, offset, &table, &mut watched).map(|o| (o, watched))
                })
                .await??;
                if once || stop.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
        Some(EventTargetConfig::Sqs(sqs)) => {
            let sdk =
                crate::aws::sdk_config(sqs.region.as_deref(), sqs.endpoint_url.as_deref()).await;
            let client = aws_sdk_sqs::Client::new(&sdk);
            let mut failures = 0;
            while !stop.is_cancelled() {
                let received = match client
                    .receive_message()
                    .queue_url(&sqs.url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(if once { 1 } else { 20 })
                    .send()
                    .await
                {
                    Ok(received) => {
                        failures = 0;
                        received
                    }
                    // A watcher left running rides out an outage; `--once`
                    // says what went wrong.
                    Err(e) if !once => {
                        failures += 1;
                        let delay = RETRY.delay(failures);
                        tracing::warn!(error = %crate::aws::describe(&e), ?delay, "cannot receive events; trying again");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.cancelled() => {}
                        }
                        continue;
                    }
                    Err(e) => bail!("{}: {}", sqs.url, crate::aws::describe(&e)),
                };
                let messages = received.messages.unwrap_or_default();
                if messages.is_empty() && once {
                    break;
                }
                let bodies: Vec<String> = (messages.iter())
                    .map(|m| m.body().unwrap_or_default().to_owned())
                    .collect();
                let table = table.clone();
                watched = tokio::task::spawn_blocking(move || {
                    let mut watched = watched;
                    for body in &bodies {
                        watched.take(&table, body)?;
                    }
                    anyhow::Ok(watched)
                })
                .await??;
                // One call for the batch; what it fails to delete comes back
                // and is recognised as a repeat.
                let entries = (messages.iter().enumerate())
                    .filter_map(|(i, m)| {
                        let entry = DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle()?)
                            .build();
                        entry.ok()
                    })
                    .collect::<Vec<_>>();
                if !entries.is_empty()
                    && let Err(e) = client
                        .delete_message_batch()
                        .queue_url(&sqs.url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                {
                    tracing::warn!(error = %crate::aws::describe(&e), "cannot delete the events read");
                }
            }
        }
        Some(_) => bail!(
            "target `{target}` cannot be read back: watch a `file` or `sqs` target (route an \
             EventBridge bus to an SQS queue with a rule)"
        ),
        None => bail!("no [events.targets.{target}] in the config"),
    }
    Ok(watched)
}

/// Applies the complete lines after `offset`; returns the new offset.
fn read_new_lines(
    path: &std::path::Path,
    offset: u64,
    table: &StatusTable,
    watched: &mut Watched,
) -> anyhow::Result<u64> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(offset);
    };
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::new(file);
    let mut offset = offset;
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        // A line still being written is read next time.
        if read == 0 || line.last() != Some(&b'\n') {
            return Ok(offset);
        }
        offset += read as u64;
        match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => watched.take(table, text.trim_end())?,
            Err(_) => watched.skipped += 1,
        }
    }
}
