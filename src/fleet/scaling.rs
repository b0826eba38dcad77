//! Working with the autoscaling group: scale-in protection while the
//! worker is busy (so a scale-in picks idle instances), and the termination
//! lifecycle hook while it drains (heartbeats, then "continue" when done).
//!
//! Protection is turned on when the first job starts and off after
//! `idle_before_unprotect` without one: one call per change, never one per
//! job. A worker sets it to the truth when it starts (one that restarted
//! while busy must not leave an idle instance protected) and turns it off
//! when it stops. A failed call is tried again after the back-off policy's
//! delay, not at once: across a fleet of hundreds a failing API would
//! otherwise take hundreds of calls a second.

use std::time::Duration;

use aws_sdk_autoscaling::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ScalingConfig;
use crate::fleet::drain::RunningJobs;
use crate::retry::Backoff;

/// How often the busy state is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Waits after a failed protection call.
const CALL_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));

/// Tries at marking a sick worker's instance unhealthy.
const UNHEALTHY_TRIES: u32 = 5;

#[derive(Debug, Clone)]
pub struct Scaling {
    client: Client,
    config: ScalingConfig,
    instance_id: String,
}

impl Scaling {
    pub async fn connect(config: &ScalingConfig, instance_id: String) -> Self {
        let sdk =
            crate::aws::sdk_config(config.region.as_deref(), config.endpoint_url.as_deref()).await;
        Self {
            client: Client::new(&sdk),
            config: config.clone(),
            instance_id,
        }
    }

    async fn set_protection(&self, on: bool) -> Result<(), String> {
        self.client
            .set_instance_protection()
            .auto_scaling_group_name(&self.config.group)
            .instance_ids(&self.instance_id)
            .protected_from_scale_in(on)
            .send()
            .await
            .map(drop)
            .map_err(|e| crate::aws::describe(&e))
    }

    /// Keeps scale-in protection on while `running` has jobs (and for
    /// `idle_before_unprotect` after), until `stop`; then turns it off.
    pub async fn protect_while_busy(&self, running: &RunningJobs, stop: CancellationToken) {
        if !self.config.protect_when_busy {
            return;
        }
        // Unknown until the first call: whatever a previous process left.
        let mut protected: Option<bool> = None;
        let mut idle_since = Instant::now();
        let (mut failures, mut next_call) = (0, Instant::now());
        while !stop.is_cancelled() {
            let busy = !running.is_empty();
            if busy {
                idle_since = Instant::now();
            }
            let want = busy
                || (protected == Some(true)
                    && idle_since.elapsed() < self.config.idle_before_unprotect);
            if protected != Some(want) && Instant::now() >= next_call {
                match self.set_protection(want).await {
                    Ok(()) => {
                        let at_start = protected.is_none();
                        (protected, failures) = (Some(want), 0);
                        if at_start {
                            tracing::info!(instance_id = %self.instance_id, protected = want, "Scale-in protection set.");
                        } else {
                            tracing::info!(instance_id = %self.instance_id, protected = want, "Scale-in protection changed.");
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        let delay = CALL_BACKOFF.delay(failures);
                        next_call = Instant::now() + delay;
                        tracing::warn!(%error, retry_in = ?delay, "cannot change scale-in protection");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY) => {}
                _ = stop.cancelled() => {}
            }
        }
        // Stopping: nothing of this process runs any more.
        if protected != Some(false) {
            match self.set_protection(false).await {
                Ok(()) => {
                    tracing::info!(instance_id = %self.instance_id, "Scale-in protection turned off: the worker stopped.")
                }
                Err(error) => tracing::warn!(%error, "cannot turn scale-in protection off"),
            }
        }
    }

    /// Tells the group this instance is unhealthy, so that it replaces it
    /// (the worker takes no more jobs); tried a few times with back-off.
    pub async fn mark_unhealthy(&self) {
        for failures in 1..=UNHEALTHY_TRIES {
            let marked = self
                .client
                .set_instance_health()
                .instance_id(&self.instance_id)
                .health_status("Unhealthy")
                .should_respect_grace_period(false)
                .send()
                .await;
            match marked {
                Ok(_) => {
                    tracing::info!(instance_id = %self.instance_id, "Instance marked unhealthy: the group replaces it.");
                    return;
                }
                Err(error) => {
                    let delay = CALL_BACKOFF.delay(failures);
                    tracing::warn!(error = %crate::aws::describe(&error), retry_in = ?delay, "cannot mark the instance unhealthy");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// While the worker drains for a termination, tells the lifecycle hook
    /// it is still working, every `hook_heartbeat`, until `done`.
    pub async fn heartbeat_hook(&self, done: CancellationToken) {
        let Some(hook) = &self.config.lifecycle_hook else {
            return;
        };
        while !done.is_cancelled() {
            let heartbeat = self
                .client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(&self.config.group)
                .lifecycle_hook_name(hook)
                .instance_id(&self.instance_id)
                .send();
            // A heartbeat still on its way when the drain ends is dropped:
            // it could reach the group after the action was completed.
            tokio::select! {
                sent = heartbeat => {
                    if let Err(error) = sent {
                        tracing::warn!(error = %crate::aws::describe(&error), "lifecycle heartbeat failed");
                    }
                }
                _ = done.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.hook_heartbeat) => {}
                _ = done.cancelled() => return,
            }
        }
    }

    /// The drain is over: the group may terminate the instance now.
    pub async fn complete_hook(&self) {
        let Some(hook) = &self.config.lifecycle_hook else {
            return;
        };
        let completed = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&self.config.group)
            .lifecycle_hook_name(hook)
            .instance_id(&self.instance_id)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await;
        match completed {
            Ok(_) => tracing::info!(hook = %hook, "Lifecycle action completed."),
            Err(error) => {
                tracing::warn!(error = %crate::aws::describe(&error), "cannot complete the lifecycle action")
            }
        }
    }
}
