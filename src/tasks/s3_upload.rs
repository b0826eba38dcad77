//! `s3_upload`: stores the result in a configured bucket under a templated key.

use std::time::Duration;

use serde::Deserialize;

use super::TaskError;
use crate::job::Output;
use crate::job::output::Body;
use crate::job::{Template, Vars, check_key, check_key_template};
use crate::retry::Backoff;
use crate::storage::{Buckets, StorageError};

/// How each upload is retried in place (beyond the SDK's own retries of
/// each call) before the job is given back: about 7 s in all.
const UPLOAD_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
const UPLOAD_TRIES: u32 = 4;

/// An `s3_upload` task's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Upload {
    /// A `[buckets.NAME]` from workers.toml.
    pub bucket: String,
    /// Object key template, e.g. `renders/${message_id}.${mime_ext}`.
    #[serde(deserialize_with = "key_template")]
    pub key: Template,
    /// Canned ACL, e.g. `public-read` (S3 only).
    #[serde(default)]
    pub acl: Option<String>,
    /// Overrides the result's own MIME type.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// A key template whose written-out parts already make a good key.
fn key_template<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Template, D::Error> {
    let template = Template::deserialize(d)?;
    check_key_template(&template).map_err(serde::de::Error::custom)?;
    Ok(template)
}

impl S3Upload {
    pub async fn run(
        &self,
        buckets: &Buckets,
        output: &Output,
        vars: &Vars<'_>,
    ) -> Result<String, TaskError> {
        let bucket = buckets
            .get(&self.bucket)
            .ok_or_else(|| TaskError::Permanent(format!("unknown bucket `{}`", self.bucket)))?;
        let key = self.key.render(vars);
        check_key(&key).map_err(TaskError::Permanent)?;
        let content_type = self
            .content_type
            .clone()
            .unwrap_or_else(|| output.mime.to_string());
        // One output of many failing once does not re-run the render; but
        // a file that changed under the upload is not sent again as it is
        // now (the job is tried again instead).
        let size = file_size(output);
        UPLOAD_RETRY
            .retry(
                UPLOAD_TRIES,
                "uploading an output",
                |e: &StorageError| !e.permanent && file_size(output) == size,
                || bucket.put(&key, output, &content_type, self.acl.as_deref()),
            )
            .await
            .map_err(|e| match e.permanent {
                true => TaskError::Permanent(e.to_string()),
                false => TaskError::Retryable(e.to_string()),
            })
    }
}

/// A file result's size now (`None` for one in memory, or one gone).
fn file_size(output: &Output) -> Option<u64> {
    match &output.body {
        Body::File(path) => std::fs::metadata(path).ok().map(|m| m.len()),
        Body::Bytes(_) => None,
    }
}
