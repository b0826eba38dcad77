//! Watches the EC2 instance metadata service (IMDSv2, through aws-config's
//! client) for the notices that end an instance's life, and turns them into
//! a stop request: a spot interruption (`spot/instance-action`, with its
//! time) or an autoscaling termination (`autoscaling/target-lifecycle-state`
//! becoming `Terminated`).
//!
//! Whether this is EC2 is known without the network, from the DMI data the
//! firmware gives (`sys_vendor` "Amazon EC2", or a `board_asset_tag` that
//! is an instance id), as the AWS SDKs and cloud-init tell. With
//! `imds = "auto"` off EC2, one probe that fails means no watcher (one info
//! line). On EC2, or with an explicit URL, the watcher never gives up: an
//! IMDS that is unreachable, slow or answering errors (at boot, say) is
//! read again with back-off, with one warning, until it answers.
//!
//! A notice that cannot be read (a malformed document, a token the service
//! explicitly refuses: 401 or 403 on the token `PUT`) is taken on the safe
//! side: as a notice whose deadline is now plus the stop margin. A token
//! that could not be fetched (a timeout, a refused connection, a 5xx) is
//! not a notice: it is read again.

use std::path::PathBuf;
use std::time::Duration;

use aws_config::imds::client::error::ImdsError;
use tokio::time::Instant;

use crate::config::ImdsSetting;
use crate::fleet::lifecycle::{Shutdown, StopReason};
use crate::retry::Backoff;

/// How often the notices are read.
const POLL: Duration = Duration::from_millis(500);

/// A notice read from IMDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    None,
    /// Stop by this long from now.
    Stop(StopReason, Duration),
}

/// Where the firmware's DMI data is (a test points it elsewhere).
const DMI_DIR: &str = "/sys/devices/virtual/dmi/id";
/// The environment variable that overrides where the DMI data is read
/// (`/sys/devices/virtual/dmi/id`), for tests.
pub const DMI_DIR_ENV: &str = "RENDERQ_DMI_DIR";
/// The waits between reads while IMDS does not answer.
const RETRY: Backoff = Backoff::new(POLL, Duration::from_secs(5));

/// Whether this machine is an EC2 instance, by its DMI data.
pub fn on_ec2() -> bool {
    is_ec2(&std::env::var_os(DMI_DIR_ENV).map_or_else(|| DMI_DIR.into(), PathBuf::from))
}

/// Whether the DMI data in `dir` is an EC2 instance's.
fn is_ec2(dir: &std::path::Path) -> bool {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    read("sys_vendor").trim() == "Amazon EC2" || read("board_asset_tag").trim().starts_with("i-")
}

