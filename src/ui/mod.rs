//! The web monitor at `/ui`: the farm at a glance (queues, running jobs,
//! workers, the last rendered frame), jobs and their pages, arrays as frame
//! grids with thumbnails, and the dead letters; redrive and cancel
//! buttons. Server-rendered HTML that works without JavaScript; a small
//! script swaps each page's `<main>` for a fresh one when the status table
//! changes (server-sent events from one poll of the table every 500 ms,
//! however many pages are open, so a burst of events is one update).
//!
//! With a token configured, the monitor asks for it once and keeps a
//! signed session (not the token) in an `HttpOnly; SameSite=Strict`
//! cookie ([`auth`]). Every POST carries a CSRF token that must equal its
//! cookie (a double submit). Pages forbid framing, inline script and type
//! sniffing. `server.ui` turns the monitor off, or its buttons.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Cookie, CookieJar};
use maud::Markup;
use serde::Deserialize;
use tokio::sync::watch;

use crate::api::control::Control;
use crate::events::ledger::{Ledgers, ParentWait};
use crate::queue::{Queues, Redrive};
use auth::{CSRF_COOKIE, SignIn, csrf_ok};
use board::{Board, Filter};
use live::Streams;

mod auth;
pub mod board;
mod grid;
mod listing;
mod live;
mod pages;
mod rerender;

/// What every monitor answer says about how a browser may use it: nothing
/// but this origin's script, images and forms; never in a frame.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     connect-src 'self'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";
/// Live streams open at once when the monitor is not told otherwise.
const MAX_LIVE_STREAMS: usize = 256;

/// What the monitor's handlers share.
#[derive(Clone)]
pub struct Ui {
    board: Option<Arc<Board>>,
    queues: Queues,
    ledgers: Ledgers,
    /// `None`: read-only.
    control: Option<Control>,
    /// Re-renders from the grid; `None`: read-only.
    rerender: Option<crate::api::submit::Submitter>,
    /// `None`: no token, no sign-in.
    sign_in: Option<Arc<SignIn>>,
    /// Cookies get `Secure` (`server.behind_tls`).
    behind_tls: bool,
    /// The status table's version, for the live pages.
    live: watch::Sender<i64>,
    /// The live pages' streams and their cap.
    streams: Streams,
    /// `[queue_manager] max_frames`: no size read from the table is taken
    /// beyond it.
    max_frames: u32,
}

impl Ui {
    /// The monitor over `status` (the status table's file, when there is
    /// one); `control` is `None` for a read-only one.
    pub fn new(
        status: Option<&std::path::Path>,
        queues: Queues,
        ledgers: Ledgers,
        control: Option<Control>,
        token: Option<String>,
    ) -> Self {
        let board = status.and_then(|path| match Board::open(path) {
            Ok(board) => Some(Arc::new(board)),
            Err(error) => {
                tracing::warn!(%error, "the monitor cannot read the status table");
                None
            }
        });
        let (live, _) = watch::channel(0);
        if let Some(board) = &board {
            tokio::spawn(live::poll_status(Arc::downgrade(board), live.clone()));
        }
        Self {
            board,
            queues,
            ledgers,
            control,
            rerender: None,
            sign_in: token.map(|t| Arc::new(SignIn::new(t))),
            behind_tls: false,
            live,
            streams: Streams::new(MAX_LIVE_STREAMS, live::MAX_AGE),
            max_frames: crate::config::DEFAULT_MAX_FRAMES,
        }
    }

    /// Marks cookies `Secure`, for a monitor reached over HTTPS.
    pub fn behind_tls(mut self, behind_tls: bool) -> Self {
        self.behind_tls = behind_tls;
        self
    }

    /// At most `max` live streams open at once.
    pub fn max_live_streams(mut self, max: usize) -> Self {
        self.streams = Streams::new(max, live::MAX_AGE);
        self
    }

    /// Lets the array page re-render frames through `submitter` (only a
    /// monitor with buttons).
    pub fn with_rerender(mut self, submitter: crate::api::submit::Submitter) -> Self {
        if self.control.is_some() {
            self.rerender = Some(submitter);
        }
        self
    }

