//! `renderq bench --dispatch`: a no-op `process` command against a no-op
//! `adaptor` job, one slot, no queue.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use crate::config::Config;

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
        workdir: None,
        usage: Default::default(),
    };
    // One warm-up run starts what has to be started (the adaptor).
    command.run(&params, &ctx).await?;
    let started = Instant::now();
    for _ in 0..jobs {
        command.run(&params, &ctx).await?;
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
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
    let catalog = crate::commands::catalog::Catalog::from_config(&config)
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
