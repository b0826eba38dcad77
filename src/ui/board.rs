//! What the monitor shows, read from the job-status table through a
//! read-only connection of its own (so it sees every process's commits,
//! and `PRAGMA data_version` says when there were any). Every query here
//! walks an index the status table keeps for it (`EXPLAIN QUERY PLAN` is
//! checked in the tests), so a page costs the same with a week of history
//! as with an hour of it.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

mod labels;
mod queries;
mod rows;

use queries::*;
pub use rows::{ArrayRow, Counts, JobRow, Listed, WorkerRow, WorkerState, Workers};
use rows::{array_row, job};

/// How long a worker that sent nothing stays in the overview.
pub const WORKER_STALE_S: i64 = 600;

/// A running worker notes itself every minute: one not heard from for
/// this long has missed two notes.
pub const WORKER_SILENT_S: i64 = 150;

/// The most rows a list shows.
pub const LIST_LIMIT: usize = 200;

/// The most arrays and running jobs the overview shows.
const OVERVIEW_LIMIT: usize = 50;

/// Which jobs a list shows; empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: String,
    pub command: String,
    /// The start of a job id, message id or array id: ASCII letters,
    /// digits, `-` and `_` only, lower case (ids are written so).
    pub search: String,
    /// A job's or array's name, owner, or one metadata entry
    /// (`key=value`), each matched exactly.
    pub name: String,
    pub owner: String,
    pub meta: String,
}

impl Filter {
    /// From a query string; anything unreadable filters nothing.
    pub fn parse(query: Option<&str>) -> Self {
        let mut filter = Filter::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value: String = value.trim().chars().take(100).collect();
            match key.as_ref() {
                "state" => filter.state = value,
                "command" => filter.command = value,
                "name" => filter.name = value,
                "owner" => filter.owner = value,
                "meta" => filter.meta = value,
                "q" => {
                    filter.search = value
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                        .map(|c| c.to_ascii_lowercase())
                        .collect()
                }
                _ => {}
            }
        }
        filter
    }
}

/// The rows of `sql` (one `?` per `values`), read by `read`.
fn rows<T>(
    c: &Connection,
    sql: &str,
    values: &[&dyn rusqlite::ToSql],
    read: impl FnMut(&Row) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    c.prepare_cached(sql)?.query_map(values, read)?.collect()
}

#[derive(Debug)]
pub struct Board {
    /// Read-only connections, so that pages open at once (each refetched
    /// on every change) read side by side rather than one at a time. The
    /// first also answers `version`: `data_version` is per connection.
    conns: Vec<Mutex<Connection>>,
    /// Which connection the next read waits for when all are busy.
    next: AtomicUsize,
}

/// Connections a board reads through.
const READERS: usize = 4;

