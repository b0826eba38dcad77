//! Folding one event into the table (see the module's rules): at most one
//! row per job, array and worker, each only moving forward, whatever the
//! order the events come in.

use rusqlite::{Connection, params};
use serde_json::Value;

use crate::job::event::{Event, EventType, WorkerIdentity};

use super::row::{Batch, Row, Update};
use super::{Applied, label};

/// Every state a job's row can hold.
pub const STATES: [&str; 8] = [
    "submitted",
    "held",
    "running",
    "failed",
    "requeued",
    "succeeded",
    "dead_lettered",
    "cancelled",
];

/// An array's count of children in each state, and its column: kept as
/// its children move, so that a list of arrays counts none of them.
pub const ARRAY_COUNTS: [(&str, &str); 7] = [
    ("submitted", "n_submitted"),
    ("running", "n_running"),
    ("failed", "n_failed"),
    ("requeued", "n_requeued"),
    ("succeeded", "n_succeeded"),
    ("dead_lettered", "n_dead_lettered"),
    ("cancelled", "n_cancelled"),
];

/// A state and its rank; `None` for events that do not move a job.
fn job_state(kind: EventType) -> Option<(&'static str, i64)> {
    Some(match kind {
        EventType::JobSubmitted => ("submitted", 0),
        // Held after its submit (or a hand-back); released, it is queued
        // again at the same attempt.
        EventType::JobHeld => ("held", 1),
        EventType::JobReleased => ("submitted", 2),
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

/// Runs a statement, prepared once per connection.
pub(super) fn exec(
    tx: &rusqlite::Transaction,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

/// When an event happened, in milliseconds since the epoch (its own
/// time, so that folding it later or twice gives the same value; now
/// when it has none that reads).
fn event_ms(event: &Event) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&event.time).map_or_else(
        |_| chrono::Utc::now().timestamp_millis(),
        |t| t.timestamp_millis(),
    )
}

pub(super) fn worker_alive(conn: &Connection, worker: &WorkerIdentity) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO workers (worker_id, host, at) VALUES (?1, ?2, ?3)
         ON CONFLICT (worker_id) DO UPDATE SET at = excluded.at",
        params![worker.id, worker.host, crate::sqlite::now_s()],
    )
    .map(drop)
}

/// Who sent an event: the monitor's recent workers. A worker that said it
/// is stopping stays so, and is gone by its stop's deadline (the drain
/// ends before it), so the row keeps that deadline. One that said it is
/// unhealthy stays so (with its reason) until it stops.
fn fold_worker(
    tx: &rusqlite::Transaction,
    event: &Event,
    worker: &WorkerIdentity,
    now: i64,
) -> rusqlite::Result<()> {
    let (state, gone_at) = match event.kind {
        EventType::WorkerStopping | EventType::WorkerInterrupted => {
            let deadline_s = event.detail["deadline_in_ms"]
                .as_i64()
                .map_or(0, |ms| (ms.max(0) as u64).div_ceil(1000) as i64);
            ("stopping", Some(event_ms(event) / 1000 + deadline_s))
        }
        EventType::WorkerUnhealthy => ("unhealthy", None),
        _ => ("running", None),
    };
    let reason = (event.kind == EventType::WorkerUnhealthy)
        .then(|| event.detail["reason"].as_str())
        .flatten();
    exec(
        tx,
        "INSERT INTO workers (worker_id, host, state, at, gone_at, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (worker_id) DO UPDATE SET state = CASE
            WHEN workers.state = 'stopping' THEN 'stopping'
            WHEN workers.state = 'unhealthy' AND excluded.state = 'running' THEN 'unhealthy'
            ELSE excluded.state END,
            gone_at = COALESCE(MIN(workers.gone_at, excluded.gone_at), workers.gone_at, excluded.gone_at),
            reason = COALESCE(excluded.reason, workers.reason),
            at = MAX(workers.at, excluded.at)",
        params![worker.id, worker.host, state, now, gone_at, reason],
    )
    .map(drop)
}

/// Moves one child of `array` from `from` to `to` in the array's counts
/// (a `to` that is no state: out of them).
pub(super) fn count_child(
    tx: &rusqlite::Transaction,
    array: &str,
    from: Option<&str>,
    to: &str,
) -> rusqlite::Result<()> {
    let column = |state: &str| {
        ARRAY_COUNTS
            .iter()
            .find(|(s, _)| *s == state)
            .map(|(_, c)| *c)
    };
    if let Some(from) = from.and_then(column) {
        exec(
            tx,
            &format!("UPDATE arrays SET {from} = {from} - 1 WHERE job_id = ?1"),
            [array],
        )?;
    }
    if let Some(to) = column(to) {
        exec(
            tx,
            &format!("UPDATE arrays SET {to} = {to} + 1 WHERE job_id = ?1"),
            [array],
        )?;
    }
    Ok(())
}

