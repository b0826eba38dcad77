//! `renderq bench --ui`: what the web monitor costs with 700,000 job rows
//! in the status table: the overview's, the jobs list's and an array
//! page's render time (arrays of 10, 1,000 and 10,000 frames) and size, a
//! thumbnail of a 1920×1080 PNG, and no-op jobs through one slot with 100
//! live pages (server-sent events clients) connected, against none.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use super::{BenchArgs, CONFIG, drain, no_op};
use crate::app::App;
use crate::config::{Config, UiMode};
use crate::events::status::StatusTable;
use crate::job::event::{ArrayRef, Event, EventType, JobRef};
use crate::ui::Ui;

/// Live pages connected during the fan-out run.
const CLIENTS: usize = 100;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    pages().await?;
    thumbnail()?;
    fan_out(args.jobs.unwrap_or(10_000)).await
}

/// The median time of `runs` GETs of `uri`, and the page's size.
async fn time_get(
    router: &axum::Router,
    uri: &str,
    runs: usize,
) -> anyhow::Result<(Duration, usize)> {
    let mut times = Vec::with_capacity(runs);
    let mut size = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty())?)
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{uri}: {}",
            response.status()
        );
        size = response.into_body().collect().await?.to_bytes().len();
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[runs / 2], size))
}

/// Rows the status table holds while the pages are timed: about what a
/// farm keeps for `retention` (seven days) at 100,000 frames a day.
const ROWS: usize = 700_000;
/// Arrays in it, besides the 10-, 1,000- and 10,000-frame ones timed.
const FILLER_FRAMES: u32 = 10_000;

/// A child's or a plain job's `JobSucceeded`, with one output and its
/// thumbnail.
fn succeeded(job_id: String, array: Option<ArrayRef>) -> Event {
    let message_id = uuid::Uuid::new_v4().to_string();
    let job = JobRef {
        job_id,
        message_id: message_id.clone(),
        queue: "bench".into(),
        command: "render_demo".into(),
        attempt: 1,
        array,
        ..Default::default()
    };
    Event::new(
        EventType::JobSucceeded,
        Some(job),
        json!({"outputs": [format!("s3://results/{message_id}.png")],
               "thumbnails": [format!("{message_id}/0.jpg")]}),
    )
}

/// An array of `frames` frames, one a child, every child succeeded: its
/// `JobSubmitted` and its children's events.
fn array_events(frames: u32) -> (String, Vec<Event>) {
    let array = uuid::Uuid::new_v4().to_string();
    let submitted = Event::new(
        EventType::JobSubmitted,
        Some(JobRef {
            job_id: array.clone(),
            queue: "bench".into(),
            command: "render_demo".into(),
            ..JobRef::default()
        }),
        json!({"array_size": frames, "frames": frames,
               "frame_spec": format!("1-{frames}"), "chunk_size": 1}),
    );
    let children = (0..frames).map(|index| {
        succeeded(
            uuid::Uuid::new_v4().to_string(),
            Some(ArrayRef {
                job_id: array.clone(),
                index,
                size: frames,
                ..Default::default()
            }),
        )
    });
    let events = std::iter::once(submitted).chain(children).collect();
    (array, events)
}

/// Fills a status table with `ROWS` job rows: the timed arrays, filler
/// arrays, and plain jobs (one in twenty dead-lettered) up to `ROWS`,
/// folded a batch at a time. Returns the timed arrays and a plain job's
/// message id.
fn fill(table: &StatusTable) -> anyhow::Result<(Vec<(u32, String)>, String)> {
    let mut timed = Vec::new();
    let mut rows = 0;
    for frames in [10u32, 1_000, 10_000] {
        let (array, events) = array_events(frames);
        table.apply_all(&events)?;
        timed.push((frames, array));
        rows += frames as usize;
    }
    while rows + FILLER_FRAMES as usize <= ROWS - 10_000 {
        table.apply_all(&array_events(FILLER_FRAMES).1)?;
        rows += FILLER_FRAMES as usize;
    }
    let mut message_id = String::new();
    while rows < ROWS {
        let batch = (ROWS - rows).min(10_000);
        let events: Vec<Event> = (0..batch)
            .map(|n| {
                let job_id = uuid::Uuid::new_v4().to_string();
                if n % 20 == 0 {
                    let job = JobRef {
                        job_id: job_id.clone(),
                        message_id: job_id,
                        queue: "bench".into(),
                        command: "render_demo".into(),
                        attempt: 3,
                        array: None,
                        ..Default::default()
                    };
                    Event::new(
                        EventType::JobDeadLettered,
                        Some(job),
                        json!({"reason": "bench"}),
                    )
                } else {
                    succeeded(job_id, None)
                }
            })
            .collect();
        if let Some(job) = events.last().and_then(|e| e.job.as_ref()) {
            message_id = job.message_id.clone();
        }
        table.apply_all(&events)?;
        rows += batch;
    }
    Ok((timed, message_id))
}

