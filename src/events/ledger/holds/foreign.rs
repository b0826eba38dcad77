//! Dependants on another queue: a child held on queue B that waits for a
//! parent on queue A (both served by one endpoint).
//!
//! Where each thing lives:
//! - the held row (its message) and its edges stay in B's ledger, as for a
//!   parent on B itself; each edge names the parent's queue
//!   (`waits.parent_queue`, NULL for the dependant's own queue);
//! - A's ledger only notes that B has dependants of the parent
//!   (`foreign_waits (parent_id, queue)`), so that the settle of a parent
//!   unit, which reads A's ledger anyway, learns which other ledgers to
//!   tell ([`Ended::foreign`]).
//!
//! Exactly once: the counting is all in B's ledger, in the one
//! transaction that spends a unit's edges today (`DELETE … RETURNING`,
//! see `holds`): [`Ledger::spend_foreign`] is that same spend, run on B's
//! ledger with the unit's end as A's ledger recorded it. Whoever spends an
//! edge (A's settling worker, B's submit, B's sweep), it is spent once.
//!
//! Order: a dependant's submit writes its held rows and edges in B, then
//! the note in A ([`Ledger::note_foreign_dependants`]), then reads the
//! parent's ends in A again ([`Ledger::unit_ends`]) and spends in B what
//! ended meanwhile. A parent's settle records its end in A first, then
//! reads A's notes. Whichever is second sees the other.
//!
//! Reach: the settling worker sends what it freed to B's queue with B's
//! ledger, both opened from its config's `[queues]`. A worker whose
//! config lacks B cannot; B's sweep ([`Ledger::foreign_parents`], then
//! the parent's ends read from A's ledger) releases it within a
//! `worker.dead_letter_sweep`. Every process that has both queues in its
//! config sweeps, the endpoint's own included, so nothing waits forever.
//!
//! The S3 ledger keeps the same as objects (see `s3::foreign`). Both
//! queues must be of one backend: an embedded queue's ledger is a file on
//! the endpoint's machine, which SQS workers elsewhere cannot read, so a
//! pair of an SQS and an embedded queue is refused at submit.

use rusqlite::{Transaction, TransactionBehavior, params};

use super::{ChildState, Freed, Ledger, LedgerError, WHOLE, spend, unit_end, unit_label};

/// What a parent unit's end freed in its own ledger, and which other
/// ledgers keep dependants of it.
#[derive(Debug, Default)]
pub struct Ended {
    pub freed: Vec<Freed>,
    pub foreign: Option<ForeignEnd>,
}

/// A parent's units that ended, for the other queues' ledgers to spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignEnd {
    pub parent_id: String,
    /// The queues whose ledgers keep dependants of it.
    pub queues: Vec<String>,
    /// Each unit that ended (`None`: the whole parent), and how.
    pub units: Vec<(Option<u32>, ChildState)>,
}

impl ForeignEnd {
    /// The units a settle ended: a plain parent's whole, or an array's
    /// `indexes` (in `state`) and its whole when that ended too (`whole`).
    pub(super) fn new(
        parent_id: &str,
        queues: Vec<String>,
        size: u32,
        indexes: &[u32],
        state: ChildState,
        whole: Option<ChildState>,
    ) -> Self {
        let mut units: Vec<(Option<u32>, ChildState)> = if size == 0 {
            vec![(None, state)]
        } else {
            indexes.iter().map(|&i| (Some(i), state)).collect()
        };
        units.extend(whole.filter(|_| size > 0).map(|whole| (None, whole)));
        Self {
            parent_id: parent_id.to_owned(),
            queues,
            units,
        }
    }
}

/// A parent on another queue that held children here wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignWait {
    /// The parent's queue.
    pub queue: String,
    pub parent_id: String,
    /// The units waited for (`None`: the whole parent).
    pub units: Vec<Option<u32>>,
}

