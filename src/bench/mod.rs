//! `renderq bench`: throughput, latency and memory measured on this
//! machine, on throw-away queues. Each mode is a module: `embedded` (the
//! default), `sqs` (`--sqs-endpoint`), `cancel`, `dispatch`, `events`,
//! `spot`, `procs`, `uploads`, `inputs`, `pipeline`, `ui` and `thumbs`. Here: the arguments, and what the modes share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

pub mod cache;
mod cancel;
mod dispatch;
mod embedded;
mod events;
mod inputs;
mod ledger;
mod manifest;
mod pipeline;
mod procs;
pub mod proxy;
mod spot;
mod sqs;
pub mod thumbs;
mod ui;
mod uploads;
mod usage;

use crate::api::submit::SubmitRequest;
use crate::worker::Outcome;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// No-op jobs pushed through one worker slot [default: 10000 embedded,
    /// 500 on SQS].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Embedded: rounds the --jobs are split into, each through one slot
    /// with the status table off and on, alternating which goes first.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
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
    /// Instead: time from a cancel to its running job being stopped
    /// (--jobs runs, default 20; with --sqs-endpoint, on SQS with its
    /// ledger in a bucket there).
    #[arg(long)]
    pub cancel: bool,
    /// Instead: the web monitor's page render times (arrays of 10 to
    /// 10,000 frames), a 1920x1080 PNG's thumbnail, and no-op jobs/s with
    /// 100 live pages connected (--jobs, default 10000).
    #[arg(long)]
    pub ui: bool,
    /// Instead: a thumbnail's cost, in the sandbox (a `renderq thumbnail`
    /// child under the default limits) against in this process, for a
    /// 1920x1080 PNG and an 8K half-float EXR; and the EXR bomb refused.
    #[arg(long)]
    pub thumbnails: bool,
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
    /// Instead: 20 jobs on one worker sharing one large input from the
    /// S3-compatible server at this endpoint, through the same proxy:
    /// bytes downloaded, a cache hit's staging time, the first download's
    /// rate (and `aws s3 cp`'s, when installed).
    #[arg(long, value_name = "URL")]
    pub inputs: Option<String>,
    /// Instead: S3 calls per array child of the ledger (arrays of 10,
    /// 1,000 and 10,000 children, settled by 4 ledgers × 4 settlers) on
    /// the S3-compatible server at this endpoint.
    #[arg(long, value_name = "URL")]
    pub ledger: Option<String>,
    /// Instead: what measuring a try's usage adds to a job (a `process`
    /// command's rusage, an adaptor run's `/proc` reads, pricing) over
    /// --jobs jobs [default: 2000].
    #[arg(long)]
    pub usage: bool,
    /// Instead: a no-op array (--jobs frames, default 1000) and a `same`
    /// dependant array on 2 slots: from a parent child's settle to its
    /// dependant's message sent (embedded queue; with --sqs-endpoint, on
    /// SQS with the S3 ledger's calls counted).
    #[arg(long)]
    pub pipeline: bool,
    /// With --pipeline and --sqs-endpoint: the ledger's bucket on this
    /// S3-compatible server instead (e.g. s3s-fs, where moto's one Python
    /// process would make every call wait behind the other slot's).
    #[arg(long, value_name = "URL", requires = "sqs_endpoint")]
    pub s3_endpoint: Option<String>,
    /// With --inputs: files in the cold manifest (0: no manifest run).
    #[arg(long, default_value_t = 10_000)]
    pub files: usize,
    /// With --uploads or --inputs: the file's size.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// With --uploads or --inputs: delay the proxy adds to everything
    /// sent.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// With --uploads or --inputs: each connection's rate cap.
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
        ..Default::default()
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.sqs_endpoint {
        _ if args.dispatch => dispatch::run(args).await,
        _ if args.usage => usage::run(args).await,
        _ if args.cancel => cancel::run(args).await,
        _ if args.ui => ui::run(args).await,
        _ if args.thumbnails => thumbs::run().await,
        _ if args.events => events::run(args).await,
        _ if args.pipeline => pipeline::run(args).await,
        _ if args.spot => spot::run(args).await,
        _ if args.procs.is_some() => procs::run(args).await,
        _ if args.uploads.is_some() => uploads::run(args).await,
        _ if args.inputs.is_some() => inputs::run(args).await,
        _ if args.ledger.is_some() => ledger::run(args.ledger.as_deref().unwrap_or_default()).await,
        Some(endpoint) => sqs::run(args, endpoint).await,
        None => embedded::run(args).await,
    }
}

/// Where a run measured: SQS with `--sqs-endpoint`, else the embedded queue.
fn backend_name(args: &BenchArgs) -> &'static str {
    if args.sqs_endpoint.is_some() {
        "SQS"
    } else {
        "the embedded queue"
    }
}

/// `median N ms, max M ms` of timed runs (sorts them).
fn median_and_max(times: &mut [Duration]) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.0} ms, max {:.0} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
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

/// A `kB` field of a live process's `/proc/PID/status`, such as `VmRSS`
/// (resident now) or `VmHWM` (its peak).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// Runs a `renderq worker` process on `config` until `queue` is empty;
/// returns the time that took and the worker's peak resident memory in
/// KiB. A dead letter, or the worker exiting, fails the run.
async fn work_until_drained(
    config: &std::path::Path,
    queue: &crate::queue::Queue,
) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let mut worker = tokio::process::Command::new(std::env::current_exe()?)
        .args(["worker", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = worker.id().context("worker exited at once")?;
    loop {
        let stats = queue.stats().await?;
        anyhow::ensure!(stats.dead_lettered == 0, "a job was dead-lettered");
        if stats.visible == 0 && stats.in_flight == 0 {
            break;
        }
        anyhow::ensure!(
            worker.try_wait()?.is_none(),
            "the worker exited before the queue was drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let peak = proc_status_kib(pid, "VmHWM").context("reading the worker's peak memory")?;
    worker.start_kill()?;
    worker.wait().await?;
    Ok((took, peak))
}
