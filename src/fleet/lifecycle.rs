//! Process lifecycle: why a process stops and by when, as one value that
//! signals and the instance watchers ([`crate::fleet::imds`]) feed and the worker
//! drains to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the process is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT or SIGTERM.
    Signal(&'static str),
    /// The spot instance has an interruption notice.
    SpotInterruption,
    /// The autoscaling group is terminating the instance.
    AutoscalingTermination,
    /// EC2 recommends moving off this spot instance (`rebalance =
    /// "finish-current"`): no new jobs; the running ones finish.
    RebalanceRecommendation,
    /// The endpoint of `serve` failed.
    EndpointFailed,
}

impl StopReason {
    /// An instance notice with a deadline to meet: jobs that cannot make
    /// it are handed back early. Any other stop lets them run to it.
    pub fn is_notice(self) -> bool {
        matches!(
            self,
            StopReason::SpotInterruption | StopReason::AutoscalingTermination
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            StopReason::Signal(name) => name,
            StopReason::SpotInterruption => "spot interruption",
            StopReason::AutoscalingTermination => "autoscaling termination",
            StopReason::RebalanceRecommendation => "rebalance recommendation",
            StopReason::EndpointFailed => "endpoint failed",
        }
    }
}

/// A request to stop: its reason and the moment the process must be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    pub reason: StopReason,
    pub deadline: Instant,
}

/// The one shutdown handle, shared by everything that can ask for a stop
/// and everything that must react. The first request cancels
/// [`Shutdown::token`]; a later one can only bring the deadline forward.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    stop: Arc<Mutex<Option<Stop>>>,
    /// Wakes the drain when the deadline moves.
    changed: Arc<tokio::sync::Notify>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a stop by `deadline`. Returns true if this changed anything.
    pub fn request(&self, reason: StopReason, deadline: Instant) -> bool {
        let mut stop = self.stop.lock().expect("shutdown lock");
        let changed = match *stop {
            Some(current) if current.deadline <= deadline => false,
            Some(current) => {
                // Keep the first reason; only the deadline comes forward.
                *stop = Some(Stop {
                    deadline,
                    ..current
                });
                true
            }
            None => {
                *stop = Some(Stop { reason, deadline });
                true
            }
        };
        drop(stop);
        if changed {
            tracing::info!(
                reason = reason.name(),
                in_s = deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
                "Stop requested."
            );
            self.token.cancel();
            self.changed.notify_waiters();
        }
        changed
    }

    /// Cancelled by the first request: stop taking work.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The current request, if any.
    pub fn stop(&self) -> Option<Stop> {
        *self.stop.lock().expect("shutdown lock")
    }

    /// Waits until the deadline moves (or a first request arrives).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Turns the first SIGINT or SIGTERM into a stop with `drain` to finish
/// running jobs. A second signal kills what running commands started and
/// exits at once, for an operator who will not wait.
pub fn stop_on_signal(shutdown: Shutdown, drain: Duration) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for round in 0..2 {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if round == 0 {
                tracing::info!(signal = name, "Shutting down: finishing running jobs.");
                shutdown.request(StopReason::Signal(name), Instant::now() + drain);
            } else {
                let killed = crate::workspace::kill_own_groups();
                tracing::warn!(
                    signal = name,
                    killed,
                    "Second signal: killed running commands, exiting now."
                );
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn later_requests_only_bring_the_deadline_forward() {
        let shutdown = Shutdown::new();
        let now = Instant::now();
        assert!(shutdown.stop().is_none());
        assert!(shutdown.request(StopReason::Signal("SIGTERM"), now + Duration::from_secs(30)));
        assert!(shutdown.token().is_cancelled());
        assert!(!shutdown.request(StopReason::SpotInterruption, now + Duration::from_secs(60)));
        assert!(shutdown.request(StopReason::SpotInterruption, now + Duration::from_secs(10)));
        let stop = shutdown.stop().unwrap();
        assert_eq!(stop.reason, StopReason::Signal("SIGTERM"));
        assert_eq!(stop.deadline, now + Duration::from_secs(10));
    }
}
