//! Amazon S3 (or an S3-compatible server) as a bucket.
//!
//! Results in memory go up in one `PutObject`. File results below the
//! multipart threshold are streamed from disk in one `PutObject`; larger
//! ones go up as a multipart upload, each part streamed from its offset in
//! the file, so memory stays at about one part whatever the file's size. A
//! multipart upload that fails is aborted: nothing appears under the key
//! and no upload is left open.

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ObjectCannedAcl};

use crate::config::S3BucketConfig;
use crate::job::{Body, Output};

/// A failed S3 call: what went wrong, and whether another try can help.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    /// The bucket refuses this for good (missing, no access).
    pub permanent: bool,
}

/// Bytes read from a result file at a time while a part streams.
const READ_BUFFER: usize = 128 * 1024;

/// S3 error codes that no retry will change.
const PERMANENT_CODES: [&str; 6] = [
    "AccessDenied",
    "NoSuchBucket",
    "InvalidBucketName",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
];

impl Failure {
    fn sdk<E, R>(context: String, error: &SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        Self {
            message: format!("{context}: {}", crate::aws::describe(error)),
            permanent: error.code().is_some_and(|c| PERMANENT_CODES.contains(&c)),
        }
    }
}

/// Local trouble (reading the result file): worth another try.
impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            permanent: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Bucket {
    /// The bucket's name in the config, for errors.
    name: String,
    client: Client,
    bucket: String,
    /// What the bucket is, whatever the config calls it: endpoint, region
    /// and bucket name (see [`super::Bucket::identity`]).
    identity: String,
    multipart_threshold: u64,
    part_size: u64,
    /// Parts in flight at once.
    upload_concurrency: usize,
}

impl S3Bucket {
    pub async fn open(name: &str, config: &S3BucketConfig) -> Self {
        let sdk =
            crate::aws::sdk_config(config.region.as_deref(), config.endpoint_url.as_deref()).await;
        let client = Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                // Compatible servers are addressed by path, not by subdomain.
                .force_path_style(config.endpoint_url.is_some())
                // Checksums only where S3 requires them: compatible servers
                // differ in which trailing-checksum forms they accept.
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .build(),
        );
        let identity = format!(
            "s3 endpoint={} region={} bucket={}",
            config
                .endpoint_url
                .as_deref()
                .map_or("aws", |url| url.trim_end_matches('/')),
            sdk.region().map_or("", |r| r.as_ref()),
            config.bucket
        );
        Self {
            name: name.to_owned(),
            client,
            bucket: config.bucket.clone(),
            identity,
            multipart_threshold: config.multipart_threshold,
            part_size: config.part_size,
            upload_concurrency: config.upload_concurrency.max(1),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The client and the S3 bucket's own name (for the ledger).
    pub fn client(&self) -> (&Client, &str) {
        (&self.client, &self.bucket)
    }

    /// Checks that the bucket exists and the credentials reach it.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(drop)
            .map_err(|e| format!("s3://{}: {}", self.bucket, crate::aws::describe(&e)))
    }

    pub async fn put(
        &self,
        key: &str,
        output: &Output,
        content_type: &str,
        acl: Option<&str>,
    ) -> Result<String, Failure> {
        let acl = acl.map(ObjectCannedAcl::from);
        match &output.body {
            Body::Bytes(bytes) => {
                self.put_whole(key, ByteStream::from(bytes.clone()), content_type, acl)
                    .await?
            }
            Body::File(path) => {
                let size = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .len();
                if size < self.multipart_threshold {
                    let body = ByteStream::from_path(path)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    self.put_whole(key, body, content_type, acl).await?
                } else {
                    self.put_multipart(key, path, size, content_type, acl)
                        .await?
                }
            }
        }
        Ok(format!("s3://{}/{key}", self.bucket))
    }

    async fn put_whole(
        &self,
        key: &str,
        body: ByteStream,
        content_type: &str,
        acl: Option<ObjectCannedAcl>,
    ) -> Result<(), Failure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_acl(acl)
            .body(body)
            .send()
            .await
            .map(drop)
            .map_err(|e| Failure::sdk(format!("PutObject {key}"), &e))
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        content_type: &str,
        acl: Option<ObjectCannedAcl>,
    ) -> Result<(), Failure> {
        let upload_id = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_acl(acl)
            .send()
            .await
            .map_err(|e| Failure::sdk(format!("CreateMultipartUpload {key}"), &e))?
            .upload_id
            .ok_or_else(|| {
                Failure::from("CreateMultipartUpload returned no upload id".to_owned())
            })?;
        let mut open = OpenUpload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: Some(upload_id.clone()),
        };
        let completed = match self.upload_parts(key, path, size, &upload_id).await {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(drop)
                .map_err(|e| Failure::sdk(format!("CompleteMultipartUpload {key}"), &e)),
            Err(e) => Err(e),
        };
        match &completed {
            Ok(()) => open.upload_id = None,
            Err(error) => open.abort(&error.message).await,
        }
        completed
    }

    /// Uploads the file's parts, `upload_concurrency` at a time, each
    /// streamed from its offset; returns them in part order.
    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, Failure> {
        let mut uploads = tokio::task::JoinSet::new();
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 0;
        while offset < size || !uploads.is_empty() {
            // Keep the window full, then wait for one to finish.
            while offset < size && uploads.len() < self.upload_concurrency {
                let length = self.part_size.min(size - offset);
                number += 1;
                uploads.spawn(self.clone().upload_part(
                    key.to_owned(),
                    path.to_owned(),
                    upload_id.to_owned(),
                    number,
                    offset,
                    length,
                ));
                offset += length;
            }
            if let Some(done) = uploads.join_next().await {
                // A failed part ends the upload; dropping the set cancels
                // the others, and the caller aborts the upload.
                let part = done.map_err(|e| Failure::from(format!("upload task: {e}")))??;
                parts.push(part);
            }
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    async fn upload_part(
        self,
        key: String,
        path: std::path::PathBuf,
        upload_id: String,
        number: i32,
        offset: u64,
        length: u64,
    ) -> Result<CompletedPart, Failure> {
        let body = ByteStream::read_from()
            .path(&path)
            // The default 4 KiB reads make every part 2,048 small writes.
            .buffer_size(READ_BUFFER)
            .offset(offset)
            .length(Length::Exact(length))
            .build()
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let etag = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(&upload_id)
            .part_number(number)
            .content_length(length as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::sdk(format!("UploadPart {number} of {key}"), &e))?
            .e_tag;
        Ok(CompletedPart::builder()
            .set_e_tag(etag)
            .part_number(number)
            .build())
    }
}

/// A multipart upload that is not yet completed. It is aborted on failure,
/// and also (in the background) if the upload is abandoned half way, e.g.
/// when a shutdown cuts the task short.
struct OpenUpload {
    client: Client,
    bucket: String,
    key: String,
    /// `None` once completed or aborted.
    upload_id: Option<String>,
}

impl OpenUpload {
    fn request(
        &self,
        upload_id: &str,
    ) -> aws_sdk_s3::operation::abort_multipart_upload::builders::AbortMultipartUploadFluentBuilder
    {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
    }

    async fn abort(&mut self, error: &str) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        if let Err(abort_error) = self.request(&upload_id).send().await {
            tracing::error!(%error, abort_error = %crate::aws::describe(&abort_error), %upload_id,
                "multipart upload failed and could not be aborted");
        }
    }
}

impl Drop for OpenUpload {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let request = self.request(&upload_id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = request.send().await {
                    tracing::warn!(error = %crate::aws::describe(&e), %upload_id,
                        "abandoned multipart upload could not be aborted");
                }
            });
        }
    }
}