/// An array's `JobSubmitted` (its frames and chunks) or
/// `ArrayJobCompleted`; the row is made by whichever comes first.
fn fold_array(tx: &rusqlite::Transaction, event: &Event, now: i64) -> rusqlite::Result<()> {
    let Some(job) = &event.job else {
        return Ok(());
    };
    let size = |key: &str| {
        event.detail[key]
            .as_i64()
            .unwrap_or(0)
            .clamp(0, u32::MAX.into())
    };
    let ms = event_ms(event);
    if event.kind == EventType::ArrayJobCompleted {
        exec(
            tx,
            "INSERT INTO arrays (job_id, command, queue, size, completed, ended_ms, at)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)
             ON CONFLICT (job_id) DO UPDATE SET size = MAX(size, excluded.size),
                ended_ms = MAX(COALESCE(ended_ms, 0), excluded.ended_ms), at = excluded.at",
            params![job.job_id, job.command, job.queue, size("size"), ms, now],
        )?;
        return Ok(());
    }
    let spec = event.detail["frame_spec"].as_str().unwrap_or_default();
    exec(
        tx,
        "INSERT INTO arrays (job_id, command, queue, size, frames, frame_spec, chunk_size, submitted_ms, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (job_id) DO UPDATE SET size = MAX(size, excluded.size),
            frames = MAX(frames, excluded.frames),
            frame_spec = CASE WHEN frame_spec = '' THEN excluded.frame_spec ELSE frame_spec END,
            chunk_size = MAX(chunk_size, excluded.chunk_size),
            queue = CASE WHEN queue = '' THEN excluded.queue ELSE queue END,
            submitted_ms = MIN(COALESCE(submitted_ms, excluded.submitted_ms), excluded.submitted_ms),
            at = excluded.at",
        params![
            job.job_id,
            job.command,
            job.queue,
            size("array_size"),
            size("frames"),
            spec,
            size("chunk_size"),
            ms,
            now
        ],
    )
    .map(drop)
}