/// In a parent's ledger, as its unit ends: the other queues to tell, and
/// what ended (`None` when no other queue waits for it).
pub(super) fn ended_here(
    tx: &Transaction,
    parent_id: &str,
    size: u32,
    indexes: &[u32],
    state: ChildState,
) -> rusqlite::Result<Option<ForeignEnd>> {
    let queues = tx
        .prepare_cached("SELECT queue FROM foreign_waits WHERE parent_id = ?1 ORDER BY queue")?
        .query_map([parent_id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if queues.is_empty() {
        return Ok(None);
    }
    let whole = if size > 0 {
        unit_end(tx, parent_id, None)?
            .map(|(whole, _)| ChildState::from_name(&whole).unwrap_or(ChildState::Cancelled))
    } else {
        None
    };
    Ok(Some(ForeignEnd::new(
        parent_id, queues, size, indexes, state, whole,
    )))
}

impl Ledger {
    /// In a parent's ledger: queue `queue` keeps dependants of
    /// `parent_id`, so its settles tell that queue's ledger.
    pub async fn note_foreign_dependants(
        &self,
        parent_id: &str,
        queue: &str,
    ) -> Result<(), LedgerError> {
        let Ledger::Local(conn) = self else {
            return self.s3_note_foreign(parent_id, queue).await;
        };
        let (parent_id, queue) = (parent_id.to_owned(), queue.to_owned());
        Self::sql(conn, move |c| {
            c.execute(
                "INSERT OR IGNORE INTO foreign_waits (parent_id, queue, at) VALUES (?1, ?2, ?3)",
                params![parent_id, queue, crate::sqlite::now_s()],
            )
            .map(drop)
        })
        .await
    }

    /// In a parent's ledger: how those of `units` that ended did.
    pub async fn unit_ends(
        &self,
        parent_id: &str,
        units: Vec<Option<u32>>,
    ) -> Result<Vec<(Option<u32>, ChildState)>, LedgerError> {
        let Ledger::Local(conn) = self else {
            return self.s3_unit_ends(parent_id, units).await;
        };
        let parent_id = parent_id.to_owned();
        Self::sql(conn, move |c| {
            let tx = c.transaction()?;
            let mut ended = Vec::new();
            for unit in units {
                if let Some((state, _)) = unit_end(&tx, &parent_id, unit)? {
                    let state = ChildState::from_name(&state).unwrap_or(ChildState::Cancelled);
                    ended.push((unit, state));
                }
            }
            Ok(ended)
        })
        .await
    }

    /// In a dependant's ledger: spends the edges of a parent on another
    /// queue whose `units` ended, once (as a parent of this queue's own
    /// settle does); what that freed.
    pub async fn spend_foreign(
        &self,
        parent_id: &str,
        units: Vec<(Option<u32>, ChildState)>,
    ) -> Result<Vec<Freed>, LedgerError> {
        let Ledger::Local(conn) = self else {
            return self.s3_spend_foreign(parent_id, units).await;
        };
        let parent_id = parent_id.to_owned();
        Self::sql(conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut freed = Vec::new();
            for (unit, state) in units {
                let index = unit.map_or(WHOLE, i64::from);
                let label = unit_label(&parent_id, unit);
                spend(&tx, &parent_id, index, state, &label, &mut freed)?;
            }
            tx.commit()?;
            Ok(freed)
        })
        .await
    }

    /// In a dependant's ledger: the parents on other queues that its held
    /// children still wait for, for the sweep.
    pub async fn foreign_parents(&self) -> Result<Vec<ForeignWait>, LedgerError> {
        let conn = match self {
            Ledger::Local(conn) => conn,
            Ledger::S3 { .. } => return self.s3_foreign_parents().await,
        };
        Self::sql(conn, |c| {
            let rows = c
                .prepare_cached(
                    "SELECT DISTINCT parent_queue, parent_id, parent_idx FROM waits
                     WHERE parent_queue IS NOT NULL ORDER BY parent_queue, parent_id, parent_idx",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut parents: Vec<ForeignWait> = Vec::new();
            for (queue, parent_id, index) in rows {
                let unit = u32::try_from(index).ok();
                match parents.last_mut() {
                    Some(last) if last.queue == queue && last.parent_id == parent_id => {
                        last.units.push(unit);
                    }
                    _ => parents.push(ForeignWait {
                        queue,
                        parent_id,
                        units: vec![unit],
                    }),
                }
            }
            Ok(parents)
        })
        .await
    }
}
