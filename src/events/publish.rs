//! Delivers events to their targets without ever holding up a job.
//!
//! Each target has a bounded buffer and a task of its own that sends in
//! batches, retrying with back-off while the target is down. Publishing
//! never waits: when a buffer is full the event is dropped, counted and
//! logged. The status table's buffer is bounded in bytes, and far larger
//! (`[events] status_buffer`): it takes a burst whole. On shutdown
//! [`Publisher::close`] lets the buffers drain until the drain deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio_util::task::TaskTracker;

use crate::config::{EventTargetConfig, EventsConfig, secret_from_env};
use crate::events::buffer::{Bound, BufferReceiver, BufferSender, buffer};
use crate::events::metrics::{DropReason, EventsDropped};
use crate::events::status::StatusTable;
use crate::job::event::{Event, EventType, Notification, WorkerIdentity};
use crate::retry::Backoff;

/// The status table's outlet name (not a valid TOML key, so no clash).
const STATUS: &str = "(status)";

/// How long the status table's batch waits for more events after its
/// first (see [`Target::linger`]).
const STATUS_LINGER: Duration = Duration::from_millis(50);

/// EventBridge's `source` for renderq's events.
const SOURCE: &str = "renderq";

/// Waits between tries of a batch a target refused.
const RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));

/// The largest entry SQS and EventBridge take (256 KiB). EventBridge
/// counts the source and detail-type with the detail.
const MAX_ENTRY: usize = 256 * 1024;

/// What a target made of a batch, by index in the batch: entries to send
/// again, entries it will never take (with why), and entries left for the
/// next call because one call carries at most `MAX_ENTRY` bytes.
#[derive(Debug, Default)]
struct Refused {
    again: Vec<usize>,
    never: Vec<(usize, DropReason, String)>,
    later: Vec<usize>,
}

impl Refused {
    /// Sizes every entry against `limit` (trimming where it can): the
    /// entries to send in this call, as (index, JSON), the ones too large,
    /// and those that must wait for the next call (a call carries at most
    /// `MAX_ENTRY` bytes in all).
    fn sized(batch: &[Event], limit: impl Fn(&Event) -> usize) -> (Vec<(usize, String)>, Self) {
        let mut refused = Self::default();
        let mut entries = Vec::with_capacity(batch.len());
        let mut bytes = 0;
        for (i, event) in batch.iter().enumerate() {
            let limit = limit(event);
            match event.to_json_within(limit) {
                Ok(json)
                    if !entries.is_empty()
                        && bytes + json.len() + MAX_ENTRY - limit > MAX_ENTRY =>
                {
                    refused.later.push(i)
                }
                Ok(json) => {
                    bytes += json.len() + MAX_ENTRY - limit;
                    entries.push((i, json))
                }
                Err(bytes) => refused.never.push((
                    i,
                    DropReason::TooLarge,
                    format!(
                        "{} of {bytes} bytes, over the target's {limit}",
                        event.kind.name()
                    ),
                )),
            }
        }
        (entries, refused)
    }
}

/// A place events go.
#[derive(Debug)]
enum Target {
    /// The file, and its handle once opened (kept across batches).
    File(
        std::path::PathBuf,
        tokio::sync::Mutex<Option<tokio::fs::File>>,
    ),
    Sqs {
        client: aws_sdk_sqs::Client,
        url: String,
    },
    EventBridge {
        client: aws_sdk_eventbridge::Client,
        bus: String,
    },
    Webhook {
        client: reqwest::Client,
        url: String,
        secret: Option<Vec<u8>>,
    },
    /// The job-status table (`[events] status`).
    Status(Arc<StatusTable>),
}

