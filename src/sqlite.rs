//! Opening the SQLite files renderq keeps (the embedded queue, its ledger,
//! the status table) the one way they are meant to be opened.

use std::cell::Cell;
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

/// Adds a column that files made by an earlier version lack (new files
/// have it from their schema).
pub fn add_column(
    conn: &Connection,
    table: &str,
    column: &str,
    decl: &str,
) -> rusqlite::Result<()> {
    let has = conn
        .prepare(&format!(
            "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
        ))?
        .exists([column])?;
    if has {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")) {
        // Another process opening the same file added it first.
        Err(rusqlite::Error::SqliteFailure(_, Some(message)))
            if message.contains("duplicate column name") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Now, in seconds since the Unix epoch: when a row was last written.
pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

thread_local! {
    /// `Some` while this thread runs `without_waiting`; then `Some(true)`
    /// once a lock held elsewhere was met.
    static NOT_WAITING: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` (SQLite work on connections opened here) so that a lock held by
/// another connection fails the statement at once instead of being waited
/// for: for work on an async thread, which must not sleep. `None` when `f`
/// failed on such a lock; the caller then does the work again where it may
/// wait. (A statement that fails on a lock changes nothing, and an open
/// transaction is rolled back when `f` drops it.)
pub fn without_waiting<T, E>(f: impl FnOnce() -> Result<T, E>) -> Option<Result<T, E>> {
    /// Ends the mode however `f` ends, a panic included.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            NOT_WAITING.set(None);
        }
    }
    NOT_WAITING.set(Some(false));
    let reset = Reset;
    let result = f();
    let met_lock = NOT_WAITING.get() == Some(true);
    drop(reset);
    match result {
        Err(_) if met_lock => None,
        done => Some(done),
    }
}

/// Yields for the first tries, then sleeps 0.2 ms a try; gives up after
/// about 10 s (sleeps run a little over). Inside `without_waiting`, gives
/// up at once.
fn retry_soon(tries: i32) -> bool {
    if NOT_WAITING.get().is_some() {
        NOT_WAITING.set(Some(true));
        return false;
    }
    if tries < 10 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
    tries < 50_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t (x INTEGER);";

    #[test]
    fn a_column_is_added_to_older_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        let old = open(&path, "CREATE TABLE IF NOT EXISTS t (a TEXT);").unwrap();
        old.execute("INSERT INTO t VALUES ('x')", []).unwrap();
        add_column(&old, "t", "at", "INTEGER NOT NULL DEFAULT 0").unwrap();
        // Again, as a second process opening the file would.
        add_column(&old, "t", "at", "INTEGER NOT NULL DEFAULT 0").unwrap();
        let at: i64 = old.query_row("SELECT at FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(at, 0);
    }

    #[test]
    fn a_lock_held_elsewhere_fails_at_once_without_waiting_and_is_waited_for_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let (holder, other) = (open(&path, SCHEMA).unwrap(), open(&path, SCHEMA).unwrap());
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();

        let started = Instant::now();
        let insert = || other.execute("INSERT INTO t VALUES (1)", []);
        assert!(without_waiting(insert).is_none(), "the insert met the lock");
        assert!(started.elapsed() < Duration::from_millis(100));
        // Work that does not need the lock is done as usual.
        let count = || other.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0));
        assert_eq!(without_waiting(count).unwrap().unwrap(), 0);

        // Outside, the same insert waits until the holder commits.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            holder.execute_batch("COMMIT").unwrap();
        });
        let started = Instant::now();
        other.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        release.join().unwrap();
    }
}