/// Folds `event` into the batch's transaction (see [`Batch`]).
pub(super) fn apply(
    tx: &rusqlite::Transaction,
    batch: &mut Batch,
    event: &Event,
) -> rusqlite::Result<Applied> {
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
    if let Some(worker) = &event.worker {
        let changes_state = matches!(
            event.kind,
            EventType::WorkerStopping | EventType::WorkerInterrupted | EventType::WorkerUnhealthy
        );
        if changes_state || !batch.noted.contains(&worker.id) {
            fold_worker(tx, event, worker, now)?;
            batch.noted.insert(worker.id.clone());
        }
    }
    let Some(job) = &event.job else {
        return Ok(Applied::New);
    };
    if let Some(array) = &job.array {
        exec(
            tx,
            // Written only when it changes: four indexes hold `at`.
            "INSERT INTO arrays (job_id, command, queue, size, at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (job_id) DO UPDATE SET size = MAX(size, excluded.size), at = excluded.at
             WHERE arrays.size < excluded.size OR arrays.at != excluded.at",
            params![array.job_id, job.command, job.queue, array.size, now],
        )?;
    }
    match event.kind {
        EventType::ArrayJobCompleted => {
            fold_array(tx, event, now)?;
            label::fold_revision(tx, event)?;
            return Ok(Applied::New);
        }
        EventType::JobSubmitted if event.detail.get("array_size").is_some() => {
            fold_array(tx, event, now)?;
            label::fold_revision(tx, event)?;
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
    let reason = event.detail.get("reason").and_then(Value::as_str);
    let (array_id, array_index) = match &job.array {
        Some(a) => (Some(a.job_id.as_str()), Some(a.index)),
        None => (None, None),
    };
    let revision = job.array.as_ref().and_then(|a| a.revision).unwrap_or(1);
    if let (Some(array), Some(index)) = (array_id, array_index)
        && revision > 1
    {
        // A re-render's child may supersede older revisions' rows: they
        // are read and written in the table, not as this batch holds them.
        batch.write_children(tx, array, index)?;
    }
    let insert = || -> rusqlite::Result<Row> {
        let superseded = match (array_id, array_index) {
            (Some(array), Some(index)) => label::supersede(tx, array, index, revision)?,
            _ => false,
        };
        let frames = job.array.as_ref().map_or_else(String::new, |a| {
            serde_json::to_string(&a.frames).unwrap_or_default()
        });
        exec(tx,
            "INSERT INTO jobs (job_id, message_id, command, array_id, array_index, state, rank, attempt, reason, at, queue,
                               revision, frames, superseded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![job.job_id, job.message_id, job.command, array_id, array_index, state, rank, attempt, reason, now, job.queue,
                    revision, frames, superseded],
        )?;
        if let Some(array) = array_id
            && !superseded
        {
            count_child(tx, array, None, state)?;
        }
        label::fold_job_label(tx, job, now)?;
        Ok(Row {
            rowid: tx.last_insert_rowid(),
            attempt,
            rank,
            state: state.to_owned(),
            array_id: array_id.map(str::to_owned),
            array_index: array_index.map(i64::from),
            superseded,
            no_message_id: job.message_id.is_empty(),
            at: now,
        })
    };
    let (pending, made) = batch.row(tx, &job.job_id, insert)?;
    let (row, update) = (&mut pending.row, &mut pending.update);
    if !made {
        update.attempt = update.attempt.max(Some(attempt));
        // `at` is left alone within its second (seven indexes hold it).
        if row.at != now {
            update.at = Some(now);
            row.at = now;
        }
        if order(attempt, rank) > order(row.attempt, row.rank) {
            update.rank = Some((rank, reason.map(str::to_owned)));
            row.rank = rank;
            if row.state != state {
                // The counts follow the row (its array is the one it was
                // made with).
                if let Some(array) = &row.array_id
                    && !row.superseded
                {
                    count_child(tx, array, Some(&row.state), state)?;
                }
                update.state = Some(state);
                row.state = state.to_owned();
            }
            // The message id once it is known.
            if row.no_message_id && !job.message_id.is_empty() {
                update.message_id = Some(job.message_id.clone());
                row.no_message_id = false;
            }
        }
        // Otherwise only the highest attempt seen, whatever the order (a
        // final state keeps its state, not a lower attempt).
        row.attempt = row.attempt.max(attempt);
    }
    let rowid = row.rowid;
    times(tx, update, event, rank, array_id)?;
    if let Some(usage) = event.detail.get("usage") {
        // `order` as one number: ranks are below 16, attempts below 2^32.
        let of = if rank >= FINAL_RANK {
            (1 << 40) + rank
        } else {
            attempt * 16 + rank
        };
        update.used(of, usage.to_string(), usage["cost_usd"].as_f64());
    }
    if event.kind == EventType::JobSucceeded {
        let list = |key: &str| match &event.detail[key] {
            Value::Array(list) => Value::Array(list.clone()).to_string(),
            _ => "[]".to_owned(),
        };
        update.succeeded = Some([
            event.detail["outputs"].to_string(),
            list("thumbnails"),
            list("thumbnail_frames"),
        ]);
    }
    array_used(tx, event, array_id)?;
    if event.kind == EventType::JobProgress
        && let Some(percent) = event.detail["percent"].as_f64()
    {
        exec(tx,
            "UPDATE jobs SET
                progress = CASE WHEN ?2 > progress_of THEN ?3 ELSE MAX(COALESCE(progress, 0), ?3) END,
                progress_of = MAX(progress_of, ?2)
             WHERE rowid = ?1 AND ?2 >= progress_of",
            params![rowid, attempt, percent],
        )?;
    }
    Ok(Applied::New)
}

/// A try's `usage` for its array: the wall time and costs of its children
/// added up (each event once: its id was seen above). The job's own is in
/// its row's [`Update`].
fn array_used(
    tx: &rusqlite::Transaction,
    event: &Event,
    array_id: Option<&str>,
) -> rusqlite::Result<()> {
    let (Some(array), Some(usage)) = (array_id, event.detail.get("usage")) else {
        return Ok(());
    };
    exec(
        tx,
        "UPDATE arrays SET wall_s = COALESCE(wall_s, 0) + ?2,
            cost_usd = CASE WHEN ?3 IS NULL THEN cost_usd ELSE COALESCE(cost_usd, 0) + ?3 END
         WHERE job_id = ?1",
        params![
            array,
            usage["wall_s"].as_f64().unwrap_or(0.0),
            usage["cost_usd"].as_f64()
        ],
    )
    .map(drop)
}

/// A job's first start and last end (and its array's first start), from
/// the events' own times: the earliest `JobStarted`, the latest final
/// event, whatever the order they come in.
fn times(
    tx: &rusqlite::Transaction,
    update: &mut Update,
    event: &Event,
    rank: i64,
    array_id: Option<&str>,
) -> rusqlite::Result<()> {
    let ms = event_ms(event);
    if event.kind == EventType::JobStarted {
        update.started(ms);
        if let Some(array) = array_id {
            exec(
                tx,
                "UPDATE arrays SET started_ms = MIN(COALESCE(started_ms, ?2), ?2) WHERE job_id = ?1",
                params![array, ms],
            )?;
        }
    }
    if rank >= FINAL_RANK {
        update.ended(ms);
    }
    Ok(())
}
