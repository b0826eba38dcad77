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
//! Each operation is one short transaction through cached prepared
//! statements; `db` decides which thread runs it, `claim` is the
//! receive's transaction, and `inspect` holds the whole-queue scans
//! (stats, dead letters, a cancel's deletes).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::Watcher;
use rusqlite::types::Value;
use rusqlite::{Connection, params};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DeadLetter, QueueError, Received};
use crate::config::LocalQueueConfig;
use claim::{Claim, claim};
use db::{Db, execute};

mod claim;
mod db;
mod inspect;

pub use inspect::Cancelled;

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
    /// The database, through one connection per process (SQLite
    /// serialises writers anyway).
    db: Arc<Db>,
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
}

/// A send waiting for its commit: its id, body, and where to say how the
/// commit went.
type PendingSend = (
    String,
    String,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Rows an insert may hold and still count as short work (see `Db::run`).
const SHORT_INSERT: usize = 64;

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
        let db = Db::open(dir.join("queue.sqlite3"), SCHEMA, &name)?;

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
                db: Arc::new(db),
                max_receive_count: config.max_receive_count,
                doorbell,
                arrivals,
                _watcher: watcher,
                pending: Mutex::default(),
                committing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn max_receive_count(&self) -> u32 {
        self.inner.max_receive_count
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
    pub async fn send_batch(
        &self,
        bodies: &[String],
    ) -> Result<Vec<Result<String, QueueError>>, QueueError> {
        let rows: Vec<(String, String)> = bodies
            .iter()
            .map(|body| (uuid::Uuid::new_v4().to_string(), body.clone()))
            .collect();
        let ids = rows.iter().map(|(id, _)| Ok(id.clone())).collect();
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
            self.inner.db.run_blocking(insert).await
        } else {
            self.inner.db.run(insert).await
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
                .inner
                .db
                .run(move |conn| claim(conn, ms(visibility), max_receive_count))
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
        self.change_held(
            "DELETE FROM messages WHERE receipt = ?1 AND dead_at IS NULL",
            receipt,
            vec![],
        )
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
        self.change_held(
            "UPDATE messages SET visible_at = ?2, last_error = COALESCE(?3, last_error)
             WHERE receipt = ?1 AND dead_at IS NULL",
            receipt,
            vec![
                (now_ms() + ms(visibility)).into(),
                error.map(str::to_owned).into(),
            ],
        )
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
        self.change_held(
            "UPDATE messages SET dead_at = ?2, receipt = NULL, last_error = ?3,
                body = ?4, receive_count = ?5
             WHERE receipt = ?1 AND dead_at IS NULL",
            receipt,
            vec![
                now_ms().into(),
                note.reason.clone().into(),
                body.to_owned().into(),
                note.receive_count.into(),
            ],
        )
        .await
    }

    /// Makes the message visible at once with a new body (which carries the
    /// tries used so far), its receive count started again.
    pub async fn requeue(
        &self,
        receipt: &str,
        body: &str,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let visible_at = now_ms().saturating_add(delay.as_millis() as i64);
        self.change_held(
            "UPDATE messages SET body = ?2, visible_at = ?3, receipt = NULL,
                receive_count = 0
             WHERE receipt = ?1 AND dead_at IS NULL",
            receipt,
            vec![body.to_owned().into(), visible_at.into()],
        )
        .await?;
        self.ring();
        Ok(())
    }

    /// Runs `statement` (`?1` is the receipt, `values` the rest) on the
    /// message `receipt` holds; `StaleReceipt` when the message has been
    /// received again since, or is gone.
    async fn change_held(
        &self,
        statement: &'static str,
        receipt: &str,
        values: Vec<Value>,
    ) -> Result<(), QueueError> {
        let mut all = vec![Value::from(receipt.to_owned())];
        all.extend(values);
        self.inner
            .db
            .run(move |conn| {
                let n = execute(conn, statement, rusqlite::params_from_iter(&all))
                    .map_err(unavailable)?;
                if n == 0 {
                    return Err(QueueError::StaleReceipt);
                }
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests;
