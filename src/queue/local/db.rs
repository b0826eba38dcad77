//! The embedded queue's database: one connection per process, and how
//! work reaches it. Short work runs on the calling async thread unless the
//! connection is busy or another process holds the lock it needs; then it
//! goes to a blocking thread and waits there. SQLite's automatic
//! checkpoint is off: one runs every `CHECKPOINT_EVERY` operations on a
//! blocking thread, through a connection of its own.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::unavailable;
use crate::queue::QueueError;

/// Operations between two checkpoints (a commit adds a few pages to the
/// write-ahead log; SQLite's default is a checkpoint per 1,000 pages).
const CHECKPOINT_EVERY: u32 = 256;

#[derive(Debug)]
pub(super) struct Db {
    /// The queue's name, for logs.
    name: String,
    conn: Mutex<Connection>,
    /// Operations by this process (most of them commits), for
    /// checkpointing every so many.
    operations: AtomicU32,
    /// Set while a checkpoint runs.
    checkpointing: AtomicBool,
    /// The database file, and the connection checkpoints go through
    /// (opened by the first).
    path: PathBuf,
    checkpointer: Mutex<Option<Connection>>,
}

impl Db {
    pub(super) fn open(path: PathBuf, schema: &str, name: &str) -> Result<Self, QueueError> {
        let conn = crate::sqlite::open(&path, schema).map_err(unavailable)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(unavailable)?;
        Ok(Self {
            name: name.to_owned(),
            conn: Mutex::new(conn),
            operations: AtomicU32::new(0),
            checkpointing: AtomicBool::new(false),
            path,
            checkpointer: Mutex::default(),
        })
    }

    /// Runs `f`, a short piece of work (one row or a few), on the
    /// connection. It runs right here when the connection is free and no
    /// other process holds the lock it needs: tens of microseconds, less
    /// than the trip to a blocking thread and back. Otherwise it runs on a
    /// blocking thread, which may wait for the lock.
    ///
    /// `f` may so run twice: it must make its changes in one statement or
    /// one transaction, so that a first run stopped by a lock left nothing.
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        if let Ok(mut conn) = self.conn.try_lock()
            && let Some(done) = crate::sqlite::without_waiting(|| f(&mut conn))
        {
            self.count();
            return done;
        }
        self.run_blocking(f).await
    }

    /// Runs `f` on the connection on a blocking thread: for work that may
    /// take long (a scan of the whole queue) or wait for a lock.
    pub(super) async fn run_blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        self.count();
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.conn.lock().map_err(unavailable)?;
            f(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }

    /// Counts an operation and, every `CHECKPOINT_EVERY`, starts a checkpoint
    /// on a blocking thread, through a connection of its own so that the
    /// queue's work goes on meanwhile. SQLite's own checkpoint would run
    /// inside a commit, on an async thread, with two fsyncs.
    fn count(self: &Arc<Self>) {
        if self.operations.fetch_add(1, Relaxed) % CHECKPOINT_EVERY != CHECKPOINT_EVERY - 1
            || self.checkpointing.swap(true, Relaxed)
        {
            return;
        }
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut checkpointer = db.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
            let checkpoint = match checkpointer.take() {
                Some(conn) => Ok(conn),
                None => crate::sqlite::open(&db.path, ""),
            }
            .and_then(|conn| {
                // Passive: copies what it can without waiting for anyone.
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                *checkpointer = Some(conn);
                done
            });
            if let Err(error) = checkpoint {
                tracing::warn!(%error, queue = %db.name, "checkpoint failed");
            }
            db.checkpointing.store(false, Relaxed);
        });
    }
}

/// Runs a statement through the connection's cache of prepared statements:
/// the queue's few statements are parsed once, not on every call.
pub(super) fn execute(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Reads one row through the cache of prepared statements.
pub(super) fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}
