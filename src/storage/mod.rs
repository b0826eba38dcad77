//! Object storage for results: where `s3_upload` puts them.

mod local;

use std::collections::BTreeMap;

use crate::commands::Output;
use crate::config::BucketConfig;
pub use local::LocalBucket;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("bucket `{bucket}`: {message}")]
    Write { bucket: String, message: String },
}

/// One configured bucket.
#[derive(Debug, Clone)]
pub enum Bucket {
    Local(LocalBucket),
}

impl Bucket {
    pub fn open(name: &str, config: &BucketConfig) -> Self {
        match config {
            BucketConfig::Local(c) => Bucket::Local(LocalBucket::new(name, &c.path)),
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
            Bucket::Local(b) => {
                let _ = acl;
                b.put(key, output, content_type).await
            }
        }
    }
}

/// Every configured bucket, by name.
#[derive(Debug, Clone, Default)]
pub struct Buckets(BTreeMap<String, Bucket>);

impl Buckets {
    pub fn open(configs: &BTreeMap<String, BucketConfig>) -> Self {
        Self(
            configs
                .iter()
                .map(|(name, c)| (name.clone(), Bucket::open(name, c)))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Bucket> {
        self.0.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
