//! The cache's index (`index.sqlite3`): what is there, how large it is,
//! the modification time it was admitted with, and when it was last used.
//! The one place that reads or writes the `blobs` table.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::CacheError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (
    name      TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_by_last_use ON blobs (last_used, name);
-- The bytes the index accounts for, kept by triggers so that making room
-- reads one row instead of adding up every blob.
CREATE TABLE IF NOT EXISTS totals (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, bytes) SELECT 0, COALESCE(SUM(size), 0) FROM blobs;
CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs
    BEGIN UPDATE totals SET bytes = bytes + NEW.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs
    BEGIN UPDATE totals SET bytes = bytes - OLD.size WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS blobs_resized AFTER UPDATE OF size ON blobs
    BEGIN UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0; END;
";

/// Names of this layout start with it. Rows of the first layout (keyed by
/// a bucket's name in `workers.toml`, `assets/<hash>`) are never served:
/// no name of this layout equals one of theirs, and they are evicted first.
pub const LAYOUT: &str = "v2/";

/// What the index says of one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub size: u64,
    pub mtime_ns: i64,
}

/// A blob in the order of last use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub name: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub last_used: i64,
}

#[derive(Debug, Clone)]
pub struct Index(Arc<Mutex<Connection>>);

fn index_error(e: rusqlite::Error) -> CacheError {
    CacheError::Retryable(format!("cache index: {e}"))
}

impl Index {
    /// Opens (or makes) the index; rows of an older layout are marked
    /// least recently used, so they are the first to go.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let connection = crate::sqlite::open(path, SCHEMA)
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))?;
        let retired = connection
            .execute(
                "UPDATE blobs SET last_used = 0 WHERE substr(name, 1, length(?1)) != ?1 AND last_used != 0",
                [LAYOUT],
            )
            .map_err(index_error)?;
        if retired > 0 {
            tracing::info!(
                blobs = retired,
                "input cache: files of the old layout (keyed by bucket names) are evicted first and never served"
            );
        }
        Ok(Self(Arc::new(Mutex::new(connection))))
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, CacheError> {
        f(&self.0.lock().expect("cache index lock")).map_err(index_error)
    }

    pub fn row(&self, name: &str) -> Result<Option<Row>, CacheError> {
        self.with(|index| {
            index
                .query_row(
                    "SELECT size, mtime_ns FROM blobs WHERE name = ?1",
                    [name],
                    |r| {
                        Ok(Row {
                            size: r.get::<_, i64>(0)?.max(0) as u64,
                            mtime_ns: r.get(1)?,
                        })
                    },
                )
                .optional()
        })
    }

    /// Records an admitted blob, used now.
    pub fn record(&self, name: &str, row: Row) -> Result<(), CacheError> {
        self.with(|index| {
            index.execute(
                // An upsert, not INSERT OR REPLACE: a replace's delete does
                // not fire the trigger that keeps the total.
                "INSERT INTO blobs (name, size, mtime_ns, last_used) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET
                     size = excluded.size, mtime_ns = excluded.mtime_ns, last_used = excluded.last_used",
                params![name, row.size as i64, row.mtime_ns, crate::sqlite::now_s()],
            )
        })
        .map(drop)
    }

    /// Marks a blob used now.
    pub fn touch(&self, name: &str) -> Result<(), CacheError> {
        self.with(|index| {
            index.execute(
                "UPDATE blobs SET last_used = ?2 WHERE name = ?1",
                params![name, crate::sqlite::now_s()],
            )
        })
        .map(drop)
    }

    /// Every blob's name (the cache's opening, to find files without a
    /// row).
    pub fn names(&self) -> Result<Vec<String>, CacheError> {
        self.with(|index| {
            index
                .prepare("SELECT name FROM blobs")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
    }

    /// Records a blob found on disk without a row, as the least recently
    /// used; false if a row appeared meanwhile (its process recorded it).
    pub fn record_found(&self, name: &str, row: Row) -> Result<bool, CacheError> {
        self.with(|index| {
            index.execute(
                "INSERT OR IGNORE INTO blobs (name, size, mtime_ns, last_used) VALUES (?1, ?2, ?3, 0)",
                params![name, row.size as i64, row.mtime_ns],
            )
        })
        .map(|n| n > 0)
    }

    pub fn forget(&self, name: &str) -> Result<(), CacheError> {
        self.with(|index| index.execute("DELETE FROM blobs WHERE name = ?1", [name]))
            .map(drop)
    }

    /// Bytes the index accounts for: one row, whatever the index's size.
    pub fn size(&self) -> Result<u64, CacheError> {
        self.with(|index| {
            index.query_row("SELECT bytes FROM totals WHERE id = 0", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n.max(0) as u64)
    }

    /// Up to `n` blobs least recently used first, after `after` (the last
    /// one of the previous batch), from the index on last use: a batch
    /// costs the same with a thousand blobs as with a million.
    pub fn least_used(&self, after: Option<&Used>, n: usize) -> Result<Vec<Used>, CacheError> {
        let (at, name) = after.map_or((i64::MIN, ""), |u| (u.last_used, u.name.as_str()));
        self.with(|index| {
            let mut stmt = index.prepare_cached(
                "SELECT name, size, last_used FROM blobs
                 WHERE (last_used, name) > (?1, ?2)
                 ORDER BY last_used, name LIMIT ?3",
            )?;
            stmt.query_map(params![at, name, n as i64], |r| {
                Ok(Used {
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)?.max(0) as u64,
                    last_used: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    /// Rows `bench/{i}` of one byte for `i` in `first..first + n`, last
    /// used in that order (at `i`), in one transaction.
    pub fn seed(&self, first: usize, n: usize) -> Result<(), CacheError> {
        let mut connection = self.0.lock().expect("cache index lock");
        let tx = connection.transaction().map_err(index_error)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO blobs (name, size, mtime_ns, last_used) VALUES (?1, 1, 0, ?2)",
                )
                .map_err(index_error)?;
            for i in first..first + n {
                insert
                    .execute(params![format!("bench/{i}"), i as i64])
                    .map_err(index_error)?;
            }
        }
        tx.commit().map_err(index_error)
    }

    /// Sets a blob's last use (tests of eviction order).
    #[cfg(test)]
    pub fn set_last_used(&self, name: &str, at: i64) {
        self.with(|index| {
            index.execute(
                "UPDATE blobs SET last_used = ?2 WHERE name = ?1",
                params![name, at],
            )
        })
        .expect("set last_used");
    }
}