impl Target {
    async fn open(name: &str, config: &EventTargetConfig) -> anyhow::Result<Self> {
        Ok(match config {
            EventTargetConfig::File(c) => Target::File(c.path.clone(), Default::default()),
            EventTargetConfig::Sqs(c) => {
                let sdk =
                    crate::aws::sdk_config(c.region.as_deref(), c.endpoint_url.as_deref()).await;
                Target::Sqs {
                    client: aws_sdk_sqs::Client::new(&sdk),
                    url: c.url.clone(),
                }
            }
            EventTargetConfig::Eventbridge(c) => {
                let sdk =
                    crate::aws::sdk_config(c.region.as_deref(), c.endpoint_url.as_deref()).await;
                Target::EventBridge {
                    client: aws_sdk_eventbridge::Client::new(&sdk),
                    bus: c.bus.clone(),
                }
            }
            EventTargetConfig::Webhook(c) => {
                let secret = c
                    .secret_env
                    .as_deref()
                    .map(|var| secret_from_env(&format!("events.targets.{name}.secret_env"), var))
                    .transpose()
                    .map_err(|i| anyhow::anyhow!("`{}`: {}", i.key, i.message))?;
                Target::Webhook {
                    client: reqwest::Client::builder()
                        .timeout(c.timeout)
                        .user_agent(concat!("renderq/", env!("CARGO_PKG_VERSION")))
                        .build()?,
                    url: c.url.clone(),
                    secret: secret.map(String::into_bytes),
                }
            }
        })
    }

    /// Most events sent in one call.
    fn batch_size(&self) -> usize {
        match self {
            Target::File(..) | Target::Status(_) => 1000,
            Target::Sqs { .. } | Target::EventBridge { .. } => 10,
            Target::Webhook { .. } => 1,
        }
    }

    /// How long a batch waits for more events after its first: the status
    /// table commits one transaction per batch, so a busy worker's events
    /// go in a few large ones rather than one each (a read of it may lag
    /// by this much); other targets send what is there at once.
    fn linger(&self) -> Duration {
        match self {
            Target::Status(_) => STATUS_LINGER,
            _ => Duration::ZERO,
        }
    }

