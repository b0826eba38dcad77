//! The job-status table: events folded into one row per job and one per
//! array, in SQLite, for `renderq status`, `queue_manager_job_status`,
//! `submit --wait` and the web monitor.
//!
//! Delivery is at least once and unordered, so folding must not care: each
//! event is applied once (by `event_id`), and a row only moves forward. A
//! job's state is ranked: a final state (succeeded, then dead-lettered or cancelled)
//! beats any running one; among running ones a later attempt wins, then a
//! later step (submitted < started < failed or requeued). Progress is the
//! highest seen for the latest attempt. The same events, in any order and
//! any number of times, give the same table.
//!
//! Three parts: [`fold`] applies events, `reads` answers `renderq status`,
//! `prune` forgets what `retention` allows. The monitor reads the same
//! file through a connection of its own (`ui::board`), and every list it
//! shows has its index here.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::job::event::Event;
use crate::job::label::Label;

mod fold;
mod label;
mod prune;
mod reads;
mod row;
#[cfg(test)]
mod tests;

pub use fold::{ARRAY_COUNTS, STATES};
pub use reads::label as label_columns;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, at INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    message_id    TEXT NOT NULL DEFAULT '',
    command       TEXT NOT NULL DEFAULT '',
    array_id      TEXT,
    array_index   INTEGER,
    state         TEXT NOT NULL,
    rank          INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    progress      REAL,
    progress_of   INTEGER NOT NULL DEFAULT 0,
    outputs       TEXT NOT NULL DEFAULT '[]',
    reason        TEXT,
    at            INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    host      TEXT NOT NULL DEFAULT '',
    state     TEXT NOT NULL DEFAULT 'running',
    at        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS by_message ON jobs (message_id);
CREATE TABLE IF NOT EXISTS labels (
    id    TEXT NOT NULL,
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    at    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id, key)
);
CREATE TABLE IF NOT EXISTS arrays (
    job_id    TEXT PRIMARY KEY,
    command   TEXT NOT NULL DEFAULT '',
    size      INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    at        INTEGER NOT NULL DEFAULT 0
);
";

/// Columns added since the first version, in the order they came: a file
/// made by an earlier version gains them when it is opened.
const COLUMNS: &[(&str, &str, &str)] = &[
    // When a row was last written, for the prune and the lists' order.
    ("seen", "at", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "at", "INTEGER NOT NULL DEFAULT 0"),
    ("arrays", "at", "INTEGER NOT NULL DEFAULT 0"),
    // The queue a job is on, and its outputs' thumbnails (for the monitor).
    ("jobs", "queue", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "thumbnails", "TEXT NOT NULL DEFAULT '[]'"),
    // The frame each thumbnail shows (null where the worker did not say).
    ("jobs", "thumbnail_frames", "TEXT NOT NULL DEFAULT '[]'"),
    // Milliseconds since the epoch, from the events' own times: the first
    // start, and the latest final event.
    ("jobs", "started_ms", "INTEGER"),
    ("jobs", "ended_ms", "INTEGER"),
    // An array's frames as submitted (a spec such as `1-240`), how many,
    // and how many a child carries; its queue; when it was submitted, its
    // first child started, and it completed.
    ("arrays", "frame_spec", "TEXT NOT NULL DEFAULT ''"),
    ("arrays", "frames", "INTEGER NOT NULL DEFAULT 0"),
    ("arrays", "chunk_size", "INTEGER NOT NULL DEFAULT 0"),
    ("arrays", "queue", "TEXT NOT NULL DEFAULT ''"),
    ("arrays", "submitted_ms", "INTEGER"),
    ("arrays", "started_ms", "INTEGER"),
    ("arrays", "ended_ms", "INTEGER"),
    // When a stopping worker will be gone: its stop's deadline.
    ("workers", "gone_at", "INTEGER"),
    // Names, owners and metadata (a JSON object), as submitted.
    ("jobs", "name", "TEXT"),
    ("jobs", "owner", "TEXT"),
    ("jobs", "metadata", "TEXT NOT NULL DEFAULT '{}'"),
    ("arrays", "name", "TEXT"),
    ("arrays", "owner", "TEXT"),
    ("arrays", "metadata", "TEXT NOT NULL DEFAULT '{}'"),
    // Re-renders: a child's revision and frames (a JSON list), and whether
    // a newer revision's child of its index replaced it in the counts; an
    // array's newest revision, and the newest that completed.
    ("jobs", "revision", "INTEGER NOT NULL DEFAULT 1"),
    ("jobs", "frames", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "superseded", "INTEGER NOT NULL DEFAULT 0"),
    ("arrays", "revision", "INTEGER NOT NULL DEFAULT 1"),
    ("arrays", "completed_revision", "INTEGER NOT NULL DEFAULT 0"),
    // What a job's tries used: the last one's `usage` (JSON; `usage_of`
    // orders the tries as the state does), and the cost of all of them; an
    // array's, summed over its children's tries.
    ("jobs", "usage", "TEXT"),
    ("jobs", "usage_of", "INTEGER NOT NULL DEFAULT -1"),
    ("jobs", "cost_usd", "REAL"),
    ("arrays", "cost_usd", "REAL"),
    ("arrays", "wall_s", "REAL"),
    // Why a worker said it is unhealthy.
    ("workers", "reason", "TEXT"),
];

