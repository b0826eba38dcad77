//! A job's row within one batch of the fold: read once, changed in memory
//! by each of the batch's events that names it, and written once when the
//! batch ends. A job's `JobStarted` and `JobSucceeded` mostly land in the
//! same batch, so this halves the row's reads and writes, and the row's
//! indexed columns move once (from `submitted` straight to `succeeded`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::OptionalExtension;
use rusqlite::types::Value as SqlValue;

/// What the fold knows of a job's row: as read, then as its events in this
/// batch changed it.
#[derive(Debug)]
pub(super) struct Row {
    pub rowid: i64,
    /// The highest attempt seen.
    pub attempt: i64,
    /// The rank of the event that set the state.
    pub rank: i64,
    pub state: String,
    pub array_id: Option<String>,
    pub array_index: Option<i64>,
    pub superseded: bool,
    pub no_message_id: bool,
    /// When an event last touched the row, in seconds.
    pub at: i64,
}

/// The job columns a batch's events change, each combined the way the
/// column folds (the highest attempt, the earliest start, the latest end,
/// costs added up, otherwise the last event folded). Written as one
/// `UPDATE` by rowid naming only these columns: an indexed column in its
/// `SET` costs its indexes an entry out and one in.
#[derive(Debug, Default)]
pub(super) struct Update {
    pub attempt: Option<i64>,
    pub at: Option<i64>,
    /// The rank and reason of the event that moved the row ahead.
    pub rank: Option<(i64, Option<String>)>,
    pub state: Option<&'static str>,
    pub message_id: Option<String>,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// A success's outputs, thumbnails and their frames (JSON lists).
    pub succeeded: Option<[String; 3]>,
    /// The last try's usage: its place in the order of tries, and it.
    pub usage: Option<(i64, String)>,
    pub cost_usd: Option<f64>,
}

impl Update {
    pub fn started(&mut self, ms: i64) {
        self.started_ms = Some(self.started_ms.map_or(ms, |s| s.min(ms)));
    }

    pub fn ended(&mut self, ms: i64) {
        self.ended_ms = self.ended_ms.max(Some(ms));
    }

    /// A try's usage (`of`: the try's place in the order of tries; the
    /// last one's is kept), and its cost added to the job's.
    pub fn used(&mut self, of: i64, usage: String, cost_usd: Option<f64>) {
        self.usage = self.usage.take().max(Some((of, usage)));
        if let Some(cost) = cost_usd {
            self.cost_usd = Some(self.cost_usd.unwrap_or(0.0) + cost);
        }
    }

    fn write(self, tx: &rusqlite::Transaction, rowid: i64) -> rusqlite::Result<()> {
        let mut sets: Vec<&str> = Vec::new();
        let mut params: Vec<(&str, SqlValue)> = Vec::new();
        let mut set = |sql: &'static str, values: Vec<(&'static str, SqlValue)>| {
            sets.push(sql);
            params.extend(values);
        };
        if let Some(attempt) = self.attempt {
            set(
                "attempt = MAX(attempt, :attempt)",
                vec![(":attempt", attempt.into())],
            );
        }
        if let Some(at) = self.at {
            set("at = :at", vec![(":at", at.into())]);
        }
        if let Some((rank, reason)) = self.rank {
            set(
                "rank = :rank, reason = :reason",
                vec![(":rank", rank.into()), (":reason", reason.into())],
            );
        }
        if let Some(state) = self.state {
            set("state = :state", vec![(":state", state.to_owned().into())]);
        }
        if let Some(message_id) = self.message_id {
            set(
                "message_id = :message_id",
                vec![(":message_id", message_id.into())],
            );
        }
        if let Some(ms) = self.started_ms {
            set(
                "started_ms = MIN(COALESCE(started_ms, :started), :started)",
                vec![(":started", ms.into())],
            );
        }
        if let Some(ms) = self.ended_ms {
            set(
                "ended_ms = MAX(COALESCE(ended_ms, :ended), :ended)",
                vec![(":ended", ms.into())],
            );
        }
        if let Some([outputs, thumbnails, frames]) = self.succeeded {
            // Done is 100 %, whatever progress arrives late.
            set(
                "outputs = :outputs, progress = 100, progress_of = 2147483647,
                 thumbnails = :thumbnails, thumbnail_frames = :thumbnail_frames",
                vec![
                    (":outputs", outputs.into()),
                    (":thumbnails", thumbnails.into()),
                    (":thumbnail_frames", frames.into()),
                ],
            );
        }
        if let Some((of, usage)) = self.usage {
            // Whatever order the tries' ends come in (SET reads the old
            // values).
            set(
                "usage = CASE WHEN :usage_of > usage_of
                    OR (:usage_of = usage_of AND :usage > COALESCE(usage, ''))
                    THEN :usage ELSE usage END,
                 usage_of = MAX(usage_of, :usage_of)",
                vec![(":usage", usage.into()), (":usage_of", of.into())],
            );
        }
        if let Some(cost) = self.cost_usd {
            set(
                "cost_usd = COALESCE(cost_usd, 0) + :cost",
                vec![(":cost", cost.into())],
            );
        }
        if sets.is_empty() {
            return Ok(());
        }
        let sql = format!("UPDATE jobs SET {} WHERE rowid = :rowid", sets.join(", "));
        let mut bound: Vec<(&str, &dyn rusqlite::ToSql)> = params
            .iter()
            .map(|(name, value)| (*name, value as &dyn rusqlite::ToSql))
            .collect();
        bound.push((":rowid", &rowid));
        tx.prepare_cached(&sql)?.execute(bound.as_slice()).map(drop)
    }
}

