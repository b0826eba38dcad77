//! What workers record about jobs beside the queue itself: which failed
//! tries were reported (so a redelivery nobody reported is known to be a
//! lost worker), and which children of an array reached a final state (so
//! exactly one worker announces the array's completion).
//!
//! On the embedded queue the ledger is a SQLite file beside the queue. On
//! SQS it is objects under a prefix of an S3 bucket (`status_bucket`),
//! written with conditional writes (`If-None-Match: *`, `If-Match`): an
//! array's one winner is the write that made its last child final (see
//! `arrays`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use aws_sdk_s3::error::ProvideErrorMetadata;
use rusqlite::{Connection, OptionalExtension, params};

mod arrays;
mod cancels;
mod costs;
mod holds;
mod revisions;
mod thumbnails;
mod waits;
pub use arrays::{ArrayCounts, ChildState};
pub use cancels::Known as KnownCancels;
pub use holds::{Ended, EndsRead, Fate, ForeignEnd, ForeignWait, Freed, Registered, ToHold, Wait};
pub use revisions::ArrayRecord;
pub use thumbnails::thumbnail_name;
pub use waits::ParentWait;

#[derive(Debug, thiserror::Error)]
#[error("ledger: {0}")]
pub struct LedgerError(String);

fn failed(e: impl std::fmt::Display) -> LedgerError {
    LedgerError(e.to_string())
}

/// A conditional PUT's answer: true when written, false when its condition
/// failed (another writer was first).
fn written_if<R: std::fmt::Debug>(
    key: &str,
    sent: Result<
        aws_sdk_s3::operation::put_object::PutObjectOutput,
        aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::put_object::PutObjectError, R>,
    >,
) -> Result<bool, LedgerError> {
    match sent {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.code(),
                Some("PreconditionFailed" | "ConditionalRequestConflict" | "NoSuchKey")
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
    }
}

/// Every queue's ledger, by queue name (an SQS queue without a
/// `status_bucket` has none).
#[derive(Debug, Clone, Default)]
pub struct Ledgers(std::collections::BTreeMap<String, Ledger>);

impl FromIterator<(String, Ledger)> for Ledgers {
    fn from_iter<I: IntoIterator<Item = (String, Ledger)>>(ledgers: I) -> Self {
        Self(ledgers.into_iter().collect())
    }
}

impl Ledgers {
    pub fn open(
        configs: &std::collections::BTreeMap<String, crate::config::QueueConfig>,
        buckets: &crate::storage::Buckets,
    ) -> Result<Self, LedgerError> {
        use crate::config::QueueConfig;
        let mut ledgers = std::collections::BTreeMap::new();
        for (name, config) in configs {
            let ledger = match config {
                QueueConfig::Local(c) => Some(Ledger::local(&c.path)?),
                QueueConfig::Sqs(c) => {
                    match c.status_bucket.as_deref().and_then(|b| buckets.get(b)) {
                        Some(crate::storage::Bucket::S3(bucket)) => {
                            let (client, bucket) = bucket.client();
                            Some(Ledger::s3(
                                client.clone(),
                                bucket.to_owned(),
                                &c.status_prefix,
                                name,
                            ))
                        }
                        _ => None,
                    }
                }
            };
            if let Some(ledger) = ledger {
                ledgers.insert(name.clone(), ledger);
            }
        }
        Ok(Self(ledgers))
    }

    /// Puts `ledger` in the place of `queue`'s (a bench counts its calls).
    pub fn replace(&mut self, queue: &str, ledger: Ledger) {
        self.0.insert(queue.to_owned(), ledger);
    }

    pub fn get(&self, queue: &str) -> Option<&Ledger> {
        self.0.get(queue)
    }

    /// Every ledger, with its queue's name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Ledger)> {
        self.0.iter()
    }
}