    /// Clamps what the pages read from the table to `max_frames` frames
    /// (`[queue_manager] max_frames`).
    pub fn max_frames(mut self, max_frames: u32) -> Self {
        self.max_frames = max_frames;
        self
    }

    /// The routes, under `/ui`.
    pub fn router(self) -> Router {
        let mut routes = Router::new()
            .route("/ui", get(overview))
            .route("/ui/jobs", get(jobs))
            .route("/ui/jobs/{id}", get(job))
            .route("/ui/dead", get(dead_letters))
            .route("/ui/thumbnails/{queue}/{message_id}/{file}", get(thumbnail))
            .route("/ui/live", get(live::live));
        routes = if self.control.is_some() {
            routes
                .route("/ui/redrive", post(redrive))
                .route("/ui/cancel", post(cancel))
                .route("/ui/rerender", post(rerender::rerender))
        } else {
            routes
                .route("/ui/redrive", post(read_only))
                .route("/ui/cancel", post(read_only))
                .route("/ui/rerender", post(read_only))
        };
        let routes = routes.route_layer(middleware::from_fn_with_state(
            self.clone(),
            auth::signed_in,
        ));
        Router::new()
            .route("/ui/login", get(auth::login_form).post(auth::login))
            .route("/ui/live.js", get(live::script))
            .merge(routes)
            .layer(middleware::map_response(page_headers))
            .with_state(self)
    }

    /// What job `id` of `queue` still waits for, from that queue's ledger
    /// (none when it cannot be read).
    async fn waits_for(&self, id: &str, queue: &str) -> Vec<ParentWait> {
        let Some(ledger) = self.ledgers.get(queue) else {
            return Vec::new();
        };
        ledger
            .parent_waits(id, queue)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, job_id = id, "the monitor cannot read what a job waits for");
                Vec::new()
            })
    }

    fn csrf<'a>(&self, jar: &'a CookieJar) -> Option<&'a str> {
        self.control.as_ref()?;
        jar.get(CSRF_COOKIE).map(Cookie::value)
    }
}

/// The headers every monitor answer carries.
async fn page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether a request wants only the page's `<main>` (the live script).
fn fragment(headers: &HeaderMap) -> bool {
    headers.contains_key("x-renderq-fragment")
}

fn html(markup: Markup) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::response::Html(markup.into_string()),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, html(pages::not_found(what))).into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "monitor page failed");
    (StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {e}")).into_response()
}

/// Runs a board query on a blocking thread.
async fn read<T: Send + 'static>(
    ui: &Ui,
    f: impl FnOnce(&Board) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let Some(board) = ui.board.clone() else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "No status table: [events] status is \"off\" in workers.toml",
        )
            .into_response());
    };
    tokio::task::spawn_blocking(move || f(&board))
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
}

async fn overview(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    let mut queues = Vec::new();
    for name in ui.queues.names() {
        let stats = match ui.queues.get(name) {
            Some(queue) => queue.stats().await.ok(),
            None => None,
        };
        queues.push((name.to_owned(), stats));
    }
    let max_frames = ui.max_frames;
    let data = read(&ui, move |b| {
        Ok((
            b.running()?,
            b.workers()?,
            b.arrays(max_frames)?,
            b.last_frame()?,
        ))
    })
    .await;
    match data {
        Ok((running, workers, arrays, last)) => html(pages::page(
            "Overview",
            fragment(&headers),
            pages::overview(&queues, &running, &workers, &arrays, last.as_ref()),
        )),
        Err(response) => response,
    }
}

async fn jobs(State(ui): State<Ui>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let filter = Filter::parse(query.as_deref());
    let rows = {
        let (filter, max_frames) = (filter.clone(), ui.max_frames);
        read(&ui, move |b| b.jobs(&filter, max_frames)).await
    };
    match rows {
        Ok(rows) => html(pages::page(
            "Jobs",
            fragment(&headers),
            listing::jobs(&rows, &filter),
        )),
        Err(response) => response,
    }
}

