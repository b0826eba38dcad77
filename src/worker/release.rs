//! Held jobs leaving the ledger: what a parent's end (or a release by
//! hand, or the sweep) freed is sent, or cancelled with its reason; a
//! cancelled dependant ends as a parent too, so its own dependants follow.
//!
//! The ledger freed each row once (see `events::ledger::holds`); this sends
//! it and only then marks it released. A worker that dies in between
//! leaves the row `releasing`, and the sweep ([`Worker::sweep_holds`])
//! sends it after `release_grace`.
//!
//! A parent whose dependants are on another queue (see
//! `events::ledger::holds::foreign`): its end, as its own ledger returns
//! it, names those queues; the releaser spends the ended units in each
//! one's ledger and sends what that freed to that queue, when this
//! process has both in its config ([`Reach`]). What it cannot reach,
//! the dependant queue's sweep releases: it reads the foreign parents'
//! ends ([`Worker::sweep_holds`]).

use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::Worker;
use super::delivery::Delivery;
use crate::events::ledger::{ChildState, Ended, EndsRead, ForeignEnd, Freed, Ledger, Ledgers};
use crate::events::observe::Observer;
use crate::job::event::EventType;
use crate::queue::{Queue, Queues, Received};
use crate::retry::Backoff;

const SEND_TRIES: u32 = 4;
const SEND_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Set (to anything) only by tests: a worker that freed a dependant stops
/// there, before sending it, as if it died (the test then kills it).
const HALT_BEFORE_RELEASE: &str = "RENDERQ_TEST_HALT_BEFORE_RELEASE";

/// Every queue and ledger this process opened from its config: where the
/// dependants of a parent on another queue are released.
#[derive(Debug, Clone, Copy)]
pub struct Reach<'a> {
    pub queues: &'a Queues,
    pub ledgers: &'a Ledgers,
}

impl<'a> Reach<'a> {
    /// Queue `name` and its ledger, if this process has both.
    fn get(&self, name: &str) -> Option<(&'a Queue, &'a Ledger)> {
        Some((self.queues.get(name)?, self.ledgers.get(name)?))
    }
}

/// A queue, its ledger and whom to tell: what a release needs; and the
/// other queues, for dependants there.
#[derive(Debug, Clone, Copy)]
pub struct Releaser<'a> {
    pub queue: &'a Queue,
    pub ledger: &'a Ledger,
    pub observer: &'a Observer,
    pub reach: Reach<'a>,
}

