//! Held jobs: dependants waiting for their parents, and jobs held by hand,
//! kept in the ledger (not the queue) with their messages ready to send.
//!
//! Beside the embedded queue, in the ledger's SQLite file:
//! - `dep_jobs`: every job an endpoint submitted (its size, frames and
//!   chunking), so that a dependant's submit knows its parents;
//! - `dep_ends`: the end of each plain job (an array's children are in
//!   `children`);
//! - `held`: a row per held job or child, with its body and how many
//!   parent units it still waits for;
//! - `waits`: a row per (parent unit, dependant child) edge, `parent_idx`
//!   -1 for a whole parent, `parent_queue` the parent's queue when it is
//!   another (see `foreign`);
//! - `foreign_waits`: which other queues keep dependants of a job of this
//!   queue (see `foreign`).
//!
//! Exactly once: a parent unit's end deletes its `waits` rows in the same
//! transaction that counts them off the dependants (`DELETE … RETURNING`),
//! so however many workers settle, each edge is spent once; the write that
//! brings a dependant to zero moves it to `releasing`, and only then is its
//! message sent (and the row marked `released`). A row left `releasing` or
//! `cancelling` by a worker that died is taken again by the sweep
//! ([`Ledger::stale_holds`]), one sweeper per row.
//!
//! The S3 ledger keeps the same as objects (see `s3`), holds by hand
//! included (see `s3::hand`: on SQS a hold's messages are held at
//! receive).

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{ChildState, Ledger, LedgerError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dep_jobs (
    job_id     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    frames     TEXT,
    chunk_size INTEGER NOT NULL DEFAULT 1,
    at         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dep_ends (
    job_id TEXT PRIMARY KEY,
    state  TEXT NOT NULL,
    at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS held (
    job_id  TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    body    TEXT NOT NULL,
    waits   INTEGER NOT NULL,
    manual  INTEGER NOT NULL DEFAULT 0,
    state   TEXT NOT NULL,
    by      TEXT,
    at      INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS held_state ON held (state, at);
CREATE TABLE IF NOT EXISTS waits (
    parent_id  TEXT NOT NULL,
    parent_idx INTEGER NOT NULL,
    job_id     TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    on_finish  INTEGER NOT NULL,
    parent_queue TEXT,
    PRIMARY KEY (parent_id, parent_idx, job_id, idx)
);
CREATE TABLE IF NOT EXISTS foreign_waits (
    parent_id TEXT NOT NULL,
    queue     TEXT NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (parent_id, queue)
);
CREATE TABLE IF NOT EXISTS holds (
    job_id TEXT PRIMARY KEY,
    at     INTEGER NOT NULL
);
";

/// A whole parent, in `waits.parent_idx`.
const WHOLE: i64 = -1;

/// A job as the ledger knows it from its submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Children; 0 for a plain job.
    pub size: u32,
    /// Its frame spec (an array's).
    pub frames: Option<String>,
    pub chunk_size: u32,
}

/// A parent unit a dependant child waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub parent_id: String,
    /// The parent child; `None`: the whole parent (and a plain job).
    pub index: Option<u32>,
    pub on_finish: bool,
    /// The parent's queue when it is not the dependant's own (see
    /// `foreign`): its end is read from that queue's ledger.
    pub queue: Option<String>,
}

/// A job or child to hold: its message, and what it waits for.
#[derive(Debug, Clone)]
pub struct ToHold {
    /// 0 for a plain job.
    pub index: u32,
    pub body: String,
    pub waits: Vec<Wait>,
}

/// What became of a job or child that was to be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Nothing left to wait for: send it now.
    Send,
    /// Held in the ledger; waits for this many parent units.
    Held(u32),
    /// A parent it waits for on success already failed.
    Cancelled(String),
}

/// Array children's end with the reads of its release done (see
/// [`Ledger::read_ends`]).
#[derive(Debug)]
pub struct EndsRead {
    parent_id: String,
    size: u32,
    indexes: Vec<u32>,
    state: ChildState,
    s3: Option<s3::S3Read>,
    /// Edges a read from kept edges spent already.
    spent: Spent,
}

/// A held child the ledger gave up: released (send `body`) or cancelled
/// (`reason`), by the parent `by`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freed {
    pub job_id: String,
    pub index: u32,
    /// The dependant's size: 0 for a plain job.
    pub size: u32,
    pub body: String,
    /// What freed it: `parent ID frame N`, or `hand`.
    pub by: String,
    /// Set when it is cancelled, with the reason.
    pub cancelled: Option<String>,
    /// The S3 ledger's claim that freed it, naming its `releasing/`
    /// marker (`None` on the embedded ledger, and for a submit's cancel).
    pub claim: Option<String>,
}