    /// Sends a batch. `Err` when the whole call failed (all of it is tried
    /// again); otherwise what the target refused.
    async fn send(&self, batch: &[Event]) -> Result<Refused, String> {
        match self {
            Target::File(path, handle) => {
                let mut lines = String::new();
                for event in batch {
                    lines.push_str(&event.to_json());
                    lines.push('\n');
                }
                let mut handle = handle.lock().await;
                let written = async {
                    if handle.is_none() {
                        let file = tokio::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .await?;
                        *handle = Some(file);
                    }
                    let file = handle.as_mut().expect("opened above");
                    // One write per batch: appends from several processes
                    // do not interleave within a line. tokio writes in the
                    // background until flushed.
                    file.write_all(lines.as_bytes()).await?;
                    file.flush().await
                }
                .await;
                if written.is_err() {
                    // Open afresh next time (the file may have been moved).
                    *handle = None;
                }
                written
                    .map(|()| Refused::default())
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Target::Sqs { client, url } => {
                let (entries, mut refused) = Refused::sized(batch, |_| MAX_ENTRY);
                if entries.is_empty() {
                    return Ok(refused);
                }
                let built = entries
                    .iter()
                    .map(|(i, json)| {
                        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(json)
                            .build()
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let sent = client
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(built))
                    .send()
                    .await
                    .map_err(|e| crate::aws::describe(&e))?;
                for failed in sent.failed {
                    let Ok(i) = failed.id.parse::<usize>() else {
                        continue;
                    };
                    if failed.sender_fault {
                        let why = format!("SendMessageBatch: {}", failed.code);
                        refused.never.push((i, DropReason::Refused, why));
                    } else {
                        refused.again.push(i);
                    }
                }
                Ok(refused)
            }
            Target::EventBridge { client, bus } => {
                // The source and detail-type count towards the entry's size.
                let (entries, mut refused) = Refused::sized(batch, |event| {
                    MAX_ENTRY - SOURCE.len() - event.kind.name().len()
                });
                if entries.is_empty() {
                    return Ok(refused);
                }
                let built = entries
                    .iter()
                    .map(|(i, json)| {
                        aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                            .source(SOURCE)
                            .detail_type(batch[*i].kind.name())
                            .detail(json)
                            .event_bus_name(bus)
                            .build()
                    })
                    .collect();
                let put = client
                    .put_events()
                    .set_entries(Some(built))
                    .send()
                    .await
                    .map_err(|e| crate::aws::describe(&e))?;
                // Results come in the order of the entries sent.
                for ((i, _), result) in entries.iter().zip(put.entries()) {
                    match result.error_code() {
                        None => {}
                        Some(
                            "ThrottlingException"
                            | "InternalFailure"
                            | "InternalException"
                            | "ServiceUnavailable",
                        ) => refused.again.push(*i),
                        Some(code) => {
                            let why = format!(
                                "PutEvents: {code} {}",
                                result.error_message().unwrap_or_default()
                            );
                            refused.never.push((*i, DropReason::Refused, why));
                        }
                    }
                }
                Ok(refused)
            }
            Target::Status(table) => {
                let (table, batch) = (table.clone(), batch.to_vec());
                tokio::task::spawn_blocking(move || table.apply_all(&batch))
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| Refused::default())
                    .map_err(|e| e.to_string())
            }
            Target::Webhook {
                client,
                url,
                secret,
            } => {
                for event in batch {
                    let body = event.to_json();
                    let mut request = client
                        .post(url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json");
                    if let Some(secret) = secret {
                        let mut mac =
                            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
                        mac.update(body.as_bytes());
                        request = request.header(
                            crate::tasks::SIGNATURE_HEADER,
                            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
                        );
                    }
                    let response = request
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| format!("{url}: {}", crate::error_chain(&e)))?;
                    if !response.status().is_success() {
                        return Err(format!("{url} answered {}", response.status()));
                    }
                }
                Ok(Refused::default())
            }
        }
    }
}

/// A target's buffer, as the publisher sees it.
#[derive(Debug)]
struct Outlet {
    /// Event types it gets without a subscription (`None`: all).
    filter: Option<Vec<EventType>>,
    /// `None` once closed.
    sender: Mutex<Option<BufferSender>>,
}

#[derive(Debug, Default)]
struct Inner {
    worker: Option<WorkerIdentity>,
    outlets: BTreeMap<String, Outlet>,
    tasks: TaskTracker,
    /// Events dropped, by reason.
    dropped: EventsDropped,
}

/// Publishes events to the configured targets; clones share the targets.
#[derive(Debug, Clone, Default)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
    /// Opens every target (and the status table, as one more) and starts
    /// their delivery tasks.
    pub async fn start(
        config: &EventsConfig,
        worker: WorkerIdentity,
        status: Option<Arc<StatusTable>>,
        dropped: EventsDropped,
    ) -> anyhow::Result<Self> {
        let tasks = TaskTracker::new();
        let mut outlets = BTreeMap::new();
        let mut targets = Vec::new();
        for (name, target_config) in &config.targets {
            targets.push((
                name.clone(),
                Target::open(name, target_config).await?,
                target_config.events().map(<[EventType]>::to_vec),
            ));
        }
        if let Some(table) = status {
            // Not a name a job can subscribe to: it gets everything anyway.
            targets.push((STATUS.into(), Target::Status(table), None));
        }
        for (name, target, filter) in targets {
            let (sender, receiver) = buffer(match target {
                Target::Status(_) => Bound::Bytes(config.status_buffer),
                _ => Bound::Events(config.buffer),
            });
            tasks.spawn(deliver(
                name.clone(),
                target,
                receiver,
                config.attempts,
                dropped.clone(),
            ));
            outlets.insert(
                name,
                Outlet {
                    filter,
                    sender: Mutex::new(Some(sender)),
                },
            );
        }
        tasks.close();
        Ok(Self {
            inner: Arc::new(Inner {
                worker: Some(worker),
                outlets,
                tasks,
                dropped,
            }),
        })
    }

    /// No target at all: callers can skip building events.
    pub fn is_idle(&self) -> bool {
        self.inner.outlets.is_empty()
    }

    /// Whether a target of that name is configured (for subscriptions).
    pub fn has_target(&self, name: &str) -> bool {
        name != STATUS && self.inner.outlets.contains_key(name)
    }

