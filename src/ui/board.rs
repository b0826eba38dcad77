//! What the monitor shows, read from the job-status table through a
//! read-only connection of its own (so it sees every process's commits,
//! and `PRAGMA data_version` says when there were any).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

/// How long a worker that sent nothing stays in the overview.
pub const WORKER_STALE_S: i64 = 600;

/// The most rows a list shows.
pub const LIST_LIMIT: usize = 200;

#[derive(Debug, Clone, Default)]
pub struct JobRow {
    pub job_id: String,
    pub message_id: String,
    pub command: String,
    pub queue: String,
    pub state: String,
    pub attempt: u32,
    pub progress: Option<f64>,
    pub outputs: Vec<String>,
    pub thumbnails: Vec<String>,
    pub reason: Option<String>,
    pub array_id: Option<String>,
    pub array_index: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ArrayRow {
    pub job_id: String,
    pub command: String,
    pub size: u32,
    pub completed: bool,
}

#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub state: String,
    /// Seconds since it was last heard from.
    pub ago: i64,
}

/// Which jobs a list shows; empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: String,
    pub command: String,
    /// A job id, message id or array id, or the start of one.
    pub search: String,
}

impl Filter {
    /// From a query string; anything unreadable filters nothing.
    pub fn parse(query: Option<&str>) -> Self {
        let mut filter = Filter::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = value.trim().chars().take(100).collect();
            match key.as_ref() {
                "state" => filter.state = value,
                "command" => filter.command = value,
                "q" => filter.search = value,
                _ => {}
            }
        }
        filter
    }
}

const JOB_COLUMNS: &str = "job_id, message_id, command, queue, state, attempt, progress, outputs, \
                           thumbnails, reason, array_id, array_index";

fn job(row: &Row) -> rusqlite::Result<JobRow> {
    let list = |i| -> rusqlite::Result<Vec<String>> {
        Ok(serde_json::from_str(&row.get::<_, String>(i)?).unwrap_or_default())
    };
    Ok(JobRow {
        job_id: row.get(0)?,
        message_id: row.get(1)?,
        command: row.get(2)?,
        queue: row.get(3)?,
        state: row.get(4)?,
        attempt: row.get(5)?,
        progress: row.get(6)?,
        outputs: list(7)?,
        thumbnails: list(8)?,
        reason: row.get(9)?,
        array_id: row.get(10)?,
        array_index: row.get(11)?,
    })
}

#[derive(Debug)]
pub struct Board {
    conn: Mutex<Connection>,
}

impl Board {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let conn = self.conn.lock().expect("board lock");
        f(&conn)
    }

    /// Changes whenever another connection committed to the table.
    pub fn version(&self) -> rusqlite::Result<i64> {
        self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    /// Jobs (not arrays' children) newest first, filtered.
    pub fn jobs(&self, filter: &Filter) -> rusqlite::Result<Vec<JobRow>> {
        self.with(|c| {
            let search = format!("{}%", filter.search.replace(['%', '_'], ""));
            c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                 WHERE (?1 = '' OR state = ?1) AND (?2 = '' OR command = ?2)
                   AND (?3 = '%' OR job_id LIKE ?3 OR message_id LIKE ?3 OR array_id LIKE ?3)
                 ORDER BY at DESC, rowid DESC LIMIT ?4"
            ))?
            .query_map(
                params![filter.state, filter.command, search, LIST_LIMIT as i64],
                job,
            )?
            .collect()
        })
    }

    pub fn running(&self) -> rusqlite::Result<Vec<JobRow>> {
        self.jobs(&Filter {
            state: "running".into(),
            ..Filter::default()
        })
    }

    /// A job by its job id or message id.
    pub fn job(&self, id: &str) -> rusqlite::Result<Option<JobRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1 OR message_id = ?1 LIMIT 1"
                ),
                [id],
                job,
            )
            .optional()
        })
    }

    pub fn array(&self, id: &str) -> rusqlite::Result<Option<ArrayRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT job_id, command, size, completed FROM arrays WHERE job_id = ?1",
                [id],
                |r| {
                    Ok(ArrayRow {
                        job_id: r.get(0)?,
                        command: r.get(1)?,
                        size: r.get(2)?,
                        completed: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Arrays, newest first.
    pub fn arrays(&self) -> rusqlite::Result<Vec<ArrayRow>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT job_id, command, size, completed FROM arrays
                 ORDER BY at DESC, rowid DESC LIMIT 50",
            )?
            .query_map([], |r| {
                Ok(ArrayRow {
                    job_id: r.get(0)?,
                    command: r.get(1)?,
                    size: r.get(2)?,
                    completed: r.get(3)?,
                })
            })?
            .collect()
        })
    }

    /// An array's children that any event named, by index.
    pub fn children(&self, array_id: &str) -> rusqlite::Result<Vec<JobRow>> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE array_id = ?1 ORDER BY array_index"
            ))?
            .query_map([array_id], job)?
            .collect()
        })
    }

    /// The newest job that left a thumbnail.
    pub fn last_frame(&self) -> rusqlite::Result<Option<JobRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE thumbnails != '[]'
                     ORDER BY at DESC, rowid DESC LIMIT 1"
                ),
                [],
                job,
            )
            .optional()
        })
    }

    /// Workers heard from within `WORKER_STALE_S`, newest first.
    pub fn workers(&self) -> rusqlite::Result<Vec<WorkerRow>> {
        let now = crate::sqlite::now_s();
        self.with(|c| {
            c.prepare_cached(
                "SELECT worker_id, host, state, at FROM workers WHERE at >= ?1
                 ORDER BY at DESC LIMIT 100",
            )?
            .query_map([now - WORKER_STALE_S], |r| {
                Ok(WorkerRow {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    state: r.get(2)?,
                    ago: now - r.get::<_, i64>(3)?,
                })
            })?
            .collect()
        })
    }
}
