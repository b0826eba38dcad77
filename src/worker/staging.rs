//! Staging a job's inputs: each object or manifest file is placed in the
//! job's working folder through the worker's cache, before the command
//! runs. A missing object or a bad manifest can never succeed and
//! dead-letters the job; the network and the disk are worth another try;
//! a shutdown during staging hands the job back like any interruption. A
//! manifest's files are placed `download_concurrency` at a time.

use std::path::Path;
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use super::JobError;
use crate::job::inputs::{InputKind, InputSpec, Staged};
use crate::job::manifest::{Manifest, ManifestFile};
use crate::storage::cache::{Blob, Cache, CacheError, Source, from_micros, xxh128_file};
use crate::storage::download::{Expected, ObjectInfo};
use crate::storage::{Bucket, Buckets, StorageError};

/// Largest manifest read into memory.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// How staging reaches the buckets and the cache.
#[derive(Debug, Clone, Copy)]
pub struct Stager<'a> {
    pub cache: &'a Cache,
    pub buckets: &'a Buckets,
    pub download_concurrency: usize,
    pub max_manifest_files: usize,
}

impl Stager<'_> {
    /// Places every input under `dir`; stops at `cancel`.
    pub(super) async fn stage(
        &self,
        inputs: &[InputSpec],
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<Staged, JobError> {
        let started = Instant::now();
        let mut staged = Staged::default();
        for (i, input) in inputs.iter().enumerate() {
            tokio::select! {
                placed = self.stage_one(input, dir, &mut staged) => {
                    placed.map_err(|e| match e {
                        CacheError::Permanent(e) => JobError::Permanent(format!("inputs[{i}] ({}): {e}", input.path)),
                        CacheError::Retryable(e) => JobError::Retryable(format!("inputs[{i}] ({}): {e}", input.path)),
                    })?;
                }
                _ = cancel.cancelled() => return Err(JobError::Interrupted),
            }
        }
        staged.seconds = started.elapsed().as_secs_f64();
        Ok(staged)
    }

    async fn stage_one(
        &self,
        input: &InputSpec,
        dir: &Path,
        staged: &mut Staged,
    ) -> Result<(), CacheError> {
        let bucket = self.buckets.get(&input.bucket).ok_or_else(|| {
            CacheError::Permanent(format!("no bucket `{}` is configured", input.bucket))
        })?;
        let dest = dir.join(&input.path);
        match input.kind() {
            Some(InputKind::Object { key }) => {
                crate::job::check_key(key)
                    .map_err(|e| CacheError::Permanent(format!("key: {e}")))?;
                // Pinned at submit: the cache knows it by its pin, so a hit
                // costs no request at all.
                let info = match &input.pin {
                    Some(pin) => ObjectInfo::from(pin),
                    None => bucket.head(key).await.map_err(storage)?,
                };
                let blob = Blob::object(&bucket.identity(), key, &info.version, info.size);
                let expected = info.expected(input.pin.is_some());
                let source = self
                    .place(bucket, key, Some(expected), &blob, &dest)
                    .await
                    .map_err(|e| in_context(e, &input.bucket, key, &input.path))?;
                staged.count(source == Source::Cache, blob.size);
            }
            Some(InputKind::Manifest { key }) => {
                crate::job::check_key(key)
                    .map_err(|e| CacheError::Permanent(format!("manifest: {e}")))?;
                let bytes = bucket
                    .get_bytes(key, MAX_MANIFEST_BYTES, input.pin.as_ref())
                    .await
                    .map_err(storage)?;
                let manifest = Manifest::parse(&bytes, self.max_manifest_files).map_err(|e| {
                    CacheError::Permanent(format!(
                        "bucket `{}` manifest `{key}`: {e}",
                        input.bucket
                    ))
                })?;
                // A file that could never fit fails the job before anything
                // is fetched or evicted for it.
                if let Some(largest) = manifest.largest() {
                    self.cache.admissible(largest.size).map_err(|e| {
                        CacheError::Permanent(format!(
                            "bucket `{}` manifest `{key}`: `{}`: {e}",
                            input.bucket, largest.path
                        ))
                    })?;
                }
                let prefix = input.data_prefix();
                let identity = bucket.identity();
                // `download_concurrency` files at a time: a manifest of
                // thousands of small files is bound by round trips, not by
                // bandwidth. Files of one content wait on its blob's lock
                // and are then hits; the first error drops the rest.
                let mut files = manifest.paths.iter();
                let mut running = FuturesUnordered::new();
                loop {
                    while running.len() < self.download_concurrency.max(1) {
                        let Some(file) = files.next() else { break };
                        running.push(self.place_file(
                            bucket,
                            &input.bucket,
                            &identity,
                            &prefix,
                            &dest,
                            file,
                        ));
                    }
                    let Some(placed) = running.next().await else {
                        break;
                    };
                    let (hit, size) = placed?;
                    staged.count(hit, size);
                }
            }
            None => {
                return Err(CacheError::Permanent(
                    "give exactly one of `key` and `manifest`".into(),
                ));
            }
        }
        Ok(())
    }

    /// Places one file of a manifest under `dest`: whether it was a hit,
    /// and its size.
    async fn place_file(
        &self,
        bucket: &Bucket,
        bucket_name: &str,
        identity: &str,
        prefix: &str,
        dest: &Path,
        file: &ManifestFile,
    ) -> Result<(bool, u64), CacheError> {
        let blob = Blob::manifest_file(
            identity,
            prefix,
            &file.hash,
            file.size,
            from_micros(file.mtime),
        );
        let data = format!("{prefix}{}.xxh128", file.hash);
        crate::job::check_key(&data)
            .map_err(|e| CacheError::Permanent(format!("data_prefix: {e}")))?;
        // Pinned by its hash, which the cache checks.
        let source = self
            .place(bucket, &data, None, &blob, &dest.join(file.path.as_path()))
            .await
            .map_err(|e| in_context(e, bucket_name, &data, &file.path.to_string()))?;
        Ok((source == Source::Cache, blob.size))
    }

    async fn place(
        &self,
        bucket: &Bucket,
        key: &str,
        expected: Option<Expected<'_>>,
        blob: &Blob,
        dest: &Path,
    ) -> Result<Source, CacheError> {
        let concurrency = self.download_concurrency;
        self.cache
            .place(blob, dest, |tmp| async move {
                bucket
                    .download(key, blob.size, expected, &tmp, concurrency)
                    .await
                    .map_err(storage)?;
                tokio::task::spawn_blocking(move || xxh128_file(&tmp))
                    .await
                    .map_err(|e| CacheError::Retryable(e.to_string()))?
                    .map_err(|e| CacheError::Retryable(format!("hashing a download: {e}")))
            })
            .await
    }
}

/// Names the bucket, key and path of a cache error (a storage error names
/// its bucket and key already).
fn in_context(e: CacheError, bucket: &str, key: &str, path: &str) -> CacheError {
    let context = |message: String| {
        if message.starts_with("bucket `") {
            format!("{path}: {message}")
        } else {
            format!("{path}: bucket `{bucket}` `{key}`: {message}")
        }
    };
    match e {
        CacheError::Permanent(m) => CacheError::Permanent(context(m)),
        CacheError::Retryable(m) => CacheError::Retryable(context(m)),
    }
}

fn storage(e: StorageError) -> CacheError {
    if e.permanent {
        CacheError::Permanent(e.to_string())
    } else {
        CacheError::Retryable(e.to_string())
    }
}