#[derive(Debug, Clone)]
pub enum Ledger {
    Local(Arc<Mutex<Connection>>),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        /// `PREFIX/QUEUE/`, under which everything is kept.
        prefix: String,
        /// This process's array settles waiting to be written together.
        writes: arrays::Writes,
        /// This process's last LIST of the holds by hand.
        hands: holds::HandCache,
        /// Parents this process saw to have `same` dependants.
        parents: holds::KnownParents,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS reports (
    message_id TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    at         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, attempt)
);
CREATE TABLE IF NOT EXISTS children (
    array_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    state    TEXT NOT NULL,
    at       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (array_id, idx)
);
CREATE TABLE IF NOT EXISTS completed (
    array_id TEXT PRIMARY KEY,
    at       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS array_costs (
    array_id TEXT PRIMARY KEY,
    usd      REAL NOT NULL DEFAULT 0,
    reached  INTEGER NOT NULL DEFAULT 0,
    at       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cancelled (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    at     INTEGER NOT NULL
);
";

/// When each row was written (seconds since the epoch), for the prune;
/// files made by an earlier version gain the column.
const WRITTEN_AT: [&str; 3] = ["reports", "children", "completed"];

impl Ledger {
    /// The embedded queue's ledger, in `dir`.
    pub fn local(dir: &Path) -> Result<Self, LedgerError> {
        let mut conn = crate::sqlite::open(&dir.join("ledger.sqlite3"), SCHEMA).map_err(failed)?;
        for table in WRITTEN_AT {
            crate::sqlite::add_column(&conn, table, "at", "INTEGER NOT NULL DEFAULT 0")
                .map_err(failed)?;
        }
        cancels::migrate(&mut conn).map_err(failed)?;
        revisions::migrate(&conn).map_err(failed)?;
        conn.execute_batch(holds::SCHEMA).map_err(failed)?;
        crate::sqlite::add_column(&conn, "waits", "parent_queue", "TEXT").map_err(failed)?;
        Ok(Ledger::Local(Arc::new(Mutex::new(conn))))
    }

    pub fn s3(client: aws_sdk_s3::Client, bucket: String, prefix: &str, queue: &str) -> Self {
        Ledger::S3 {
            client,
            bucket,
            prefix: format!("{}/{queue}/", prefix.trim_end_matches('/')),
            writes: arrays::Writes::default(),
            hands: holds::HandCache::default(),
            parents: holds::KnownParents::default(),
        }
    }

    async fn sql<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(failed)?;
            f(&mut conn).map_err(failed)
        })
        .await
        .map_err(failed)?
    }

    /// Creates `key` unless it exists; true when this call created it.
    async fn create(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: String,
        body: impl Into<Vec<u8>>,
    ) -> Result<bool, LedgerError> {
        match client
            .put_object()
            .bucket(bucket)
            .key(&key)
            .if_none_match("*")
            .body(body.into().into())
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
        }
    }

    /// A JSON object and its ETag; `(None, None)` when there is none.
    async fn read_json<T: serde::de::DeserializeOwned>(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
    ) -> Result<(Option<T>, Option<String>), LedgerError> {
        let object = match client.get_object().bucket(bucket).key(key).send().await {
            Ok(object) => object,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Ok((None, None));
            }
            Err(e) => return Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
        };
        let etag = object.e_tag().map(str::to_owned);
        let body = object.body.collect().await.map_err(failed)?.into_bytes();
        let value =
            serde_json::from_slice(&body).map_err(|e| LedgerError(format!("{key}: {e}")))?;
        Ok((Some(value), etag))
    }

    /// Writes a JSON object if it is still the one read (`etag`; `None`:
    /// if there is none yet). False when another writer changed it first.
    async fn write_json_if<T: serde::Serialize>(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        value: &T,
        etag: Option<String>,
    ) -> Result<bool, LedgerError> {
        let body = serde_json::to_vec(value).map_err(failed)?;
        let put = client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(body.into());
        let put = match etag {
            Some(etag) => put.if_match(etag),
            None => put.if_none_match("*"),
        };
        written_if(key, put.send().await)
    }

    /// Whether `key` exists (a `HEAD`).
    async fn exists(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: String,
    ) -> Result<bool, LedgerError> {
        match client.head_object().bucket(bucket).key(&key).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) if e.code() == Some("NotFound") => Ok(false),
            Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
        }
    }

    /// Notes that try `attempt` of a job failed and was reported.
    pub async fn report_failure(&self, message_id: &str, attempt: u32) -> Result<(), LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let message_id = message_id.to_owned();
                Self::sql(conn, move |c| {
                    c.execute(
                        "INSERT OR IGNORE INTO reports (message_id, attempt, at)
                         VALUES (?1, ?2, ?3)",
                        params![message_id, attempt, crate::sqlite::now_s()],
                    )
                    .map(drop)
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = report_key(prefix, message_id, attempt);
                Self::create(client, bucket, key, "failed").await.map(drop)
            }
        }
    }

    /// Whether try `attempt` of a job was reported as failed.
    pub async fn was_reported(&self, message_id: &str, attempt: u32) -> Result<bool, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let message_id = message_id.to_owned();
                Self::sql(conn, move |c| {
                    c.query_row(
                        "SELECT 1 FROM reports WHERE message_id = ?1 AND attempt = ?2",
                        params![message_id, attempt],
                        |_| Ok(()),
                    )
                    .optional()
                    .map(|found| found.is_some())
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => Self::exists(client, bucket, report_key(prefix, message_id, attempt)).await,
        }
    }

    /// Deletes what is older than `retention`: failure reports, and the
    /// states of arrays none of whose children settled since. Returns the
    /// rows (or objects) deleted.
    pub async fn prune(&self, retention: std::time::Duration) -> Result<u64, LedgerError> {
        let cutoff = crate::sqlite::now_s() - retention.as_secs() as i64;
        match self {
            Ledger::Local(conn) => {
                Self::sql(conn, move |c| {
                    let tx = c.transaction()?;
                    let mut deleted = tx.execute("DELETE FROM reports WHERE at < ?1", [cutoff])?;
                    deleted += tx.execute(
                        "DELETE FROM children WHERE array_id IN
                         (SELECT array_id FROM children GROUP BY array_id HAVING MAX(at) < ?1)",
                        [cutoff],
                    )?;
                    deleted += tx.execute("DELETE FROM cancelled WHERE at < ?1", [cutoff])?;
                    deleted += revisions::prune(&tx, cutoff)?;
                    deleted += holds::prune(&tx, cutoff)?;
                    deleted += tx.execute("DELETE FROM array_costs WHERE at < ?1", [cutoff])?;
                    deleted += tx.execute(
                        "DELETE FROM completed WHERE at < ?1
                         AND array_id NOT IN (SELECT array_id FROM children)",
                        [cutoff],
                    )?;
                    tx.commit()?;
                    Ok(deleted as u64)
                })
                .await
            }
            // S3 expires these objects itself, by the bucket's lifecycle
            // rule on the status prefix (deploy/ sets one; see the README).
            Ledger::S3 { .. } => Ok(0),
        }
    }
}

