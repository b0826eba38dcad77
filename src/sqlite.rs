//! Opening the SQLite files renderq keeps (the embedded queue, its ledger,
//! the status table) the one way they are meant to be opened.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// Opens `path` in WAL mode, with commits not fsynced one by one (a
/// process crash loses nothing; a power cut may lose the last commits), and
/// a busy handler that retries soon: SQLite's own sleeps in steps of up to
/// 100 ms, so a process that loses a race for the write lock would idle
/// long after the lock is free. Then creates `schema`.
///
/// Several processes opening a fresh file at the same moment can find it
/// locked while one of them switches it to WAL (SQLite does not wait there):
/// the whole opening is then tried again, for up to 10 s.
pub fn open(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let started = Instant::now();
    loop {
        match try_open(path, schema) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn try_open(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(retry_soon))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// Yields for the first tries, then sleeps 1 ms a try; gives up after
/// about 10 s.
fn retry_soon(tries: i32) -> bool {
    if tries < 10 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
    tries < 10_000
}
