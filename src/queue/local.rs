//! The embedded queue: one SQLite database per queue, in WAL mode.
//!
//! Every state change is one transaction, so the queue survives `kill -9` of
//! any process using it, and several processes may share it: a receive takes
//! the write lock (`BEGIN IMMEDIATE`), so two workers never claim the same
//! message. Commits are not fsynced one by one (`synchronous = NORMAL`): a
//! power cut may lose the last few, a process crash loses nothing.
//!
//! Waiting receivers sleep until the earliest moment a message becomes
//! visible, or until a sender rings the doorbell: an in-process `Notify`,
//! and a file whose timestamp senders touch so that receivers in other
//! processes wake through inotify. No receiver polls, and a receiver takes
//! the write lock only once a read (which takes no lock) has seen a visible
//! message.
//!
//! Speed: each operation is a short transaction through cached prepared
//! statements, run on the calling async thread unless the connection is
//! busy or another process holds the lock, when it goes to a blocking
//! thread and waits there (see `with_conn`). SQLite's automatic checkpoint
//! is off; one runs every `CHECKPOINT_EVERY` commits on a blocking thread
//! through a connection of its own.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::Watcher;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DeadLetter, QueueError, Received, Stats};
use crate::config::LocalQueueConfig;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    body          TEXT NOT NULL,
    sent_at       INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt       TEXT,
    last_error    TEXT,
    dead_at       INTEGER
);
CREATE INDEX IF NOT EXISTS by_visibility ON messages (dead_at, visible_at, seq);
CREATE INDEX IF NOT EXISTS by_receipt ON messages (receipt);
";

/// A handle on one embedded queue; clones share the connection.
#[derive(Debug, Clone)]
pub struct LocalQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The queue's name in the config, for logs.
    name: String,
    /// One connection per process; SQLite serialises writers anyway.
    conn: Mutex<Connection>,
    /// Receives after which a message is dead-lettered instead of delivered.
    max_receive_count: u32,
    /// File touched after every change that may make a message visible.
    doorbell: PathBuf,
    /// Wakes this process's waiting receivers (from sends here, or from the
    /// doorbell watcher for sends elsewhere).
    arrivals: Arc<Notify>,
    /// Kept alive for as long as the queue is open.
    _watcher: notify::RecommendedWatcher,
    /// Sends waiting to be committed, together, by whoever commits next.
    pending: Mutex<Vec<PendingSend>>,
    /// Held by the one send committing the pending ones.
    committing: tokio::sync::Mutex<()>,
    /// Commits by this process, for checkpointing every so many.
    commits: AtomicU32,
    /// Set while a checkpoint runs.
    checkpointing: AtomicBool,
    /// The database file, and the connection checkpoints go through
    /// (opened by the first).
    path: PathBuf,
    checkpointer: Mutex<Option<Connection>>,
}

