//! The monitor's reads: each walks an index, an array is one row of the
//! jobs list, sizes are clamped, stopped workers leave the overview.

use serde_json::json;

use super::*;
use crate::events::status::StatusTable;
use crate::job::event::{ArrayRef, Event, EventType, JobRef};

fn table() -> (tempfile::TempDir, StatusTable, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.sqlite3");
    let table = StatusTable::open(&path).unwrap();
    (dir, table, path)
}

fn job_event(kind: EventType, job_id: &str, array: Option<(&str, u32, u32)>) -> Event {
    Event::new(
        kind,
        Some(JobRef {
            job_id: job_id.into(),
            message_id: format!("m{job_id}"),
            queue: "q".into(),
            command: "render_demo".into(),
            attempt: 1,
            array: array.map(|(id, index, size)| ArrayRef {
                job_id: id.into(),
                index,
                size,
                ..Default::default()
            }),
            ..Default::default()
        }),
        json!({"outputs": []}),
    )
}

fn submitted_array(id: &str, spec: &str, frames: u32, chunk: u32, size: u32) -> Event {
    Event::new(
        EventType::JobSubmitted,
        Some(JobRef {
            job_id: id.into(),
            queue: "q".into(),
            command: "render_demo".into(),
            ..JobRef::default()
        }),
        json!({"array_size": size, "frames": frames, "frame_spec": spec, "chunk_size": chunk}),
    )
}

/// Every query the pages run, with a name, for its plan.
fn queries() -> Vec<(String, String)> {
    let mut all = vec![
        ("running".to_owned(), running_sql()),
        ("job".to_owned(), job_sql()),
        ("array".to_owned(), array_sql()),
        ("arrays".to_owned(), arrays_sql()),
        ("children".to_owned(), children_sql()),
        ("last frame".to_owned(), last_frame_sql()),
        ("workers".to_owned(), WORKERS_SQL.to_owned()),
    ];
    for state in ["", "succeeded"] {
        for command in ["", "render_demo"] {
            for search in ["", "ab12"] {
                let filter = Filter {
                    state: state.into(),
                    command: command.into(),
                    search: search.into(),
                    ..Filter::default()
                };
                let name = format!("{filter:?}");
                all.push((format!("jobs {name}"), top_jobs_sql(&filter)));
                if let Some(sql) = list_arrays_sql(&filter) {
                    all.push((format!("arrays {name}"), sql));
                }
            }
        }
    }
    for (sql, index) in super::labels::plans() {
        all.push((format!("labelled, on {index}"), sql));
    }
    all
}

#[test]
fn every_list_the_pages_show_walks_an_index() {
    let (_dir, _table, path) = table();
    let conn = Connection::open(&path).unwrap();
    for (name, sql) in queries() {
        let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = vec![rusqlite::types::Null; explain.parameter_count()];
        let plan: Vec<String> = explain
            .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for step in &plan {
            // A search by a state alone would walk every child in it (an
            // array's last child is found by its index).
            assert!(
                !step.contains("jobs_by_state") || name == "running",
                "{name}: {step} in {plan:#?}"
            );
            // A scan is only of an index, in its order (a LIMIT stops it),
            // or of what a search's index found.
            assert!(
                !step.starts_with("SCAN")
                    || step.contains("USING INDEX")
                    || step.contains("USING COVERING INDEX")
                    || (name.contains("ab12") && step.starts_with("SCAN (subquery")),
                "{name}: {step} in {plan:#?}"
            );
            // Only a search sorts: the ids that start with what was typed.
            assert!(
                !step.contains("TEMP B-TREE") || name.contains("ab12"),
                "{name}: {step} in {plan:#?}"
            );
        }
    }
}

