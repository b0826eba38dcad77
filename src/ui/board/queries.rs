//! The monitor's queries, one per list and filter shape.

use super::Filter;
use super::rows::{JOB_COLUMNS, array_columns};
use crate::events::status::ARRAY_COUNTS;

// The queries, one per list and filter shape, each on the index the
// status table keeps for it. `INDEXED BY` wherever the planner, which has
// no statistics, could pick another: `jobs_by_array` for `array_id IS
// NULL` (then sorting the whole table), or `jobs_by_state` for an array's
// last child (then walking every succeeded job: 8 s with 700,000 rows).

pub(super) fn top_jobs_sql(filter: &Filter) -> String {
    if !filter.search.is_empty() {
        // Children too: a message id that submit returned for an array
        // names a child.
        return format!(
            "SELECT {JOB_COLUMNS} FROM (
                SELECT * FROM jobs WHERE job_id >= ?1 AND job_id < ?2
                UNION
                SELECT * FROM jobs WHERE message_id >= ?1 AND message_id < ?2
             )
             WHERE (?3 = '' OR state = ?3) AND (?4 = '' OR command = ?4)
             ORDER BY at DESC LIMIT ?5"
        );
    }
    match (filter.state.is_empty(), filter.command.is_empty()) {
        (true, true) => format!(
            "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY top_by_at WHERE array_id IS NULL
             ORDER BY at DESC LIMIT ?1"
        ),
        (false, true) => format!(
            "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY top_by_state
             WHERE array_id IS NULL AND state = ?1 ORDER BY at DESC LIMIT ?2"
        ),
        (_, false) => format!(
            "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY top_by_command
             WHERE array_id IS NULL AND command = ?1 AND (?2 = '' OR state = ?2)
             ORDER BY at DESC LIMIT ?3"
        ),
    }
}

/// `None` when no array can match (a state no job is ever in).
pub(super) fn list_arrays_sql(filter: &Filter) -> Option<String> {
    let state_test = match filter.state.as_str() {
        "" => String::new(),
        state => {
            let (_, column) = ARRAY_COUNTS.iter().find(|(s, _)| *s == state)?;
            format!("AND a.{column} > 0")
        }
    };
    let columns = array_columns();
    Some(if !filter.search.is_empty() {
        format!(
            "SELECT {columns} FROM arrays a WHERE a.job_id >= ?1 AND a.job_id < ?2
             AND (?3 = '' OR a.command = ?3) {state_test}
             ORDER BY a.at DESC LIMIT ?4"
        )
    } else if !filter.command.is_empty() {
        format!(
            "SELECT {columns} FROM arrays a WHERE a.command = ?1 {state_test}
             ORDER BY a.at DESC LIMIT ?2"
        )
    } else {
        format!(
            "SELECT {columns} FROM arrays a INDEXED BY arrays_by_at WHERE 1 {state_test}
             ORDER BY a.at DESC LIMIT ?1"
        )
    })
}

pub(super) fn running_sql() -> String {
    format!(
        "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_by_state WHERE state = 'running'
         ORDER BY at DESC LIMIT ?1"
    )
}

pub(super) fn job_sql() -> String {
    format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1
         UNION ALL SELECT {JOB_COLUMNS} FROM jobs WHERE message_id = ?1 LIMIT 1"
    )
}

pub(super) fn array_sql() -> String {
    format!(
        "SELECT {} FROM arrays a WHERE a.job_id = ?1",
        array_columns()
    )
}

pub(super) fn arrays_sql() -> String {
    format!(
        "SELECT {} FROM arrays a INDEXED BY arrays_by_at ORDER BY a.at DESC LIMIT ?1",
        array_columns()
    )
}

pub(super) fn children_sql() -> String {
    format!(
        "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_by_array
         WHERE array_id = ?1 AND array_index >= ?2 AND array_index < ?3
         ORDER BY array_index"
    )
}

pub(super) fn last_frame_sql() -> String {
    format!(
        "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_with_thumbnails
         WHERE thumbnails != '[]' ORDER BY at DESC LIMIT 1"
    )
}

pub(super) const WORKERS_SQL: &str =
    "SELECT worker_id, host, state, at, gone_at, reason FROM workers
     WHERE at >= ?1 ORDER BY at DESC LIMIT 100";

/// The ids that start with `prefix`, as a range an index can walk: every
/// character an id holds sorts below DEL.
pub(super) fn prefix_range(prefix: &str) -> (String, String) {
    (prefix.to_owned(), format!("{prefix}\u{7f}"))
}