/// Every list the monitor sorts or filters, and the prune, has its index
/// (each query's plan is checked in the tests). The `top_` ones hold only
/// jobs that are not arrays' children: the jobs list shows an array as one
/// row. The name and owner indexes hold only rows that have one: a filter
/// by name never matches a row without, and each index entry is one more
/// write on every row's change of `at`.
const INDEXES: &str = "
DROP INDEX IF EXISTS by_array;
CREATE INDEX IF NOT EXISTS jobs_by_array ON jobs (array_id, array_index);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, at);
CREATE INDEX IF NOT EXISTS jobs_by_at ON jobs (at);
CREATE INDEX IF NOT EXISTS jobs_with_thumbnails ON jobs (at) WHERE thumbnails != '[]';
CREATE INDEX IF NOT EXISTS top_by_at ON jobs (at) WHERE array_id IS NULL;
CREATE INDEX IF NOT EXISTS top_by_state ON jobs (state, at) WHERE array_id IS NULL;
CREATE INDEX IF NOT EXISTS top_by_command ON jobs (command, at) WHERE array_id IS NULL;
CREATE INDEX IF NOT EXISTS seen_by_at ON seen (at);
CREATE INDEX IF NOT EXISTS arrays_by_at ON arrays (at);
CREATE INDEX IF NOT EXISTS arrays_by_command ON arrays (command, at);
CREATE INDEX IF NOT EXISTS workers_by_at ON workers (at);
DROP INDEX IF EXISTS top_by_name;
DROP INDEX IF EXISTS top_by_owner;
DROP INDEX IF EXISTS arrays_by_name;
DROP INDEX IF EXISTS arrays_by_owner;
CREATE INDEX IF NOT EXISTS top_named ON jobs (name, at) WHERE array_id IS NULL AND name IS NOT NULL;
CREATE INDEX IF NOT EXISTS top_owned ON jobs (owner, at) WHERE array_id IS NULL AND owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS arrays_named ON arrays (name, at) WHERE name IS NOT NULL;
CREATE INDEX IF NOT EXISTS arrays_owned ON arrays (owner, at) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS labels_by_value ON labels (kind, key, value, at);
CREATE INDEX IF NOT EXISTS labels_by_at ON labels (at);
";

#[derive(Debug, thiserror::Error)]
#[error("status table: {0}")]
pub struct StatusError(String);

fn failed(e: impl std::fmt::Display) -> StatusError {
    StatusError(e.to_string())
}

/// Whether an event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    Duplicate,
}

