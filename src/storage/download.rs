//! Reading objects back, for job inputs: an object's size and version,
//! small objects (manifests) into memory, and large ones to a file in
//! concurrent ranged GETs, streamed to disk in bounded memory.

use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::error::ProvideErrorMetadata;

use super::{Bucket, StorageError};

mod range;
use crate::job::inputs::Pin;

/// Bytes per ranged GET of a large object.
const RANGE: u64 = 16 * 1024 * 1024;

/// What a download needs to know of an object before fetching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// What changes when the object does: its version id or ETag (or, in
    /// a folder, its size and modification time).
    pub version: String,
    /// Its ETag, which every ranged GET must match, so that an object
    /// replaced during a download fails it rather than mixing the two.
    pub etag: Option<String>,
    /// Its version id, on a versioned bucket.
    pub version_id: Option<String>,
}

impl ObjectInfo {
    /// The object as a job's pin records it.
    pub fn pin(self) -> Pin {
        Pin {
            size: self.size,
            version: self.version,
            etag: self.etag,
            version_id: self.version_id,
        }
    }

    /// What a read of this object must get: this version, and when it is
    /// the job's `pin`, nothing else for good.
    pub fn expected(&self, pinned: bool) -> Expected<'_> {
        Expected {
            etag: self.etag.as_deref(),
            version_id: self.version_id.as_deref(),
            version: &self.version,
            pinned,
        }
    }
}

impl From<&Pin> for ObjectInfo {
    fn from(pin: &Pin) -> Self {
        Self {
            size: pin.size,
            version: pin.version.clone(),
            etag: pin.etag.clone(),
            version_id: pin.version_id.clone(),
        }
    }
}

/// Which version of an object a read must get.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// Every GET sends `If-Match` with it (S3).
    pub etag: Option<&'a str>,
    /// Every GET names it (a versioned S3 bucket).
    pub version_id: Option<&'a str>,
    /// [`ObjectInfo::version`]: what a folder's object is compared with.
    pub version: &'a str,
    /// The job's pin, recorded at submit: another version is a permanent
    /// failure ("changed since submit"), not one worth another try.
    pub pinned: bool,
}

impl Bucket {
    fn error(&self, key: &str, message: impl std::fmt::Display, permanent: bool) -> StorageError {
        let (name, url) = match self {
            Bucket::Local(b) => (b.name().to_owned(), format!("{}", b.path_of(key).display())),
            Bucket::S3(b) => (b.name().to_owned(), format!("s3://{}/{key}", b.client().1)),
        };
        StorageError {
            bucket: name,
            message: format!("{url}: {message}"),
            permanent,
        }
    }

    /// A failed GET: a missing object or a range past its end can never be
    /// fetched (a manifest naming a `Data/` object that is not there, or
    /// claiming more bytes than it has); the rest may pass.
    fn get_error<E, R>(
        &self,
        key: &str,
        claimed: Option<u64>,
        expected: Option<Expected<'_>>,
        e: &aws_sdk_s3::error::SdkError<E, R>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let pinned = expected.is_some_and(|x| x.pinned);
        if e.code() == Some("PreconditionFailed") {
            // Replaced since its ETag was read: for good when that was at
            // submit, else (during this download) worth another try.
            return self.changed(key, pinned);
        }
        let permanent = matches!(
            e.code(),
            Some("NoSuchKey" | "InvalidRange" | "AccessDenied" | "NoSuchBucket")
        );
        let message = match (e.code(), claimed) {
            (Some("NoSuchKey"), _) => "no such object".to_owned(),
            (Some("InvalidRange"), Some(size)) => {
                format!("the object is smaller than the {size} bytes claimed (InvalidRange)")
            }
            _ => crate::aws::describe(e),
        };
        self.error(key, message, permanent)
    }

    /// The object is not the version expected.
    fn changed(&self, key: &str, pinned: bool) -> StorageError {
        if pinned {
            self.error(
                key,
                "changed since submit; resubmit to render the new version",
                true,
            )
        } else {
            self.error(key, "changed during the download", false)
        }
    }