    /// Events dropped so far, for every reason.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.total()
    }

    /// Events dropped so far for one reason.
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.inner.dropped.of(reason)
    }

    /// Sends an event to every target whose filter lets it through, with
    /// the job's variables, and once more to each of the job's own
    /// subscriptions that wants it, with that subscription's variables.
    /// Never waits.
    pub fn publish(&self, mut event: Event, notifications: &[Notification]) {
        if self.is_idle() {
            return;
        }
        event.worker = self.inner.worker.clone();
        for notification in notifications {
            if notification.wants(event.kind) {
                let mut own = event.clone();
                own.event_id = uuid::Uuid::now_v7().to_string();
                own.vars = notification.vars.clone();
                self.enqueue(&notification.target, own);
            }
        }
        event.vars = notifications
            .iter()
            .flat_map(|n| n.vars.clone())
            .collect::<Map<String, Value>>();
        let mut wanting = (self.inner.outlets.iter())
            .filter(|(_, outlet)| (outlet.filter.as_ref()).is_none_or(|f| f.contains(&event.kind)))
            .map(|(name, _)| name)
            .peekable();
        // The last target takes the event itself, the others a copy.
        while let Some(name) = wanting.next() {
            if wanting.peek().is_some() {
                self.enqueue(name, event.clone());
            } else {
                self.enqueue(name, event);
                break;
            }
        }
    }

    fn enqueue(&self, target: &str, event: Event) {
        let Some(outlet) = self.inner.outlets.get(target) else {
            return;
        };
        let sender = outlet.sender.lock().expect("outlet lock").clone();
        let refused = match sender {
            Some(sender) => !sender.try_send(event),
            None => true,
        };
        if refused {
            let dropped = self.inner.dropped.count(DropReason::BufferFull, 1);
            tracing::warn!(
                target,
                dropped,
                "event dropped: the target's buffer is full"
            );
        }
    }

    /// Stops taking events and gives the buffers until `deadline` to drain.
    pub async fn close(&self, deadline: Duration) {
        for outlet in self.inner.outlets.values() {
            outlet.sender.lock().expect("outlet lock").take();
        }
        if tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("event targets did not drain before the deadline");
        }
    }
}

