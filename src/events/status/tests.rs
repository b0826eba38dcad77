//! The fold's rules, its reads and its prune, and a file made by an
//! earlier version brought up to date.

use serde_json::{Value, json};

use super::*;
use crate::job::event::{ArrayRef, EventType, JobRef};

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
                ..Default::default()
            }),
            ..Default::default()
        }),
        detail,
    )
}

fn history() -> Vec<Event> {
    let mut submitted = Event::new(
        EventType::JobSubmitted,
        Some(JobRef {
            job_id: "arr".into(),
            queue: "q".into(),
            command: "render_demo".into(),
            ..JobRef::default()
        }),
        json!({"array_size": 2, "frames": 7, "frame_spec": "1-7", "chunk_size": 4}),
    );
    submitted.time = "2026-12-07T01:00:00.000Z".into();
    vec![
        submitted,
        event(EventType::JobStarted, "a", 1, json!({})),
        event(EventType::JobProgress, "a", 1, json!({"percent": 40.0})),
        event(
            EventType::JobFailed,
            "a",
            1,
            json!({"reason": "boom", "will_retry": true,
                   "usage": {"wall_s": 1.5, "cost_usd": 0.25}}),
        ),
        event(EventType::JobStarted, "a", 2, json!({})),
        event(EventType::JobProgress, "a", 2, json!({"percent": 10.0})),
        event(
            EventType::JobSucceeded,
            "a",
            2,
            json!({"outputs": ["s3://b/k"], "thumbnails": ["m-a/0.jpg"], "thumbnail_frames": [1],
                   "usage": {"wall_s": 2.0, "cost_usd": 0.5}}),
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
        7
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
/// random bytes from v4 UUIDs), whether its events come one by one or in
/// batches (where a job's row is written once per batch).
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
        let batched = StatusTable::open(&dir.path().join(format!("batched-{run}"))).unwrap();
        let mut rest = shuffled.as_slice();
        while !rest.is_empty() {
            let size = 1 + (uuid::Uuid::new_v4().as_u128() % 5) as usize;
            let (batch, after) = rest.split_at(size.min(rest.len()));
            batched.apply_all(batch).unwrap();
            rest = after;
        }
        assert_eq!(
            reference.dump().unwrap(),
            batched.dump().unwrap(),
            "run {run}, in batches"
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
    // Jobs a and b are the array's children, and c touched the array:
    // they stay with it, so its counts stay true.
    assert_eq!(deleted, 7, "the seven seen ids");
    assert!(table.get("a").unwrap().is_some());
    assert!(table.get("c").unwrap().is_some());
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert_eq!(
        (array.succeeded, array.dead_lettered, array.running),
        (1, 1, 1)
    );
    // Two days on, the array and every child go together.
    table
        .conn
        .lock()
        .unwrap()
        .execute_batch("UPDATE jobs SET at = at - 172800; UPDATE arrays SET at = at - 172800;")
        .unwrap();
    let deleted = table.prune(std::time::Duration::from_secs(86400)).unwrap();
    assert_eq!(deleted, 3 + 1, "jobs a, b and c, and the array");
    assert!(table.get("arr").unwrap().is_none());
    assert!(table.get("c").unwrap().is_none());
}

/// The first version's tables, with an array of three children in them.
const OLD_FILE: &str = "
CREATE TABLE seen (event_id TEXT PRIMARY KEY);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, message_id TEXT NOT NULL DEFAULT '',
    command TEXT NOT NULL DEFAULT '', array_id TEXT, array_index INTEGER, state TEXT NOT NULL,
    rank INTEGER NOT NULL, attempt INTEGER NOT NULL, progress REAL,
    progress_of INTEGER NOT NULL DEFAULT 0, outputs TEXT NOT NULL DEFAULT '[]', reason TEXT);
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, host TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'running', at INTEGER NOT NULL DEFAULT 0);
CREATE INDEX by_array ON jobs (array_id);
CREATE TABLE arrays (job_id TEXT PRIMARY KEY, command TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0);
INSERT INTO arrays (job_id, size) VALUES ('arr', 3);
INSERT INTO jobs (job_id, array_id, array_index, state, rank, attempt) VALUES
    ('a', 'arr', 0, 'succeeded', 10, 1), ('b', 'arr', 1, 'succeeded', 10, 1),
    ('c', 'arr', 2, 'running', 1, 1);
";

#[test]
fn an_old_file_gains_its_columns_its_arrays_counts_and_the_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(OLD_FILE)
        .unwrap();
    let table = StatusTable::open(&path).unwrap();
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert_eq!((array.succeeded, array.running), (2, 1));
    // The counts move on from there.
    table
        .apply(&Event::new(
            EventType::JobSucceeded,
            Some(JobRef {
                job_id: "c".into(),
                attempt: 1,
                array: Some(ArrayRef {
                    job_id: "arr".into(),
                    index: 2,
                    size: 3,
                    ..Default::default()
                }),
                ..JobRef::default()
            }),
            json!({"outputs": []}),
        ))
        .unwrap();
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert_eq!((array.succeeded, array.running), (3, 0));
    let conn = table.conn.lock().unwrap();
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!indexes.contains(&"by_array".to_owned()), "{indexes:?}");
    for wanted in [
        "jobs_by_array",
        "top_by_at",
        "top_by_state",
        "jobs_with_thumbnails",
    ] {
        assert!(
            indexes.contains(&wanted.to_owned()),
            "{wanted} in {indexes:?}"
        );
    }
    drop(conn);
    // Opening it again changes nothing.
    let before = table.dump().unwrap();
    drop(table);
    assert_eq!(StatusTable::open(&path).unwrap().dump().unwrap(), before);
}

