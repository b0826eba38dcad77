//! Opening the SQLite files renderq keeps (the embedded queue, its ledger,
//! the status table) the one way they are meant to be opened.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Opens `path` in WAL mode, with commits not fsynced one by one (a
/// process crash loses nothing; a power cut may lose the last commits), and
/// a busy handler that retries soon: SQLite's own sleeps in steps of up to
/// 100 ms, so a process that loses a race for the write lock would idle
/// long after the lock is free.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(retry_soon))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
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