/// Where the S3 ledger notes that try `attempt` of a job failed.
fn report_key(prefix: &str, message_id: &str, attempt: u32) -> String {
    format!("{prefix}reports/{message_id}/{attempt}")
}

#[cfg(test)]
mod tests {
    use super::arrays::tests::part;
    use super::*;
    use crate::job::ArrayPart;
    use std::time::Duration;

    #[tokio::test]
    async fn a_prune_deletes_what_is_older_than_the_retention_and_nothing_younger() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        ledger.report_failure("old", 1).await.unwrap();
        ledger
            .child_settled(&part(0, 1), ChildState::Succeeded)
            .await
            .unwrap();
        let Ledger::Local(conn) = &ledger else {
            unreachable!()
        };
        // Age what exists by two days; then add young rows.
        conn.lock()
            .unwrap()
            .execute_batch(
                "UPDATE reports SET at = at - 172800; UPDATE children SET at = at - 172800;
                 UPDATE completed SET at = at - 172800;",
            )
            .unwrap();
        ledger.report_failure("young", 1).await.unwrap();
        let young = ArrayPart {
            job_id: "b".into(),
            ..part(0, 2)
        };
        ledger
            .child_settled(&young, ChildState::Succeeded)
            .await
            .unwrap();

        let deleted = ledger.prune(Duration::from_secs(86400)).await.unwrap();
        assert_eq!(deleted, 3, "the old report, child and completion");
        assert!(!ledger.was_reported("old", 1).await.unwrap());
        assert!(ledger.was_reported("young", 1).await.unwrap());
        let rows: u32 = conn
            .lock()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM children WHERE array_id = 'b'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 1, "the young array is untouched");
    }

    #[tokio::test]
    async fn reports_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        assert!(!ledger.was_reported("m", 1).await.unwrap());
        ledger.report_failure("m", 1).await.unwrap();
        assert!(ledger.was_reported("m", 1).await.unwrap());
        assert!(!ledger.was_reported("m", 2).await.unwrap());
    }
}
