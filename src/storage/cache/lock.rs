//! A blob's lock: a file under `locks/`, held with `flock`, that exists
//! only while its blob does or while someone holds it.
//!
//! Whoever removes a lock file (the blob was evicted, or its download
//! failed) removes it while holding it. Someone who opened the same file
//! before and was waiting for it then holds a lock on a file that no longer
//! has a name; so a lock is taken only once the file held is still the one
//! the path names (same inode), else it is opened again. Two holders of one
//! blob at once are never possible, and `locks/` does not grow with every
//! name ever fetched.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{CacheError, retryable};

/// A held blob lock. Dropping it releases the lock and keeps the file (the
/// blob is there); [`BlobLock::remove`] also removes the file.
#[derive(Debug)]
pub struct BlobLock {
    held: Flock<File>,
    path: PathBuf,
}

impl BlobLock {
    /// Takes the lock at `path`, waiting for whoever holds it (another slot
    /// or process fetching the blob); `None` when `wait` is false and it is
    /// held.
    pub fn take(path: &Path, wait: bool) -> Result<Option<Self>, CacheError> {
        let mode = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(retryable("cache lock"))?;
            let held = match Flock::lock(file, mode) {
                Ok(held) => held,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, e)) => return Err(CacheError::Retryable(format!("cache lock: {e}"))),
            };
            let ours = held.metadata().map_err(retryable("cache lock"))?;
            match std::fs::metadata(path) {
                Ok(named) if named.dev() == ours.dev() && named.ino() == ours.ino() => {
                    return Ok(Some(Self {
                        held,
                        path: path.to_owned(),
                    }));
                }
                // Removed (or replaced) by its holder while this waited.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(retryable("cache lock")(e)),
            }
        }
    }

    /// Removes the lock file, then releases it: the blob is gone.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(lock = %self.path.display(), error = %e, "could not remove a cache lock file");
        }
        drop(self.held);
    }
}

/// Removes the lock files of blobs that are not there and that nobody holds
/// (left by a version that kept them, or by a process killed holding one).
/// Returns how many went.
pub fn sweep(locks: &Path, blob_exists: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(locks) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if blob_exists(&name.replace('%', "/")) {
            continue;
        }
        if let Ok(Some(lock)) = BlobLock::take(&entry.path(), false) {
            // Checked again under the lock: a holder may have admitted it.
            if !blob_exists(&name.replace('%', "/")) {
                lock.remove();
                removed += 1;
            }
        }
    }
    removed
}
