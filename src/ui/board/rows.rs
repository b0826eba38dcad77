//! The rows the monitor's pages show, and how each is read from the
//! status table.

use rusqlite::Row;

use crate::events::status::ARRAY_COUNTS;
use crate::events::status::label_columns as label;
use crate::job::label::Label;

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
    /// The frame each thumbnail shows, where the worker said (empty from
    /// older workers).
    pub thumbnail_frames: Vec<Option<i64>>,
    pub reason: Option<String>,
    pub array_id: Option<String>,
    pub array_index: Option<u32>,
    /// Milliseconds since the epoch: its first start, its end.
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// When an event last touched it (seconds), for merging lists.
    pub at: i64,
    pub label: Label,
    /// An array child's revision (1: the submit's), and a re-render
    /// child's frames (empty: all of its index's).
    pub revision: u32,
    pub frames: Vec<i64>,
    /// Its last try's `usage` (JSON), and what its tries cost.
    pub usage: Option<String>,
    pub cost_usd: Option<f64>,
}

impl JobRow {
    /// Its usage in a line (a grid cell's tooltip): wall and CPU time,
    /// peak memory and GPU memory, cost; empty when none was recorded.
    pub fn usage_line(&self) -> Option<String> {
        let usage: serde_json::Value = serde_json::from_str(self.usage.as_deref()?).ok()?;
        let mut parts = Vec::new();
        let number = |key: &str| usage[key].as_f64();
        if let Some(wall) = number("wall_s") {
            parts.push(format!("wall {wall:.1} s"));
        }
        if let Some(cpu) = number("cpu_s") {
            parts.push(format!("CPU {cpu:.1} s"));
        }
        let gib = |bytes: f64| bytes / f64::from(1u32 << 30);
        if let Some(rss) = number("peak_rss_bytes") {
            parts.push(format!("peak RSS {:.2} GiB", gib(rss)));
        }
        if let Some(gpu) = number("gpu_memory_peak_bytes") {
            parts.push(format!("peak GPU memory {:.2} GiB", gib(gpu)));
        }
        if let Some(cost) = self.cost_usd {
            parts.push(format!("${cost:.5}"));
        }
        (!parts.is_empty()).then(|| parts.join(" · "))
    }
}

/// An array's children in each state, as the fold keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// In `ARRAY_COUNTS`' order.
    pub by_state: [u32; ARRAY_COUNTS.len()],
}

impl Counts {
    pub fn of(&self, state: &str) -> u32 {
        ARRAY_COUNTS
            .iter()
            .position(|(s, _)| *s == state)
            .map_or(0, |i| self.by_state[i])
    }

    /// Children any event named.
    pub fn seen(&self) -> u32 {
        self.by_state.iter().sum()
    }

    /// The states with a child in them, and how many.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        ARRAY_COUNTS
            .iter()
            .zip(self.by_state)
            .filter(|(_, n)| *n > 0)
            .map(|((state, _), n)| (*state, n))
    }
}

#[derive(Debug, Clone, Default)]
pub struct ArrayRow {
    pub job_id: String,
    pub command: String,
    pub queue: String,
    /// Children, clamped to `max_frames` (a child has at least one frame).
    pub size: u32,
    /// Frames, clamped to `max_frames`; 0 when no `JobSubmitted` said.
    pub frames: u32,
    /// The frames as submitted (`1-240`), or empty.
    pub frame_spec: String,
    /// Frames a child carries; 0 when unknown.
    pub chunk_size: u32,
    pub completed: bool,
    pub counts: Counts,
    /// Whether the last child succeeded (it may carry fewer frames).
    pub last_succeeded: bool,
    pub submitted_ms: Option<i64>,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub at: i64,
    pub label: Label,
    /// Its newest revision (1 until a re-render).
    pub revision: u32,
    /// Its children's tries' cost and wall time, summed.
    pub cost_usd: Option<f64>,
    pub wall_s: Option<f64>,
}

impl ArrayRow {
    /// Frames rendered, when the frames are known: every succeeded child's
    /// frames (the last child carries what is left over).
    pub fn frames_done(&self) -> Option<u32> {
        if self.frames == 0 || self.chunk_size == 0 {
            return None;
        }
        let cs = u64::from(self.chunk_size);
        let short = (cs * u64::from(self.size)).saturating_sub(self.frames.into());
        let done = u64::from(self.counts.of("succeeded")) * cs
            - if self.last_succeeded { short } else { 0 };
        Some(done.min(self.frames.into()) as u32)
    }
}

/// A row of the jobs list: a job, or an array as one row.
#[derive(Debug, Clone)]
pub enum Listed {
    Job(JobRow),
    Array(ArrayRow),
}

