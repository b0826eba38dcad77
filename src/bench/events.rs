//! `renderq bench --events`: what events cost a worker, how long a large
//! array takes to submit, and how soon its `ArrayJobCompleted` follows the
//! last child.

use std::time::{Duration, Instant};

use super::{BenchArgs, CONFIG, drain, no_op};
use crate::api::submit::{SubmitRequest, Submitted};
use crate::app::App;
use crate::config::Config;

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
    let targets =
        format!("[events.targets.audit]\nkind = \"file\"\npath = \"events.jsonl\"\n{sqs_target}");
    let (with_events, dir) = farm(&targets).await?;
    let (with_status, _status_dir) =
        farm(&format!("[events]\nstatus = \"status.sqlite3\"\n{targets}")).await?;

    // Alternate runs, so drift on a busy machine hits all alike.
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (app, rates) in [&plain, &with_events, &with_status]
            .into_iter()
            .zip(&mut rates)
        {
            rates.push(rate(app, jobs).await?);
        }
    }
    let [none, events, status] = rates.map(|rates| rates.iter().copied().fold(0.0, f64::max));
    let change = |rate: f64| (rate / none - 1.0) * 100.0;
    let to = if sqs_target.is_empty() {
        "a JSON-lines file"
    } else {
        "a JSON-lines file and SQS"
    };
    println!("no-op jobs through one slot, best of 3 runs of {jobs}:");
    println!("  without events: {none:.0} jobs/s");
    println!(
        "  events to {to}: {events:.0} jobs/s ({:+.1} %)",
        change(events)
    );
    println!(
        "  and the status table too: {status:.0} jobs/s ({:+.1} %)",
        change(status)
    );
    println!(
        "  events dropped: {}",
        with_events.publisher.dropped() + with_status.publisher.dropped()
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
