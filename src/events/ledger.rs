//! What workers record about jobs beside the queue itself: which failed
//! tries were reported (so a redelivery nobody reported is known to be a
//! lost worker), and which children of an array reached a final state (so
//! exactly one worker announces the array's completion).
//!
//! On the embedded queue the ledger is a SQLite file beside the queue. On
//! SQS it is objects under a prefix of an S3 bucket (`status_bucket`), and
//! the one winner is decided by a conditional write (`If-None-Match: *`):
//! when two workers settle the last children at the same moment, both see
//! every child final, both try to create the `completed` object, and S3
//! lets exactly one succeed.

use std::path::Path;
use std::sync::{Arc, Mutex};

use aws_sdk_s3::error::ProvideErrorMetadata;
use rusqlite::{Connection, OptionalExtension, params};

use crate::job::ArrayPart;

mod cancels;
mod thumbnails;
pub use cancels::Known as KnownCancels;
pub use thumbnails::thumbnail_name;

/// A child's final state, ranked: a later variant replaces an earlier one
/// (a redriven child that then succeeds), never the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChildState {
    /// The submit gave up sending it: it will never run.
    NotSent,
    /// Cancelled before it could finish (a success that races the cancel
    /// still wins).
    Cancelled,
    DeadLettered,
    Succeeded,
}

impl ChildState {
    fn name(self) -> &'static str {
        match self {
            ChildState::NotSent => "not_sent",
            ChildState::Cancelled => "cancelled",
            ChildState::DeadLettered => "dead_lettered",
            ChildState::Succeeded => "succeeded",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Self::NotSent,
            Self::Cancelled,
            Self::DeadLettered,
            Self::Succeeded,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// An array's final counts, for `ArrayJobCompleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ArrayCounts {
    pub size: u32,
    pub succeeded: u32,
    pub dead_lettered: u32,
    pub cancelled: u32,
    /// Children the submit could not queue (it said which); absent when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub not_sent: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ArrayCounts {
    /// The counts from how many children are in each final state; and how
    /// many are final in all.
    fn tally(size: u32, states: impl IntoIterator<Item = (ChildState, u32)>) -> (u32, Self) {
        let mut counts = Self {
            size,
            succeeded: 0,
            dead_lettered: 0,
            cancelled: 0,
            not_sent: 0,
        };
        let mut done = 0;
        for (state, n) in states {
            done += n;
            *match state {
                ChildState::Succeeded => &mut counts.succeeded,
                ChildState::DeadLettered => &mut counts.dead_lettered,
                ChildState::NotSent => &mut counts.not_sent,
                ChildState::Cancelled => &mut counts.cancelled,
            } += n;
        }
        (done, counts)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("ledger: {0}")]
pub struct LedgerError(String);

fn failed(e: impl std::fmt::Display) -> LedgerError {
    LedgerError(e.to_string())
}

/// Every queue's ledger, by queue name (an SQS queue without a
/// `status_bucket` has none).
#[derive(Debug, Clone, Default)]
pub struct Ledgers(std::collections::BTreeMap<String, Ledger>);

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
CREATE TABLE IF NOT EXISTS cancelled (
    job_id TEXT PRIMARY KEY,
    at     INTEGER NOT NULL
);
";

/// When each row was written (seconds since the epoch), for the prune;
/// files made by an earlier version gain the column.
const WRITTEN_AT: [&str; 3] = ["reports", "children", "completed"];

impl Ledger {
    /// The embedded queue's ledger, in `dir`.
    pub fn local(dir: &Path) -> Result<Self, LedgerError> {
        let conn = crate::sqlite::open(&dir.join("ledger.sqlite3"), SCHEMA).map_err(failed)?;
        for table in WRITTEN_AT {
            crate::sqlite::add_column(&conn, table, "at", "INTEGER NOT NULL DEFAULT 0")
                .map_err(failed)?;
        }
        Ok(Ledger::Local(Arc::new(Mutex::new(conn))))
    }

    pub fn s3(client: aws_sdk_s3::Client, bucket: String, prefix: &str, queue: &str) -> Self {
        Ledger::S3 {
            client,
            bucket,
            prefix: format!("{}/{queue}/", prefix.trim_end_matches('/')),
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
            } => Self::exists(client, bucket, report_key(prefix, message_id, attempt)).await,
        }
    }

    /// Records a child's final state. When that makes every child final
    /// and this call is the one that claims the array's completion, returns
    /// the counts; every other call returns `None`.
    pub async fn child_settled(
        &self,
        array: &ArrayPart,
        state: ChildState,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        self.children_settled(&array.job_id, array.size, vec![array.index], state)
            .await
    }

    /// Records children's final state at once: ones the submit could not
    /// send (`NotSent`: so the array completes with the children that were
    /// sent), or ones a cancel deleted unrun. Returns the counts when that
    /// completed the array (and this call claimed it).
    pub async fn children_settled(
        &self,
        array_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    // One transaction: the count and the claim see the same
                    // rows, and only one process can hold the write lock.
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let now = crate::sqlite::now_s();
                    for index in indexes {
                        // A state replaces only a lower one (ChildState's
                        // order): a redriven child that then succeeds.
                        tx.execute(
                            "INSERT INTO children (array_id, idx, state, at) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (array_id, idx) DO UPDATE
                             SET state = excluded.state, at = excluded.at
                             WHERE excluded.state = 'succeeded'
                                OR (excluded.state = 'dead_lettered' AND state IN ('not_sent', 'cancelled'))
                                OR (excluded.state = 'cancelled' AND state = 'not_sent')",
                            params![array_id, index, state.name(), now],
                        )?;
                    }
                    let states = tx
                        .prepare_cached(
                            "SELECT state, COUNT(*) FROM children WHERE array_id = ?1 GROUP BY state",
                        )?
                        .query_map([&array_id], |row| {
                            Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
                        })?
                        .filter_map(|row| {
                            row.map(|(name, n)| ChildState::from_name(&name).map(|s| (s, n)))
                                .transpose()
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let (done, counts) = ArrayCounts::tally(size, states);
                    let claimed = done >= size
                        && tx.execute(
                            "INSERT OR IGNORE INTO completed (array_id, at) VALUES (?1, ?2)",
                            params![array_id, now],
                        )? == 1;
                    tx.commit()?;
                    Ok(claimed.then_some(counts))
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
            } => {
                let root = format!("{prefix}arrays/{array_id}/");
                if state == ChildState::NotSent {
                    // One object for all of them, written once by the submit.
                    let body = serde_json::to_vec(&indexes).map_err(failed)?;
                    Self::create(client, bucket, format!("{root}{NOT_SENT}"), body).await?;
                } else {
                    for index in indexes {
                        let key = format!("{root}{}/{index}", state.name());
                        Self::create(client, bucket, key, "final").await?;
                    }
                }
                let mut children = std::collections::BTreeMap::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&root)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| LedgerError(crate::aws::describe(&e)))?;
                    for object in page.contents() {
                        let Some(rest) = object.key().and_then(|k| k.strip_prefix(&root)) else {
                            continue;
                        };
                        if rest == NOT_SENT {
                            for index in Self::not_sent(client, bucket, &root).await? {
                                children.entry(index).or_insert(ChildState::NotSent);
                            }
                            continue;
                        }
                        let Some((state, index)) = rest.split_once('/') else {
                            continue;
                        };
                        let (Some(state), Ok(index)) =
                            (ChildState::from_name(state), index.parse::<u32>())
                        else {
                            continue;
                        };
                        let entry = children.entry(index).or_insert(state);
                        *entry = (*entry).max(state);
                    }
                }
                let (done, counts) =
                    ArrayCounts::tally(size, children.into_values().map(|state| (state, 1)));
                if done < size {
                    return Ok(None);
                }
                let won =
                    Self::create(client, bucket, format!("{root}completed"), "completed").await?;
                Ok(won.then_some(counts))
            }
        }
    }

    /// The S3 ledger's list of an array's children that were never sent.
    async fn not_sent(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        root: &str,
    ) -> Result<Vec<u32>, LedgerError> {
        let key = format!("{root}{NOT_SENT}");
        let object = client
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| LedgerError(format!("{key}: {}", crate::aws::describe(&e))))?;
        let body = object.body.collect().await.map_err(failed)?.into_bytes();
        serde_json::from_slice(&body).map_err(|e| LedgerError(format!("{key}: {e}")))
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

