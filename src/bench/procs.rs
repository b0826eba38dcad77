//! `renderq bench --procs K --slots S`: the embedded queue's aggregate rate
//! with K worker processes of S slots each on one queue, while the jobs are
//! submitted over HTTP (batches of 100) to a separate `serve` process whose
//! own worker listens elsewhere.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::BenchArgs;
use crate::config::Config;
use crate::queue::Queue;

/// Kills the child processes when the bench ends, however it ends.
struct Children(Vec<tokio::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (procs, slots) = (args.procs.unwrap_or(1).max(1), args.slots.max(1));
    let jobs = args.jobs.unwrap_or(30_000);
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = |listen_queue: &str| {
        format!(
            r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "bench"
listen_queue = "{listen_queue}"
[server]
listen = "127.0.0.1:{port}"
max_body_bytes = 16777216
[worker]
slots = {slots}
wait_time = "5s"
[queues.bench]
backend = "local"
path = "queue"
[queues.idle]
backend = "local"
path = "idle"
"#
        )
    };
    let (serve_config, worker_config) = (
        dir.path().join("serve.toml"),
        dir.path().join("worker.toml"),
    );
    std::fs::write(&serve_config, config("idle"))?;
    std::fs::write(&worker_config, config("bench"))?;
    let exe = std::env::current_exe()?;
    let spawn = |subcommand: &str, config: &std::path::Path| {
        tokio::process::Command::new(&exe)
            .args([subcommand, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
    };
    let mut children = Children(vec![spawn("serve", &serve_config)?]);
    for _ in 0..procs {
        children.0.push(spawn("worker", &worker_config)?);
    }
    let url = format!("http://127.0.0.1:{port}/");
    let client = reqwest::Client::new();
    let started_waiting = Instant::now();
    while client.get(format!("{url}healthz")).send().await.is_err() {
        anyhow::ensure!(
            started_waiting.elapsed() < Duration::from_secs(30),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the workers reach their first receive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let queue = Queue::open("bench", &Config::load(&worker_config)?.queues["bench"]).await?;

    let started = Instant::now();
    let batch: Vec<_> = (0..100)
        .map(|i| {
            json!({"jsonrpc": "2.0", "method": "queue_manager_submit_job",
                        "params": {"command": "get_version"}, "id": i})
        })
        .collect();
    let mut submitters = tokio::task::JoinSet::new();
    let clients = 4;
    let batches_per_client = jobs.div_ceil(100).div_ceil(clients);
    for _ in 0..clients {
        let (client, url, body) = (client.clone(), url.clone(), json!(batch));
        submitters.spawn(async move {
            for _ in 0..batches_per_client {
                let replies: serde_json::Value =
                    client.post(&url).json(&body).send().await?.json().await?;
                anyhow::ensure!(
                    replies
                        .as_array()
                        .is_some_and(|r| r.iter().all(|r| r["result"].is_string())),
                    "submit failed: {replies}"
                );
            }
            anyhow::Ok(batches_per_client * 100)
        });
    }
    let mut submitted = 0;
    while let Some(done) = submitters.join_next().await {
        submitted += done??;
    }
    let submit_time = started.elapsed();
    loop {
        let stats = queue.stats().await?;
        if stats.visible == 0 && stats.in_flight == 0 {
            anyhow::ensure!(stats.dead_lettered == 0, "jobs were dead-lettered");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "not drained: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    drop(children);
    println!(
        "{procs} worker process(es) x {slots} slot(s): {submitted} jobs submitted over HTTP (batches of 100) in {submit_time:.2?} and drained in {elapsed:.2?} = {:.0} jobs/s",
        submitted as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
