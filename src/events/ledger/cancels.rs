//! Cancelled jobs, as the ledger keeps them: a row per job id beside the
//! embedded queue, numbered by `AUTOINCREMENT` so that a number is never
//! used twice (a prune that empties the table does not start them again,
//! so a worker that has read up to row N never misses the rows after it),
//! and a stamp file holding the highest number given, which a worker reads
//! (a few microseconds) to learn whether to query; it is replaced whole by
//! a rename, so a reader never sees half of it. On S3 a marker object per
//! job id under `PREFIX/QUEUE/cancelled/`, and one index object that every
//! cancel rewrites after its marker, so that a worker learns of a change
//! with one `HEAD` and lists the markers only when the index changed.
//!
//! Ids are recorded and compared in their one spelling (`job::id`).
//!
//! A worker keeps what it learnt in [`Known`]. On S3 it refreshes it at
//! most once a period (see `worker::cancel`), never once per message.

use std::collections::HashSet;
use std::io::Write;

use rusqlite::{Connection, TransactionBehavior, params};

use super::{Ledger, LedgerError};
use crate::job::id::Id;

/// The S3 ledger's object rewritten by every cancel.
const INDEX: &str = "cancelled.index";
/// The S3 ledger's folder of markers, one per cancelled job id.
const MARKERS: &str = "cancelled/";

/// The cancelled table of ledgers made before its rows were numbered by
/// `AUTOINCREMENT`, and what makes it so: a new table keeping each row's
/// number (so workers that read up to one read on from there).
const MIGRATE: &str = "
CREATE TABLE cancelled_numbered (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    at     INTEGER NOT NULL
);
INSERT INTO cancelled_numbered (seq, job_id, at) SELECT rowid, job_id, at FROM cancelled;
DROP TABLE cancelled;
ALTER TABLE cancelled_numbered RENAME TO cancelled;
";

/// Numbers the rows of an embedded ledger's cancelled table with
/// `AUTOINCREMENT` when an earlier version made it without; once, however
/// many processes open the file together.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let numbered = |conn: &Connection| {
        conn.prepare("SELECT 1 FROM pragma_table_info('cancelled') WHERE name = 'seq'")?
            .exists([])
    };
    if numbered(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have done it while this one waited for the lock.
    if !numbered(&tx)? {
        tx.execute_batch(MIGRATE)?;
        tracing::info!("numbered the ledger's cancelled jobs (AUTOINCREMENT)");
    }
    tx.commit()
}

/// The cancelled job ids a worker knows of, and how far it has read.
#[derive(Debug, Default)]
pub struct Known {
    /// In their one spelling.
    ids: HashSet<String>,
    /// The last row read (embedded) or the index's ETag (S3).
    version: Option<String>,
    /// The embedded ledger's stamp file.
    stamp: Option<std::path::PathBuf>,
    /// What the stamp said when the rows were last read (embedded).
    stamp_seen: Option<String>,
}

impl Known {
    /// Whether `job_id`, however it is spelt, was cancelled.
    pub fn contains(&self, job_id: &str) -> bool {
        self.ids.contains(job_id)
            || Id::parse(job_id).is_ok_and(|id| self.ids.contains(id.as_str()))
    }

    /// How far it has read: it changes with every cancel read.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Adds ids read from the ledger; one that is not an id names no job.
    fn extend(&mut self, ids: impl IntoIterator<Item = String>) {
        self.ids.extend(
            ids.into_iter()
                .filter_map(|id| Id::parse(&id).ok())
                .map(|id| id.to_string()),
        );
    }
}

