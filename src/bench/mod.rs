//! `renderq bench`: throughput and latency measured on this machine, on a
//! throw-away queue: the embedded one in a temporary folder, or (with
//! `--sqs-endpoint`) a fresh SQS queue pair on an SQS-compatible server;
//! or one of the special modes below (dispatch, events, spot, procs,
//! uploads), each in its own module.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod events;
mod procs;
mod spot;
mod uploads;

use crate::app::App;
use crate::config::Config;
use crate::submit::SubmitRequest;
use crate::worker::Outcome;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// No-op jobs pushed through one worker slot [default: 10000 embedded,
    /// 500 on SQS].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// JSON-RPC submits over HTTP.
    #[arg(long, default_value_t = 20_000)]
    pub submits: usize,
    /// Concurrent HTTP clients for the submit test.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Jobs timed one at a time, submit to delete, on an idle queue.
    #[arg(long, default_value_t = 1_000)]
    pub latency_jobs: usize,
    /// Benchmark SQS at this endpoint (e.g. a local moto) instead of the
    /// embedded queue; credentials and region come from the standard chain.
    #[arg(long)]
    pub sqs_endpoint: Option<String>,
    /// With --sqs-endpoint: seconds an idle worker is watched while its
    /// receive calls are counted.
    #[arg(long, default_value_t = 60)]
    pub idle_seconds: u64,
    /// Instead: compare the dispatch rate of a no-op `process` command
    /// (`true`) and a no-op `adaptor` job, one slot, no queue.
    #[arg(long)]
    pub dispatch: bool,
    /// With --dispatch: the adaptor program, which must answer any `run`
    /// at once (`cargo build --release --examples` builds this one; the
    /// Python example adaptor also works, given `noop`).
    #[arg(long, default_value = "target/release/examples/noop_adaptor")]
    pub adaptor: PathBuf,
    /// Instead: the cost of events to a JSON-lines file (and SQS, with
    /// --sqs-endpoint), a 1,000-frame array submit, and the delay of its
    /// `ArrayJobCompleted`.
    #[arg(long)]
    pub events: bool,
    /// Instead: time from a spot interruption notice to the interrupted
    /// job being receivable again (--jobs runs, default 20; with
    /// --sqs-endpoint, on SQS).
    #[arg(long)]
    pub spot: bool,
    /// Instead: the aggregate rate of this many worker processes on one
    /// embedded queue (with --slots each), jobs submitted over HTTP while
    /// they drain [default jobs: 30000].
    #[arg(long)]
    pub procs: Option<usize>,
    /// With --procs: slots per worker process.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Instead: upload one large file result to the S3-compatible server
    /// at this endpoint (e.g. a local moto) through a proxy that adds
    /// latency and caps each connection's rate: renderq at upload
    /// concurrency 1 and 8, and `aws s3 cp` when installed.
    #[arg(long, value_name = "URL")]
    pub uploads: Option<String>,
    /// With --uploads: the file's size.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// With --uploads: delay the proxy adds to everything sent upstream.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// With --uploads: each connection's upstream rate cap.
    #[arg(long, default_value_t = 50)]
    pub rate_mib: u64,
}

const CONFIG: &str = r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "bench"
listen_queue = "bench"

[server]
listen = "127.0.0.1:0"

[worker]
wait_time = "1s"

[queues.bench]
backend = "local"
path = "queue"
"#;

