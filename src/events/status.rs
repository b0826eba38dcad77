//! The job-status table: events folded into one row per job and one per
//! array, in SQLite, for `renderq status`, `queue_manager_job_status` and
//! `submit --wait`.
//!
//! Delivery is at least once and unordered, so folding must not care: each
//! event is applied once (by `event_id`), and a row only moves forward. A
//! job's state is ranked: a final state (succeeded, then dead-lettered or cancelled)
//! beats any running one; among running ones a later attempt wins, then a
//! later step (submitted < started < failed or requeued). Progress is the
//! highest seen for the latest attempt. The same events, in any order and
//! any number of times, give the same table.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::event::{Event, EventType};

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
CREATE INDEX IF NOT EXISTS by_array ON jobs (array_id);
CREATE INDEX IF NOT EXISTS by_message ON jobs (message_id);
CREATE TABLE IF NOT EXISTS arrays (
    job_id    TEXT PRIMARY KEY,
    command   TEXT NOT NULL DEFAULT '',
    size      INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    at        INTEGER NOT NULL DEFAULT 0
);
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
    /// `ArrayJobCompleted` was seen.
    pub completed: bool,
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
                    job.job_id, job.state, job.attempt, job.command
                )?;
                if let Some(progress) = job.progress {
                    write!(f, "\tprogress={progress:.0}%")?;
                }
                if let Some(reason) = &job.reason {
                    write!(f, "\treason={reason}")?;
                }
                for output in &job.outputs {
                    write!(f, "\toutput={output}")?;
                }
                Ok(())
            }
            Status::Array(array) => write!(
                f,
                "array {}\tsize={}\tsucceeded={}\tdead_lettered={}\tcancelled={}\trunning={}\tcompleted={}",
                array.job_id,
                array.size,
                array.succeeded,
                array.dead_lettered,
                array.cancelled,
                array.running,
                array.completed
            ),
        }
    }
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

/// A state and its rank; `None` for events that do not move a job.
fn job_state(kind: EventType) -> Option<(&'static str, i64)> {
    Some(match kind {
        EventType::JobSubmitted => ("submitted", 0),
        EventType::JobStarted | EventType::JobProgress | EventType::TaskSucceeded => ("running", 1),
        EventType::JobFailed | EventType::TaskFailed => ("failed", 2),
        EventType::JobRequeued => ("requeued", 2),
        EventType::JobDeadLettered => ("dead_lettered", 9),
        EventType::JobCancelled => ("cancelled", 9),
        EventType::JobSucceeded => ("succeeded", 10),
        _ => return None,
    })
}

/// Final states outrank every attempt.
const FINAL_RANK: i64 = 9;

#[derive(Debug)]
pub struct StatusTable {
    conn: Mutex<Connection>,
}

impl StatusTable {
    pub fn open(path: &Path) -> Result<Self, StatusError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let conn = crate::sqlite::open(path, SCHEMA).map_err(failed)?;
        // When a row was last written, for the prune; files made by an
        // earlier version gain the column.
        for table in ["seen", "jobs", "arrays"] {
            crate::sqlite::add_column(&conn, table, "at", "INTEGER NOT NULL DEFAULT 0")
                .map_err(failed)?;
        }
        // The queue a job is on, and its outputs' thumbnails (for the
        // monitor).
        for (column, kind) in [
            ("queue", "TEXT NOT NULL DEFAULT ''"),
            ("thumbnails", "TEXT NOT NULL DEFAULT '[]'"),
        ] {
            crate::sqlite::add_column(&conn, "jobs", column, kind).map_err(failed)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Applies events in one transaction.
    pub fn apply_all(&self, events: &[Event]) -> Result<Vec<Applied>, StatusError> {
        let mut conn = self.conn.lock().map_err(failed)?;
        let tx = conn.transaction().map_err(failed)?;
        let applied = events
            .iter()
            .map(|e| apply(&tx, e).map_err(failed))
            .collect::<Result<_, _>>()?;
        tx.commit().map_err(failed)?;
        Ok(applied)
    }

    /// Deletes the rows no event touched within `retention`; returns how
    /// many.
    pub fn prune(&self, retention: std::time::Duration) -> Result<u64, StatusError> {
        let cutoff = crate::sqlite::now_s() - retention.as_secs() as i64;
        let mut conn = self.conn.lock().map_err(failed)?;
        let tx = conn.transaction().map_err(failed)?;
        let mut deleted = 0;
        for table in ["seen", "jobs", "arrays", "workers"] {
            deleted += tx
                .execute(&format!("DELETE FROM {table} WHERE at < ?1"), [cutoff])
                .map_err(failed)?;
        }
        tx.commit().map_err(failed)?;
        Ok(deleted as u64)
    }

    /// Notes that a worker is alive now (the monitor's recent workers).
    pub fn worker_alive(
        &self,
        worker: &crate::job::event::WorkerIdentity,
    ) -> Result<(), StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        conn.execute(
            "INSERT INTO workers (worker_id, host, at) VALUES (?1, ?2, ?3)
             ON CONFLICT (worker_id) DO UPDATE SET at = excluded.at",
            params![worker.id, worker.host, crate::sqlite::now_s()],
        )
        .map(drop)
        .map_err(failed)
    }

