//! Cancels as a worker sees them: what the queue's ledger says was
//! cancelled, read at most once a period however many jobs ask (on SQS
//! the period is the heartbeat's, so a busy worker makes at most one
//! `HEAD` per heartbeat interval, not one per message).
//!
//! A job is checked when it is received (a cancelled one is deleted
//! unrun) and at every tick of its heartbeat while it runs or uploads.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;

use crate::events::ledger::{KnownCancels, Ledger};
use crate::job::Envelope;

/// How often the embedded queue's ledger is read: a running job is
/// stopped well within 2 s of its cancel.
const LOCAL_PERIOD: Duration = Duration::from_millis(250);

/// One queue's cancels.
#[derive(Debug)]
pub struct CancelWatch {
    ledger: Ledger,
    /// Longest a refresh is reused.
    pub period: Duration,
    /// When `known` was last refreshed.
    known: Mutex<(Option<Instant>, KnownCancels)>,
}

impl CancelWatch {
    /// The watch on `ledger`; `heartbeat` is how often running jobs'
    /// visibility is extended.
    pub fn new(ledger: Ledger, heartbeat: Duration) -> Self {
        let period = match ledger {
            Ledger::Local(_) => LOCAL_PERIOD.min(heartbeat),
            Ledger::S3 { .. } => heartbeat,
        };
        Self {
            ledger,
            period,
            known: Mutex::new((None, KnownCancels::default())),
        }
    }

    /// Whether the job, or its array, was cancelled (as of at most one
    /// period ago). A ledger that cannot be read cancels nothing.
    pub async fn is_cancelled(&self, envelope: &Envelope) -> bool {
        let mut known = self.known.lock().await;
        let (refreshed, cancels) = &mut *known;
        if refreshed.is_none_or(|at| at.elapsed() >= self.period) {
            if let Err(error) = self.ledger.refresh_cancelled(cancels).await {
                warn!(%error, "cannot read which jobs were cancelled");
            }
            *refreshed = Some(Instant::now());
        }
        cancels.contains(&envelope.job_id)
            || (envelope.array.as_ref()).is_some_and(|a| cancels.contains(&a.job_id))
    }
}
