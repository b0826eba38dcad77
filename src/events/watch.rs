//! `renderq events watch`: consumes an event target into the job-status
//! table. A line or message that is not an event of this protocol is
//! skipped and counted; a repeat is recognised by its `event_id`. Nothing
//! in the stream can stop the watcher.

use std::io::{BufRead, Seek};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EventTargetConfig};
use crate::events::status::{Applied, StatusTable};
use crate::job::event::Event;

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
    let table = StatusTable::open(path)?;
    let mut watched = Watched::default();
    match config.events.targets.get(target) {
        Some(EventTargetConfig::File(file)) => {
            let mut offset = 0;
            loop {
                offset = read_new_lines(&file.path, offset, &table, &mut watched)?;
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
            while !stop.is_cancelled() {
                let received = client
                    .receive_message()
                    .queue_url(&sqs.url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(if once { 1 } else { 20 })
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", sqs.url, crate::aws::describe(&e)))?;
                let messages = received.messages.unwrap_or_default();
                if messages.is_empty() && once {
                    break;
                }
                for message in messages {
                    watched.take(&table, message.body().unwrap_or_default())?;
                    if let Some(receipt) = message.receipt_handle() {
                        client
                            .delete_message()
                            .queue_url(&sqs.url)
                            .receipt_handle(receipt)
                            .send()
                            .await
                            .map_err(|e| anyhow::anyhow!(crate::aws::describe(&e)))?;
                    }
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
