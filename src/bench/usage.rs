//! `renderq bench --usage`: what measuring a try's usage costs a job.
//!
//! - A `process` command: spawning `true` and waiting for it the way the
//!   worker did before (tokio's `wait`), against reading its rusage first
//!   on a blocking thread (`waitid` with `WNOWAIT`) and then waiting: the
//!   difference per job is what the collection adds.
//! - An adaptor run: reading `/proc/PID` at its start and end.
//! - Every try: pricing it and putting its `usage` into JSON.

use std::time::{Duration, Instant};

use super::BenchArgs;
use crate::commands::usage::{RunMeter, wait_exited};
use crate::config::FleetConfig;
use crate::job::usage::{Instance, Lifecycle, ProcessUsage, Usage};

/// Mean time per round of `rounds` of `f`.
fn per_round(rounds: usize, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        f();
    }
    started.elapsed() / rounds as u32
}

async fn spawn_true(with_usage: bool) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new("true").spawn()?;
    if with_usage {
        let pid = child.id();
        let used = tokio::task::spawn_blocking(move || pid.map(wait_exited)).await?;
        std::hint::black_box(used);
    }
    child.wait().await?;
    Ok(())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(2_000);
    // Alternated in blocks, so that both see the same machine.
    let (mut plain, mut measured) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..10 {
        let started = Instant::now();
        for _ in 0..jobs / 10 {
            spawn_true(false).await?;
        }
        plain += started.elapsed();
        let started = Instant::now();
        for _ in 0..jobs / 10 {
            spawn_true(true).await?;
        }
        measured += started.elapsed();
    }
    let per = |total: Duration| total / (jobs / 10 * 10) as u32;
    let (plain, measured) = (per(plain), per(measured));
    println!(
        "process `true`, {jobs} jobs: {:.3} ms a job waited for as before, {:.3} ms with its rusage read first: {:+.3} ms",
        plain.as_secs_f64() * 1e3,
        measured.as_secs_f64() * 1e3,
        (measured.as_secs_f64() - plain.as_secs_f64()) * 1e3
    );

    let pid = std::process::id();
    let adaptor = per_round(jobs, || {
        let meter = RunMeter::start(pid);
        std::hint::black_box(meter.and_then(|m| m.finish()));
    });
    println!(
        "adaptor run: {:.3} ms a run for /proc at its start and end",
        adaptor.as_secs_f64() * 1e3
    );

    let config: FleetConfig =
        toml::from_str("[price]\nper_hour = 1.0\n\"g5.xlarge\" = { on_demand = 3.06 }")?;
    let prices = config.prices().map_err(|e| anyhow::anyhow!(e.message))?;
    let instance = Instance {
        instance_type: Some("g5.xlarge".into()),
        lifecycle: Some(Lifecycle::OnDemand),
    };
    let process = ProcessUsage {
        cpu_s: 9.7,
        peak_rss_bytes: 300 << 20,
    };
    let rounds = jobs * 50;
    let every = per_round(rounds, || {
        let usage =
            Usage::new(10.0, Some(process), None, &instance).priced(prices.per_hour(&instance), 2);
        std::hint::black_box(usage.to_json());
    });
    println!(
        "every try: {:.4} ms to price it and write its usage as JSON ({rounds} rounds)",
        every.as_secs_f64() * 1e3
    );
    Ok(())
}