#[test]
fn the_jobs_list_shows_an_array_as_one_row_and_a_search_finds_its_children() {
    let (_dir, table, path) = table();
    let mut events = vec![submitted_array("arr", "1-10", 10, 4, 3)];
    for (index, kind) in [
        EventType::JobSucceeded,
        EventType::JobStarted,
        EventType::JobSucceeded,
    ]
    .into_iter()
    .enumerate()
    {
        let index = index as u32;
        events.push(job_event(
            kind,
            &format!("c{index}"),
            Some(("arr", index, 3)),
        ));
    }
    events.push(job_event(EventType::JobSucceeded, "plain", None));
    events.push(job_event(EventType::JobDeadLettered, "dead", None));
    table.apply_all(&events).unwrap();
    let board = Board::open(&path).unwrap();

    let listed = board.jobs(&Filter::default(), 100_000).unwrap();
    assert_eq!(listed.len(), 3, "{listed:#?}");
    let arrays: Vec<&ArrayRow> = listed
        .iter()
        .filter_map(|row| match row {
            Listed::Array(array) => Some(array),
            Listed::Job(_) => None,
        })
        .collect();
    let [array] = arrays[..] else {
        panic!("one array row: {listed:#?}")
    };
    // Children 0 and 2 succeeded: 4 frames and the last child's 2.
    assert_eq!(array.frames_done(), Some(6));
    assert_eq!(
        array.counts.nonzero().collect::<Vec<_>>(),
        [("running", 1), ("succeeded", 2)]
    );

    // Filtered by state: the array has a running child, the jobs none.
    let running = board
        .jobs(&Filter::parse(Some("state=running")), 100_000)
        .unwrap();
    assert!(matches!(&running[..], [Listed::Array(_)]), "{running:#?}");
    let dead = board
        .jobs(&Filter::parse(Some("state=dead_lettered")), 100_000)
        .unwrap();
    assert!(matches!(&dead[..], [Listed::Job(job)] if job.job_id == "dead"));

    // A child's message id (what submit returned), typed in upper case.
    let found = board.jobs(&Filter::parse(Some("q=MC1")), 100_000).unwrap();
    assert!(
        matches!(&found[..], [Listed::Job(job)] if job.job_id == "c1" && job.array_id.as_deref() == Some("arr")),
        "{found:#?}"
    );
    // A plain job by its job id, and the array by its id.
    let found = board.jobs(&Filter::parse(Some("q=plai")), 100_000).unwrap();
    assert!(matches!(&found[..], [Listed::Job(job)] if job.job_id == "plain"));
    let found = board.jobs(&Filter::parse(Some("q=ar")), 100_000).unwrap();
    assert!(matches!(&found[..], [Listed::Array(a)] if a.job_id == "arr"));
}

#[test]
fn sizes_read_from_the_table_are_clamped_to_max_frames() {
    let (_dir, table, path) = table();
    table
        .apply(&submitted_array("arr", "1-10", 10, 1, 10))
        .unwrap();
    drop(table);
    // A forged row: four billion children and frames.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "UPDATE arrays SET size = 4000000000, frames = 4000000000, chunk_size = 4000000000",
        )
        .unwrap();
    let board = Board::open(&path).unwrap();
    let array = board.array("arr", 1_000).unwrap().unwrap();
    assert_eq!(
        (array.size, array.frames, array.chunk_size),
        (1_000, 1_000, 1_000)
    );
    let layout = crate::ui::grid::Layout::of(&array, 0, 1_000);
    assert_eq!(layout.cells.len(), crate::ui::grid::PAGE_CELLS);
}

#[test]
fn a_worker_past_its_stop_deadline_leaves_the_overview_and_is_counted() {
    let (_dir, table, path) = table();
    let worker = |id: &str| crate::job::event::WorkerIdentity {
        id: id.into(),
        host: "h".into(),
        instance_id: None,
    };
    let mut gone = Event::new(
        EventType::WorkerStopping,
        None,
        json!({"deadline_in_ms": 0}),
    );
    gone.worker = Some(worker("gone"));
    gone.time = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let mut stopping = Event::new(
        EventType::WorkerStopping,
        None,
        json!({"deadline_in_ms": 600_000}),
    );
    stopping.worker = Some(worker("stopping"));
    table.apply_all(&[gone, stopping]).unwrap();
    table.worker_alive(&worker("alive")).unwrap();
    let workers = Board::open(&path).unwrap().workers().unwrap();
    let live: Vec<(&str, WorkerState)> = workers
        .live
        .iter()
        .map(|w| (w.id.as_str(), w.state))
        .collect();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.contains(&("alive", WorkerState::Running)));
    assert!(live.contains(&("stopping", WorkerState::Stopping)));
    assert_eq!(workers.stopped, 1);
}

#[test]
fn an_unhealthy_worker_stays_so_with_its_reason_until_it_stops() {
    let (_dir, table, path) = table();
    let sick = crate::job::event::WorkerIdentity {
        id: "sick".into(),
        host: "h".into(),
        instance_id: None,
    };
    let event = |kind: EventType, detail| {
        let mut event = Event::new(kind, None, detail);
        event.worker = Some(sick.clone());
        event
    };
    table
        .apply_all(&[
            event(EventType::WorkerStarted, json!({})),
            event(
                EventType::WorkerUnhealthy,
                json!({"reason": "5 consecutive failed tries"}),
            ),
        ])
        .unwrap();
    // A later event that says nothing of its state changes nothing.
    table
        .apply(&event(EventType::WorkerStarted, json!({})))
        .unwrap();
    table.worker_alive(&sick).unwrap();
    let row = |board: &Board| board.workers().unwrap().live[0].clone();
    let board = Board::open(&path).unwrap();
    assert_eq!(row(&board).state, WorkerState::Unhealthy);
    assert_eq!(
        row(&board).reason.as_deref(),
        Some("5 consecutive failed tries")
    );
    table
        .apply(&event(
            EventType::WorkerStopping,
            json!({"deadline_in_ms": 600_000}),
        ))
        .unwrap();
    assert_eq!(row(&board).state, WorkerState::Stopping);
}
