//! Folding what the table keeps besides states: jobs' and arrays' names,
//! owners and metadata (one `labels` row per metadata entry of a job that
//! is not a child, and of an array, for the monitor's filter by value), and
//! arrays' revisions (a re-render's child supersedes, in its array's
//! counts, the older child of the same index; an array is completed when
//! its newest revision is).

use rusqlite::{OptionalExtension, params};

use super::fold::{count_child, exec};
use crate::job::event::{Event, EventType, JobRef};

/// Which list a `labels` row filters.
const JOB: &str = "job";
const ARRAY: &str = "array";

/// Notes the label of a job row just made (and of its array).
pub(super) fn fold_job_label(
    tx: &rusqlite::Transaction,
    job: &JobRef,
    now: i64,
) -> rusqlite::Result<()> {
    if job.label.is_empty() {
        return Ok(());
    }
    let metadata = serde_json::to_string(&job.label.metadata).unwrap_or_default();
    exec(
        tx,
        "UPDATE jobs SET name = ?2, owner = ?3, metadata = ?4 WHERE job_id = ?1",
        params![job.job_id, job.label.name, job.label.owner, metadata],
    )?;
    match &job.array {
        None => entries(tx, &job.job_id, JOB, job, now),
        Some(array) => fold_array_label(tx, &array.job_id, job, now),
    }
}

/// Notes an array's label, from any event of it or of its children, once.
pub(super) fn fold_array_label(
    tx: &rusqlite::Transaction,
    array_id: &str,
    job: &JobRef,
    now: i64,
) -> rusqlite::Result<()> {
    if job.label.is_empty() {
        return Ok(());
    }
    let metadata = serde_json::to_string(&job.label.metadata).unwrap_or_default();
    let changed = exec(
        tx,
        "UPDATE arrays SET name = ?2, owner = ?3, metadata = ?4
         WHERE job_id = ?1 AND name IS NULL AND owner IS NULL AND metadata = '{}'",
        params![array_id, job.label.name, job.label.owner, metadata],
    )?;
    if changed > 0 {
        entries(tx, array_id, ARRAY, job, now)?;
    }
    Ok(())
}

fn entries(
    tx: &rusqlite::Transaction,
    id: &str,
    kind: &str,
    job: &JobRef,
    now: i64,
) -> rusqlite::Result<()> {
    for (key, value) in &job.label.metadata {
        exec(
            tx,
            "INSERT OR IGNORE INTO labels (id, kind, key, value, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, kind, key, value, now],
        )?;
    }
    Ok(())
}

/// A new child row's place among its index's revisions: whether it is
/// superseded (a newer revision's child of the same index is there), after
/// superseding (and taking out of the array's counts) the older ones.
pub(super) fn supersede(
    tx: &rusqlite::Transaction,
    array_id: &str,
    index: u32,
    revision: u32,
) -> rusqlite::Result<bool> {
    let newer: Option<i64> = tx
        .prepare_cached(
            "SELECT 1 FROM jobs INDEXED BY jobs_by_array
             WHERE array_id = ?1 AND array_index = ?2 AND superseded = 0 AND revision > ?3",
        )?
        .query_row(params![array_id, index, revision], |row| row.get(0))
        .optional()?;
    if newer.is_some() {
        return Ok(true);
    }
    let older: Vec<(String, String)> = tx
        .prepare_cached(
            "SELECT job_id, state FROM jobs INDEXED BY jobs_by_array
             WHERE array_id = ?1 AND array_index = ?2 AND superseded = 0 AND revision < ?3",
        )?
        .query_map(params![array_id, index, revision], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (job_id, state) in older {
        exec(
            tx,
            "UPDATE jobs SET superseded = 1 WHERE job_id = ?1",
            [&job_id],
        )?;
        count_child(tx, array_id, Some(&state), "")?;
    }
    Ok(false)
}

/// An array's revision, from its `JobSubmitted` (a re-render's says
/// which) or `ArrayJobCompleted` (which revision completed): it is
/// completed while its newest revision is.
pub(super) fn fold_revision(tx: &rusqlite::Transaction, event: &Event) -> rusqlite::Result<()> {
    let Some(job) = &event.job else {
        return Ok(());
    };
    let revision = event.detail["revision"]
        .as_i64()
        .unwrap_or(1)
        .clamp(1, u32::MAX.into());
    let completed = i64::from(event.kind == EventType::ArrayJobCompleted) * revision;
    exec(
        tx,
        // A row completed before revisions were kept has its revision
        // completed (`completed * revision`). SET reads the old values.
        "UPDATE arrays SET revision = MAX(revision, ?2),
            completed_revision = MAX(completed_revision, completed * revision, ?3),
            completed = MAX(completed_revision, completed * revision, ?3) >= MAX(revision, ?2)
         WHERE job_id = ?1",
        params![job.job_id, revision, completed],
    )?;
    fold_array_label(tx, &job.job_id, job, crate::sqlite::now_s())
}
