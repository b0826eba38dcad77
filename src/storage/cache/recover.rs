//! What a cache's opening finds that a killed process left: blobs renamed
//! into place whose index row was never written (killed between the rename
//! and the insert), and lock files of blobs that are not there.
//!
//! A blob under `blobs/` was checked (hash, size) and synced before it was
//! renamed there, and only the worker writes the cache's folder, so a file
//! without a row is whole: it is counted, as the least recently used, so
//! that `max_size` holds and it is the first to go.

use std::collections::HashSet;
use std::path::Path;

use super::CacheError;
use super::index::{Index, Row};

/// What [`recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Blobs on disk that the index did not name, now counted.
    pub unindexed: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Lock files removed: no blob, nobody holding them.
    pub locks: usize,
}

pub fn recover(root: &Path, index: &Index) -> Result<Recovered, CacheError> {
    let blobs = root.join("blobs");
    let known: HashSet<String> = index.names()?.into_iter().collect();
    let mut found = Recovered::default();
    let mut stack = vec![blobs.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(name) = path
                .strip_prefix(&blobs)
                .ok()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            if meta.is_file() && !known.contains(&name) {
                let row = Row {
                    size: meta.len(),
                    mtime_ns: super::mtime_ns(&meta),
                };
                if index.record_found(&name, row)? {
                    found.unindexed += 1;
                    found.bytes = found.bytes.saturating_add(row.size);
                }
            }
        }
    }
    found.locks = super::lock::sweep(&root.join("locks"), |name| blobs.join(name).is_file());
    if found.unindexed > 0 || found.locks > 0 {
        tracing::info!(
            cache = %root.display(),
            unindexed = found.unindexed,
            bytes = found.bytes,
            locks = found.locks,
            "input cache: counted files a killed process admitted without an index row, and removed lock files of blobs that are gone"
        );
    }
    Ok(found)
}
