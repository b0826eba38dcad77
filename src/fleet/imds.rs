//! Watches the EC2 instance metadata service (IMDSv2, through aws-config's
//! client) for the notices that end an instance's life, and turns them into
//! a stop request: a spot interruption (`spot/instance-action`, with its
//! time) or an autoscaling termination (`autoscaling/target-lifecycle-state`
//! becoming `Terminated`).
//!
//! Off EC2 the first probe fails within a couple of seconds: one info line,
//! and no watcher. A notice that cannot be read (a malformed document, a
//! token the service refuses) is taken on the safe side: as a notice whose
//! deadline is now plus the stop margin.

use std::time::Duration;

use aws_config::imds::client::error::ImdsError;
use tokio::time::Instant;

use crate::config::ImdsSetting;
use crate::fleet::lifecycle::{Shutdown, StopReason};

/// The standard IMDS address.
const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// How often the notices are read.
const POLL: Duration = Duration::from_millis(500);

/// A notice read from IMDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    None,
    /// Stop by this long from now.
    Stop(StopReason, Duration),
}

/// A client with short timeouts (off EC2 it must give up quickly).
fn client(setting: &ImdsSetting) -> Option<aws_config::imds::Client> {
    let endpoint = match setting {
        ImdsSetting::Off => return None,
        ImdsSetting::Auto => DEFAULT_ENDPOINT.to_owned(),
        ImdsSetting::Url(url) => url.clone(),
    };
    match aws_config::imds::Client::builder().endpoint(&endpoint) {
        Ok(builder) => Some(
            builder
                .max_attempts(1)
                .connect_timeout(Duration::from_secs(1))
                .read_timeout(Duration::from_secs(1))
                .build(),
        ),
        Err(error) => {
            tracing::warn!(%error, %endpoint, "bad IMDS endpoint");
            None
        }
    }
}

/// This instance's id, when IMDS answers.
pub async fn instance_id(setting: &ImdsSetting) -> Option<String> {
    let client = client(setting)?;
    client
        .get("/latest/meta-data/instance-id")
        .await
        .ok()
        .map(|id| id.as_ref().to_owned())
}

/// Starts the watcher (unless off). It returns at once; the probe and the
/// polling run in the background until `shutdown`.
pub fn watch(setting: &ImdsSetting, shutdown: Shutdown, margin: Duration, drain: Duration) {
    let Some(client) = client(setting) else {
        return;
    };
    tokio::spawn(async move {
        match client.get("/latest/meta-data/instance-id").await {
            Ok(id) => tracing::info!(
                instance_id = id.as_ref(),
                "Watching instance metadata for spot and autoscaling notices."
            ),
            Err(error) => {
                tracing::info!(error = %crate::error_chain(&error), "Instance metadata unreachable (not on EC2?): not watching for spot or autoscaling notices.");
                return;
            }
        }
        let token = shutdown.token().clone();
        loop {
            match read_notice(&client, margin, drain).await {
                Notice::None => {}
                Notice::Stop(reason, left) => {
                    shutdown.request(reason, Instant::now() + left);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                // Keep watching after a stop: a later notice may bring the
                // deadline forward; but a signal's stop ends the watch.
                _ = token.cancelled(), if shutdown.stop().is_some_and(|s| matches!(s.reason, StopReason::Signal(_))) => return,
            }
        }
    });
}

/// Reads both notices; the nearer deadline wins.
async fn read_notice(
    client: &aws_config::imds::Client,
    margin: Duration,
    drain: Duration,
) -> Notice {
    let safe_side = |reason, what: &str, error: &dyn std::fmt::Display| {
        tracing::warn!(%error, "{what}: taken as a notice");
        Notice::Stop(reason, margin)
    };
    let spot = match client.get("/latest/meta-data/spot/instance-action").await {
        Ok(document) => match spot_deadline(document.as_ref()) {
            Ok(left) => Notice::Stop(StopReason::SpotInterruption, left),
            Err(error) => safe_side(
                StopReason::SpotInterruption,
                "unreadable spot instance-action",
                &error,
            ),
        },
        Err(error) => classify(error, StopReason::SpotInterruption, margin),
    };
    let scaling = match client
        .get("/latest/meta-data/autoscaling/target-lifecycle-state")
        .await
    {
        Ok(state) if state.as_ref().trim() == "Terminated" => {
            Notice::Stop(StopReason::AutoscalingTermination, drain)
        }
        Ok(_) => Notice::None,
        Err(error) => classify(error, StopReason::AutoscalingTermination, margin),
    };
    match (spot, scaling) {
        (Notice::Stop(r1, a), Notice::Stop(r2, b)) => {
            if a <= b {
                Notice::Stop(r1, a)
            } else {
                Notice::Stop(r2, b)
            }
        }
        (Notice::Stop(r, a), Notice::None) | (Notice::None, Notice::Stop(r, a)) => {
            Notice::Stop(r, a)
        }
        (Notice::None, Notice::None) => Notice::None,
    }
}

/// A 404 is "no notice"; a refused token is taken as one; anything else
/// (a timeout, a reset) is logged and read again next time.
fn classify(error: ImdsError, reason: StopReason, margin: Duration) -> Notice {
    match &error {
        ImdsError::ErrorResponse(response) if response.response().status().as_u16() == 404 => {
            Notice::None
        }
        ImdsError::FailedToLoadToken(_) => {
            tracing::warn!(error = %crate::error_chain(&error), "IMDS refused a token: taken as a notice");
            Notice::Stop(reason, margin)
        }
        _ => {
            tracing::warn!(error = %crate::error_chain(&error), "cannot read instance metadata");
            Notice::None
        }
    }
}

/// `{"action": "terminate", "time": "2026-11-26T08:00:00Z"}` → time left.
fn spot_deadline(document: &str) -> Result<Duration, String> {
    let value: serde_json::Value =
        serde_json::from_str(document).map_err(|e| format!("not JSON: {e}"))?;
    let time = value
        .get("time")
        .and_then(|t| t.as_str())
        .ok_or("no `time`")?;
    let at = chrono::DateTime::parse_from_rfc3339(time).map_err(|e| format!("`{time}`: {e}"))?;
    let left = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Ok(left.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        assert_eq!(ImdsSetting::parse("off"), Ok(ImdsSetting::Off));
        assert_eq!(ImdsSetting::parse("auto"), Ok(ImdsSetting::Auto));
        assert_eq!(
            ImdsSetting::parse("http://127.0.0.1:9/"),
            Ok(ImdsSetting::Url("http://127.0.0.1:9".into()))
        );
        assert!(ImdsSetting::parse("yes").is_err());
    }

    #[test]
    fn spot_documents_give_the_time_left() {
        let in_a_minute = (chrono::Utc::now() + chrono::Duration::seconds(60))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let left = spot_deadline(&format!(
            r#"{{"action":"terminate","time":"{in_a_minute}"}}"#
        ))
        .unwrap();
        assert!(
            left > Duration::from_secs(55) && left <= Duration::from_secs(60),
            "{left:?}"
        );
        assert_eq!(
            spot_deadline(r#"{"action":"stop","time":"2000-01-01T00:00:00Z"}"#),
            Ok(Duration::ZERO)
        );
        assert!(spot_deadline("garbage").is_err());
        assert!(spot_deadline(r#"{"action":"terminate"}"#).is_err());
    }
}