#[test]
fn a_stopping_worker_keeps_its_deadline_and_stays_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let table = StatusTable::open(&dir.path().join("status")).unwrap();
    let worker = crate::job::event::WorkerIdentity {
        id: "w".into(),
        host: "h".into(),
        instance_id: None,
    };
    let mut stopping = Event::new(
        EventType::WorkerStopping,
        None,
        json!({"reason": "signal", "deadline_in_ms": 30_500}),
    );
    stopping.worker = Some(worker.clone());
    stopping.time = "2026-12-07T01:00:00.000Z".into();
    let mut late = Event::new(EventType::WorkerStarted, None, json!({}));
    late.worker = Some(worker.clone());
    table.apply_all(&[stopping, late]).unwrap();
    table.worker_alive(&worker).unwrap();
    let (state, gone_at): (String, i64) = table
        .conn
        .lock()
        .unwrap()
        .query_row("SELECT state, gone_at FROM workers", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T01:00:00Z").unwrap();
    assert_eq!((state.as_str(), gone_at), ("stopping", at.timestamp() + 31));
}

/// An event of child `job` of array "arr" (2 frames, one a child), in
/// revision `revision` with its frames, named "shot010".
fn revision_event(kind: EventType, job: &str, index: u32, revision: u32) -> Event {
    let label = crate::job::label::Label {
        name: Some("shot010".into()),
        owner: Some("ana".into()),
        metadata: [("project".to_owned(), "x".to_owned())].into(),
    };
    Event::new(
        kind,
        Some(JobRef {
            job_id: job.into(),
            message_id: format!("m-{job}"),
            queue: "q".into(),
            command: "render_demo".into(),
            attempt: 1,
            array: Some(ArrayRef {
                job_id: "arr".into(),
                index,
                size: 2,
                revision: (revision > 1).then_some(revision),
                frames: if revision > 1 {
                    vec![i64::from(index) + 1]
                } else {
                    vec![]
                },
            }),
            label,
        }),
        json!({"outputs": []}),
    )
}

fn array_event(kind: EventType, detail: Value) -> Event {
    Event::new(
        kind,
        Some(JobRef {
            job_id: "arr".into(),
            queue: "q".into(),
            command: "render_demo".into(),
            ..JobRef::default()
        }),
        detail,
    )
}

#[test]
fn a_rerendered_frame_shows_its_newest_revision_and_the_array_completes_per_revision() {
    let dir = tempfile::tempdir().unwrap();
    let submitted = array_event(
        EventType::JobSubmitted,
        json!({"array_size": 2, "frames": 2, "frame_spec": "1-2", "chunk_size": 1}),
    );
    let first = vec![
        submitted,
        revision_event(EventType::JobSucceeded, "a", 0, 1),
        revision_event(EventType::JobStarted, "b", 1, 1),
        revision_event(EventType::JobSucceeded, "b", 1, 1),
        array_event(
            EventType::ArrayJobCompleted,
            json!({"size": 2, "succeeded": 2, "dead_lettered": 0, "cancelled": 0}),
        ),
    ];
    let table = StatusTable::open(&dir.path().join("t")).unwrap();
    table.apply_all(&first).unwrap();
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert!(array.completed);
    assert_eq!(array.label.name.as_deref(), Some("shot010"));
    assert_eq!(array.label.metadata["project"], "x");

    let second = vec![
        array_event(
            EventType::JobSubmitted,
            json!({"array_size": 2, "frame_spec": "1-2", "chunk_size": 1, "revision": 2}),
        ),
        revision_event(EventType::JobStarted, "c", 1, 2),
    ];
    table.apply_all(&second).unwrap();
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert_eq!(
        (
            array.completed,
            array.revision,
            array.succeeded,
            array.running
        ),
        (false, 2, 1, 1),
        "frame 2's first child no longer counts: its revision 2 runs"
    );
    let last = vec![
        revision_event(EventType::JobSucceeded, "c", 1, 2),
        array_event(
            EventType::ArrayJobCompleted,
            json!({"size": 1, "succeeded": 1, "dead_lettered": 0, "cancelled": 0, "revision": 2}),
        ),
    ];
    table.apply_all(&last).unwrap();
    let Some(Status::Array(array)) = table.get("arr").unwrap() else {
        panic!("array")
    };
    assert_eq!((array.completed, array.succeeded, array.size), (true, 2, 2));
    let Some(Status::Job(c)) = table.get("m-c").unwrap() else {
        panic!("job c")
    };
    assert_eq!((c.revision, c.frames.as_slice()), (2, &[2][..]));
    assert!(Status::Job(c).to_string().starts_with("job shot010\t"));

    // Any order gives the same rows and counts.
    let all: Vec<Event> = first.into_iter().chain(second).chain(last).collect();
    for run in 0..30 {
        let mut shuffled = all.clone();
        for i in (1..shuffled.len()).rev() {
            let random = uuid::Uuid::new_v4().as_u128();
            shuffled.swap(i, (random % (i as u128 + 1)) as usize);
        }
        let other = StatusTable::open(&dir.path().join(format!("run-{run}"))).unwrap();
        for event in &shuffled {
            other.apply(event).unwrap();
        }
        assert_eq!(table.dump().unwrap(), other.dump().unwrap(), "run {run}");
        assert_eq!(
            table.get("arr").unwrap(),
            other.get("arr").unwrap(),
            "run {run}"
        );
        // In one batch: a revision's child supersedes rows the batch holds.
        let one = StatusTable::open(&dir.path().join(format!("one-{run}"))).unwrap();
        one.apply_all(&shuffled).unwrap();
        assert_eq!(
            table.dump().unwrap(),
            one.dump().unwrap(),
            "run {run}, one batch"
        );
    }
}