impl Ledger {
    /// Records that a job, or every child of an array, is cancelled.
    /// True when this call recorded it; false when it already was.
    pub async fn cancel(&self, job_id: &Id) -> Result<bool, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let job_id = job_id.to_string();
                let (new, last) = Self::sql(conn, move |c| {
                    let new = c.execute(
                        "INSERT OR IGNORE INTO cancelled (job_id, at) VALUES (?1, ?2)",
                        params![job_id, crate::sqlite::now_s()],
                    )? == 1;
                    // The highest number ever given, which a prune does not
                    // lower.
                    let last: i64 = c.query_row(
                        "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'cancelled'",
                        [],
                        |r| r.get(0),
                    )?;
                    Ok((new, last))
                })
                .await?;
                // After the row is committed: a reader that sees the stamp
                // finds the row.
                let stamp = stamp_path(conn)?;
                tokio::task::spawn_blocking(move || write_whole(&stamp, &last.to_string()))
                    .await
                    .map_err(super::failed)??;
                Ok(new)
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let marker = format!("{prefix}{MARKERS}{job_id}");
                let new = Self::create(client, bucket, marker, "cancelled").await?;
                // Rewritten even when the marker existed: a cancel that died
                // between the two writes is finished by the next one.
                let key = format!("{prefix}{INDEX}");
                let stamp = format!("{job_id} {}", chrono::Utc::now().to_rfc3339());
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(stamp.into_bytes().into())
                    .send()
                    .await
                    .map_err(|e| LedgerError(format!("{key}: {}", crate::aws::describe(&e))))?;
                Ok(new)
            }
        }
    }

    /// Brings `known` up to date with the cancels recorded since it was
    /// last refreshed.
    pub async fn refresh_cancelled(&self, known: &mut Known) -> Result<(), LedgerError> {
        match self {
            Ledger::Local(conn) => {
                if known.stamp.is_none() {
                    known.stamp = Some(stamp_path(conn)?);
                }
                let stamp = match known.stamp.as_ref().map(std::fs::read_to_string) {
                    // No cancel was ever recorded here.
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Some(Ok(stamp)) => Some(stamp),
                    // Unreadable: query.
                    _ => None,
                };
                if stamp.is_some() && stamp == known.stamp_seen {
                    return Ok(());
                }
                let after: i64 = known
                    .version
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let rows = Self::sql(conn, move |c| {
                    c.prepare_cached(
                        "SELECT seq, job_id FROM cancelled WHERE seq > ?1 ORDER BY seq",
                    )?
                    .query_map([after], |row| Ok((row.get::<_, i64>(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<(i64, String)>>>()
                })
                .await?;
                if let Some((last, _)) = rows.last() {
                    known.version = Some(last.to_string());
                }
                // Read before the rows, so every row it counts was read.
                known.stamp_seen = stamp;
                known.extend(rows.into_iter().map(|(_, id)| id));
                Ok(())
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = format!("{prefix}{INDEX}");
                let etag = match client.head_object().bucket(bucket).key(&key).send().await {
                    Ok(head) => head.e_tag,
                    // Nothing was ever cancelled on this queue.
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e))));
                    }
                };
                if etag.is_some() && etag == known.version {
                    return Ok(());
                }
                let root = format!("{prefix}{MARKERS}");
                let mut ids = Vec::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&root)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| LedgerError(crate::aws::describe(&e)))?;
                    ids.extend(
                        page.contents()
                            .iter()
                            .filter_map(|o| o.key()?.strip_prefix(&root).map(str::to_owned)),
                    );
                }
                *known = Known {
                    version: etag,
                    ..Known::default()
                };
                known.extend(ids);
                Ok(())
            }
        }
    }
}

/// The embedded ledger's folder (the queue's).
pub(super) fn ledger_dir(
    conn: &std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
) -> Result<std::path::PathBuf, LedgerError> {
    let conn = conn.lock().map_err(|e| LedgerError(e.to_string()))?;
    let db = conn
        .path()
        .ok_or_else(|| LedgerError("the ledger has no file".into()))?;
    Ok(std::path::Path::new(db)
        .parent()
        .map(std::path::Path::to_owned)
        .unwrap_or_default())
}

/// Replaces `path` with `text` in one step (a rename), so that a reader
/// sees the old text or the new, never part of either.
fn write_whole(path: &std::path::Path, text: &str) -> Result<(), LedgerError> {
    let failed = |e: std::io::Error| LedgerError(format!("{}: {e}", path.display()));
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)?;
    file.persist(path).map_err(|e| failed(e.error))?;
    Ok(())
}

