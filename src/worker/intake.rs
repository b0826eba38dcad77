//! Where slots get their jobs: one receiver per listened queue, shared by
//! every slot of the worker, most urgent queue first.
//!
//! A slot that wants a job takes a message already received for the most
//! urgent queue that has one. Otherwise it tries the embedded queues
//! itself (a claim that finds nothing costs no call), and starts a receive
//! on each SQS queue that has none in flight, asking for as many messages
//! as slots are waiting (at most 10); then it waits. A less urgent SQS
//! queue is asked only once every more urgent one has had a receive in
//! flight for `GRACE` without an answer: a long poll answers within a
//! round trip when it has a message, and at once when one arrives. So:
//!
//! - a free slot takes an urgent job before any other, however long the
//!   other queues' backlogs;
//! - an idle worker keeps one long poll in flight per queue, whatever its
//!   slots (on SQS, with 20 s polls, three calls a minute per queue);
//! - a busy one receives at most once per job from the queue it works on
//!   (a receive asks only for the slots waiting).
//!
//! A receive is never abandoned: each runs in a task of its own, and what
//! it brings waits here for a slot (one may answer after its slot took
//! another queue's job). A message no slot takes within a third of the
//! visibility timeout, and every message held at shutdown, is handed back
//! without using up a try.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::events::observe::Observer;
use crate::queue::{Queue, QueueError, Received};
use crate::worker::delivery::Delivery;

/// How long a receive on a more urgent SQS queue must have gone unanswered
/// before a less urgent queue is asked.
const GRACE: Duration = Duration::from_millis(100);

/// SQS hands out at most this many messages per receive.
const MAX_PER_RECEIVE: usize = 10;

pub struct Intake {
    queues: Vec<Queue>,
    /// Longest a receive waits (long polling).
    wait: Duration,
    visibility: Duration,
    observer: Observer,
    shared: Arc<Shared>,
    /// Receives in flight, and messages waiting to be handed back.
    tasks: TaskTracker,
    /// Cancelled at shutdown: whatever is held goes back at once.
    closing: CancellationToken,
}

struct Shared {
    state: Mutex<State>,
    /// Rung when a receive ends.
    changed: Notify,
}

struct State {
    /// Slots waiting for a job.
    waiting: usize,
    /// By queue, most urgent first.
    lanes: Vec<Lane>,
}

#[derive(Default)]
struct Lane {
    /// Received and waiting for a slot, oldest first.
    held: VecDeque<Received>,
    /// When the receive in flight was sent.
    receiving: Option<Instant>,
    /// Why the last receive failed, for the next slot to report.
    error: Option<QueueError>,
}

/// A slot's place among the waiting ones, left when dropped.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("intake lock")
    }
}

impl Intake {
    pub fn new(
        queues: Vec<Queue>,
        wait: Duration,
        visibility: Duration,
        observer: Observer,
    ) -> Self {
        let lanes = queues.iter().map(|_| Lane::default()).collect();
        Self {
            queues,
            wait,
            visibility,
            observer,
            shared: Arc::new(Shared {
                state: Mutex::new(State { waiting: 0, lanes }),
                changed: Notify::new(),
            }),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
        }
    }

