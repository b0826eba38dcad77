//! `renderq bench`: the embedded queue through one slot (before and after
//! a cancel was recorded), one job's
//! submit-to-deleted latency, HTTP submits, and an idle worker's memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{BenchArgs, CONFIG, drain, no_op};
use crate::app::App;
use crate::config::Config;
use crate::worker::Outcome;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(10_000);
    let dir = tempfile::tempdir()?;

    // Jobs through one slot, with the status table off, then on (the
    // default), each on a farm of its own.
    let off = dir.path().join("off");
    std::fs::create_dir(&off)?;
    std::fs::write(
        off.join("workers.toml"),
        format!("{CONFIG}\n[events]\nstatus = \"off\"\n"),
    )?;
    let app = App::build(Config::load(&off.join("workers.toml"))?).await?;
    let without = through_one_slot(&app, jobs).await?;
    println!("jobs through one slot, status table off: {jobs} = {without:.0} jobs/s");
    drop(app);

    let config_path = dir.path().join("workers.toml");
    std::fs::write(&config_path, CONFIG)?;
    let app = App::build(Config::load(&config_path)?).await?;
    let submitter = app.submitter();
    let worker = app.worker();
    let never = CancellationToken::new();
    let jobs_per_s = through_one_slot(&app, jobs).await?;
    println!(
        "jobs through one slot, status table on: {jobs} = {jobs_per_s:.0} jobs/s ({:+.1} % against off)",
        (jobs_per_s / without - 1.0) * 100.0
    );
    // Once a cancel is on record, every receive reads the ledger's stamp.
    let other = uuid::Uuid::new_v4().to_string();
    app.control().cancel(&other, None).await?;
    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    let jobs_per_s = drain(&worker, jobs).await?;
    println!("the same with a cancel on record: {jobs} = {jobs_per_s:.0} jobs/s");

    // Latency: one job at a time on an otherwise idle queue.
    let worker = Arc::new(worker);
    let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let runner = {
        let (worker, stop) = (worker.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(Outcome::Processed { message_id, .. }) =
                    worker.process_next(&stop, &never).await
                {
                    let _ = finished_tx.send((message_id, Instant::now()));
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(args.latency_jobs);
    let mut pending = HashMap::new();
    for _ in 0..args.latency_jobs {
        let sent = Instant::now();
        let crate::api::submit::Submitted::Job { message_id: id } =
            submitter.submit(no_op()).await?
        else {
            anyhow::bail!("a plain job came back as an array");
        };
        pending.insert(id, sent);
        let (id, at) = finished.recv().await.context("worker stopped")?;
        if let Some(sent) = pending.remove(&id) {
            latencies.push(at - sent);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.cancel();
    runner.await?;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "submit-to-deleted latency over {} jobs: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default()
    );

    // Submits over HTTP, with keep-alive clients.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::api::server::serve(
        listener,
        app.router()?,
        server_stop.clone(),
    ));
    let client = reqwest::Client::new();
    let per_client = args.submits.div_ceil(args.concurrency.max(1));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, url) = (client.clone(), url.clone());
        clients.spawn(async move {
            let body = json!({"jsonrpc": "2.0", "method": "queue_manager_submit_job",
                              "params": {"command": "get_version"}, "id": 1});
            for _ in 0..per_client {
                let reply: serde_json::Value =
                    client.post(&url).json(&body).send().await?.json().await?;
                anyhow::ensure!(reply["result"].is_string(), "submit failed: {reply}");
            }
            anyhow::Ok(per_client)
        });
    }
    let mut submitted = 0;
    while let Some(result) = clients.join_next().await {
        submitted += result??;
    }
    let elapsed = started.elapsed();
    server_stop.cancel();
    server.await??;
    println!(
        "HTTP submits: {submitted} with {} clients in {elapsed:.2?} = {:.0} submits/s",
        args.concurrency,
        submitted as f64 / elapsed.as_secs_f64()
    );

    // Resident memory of an idle worker process: on a queue of its own,
    // as the submits above are still queued.
    let idle_config = dir.path().join("idle.toml");
    std::fs::write(
        &idle_config,
        CONFIG.replace("path = \"queue\"", "path = \"idle-queue\""),
    )?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["worker", "--config"])
        .arg(&idle_config)
        .env("RUST_LOG", "warn")
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().context("worker exited early")?;
    let rss = super::proc_status_kib(pid, "VmRSS").context("reading the worker's memory")?;
    child.start_kill()?;
    child.wait().await?;
    println!("idle worker resident memory: {rss} kB");
    let rss = idle_serve_rss(dir.path()).await?;
    println!("idle serve resident memory (status table on): {rss} kB");
    Ok(())
}

/// Fills `app`'s queue with `jobs` no-op jobs and times draining them
/// through one slot, up to the last one's end being in the status table
/// when there is one (its writes are part of the cost). Jobs/s.
async fn through_one_slot(app: &App, jobs: usize) -> anyhow::Result<f64> {
    let submitter = app.submitter();
    let worker = app.worker();
    let mut last = None;
    for _ in 0..jobs {
        if let crate::api::submit::Submitted::Job { message_id } = submitter.submit(no_op()).await?
        {
            last = Some(message_id);
        }
    }
    let before = app.status.as_ref().map(|s| s.fold_cost());
    let started = Instant::now();
    drain(&worker, jobs).await?;
    // An event the status table's full buffer dropped never arrives: the
    // wait then gives up after 10 s (counted in the rate) and the drops
    // are reported.
    if let (Some(status), Some(last)) = (&app.status, last) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, id) = (status.clone(), last.clone());
            let ended = tokio::task::spawn_blocking(move || status.get(&id)).await??;
            if ended.is_some_and(|s| s.is_final()) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let elapsed = started.elapsed();
    let rate = jobs as f64 / elapsed.as_secs_f64();
    if let (Some(status), Some(before)) = (&app.status, before) {
        let cost = status.fold_cost();
        let (events, busy) = (cost.events - before.events, cost.busy - before.busy);
        println!(
            "  (status table, while draining: {events} events in {} transactions, {:.0} ms folding = {:.1} µs an event, {:.0} % of the drain's time)",
            cost.batches - before.batches,
            busy.as_secs_f64() * 1000.0,
            busy.as_secs_f64() * 1e6 / events.max(1) as f64,
            busy.as_secs_f64() / elapsed.as_secs_f64() * 100.0
        );
    }
    let dropped = app.publisher.dropped();
    if dropped > 0 {
        println!("  ({dropped} events dropped: the status table's buffer was full)");
    }
    Ok(rate)
}

/// Resident memory of an idle `renderq serve` (endpoint, worker and the
/// status table), 3 s after it started.
async fn idle_serve_rss(dir: &std::path::Path) -> anyhow::Result<u64> {
    let serve_dir = dir.join("serve");
    std::fs::create_dir_all(&serve_dir)?;
    let config = serve_dir.join("workers.toml");
    std::fs::write(&config, CONFIG)?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().context("serve exited early")?;
    let rss = super::proc_status_kib(pid, "VmRSS").context("reading serve's memory")?;
    child.start_kill()?;
    child.wait().await?;
    Ok(rss)
}