fn is_final(state: &str) -> bool {
    matches!(
        state,
        "succeeded" | "dead_lettered" | "cancelled" | "not_sent"
    )
}

impl Ledger {
    /// Records a submitted job (`size` 0: a plain job) so that dependants
    /// can name it.
    pub async fn register_job(
        &self,
        job_id: &str,
        size: u32,
        frames: Option<String>,
        chunk_size: u32,
    ) -> Result<(), LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => {
                let registered = Registered {
                    size,
                    frames,
                    chunk_size,
                };
                return self.s3_register(job_id, registered).await;
            }
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            c.execute(
                "INSERT OR IGNORE INTO dep_jobs (job_id, size, frames, chunk_size, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job_id, size, frames, chunk_size, crate::sqlite::now_s()],
            )
            .map(drop)
        })
        .await
    }

    /// A job's registration; `None` when this ledger never saw it.
    pub async fn registered(&self, job_id: &str) -> Result<Option<Registered>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_registered(job_id).await,
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            c.query_row(
                "SELECT size, frames, chunk_size FROM dep_jobs WHERE job_id = ?1",
                [job_id],
                |r| {
                    Ok(Registered {
                        size: r.get(0)?,
                        frames: r.get(1)?,
                        chunk_size: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Holds a job (one entry, index 0) or an array's children: each is
    /// checked against its parents' ends and what is left to wait for is
    /// recorded, in one transaction; `manual` holds them by hand too.
    pub async fn hold(
        &self,
        job_id: &str,
        size: u32,
        entries: Vec<ToHold>,
        manual: bool,
    ) -> Result<Vec<Fate>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_hold(job_id, size, entries, manual).await,
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = crate::sqlite::now_s();
            let mut fates = Vec::with_capacity(entries.len());
            for entry in entries {
                let mut waiting = 0u32;
                let mut cancelled = None;
                for wait in &entry.waits {
                    // A parent on another queue ends in its own ledger: the
                    // submit reads that after writing the edge (`foreign`).
                    let end = match wait.queue {
                        Some(_) => None,
                        None => unit_end(&tx, &wait.parent_id, wait.index)?,
                    };
                    match end {
                        None => {
                            tx.prepare_cached(
                                "INSERT OR IGNORE INTO waits (parent_id, parent_idx, job_id, idx, on_finish, parent_queue)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            )?
                            .execute(params![
                                wait.parent_id,
                                wait.index.map_or(WHOLE, i64::from),
                                job_id,
                                entry.index,
                                wait.on_finish,
                                wait.queue
                            ])?;
                            waiting += 1;
                        }
                        Some((state, at)) if state != "succeeded" && !wait.on_finish => {
                            cancelled.get_or_insert_with(|| {
                                failed_reason(&wait.parent_id, at.as_deref(), &state)
                            });
                        }
                        Some(_) => {}
                    }
                }
                // A cancelled one is `cancelling` until its end is recorded
                // (the sweep finishes it should the submit die first).
                let by = cancelled.clone();
                let (state, fate) = match cancelled {
                    Some(reason) => ("cancelling", Fate::Cancelled(reason)),
                    None if waiting == 0 && !manual => ("released", Fate::Send),
                    None => ("held", Fate::Held(waiting)),
                };
                if by.is_some() {
                    tx.execute(
                        "DELETE FROM waits WHERE job_id = ?1 AND idx = ?2",
                        params![job_id, entry.index],
                    )?;
                }
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO held (job_id, idx, size, body, waits, manual, state, by, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    job_id,
                    entry.index,
                    size,
                    entry.body,
                    waiting,
                    manual,
                    state,
                    by,
                    now
                ])?;
                fates.push(fate);
            }
            tx.commit()?;
            Ok(fates)
        })
        .await
    }

    /// The reads of [`Ledger::units_ended`] for array children whose end
    /// is recorded already (in `children`): on the S3 ledger, the held
    /// objects of the ended units' dependants, each with its `releasing/`
    /// marker written beside it; after it only the claims
    /// ([`Ledger::spend_ends`]). The worker reads before the settle of the
    /// child's message and claims after it.
    /// Where this process keeps the units' edges (see `s3::KnownParents`)
    /// no LIST comes first; the spend is then followed by a full one
    /// ([`Ledger::spend_ends`] returns it). Reads that fail are left for
    /// the spend to make again. A read dropped unspent leaves only its
    /// markers, and the sweep spends what they point at.
    pub async fn read_ends(
        &self,
        parent_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
    ) -> EndsRead {
        let s3 = match self {
            Ledger::S3 { .. } if size > 0 => (self.s3_read_ahead(parent_id, size, &indexes, state))
                .await
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot read ahead what the job's end frees; its spend will")
                })
                .ok(),
            _ => None,
        };
        EndsRead {
            parent_id: parent_id.to_owned(),
            size,
            indexes,
            state,
            s3,
            spent: Spent::new(),
        }
    }

    /// [`Ledger::units_ended`] for what [`Ledger::read_ends`] read; and,
    /// when that read came from kept edges, the full read to spend next
    /// (after what this freed is sent): it lists the units' edges and the
    /// parent's markers, skipping the edges spent here.
    pub async fn spend_ends(
        &self,
        read: EndsRead,
    ) -> Result<(Ended, Option<EndsRead>), LedgerError> {
        let EndsRead {
            parent_id,
            size,
            indexes,
            state,
            s3,
            spent,
        } = read;
        let Some(s3) = s3 else {
            let ended = match self {
                Ledger::S3 { .. } => {
                    self.s3_units_ended(&parent_id, size, indexes, state, &spent)
                        .await?
                }
                Ledger::Local(_) => self.units_ended(&parent_id, size, indexes, state).await?,
            };
            return Ok((ended, None));
        };
        if !s3.kept {
            return Ok((self.s3_spend_ends(s3).await?, None));
        }
        let mut spent = s3.spent();
        let ended = self.s3_spend_ends(s3).await.unwrap_or_else(|error| {
            // Spending is idempotent: the full read spends them all.
            tracing::warn!(%error, "cannot spend kept edges; listing them instead");
            spent.clear();
            Ended::default()
        });
        let full = EndsRead {
            parent_id,
            size,
            indexes,
            state,
            s3: None,
            spent,
        };
        Ok((ended, Some(full)))
    }

    /// Parent units ended (`indexes` of array `parent_id` of `size`
    /// children, or a plain job: size 0): spends their edges, once, and
    /// returns the dependants that this freed (released, or cancelled when
    /// they waited on success for a unit that did not succeed), and the
    /// other queues whose ledgers keep dependants of it (see `foreign`).
    /// A plain job's end is recorded here; an array child's was already
    /// (in `children`).
    pub async fn units_ended(
        &self,
        parent_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
    ) -> Result<Ended, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => {
                return (self.s3_units_ended(parent_id, size, indexes, state, &Spent::new())).await;
            }
        };
        let parent_id = parent_id.to_owned();
        Self::sql(conn, move |c| {
            let now = crate::sqlite::now_s();
            if size > 0 {
                // Most parents have no dependants: a read, no write lock.
                // An edge added after this read sees the child final.
                let any: bool = c
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM waits WHERE parent_id = ?1)
                         OR EXISTS (SELECT 1 FROM foreign_waits WHERE parent_id = ?1)",
                    )?
                    .query_row([&parent_id], |r| r.get(0))?;
                if !any {
                    return Ok(Ended::default());
                }
            }
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if size == 0 {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO dep_ends (job_id, state, at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![parent_id, state.name(), now])?;
            }
            let mut freed = Vec::new();
            if size > 0 {
                for &index in &indexes {
                    let label = unit_label(&parent_id, Some(index));
                    spend(&tx, &parent_id, i64::from(index), state, &label, &mut freed)?;
                }
            }
            let whole_waits: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM waits WHERE parent_id = ?1 AND parent_idx = -1)",
                )?
                .query_row([&parent_id], |r| r.get(0))?;
            if whole_waits && let Some((whole, _)) = unit_end(&tx, &parent_id, None)? {
                let whole = ChildState::from_name(&whole).unwrap_or(ChildState::Cancelled);
                let label = unit_label(&parent_id, None);
                spend(&tx, &parent_id, WHOLE, whole, &label, &mut freed)?;
            }
            let foreign = foreign::ended_here(&tx, &parent_id, size, &indexes, state)?;
            tx.commit()?;
            Ok(Ended { freed, foreign })
        })
        .await
    }

    /// Marks freed rows done: `released` once their message is sent,
    /// `cancelled` once their end is recorded.
    pub async fn holds_done(&self, rows: Vec<Freed>) -> Result<(), LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_holds_done(rows).await,
        };
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for Freed {
                job_id,
                index,
                cancelled,
                ..
            } in rows
            {
                let (from, to) = if cancelled.is_some() {
                    ("cancelling", "cancelled")
                } else {
                    ("releasing", "released")
                };
                tx.prepare_cached(
                    "UPDATE held SET state = ?4, at = ?5 WHERE job_id = ?1 AND idx = ?2 AND state = ?3",
                )?
                .execute(params![job_id, index, from, to, crate::sqlite::now_s()])?;
            }
            tx.commit()
        })
        .await
    }

    /// Rows a worker freed and then died before sending (or cancelling):
    /// older than `grace` (at least a second), each taken by one sweeper
    /// (taking one stamps it anew, so another sweeper passes it by for a
    /// grace).
    pub async fn stale_holds(&self, grace: std::time::Duration) -> Result<Vec<Freed>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_stale_holds(grace).await,
        };
        let cutoff = crate::sqlite::now_s() - grace.as_secs().max(1) as i64;
        Self::sql(conn, move |c| {
            let any: bool = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM held WHERE state IN ('releasing', 'cancelling') AND at < ?1)",
                )?
                .query_row([cutoff], |r| r.get(0))?;
            if !any {
                return Ok(Vec::new());
            }
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let freed = tx
                .prepare_cached(
                    "UPDATE held SET at = ?2 WHERE state IN ('releasing', 'cancelling') AND at < ?1
                     RETURNING job_id, idx, size, body, by, state",
                )?
                .query_map(params![cutoff, crate::sqlite::now_s()], |r| {
                    let state: String = r.get(5)?;
                    let by: Option<String> = r.get(4)?;
                    Ok(Freed {
                        job_id: r.get(0)?,
                        index: r.get(1)?,
                        size: r.get(2)?,
                        body: r.get(3)?,
                        cancelled: (state == "cancelling").then(|| by.clone().unwrap_or_default()),
                        by: by.unwrap_or_default(),
                        claim: None,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(freed)
        })
        .await
    }

    /// What a held job (or array) still waits for: `(child, parent,
    /// parent child, the parent's queue when it is another)`, at most
    /// `limit` rows.
    pub async fn waiting_for(
        &self,
        job_id: &str,
        limit: u32,
    ) -> Result<Vec<(u32, String, Option<u32>, Option<String>)>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_waiting_for(job_id, limit).await,
        };
        let job_id = job_id.to_owned();
        Self::sql(conn, move |c| {
            c.prepare_cached(
                "SELECT idx, parent_id, parent_idx, parent_queue FROM waits WHERE job_id = ?1
                 ORDER BY idx, parent_id, parent_idx LIMIT ?2",
            )?
            .query_map(params![job_id, limit], |r| {
                let parent_idx: i64 = r.get(2)?;
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    u32::try_from(parent_idx).ok(),
                    r.get(3)?,
                ))
            })?
            .collect()
        })
        .await
    }
}