    pub fn apply(&self, event: &Event) -> Result<Applied, StatusError> {
        Ok(self.apply_all(std::slice::from_ref(event))?[0])
    }

    /// A job (by job id or message id) or an array (by its id).
    pub fn get(&self, id: &str) -> Result<Option<Status>, StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        let array = conn
            .query_row(
                "SELECT job_id, command, size, completed FROM arrays WHERE job_id = ?1",
                [id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, u32>(2)?,
                        row.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(failed)?;
        if let Some((job_id, command, size, completed)) = array {
            let (succeeded, dead_lettered, cancelled, seen): (u32, u32, u32, u32) = conn
                .query_row(
                    "SELECT COUNT(*) FILTER (WHERE state = 'succeeded'),
                            COUNT(*) FILTER (WHERE state = 'dead_lettered'),
                            COUNT(*) FILTER (WHERE state = 'cancelled'),
                            COUNT(*)
                     FROM jobs WHERE array_id = ?1",
                    [id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                )
                .map_err(failed)?;
            return Ok(Some(Status::Array(ArrayStatus {
                job_id,
                command,
                size,
                succeeded,
                dead_lettered,
                cancelled,
                running: seen - succeeded - dead_lettered - cancelled,
                completed,
            })));
        }
        conn.query_row(
            "SELECT job_id, message_id, command, state, attempt, progress, outputs, reason
             FROM jobs WHERE job_id = ?1 OR message_id = ?1 LIMIT 1",
            [id],
            |row| {
                let outputs: String = row.get(6)?;
                Ok(Status::Job(JobStatus {
                    job_id: row.get(0)?,
                    message_id: row.get(1)?,
                    command: row.get(2)?,
                    state: row.get(3)?,
                    attempt: row.get(4)?,
                    progress: row.get(5)?,
                    outputs: serde_json::from_str(&outputs).unwrap_or_default(),
                    reason: row.get(7)?,
                }))
            },
        )
        .optional()
        .map_err(failed)
    }

    /// Every row, for comparing two tables.
    pub fn dump(&self) -> Result<Vec<String>, StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        let mut rows = Vec::new();
        for query in [
            "SELECT job_id, message_id, command, array_id, array_index, state, attempt, progress, outputs, reason FROM jobs ORDER BY job_id",
            "SELECT job_id, command, size, completed FROM arrays ORDER BY job_id",
        ] {
            let mut stmt = conn.prepare(query).map_err(failed)?;
            let columns = stmt.column_count();
            let mut found = stmt.query([]).map_err(failed)?;
            while let Some(row) = found.next().map_err(failed)? {
                let values: Vec<String> = (0..columns)
                    .map(|i| {
                        format!("{:?}", row.get_ref(i).map(|v| v.data_type()))
                            + &text(row.get_ref(i).ok())
                    })
                    .collect();
                rows.push(values.join("|"));
            }
        }
        Ok(rows)
    }
}

fn text(value: Option<rusqlite::types::ValueRef>) -> String {
    use rusqlite::types::ValueRef;
    match value {
        Some(ValueRef::Integer(n)) => n.to_string(),
        Some(ValueRef::Real(x)) => x.to_string(),
        Some(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => String::new(),
    }
}

/// Runs a statement, prepared once per connection.
fn exec(
    tx: &rusqlite::Transaction,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn apply(tx: &rusqlite::Transaction, event: &Event) -> rusqlite::Result<Applied> {
    let now = crate::sqlite::now_s();
    // Progress folds the same however often it comes (the highest wins), so
    // its ids, most of all events, are not kept.
    if event.kind != EventType::JobProgress
        && tx
            .prepare_cached("INSERT OR IGNORE INTO seen (event_id, at) VALUES (?1, ?2)")?
            .execute(params![event.event_id, now])?
            == 0
    {
        return Ok(Applied::Duplicate);
    }
    // Who sent it: the monitor's recent workers.
    if let Some(worker) = &event.worker {
        let state = match event.kind {
            EventType::WorkerStopping | EventType::WorkerInterrupted => "stopping",
            _ => "running",
        };
        exec(
            tx,
            "INSERT INTO workers (worker_id, host, state, at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (worker_id) DO UPDATE SET state = CASE
                WHEN workers.state = 'stopping' THEN 'stopping' ELSE excluded.state END,
                at = MAX(workers.at, excluded.at)",
            params![worker.id, worker.host, state, now],
        )?;
    }
    let Some(job) = &event.job else {
        return Ok(Applied::New);
    };
    if let Some(array) = &job.array {
        exec(
            tx,
            "INSERT INTO arrays (job_id, command, size, at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (job_id) DO UPDATE SET size = MAX(size, excluded.size), at = excluded.at",
            params![array.job_id, job.command, array.size, now],
        )?;
    }
    match event.kind {
        EventType::ArrayJobCompleted => {
            let size = event.detail["size"].as_i64().unwrap_or(0);
            exec(
                tx,
                "INSERT INTO arrays (job_id, command, size, completed, at) VALUES (?1, ?2, ?3, 1, ?4)
                 ON CONFLICT (job_id) DO UPDATE
                 SET completed = 1, size = MAX(size, excluded.size), at = excluded.at",
                params![job.job_id, job.command, size, now],
            )?;
            return Ok(Applied::New);
        }
        EventType::JobSubmitted if event.detail.get("array_size").is_some() => {
            let size = event.detail["array_size"].as_i64().unwrap_or(0);
            exec(
                tx,
                "INSERT INTO arrays (job_id, command, size, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (job_id) DO UPDATE SET size = MAX(size, excluded.size), at = excluded.at",
                params![job.job_id, job.command, size, now],
            )?;
            return Ok(Applied::New);
        }
        _ => {}
    }
    let Some((state, rank)) = job_state(event.kind) else {
        return Ok(Applied::New);
    };
    let attempt = i64::from(job.attempt);
    // Final states outrank any attempt; otherwise (attempt, rank) orders.
    let order = |attempt: i64, rank: i64| {
        if rank >= FINAL_RANK {
            (i64::MAX, rank)
        } else {
            (attempt, rank)
        }
    };
    let existing: Option<(i64, i64)> = tx
        .prepare_cached("SELECT attempt, rank FROM jobs WHERE job_id = ?1")?
        .query_row([&job.job_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let reason = event.detail.get("reason").and_then(Value::as_str);
    let (array_id, array_index) = match &job.array {
        Some(a) => (Some(a.job_id.as_str()), Some(a.index)),
        None => (None, None),
    };
    let ahead = existing.is_none_or(|(a, r)| order(attempt, rank) > order(a, r));
    if existing.is_none() {
        exec(tx,
            "INSERT INTO jobs (job_id, message_id, command, array_id, array_index, state, rank, attempt, reason, at, queue)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![job.job_id, job.message_id, job.command, array_id, array_index, state, rank, attempt, reason, now, job.queue],
        )?;
    } else if ahead {
        exec(
            tx,
            "UPDATE jobs SET state = ?2, rank = ?3, attempt = MAX(attempt, ?4),
                reason = ?5, at = ?7,
                message_id = CASE WHEN message_id = '' THEN ?6 ELSE message_id END
             WHERE job_id = ?1",
            params![
                job.job_id,
                state,
                rank,
                attempt,
                reason,
                job.message_id,
                now
            ],
        )?;
    } else {
        exec(
            tx,
            // The highest attempt seen, whatever the order (a final state
            // keeps its state, not a lower attempt).
            "UPDATE jobs SET attempt = MAX(attempt, ?2), at = ?3 WHERE job_id = ?1",
            params![job.job_id, attempt, now],
        )?;
    }
    if event.kind == EventType::JobProgress
        && let Some(percent) = event.detail["percent"].as_f64()
    {
        exec(tx,
            "UPDATE jobs SET
                progress = CASE WHEN ?2 > progress_of THEN ?3 ELSE MAX(COALESCE(progress, 0), ?3) END,
                progress_of = MAX(progress_of, ?2)
             WHERE job_id = ?1 AND ?2 >= progress_of",
            params![job.job_id, attempt, percent],
        )?;
    }
    if event.kind == EventType::JobSucceeded {
        exec(
            tx,
            // Done is 100 %, whatever progress arrives late.
            "UPDATE jobs SET outputs = ?2, progress = 100, progress_of = 2147483647,
                thumbnails = ?3 WHERE job_id = ?1",
            params![
                job.job_id,
                event.detail["outputs"].to_string(),
                match &event.detail["thumbnails"] {
                    Value::Array(list) => Value::Array(list.clone()).to_string(),
                    _ => "[]".to_owned(),
                }
            ],
        )?;
    }
    Ok(Applied::New)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::event::{ArrayRef, JobRef};
    use serde_json::json;

    fn event(kind: EventType, job: &str, attempt: u32, detail: Value) -> Event {
        Event::new(
            kind,
            Some(JobRef {
                job_id: job.into(),
                message_id: format!("m-{job}"),
                queue: "q".into(),
                command: "render_demo".into(),
                attempt,
                array: Some(ArrayRef {
                    job_id: "arr".into(),
                    index: 0,
                    size: 2,
                }),
            }),
            detail,
        )
    }

    fn history() -> Vec<Event> {
        vec![
            event(EventType::JobStarted, "a", 1, json!({})),
            event(EventType::JobProgress, "a", 1, json!({"percent": 40.0})),
            event(
                EventType::JobFailed,
                "a",
                1,
                json!({"reason": "boom", "will_retry": true}),
            ),
            event(EventType::JobStarted, "a", 2, json!({})),
            event(EventType::JobProgress, "a", 2, json!({"percent": 10.0})),
            event(
                EventType::JobSucceeded,
                "a",
                2,
                json!({"outputs": ["s3://b/k"]}),
            ),
            event(EventType::JobStarted, "b", 1, json!({})),
            event(EventType::JobDeadLettered, "b", 1, json!({"reason": "403"})),
        ]
    }

    #[test]
    fn order_and_repeats_do_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let once = StatusTable::open(&dir.path().join("once")).unwrap();
        let events = history();
        once.apply_all(&events).unwrap();

        let shuffled = StatusTable::open(&dir.path().join("shuffled")).unwrap();
        let mut twice: Vec<Event> = events.iter().chain(&events).cloned().collect();
        twice.reverse();
        twice.swap(1, 9);
        let applied = shuffled.apply_all(&twice).unwrap();
        // Progress is folded again, harmlessly, rather than remembered.
        assert_eq!(
            applied.iter().filter(|a| **a == Applied::Duplicate).count(),
            6
        );
        assert_eq!(once.dump().unwrap(), shuffled.dump().unwrap());

        let Some(Status::Job(a)) = once.get("m-a").unwrap() else {
            panic!("job a")
        };
        assert_eq!((a.state.as_str(), a.attempt), ("succeeded", 2));
        assert_eq!(a.outputs, ["s3://b/k"]);
        let Some(Status::Array(array)) = once.get("arr").unwrap() else {
            panic!("array")
        };
        assert_eq!(
            (array.size, array.succeeded, array.dead_lettered),
            (2, 1, 1)
        );
    }

    /// Every order of a history folds to the same table (shuffled with
    /// random bytes from v4 UUIDs).
    #[test]
    fn any_order_folds_to_the_same_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut events = history();
        // A success, then a later attempt's failure that arrives after it.
        events.push(event(
            EventType::JobSucceeded,
            "c",
            1,
            json!({"outputs": []}),
        ));
        events.push(event(
            EventType::JobFailed,
            "c",
            2,
            json!({"reason": "late", "will_retry": true}),
        ));
        let reference = StatusTable::open(&dir.path().join("reference")).unwrap();
        reference.apply_all(&events).unwrap();
        let Some(Status::Job(c)) = reference.get("m-c").unwrap() else {
            panic!("job c")
        };
        assert_eq!((c.state.as_str(), c.attempt), ("succeeded", 2));
        for run in 0..100 {
            let mut shuffled = events.clone();
            for i in (1..shuffled.len()).rev() {
                let random = uuid::Uuid::new_v4().as_u128();
                shuffled.swap(i, (random % (i as u128 + 1)) as usize);
            }
            let table = StatusTable::open(&dir.path().join(format!("run-{run}"))).unwrap();
            for event in &shuffled {
                table.apply(event).unwrap();
            }
            assert_eq!(
                reference.dump().unwrap(),
                table.dump().unwrap(),
                "run {run}"
            );
        }
    }

    #[test]
    fn a_prune_deletes_rows_older_than_the_retention_and_nothing_younger() {
        let dir = tempfile::tempdir().unwrap();
        let table = StatusTable::open(&dir.path().join("status")).unwrap();
        table.apply_all(&history()).unwrap();
        // Everything so far is two days old; then job c arrives.
        table
            .conn
            .lock()
            .unwrap()
            .execute_batch(
                "UPDATE seen SET at = at - 172800; UPDATE jobs SET at = at - 172800;
                 UPDATE arrays SET at = at - 172800;",
            )
            .unwrap();
        table
            .apply(&event(EventType::JobStarted, "c", 1, json!({})))
            .unwrap();
        let deleted = table.prune(std::time::Duration::from_secs(86400)).unwrap();
        assert_eq!(
            deleted,
            6 + 2,
            "six seen ids and jobs a and b (the array was touched by c)"
        );
        assert!(table.get("a").unwrap().is_none());
        assert!(table.get("b").unwrap().is_none());
        assert!(table.get("c").unwrap().is_some());
        assert!(table.get("arr").unwrap().is_some());
    }
}
