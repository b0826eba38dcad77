//! Making room: least recently used blobs go first, never one that is being
//! fetched or placed (its lock is held) or that has another link.

use std::os::unix::fs::MetadataExt;

use super::index::Used;
use super::lock::BlobLock;
use super::{Cache, CacheError};

/// Blobs read from the index at a time while making room.
const BATCH: usize = 64;

impl Cache {
    /// Deletes the least recently used blobs nobody holds until `needed`
    /// more bytes fit within `max_size`, and checks that the disk has room
    /// for them. `needed` was checked against `max_size` before (a size that
    /// can never fit evicts nothing).
    pub(super) fn make_room(&self, needed: u64) -> Result<(), CacheError> {
        let mut total = self.index.size()?;
        let mut after = None;
        // Candidates are read a batch at a time from the index on last use,
        // and only while room is still wanted: the cost follows what is
        // evicted, not how many blobs the index holds.
        'evicting: while total.saturating_add(needed) > self.max_size {
            let batch = self.index.least_used(after.as_ref(), BATCH)?;
            let Some(last) = batch.last().cloned() else {
                break;
            };
            for Used { name, size, .. } in batch {
                if total.saturating_add(needed) <= self.max_size {
                    break 'evicting;
                }
                if self.evict(&name)? {
                    total = total.saturating_sub(size);
                    tracing::info!(blob = %name, bytes = size, "evicted from the input cache");
                }
            }
            after = Some(last);
        }
        let stat = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| CacheError::Retryable(format!("cache: {e}")))?;
        let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        if free < needed {
            return Err(CacheError::Retryable(format!(
                "needs {}, {} free under {}",
                gib(needed),
                gib(free),
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Deletes one blob unless someone holds it: being fetched or placed
    /// elsewhere (its lock is held), or linked from elsewhere (by hand, or
    /// into a job folder by a link placement or the first layout).
    fn evict(&self, name: &str) -> Result<bool, CacheError> {
        let Ok(Some(lock)) = BlobLock::take(&self.lock_path(name), false) else {
            return Ok(false);
        };
        let path = self.blob_path(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.nlink() > 1) {
            return Ok(false);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Ok(false),
        }
        self.index.forget(name)?;
        lock.remove();
        Ok(true)
    }
}

/// For `renderq bench --inputs`: eviction without downloads.
impl Cache {
    /// Makes room for `bytes` more, as a download of that size would.
    pub fn make_room_for(&self, bytes: u64) -> Result<(), CacheError> {
        self.admissible(bytes)?;
        self.make_room(bytes)
    }

    /// Records blobs `first..first + n` of one byte each (no files), used
    /// in that order, after every blob already there.
    pub fn seed(&self, first: usize, n: usize) -> Result<(), CacheError> {
        self.index.seed(first, n)
    }
}

/// `12.3 GiB`.
pub(super) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}