/// A job's page, or an array's (a page of its frame grid: `?page=N`,
/// from 1).
async fn job(
    State(ui): State<Ui>,
    Path(id): Path<String>,
    headers: HeaderMap,
    jar: CookieJar,
    RawQuery(query): RawQuery,
) -> Response {
    let page = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(1)
        .saturating_sub(1);
    let max_frames = ui.max_frames;
    let found = {
        let id = id.clone();
        read(&ui, move |b| match b.array(&id, max_frames)? {
            Some(array) => {
                let layout = grid::Layout::of(&array, page, max_frames);
                let children = b.children(&id, layout.children())?;
                Ok(Some(Found::Array(array, layout, children)))
            }
            None => Ok(b.job(&id)?.map(Found::Job)),
        })
        .await
    };
    let csrf = ui.csrf(&jar);
    match found {
        Ok(Some(Found::Array(array, layout, children))) => {
            let waits = ui.waits_for(&id, &array.queue).await;
            let cells = layout.cells(&children);
            html(pages::page(
                "Array",
                fragment(&headers),
                listing::array(&array, &layout, &cells, &waits, csrf),
            ))
        }
        Ok(Some(Found::Job(job))) => {
            let waits = ui.waits_for(&id, &job.queue).await;
            html(pages::page(
                "Job",
                fragment(&headers),
                pages::job(&job, &waits, csrf),
            ))
        }
        Ok(None) => not_found(&format!("No job or array {id} is in the status table.")),
        Err(response) => response,
    }
}

/// What an id names: an array (with a page of its grid and that page's
/// children) or a job.
enum Found {
    Array(board::ArrayRow, grid::Layout, Vec<board::JobRow>),
    Job(board::JobRow),
}

async fn dead_letters(
    State(ui): State<Ui>,
    headers: HeaderMap,
    jar: CookieJar,
    RawQuery(query): RawQuery,
) -> Response {
    let names: Vec<String> = ui.queues.names().map(str::to_owned).collect();
    let wanted = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "queue")
        .map(|(_, v)| v.into_owned());
    let name = match wanted.filter(|w| names.contains(w)) {
        Some(name) => name,
        None => match names.first() {
            Some(first) => first.clone(),
            None => return not_found("No queue is configured."),
        },
    };
    let queue = ui.queues.get(&name).expect("a configured queue");
    match queue.dlq_list(crate::ui::board::LIST_LIMIT).await {
        Ok(dead) => html(pages::page(
            "Dead letters",
            fragment(&headers),
            pages::dead_letters(&name, &names, &dead, ui.csrf(&jar)),
        )),
        Err(e) => unavailable(e),
    }
}

async fn thumbnail(
    State(ui): State<Ui>,
    Path((queue, message_id, file)): Path<(String, String, String)>,
) -> Response {
    let Some(ledger) = ui.ledgers.get(&queue) else {
        return not_found("No such queue.");
    };
    match ledger.thumbnail(&format!("{message_id}/{file}")).await {
        Ok(Some(jpeg)) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            jpeg,
        )
            .into_response(),
        Ok(None) => not_found("No such thumbnail."),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct RedriveForm {
    #[serde(default)]
    csrf: String,
    queue: String,
    #[serde(default)]
    message_id: Option<String>,
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    csrf: String,
    job_id: String,
}

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response()
}

async fn redrive(State(ui): State<Ui>, jar: CookieJar, Form(form): Form<RedriveForm>) -> Response {
    if !csrf_ok(&jar, &form.csrf) {
        return forbidden();
    }
    let Some(queue) = ui.queues.get(&form.queue) else {
        return not_found("No such queue.");
    };
    let which = match form.message_id.as_deref().map(crate::job::id::Id::parse) {
        Some(Ok(id)) => Redrive::Message(id),
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        None => Redrive::All,
    };
    match queue
        .dlq_redrive(crate::ui::board::LIST_LIMIT, &which)
        .await
    {
        Ok(n) => {
            tracing::info!(queue = %form.queue, redriven = n, "Redriven from the monitor.");
            Redirect::to(&format!("/ui/dead?queue={}", form.queue)).into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn cancel(State(ui): State<Ui>, jar: CookieJar, Form(form): Form<CancelForm>) -> Response {
    if !csrf_ok(&jar, &form.csrf) {
        return forbidden();
    }
    let Some(control) = &ui.control else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    match control.cancel(&form.job_id, None).await {
        Ok(report) => Redirect::to(&format!("/ui/jobs/{}", report.job_id)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn read_only() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, "this monitor is read-only").into_response()
}

#[cfg(test)]
mod tests;
