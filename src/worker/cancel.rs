//! Cancels as a worker sees them: what the queue's ledger says was
//! cancelled, refreshed at most once a period however many jobs ask, and
//! at least once a period while jobs run.
//!
//! The embedded ledger's period is zero for receives (a refresh reads a
//! stamp file, and queries only after a cancel) and 250 ms for running
//! jobs; the S3 ledger's is the heartbeat interval, so a busy worker makes
//! at most one `HEAD` per interval, not one per message, and a running
//! job learns of its cancel within one interval.
//!
//! A job is checked when it is received (a cancelled one is deleted
//! unrun); while it runs or uploads it is told of every refresh that
//! found a new cancel.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::events::ledger::{KnownCancels, Ledger};

/// How often a running job on the embedded queue is checked: it is
/// stopped well within 2 s of its cancel.
const LOCAL_TICK: Duration = Duration::from_millis(250);

/// One queue's cancels.
#[derive(Debug)]
pub struct CancelWatch {
    ledger: Ledger,
    /// Longest a refresh is reused by a receive.
    refresh_every: Duration,
    /// Longest a refresh is reused while jobs run.
    tick: Duration,
    /// When `known` was last refreshed.
    known: Mutex<(Option<Instant>, KnownCancels)>,
    /// Bumped by every refresh that found something new.
    news: watch::Sender<u64>,
    /// Refreshes while jobs run; started by the first.
    refresher: OnceLock<()>,
}

impl CancelWatch {
    /// The watch on `ledger`; `heartbeat` is how often running jobs'
    /// visibility is extended.
    pub fn new(ledger: Ledger, heartbeat: Duration) -> Self {
        let (refresh_every, tick) = match ledger {
            Ledger::Local(_) => (Duration::ZERO, LOCAL_TICK.min(heartbeat)),
            Ledger::S3 { .. } => (heartbeat, heartbeat),
        };
        Self {
            ledger,
            refresh_every,
            tick,
            known: Mutex::new((None, KnownCancels::default())),
            news: watch::Sender::new(0),
            refresher: OnceLock::new(),
        }
    }

    /// Whether any of a job's ids (see `Delivery::cancel_ids`) was
    /// cancelled, as of at most `refresh_every` ago. A ledger that cannot
    /// be read cancels nothing.
    pub async fn is_cancelled(&self, ids: &[impl AsRef<str>]) -> bool {
        self.refresh(self.refresh_every).await;
        self.knows_of(ids).await
    }

    /// Whether the last refresh saw any of `ids` cancelled.
    async fn knows_of(&self, ids: &[impl AsRef<str>]) -> bool {
        let known = self.known.lock().await;
        ids.iter().any(|id| known.1.contains(id.as_ref()))
    }

    /// Refreshes what is known when it is older than `max_age`; tells
    /// running jobs when that found something new. Returns when it was
    /// last refreshed.
    async fn refresh(&self, max_age: Duration) -> Instant {
        let mut known = self.known.lock().await;
        let (refreshed, cancels) = &mut *known;
        match refreshed {
            Some(at) if at.elapsed() < max_age => return *at,
            _ => {}
        }
        let before = cancels.version().map(str::to_owned);
        if let Err(error) = self.ledger.refresh_cancelled(cancels).await {
            warn!(%error, "cannot read which jobs were cancelled");
        }
        if cancels.version() != before.as_deref() {
            self.news.send_modify(|n| *n += 1);
        }
        *refreshed.insert(Instant::now())
    }

    /// Waits until `ids` is cancelled: for a running job, which learns of
    /// it within one tick.
    pub async fn cancelled(self: &Arc<Self>, ids: &[String]) {
        let mut news = self.news.subscribe();
        self.refresher.get_or_init(|| {
            tokio::spawn(refresh_while_jobs_run(Arc::downgrade(self)));
        });
        loop {
            if self.knows_of(ids).await {
                return;
            }
            if news.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Refreshes a watch once a tick while any job waits on it; ends with the
/// watch.
async fn refresh_while_jobs_run(watch: Weak<CancelWatch>) {
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let Some(watch) = watch.upgrade() else {
            return;
        };
        next = if watch.news.receiver_count() == 0 {
            Instant::now() + watch.tick
        } else {
            watch.refresh(watch.tick).await + watch.tick
        };
    }
}