/// The embedded ledger's stamp file, beside its database.
fn stamp_path(
    conn: &std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
) -> Result<std::path::PathBuf, LedgerError> {
    Ok(ledger_dir(conn)?.join("cancelled.stamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Id {
        Id::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
    }

    #[tokio::test]
    async fn a_cancel_is_recorded_once_and_seen_by_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        // Another process's connection, as a worker would have.
        let worker = Ledger::local(dir.path()).unwrap();
        let mut known = Known::default();
        worker.refresh_cancelled(&mut known).await.unwrap();
        let (a, b) = (id(), id());
        assert!(!known.contains(a.as_str()));

        assert!(ledger.cancel(&a).await.unwrap());
        assert!(
            !ledger.cancel(&a).await.unwrap(),
            "a second cancel is not new"
        );
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(known.contains(a.as_str()));
        assert!(
            known.contains(&a.as_str().to_uppercase()),
            "any spelling of the id"
        );
        ledger.cancel(&b).await.unwrap();
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(known.contains(a.as_str()) && known.contains(b.as_str()));
    }

    /// Ages every cancel row by two days.
    fn age(ledger: &Ledger) {
        let Ledger::Local(conn) = ledger else {
            unreachable!()
        };
        conn.lock()
            .unwrap()
            .execute("UPDATE cancelled SET at = at - 172800", [])
            .unwrap();
    }

    #[tokio::test]
    async fn a_cancel_after_a_prune_emptied_the_table_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        let worker = Ledger::local(dir.path()).unwrap();
        let mut known = Known::default();
        for _ in 0..5 {
            ledger.cancel(&id()).await.unwrap();
        }
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert_eq!(known.version(), Some("5"));
        age(&ledger);
        assert_eq!(
            ledger
                .prune(std::time::Duration::from_secs(86400))
                .await
                .unwrap(),
            5
        );

        // Numbers are not given again: the new row is the sixth.
        let late = id();
        ledger.cancel(&late).await.unwrap();
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(known.contains(late.as_str()));
        assert_eq!(known.version(), Some("6"));
    }

    #[tokio::test]
    async fn an_earlier_ledgers_cancels_are_numbered_on_open_keeping_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (id(), id(), id());
        {
            // The table as earlier versions made it, after a prune that
            // deleted its last row (row numbers then come again).
            let conn = rusqlite::Connection::open(dir.path().join("ledger.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE cancelled (job_id TEXT PRIMARY KEY, at INTEGER NOT NULL);",
            )
            .unwrap();
            for job in [&a, &b, &c] {
                conn.execute(
                    "INSERT INTO cancelled (job_id, at) VALUES (?1, 0)",
                    [job.as_str()],
                )
                .unwrap();
            }
            conn.execute("DELETE FROM cancelled WHERE job_id = ?1", [c.as_str()])
                .unwrap();
        }
        // Two processes open it together: one numbers it.
        let (first, second) = (dir.path().to_owned(), dir.path().to_owned());
        let opened = [
            std::thread::spawn(move || Ledger::local(&first).map(drop)),
            std::thread::spawn(move || Ledger::local(&second).map(drop)),
        ];
        for open in opened {
            open.join().unwrap().unwrap();
        }
        let ledger = Ledger::local(dir.path()).unwrap();
        let Ledger::Local(conn) = &ledger else {
            unreachable!()
        };
        let rows: Vec<(i64, String)> = conn
            .lock()
            .unwrap()
            .prepare("SELECT seq, job_id FROM cancelled ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![(1, a.to_string()), (2, b.to_string())]);

        // From now on a number is never given twice.
        age(&ledger);
        ledger
            .prune(std::time::Duration::from_secs(86400))
            .await
            .unwrap();
        let d = id();
        ledger.cancel(&d).await.unwrap();
        let mut known = Known::default();
        ledger.refresh_cancelled(&mut known).await.unwrap();
        assert_eq!(known.version(), Some("3"));
        assert!(known.contains(d.as_str()) && !known.contains(a.as_str()));
    }

    #[test]
    fn the_stamp_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cancelled.stamp");
        write_whole(&path, "12").unwrap();
        write_whole(&path, "9").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "9");
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
