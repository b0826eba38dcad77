//! What a re-render needs of an array, kept from its submit: the array's
//! job as it was sent (parameters, pinned inputs, tasks, notifications,
//! label), its frames and chunks; and the count of its revisions, each
//! taken once.
//!
//! Beside the embedded queue: a row per array in `submitted`, whose
//! `revision` an `UPDATE … RETURNING` raises. On S3: the object
//! `PREFIX/QUEUE/arrays/ID/submit`, and one object per revision after the
//! first (`arrays/ID/revisions/N`), each created with `If-None-Match: *`,
//! so two re-renders at once never take the same number. The status table
//! is not asked: it is optional, and it holds no job's parameters.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Ledger, LedgerError, failed};
use crate::job::Envelope;

/// An array as its submit sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayRecord {
    /// The array's job, before it was cut into children: its `job_id` is
    /// the array's.
    pub envelope: Envelope,
    /// Its frames as submitted.
    pub frame_spec: String,
    pub chunk_size: u32,
    /// Whether each child gets its first frame as the `frame` parameter.
    pub has_frame: bool,
    /// Children of the first revision.
    pub size: u32,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS submitted (
    array_id TEXT PRIMARY KEY,
    body     TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    at       INTEGER NOT NULL DEFAULT 0
);
";

/// Adds the table to a ledger file made before re-renders.
pub(super) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// Prunes the records of arrays older than `cutoff` (seconds).
pub(super) fn prune(tx: &rusqlite::Transaction, cutoff: i64) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM submitted WHERE at < ?1", [cutoff])
}

impl Ledger {
    /// Keeps what a later re-render of `record`'s array needs. A second
    /// record of the same array changes nothing.
    pub async fn record_array(&self, record: &ArrayRecord) -> Result<(), LedgerError> {
        let body = serde_json::to_string(record).map_err(failed)?;
        let array_id = record.envelope.job_id.clone();
        match self {
            Ledger::Local(conn) => {
                Self::sql(conn, move |c| {
                    c.execute(
                        "INSERT OR IGNORE INTO submitted (array_id, body, at) VALUES (?1, ?2, ?3)",
                        params![array_id, body, crate::sqlite::now_s()],
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
            } => Self::create(client, bucket, submit_key(prefix, &array_id), body)
                .await
                .map(drop),
        }
    }

    /// The record of array `array_id`; `None` when this ledger kept none.
    pub async fn array_record(&self, array_id: &str) -> Result<Option<ArrayRecord>, LedgerError> {
        let body: Option<Vec<u8>> = match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    c.query_row(
                        "SELECT body FROM submitted WHERE array_id = ?1",
                        [array_id],
                        |row| row.get::<_, String>(0),
                    )
                    .optional()
                })
                .await?
                .map(String::into_bytes)
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = submit_key(prefix, array_id);
                match client.get_object().bucket(bucket).key(&key).send().await {
                    Ok(object) => Some(
                        object
                            .body
                            .collect()
                            .await
                            .map_err(failed)?
                            .into_bytes()
                            .to_vec(),
                    ),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => None,
                    Err(e) => {
                        return Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e))));
                    }
                }
            }
        };
        body.map(|body| {
            serde_json::from_slice(&body)
                .map_err(|e| LedgerError(format!("array {array_id}'s record: {e}")))
        })
        .transpose()
    }

    /// Takes the next revision of `array_id` (2 for its first re-render),
    /// once: two callers never get the same number. `None` when that would
    /// pass `max` revisions.
    pub async fn take_revision(
        &self,
        array_id: &str,
        max: u32,
    ) -> Result<Option<u32>, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    c.query_row(
                        "UPDATE submitted SET revision = revision + 1, at = ?3
                         WHERE array_id = ?1 AND revision < ?2 RETURNING revision",
                        params![array_id, max, crate::sqlite::now_s()],
                        |row| row.get(0),
                    )
                    .optional()
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                // At most `max` creates: the numbers taken are a prefix.
                for number in 2..=max {
                    let key = format!("{prefix}arrays/{array_id}/revisions/{number}");
                    if Self::create(client, bucket, key, "taken").await? {
                        return Ok(Some(number));
                    }
                }
                Ok(None)
            }
        }
    }
}

fn submit_key(prefix: &str, array_id: &str) -> String {
    format!("{prefix}arrays/{array_id}/submit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_array_is_recorded_once_and_its_revisions_are_taken_in_turn_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        let envelope = Envelope::new("sleep".into(), Default::default(), vec![]);
        let record = ArrayRecord {
            envelope: envelope.clone(),
            frame_spec: "1-10".into(),
            chunk_size: 2,
            has_frame: false,
            size: 5,
        };
        assert_eq!(ledger.array_record(&envelope.job_id).await.unwrap(), None);
        assert_eq!(
            ledger.take_revision(&envelope.job_id, 3).await.unwrap(),
            None
        );
        ledger.record_array(&record).await.unwrap();
        let again = ArrayRecord {
            size: 9,
            ..record.clone()
        };
        ledger.record_array(&again).await.unwrap();
        assert_eq!(
            ledger.array_record(&envelope.job_id).await.unwrap(),
            Some(record)
        );
        let taken = [
            ledger.take_revision(&envelope.job_id, 3).await.unwrap(),
            ledger.take_revision(&envelope.job_id, 3).await.unwrap(),
            ledger.take_revision(&envelope.job_id, 3).await.unwrap(),
        ];
        assert_eq!(taken, [Some(2), Some(3), None]);
    }
}
