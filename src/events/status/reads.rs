//! What `renderq status`, `queue_manager_job_status` and `submit --wait`
//! read: one job or array by id, counted from the array's own counts.

use rusqlite::OptionalExtension;

use crate::job::label::Label;

use super::{ArrayStatus, JobStatus, Status, StatusError, StatusTable, failed};

impl StatusTable {
    /// A job (by job id or message id) or an array (by its id).
    pub fn get(&self, id: &str) -> Result<Option<Status>, StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        let array = conn
            .query_row(
                "SELECT job_id, command, size, completed, n_succeeded, n_dead_lettered,
                        n_cancelled, n_submitted + n_running + n_failed + n_requeued,
                        name, owner, metadata, revision, cost_usd, wall_s
                 FROM arrays WHERE job_id = ?1",
                [id],
                |row| {
                    Ok(ArrayStatus {
                        job_id: row.get(0)?,
                        command: row.get(1)?,
                        size: row.get(2)?,
                        completed: row.get(3)?,
                        succeeded: row.get(4)?,
                        dead_lettered: row.get(5)?,
                        cancelled: row.get(6)?,
                        running: row.get(7)?,
                        label: label(row, 8)?,
                        revision: row.get(11)?,
                        cost_usd: row.get(12)?,
                        wall_s: row.get(13)?,
                    })
                },
            )
            .optional()
            .map_err(failed)?;
        if let Some(array) = array {
            return Ok(Some(Status::Array(array)));
        }
        conn.query_row(
            "SELECT job_id, message_id, command, state, attempt, progress, outputs, reason,
                    name, owner, metadata, revision, frames, usage, cost_usd
             FROM jobs WHERE job_id = ?1
             UNION ALL
             SELECT job_id, message_id, command, state, attempt, progress, outputs, reason,
                    name, owner, metadata, revision, frames, usage, cost_usd
             FROM jobs WHERE message_id = ?1 LIMIT 1",
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
                    label: label(row, 8)?,
                    revision: row.get(11)?,
                    frames: serde_json::from_str(&row.get::<_, String>(12)?).unwrap_or_default(),
                    usage: row
                        .get::<_, Option<String>>(13)?
                        .and_then(|text| serde_json::from_str(&text).ok()),
                    cost_usd: row.get(14)?,
                }))
            },
        )
        .optional()
        .map_err(failed)
    }

    /// Every row, for comparing two tables (all but when each was last
    /// written, which is the folding's time, not the events').
    pub fn dump(&self) -> Result<Vec<String>, StatusError> {
        let conn = self.conn.lock().map_err(failed)?;
        let mut rows = Vec::new();
        for query in [
            "SELECT job_id, message_id, command, array_id, array_index, state, attempt, progress,
                    outputs, reason, thumbnails, thumbnail_frames, started_ms, ended_ms,
                    usage, cost_usd
             FROM jobs ORDER BY job_id",
            "SELECT job_id, command, size, completed, frames, frame_spec, chunk_size,
                    submitted_ms, started_ms, ended_ms, n_submitted, n_running, n_failed,
                    n_requeued, n_succeeded, n_dead_lettered, n_cancelled, wall_s, cost_usd
             FROM arrays ORDER BY job_id",
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

/// A label from its columns `name, owner, metadata`, from `first` on.
pub fn label(row: &rusqlite::Row, first: usize) -> rusqlite::Result<Label> {
    Ok(Label {
        name: row.get(first)?,
        owner: row.get(first + 1)?,
        metadata: serde_json::from_str(&row.get::<_, String>(first + 2)?).unwrap_or_default(),
    })
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
