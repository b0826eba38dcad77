//! The jobs list (a job or an array a row) and an array's page (its grid
//! of frames, a page at a time), as HTML.

use maud::{Markup, html};

use super::board::{ArrayRow, Filter, JobRow, Listed};
use super::grid::{Cell, Layout};
use super::pages::{Csrf, cancel_button, job_link, progress, thumbnail, waits_for};
use crate::events::ledger::ParentWait;
use crate::job::label::Label;

/// When, to the second, in UTC.
fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// How long from `started` to `ended` (or to now, while it runs).
fn took(started: Option<i64>, ended: Option<i64>) -> String {
    let Some(started) = started else {
        return String::new();
    };
    let ended = ended.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let s = (ended - started).max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// An array's frames done of all, or its children's when its frames are
/// unknown.
pub(super) fn done_of(array: &ArrayRow) -> String {
    match array.frames_done() {
        Some(done) => format!("{done} of {} frames", array.frames),
        None => format!(
            "{} of {} children",
            array.counts.of("succeeded"),
            array.size
        ),
    }
}

fn counts(array: &ArrayRow) -> Markup {
    let queued = array.size.saturating_sub(array.counts.seen());
    html! {
        @for (state, n) in array.counts.nonzero() { span class=(state) { (n) " " (state) } " " }
        @if queued > 0 { span.queued { (queued) " queued" } }
    }
}

fn array_row(array: &ArrayRow) -> Markup {
    html! {
        tr.array {
            td {
                "array " a href=(format!("/ui/jobs/{}", array.job_id)) { (array.label.display(&array.job_id)) }
                (label(&array.label))
                @if array.revision > 1 { " · revision " (array.revision) }
            }
            td { (array.size) " children" }
            td { (array.command) }
            td { @if array.completed { "completed" } @else { "in progress" } }
            td { (done_of(array)) br; (counts(array)) }
            td { (when(array.started_ms.or(array.submitted_ms))) }
            // An array completed before this version kept no end.
            td { @if !array.completed || array.ended_ms.is_some() { (took(array.started_ms.or(array.submitted_ms), array.ended_ms)) } }
        }
    }
}

fn job_row(job: &JobRow) -> Markup {
    html! {
        tr class=(job.state) {
            td {
                (job_link(job))
                (label(&job.label))
                @if let (Some(array), Some(index)) = (&job.array_id, job.array_index) {
                    br; "child " (index) " of " a href=(format!("/ui/jobs/{array}")) { (array) }
                }
            }
            td { (job.message_id) }
            td { (job.command) }
            td { (job.state) @if job.attempt > 1 { " (try " (job.attempt) ")" } }
            td { (progress(job)) }
            td { (when(job.started_ms)) }
            td { (took(job.started_ms, job.ended_ms)) }
        }
    }
}

/// A row's owner and metadata, after its name.
fn label(label: &Label) -> Markup {
    html! {
        @if let Some(owner) = &label.owner { br; span.owner { "owner " (owner) } }
        @for (key, value) in &label.metadata { " " span.meta { (key) "=" (value) } }
    }
}

pub fn jobs(rows: &[Listed], filter: &Filter) -> Markup {
    let (state, command, search) = (&filter.state, &filter.command, &filter.search);
    html! {
        main {
            h1 { "Jobs" }
            form method="get" action="/ui/jobs" {
                "State " select name="state" {
                    @for s in ["", "submitted", "running", "failed", "requeued", "succeeded", "dead_lettered", "cancelled"] {
                        option value=(s) selected[s == state] { @if s.is_empty() { "any" } @else { (s) } }
                    }
                }
                " Command " input name="command" value=(command);
                " Job, message or array id " input name="q" value=(search);
                " Name " input name="name" value=(filter.name);
                " Owner " input name="owner" value=(filter.owner);
                " Metadata " input name="meta" placeholder="key=value" value=(filter.meta);
                " " button { "Filter" }
            }
            table id="jobs" {
                tr {
                    th { "job id" } th { "message id" } th { "command" } th { "state" }
                    th { "progress" } th { "started (UTC)" } th { "duration" }
                }
                @for row in rows {
                    @match row {
                        Listed::Job(job) => { (job_row(job)) }
                        Listed::Array(array) => { (array_row(array)) }
                    }
                }
            }
        }
    }
}

/// A cell; `pick`: with a box to select its frame for a re-render.
fn cell(cell: &Cell, pick: bool) -> Markup {
    let state = cell.state();
    let label = match cell.frame {
        Some(frame) => frame.to_string(),
        None => format!("#{}", cell.index),
    };
    html! {
        @match cell.child {
            Some(child) => {
                @if let (Some(frame), true) = (cell.frame, pick) {
                    input type="checkbox" name="frame" value=(frame) title="select for Re-render";
                }
                a class=(format!("cell {state}")) href=(format!("/ui/jobs/{}", child.job_id)) data-state=(state) data-frame=[cell.frame] data-revision=(child.revision.max(1)) title=[child.usage_line()] {
                    (label) " " (state)
                    @if child.revision > 1 { " r" (child.revision) }
                    @if let Some(name) = cell.thumbnail { (thumbnail(&child.queue, name)) }
                }
            }
            None => {
                span class="cell queued" data-state="queued" data-frame=[cell.frame] { (label) " queued" }
            }
        }
    }
}

fn pager(array: &ArrayRow, layout: &Layout) -> Markup {
    let link = |page: usize| format!("/ui/jobs/{}?page={}", array.job_id, page + 1);
    html! {
        @if layout.pages > 1 {
            p.pager {
                @if layout.page > 0 { a href=(link(layout.page - 1)) { "previous" } " · " }
                "cells " (layout.cells.start + 1) "–" (layout.cells.end) " of " (layout.total)
                " · page " (layout.page + 1) " of " (layout.pages)
                @if layout.page + 1 < layout.pages { " · " a href=(link(layout.page + 1)) { "next" } }
            }
        }
    }
}

pub fn array(
    array: &ArrayRow,
    layout: &Layout,
    cells: &[Cell],
    waits: &[ParentWait],
    csrf: Csrf,
) -> Markup {
    html! {
        main {
            h1 { "Array " (array.label.display(&array.job_id)) }
            @if array.label.name.is_some() { p { "id " (array.job_id) } }
            @if array.revision > 1 { p { "Revision " (array.revision) } }
            p {
                (array.command) " · " (array.size) " children"
                @if array.chunk_size > 0 { " of " (array.chunk_size) " frames" }
                " · " (done_of(array))
                " · children succeeded " span id="succeeded" { (array.counts.of("succeeded")) }
                " · dead-lettered " (array.counts.of("dead_lettered"))
                " · cancelled " (array.counts.of("cancelled"))
                @if let Some(wall) = array.wall_s { " · run time " span id="wall" { (format!("{wall:.1} s")) } }
                @if let Some(cost) = array.cost_usd { " · cost " span id="cost" { (format!("${cost:.4}")) } }
                " · " @if array.completed { "completed" } @else { "in progress" }
                " " @if !array.completed { (cancel_button(csrf, &array.job_id)) }
            }
            (waits_for(waits))
            @if layout.by_frame() { p { "Frames " (array.frame_spec) } }
            @else { p { "The status table does not know this array's frames: a cell per child." } }
            (pager(array, layout))
            @match (csrf, layout.by_frame()) {
                (Some(token), true) => {
                    form method="post" action="/ui/rerender" {
                        input type="hidden" name="csrf" value=(token);
                        input type="hidden" name="job_id" value=(array.job_id);
                        div.grid {
                            @for c in cells { (cell(c, true)) }
                        }
                        p {
                            "Frames " input name="frames" placeholder="or a spec: 12,40-45";
                            " " button { "Re-render" }
                        }
                    }
                }
                _ => {
                    div.grid {
                        @for c in cells { (cell(c, false)) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::events::status::StatusTable;
    use crate::job::event::{ArrayRef, Event, EventType, JobRef};

    async fn get(router: &axum::Router, uri: &str) -> (axum::http::StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// A 10,000-frame array (chunks of 4, every child succeeded with a
    /// thumbnail a frame) is 20 pages, each well under 300 KiB; a forged
    /// size of four billion is served clamped.
    #[tokio::test]
    async fn a_10000_frame_array_page_is_bounded_and_a_forged_size_is_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sqlite3");
        let table = StatusTable::open(&path).unwrap();
        let array = "6f2a3d8e-0000-4000-8000-00000000a77a";
        let mut events = vec![Event::new(
            EventType::JobSubmitted,
            Some(JobRef {
                job_id: array.into(),
                queue: "q".into(),
                command: "render_demo".into(),
                ..JobRef::default()
            }),
            json!({"array_size": 2500, "frames": 10000, "frame_spec": "1-10000", "chunk_size": 4}),
        )];
        for index in 0..2500u32 {
            let message_id = uuid::Uuid::new_v4().to_string();
            let frames: Vec<u32> = (index * 4 + 1..index * 4 + 5).collect();
            let thumbnails: Vec<String> = (0..4).map(|n| format!("{message_id}/{n}.jpg")).collect();
            events.push(Event::new(
                EventType::JobSucceeded,
                Some(JobRef {
                    job_id: uuid::Uuid::new_v4().to_string(),
                    message_id,
                    queue: "q".into(),
                    command: "render_demo".into(),
                    attempt: 1,
                    array: Some(ArrayRef {
                        job_id: array.into(),
                        index,
                        size: 2500,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                json!({"outputs": [], "thumbnails": thumbnails, "thumbnail_frames": frames}),
            ));
        }
        table.apply_all(&events).unwrap();
        let router = crate::ui::Ui::new(
            Some(&path),
            Default::default(),
            Default::default(),
            None,
            None,
        )
        .max_frames(100_000)
        .router();
        for page in ["", "?page=20"] {
            let (status, html) = get(&router, &format!("/ui/jobs/{array}{page}")).await;
            assert!(status.is_success(), "{status}");
            assert!(html.len() < 300 * 1024, "{} bytes", html.len());
            assert_eq!(html.matches("data-state=\"succeeded\"").count(), 500);
            assert_eq!(html.matches("<img").count(), 500);
        }
        let (_, last) = get(&router, &format!("/ui/jobs/{array}?page=20")).await;
        assert!(last.contains("data-frame=\"10000\""));
        assert!(last.contains("cells 9501–10000 of 10000"));
        let (_, list) = get(&router, "/ui/jobs").await;
        assert!(list.contains("10000 of 10000 frames"), "{list}");

        drop(table);
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE arrays SET size = 4000000000, frames = 4000000000",
                [],
            )
            .unwrap();
        let router = crate::ui::Ui::new(
            Some(&path),
            Default::default(),
            Default::default(),
            None,
            None,
        )
        .max_frames(1_000)
        .router();
        let (status, html) = get(&router, &format!("/ui/jobs/{array}")).await;
        assert!(status.is_success(), "{status}");
        assert!(html.contains("of 1000"), "clamped to max_frames");
        let (status, _) = get(&router, "/ui").await;
        assert!(status.is_success());
    }

    /// The overview counts an array's frames, not its chunks, and its
    /// tables have headers.
    #[tokio::test]
    async fn the_overview_says_240_frames_for_240_frames_in_chunks_of_4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sqlite3");
        let table = StatusTable::open(&path).unwrap();
        let submitted = Event::new(
            EventType::JobSubmitted,
            Some(JobRef {
                job_id: "6f2a3d8e-0000-4000-8000-000000000240".into(),
                queue: "q".into(),
                command: "render_demo".into(),
                ..JobRef::default()
            }),
            json!({"array_size": 60, "frames": 240, "frame_spec": "1-240", "chunk_size": 4}),
        );
        let mut worker = Event::new(EventType::WorkerStarted, None, json!({}));
        worker.worker = Some(crate::job::event::WorkerIdentity::current());
        table.apply_all(&[submitted, worker]).unwrap();
        let router = crate::ui::Ui::new(
            Some(&path),
            Default::default(),
            Default::default(),
            None,
            None,
        )
        .router();
        let (status, html) = get(&router, "/ui").await;
        assert!(status.is_success(), "{status}");
        assert!(html.contains("<td>240 frames</td>"), "{html}");
        assert!(html.contains("0 of 240 frames"), "{html}");
        assert!(
            html.contains("<th>host</th><th>worker id</th><th>state</th>"),
            "{html}"
        );
        assert!(html.contains("<td>running</td>"), "{html}");
    }

    /// A child's usage is its cell's tooltip; the array's page sums the
    /// cost and run time of its children's tries.
    #[tokio::test]
    async fn an_arrays_page_totals_its_cost_and_each_cell_shows_its_usage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sqlite3");
        let table = StatusTable::open(&path).unwrap();
        let array = "6f2a3d8e-0000-4000-8000-0000000c0575";
        let events: Vec<Event> = (0..2u32)
            .map(|index| {
                let usage = json!({"wall_s": 10.0, "cpu_s": 2.5, "peak_rss_bytes": 1u64 << 30,
                                   "cost_usd": 0.00425});
                Event::new(
                    EventType::JobSucceeded,
                    Some(JobRef {
                        job_id: uuid::Uuid::new_v4().to_string(),
                        message_id: uuid::Uuid::new_v4().to_string(),
                        queue: "q".into(),
                        command: "render_demo".into(),
                        attempt: 1,
                        array: Some(ArrayRef {
                            job_id: array.into(),
                            index,
                            size: 2,
                            revision: None,
                            frames: vec![],
                        }),
                        label: Default::default(),
                    }),
                    json!({"outputs": [], "usage": usage}),
                )
            })
            .collect();
        table.apply_all(&events).unwrap();
        let router = crate::ui::Ui::new(
            Some(&path),
            Default::default(),
            Default::default(),
            None,
            None,
        )
        .router();
        let (status, html) = get(&router, &format!("/ui/jobs/{array}")).await;
        assert!(status.is_success(), "{status}");
        assert!(html.contains(r#"<span id="cost">$0.0085</span>"#), "{html}");
        assert!(html.contains(r#"<span id="wall">20.0 s</span>"#), "{html}");
        let tooltip = "title=\"wall 10.0 s · CPU 2.5 s · peak RSS 1.00 GiB · $0.00425\"";
        assert_eq!(html.matches(tooltip).count(), 2, "{html}");
    }

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(took(Some(0), Some(12_400)), "12 s");
        assert_eq!(took(Some(0), Some(125_000)), "2 min 05 s");
        assert_eq!(took(Some(0), Some(3_725_000)), "1 h 02 min");
        assert_eq!(took(None, Some(5)), "");
    }
}
