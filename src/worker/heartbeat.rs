//! A running job's heartbeat: it keeps the job's message invisible by
//! extending its visibility every third of the timeout (leaving room for a
//! slow or failed extension), and it is how a running job learns that it
//! must stop:
//!
//! - told its job was cancelled (within one refresh of the queue's
//!   cancels), it sets `cancelled` and cuts the job short;
//! - refused an extension because the receipt went stale (the visibility
//!   lapsed and another worker received the message), it marks the job
//!   lost and cuts it short, so it does not run on beside the other copy.
//!
//! It is stopped, and an extension in flight waited for, before the job's
//! message is settled: a late extension would turn a retry's back-off into
//! a whole visibility timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, info, warn};

use super::cancel::CancelWatch;
use crate::events::observe::Observer;
use crate::queue::{Queue, QueueError};
use crate::worker::delivery::Delivery;

pub(super) struct Heartbeat {
    /// Stops the task when dropped.
    stop: DropGuard,
    task: JoinHandle<()>,
    /// Set when the receipt went stale.
    lost: CancellationToken,
}

impl Heartbeat {
    /// Starts the heartbeat of `delivery`, received from `queue`; `job`
    /// cuts the job short, `cancelled` says an operator did.
    pub(super) fn start(
        queue: &Queue,
        cancels: Option<Arc<CancelWatch>>,
        delivery: &Delivery,
        visibility: Duration,
        observer: Observer,
        (job, cancelled): (&CancellationToken, &CancellationToken),
    ) -> Self {
        let (queue, receipt) = (queue.clone(), delivery.received.receipt.clone());
        let extend_every = visibility / 3;
        let watch = cancels.map(|cancels| {
            let ids: Vec<String> = (delivery.cancel_ids().into_iter())
                .map(str::to_owned)
                .collect();
            (cancels, ids)
        });
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        let (job, cancelled, guard, lost_job) =
            (job.clone(), cancelled.clone(), stop.clone(), lost.clone());
        let task = tokio::spawn(
            async move {
                let told = async {
                    match &watch {
                        Some((cancels, ids)) => cancels.cancelled(ids).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(told);
                let mut next = Instant::now() + extend_every;
                loop {
                    tokio::select! {
                        _ = guard.cancelled() => return,
                        _ = &mut told, if !cancelled.is_cancelled() => {
                            info!("Job cancelled by an operator: stopping it.");
                            cancelled.cancel();
                            job.cancel();
                        }
                        _ = tokio::time::sleep_until(next), if !lost_job.is_cancelled() => {
                            next += extend_every;
                            let extended = queue.extend(&receipt, visibility).await;
                            observer.metrics().heartbeat(extended.is_ok());
                            match extended {
                                Ok(()) => tracing::debug!("visibility extended"),
                                Err(QueueError::StaleReceipt) => {
                                    warn!("Another worker holds the job's message now: stopping this copy.");
                                    lost_job.cancel();
                                    job.cancel();
                                }
                                Err(e) => warn!(error = %e, "heartbeat could not extend visibility"),
                            }
                        }
                    }
                }
            }
            .in_current_span(),
        );
        Self {
            stop: stop.drop_guard(),
            task,
            lost,
        }
    }

    /// Whether the receipt went stale: another worker runs the job now.
    pub(super) fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Stops it, waiting for an extension in flight.
    pub(super) async fn stop(self) {
        let Heartbeat { stop, task, .. } = self;
        drop(stop);
        let _ = task.await;
    }
}