/// The S3 ledger's object listing an array's children that were not sent.
const NOT_SENT: &str = "not_sent";

/// Where the S3 ledger notes that try `attempt` of a job failed.
fn report_key(prefix: &str, message_id: &str, attempt: u32) -> String {
    format!("{prefix}reports/{message_id}/{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn part(index: u32, size: u32) -> ArrayPart {
        ArrayPart {
            job_id: "a".into(),
            index,
            size,
            frames: vec![index as i64],
        }
    }

    #[tokio::test]
    async fn the_last_child_claims_completion_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        assert_eq!(
            ledger
                .child_settled(&part(0, 3), ChildState::Succeeded)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            ledger
                .child_settled(&part(1, 3), ChildState::DeadLettered)
                .await
                .unwrap(),
            None
        );
        let counts = ledger
            .child_settled(&part(2, 3), ChildState::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            counts,
            Some(ArrayCounts {
                size: 3,
                succeeded: 2,
                dead_lettered: 1,
                cancelled: 0,
                not_sent: 0,
            })
        );
        // A repeat (a child run twice) claims nothing more.
        assert_eq!(
            ledger
                .child_settled(&part(2, 3), ChildState::Succeeded)
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn racing_last_children_make_exactly_one_winner() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let first = Ledger::local(dir.path()).unwrap();
            // A second connection, as another process would have.
            let second = Ledger::local(dir.path()).unwrap();
            first
                .child_settled(&part(0, 3), ChildState::Succeeded)
                .await
                .unwrap();
            let (one, two) = (part(1, 3), part(2, 3));
            let (a, b) = tokio::join!(
                first.child_settled(&one, ChildState::Succeeded),
                second.child_settled(&two, ChildState::DeadLettered),
            );
            let winners = [a.unwrap(), b.unwrap()].into_iter().flatten().count();
            assert_eq!(winners, 1);
        }
    }

    #[tokio::test]
    async fn children_not_sent_let_the_array_complete_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        ledger
            .child_settled(&part(0, 4), ChildState::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            ledger
                .children_settled("a", 4, vec![2, 3], ChildState::NotSent)
                .await
                .unwrap(),
            None
        );
        let counts = ledger
            .child_settled(&part(1, 4), ChildState::DeadLettered)
            .await
            .unwrap();
        assert_eq!(
            counts,
            Some(ArrayCounts {
                size: 4,
                succeeded: 1,
                dead_lettered: 1,
                cancelled: 0,
                not_sent: 2,
            })
        );
        let json = serde_json::to_value(counts.unwrap()).unwrap();
        assert_eq!(json["not_sent"], 2);
    }

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