/// A row and what the batch changed of it.
#[derive(Debug)]
pub(super) struct Pending {
    pub row: Row,
    pub update: Update,
}

/// One transaction's fold: the workers whose row it already brought up to
/// date (an event that changes no worker's state does not write its row
/// again), and the job rows its events named.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub noted: std::collections::HashSet<String>,
    rows: HashMap<String, Pending>,
}

impl Batch {
    /// Job `job_id`'s row: as this batch left it, else as read, else made
    /// by `insert`; and whether it was just made.
    pub fn row(
        &mut self,
        tx: &rusqlite::Transaction,
        job_id: &str,
        insert: impl FnOnce() -> rusqlite::Result<Row>,
    ) -> rusqlite::Result<(&mut Pending, bool)> {
        let vacant = match self.rows.entry(job_id.to_owned()) {
            Entry::Occupied(known) => return Ok((known.into_mut(), false)),
            Entry::Vacant(vacant) => vacant,
        };
        let (row, made) = match read(tx, job_id)? {
            Some(row) => (row, false),
            None => (insert()?, true),
        };
        let pending = vacant.insert(Pending {
            row,
            update: Update::default(),
        });
        Ok((pending, made))
    }

    /// Writes the changes of the rows of child `index` of `array`, and
    /// forgets them: they are to be read from the table again.
    pub fn write_children(
        &mut self,
        tx: &rusqlite::Transaction,
        array: &str,
        index: u32,
    ) -> rusqlite::Result<()> {
        let children: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, p)| {
                p.row.array_id.as_deref() == Some(array) && p.row.array_index == Some(index.into())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in children {
            if let Some(pending) = self.rows.remove(&id) {
                pending.update.write(tx, pending.row.rowid)?;
            }
        }
        Ok(())
    }

    /// Writes every row's changes (before the transaction commits).
    pub fn write(self, tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
        for pending in self.rows.into_values() {
            pending.update.write(tx, pending.row.rowid)?;
        }
        Ok(())
    }
}

fn read(tx: &rusqlite::Transaction, job_id: &str) -> rusqlite::Result<Option<Row>> {
    tx.prepare_cached(
        "SELECT rowid, attempt, rank, state, array_id, array_index, superseded,
                message_id = '', at
         FROM jobs WHERE job_id = ?1",
    )?
    .query_row([job_id], |row| {
        Ok(Row {
            rowid: row.get(0)?,
            attempt: row.get(1)?,
            rank: row.get(2)?,
            state: row.get(3)?,
            array_id: row.get(4)?,
            array_index: row.get(5)?,
            superseded: row.get(6)?,
            no_message_id: row.get(7)?,
            at: row.get(8)?,
        })
    })
    .optional()
}
