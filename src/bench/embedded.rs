//! `renderq bench`: the embedded queue through one slot (the status table
//! off against on, in alternating rounds; then with a cancel on record),
//! one job's submit-to-deleted latency, HTTP submits, and an idle worker's
//! and `serve`'s memory.

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

    // Jobs through one slot, with the status table off and on (the
    // default), each on a farm of its own, in rounds that alternate which
    // goes first: on this machine a busy spell would otherwise land on one
    // side only.
    let off = dir.path().join("off");
    std::fs::create_dir(&off)?;
    std::fs::write(
        off.join("workers.toml"),
        format!("{CONFIG}\n[events]\nstatus = \"off\"\n"),
    )?;
    let without = App::build(Config::load(&off.join("workers.toml"))?).await?;
    let config_path = dir.path().join("workers.toml");
    std::fs::write(&config_path, CONFIG)?;
    let app = App::build(Config::load(&config_path)?).await?;
    compare_status_table(&without, &app, jobs, args.rounds.max(1)).await?;
    drop(without);
    let submitter = app.submitter();
    let worker = app.worker();
    let never = CancellationToken::new();
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

/// No-op jobs/s through one slot with the status table off (`without`)
/// and on (`with`): `jobs` on each side, in `rounds` rounds that alternate
/// which side goes first. Prints each round, the medians, and what the
/// table's writer spent from each drain's start to its last job's end in
/// the table (as earlier versions of this bench did; the submits' events
/// it had not folded yet by then are counted in).
async fn compare_status_table(
    without: &App,
    with: &App,
    jobs: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let per_round = jobs.div_ceil(rounds);
    let (mut off, mut on, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    let mut writer = Drained::default();
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            (without, with)
        } else {
            (with, without)
        };
        let first = through_one_slot(a, per_round).await?;
        let second = through_one_slot(b, per_round).await?;
        let (without, with) = if round % 2 == 0 {
            (first, second)
        } else {
            (second, first)
        };
        let gap = (with.rate / without.rate - 1.0) * 100.0;
        println!(
            "  round {}: status table off {:.0}, on {:.0} jobs/s ({gap:+.1} %)",
            round + 1,
            without.rate,
            with.rate
        );
        off.push(without.rate);
        on.push(with.rate);
        gaps.push(gap);
        writer.took += with.took;
        writer.events += with.events;
        writer.batches += with.batches;
        writer.folding += with.folding;
    }
    let (off, on, gap) = (median(&mut off), median(&mut on), median(&mut gaps));
    println!(
        "jobs through one slot, {rounds} rounds of {per_round}: status table off {off:.0} jobs/s, on {on:.0} jobs/s (medians, {:+.1} % apart; the rounds' median gap {gap:+.1} %)",
        (on / off - 1.0) * 100.0
    );
    if with.status.is_some() {
        println!(
            "  (status table, while draining: {} events in {} transactions, {:.0} ms folding = {:.1} µs an event, {:.0} % of the drains' time)",
            writer.events,
            writer.batches,
            writer.folding.as_secs_f64() * 1000.0,
            writer.folding.as_secs_f64() * 1e6 / writer.events.max(1) as f64,
            writer.folding.as_secs_f64() / writer.took.as_secs_f64() * 100.0
        );
    }
    let dropped = with.publisher.dropped();
    if dropped > 0 {
        println!(
            "  ({dropped} events dropped: the status table's buffer was full, so its rate is not comparable)"
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One drain through one slot: its rate and time, and what the status
/// table's writer did meanwhile (nothing without one).
#[derive(Debug, Default)]
struct Drained {
    rate: f64,
    took: Duration,
    events: u64,
    batches: u64,
    folding: Duration,
}

/// Fills `app`'s queue with `jobs` no-op jobs and times draining them
/// through one slot, up to the last one's end being in the status table
/// when there is one (its writes are part of the cost).
async fn through_one_slot(app: &App, jobs: usize) -> anyhow::Result<Drained> {
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
    let took = started.elapsed();
    let mut drained = Drained {
        rate: jobs as f64 / took.as_secs_f64(),
        took,
        ..Drained::default()
    };
    if let (Some(status), Some(before)) = (&app.status, before) {
        let cost = status.fold_cost();
        drained.events = cost.events - before.events;
        drained.batches = cost.batches - before.batches;
        drained.folding = cost.busy - before.busy;
    }
    Ok(drained)
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