async fn pages() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("status.sqlite3");
    let table = StatusTable::open(&path)?;
    let started = Instant::now();
    let (arrays, message_id) = fill(&table)?;
    println!(
        "status table: {ROWS} job rows folded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let router = Ui::new(
        Some(&path),
        Default::default(),
        Default::default(),
        None,
        None,
    )
    .router();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let search = format!("/ui/jobs?q={}", &message_id[..8]);
    for (what, uri) in [
        ("overview", "/ui"),
        ("jobs list", "/ui/jobs"),
        ("jobs list, dead-lettered", "/ui/jobs?state=dead_lettered"),
        (
            "jobs list, a message id's first 8 characters",
            search.as_str(),
        ),
    ] {
        let (took, bytes) = time_get(&router, uri, 5).await?;
        println!("{what}: {:.1} ms, {} KiB", ms(took), bytes / 1024);
    }
    for (size, array) in &arrays {
        let (took, bytes) = time_get(&router, &format!("/ui/jobs/{array}"), 5).await?;
        println!(
            "array page, {size} frames: {:.1} ms, {} KiB",
            ms(took),
            bytes / 1024
        );
    }
    Ok(())
}

fn thumbnail() -> anyhow::Result<()> {
    let image = image::RgbImage::from_fn(1920, 1080, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let output = crate::job::Output::bytes(png, mime::IMAGE_PNG);
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..10 {
        let started = Instant::now();
        size = crate::worker::thumbs::make(&output)?.len();
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "thumbnail of a 1920x1080 PNG: median {:.1} ms ({} KiB JPEG, {} px wide)",
        times[5].as_secs_f64() * 1000.0,
        size / 1024,
        crate::worker::thumbs::WIDTH
    );
    Ok(())
}

/// A throw-away embedded farm whose events fold into a status table, with
/// its monitor served; returns it, its folder and its live events' URL.
async fn farm() -> anyhow::Result<(App, tempfile::TempDir, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("workers.toml");
    std::fs::write(
        &path,
        format!("{CONFIG}\n[events]\nstatus = \"status.sqlite3\"\n"),
    )?;
    let app = App::build(Config::load(&path)?).await?;
    let router = app.ui(UiMode::ReadOnly, None).expect("a monitor").router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/ui/live", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((app, dir, url))
}

/// No-op jobs per second through one slot.
async fn rate(app: &App, jobs: usize) -> anyhow::Result<f64> {
    let (submitter, worker) = (app.submitter(), app.worker());
    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    drain(&worker, jobs).await
}

/// No-op jobs through one slot, events folded into the status table,
/// without and with `CLIENTS` live pages (each on a fresh farm, so both
/// start from an empty table).
async fn fan_out(jobs: usize) -> anyhow::Result<()> {
    let (app, _dir, _) = farm().await?;
    let alone = rate(&app, jobs).await?;
    let (app, _dir, url) = farm().await?;
    let http = reqwest::Client::new();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut response = http.get(&url).send().await?;
        let received = received.clone();
        clients.push(tokio::spawn(async move {
            while let Ok(Some(chunk)) = response.chunk().await {
                let events = chunk.windows(7).filter(|w| w == b"changed").count();
                received.fetch_add(events as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    let watched = rate(&app, jobs).await?;
    for client in clients {
        client.abort();
    }
    println!(
        "no-op jobs through one slot, events into the status table: {alone:.0} jobs/s; \
         with {CLIENTS} live pages connected: {watched:.0} jobs/s ({:+.1} %), {} updates sent",
        100.0 * (watched - alone) / alone,
        received.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