    /// A folder's object is still the version expected (S3 checks that
    /// itself, with `If-Match`).
    async fn check_local(
        &self,
        key: &str,
        expected: Option<Expected<'_>>,
    ) -> Result<(), StorageError> {
        match (self, expected) {
            (Bucket::Local(_), Some(expected)) if expected.pinned => {
                if self.head(key).await?.version != expected.version {
                    return Err(self.changed(key, true));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The object's size and version; a missing object is a permanent
    /// error naming it.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo, StorageError> {
        match self {
            Bucket::Local(b) => {
                let meta = tokio::fs::metadata(b.path_of(key)).await.map_err(|e| {
                    let missing = e.kind() == std::io::ErrorKind::NotFound;
                    self.error(
                        key,
                        if missing {
                            "no such object".into()
                        } else {
                            e.to_string()
                        },
                        missing,
                    )
                })?;
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                Ok(ObjectInfo {
                    size: meta.len(),
                    version: format!("{}-{modified}", meta.len()),
                    etag: None,
                    version_id: None,
                })
            }
            Bucket::S3(b) => {
                let (client, bucket) = b.client();
                let head = client.head_object().bucket(bucket).key(key).send().await;
                match head {
                    Ok(head) => Ok(ObjectInfo {
                        size: head.content_length().unwrap_or(0).max(0) as u64,
                        version: head
                            .version_id()
                            .or(head.e_tag())
                            .unwrap_or_default()
                            .to_owned(),
                        etag: head.e_tag().map(str::to_owned),
                        version_id: head.version_id().map(str::to_owned),
                    }),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                        Err(self.error(key, "no such object", true))
                    }
                    Err(e) => {
                        let permanent = matches!(e.code(), Some("AccessDenied" | "NoSuchBucket"));
                        Err(self.error(key, crate::aws::describe(&e), permanent))
                    }
                }
            }
        }
    }

    /// A small object's bytes (at most `max`): the version `pinned` at
    /// submit (then with no `HEAD` first), else the one there now.
    pub async fn get_bytes(
        &self,
        key: &str,
        max: u64,
        pinned: Option<&Pin>,
    ) -> Result<Vec<u8>, StorageError> {
        let info = match pinned {
            Some(pin) => ObjectInfo::from(pin),
            None => self.head(key).await?,
        };
        let expected = info.expected(pinned.is_some());
        self.check_local(key, Some(expected)).await?;
        if info.size > max {
            return Err(self.error(
                key,
                format!("{} bytes; at most {max} are read", info.size),
                true,
            ));
        }
        match self {
            Bucket::Local(b) => tokio::fs::read(b.path_of(key))
                .await
                .map_err(|e| self.error(key, e, false)),
            Bucket::S3(b) => {
                let (client, bucket) = b.client();
                let object = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .set_if_match(expected.etag.map(str::to_owned))
                    .set_version_id(expected.version_id.map(str::to_owned))
                    .send()
                    .await
                    .map_err(|e| self.get_error(key, None, Some(expected), &e))?;
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| self.error(key, e, false))?;
                Ok(bytes.into_bytes().to_vec())
            }
        }
    }

    /// Writes the object (of `size` bytes) to `dest`, a new file: from S3
    /// in ranges of 16 MiB, `concurrency` at a time, each streamed to its
    /// place in the file.
    pub async fn download(
        &self,
        key: &str,
        size: u64,
        expected: Option<Expected<'_>>,
        dest: &Path,
        concurrency: usize,
    ) -> Result<(), StorageError> {
        self.check_local(key, expected).await?;
        match self {
            Bucket::Local(b) => tokio::fs::copy(b.path_of(key), dest)
                .await
                .map(drop)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        self.error(key, "no such object", true)
                    } else {
                        self.error(key, e, false)
                    }
                }),
            Bucket::S3(_) => {
                // No range to fetch: the object must still be there (an
                // empty file of a manifest is fetched like any other).
                if size == 0 {
                    let now = self.head(key).await?;
                    if let Some(expected) = expected
                        && expected.etag.is_some()
                        && now.etag.as_deref() != expected.etag
                    {
                        return Err(self.changed(key, expected.pinned));
                    }
                }
                let file = tokio::fs::File::create(dest)
                    .await
                    .map_err(|e| self.error(key, format!("{}: {e}", dest.display()), false))?;
                file.set_len(size)
                    .await
                    .map_err(|e| self.error(key, e, false))?;
                drop(file);
                let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
                let mut ranges = tokio::task::JoinSet::new();
                let mut start = 0;
                while start < size {
                    let end = (start + RANGE).min(size);
                    let (bucket, key, dest, slots) =
                        (self.clone(), key.to_owned(), dest.to_owned(), slots.clone());
                    let owned = expected.map(|x| {
                        (
                            x.etag.map(str::to_owned),
                            x.version_id.map(str::to_owned),
                            x.version.to_owned(),
                            x.pinned,
                        )
                    });
                    ranges.spawn(async move {
                        let _slot = slots.acquire().await.expect("never closed");
                        let expected =
                            owned
                                .as_ref()
                                .map(|(etag, version_id, version, pinned)| Expected {
                                    etag: etag.as_deref(),
                                    version_id: version_id.as_deref(),
                                    version,
                                    pinned: *pinned,
                                });
                        bucket
                            .fetch_range(&key, expected, size, start, end, &dest)
                            .await
                    });
                    start = end;
                }
                while let Some(done) = ranges.join_next().await {
                    done.map_err(|e| self.error(key, e, false))??;
                }
                Ok(())
            }
        }
    }
}
