//! Reading objects back, for job inputs: an object's size and version,
//! small objects (manifests) into memory, and large ones to a file in
//! concurrent ranged GETs, streamed to disk in bounded memory.

use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{Bucket, StorageError};

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
        e: &aws_sdk_s3::error::SdkError<E, R>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
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

    /// A small object's bytes (at most `max`).
    pub async fn get_bytes(&self, key: &str, max: u64) -> Result<Vec<u8>, StorageError> {
        let info = self.head(key).await?;
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
                    .send()
                    .await
                    .map_err(|e| self.get_error(key, None, &e))?;
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
        etag: Option<&str>,
        dest: &Path,
        concurrency: usize,
    ) -> Result<(), StorageError> {
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
                    self.head(key).await?;
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
                    let (bucket, key, dest, slots, etag) = (
                        self.clone(),
                        key.to_owned(),
                        dest.to_owned(),
                        slots.clone(),
                        etag.map(str::to_owned),
                    );
                    ranges.spawn(async move {
                        let _slot = slots.acquire().await.expect("never closed");
                        bucket
                            .fetch_range(&key, etag.as_deref(), size, start, end, &dest)
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

    /// Bytes `start..end` of the object, written at `start` in `dest`.
    async fn fetch_range(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        start: u64,
        end: u64,
        dest: &Path,
    ) -> Result<(), StorageError> {
        let Bucket::S3(b) = self else {
            unreachable!("ranges are fetched from S3 only")
        };
        let (client, bucket) = b.client();
        let object = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={start}-{}", end - 1))
            .set_if_match(etag.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.get_error(key, Some(size), &e))?;
        // `bytes START-END/TOTAL`: an object of another size than the one
        // claimed (a manifest that lies) can never be fetched as claimed.
        if let Some(total) = object
            .content_range()
            .and_then(|range| range.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok())
            && total != size
        {
            return Err(self.error(
                key,
                format!("the object is {total} bytes, not the {size} bytes claimed"),
                true,
            ));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(dest)
            .await
            .map_err(|e| self.error(key, e, false))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| self.error(key, e, false))?;
        let mut body = object.body;
        let mut written = 0;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| self.error(key, e, false))?
        {
            written += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| self.error(key, e, false))?;
        }
        if written != end - start {
            return Err(self.error(
                key,
                format!(
                    "range {start}-{end}: {written} bytes came, not {}",
                    end - start
                ),
                false,
            ));
        }
        file.flush().await.map_err(|e| self.error(key, e, false))
    }
}
