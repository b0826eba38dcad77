//! The monitor's pages as HTML (maud: checked at compile time, every
//! value escaped). Each page is a `<main>`, which the live script swaps
//! for a fresh one when the status table changes.

use maud::{DOCTYPE, Markup, html};

use super::board::{ArrayRow, JobRow, Workers};
use crate::events::ledger::ParentWait;
use crate::queue::{DeadLetter, Stats};

const STYLE: &str = r#"
body{font:14px system-ui,sans-serif;margin:0;color:#222}
nav{background:#223;padding:.5em 1em}nav a{color:#fff;margin-right:1.5em;text-decoration:none}
main{padding:1em}table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}
.bar{display:inline-block;width:120px;height:10px;background:#eee}.bar span{display:block;height:10px;background:#37a}
.grid{display:flex;flex-wrap:wrap;gap:3px}.cell{width:84px;font-size:11px;border:1px solid #ccc;padding:2px}
.cell img{display:block;width:80px;height:auto}
.succeeded{background:#cfc}.running{background:#cdf}.dead_lettered,.failed{background:#fcc}
.cancelled{background:#ddd}.queued,.submitted{background:#fff}.requeued{background:#ffd}
form.inline{display:inline}.reason{font-family:monospace;white-space:pre-wrap}
"#;

/// What the pages need to draw buttons: the CSRF token, or `None` when
/// the monitor is read-only.
pub type Csrf<'a> = Option<&'a str>;

/// A whole page, or only its `<main>` for the live script.
pub fn page(title: &str, fragment: bool, main: Markup) -> Markup {
    if fragment {
        return main;
    }
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · renderq" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                nav {
                    a href="/ui" { "Overview" }
                    a href="/ui/jobs" { "Jobs" }
                    a href="/ui/dead" { "Dead letters" }
                }
                (main)
                script src="/ui/live.js" {}
            }
        }
    }
}

pub(super) fn progress(job: &JobRow) -> Markup {
    let percent = job.progress.unwrap_or(0.0).clamp(0.0, 100.0);
    html! {
        span.bar title=(format!("{percent:.0} %")) { span style=(format!("width:{percent:.0}%")) {} }
        " " (format!("{percent:.0} %"))
    }
}

pub(super) fn job_link(job: &JobRow) -> Markup {
    html! { a href=(format!("/ui/jobs/{}", job.job_id)) title=(job.job_id) { (job.label.display(&job.job_id)) } }
}

pub(super) fn thumbnail(queue: &str, name: &str) -> Markup {
    html! { img src=(format!("/ui/thumbnails/{queue}/{name}")) alt="thumbnail" loading="lazy"; }
}

pub fn overview(
    queues: &[(String, Option<Stats>)],
    running: &[JobRow],
    workers: &Workers,
    arrays: &[ArrayRow],
    last: Option<&JobRow>,
) -> Markup {
    html! {
        main {
            h1 { "Overview" }
            h2 { "Queues" }
            table {
                tr { th { "queue" } th { "visible" } th { "in flight" } th { "dead-lettered" } }
                @for (name, stats) in queues {
                    tr {
                        td { (name) }
                        @match stats {
                            Some(s) => { td { (s.visible) } td { (s.in_flight) } td { a href=(format!("/ui/dead?queue={name}")) { (s.dead_lettered) } } }
                            None => { td colspan="3" { "unavailable" } }
                        }
                    }
                }
            }
            h2 { "Running" }
            @if running.is_empty() { p { "Nothing is running." } }
            @else {
                table {
                    tr { th { "job id" } th { "message id" } th { "command" } th { "progress" } }
                    @for job in running {
                        tr { td { (job_link(job)) } td { (job.message_id) } td { (job.command) } td { (progress(job)) } }
                    }
                }
            }
            h2 { "Arrays" }
            @if arrays.is_empty() { p { "No array is in the status table." } }
            @else {
                table id="arrays" {
                    tr { th { "array" } th { "command" } th { "size" } th { "done" } th { "state" } }
                    @for array in arrays {
                        tr {
                            td { a href=(format!("/ui/jobs/{}", array.job_id)) { (array.job_id) } }
                            td { (array.command) }
                            td {
                                @if array.frames > 0 { (array.frames) " frames" }
                                @else { (array.size) " children" }
                            }
                            td { (super::listing::done_of(array)) }
                            td { @if array.completed { "completed" } @else { "in progress" } }
                        }
                    }
                }
            }
            h2 { "Workers" }
            @if workers.live.is_empty() { p { "No worker is running (none was heard from in the last 10 minutes)." } }
            @else {
                table id="workers" {
                    tr { th { "host" } th { "worker id" } th { "state" } th { "last heard" } }
                    @for w in &workers.live {
                        tr { td { (w.host) } td { (w.id) } td { (w.state.name()) @if let Some(reason) = &w.reason { ": " (reason) } } td { (w.ago) " s ago" } }
                    }
                }
            }
            @if workers.stopped > 0 {
                p { (workers.stopped) " stopped in the last 10 minutes." }
            }
            @if let Some(job) = last {
                h2 { "Last rendered frame" }
                @if let Some(name) = job.thumbnails.last() {
                    a href=(format!("/ui/jobs/{}", job.job_id)) { (thumbnail(&job.queue, name)) }
                }
            }
        }
    }
}

pub(super) fn cancel_button(csrf: Csrf, id: &str) -> Markup {
    html! {
        @if let Some(token) = csrf {
            form.inline method="post" action="/ui/cancel" {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="job_id" value=(id);
                button { "Cancel" }
            }
        }
    }
}

pub fn job(job: &JobRow, waits: &[ParentWait], csrf: Csrf) -> Markup {
    let ended = matches!(
        job.state.as_str(),
        "succeeded" | "dead_lettered" | "cancelled"
    );
    html! {
        main {
            h1 { "Job " (job.label.display(&job.job_id)) }
            @if job.label.name.is_some() { p { "id " (job.job_id) } }
            table {
                tr { th { "message id" } td { (job.message_id) } }
                tr { th { "command" } td { (job.command) } }
                tr { th { "queue" } td { (job.queue) } }
                tr { th { "state" } td class=(job.state) { (job.state) } }
                tr { th { "attempt" } td { (job.attempt) } }
                tr { th { "progress" } td { (progress(job)) } }
                @if let Some(reason) = &job.reason { tr { th { "reason" } td.reason { (reason) } } }
                @if let Some(usage) = job.usage_line() { tr { th { "usage" } td.usage { (usage) } } }
                @if let Some(array) = &job.array_id {
                    tr { th { "array" } td { a href=(format!("/ui/jobs/{array}")) { (array) } " child " (job.array_index.unwrap_or(0)) } }
                }
            }
            @if !ended { p { (cancel_button(csrf, &job.job_id)) } }
            (waits_for(waits))
            h2 { "Outputs" }
            ul { @for output in &job.outputs { li { (output) } } }
            @for name in &job.thumbnails { (thumbnail(&job.queue, name)) }
        }
    }
}

/// The parents a held job or array still waits for (nothing when none).
pub fn waits_for(waits: &[ParentWait]) -> Markup {
    html! {
        @if !waits.is_empty() {
            h2 { "Waits for" }
            table.waits {
                tr { th { "parent" } th { "what" } th { "queue" } th { "held children" } }
                @for wait in waits {
                    tr {
                        td { a href=(format!("/ui/jobs/{}", wait.parent_id)) { (wait.parent_id) } }
                        td { (wait.what()) }
                        td { (wait.queue) }
                        td { (wait.held_children) }
                    }
                }
            }
        }
    }
}

pub fn dead_letters(queue: &str, queues: &[String], dead: &[DeadLetter], csrf: Csrf) -> Markup {
    html! {
        main {
            h1 { "Dead letters" }
            p { @for name in queues { a href=(format!("/ui/dead?queue={name}")) { (name) } " " } }
            h2 { (queue) }
            @if dead.is_empty() { p { "No dead letters." } }
            @else if let Some(token) = csrf {
                form.inline method="post" action="/ui/redrive" {
                    input type="hidden" name="csrf" value=(token);
                    input type="hidden" name="queue" value=(queue);
                    button { "Redrive all" }
                }
            }
            table id="dead" {
                tr { th { "message" } th { "receives" } th { "reason" } th {} }
                @for d in dead {
                    tr {
                        td { (d.message_id) } td { (d.receive_count) } td.reason { (d.reason) }
                        td {
                            @if let Some(token) = csrf {
                                form.inline method="post" action="/ui/redrive" {
                                    input type="hidden" name="csrf" value=(token);
                                    input type="hidden" name="queue" value=(queue);
                                    input type="hidden" name="message_id" value=(d.message_id);
                                    button { "Redrive" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn not_found(what: &str) -> Markup {
    page(
        "Not found",
        false,
        html! { main { h1 { "Not found" } p { (what) } } },
    )
}

pub fn login(failed: bool) -> Markup {
    page(
        "Sign in",
        false,
        html! {
            main {
                h1 { "Sign in" }
                @if failed { p { "That token is not the one this endpoint expects." } }
                form method="post" action="/ui/login" {
                    "Token " input type="password" name="token" autofocus;
                    " " button { "Sign in" }
                }
            }
        },
    )
}
