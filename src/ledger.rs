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

/// A child's final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    Succeeded,
    DeadLettered,
}

impl ChildState {
    fn name(self) -> &'static str {
        match self {
            ChildState::Succeeded => "succeeded",
            ChildState::DeadLettered => "dead_lettered",
        }
    }
}

/// An array's final counts, for `ArrayJobCompleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ArrayCounts {
    pub size: u32,
    pub succeeded: u32,
    pub dead_lettered: u32,
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
    PRIMARY KEY (message_id, attempt)
);
CREATE TABLE IF NOT EXISTS children (
    array_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    state    TEXT NOT NULL,
    PRIMARY KEY (array_id, idx)
);
CREATE TABLE IF NOT EXISTS completed (array_id TEXT PRIMARY KEY);
";

impl Ledger {
    /// The embedded queue's ledger, in `dir`.
    pub fn local(dir: &Path) -> Result<Self, LedgerError> {
        let conn = crate::sqlite::open(&dir.join("ledger.sqlite3"), SCHEMA).map_err(failed)?;
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
        body: &'static str,
    ) -> Result<bool, LedgerError> {
        match client
            .put_object()
            .bucket(bucket)
            .key(&key)
            .if_none_match("*")
            .body(body.as_bytes().to_vec().into())
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

    /// Notes that try `attempt` of a job failed and was reported.
    pub async fn report_failure(&self, message_id: &str, attempt: u32) -> Result<(), LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let message_id = message_id.to_owned();
                Self::sql(conn, move |c| {
                    c.execute(
                        "INSERT OR IGNORE INTO reports VALUES (?1, ?2)",
                        params![message_id, attempt],
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
            } => {
                let key = report_key(prefix, message_id, attempt);
                match client.head_object().bucket(bucket).key(&key).send().await {
                    Ok(_) => Ok(true),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
                    Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
                }
            }
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
        match self {
            Ledger::Local(conn) => {
                let (array_id, index, size) = (array.job_id.clone(), array.index, array.size);
                Self::sql(conn, move |c| {
                    // One transaction: the count and the claim see the same
                    // rows, and only one process can hold the write lock.
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    // A success replaces an earlier dead letter (a redrive
                    // that then succeeded); nothing replaces a success.
                    tx.execute(
                        "INSERT INTO children VALUES (?1, ?2, ?3)
                         ON CONFLICT (array_id, idx) DO UPDATE SET state = excluded.state
                         WHERE excluded.state = 'succeeded'",
                        params![array_id, index, state.name()],
                    )?;
                    let (done, succeeded): (u32, u32) = tx.query_row(
                        "SELECT COUNT(*), COUNT(*) FILTER (WHERE state = 'succeeded')
                         FROM children WHERE array_id = ?1",
                        [&array_id],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?;
                    let claimed = done >= size
                        && tx
                            .execute("INSERT OR IGNORE INTO completed VALUES (?1)", [&array_id])?
                            == 1;
                    tx.commit()?;
                    Ok(claimed.then_some(ArrayCounts {
                        size,
                        succeeded,
                        dead_lettered: done - succeeded,
                    }))
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
            } => {
                let root = format!("{prefix}arrays/{}/", array.job_id);
                let key = format!("{root}{}/{}", state.name(), array.index);
                Self::create(client, bucket, key, "final").await?;
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
                        let Some((state, index)) = rest.split_once('/') else {
                            continue;
                        };
                        let succeeded = state == ChildState::Succeeded.name();
                        let entry = children.entry(index.to_owned()).or_insert(false);
                        *entry |= succeeded;
                    }
                }
                let done = children.len() as u32;
                if done < array.size {
                    return Ok(None);
                }
                let succeeded = children.values().filter(|s| **s).count() as u32;
                let won =
                    Self::create(client, bucket, format!("{root}completed"), "completed").await?;
                Ok(won.then_some(ArrayCounts {
                    size: array.size,
                    succeeded,
                    dead_lettered: done - succeeded,
                }))
            }
        }
    }
}

/// Where the S3 ledger notes that try `attempt` of a job failed.
fn report_key(prefix: &str, message_id: &str, attempt: u32) -> String {
    format!("{prefix}reports/{message_id}/{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
                dead_lettered: 1
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
    async fn reports_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        assert!(!ledger.was_reported("m", 1).await.unwrap());
        ledger.report_failure("m", 1).await.unwrap();
        assert!(ledger.was_reported("m", 1).await.unwrap());
        assert!(!ledger.was_reported("m", 2).await.unwrap());
    }
}
