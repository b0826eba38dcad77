//! The jobs list filtered by a name, an owner or a metadata value (each an
//! exact match): jobs that are not children and arrays, each list driven by
//! the index of the first of those filters given (`top_named`,
//! `top_owned`, `labels_by_value` and the arrays' own), the other
//! filters tested on the rows that index yields.

use rusqlite::{Connection, Row, named_params};

use super::rows::{JOB_COLUMNS, array_columns, array_row, job};
use super::{ArrayRow, Board, Filter, JobRow, LIST_LIMIT};
use crate::events::status::ARRAY_COUNTS;

/// The index that drives a list: the first filter given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Name,
    Owner,
    Value,
}

impl Filter {
    /// Whether a name, owner or metadata filter is given.
    pub fn by_label(&self) -> bool {
        self.by().is_some()
    }

    fn by(&self) -> Option<By> {
        if !self.name.is_empty() {
            Some(By::Name)
        } else if !self.owner.is_empty() {
            Some(By::Owner)
        } else if !self.meta_key().is_empty() {
            Some(By::Value)
        } else {
            None
        }
    }

    /// The metadata filter's key and value (`key=value`).
    fn meta_key(&self) -> &str {
        self.meta.split_once('=').map_or("", |(k, _)| k.trim())
    }

    fn meta_value(&self) -> &str {
        self.meta.split_once('=').map_or("", |(_, v)| v.trim())
    }
}

/// The tests every list makes of the filters that do not drive it; `p`
/// is the table's alias.
fn residual(p: &str, kind: &str) -> String {
    format!(
        "(:name = '' OR {p}.name = :name) AND (:owner = '' OR {p}.owner = :owner)
         AND (:command = '' OR {p}.command = :command)
         AND (:key = '' OR EXISTS (SELECT 1 FROM labels m WHERE m.id = {p}.job_id
                                   AND m.key = :key AND m.value = :value AND m.kind = '{kind}'))"
    )
}

fn jobs_sql(by: By) -> String {
    let rest = residual("j", "job");
    let state = "(:state = '' OR j.state = :state)";
    match by {
        By::Name | By::Owner => {
            let (index, column) = if by == By::Name {
                ("top_named", "name")
            } else {
                ("top_owned", "owner")
            };
            format!(
                "SELECT {JOB_COLUMNS} FROM jobs j INDEXED BY {index}
                 WHERE j.array_id IS NULL AND j.{column} = :{column} AND {state} AND {rest}
                 ORDER BY j.at DESC LIMIT :limit"
            )
        }
        By::Value => {
            let columns: Vec<String> = JOB_COLUMNS
                .split(',')
                .map(|c| format!("j.{}", c.trim()))
                .collect();
            format!(
                "SELECT {} FROM labels l INDEXED BY labels_by_value
                 JOIN jobs j ON j.job_id = l.id
                 WHERE l.kind = 'job' AND l.key = :key AND l.value = :value
                 AND j.array_id IS NULL AND {state} AND {rest}
                 ORDER BY l.at DESC LIMIT :limit",
                columns.join(", ")
            )
        }
    }
}

/// `None` when no array can match (a state no job is ever in).
fn arrays_sql(by: By, state: &str) -> Option<String> {
    let state = match state {
        "" => String::new(),
        state => {
            let (_, column) = ARRAY_COUNTS.iter().find(|(s, _)| *s == state)?;
            format!("AND a.{column} > 0")
        }
    };
    let rest = residual("a", "array");
    let columns = array_columns();
    Some(match by {
        By::Name | By::Owner => {
            let (index, column) = if by == By::Name {
                ("arrays_named", "name")
            } else {
                ("arrays_owned", "owner")
            };
            format!(
                "SELECT {columns} FROM arrays a INDEXED BY {index}
                 WHERE a.{column} = :{column} AND (:state = '' OR 1) {state} AND {rest}
                 ORDER BY a.at DESC LIMIT :limit"
            )
        }
        By::Value => format!(
            "SELECT {columns} FROM labels l INDEXED BY labels_by_value
             JOIN arrays a ON a.job_id = l.id
             WHERE l.kind = 'array' AND l.key = :key AND l.value = :value
             AND (:state = '' OR 1) {state} AND {rest}
             ORDER BY l.at DESC LIMIT :limit"
        ),
    })
}

fn read<T>(
    c: &Connection,
    sql: &str,
    filter: &Filter,
    read: impl FnMut(&Row) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    c.prepare_cached(sql)?
        .query_map(
            named_params! {
                ":name": filter.name,
                ":owner": filter.owner,
                ":command": filter.command,
                ":state": filter.state,
                ":key": filter.meta_key(),
                ":value": filter.meta_value(),
                ":limit": LIST_LIMIT as i64,
            },
            read,
        )?
        .collect()
}

impl Board {
    /// Jobs (not children) and arrays with the name, owner or metadata
    /// value asked for.
    pub(super) fn labelled(
        &self,
        filter: &Filter,
        max_frames: u32,
    ) -> rusqlite::Result<(Vec<JobRow>, Vec<ArrayRow>)> {
        let Some(by) = filter.by() else {
            return Ok((Vec::new(), Vec::new()));
        };
        self.with(|c| {
            let jobs = read(c, &jobs_sql(by), filter, job)?;
            let arrays = match arrays_sql(by, &filter.state) {
                Some(sql) => read(c, &sql, filter, |row| array_row(row, max_frames))?,
                None => Vec::new(),
            };
            Ok((jobs, arrays))
        })
    }
}

#[cfg(test)]
pub(super) fn plans() -> Vec<(String, &'static str)> {
    let mut plans = Vec::new();
    for (by, index) in [
        (By::Name, "top_named"),
        (By::Owner, "top_owned"),
        (By::Value, "labels_by_value"),
    ] {
        plans.push((jobs_sql(by), index));
    }
    for (by, index) in [
        (By::Name, "arrays_named"),
        (By::Owner, "arrays_owned"),
        (By::Value, "labels_by_value"),
    ] {
        plans.push((arrays_sql(by, "running").expect("a state"), index));
    }
    plans
}