/// One job's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub message_id: String,
    pub command: String,
    pub state: String,
    pub attempt: u32,
    pub progress: Option<f64>,
    pub outputs: Vec<String>,
    pub reason: Option<String>,
    /// Its name, owner and metadata, as submitted.
    #[serde(flatten)]
    pub label: Label,
    /// An array child's revision (1: the submit's; more: a re-render's).
    #[serde(default = "first_revision")]
    pub revision: u32,
    /// A re-render child's frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<i64>,
    /// Its last try's `usage` (SPEC §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
    /// What its tries cost, with `[fleet] price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

fn first_revision() -> u32 {
    1
}

/// An array's status, counted from its children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStatus {
    pub job_id: String,
    pub command: String,
    pub size: u32,
    pub succeeded: u32,
    pub dead_lettered: u32,
    #[serde(default)]
    pub cancelled: u32,
    pub running: u32,
    /// `ArrayJobCompleted` was seen for its newest revision.
    pub completed: bool,
    #[serde(flatten)]
    pub label: Label,
    /// Its newest revision (1 until a re-render).
    #[serde(default = "first_revision")]
    pub revision: u32,
    /// What its children's tries cost, with `[fleet] price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Its children's tries' wall time, summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_s: Option<f64>,
}

/// A job or an array, as `renderq status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Status {
    Job(JobStatus),
    Array(ArrayStatus),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Job(job) => {
                write!(
                    f,
                    "job {}\tstate={}\tattempt={}\tcommand={}",
                    job.label.display(&job.job_id),
                    job.state,
                    job.attempt,
                    job.command
                )?;
                write_label(f, &job.job_id, &job.label)?;
                if job.revision > 1 {
                    write!(f, "\trevision={}", job.revision)?;
                }
                if let Some(progress) = job.progress {
                    write!(f, "\tprogress={progress:.0}%")?;
                }
                if let Some(reason) = &job.reason {
                    write!(f, "\treason={reason}")?;
                }
                for output in &job.outputs {
                    write!(f, "\toutput={output}")?;
                }
                if let Some(usage) = &job.usage {
                    for (key, value) in usage.as_object().into_iter().flatten() {
                        if key != "cost_usd" {
                            write!(
                                f,
                                "\t{key}={}",
                                value
                                    .as_str()
                                    .map_or_else(|| value.to_string(), str::to_owned)
                            )?;
                        }
                    }
                }
                if let Some(cost) = job.cost_usd {
                    write!(f, "\tcost_usd={cost:.6}")?;
                }
                Ok(())
            }
            Status::Array(array) => {
                write!(
                    f,
                    "array {}\tsize={}\tsucceeded={}\tdead_lettered={}\tcancelled={}\trunning={}\tcompleted={}",
                    array.label.display(&array.job_id),
                    array.size,
                    array.succeeded,
                    array.dead_lettered,
                    array.cancelled,
                    array.running,
                    array.completed
                )?;
                write_label(f, &array.job_id, &array.label)?;
                if array.revision > 1 {
                    write!(f, "\trevision={}", array.revision)?;
                }
                if let Some(wall) = array.wall_s {
                    write!(f, "\twall_s={wall:.3}")?;
                }
                if let Some(cost) = array.cost_usd {
                    write!(f, "\tcost_usd={cost:.6}")?;
                }
                Ok(())
            }
        }
    }
}

/// After a name shown first: the id, the owner and the metadata.
fn write_label(f: &mut std::fmt::Formatter<'_>, id: &str, label: &Label) -> std::fmt::Result {
    if label.name.is_some() {
        write!(f, "\tid={id}")?;
    }
    if let Some(owner) = &label.owner {
        write!(f, "\towner={owner}")?;
    }
    for (key, value) in &label.metadata {
        write!(f, "\t{key}={value}")?;
    }
    Ok(())
}