/// A target's delivery loop: batches, retries with back-off what the
/// target did not take, and counts what it has to give up on.
async fn deliver(
    name: String,
    target: Target,
    mut receiver: BufferReceiver,
    attempts: u32,
    dropped: EventsDropped,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let take = |batch: &mut Vec<Event>, receiver: &mut BufferReceiver| {
            while batch.len() < target.batch_size()
                && let Some(event) = receiver.try_recv()
            {
                batch.push(event);
            }
        };
        take(&mut batch, &mut receiver);
        // A batch not yet full waits out the linger once, then takes what
        // came meanwhile: the events in between wake nothing (a wake per
        // event would cost the job path more than the write).
        if batch.len() < target.batch_size() && !target.linger().is_zero() {
            tokio::time::sleep(target.linger()).await;
            take(&mut batch, &mut receiver);
        }
        let mut tries = 0;
        while !batch.is_empty() {
            tries += 1;
            let error = match target.send(&batch).await {
                Ok(refused) => {
                    for (i, reason, why) in &refused.never {
                        let total = dropped.count(*reason, 1);
                        tracing::error!(target = %name, reason = reason.name(), %why,
                            event_id = %batch[*i].event_id, dropped = total,
                            "event dropped: the target will never take it");
                    }
                    let again = refused.again.len();
                    let mut next = refused.again;
                    next.extend(refused.later);
                    next.sort_unstable();
                    let mut slots: Vec<Option<Event>> = batch.into_iter().map(Some).collect();
                    batch = next
                        .into_iter()
                        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
                        .collect();
                    if again == 0 {
                        // Everything sent was taken: what is left goes now,
                        // with its tries untouched.
                        tries = 0;
                        continue;
                    }
                    format!("{again} entries refused for now")
                }
                Err(error) => error,
            };
            if tries >= attempts {
                let total = dropped.count(DropReason::OutOfTries, batch.len() as u64);
                tracing::error!(target = %name, %error, dropped = total,
                    "event target failed every try; events dropped");
                break;
            }
            let delay = RETRY.delay(tries);
            tracing::warn!(target = %name, %error, retry_in = ?delay, "event target failed");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EventTargetConfig, FileTargetConfig};
    use serde_json::json;

    fn file_target(path: &std::path::Path, events: Option<Vec<EventType>>) -> EventTargetConfig {
        EventTargetConfig::File(FileTargetConfig {
            path: path.to_owned(),
            events,
        })
    }

    async fn start(config: &EventsConfig) -> Publisher {
        Publisher::start(
            config,
            WorkerIdentity::current(),
            None,
            EventsDropped::default(),
        )
        .await
        .unwrap()
    }

    fn lines(path: &std::path::Path) -> Vec<Event> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| Event::parse(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn filters_and_subscriptions_pick_what_each_target_gets() {
        let dir = tempfile::tempdir().unwrap();
        let (all, succeeded, mine) = (
            dir.path().join("all"),
            dir.path().join("succeeded"),
            dir.path().join("mine"),
        );
        let config = EventsConfig {
            targets: BTreeMap::from([
                ("all".into(), file_target(&all, None)),
                (
                    "succeeded".into(),
                    file_target(&succeeded, Some(vec![EventType::JobSucceeded])),
                ),
                ("mine".into(), file_target(&mine, Some(vec![]))),
            ]),
            ..EventsConfig::default()
        };
        let publisher = start(&config).await;
        let subscription = Notification {
            events: vec![EventType::JobFailed],
            target: "mine".into(),
            vars: json!({"project": "x"}).as_object().unwrap().clone(),
        };
        for kind in [
            EventType::JobStarted,
            EventType::JobFailed,
            EventType::JobSucceeded,
        ] {
            publisher.publish(
                Event::new(kind, None, json!({})),
                std::slice::from_ref(&subscription),
            );
        }
        publisher.close(Duration::from_secs(5)).await;

        assert_eq!(lines(&all).len(), 3);
        assert!(lines(&all).iter().all(|e| e.vars["project"] == "x"));
        let kinds = |path| lines(path).iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&succeeded), [EventType::JobSucceeded]);
        assert_eq!(kinds(&mine), [EventType::JobFailed]);
        assert_eq!(publisher.dropped(), 0);
        let ids: std::collections::HashSet<_> = [&all, &succeeded, &mine]
            .iter()
            .flat_map(|p| lines(p))
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids.len(), 4, "the subscription's copy has an id of its own");
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_without_waiting() {
        let config = EventsConfig {
            targets: BTreeMap::from([(
                "down".into(),
                file_target(std::path::Path::new("/nonexistent/dir/events"), None),
            )]),
            buffer: 2,
            attempts: 1,
            ..EventsConfig::default()
        };
        let publisher = start(&config).await;
        let started = std::time::Instant::now();
        for _ in 0..100 {
            publisher.publish(Event::new(EventType::JobStarted, None, json!({})), &[]);
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        publisher.close(Duration::from_secs(5)).await;
        assert_eq!(
            publisher.dropped(),
            100,
            "dropped when full, or out of tries"
        );
    }

    #[test]
    fn one_call_carries_at_most_256_kib_and_the_rest_waits_for_the_next() {
        let big =
            |n: usize| Event::new(EventType::JobStarted, None, json!({"blob": "x".repeat(n)}));
        let batch = [
            big(100_000),
            big(100_000),
            big(100_000),
            big(300_000),
            big(10),
        ];
        let (entries, refused) = Refused::sized(&batch, |_| MAX_ENTRY);
        let sent: Vec<usize> = entries.iter().map(|(i, _)| *i).collect();
        assert_eq!(sent, [0, 1, 4], "two of 100 kB fit, and the small one");
        assert_eq!(refused.later, [2]);
        assert_eq!(refused.never.len(), 1, "300 kB can never go");
        assert_eq!(refused.never[0].0, 3);
    }
}