impl Releaser<'_> {
    /// After a parent's end (as its ledger's `units_ended` returned it):
    /// what it freed here, and its dependants on other queues; returns the
    /// rows released.
    pub async fn after_end(&self, ended: Ended) -> usize {
        let released = self.apply(ended.freed).await;
        released + self.forward(ended.foreign.into_iter().collect()).await
    }

    /// Spends ended units of this queue's parents in the ledgers of the
    /// other queues that keep dependants of them, and releases what that
    /// freed there.
    async fn forward(&self, ends: Vec<ForeignEnd>) -> usize {
        let mut released = 0;
        for end in ends {
            for name in &end.queues {
                let Some((queue, ledger)) = self.reach.get(name) else {
                    info!(parent = %end.parent_id, queue = %name,
                        "Dependants on a queue this process does not open; its sweep releases them.");
                    continue;
                };
                match ledger
                    .spend_foreign(&end.parent_id, end.units.clone())
                    .await
                {
                    Ok(freed) => {
                        let there = Releaser {
                            queue,
                            ledger,
                            ..*self
                        };
                        released += Box::pin(there.apply(freed)).await;
                    }
                    Err(error) => {
                        warn!(%error, parent = %end.parent_id, queue = %name,
                            "cannot free the dependants on another queue; its sweep will");
                    }
                }
            }
        }
        released
    }

    /// Sends (or cancels) what was freed, and what cancelling that frees in
    /// turn (on other queues too); returns the rows released.
    pub async fn apply(&self, mut freed: Vec<Freed>) -> usize {
        let mut released = 0;
        let mut foreign = Vec::new();
        while !freed.is_empty() {
            let mut done = Vec::with_capacity(freed.len());
            let mut next = Vec::new();
            for row in freed {
                let ended = match &row.cancelled {
                    None => {
                        let sent = self.send(&row).await;
                        released += usize::from(sent);
                        sent
                    }
                    Some(reason) => self
                        .cancel(&row, reason)
                        .await
                        .map(|more| {
                            next.extend(more.freed);
                            foreign.extend(more.foreign);
                        })
                        .is_some(),
                };
                if ended {
                    done.push(row);
                }
            }
            if let Err(error) = self.ledger.holds_done(done).await {
                // The rows stay as they are; the sweep takes them again.
                warn!(%error, "cannot mark released jobs in the ledger");
            }
            freed = next;
        }
        released + self.forward(foreign).await
    }

    /// One held message into the queue; false when the queue refused it
    /// (the sweep tries again).
    async fn send(&self, row: &Freed) -> bool {
        let sent = SEND_RETRY
            .retry(
                SEND_TRIES,
                "sending a released job",
                |_| true,
                || self.queue.send(&row.body),
            )
            .await;
        let delivery = held_delivery(&row.body);
        let subject = delivery.subject(self.queue.name());
        match sent {
            Ok(message_id) => {
                info!(job_id = %subject.job.job_id, %message_id, by = %row.by, "Held job released.");
                self.observer.job_event(
                    EventType::JobReleased,
                    &subject,
                    json!({"released_by": row.by}),
                );
                true
            }
            Err(error) => {
                warn!(%error, job_id = %subject.job.job_id, "cannot send a released job; the sweep will");
                false
            }
        }
    }

    /// Ends a held job as cancelled: counted for its array, announced, and
    /// its own dependants freed. `None` when the ledger could not be
    /// written (the sweep tries again).
    async fn cancel(&self, row: &Freed, reason: &str) -> Option<Ended> {
        let delivery = held_delivery(&row.body);
        let subject = delivery.subject(self.queue.name());
        let (id, size, indexes) = match &subject.job.array {
            Some(array) => (array.job_id.clone(), array.size, vec![array.index]),
            None => (delivery.message_id.clone(), 0, Vec::new()),
        };
        if size > 0 {
            match self
                .ledger
                .children_settled(&id, size, indexes.clone(), ChildState::Cancelled)
                .await
            {
                Ok(Some(counts)) => self.observer.array_completed(&subject, &id, counts),
                Ok(None) => {}
                Err(error) => {
                    warn!(%error, "cannot record a cancelled dependant");
                    return None;
                }
            }
        }
        info!(job_id = %subject.job.job_id, %reason, "Held job cancelled: its parent did not succeed.");
        self.observer
            .job_event(EventType::JobCancelled, &subject, json!({"reason": reason}));
        match self
            .ledger
            .units_ended(&id, size, indexes, ChildState::Cancelled)
            .await
        {
            Ok(more) => Some(more),
            Err(error) => {
                warn!(%error, "cannot free the dependants of a cancelled dependant");
                Some(Ended::default())
            }
        }
    }
}

/// A held message as a delivery, for its events: named as its message will
/// be once sent.
pub(crate) fn held_delivery(body: &str) -> Delivery {
    Delivery::new(Received {
        message_id: String::new(),
        receipt: String::new(),
        body: body.to_owned(),
        receive_count: 0,
    })
}

impl Worker {
    /// The reads of a job's release ([`Ledger::read_ends`]), once its end
    /// is recorded and before its message is settled; `None` when its
    /// queue keeps no ledger.
    pub(super) async fn read_release(
        &self,
        delivery: &Delivery,
        state: ChildState,
    ) -> Option<EndsRead> {
        let ledger = self.source(delivery).ledger.as_ref()?;
        let envelope = delivery.envelope.as_ref().ok()?;
        // A plain job's end is recorded by the spend, after its own.
        let (id, size, indexes) = match &envelope.array {
            Some(array) => (array.job_id.as_str(), array.size, vec![array.index]),
            None => (delivery.message_id.as_str(), 0, Vec::new()),
        };
        Some(ledger.read_ends(id, size, indexes, state).await)
    }

