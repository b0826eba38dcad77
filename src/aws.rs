//! Shared AWS SDK set-up: region, optional endpoint (for SQS/S3-compatible
//! servers), the standard credential chain, and timeouts.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

/// SDK config from the standard chain (environment, profile, instance
/// role), with the region and endpoint the config file gives, if any.
pub async fn sdk_config(region: Option<&str>, endpoint_url: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// Timeouts for one operation: connecting must be quick; the whole call may
/// take up to `operation` (a long poll needs more than its wait).
pub fn timeouts(operation: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_timeout(operation)
        .build()
}

/// An SDK error as one line: the service's code and message when it sent
/// one, else the whole chain of causes (connection refused, no credentials).
pub fn describe<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => crate::error_chain(error),
    }
}