/// A client with short timeouts (off EC2 it must give up quickly). With
/// `auto`, its endpoint is aws-config's (the standard address, unless
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT` says otherwise).
fn client(setting: &ImdsSetting) -> Option<aws_config::imds::Client> {
    let builder = aws_config::imds::Client::builder();
    let builder = match setting {
        ImdsSetting::Off => return None,
        ImdsSetting::Auto => builder,
        ImdsSetting::Url(url) => match builder.endpoint(url) {
            Ok(builder) => builder,
            Err(error) => {
                tracing::warn!(%error, endpoint = %url, "bad IMDS endpoint");
                return None;
            }
        },
    };
    Some(
        builder
            .max_attempts(1)
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(1))
            .build(),
    )
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

/// This instance's type and lifecycle (spot or on-demand), for the
/// `usage` of job events; empty off EC2 (with `auto`) or when IMDS does
/// not answer.
pub async fn instance(setting: &ImdsSetting) -> crate::job::usage::Instance {
    let mut instance = crate::job::usage::Instance::default();
    if *setting == ImdsSetting::Auto && !on_ec2() {
        return instance;
    }
    let Some(client) = client(setting) else {
        return instance;
    };
    let read = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(path)
                .await
                .ok()
                .map(|text| text.as_ref().trim().to_owned())
        }
    };
    instance.instance_type = read("/latest/meta-data/instance-type").await;
    instance.lifecycle = read("/latest/meta-data/instance-life-cycle")
        .await
        .and_then(|text| text.parse().ok());
    instance
}

/// How long a notice leaves the worker.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A notice that cannot be read: due now plus this.
    pub margin: Duration,
    /// An autoscaling termination: due in this (`drain_timeout`).
    pub drain: Duration,
    /// A rebalance recommendation: due in this (`max_runtime`, so that
    /// running jobs finish); `None`: not read.
    pub rebalance: Option<Duration>,
}

impl Deadlines {
    pub fn from_config(worker: &crate::config::WorkerConfig) -> Self {
        Self {
            margin: worker.stop_margin,
            drain: worker.drain_timeout,
            rebalance: (worker.rebalance == crate::config::Rebalance::FinishCurrent)
                .then_some(worker.max_runtime),
        }
    }
}

/// Starts the watcher (unless off). It returns at once; the polling runs
/// in the background until `shutdown`.
pub fn watch(setting: &ImdsSetting, shutdown: Shutdown, deadlines: Deadlines) {
    let Some(client) = client(setting) else {
        return;
    };
    let keep_trying = *setting != ImdsSetting::Auto || on_ec2();
    tokio::spawn(async move {
        if !keep_trying && let Err(error) = client.get("/latest/meta-data/instance-id").await {
            tracing::info!(error = %crate::error_chain(&error), "Instance metadata unreachable and not on EC2: not watching for spot or autoscaling notices.");
            return;
        }
        let token = shutdown.token().clone();
        // Consecutive reads that got no answer; 0 once one did.
        let mut failures = 0;
        let mut watching = false;
        loop {
            let wait = match read_notice(&client, deadlines).await {
                Ok(notice) => {
                    if !std::mem::replace(&mut watching, true) {
                        tracing::info!(
                            "Watching instance metadata for spot and autoscaling notices."
                        );
                    } else if failures > 0 {
                        tracing::info!(failures, "Instance metadata answers again.");
                    }
                    failures = 0;
                    if let Notice::Stop(reason, left) = notice {
                        shutdown.request(reason, Instant::now() + left);
                    }
                    POLL
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(%error, "Instance metadata not answering; reading it again with back-off.");
                    }
                    RETRY.delay(failures)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Keep watching after a stop: a later notice may bring the
                // deadline forward; but a signal's stop ends the watch.
                _ = token.cancelled(), if shutdown.stop().is_some_and(|s| matches!(s.reason, StopReason::Signal(_))) => return,
            }
        }
    });
}

/// Reads the notices; the nearer deadline wins. `Err` (the error as one
/// line): IMDS did not answer (unreachable, too slow, a token it could not
/// give, an error status), to be read again.
async fn read_notice(
    client: &aws_config::imds::Client,
    deadlines: Deadlines,
) -> Result<Notice, String> {
    let Deadlines {
        margin,
        drain,
        rebalance,
    } = deadlines;
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
        Err(error) => classify(error, StopReason::SpotInterruption, margin)?,
    };
    let scaling = match client
        .get("/latest/meta-data/autoscaling/target-lifecycle-state")
        .await
    {
        Ok(state) if state.as_ref().trim() == "Terminated" => {
            Notice::Stop(StopReason::AutoscalingTermination, drain)
        }
        Ok(_) => Notice::None,
        Err(error) => classify(error, StopReason::AutoscalingTermination, margin)?,
    };
    let rebalance = match rebalance {
        None => Notice::None,
        Some(left) => match client
            .get("/latest/meta-data/events/recommendations/rebalance")
            .await
        {
            // `{"noticeTime": ...}`: its content does not matter.
            Ok(_) => Notice::Stop(StopReason::RebalanceRecommendation, left),
            Err(error) => classify(error, StopReason::RebalanceRecommendation, margin)?,
        },
    };
    Ok(spot.nearer(scaling).nearer(rebalance))
}

impl Notice {
    /// The one with the nearer deadline.
    fn nearer(self, other: Notice) -> Notice {
        match (self, other) {
            (Notice::Stop(_, a), Notice::Stop(_, b)) if b < a => other,
            (Notice::None, _) => other,
            _ => self,
        }
    }
}

/// A 404 is "no notice"; a token the service refused (401, 403) is taken
/// as one; anything else is no answer (`Err`, the error as one line).
fn classify(error: ImdsError, reason: StopReason, margin: Duration) -> Result<Notice, String> {
    match &error {
        ImdsError::ErrorResponse(response) if response.response().status().as_u16() == 404 => {
            Ok(Notice::None)
        }
        ImdsError::FailedToLoadToken(_) if token_refused(&error) => {
            tracing::warn!(error = %crate::error_chain(&error), "IMDS refused a token: taken as a notice");
            Ok(Notice::Stop(reason, margin))
        }
        _ => Err(crate::error_chain(&error)),
    }
}

/// Whether the token `PUT` was answered 401 or 403 (not a timeout, a
/// refused connection or a server error).
fn token_refused(error: &ImdsError) -> bool {
    use aws_config::imds::client::error::TokenError;
    use aws_sdk_sqs::config::http::HttpResponse;
    use aws_sdk_sqs::error::SdkError;
    let failed = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<SdkError<TokenError, HttpResponse>>());
    matches!(
        failed
            .and_then(SdkError::raw_response)
            .map(|r| r.status().as_u16()),
        Some(401 | 403)
    )
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
    fn ec2_is_told_by_its_dmi_data() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_ec2(dir.path()), "no DMI data");
        std::fs::write(dir.path().join("sys_vendor"), "QEMU\n").unwrap();
        assert!(!is_ec2(dir.path()));
        std::fs::write(dir.path().join("board_asset_tag"), "i-0123456789abcdef0\n").unwrap();
        assert!(is_ec2(dir.path()), "a Nitro instance's asset tag");
        std::fs::remove_file(dir.path().join("board_asset_tag")).unwrap();
        std::fs::write(dir.path().join("sys_vendor"), "Amazon EC2\n").unwrap();
        assert!(is_ec2(dir.path()));
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