    /// After a job's end: frees (sends or cancels) its dependants, as
    /// [`Worker::read_release`] read them. A plain job's end is recorded
    /// for dependants to come.
    pub(super) async fn release_dependants(&self, delivery: &Delivery, read: EndsRead) {
        let source = self.source(delivery);
        let Some(ledger) = &source.ledger else {
            return;
        };
        // A spend from kept edges, then the full one it returns.
        let mut next = Some(read);
        while let Some(read) = next.take() {
            let freed = match ledger.spend_ends(read).await {
                Ok((freed, full)) => {
                    next = full;
                    freed
                }
                Err(error) => {
                    warn!(%error, "cannot free the job's dependants; the sweep will");
                    return;
                }
            };
            let frees = !freed.freed.is_empty() || freed.foreign.is_some();
            if frees && std::env::var_os(HALT_BEFORE_RELEASE).is_some() {
                warn!("{HALT_BEFORE_RELEASE}: halting before the release, as if dead");
                std::future::pending::<()>().await;
            }
            Releaser {
                queue: &source.queue,
                ledger,
                observer: &self.observer,
                reach: self.reach(),
            }
            .after_end(freed)
            .await;
        }
    }

    /// Sends what workers freed and died before sending, `grace` after.
    pub async fn sweep_holds(&self, grace: Duration) {
        for source in &self.sources {
            let Some(ledger) = &source.ledger else {
                continue;
            };
            match ledger.stale_holds(grace).await {
                Ok(freed) if freed.is_empty() => {}
                Ok(freed) => {
                    info!(
                        rows = freed.len(),
                        queue = source.queue.name(),
                        "Sweep: releasing what a worker left."
                    );
                    Releaser {
                        queue: &source.queue,
                        ledger,
                        observer: &self.observer,
                        reach: self.reach(),
                    }
                    .apply(freed)
                    .await;
                }
                Err(error) => warn!(%error, "cannot sweep held jobs"),
            }
        }
        self.sweep_foreign().await;
    }

    /// Releases the dependants (on every queue this process opens) of
    /// parents on other queues that ended while no settling worker reached
    /// the dependants' queue: each parent's ends read from its ledger, and
    /// spent here once, as a settle would.
    async fn sweep_foreign(&self) {
        let reach = self.reach();
        for (name, ledger) in reach.ledgers.iter() {
            let Some(queue) = reach.queues.get(name) else {
                continue;
            };
            let parents = match ledger.foreign_parents().await {
                Ok(parents) => parents,
                Err(error) => {
                    warn!(%error, queue = %name, "cannot sweep dependants of other queues' jobs");
                    continue;
                }
            };
            for parent in parents {
                let Some(parent_ledger) = reach.ledgers.get(&parent.queue) else {
                    warn!(parent = %parent.parent_id, queue = %parent.queue,
                        "a parent's queue this process does not open: its ends cannot be read here");
                    continue;
                };
                let ends = match parent_ledger
                    .unit_ends(&parent.parent_id, parent.units)
                    .await
                {
                    Ok(ends) if ends.is_empty() => continue,
                    Ok(ends) => ends,
                    Err(error) => {
                        warn!(%error, parent = %parent.parent_id, "cannot read a parent's ends");
                        continue;
                    }
                };
                match ledger.spend_foreign(&parent.parent_id, ends).await {
                    Ok(freed) if freed.is_empty() => {}
                    Ok(freed) => {
                        info!(rows = freed.len(), queue = %name, parent = %parent.parent_id,
                            "Sweep: releasing dependants of a parent on another queue.");
                        Releaser {
                            queue,
                            ledger,
                            observer: &self.observer,
                            reach,
                        }
                        .apply(freed)
                        .await;
                    }
                    Err(error) => warn!(%error, "cannot sweep held jobs"),
                }
            }
        }
    }
}
