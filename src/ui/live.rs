//! Live pages: one poll of the status table for all open pages, a
//! server-sent event to each when it changed, and the script that listens.
//! Each stream holds a connection (a file descriptor) while its page is
//! open, so there are at most `server.max_live_streams` of them, and each
//! ends after [`MAX_AGE`] (the browser reconnects by itself).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Semaphore, watch};

use super::Ui;
use super::board::Board;

/// How often the status table is looked at while pages are open.
const LIVE_POLL: Duration = Duration::from_millis(500);
/// How long one stream lasts; a page that stays open reconnects, so a
/// stream left by a client that vanished without closing is freed by then.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// What a refused page waits before trying again (a hint; the script
/// waits 15 to 30 s).
const RETRY_AFTER_S: &str = "30";
/// The script, served as `/ui/live.js`.
const SCRIPT: &str = include_str!("live.js");

/// The open streams and how long each may last.
#[derive(Debug, Clone)]
pub(super) struct Streams {
    /// One permit per stream that may be open.
    permits: Arc<Semaphore>,
    /// How many permits there are.
    max: usize,
    max_age: Duration,
}

impl Streams {
    pub(super) fn new(max: usize, max_age: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            max_age,
        }
    }
}

/// Bumps `live` whenever the status table changed, while anyone listens.
pub(super) async fn poll_status(board: std::sync::Weak<Board>, live: watch::Sender<i64>) {
    loop {
        tokio::time::sleep(LIVE_POLL).await;
        let Some(board) = board.upgrade() else {
            return;
        };
        if live.receiver_count() == 0 {
            continue;
        }
        if let Ok(Ok(version)) = tokio::task::spawn_blocking(move || board.version()).await {
            live.send_if_modified(|v| std::mem::replace(v, version) != version);
        }
    }
}

/// Server-sent events: `changed` whenever the status table did (at most
/// one per poll, however many events it folded), until the stream's age
/// is up. 503 when `max` streams are open already.
pub(super) async fn live(State(ui): State<Ui>) -> Response {
    let streams = &ui.streams;
    let Ok(permit) = streams.permits.clone().try_acquire_owned() else {
        tracing::debug!(max = streams.max, "refused a live stream: all are taken");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::RETRY_AFTER, RETRY_AFTER_S),
                // The connection goes too: its descriptor is what is short.
                (header::CONNECTION, "close"),
            ],
            format!(
                "{} live pages are open, as many as server.max_live_streams allows; \
                 this one updates when it is reloaded\n",
                streams.max
            ),
        )
            .into_response();
    };
    let end = tokio::time::Instant::now() + streams.max_age;
    let stream = futures_util::stream::unfold(
        (ui.live.subscribe(), permit),
        move |(mut version, permit)| async move {
            // The permit goes when the stream does: at its end, or when the
            // client hangs up and the body is dropped.
            tokio::time::timeout_at(end, version.changed())
                .await
                .ok()?
                .ok()?;
            let v = *version.borrow_and_update();
            let event = Event::default().event("changed").data(v.to_string());
            Some((Ok::<_, std::convert::Infallible>(event), (version, permit)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `/ui/live.js`.
pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}
