//! Holds by hand: a `holds` row per job or array held, its messages
//! parked in `held` (manual) until the release, and a cancel of what is
//! held. The S3 ledger keeps the same as objects (see `s3::hand`).

use rusqlite::{TransactionBehavior, params};

use super::Freed;
use crate::events::ledger::{Ledger, LedgerError};

impl Ledger {
    /// How long after a hold is recorded every worker's receive sees it:
    /// at once on the embedded queue; on S3, once each worker's cached
    /// LIST of the holds was made after it.
    pub fn hold_seen_within(&self) -> std::time::Duration {
        match self {
            Ledger::Local(_) => std::time::Duration::ZERO,
            Ledger::S3 { .. } => super::s3::HAND_CACHE,
        }
    }

    /// Holds a job or an array by hand; true when this call recorded it.
    /// Its held rows stay held even once their parents ended.
    pub async fn hold_by_hand(&self, job_id: &str) -> Result<bool, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_hold_by_hand(job_id).await,
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let new = tx.execute(
                "INSERT OR IGNORE INTO holds (job_id, at) VALUES (?1, ?2)",
                params![job_id, crate::sqlite::now_s()],
            )? == 1;
            tx.execute("UPDATE held SET manual = 1 WHERE job_id = ?1", [&job_id])?;
            tx.commit()?;
            Ok(new)
        })
        .await
    }

    /// Moves a received job held by hand (`by`: the id held) into the
    /// ledger; false when the hold was released meanwhile (the job goes
    /// back to the queue).
    pub async fn park(
        &self,
        by: &str,
        job_id: &str,
        size: u32,
        index: u32,
        body: String,
    ) -> Result<bool, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_park(by, job_id, size, index, body).await,
        };
        let (by, job_id) = (by.to_owned(), job_id.to_owned());
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !tx
                .prepare_cached("SELECT 1 FROM holds WHERE job_id = ?1")?
                .exists([&by])?
            {
                return Ok(false);
            }
            tx.execute(
                "INSERT OR REPLACE INTO held (job_id, idx, size, body, waits, manual, state, at)
                 VALUES (?1, ?2, ?3, ?4, 0, 1, 'held', ?5)",
                params![job_id, index, size, body, crate::sqlite::now_s()],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Which of `ids` (a message's job, array and message ids) is held by
    /// hand, if any. On S3: as of this process's LIST of the holds at most
    /// [`Ledger::hold_seen_within`] ago.
    pub async fn held_by_hand(&self, ids: Vec<String>) -> Result<Option<String>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_held_by_hand(ids).await,
        };
        Self::sql(conn, move |c| {
            let mut found = None;
            let mut query = c.prepare_cached("SELECT 1 FROM holds WHERE job_id = ?1")?;
            for id in ids {
                if query.exists([&id])? {
                    found = Some(id);
                    break;
                }
            }
            Ok(found)
        })
        .await
    }

    /// Releases a hold by hand: the rows that wait for nothing else are
    /// freed (to send); `None` when the job was not held by hand.
    pub async fn release_by_hand(&self, job_id: &str) -> Result<Option<Vec<Freed>>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_release_by_hand(job_id).await,
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if tx.execute("DELETE FROM holds WHERE job_id = ?1", [&job_id])? == 0 {
                return Ok(None);
            }
            tx.execute("UPDATE held SET manual = 0 WHERE job_id = ?1", [&job_id])?;
            let freed = tx
                .prepare_cached(
                    "UPDATE held SET state = 'releasing', by = 'hand', at = ?2
                     WHERE job_id = ?1 AND state = 'held' AND waits = 0
                     RETURNING job_id, idx, size, body",
                )?
                .query_map(params![job_id, crate::sqlite::now_s()], |r| {
                    Ok(Freed {
                        job_id: r.get(0)?,
                        index: r.get(1)?,
                        size: r.get(2)?,
                        body: r.get(3)?,
                        by: "hand".into(),
                        cancelled: None,
                        claim: None,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(Some(freed))
        })
        .await
    }

    /// Cancels a job's held rows (a cancel by hand): they are freed as
    /// cancelled, with `reason`.
    pub async fn cancel_held(&self, job_id: &str, reason: &str) -> Result<Vec<Freed>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_cancel_held(job_id, reason).await,
        };
        let (job_id, reason) = (job_id.to_owned(), reason.to_owned());
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM waits WHERE job_id = ?1", [&job_id])?;
            let freed = tx
                .prepare_cached(
                    "UPDATE held SET state = 'cancelling', by = ?2, at = ?3
                     WHERE job_id = ?1 AND state = 'held'
                     RETURNING job_id, idx, size, body",
                )?
                .query_map(params![job_id, reason, crate::sqlite::now_s()], |r| {
                    Ok(Freed {
                        job_id: r.get(0)?,
                        index: r.get(1)?,
                        size: r.get(2)?,
                        body: r.get(3)?,
                        by: reason.clone(),
                        cancelled: Some(reason.clone()),
                        claim: None,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(freed)
        })
        .await
    }
}
