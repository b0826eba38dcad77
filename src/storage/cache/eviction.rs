//! Making room: least recently used blobs go first, never one that is being
//! fetched or placed (its lock is held) or that has another link.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{Flock, FlockArg};

use super::{Cache, CacheError};

impl Cache {
    /// Deletes the least recently used blobs nobody holds until `needed`
    /// more bytes fit within `max_size`, and checks that the disk has room
    /// for them. `needed` was checked against `max_size` before (a size that
    /// can never fit evicts nothing).
    pub(super) fn make_room(&self, needed: u64) -> Result<(), CacheError> {
        let candidates = self.index.by_last_use()?;
        let mut total = candidates
            .iter()
            .fold(0u64, |sum, (_, size)| sum.saturating_add(*size));
        for (name, size) in candidates {
            if total.saturating_add(needed) <= self.max_size {
                break;
            }
            let path = self.blob_path(&name);
            // Being fetched or placed elsewhere: kept.
            let Ok(file) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.lock_path(&name))
            else {
                continue;
            };
            let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            // Another link to it (made by hand, or by a worker of the first
            // layout, which linked blobs into job folders): kept.
            if std::fs::metadata(&path).is_ok_and(|m| m.nlink() > 1) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => continue,
            }
            self.index.forget(&name)?;
            total = total.saturating_sub(size);
            tracing::info!(blob = %name, bytes = size, "evicted from the input cache");
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
}

/// `12.3 GiB`.
pub(super) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}