impl Listed {
    pub(super) fn at(&self) -> i64 {
        match self {
            Listed::Job(job) => job.at,
            Listed::Array(array) => array.at,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub state: WorkerState,
    /// Why it said it is unhealthy.
    pub reason: Option<String>,
    /// Seconds since it was last heard from.
    pub ago: i64,
}

/// What the overview says of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Running,
    /// Said it is stopping; gone by its deadline.
    Stopping,
    /// Running, by what it last said, but missed two notes: crashed or cut
    /// off.
    Silent,
    /// Said it failed too many tries in a row: takes no jobs until it is
    /// restarted (or replaced by its autoscaling group).
    Unhealthy,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Running => "running",
            WorkerState::Stopping => "stopping",
            WorkerState::Silent => "silent",
            WorkerState::Unhealthy => "unhealthy",
        }
    }
}

/// The workers heard from lately: the ones still there, and how many
/// stopped (their stop's deadline passed).
#[derive(Debug, Clone, Default)]
pub struct Workers {
    pub live: Vec<WorkerRow>,
    pub stopped: usize,
}

pub(super) const JOB_COLUMNS: &str = "job_id, message_id, command, queue, state, attempt, progress, outputs, \
                           thumbnails, thumbnail_frames, reason, array_id, array_index, \
                           started_ms, ended_ms, at, name, owner, metadata, revision, frames, usage, cost_usd";

pub(super) fn job(row: &Row) -> rusqlite::Result<JobRow> {
    fn list<T: serde::de::DeserializeOwned>(row: &Row, i: usize) -> rusqlite::Result<Vec<T>> {
        Ok(serde_json::from_str(&row.get::<_, String>(i)?).unwrap_or_default())
    }
    Ok(JobRow {
        job_id: row.get(0)?,
        message_id: row.get(1)?,
        command: row.get(2)?,
        queue: row.get(3)?,
        state: row.get(4)?,
        attempt: row.get(5)?,
        progress: row.get(6)?,
        outputs: list(row, 7)?,
        thumbnails: list(row, 8)?,
        thumbnail_frames: list(row, 9)?,
        reason: row.get(10)?,
        array_id: row.get(11)?,
        array_index: row.get(12)?,
        started_ms: row.get(13)?,
        ended_ms: row.get(14)?,
        at: row.get(15)?,
        label: label(row, 16)?,
        revision: row.get(19)?,
        frames: serde_json::from_str(&row.get::<_, String>(20)?).unwrap_or_default(),
        usage: row.get(21)?,
        cost_usd: row.get(22)?,
    })
}

/// The array columns `array_row` reads, `a` being the arrays table.
pub(super) fn array_columns() -> String {
    let counts: Vec<String> = ARRAY_COUNTS
        .iter()
        .map(|(_, column)| format!("a.{column}"))
        .collect();
    format!(
        "a.job_id, a.command, a.queue, a.size, a.frames, a.frame_spec, a.chunk_size, a.completed,
         a.submitted_ms, a.started_ms, a.ended_ms, a.at,
         EXISTS (SELECT 1 FROM jobs j INDEXED BY jobs_by_array
                 WHERE j.array_id = a.job_id AND j.array_index = a.size - 1
                 AND j.state = 'succeeded'),
         {}, a.name, a.owner, a.metadata, a.revision, a.cost_usd, a.wall_s",
        counts.join(", ")
    )
}

/// Sizes read from the table are clamped to `max_frames`: nothing the
/// monitor allocates follows a number a forged row could make huge.
pub(super) fn array_row(row: &Row, max_frames: u32) -> rusqlite::Result<ArrayRow> {
    let clamp = |i| -> rusqlite::Result<u32> {
        Ok(row.get::<_, i64>(i)?.clamp(0, max_frames.into()) as u32)
    };
    let mut counts = Counts::default();
    for (i, count) in counts.by_state.iter_mut().enumerate() {
        *count = row.get::<_, i64>(13 + i)?.clamp(0, u32::MAX.into()) as u32;
    }
    Ok(ArrayRow {
        job_id: row.get(0)?,
        command: row.get(1)?,
        queue: row.get(2)?,
        size: clamp(3)?,
        frames: clamp(4)?,
        frame_spec: row.get(5)?,
        chunk_size: clamp(6)?,
        completed: row.get(7)?,
        submitted_ms: row.get(8)?,
        started_ms: row.get(9)?,
        ended_ms: row.get(10)?,
        at: row.get(11)?,
        last_succeeded: row.get(12)?,
        label: label(row, 13 + ARRAY_COUNTS.len())?,
        revision: row.get(16 + ARRAY_COUNTS.len())?,
        cost_usd: row.get(17 + ARRAY_COUNTS.len())?,
        wall_s: row.get(18 + ARRAY_COUNTS.len())?,
        counts,
    })
}