impl Board {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conns = (0..READERS)
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(std::time::Duration::from_secs(2))?;
                Ok(Mutex::new(conn))
            })
            .collect::<rusqlite::Result<_>>()?;
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a free connection, or waits for one in turn.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let free = self.conns.iter().find_map(|c| c.try_lock().ok());
        let conn = match free {
            Some(conn) => conn,
            None => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
                self.conns[turn].lock().expect("board lock")
            }
        };
        f(&conn)
    }

    /// Changes whenever another connection committed to the table.
    pub fn version(&self) -> rusqlite::Result<i64> {
        let conn = self.conns[0].lock().expect("board lock");
        conn.query_row("PRAGMA data_version", [], |r| r.get(0))
    }

    /// The jobs list, newest first: jobs that are not arrays' children,
    /// and arrays as one row each; with a search, children whose job or
    /// message id starts with it too.
    pub fn jobs(&self, filter: &Filter, max_frames: u32) -> rusqlite::Result<Vec<Listed>> {
        let (jobs, arrays) = if filter.by_label() {
            self.labelled(filter, max_frames)?
        } else {
            (
                self.top_jobs(filter)?,
                self.list_arrays(filter, max_frames)?,
            )
        };
        let mut listed: Vec<Listed> = jobs
            .into_iter()
            .map(Listed::Job)
            .chain(arrays.into_iter().map(Listed::Array))
            .collect();
        listed.sort_by_key(|row| std::cmp::Reverse(row.at()));
        listed.truncate(LIST_LIMIT);
        Ok(listed)
    }

    fn top_jobs(&self, filter: &Filter) -> rusqlite::Result<Vec<JobRow>> {
        let (low, high) = prefix_range(&filter.search);
        let limit = LIST_LIMIT as i64;
        self.with(|c| {
            let sql = top_jobs_sql(filter);
            match (
                filter.search.is_empty(),
                filter.state.is_empty(),
                filter.command.is_empty(),
            ) {
                (false, _, _) => rows(
                    c,
                    &sql,
                    params![low, high, filter.state, filter.command, limit],
                    job,
                ),
                (true, true, true) => rows(c, &sql, params![limit], job),
                (true, false, true) => rows(c, &sql, params![filter.state, limit], job),
                (true, _, false) => {
                    rows(c, &sql, params![filter.command, filter.state, limit], job)
                }
            }
        })
    }

    /// Arrays for the jobs list: by command, by id, or with a child in the
    /// state asked for (its count says so).
    fn list_arrays(&self, filter: &Filter, max_frames: u32) -> rusqlite::Result<Vec<ArrayRow>> {
        let Some(sql) = list_arrays_sql(filter) else {
            return Ok(Vec::new());
        };
        let (low, high) = prefix_range(&filter.search);
        let limit = LIST_LIMIT as i64;
        self.with(|c| {
            let read = |row: &Row| array_row(row, max_frames);
            if !filter.search.is_empty() {
                rows(c, &sql, params![low, high, filter.command, limit], read)
            } else if !filter.command.is_empty() {
                rows(c, &sql, params![filter.command, limit], read)
            } else {
                rows(c, &sql, params![limit], read)
            }
        })
    }

    /// Running jobs, array children included, newest first.
    pub fn running(&self) -> rusqlite::Result<Vec<JobRow>> {
        self.with(|c| rows(c, &running_sql(), params![OVERVIEW_LIMIT as i64], job))
    }

    /// A job by its job id or message id.
    pub fn job(&self, id: &str) -> rusqlite::Result<Option<JobRow>> {
        self.with(|c| c.query_row(&job_sql(), [id], job).optional())
    }

    pub fn array(&self, id: &str, max_frames: u32) -> rusqlite::Result<Option<ArrayRow>> {
        self.with(|c| {
            c.query_row(&array_sql(), [id], |row| array_row(row, max_frames))
                .optional()
        })
    }

    /// Arrays, newest first.
    pub fn arrays(&self, max_frames: u32) -> rusqlite::Result<Vec<ArrayRow>> {
        self.with(|c| {
            rows(c, &arrays_sql(), params![OVERVIEW_LIMIT as i64], |row| {
                array_row(row, max_frames)
            })
        })
    }

    /// An array's children with indexes in `indexes`, by index.
    pub fn children(
        &self,
        array_id: &str,
        indexes: std::ops::Range<u32>,
    ) -> rusqlite::Result<Vec<JobRow>> {
        self.with(|c| {
            rows(
                c,
                &children_sql(),
                params![array_id, indexes.start, indexes.end],
                job,
            )
        })
    }

    /// The newest job that left a thumbnail.
    pub fn last_frame(&self) -> rusqlite::Result<Option<JobRow>> {
        self.with(|c| c.query_row(&last_frame_sql(), [], job).optional())
    }

    /// Workers heard from within `WORKER_STALE_S`, newest first, less the
    /// ones whose stop's deadline has passed (counted).
    pub fn workers(&self) -> rusqlite::Result<Workers> {
        let now = crate::sqlite::now_s();
        let found = self.with(|c| {
            rows(c, WORKERS_SQL, params![now - WORKER_STALE_S], |r| {
                let at: i64 = r.get(3)?;
                let gone_at: Option<i64> = r.get(4)?;
                let state: String = r.get(2)?;
                let state = match state.as_str() {
                    "stopping" if gone_at.is_none_or(|t| t <= now) => None,
                    "stopping" => Some(WorkerState::Stopping),
                    "unhealthy" => Some(WorkerState::Unhealthy),
                    _ if now - at > WORKER_SILENT_S => Some(WorkerState::Silent),
                    _ => Some(WorkerState::Running),
                };
                let Some(state) = state else {
                    return Ok(None);
                };
                Ok(Some(WorkerRow {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    state,
                    reason: r.get(5)?,
                    ago: now - at,
                }))
            })
        })?;
        let stopped = found.iter().filter(|w| w.is_none()).count();
        Ok(Workers {
            live: found.into_iter().flatten().collect(),
            stopped,
        })
    }
}

#[cfg(test)]
mod tests;