/// Deletes what is older than `cutoff`: registrations, plain jobs' ends,
/// and held rows that were released or cancelled.
pub(super) fn prune(tx: &Transaction, cutoff: i64) -> rusqlite::Result<usize> {
    let mut deleted = tx.execute("DELETE FROM dep_jobs WHERE at < ?1", [cutoff])?;
    deleted += tx.execute("DELETE FROM foreign_waits WHERE at < ?1", [cutoff])?;
    deleted += tx.execute("DELETE FROM dep_ends WHERE at < ?1", [cutoff])?;
    deleted += tx.execute(
        "DELETE FROM held WHERE at < ?1 AND state IN ('released', 'cancelled')",
        [cutoff],
    )?;
    Ok(deleted)
}

/// How a parent unit ended, if it did: its state and which unit did not
/// succeed (for the reason). `index` `None`: the whole parent (a plain
/// job's one unit).
fn unit_end(
    tx: &Transaction,
    parent_id: &str,
    index: Option<u32>,
) -> rusqlite::Result<Option<(String, Option<String>)>> {
    if let Some(index) = index {
        let state: Option<String> = tx
            .prepare_cached("SELECT state FROM children WHERE array_id = ?1 AND idx = ?2")?
            .query_row(params![parent_id, index], |r| r.get(0))
            .optional()?;
        return Ok(state
            .filter(|s| is_final(s))
            .map(|s| (s, Some(format!("child {index}")))));
    }
    let size: Option<u32> = tx
        .prepare_cached("SELECT size FROM dep_jobs WHERE job_id = ?1")?
        .query_row([parent_id], |r| r.get(0))
        .optional()?;
    match size {
        None | Some(0) => tx
            .prepare_cached("SELECT state FROM dep_ends WHERE job_id = ?1")?
            .query_row([parent_id], |r| r.get::<_, String>(0))
            .optional()
            .map(|s| s.map(|s| (s, None))),
        Some(size) => {
            let mut rows = tx.prepare_cached(
                "SELECT idx, state FROM children WHERE array_id = ?1 ORDER BY idx",
            )?;
            let rows = rows
                .query_map([parent_id], |r| {
                    Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if (rows.len() as u32) < size {
                return Ok(None);
            }
            Ok(Some(
                match rows.into_iter().find(|(_, s)| s != "succeeded") {
                    Some((index, state)) => (state, Some(format!("child {index}"))),
                    None => ("succeeded".into(), None),
                },
            ))
        }
    }
}

/// A parent unit for people: `P child N`, or `P`.
fn unit_label(parent_id: &str, index: Option<u32>) -> String {
    let frame = index.map_or(String::new(), |i| format!(" child {i}"));
    format!("{parent_id}{frame}")
}

fn failed_reason(parent_id: &str, unit: Option<&str>, state: &str) -> String {
    let unit = unit.map_or(String::new(), |u| format!(" {u}"));
    format!("parent job {parent_id}{unit} {}", state.replace('_', "-"))
}

/// Spends the edges of one parent unit (`index`, or [`WHOLE`]) that ended
/// in `state`, adding the dependants that freed to `freed`.
fn spend(
    tx: &Transaction,
    parent_id: &str,
    index: i64,
    state: ChildState,
    unit: &str,
    freed: &mut Vec<Freed>,
) -> rusqlite::Result<()> {
    let edges = tx
        .prepare_cached(
            "DELETE FROM waits WHERE parent_id = ?1 AND parent_idx = ?2
             RETURNING job_id, idx, on_finish",
        )?
        .query_map(params![parent_id, index], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let now = crate::sqlite::now_s();
    for (job_id, idx, on_finish) in edges {
        let cancel = state != ChildState::Succeeded && !on_finish;
        let row = if cancel {
            let reason = format!("parent job {unit} {}", state.name().replace('_', "-"));
            // Its other edges will never be needed.
            tx.prepare_cached("DELETE FROM waits WHERE job_id = ?1 AND idx = ?2")?
                .execute(params![job_id, idx])?;
            tx.prepare_cached(
                "UPDATE held SET state = 'cancelling', by = ?3, at = ?4
                 WHERE job_id = ?1 AND idx = ?2 AND state = 'held'
                 RETURNING size, body",
            )?
            .query_row(params![job_id, idx, reason, now], |r| {
                Ok((r.get(0)?, r.get(1)?, Some(reason.clone())))
            })
            .optional()?
        } else {
            tx.prepare_cached(
                "UPDATE held SET waits = waits - 1, at = ?3 WHERE job_id = ?1 AND idx = ?2 AND state = 'held'",
            )?
            .execute(params![job_id, idx, now])?;
            tx.prepare_cached(
                "UPDATE held SET state = 'releasing', by = ?3, at = ?4
                 WHERE job_id = ?1 AND idx = ?2 AND state = 'held' AND waits <= 0 AND manual = 0
                 RETURNING size, body",
            )?
            .query_row(params![job_id, idx, unit, now], |r| {
                Ok((r.get(0)?, r.get(1)?, None))
            })
            .optional()?
        };
        if let Some((size, body, cancelled)) = row {
            freed.push(Freed {
                job_id,
                index: idx,
                size,
                body,
                by: unit.to_owned(),
                cancelled,
                claim: None,
            });
        }
    }
    Ok(())
}

mod foreign;
mod hand;
mod s3;
pub use foreign::{Ended, ForeignEnd, ForeignWait};
use s3::Spent;
pub(super) use s3::{HandCache, KnownParents};

#[cfg(test)]
mod tests;
