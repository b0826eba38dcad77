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

/// Mean wall and CPU time, in ms, per round of `rounds` of `f`.
fn per_round(rounds: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (started, cpu) = (Instant::now(), cpu_used());
    for _ in 0..rounds {
        f();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / rounds as f64;
    (ms(started.elapsed()), ms(cpu_used() - cpu))
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

/// CPU time (user + system, all threads) this process has used.
fn cpu_used() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage of this process");
    let time =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    time(usage.user_time()) + time(usage.system_time())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs.unwrap_or(2_000);
    // Alternated in blocks, so that both see the same machine. Wall time
    // on a busy machine says little; this process's CPU time per job is
    // what the collection costs the worker.
    let (mut plain, mut measured) = ([Duration::ZERO; 2], [Duration::ZERO; 2]);
    for _ in 0..10 {
        for (with_usage, totals) in [(false, &mut plain), (true, &mut measured)] {
            let (started, cpu) = (Instant::now(), cpu_used());
            for _ in 0..jobs / 10 {
                spawn_true(with_usage).await?;
            }
            totals[0] += started.elapsed();
            totals[1] += cpu_used() - cpu;
        }
    }
    let ms = |total: Duration| total.as_secs_f64() * 1e3 / (jobs / 10 * 10) as f64;
    println!(
        "process `true`, {jobs} jobs, a job waited for as before / with its rusage read first: \
         wall {:.3} / {:.3} ms ({:+.3} ms), this process's CPU {:.3} / {:.3} ms ({:+.3} ms)",
        ms(plain[0]),
        ms(measured[0]),
        ms(measured[0]) - ms(plain[0]),
        ms(plain[1]),
        ms(measured[1]),
        ms(measured[1]) - ms(plain[1]),
    );

    let pid = std::process::id();
    let adaptor = per_round(jobs, || {
        let meter = RunMeter::start(pid);
        std::hint::black_box(meter.and_then(|m| m.finish()));
    });
    println!(
        "adaptor run, /proc at its start and end: wall {:.3} ms, CPU {:.3} ms a run",
        adaptor.0, adaptor.1
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
        "every try, pricing it and writing its usage as JSON: wall {:.4} ms, CPU {:.4} ms ({rounds} rounds)",
        every.0, every.1
    );
    Ok(())
}
