//! `renderq bench --events`: what events cost a worker, how long a large
//! array takes to submit, and how soon its `ArrayJobCompleted` follows the
//! last child.

use std::time::{Duration, Instant};

use super::{BenchArgs, CONFIG, drain, no_op};
use crate::app::App;
use crate::config::Config;
use crate::submit::{SubmitRequest, Submitted};

/// A throw-away embedded farm with `extra` config; returns it and its folder.
async fn farm(extra: &str) -> anyhow::Result<(App, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, format!("{CONFIG}\n{extra}"))?;
    Ok((App::build(Config::load(&path)?).await?, dir))
}

/// Jobs per second of no-op jobs through one slot.
async fn rate(app: &App, jobs: usize) -> anyhow::Result<f64> {
    let submitter = app.submitter();
    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    drain(&app.worker(), jobs).await
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(5_000);
    let (plain, _plain_dir) = farm("").await?;
    let sqs_target = match &args.sqs_endpoint {
        Some(endpoint) => {
            let sdk = crate::aws::sdk_config(None, Some(endpoint)).await;
            let client = aws_sdk_sqs::Client::new(&sdk);
            let url = client
                .create_queue()
                .queue_name(format!(
                    "bench-events-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ))
                .send()
                .await?
                .queue_url
                .unwrap_or_default();
            format!(
                "[events.targets.pipeline]\nkind = \"sqs\"\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"\n"
            )
        }
        None => String::new(),
    };
    let (with_events, dir) = farm(&format!(
        "[events]\nstatus = \"status.sqlite3\"\n[events.targets.audit]\nkind = \"file\"\npath = \"events.jsonl\"\n{sqs_target}"
    ))
    .await?;

    // Alternate runs, so drift on a busy machine hits both alike.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        without.push(rate(&plain, jobs).await?);
        with.push(rate(&with_events, jobs).await?);
    }
    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    let targets = if sqs_target.is_empty() {
        "a JSON-lines file and the status table"
    } else {
        "a JSON-lines file, the status table and SQS"
    };
    println!(
        "no-op jobs through one slot: {:.0} jobs/s without events, {:.0} jobs/s with events to {targets} ({:+.1} %)",
        best(&without),
        best(&with),
        (best(&with) / best(&without) - 1.0) * 100.0
    );

    let frames = 1_000;
    let request = SubmitRequest {
        frames: Some(format!("1-{frames}")),
        ..no_op()
    };
    let started = Instant::now();
    let Submitted::Array { job_id, .. } = with_events.submitter().submit(request).await? else {
        anyhow::bail!("an array submit came back as a plain job");
    };
    println!(
        "{frames}-frame array (one frame per child) submitted in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    drain(&with_events.worker(), frames).await?;
    let last_child_done = Instant::now();
    let events = dir.path().join("events.jsonl");
    let needle = "\"type\":\"ArrayJobCompleted\",";
    loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains(needle) && l.contains(&job_id))
        {
            break;
        }
        anyhow::ensure!(
            last_child_done.elapsed() < Duration::from_secs(30),
            "no ArrayJobCompleted"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "ArrayJobCompleted in the JSON-lines file {:.1} ms after the last child was deleted",
        last_child_done.elapsed().as_secs_f64() * 1000.0
    );
    with_events.publisher.close(Duration::from_secs(10)).await;
    Ok(())
}
