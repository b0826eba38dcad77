//! Object storage: where `s3_upload` puts results, and where job inputs
//! come from ([`download`]); [`cache`] keeps inputs between jobs.

pub mod cache;
pub mod download;
mod local;
mod s3;

use std::collections::BTreeMap;

use crate::config::BucketConfig;
use crate::job::Output;
pub use local::LocalBucket;
pub use s3::S3Bucket;

/// A write that failed.
#[derive(Debug, thiserror::Error)]
#[error("bucket `{bucket}`: {message}")]
pub struct StorageError {
    pub bucket: String,
    pub message: String,
    /// No retry can help (no such bucket, access denied).
    pub permanent: bool,
}

/// One configured bucket.
#[derive(Debug, Clone)]
pub enum Bucket {
    Local(LocalBucket),
    S3(S3Bucket),
}

impl Bucket {
    pub async fn open(name: &str, config: &BucketConfig) -> Self {
        match config {
            BucketConfig::Local(c) => Bucket::Local(LocalBucket::open(name, &c.path)),
            BucketConfig::S3(c) => Bucket::S3(S3Bucket::open(name, c).await),
        }
    }

    /// What the bucket is, whatever `workers.toml` calls it: for S3 its
    /// endpoint, region and bucket name; for a folder, its canonical path.
    /// The input cache shares a blob only between jobs that read buckets of
    /// one identity.
    pub fn identity(&self) -> String {
        match self {
            Bucket::Local(b) => {
                let root = b.path_of("");
                let root = std::fs::canonicalize(&root).unwrap_or(root);
                format!("local path={}", root.display())
            }
            Bucket::S3(b) => b.identity().to_owned(),
        }
    }

    /// Checks that the bucket can be reached (for `check-config` and start-up).
    pub async fn check(&self) -> Result<(), String> {
        match self {
            Bucket::Local(_) => Ok(()),
            Bucket::S3(b) => b.check().await,
        }
    }

    /// Stores `output` under `key` (already checked with `job::check_key`),
    /// replacing any object there; readers never see a partial object.
    /// Returns the object's URL (`file://…`, `s3://…`).
    pub async fn put(
        &self,
        key: &str,
        output: &Output,
        content_type: &str,
        acl: Option<&str>,
    ) -> Result<String, StorageError> {
        match self {
            // A folder has no ACLs; the setting matters only on S3.
            Bucket::Local(b) => b.put(key, output, content_type).await,
            Bucket::S3(b) => b
                .put(key, output, content_type, acl)
                .await
                .map_err(|failure| StorageError {
                    bucket: b.name().to_owned(),
                    message: failure.message,
                    permanent: failure.permanent,
                }),
        }
    }
}

/// Every configured bucket, by name.
#[derive(Debug, Clone, Default)]
pub struct Buckets(BTreeMap<String, Bucket>);

impl Buckets {
    /// Opens and checks every bucket; an unreachable one is an error that
    /// names it.
    pub async fn open(configs: &BTreeMap<String, BucketConfig>) -> anyhow::Result<Self> {
        let mut buckets = BTreeMap::new();
        for (name, config) in configs {
            let bucket = Bucket::open(name, config).await;
            bucket
                .check()
                .await
                .map_err(|e| anyhow::anyhow!("bucket `{name}`: {e}"))?;
            buckets.insert(name.clone(), bucket);
        }
        Ok(Self(buckets))
    }

    pub fn get(&self, name: &str) -> Option<&Bucket> {
        self.0.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