    /// The next job for a slot: which queue it came from, and the message.
    /// `None` once `stop` is cancelled (after a last look at what is
    /// already here).
    pub async fn next(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<(usize, Received)>, QueueError> {
        self.shared.lock().waiting += 1;
        let _waiting = Waiting(&self.shared);
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            // What is here already, most urgent first; stop before a queue
            // whose more urgent neighbour may be about to answer.
            let (reachable, mut wake_at) = {
                let mut state = self.shared.lock();
                let now = Instant::now();
                let mut reachable = self.queues.len();
                let mut wake_at = None;
                for (i, lane) in state.lanes.iter_mut().enumerate() {
                    if let Some(received) = lane.held.pop_front() {
                        return Ok(Some((i, received)));
                    }
                    if let Some(error) = lane.error.take() {
                        return Err(error);
                    }
                    if let (Queue::Sqs(_), Some(sent)) = (&self.queues[i], lane.receiving)
                        && now < sent + GRACE
                    {
                        (reachable, wake_at) = (i + 1, Some(sent + GRACE));
                        break;
                    }
                }
                (reachable, wake_at)
            };
            // The embedded queues are asked right here.
            for (i, queue) in self.queues[..reachable].iter().enumerate() {
                if let Queue::Local(_) = queue {
                    let got = self.receive(queue, 1, Duration::ZERO, stop).await?;
                    if let Some(received) = got.into_iter().next() {
                        return Ok(Some((i, received)));
                    }
                }
            }
            if stop.is_cancelled() {
                return Ok(None);
            }
            // Nothing: start the receives that are not in flight.
            {
                let mut state = self.shared.lock();
                let held: usize = state.lanes.iter().map(|l| l.held.len()).sum();
                let want = state.waiting.saturating_sub(held).clamp(1, MAX_PER_RECEIVE);
                let now = Instant::now();
                for i in 0..reachable {
                    let lane = &mut state.lanes[i];
                    let sent = match lane.receiving {
                        Some(sent) => sent,
                        None => {
                            lane.receiving = Some(now);
                            self.spawn_receive(i, want, stop.clone());
                            now
                        }
                    };
                    if matches!(self.queues[i], Queue::Sqs(_)) && now < sent + GRACE {
                        wake_at = Some(sent + GRACE);
                        break;
                    }
                }
            }
            let wake_at = wake_at.unwrap_or_else(|| Instant::now() + self.wait);
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// One receive call, counted.
    async fn receive(
        &self,
        queue: &Queue,
        max: usize,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Received>, QueueError> {
        receive_counted(queue, &self.observer, max, wait, self.visibility, stop).await
    }

    /// Receives on queue `lane` in a task of its own, into its lane; hands
    /// back later what no slot took.
    fn spawn_receive(&self, lane: usize, max: usize, stop: CancellationToken) {
        let (queue, shared, closing) = (
            self.queues[lane].clone(),
            self.shared.clone(),
            self.closing.clone(),
        );
        let (wait, visibility, observer) = (self.wait, self.visibility, self.observer.clone());
        let hold_for = visibility / 3;
        self.tasks.spawn(
            async move {
                let got = receive_counted(&queue, &observer, max, wait, visibility, &stop).await;
                let receipts: Vec<String> = {
                    let mut state = shared.lock();
                    let lane = &mut state.lanes[lane];
                    lane.receiving = None;
                    match got {
                        Ok(messages) => {
                            lane.error = None;
                            let receipts = messages.iter().map(|m| m.receipt.clone()).collect();
                            lane.held.extend(messages);
                            receipts
                        }
                        Err(error) => {
                            lane.error = Some(error);
                            Vec::new()
                        }
                    }
                };
                shared.changed.notify_waiters();
                if receipts.is_empty() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(hold_for) => {}
                    _ = closing.cancelled() => {}
                }
                let left: Vec<Received> = {
                    let mut state = shared.lock();
                    let held = &mut state.lanes[lane].held;
                    let (left, kept): (Vec<_>, Vec<_>) = std::mem::take(held)
                        .into_iter()
                        .partition(|m| receipts.contains(&m.receipt));
                    *held = kept.into();
                    left
                };
                for received in left {
                    hand_back(&queue, received).await;
                }
            }
            .in_current_span(),
        );
    }

    /// Stops taking messages: waits for the receives in flight, then hands
    /// back everything no slot took.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let held: Vec<(usize, Received)> = {
            let mut state = self.shared.lock();
            (state.lanes.iter_mut().enumerate())
                .flat_map(|(i, lane)| {
                    std::mem::take(&mut lane.held)
                        .into_iter()
                        .map(move |m| (i, m))
                })
                .collect()
        };
        for (lane, received) in held {
            hand_back(&self.queues[lane], received).await;
        }
    }
}

async fn receive_counted(
    queue: &Queue,
    observer: &Observer,
    max: usize,
    wait: Duration,
    visibility: Duration,
    stop: &CancellationToken,
) -> Result<Vec<Received>, QueueError> {
    let got = queue.receive(max, wait, visibility, stop).await;
    observer.metrics().received(match &got {
        Ok(messages) if !messages.is_empty() => "message",
        Ok(_) => "empty",
        Err(_) => "error",
    });
    got
}

/// Puts a message no slot took back in its queue at once, without using
/// up a try.
async fn hand_back(queue: &Queue, received: Received) {
    let delivery = Delivery::new(received);
    let before = delivery.attempt.saturating_sub(1);
    let body = delivery.resend_body(|envelope| envelope.failures = before);
    let span = tracing::info_span!("job", queue = %queue.name(), message_id = %delivery.message_id);
    async {
        match queue.requeue(&delivery.received, &body, Duration::ZERO).await {
            Ok(()) => info!("No slot was free for a received job: handed it back."),
            Err(error) => warn!(%error, "cannot hand back a received job; it returns when its visibility lapses"),
        }
    }
    .instrument(span)
    .await
}
