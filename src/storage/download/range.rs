//! One range of a large object, fetched to its place in the file, and taken
//! up where it stopped when the transfer is cut short.

use std::path::Path;

use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::Expected;
use crate::storage::{Bucket, StorageError};

impl Bucket {
    /// Bytes `start..end` of the object, written at `start` in `dest`. A
    /// transfer cut short (a reset connection, a slow-down) is taken up
    /// again where it stopped, a few times, instead of failing the whole
    /// download: a large input is not fetched again from zero for one bad
    /// connection.
    pub(super) async fn fetch_range(
        &self,
        key: &str,
        expected: Option<Expected<'_>>,
        size: u64,
        start: u64,
        end: u64,
        dest: &Path,
    ) -> Result<(), StorageError> {
        let mut from = start;
        let mut failures = 0;
        loop {
            match self.fetch_part(key, expected, size, from, end, dest).await {
                Ok(()) => return Ok(()),
                Err(cut) if cut.resumable && failures + 1 < RANGE_TRIES => {
                    failures += 1;
                    let delay = RANGE_BACKOFF.delay(failures);
                    tracing::warn!(
                        key, start, from = from + cut.written, end, error = %cut.error, ?delay,
                        "input range cut short; taking it up where it stopped"
                    );
                    from += cut.written;
                    tokio::time::sleep(delay).await;
                }
                Err(cut) => return Err(cut.error),
            }
        }
    }

    /// Bytes `from..end` written at `from` in `dest`, in one GET.
    async fn fetch_part(
        &self,
        key: &str,
        expected: Option<Expected<'_>>,
        size: u64,
        from: u64,
        end: u64,
        dest: &Path,
    ) -> Result<(), Cut> {
        let Bucket::S3(b) = self else {
            unreachable!("ranges are fetched from S3 only")
        };
        let (client, bucket) = b.client();
        let object = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={from}-{}", end - 1))
            .set_if_match(expected.and_then(|x| x.etag).map(str::to_owned))
            .set_version_id(expected.and_then(|x| x.version_id).map(str::to_owned))
            .send()
            .await
            .map_err(|e| {
                // Another version, or a request S3 refused for good: asking
                // again gets the same answer.
                let resumable = e.code() != Some("PreconditionFailed");
                Cut::new(self.get_error(key, Some(size), expected, &e), 0, resumable)
            })?;
        // `bytes START-END/TOTAL`: an object of another size than the one
        // claimed (a manifest that lies) can never be fetched as claimed.
        if let Some(total) = object
            .content_range()
            .and_then(|range| range.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok())
            && total != size
        {
            return Err(Cut::new(
                self.error(
                    key,
                    format!("the object is {total} bytes, not the {size} bytes claimed"),
                    true,
                ),
                0,
                false,
            ));
        }
        let local = |e: std::io::Error| Cut::new(self.error(key, e, false), 0, false);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(dest)
            .await
            .map_err(local)?;
        file.seek(std::io::SeekFrom::Start(from))
            .await
            .map_err(local)?;
        let mut body = object.body;
        let mut written = 0;
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    file.write_all(&chunk).await.map_err(local)?;
                    written += chunk.len() as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    // What came is kept (once it is in the file): the next
                    // GET asks for the rest.
                    let kept = if file.flush().await.is_ok() {
                        written
                    } else {
                        0
                    };
                    return Err(Cut::new(self.error(key, e, false), kept, true));
                }
            }
        }
        if written != end - from {
            return Err(Cut::new(
                self.error(
                    key,
                    format!(
                        "range {from}-{end}: {written} bytes came, not {}",
                        end - from
                    ),
                    false,
                ),
                0,
                true,
            ));
        }
        file.flush().await.map_err(local)
    }
}

/// Tries of one range, counting the first, before the download fails.
const RANGE_TRIES: u32 = 4;

/// The waits between them.
const RANGE_BACKOFF: crate::retry::Backoff = crate::retry::Backoff::new(
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(2),
);

/// A GET of a range that did not bring all of it.
struct Cut {
    error: StorageError,
    /// Bytes written to the file before it stopped.
    written: u64,
    /// Whether asking again for the rest may work (not when S3 refused for
    /// good, the object changed, or the local file failed).
    resumable: bool,
}

impl Cut {
    fn new(error: StorageError, written: u64, resumable: bool) -> Self {
        let resumable = resumable && !error.permanent;
        Self {
            error,
            written,
            resumable,
        }
    }
}
