//! A target's buffer between [`Publisher::publish`](super::publish::Publisher::publish),
//! which never waits, and the target's delivery task: an unbounded channel
//! whose fill the sender bounds, in events for a target (`[events]
//! buffer`) or in bytes for the status table (`[events] status_buffer`, a
//! large bound: a table that misses a job's end shows it running forever,
//! so under a burst it takes memory rather than drop).
//!
//! Only past the bound is an event refused (and the caller counts it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::job::event::Event;

/// What a buffer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Events(usize),
    Bytes(usize),
}

/// An event on its way, with what it counted against the bound.
#[derive(Debug)]
struct Queued {
    event: Event,
    weight: usize,
}

/// The sending half; clones share the fill.
#[derive(Debug, Clone)]
pub struct BufferSender {
    sender: mpsc::UnboundedSender<Queued>,
    fill: Arc<AtomicUsize>,
    bound: Bound,
}

/// The receiving half, for the target's delivery task.
#[derive(Debug)]
pub struct BufferReceiver {
    receiver: mpsc::UnboundedReceiver<Queued>,
    fill: Arc<AtomicUsize>,
}

/// A buffer holding at most `bound`.
pub fn buffer(bound: Bound) -> (BufferSender, BufferReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let fill = Arc::new(AtomicUsize::new(0));
    (
        BufferSender {
            sender,
            fill: fill.clone(),
            bound,
        },
        BufferReceiver { receiver, fill },
    )
}

impl BufferSender {
    /// Queues `event` unless that would take the buffer past its bound or
    /// the receiver is gone; whether it was queued (if not, it is dropped).
    pub fn try_send(&self, event: Event) -> bool {
        let (weight, limit) = match self.bound {
            Bound::Events(limit) => (1, limit),
            Bound::Bytes(limit) => (approx_bytes(&event), limit),
        };
        let before = self.fill.fetch_add(weight, Ordering::Relaxed);
        if before + weight > limit && before > 0 {
            self.fill.fetch_sub(weight, Ordering::Relaxed);
            return false;
        }
        match self.sender.send(Queued { event, weight }) {
            Ok(()) => true,
            Err(_) => {
                self.fill.fetch_sub(weight, Ordering::Relaxed);
                false
            }
        }
    }
}

impl BufferReceiver {
    /// The next event; `None` once every sender is gone and the buffer is
    /// empty.
    pub async fn recv(&mut self) -> Option<Event> {
        let queued = self.receiver.recv().await?;
        Some(self.taken(queued))
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        let queued = self.receiver.try_recv().ok()?;
        Some(self.taken(queued))
    }

    fn taken(&self, queued: Queued) -> Event {
        self.fill.fetch_sub(queued.weight, Ordering::Relaxed);
        queued.event
    }
}

/// About what an event takes in memory: its own size, its strings and
/// its detail's (a walk of a small tree, far cheaper than serialising it).
pub fn approx_bytes(event: &Event) -> usize {
    let job = event.job.as_ref().map_or(0, |job| {
        job.job_id.len() + job.message_id.len() + job.queue.len() + job.command.len() + 256
    });
    std::mem::size_of::<Event>()
        + event.event_id.len()
        + event.time.len()
        + job
        + value_bytes(&event.detail)
        + event
            .vars
            .iter()
            .map(|(k, v)| k.len() + value_bytes(v))
            .sum::<usize>()
}

fn value_bytes(value: &Value) -> usize {
    const NODE: usize = std::mem::size_of::<Value>();
    NODE + match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_bytes).sum(),
        Value::Object(map) => map.iter().map(|(k, v)| 32 + k.len() + value_bytes(v)).sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use serde_json::json;

    use crate::config::EventsConfig;
    use crate::events::metrics::EventsDropped;
    use crate::events::publish::Publisher;
    use crate::events::status::{Status, StatusTable};
    use crate::job::event::{EventType, JobRef, WorkerIdentity};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_reaches_the_status_table_whole_past_the_targets_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let table = Arc::new(StatusTable::open(&dir.path().join("status.sqlite3")).unwrap());
        // A target's buffer of 2 events would drop nearly all of the burst.
        let config = EventsConfig {
            buffer: 2,
            ..EventsConfig::default()
        };
        let publisher = Publisher::start(
            &config,
            WorkerIdentity::current(),
            Some(table.clone()),
            EventsDropped::default(),
        )
        .await
        .unwrap();
        let jobs: Vec<String> = (0..3000)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        for kind in [
            EventType::JobSubmitted,
            EventType::JobStarted,
            EventType::JobSucceeded,
        ] {
            for job_id in &jobs {
                let job = JobRef {
                    job_id: job_id.clone(),
                    message_id: job_id.clone(),
                    attempt: u32::from(kind != EventType::JobSubmitted),
                    ..Default::default()
                };
                publisher.publish(Event::new(kind, Some(job), json!({"outputs": []})), &[]);
            }
        }
        publisher.close(Duration::from_secs(60)).await;
        assert_eq!(publisher.dropped(), 0);
        let cost = table.fold_cost();
        assert_eq!(cost.events, 9000);
        assert!(cost.batches >= 9, "{} events a transaction at most", 1000);
        for job_id in &jobs {
            let status = table.get(job_id).unwrap();
            assert!(
                matches!(&status, Some(Status::Job(j)) if j.state == "succeeded"),
                "{job_id}: {status:?}"
            );
        }
    }

    #[test]
    fn a_buffer_bounded_in_bytes_refuses_only_past_its_bound() {
        let event = || {
            Event::new(
                EventType::JobStarted,
                None,
                json!({"blob": "x".repeat(1000)}),
            )
        };
        let size = approx_bytes(&event());
        assert!(size > 1000, "{size}");
        let (sender, mut receiver) = buffer(Bound::Bytes(size * 3));
        for _ in 0..3 {
            assert!(sender.try_send(event()));
        }
        assert!(!sender.try_send(event()), "a fourth is past the bound");
        receiver.try_recv().unwrap();
        assert!(sender.try_send(event()), "room again once one was taken");
        drop(sender);
        let mut left = 0;
        while receiver.try_recv().is_some() {
            left += 1;
        }
        assert_eq!(left, 3);
    }
}