/// A send waiting for its commit: its id, body, and where to say how the
/// commit went.
type PendingSend = (
    String,
    String,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Commits between two checkpoints (each commit adds a few pages to the
/// write-ahead log; SQLite's default is a checkpoint per 1,000 pages).
const CHECKPOINT_EVERY: u32 = 256;

/// Rows an insert may hold and still count as short work (see `with_conn`).
const SHORT_INSERT: usize = 64;

enum Claim {
    Got(Received),
    /// Nothing visible; the earliest `visible_at` of any live message.
    Empty(Option<i64>),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl LocalQueue {
    pub async fn open(name: &str, config: &LocalQueueConfig) -> Result<Self, QueueError> {
        let name = name.to_owned();
        let config = config.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(name, &config))
            .await
            .map_err(unavailable)?
    }

    fn open_blocking(name: String, config: &LocalQueueConfig) -> Result<Self, QueueError> {
        let dir = &config.path;
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("queue.sqlite3");
        let conn = crate::sqlite::open(&path, SCHEMA).map_err(unavailable)?;
        // Checkpoints are started by `count_commit`, off the async threads.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(unavailable)?;

        let doorbell = dir.join("doorbell");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&doorbell)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", doorbell.display())))?;
        let arrivals = Arc::new(Notify::new());
        let wake = arrivals.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| e.kind.is_modify()) {
                    wake.notify_waiters();
                }
            })
            .map_err(unavailable)?;
        watcher
            .watch(&doorbell, notify::RecursiveMode::NonRecursive)
            .map_err(unavailable)?;

        Ok(Self {
            inner: Arc::new(Inner {
                name,
                conn: Mutex::new(conn),
                max_receive_count: config.max_receive_count,
                doorbell,
                arrivals,
                _watcher: watcher,
                pending: Mutex::default(),
                committing: tokio::sync::Mutex::new(()),
                commits: AtomicU32::new(0),
                checkpointing: AtomicBool::new(false),
                path,
                checkpointer: Mutex::default(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn max_receive_count(&self) -> u32 {
        self.inner.max_receive_count
    }

    /// Runs `f`, a short piece of work (one row or a few), on the
    /// connection. It runs right here when the connection is free and no
    /// other process holds the lock it needs: tens of microseconds, less
    /// than the trip to a blocking thread and back. Otherwise it runs on a
    /// blocking thread, which may wait for the lock.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        self.count_commit();
        if let Ok(mut conn) = self.inner.conn.try_lock()
            && let Some(done) = crate::sqlite::without_waiting(|| f(&mut conn))
        {
            return done;
        }
        self.with_conn_blocking(f).await
    }

    /// Runs `f` on the connection on a blocking thread: for work that may
    /// take long (a scan of the whole queue) or wait for a lock.
    async fn with_conn_blocking<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().map_err(unavailable)?;
            f(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }

    /// Counts a commit and, every `CHECKPOINT_EVERY`, starts a checkpoint
    /// on a blocking thread, through a connection of its own so that the
    /// queue's work goes on meanwhile. SQLite's own checkpoint would run
    /// inside a commit, on an async thread, with two fsyncs.
    fn count_commit(&self) {
        let inner = &self.inner;
        if inner.commits.fetch_add(1, Relaxed) % CHECKPOINT_EVERY != CHECKPOINT_EVERY - 1
            || inner.checkpointing.swap(true, Relaxed)
        {
            return;
        }
        let inner = inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut checkpointer = inner.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
            let checkpoint = match checkpointer.take() {
                Some(conn) => Ok(conn),
                None => crate::sqlite::open(&inner.path, ""),
            }
            .and_then(|conn| {
                // Passive: copies what it can without waiting for anyone.
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                *checkpointer = Some(conn);
                done
            });
            if let Err(error) = checkpoint {
                tracing::warn!(%error, queue = %inner.name, "checkpoint failed");
            }
            inner.checkpointing.store(false, Relaxed);
        });
    }

    /// Wakes receivers here and in other processes.
    fn ring(&self) {
        self.inner.arrivals.notify_waiters();
        let touched = std::fs::File::options()
            .write(true)
            .open(&self.inner.doorbell)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(error) = touched {
            tracing::warn!(%error, queue = %self.inner.name, "cannot ring the queue doorbell");
        }
    }

    /// Adds a message. Concurrent sends are committed together (group
    /// commit): each waits for the commit that holds it, and whoever gets
    /// to commit next takes every send waiting by then.
    pub async fn send(&self, body: &str) -> Result<String, QueueError> {
        let id = uuid::Uuid::new_v4().to_string();
        let (done, mut committed) = tokio::sync::oneshot::channel();
        self.inner
            .pending
            .lock()
            .map_err(unavailable)?
            .push((id.clone(), body.to_owned(), done));
        let turn = self.inner.committing.lock().await;
        match committed.try_recv() {
            // Committed (or failed) with the sends before it.
            Ok(result) => return result.map(|()| id).map_err(QueueError::Unavailable),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                return Err(QueueError::Unavailable(
                    "the commit holding this send was abandoned; it may or may not be queued"
                        .into(),
                ));
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        {
            // Not committed yet: commit everything waiting, this one too.
            let batch = std::mem::take(&mut *self.inner.pending.lock().map_err(unavailable)?);
            let (rows, waiters): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|(id, body, done)| ((id, body), done))
                .unzip();
            let result = self.insert(rows).await.map_err(|e| e.to_string());
            drop(turn);
            if result.is_ok() {
                self.ring();
            }
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
            result.map(|()| id).map_err(QueueError::Unavailable)
        }
    }

    /// Adds every body in one transaction: all or none.
    pub async fn send_batch(&self, bodies: &[String]) -> Result<Vec<String>, QueueError> {
        let rows: Vec<(String, String)> = bodies
            .iter()
            .map(|body| (uuid::Uuid::new_v4().to_string(), body.clone()))
            .collect();
        let ids = rows.iter().map(|(id, _)| id.clone()).collect();
        self.insert(rows).await?;
        self.ring();
        Ok(ids)
    }

    /// Inserts `(id, body)` rows in one transaction.
    async fn insert(&self, rows: Vec<(String, String)>) -> Result<(), QueueError> {
        let many = rows.len() > SHORT_INSERT;
        let insert = move |conn: &mut Connection| {
            let now = now_ms();
            let tx = conn.transaction().map_err(unavailable)?;
            for (id, body) in &rows {
                execute(
                    &tx,
                    "INSERT INTO messages (id, body, sent_at, visible_at) VALUES (?1, ?2, ?3, ?3)",
                    params![id, body, now],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        };
        if many {
            self.count_commit();
            self.with_conn_blocking(insert).await
        } else {
            self.with_conn(insert).await
        }
    }

    pub async fn receive(
        &self,
        wait: Duration,
        visibility: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Received>, QueueError> {
        let deadline = Instant::now() + wait;
        let max_receive_count = self.inner.max_receive_count;
        loop {
            // Register for wake-ups before looking, so a send that lands
            // between the look and the wait is not missed.
            let arrival = self.inner.arrivals.notified();
            tokio::pin!(arrival);
            arrival.as_mut().enable();

            let claim = self
                .with_conn(move |conn| claim(conn, ms(visibility), max_receive_count))
                .await?;
            let next_visible = match claim {
                Claim::Got(received) => return Ok(Some(received)),
                Claim::Empty(next_visible) => next_visible,
            };
            let now = Instant::now();
            if now >= deadline || stop.is_cancelled() {
                return Ok(None);
            }
            let wake_at = next_visible
                .map(|at| now + Duration::from_millis((at - now_ms()).max(1) as u64))
                .map_or(deadline, |at| at.min(deadline));
            // Only the wait is cut short by `stop`, never a claim.
            tokio::select! {
                _ = arrival => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = stop.cancelled() => return Ok(None),
            }
        }
    }

    pub async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        let receipt = receipt.to_owned();
        self.with_conn(move |conn| {
            let n = execute(
                conn,
                "DELETE FROM messages WHERE receipt = ?1 AND dead_at IS NULL",
                [&receipt],
            )
            .map_err(unavailable)?;
            if n == 0 {
                return Err(QueueError::StaleReceipt);
            }
            Ok(())
        })
        .await
    }

    /// Sets when the message becomes visible again, optionally recording the
    /// error that made the worker give it back.
    pub async fn set_visibility(
        &self,
        receipt: &str,
        visibility: Duration,
        error: Option<&str>,
    ) -> Result<(), QueueError> {
        let (receipt, error_text) = (receipt.to_owned(), error.map(str::to_owned));
        self.with_conn(move |conn| {
            let n = execute(
                conn,
                "UPDATE messages SET visible_at = ?2, last_error = COALESCE(?3, last_error)
                     WHERE receipt = ?1 AND dead_at IS NULL",
                params![receipt, now_ms() + ms(visibility), error_text],
            )
            .map_err(unavailable)?;
            if n == 0 {
                return Err(QueueError::StaleReceipt);
            }
            Ok(())
        })
        .await?;
        if error.is_some() {
            // The message may now come back sooner than sleeping receivers
            // expect; let them look again.
            self.ring();
        }
        Ok(())
    }

    /// Dead-letters the message as `body`. The row keeps its id, which is
    /// the one the submit returned.
    pub async fn dead_letter(
        &self,
        receipt: &str,
        body: &str,
        note: &DeadLetter,
    ) -> Result<(), QueueError> {
        let (receipt, body, note) = (receipt.to_owned(), body.to_owned(), note.clone());
        self.with_conn(move |conn| {
            let n = execute(
                conn,
                "UPDATE messages SET dead_at = ?2, receipt = NULL, last_error = ?3,
                        body = ?4, receive_count = ?5
                     WHERE receipt = ?1 AND dead_at IS NULL",
                params![receipt, now_ms(), note.reason, body, note.receive_count],
            )
            .map_err(unavailable)?;
            if n == 0 {
                return Err(QueueError::StaleReceipt);
            }
            Ok(())
        })
        .await
    }

    /// Makes the message visible at once with a new body (which carries the
    /// tries used so far), its receive count started again.
    pub async fn requeue(&self, receipt: &str, body: &str) -> Result<(), QueueError> {
        let (receipt, body) = (receipt.to_owned(), body.to_owned());
        self.with_conn(move |conn| {
            let n = execute(
                conn,
                "UPDATE messages SET body = ?2, visible_at = ?3, receipt = NULL,
                        receive_count = 0
                     WHERE receipt = ?1 AND dead_at IS NULL",
                params![receipt, body, now_ms()],
            )
            .map_err(unavailable)?;
            if n == 0 {
                return Err(QueueError::StaleReceipt);
            }
            Ok(())
        })
        .await?;
        self.ring();
        Ok(())
    }

    pub async fn stats(&self) -> Result<Stats, QueueError> {
        self.with_conn_blocking(|conn| {
            query_row(
                conn,
                "SELECT
                    COUNT(*) FILTER (WHERE dead_at IS NULL AND visible_at <= ?1),
                    COUNT(*) FILTER (WHERE dead_at IS NULL AND visible_at > ?1),
                    COUNT(*) FILTER (WHERE dead_at IS NOT NULL)
                 FROM messages",
                [now_ms()],
                |row| {
                    let count = |i| row.get::<_, i64>(i).map(|n| n as u64);
                    Ok(Stats {
                        visible: count(0)?,
                        in_flight: count(1)?,
                        dead_lettered: count(2)?,
                    })
                },
            )
            .map_err(unavailable)
        })
        .await
    }

    pub async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.with_conn_blocking(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, receive_count, last_error FROM messages
                     WHERE dead_at IS NOT NULL ORDER BY dead_at, seq LIMIT ?1",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([limit as i64], |row| {
                    Ok(DeadLetter {
                        message_id: text(row.get_ref(0)?),
                        receive_count: row.get(1)?,
                        reason: row
                            .get::<_, Option<String>>(2)?
                            .unwrap_or_else(|| "no reason recorded".into()),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    pub async fn dlq_redrive(&self, limit: usize) -> Result<usize, QueueError> {
        let moved = self
            .with_conn_blocking(move |conn| {
                execute(
                    conn,
                    "UPDATE messages SET dead_at = NULL, receive_count = 0, receipt = NULL,
                        last_error = NULL, visible_at = ?2
                     WHERE seq IN (SELECT seq FROM messages WHERE dead_at IS NOT NULL
                                   ORDER BY dead_at, seq LIMIT ?1)",
                    params![limit as i64, now_ms()],
                )
                .map_err(unavailable)
            })
            .await?;
        if moved > 0 {
            self.ring();
        }
        Ok(moved)
    }
}

/// Runs a statement through the connection's cache of prepared statements:
/// the queue's few statements are parsed once, not on every call.
fn execute(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Reads one row through the cache of prepared statements.
fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Claims the next visible message, dead-lettering on the way any that have
/// used up their receives (as an SQS redrive policy does on receive).
fn claim(
    conn: &mut Connection,
    visibility: i64,
    max_receive_count: u32,
) -> Result<Claim, QueueError> {
    let now = now_ms();
    // A look without the write lock first. Waiting receivers mostly find
    // nothing, and taking the lock only to find nothing would line every
    // waiting worker up behind the senders. (A message sent after this look
    // rings the doorbell, which the caller listens to from before it.)
    let next_visible = |conn: &Connection| {
        query_row(
            conn,
            "SELECT MIN(visible_at) FROM messages WHERE dead_at IS NULL",
            [],
            |row| row.get::<_, Option<i64>>(0),
        )
        .map_err(unavailable)
    };
    match next_visible(conn)? {
        Some(at) if at <= now => {}
        later => return Ok(Claim::Empty(later)),
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    loop {
        let next = query_row(
            &tx,
            "SELECT seq, id, body, receive_count FROM messages
                 WHERE dead_at IS NULL AND visible_at <= ?1
                 ORDER BY visible_at, seq LIMIT 1",
            [now],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    text(row.get_ref(1)?),
                    body(row.get_ref(2)?),
                    row.get::<_, i64>(3)?.clamp(0, u32::MAX.into()) as u32,
                ))
            },
        )
        .optional()
        .map_err(unavailable)?;
        let Some((seq, message_id, body, count)) = next else {
            let later = next_visible(&tx)?;
            tx.commit().map_err(unavailable)?;
            return Ok(Claim::Empty(later));
        };
        // A message no worker can decode is its own problem, not the
        // queue's: it goes to the dead-letter queue and the claim goes on.
        let body = match body {
            Ok(body) => body,
            Err(reason) => {
                dead_letter_row(&tx, seq, &reason, now)?;
                tracing::warn!(%message_id, %reason, "Moved undecodable message to the dead-letter queue.");
                continue;
            }
        };
        // The backstop, like an SQS redrive policy set one above the budget:
        // a worker sees the receive after the last try (and dead-letters it
        // as lost, counting it for its array); only if that worker dies too
        // does the queue dead-letter it here.
        if count > max_receive_count {
            let reason = format!("worker lost: receive {count} never reported back");
            execute(
                &tx,
                "UPDATE messages SET dead_at = ?2, receipt = NULL,
                    last_error = ?3 || COALESCE('; the try before failed: ' || last_error, '')
                 WHERE seq = ?1",
                params![seq, now, reason],
            )
            .map_err(unavailable)?;
            tracing::info!(%message_id, receives = count, "Moved job to the dead-letter queue.");
            continue;
        }
        let receipt = uuid::Uuid::new_v4().to_string();
        execute(
            &tx,
            "UPDATE messages SET receipt = ?2, receive_count = receive_count + 1, visible_at = ?3
             WHERE seq = ?1",
            params![seq, receipt, now + visibility],
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        return Ok(Claim::Got(Received {
            message_id,
            receipt,
            body,
            receive_count: count + 1,
        }));
    }
}

fn dead_letter_row(
    tx: &rusqlite::Transaction,
    seq: i64,
    reason: &str,
    now: i64,
) -> Result<(), QueueError> {
    execute(
        tx,
        "UPDATE messages SET dead_at = ?2, receipt = NULL, last_error = ?3 WHERE seq = ?1",
        params![seq, now, reason],
    )
    .map_err(unavailable)
    .map(drop)
}

/// Any column as text, for ids: rows may be written by hand.
fn text(value: ValueRef) -> String {
    match value {
        ValueRef::Null => String::new(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            String::from_utf8_lossy(bytes).into_owned()
        }
    }
}

/// A message body, which must be UTF-8 text (as SQS requires).
fn body(value: ValueRef) -> Result<String, String> {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("message body is not valid UTF-8 text: {}", e.utf8_error())),
        other => Ok(text(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(dir: &tempfile::TempDir, max_receive_count: u32) -> LocalQueue {
        let config = LocalQueueConfig {
            path: dir.path().to_owned(),
            max_receive_count,
        };
        LocalQueue::open("test", &config).await.unwrap()
    }

    const VIS: Duration = Duration::from_secs(30);
    const NO_WAIT: Duration = Duration::ZERO;
    static NEVER: std::sync::LazyLock<CancellationToken> =
        std::sync::LazyLock::new(CancellationToken::new);

    #[tokio::test]
    async fn received_message_is_hidden_until_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        let id = q.send("hello").await.unwrap();
        let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!(
            (got.message_id.as_str(), got.body.as_str()),
            (id.as_str(), "hello")
        );
        assert_eq!(got.receive_count, 1);
        assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
        q.delete(&got.receipt).await.unwrap();
        assert_eq!(
            q.stats().await.unwrap(),
            Stats {
                visible: 0,
                in_flight: 0,
                dead_lettered: 0
            }
        );
    }

    #[tokio::test]
    async fn stale_receipt_is_refused_after_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 5).await;
        q.send("x").await.unwrap();
        let first = q
            .receive(NO_WAIT, Duration::from_millis(1), &NEVER)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!(second.receive_count, 2);
        assert!(matches!(
            q.delete(&first.receipt).await,
            Err(QueueError::StaleReceipt)
        ));
        q.delete(&second.receipt).await.unwrap();
    }

    #[tokio::test]
    async fn long_poll_wakes_on_send() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        let receiver = {
            let q = q.clone();
            tokio::spawn(async move {
                q.receive(Duration::from_secs(20), VIS, &CancellationToken::new())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        q.send("wake").await.unwrap();
        let got = receiver.await.unwrap().unwrap().unwrap();
        assert_eq!(got.body, "wake");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn long_poll_wakes_on_send_from_another_handle() {
        // A second handle has its own connection and doorbell watcher, as a
        // second process would.
        let dir = tempfile::tempdir().unwrap();
        let receiver_side = queue(&dir, 3).await;
        let sender_side = queue(&dir, 3).await;
        let receiver = tokio::spawn(async move {
            receiver_side
                .receive(Duration::from_secs(20), VIS, &CancellationToken::new())
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        sender_side.send("across").await.unwrap();
        let got = receiver.await.unwrap().unwrap().unwrap();
        assert_eq!(got.body, "across");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stop_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        let stop = CancellationToken::new();
        let receiver = {
            let (q, stop) = (q.clone(), stop.clone());
            tokio::spawn(async move { q.receive(Duration::from_secs(20), VIS, &stop).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        stop.cancel();
        assert!(receiver.await.unwrap().unwrap().is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn redrive_policy_dead_letters_after_max_receives() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 2).await;
        q.send("doomed").await.unwrap();
        // Two tries, and the receive after them (where a worker would find
        // the budget spent), all left undeleted.
        for attempt in 1..=3 {
            let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
            assert_eq!(got.receive_count, attempt);
            q.set_visibility(&got.receipt, Duration::ZERO, Some("boom"))
                .await
                .unwrap();
        }
        assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
        let dead = q.dlq_list(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].receive_count, 3);
        assert!(dead[0].reason.contains("boom"), "{}", dead[0].reason);

        assert_eq!(q.dlq_redrive(10).await.unwrap(), 1);
        let back = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!((back.body.as_str(), back.receive_count), ("doomed", 1));
    }

    #[tokio::test]
    async fn dead_letter_keeps_reason() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        q.send("bad").await.unwrap();
        let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        let note = DeadLetter {
            message_id: got.message_id.clone(),
            receive_count: 1,
            reason: "command `rm` is not allowed".into(),
        };
        q.dead_letter(&got.receipt, "bad", &note).await.unwrap();
        let dead = q.dlq_list(10).await.unwrap();
        assert_eq!(dead[0].reason, "command `rm` is not allowed");
        assert_eq!(q.stats().await.unwrap().dead_lettered, 1);
    }

    #[tokio::test]
    async fn requeue_does_not_use_up_receives() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 1).await;
        q.send("v1").await.unwrap();
        let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        q.requeue(&got.receipt, "v2").await.unwrap();
        let again = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!((again.body.as_str(), again.receive_count), ("v2", 1));
        assert_eq!(again.message_id, got.message_id);
    }

    #[tokio::test]
    async fn undecodable_rows_are_dead_lettered_and_the_queue_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        {
            let conn = Connection::open(dir.path().join("queue.sqlite3")).unwrap();
            let insert =
                "INSERT INTO messages (id, body, sent_at, visible_at) VALUES (?1, ?2, 0, 0)";
            conn.execute(insert, params!["blob", b"\xff\xfe".to_vec()])
                .unwrap();
            conn.execute(insert, params![7, "later"]).unwrap();
            conn.execute(
                "INSERT INTO messages (id, body, sent_at, visible_at)
                 VALUES ('bad-text', CAST(X'C328' AS TEXT), 0, 0)",
                [],
            )
            .unwrap();
        }
        let good = q.send("fine").await.unwrap();
        let first = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!(
            (first.message_id.as_str(), first.body.as_str()),
            ("7", "later")
        );
        let second = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!(second.message_id, good);
        let dead = q.dlq_list(10).await.unwrap();
        let ids: Vec<_> = dead.iter().map(|d| d.message_id.as_str()).collect();
        assert_eq!(ids, ["blob", "bad-text"]);
        assert!(
            dead.iter().all(|d| d.reason.contains("not valid UTF-8")),
            "{dead:?}"
        );
    }

    #[tokio::test]
    async fn a_job_lost_on_its_last_try_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 2).await;
        q.send("x").await.unwrap();
        let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        q.set_visibility(&got.receipt, Duration::ZERO, Some("exit 1"))
            .await
            .unwrap();
        // The workers of the second and third receives die: the message
        // times out each time.
        for _ in 2..=3 {
            q.receive(NO_WAIT, Duration::from_millis(1), &NEVER)
                .await
                .unwrap()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
        let dead = q.dlq_list(10).await.unwrap();
        assert_eq!(
            dead[0].reason,
            "worker lost: receive 3 never reported back; the try before failed: exit 1"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sends_are_committed_together_and_all_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..500 {
            let q = q.clone();
            sends.spawn(async move { q.send(&format!("m{i}")).await });
        }
        let mut ids = std::collections::HashSet::new();
        while let Some(sent) = sends.join_next().await {
            assert!(ids.insert(sent.unwrap().unwrap()));
        }
        assert_eq!(q.stats().await.unwrap().visible, 500);
        let mut bodies = std::collections::HashSet::new();
        while let Some(got) = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap() {
            assert!(ids.contains(&got.message_id));
            bodies.insert(got.body);
        }
        assert_eq!(bodies.len(), 500);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn work_meeting_another_processs_lock_waits_for_it_off_the_async_threads() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir, 3).await;
        // Another process's writer, holding the lock for 300 ms.
        let holder = crate::sqlite::open(&dir.path().join("queue.sqlite3"), SCHEMA).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            holder.execute_batch("COMMIT").unwrap();
        });
        // The one async thread stays free meanwhile: a timer on it fires
        // on time.
        let ticker = tokio::spawn(async {
            let started = Instant::now();
            tokio::time::sleep(Duration::from_millis(50)).await;
            started.elapsed()
        });
        let sender = q.clone();
        let started = Instant::now();
        let id = tokio::spawn(async move { sender.send("{}").await })
            .await
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(ticker.await.unwrap() < Duration::from_millis(200));
        release.join().unwrap();
        let got = q
            .receive(
                Duration::ZERO,
                Duration::from_secs(30),
                &CancellationToken::new(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message_id, id);
    }

    #[tokio::test]
    async fn messages_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = queue(&dir, 3).await.send("durable").await.unwrap();
        let got = queue(&dir, 3)
            .await
            .receive(NO_WAIT, VIS, &NEVER)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message_id, id);
    }
}