impl Status {
    /// Nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        match self {
            Status::Job(job) => matches!(
                job.state.as_str(),
                "succeeded" | "dead_lettered" | "cancelled"
            ),
            Status::Array(array) => array.completed,
        }
    }

    /// Something in it was dead-lettered.
    pub fn has_dead_letters(&self) -> bool {
        match self {
            Status::Job(job) => job.state == "dead_lettered",
            Status::Array(array) => array.dead_lettered > 0,
        }
    }
}

#[derive(Debug)]
pub struct StatusTable {
    conn: Mutex<Connection>,
    /// What folding has cost so far (for the benchmarks).
    spent: Spent,
}

/// Events folded, the transactions they took and the time spent in them.
#[derive(Debug, Default)]
struct Spent {
    events: AtomicU64,
    batches: AtomicU64,
    nanos: AtomicU64,
}

/// What folding has cost so far: events, transactions, time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldCost {
    pub events: u64,
    pub batches: u64,
    pub busy: std::time::Duration,
}

impl StatusTable {
    pub fn open(path: &Path) -> Result<Self, StatusError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let conn = crate::sqlite::open(path, SCHEMA).map_err(failed)?;
        migrate(&conn).map_err(failed)?;
        // The fold's statements, each prepared once (a job row's `UPDATE`
        // names only the columns an event changes, so it has variants).
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            conn: Mutex::new(conn),
            spent: Spent::default(),
        })
    }

    /// What folding has cost so far.
    pub fn fold_cost(&self) -> FoldCost {
        FoldCost {
            events: self.spent.events.load(Ordering::Relaxed),
            batches: self.spent.batches.load(Ordering::Relaxed),
            busy: std::time::Duration::from_nanos(self.spent.nanos.load(Ordering::Relaxed)),
        }
    }

    /// Applies events in one transaction.
    pub fn apply_all(&self, events: &[Event]) -> Result<Vec<Applied>, StatusError> {
        let started = std::time::Instant::now();
        let applied = self.apply_in_one(events)?;
        self.spent
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.spent.batches.fetch_add(1, Ordering::Relaxed);
        self.spent
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(applied)
    }

    fn apply_in_one(&self, events: &[Event]) -> Result<Vec<Applied>, StatusError> {
        let mut conn = self.conn.lock().map_err(failed)?;
        let tx = conn.transaction().map_err(failed)?;
        let mut batch = row::Batch::default();
        let applied = events
            .iter()
            .map(|e| fold::apply(&tx, &mut batch, e).map_err(failed))
            .collect::<Result<_, _>>()?;
        batch.write(&tx).map_err(failed)?;
        tx.commit().map_err(failed)?;
        Ok(applied)
    }

    pub fn apply(&self, event: &Event) -> Result<Applied, StatusError> {
        Ok(self.apply_all(std::slice::from_ref(event))?[0])
    }

    /// Notes that a worker is alive now (the monitor's recent workers).
    pub fn worker_alive(
        &self,
        worker: &crate::job::event::WorkerIdentity,
    ) -> Result<(), StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        fold::worker_alive(&conn, worker).map_err(failed)
    }
}

/// Brings a file made by an earlier version up to this one: its columns,
/// its arrays' counts (kept by the fold since; counted once from the rows
/// here), and the indexes.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, kind) in COLUMNS {
        crate::sqlite::add_column(conn, table, column, kind)?;
    }
    // Another process may be opening the file too: the check and the
    // count are one write transaction.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let counted = tx
        .prepare("SELECT 1 FROM pragma_table_info('arrays') WHERE name = ?1")?
        .exists([ARRAY_COUNTS[0].1])?;
    if !counted {
        for (state, column) in ARRAY_COUNTS {
            crate::sqlite::add_column(&tx, "arrays", column, "INTEGER NOT NULL DEFAULT 0")?;
            tx.execute(
                &format!(
                    "UPDATE arrays SET {column} = (SELECT COUNT(*) FROM jobs
                     WHERE jobs.array_id = arrays.job_id AND jobs.state = ?1)"
                ),
                [state],
            )?;
        }
    }
    tx.commit()?;
    conn.execute_batch(INDEXES)
}