fn no_op() -> SubmitRequest {
    SubmitRequest {
        command: "get_version".into(),
        parameters: Default::default(),
        tasks: vec![],
        queue_name: None,
        frames: None,
        chunk_size: None,
        notifications: vec![],
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.sqs_endpoint {
        _ if args.dispatch => dispatch(args).await,
        _ if args.events => events::run(args).await,
        _ if args.spot => spot::run(args).await,
        _ if args.procs.is_some() => procs::run(args).await,
        _ if args.uploads.is_some() => uploads::run(args).await,
        Some(endpoint) => sqs(args, endpoint).await,
        None => embedded(args).await,
    }
}

/// Drains `jobs` queued messages through one worker slot; returns jobs/s.
async fn drain(worker: &crate::worker::Worker, jobs: usize) -> anyhow::Result<f64> {
    let never = CancellationToken::new();
    let started = Instant::now();
    let mut done = 0;
    while done < jobs {
        match worker.process_next(&never, &never).await? {
            Outcome::Processed { .. } => done += 1,
            Outcome::Empty => anyhow::bail!("queue drained early after {done} jobs"),
        }
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

async fn embedded(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("workers.toml");
    std::fs::write(&config_path, CONFIG)?;
    let app = App::build(Config::load(&config_path)?).await?;
    let submitter = app.submitter();
    let worker = app.worker();
    let never = CancellationToken::new();

    // Jobs through one slot: fill the queue, then time draining it.
    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    let jobs_per_s = drain(&worker, jobs).await?;
    println!("jobs through one slot: {jobs} = {jobs_per_s:.0} jobs/s");

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
        let crate::submit::Submitted::Job { message_id: id } = submitter.submit(no_op()).await?
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
    let server = tokio::spawn(crate::server::serve(
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: unknown")
        .trim_start_matches("VmRSS:")
        .trim()
        .to_owned();
    child.start_kill()?;
    child.wait().await?;
    println!("idle worker resident memory: {rss}");
    Ok(())
}

/// Creates a queue and its dead-letter queue; returns the queue's URL.
async fn create_queue_pair(client: &aws_sdk_sqs::Client, name: &str) -> anyhow::Result<String> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await?;
    let dlq_url = dlq.queue_url.context("no dead-letter queue URL")?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .context("no dead-letter queue ARN")?;
    let policy = json!({"deadLetterTargetArn": arn, "maxReceiveCount": "3"}).to_string();
    let queue = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, policy)
        .send()
        .await?;
    queue.queue_url.context("no queue URL")
}

async fn sqs(args: &BenchArgs, endpoint: &str) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;

    let jobs = args.jobs.unwrap_or(500);
    let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
    let client = aws_sdk_sqs::Client::new(&sdk);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let worker_url = create_queue_pair(&client, &format!("renderq-bench-{}", &tag[..10])).await?;
    let bare_url = create_queue_pair(&client, &format!("renderq-bare-{}", &tag[..10])).await?;

    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("workers.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "bench"
listen_queue = "bench"

[queues.bench]
backend = "sqs"
url = "{worker_url}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"#
        ),
    )?;
    let app = App::build(Config::load(&config_path)?).await?;
    let crate::queue::Queue::Sqs(queue) = app.queues.get("bench").context("bench queue")? else {
        anyhow::bail!("bench queue is not SQS");
    };
    let submitter = app.submitter();
    let worker = app.worker();

    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    let before = queue.calls().total();
    let receives_before = queue.calls().receive.load(Relaxed);
    let worker_rate = drain(&worker, jobs).await?;
    let calls = queue.calls().total() - before;
    let receives = queue.calls().receive.load(Relaxed) - receives_before;
    println!(
        "renderq worker, one slot: {jobs} jobs = {worker_rate:.1} jobs/s; {:.2} SQS calls per job ({:.2} receives)",
        calls as f64 / jobs as f64,
        receives as f64 / jobs as f64
    );

    // The same work as a bare SDK loop: receive one, delete it.
    for _ in 0..jobs {
        client
            .send_message()
            .queue_url(&bare_url)
            .message_body("{}")
            .send()
            .await?;
    }
    let started = Instant::now();
    let mut done = 0;
    while done < jobs {
        let received = client
            .receive_message()
            .queue_url(&bare_url)
            .max_number_of_messages(1)
            .wait_time_seconds(20)
            .visibility_timeout(120)
            .send()
            .await?;
        for message in received.messages.unwrap_or_default() {
            client
                .delete_message()
                .queue_url(&bare_url)
                .receipt_handle(message.receipt_handle.unwrap_or_default())
                .send()
                .await?;
            done += 1;
        }
    }
    let bare_rate = jobs as f64 / started.elapsed().as_secs_f64();
    println!(
        "bare SDK receive+delete loop: {jobs} messages = {bare_rate:.1} msgs/s; renderq reaches {:.0} %",
        100.0 * worker_rate / bare_rate
    );

    // An idle worker: receive calls per minute of long polling.
    let never = CancellationToken::new();
    let receives_before = queue.calls().receive.load(Relaxed);
    let idle = Duration::from_secs(args.idle_seconds);
    let started = Instant::now();
    while started.elapsed() < idle {
        worker.process_next(&never, &never).await?;
    }
    let idle_receives = queue.calls().receive.load(Relaxed) - receives_before;
    println!(
        "idle worker: {idle_receives} receive calls in {:.0?} = {:.1} per minute",
        started.elapsed(),
        idle_receives as f64 * 60.0 / started.elapsed().as_secs_f64()
    );

    for url in [worker_url, bare_url] {
        client
            .delete_queue()
            .queue_url(format!("{url}-dlq"))
            .send()
            .await?;
        client.delete_queue().queue_url(url).send().await?;
    }
    Ok(())
}

/// Jobs per second of `command` run back to back with `params`.
async fn rate(
    command: &crate::commands::Command,
    params: serde_json::Value,
    jobs: usize,
) -> anyhow::Result<f64> {
    let params = command
        .schema
        .apply(params.as_object().context("params")?)?;
    let ctx = crate::commands::RunContext {
        cancel: CancellationToken::new(),
        progress: crate::commands::Progress::new(),
        job_id: "bench".into(),
        frames: Vec::new(),
        gpu: None,
    };
    // One warm-up run starts what has to be started (the adaptor).
    command.run(&params, &ctx).await?;
    let started = Instant::now();
    for _ in 0..jobs {
        command.run(&params, &ctx).await?;
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

async fn dispatch(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(2_000);
    let adaptor = std::path::absolute(&args.adaptor)?;
    let config = Config::from_toml(
        &format!(
            r#"
[queue_manager]
allow_commands = ["noop_process", "noop_adaptor"]
default_queue = "q"
listen_queue = "q"

[queues.q]
backend = "local"
path = "queue"

[commands.noop_process]
kind = "process"
program = "true"

[commands.noop_adaptor]
kind = "adaptor"
program = "{}"
[commands.noop_adaptor.parameters]
noop = {{ type = "boolean", default = true }}
"#,
            adaptor.display()
        ),
        &std::env::temp_dir(),
    )?;
    let catalog = crate::catalog::Catalog::from_config(&config)
        .map_err(|i| anyhow::anyhow!("{}: {}", i.key, i.message))?;
    let mut commands = catalog.commands();
    let (adaptor_cmd, process_cmd) = (
        commands.next().context("noop_adaptor")?,
        commands.next().context("noop_process")?,
    );
    let process_rate = rate(process_cmd, json!({}), jobs).await?;
    println!("process dispatch (`true`): {jobs} jobs = {process_rate:.0} jobs/s");
    let adaptor_rate = rate(adaptor_cmd, json!({}), jobs).await?;
    println!(
        "adaptor dispatch ({}): {jobs} jobs = {adaptor_rate:.0} jobs/s = {:.1}x the process rate",
        args.adaptor.display(),
        adaptor_rate / process_rate
    );
    catalog.stop().await;
    Ok(())
}
